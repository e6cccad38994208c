//! Shares of the machine: the `squatter` program creates realms until it is refused, on every
//! node, beside a victim (program 0 of the same program) that then creates its own and checks
//! what it keeps in them. Judged by what the victim reports, and by the refusals (OverQuota)
//! the squatter saw itself.

use std::path::PathBuf;

use psyche_tests::{require_kvm, Boot, Run};

use super::{both_passed, saw};
use psyche_vmm::vm::status;

/// A machine of two 32 MiB nodes with one vCPU each (program k runs on vCPU k, so the
/// squatter's own stack and views are on node 1), written for test `name`.
fn two_small_nodes(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("psyche-quotas-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("two-small-nodes.toml");
    let text = "name = \"two-small-nodes\"\n\
                [[node]]\nid = 0\ncpus = [0]\nmemory = \"32M\"\n\
                [[node]]\nid = 1\ncpus = [1]\nmemory = \"32M\"\n";
    std::fs::write(&path, text).unwrap();
    path
}

/// KiB of realm data the squatter reported holding on `node`.
fn squatter_kib(run: &Run, node: u32) -> u64 {
    let prefix = format!("squatter: node {node}: ");
    run.lines()
        .iter()
        .find_map(|(_, line)| line.strip_prefix(&prefix)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the squatter did not report node {node}:\n{}", run.console.text()))
}

#[test]
fn a_squatter_holding_all_the_realms_it_can_leaves_the_victim_its_share() {
    // 496 realm ids between two programs: 248 each. Without shares the squatter would take all
    // 496 and the victim's first create would fail.
    let run = Boot::new("uma").programs(&["squatter", "squatter"]).args(&["realms", "248", "248"]).timeout(120.0).run();
    both_passed(&run, "realms");
    assert!(run.printed("squatter: made 248 realms, then OverQuota"), "{}", run.console.text());
    saw(&run, "squatter", "10 of the 10 realms given back made again");
    saw(&run, "squatter", "and then the share is used up again: Some(OverQuota)");
    assert!(run.printed("victim: made 248 realms beside the squatter's, then OverQuota"), "{}", run.console.text());
    saw(&run, "victim", "every realm holds its secret");
    saw(&run, "victim", "destroyed realms give the share back");
}

#[test]
fn a_squatter_filling_every_node_leaves_the_victim_its_share_of_each() {
    let topology = two_small_nodes("fill");
    let run =
        Boot::new(topology.to_str().unwrap()).programs(&["squatter", "squatter"]).args(&["memory"]).timeout(60.0).run();
    both_passed(&run, "memory");
    for node in 0..2 {
        saw(&run, "squatter", &format!("node {node}: realms of 1 pages end with its share: OverQuota"));
        saw(&run, "victim", &format!("node {node}: an 8 MiB realm beside the squatter's: None"));
        saw(&run, "victim", &format!("node {node}: every page holds what was written"));
        // About half of a node's 32 MiB (the kernel and the per-CPU room come off first).
        let kib = squatter_kib(&run, node);
        assert!((12 * 1024..16 * 1024).contains(&kib), "the squatter held {kib} KiB on node {node}");
    }
    let _ = std::fs::remove_dir_all(topology.parent().unwrap());
}

#[test]
fn a_program_s_share_of_memory_can_be_set_and_counts_its_stack() {
    // 2 MiB of each node for the squatter; the victim keeps the default.
    let topology = two_small_nodes("memory");
    let run = Boot::new(topology.to_str().unwrap())
        .programs(&["squatter", "squatter"])
        .cmdline("quota=1:memory=2M")
        .args(&["memory"])
        .timeout(60.0)
        .run();
    both_passed(&run, "memory");
    // On node 0 the squatter holds only realms: 2 MiB less what the shrinking sizes left over
    // (realms of 256, 3 x 64 and 3 x 16 data pages, with their directories and tables).
    assert_eq!(squatter_kib(&run, 0), (256 + 3 * 64 + 3 * 16) * 4);
    // On node 1, its own, its 256 KiB stack, its view (two tables) and its root realm's
    // directory came out of the same share.
    let kib = squatter_kib(&run, 1);
    assert!((1024..=2048 - 256 - 3 * 4).contains(&kib), "the squatter held {kib} KiB on node 1");
    let _ = std::fs::remove_dir_all(topology.parent().unwrap());
}

#[test]
fn frames_of_an_ended_program_come_back() {
    // The victim may hold all of node 0: while the squatter holds its half the node has no
    // 24 MiB left (OutOfMemory, not OverQuota); once the squatter ends they are back.
    let topology = two_small_nodes("end");
    let run = Boot::new(topology.to_str().unwrap())
        .programs(&["squatter", "squatter"])
        .cmdline("quota=0:memory=32M")
        .args(&["after-end", "24M"])
        .timeout(60.0)
        .run();
    both_passed(&run, "after-end");
    saw(&run, "victim", "24576 KiB on node 0 while the squatter holds its share: Some(OutOfMemory)");
    saw(&run, "victim", "24576 KiB on node 0 once the squatter's frames are back: None");
    saw(&run, "victim", "every page holds what was written");
    let _ = std::fs::remove_dir_all(topology.parent().unwrap());
}

#[test]
fn quota_on_the_psyche_vmm_command_line_reaches_the_kernel() {
    require_kvm();
    // The guest's exit status is 0 only if the victim saw a share of 20 realms and the
    // squatter one of 5 (each exits with the number of its first failed check).
    let args = [
        "psyche-vmm",
        "--topology",
        "uma",
        "--program",
        "squatter",
        "--program",
        "squatter",
        "--quota",
        "realms=20",
        "--quota",
        "1:realms=5",
        "--timeout",
        "60",
        "--",
        "realms",
        "20",
        "5",
    ];
    assert_eq!(psyche_vmm::cli::main(args), 0);
}

#[test]
fn a_bad_quota_is_bad_input_before_anything_boots() {
    for quota in ["realms=many", "memory=4Q", "pages=3", "realms=1,realms=2", "1:realms=3"] {
        let status = psyche_vmm::cli::main(["psyche-vmm", "--topology", "uma", "--quota", quota]);
        assert_eq!(status, status::BAD_INPUT, "--quota {quota}");
    }
}

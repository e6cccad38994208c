//! The NUMA machine: remote-memory latency traps counted and charged per node pair, realms
//! moving between nodes under their users, domains moving between CPUs. Judged by what the
//! guest programs check and print and by the counts the kernel reports at shutdown.

use psyche_tests::{Boot, Run};
use psyche_vmm::latency::GuestLatencyReport;

fn passed(run: &Run) {
    run.expect_exit(0);
    let passed = run.lines().iter().filter(|(_, line)| line == "numa: passed").count();
    assert_eq!(passed, run.outcome.programs.len(), "{}", run.console.text());
}

/// The kernel's latency report.
fn kernel_counts(run: &Run) -> &GuestLatencyReport {
    let guest = run.outcome.guest.as_ref().expect("the kernel reported the machine");
    guest.latency.as_ref().expect("the kernel reported its latency counts")
}

/// Boots `topology` in account mode (every remote access traps and is counted; no time is
/// spent) with `count` `numa pattern READS WRITES` programs, no migration, and checks the
/// kernel's per-pair counts against what the programs did: program k runs on vCPU k and
/// touches a one-page realm on every other node READS + WRITES times.
fn pattern_counts_are_exact(topology: &str, count: usize) {
    let (reads, writes) = (3u64, 2u64);
    let run = Boot::new(topology)
        .latency_mode("account")
        .cmdline("migrate=off")
        .programs(&vec!["numa"; count])
        .args(&["pattern", &reads.to_string(), &writes.to_string()])
        .run();
    passed(&run);
    let config = Boot::new(topology);
    let machine = &config.config().topology;
    let nodes = machine.node_count();
    let mut expected = vec![vec![0u64; nodes]; nodes];
    for program in 0..count {
        let from = machine.node_of_cpu((program % machine.cpu_count()) as u32).unwrap() as usize;
        for (to, cell) in expected[from].iter_mut().enumerate() {
            if to != from && machine.nodes[to].memory_bytes > 0 {
                *cell += reads + writes;
            }
        }
    }
    let counts = kernel_counts(&run);
    assert_eq!(counts.traps, expected, "traps per (from, to) node pair");
    for (from, row) in expected.iter().enumerate() {
        for (to, &traps) in row.iter().enumerate() {
            let ns = u64::from(machine.latency_ns(from as u32, to as u32).unwrap_or(0));
            assert_eq!(counts.charged_ns[from][to], traps * ns, "ns charged for {from} -> {to}");
        }
    }
    assert_eq!(counts.migrations, 0);
    // The VMM charged exactly what the kernel counted, on the virtual clock only.
    let vmm = run.outcome.latency.as_ref().expect("the VMM's latency totals");
    assert_eq!(vmm.charges, counts.traps);
    assert_eq!(vmm.charged_ns, counts.charged_ns);
    assert_eq!(vmm.virtual_ns.iter().sum::<u64>(), counts.charged_ns.iter().flatten().sum::<u64>());
}

#[test]
fn account_mode_counts_and_charges_every_remote_touch_on_two_sockets() {
    pattern_counts_are_exact("two-socket", 5);
}

#[test]
fn account_mode_counts_and_charges_every_remote_touch_on_the_butterfly() {
    pattern_counts_are_exact("butterfly", 3);
}

#[test]
fn a_node_without_cpus_is_charged_as_the_target_of_remote_touches() {
    // asymmetric: node 2 has memory and no CPU, and distances differ by direction.
    pattern_counts_are_exact("asymmetric", 4);
}

const KEY: &str = "00112233445566778899aabbccddeeff";

#[test]
fn a_realm_moves_between_nodes_under_a_user_on_another_vcpu_and_the_policy_follows_the_user() {
    // Program 0 moves the realm four times while program 1, on the other socket, adds to a
    // counter in it; then program 1 alone uses it until the kernel moves it to program 1's node.
    let run = Boot::new("two-socket")
        .latency_mode("account")
        .programs(&["numa", "numa"])
        .args(&["migrate", KEY, "4"])
        .timeout(120.0)
        .run();
    passed(&run);
    assert!(run.printed("counter 600, expected 600: no increment lost"), "{}", run.console.text());
    assert!(run.printed("the kernel moved it to node 1"), "{}", run.console.text());
    // Five moves asked for, one by the policy (the flags realm may move too).
    assert!(kernel_counts(&run).migrations >= 6, "{:?}", kernel_counts(&run).migrations);
}

#[test]
fn each_window_is_charged_exactly_the_configured_latency() {
    let run = Boot::new("two-socket")
        .latency_mode("window")
        .programs(&["numa", "numa"])
        .args(&["migrate", KEY, "2"])
        .timeout(120.0)
        .run();
    passed(&run);
    let counts = kernel_counts(&run);
    let machine = &Boot::new("two-socket").config().topology.clone();
    assert!(counts.traps[1][0] + counts.traps[0][1] > 0, "remote touches trapped: {:?}", counts.traps);
    for (from, row) in counts.traps.iter().enumerate() {
        for (to, &traps) in row.iter().enumerate() {
            let ns = u64::from(machine.latency_ns(from as u32, to as u32).unwrap_or(0));
            assert_eq!(counts.charged_ns[from][to], traps * ns, "{from} -> {to}");
            if from == to {
                assert_eq!(traps, 0, "local touches are never charged");
            }
        }
    }
}

#[test]
fn a_domain_tours_every_node_of_the_butterfly() {
    let run = Boot::new("butterfly").programs(&["numa"]).args(&["tour"]).run();
    passed(&run);
    for node in 0..24 {
        assert!(run.printed(&format!("node {node})")), "never ran on node {node}\n{}", run.console.text());
    }
}

#[test]
fn a_realm_follows_a_domain_that_moves_from_node_to_node() {
    // ring8, account mode: on each node the realm takes exactly the policy's 64 traps, moves
    // there, and is local (no trap) for the touches that follow.
    let run = Boot::new("ring8").latency_mode("account").programs(&["numa"]).args(&["follow", "100"]).run();
    passed(&run);
    for node in 1..8 {
        let line = format!("follow: node {node}: the realm moved here after 64 touches; 100 touches since, 0 traps");
        assert!(run.printed(&line), "missing '{line}' in\n{}", run.console.text());
    }
    assert_eq!(kernel_counts(&run).migrations, 7);
}

#[test]
fn in_window_mode_a_realm_follows_its_user_too() {
    let run = Boot::new("two-socket").latency_mode("window").programs(&["numa"]).args(&["follow", "100"]).run();
    passed(&run);
    assert!(run.printed("follow: node 1: the realm moved here after"), "{}", run.console.text());
    assert!(run.printed("100 touches since, 0 traps"), "{}", run.console.text());
    // One trap per window, and the policy moved the realm after 64 of them.
    assert_eq!(kernel_counts(&run).traps[1][0], 64);
}

//! Realms, protection domains, keys and access lists, judged by what the guest programs report
//! and by how the kernel ended their domains. All on multi-node machines with several vCPUs.

use psyche_tests::{Boot, Run};
use psyche_vmm::vm::{status, ProgramEnd};

/// `Termination` reasons of psyche-abi, as the kernel reports them.
const NO_RIGHT: u64 = 1;
const WRITE_READ_ONLY: u64 = 2;
const BAD_CONTEXT_BLOCK: u64 = 5;

fn scenario(topology: &str, programs: &[&str], args: &[&str]) -> Run {
    Boot::new(topology).programs(programs).args(args).timeout(60.0).run()
}

fn passed(run: &Run, scenario: &str) {
    run.expect_exit(0);
    assert!(run.printed(&format!("realms: {scenario}: passed")), "{}", run.console.text());
}

fn terminated(run: &Run, program: usize) -> (u64, u64, u64) {
    assert_eq!(run.outcome.exit_status(), status::PROGRAM_FAULT, "{:?}\n{}", run.outcome.end, run.console.text());
    match run.outcome.programs[program].end {
        Some(ProgramEnd::Terminated { reason, address, realm, .. }) => (reason, address, realm),
        other => panic!("expected program {program}'s domain to be terminated, got {other:?}\n{}", run.console.text()),
    }
}

/// A 128-bit key in hex, as a user hands it out.
const SHARED_KEY: &str = "0123456789abcdeffedcba9876543210";

#[test]
fn two_domains_share_a_realm_at_the_same_address_and_pointers_work() {
    let run = scenario("two-socket", &["realms", "realms"], &["share", SHARED_KEY, "1"]);
    passed(&run, "share");
    let text = run.console.text();
    // The owner and the user saw the realm at one address.
    let owner_address = text.lines().find_map(|l| l.split(" at ").nth(1).filter(|_| l.contains("owner made realm")));
    let user_address = text.lines().find_map(|l| l.split(" at ").nth(1).filter(|_| l.contains("user 1")));
    let owner_address = owner_address.and_then(|a| a.split(' ').next()).expect("owner address");
    let user_address = user_address.and_then(|a| a.split(',').next()).expect("user address");
    assert_eq!(owner_address, user_address);
    assert!(run.printed("owner saw counter 1000"));
}

#[test]
fn many_domains_on_every_node_use_one_realm_concurrently() {
    // Seven users on vCPUs 1..=7, both nodes, adding to one counter while the owner waits.
    let programs = ["realms"; 8];
    let run = scenario("two-socket", &programs, &["share", SHARED_KEY, "7"]);
    passed(&run, "share");
    assert!(run.printed("owner saw counter 7000"));
    for user in 1..8 {
        assert!(run.printed(&format!("realms: user {user} on cpu {user}")), "user {user} did not run");
    }
}

#[test]
fn every_right_is_allowed_and_refused_as_it_should_be() {
    passed(&scenario("ring8", &["realms"], &["rights"]), "rights");
}

#[test]
fn touching_a_realm_without_a_right_terminates_only_that_domain() {
    let run = scenario("two-socket", &["realms", "hello"], &["touch-refused"]);
    let (reason, address, realm) = terminated(&run, 0);
    assert_eq!(reason, NO_RIGHT);
    assert_eq!(address, 0x0000_4000_0000_0000 + realm * (1 << 30));
    assert!(run.printed("asking first gets an error, not termination"));
    assert!(!run.printed("the kernel should have stopped this domain"));
    // The other domain ran to its end.
    assert_eq!(run.outcome.programs[1].end, Some(ProgramEnd::Exited { code: 0 }));
}

#[test]
fn writing_a_read_only_realm_terminates_the_domain() {
    let run = scenario("asymmetric", &["realms"], &["write-read-only"]);
    assert!(run.printed("read through a read-only open: 42"));
    let (reason, _, _) = terminated(&run, 0);
    assert_eq!(reason, WRITE_READ_ONLY);
    assert!(!run.printed("the write went through"));
}

#[test]
fn taking_rights_away_closes_the_realm_in_views_that_had_it_open() {
    let run = scenario("two-socket", &["realms"], &["revoke"]);
    assert!(run.printed("still open after a grant"));
    assert!(run.printed("re-opening is refused"));
    let (reason, _, _) = terminated(&run, 0);
    assert_eq!(reason, NO_RIGHT);
    assert!(!run.printed("after revocation: the kernel should have stopped"));
}

#[test]
fn destroyed_ranges_are_reused_and_owners_take_what_they_own_with_them() {
    passed(&scenario("ring8", &["realms"], &["destroy"]), "destroy");
}

#[test]
fn creating_realms_until_memory_runs_out_is_an_error_and_memory_comes_back() {
    let dir = std::env::temp_dir().join(format!("psyche-exhaust-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("small.toml");
    std::fs::write(&path, "name = \"small\"\n[[node]]\nid = 0\ncpus = [0, 1]\nmemory = \"32M\"\n").unwrap();
    let run = Boot::new(path.to_str().unwrap()).programs(&["realms", "hello"]).args(&["exhaust"]).timeout(120.0).run();
    passed(&run, "exhaust");
    assert!(run.printed("hello from program 1"), "the other domain was disturbed");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn forged_keys_and_bad_pointers_get_errors() {
    passed(&scenario("two-socket", &["realms", "hello"], &["forge"]), "forge");
}

#[test]
fn a_context_block_in_kernel_memory_terminates_the_domain() {
    let run = scenario("two-socket", &["realms"], &["bad-context-block"]);
    let (reason, _, _) = terminated(&run, 0);
    assert_eq!(reason, BAD_CONTEXT_BLOCK);
}

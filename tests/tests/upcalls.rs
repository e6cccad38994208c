//! Upcalls, user-level threads, protected invocations and the message-style server, judged by
//! what the guest programs report and how the kernel ended their domains.

use psyche_abi::trace::TraceKind;
use psyche_tests::{Boot, Run};
use psyche_vmm::vm::{status, ProgramEnd};

const UPCALL_FAILED: u64 = 6;
const BAD_CONTEXT_BLOCK: u64 = 5;
const KEY: &str = "0123456789abcdeffedcba9876543210";

fn scenario(topology: &str, programs: &[&str], args: &[&str]) -> Run {
    Boot::new(topology).programs(programs).args(args).timeout(60.0).run()
}

fn passed(run: &Run, scenario: &str) {
    assert!(run.printed(&format!("upcalls: {scenario}: passed")), "{}", run.console.text());
}

#[test]
fn time_slices_preempt_threads_that_never_yield_and_block_unblock_work() {
    let run = scenario("two-socket", &["upcalls"], &["threads"]);
    run.expect_exit(0);
    passed(&run, "threads");
    assert!(run.printed("every spinner ran"));
    assert!(run.printed("ponger answered round 5"));
}

#[test]
fn a_fault_upcall_ends_one_thread_and_the_others_go_on() {
    let run = scenario("ring8", &["upcalls"], &["fault"]);
    run.expect_exit(0);
    passed(&run, "fault");
    assert!(run.printed("threads: thread 1 died of a fault: vector 14, error code 0x4, address 0x10"));
}

#[test]
fn protected_invocations_by_fault_and_by_gate_with_a_message_style_server() {
    // Program 0 serves; program 1 invokes, on the other vCPU. The last operation faults in
    // the server, which ends the server's domain (status 123) and gives the client an error.
    let run = scenario("two-socket", &["upcalls", "upcalls"], &["server", KEY]);
    passed(&run, "server");
    for check in [
        "add by fault on entry: Ok(42)",
        "add through the gate: Ok(1001)",
        "the operation ran in the server's domain: Ok(0)",
        "the server summed our realm through a pointer: Ok(4032)",
        "the server unblocked our thread through our unblock operation: Ok(0)",
        "the unblocked thread ran",
        "100 invocations: 5050",
        "message-style square: Ok(144)",
        "another thread ran while this one was blocked in the invocation",
        "an operation that faults in the callee returns an error",
        "invoking the ended server is an error",
    ] {
        assert!(run.printed(check), "missing '{check}' in\n{}", run.console.text());
    }
    assert_eq!(run.outcome.exit_status(), status::PROGRAM_FAULT);
    assert_eq!(run.outcome.programs[1].end, Some(ProgramEnd::Exited { code: 0 }));
    match run.outcome.programs[0].end {
        Some(ProgramEnd::Terminated { reason, address, .. }) => {
            assert_eq!(reason, UPCALL_FAILED);
            assert_eq!(address, 0x18, "the address the operation touched");
        }
        other => panic!("expected the server's domain to be terminated, got {other:?}"),
    }
}

#[test]
fn a_context_block_in_kernel_memory_ends_the_domain_at_its_first_upcall() {
    let run = scenario("uma", &["upcalls", "hello"], &["garbage-context"]);
    assert!(run.printed("upcalls: spinning until the time slice ends"));
    assert!(!run.printed("still running"));
    match run.outcome.programs[0].end {
        Some(ProgramEnd::Terminated { reason, .. }) => assert_eq!(reason, BAD_CONTEXT_BLOCK),
        other => panic!("expected termination, got {other:?}\n{}", run.console.text()),
    }
    assert_eq!(run.outcome.programs[1].end, Some(ProgramEnd::Exited { code: 0 }));
}

#[test]
fn many_clients_invoke_one_server_at_once_from_every_vcpu() {
    // Program 0 serves; seven clients on the other vCPUs, on both nodes, each make 200
    // protected invocations and one message-style one at the same time.
    let run = scenario("two-socket", &["upcalls"; 8], &["many", KEY, "7"]);
    run.expect_exit(0);
    for client in 1..8 {
        assert!(
            run.printed(&format!("client {client} on cpu {client}: 200 protected invocations, 0 wrong")),
            "{}",
            run.console.text()
        );
        assert!(run.printed(&format!("client {client}: message-style square: Ok({})", client * client)));
    }
    assert!(run.printed("upcalls: every client is done"));
    // two-socket charges remote memory (window mode), so the server's operations run near
    // its data: on its own CPU (0, node 0) for the clients of node 1, on the caller's CPU for
    // those of node 0.
    for client in 1..8 {
        let place = if client < 4 { format!("cpu {client} node 0") } else { "cpu 0 node 0".to_owned() };
        let line = format!("client {client} on cpu {client} node {}: the operation ran on {place}", client / 4);
        assert!(run.printed(&line), "missing '{line}' in\n{}", run.console.text());
    }
}

#[test]
fn clients_time_sliced_with_the_server_and_each_other_get_every_answer() {
    // Eight programs on four vCPUs: two to a vCPU, time-sliced, the server sharing vCPU 0 with
    // client 4. A slice ends only where the processor can change hands (never in the middle of
    // a protected invocation, whose callers' frames and records are the vCPU's), and a client
    // waiting in the kernel for a deferred (message-style) answer lets the server's threads
    // have the vCPU they need to answer it. Either mistake shows here: wrong results, or a hang.
    let run = scenario("uma", &["upcalls"; 8], &["many", KEY, "7"]);
    run.expect_exit(0);
    for client in 1..8 {
        let cpu = client % 4;
        assert!(
            run.printed(&format!("client {client} on cpu {cpu}: 200 protected invocations, 0 wrong")),
            "{}",
            run.console.text()
        );
        assert!(run.printed(&format!("client {client}: message-style square: Ok({})", client * client)));
    }
    assert!(run.printed("upcalls: every client is done"));
}

#[test]
fn a_server_outlives_a_caller_that_ends_during_its_call() {
    // Program 1 has the server (0) run a long operation for it on vCPU 1; program 2 ends
    // program 1 meanwhile, by invoking an operation of program 1's that faults. When the
    // server's operation returns there is no caller to resume: only that call ends, not the
    // server, which still answers program 2 afterwards.
    let run = scenario("uma", &["upcalls"; 3], &["orphan", KEY]);
    passed(&run, "orphan");
    // The victim's end is a program fault, which is the guest's exit status.
    assert_eq!(run.outcome.exit_status(), status::PROGRAM_FAULT);
    assert!(run.printed("killer: the server outlived the caller it was serving: Ok(5)"), "{}", run.console.text());
    assert!(!run.printed("victim: linger returned"), "{}", run.console.text());
    assert!(run.printed("upcalls: every client is done"));
    assert!(
        matches!(run.outcome.programs[1].end, Some(ProgramEnd::Terminated { .. })),
        "{:?}",
        run.outcome.programs[1]
    );
    assert_eq!(run.outcome.programs[0].end, Some(ProgramEnd::Exited { code: 0 }));
    assert_eq!(run.outcome.programs[2].end, Some(ProgramEnd::Exited { code: 0 }));
}

#[test]
fn the_trace_shows_placed_invocations_arriving_on_the_callee_s_cpu() {
    // Program 0 serves on vCPU 0 (node 0); program 1 runs on vCPU 1 (node 0), program 2..=4 on
    // vCPUs 2..=4 (vCPU 4 is on node 1). Every invocation begins on its caller's vCPU; those
    // from node 1 arrive on vCPU 0, the others on the caller's own vCPU.
    let run = Boot::new("two-socket").traced().programs(&["upcalls"; 5]).args(&["many", KEY, "4"]).timeout(60.0).run();
    run.expect_exit(0);
    let trace = run.outcome.trace.as_ref().expect("a trace");
    let mut begun = std::collections::HashMap::new();
    for vcpu in &trace.vcpus {
        for record in vcpu.records.iter().filter(|r| r.kind == TraceKind::InvocationBegin as u16) {
            begun.insert(record.arg2, vcpu.cpu);
        }
    }
    let (mut placed, mut local) = (0, 0);
    for vcpu in &trace.vcpus {
        for record in vcpu.records.iter().filter(|r| r.kind == TraceKind::InvocationArrive as u16) {
            let caller_cpu = begun[&record.arg2];
            if caller_cpu >= 4 {
                assert_eq!(vcpu.cpu, 0, "an invocation from node 1 (vCPU {caller_cpu}) arrives on the server's vCPU");
                placed += 1;
            } else {
                assert_eq!(vcpu.cpu, caller_cpu, "an invocation from node 0 runs on its caller's vCPU");
                local += 1;
            }
        }
    }
    assert!(placed >= 200 && local >= 600, "placed {placed}, local {local}");
}

#[test]
fn without_latency_charges_every_operation_runs_on_its_caller_s_cpu() {
    let run = Boot::new("two-socket")
        .latency_mode("off")
        .programs(&["upcalls"; 8])
        .args(&["many", KEY, "7"])
        .timeout(60.0)
        .run();
    run.expect_exit(0);
    for client in 1..8 {
        let line = format!(
            "client {client} on cpu {client} node {}: the operation ran on cpu {client} node {}",
            client / 4,
            client / 4
        );
        assert!(run.printed(&line), "missing '{line}' in\n{}", run.console.text());
    }
}

#[test]
fn taking_the_right_away_refuses_the_next_protected_invocation_at_once() {
    // Without latency traps the calls take the kernel's fast path, whose per-CPU cache of
    // checked calls must forget the right the moment it is taken away; with them, the Rust path.
    for mode in ["off", "window"] {
        let run = Boot::new("two-socket")
            .latency_mode(mode)
            .programs(&["upcalls"; 2])
            .args(&["revoke", KEY])
            .timeout(60.0)
            .run();
        run.expect_exit(0);
        for check in
            ["50 invocations before: 1275", "the next invocation is refused: Err(NoRight)", "and the one after"]
        {
            assert!(run.printed(check), "{mode}: missing '{check}' in\n{}", run.console.text());
        }
    }
}

//! Starvation: a domain keeping a shared vCPU inside its own upcall handler or inside a
//! protected invocation of its own. The kernel sets either aside a quantum after the slice ends,
//! so the victim on the same vCPU finishes its work while the attacker still holds on (3 s).

use psyche_tests::{Boot, Run};

fn attack(name: &str) -> Run {
    Boot::new(&super::uniprocessor()).programs(&["hostile", "victim"]).args(&[name]).timeout(60.0).run()
}

/// The console lines in order: the victim must have finished before the attacker let go.
fn finished_before(run: &Run, attacker_done: &str) {
    let lines: Vec<String> = run.lines().into_iter().map(|(_, line)| line).collect();
    let victim = lines.iter().position(|l| l.contains("victim: spin: finished 1 rounds"));
    let attacker = lines.iter().position(|l| l.contains(attacker_done));
    match (victim, attacker) {
        (Some(v), Some(a)) => {
            assert!(v < a, "the victim finished only after the attacker let go:\n{}", run.console.text())
        }
        _ => panic!("missing lines:\n{}", run.console.text()),
    }
}

#[test]
fn a_handler_that_never_schedules_does_not_keep_the_vcpu_from_another_domain() {
    let run = attack("upcall-loop");
    assert!(run.printed("hostile: upcall-loop: in my handler"), "{}", run.console.text());
    finished_before(&run, "hostile: upcall-loop: leaving my handler");
    run.expect_exit(0);
}

#[test]
fn an_operation_invoked_on_itself_that_runs_long_does_not_keep_the_vcpu_from_another_domain() {
    let run = attack("invoke-loop");
    assert!(run.printed("hostile: invoke-loop: in my operation"), "{}", run.console.text());
    // The set-aside invocation comes back whole: its result reaches the caller.
    finished_before(&run, "hostile: invoke-loop: my operation returned Ok(0)");
    run.expect_exit(0);
}

#[test]
fn a_chain_four_invocations_deep_is_set_aside_and_taken_back_whole() {
    let run = attack("invoke-loop-deep");
    assert!(run.printed("hostile: invoke-loop: in my operation"), "{}", run.console.text());
    // Each level adds one on the way out: the frames and records of all four came back.
    finished_before(&run, "hostile: invoke-loop: my operation returned Ok(3)");
    run.expect_exit(0);
}

#[test]
fn a_server_whose_invocation_is_set_aside_still_answers_every_other_caller_on_that_vcpu() {
    // One vCPU: program 1's call of the slow operation (0.1 s) is set aside at its slice's end,
    // holding the server's work area of that level; program 2's quick calls meanwhile are
    // served as placed invocations. Untraced and traced (the assembly and the Rust paths).
    const KEY: &str = "0123456789abcdeffedcba9876543210";
    for traced in [false, true] {
        let boot =
            Boot::new(&super::uniprocessor()).programs(&["victim", "hostile", "hostile"]).args(&["slow-server", KEY]);
        let run = if traced { boot.traced() } else { boot }.timeout(60.0).run();
        assert!(run.printed("hostile: slow-server: the slow operation returned Ok(42)"), "{}", run.console.text());
        let quick = run.lines().into_iter().find_map(|(_, line)| {
            let rest = line.split("hostile: slow-server: ").nth(1)?;
            let calls: u64 = rest.split(' ').next()?.parse().ok()?;
            rest.ends_with("quick calls, 0 wrong").then_some(calls)
        });
        assert!(quick.is_some_and(|calls| calls > 0), "traced {traced}:\n{}", run.console.text());
        assert!(run.printed("victim: slow-server: served both clients"), "{}", run.console.text());
        run.expect_exit(0);
    }
}

#[test]
fn a_set_aside_invocation_whose_caller_ends_still_runs_the_callee_to_its_end() {
    // One vCPU: program 1's call of the slow operation is set aside; program 2 then ends
    // program 1. The server's operation, halfway through, must still finish (it could hold the
    // server's own locks), and the server must go on serving.
    const KEY: &str = "0123456789abcdeffedcba9876543210";
    let run = Boot::new(&super::uniprocessor())
        .programs(&["victim", "hostile", "hostile"])
        .args(&["orphan-aside", KEY])
        .timeout(60.0)
        .run();
    let text = run.console.text();
    assert!(!run.printed("(this program should be dead)"), "{text}");
    assert!(run.printed("victim: slow-server: the slow operation ran to its end"), "{text}");
    assert!(run.printed("hostile: orphan-aside: the server's slow operation finished"), "{text}");
    assert!(run.printed("victim: slow-server: served both clients"), "{text}");
    assert!(
        matches!(run.outcome.programs[1].end, Some(psyche_vmm::vm::ProgramEnd::Terminated { .. })),
        "{:?}\n{text}",
        run.outcome.programs[1].end
    );
    assert_eq!(run.outcome.programs[0].end, Some(psyche_vmm::vm::ProgramEnd::Exited { code: 0 }), "{text}");
}

#[test]
fn a_handler_waiting_in_the_kernel_for_an_answer_that_never_comes_does_not_keep_the_vcpu() {
    // Program 1's own handler invokes program 2's message-style operation, which nobody ever
    // answers: it waits in the kernel, inside its handler, forever. The victim must still
    // finish; the run then ends at the timeout, the attacker still waiting.
    const KEY: &str = "0123456789abcdeffedcba9876543210";
    let run = Boot::new(&super::uniprocessor())
        .programs(&["victim", "hostile", "hostile"])
        .args(&["handler-wait", KEY])
        .timeout(8.0)
        .run();
    let text = run.console.text();
    assert!(
        run.printed("hostile: handler-wait: my handler (upcall 4) invokes the server that never answers"),
        "{text}"
    );
    assert!(!run.printed("hostile: handler-wait: answered after all"), "{text}");
    assert!(run.printed("victim: spin: finished 1 rounds"), "{text}");
    assert_eq!(run.outcome.programs[0].end, Some(psyche_vmm::vm::ProgramEnd::Exited { code: 0 }), "{text}");
    assert!(matches!(run.outcome.end, psyche_vmm::vm::GuestEnd::TimedOut { .. }), "{:?}", run.outcome.end);
}

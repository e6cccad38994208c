//! x87/SSE state between protection domains: on a shared vCPU, and across a protected
//! invocation in both directions.

use psyche_tests::Boot;

const KEY: &str = "0123456789abcdeffedcba9876543210";

#[test]
fn a_domain_sharing_the_vcpu_neither_sees_nor_changes_anothers_xmm_mxcsr_or_control_word() {
    // The victim keeps a secret in XMM0-15, MXCSR and the x87 control word for about 0.2 s;
    // the attacker, time-sliced with it, keeps its own (MXCSR 0: every exception unmasked) and
    // counts every value it did not put there.
    let run = Boot::new(&super::uniprocessor()).programs(&["victim", "hostile"]).args(&["fpu"]).timeout(60.0).run();
    assert!(run.printed("victim: fpu: XMM0-15, MXCSR and the x87 control word intact over"), "{}", run.console.text());
    assert!(run.printed("hostile: fpu: saw 0 foreign values in"), "{}", run.console.text());
    run.expect_exit(0);
}

#[test]
fn a_protected_invocation_passes_no_fpu_state_either_way() {
    // Four calls (the first through the kernel's Rust path, the rest through its assembly
    // path): the callee must find none of the caller's state, and the caller must get its own
    // back whole, with none of the secret the callee left in every XMM register.
    let run = Boot::new(&super::uniprocessor())
        .programs(&["victim", "hostile"])
        .args(&["fpu-server", KEY])
        .timeout(60.0)
        .run();
    for round in 0..4 {
        assert!(
            run.printed(&format!("hostile: fpu-server: round {round}: the callee saw 0x0 of mine; my state came back whole; the callee's secret in 0 of my registers")),
            "round {round}:\n{}",
            run.console.text()
        );
    }
    assert!(run.printed("victim: fpu-server: intact"), "{}", run.console.text());
    run.expect_exit(0);
}

#[test]
fn a_call_set_aside_gets_its_callers_fpu_state_back_after_others_called_at_the_same_depth() {
    // One vCPU: the victim's own slow call (0.1 s) is set aside; the attacker meanwhile makes
    // thousands of calls at the same depth, its pattern in every XMM register and MXCSR 0, which
    // pass through the CPU's x87/SSE area of that depth. The victim's state must come back.
    let run =
        Boot::new(&super::uniprocessor()).programs(&["victim", "hostile"]).args(&["fpu-aside"]).timeout(60.0).run();
    assert!(
        run.printed("victim: fpu-aside: the call returned 42; my x87/SSE state came back whole"),
        "{}",
        run.console.text()
    );
    assert!(run.printed("hostile: fpu-aside:"), "{}", run.console.text());
    run.expect_exit(0);
}

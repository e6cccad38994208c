//! The attacks the kernel has always contained, kept so that none comes back: privileged
//! instructions, kernel and foreign addresses, exceptions, every system call number with bad
//! pointers, numbers past the table, forged invocation ids, a made-up key.

use psyche_tests::Boot;

#[test]
fn privileged_instructions_kernel_addresses_bad_calls_and_forged_ids_are_contained() {
    let run = Boot::new("uma").programs(&["hostile", "victim"]).args(&["contained"]).timeout(60.0).run();
    let text = run.console.text();
    assert!(run.printed("hostile: contained: 18 of 18 privileged or foreign attacks faulted, 0 came back"), "{text}");
    assert!(run.printed("kernel pointers refused as bad addresses: true"), "{text}");
    assert!(run.printed("hostile: contained: 5 of 5 forged invocation returns refused"), "{text}");
    assert!(run.printed("opening the victim's root realm with a made-up key: Err(NoRight)"), "{text}");
    assert!(!run.printed("was not refused as no such call"), "{text}");
    assert!(run.printed("hostile: contained: Idle inside a protected invocation: Busy"), "{text}");
    assert!(run.printed("victim: contained: finished 1 rounds; the secret in my realm is intact"), "{text}");
    // Each faulting attack ended only its own thread (a fault upcall), never the domain.
    assert_eq!(text.matches("died of a fault").count(), 18, "{text}");
    run.expect_exit(0);
}

//! CPL0 takeover: entering the kernel with flags the CPU does not clear, privileged
//! information, and a `Resume` meant to run a program's own code at CPL0.

use psyche_tests::Boot;
use psyche_vmm::vm::{GuestEnd, ProgramEnd};

#[test]
fn every_kernel_entry_with_df_set_comes_back_and_keeps_the_programs_df() {
    // Beside a victim on the same vCPU, which must finish its work.
    let run = Boot::new(&super::uniprocessor()).programs(&["hostile", "victim"]).args(&["df"]).timeout(60.0).run();
    for entry in ["int 4 cpu_info", "int 4 write", "int3 of no realm", "first touch", "50 ms of ticks and upcalls"] {
        assert!(run.printed(&format!("hostile: df: {entry}: ok (DF kept)")), "{entry}:\n{}", run.console.text());
    }
    assert!(run.printed("hostile: df: every entry with DF set came back (0 wrong)"), "{}", run.console.text());
    assert!(run.printed("victim: spin: finished 1 rounds"), "{}", run.console.text());
    run.expect_exit(0);
}

#[test]
fn resume_with_df_and_a_context_of_its_own_address_runs_the_program_at_cpl3_only() {
    let run = Boot::new("uma").programs(&["hostile"]).args(&["df-resume"]).timeout(30.0).run();
    // At CPL0 the function would have shut the guest down with 77.
    assert!(run.printed("hostile: df-resume: resumed at CPL3 with DF kept"), "{}", run.console.text());
    run.expect_exit(0);
}

#[test]
fn sgdt_at_cpl3_faults_instead_of_showing_the_kernel_gdt() {
    let run = Boot::new("uma").programs(&["hostile"]).args(&["umip"]).timeout(30.0).run();
    assert!(!run.printed("sgdt showed"), "{}", run.console.text());
    let end = run.outcome.programs[0].end;
    assert!(matches!(end, Some(ProgramEnd::Killed { vector: 13, .. })), "{end:?}\n{}", run.console.text());
    assert!(matches!(run.outcome.end, GuestEnd::Shutdown { .. }), "{:?}", run.outcome.end);
}

//! Breaking the rules in ways whose outcome used to mislead: each must end (or be refused) with
//! the reason that names what happened, while the victim beside it finishes.

use psyche_abi::realm::Termination;
use psyche_tests::{Boot, Run};
use psyche_vmm::vm::ProgramEnd;

fn attack(name: &str) -> Run {
    Boot::new("uma").programs(&["hostile", "victim"]).args(&[name]).timeout(60.0).run()
}

fn victim_finished(run: &Run) {
    assert!(run.printed("victim: spin: finished 1 rounds"), "{}", run.console.text());
    assert_eq!(run.outcome.programs[1].end, Some(ProgramEnd::Exited { code: 0 }), "{}", run.console.text());
}

fn terminated_for(run: &Run, expected: Termination) -> (u64, u64) {
    match run.outcome.programs[0].end {
        Some(ProgramEnd::Terminated { reason, address, rip, .. }) => {
            assert_eq!(Termination::from_raw(reason), Some(expected), "{}", run.console.text());
            (address, rip)
        }
        other => panic!("expected the attacker terminated for {expected:?}, got {other:?}\n{}", run.console.text()),
    }
}

#[test]
fn a_stack_that_runs_out_is_a_stack_overflow() {
    let run = attack("stack-overflow");
    terminated_for(&run, Termination::StackOverflow);
    victim_finished(&run);
}

#[test]
fn executing_data_is_named_as_such() {
    let run = attack("execute-data");
    let (address, rip) = terminated_for(&run, Termination::ExecutedData);
    assert_eq!(address, rip, "the fetch faulted at the data it tried to run");
    assert!(!run.printed("hostile: execute-data: it ran"));
    victim_finished(&run);
}

#[test]
fn a_resume_of_kernel_memory_names_the_resume_and_where_it_was_asked() {
    let run = attack("bad-resume");
    let (address, rip) = terminated_for(&run, Termination::BadResume);
    assert_eq!(address, 0xFFFF_FFFF_8010_0000);
    assert!(rip != 0 && rip < 0x8000_0000_0000, "the program's own RIP at the call: {rip:#x}");
    assert!(!run.printed("hostile: bad-resume: came back"));
    victim_finished(&run);
}

#[test]
fn nesting_past_the_limit_is_refused_as_table_full_and_every_level_unwinds() {
    let run = attack("nest");
    assert!(run.printed("hostile: nest: level 9 refused: TableFull"), "{}", run.console.text());
    assert!(run.printed("hostile: nest: 8 levels ran, then code 8"), "{}", run.console.text());
    victim_finished(&run);
    run.expect_exit(0);
}

#[test]
fn root_realms_are_busy_to_destroy_whatever_the_rights() {
    let run = attack("destroy-root");
    assert!(
        run.printed("hostile: destroy-root: own root realm Err(Busy), another program's Err(Busy)"),
        "{}",
        run.console.text()
    );
    victim_finished(&run);
    run.expect_exit(0);
}

//! Faults: a program that misbehaves is stopped and reported with the reason the CPU gave; a
//! kernel that crashes is reported with its registers; bad arguments to the kernel come back
//! as errors.

use psyche_tests::Boot;
use psyche_vmm::vm::{status, CrashReason, GuestEnd, ProgramEnd};

fn killed(fault: &str) -> (u64, u64, u64) {
    let run = Boot::new("two-socket").programs(&["fault"]).args(&[fault]).run();
    assert_eq!(run.outcome.exit_status(), status::PROGRAM_FAULT, "{fault}: {:?}", run.outcome.end);
    assert!(run.printed(&format!("fault: doing '{fault}'")));
    assert!(!run.printed("still running"), "{fault}: the program went on after its fault");
    match run.outcome.programs[0].end {
        Some(ProgramEnd::Killed { vector, error_code, cr2, .. }) => (vector, error_code, cr2),
        other => panic!("{fault}: expected the program to be killed, got {other:?}"),
    }
}

#[test]
fn user_page_fault_is_reported_with_its_address() {
    let (vector, error_code, cr2) = killed("page-fault");
    assert_eq!((vector, cr2), (14, 0x10));
    assert_eq!(error_code & 0b100, 0b100, "the fault must come from user mode");
}

#[test]
fn reading_kernel_memory_from_a_program_faults() {
    let (vector, error_code, cr2) = killed("kernel-read");
    assert_eq!((vector, cr2), (14, 0xFFFF_FFFF_8010_0000));
    assert_eq!(error_code & 0b101, 0b101, "a protection violation from user mode");
}

#[test]
fn invalid_opcode_and_port_io_are_reported() {
    assert_eq!(killed("invalid-opcode").0, 6);
    assert_eq!(killed("port-io").0, 13);
}

#[test]
fn the_kernel_refuses_kernel_pointers_and_unknown_calls_with_errors() {
    for what in ["bad-write", "bad-syscall"] {
        let run = Boot::new("uma").programs(&["fault"]).args(&[what]).run();
        // The program checks the error value itself and exits 0 only if it was right.
        run.expect_exit(0);
    }
}

#[test]
fn a_faulting_program_does_not_stop_the_others() {
    let run = Boot::new("uma").programs(&["fault", "hello"]).args(&["page-fault"]).run();
    assert_eq!(run.outcome.exit_status(), status::PROGRAM_FAULT);
    assert!(run.printed("hello from program 1 at CPL3 on cpu 1"));
    assert_eq!(run.outcome.programs[1].end, Some(ProgramEnd::Exited { code: 0 }));
}

fn crash(kind: &str) -> (u32, CrashReason, psyche_tests::Run) {
    let run = Boot::new("two-socket").cmdline(&format!("crash={kind}")).run();
    assert_eq!(run.outcome.exit_status(), status::KERNEL_CRASH, "{kind}: {:?}", run.outcome.end);
    assert!(run.printed(&format!("psyche: crashing on purpose ({kind})")));
    match run.outcome.end.clone() {
        GuestEnd::KernelCrash { vcpu, reason, .. } => (vcpu, reason, run),
        other => panic!("{kind}: expected a kernel crash, got {other:?}"),
    }
}

#[test]
fn kernel_exceptions_are_reported_with_vector_and_registers() {
    let (vcpu, reason, _) = crash("page-fault");
    assert_eq!(vcpu, 0);
    match reason {
        CrashReason::Exception { vector: 14, cr2: 8, cs: 8, rip, .. } => assert!(rip >= 0xFFFF_FFFF_8000_0000),
        other => panic!("expected a kernel #PF at address 8, got {other:?}"),
    }
    let (_, reason, _) = crash("invalid-opcode");
    assert!(matches!(reason, CrashReason::Exception { vector: 6, .. }), "{reason:?}");
}

#[test]
fn a_kernel_panic_is_reported_with_its_message() {
    let (_, reason, run) = crash("panic");
    assert_eq!(reason, CrashReason::KernelPanic);
    assert!(run.printed("psyche: kernel panic: deliberate kernel panic (crash=panic)"));
}

#[test]
fn a_triple_fault_is_reported_as_a_crash() {
    let (_, reason, _) = crash("triple-fault");
    // Real KVM reports a shutdown; where CPL0 is emulated (nested hosts such as our CI) KVM
    // gives up on the exception delivery with an internal error instead.
    assert!(matches!(reason, CrashReason::TripleFault | CrashReason::KvmInternalError { .. }), "{reason:?}");
}

#[test]
fn an_unknown_kernel_option_stops_the_boot_with_a_message() {
    let run = Boot::new("uma").cmdline("crash=sometimes").run();
    assert_eq!(run.outcome.exit_status(), status::KERNEL_CRASH);
    assert!(run.printed("psyche: fatal: unknown kernel option 'crash=sometimes'"), "{}", run.console.text());
}

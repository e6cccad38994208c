//! The victim of the hostile-program suite (`tests/tests/hostile/`): it keeps a secret where an
//! attack aims and reports, from inside, whether it stayed intact. The first argument picks the
//! scenario; the attacker (`hostile`) gets the same arguments.
//!
//! * `fpu`: a secret in XMM0-15, a rounding mode in MXCSR and a precision in the x87 control
//!   word, checked over and over for about 0.2 s of TSC while the attacker shares the vCPU.
//! * `fpu-server KEY`: serves protected invocations to holders of KEY. Operation 2 reports
//!   whether it was entered with any of the caller's x87/SSE state (the attacker's pattern in
//!   an XMM register, its MXCSR or control word), then leaves the secret in XMM0-15; operation 3
//!   ends the program.
//! * `slow-server KEY` (and `orphan-aside KEY`): serves holders of KEY with operation 2, which
//!   computes for about 0.1 s of TSC and returns 42, and operation 3, which returns 7 at once;
//!   operation 4 says a client is done, and the program ends once two are; operation 5 says
//!   whether a run of operation 2 has come to its end.
//! * `contained`: keeps the secret in a realm of its own (no key but its own can open it) while
//!   the attacker tries what the kernel has always contained, then checks it.
//! * `fpu-aside`: invokes an operation of its own that computes for 0.1 s, with the secret in
//!   XMM0-15, MXCSR and the control word, through a raw `int3`: on one vCPU with `hostile
//!   fpu-aside` the call is set aside while the attacker makes calls of its own at the same
//!   depth; the secret must come back whole when the call returns.
//! * `spin` (also beside the attacks on the kernel itself: `df`, `upcall-loop`, `invoke-loop`,
//!   `nest`, `stack-overflow`, `execute-data`, `bad-resume`, `destroy-root`): computes for about
//!   0.2 s of TSC beside an attacker and reports that it finished.
#![no_std]
#![no_main]

use realm_sdk::operations;
use realm_sdk::threads;
use realm_sdk::{println, realm, Program};

#[path = "../fpu_call.rs"]
mod fpu_call;

realm_sdk::entry!(main);

/// The secret: what the victim keeps in every XMM register (two quadwords).
pub const SECRET: [u64; 2] = [0x5EC2_E75E_C2E7_5EC2, 0x0BAD_5EC2_E700_0BAD];
/// What the attacker keeps in its XMM registers (`hostile`).
pub const PATTERN: [u64; 2] = [0xA77A_CCA7_7ACC_A77A, 0x4A4A_4A4A_4A4A_4A4A];
/// The victim's MXCSR: every exception masked, rounding toward zero.
const VICTIM_MXCSR: u32 = 0x7F80;
/// The victim's x87 control word: every exception masked, 53-bit precision.
const VICTIM_FCW: u16 = 0x027F;
/// How long the checks run, in TSC cycles (about 0.2 s at 2.6 GHz).
const CHECK_CYCLES: u64 = 520_000_000;

fn main(program: Program) -> u32 {
    let scenario = program.args.get(0).unwrap_or("");
    let code = match scenario {
        "fpu" => fpu(),
        "fpu-server" => fpu_server(&program),
        "slow-server" | "orphan-aside" => slow_server(&program),
        "contained" => keep_realm_secret(),
        "fpu-aside" => fpu_aside(),
        // Beside an attack on the kernel itself, the victim has only to finish its own work.
        "spin" | "df" | "upcall-loop" | "invoke-loop" | "invoke-loop-deep" | "handler-wait" | "nest"
        | "stack-overflow" | "execute-data" | "bad-resume" | "destroy-root" => spin(),
        _ => {
            println!("victim: unknown scenario '{scenario}' (fpu, fpu-server KEY, spin)");
            return 2;
        }
    };
    println!("victim: {scenario}: {}", if code == 0 { "intact" } else { "BROKEN" });
    code
}

/// Loads the secret into XMM0-15, MXCSR and the control word, then checks them until
/// `CHECK_CYCLES` have passed: returns 0, or 1 + the XMM register found changed (17: MXCSR,
/// 18: the control word), and the number of checks made.
fn keep_fpu_secret() -> (u64, u64) {
    let mut scratch = [0u64; 34];
    let (status, checks): (u64, u64);
    let settings: [u32; 2] = [VICTIM_MXCSR, u32::from(VICTIM_FCW)];
    // SAFETY: only registers declared clobbered and the scratch buffer (34 quadwords: 16 XMM
    // stores, MXCSR and the control word) are written; MXCSR and the control word are put back
    // to the defaults before the block ends.
    unsafe {
        core::arch::asm!(
            "movdqu xmm0, [{secret}]",
            ".irp r, 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            "movdqa xmm\\r, xmm0",
            ".endr",
            "ldmxcsr [{settings}]",
            "fldcw [{settings} + 4]",
            "rdtsc",
            "shl rdx, 32",
            "or rax, rdx",
            "lea r10, [rax + {cycles}]",
            "xor r11d, r11d",
            "2:",
            "inc r11",
            ".irp r, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            "movdqu [{scratch} + \\r * 16], xmm\\r",
            ".endr",
            "xor ecx, ecx",
            "3:",
            "mov rax, [{scratch} + rcx * 8]",
            "mov edx, ecx",
            "and edx, 1",
            "cmp rax, [{secret} + rdx * 8]",
            "jne 5f",
            "inc rcx",
            "cmp rcx, 32",
            "jne 3b",
            "stmxcsr [{scratch} + 256]",
            "mov ecx, 16 * 2",
            "mov eax, [{scratch} + 256]",
            "cmp eax, [{settings}]",
            "jne 5f",
            "fnstcw [{scratch} + 264]",
            "mov ecx, 17 * 2",
            "movzx eax, word ptr [{scratch} + 264]",
            "cmp eax, [{settings} + 4]",
            "jne 5f",
            "rdtsc",
            "shl rdx, 32",
            "or rax, rdx",
            "cmp rax, r10",
            "jb 2b",
            "xor ecx, ecx",
            "jmp 6f",
            // RCX: the quadword (register * 2 + half) that changed: report the register.
            "5:",
            "shr rcx, 1",
            "inc rcx",
            "6:",
            "sub rsp, 8",
            "mov dword ptr [rsp], 0x1F80",
            "ldmxcsr [rsp]",
            "mov word ptr [rsp], 0x037F",
            "fldcw [rsp]",
            "add rsp, 8",
            secret = in(reg) SECRET.as_ptr(),
            settings = in(reg) settings.as_ptr(),
            scratch = in(reg) scratch.as_mut_ptr(),
            cycles = const CHECK_CYCLES,
            out("rax") _, out("rdx") _, out("r10") _,
            out("rcx") status, out("r11") checks,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
        );
    }
    // Scratch bytes were only the checks' own.
    let _ = scratch;
    (status, checks)
}

/// A CPU-bound loop of about `CHECK_CYCLES`; returns how many rounds it made.
fn compute() -> u64 {
    let start = threads::tsc();
    let mut rounds = 0u64;
    while threads::tsc() - start < CHECK_CYCLES {
        rounds = core::hint::black_box(rounds + 1);
    }
    rounds
}

fn fpu() -> u32 {
    let (status, checks) = keep_fpu_secret();
    match status {
        0 => println!("victim: fpu: XMM0-15, MXCSR and the x87 control word intact over {checks} checks"),
        17 => println!("victim: fpu: MXCSR changed under me (check {checks})"),
        18 => println!("victim: fpu: the x87 control word changed under me (check {checks})"),
        register => println!("victim: fpu: XMM{} changed under me (check {checks})", register - 1),
    }
    status as u32
}

fn spin() -> u32 {
    let rounds = compute();
    println!("victim: spin: finished {} rounds", u64::from(rounds > 0));
    0
}

/// Bits of operation 2's result: what of the caller's state it found at its entry.
pub const SAW_PATTERN: u64 = 1;
pub const SAW_MXCSR: u64 = 2;
pub const SAW_FCW: u64 = 4;

/// Operation 2: what the callee finds of the caller's x87/SSE state, then the secret left in
/// every XMM register for the return.
extern "sysv64" fn inspect_and_leave_secret(_: u64, _: u64, _: u64, _: u64) -> u64 {
    let mut scratch = [0u64; 34];
    // SAFETY: stores of the XMM registers, MXCSR and the control word into the scratch buffer,
    // then the secret into every XMM register (declared clobbered).
    unsafe {
        core::arch::asm!(
            ".irp r, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            "movdqu [{scratch} + \\r * 16], xmm\\r",
            ".endr",
            "stmxcsr [{scratch} + 256]",
            "fnstcw [{scratch} + 264]",
            "movdqu xmm0, [{secret}]",
            ".irp r, 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            "movdqa xmm\\r, xmm0",
            ".endr",
            scratch = in(reg) scratch.as_mut_ptr(),
            secret = in(reg) SECRET.as_ptr(),
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
        );
    }
    let mut saw = 0;
    if scratch[..32].chunks(2).any(|q| q == PATTERN) {
        saw |= SAW_PATTERN;
    }
    if scratch[32] as u32 != 0x1F80 {
        saw |= SAW_MXCSR;
    }
    if scratch[33] as u16 != 0x037F {
        saw |= SAW_FCW;
    }
    saw
}

extern "sysv64" fn finish(_: u64, _: u64, _: u64, _: u64) -> u64 {
    println!("victim: fpu-server: intact");
    realm_sdk::exit(0)
}

fn fpu_server(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    if operations::register(&[inspect_and_leave_secret, finish]).is_err() {
        return 3;
    }
    // SAFETY: only its id is used.
    let root: realm::Realm<u8> = unsafe { realm::Realm::attach(realm_sdk::program_index() as u32) };
    if root.set_rights(&key, realm::Rights::INVOKE_PROTECTED).is_err() || root.publish("fpu-server").is_err() {
        return 4;
    }
    println!("victim: fpu-server: ready");
    loop {
        threads::block();
    }
}

extern "sysv64" fn slow(_: u64, _: u64, _: u64, _: u64) -> u64 {
    let start = threads::tsc();
    while threads::tsc() - start < CHECK_CYCLES / 2 {
        core::hint::spin_loop();
    }
    SLOW_FINISHED.store(1, core::sync::atomic::Ordering::Release);
    println!("victim: slow-server: the slow operation ran to its end");
    42
}

static SLOW_FINISHED: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

extern "sysv64" fn slow_finished(_: u64, _: u64, _: u64, _: u64) -> u64 {
    SLOW_FINISHED.load(core::sync::atomic::Ordering::Acquire)
}

extern "sysv64" fn quick(_: u64, _: u64, _: u64, _: u64) -> u64 {
    7
}

static DONE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

extern "sysv64" fn client_done(_: u64, _: u64, _: u64, _: u64) -> u64 {
    if DONE.fetch_add(1, core::sync::atomic::Ordering::AcqRel) + 1 == 2 {
        println!("victim: slow-server: served both clients");
        realm_sdk::exit(0);
    }
    0
}

fn slow_server(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    if operations::register(&[slow, quick, client_done, slow_finished]).is_err() {
        return 3;
    }
    // SAFETY: only its id is used.
    let root: realm::Realm<u8> = unsafe { realm::Realm::attach(realm_sdk::program_index() as u32) };
    if root.set_rights(&key, realm::Rights::INVOKE_PROTECTED).is_err() || root.publish("slow-server").is_err() {
        return 4;
    }
    println!("victim: slow-server: ready");
    loop {
        threads::block();
    }
}

fn keep_realm_secret() -> u32 {
    let Ok(vault) = realm::Realm::create(SECRET).build() else { return 3 };
    let rounds = compute();
    // SAFETY: our own realm, which nobody else can open.
    let kept = unsafe { *vault.as_ptr() } == SECRET;
    println!(
        "victim: contained: finished {} rounds; the secret in my realm is {}",
        u64::from(rounds > 0),
        if kept { "intact" } else { "CHANGED" }
    );
    u32::from(!kept)
}

fn fpu_aside() -> u32 {
    let Ok(key) = realm::generate_key() else { return 3 };
    if realm_sdk::keys::add(key).is_err() || operations::register(&[slow]).is_err() {
        return 4;
    }
    let me = realm_sdk::program_index() as u32;
    // SAFETY: only its id is used.
    let root: realm::Realm<u8> = unsafe { realm::Realm::attach(me) };
    if root.set_rights(&key, realm::Rights::INVOKE_PROTECTED).is_err() {
        return 5;
    }
    let mine = fpu_call::FpuState { xmm: SECRET, mxcsr: VICTIM_MXCSR, fcw: VICTIM_FCW };
    let (result, after) = fpu_call::protected_call_with(me, 2, &mine);
    // Whole, and so none of the attacker's pattern in any register.
    let kept = after.is(&mine) && after.holding(PATTERN) == 0;
    println!(
        "victim: fpu-aside: the call returned {result}; my x87/SSE state came back {}",
        if kept { "whole" } else { "CHANGED" }
    );
    u32::from(!kept || result != 42)
}

//! The attacker of the hostile-program suite (`tests/tests/hostile/`): ordinary CPL3 code that
//! tries to break the kernel's protection, beside a `victim` that reports whether it held. The
//! first argument picks the attack (the victim gets the same arguments):
//!
//! * `df`: enters the kernel every way it can (the kernel gate, the invocation gate, a
//!   first-touch fault, timer ticks with upcalls) with RFLAGS.DF set, which used to run the
//!   kernel's `rep movsb` downwards over its own stack. Its own DF must survive each entry.
//! * `df-resume`: `Resume` with DF set and a context block full of the address of a function
//!   that shuts the machine down if it ever runs at CPL0 (the old CPL0 takeover).
//! * `umip`: `sgdt`, which must fault rather than show where the kernel's GDT is.
//! * `fpu`: shares a vCPU with `victim fpu`, keeping its own pattern in XMM0-15, MXCSR = 0 and
//!   the x87 control word 0, and counts every foreign value it ever sees there.
//! * `fpu-server KEY`: invokes `victim fpu-server` with protection through a raw `int3`, its
//!   pattern in every XMM register and MXCSR = 0, and checks that it gets its own state back
//!   and none of the callee's.
//! * `upcall-loop`: takes upcalls with a handler of its own that spins for 3 s of TSC, beside
//!   `victim spin` on the same vCPU, which must finish first (the kernel used to let a domain
//!   keep its processor for as long as its handler ran).
//! * `invoke-loop`: invokes one of its own operations with protection, and the operation spins
//!   for 3 s of TSC: the same, inside a protected invocation. `invoke-loop-deep`: the same
//!   three invocations deep (each operation invokes the next), so that a chain of several
//!   depths is set aside and taken back.
//! * `nest`: invokes itself with protection, each operation invoking again, until the kernel
//!   refuses: the refusal must be `TableFull`, at the ninth level, and every level must unwind.
//! * `stack-overflow`, `execute-data`, `bad-resume`: break a rule in a way whose termination
//!   reason used to be misleading; the kernel must name what happened.
//! * `slow-server KEY` (programs 1 and 2, beside `victim slow-server` on one vCPU): program 1
//!   invokes the server's slow operation, whose invocation is set aside at the slice's end;
//!   program 2 meanwhile invokes its quick one many times, on the same vCPU, whose work area
//!   for that level the set-aside activation holds: each call must still be answered.
//! * `contained` (beside `victim contained`): the attacks the kernel has always contained,
//!   kept so that none comes back: privileged instructions, kernel and foreign addresses,
//!   exceptions, every system call number with bad pointers and numbers past the table, forged
//!   invocation ids, opening the victim's root realm with a made-up key. Each faulting attack
//!   runs in a thread of its own (a fault upcall ends just that thread).
//! * `orphan-aside KEY` (programs 1 and 2, beside `victim orphan-aside` on one vCPU): program 1
//!   invokes the server's slow operation, whose invocation is set aside at the slice's end;
//!   program 2 then ends program 1 (it invokes an operation of program 1's that faults). The
//!   server's operation must still run to its end (it may hold its own locks halfway through).
//! * `handler-wait KEY` (programs 1 and 2, beside `victim spin` on one vCPU): program 2 serves
//!   a message-style operation and never answers; program 1's own upcall handler invokes it
//!   and so waits in the kernel, inside its handler, for an answer that never comes. The vCPU
//!   must not stay with it (it used to: a caller waiting inside its handler did not yield).
//! * `fpu-aside` (beside `victim fpu-aside` on one vCPU): while the victim's call is set aside,
//!   makes protected calls of its own at the same depth, with its pattern in every XMM register
//!   and MXCSR = 0, for about 0.3 s: the CPU's x87/SSE area of that depth holds the attacker's
//!   state then, and must hold the victim's again when the victim's call returns.
//! * `destroy-root`: destroys its own root realm and another program's: both `Busy` (a root
//!   realm goes with its program), whatever rights it holds.
#![no_std]
#![no_main]

use realm_sdk::abi::syscall::Syscall;
use realm_sdk::abi::upcall::{ContextBlock, Registers};
use realm_sdk::sys::raw_syscall;
use realm_sdk::{println, realm, threads, Program};

#[path = "../fpu_call.rs"]
mod fpu_call;

realm_sdk::entry!(main);

/// What `victim` keeps in every XMM register, and what this program keeps in its own (the
/// victim's copy of both must match: see victim.rs).
const SECRET: [u64; 2] = [0x5EC2_E75E_C2E7_5EC2, 0x0BAD_5EC2_E700_0BAD];
const PATTERN: [u64; 2] = [0xA77A_CCA7_7ACC_A77A, 0x4A4A_4A4A_4A4A_4A4A];
/// How long the `fpu` attack runs, in TSC cycles (about 0.2 s at 2.6 GHz).
const ATTACK_CYCLES: u64 = 520_000_000;
/// RFLAGS.DF.
const DF: u64 = 1 << 10;

fn main(program: Program) -> u32 {
    let attack = program.args.get(0).unwrap_or("");
    let code = match attack {
        "df" => df(),
        "df-resume" => df_resume(),
        "umip" => umip(),
        "fpu" => fpu(),
        "fpu-server" => fpu_client(&program),
        "upcall-loop" => upcall_loop(),
        "invoke-loop" => invoke_loop(false),
        "invoke-loop-deep" => invoke_loop(true),
        "nest" => nest(),
        "stack-overflow" => stack_overflow(0),
        "execute-data" => execute_data(),
        "bad-resume" => bad_resume(),
        "destroy-root" => destroy_root(),
        "slow-server" => slow_client(&program),
        "orphan-aside" => orphan_aside(&program),
        "handler-wait" => handler_wait(&program),
        "fpu-aside" => fpu_aside(),
        "contained" => contained(),
        _ => {
            println!(
                "hostile: unknown attack '{attack}' (df, df-resume, umip, fpu, fpu-server KEY, upcall-loop, invoke-loop, nest, stack-overflow, execute-data, bad-resume, destroy-root)"
            );
            return 2;
        }
    };
    println!("hostile: {attack}: done ({code})");
    code
}

/// `std`, the system call `number` (one argument) through `int 4`, then RFLAGS as it came back
/// and the result.
fn gate_with_df(number: u64, a0: u64) -> (u64, i64) {
    let (flags, value): (u64, i64);
    // SAFETY: a system call with DF set; DF is cleared again before the block ends.
    unsafe {
        core::arch::asm!(
            "push rbx",
            "push rbp",
            "std",
            "int 4",
            "pushfq",
            "pop rcx",
            "cld",
            "pop rbp",
            "pop rbx",
            inlateout("rax") number as i64 => value,
            inlateout("rdi") a0 => _,
            out("rcx") flags,
            out("rsi") _, out("rdx") _, out("r8") _, out("r9") _, out("r10") _, out("r11") _,
        );
    }
    (flags, value)
}

fn df() -> u32 {
    let mut failures = 0;
    let mut report = |what: &str, flags: u64, ok: bool| {
        let kept = flags & DF != 0;
        println!(
            "hostile: df: {what}: {} (DF {})",
            if ok { "ok" } else { "WRONG" },
            if kept { "kept" } else { "lost" }
        );
        if !ok || !kept {
            failures += 1;
        }
    };
    // The kernel gate: a call that returns a value, and one that reads program memory.
    let (flags, value) = gate_with_df(Syscall::CpuInfo as u64, 0);
    report("int 4 cpu_info", flags, value >= 0);
    let text = b"hostile: df: written with DF set\n";
    let (flags, value) = {
        let (flags, value): (u64, i64);
        // SAFETY: the write system call on our own buffer, with DF set (cleared before the end).
        unsafe {
            core::arch::asm!(
                "push rbx", "push rbp", "std", "int 4", "pushfq", "pop rcx", "cld", "pop rbp", "pop rbx",
                inlateout("rax") Syscall::Write as u64 as i64 => value,
                inlateout("rdi") text.as_ptr() => _,
                inlateout("rsi") text.len() => _,
                out("rcx") flags, out("rdx") _, out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            );
        }
        (flags, value)
    };
    report("int 4 write", flags, value == text.len() as i64);
    // The invocation gate's Rust path: a protected call of a realm that does not exist.
    let (flags, value): (u64, i64);
    // SAFETY: an invocation-gate entry that the kernel refuses; DF cleared before the end.
    unsafe {
        core::arch::asm!(
            "push rbx", "push rbp", "std", "int3", "pushfq", "pop rcx", "cld", "pop rbp", "pop rbx",
            inlateout("rax") 0i64 => value,
            inlateout("rdi") 0xFFFF_FFF0u64 => _,
            inlateout("rdx") 0u64 => _,
            out("rcx") flags, out("rsi") _, out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
        );
    }
    report("int3 of no realm", flags, value < 0);
    // A first touch of a new realm (a page fault that opens it).
    let Ok(fresh) = realm::Realm::create([7u64; 512]).build() else { return 10 };
    let (flags, value): (u64, u64);
    // SAFETY: a read of our own realm with DF set (cleared before the end).
    unsafe {
        core::arch::asm!(
            "std", "mov rax, [{p} + 2048]", "pushfq", "pop rcx", "cld",
            p = in(reg) fresh.as_ptr(), out("rax") value, out("rcx") flags,
        );
    }
    report("first touch", flags, value == 7);
    // Timer ticks and time-limit upcalls (the thread package resumes us each time).
    if threads::enable(1000).is_err() {
        return 11;
    }
    let flags: u64;
    // SAFETY: a TSC spin of about 50 ms with DF set (cleared before the end).
    unsafe {
        core::arch::asm!(
            "std",
            "rdtsc", "shl rdx, 32", "or rax, rdx", "lea rsi, [rax + 130000000]",
            "2:", "rdtsc", "shl rdx, 32", "or rax, rdx", "cmp rax, rsi", "jb 2b",
            "pushfq", "pop rcx", "cld",
            out("rax") _, out("rdx") _, out("rsi") _, out("rcx") flags,
        );
    }
    report("50 ms of ticks and upcalls", flags, true);
    println!("hostile: df: every entry with DF set came back ({failures} wrong)");
    failures
}

#[repr(C, align(1024))]
struct Block(core::cell::UnsafeCell<ContextBlock>);
// SAFETY: only the main thread touches it.
unsafe impl Sync for Block {}
static BLOCK: Block = Block(core::cell::UnsafeCell::new(ContextBlock::EMPTY));

#[repr(C, align(16))]
struct Stack(core::cell::UnsafeCell<[u8; 16384]>);
// SAFETY: used by the resumed function only.
unsafe impl Sync for Stack {}
static STACK: Stack = Stack(core::cell::UnsafeCell::new([0; 16384]));

/// Where `df-resume` asks to be resumed. At CPL0 (the takeover) it shuts the machine down with
/// exit code 77; at CPL3 it reports DF and ends the program normally.
extern "sysv64" fn landed() -> ! {
    let (cs, flags): (u64, u64);
    // SAFETY: reads CS and RFLAGS only.
    unsafe { core::arch::asm!("mov {0:x}, cs", "pushfq", "pop {1}", "cld", out(reg) cs, out(reg) flags) };
    if cs & 3 == 0 {
        // SAFETY: only reachable at CPL0: the shutdown hypercall (port 0x99, `Hypercall::Shutdown`).
        unsafe { core::arch::asm!("mov eax, 1", "mov edi, 77", "out 0x99, eax", options(noreturn)) };
    }
    println!("hostile: df-resume: resumed at CPL{} with DF {}", cs & 3, if flags & DF != 0 { "kept" } else { "clear" });
    realm_sdk::exit(0)
}

fn df_resume() -> u32 {
    let block = BLOCK.0.get();
    let target = landed as *const () as u64;
    let stack_top = (STACK.0.get() as u64 + 16384) & !15;
    // SAFETY: our own context block, not yet given to the kernel.
    unsafe {
        let r = &mut (*block).registers;
        *r = Registers {
            rax: target,
            rbx: target,
            rcx: target,
            rdx: target,
            rsi: target,
            rdi: target,
            rbp: target,
            rsp: stack_top - 8,
            r8: target,
            r9: target,
            r10: target,
            r11: target,
            r12: target,
            r13: target,
            r14: target,
            r15: target,
            rip: target,
            rflags: 0x202 | DF,
        };
    }
    println!("hostile: df-resume: resuming with DF set");
    // SAFETY: Resume does not return; DF is set on the way in.
    unsafe {
        core::arch::asm!(
            "std", "int 4",
            in("rax") Syscall::Resume as u64, in("rdi") block as u64,
            options(noreturn),
        );
    }
}

fn umip() -> u32 {
    let mut table = [0u8; 10];
    println!("hostile: umip: sgdt");
    // SAFETY: stores the GDT register into our buffer, if the CPU lets it.
    unsafe { core::arch::asm!("sgdt [{}]", in(reg) table.as_mut_ptr()) };
    let base = u64::from_le_bytes([table[2], table[3], table[4], table[5], table[6], table[7], table[8], table[9]]);
    println!("hostile: umip: sgdt showed the GDT at {base:#x}");
    1
}

/// Loads the pattern, MXCSR = 0 and control word 0x40, then looks at them until `ATTACK_CYCLES`
/// have passed: returns how many foreign values it saw (a changed quadword, MXCSR or control
/// word), the first one, and how many looks it took.
fn fpu() -> u32 {
    let mut scratch = [0u64; 34];
    // MXCSR 0 (every SSE exception unmasked) and control word 0x40 (every x87 exception
    // unmasked; bit 6 reads as 1).
    let zero = [0u32, 0x40];
    let (foreign, first, looks): (u64, u64, u64);
    // SAFETY: only declared registers and the scratch buffer are written; MXCSR and the control
    // word are the defaults again before the block ends.
    unsafe {
        core::arch::asm!(
            "ldmxcsr [{zero}]",
            "fldcw [{zero} + 4]",
            "xor r8d, r8d",
            "xor r9d, r9d",
            "xor r11d, r11d",
            "rdtsc", "shl rdx, 32", "or rax, rdx", "lea r10, [rax + {cycles}]",
            "movdqu xmm0, [{pattern}]",
            ".irp r, 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            "movdqa xmm\\r, xmm0",
            ".endr",
            "2:",
            "inc r11",
            ".irp r, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            "movdqu [{scratch} + \\r * 16], xmm\\r",
            ".endr",
            "stmxcsr [{scratch} + 256]",
            "fnstcw [{scratch} + 264]",
            "xor ecx, ecx",
            "3:",
            "mov rax, [{scratch} + rcx * 8]",
            "mov edx, ecx",
            "and edx, 1",
            "cmp rax, [{pattern} + rdx * 8]",
            "jne 5f",
            "inc rcx",
            "cmp rcx, 32",
            "jne 3b",
            "mov eax, [{scratch} + 256]",
            "cmp eax, [{zero}]",
            "jne 5f",
            "movzx eax, word ptr [{scratch} + 264]",
            "cmp eax, [{zero} + 4]",
            "jne 5f",
            "6:",
            "rdtsc", "shl rdx, 32", "or rax, rdx", "cmp rax, r10",
            "jb 2b",
            "jmp 7f",
            // A foreign value: count it, keep the first, load ours again.
            "5:",
            "test r8, r8",
            "jnz 8f",
            "mov r9, rax",
            "8:",
            "inc r8",
            "movdqu xmm0, [{pattern}]",
            ".irp r, 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            "movdqa xmm\\r, xmm0",
            ".endr",
            "ldmxcsr [{zero}]",
            "fldcw [{zero} + 4]",
            "jmp 6b",
            "7:",
            "sub rsp, 8",
            "mov dword ptr [rsp], 0x1F80",
            "ldmxcsr [rsp]",
            "mov word ptr [rsp], 0x037F",
            "fldcw [rsp]",
            "add rsp, 8",
            zero = in(reg) zero.as_ptr(),
            pattern = in(reg) PATTERN.as_ptr(),
            scratch = in(reg) scratch.as_mut_ptr(),
            cycles = const ATTACK_CYCLES,
            out("rax") _, out("rcx") _, out("rdx") _, out("r10") _,
            out("r8") foreign, out("r9") first, out("r11") looks,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
        );
    }
    let _ = scratch;
    let secret = if SECRET.contains(&first) { " (the victim's secret)" } else { "" };
    println!("hostile: fpu: saw {foreign} foreign values in {looks} looks (first {first:#x}{secret})");
    0
}

/// Protected calls of the victim's operation 2 with this program's pattern in every XMM
/// register and MXCSR = control word = 0, through a raw `int3`.
fn fpu_client(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    if realm_sdk::keys::add(key).is_err() {
        return 3;
    }
    let Ok(server) = realm::wait_for("fpu-server", 200_000_000) else { return 4 };
    let mut failures = 0;
    // The first call takes the kernel's Rust path and fills its check; the others the
    // assembly path.
    let mine = fpu_call::FpuState { xmm: PATTERN, mxcsr: 0, fcw: 0x40 };
    for round in 0..4 {
        let (saw, after) = fpu_call::protected_call_with(server, 2, &mine);
        let kept = after.is(&mine);
        let secret = after.holding(SECRET);
        println!(
            "hostile: fpu-server: round {round}: the callee saw {saw:#x} of mine; my state came back {}; the callee's secret in {secret} of my registers",
            if kept { "whole" } else { "CHANGED" }
        );
        if saw != 0 || !kept || secret != 0 {
            failures += 1;
        }
    }
    // Operation 3 ends the victim.
    let _ = realm_sdk::operations::protected_call(server, 3, [0; 4]);
    failures
}

/// How long the `*-loop` attacks hold the processor, in TSC cycles (about 3 s at 2.6 GHz).
const HOLD_CYCLES: u64 = 7_800_000_000;

/// Spins for `HOLD_CYCLES` from `start`.
fn hold(start: u64) {
    while threads::tsc() - start < HOLD_CYCLES {
        core::hint::spin_loop();
    }
}

/// A processor block of this program's own, whose handler never schedules anything: it holds
/// the processor, then ends the program.
#[repr(C, align(64))]
struct Processor(core::cell::UnsafeCell<realm_sdk::abi::upcall::ProcessorBlock>);
// SAFETY: written before the kernel is told about it, read by the kernel only after.
unsafe impl Sync for Processor {}
static PROCESSOR: Processor = Processor(core::cell::UnsafeCell::new(realm_sdk::abi::upcall::ProcessorBlock {
    current: 0,
    upcall_handler: 0,
    quantum_us: 0,
    critical: 0,
}));

// The handler's entry: the kernel starts it at the top of its work area; a function expects
// RSP 8 off 16-byte alignment, as after a call.
core::arch::global_asm!(
    ".global hostile_hog_entry",
    "hostile_hog_entry:",
    "and rsp, -16",
    "call {handler}",
    "ud2",
    handler = sym hog_handler,
);
extern "C" {
    fn hostile_hog_entry();
}

extern "sysv64" fn hog_handler(kind: u64) -> ! {
    println!("hostile: upcall-loop: in my handler (upcall {kind}), holding the processor");
    hold(threads::tsc());
    println!("hostile: upcall-loop: leaving my handler");
    realm_sdk::exit(0)
}

fn upcall_loop() -> u32 {
    let block = PROCESSOR.0.get();
    // SAFETY: our own block, before the kernel knows it.
    unsafe {
        (*block).current = BLOCK.0.get() as u64;
        (*block).upcall_handler = hostile_hog_entry as *const () as u64;
        (*block).quantum_us = 1000;
    }
    let set = raw_syscall(Syscall::SetProcessorBlock as u64, block as u64, 0, 0);
    if set != 0 {
        println!("hostile: upcall-loop: SetProcessorBlock refused ({set})");
        return 1;
    }
    // The first time-limit upcall enters the handler, which never comes back here.
    loop {
        core::hint::spin_loop();
    }
}

extern "sysv64" fn hog_operation(_: u64, _: u64, _: u64, _: u64) -> u64 {
    println!("hostile: invoke-loop: in my operation, holding the processor");
    hold(threads::tsc());
    0
}

/// Operation 3: invokes operation 3 again `levels` more times, then operation 2 (the hog);
/// returns what that returned plus one per level.
extern "sysv64" fn deeper_operation(levels: u64, _: u64, _: u64, _: u64) -> u64 {
    let me = realm_sdk::program_index() as u32;
    let Ok(myself) = realm_sdk::operations::Remote::protected(me) else { return 1000 };
    let inner = if levels == 0 { myself.call(2, [0; 4]) } else { myself.call(3, [levels - 1, 0, 0, 0]) };
    inner.map_or(1000, |value| value + 1)
}

fn invoke_loop(deep: bool) -> u32 {
    let Ok(key) = realm::generate_key() else { return 3 };
    if realm_sdk::keys::add(key).is_err()
        || realm_sdk::operations::register(&[hog_operation, deeper_operation]).is_err()
    {
        return 4;
    }
    let me = realm_sdk::program_index() as u32;
    // SAFETY: only its id is used.
    let root: realm::Realm<u8> = unsafe { realm::Realm::attach(me) };
    if root.set_rights(&key, realm::Rights::INVOKE_PROTECTED).is_err() {
        return 5;
    }
    let Ok(myself) = realm_sdk::operations::Remote::protected(me) else { return 6 };
    // Deep: three levels of operation 3, then the hog at depth 4.
    let (result, expected) = if deep { (myself.call(3, [2, 0, 0, 0]), 3) } else { (myself.call(2, [0; 4]), 0) };
    println!("hostile: invoke-loop: my operation returned {result:?}");
    u32::from(result != Ok(expected))
}

/// The remote handle `nest` invokes itself through.
static NEST: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// Operation 2 of `nest`: invokes itself one level deeper; returns the depth reached (the
/// levels below that succeeded) with the refusal's code in the high half.
extern "sysv64" fn nest_operation(level: u64, _: u64, _: u64, _: u64) -> u64 {
    let Ok(myself) = realm_sdk::operations::Remote::protected(NEST.load(core::sync::atomic::Ordering::Relaxed)) else {
        return u64::MAX >> 1;
    };
    match myself.call(2, [level + 1, 0, 0, 0]) {
        Ok(deepest) => deepest,
        Err(error) => {
            println!("hostile: nest: level {} refused: {error:?}", level + 1);
            level | (error.to_return().unsigned_abs() << 32)
        }
    }
}

fn nest() -> u32 {
    let Ok(key) = realm::generate_key() else { return 3 };
    if realm_sdk::keys::add(key).is_err() || realm_sdk::operations::register(&[nest_operation]).is_err() {
        return 4;
    }
    let me = realm_sdk::program_index() as u32;
    NEST.store(me, core::sync::atomic::Ordering::Relaxed);
    // SAFETY: only its id is used.
    let root: realm::Realm<u8> = unsafe { realm::Realm::attach(me) };
    if root.set_rights(&key, realm::Rights::INVOKE_PROTECTED).is_err() {
        return 5;
    }
    let Ok(myself) = realm_sdk::operations::Remote::protected(me) else { return 6 };
    match myself.call(2, [1, 0, 0, 0]) {
        Ok(result) => {
            println!("hostile: nest: {} levels ran, then code {}", result & 0xFFFF_FFFF, result >> 32);
            0
        }
        Err(error) => {
            println!("hostile: nest: the first call failed: {error:?}");
            1
        }
    }
}

/// Recurses with a page-sized frame until the stack runs out.
#[allow(unconditional_recursion)]
fn stack_overflow(depth: u64) -> u32 {
    let frame = core::hint::black_box([depth; 512]);
    stack_overflow(depth + 1).wrapping_add(frame[0] as u32)
}

/// Data the program tries to run.
static NOT_CODE: [u8; 16] = [0xC3; 16];

fn execute_data() -> u32 {
    println!("hostile: execute-data: calling into a static array");
    // SAFETY: deliberately not code: the kernel must end the program.
    let f: extern "sysv64" fn() = unsafe { core::mem::transmute(NOT_CODE.as_ptr()) };
    f();
    println!("hostile: execute-data: it ran");
    1
}

fn bad_resume() -> u32 {
    println!("hostile: bad-resume: resuming a context block in kernel memory");
    raw_syscall(Syscall::Resume as u64, 0xFFFF_FFFF_8010_0000, 0, 0);
    println!("hostile: bad-resume: came back");
    1
}

fn destroy_root() -> u32 {
    let me = realm_sdk::program_index() as u32;
    let own = realm::destroy(me);
    // The other program's root realm exists once that program has started (on its own vCPU,
    // perhaps after this one): until then it is not found.
    let start = threads::tsc();
    let mut other = realm::destroy(me ^ 1);
    while other == Err(realm_sdk::sys::SysError::NotFound) && threads::tsc() - start < 2_600_000_000 {
        other = realm::destroy(me ^ 1);
    }
    println!("hostile: destroy-root: own root realm {own:?}, another program's {other:?}");
    u32::from(own != Err(realm_sdk::sys::SysError::Busy) || other != Err(realm_sdk::sys::SysError::Busy))
}

fn slow_client(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    if realm_sdk::keys::add(key).is_err() {
        return 3;
    }
    let Ok(server) = realm::wait_for("slow-server", 200_000_000) else { return 4 };
    let Ok(remote) = realm_sdk::operations::Remote::protected(server) else { return 5 };
    let failures = if program.index == 1 {
        let result = remote.call(2, [0; 4]);
        println!("hostile: slow-server: the slow operation returned {result:?}");
        u32::from(result != Ok(42))
    } else {
        let mut wrong = 0;
        let start = threads::tsc();
        let mut calls = 0;
        // About 0.15 s of calls, across the slow one's whole run.
        while threads::tsc() - start < 400_000_000 {
            calls += 1;
            if remote.call(3, [0; 4]) != Ok(7) {
                wrong += 1;
            }
        }
        println!("hostile: slow-server: {calls} quick calls, {wrong} wrong");
        wrong
    };
    let _ = remote.call(4, [0; 4]);
    failures
}

/// The faulting attacks of `contained`, by name; each runs in a thread of its own.
const FAULTING: [&str; 18] = [
    "cli",
    "hlt",
    "mov rax, cr3",
    "mov cr3, rax",
    "wrmsr",
    "rdmsr",
    "in from the hypercall port",
    "out to the hypercall port",
    "lgdt",
    "invlpg",
    "read kernel text",
    "write kernel text",
    "read the direct map",
    "int 0x80",
    "int 0x20 (the timer's vector)",
    "ud2",
    "divide by zero",
    "jump into the kernel",
];

/// Attacks that came back instead of faulting.
static SURVIVED: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

extern "sysv64" fn faulting_attack(which: u64) {
    let kernel: u64 = 0xFFFF_FFFF_8010_0000;
    // SAFETY: each of these faults at CPL3 (that is the test); registers are declared.
    unsafe {
        match which {
            0 => core::arch::asm!("cli"),
            1 => core::arch::asm!("hlt"),
            2 => core::arch::asm!("mov rax, cr3", out("rax") _),
            3 => core::arch::asm!("xor eax, eax", "mov cr3, rax", out("rax") _),
            4 => {
                core::arch::asm!("mov ecx, 0x10", "xor eax, eax", "xor edx, edx", "wrmsr", out("rax") _, out("rcx") _, out("rdx") _)
            }
            5 => core::arch::asm!("mov ecx, 0x10", "rdmsr", out("rax") _, out("rcx") _, out("rdx") _),
            6 => core::arch::asm!("in eax, 0x99", out("rax") _),
            7 => core::arch::asm!("mov eax, 1", "mov edi, 66", "out 0x99, eax", out("rax") _, out("rdi") _),
            8 => core::arch::asm!(
                "sub rsp, 16",
                "mov qword ptr [rsp], 0",
                "mov qword ptr [rsp + 8], 0",
                "lgdt [rsp]",
                "add rsp, 16"
            ),
            9 => core::arch::asm!("invlpg [{}]", in(reg) kernel),
            10 => core::arch::asm!("mov rax, [{}]", in(reg) kernel, out("rax") _),
            11 => core::arch::asm!("mov qword ptr [{}], 0", in(reg) kernel),
            12 => core::arch::asm!("mov rax, [{}]", in(reg) 0xFFFF_8000_0000_1000u64, out("rax") _),
            13 => core::arch::asm!("int 0x80"),
            14 => core::arch::asm!("int 0x20"),
            15 => core::arch::asm!("ud2"),
            16 => {
                core::arch::asm!("xor edx, edx", "xor ecx, ecx", "mov eax, 1", "div rcx", out("rax") _, out("rcx") _, out("rdx") _)
            }
            _ => core::arch::asm!("call {}", in(reg) kernel, clobber_abi("sysv64")),
        }
    }
    SURVIVED.fetch_add(1, core::sync::atomic::Ordering::AcqRel);
    println!("hostile: contained: {} came back", FAULTING[which as usize]);
}

fn contained() -> u32 {
    if threads::enable(0).is_err() {
        return 3;
    }
    for which in 0..FAULTING.len() as u64 {
        if threads::spawn(faulting_attack, which).is_err() {
            return 4;
        }
        threads::join_all();
    }
    let faulted = threads::faulted();
    println!(
        "hostile: contained: {faulted} of {} privileged or foreign attacks faulted, {} came back",
        FAULTING.len(),
        SURVIVED.load(core::sync::atomic::Ordering::Acquire)
    );
    let mut wrong = u32::from(faulted != FAULTING.len() as u64);
    // Every system call number with pointers into the kernel, and with absurd values. Exit,
    // Resume, Idle, SetProcessorBlock and MoveToCpu are left out: they would end the attack
    // or take the thread package away, each tested on its own elsewhere.
    let skip = [Syscall::Exit, Syscall::Resume, Syscall::Idle, Syscall::SetProcessorBlock, Syscall::MoveToCpu];
    let kernel: u64 = 0xFFFF_FFFF_8010_0000;
    let mut refused = 0;
    let mut calls = 0;
    for number in 0..64u64 {
        if skip.iter().any(|&call| call as u64 == number) {
            continue;
        }
        for args in [[kernel, 0x1000, kernel], [1, u64::MAX, u64::MAX], [kernel + 7, 1 << 40, 3]] {
            calls += 1;
            if raw_syscall(number, args[0], args[1], args[2]) < 0 {
                refused += 1;
            }
        }
    }
    for number in [1u64 << 32 | 5, 1 << 32 | 19, 1 << 63, u64::MAX] {
        calls += 1;
        if raw_syscall(number, kernel, kernel, kernel) == realm_sdk::sys::SysError::NoSuchCall.to_return() {
            refused += 1;
        } else {
            println!("hostile: contained: system call {number:#x} was not refused as no such call");
            wrong += 1;
        }
    }
    // Reads of kernel memory through the calls that read program memory.
    let bad_write = realm_sdk::sys::write_raw(kernel, 64);
    let bad_random = raw_syscall(Syscall::Random as u64, kernel, 64, 0);
    let bad_create = raw_syscall(Syscall::RealmCreate as u64, kernel, 0, 0);
    let bad_address = realm_sdk::sys::SysError::BadAddress;
    let pointers_refused =
        bad_write == Err(bad_address) && bad_random == bad_address.to_return() && bad_create == bad_address.to_return();
    println!("hostile: contained: {calls} system calls made, {refused} refused; kernel pointers refused as bad addresses: {pointers_refused}");
    wrong += u32::from(!pointers_refused);
    // Forged invocation ids at the invocation gate.
    let mut forged_refused = 0;
    for id in
        [realm_sdk::abi::syscall::MIN_INVOCATION_ID, 1 << 63, (1 << 63) | (1 << 20), u64::MAX, 0xDEAD_BEEF_0000_0001]
    {
        if realm_sdk::operations::invocation_return(id, 0) < 0 {
            forged_refused += 1;
        }
    }
    println!("hostile: contained: {forged_refused} of 5 forged invocation returns refused");
    wrong += u32::from(forged_refused != 5);
    // Idling the caller's processor from inside a protected invocation (of our own operation).
    let Ok(own_key) = realm::generate_key() else { return 6 };
    let me = realm_sdk::program_index() as u32;
    // SAFETY: only its id is used.
    let root: realm::Realm<u8> = unsafe { realm::Realm::attach(me) };
    let registered = realm_sdk::keys::add(own_key).is_ok()
        && realm_sdk::operations::register(&[idle_operation]).is_ok()
        && root.set_rights(&own_key, realm::Rights::INVOKE_PROTECTED).is_ok();
    let idled = realm_sdk::operations::Remote::protected(me).map(|myself| myself.call(2, [0; 4]));
    // The operation passes the kernel's answer on as its result: an error value.
    let refused = idled == Ok(Err(realm_sdk::sys::SysError::Busy));
    println!(
        "hostile: contained: Idle inside a protected invocation: {}",
        if refused { "Busy" } else { "NOT REFUSED" }
    );
    wrong += u32::from(!registered || !refused);
    // The victim's root realm, with a key of our own making.
    let Ok(key) = realm::generate_key() else { return 5 };
    // SAFETY: only its id is used.
    let victim: realm::Realm<u8> = unsafe { realm::Realm::attach(realm_sdk::program_index() as u32 ^ 1) };
    // Its root realm exists once the victim has started (on its own vCPU, perhaps later).
    let start = threads::tsc();
    let mut opened = victim.open_with(&key, true);
    while opened == Err(realm_sdk::sys::SysError::NotFound) && threads::tsc() - start < 2_600_000_000 {
        opened = victim.open_with(&key, true);
    }
    println!("hostile: contained: opening the victim's root realm with a made-up key: {opened:?}");
    wrong += u32::from(opened != Err(realm_sdk::sys::SysError::NoRight));
    wrong
}

extern "sysv64" fn crash_operation(_: u64, _: u64, _: u64, _: u64) -> u64 {
    // SAFETY: deliberately faults (address 0x18 is never mapped): the kernel ends this domain.
    unsafe { core::ptr::read_volatile(0x18 as *const u64) }
}

fn orphan_aside(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    if realm_sdk::keys::add(key).is_err() {
        return 3;
    }
    let Ok(server) = realm::wait_for("slow-server", 200_000_000) else { return 4 };
    let Ok(remote) = realm_sdk::operations::Remote::protected(server) else { return 5 };
    if program.index == 1 {
        // The caller: it offers an operation that faults, for the killer to invoke.
        if realm_sdk::operations::register(&[crash_operation]).is_err() {
            return 6;
        }
        // SAFETY: only its id is used.
        let root: realm::Realm<u8> = unsafe { realm::Realm::attach(program.index as u32) };
        if root.set_rights(&key, realm::Rights::INVOKE_PROTECTED).is_err() {
            return 7;
        }
        println!("hostile: orphan-aside: calling the slow operation");
        let result = remote.call(2, [0; 4]);
        println!("hostile: orphan-aside: the slow operation returned {result:?} (this program should be dead)");
        return 1;
    }
    // The killer: once the caller's call is under way (it runs only when the caller's slice,
    // inside the call, is set aside), it ends the caller.
    let Ok(caller) = realm_sdk::operations::Remote::protected(1) else { return 8 };
    let killed = caller.call(2, [0; 4]);
    println!("hostile: orphan-aside: the caller's faulting operation gave {killed:?}");
    let start = threads::tsc();
    let mut finished = false;
    while threads::tsc() - start < 26_000_000_000 {
        if remote.call(5, [0; 4]) == Ok(1) {
            finished = true;
            break;
        }
    }
    println!(
        "hostile: orphan-aside: the server's slow operation {}",
        if finished { "finished" } else { "never finished" }
    );
    // Done for both clients.
    let _ = remote.call(4, [0; 4]);
    let _ = remote.call(4, [0; 4]);
    u32::from(!finished)
}

/// The key list of `handler-wait`'s own context block.
static mut HANDLER_KEYS: [realm_sdk::abi::realm::Key; 1] = [realm_sdk::abi::realm::Key([0; 2])];

/// The never-answering server of `handler-wait`, once known to the caller's handler.
static MUTE: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(u32::MAX);

extern "sysv64" fn unanswered(_: u64, _: u64, _: u64, _: u64) -> u64 {
    0
}

extern "sysv64" fn waiting_handler(kind: u64) -> ! {
    println!("hostile: handler-wait: my handler (upcall {kind}) invokes the server that never answers");
    let result = realm_sdk::operations::protected_call(MUTE.load(core::sync::atomic::Ordering::Acquire), 2, [0; 4]);
    println!("hostile: handler-wait: answered after all ({result})");
    realm_sdk::exit(1)
}

// The handler's entry (see `hostile_hog_entry`).
core::arch::global_asm!(
    ".global hostile_wait_entry",
    "hostile_wait_entry:",
    "and rsp, -16",
    "call {handler}",
    "ud2",
    handler = sym waiting_handler,
);
extern "C" {
    fn hostile_wait_entry();
}

fn handler_wait(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    if realm_sdk::keys::add(key).is_err() {
        return 3;
    }
    if program.index == 2 {
        // The server: a message-style operation, and no server thread to answer it.
        if realm_sdk::operations::register(&[unanswered]).is_err() {
            return 4;
        }
        realm_sdk::operations::message_style(2);
        // SAFETY: only its id is used.
        let root: realm::Realm<u8> = unsafe { realm::Realm::attach(program.index as u32) };
        if root.set_rights(&key, realm::Rights::INVOKE_PROTECTED).is_err() || root.publish("mute").is_err() {
            return 5;
        }
        loop {
            threads::block();
        }
    }
    let Ok(server) = realm::wait_for("mute", 200_000_000) else { return 6 };
    MUTE.store(server, core::sync::atomic::Ordering::Release);
    let block = PROCESSOR.0.get();
    // SAFETY: our own blocks, before the kernel knows them; the handler's thread presents KEY.
    unsafe {
        *core::ptr::addr_of_mut!(HANDLER_KEYS) = [key];
        (*BLOCK.0.get()).keys = core::ptr::addr_of!(HANDLER_KEYS) as u64;
        (*BLOCK.0.get()).key_count = 1;
        (*block).current = BLOCK.0.get() as u64;
        (*block).upcall_handler = hostile_wait_entry as *const () as u64;
        (*block).quantum_us = 1000;
    }
    if raw_syscall(Syscall::SetProcessorBlock as u64, block as u64, 0, 0) != 0 {
        return 7;
    }
    loop {
        core::hint::spin_loop();
    }
}

/// An operation that tries to idle its caller's processor; returns what the kernel said.
extern "sysv64" fn idle_operation(_: u64, _: u64, _: u64, _: u64) -> u64 {
    raw_syscall(Syscall::Idle as u64, 0, 0, 0) as u64
}

fn fpu_aside() -> u32 {
    let Ok(key) = realm::generate_key() else { return 3 };
    if realm_sdk::keys::add(key).is_err() || realm_sdk::operations::register(&[unanswered]).is_err() {
        return 4;
    }
    let me = realm_sdk::program_index() as u32;
    // SAFETY: only its id is used.
    let root: realm::Realm<u8> = unsafe { realm::Realm::attach(me) };
    if root.set_rights(&key, realm::Rights::INVOKE_PROTECTED).is_err() {
        return 5;
    }
    let start = threads::tsc();
    let mut calls = 0u64;
    let mine = fpu_call::FpuState { xmm: PATTERN, mxcsr: 0, fcw: 0x40 };
    while threads::tsc() - start < 780_000_000 {
        calls += 1;
        fpu_call::protected_call_with(me, 2, &mine);
    }
    println!("hostile: fpu-aside: {calls} calls made");
    0
}

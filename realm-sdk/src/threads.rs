//! realm-sdk's default thread package: preemptive user-level threads driven by upcalls.
//!
//! The kernel knows no threads. This package keeps a table of threads, each with a stack and
//! a context block, and tells the kernel (through the processor block) which one runs. It
//! takes every upcall of its domain:
//!
//! * time limit: the running thread goes to the back of the ready list;
//! * fault: the faulting thread dies (its fault is printed), the others go on;
//! * blocked / completed: a thread waits in a deferred protected invocation / its result is in;
//! * wakeup: another domain (or an invocation handler) made a thread ready while the processor
//!   idled;
//! * invocation arrived: one of this program's operations ([`crate::operations`]) is run.
//!
//! Switching threads voluntarily ([`yield_now`], [`block`]) is a user-level register swap when
//! the next thread was itself switched out voluntarily; a thread the kernel saved (preempted,
//! or new) is restarted with `Syscall::Resume` from an upcall handler, and by restoring all its
//! saved registers at user level (`save_and_resume`) after a voluntary switch. [`block`] and [`unblock`] are the pair every
//! root realm offers: they work from any thread, from invocation handlers running on other
//! processors, and (as operations 0 and 1 of the program's operation table) from other
//! domains.
//!
//! Every thread shares the program's key list. Threads are limited to [`MAX_THREADS`].

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use psyche_abi::syscall::Syscall;
use psyche_abi::upcall::{
    ContextBlock, FpuImage, ProcessorBlock, Registers, Upcall, ARRIVED_INTERRUPTED, ARRIVED_PLACED, CRITICAL_PREEMPTED,
};

use crate::sys::{raw_syscall, result, SysError};
use crate::{operations, println};

/// Most threads a program has at once (the main thread included).
pub const MAX_THREADS: usize = 16;
const STACK_SIZE: usize = 32 * 1024;

const FREE: u8 = 0;
const READY: u8 = 1;
const RUNNING: u8 = 2;
const BLOCKED: u8 = 3;
const INVOKING: u8 = 4;
const DEAD: u8 = 5;

/// A thread: its index in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadId(pub u32);

// 1024-byte aligned: the context block (704 bytes) at the start of the slot then never crosses
// a page, as the kernel requires.
#[repr(C, align(1024))]
struct Slot {
    context: UnsafeCell<ContextBlock>,
    state: AtomicU8,
    /// The kernel saved this thread's registers (preempted, blocked in an invocation, new):
    /// restart it with `Resume`. Otherwise it switched out voluntarily and only its
    /// callee-saved registers, RSP and RIP matter.
    kernel_saved: AtomicBool,
    /// Unblocks that arrived before the thread blocked (a permit, as with park/unpark).
    permits: AtomicU32,
}

#[repr(C, align(16))]
struct Stack(UnsafeCell<[u8; STACK_SIZE]>);

// The processor block first: the table is 256-byte aligned, so the block (32 bytes) never
// crosses a page, as the kernel requires.
#[repr(C)]
struct Table {
    processor: UnsafeCell<ProcessorBlock>,
    slots: [Slot; MAX_THREADS],
    stacks: [Stack; MAX_THREADS],
}

// SAFETY: slot states are atomics; a context block is written by the thread that owns it, by
// the kernel while that thread is stopped, or by the scheduler after it claimed the thread
// through its state; the processor block's `current` only by the one processor this domain
// runs threads on.
unsafe impl Sync for Table {}

const _: () = assert!(core::mem::size_of::<ContextBlock>() <= 1024 && core::mem::offset_of!(Slot, context) == 0);

static TABLE: Table = Table {
    processor: UnsafeCell::new(ProcessorBlock { current: 0, upcall_handler: 0, quantum_us: 0, critical: 0 }),
    slots: [const {
        Slot {
            context: UnsafeCell::new(ContextBlock::EMPTY),
            state: AtomicU8::new(FREE),
            kernel_saved: AtomicBool::new(false),
            permits: AtomicU32::new(0),
        }
    }; MAX_THREADS],
    stacks: [const { Stack(UnsafeCell::new([0; STACK_SIZE])) }; MAX_THREADS],
};

/// The running thread on this domain's processor.
static CURRENT: AtomicU32 = AtomicU32::new(0);
/// Whether the processor is idle in the kernel (an unblock must wake it).
static IDLE: AtomicBool = AtomicBool::new(false);
/// Whether upcalls are on.
static ENABLED: AtomicBool = AtomicBool::new(false);
/// Threads that died of a fault.
static FAULTED: AtomicU64 = AtomicU64::new(0);
/// The domain id (the program index), for waking ourselves from other processors.
static DOMAIN: AtomicU32 = AtomicU32::new(0);

fn slot(thread: u32) -> Option<&'static Slot> {
    TABLE.slots.get(thread as usize)
}

fn processor() -> *mut ProcessorBlock {
    TABLE.processor.get()
}

fn context(thread: u32) -> *mut ContextBlock {
    TABLE.slots[thread as usize].context.get()
}

fn register_processor() -> Result<(), SysError> {
    result(raw_syscall(Syscall::SetProcessorBlock as u64, processor() as u64, 0, 0)).map(|_| ())
}

/// Sets the program up with one thread (the main thread) and no upcalls. Called by the entry
/// point.
pub(crate) fn init(program: u64) -> Result<(), SysError> {
    DOMAIN.store(program as u32, Ordering::Relaxed);
    let (keys, _) = crate::keys::location();
    // SAFETY: nothing runs yet but this thread.
    unsafe {
        (*context(0)).keys = keys;
        (*processor()).current = context(0) as u64;
    }
    TABLE.slots[0].state.store(RUNNING, Ordering::Relaxed);
    register_processor()
}

/// Keeps every context block's key count in step with the program's key list.
pub(crate) fn keys_changed(count: u64) {
    for thread in 0..MAX_THREADS as u32 {
        // SAFETY: the count is a plain word the kernel only reads.
        unsafe { core::ptr::addr_of_mut!((*context(thread)).key_count).write_volatile(count) };
    }
}

/// Turns upcalls on: from now on the kernel preempts threads every `quantum_us` microseconds
/// (0: never), reports faults to this package, and lets other domains invoke this program's
/// operations.
pub fn enable(quantum_us: u64) -> Result<(), SysError> {
    // SAFETY: only this thread edits the processor block's settings.
    unsafe {
        (*processor()).upcall_handler = realm_sdk_upcall_entry as *const () as u64;
        (*processor()).quantum_us = quantum_us;
    }
    ENABLED.store(true, Ordering::Release);
    register_processor()
}

/// The address of this package's upcall entry (for programs that build their own processor
/// block, to test the kernel).
pub fn upcall_entry_address() -> u64 {
    realm_sdk_upcall_entry as *const () as u64
}

/// Whether upcalls are on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// The running thread.
pub fn current() -> ThreadId {
    ThreadId(CURRENT.load(Ordering::Relaxed))
}

/// Starts a thread running `entry(arg)`; it is ready at once and runs when scheduled. Needs
/// upcalls ([`enable`]).
pub fn spawn(entry: extern "sysv64" fn(u64), arg: u64) -> Result<ThreadId, SysError> {
    if !ENABLED.load(Ordering::Acquire) {
        return Err(SysError::InvalidArgument);
    }
    let (index, slot) = TABLE
        .slots
        .iter()
        .enumerate()
        .find(|(_, slot)| {
            slot.state.compare_exchange(FREE, BLOCKED, Ordering::AcqRel, Ordering::Relaxed).is_ok()
                || slot.state.compare_exchange(DEAD, BLOCKED, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        })
        .ok_or(SysError::TableFull)?;
    let stack_top = (TABLE.stacks[index].0.get() as u64 + STACK_SIZE as u64) & !15;
    let (keys, count) = crate::keys::location();
    // SAFETY: the slot was FREE or DEAD and is ours until it is made ready.
    unsafe {
        let block = &mut *context(index as u32);
        block.keys = keys;
        block.key_count = *(count as *const u64);
        block.registers = Registers {
            rip: thread_start as *const () as u64,
            // The trampoline is entered as if called: RSP + 8 is 16-aligned.
            rsp: stack_top - 8,
            rdi: entry as *const () as u64,
            rsi: arg,
            rflags: 0x202,
            ..Registers::default()
        };
        block.fpu = FpuImage::INITIAL;
    }
    slot.permits.store(0, Ordering::Relaxed);
    slot.kernel_saved.store(true, Ordering::Relaxed);
    slot.state.store(READY, Ordering::Release);
    Ok(ThreadId(index as u32))
}

extern "sysv64" fn thread_start(entry: extern "sysv64" fn(u64), arg: u64) -> ! {
    entry(arg);
    exit_thread()
}

/// Ends the running thread. The main thread's end is the program's: it exits with code 0
/// when it returns from `main` (use [`join_all`] first to wait for the others).
pub fn exit_thread() -> ! {
    let me = CURRENT.load(Ordering::Relaxed);
    enter_critical();
    TABLE.slots[me as usize].state.store(DEAD, Ordering::Release);
    leave(me);
    // A dead thread is never chosen again.
    crate::exit(104)
}

/// Lets another ready thread run.
pub fn yield_now() {
    let me = CURRENT.load(Ordering::Relaxed);
    // From here until the switch is done, a time slice that ends is deferred: the thread
    // package's state (who is ready, who runs) is half changed.
    enter_critical();
    match pick_ready(me) {
        Some(next) => {
            TABLE.slots[me as usize].state.store(READY, Ordering::Release);
            switch_to(me, next);
        }
        None => end_critical(),
    }
}

/// Defers the kernel's time-limit upcall until [`end_critical`]: a thread preempted between
/// marking itself blocked and switching away would be saved as running and never be chosen
/// again.
fn enter_critical() {
    let block = processor();
    // SAFETY: the processor block is this domain's, edited only by the processor running it.
    unsafe { core::ptr::addr_of_mut!((*block).critical).write_volatile(1) };
}

/// Blocks the running thread until [`unblock`] (an unblock that came first is not lost).
pub fn block() {
    let me = CURRENT.load(Ordering::Relaxed);
    let slot = &TABLE.slots[me as usize];
    if slot.permits.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1)).is_ok() {
        return;
    }
    enter_critical();
    slot.state.store(BLOCKED, Ordering::Release);
    // An unblock between the permit check and here saw RUNNING and left a permit: take it.
    if slot.permits.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1)).is_ok() {
        // An unblock may have made us ready meanwhile: we run on either way.
        slot.state.store(RUNNING, Ordering::Release);
        end_critical();
        return;
    }
    leave(me);
}

/// Makes `thread` ready if it is blocked (or lets its next [`block`] return at once). Safe
/// from any thread and from invocation handlers on other processors.
pub fn unblock(thread: ThreadId) -> Result<(), SysError> {
    let slot = slot(thread.0).ok_or(SysError::InvalidArgument)?;
    if slot.state.compare_exchange(BLOCKED, READY, Ordering::AcqRel, Ordering::Acquire).is_err() {
        match slot.state.load(Ordering::Acquire) {
            FREE | DEAD => return Err(SysError::NotFound),
            _ => {
                slot.permits.fetch_add(1, Ordering::AcqRel);
                // It may have blocked in between.
                if slot.state.compare_exchange(BLOCKED, READY, Ordering::AcqRel, Ordering::Acquire).is_err() {
                    return Ok(());
                }
                // Made ready: take our permit back, unless the thread took it first.
                let _ = slot.permits.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1));
            }
        }
    }
    if IDLE.load(Ordering::Acquire) {
        wake(DOMAIN.load(Ordering::Relaxed))?;
    }
    Ok(())
}

/// Wakes domain `domain`'s processor if it idles (a wakeup upcall).
pub fn wake(domain: u32) -> Result<(), SysError> {
    result(raw_syscall(Syscall::Wake as u64, u64::from(domain), 0, 0)).map(|_| ())
}

/// Waits until every other thread has ended.
pub fn join_all() {
    let me = CURRENT.load(Ordering::Relaxed);
    let alive =
        |t: u32| matches!(TABLE.slots[t as usize].state.load(Ordering::Acquire), READY | RUNNING | BLOCKED | INVOKING);
    while (0..MAX_THREADS as u32).any(|t| t != me && alive(t)) {
        yield_now();
        core::hint::spin_loop();
    }
}

/// Goes through the kernel and back by way of an upcall: wakes this domain and idles, so
/// that the kernel delivers a wakeup upcall whose handler resumes this thread. (A benchmark
/// of upcall delivery; it needs upcalls on.)
pub fn upcall_round_trip() -> Result<(), SysError> {
    if !enabled() {
        return Err(SysError::InvalidArgument);
    }
    let me = CURRENT.load(Ordering::Relaxed);
    TABLE.slots[me as usize].state.store(READY, Ordering::Release);
    wake(DOMAIN.load(Ordering::Relaxed))?;
    let block = processor();
    // SAFETY: as in `leave`: this domain's processor block; `me` is the running thread.
    unsafe {
        core::ptr::addr_of_mut!((*block).critical).write_volatile(1);
        save_and_idle(context(me));
    }
    end_critical();
    Ok(())
}

/// Threads that died of a fault so far.
pub fn faulted() -> u64 {
    FAULTED.load(Ordering::Relaxed)
}

/// The next ready thread after `after`, round robin, claimed (state RUNNING).
fn pick_ready(after: u32) -> Option<u32> {
    (1..=MAX_THREADS as u32).map(|step| (after + step) % MAX_THREADS as u32).find(|&t| {
        let state = &TABLE.slots[t as usize].state;
        // A plain load first: a failed compare-exchange is a locked instruction, and most
        // slots are not ready.
        state.load(Ordering::Relaxed) == READY
            && state.compare_exchange(READY, RUNNING, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    })
}

/// Leaves the running thread `me` (already marked blocked or dead) for another ready thread,
/// or idles the processor; returns when `me` runs again.
fn leave(me: u32) {
    if let Some(next) = pick_ready(me) {
        switch_to(me, next);
        return;
    }
    let block = processor();
    // SAFETY: the processor block is this domain's, edited only by the processor running it.
    unsafe { core::ptr::addr_of_mut!((*block).critical).write_volatile(1) };
    IDLE.store(true, Ordering::Release);
    // A thread made ready just before the flag was set would not have woken us.
    if let Some(next) = pick_ready(me) {
        IDLE.store(false, Ordering::Release);
        // SAFETY: as above.
        unsafe { core::ptr::addr_of_mut!((*block).critical).write_volatile(0) };
        switch_to(me, next);
        return;
    }
    // SAFETY: saves `me` (the running thread) and idles; a later upcall resumes it here.
    unsafe { save_and_idle(context(me)) };
    end_critical();
}

/// Leaves the package's critical section, yielding if a time slice ended inside it.
fn end_critical() {
    let block = processor();
    // One instruction (`xchg`), so that a tick between a read and a write cannot lose the
    // kernel's mark. SAFETY: as in `leave`; the word is 8-byte aligned.
    let critical = unsafe { core::sync::atomic::AtomicU64::from_ptr(core::ptr::addr_of_mut!((*block).critical)) };
    let preempted = critical.swap(0, Ordering::AcqRel) == CRITICAL_PREEMPTED;
    if preempted {
        yield_now();
    }
}

/// Nothing to run from an upcall handler: idle until the next upcall.
fn idle() -> ! {
    IDLE.store(true, Ordering::Release);
    if let Some(next) = pick_ready(CURRENT.load(Ordering::Relaxed)) {
        IDLE.store(false, Ordering::Release);
        resume(next);
    }
    raw_syscall(Syscall::Idle as u64, 0, 0, 0);
    // Idle never returns; if the kernel refused it (no upcalls), stop here.
    crate::exit(105)
}

/// Runs thread `next` (claimed) instead of `me`.
fn switch_to(me: u32, next: u32) {
    let block = processor();
    // SAFETY: the processor block is this domain's, edited only by the processor running it.
    unsafe { core::ptr::addr_of_mut!((*block).critical).write_volatile(1) };
    CURRENT.store(next, Ordering::Relaxed);
    let from = context(me);
    let to = context(next);
    // SAFETY: `me` is the running thread (its block is ours to write) and `next` was claimed.
    unsafe { core::ptr::addr_of_mut!((*block).current).write_volatile(to as u64) };
    if TABLE.slots[next as usize].kernel_saved.swap(false, Ordering::AcqRel) {
        // SAFETY: saves this thread's callee-saved state, then restarts `next` through the
        // kernel; we come back at the label when someone resumes us.
        unsafe { save_and_resume(from, to) };
    } else {
        // SAFETY: both blocks hold the state of threads stopped at a voluntary switch.
        unsafe { swap_context(from, to) };
    }
    // Back in `me`.
    end_critical();
}

fn resume(thread: u32) -> ! {
    let block = processor();
    CURRENT.store(thread, Ordering::Relaxed);
    // SAFETY: the processor block is this domain's; the thread was claimed.
    unsafe {
        core::ptr::addr_of_mut!((*block).current).write_volatile(context(thread) as u64);
        core::ptr::addr_of_mut!((*block).critical).write_volatile(0);
    }
    TABLE.slots[thread as usize].kernel_saved.store(false, Ordering::Relaxed);
    // The thread's x87/SSE state, which the kernel saved with its registers: Resume loads only
    // the registers (the kernel never loads an image a program wrote).
    // SAFETY: the image was written by the kernel's `fxsave64` or is the initial one; a bad one
    // faults here, at CPL3, in this domain only.
    unsafe { asm!("fxrstor64 [{}]", in(reg) core::ptr::addr_of!((*context(thread)).fpu), options(nostack, readonly)) };
    raw_syscall(Syscall::Resume as u64, context(thread) as u64, 0, 0);
    crate::exit(106)
}

// Register offsets in a ContextBlock: keys, key_count, then Registers (rax at 16).
const RAX: usize = 16;
const RBX: usize = 16 + 8;
const RBP: usize = 16 + 6 * 8;
const RSP: usize = 16 + 7 * 8;
const R12: usize = 16 + 12 * 8;
const RIP: usize = 16 + 16 * 8;

extern "sysv64" {
    fn swap_context(from: *mut ContextBlock, to: *mut ContextBlock);
    fn save_and_resume(from: *mut ContextBlock, to: *mut ContextBlock);
    fn save_and_idle(from: *mut ContextBlock);
    fn realm_sdk_upcall_entry();
}

// A voluntary switch saves only what a call must preserve (RBX, RBP, R12-R15, RSP) and where
// to continue, then loads the same from the other thread: a handful of moves, no kernel.
global_asm!(
    r#"
    .section .text
    // Saves what a call must preserve (RBX, RBP, R12-R15, RSP) in the context block at RDI,
    // with `switched_back` as where the thread continues: it returns from the switch.
    .macro SAVE_VOLUNTARY
    mov [rdi + {rbx}], rbx
    mov [rdi + {rbp}], rbp
    mov [rdi + {r12}], r12
    mov [rdi + {r12} + 8], r13
    mov [rdi + {r12} + 16], r14
    mov [rdi + {r12} + 24], r15
    lea rax, [rip + realm_sdk_switched_back]
    mov [rdi + {rip}], rax
    mov [rdi + {rsp}], rsp
    .endm

    // Loads what a call must preserve (RBX, RBP, R12-R15) from the context block at RSI.
    .macro LOAD_CALLEE_SAVED
    mov rbx, [rsi + {rbx}]
    mov rbp, [rsi + {rbp}]
    mov r12, [rsi + {r12}]
    mov r13, [rsi + {r12} + 8]
    mov r14, [rsi + {r12} + 16]
    mov r15, [rsi + {r12} + 24]
    .endm

realm_sdk_switched_back:
    ret

    .global swap_context
swap_context:
    SAVE_VOLUNTARY
    LOAD_CALLEE_SAVED
    mov rsp, [rsi + {rsp}]
    jmp qword ptr [rsi + {rip}]

    .global save_and_resume
save_and_resume:
    SAVE_VOLUNTARY
    // Restores `to` at user level rather than with the kernel's Resume, which would run it
    // with `critical` still set: a thread the kernel saved never passes `end_critical`, so its
    // time slices would not end until it switched voluntarily (never, for one that spins).
    // Its RIP and RFLAGS go below its red zone; `critical` is cleared once nothing more is
    // read from its context block: a time slice ending in the last two instructions saves
    // the thread there, and resuming it finishes them.
    // Its x87/SSE state, which the kernel saved with its registers.
    fxrstor64 [rsi + {fpu}]
    mov rax, [rsi + {rsp}]
    mov rcx, [rsi + {rip}]
    mov [rax - 136], rcx
    mov rcx, [rsi + {rflags}]
    mov [rax - 144], rcx
    lea rsp, [rax - 144]
    LOAD_CALLEE_SAVED
    mov rax, [rsi + {rax}]
    mov rcx, [rsi + {rcx}]
    mov rdx, [rsi + {rdx}]
    mov rdi, [rsi + {rdi}]
    mov r8, [rsi + {r8}]
    mov r9, [rsi + {r8} + 8]
    mov r10, [rsi + {r8} + 16]
    mov r11, [rsi + {r8} + 24]
    mov rsi, [rsi + {rsi}]
    mov qword ptr [rip + {table} + {critical}], 0
    popfq
    ret 128

    .global save_and_idle
save_and_idle:
    SAVE_VOLUNTARY
    mov eax, {idle}
    int 4
    ud2

    // Upcalls arrive here on the work area: RDI = kind, RSI..R11 = arguments.
    .global realm_sdk_upcall_entry
realm_sdk_upcall_entry:
    and rsp, -16
    push r11
    push r10
    call {upcall}
    ud2
    "#,
    rbx = const RBX,
    rbp = const RBP,
    rsp = const RSP,
    r12 = const R12,
    rip = const RIP,
    rax = const RAX,
    rcx = const RAX + 2 * 8,
    rdx = const RAX + 3 * 8,
    rsi = const RAX + 4 * 8,
    rdi = const RAX + 5 * 8,
    r8 = const RAX + 8 * 8,
    rflags = const RIP + 8,
    fpu = const psyche_abi::upcall::CONTEXT_FPU_OFFSET,
    table = sym TABLE,
    critical = const core::mem::offset_of!(Table, processor) + core::mem::offset_of!(ProcessorBlock, critical),
    idle = const Syscall::Idle as u64,
    upcall = sym upcall,
);

/// The thread whose context block is at `address`.
fn thread_of(address: u64) -> Option<u32> {
    (0..MAX_THREADS as u32).find(|&t| context(t) as u64 == address)
}

/// The thread an upcall interrupted (its context block, saved by the kernel; 0: none) is
/// ready again.
fn preempted(context: u64) {
    if let Some(thread) = thread_of(context) {
        let slot = &TABLE.slots[thread as usize];
        slot.kernel_saved.store(true, Ordering::Relaxed);
        let _ = slot.state.compare_exchange(RUNNING, READY, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Picks the next thread and runs it (from an upcall handler: always through `Resume`).
fn schedule(after: u32) -> ! {
    match pick_ready(after) {
        Some(next) => resume(next),
        None => idle(),
    }
}

#[allow(clippy::too_many_arguments)]
extern "sysv64" fn upcall(kind: u64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64, a6: u64) -> ! {
    let current = CURRENT.load(Ordering::Relaxed);
    // Invocations arrive on the caller's processor, not this domain's own, unless the kernel
    // placed them here: only then do they say our processor is busy.
    if kind != Upcall::InvocationArrived as u64 || a2 & ARRIVED_PLACED != 0 {
        IDLE.store(false, Ordering::Release);
    }
    match Upcall::from_raw(kind) {
        Some(Upcall::InvocationArrived) => {
            operations::dispatch(a0, a1, a2, [a3, a4, a5, a6]);
            // Served on this domain's own processor: whatever it interrupted is ready again.
            if a2 & ARRIVED_INTERRUPTED != 0 {
                preempted(context(current) as u64);
            }
            schedule(current)
        }
        Some(Upcall::TimeLimit) => {
            preempted(a0);
            schedule(current)
        }
        Some(Upcall::Fault) => {
            if let Some(thread) = thread_of(a0) {
                TABLE.slots[thread as usize].state.store(DEAD, Ordering::Release);
                FAULTED.fetch_add(1, Ordering::Relaxed);
                println!("threads: thread {thread} died of a fault: vector {a1}, error code {a2:#x}, address {a3:#x}");
                if thread == 0 {
                    // The main thread is the program.
                    crate::exit(123);
                }
            }
            schedule(current)
        }
        Some(Upcall::Blocked) => {
            if let Some(thread) = thread_of(a0) {
                TABLE.slots[thread as usize].kernel_saved.store(true, Ordering::Relaxed);
                TABLE.slots[thread as usize].state.store(INVOKING, Ordering::Release);
            }
            schedule(current)
        }
        Some(Upcall::Completed) => {
            preempted(a4);
            if let Some(thread) = thread_of(a0) {
                let slot = &TABLE.slots[thread as usize];
                slot.kernel_saved.store(true, Ordering::Relaxed);
                let _ = slot.state.compare_exchange(INVOKING, READY, Ordering::AcqRel, Ordering::Relaxed);
            }
            schedule(current)
        }
        Some(Upcall::Wakeup) => {
            preempted(a4);
            schedule(current)
        }
        None => schedule(current),
    }
}

/// Reads the time-stamp counter (for programs that measure themselves).
pub fn tsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: rdtsc has no side effects.
    unsafe { asm!("lfence", "rdtsc", "lfence", out("eax") low, out("edx") high, options(nomem, nostack)) };
    u64::from(high) << 32 | u64::from(low)
}

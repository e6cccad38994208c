//! Upcalls and protected invocations.
//!
//! An upcall saves the running thread's registers in its context block (the one the domain's
//! processor block names as current) and enters the domain's handler at CPL3, on the work area
//! the kernel maps for that domain on this CPU. It never returns: the handler resumes a thread
//! (`Syscall::Resume`) or idles the processor (`Syscall::Idle`).
//!
//! A protected invocation runs on the caller's CPU: the CPU switches to the callee domain's
//! view and enters its handler with an invocation-arrived upcall; `Syscall::InvocationReturn`
//! switches back and resumes the caller with the result. The caller's registers other than
//! RSP are not kept: realm-sdk's call stub saves what the caller needs (and clears what it does
//! not mean to pass: the assembly path hands over, as they are, registers it does not use; the
//! callee's return stub does the same). If the callee defers the
//! invocation, the caller's domain gets its processor back with a blocked upcall, and a
//! completed upcall (on its home CPU) when the result arrives; a domain without an upcall
//! handler simply waits in the kernel.
//!
//! Cost (`psyche-vmm bench` counts it): calls and returns have their own gate (`int3`), and
//! the common round trip runs in assembly there (`psyche_invocation_gate` in `entry`), in about
//! 40 kernel instructions: no lock, no table, no copy of the caller's frame (the gate's stack
//! starts lower while an invocation runs: `cpu::FRAME_STRIDE`), and each depth's slot
//! (`cpu::InvocationSlot`) both remembers the last call made from that depth, checked in full,
//! and records the one running from it, with a frame ready to enter the callee's handler
//! through and its own count of ids. The invocation table has an entry only on deferral.
//! Everything else (a first call, a changed check, latency traps, a traced kernel) takes the
//! Rust path here, which checks, fills the slot and does the same.

use core::sync::atomic::{AtomicU64, Ordering};

use psyche_abi::hypercall::Hypercall;
use psyche_abi::realm::Termination;
use psyche_abi::syscall::{SysError, Syscall};
use psyche_abi::trace::TraceKind;
use psyche_abi::upcall::{ContextBlock, ProcessorBlock, Registers, Upcall, ARRIVED_INTERRUPTED, ARRIVED_PLACED};

use psyche_abi::layout::{USER_CS, USER_DS};

use crate::arch::x86_64::cpu::{self, this_cpu, InvocationSlot, MAX_NESTED_INVOCATIONS, UPCALL_VECTOR};
use crate::arch::x86_64::entry::{enter_upcall, resume_user, return_to_user, ExceptionFrame};
use crate::arch::x86_64::hypercall::hypercall;
use crate::arch::x86_64::{fpu, lapic, paging};
use crate::domains::PendingUpcall;
use crate::numa::Views;
use crate::{kernel_lock, trace};

const NONE: u32 = u32::MAX;

/// The registers of the thread an exception frame interrupted.
pub fn registers_of(frame: &ExceptionFrame) -> Registers {
    Registers {
        rax: frame.rax,
        rbx: frame.rbx,
        rcx: frame.rcx,
        rdx: frame.rdx,
        rsi: frame.rsi,
        rdi: frame.rdi,
        rbp: frame.rbp,
        rsp: frame.rsp,
        r8: frame.r8,
        r9: frame.r9,
        r10: frame.r10,
        r11: frame.r11,
        r12: frame.r12,
        r13: frame.r13,
        r14: frame.r14,
        r15: frame.r15,
        rip: frame.rip,
        rflags: frame.rflags,
    }
}

fn current_cr3() -> u64 {
    cpu::master_view()
}

/// The direct-map address of a user `T` at `address` (all in one page, user-writable), or
/// `None`.
fn user_object<T>(cr3: u64, address: u64) -> Option<*mut T> {
    if !address.is_multiple_of(8) {
        return None;
    }
    paging::user_pointer(cr3, address, true)
}

/// Saves `registers`, and the live x87/SSE state (which must be the thread's), as the current
/// thread of the domain whose processor block is at `processor` (through `cr3`): returns the
/// thread's context block.
pub(crate) fn save_thread(cr3: u64, processor: u64, registers: &Registers) -> Option<u64> {
    let block = user_object::<ProcessorBlock>(cr3, processor)?;
    // SAFETY: `user_object` checked the block is a user-writable page of this view.
    let current = unsafe { (*block).current };
    // 64-byte aligned, as the ABI says: its x87/SSE image is then 16-byte aligned, as
    // `fxsave64` needs.
    let context = user_object::<ContextBlock>(cr3, current).filter(|_| current.is_multiple_of(64))?;
    // SAFETY: as above, for the context block; the image is inside it, 16-byte aligned, and
    // reached through the direct map (the kernel's own, writable mapping of the frame).
    unsafe {
        core::ptr::addr_of_mut!((*context).registers).write_volatile(*registers);
        fpu::save(core::ptr::addr_of_mut!((*context).fpu));
    }
    Some(current)
}

/// Switches this CPU to `domain`'s views (`Kernel::views_here`).
pub(crate) fn switch_to(domain: u32, views: Views) {
    let percpu = this_cpu();
    if percpu.domain != domain {
        // Remote pages opened for the last domain close with its turn.
        crate::numa::rearm_here();
        trace::emit(TraceKind::DomainSwitch, 0, u64::from(percpu.domain), u64::from(domain));
        percpu.domain = domain;
        percpu.master_pml4 = views.master;
        // SAFETY: every view shares the kernel's half of the address space.
        unsafe {
            x86_64::registers::control::Cr3::write_raw(
                x86_64::structures::paging::PhysFrame::containing_address(x86_64::PhysAddr::new_truncate(views.local)),
                0,
            )
        };
    }
}

/// Ends `domain` for a broken upcall contract: `address` is what it touched (or gave the
/// kernel), `rip` where it was.
fn fail(domain: u32, reason: Termination, address: u64, rip: u64) -> ! {
    let percpu = this_cpu();
    percpu.upcall_domain = NONE;
    hypercall(Hypercall::DomainTerminated, [u64::from(domain), reason as u64, address, u64::from(u32::MAX), rip, 0]);
    crate::domain_ended(domain)
}

/// Enters `domain`'s upcall handler on this CPU with `kind` and its arguments.
pub fn deliver(domain: u32, kind: Upcall, args: [u64; 7]) -> ! {
    let percpu = this_cpu();
    let (cpu, node) = (percpu.index, percpu.node);
    let target = {
        let mut kernel = kernel_lock();
        // Level 0: the domain's own scheduler (only a domain at invocation depth 0 gets
        // upcalls other than an invocation's).
        let top = kernel.work_area(domain, cpu, 0, node);
        let views = kernel.views_here(domain);
        kernel.domain(domain).zip(top).zip(views).map(|((d, top), views)| (d.handler, views, top))
    };
    let Some((handler, views, top)) = target.filter(|t| t.0 != 0) else {
        fail(domain, Termination::UpcallFailed, 0, 0)
    };
    switch_to(domain, views);
    percpu.upcall_domain = domain;
    trace::emit(TraceKind::Upcall, kind as u32, u64::from(domain), args[0]);
    enter_upcall(handler, top, kind as u64, args)
}

/// What the kernel needs to know to interrupt a domain that takes upcalls.
struct HandlerState {
    /// The domain's processor block (user address).
    processor: u64,
    /// Whether this CPU is running the domain's upcall handler.
    in_upcall: bool,
    /// The domain's time slice, 0 for none.
    quantum_us: u64,
}

/// `domain`'s upcall state, if it takes upcalls: one look under the kernel lock.
fn handler_state(domain: u32) -> Option<HandlerState> {
    let kernel = kernel_lock();
    let d = kernel.domain(domain)?;
    (d.handler != 0).then(|| HandlerState {
        processor: d.processor_block,
        in_upcall: this_cpu().upcall_domain == domain,
        quantum_us: d.quantum_us,
    })
}

/// A CPL3 exception in the running domain: a fault upcall if the domain takes upcalls (and is
/// not in its handler, which ends it); returns if the kernel should end the program instead.
pub fn fault(frame: &ExceptionFrame, cr2: u64) {
    let domain = this_cpu().domain;
    let Some(HandlerState { processor, in_upcall, .. }) = handler_state(domain) else { return };
    if in_upcall {
        fail(domain, Termination::UpcallFailed, cr2, frame.rip);
    }
    let Some(thread) = save_thread(current_cr3(), processor, &registers_of(frame)) else {
        fail(domain, Termination::BadContextBlock, processor, frame.rip)
    };
    deliver(domain, Upcall::Fault, [thread, frame.vector, frame.error_code, cr2, 0, 0, 0])
}

/// A timer tick that interrupted CPL3: the time-limit upcall, for a domain that asked for one
/// and is not in its handler.
pub fn time_limit(frame: &ExceptionFrame) {
    let domain = this_cpu().domain;
    let Some(HandlerState { processor, in_upcall, quantum_us }) = handler_state(domain) else { return };
    if quantum_us == 0 || in_upcall {
        return;
    }
    // In the thread package's critical section: note the preemption and let it yield itself.
    if defer_if_critical(current_cr3(), processor) {
        return;
    }
    let Some(thread) = save_thread(current_cr3(), processor, &registers_of(frame)) else {
        fail(domain, Termination::BadContextBlock, processor, frame.rip)
    };
    deliver(domain, Upcall::TimeLimit, [thread, 0, 0, 0, 0, 0, 0])
}

/// Whether the domain whose processor block is at `processor` (through `cr3`) is in its thread
/// package's critical section; if so, marks the block so that the package yields when it
/// leaves the section, instead of the kernel saving a half-switched thread.
pub(crate) fn defer_if_critical(cr3: u64, processor: u64) -> bool {
    let Some(block) = user_object::<ProcessorBlock>(cr3, processor) else { return false };
    // SAFETY: a user-writable page of the domain's view, checked by `user_object`.
    let critical = unsafe { core::ptr::addr_of_mut!((*block).critical) };
    // SAFETY: as above.
    if unsafe { critical.read_volatile() } == 0 {
        return false;
    }
    // SAFETY: as above.
    unsafe { critical.write_volatile(psyche_abi::upcall::CRITICAL_PREEMPTED) };
    true
}

/// The upcall IPI interrupted CPL3: deliver what waits for the running domain, unless its
/// handler runs (then it waits for the next chance).
pub fn pending(frame: &ExceptionFrame) {
    let domain = this_cpu().domain;
    let Some(HandlerState { processor, in_upcall, .. }) = handler_state(domain) else { return };
    if in_upcall {
        return;
    }
    let Some(upcall) = kernel_lock().take_upcall(domain) else { return };
    let Some(thread) = save_thread(current_cr3(), processor, &registers_of(frame)) else {
        fail(domain, Termination::BadContextBlock, processor, frame.rip)
    };
    // The interrupted thread is saved: the upcall names it (R9) so the handler can run it again.
    deliver_pending(domain, upcall, thread)
}

fn deliver_pending(domain: u32, upcall: PendingUpcall, interrupted: u64) -> ! {
    let kind = Upcall::from_raw(upcall.kind).unwrap_or(Upcall::Wakeup);
    let [a, b, c] = upcall.args;
    if kind == Upcall::InvocationArrived {
        // An invocation placed here, near the callee's data: its arguments wait in the table.
        let id = a;
        let args = kernel_lock().invocation(id).map(|e| (e.operation, e.caller, e.args));
        let Some((operation, caller, [a0, a1, a2, a3])) = args else {
            // The caller is gone: nothing to run; the handler hears of a wakeup instead.
            deliver(domain, Upcall::Wakeup, [0, 0, 0, 0, interrupted, 0, 0])
        };
        let flags = ARRIVED_PLACED | if interrupted != 0 { ARRIVED_INTERRUPTED } else { 0 };
        trace::emit(TraceKind::InvocationArrive, operation as u32, u64::from(domain), id);
        deliver(domain, kind, [id, operation, u64::from(caller) | flags, a0, a1, a2, a3])
    }
    deliver(domain, kind, [a, b, c, 0, interrupted, 0, 0])
}

/// Tells `domain`'s home CPU an upcall waits (or delivers nothing if it is this CPU, which
/// will look at the queue on its own).
fn notify(home_cpu: u32) {
    if home_cpu != this_cpu().index {
        let info = crate::boot_info();
        if let Some(cpu) = info.cpus.get(home_cpu as usize) {
            lapic::send_ipi(cpu.apic_id, UPCALL_VECTOR);
        }
    }
}

/// `Syscall::Resume`: ends the handler by running the thread whose context block is at
/// `context`.
pub fn resume(context: u64) -> ! {
    let percpu = this_cpu();
    let domain = percpu.domain;
    // The report names where it asked from (looked up only then: this is the upcall path).
    let asked_at = || crate::gate_frame().0;
    let Some(block) = user_object::<ContextBlock>(current_cr3(), context) else {
        fail(domain, Termination::BadResume, context, asked_at())
    };
    // SAFETY: `user_object` checked the block is a user page of this view.
    let registers = unsafe { core::ptr::addr_of!((*block).registers).read_volatile() };
    if registers.rip >= 0x0000_8000_0000_0000 {
        fail(domain, Termination::BadResume, registers.rip, asked_at());
    }
    percpu.upcall_domain = NONE;
    // Something arrived while the handler ran: come back to it at the first chance.
    if kernel_lock().domain(domain).is_some_and(|d| d.pending_count > 0) {
        lapic::send_ipi(crate::boot_info().cpus[percpu.index as usize].apic_id, UPCALL_VECTOR);
    }
    resume_user(&registers)
}

/// `Syscall::Idle`: this processor has nothing to run for its domain: wait for an upcall.
pub fn idle() -> ! {
    let percpu = this_cpu();
    let domain = percpu.domain;
    percpu.upcall_domain = NONE;
    loop {
        let upcall = {
            let mut kernel = kernel_lock();
            let upcall = kernel.take_upcall(domain);
            if let Some(d) = kernel.domain_mut(domain) {
                d.idle = upcall.is_none();
            }
            upcall
        };
        if let Some(upcall) = upcall {
            deliver_pending(domain, upcall, 0);
        }
        if kernel_lock().domain(domain).is_none() {
            crate::domain_ended(domain);
        }
        // Another domain of this processor may use it meanwhile (it gives it back when this
        // one has an upcall waiting). Idle is refused inside invocations (`Syscall::Idle`).
        crate::sched::switch_from(domain);
        cpu::wait_for_interrupt();
    }
}

/// `Syscall::Wake`: a wakeup upcall for `domain` if it has none waiting.
pub fn wake(domain: u32) -> Result<u64, SysError> {
    let mut kernel = kernel_lock();
    let d = kernel.domain(domain).ok_or(SysError::NotFound)?;
    let home = d.home_cpu;
    let already = d.pending[..d.pending_count].iter().any(|p| p.kind == Upcall::Wakeup as u64);
    if d.handler == 0 {
        return Err(SysError::InvalidArgument);
    }
    if !already && !kernel.queue_upcall(domain, PendingUpcall { kind: Upcall::Wakeup as u64, args: [0; 3] }) {
        return Err(SysError::TableFull);
    }
    drop(kernel);
    notify(home);
    Ok(0)
}

/// Resumes a caller with an error instead of an invocation.
fn refuse(rip: u64, rsp: u64, rflags: u64, error: SysError) -> ! {
    return_to_user(rip, rsp, rflags, error.to_return() as u64)
}

/// Moves on whenever something a slot's remembered invocation check (`InvocationSlot`) may
/// have depended on changes: rights taken away, a domain's end, its handler, operations or home
/// CPU. A slot filled with a check made under an older generation is emptied at once.
pub(crate) static CHECK_GENERATION: AtomicU64 = AtomicU64::new(1);

/// The CPUs that may have a filled slot: `forget_checks` empties theirs, so that it costs
/// nothing on CPUs that never invoke.
static CPUS_WITH_CHECKS: [AtomicU64; psyche_abi::MAX_CPUS / 64] =
    [const { AtomicU64::new(0) }; psyche_abi::MAX_CPUS / 64];

/// Every CPU forgets the invocation checks it remembers (called under the kernel lock). The
/// slots are emptied from here, so the assembly paths need not look at the generation; the
/// returns of the invocations running then take the Rust path, which looks each caller up (it
/// may have ended).
pub(crate) fn forget_checks() {
    CHECK_GENERATION.fetch_add(1, Ordering::SeqCst);
    for (word_index, word) in CPUS_WITH_CHECKS.iter().enumerate() {
        let mut cpus = word.swap(0, Ordering::SeqCst);
        while cpus != 0 {
            let index = word_index * 64 + cpus.trailing_zeros() as usize;
            cpus &= cpus - 1;
            let Some(block) = cpu::cpu_block(index) else { continue };
            for depth in 0..MAX_NESTED_INVOCATIONS {
                // SAFETY: a slot of a block that lives for the machine's lifetime; its owner reads
                // the count with one load, so a word store is seen whole.
                unsafe { operations_word(cpu::slot_of(block, depth as isize)).store(0, Ordering::SeqCst) };
            }
        }
    }
}

/// This CPU forgets the invocation checks it remembers (`aside::set_aside`: a set-aside
/// activation's work area must not be entered from a remembered check).
pub(crate) fn forget_checks_here() {
    let percpu = this_cpu();
    for depth in 0..MAX_NESTED_INVOCATIONS {
        // SAFETY: this CPU's own slot.
        unsafe { operations_word(cpu::slot_of(percpu, depth as isize)).store(0, Ordering::SeqCst) };
    }
}

/// The generation a check made now belongs to (read under the kernel lock, before the check).
pub(crate) fn check_generation() -> u64 {
    CHECK_GENERATION.load(Ordering::SeqCst)
}

/// The operation count of a slot, which `forget_checks` on another CPU zeroes.
///
/// # Safety
/// `slot` must be a slot of a per-CPU block.
pub(crate) unsafe fn operations_word(slot: *mut InvocationSlot) -> &'static AtomicU64 {
    // SAFETY: per the caller, 8-byte aligned and alive for the machine's lifetime.
    unsafe { AtomicU64::from_ptr(core::ptr::addr_of_mut!((*slot).operations)) }
}

/// A protected invocation the generic path checked in full: what the CPU may remember of it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Checked {
    /// The realm number as the caller passed it.
    pub realm: u64,
    /// The callee's operation count.
    pub operations: u64,
    /// `check_generation()` before the check.
    pub generation: u64,
}

/// The invocation gate's way in for a call (from `psyche_invocation_gate`, with
/// `Syscall::ProtectedCall`'s arguments). The same invocation as the last one this CPU checked
/// in full from this depth, with nothing changed since, enters the callee at once (the assembly
/// path does this itself; a traced kernel comes here); anything else is checked in full and
/// remembered. Returns only with an error for the caller.
pub extern "sysv64" fn protected_call_gate(realm: u64, operation: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    trace::emit(TraceKind::GateEnter, Syscall::ProtectedCall as u32, 0, 0);
    let percpu = this_cpu();
    let depth = cpu::invocation_depth();
    let slot = cpu::slot(depth);
    let state = percpu.state();
    let (rip, rsp, rflags) = crate::gate_frame();
    // At the deepest depth the slot is the guard, whose count is 0.
    if slot.realm == realm && slot.caller_state == state && operation < slot.operations {
        let (views, entry) = (Views { master: slot.callee_view, local: slot.callee_view }, slot.entry);
        let target = Target { callee: slot.callee(), handler: entry[0], top: entry[3], views };
        enter_callee(target, depth, Remember::Kept, operation, [a0, a1, a2, a3], rip, rsp, rflags)
    }
    let error = match check_call(realm, operation) {
        Ok((callee, checked)) => invoke(callee, operation, [a0, a1, a2, a3], rip, rsp, rflags, Some(checked)),
        Err(error) => error.to_return(),
    };
    trace::emit(TraceKind::GateExit, Syscall::ProtectedCall as u32, error as u64, 0);
    error
}

/// Checks in full that the running domain may invoke operation `operation` of realm `realm`
/// with protection: returns the callee and what a slot may remember of the check.
fn check_call(realm: u64, operation: u64) -> Result<(u32, Checked), SysError> {
    let domain = this_cpu().domain;
    let id = u32::try_from(realm).map_err(|_| SysError::NotFound)?;
    let mut kernel = kernel_lock();
    // Before the check: a change during it makes what is remembered stale at once.
    let generation = check_generation();
    kernel.may_invoke_protected(domain, cpu::master_view(), id)?;
    let callee = kernel.realms.get(id).and_then(|r| r.root_of).ok_or(SysError::NotFound)?;
    let operations = kernel.domain(callee).ok_or(SysError::NotFound)?.operations.1;
    if operation >= operations {
        return Err(SysError::InvalidArgument);
    }
    Ok((callee, Checked { realm, operations, generation }))
}

/// Per-CPU invocation ids have this bit (the table's own ids, for placed and deferred
/// invocations, never reach it; both are at least `MIN_INVOCATION_ID`). Below it: a count per slot (from bit 20), the depth of the
/// slot (bits 16-19) and the CPU's index (bits 0-15), so that the id names its slot.
const PER_CPU_ID: u64 = 1 << 63;

/// Set in a running invocation's slot id once a server thread answered it from elsewhere.
pub(crate) const ANSWERED: u64 = 1 << 62;

/// How a slot's id moves on at each return: past its CPU and depth bits.
pub(crate) const ID_STEP: u64 = 1 << 20;

/// The first invocation id of CPU `index`'s slot of depth `depth`.
pub(crate) fn first_invocation_id(index: u32, depth: isize) -> u64 {
    PER_CPU_ID | ((depth as u64) & 0xF) << 16 | u64::from(index)
}

/// Sets a slot's id (the next invocation's, when none runs from it).
pub(crate) fn set_slot_id(slot: *mut InvocationSlot, id: u64) {
    id_word(slot).store(id, Ordering::Release);
}

/// The slot of `depth` has used ids up to `id` while a chain was set aside: its next must be
/// above (`pop`).
pub(crate) fn note_fresh_id(depth: usize, id: u64) {
    let fresh = &mut this_cpu().fresh_ids[depth];
    *fresh = (*fresh).max(id & !ANSWERED);
}

/// The id word of a slot, which another CPU may mark `ANSWERED`.
fn id_word(slot: *mut InvocationSlot) -> &'static AtomicU64 {
    // SAFETY: slots live in per-CPU blocks for the machine's lifetime, 8-byte aligned; every
    // access to an id another CPU may mark is atomic.
    unsafe { AtomicU64::from_ptr(core::ptr::addr_of_mut!((*slot).id)) }
}

/// The invocation gate's way in for `Syscall::InvocationReturn` (from
/// `psyche_invocation_gate`). Returns only when the caller is not resumed from here.
pub extern "sysv64" fn invocation_return_gate(id: u64, result: u64) -> i64 {
    trace::emit(TraceKind::GateEnter, Syscall::InvocationReturn as u32, 0, 0);
    let value = match invocation_return(id, result) {
        Ok(value) => value as i64,
        Err(error) => error.to_return(),
    };
    trace::emit(TraceKind::GateExit, Syscall::InvocationReturn as u32, value as u64, 0);
    value
}

/// RFLAGS of a handler's entry: interrupts on.
const USER_RFLAGS: u64 = 0x202;

/// Where an invocation enters its callee.
struct Target {
    callee: u32,
    handler: u64,
    top: u64,
    views: Views,
}

/// A protected invocation of operation `operation` of `callee` by the running domain, whose
/// thread resumes at `rip` with RSP = `rsp` when it completes. The path is counted in kernel
/// instructions (psyche-vmm bench): one lock, no structure copies. `checked` (from the gate,
/// which checked the caller's rights) is remembered in this depth's slot for the next call.
pub(crate) fn invoke(
    callee: u32,
    operation: u64,
    args: [u64; 4],
    rip: u64,
    rsp: u64,
    rflags: u64,
    checked: Option<Checked>,
) -> ! {
    let percpu = this_cpu();
    let depth = cpu::invocation_depth();
    if depth == MAX_NESTED_INVOCATIONS {
        refuse(rip, rsp, rflags, SysError::TableFull);
    }
    let (cpu, node) = (percpu.index, percpu.node);
    if let Some(home) = placement(callee, node) {
        place(callee, home, operation, args, rip, rsp, rflags);
    }
    // The callee's activation of this level on this CPU is set aside (`aside`): it serves this
    // one when it runs again, as a placed invocation, rather than on a stack in use.
    let held = {
        let kernel = kernel_lock();
        crate::aside::holds_callee(&kernel, cpu, callee, depth)
            .then(|| kernel.domain(callee).map_or(cpu, |d| d.home_cpu))
    };
    if let Some(home) = held {
        place(callee, home, operation, args, rip, rsp, rflags);
    }
    let (target, generation) = {
        let mut kernel = kernel_lock();
        let handler = kernel.domain(callee).map_or(0, |d| d.handler);
        // The level of this depth: an activation of the callee further out in this chain, or
        // one set aside here, has a stack of its own.
        let top = if handler != 0 { kernel.work_area(callee, cpu, depth + 1, node) } else { None };
        // Running on this CPU, the invocation needs no table entry (only a deferral makes one).
        let target = top.zip(kernel.views_here(callee)).map(|(top, views)| Target { callee, handler, top, views });
        (target, check_generation())
    };
    let Some(target) = target else { refuse(rip, rsp, rflags, SysError::NotFound) };
    // Remembered only without latency traps: then the views need no re-arming and no placement
    // decision is made, which lets the assembly path skip both. An empty slot sends the return
    // through the Rust path too (the caller's views looked up again, re-armed).
    let remember = match checked {
        Some(checked) if !crate::numa::traps() && checked.generation == generation => Remember::Fill(checked),
        _ => Remember::Nothing,
    };
    enter_callee(target, depth, remember, operation, args, rip, rsp, rflags)
}

/// What a depth's slot remembers for the next call from there, after this one.
enum Remember {
    /// What it did: this call is the one it remembered.
    Kept,
    /// This call's check.
    Fill(Checked),
    /// Nothing.
    Nothing,
}

/// Records the invocation as this CPU's innermost (made from `depth`: in that depth's slot,
/// which then remembers as `remember` says) and enters the callee's handler with it. Only a
/// slot that remembers a check (a non-zero count) lets the return take the assembly path.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn enter_callee(
    target: Target,
    depth: usize,
    remember: Remember,
    operation: u64,
    args: [u64; 4],
    rip: u64,
    rsp: u64,
    rflags: u64,
) -> ! {
    let percpu = this_cpu();
    let Target { callee, handler, top, views } = target;
    let caller = percpu.domain;
    let slot = cpu::slot(depth);
    match remember {
        Remember::Kept => {}
        Remember::Fill(checked) => {
            slot.realm = checked.realm;
            slot.operations = checked.operations;
            slot.callee_view = views.local;
            slot.entry = [handler, u64::from(USER_CS), USER_RFLAGS, top, u64::from(USER_DS)];
            CPUS_WITH_CHECKS[percpu.index as usize / 64].fetch_or(1 << (percpu.index % 64), Ordering::SeqCst);
            // Another CPU's `forget_checks` since the check may have missed what was just
            // written: then it is not remembered.
            if CHECK_GENERATION.load(Ordering::SeqCst) != checked.generation {
                // SAFETY: this CPU's own slot.
                unsafe { operations_word(slot).store(0, Ordering::SeqCst) };
            }
        }
        // SAFETY: this CPU's own slot.
        Remember::Nothing => unsafe { operations_word(slot).store(0, Ordering::SeqCst) },
    }
    slot.caller_state = percpu.state();
    slot.callee_state = u64::from(callee) | u64::from(callee) << 32;
    slot.caller_view = x86_64::registers::control::Cr3::read_raw().0.start_address().as_u64();
    slot.operation = operation;
    // A mark left by a late answer to an earlier invocation goes.
    let id = id_word(slot).load(Ordering::Acquire) & !ANSWERED;
    id_word(slot).store(id, Ordering::Release);
    // The caller's frame stays at this depth's place; the callee's entries start below it. Its
    // x87/SSE state waits in the depth's area (the callee starts with the initial one).
    cpu::write_gate_frame(depth, rip, rsp, rflags);
    // SAFETY: the depth's own area in this CPU's per-CPU area (set at boot, 16-byte aligned).
    unsafe { fpu::save(slot.fpu as *mut _) };
    cpu::set_invocation_depth(depth + 1);
    trace::emit(TraceKind::InvocationBegin, operation as u32, u64::from(callee), id);
    trace::emit(TraceKind::InvocationArrive, operation as u32, u64::from(callee), id);
    switch_to(callee, views);
    percpu.upcall_domain = callee;
    trace::emit(TraceKind::Upcall, Upcall::InvocationArrived as u32, u64::from(callee), id);
    let [a0, a1, a2, a3] = args;
    enter_upcall(handler, top, Upcall::InvocationArrived as u64, [id, operation, u64::from(caller), a0, a1, a2, a3])
}

/// Where a protected invocation of `callee` from a CPU of node `node` should run, if not
/// here: on the callee's own CPU, when the machine charges remote memory (a latency mode is on)
/// and that CPU is on another node. The callee's data (its root realm, and the realms it
/// creates, which default to its node) is then local to the operation.
fn placement(callee: u32, node: u32) -> Option<u32> {
    if !crate::numa::traps() {
        return None;
    }
    let home = kernel_lock().domain(callee).map(|d| d.home_cpu)?;
    let home_node = crate::boot_info().cpus.get(home as usize)?.node;
    (home_node != node).then_some(home)
}

/// Places a protected invocation on the callee's CPU `home`: the invocation is queued there as
/// an invocation-arrived upcall, and the caller's thread blocks as if the callee had deferred
/// it (a blocked upcall, or a wait in the kernel for a caller without upcalls).
fn place(callee: u32, home: u32, operation: u64, args: [u64; 4], rip: u64, rsp: u64, rflags: u64) -> ! {
    let percpu = this_cpu();
    let caller = percpu.domain;
    let caller_in_upcall = percpu.upcall_domain == caller;
    let (id, caller_handler, processor, master) = {
        let mut kernel = kernel_lock();
        let handler = kernel.domain(callee).map_or(0, |d| d.handler);
        if handler == 0 {
            drop(kernel);
            refuse(rip, rsp, rflags, SysError::NotFound);
        }
        let Some(id) = kernel.begin_invocation(caller, callee) else {
            drop(kernel);
            refuse(rip, rsp, rflags, SysError::TableFull)
        };
        if let Some(entry) = kernel.invocation(id) {
            entry.running = false;
            entry.operation = operation;
            entry.args = args;
        }
        let arrived = PendingUpcall { kind: Upcall::InvocationArrived as u64, args: [id, 0, 0] };
        if !kernel.queue_upcall(callee, arrived) {
            kernel.end_invocation(id);
            drop(kernel);
            refuse(rip, rsp, rflags, SysError::TableFull);
        }
        let (handler, processor) = kernel.domain(caller).map_or((0, 0), |d| (d.handler, d.processor_block));
        (id, handler, processor, cpu::master_view())
    };
    trace::emit(TraceKind::InvocationBegin, operation as u32, u64::from(callee), id);
    // The caller's thread, saved for its scheduler, resumes with the result (the completed
    // upcall); a caller without one waits here.
    let blocked = Registers { rip, rsp, rflags, ..Registers::default() };
    let thread = if caller_handler != 0 && !caller_in_upcall { save_thread(master, processor, &blocked) } else { None };
    if let Some(thread) = thread {
        if let Some(entry) = kernel_lock().invocation(id) {
            entry.thread = thread;
        }
    }
    notify(home);
    match thread {
        Some(thread) => deliver(caller, Upcall::Blocked, [thread, id, 0, 0, 0, 0, 0]),
        None => wait_for_completion(id, rip, rsp, rflags),
    }
}

/// The slot of the innermost invocation on this CPU, if it is `id` (answered from elsewhere or
/// not) and the running domain is its callee.
fn innermost(id: u64) -> Option<&'static mut InvocationSlot> {
    let depth = cpu::invocation_depth().checked_sub(1)?;
    let slot = cpu::slot(depth);
    if id_word(slot).load(Ordering::Acquire) & !ANSWERED != id || slot.callee() != this_cpu().domain {
        return None;
    }
    Some(slot)
}

/// Pops the innermost invocation on this CPU if it is `id`. Its slot's id moves on, so that a
/// late answer from elsewhere finds nothing; the rest, and its caller's frame, stay valid until
/// the kernel next leaves for CPL3.
fn pop_invocation(id: u64) -> Option<&'static InvocationSlot> {
    let slot = innermost(id)?;
    pop(slot, id);
    Some(slot)
}

/// Pops `slot`, the innermost, whose invocation is `id`.
pub(crate) fn pop(slot: &mut InvocationSlot, id: u64) {
    let depth = cpu::invocation_depth() - 1;
    // Past the ids used from this depth while the invocation was set aside, if it was.
    let next = (id + ID_STEP).max(this_cpu().fresh_ids[depth]);
    id_word(slot).store(next, Ordering::Release);
    cpu::set_invocation_depth(depth);
}

/// Switches back to the caller of `slot` (popped, invocation `id`) and resumes it with
/// RAX = `rax`.
fn return_to_caller(slot: &InvocationSlot, id: u64, rax: u64) -> ! {
    let (caller, callee, operation) = (slot.caller(), slot.callee(), slot.operation);
    let caller_in_upcall = slot.caller_in_upcall();
    // Popped: the slot's frame is at the depth this CPU is back at.
    let (rip, rsp, rflags) = cpu::gate_frame_at(cpu::invocation_depth());
    trace::emit(TraceKind::InvocationEnd, operation as u32, u64::from(callee), id);
    let Some(views) = kernel_lock().views_here(caller) else {
        // The caller is gone: the callee's handler has nothing to return to, and the callee
        // goes on (elsewhere); this CPU goes on with whoever waits below.
        unwind(SysError::NotFound)
    };
    switch_to(caller, views);
    this_cpu().upcall_domain = if caller_in_upcall { caller } else { NONE };
    // SAFETY: the area `enter_callee` saved the caller's state in; the callee's goes.
    unsafe { fpu::load(slot.fpu as *const _) };
    return_to_user(rip, rsp, rflags, rax)
}

/// Ends the invocations this CPU runs, innermost first, until one whose caller is alive: that
/// caller resumes with `error`. Without one, this CPU leaves the domain it runs and waits for
/// work. No domain ends here: a callee whose caller went away (or the domain whose end
/// started this) only stops serving it on this CPU.
pub(crate) fn unwind(error: SysError) -> ! {
    while let Some(depth) = cpu::invocation_depth().checked_sub(1) {
        let slot = cpu::slot(depth);
        let id = id_word(slot).load(Ordering::Acquire) & !ANSWERED;
        let (caller, callee, caller_in_upcall) = (slot.caller(), slot.callee(), slot.caller_in_upcall());
        pop(slot, id);
        trace::emit(TraceKind::InvocationEnd, slot.operation as u32, u64::from(callee), id);
        // A running invocation has no table entry (`invoke`). (A statement of its own: the
        // lock must not live into the block, which does not return.)
        let caller_views = kernel_lock().views_here(caller);
        if let Some(views) = caller_views {
            let (rip, rsp, rflags) = cpu::gate_frame_at(depth);
            switch_to(caller, views);
            this_cpu().upcall_domain = if caller_in_upcall { caller } else { NONE };
            // SAFETY: as in `return_to_caller`.
            unsafe { fpu::load(slot.fpu as *const _) };
            return_to_user(rip, rsp, rflags, error.to_return() as u64)
        }
    }
    crate::leave_domain()
}

/// `Syscall::InvocationReturn`.
pub fn invocation_return(id: u64, result: u64) -> Result<u64, SysError> {
    if let Some(slot) = pop_invocation(id) {
        return_to_caller(slot, id, result);
    }
    // Not the one this CPU runs: a deferred one (its caller waits elsewhere), or one still
    // running on its caller's CPU that a server thread answered before it was deferred.
    complete(this_cpu().domain, id, result)
}

/// Under the kernel lock: answers invocation `id`, which `domain` serves, if it still runs (not
/// deferred yet) on its caller's CPU. The result waits in its slot for the deferral (as a table
/// entry's would); if the handler answers first, its answer wins.
fn answer_running(kernel: &mut crate::domains::Kernel, domain: u32, id: u64, result: u64) -> bool {
    if id & PER_CPU_ID == 0 || id & ANSWERED != 0 {
        return false;
    }
    let depth = ((id >> 16) & 0xF) as usize;
    let Some(block) = cpu::cpu_block((id & 0xFFFF) as usize).filter(|_| depth < MAX_NESTED_INVOCATIONS) else {
        return false;
    };
    // Only a running invocation: a slot's id is the next one's while none runs. One set aside
    // at a slice's end keeps its answer in its record.
    let area = block as u64 - cpu::PERCPU_OFFSET;
    let slot = cpu::slot_of(block, depth as isize);
    let word = id_word(slot);
    if cpu::invocation_depth_of(area) <= depth || word.load(Ordering::Acquire) != id {
        return crate::aside::answer(kernel, (id & 0xFFFF) as u32, depth, id, domain, result);
    }
    // SAFETY: another CPU's slot, alive for the machine's lifetime. Its owner writes the answer's
    // fields only while the id is not this one; it reads `answer` only after seeing `ANSWERED`,
    // under the kernel lock we hold.
    let callee = unsafe { core::ptr::addr_of!((*slot).callee_state).read_volatile() } as u32;
    if callee != domain {
        return false;
    }
    // SAFETY: as above.
    unsafe { core::ptr::addr_of_mut!((*slot).answer).write_volatile(result) };
    word.compare_exchange(id, id | ANSWERED, Ordering::AcqRel, Ordering::Acquire).is_ok()
}

/// Completes invocation `id`, which `domain` serves and does not run on this CPU, with `result`.
fn complete(domain: u32, id: u64, result: u64) -> Result<u64, SysError> {
    let mut kernel = kernel_lock();
    let Some(entry) = kernel.invocation(id).filter(|e| e.callee == domain && e.result.is_none()) else {
        return if answer_running(&mut kernel, domain, id, result) { Ok(0) } else { Err(SysError::NotFound) };
    };
    entry.result = Some(result);
    // Fields, not the entry: a structure copy is a `rep movs`, emulated per byte at CPL0.
    let (running, caller, thread, waiter) = (entry.running, entry.caller, entry.thread, entry.waiter);
    if running {
        // The deferral will find the result and return it at once.
        return Ok(0);
    }
    let Some((caller_view, caller_home)) = kernel.domain(caller).map(|d| (d.view.pml4, d.home_cpu)) else {
        kernel.end_invocation(id);
        return Ok(0);
    };
    trace::emit(TraceKind::InvocationEnd, 0, u64::from(domain), id);
    if thread == 0 {
        // The caller waits in the kernel, on the CPU it invoked from.
        drop(kernel);
        notify(waiter);
        return Ok(0);
    }
    // The caller's thread was saved for its scheduler: put the result in its RAX and tell the
    // scheduler.
    if let Some(context) = user_object::<ContextBlock>(caller_view, thread) {
        // SAFETY: a user page of the caller's view, checked by `user_object`.
        unsafe { core::ptr::addr_of_mut!((*context).registers.rax).write_volatile(result) };
    }
    kernel.end_invocation(id);
    let upcall = PendingUpcall { kind: Upcall::Completed as u64, args: [thread, id, result] };
    if !kernel.queue_upcall(caller, upcall) {
        return Err(SysError::TableFull);
    }
    drop(kernel);
    notify(caller_home);
    Ok(0)
}

/// Protection domain `domain` has ended: the invocations it had deferred, or that were placed on
/// its processor and not yet answered, complete with an error for their callers.
pub fn abandon_invocations(domain: u32) {
    // The ids first, in one pass under the lock; `complete` takes it again for each.
    let mut ids = [0u64; crate::domains::MAX_DEFERRED];
    let mut count = 0;
    for entry in kernel_lock().deferred.iter() {
        if entry.id != 0 && entry.callee == domain && entry.result.is_none() && !entry.running {
            ids[count] = entry.id;
            count += 1;
        }
    }
    let error = SysError::NotFound.to_return() as u64;
    for &id in &ids[..count] {
        // As if the callee had answered: the caller resumes (or hears) with the error.
        let _ = complete(domain, id, error);
    }
}

/// `Syscall::InvocationDefer`: the callee completes `id` later; the caller's domain gets this
/// processor back. The invocation enters the kernel's table only now.
pub fn invocation_defer(id: u64) -> Result<u64, SysError> {
    let Some(slot) = innermost(id) else { return Err(SysError::NotFound) };
    let (caller, callee) = (slot.caller(), slot.callee());
    let caller_in_upcall = slot.caller_in_upcall();
    // The innermost invocation: its frame is one depth up.
    let (rip, rsp, rflags) = cpu::gate_frame_at(cpu::invocation_depth() - 1);
    let target = {
        let mut kernel = kernel_lock();
        let views = kernel.views_here(caller);
        kernel.domain(caller).zip(views).map(|(d, views)| (views, d.handler, d.processor_block))
    };
    let Some((caller_views, caller_handler, caller_processor)) = target else {
        // The caller is gone: nothing to defer for (see `return_to_caller`).
        pop_invocation(id);
        unwind(SysError::NotFound)
    };
    // The caller's x87/SSE state comes back (the callee's handler ends here), to be saved with
    // its thread or kept while it waits; the callee's is kept aside in case the deferral fails
    // and its handler goes on.
    let mut callee_fpu = core::mem::MaybeUninit::<psyche_abi::upcall::FpuImage>::uninit();
    // SAFETY: a 16-byte aligned image on this stack, and the area `enter_callee` saved the
    // caller's state in.
    unsafe {
        fpu::save(callee_fpu.as_mut_ptr());
        fpu::load(slot.fpu as *const _);
    }
    let blocked = Registers { rip, rsp, rflags, ..Registers::default() };
    let thread = if caller_handler != 0 { save_thread(caller_views.master, caller_processor, &blocked) } else { None };
    {
        let mut kernel = kernel_lock();
        // Answered from elsewhere already (`answer_running` marks the slot under this lock)?
        if id_word(slot).load(Ordering::Acquire) & ANSWERED != 0 {
            let answer = slot.answer;
            drop(kernel);
            let Some(slot) = pop_invocation(id) else { return Err(SysError::NotFound) };
            return_to_caller(slot, id, answer);
        }
        let waiting = if caller_in_upcall { 0 } else { thread.unwrap_or(0) };
        if !kernel.defer_invocation(id, caller, callee, waiting) {
            // Still this CPU's: the handler may answer it itself, with its own x87/SSE state.
            // SAFETY: saved just above, by the kernel.
            unsafe { fpu::load(callee_fpu.as_ptr()) };
            return Err(SysError::TableFull);
        }
        // From here the table answers for it (cleared under the lock, so no answer is lost).
        pop_invocation(id);
    }
    switch_to(caller, caller_views);
    this_cpu().upcall_domain = if caller_in_upcall { caller } else { NONE };
    match thread {
        Some(thread) if !caller_in_upcall => deliver(caller, Upcall::Blocked, [thread, id, 0, 0, 0, 0, 0]),
        _ => wait_for_completion(id, rip, rsp, rflags),
    }
}

/// The caller takes no upcalls (or called from its handler, or from inside an invocation): wait
/// here for the result of invocation `id`, then resume at `rip` with RSP = `rsp`. A caller that
/// waits lets the other domains of the processor run meanwhile (as an idle one does): it has
/// nothing to run until the result comes, the one that answers may need this very processor,
/// and a result that never comes must not keep the processor from the others
/// (`sched::wait_elsewhere`).
pub(crate) fn wait_for_completion(id: u64, rip: u64, rsp: u64, rflags: u64) -> ! {
    loop {
        let result = {
            let mut kernel = kernel_lock();
            let done = kernel.invocation(id).and_then(|e| e.result);
            if done.is_some() {
                kernel.end_invocation(id);
            }
            done
        };
        if let Some(result) = result {
            return_to_user(rip, rsp, rflags, result);
        }
        if crate::sched::shared(this_cpu().index) {
            // Returns when nothing else can run here: wait here after all.
            crate::sched::wait_elsewhere(id, Registers { rip, rsp, rflags, ..Registers::default() });
        }
        cpu::wait_for_interrupt();
    }
}

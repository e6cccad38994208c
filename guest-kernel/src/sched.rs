//! Time-slicing of protection domains on each processor.
//!
//! Program k's domain lives on CPU k mod (CPUs). A CPU with several domains gives them equal
//! time slices of [`DOMAIN_QUANTUM_US`], round robin, skipping domains that idle with nothing
//! waiting for them. A preempted domain's registers are kept by the kernel; when it gets the
//! processor back, a domain with an upcall handler hears about it through a time-limit upcall
//! (its preempted thread saved in its context block: "an upcall at each quantum boundary"),
//! and one without a handler simply continues.
//!
//! Inside protected invocations or its upcall handler a domain's time runs on past its slice,
//! as a procedure call's would, for one more quantum; then what it runs there is set aside
//! (`aside`: the frames and records of the invocations belong to the processor) and taken back
//! when it runs again. So no domain keeps a shared processor more than two quanta and a timer
//! period at a time. A domain waiting in the kernel for a deferred invocation's result gives
//! the processor up until the result is there, as an idle one does, wherever it waits from
//! (`wait_elsewhere`).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use psyche_abi::syscall::SysError;
use psyche_abi::trace::TraceKind;
use psyche_abi::upcall::{FpuImage, Registers, Upcall};
use psyche_abi::{MAX_CPUS, MAX_PROGRAMS};
use psyche_kernel::realms::MAX_DOMAINS;
use psyche_kernel::sync::SpinLock;

use crate::arch::x86_64::cpu::{self, this_cpu};
use crate::arch::x86_64::entry::resume_user;
use crate::arch::x86_64::{fpu, lapic};
use crate::domains::Preempted;
use crate::{kernel_lock, trace, upcalls};

/// Length of a domain's time slice on a shared processor.
pub const DOMAIN_QUANTUM_US: u64 = 10_000;

const NONE: u32 = u32::MAX;

/// Per CPU, the programs (domains) it runs, in order.
static RUN_LISTS: [[AtomicU32; MAX_PROGRAMS]; MAX_CPUS] =
    [const { [const { AtomicU32::new(NONE) }; MAX_PROGRAMS] }; MAX_CPUS];
static RUN_COUNTS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// Programs whose domain exists (started) and that have ended.
static STARTED: [AtomicBool; MAX_PROGRAMS] = [const { AtomicBool::new(false) }; MAX_PROGRAMS];
static ENDED: [AtomicBool; MAX_PROGRAMS] = [const { AtomicBool::new(false) }; MAX_PROGRAMS];
/// TSC at the start of each CPU's current domain slice.
static SLICE_START: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// The period each CPU's timer runs at (0: not running).
static TIMER_PERIOD_US: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// The x87/SSE state of each domain whose processor another took (`Domain::preempted`), kept by
/// the kernel beside the registers there (in a table of its own: a structure copy of the domain
/// is a byte loop at emulated CPL0).
struct PreemptedFpu(UnsafeCell<[FpuImage; MAX_DOMAINS]>);

// SAFETY: a domain's image is written by the CPU that sets the domain aside, before it stores
// `Domain::preempted` under the kernel lock, and read by the one CPU that takes `preempted`
// back under the lock; a domain runs on one CPU at a time.
unsafe impl Sync for PreemptedFpu {}

static PREEMPTED_FPU: PreemptedFpu = PreemptedFpu(UnsafeCell::new([FpuImage::INITIAL; MAX_DOMAINS]));

/// Saves the live x87/SSE state as `domain`'s: the domain is being set aside
/// (`Domain::preempted`), and this is its state.
pub fn save_fpu(domain: u32) {
    if (domain as usize) < MAX_DOMAINS {
        // SAFETY: see `PreemptedFpu`; in bounds, 16-byte aligned.
        unsafe { fpu::save((PREEMPTED_FPU.0.get() as *mut FpuImage).add(domain as usize)) };
    }
}

/// Loads the state [`save_fpu`] kept for `domain`.
fn load_fpu(domain: u32) {
    if (domain as usize) < MAX_DOMAINS {
        // SAFETY: see `PreemptedFpu`: written by the kernel only.
        unsafe { fpu::load((PREEMPTED_FPU.0.get() as *const FpuImage).add(domain as usize)) };
    }
}

/// Gives program k to CPU k mod `cpus` (called by the bootstrap processor before any program
/// starts).
pub fn assign(programs: usize, cpus: usize) {
    for program in 0..programs.min(MAX_PROGRAMS) {
        let cpu = program % cpus.max(1);
        let slot = RUN_COUNTS[cpu].fetch_add(1, Ordering::AcqRel) as usize;
        RUN_LISTS[cpu][slot].store(program as u32, Ordering::Release);
    }
}

/// Serialises changes to the run lists after boot (a domain moving to another CPU). Each CPU
/// reads only its own list, without the lock.
static MOVES: SpinLock<()> = SpinLock::new(());

/// `Syscall::MoveToCpu`: the running domain continues on CPU `to`, where the call returns 0 at
/// `rip` with `rsp` and `rflags` (realm-sdk's wrapper treats every other register as clobbered).
/// Only a domain running its own program, outside its upcall handler and any invocation, can
/// move. Does not return on success.
pub fn move_to(to: u32, rip: u64, rsp: u64, rflags: u64) -> Result<u64, SysError> {
    let percpu = this_cpu();
    let (cpu, domain) = (percpu.index, percpu.domain);
    let info = crate::boot_info();
    if to >= info.cpu_count {
        return Err(SysError::InvalidArgument);
    }
    if to == cpu {
        return Ok(0);
    }
    if percpu.program != domain || crate::arch::x86_64::cpu::invocation_depth() != 0 || percpu.upcall_domain == domain {
        return Err(SysError::Busy);
    }
    {
        let _moving = MOVES.lock();
        let (mine, count) = (&RUN_LISTS[cpu as usize], RUN_COUNTS[cpu as usize].load(Ordering::Acquire) as usize);
        let Some(at) = (0..count).find(|&i| mine[i].load(Ordering::Acquire) == domain) else {
            return Err(SysError::Busy);
        };
        for i in at..count - 1 {
            mine[i].store(mine[i + 1].load(Ordering::Acquire), Ordering::Release);
        }
        mine[count - 1].store(NONE, Ordering::Release);
        RUN_COUNTS[cpu as usize].store(count as u32 - 1, Ordering::Release);
        let slot = RUN_COUNTS[to as usize].fetch_add(1, Ordering::AcqRel) as usize;
        RUN_LISTS[to as usize][slot].store(domain, Ordering::Release);
    }
    save_fpu(domain);
    {
        let mut kernel = kernel_lock();
        let d = kernel.domain_mut(domain).ok_or(SysError::NotFound)?;
        d.home_cpu = to;
        // Placement depends on the home CPU.
        crate::upcalls::forget_checks();
        let registers = Registers { rip, rsp, rflags, ..Registers::default() };
        d.preempted = Some(Preempted { registers, waiting_for: 0, aside: false });
    }
    trace::emit(TraceKind::DomainSwitch, 1, u64::from(domain), u64::from(to));
    // The upcall IPI: an idle CPU wakes and finds the domain; a busy one starts slicing.
    lapic::send_ipi(info.cpus[to as usize].apic_id, cpu::UPCALL_VECTOR);
    percpu.program = NONE;
    crate::leave_domain()
}

/// Runs this CPU's timer at quantum boundaries if it needs them: it time-slices several
/// domains (perhaps since one moved here: `move_to`), or latency windows close at each one.
pub fn tick_if_needed() {
    if shared(this_cpu().index) || crate::numa::windowed() {
        timer_at_most(DOMAIN_QUANTUM_US, crate::lapic_hz());
    }
}

/// Whether `cpu` runs several domains (and so time-slices them).
pub fn shared(cpu: u32) -> bool {
    RUN_COUNTS.get(cpu as usize).is_some_and(|count| count.load(Ordering::Acquire) > 1)
}

/// Program `program` has ended: never run it again.
pub fn ended(program: u32) {
    if let Some(flag) = ENDED.get(program as usize) {
        flag.store(true, Ordering::Release);
    }
}

/// Runs the timer of this CPU at least every `period_us` (it keeps the shortest asked for).
pub fn timer_at_most(period_us: u64, lapic_hz: u64) {
    let cpu = this_cpu().index as usize;
    let current = TIMER_PERIOD_US[cpu].load(Ordering::Acquire);
    if lapic_hz == 0 || period_us == 0 || (current != 0 && current <= period_us) {
        return;
    }
    TIMER_PERIOD_US[cpu].store(period_us, Ordering::Release);
    lapic::arm_periodic(cpu::TIMER_VECTOR, (lapic_hz * period_us / 1_000_000).clamp(1, u64::from(u32::MAX)) as u32);
}

/// The next domain on this CPU after `after` (round robin) that can run: not started yet,
/// preempted, or idle with an upcall waiting.
fn next_runnable(after: u32) -> Option<u32> {
    let cpu = this_cpu().index as usize;
    let count = RUN_COUNTS[cpu].load(Ordering::Acquire) as usize;
    let position = (0..count).find(|&i| RUN_LISTS[cpu][i].load(Ordering::Acquire) == after).map_or(count, |i| i + 1);
    (0..count).map(|step| RUN_LISTS[cpu][(position + step) % count].load(Ordering::Acquire)).find(|&program| {
        let index = program as usize;
        if program == NONE || program == after {
            return false;
        }
        if ENDED[index].load(Ordering::Acquire) {
            // Its invocations set aside here run on, for their callees, to their returns (once
            // the result the innermost waits for in the kernel, if any, is there).
            let mut kernel = kernel_lock();
            return crate::aside::waiting_here(&kernel, program).is_some_and(|waiting_for| {
                waiting_for == 0 || kernel.invocation(waiting_for).is_none_or(|entry| entry.result.is_some())
            });
        }
        if !STARTED[index].load(Ordering::Acquire) {
            return true;
        }
        let mut kernel = kernel_lock();
        match kernel.domain(program).map(|d| (d.preempted.map(|p| p.waiting_for), d.idle && d.pending_count > 0)) {
            // Waiting in the kernel for a deferred invocation: once its result is there.
            Some((Some(waiting_for), _)) if waiting_for != 0 => {
                kernel.invocation(waiting_for).is_none_or(|entry| entry.result.is_some())
            }
            Some((preempted, idle_with_upcall)) => preempted.is_some() || idle_with_upcall,
            None => false,
        }
    })
}

/// A timer tick interrupted CPL3 on a shared CPU: when the slice is over and another domain can
/// run, the running one is preempted (this does not return); otherwise it continues.
pub fn tick(registers: &Registers, tsc_khz: u64) {
    let percpu = this_cpu();
    let cpu = percpu.index as usize;
    if !shared(percpu.index) {
        return;
    }
    let now = cpu::rdtsc();
    let start = SLICE_START[cpu].load(Ordering::Acquire);
    if now.saturating_sub(start) < tsc_khz.max(1) * DOMAIN_QUANTUM_US / 1000 {
        return;
    }
    // Inside protected invocations or an upcall handler, a program's own time runs on, as a
    // procedure call's would, for up to one more quantum; then its invocations (or its
    // handler) are set aside (`aside`), so that no domain keeps a shared processor more than
    // two quanta and a tick period at a time.
    let (domain, inside) = slice_owner();
    if inside && now.saturating_sub(start) < 2 * tsc_khz.max(1) * DOMAIN_QUANTUM_US / 1000 {
        return;
    }
    let Some(next) = next_runnable(domain) else {
        SLICE_START[cpu].store(now, Ordering::Release);
        return;
    };
    hand_over(domain, inside, registers, 0, next)
}

/// The domain whose slice this CPU runs (the one at invocation depth 0), and whether what runs
/// now is inside its invocations or its upcall handler.
fn slice_owner() -> (u32, bool) {
    let percpu = this_cpu();
    let depth = cpu::invocation_depth();
    let inside = depth != 0 || percpu.upcall_domain == percpu.domain;
    (if depth == 0 { percpu.domain } else { cpu::slot(0).caller() }, inside)
}

/// Gives this CPU to `next`, keeping what `domain` (the slice's owner) runs here to be taken up
/// again: its registers (the innermost activation's: `registers`, waiting in the kernel for
/// invocation `waiting_for`'s result if that is not 0) and x87/SSE state, and, `inside`
/// invocations or its handler, everything `aside` keeps.
fn hand_over(domain: u32, inside: bool, registers: &Registers, waiting_for: u64, next: u32) -> ! {
    save_fpu(domain);
    {
        let mut kernel = kernel_lock();
        if inside {
            crate::aside::set_aside(&mut kernel, domain, registers, waiting_for);
        }
        if let Some(d) = kernel.domain_mut(domain) {
            d.preempted = Some(Preempted { registers: *registers, waiting_for, aside: inside });
        }
    }
    run(next)
}

/// The running domain waits in the kernel for the result of invocation `id`, to resume with
/// `registers` (RIP, RSP, RFLAGS): another domain of this CPU runs meanwhile, if one can;
/// returns if none can. At depth 0 outside its handler the domain is simply preempted; inside its handler or
/// inside invocations, what it runs here is set aside (`aside`), as at a slice's end. It runs
/// again once the result is there (`next_runnable`).
pub fn wait_elsewhere(id: u64, registers: Registers) {
    let (root, inside) = slice_owner();
    if let Some(next) = next_runnable(root) {
        hand_over(root, inside, &registers, id, next)
    }
}

/// Runs `program`'s activations again where its slice ended, inside invocations or its upcall
/// handler (`aside`), also after `program` itself ended: its callees finish what they were doing
/// and return to nobody, as when a caller ends during its call elsewhere (`upcalls::unwind`).
fn take_back(program: u32) -> ! {
    // The chain's gate frames go back to their places at the top of the kernel stack, where the
    // kernel may be running now.
    cpu::below_gate_frames_run(take_back_here, u64::from(program))
}

extern "sysv64" fn take_back_here(program: u64) -> ! {
    let program = program as u32;
    let back = {
        let mut kernel = kernel_lock();
        crate::aside::take_back(&mut kernel, program).map(|back| {
            let alive = kernel.domain(back.innermost).is_some();
            let views = kernel.views_here(back.innermost).filter(|_| alive);
            (back, views)
        })
    };
    let Some((back, views)) = back else { crate::idle() };
    // The innermost activation's x87/SSE state, kept with the root's (`tick`).
    load_fpu(program);
    this_cpu().program = program;
    match views {
        Some(views) => {
            upcalls::switch_to(back.innermost, views);
            this_cpu().upcall_domain = if back.in_handler { back.innermost } else { NONE };
            let r = &back.registers;
            if back.waiting_for != 0 {
                // It was waiting in the kernel for this invocation's result (`wait_elsewhere`).
                upcalls::wait_for_completion(back.waiting_for, r.rip, r.rsp, r.rflags)
            }
            resume_user(r)
        }
        // The innermost domain ended meanwhile: its callers get an error, innermost first.
        None => {
            this_cpu().domain = back.innermost;
            upcalls::unwind(SysError::NotFound)
        }
    }
}

/// This CPU has nothing to run for `after` (idle, waiting, or its program ended): run another
/// domain if one can run. Returns if none can.
pub fn switch_from(after: u32) {
    if let Some(next) = next_runnable(after) {
        run(next);
    }
}

/// Gives this CPU to `program`'s domain.
fn run(program: u32) -> ! {
    let percpu = this_cpu();
    SLICE_START[percpu.index as usize].store(cpu::rdtsc(), Ordering::Release);
    tick_if_needed();
    if !STARTED[program as usize].swap(true, Ordering::AcqRel) {
        crate::start_program(crate::boot_info(), program as usize);
    }
    let state = {
        let mut kernel = kernel_lock();
        let views = kernel.views_here(program);
        kernel.domain_mut(program).zip(views).map(|(d, views)| {
            d.idle = false;
            (views, d.handler, d.processor_block, d.preempted.take())
        })
    };
    let Some((views, handler, processor, preempted)) = state else {
        // Ended: what it had set aside here still runs for its callees.
        take_back(program)
    };
    let pml4 = views.master;
    upcalls::switch_to(program, views);
    if preempted.is_some() {
        // Its own x87/SSE state, as it was set aside (whatever ran here since goes).
        load_fpu(program);
    }
    percpu.program = program;
    percpu.upcall_domain = NONE;
    match preempted {
        Some(Preempted { aside: true, .. }) => take_back(program),
        Some(Preempted { registers, waiting_for, .. }) if waiting_for != 0 => {
            upcalls::wait_for_completion(waiting_for, registers.rip, registers.rsp, registers.rflags)
        }
        Some(Preempted { registers, .. }) if handler != 0 => {
            // Preempted inside its thread package's critical section (a thread switch half
            // done): finish it first; the package yields when it leaves the section.
            if upcalls::defer_if_critical(pml4, processor) {
                resume_user(&registers);
            }
            // The domain's scheduler hears that its thread's time ran out.
            match upcalls::save_thread(pml4, processor, &registers) {
                Some(thread) => upcalls::deliver(program, Upcall::TimeLimit, [thread, 0, 0, 0, 0, 0, 0]),
                None => resume_user(&registers),
            }
        }
        Some(Preempted { registers, .. }) => resume_user(&registers),
        None => upcalls::idle(),
    }
}

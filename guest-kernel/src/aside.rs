//! Setting a processor's protected invocations aside, so that no domain keeps a shared
//! processor beyond a bound: a time slice that ends while invocations run on the CPU, or while
//! a domain's upcall handler runs there, takes the CPU away all the same, one quantum later
//! (`sched::tick`).
//!
//! What belongs to the CPU rather than to any domain is what a running chain of invocations
//! keeps there: the depth (TSS.RSP0), each depth's gate frame on the kernel stack (where the
//! caller resumes), each depth's slot (its record: caller, callee, views, id) and each depth's
//! x87/SSE area (the caller's state, which the next chain's callers would overwrite). Setting
//! the chain aside copies these (words one by one, x87/SSE images through the FPU itself) into
//! a record of the chain's root domain (the one at depth 0, whose slice it was) and leaves the CPU at depth 0
//! with fresh ids and no remembered checks; taking it back copies them home. The registers of
//! the innermost activation and its x87/SSE state go where any preempted domain's go
//! (`Domain::preempted`, `sched`).
//!
//! A set-aside activation still owns its work area (`UPCALL_LEVELS`): an invocation that would
//! start the same callee on the same CPU at the same level is placed instead (queued for the
//! callee, the caller blocked as in a deferral), and checks remembered in the slots are
//! forgotten here so that every such call takes the Rust path, which asks [`holds_area`]. A
//! server thread answering an invocation of a set-aside chain from another CPU finds it here
//! ([`answer`]), as it would find a running one in its slot.
//!
//! A domain set aside inside its upcall handler (at depth 0) keeps only `upcall_domain`: its
//! handler's level-0 area is its own, and nothing else enters it there until it runs again.

use core::cell::UnsafeCell;

use psyche_abi::upcall::{FpuImage, Registers};
use psyche_abi::MAX_PROGRAMS;

use crate::arch::x86_64::cpu::{self, this_cpu, InvocationSlot, MAX_NESTED_INVOCATIONS};
use crate::arch::x86_64::fpu;

/// Words of a slot.
const SLOT_WORDS: usize = core::mem::size_of::<InvocationSlot>() / 8;

/// A chain (or a handler) set aside, in its root domain's record.
struct Record {
    /// Whether it holds something (the rest is valid).
    active: bool,
    /// The CPU it was set aside on, the only one it can be taken back on.
    cpu: u32,
    /// Its invocation depth.
    depth: usize,
    /// `PerCpu::state()` when it was set aside: the innermost domain and whether its handler
    /// was running.
    state: u64,
    /// The innermost activation's registers (kept here, not only in the root's
    /// `Domain::preempted`: the root may end while its chain is aside, and the chain must still
    /// run on for its callees, which may hold their own locks halfway through an operation).
    registers: Registers,
    /// The invocation whose result the innermost activation waits for in the kernel (0: it was
    /// running at CPL3): `sched::wait_elsewhere`.
    waiting_for: u64,
    /// Each depth's gate frame as RIP, RSP and RFLAGS (CS and SS are the user selectors).
    frames: [(u64, u64, u64); MAX_NESTED_INVOCATIONS],
    slots: [InvocationSlot; MAX_NESTED_INVOCATIONS],
    /// Each depth's caller's x87/SSE state, from the CPU's area of that depth.
    fpu: [FpuImage; MAX_NESTED_INVOCATIONS],
}

/// One record per program: only a program's domain has slices, so only it roots a chain.
struct Records(UnsafeCell<[Record; MAX_PROGRAMS]>);

// SAFETY: every access is under the kernel lock (the callers hold it: see each function).
unsafe impl Sync for Records {}

static RECORDS: Records = Records(UnsafeCell::new(
    [const {
        Record {
            active: false,
            cpu: 0,
            depth: 0,
            state: 0,
            registers: Registers::ZERO,
            waiting_for: 0,
            frames: [(0, 0, 0); MAX_NESTED_INVOCATIONS],
            slots: [InvocationSlot::EMPTY; MAX_NESTED_INVOCATIONS],
            fpu: [FpuImage::INITIAL; MAX_NESTED_INVOCATIONS],
        }
    }; MAX_PROGRAMS],
));

/// The record of `root`.
///
/// # Safety
/// The caller holds the kernel lock (the `&mut Kernel` of the public functions proves it) and
/// keeps no other reference to the same record.
unsafe fn record(root: u32) -> Option<&'static mut Record> {
    // SAFETY: per the caller.
    unsafe { (*RECORDS.0.get()).get_mut(root as usize) }
}

/// Copies `words` words from `from` to `to` one by one: a structure copy is a `rep movsb` at
/// CPL0, emulated per byte on our hosts.
///
/// # Safety
/// Both must be valid for `words` words and not overlap.
unsafe fn copy_words(to: *mut u64, from: *const u64, words: usize) {
    for i in 0..words {
        // SAFETY: per the caller; volatile so that the loop stays a loop of moves.
        unsafe { to.add(i).write_volatile(from.add(i).read_volatile()) };
    }
}

/// Copies the x87/SSE image at `from` to `to` through the FPU (`fxrstor`, `fxsave`: two
/// instructions where a copy is 64 words), which leaves the live state changed.
///
/// # Safety
/// Both are 16-byte aligned images in kernel memory; `from` was written by `fxsave`.
unsafe fn copy_fpu(to: *mut FpuImage, from: *const FpuImage) {
    // SAFETY: per the caller.
    unsafe {
        fpu::load(from);
        fpu::save(to);
    }
}

/// Sets aside what this CPU runs for `root` (its invocations, or its handler): the CPU is left
/// at depth 0, with fresh slot ids and no remembered checks. The caller has saved the innermost
/// activation's x87/SSE state already (`sched::save_fpu`: the FPU is used here to copy the
/// callers' states), and saves its registers as `root`'s preemption, then runs another domain.
pub fn set_aside(_kernel: &mut crate::domains::Kernel, root: u32, registers: &Registers, waiting_for: u64) {
    let percpu = this_cpu();
    let depth = cpu::invocation_depth();
    // SAFETY: the kernel lock is held (`_kernel`).
    let Some(record) = (unsafe { record(root) }) else { return };
    record.active = true;
    record.cpu = percpu.index;
    record.depth = depth;
    record.state = percpu.state();
    record.waiting_for = waiting_for;
    // SAFETY: 18 words each.
    unsafe {
        copy_words(
            &mut record.registers as *mut _ as *mut u64,
            registers as *const _ as *const u64,
            core::mem::size_of::<Registers>() / 8,
        )
    };
    for d in 0..depth {
        record.frames[d] = cpu::gate_frame_at(d);
        let slot = cpu::slot(d);
        // SAFETY: a slot of this CPU and a record slot, 16 words each; the slot's x87/SSE area
        // (set at boot) holds what `enter_callee` or the assembly call saved there.
        unsafe {
            copy_words(&mut record.slots[d] as *mut _ as *mut u64, slot as *const _ as *const u64, SLOT_WORDS);
            copy_fpu(&mut record.fpu[d], slot.fpu as *const FpuImage);
        }
        // The CPU's slot moves on to a fresh id: the set-aside invocation keeps its own, and
        // a late answer to it finds it here (`answer`), not in the slot.
        let id = record.slots[d].id & !crate::upcalls::ANSWERED;
        crate::upcalls::set_slot_id(slot, id + crate::upcalls::ID_STEP);
    }
    // Every call from here on is checked in full, so that none starts a set-aside activation's
    // callee on its work area (`holds_area`).
    crate::upcalls::forget_checks_here();
    cpu::set_invocation_depth(0);
    // Not a domain's upcall handler any more: the CPU is between domains.
    percpu.upcall_domain = u32::MAX;
}

/// If `root` (alive or ended) has something set aside on this CPU: the invocation whose result
/// it waits for in the kernel (0: none).
pub fn waiting_here(_kernel: &crate::domains::Kernel, root: u32) -> Option<u64> {
    // SAFETY: the kernel lock is held (`_kernel`); a shared look.
    unsafe { record(root) }.filter(|r| r.active && r.cpu == this_cpu().index).map(|r| r.waiting_for)
}

/// What [`take_back`] restores: the innermost domain, whether its handler runs, and its
/// registers.
pub struct Back {
    pub innermost: u32,
    pub in_handler: bool,
    pub registers: Registers,
    /// The invocation it waits for in the kernel (0: none).
    pub waiting_for: u64,
}

/// Takes back what [`set_aside`] kept for `root` on this CPU (at depth 0): the depth, frames,
/// slots and the callers' x87/SSE states come home (the FPU is used to copy them: the caller
/// loads the innermost state afterwards), and the innermost domain and its handler state are
/// running again. The slots' checks stay forgotten, so that
/// their returns take the Rust path, which moves each slot's id past every id used meanwhile.
pub fn take_back(_kernel: &mut crate::domains::Kernel, root: u32) -> Option<Back> {
    let percpu = this_cpu();
    // SAFETY: the kernel lock is held (`_kernel`).
    let record = unsafe { record(root) }.filter(|r| r.active && r.cpu == percpu.index)?;
    record.active = false;
    for d in 0..record.depth {
        let (rip, rsp, rflags) = record.frames[d];
        cpu::write_gate_frame(d, rip, rsp, rflags);
        let slot = cpu::slot(d);
        crate::upcalls::note_fresh_id(d, slot.id);
        // SAFETY: as in `set_aside`; the caller loads the innermost state afterwards.
        unsafe {
            copy_words(slot as *mut _ as *mut u64, &record.slots[d] as *const _ as *const u64, SLOT_WORDS);
            copy_fpu(slot.fpu as *mut FpuImage, &record.fpu[d]);
        }
        // SAFETY: this CPU's own slot.
        unsafe { crate::upcalls::operations_word(slot).store(0, core::sync::atomic::Ordering::SeqCst) };
    }
    cpu::set_invocation_depth(record.depth);
    let innermost = record.state as u32;
    let in_handler = (record.state >> 32) as u32 == innermost;
    let mut registers = Registers::ZERO;
    // SAFETY: as in `set_aside`.
    unsafe {
        copy_words(
            &mut registers as *mut _ as *mut u64,
            &record.registers as *const _ as *const u64,
            core::mem::size_of::<Registers>() / 8,
        )
    };
    Some(Back { innermost, in_handler, registers, waiting_for: record.waiting_for })
}

/// Whether an activation set aside on `cpu` runs `domain` as the callee of an invocation made
/// at depth `depth`, on its work area of that level (`UPCALL_LEVELS`). (A handler set aside at
/// depth 0 holds its level-0 area, which nothing but its own domain running there enters.)
pub fn holds_callee(_kernel: &crate::domains::Kernel, cpu: u32, domain: u32, depth: usize) -> bool {
    (0..MAX_PROGRAMS as u32).any(|root| {
        // SAFETY: the kernel lock is held (`_kernel`); a shared look.
        let Some(r) = (unsafe { record(root) }) else { return false };
        r.active && r.cpu == cpu && depth < r.depth && r.slots[depth].callee() == domain
    })
}

/// A server thread of `domain` answers invocation `id` (of `cpu`'s slot of `depth`) with
/// `result`: if the invocation is set aside, its record keeps the answer for the deferral to
/// find, as its slot would. Whether it was found.
pub fn answer(_kernel: &mut crate::domains::Kernel, cpu: u32, depth: usize, id: u64, domain: u32, result: u64) -> bool {
    (0..MAX_PROGRAMS as u32).any(|root| {
        // SAFETY: the kernel lock is held (`_kernel`).
        let Some(r) = (unsafe { record(root) }) else { return false };
        if !r.active || r.cpu != cpu || depth >= r.depth {
            return false;
        }
        let slot = &mut r.slots[depth];
        if slot.id != id || slot.callee() != domain {
            return false;
        }
        slot.answer = result;
        slot.id = id | crate::upcalls::ANSWERED;
        true
    })
}

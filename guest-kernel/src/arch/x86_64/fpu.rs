//! The x87/SSE register state of CPL3 code, which protection domains must never share.
//!
//! The kernel itself never uses these registers (it is built without SSE), so the live state
//! always belongs to the CPL3 code the CPU last ran, or is about to run. Wherever the kernel
//! moves a CPU from one protection domain's code to another's it saves the state beside the
//! registers it saves, and the code it enters gets its own saved state or [`FpuImage::INITIAL`]:
//! - an upcall handler or a protected invocation's callee starts with the initial state
//!   ([`load_initial`]);
//! - a thread saved for an upcall keeps its state in its context block (`upcalls::save_thread`),
//!   which its thread package loads itself when it resumes the thread;
//! - a protected invocation's caller keeps its state in its depth's area of the CPU
//!   (`InvocationSlot::fpu`) until the invocation returns or ends;
//! - a domain whose time slice ended keeps its state in the kernel (`sched`).
//!
//! `fxsave64` and `fxrstor64` run at this host's emulated CPL0 (unlike SSE instructions) and
//! cost about two ordinary kernel instructions each. The kernel only loads images it wrote
//! itself, into its own memory: a program's image could fault `fxrstor64` (reserved MXCSR bits).

use core::arch::asm;

use psyche_abi::upcall::FpuImage;

/// The initial state, loaded by the kernel (its own copy: never a program's).
#[no_mangle]
pub static PSYCHE_FPU_INITIAL: FpuImage = FpuImage::INITIAL;

/// Saves the live state at `image` (16-byte aligned, writable).
///
/// # Safety
/// `image` must be valid for 512 bytes of writes and 16-byte aligned.
pub unsafe fn save(image: *mut FpuImage) {
    // SAFETY: per the caller; `fxsave64` only writes the image.
    unsafe { asm!("fxsave64 [{}]", in(reg) image, options(nostack, preserves_flags)) };
}

/// Loads the state saved at `image` by [`save`].
///
/// # Safety
/// `image` must be kernel memory that [`save`] wrote (or [`FpuImage::INITIAL`]): nothing a
/// program can change, so that its MXCSR is valid.
pub unsafe fn load(image: *const FpuImage) {
    // SAFETY: per the caller.
    unsafe { asm!("fxrstor64 [{}]", in(reg) image, options(nostack, preserves_flags, readonly)) };
}

/// Loads the initial state: every register zero, exceptions masked.
pub fn load_initial() {
    // SAFETY: the kernel's own image of the initial state.
    unsafe { load(&PSYCHE_FPU_INITIAL) };
}

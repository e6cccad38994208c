//! The symbols a freestanding guest binary must provide itself.
//!
//! Guest code is built for `x86_64-unknown-linux-gnu` with the prebuilt `libcore`, whose
//! `compiler_builtins` expects `memcpy`, `memset`, `memmove`, `memcmp` and `bcmp` from the C
//! library; a guest has none. Only the guest binaries (the kernel and programs) depend on this
//! crate, so a host binary never sees these definitions.
//!
//! The copies use `rep movsb`/`rep stosb`: at CPL3 they run at native speed (ERMS); at CPL0 on
//! our hosts every iteration is emulated, which is why the kernel must never copy in bulk.
#![cfg_attr(not(test), no_std)]

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest`; the ranges must not overlap.
///
/// # Safety
/// `dest` and `src` must be valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid; `rep movsb` touches exactly them.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`; the ranges may overlap.
///
/// # Safety
/// `dest` and `src` must be valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // The destination starts before the source or after its end: a forward copy is safe.
        // SAFETY: same contract as ours.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: the caller guarantees both ranges are valid; copying backwards (direction flag
    // set, cleared again before returning as the ABI requires) never reads a byte already
    // overwritten.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dest.add(n).wrapping_sub(1) => _,
             inout("rsi") src.add(n).wrapping_sub(1) => _, options(nostack));
    }
    dest
}

/// Fills `n` bytes at `dest` with the low byte of `value`.
///
/// # Safety
/// `dest` must be valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid; `rep stosb` writes exactly it.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") value as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// Compares `n` bytes.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n` and the caller guarantees both ranges. Volatile reads keep LLVM from
        // recognising this loop as `memcmp` and calling us recursively.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Compares `n` bytes for equality only.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as ours.
    unsafe { memcmp(a, b, n) }
}

/// Referenced by the prebuilt `libcore` (built with unwinding); guests abort on panic, so it is
/// never called.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn rust_eh_personality() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_fills_and_compares() {
        let mut buffer = *b"0123456789";
        // SAFETY: every range below is inside `buffer` or a literal.
        unsafe {
            memcpy(buffer.as_mut_ptr(), b"abc".as_ptr(), 3);
            assert_eq!(&buffer, b"abc3456789");
            memset(buffer.as_mut_ptr().add(3), i32::from(b'x'), 2);
            assert_eq!(&buffer, b"abcxx56789");
            // Overlapping, forwards and backwards.
            memmove(buffer.as_mut_ptr().add(2), buffer.as_ptr(), 5);
            assert_eq!(&buffer, b"ababcxx789");
            memmove(buffer.as_mut_ptr(), buffer.as_ptr().add(5), 5);
            assert_eq!(&buffer, b"xx789xx789");
            assert_eq!(memcmp(b"abc".as_ptr(), b"abd".as_ptr(), 3), -1);
            assert_eq!(memcmp(b"abc".as_ptr(), b"abc".as_ptr(), 3), 0);
            assert_ne!(bcmp(b"b".as_ptr(), b"a".as_ptr(), 1), 0);
        }
    }
}

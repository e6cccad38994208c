//! realm-sdk: the library Psyche guest programs are written on.
//!
//! A program is a `#![no_std]` `#![no_main]` binary that names its main function with
//! [`entry!`]; the SDK provides the process entry point, console output ([`print!`],
//! [`println!`]), the program's arguments, machine facts, and a panic handler that prints the
//! panic and exits with code 101.
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! realm_sdk::entry!(main);
//! fn main(program: realm_sdk::Program) -> u32 {
//!     realm_sdk::println!("hello from program {}", program.index);
//!     0
//! }
//! ```
//!
//! Programs are static PIEs: psyche-vmm relocates each into its own slot of the uniform
//! address space (`psyche_abi::layout::program_slot`), so several built independently can be
//! loaded in one boot.
#![cfg_attr(not(test), no_std)]

/// The kernel interface's shapes and numbers (psyche-abi), for programs that go below the SDK.
pub use psyche_abi as abi;

pub mod console;
pub mod keys;
pub mod operations;
pub mod realm;
pub mod sync;
pub mod sys;
pub mod tasks;
pub mod threads;

#[cfg(not(test))]
mod start;

// Links memcpy and friends, which the prebuilt libcore expects (host tests have libc's).
#[cfg(not(test))]
use psyche_guest_rt as _;

pub use sys::{cpu, exit, machine, Cpu, Machine};

/// What a program is given at its start.
pub struct Program {
    /// Its index among the programs of this boot (the order of `psyche-vmm --program`).
    pub index: u64,
    /// Its arguments.
    pub args: Args,
}

/// A program's arguments: NUL-terminated strings laid out one after the other by the VMM.
#[derive(Clone, Copy)]
pub struct Args {
    bytes: &'static [u8],
}

impl Args {
    /// Wraps the argument block the kernel passed.
    ///
    /// # Safety
    /// `ptr` must point to `len` bytes that stay readable for the program's life.
    pub unsafe fn from_raw(ptr: *const u8, len: u64) -> Self {
        if ptr.is_null() || len == 0 {
            return Self { bytes: &[] };
        }
        // SAFETY: guaranteed by the caller.
        Self { bytes: unsafe { core::slice::from_raw_parts(ptr, len as usize) } }
    }

    /// The arguments, in order; those that are not UTF-8 come out as "".
    pub fn iter(&self) -> impl Iterator<Item = &'static str> {
        let bytes = self.bytes;
        bytes
            .strip_suffix(&[0])
            .unwrap_or(bytes)
            .split(|&b| b == 0)
            .filter(move |_| !bytes.is_empty())
            .map(|arg| core::str::from_utf8(arg).unwrap_or(""))
    }

    /// Argument `n`, if there is one.
    pub fn get(&self, n: usize) -> Option<&'static str> {
        self.iter().nth(n)
    }
}

/// A numbered check for programs that test the system: prints
/// `NAME: check N: ok|FAILED (what)` and, when it failed, returns N from the enclosing function
/// (which programs use as their exit code).
#[macro_export]
macro_rules! check {
    ($name:expr, $code:expr, $ok:expr, $($what:tt)*) => {{
        let ok = $ok;
        $crate::println!("{}: check {}: {} ({})", $name, $code, if ok { "ok" } else { "FAILED" }, format_args!($($what)*));
        if !ok {
            return $code;
        }
    }};
}

/// Names the program's main function, `fn(Program) -> u32`; its result is the exit code.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        extern "sysv64" fn __realm_sdk_main(args: *const u8, args_len: u64, index: u64) -> ! {
            // SAFETY: the kernel passes the argument block the VMM mapped read-only in this
            // program's slot for its whole life.
            let args = unsafe { $crate::Args::from_raw(args, args_len) };
            let main: fn($crate::Program) -> u32 = $main;
            $crate::start(main, $crate::Program { index, args })
        }
    };
}

static PROGRAM_INDEX: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// This program's index (its protection domain's id, and its root realm's).
pub fn program_index() -> u64 {
    PROGRAM_INDEX.load(core::sync::atomic::Ordering::Relaxed)
}

/// Runs a program's main function after setting up its main thread and keys (called by
/// [`entry!`]).
pub fn start(main: fn(Program) -> u32, program: Program) -> ! {
    PROGRAM_INDEX.store(program.index, core::sync::atomic::Ordering::Relaxed);
    if let Err(error) = threads::init(program.index).and_then(|()| keys::init()) {
        println!("realm-sdk: cannot set up this program's thread and keys: {error:?}");
        exit(102);
    }
    exit(main(program))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("panic: {}", info.message());
    exit(101)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(bytes: &'static [u8]) -> Args {
        // SAFETY: a static slice stays readable.
        unsafe { Args::from_raw(bytes.as_ptr(), bytes.len() as u64) }
    }

    #[test]
    fn arguments_split_on_nul() {
        let a = args(b"one\0two\0\0four\0");
        assert_eq!(a.iter().collect::<Vec<_>>(), ["one", "two", "", "four"]);
        assert_eq!(a.get(1), Some("two"));
        assert_eq!(a.get(4), None);
    }

    #[test]
    fn no_arguments() {
        assert_eq!(args(b"").iter().count(), 0);
        // SAFETY: a null pointer is turned into no arguments without being read.
        assert_eq!(unsafe { Args::from_raw(core::ptr::null(), 5) }.iter().count(), 0);
    }
}

//! Kernel console output.
//!
//! Every piece `core::fmt` produces goes straight to the VMM with one hypercall, which reads it
//! where it lies; the VMM assembles the kernel's lines per vCPU, apart from the programs' (the
//! writer is [`CONSOLE_KERNEL`]), and tags them as the kernel's. On our hosts that is cheaper
//! than buffering: an exit costs ~9 us, while copying into a buffer costs ~3 us per byte of
//! emulated CPL0 code.

use core::fmt;

use psyche_abi::hypercall::{Hypercall, CONSOLE_KERNEL};

use crate::arch::x86_64::hypercall::hypercall;

/// The console of the calling vCPU.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        hypercall(Hypercall::ConsoleWrite, [text.as_ptr() as u64, text.len() as u64, 0, CONSOLE_KERNEL, 0, 0]);
        Ok(())
    }
}

/// Prints a line on the console of the calling vCPU.
macro_rules! kprintln {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}
pub(crate) use kprintln;

/// An integer printed in decimal.
///
/// libcore's own integer formatting (and `Formatter::pad`, and `{:?}` of structs) uses SSE,
/// which KVM's instruction emulator cannot run at CPL0 on our hosts; the kernel formats
/// integers with these instead, and never uses width or precision.
pub struct Dec(pub u64);

fn write_digits(f: &mut fmt::Formatter<'_>, mut value: u64, radix: u64) -> fmt::Result {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(value % radix) as usize];
        value /= radix;
        if value == 0 {
            break;
        }
    }
    // The digits are ASCII.
    f.write_str(core::str::from_utf8(&digits[at..]).unwrap_or("?"))
}

impl fmt::Display for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_digits(f, self.0, 10)
    }
}

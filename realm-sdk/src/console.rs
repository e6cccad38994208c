//! Console output. Lines are assembled in user memory (at native speed) and handed to the
//! kernel whole, so a line costs one kernel entry.

use core::fmt;

/// A console writer with a line buffer; flushes on newline, when full, and when dropped.
pub struct Console {
    buf: [u8; 256],
    len: usize,
}

impl Console {
    pub const fn new() -> Self {
        Self { buf: [0; 256], len: 0 }
    }

    /// Sends the buffered bytes to the kernel.
    pub fn flush(&mut self) {
        let mut sent = 0;
        while sent < self.len {
            match crate::sys::write(&self.buf[sent..self.len]) {
                Ok(0) | Err(_) => break,
                Ok(n) => sent += n,
            }
        }
        self.len = 0;
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for &byte in text.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = byte;
            self.len += 1;
            if byte == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut console = $crate::console::Console::new();
        let _ = write!(console, $($arg)*);
    }};
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut console = $crate::console::Console::new();
        let _ = writeln!(console, $($arg)*);
    }};
}

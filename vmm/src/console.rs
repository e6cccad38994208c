//! Guest console output: bytes from each vCPU are assembled into lines and handed to a sink
//! tagged with the vCPU, so that the output of concurrent vCPUs never interleaves mid-line.

use std::io::Write;
use std::sync::Mutex;

/// Where console lines and VMM notes go.
pub trait ConsoleSink: Send + Sync {
    /// A complete line the guest printed on vCPU `vcpu` (without the newline).
    fn guest_line(&self, vcpu: u32, line: &str);
    /// Something the VMM has to say while the guest runs (a program fault, a warning).
    fn vmm_note(&self, note: &str);
}

/// Guest lines to stdout as `[vcpu N] line`, notes to stderr as `psyche-vmm: note`.
pub struct StdioSink;

impl ConsoleSink for StdioSink {
    fn guest_line(&self, vcpu: u32, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "[vcpu {vcpu}] {line}");
    }

    fn vmm_note(&self, note: &str) {
        let _ = writeln!(std::io::stderr().lock(), "psyche-vmm: {note}");
    }
}

/// Keeps everything in memory (for tests and tools).
#[derive(Default)]
pub struct CaptureSink {
    lines: Mutex<Vec<(u32, String)>>,
    notes: Mutex<Vec<String>>,
}

impl CaptureSink {
    /// The guest lines so far, with their vCPU.
    pub fn lines(&self) -> Vec<(u32, String)> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The VMM notes so far.
    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// All guest output as text, one line each.
    pub fn text(&self) -> String {
        self.lines().into_iter().map(|(_, line)| line + "\n").collect()
    }
}

impl ConsoleSink for CaptureSink {
    fn guest_line(&self, vcpu: u32, line: &str) {
        if let Ok(mut lines) = self.lines.lock() {
            lines.push((vcpu, line.to_owned()));
        }
    }

    fn vmm_note(&self, note: &str) {
        if let Ok(mut notes) = self.notes.lock() {
            notes.push(note.to_owned());
        }
    }
}

/// Longest line kept whole; a longer one is split (a guest cannot make the VMM buffer without
/// bound).
const MAX_LINE: usize = 4096;

/// The partial line of one vCPU.
#[derive(Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Adds bytes; every completed line goes to `sink`.
    pub fn push(&mut self, vcpu: u32, bytes: &[u8], sink: &dyn ConsoleSink) {
        for &byte in bytes {
            if byte == b'\n' || self.pending.len() >= MAX_LINE {
                self.flush(vcpu, sink);
                if byte == b'\n' {
                    continue;
                }
            }
            self.pending.push(byte);
        }
    }

    /// Emits whatever is pending as a line.
    pub fn flush(&mut self, vcpu: u32, sink: &dyn ConsoleSink) {
        if !self.pending.is_empty() {
            let line = String::from_utf8_lossy(&self.pending);
            sink.guest_line(vcpu, line.trim_end_matches('\r'));
            self.pending.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_lines_and_splits_long_ones() {
        let sink = CaptureSink::default();
        let mut buffer = LineBuffer::default();
        buffer.push(3, b"hel", &sink);
        buffer.push(3, b"lo\nwor", &sink);
        assert_eq!(sink.lines(), vec![(3, "hello".to_owned())]);
        buffer.flush(3, &sink);
        assert_eq!(sink.lines()[1], (3, "wor".to_owned()));
        buffer.push(1, &vec![b'x'; MAX_LINE + 5], &sink);
        buffer.flush(1, &sink);
        assert_eq!(sink.lines()[2].1.len(), MAX_LINE);
        assert_eq!(sink.lines()[3].1.len(), 5);
    }
}

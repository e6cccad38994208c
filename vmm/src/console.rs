//! Guest console output: the bytes each writer (the kernel, or one program) prints on a vCPU are
//! assembled into lines of their own, escaped, and handed to a sink tagged with the vCPU and the
//! writer, so that neither concurrent vCPUs nor protection domains that share a vCPU can
//! interleave mid-line, and no guest byte reaches the host's terminal raw.
//!
//! Escaping keeps printable ASCII, TAB and printable Unicode as they are and shows everything
//! else so that the line can be read back unambiguously:
//!
//! | guest bytes | shown as |
//! |---|---|
//! | `\` | `\\` |
//! | an ASCII control (NUL, BEL, ESC, a CR not just before the newline, ...) or DEL | `\x1b`, `\x0d`, ... |
//! | a Unicode control (C1, such as U+009B, a one-character CSI) or bidirectional override | `\u{9b}`, `\u{202e}` |
//! | a byte that is not part of valid UTF-8 | `\xff`, ... (always 0x80 or more) |
//!
//! TAB stays: it only moves the cursor forward, so it can neither hide nor overwrite a tag. A
//! CR just before the newline (a CRLF line end) is dropped.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Mutex;

use psyche_abi::hypercall::CONSOLE_KERNEL;

/// Who printed a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Writer {
    /// The guest kernel itself (`psyche: ...` lines).
    Kernel,
    /// The program of this index (its protection domain).
    Program(u32),
}

impl Writer {
    /// Decodes the writer argument of a console hypercall in a boot of `programs` programs.
    pub fn from_raw(raw: u64, programs: usize) -> Option<Self> {
        if raw == CONSOLE_KERNEL {
            return Some(Self::Kernel);
        }
        u32::try_from(raw).ok().filter(|&index| (index as usize) < programs).map(Self::Program)
    }
}

/// One line of guest output, already escaped.
#[derive(Clone, Copy, Debug)]
pub struct GuestLine<'a> {
    /// The vCPU it was printed on.
    pub vcpu: u32,
    pub writer: Writer,
    /// The program's short name (empty for the kernel).
    pub name: &'a str,
    /// The line, without its newline.
    pub text: &'a str,
}

impl GuestLine<'_> {
    /// The tag in front of the line on stdout: `vcpu 0 kernel`, `vcpu 3 hello#1`.
    pub fn tag(&self) -> String {
        match self.writer {
            Writer::Kernel => format!("vcpu {} kernel", self.vcpu),
            Writer::Program(index) => format!("vcpu {} {}#{index}", self.vcpu, self.name),
        }
    }
}

/// Where console lines and VMM notes go.
pub trait ConsoleSink: Send + Sync {
    /// A complete line the guest printed.
    fn guest_line(&self, line: &GuestLine<'_>);
    /// Something the VMM has to say while the guest runs (a program fault, a warning).
    fn vmm_note(&self, note: &str);
}

/// Guest lines to stdout as `[vcpu N writer] line`, notes to stderr as `psyche-vmm: note`.
pub struct StdioSink;

impl ConsoleSink for StdioSink {
    fn guest_line(&self, line: &GuestLine<'_>) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "[{}] {}", line.tag(), line.text);
    }

    fn vmm_note(&self, note: &str) {
        let _ = writeln!(std::io::stderr().lock(), "psyche-vmm: {note}");
    }
}

/// A guest line as [`CaptureSink`] keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedLine {
    pub vcpu: u32,
    pub writer: Writer,
    /// As [`GuestLine::tag`].
    pub tag: String,
    /// The escaped line.
    pub text: String,
}

/// Keeps everything in memory (for tests and tools).
#[derive(Default)]
pub struct CaptureSink {
    lines: Mutex<Vec<CapturedLine>>,
    notes: Mutex<Vec<String>>,
}

impl CaptureSink {
    /// The guest lines so far, with their vCPU.
    pub fn lines(&self) -> Vec<(u32, String)> {
        self.entries().into_iter().map(|line| (line.vcpu, line.text)).collect()
    }

    /// The guest lines so far, with their vCPU, writer and tag.
    pub fn entries(&self) -> Vec<CapturedLine> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The VMM notes so far.
    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// All guest output as text, one line each, without tags.
    pub fn text(&self) -> String {
        self.lines().into_iter().map(|(_, line)| line + "\n").collect()
    }

    /// All guest output as [`StdioSink`] prints it: `[tag] line`, one line each.
    pub fn transcript(&self) -> String {
        self.entries().into_iter().map(|line| format!("[{}] {}\n", line.tag, line.text)).collect()
    }
}

impl ConsoleSink for CaptureSink {
    fn guest_line(&self, line: &GuestLine<'_>) {
        if let Ok(mut lines) = self.lines.lock() {
            lines.push(CapturedLine {
                vcpu: line.vcpu,
                writer: line.writer,
                tag: line.tag(),
                text: line.text.to_owned(),
            });
        }
    }

    fn vmm_note(&self, note: &str) {
        if let Ok(mut notes) = self.notes.lock() {
            notes.push(note.to_owned());
        }
    }
}

/// Longest line kept whole, in guest bytes; a longer one is split (at a character boundary),
/// so that a guest cannot make the VMM buffer without bound: a vCPU holds at most one partial
/// line per writer, `MAX_LINE` bytes each.
pub const MAX_LINE: usize = 4096;

/// The partial line of one writer on one vCPU.
#[derive(Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Adds bytes; every completed line goes to `emit`, escaped.
    pub fn push(&mut self, bytes: &[u8], emit: &mut dyn FnMut(&str)) {
        for &byte in bytes {
            if byte == b'\n' {
                // A CRLF line end is an ordinary line end.
                if self.pending.last() == Some(&b'\r') {
                    self.pending.pop();
                }
                self.emit_all(emit);
                continue;
            }
            if self.pending.len() >= MAX_LINE {
                // Split, but not inside a character: its first bytes start the next line.
                let keep = incomplete_tail(&self.pending);
                let tail: Vec<u8> = self.pending.drain(self.pending.len() - keep..).collect();
                self.emit_all(emit);
                self.pending = tail;
            }
            self.pending.push(byte);
        }
    }

    /// Emits whatever is pending as a line.
    pub fn flush(&mut self, emit: &mut dyn FnMut(&str)) {
        if !self.pending.is_empty() {
            self.emit_all(emit);
        }
    }

    fn emit_all(&mut self, emit: &mut dyn FnMut(&str)) {
        emit(&escape(&self.pending));
        self.pending.clear();
    }
}

/// How many bytes at the end of `bytes` are the start of a UTF-8 character that the next bytes
/// may complete (0 to 3).
fn incomplete_tail(bytes: &[u8]) -> usize {
    let start = bytes.len().saturating_sub(3);
    for lead in (start..bytes.len()).rev() {
        if bytes[lead] & 0xC0 != 0x80 {
            return match std::str::from_utf8(&bytes[lead..]) {
                Err(error) if error.valid_up_to() == 0 && error.error_len().is_none() => bytes.len() - lead,
                _ => 0,
            };
        }
    }
    0
}

/// Whether `c` reorders the display of the text around it (bidirectional embeddings,
/// overrides and isolates): such a character could make a line look like something it is not.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{061C}')
}

/// The guest's bytes as text that is safe on a terminal and unambiguous (see the module docs).
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push('\t'),
                c if c.is_ascii_control() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if c.is_control() || is_bidi_control(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// The short name of a program in tags: the built-in name, or the file name of an ELF file
/// without its directory and extension (escaped: it comes from the host, but it still goes to
/// the terminal).
pub fn short_name(name: &str) -> String {
    let stem = std::path::Path::new(name).file_stem().map_or(name.into(), |stem| stem.to_string_lossy());
    escape(stem.as_bytes())
}

/// The console of one vCPU: a partial line per writer that printed on it (the kernel and at
/// most every program of the boot, so at most `1 + programs` lines of [`MAX_LINE`] bytes).
#[derive(Default)]
pub struct VcpuConsole {
    /// Index 0: the kernel; index `i + 1`: program `i`.
    buffers: Vec<LineBuffer>,
}

impl VcpuConsole {
    fn slot(writer: Writer) -> usize {
        match writer {
            Writer::Kernel => 0,
            Writer::Program(index) => index as usize + 1,
        }
    }

    /// Adds bytes `writer` printed on vCPU `vcpu`; completed lines go to `sink`. `names` are the
    /// programs' names, by index (`writer` was decoded with [`Writer::from_raw`] for them).
    pub fn push(&mut self, vcpu: u32, writer: Writer, bytes: &[u8], names: &[String], sink: &dyn ConsoleSink) {
        let slot = Self::slot(writer);
        if self.buffers.len() <= slot {
            self.buffers.resize_with(slot + 1, LineBuffer::default);
        }
        let name = line_name(writer, names);
        self.buffers[slot].push(bytes, &mut |text| sink.guest_line(&GuestLine { vcpu, writer, name: &name, text }));
    }

    /// Emits `writer`'s partial line on this vCPU, if any.
    pub fn flush(&mut self, vcpu: u32, writer: Writer, names: &[String], sink: &dyn ConsoleSink) {
        if let Some(buffer) = self.buffers.get_mut(Self::slot(writer)) {
            let name = line_name(writer, names);
            buffer.flush(&mut |text| sink.guest_line(&GuestLine { vcpu, writer, name: &name, text }));
        }
    }

    /// Emits every partial line on this vCPU: the kernel's first, then the programs' in order.
    pub fn flush_all(&mut self, vcpu: u32, names: &[String], sink: &dyn ConsoleSink) {
        for slot in 0..self.buffers.len() {
            let writer = if slot == 0 { Writer::Kernel } else { Writer::Program(slot as u32 - 1) };
            self.flush(vcpu, writer, names, sink);
        }
    }
}

fn line_name(writer: Writer, names: &[String]) -> String {
    match writer {
        Writer::Kernel => String::new(),
        Writer::Program(index) => {
            names.get(index as usize).map_or_else(|| format!("program{index}"), |n| short_name(n))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["hello".to_owned(), "/tmp/builds/noisy.elf".to_owned()]
    }

    /// Pushes `bytes` as `writer` on vCPU 3 and returns the lines completed.
    fn lines_of(writer: Writer, chunks: &[&[u8]]) -> Vec<String> {
        let sink = CaptureSink::default();
        let mut console = VcpuConsole::default();
        for chunk in chunks {
            console.push(3, writer, chunk, &names(), &sink);
        }
        console.flush_all(3, &names(), &sink);
        sink.lines().into_iter().map(|(_, text)| text).collect()
    }

    #[test]
    fn assembles_lines_and_splits_long_ones() {
        let sink = CaptureSink::default();
        let mut console = VcpuConsole::default();
        let p0 = Writer::Program(0);
        console.push(3, p0, b"hel", &names(), &sink);
        console.push(3, p0, b"lo\nwor", &names(), &sink);
        assert_eq!(sink.lines(), vec![(3, "hello".to_owned())]);
        console.flush(3, p0, &names(), &sink);
        assert_eq!(sink.lines()[1], (3, "wor".to_owned()));
        console.push(1, p0, &vec![b'x'; MAX_LINE + 5], &names(), &sink);
        console.flush(1, p0, &names(), &sink);
        assert_eq!(sink.lines()[2].1.len(), MAX_LINE);
        assert_eq!(sink.lines()[3].1.len(), 5);
        // Nothing pending: a flush prints no empty line; an empty line printed is kept.
        console.flush(1, p0, &names(), &sink);
        console.push(1, p0, b"\n", &names(), &sink);
        assert_eq!(sink.lines().len(), 5);
        assert_eq!(sink.lines()[4].1, "");
    }

    #[test]
    fn control_bytes_are_escaped_and_tab_and_text_kept() {
        let printed = lines_of(Writer::Program(0), &[b"a\x1b[2Jb\x07c\x00d\x7fe\tf\\g\x08h\r\n"]);
        assert_eq!(printed, [r"a\x1b[2Jb\x07c\x00d\x7fe	f\\g\x08h"]);
        // A CR mid-line cannot move back over the tag; only a CRLF line end is dropped.
        let printed = lines_of(Writer::Program(0), &[b"innocent\r[vcpu 0 kernel] psyche: forged\n", b"x\r\r\n"]);
        assert_eq!(printed, [r"innocent\x0d[vcpu 0 kernel] psyche: forged", r"x\x0d"]);
        // Every escape starts with a backslash, and a backslash the guest printed is doubled: a
        // guest cannot print something that reads as an escape.
        assert_eq!(lines_of(Writer::Kernel, &[b"\\x1b \x1b\n"]), [r"\\x1b \x1b"]);
    }

    #[test]
    fn unicode_is_kept_but_unicode_controls_and_invalid_utf8_are_escaped() {
        let printed = lines_of(Writer::Program(1), &["grüße → ✓ 🦀\n".as_bytes()]);
        assert_eq!(printed, ["grüße → ✓ 🦀"]);
        // U+009B is a one-character CSI on some terminals; U+202E reverses what follows.
        let printed = lines_of(Writer::Program(1), &["a\u{9b}31mb\u{202e}c\u{85}d\n".as_bytes()]);
        assert_eq!(printed, [r"a\u{9b}31mb\u{202e}c\u{85}d"]);
        // Invalid UTF-8, byte by byte (a lone continuation byte, a truncated sequence, 0xFF).
        let printed = lines_of(Writer::Program(1), &[b"x\x80y\xe2\x82z\xff\xfe\n"]);
        assert_eq!(printed, [r"x\x80y\xe2\x82z\xff\xfe"]);
        // A character split across two writes is still one character.
        let euro = "€".as_bytes();
        assert_eq!(lines_of(Writer::Program(1), &[&euro[..1], &euro[1..], b"\n"]), ["€"]);
    }

    #[test]
    fn a_long_line_splits_between_characters() {
        let mut bytes = vec![b'a'; MAX_LINE - 1];
        bytes.extend_from_slice("€uro\n".as_bytes());
        let printed = lines_of(Writer::Program(0), &[&bytes]);
        assert_eq!(printed.len(), 2);
        assert_eq!(printed[0], "a".repeat(MAX_LINE - 1));
        assert_eq!(printed[1], "€uro");
        // Invalid bytes at the split are not held back: the line is split where it is full.
        let mut bytes = vec![b'a'; MAX_LINE - 1];
        bytes.extend_from_slice(b"\xff\xfe\n");
        let printed = lines_of(Writer::Program(0), &[&bytes]);
        assert_eq!(printed, [format!("{}\\xff", "a".repeat(MAX_LINE - 1)), r"\xfe".to_owned()]);
    }

    #[test]
    fn each_writer_on_a_vcpu_has_a_line_of_its_own() {
        let sink = CaptureSink::default();
        let mut console = VcpuConsole::default();
        let names = names();
        console.push(0, Writer::Program(0), b"first half of 0, ", &names, &sink);
        console.push(0, Writer::Program(1), b"first half of 1, ", &names, &sink);
        console.push(0, Writer::Kernel, b"psyche: a kernel line\n", &names, &sink);
        console.push(0, Writer::Program(0), b"end of 0\n", &names, &sink);
        console.push(0, Writer::Program(1), b"end of 1\n", &names, &sink);
        let got: Vec<(String, String)> = sink.entries().into_iter().map(|l| (l.tag, l.text)).collect();
        let want = [
            ("vcpu 0 kernel", "psyche: a kernel line"),
            ("vcpu 0 hello#0", "first half of 0, end of 0"),
            ("vcpu 0 noisy#1", "first half of 1, end of 1"),
        ];
        assert_eq!(got, want.map(|(tag, text)| (tag.to_owned(), text.to_owned())));
        assert_eq!(
            sink.transcript(),
            "[vcpu 0 kernel] psyche: a kernel line\n[vcpu 0 hello#0] first half of 0, end of 0\n\
             [vcpu 0 noisy#1] first half of 1, end of 1\n"
        );
    }

    #[test]
    fn a_flood_without_newlines_stays_bounded() {
        let sink = CaptureSink::default();
        let mut console = VcpuConsole::default();
        let chunk = vec![b'z'; 64 * 1024];
        for _ in 0..16 {
            console.push(0, Writer::Program(0), &chunk, &names(), &sink);
            assert!(console.buffers.iter().all(|b| b.pending.len() <= MAX_LINE));
        }
        assert_eq!(sink.lines().len(), 16 * 64 * 1024 / MAX_LINE - 1);
    }

    #[test]
    fn writers_decode_from_the_hypercall_argument() {
        assert_eq!(Writer::from_raw(CONSOLE_KERNEL, 2), Some(Writer::Kernel));
        assert_eq!(Writer::from_raw(1, 2), Some(Writer::Program(1)));
        assert_eq!(Writer::from_raw(2, 2), None);
        assert_eq!(Writer::from_raw(1 << 32, 2), None);
        assert_eq!(short_name("/a/b/c.d.elf"), "c.d");
        assert_eq!(short_name("hello"), "hello");
        assert_eq!(short_name("/tmp/\x1bevil"), r"\x1bevil");
    }
}

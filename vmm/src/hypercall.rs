//! The VMM side of hypercalls: decode the registers of an `in` from the hypercall port into a
//! request, check it, act. Nothing the guest passes can make this panic: bad numbers and bad
//! arguments get an error reply, and a kernel that reports garbage is stopped as crashed.

use std::ops::Range;

use kvm_bindings::{kvm_regs, kvm_sregs};
use psyche_abi::hypercall::{Hypercall, HypercallError, CONSOLE_USER_BUFFER};
use psyche_abi::latency::{LatencyMode, LatencyReport, ARMED, LATENCY_REPORT_MAGIC};
use psyche_abi::layout::PAGE_SIZE;
use psyche_abi::realm::{Termination, MAX_REALM_PAGES};
use psyche_abi::report::{TopologyReport, TOPOLOGY_REPORT_MAGIC};
use psyche_abi::{MAX_CPUS, MAX_NODES};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::console::{ConsoleSink, VcpuConsole, Writer};
use crate::latency::{GuestLatencyReport, LatencyCharger};
use crate::memory::{self, TranslateError};
use crate::vm::{CrashReason, GuestEnd, GuestReport, NodeReport, ProgramEnd, RunState};

/// Most bytes one console write may carry.
const MAX_CONSOLE_WRITE: u64 = 64 * 1024;

/// What hypercalls need from the VM.
pub struct HypercallContext<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub sink: &'a dyn ConsoleSink,
    /// Program names, by index, for messages.
    pub program_names: &'a [String],
    /// The trace session of a traced run.
    pub trace: Option<&'a crate::trace::TraceSession<'a>>,
    /// Charges remote-memory latency traps.
    pub latency: &'a LatencyCharger,
}

impl HypercallContext<'_> {
    /// Prints program `index`'s partial line on this vCPU, if any (it has ended, or is about
    /// to): its last words come before the VMM's note about it.
    fn flush_program(&self, vcpu: u32, index: u64, console: &mut VcpuConsole) {
        if let Some(writer) = Writer::from_raw(index, self.program_names.len()).filter(|w| *w != Writer::Kernel) {
            console.flush(vcpu, writer, self.program_names, self.sink);
        }
    }

    fn program_name(&self, index: u64) -> String {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.program_names.get(i))
            .map_or_else(|| format!("#{index}"), |name| format!("{index} ({name})"))
    }
}

/// A hypercall, decoded from the registers of its `in` and checked as far as the registers
/// alone allow: the number, lengths, counts, alignment, runs that would wrap or overlap. What
/// needs guest memory (is a run in RAM, is a buffer mapped) is checked when it is handled,
/// before anything is written: no request changes guest memory unless all of it is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `len` bytes at guest-virtual `vaddr`; `user_buffer`: every page must be user-accessible.
    ConsoleWrite {
        vaddr: u64,
        len: usize,
        user_buffer: bool,
        /// Who writes, as the kernel passed it (`console::Writer::from_raw`).
        writer: u64,
    },
    ReportTopology {
        report: u64,
    },
    ProgramStart {
        program: u64,
    },
    ProgramExit {
        program: u64,
        code: u64,
    },
    ProgramFault {
        program: u64,
        vector: u64,
        error_code: u64,
        rip: u64,
        cr2: u64,
    },
    Shutdown {
        code: u64,
    },
    KernelFault {
        vector: u64,
        error_code: u64,
        rip: u64,
        cr2: u64,
        cs: u64,
        rsp: u64,
    },
    KernelPanic,
    TraceFlush {
        ring: u64,
    },
    DomainTerminated {
        program: u64,
        reason: u64,
        address: u64,
        realm: u64,
        rip: u64,
    },
    /// Whole pages of guest-physical memory.
    ZeroFrames {
        frames: Range<u64>,
    },
    /// `len` (at most a page) random bytes at user-writable guest-virtual `vaddr`.
    Random {
        vaddr: u64,
        len: usize,
    },
    Mark {
        value: u64,
        program: u64,
    },
    /// A trap from a CPU of node `from` on a page homed on node `to`.
    LatencyCharge {
        from: u64,
        to: u64,
    },
    /// `tables` (1..=[`MAX_REALM_TABLES`]) page tables at `source`, copied armed to `copy`
    /// (a directory, then the tables); the two runs are disjoint.
    ArmedCopy {
        source: Range<u64>,
        copy: Range<u64>,
    },
    /// Disjoint runs of the same number of pages (at most [`MAX_REALM_PAGES`]).
    CopyFrames {
        source: Range<u64>,
        destination: Range<u64>,
    },
    ReportLatency {
        report: u64,
    },
}

impl Request {
    /// Decodes the hypercall in `regs`: RAX is the number, RDI, RSI, RDX, RCX, R8, R9 the
    /// arguments (see [`Hypercall`]). Any register values give a request or an error reply.
    pub fn decode(regs: &kvm_regs) -> Result<Self, HypercallError> {
        let [a0, a1, a2, a3, a4, a5] = [regs.rdi, regs.rsi, regs.rdx, regs.rcx, regs.r8, regs.r9];
        let call = Hypercall::from_raw(regs.rax).ok_or(HypercallError::UnknownHypercall)?;
        Ok(match call {
            Hypercall::ConsoleWrite => Self::ConsoleWrite {
                vaddr: a0,
                len: bounded(a1, MAX_CONSOLE_WRITE)?,
                user_buffer: a2 & CONSOLE_USER_BUFFER != 0,
                writer: a3,
            },
            Hypercall::ReportTopology => Self::ReportTopology { report: a0 },
            Hypercall::ProgramStart => Self::ProgramStart { program: a0 },
            Hypercall::ProgramExit => Self::ProgramExit { program: a0, code: a1 },
            Hypercall::ProgramFault => Self::ProgramFault { program: a0, vector: a1, error_code: a2, rip: a3, cr2: a4 },
            Hypercall::Shutdown => Self::Shutdown { code: a0 },
            Hypercall::KernelFault => {
                Self::KernelFault { vector: a0, error_code: a1, rip: a2, cr2: a3, cs: a4, rsp: a5 }
            }
            Hypercall::KernelPanic => Self::KernelPanic,
            Hypercall::TraceFlush => Self::TraceFlush { ring: a0 },
            Hypercall::DomainTerminated => {
                Self::DomainTerminated { program: a0, reason: a1, address: a2, realm: a3, rip: a4 }
            }
            Hypercall::ZeroFrames => Self::ZeroFrames { frames: frame_run(a0, a1)? },
            Hypercall::Random => Self::Random { vaddr: a0, len: bounded(a1, PAGE_SIZE)? },
            Hypercall::Mark => Self::Mark { value: a0, program: a1 },
            Hypercall::LatencyCharge => Self::LatencyCharge { from: a0, to: a1 },
            Hypercall::ArmedCopy => {
                let tables = a2;
                if tables == 0 || tables > MAX_REALM_TABLES {
                    return Err(HypercallError::InvalidArgument);
                }
                let (source, copy) = (frame_run(a0, tables)?, frame_run(a1, 1 + tables)?);
                disjoint(&source, &copy)?;
                Self::ArmedCopy { source, copy }
            }
            Hypercall::CopyFrames => {
                if a2 > MAX_REALM_PAGES {
                    return Err(HypercallError::InvalidArgument);
                }
                let (source, destination) = (frame_run(a0, a2)?, frame_run(a1, a2)?);
                disjoint(&source, &destination)?;
                Self::CopyFrames { source, destination }
            }
            Hypercall::ReportLatency => Self::ReportLatency { report: a0 },
        })
    }

    /// The hypercall this request is.
    pub fn hypercall(&self) -> Hypercall {
        match self {
            Self::ConsoleWrite { .. } => Hypercall::ConsoleWrite,
            Self::ReportTopology { .. } => Hypercall::ReportTopology,
            Self::ProgramStart { .. } => Hypercall::ProgramStart,
            Self::ProgramExit { .. } => Hypercall::ProgramExit,
            Self::ProgramFault { .. } => Hypercall::ProgramFault,
            Self::Shutdown { .. } => Hypercall::Shutdown,
            Self::KernelFault { .. } => Hypercall::KernelFault,
            Self::KernelPanic => Hypercall::KernelPanic,
            Self::TraceFlush { .. } => Hypercall::TraceFlush,
            Self::DomainTerminated { .. } => Hypercall::DomainTerminated,
            Self::ZeroFrames { .. } => Hypercall::ZeroFrames,
            Self::Random { .. } => Hypercall::Random,
            Self::Mark { .. } => Hypercall::Mark,
            Self::LatencyCharge { .. } => Hypercall::LatencyCharge,
            Self::ArmedCopy { .. } => Hypercall::ArmedCopy,
            Self::CopyFrames { .. } => Hypercall::CopyFrames,
            Self::ReportLatency { .. } => Hypercall::ReportLatency,
        }
    }
}

/// `value` as a length of at most `max`.
fn bounded(value: u64, max: u64) -> Result<usize, HypercallError> {
    if value > max {
        return Err(HypercallError::InvalidArgument);
    }
    usize::try_from(value).map_err(|_| HypercallError::InvalidArgument)
}

/// The guest-physical run of `pages` pages at `gpa`: page aligned (else an invalid argument)
/// and not wrapping (else a bad address). Whether it is in RAM is checked when it is used.
fn frame_run(gpa: u64, pages: u64) -> Result<Range<u64>, HypercallError> {
    if !gpa.is_multiple_of(PAGE_SIZE) {
        return Err(HypercallError::InvalidArgument);
    }
    let end = pages.checked_mul(PAGE_SIZE).and_then(|len| gpa.checked_add(len)).ok_or(HypercallError::BadAddress)?;
    Ok(gpa..end)
}

fn disjoint(a: &Range<u64>, b: &Range<u64>) -> Result<(), HypercallError> {
    if a.start < b.end && b.start < a.end {
        return Err(HypercallError::InvalidArgument);
    }
    Ok(())
}

/// Checks that `run` lies wholly in guest RAM.
fn in_ram(mem: &GuestMemoryMmap, run: &Range<u64>) -> Result<(), HypercallError> {
    let len = usize::try_from(run.end - run.start).map_err(|_| HypercallError::BadAddress)?;
    if !GuestMemoryBackend::check_range(mem, GuestAddress(run.start), len) {
        return Err(HypercallError::BadAddress);
    }
    Ok(())
}

/// Handles the hypercall in `regs` made by vCPU `vcpu`; returns the 32-bit reply.
pub fn handle(
    vcpu: u32,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    context: &HypercallContext<'_>,
    state: &RunState,
    console: &mut VcpuConsole,
) -> u32 {
    match Request::decode(regs) {
        Ok(request) => execute(vcpu, request, sregs, context, state, console),
        Err(error) => error.reply(),
    }
}

/// Carries out a decoded request.
fn execute(
    vcpu: u32,
    request: Request,
    sregs: &kvm_sregs,
    context: &HypercallContext<'_>,
    state: &RunState,
    console: &mut VcpuConsole,
) -> u32 {
    match request {
        Request::ConsoleWrite { vaddr, len, user_buffer, writer } => {
            // Who writes is checked here: the decoder does not know how many programs there are.
            let Some(writer) = Writer::from_raw(writer, context.program_names.len()) else {
                return HypercallError::InvalidArgument.reply();
            };
            match memory::read_virtual(context.mem, sregs.cr3, vaddr, len, user_buffer) {
                Ok(bytes) => {
                    console.push(vcpu, writer, &bytes, context.program_names, context.sink);
                    len as u32
                }
                Err(
                    TranslateError::NotMapped(_)
                    | TranslateError::NotUser(_)
                    | TranslateError::NonCanonical(_)
                    | TranslateError::NotWritable(_),
                ) => HypercallError::BadAddress.reply(),
            }
        }
        Request::ReportTopology { report } => match read_report(context.mem, report) {
            Ok(report) => {
                state.set_report(report);
                0
            }
            Err(problem) => {
                let reason = CrashReason::BadReport(problem);
                state.end(GuestEnd::crash(vcpu, reason, None));
                HypercallError::InvalidArgument.reply()
            }
        },
        Request::ProgramStart { program } => {
            state.program_started(program);
            0
        }
        Request::ProgramExit { program, code } => {
            context.flush_program(vcpu, program, console);
            state.program_ended(program, ProgramEnd::Exited { code });
            0
        }
        Request::ProgramFault { program, vector, error_code, rip, cr2 } => {
            context.flush_program(vcpu, program, console);
            context.sink.vmm_note(&format!(
                "program {} killed on vCPU {vcpu}: {} at rip {rip:#x}, error code {error_code:#x}{}",
                context.program_name(program),
                exception_name(vector),
                if vector == 14 { format!(", address {cr2:#x}") } else { String::new() },
            ));
            state.program_ended(program, ProgramEnd::Killed { vector, error_code, rip, cr2 });
            0
        }
        Request::Shutdown { code } => {
            console.flush_all(vcpu, context.program_names, context.sink);
            state.end(GuestEnd::Shutdown { code });
            0
        }
        Request::KernelFault { vector, error_code, rip, cr2, cs, rsp } => {
            console.flush_all(vcpu, context.program_names, context.sink);
            let reason = CrashReason::Exception { vector, error_code, rip, cr2, cs, rsp };
            state.end(GuestEnd::crash(vcpu, reason, None));
            0
        }
        // Without a trace session there is nothing to drain: the reply says nothing was
        // consumed, and a kernel that traces anyway counts what it drops.
        Request::TraceFlush { ring } => context.trace.map_or(0, |trace| trace.flush(vcpu, ring)),
        Request::KernelPanic => {
            console.flush_all(vcpu, context.program_names, context.sink);
            state.end(GuestEnd::crash(vcpu, CrashReason::KernelPanic, None));
            0
        }
        Request::DomainTerminated { program, reason, address, realm, rip } => {
            context.flush_program(vcpu, program, console);
            let why = Termination::from_raw(reason).map_or("broke a rule the VMM does not know", Termination::describe);
            let realm_text = if realm == u64::from(u32::MAX) { String::new() } else { format!(" (realm {realm})") };
            context.sink.vmm_note(&format!(
                "program {} terminated on vCPU {vcpu}: it {why}: address {address:#x}{realm_text}, rip {rip:#x}",
                context.program_name(program),
            ));
            state.program_ended(program, ProgramEnd::Terminated { reason, address, realm, rip });
            0
        }
        Request::Mark { value, program } => {
            state.mark(vcpu, program, value);
            0
        }
        Request::ZeroFrames { frames } => reply(zero_frames(context.mem, frames)),
        // RDX (the page) and RCX (the realm) are for the kernel's own counts and trace.
        Request::LatencyCharge { from, to } => match context.latency.charge(vcpu, from, to, &|| state.stopping()) {
            Ok(ns) => ns,
            Err(error) => error.reply(),
        },
        Request::ArmedCopy { source, copy } => reply(armed_copy(context.mem, source, copy)),
        Request::CopyFrames { source, destination } => reply(copy_frames(context.mem, source, destination)),
        Request::ReportLatency { report } => {
            match read_latency_report(context.mem, report, context.latency.node_count()) {
                Ok(report) => {
                    state.set_latency_report(report);
                    0
                }
                Err(error) => {
                    context.sink.vmm_note(&format!("ignored the kernel's latency report from vCPU {vcpu}: {error}"));
                    error.reply()
                }
            }
        }
        Request::Random { vaddr, len } => {
            let mut bytes = vec![0u8; len];
            if getrandom(&mut bytes).is_err() {
                return HypercallError::InvalidArgument.reply();
            }
            // Every page of the buffer is translated and checked before a byte is written.
            match memory::write_virtual(context.mem, sregs.cr3, vaddr, &bytes) {
                Ok(()) => len as u32,
                Err(_) => HypercallError::BadAddress.reply(),
            }
        }
    }
}

/// The reply for the outcome of a hypercall that answers 0 on success.
fn reply(result: Result<(), HypercallError>) -> u32 {
    result.map_or_else(HypercallError::reply, |()| 0)
}

/// Most page tables one realm has (each maps 512 of its pages).
pub const MAX_REALM_TABLES: u64 = MAX_REALM_PAGES / 512;
const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_NO_EXECUTE: u64 = 1 << 63;

/// `ZeroFrames`: zeroes the run, once all of it is known to be guest RAM.
fn zero_frames(mem: &GuestMemoryMmap, frames: Range<u64>) -> Result<(), HypercallError> {
    in_ram(mem, &frames)?;
    let zeroes = [0u8; PAGE_SIZE as usize];
    for page in frames.step_by(PAGE_SIZE as usize) {
        mem.write_slice(&zeroes, GuestAddress(page)).map_err(|_| HypercallError::BadAddress)?;
    }
    Ok(())
}

/// `ArmedCopy`: builds, in the zeroed run `copy`, the armed copy of the contiguous page tables
/// `source`: a directory whose entry i points at copy table i, and copy tables in which every
/// present no-execute entry (a data page) is made not present and armed. Code pages
/// (executable) stay as they are. Both runs are checked before anything is written.
fn armed_copy(mem: &GuestMemoryMmap, source: Range<u64>, copy: Range<u64>) -> Result<(), HypercallError> {
    in_ram(mem, &source)?;
    in_ram(mem, &copy)?;
    let tables = (source.end - source.start) / PAGE_SIZE;
    let mut directory = [0u64; 512];
    for (i, entry) in directory.iter_mut().take(tables as usize).enumerate() {
        *entry = (copy.start + (1 + i as u64) * PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    }
    let memory_error = |_| HypercallError::BadAddress;
    mem.write_slice(directory.as_bytes(), GuestAddress(copy.start)).map_err(memory_error)?;
    let mut table = [0u64; 512];
    for i in 0..tables {
        mem.read_slice(table.as_mut_bytes(), GuestAddress(source.start + i * PAGE_SIZE)).map_err(memory_error)?;
        for entry in &mut table {
            if *entry & PTE_PRESENT != 0 && *entry & PTE_NO_EXECUTE != 0 {
                *entry = (*entry & !PTE_PRESENT) | ARMED;
            }
        }
        mem.write_slice(table.as_bytes(), GuestAddress(copy.start + (1 + i) * PAGE_SIZE)).map_err(memory_error)?;
    }
    Ok(())
}

/// `CopyFrames`: copies the run `source` to `destination` (a realm's frames moving to another
/// node), a page at a time, after checking both runs.
fn copy_frames(mem: &GuestMemoryMmap, source: Range<u64>, destination: Range<u64>) -> Result<(), HypercallError> {
    in_ram(mem, &source)?;
    in_ram(mem, &destination)?;
    let mut page = [0u8; PAGE_SIZE as usize];
    for offset in (0..source.end - source.start).step_by(PAGE_SIZE as usize) {
        mem.read_slice(&mut page, GuestAddress(source.start + offset)).map_err(|_| HypercallError::BadAddress)?;
        mem.write_slice(&page, GuestAddress(destination.start + offset)).map_err(|_| HypercallError::BadAddress)?;
    }
    Ok(())
}

/// Why the kernel's latency report was not taken.
#[derive(Debug, thiserror::Error)]
enum LatencyReportError {
    #[error("the report at {0:#x} is not in guest RAM")]
    NotInRam(u64),
    #[error("the report at {0:#x} has a bad magic number")]
    BadMagic(u64),
    #[error("the report claims {claimed} nodes, and the machine has {nodes}")]
    NodeCount { claimed: u32, nodes: usize },
    #[error("the report names latency mode {0}, which does not exist")]
    UnknownMode(u32),
}

impl LatencyReportError {
    fn reply(&self) -> u32 {
        match self {
            Self::NotInRam(_) => HypercallError::BadAddress.reply(),
            _ => HypercallError::InvalidArgument.reply(),
        }
    }
}

/// Reads and checks the kernel's latency report for a machine of `nodes` nodes.
fn read_latency_report(
    mem: &GuestMemoryMmap,
    gpa: u64,
    nodes: usize,
) -> Result<GuestLatencyReport, LatencyReportError> {
    let mut report = LatencyReport::new_zeroed();
    mem.read_slice(report.as_mut_bytes(), GuestAddress(gpa)).map_err(|_| LatencyReportError::NotInRam(gpa))?;
    if report.magic != LATENCY_REPORT_MAGIC {
        return Err(LatencyReportError::BadMagic(gpa));
    }
    let claimed = report.node_count;
    if claimed as usize != nodes || nodes > MAX_NODES {
        return Err(LatencyReportError::NodeCount { claimed, nodes });
    }
    let mode = LatencyMode::from_raw(report.mode).ok_or(LatencyReportError::UnknownMode(report.mode))?;
    let square =
        |matrix: &[[u64; MAX_NODES]; MAX_NODES]| matrix[..nodes].iter().map(|row| row[..nodes].to_vec()).collect();
    Ok(GuestLatencyReport {
        mode: crate::topology::LatencyMode::from_abi(mode),
        traps: square(&report.traps),
        charged_ns: square(&report.charged_ns),
        charge_cycles: square(&report.charge_cycles),
        migrations: report.migrations,
    })
}

/// Fills `buffer` from the host's random source: the getrandom system call (no file to open,
/// so a vCPU thread's seccomp filter need not allow opening files).
fn getrandom(buffer: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        let rest = &mut buffer[filled..];
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match got {
            n if n > 0 => filled += n as usize,
            0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

/// Reads and checks the kernel's topology report.
fn read_report(mem: &GuestMemoryMmap, gpa: u64) -> Result<GuestReport, String> {
    let mut bytes = vec![0u8; core::mem::size_of::<TopologyReport>()];
    mem.read_slice(&mut bytes, GuestAddress(gpa)).map_err(|_| format!("the report at {gpa:#x} is not in guest RAM"))?;
    let report = TopologyReport::read_from_bytes(&bytes).map_err(|_| "the report has the wrong size".to_owned())?;
    if report.magic != TOPOLOGY_REPORT_MAGIC {
        return Err(format!("the report at {gpa:#x} has a bad magic number"));
    }
    let nodes = report.node_count as usize;
    if nodes == 0 || nodes > MAX_NODES {
        return Err(format!("the report claims {nodes} nodes"));
    }
    Ok(GuestReport {
        cpus_online: report.cpus_online,
        lapic_timer_hz: report.lapic_timer_hz,
        nodes: report.nodes[..nodes]
            .iter()
            .enumerate()
            .map(|(id, node)| NodeReport {
                id: id as u32,
                cpus: (0..MAX_CPUS as u32).filter(|&cpu| node.cpus[cpu as usize / 64] >> (cpu % 64) & 1 == 1).collect(),
                memory_bytes: node.memory_bytes,
            })
            .collect(),
        distances: report.distances[..nodes].iter().map(|row| row[..nodes].to_vec()).collect(),
        latency: None,
    })
}

/// The name of an x86 exception vector.
pub fn exception_name(vector: u64) -> String {
    let name = match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        2 => "non-maskable interrupt",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range exceeded (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack fault (#SS)",
        13 => "general protection fault (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating-point error (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating-point error (#XM)",
        20 => "virtualization exception (#VE)",
        21 => "control protection (#CP)",
        _ => return format!("exception {vector}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::console::CaptureSink;

    fn setup() -> (GuestMemoryMmap, CaptureSink, RunState) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        (mem, CaptureSink::default(), RunState::new(Instant::now(), &["p".to_owned()], 1))
    }

    /// Two nodes, 300 ns apart, charged in `account` mode (no real time spent).
    fn charger() -> LatencyCharger {
        let mut text = String::from("name = \"t\"\n");
        for id in 0..2 {
            text += &format!("[[node]]\nid = {id}\ncpus = [{id}]\nmemory = \"16M\"\n");
        }
        text += "[distances]\nmatrix = [[10, 30], [30, 10]]\n[latency]\nlocal_ns = 100\nmode = \"account\"\n";
        LatencyCharger::new(&crate::topology::Topology::parse(&text, "test").unwrap(), 2)
    }

    fn call(number: u64, args: [u64; 6], cr3: u64, mem: &GuestMemoryMmap, sink: &CaptureSink, state: &RunState) -> u32 {
        call_charging(number, args, cr3, mem, sink, state, &charger())
    }

    fn call_charging(
        number: u64,
        args: [u64; 6],
        cr3: u64,
        mem: &GuestMemoryMmap,
        sink: &CaptureSink,
        state: &RunState,
        latency: &LatencyCharger,
    ) -> u32 {
        let regs = kvm_regs {
            rax: number,
            rdi: args[0],
            rsi: args[1],
            rdx: args[2],
            rcx: args[3],
            r8: args[4],
            r9: args[5],
            ..Default::default()
        };
        let sregs = kvm_sregs { cr3, ..Default::default() };
        let context = HypercallContext { mem, sink, program_names: &["p".to_owned()], trace: None, latency };
        handle(0, &regs, &sregs, &context, state, &mut VcpuConsole::default())
    }

    /// The fuzzed machine: RAM at [0, 1 MiB) and [1.5 MiB, 1.75 MiB), with a hole between
    /// (runs that cross it are not RAM), small enough to compare whole after every call.
    const FUZZ_RAM: [(u64, u64); 2] = [(0, 0x10_0000), (0x18_0000, 0x4_0000)];
    /// Page tables the fuzzer builds: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000,
    /// mapping guest-virtual page i of [0, 2 MiB) as `FUZZ_PTES` says.
    const FUZZ_CR3: u64 = 0x1000;

    /// Whether [start, start + len) lies in the fuzzed RAM (in one region: they do not touch).
    fn fuzz_in_ram(start: u64, len: u64) -> bool {
        len == 0
            || FUZZ_RAM
                .iter()
                .any(|&(base, size)| start >= base && start.checked_add(len).is_some_and(|end| end <= base + size))
    }

    /// The whole fuzzed RAM, region by region.
    fn fuzz_snapshot(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
        FUZZ_RAM
            .iter()
            .map(|&(base, size)| {
                let slice = mem.get_slice(GuestAddress(base), size as usize).unwrap();
                // SAFETY: the slice is a live mapping of `size` bytes of guest RAM that only this
                // (single-threaded) test writes, and not while the copy is made.
                unsafe { std::slice::from_raw_parts(slice.ptr_guard().as_ptr(), size as usize) }.to_vec()
            })
            .collect()
    }

    /// Noise everywhere, then the page tables: user-writable, user read-only, supervisor,
    /// absent pages, and pages whose frame is in the hole, in a pattern.
    fn fuzz_fill(mem: &GuestMemoryMmap, seed: u64) {
        for &(base, size) in &FUZZ_RAM {
            let noise: Vec<u8> = (0..size).map(|i| ((i ^ seed).wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            mem.write_slice(&noise, GuestAddress(base)).unwrap();
        }
        let table = |at: u64, entries: &[u64]| mem.write_slice(entries.as_bytes(), GuestAddress(at)).unwrap();
        let directory = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
        let mut next = [0u64; 512];
        next[0] = 0x2000 | directory;
        table(0x1000, &next);
        next[0] = 0x3000 | directory;
        table(0x2000, &next);
        next[0] = 0x4000 | directory;
        table(0x3000, &next);
        let mut leaves = [0u64; 512];
        for (page, entry) in leaves.iter_mut().enumerate() {
            let frame = 0x8_0000 + (page as u64 % 64) * PAGE_SIZE;
            *entry = match page % 8 {
                0..=3 => frame | PTE_PRESENT | PTE_WRITABLE | PTE_USER,
                4 => frame | PTE_PRESENT | PTE_USER,
                5 => frame | PTE_PRESENT | PTE_WRITABLE,
                6 => 0,
                _ => (0x10_0000 + (page as u64 % 64) * PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_USER,
            };
        }
        table(0x4000, &leaves);
    }

    /// Guest-physical pieces of a user buffer, as the model sees it: `None` when some page is
    /// not mapped user-writable in RAM.
    fn fuzz_user_pieces(mem: &GuestMemoryMmap, cr3: u64, vaddr: u64, len: u64, write: bool) -> Option<Vec<(u64, u64)>> {
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < len {
            let va = vaddr.checked_add(done)?;
            let pa = memory::translate_for(mem, cr3, va, true, write).ok()?;
            let chunk = (PAGE_SIZE - va % PAGE_SIZE).min(len - done);
            if !fuzz_in_ram(pa, chunk) {
                return None;
            }
            pieces.push((pa, chunk));
            done += chunk;
        }
        Some(pieces)
    }

    /// A run of pages as the model sees it: aligned, not wrapping.
    fn fuzz_run(gpa: u64, pages: u64) -> Option<(u64, u64)> {
        let len = pages.checked_mul(PAGE_SIZE)?;
        (gpa.is_multiple_of(PAGE_SIZE) && gpa.checked_add(len).is_some()).then_some((gpa, len))
    }

    fn fuzz_overlap(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    }

    /// What the model expects of one call: the reply (or the set it must be in) and the ranges
    /// it may write, with what they must hold afterwards.
    enum Expect {
        /// Exactly this reply; nothing written.
        Reply(u32),
        /// One of these replies; nothing written.
        OneOf(Vec<u32>),
        /// Success writes `writes` (guest-physical start, bytes; `None`: any bytes) and replies
        /// `reply`; failure replies one of `errors` with nothing written.
        Writes { valid: bool, reply: u32, writes: Vec<(u64, Option<Vec<u8>>)>, lens: Vec<u64>, errors: Vec<u32> },
    }

    fn fuzz_read(before: &[Vec<u8>], gpa: u64, len: u64) -> Vec<u8> {
        if len == 0 {
            return Vec::new();
        }
        let (index, &(base, _)) =
            FUZZ_RAM.iter().enumerate().find(|(_, &(base, size))| gpa >= base && gpa + len <= base + size).unwrap();
        before[index][(gpa - base) as usize..(gpa - base + len) as usize].to_vec()
    }

    /// The model: what hypercall `number` with `args` must do to the machine whose RAM was
    /// `before`, judged independently of the handler's own decoder.
    fn fuzz_expect(number: u64, args: [u64; 6], cr3: u64, mem: &GuestMemoryMmap, before: &[Vec<u8>]) -> Expect {
        use HypercallError::{BadAddress, InvalidArgument, UnknownHypercall};
        let (bad, invalid) = (BadAddress.reply(), InvalidArgument.reply());
        let Some(call) = Hypercall::from_raw(number) else { return Expect::Reply(UnknownHypercall.reply()) };
        match call {
            Hypercall::ConsoleWrite => {
                let user = args[2] & CONSOLE_USER_BUFFER != 0;
                let readable = args[1] <= MAX_CONSOLE_WRITE && fuzz_read_pieces(mem, cr3, args[0], args[1], user);
                // The writer: the kernel, or the one program of the fuzzed boot.
                let writer_valid = args[3] == psyche_abi::hypercall::CONSOLE_KERNEL || args[3] == 0;
                Expect::Reply(if args[1] > MAX_CONSOLE_WRITE || !writer_valid {
                    invalid
                } else if readable {
                    args[1] as u32
                } else {
                    bad
                })
            }
            Hypercall::ReportTopology | Hypercall::ReportLatency => Expect::OneOf(vec![0, bad, invalid]),
            Hypercall::TraceFlush => Expect::Reply(0),
            Hypercall::LatencyCharge => {
                Expect::Reply(if args[0] < 2 && args[1] < 2 && args[0] != args[1] { 300 } else { invalid })
            }
            Hypercall::ZeroFrames => {
                let run = fuzz_run(args[0], args[1]);
                let valid = run.is_some_and(|(gpa, len)| fuzz_in_ram(gpa, len));
                let writes = run
                    .filter(|_| valid)
                    .map(|(gpa, len)| vec![(gpa, Some(vec![0u8; len as usize]))])
                    .unwrap_or_default();
                Expect::Writes { valid, reply: 0, writes, lens: vec![], errors: vec![bad, invalid] }
            }
            Hypercall::CopyFrames => {
                let (source, destination) = (fuzz_run(args[0], args[2]), fuzz_run(args[1], args[2]));
                let valid = args[2] <= MAX_REALM_PAGES
                    && match (source, destination) {
                        (Some(s), Some(d)) => !fuzz_overlap(s, d) && fuzz_in_ram(s.0, s.1) && fuzz_in_ram(d.0, d.1),
                        _ => false,
                    };
                let writes = match (valid, source, destination) {
                    (true, Some(s), Some(d)) => vec![(d.0, Some(fuzz_read(before, s.0, s.1)))],
                    _ => vec![],
                };
                Expect::Writes { valid, reply: 0, writes, lens: vec![], errors: vec![bad, invalid] }
            }
            Hypercall::ArmedCopy => {
                let tables = args[2];
                let (source, copy) =
                    (fuzz_run(args[0], tables), tables.checked_add(1).and_then(|n| fuzz_run(args[1], n)));
                let valid = (1..=MAX_REALM_TABLES).contains(&tables)
                    && match (source, copy) {
                        (Some(s), Some(c)) => !fuzz_overlap(s, c) && fuzz_in_ram(s.0, s.1) && fuzz_in_ram(c.0, c.1),
                        _ => false,
                    };
                let mut writes = vec![];
                if let (true, Some(s), Some(c)) = (valid, source, copy) {
                    let mut directory = [0u64; 512];
                    for i in 0..tables {
                        directory[i as usize] = (c.0 + (1 + i) * PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_USER;
                    }
                    writes.push((c.0, Some(directory.as_bytes().to_vec())));
                    let mut tables_bytes = fuzz_read(before, s.0, s.1);
                    for entry in tables_bytes.chunks_exact_mut(8) {
                        let value = u64::from_le_bytes(entry.try_into().unwrap());
                        if value & PTE_PRESENT != 0 && value & PTE_NO_EXECUTE != 0 {
                            entry.copy_from_slice(&((value & !PTE_PRESENT) | ARMED).to_le_bytes());
                        }
                    }
                    writes.push((c.0 + PAGE_SIZE, Some(tables_bytes)));
                }
                Expect::Writes { valid, reply: 0, writes, lens: vec![], errors: vec![bad, invalid] }
            }
            Hypercall::Random => {
                let pieces =
                    (args[1] <= PAGE_SIZE).then(|| fuzz_user_pieces(mem, cr3, args[0], args[1], true)).flatten();
                let valid = pieces.is_some();
                let pieces = pieces.unwrap_or_default();
                Expect::Writes {
                    valid,
                    reply: args[1] as u32,
                    writes: pieces.iter().map(|&(pa, _)| (pa, None)).collect(),
                    lens: pieces.iter().map(|&(_, len)| len).collect(),
                    errors: vec![bad, invalid],
                }
            }
            Hypercall::ProgramStart
            | Hypercall::ProgramExit
            | Hypercall::ProgramFault
            | Hypercall::Shutdown
            | Hypercall::KernelFault
            | Hypercall::KernelPanic
            | Hypercall::DomainTerminated
            | Hypercall::Mark => Expect::Reply(0),
        }
    }

    fn fuzz_read_pieces(mem: &GuestMemoryMmap, cr3: u64, vaddr: u64, len: u64, user: bool) -> bool {
        let mut done = 0;
        while done < len {
            let Some(va) = vaddr.checked_add(done) else { return false };
            let Ok(pa) = memory::translate_for(mem, cr3, va, user, false) else { return false };
            let chunk = (PAGE_SIZE - va % PAGE_SIZE).min(len - done);
            if !fuzz_in_ram(pa, chunk) {
                return false;
            }
            done += chunk;
        }
        true
    }

    /// Checks RAM after a call against `before`: unchanged except in `allowed` (guest-physical
    /// start, expected bytes or `None` for any, length).
    fn fuzz_check_ram(after: &[Vec<u8>], before: &[Vec<u8>], allowed: &[(u64, Option<Vec<u8>>, u64)], what: &str) {
        for (index, &(base, size)) in FUZZ_RAM.iter().enumerate() {
            let mut expected = before[index].clone();
            for (start, bytes, len) in allowed {
                if *start < base || start + len > base + size {
                    continue;
                }
                let range = (start - base) as usize..(start - base + len) as usize;
                match bytes {
                    Some(bytes) => expected[range].copy_from_slice(bytes),
                    // Any bytes will do there.
                    None => expected[range.clone()].copy_from_slice(&after[index][range]),
                }
            }
            if after[index] != expected {
                let offset = (0..size as usize).find(|&i| after[index][i] != expected[i]).unwrap_or(0);
                panic!(
                    "{what}: guest RAM at {:#x} is {:#x}, should be {:#x}",
                    base + offset as u64,
                    after[index][offset],
                    expected[offset]
                );
            }
        }
    }

    #[test]
    fn every_hypercall_with_wild_arguments_replies_validly_and_writes_only_what_it_may() {
        let ranges: Vec<_> = FUZZ_RAM.iter().map(|&(base, size)| (GuestAddress(base), size as usize)).collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        let sink = CaptureSink::default();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut replies = std::collections::BTreeMap::<(u64, bool), u32>::new();
        for round in 0..4000u64 {
            if round % 200 == 0 {
                fuzz_fill(&mem, round);
            }
            // Every number the decoder knows, equally often, and unknown ones (0, just past
            // the last, anything).
            let number = match next() % 20 {
                0 => 0,
                18 => 18 + next() % 1000,
                19 => next(),
                n => n,
            };
            // Half the time arguments a kernel could mean (in RAM, aligned, small counts, the
            // mapped window), so that valid requests are common; the other half anything.
            let plausible = next() % 2 == 0;
            let mut arg = |small: u64| match next() % 6 {
                _ if plausible && small == 0 => (next() % 0x1C_0000) & !0xFFF,
                _ if plausible => next() % small,
                0 => next(),
                1 => next() % small.max(2),
                // Page aligned, in the first region, in the hole, in the second, or past it.
                2 => (next() % 0x1C_0000) & !0xFFF,
                3 => next() % 0x20_0000,
                4 => FUZZ_RAM[1].0 + FUZZ_RAM[1].1 - (1 + next() % 4) * PAGE_SIZE,
                _ => u64::MAX - next() % 0x10_000,
            };
            // Per argument, what "small" means for this call (0: a frame address).
            let shape: [u64; 6] = match number {
                1 => [0x20_0000, 300, 2, 2, 2, 2],
                11 => [0, 8, 2, 2, 2, 2],
                12 => [0x20_0000, 4200, 2, 2, 2, 2],
                14 => [3, 3, 0x20_0000, 4, 2, 2],
                15 => [0, 0, 3, 2, 2, 2],
                16 => [0, 0, 5, 2, 2, 2],
                _ => [0x20_0000, 70, 40, 4, 16, 16],
            };
            let args = shape.map(&mut arg);
            let cr3 = if next() % 4 == 0 { next() % 0x20_0000 } else { FUZZ_CR3 };
            let before = fuzz_snapshot(&mem);
            let expect = fuzz_expect(number, args, cr3, &mem, &before);
            let state = RunState::new(Instant::now(), &["p".to_owned()], 1);
            let reply = call(number, args, cr3, &mem, &sink, &state);
            let after = fuzz_snapshot(&mem);
            let what = format!("round {round}: hypercall {number} {args:#x?} cr3 {cr3:#x}: reply {reply:#x}");
            match expect {
                Expect::Reply(expected) => {
                    assert_eq!(reply, expected, "{what}");
                    fuzz_check_ram(&after, &before, &[], &what);
                }
                Expect::OneOf(allowed) => {
                    assert!(allowed.contains(&reply), "{what}: not one of {allowed:#x?}");
                    fuzz_check_ram(&after, &before, &[], &what);
                }
                Expect::Writes { valid: true, reply: expected, writes, lens, .. } => {
                    assert_eq!(reply, expected, "{what}: a valid request");
                    let allowed: Vec<_> = writes
                        .into_iter()
                        .enumerate()
                        .map(|(i, (start, bytes))| {
                            let len = bytes.as_ref().map_or_else(|| lens[i], |b| b.len() as u64);
                            (start, bytes, len)
                        })
                        .collect();
                    fuzz_check_ram(&after, &before, &allowed, &what);
                }
                Expect::Writes { valid: false, errors, .. } => {
                    assert!(errors.contains(&reply), "{what}: an invalid request must be refused");
                    fuzz_check_ram(&after, &before, &[], &what);
                }
            }
            *replies.entry((number.min(18), HypercallError::from_reply(reply).is_none())).or_default() += 1;
        }
        // The fuzzer reached every hypercall, and both success and refusal of those that can
        // be refused.
        for number in 0..=18u64 {
            assert!(replies.keys().any(|&(n, _)| n == number), "hypercall {number} never generated: {replies:?}");
        }
        for call in [1u64, 11, 12, 14, 15, 16] {
            assert!(replies.contains_key(&(call, true)), "hypercall {call} never succeeded: {replies:?}");
            assert!(replies.contains_key(&(call, false)), "hypercall {call} never refused: {replies:?}");
        }
    }

    #[test]
    fn unknown_numbers_and_bad_buffers_are_refused() {
        let (mem, sink, state) = setup();
        assert_eq!(call(999, [0; 6], 0, &mem, &sink, &state), HypercallError::UnknownHypercall.reply());
        // CR3 outside guest RAM: nothing is mapped.
        let reply = call(Hypercall::ConsoleWrite as u64, [0x1000, 5, 0, 0, 0, 0], 1 << 40, &mem, &sink, &state);
        assert_eq!(reply, HypercallError::BadAddress.reply());
        let reply = call(Hypercall::ConsoleWrite as u64, [0x1000, 1 << 20, 0, 0, 0, 0], 0, &mem, &sink, &state);
        assert_eq!(reply, HypercallError::InvalidArgument.reply());
        assert!(sink.lines().is_empty());
    }

    #[test]
    fn console_writes_are_tagged_with_their_writer_and_a_program_s_end_prints_its_last_words() {
        let (mem, sink, state) = setup();
        // PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000; virtual 0x5000 -> 0x9000 (user).
        let flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
        for (table, next) in [(0x1000u64, 0x2000u64), (0x2000, 0x3000), (0x3000, 0x4000), (0x4000 + 5 * 8, 0x9000)] {
            mem.write_obj(next | flags, GuestAddress(table)).unwrap();
        }
        mem.write_slice(b"half\x1b\nkernel line\n", GuestAddress(0x9000)).unwrap();
        let regs = |rax: u64, args: [u64; 4]| kvm_regs {
            rax,
            rdi: args[0],
            rsi: args[1],
            rdx: args[2],
            rcx: args[3],
            ..Default::default()
        };
        let sregs = kvm_sregs { cr3: 0x1000, ..Default::default() };
        let latency = charger();
        let names = ["p".to_owned()];
        let context =
            HypercallContext { mem: &mem, sink: &sink, program_names: &names, trace: None, latency: &latency };
        let mut console = VcpuConsole::default();
        let mut hypercall = |regs: kvm_regs| handle(2, &regs, &sregs, &context, &state, &mut console);
        let write = Hypercall::ConsoleWrite as u64;
        // Program 0 prints half a line; the kernel a whole one on the same vCPU.
        assert_eq!(hypercall(regs(write, [0x5000, 5, CONSOLE_USER_BUFFER, 0])), 5);
        assert_eq!(hypercall(regs(write, [0x5006, 12, 0, psyche_abi::hypercall::CONSOLE_KERNEL])), 12);
        // A writer that is neither the kernel nor a program of this boot is refused.
        for writer in [1, 1 << 32, u64::MAX - 1] {
            assert_eq!(hypercall(regs(write, [0x5000, 5, 0, writer])), HypercallError::InvalidArgument.reply());
        }
        assert_eq!(sink.transcript(), "[vcpu 2 kernel] kernel line\n");
        // Program 0's exit prints its partial line.
        assert_eq!(hypercall(regs(Hypercall::ProgramExit as u64, [0, 0, 0, 0])), 0);
        assert_eq!(sink.transcript(), "[vcpu 2 kernel] kernel line\n[vcpu 2 p#0] half\\x1b\n");
    }

    #[test]
    fn an_unreadable_report_ends_the_run_as_a_crash() {
        let (mem, sink, state) = setup();
        call(Hypercall::ReportTopology as u64, [0x2000, 0, 0, 0, 0, 0], 0, &mem, &sink, &state);
        match state.wait(Some(Duration::from_secs(1))) {
            GuestEnd::KernelCrash { reason: CrashReason::BadReport(problem), .. } => {
                assert!(problem.contains("bad magic number"), "{problem}")
            }
            other => panic!("expected a crash for a bad report, got {other:?}"),
        }
    }

    fn read_table(mem: &GuestMemoryMmap, gpa: u64) -> [u64; 512] {
        let mut table = [0u64; 512];
        mem.read_slice(table.as_mut_bytes(), GuestAddress(gpa)).unwrap();
        table
    }

    #[test]
    fn the_armed_copy_arms_only_present_no_execute_entries() {
        let (mem, sink, state) = setup();
        let (source, copy) = (0x10_0000u64, 0x20_0000u64);
        let data = 0x0030_5000 | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_NO_EXECUTE;
        let code = 0x0030_6000 | PTE_PRESENT | PTE_USER;
        let absent_no_execute = 0x0030_7000 | PTE_NO_EXECUTE;
        let mut first = [0u64; 512];
        (first[0], first[1], first[2], first[511]) = (data, code, absent_no_execute, data | (1 << 5));
        let mut second = [0u64; 512];
        second[7] = data;
        mem.write_slice(first.as_bytes(), GuestAddress(source)).unwrap();
        mem.write_slice(second.as_bytes(), GuestAddress(source + PAGE_SIZE)).unwrap();

        assert_eq!(call(Hypercall::ArmedCopy as u64, [source, copy, 2, 0, 0, 0], 0, &mem, &sink, &state), 0);
        let directory = read_table(&mem, copy);
        let table_flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
        assert_eq!(directory[0], (copy + PAGE_SIZE) | table_flags);
        assert_eq!(directory[1], (copy + 2 * PAGE_SIZE) | table_flags);
        assert!(directory[2..].iter().all(|&e| e == 0));
        let armed = |entry: u64| (entry & !PTE_PRESENT) | ARMED;
        let copied = read_table(&mem, copy + PAGE_SIZE);
        assert_eq!(copied[0], armed(data));
        assert_eq!(copied[1], code, "code pages are never armed");
        assert_eq!(copied[2], absent_no_execute, "an absent page stays as it is");
        assert_eq!(copied[511], armed(data | (1 << 5)), "other bits are kept");
        assert!(copied[3..511].iter().all(|&e| e == 0));
        assert_eq!(read_table(&mem, copy + 2 * PAGE_SIZE)[7], armed(data));
        assert_eq!(read_table(&mem, source), first, "the realm's own tables are untouched");
    }

    #[test]
    fn bad_armed_copies_are_refused_before_anything_is_written() {
        let (mem, sink, state) = setup();
        let armed_copy = |args: [u64; 3]| {
            call(Hypercall::ArmedCopy as u64, [args[0], args[1], args[2], 0, 0, 0], 0, &mem, &sink, &state)
        };
        let invalid = HypercallError::InvalidArgument.reply();
        let bad_address = HypercallError::BadAddress.reply();
        mem.write_slice(&[0xAAu8; 8], GuestAddress(0xFF_F000)).unwrap();
        assert_eq!(armed_copy([0x10_0000, 0x20_0000, 0]), invalid, "no tables");
        assert_eq!(armed_copy([0x10_0000, 0x20_0000, MAX_REALM_TABLES + 1]), invalid, "too many tables");
        assert_eq!(armed_copy([0x10_0008, 0x20_0000, 1]), invalid, "unaligned source");
        assert_eq!(armed_copy([0x10_0000, 0x20_0800, 1]), invalid, "unaligned copy");
        assert_eq!(armed_copy([0x10_0000, 0x10_1000, 2]), invalid, "overlapping");
        assert_eq!(armed_copy([1 << 40, 0x20_0000, 1]), bad_address, "source outside RAM");
        assert_eq!(armed_copy([!0xFFFu64, 0x20_0000, 2]), bad_address, "source wrapping");
        // The copy's directory fits at the end of RAM; its table does not.
        assert_eq!(armed_copy([0x10_0000, 0xFF_F000, 1]), bad_address, "copy leaving RAM");
        assert_eq!(read_table(&mem, 0xFF_F000)[0], 0xAAAA_AAAA_AAAA_AAAA);
        assert!(state.latency_report().is_none() && !state.stopping());
    }

    #[test]
    fn copy_frames_copies_whole_pages_and_refuses_bad_runs() {
        let (mem, sink, state) = setup();
        let copy_frames = |args: [u64; 3]| {
            call(Hypercall::CopyFrames as u64, [args[0], args[1], args[2], 0, 0, 0], 0, &mem, &sink, &state)
        };
        let pattern: Vec<u8> = (0..3 * PAGE_SIZE as usize).map(|i| (i * 7 % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x40_0000)).unwrap();
        assert_eq!(copy_frames([0x40_0000, 0x80_0000, 3]), 0);
        let mut copied = vec![0u8; pattern.len() + 8];
        mem.read_slice(&mut copied, GuestAddress(0x80_0000)).unwrap();
        assert_eq!(&copied[..pattern.len()], &pattern[..]);
        assert_eq!(&copied[pattern.len()..], &[0u8; 8], "not a byte past the run");
        assert_eq!(copy_frames([0x40_0000, 0x80_0000, 0]), 0, "nothing to copy");

        let invalid = HypercallError::InvalidArgument.reply();
        let bad_address = HypercallError::BadAddress.reply();
        assert_eq!(copy_frames([0x40_0001, 0x80_0000, 1]), invalid);
        assert_eq!(copy_frames([0x40_0000, 0x80_0010, 1]), invalid);
        assert_eq!(copy_frames([0x40_0000, 0x40_1000, 2]), invalid, "overlapping");
        assert_eq!(copy_frames([0x40_0000, 0x80_0000, MAX_REALM_PAGES + 1]), invalid);
        assert_eq!(copy_frames([0x40_0000, 0xFF_F000, 2]), bad_address, "destination leaving RAM");
        assert_eq!(copy_frames([1 << 40, 0x80_0000, 1]), bad_address);
        assert_eq!(copy_frames([0x40_0000, !0xFFFu64, 1]), bad_address);
    }

    #[test]
    fn latency_charges_reply_the_nanoseconds_charged() {
        let (mem, sink, state) = setup();
        let latency = charger();
        let charge = |from, to| {
            let args = [from, to, 0x4000_0000, 1, 0, 0];
            call_charging(Hypercall::LatencyCharge as u64, args, 0, &mem, &sink, &state, &latency)
        };
        assert_eq!(charge(0, 1), 300);
        assert_eq!(charge(1, 0), 300);
        assert_eq!(charge(1, 1), HypercallError::InvalidArgument.reply(), "local accesses are free");
        assert_eq!(charge(2, 0), HypercallError::InvalidArgument.reply());
        let totals = latency.totals();
        assert_eq!(totals.charges, vec![vec![0, 1], vec![1, 0]]);
        assert_eq!(totals.virtual_ns[0], 600, "all made by vCPU 0");
    }

    #[test]
    fn the_latency_report_is_kept_and_a_bad_one_is_refused_with_a_note() {
        let (mem, sink, state) = setup();
        let gpa = 0x30_0000;
        let mut report = LatencyReport::new_zeroed();
        (report.magic, report.mode, report.node_count, report.migrations) = (LATENCY_REPORT_MAGIC, 3, 2, 4);
        report.traps[0][1] = 5;
        report.charged_ns[0][1] = 1500;
        report.traps[2][2] = 99; // outside the 2 x 2 the machine has: not reported
        let report_at = |report: &LatencyReport| {
            mem.write_slice(report.as_bytes(), GuestAddress(gpa)).unwrap();
            call(Hypercall::ReportLatency as u64, [gpa, 0, 0, 0, 0, 0], 0, &mem, &sink, &state)
        };

        let bad = LatencyReport { magic: 7, ..report };
        assert_eq!(report_at(&bad), HypercallError::InvalidArgument.reply());
        let bad = LatencyReport { node_count: 3, ..report };
        assert_eq!(report_at(&bad), HypercallError::InvalidArgument.reply());
        let bad = LatencyReport { mode: 9, ..report };
        assert_eq!(report_at(&bad), HypercallError::InvalidArgument.reply());
        let outside = call(Hypercall::ReportLatency as u64, [1 << 40, 0, 0, 0, 0, 0], 0, &mem, &sink, &state);
        assert_eq!(outside, HypercallError::BadAddress.reply());
        assert_eq!(sink.notes().len(), 4, "{:?}", sink.notes());
        assert!(sink.notes()[0].contains("bad magic number"), "{:?}", sink.notes());
        assert!(state.latency_report().is_none() && !state.stopping(), "a bad report does not end the run");

        assert_eq!(report_at(&report), 0);
        let kept = state.latency_report().unwrap();
        assert_eq!(kept.mode, crate::topology::LatencyMode::Account);
        assert_eq!(kept.traps, vec![vec![0, 5], vec![0, 0]]);
        assert_eq!(kept.charged_ns, vec![vec![0, 1500], vec![0, 0]]);
        assert_eq!(kept.migrations, 4);
    }
}

/// Property tests of the decoder: whatever the guest leaves in the registers, decoding gives a
/// typed request that keeps the decoder's promises, or a typed error, and never panics.
#[cfg(test)]
mod decode_properties {
    use proptest::prelude::*;

    use super::*;

    /// Register values of every kind: anything, small counts, page-aligned addresses, the top.
    fn register() -> impl Strategy<Value = u64> {
        prop_oneof![
            any::<u64>(),
            0u64..600,
            (0u64..0x10_0000).prop_map(|page| page * PAGE_SIZE),
            (0u64..0x1000).prop_map(|back| u64::MAX - back),
        ]
    }

    /// Hypercall numbers: every known one, its neighbours, anything.
    fn number() -> impl Strategy<Value = u64> {
        prop_oneof![4 => 0u64..20, 1 => any::<u64>(), 1 => (0u64..4).prop_map(|n| (1u64 << 32) + n)]
    }

    /// Arguments: any registers, or the shape of a frame request (two page-aligned addresses
    /// and a count), so that requests the decoder accepts are common too.
    fn arguments() -> impl Strategy<Value = [u64; 6]> {
        let aligned = || (0u64..0x4000).prop_map(|page| page * PAGE_SIZE);
        prop_oneof![
            proptest::array::uniform6(register()),
            (aligned(), aligned(), 0u64..140, proptest::array::uniform3(register()))
                .prop_map(|(a0, a1, a2, [a3, a4, a5])| [a0, a1, a2, a3, a4, a5]),
        ]
    }

    fn regs(rax: u64, args: [u64; 6], noise: u64) -> kvm_regs {
        kvm_regs {
            rax,
            rdi: args[0],
            rsi: args[1],
            rdx: args[2],
            rcx: args[3],
            r8: args[4],
            r9: args[5],
            // Registers that carry nothing must not matter.
            rbx: noise,
            rbp: noise.rotate_left(7),
            r10: !noise,
            rip: noise ^ 0x5555,
            ..Default::default()
        }
    }

    fn pages(run: &Range<u64>) -> u64 {
        (run.end - run.start) / PAGE_SIZE
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        #[test]
        fn any_registers_decode_to_a_checked_request_or_a_typed_error(
            rax in number(),
            args in arguments(),
            noise in any::<u64>(),
        ) {
            let decoded = Request::decode(&regs(rax, args, noise));
            prop_assert_eq!(&decoded, &Request::decode(&regs(rax, args, !noise)), "only RAX and the arguments count");
            let [a0, a1, a2, ..] = args;
            match (Hypercall::from_raw(rax), decoded) {
                (None, result) => prop_assert_eq!(result, Err(HypercallError::UnknownHypercall)),
                (Some(call), Ok(request)) => {
                    prop_assert_eq!(request.hypercall(), call);
                    match request {
                        Request::ConsoleWrite { vaddr, len, user_buffer, writer } => {
                            prop_assert!((vaddr, len as u64) == (a0, a1) && len as u64 <= MAX_CONSOLE_WRITE);
                            prop_assert_eq!(user_buffer, a2 & CONSOLE_USER_BUFFER != 0);
                            prop_assert_eq!(writer, args[3]);
                        }
                        Request::ZeroFrames { frames } => {
                            prop_assert!(frames.start == a0 && frames.start % PAGE_SIZE == 0);
                            prop_assert!(frames.start <= frames.end && pages(&frames) == a1);
                        }
                        Request::Random { vaddr, len } => {
                            prop_assert!((vaddr, len as u64) == (a0, a1) && len as u64 <= PAGE_SIZE);
                        }
                        Request::ArmedCopy { source, copy } => {
                            prop_assert!((1..=MAX_REALM_TABLES).contains(&a2));
                            prop_assert!(source.start == a0 && pages(&source) == a2 && source.start <= source.end);
                            prop_assert!(copy.start == a1 && pages(&copy) == a2 + 1 && copy.start <= copy.end);
                            prop_assert!(source.start % PAGE_SIZE == 0 && copy.start % PAGE_SIZE == 0);
                            prop_assert!(source.end <= copy.start || copy.end <= source.start, "the runs overlap");
                        }
                        Request::CopyFrames { source, destination } => {
                            prop_assert!(a2 <= MAX_REALM_PAGES);
                            prop_assert!(source.start == a0 && destination.start == a1);
                            prop_assert!(pages(&source) == a2 && pages(&destination) == a2);
                            prop_assert!(source.start % PAGE_SIZE == 0 && destination.start % PAGE_SIZE == 0);
                            prop_assert!(source.end <= destination.start || destination.end <= source.start || a2 == 0);
                        }
                        Request::Shutdown { code } => prop_assert_eq!(code, a0),
                        Request::LatencyCharge { from, to } => prop_assert_eq!((from, to), (a0, a1)),
                        _ => {}
                    }
                }
                (Some(call), Err(error)) => {
                    // Only requests with lengths, counts or runs can be refused by the decoder,
                    // and never as unknown.
                    prop_assert!(matches!(error, HypercallError::InvalidArgument | HypercallError::BadAddress), "{:?}", error);
                    prop_assert!(
                        matches!(
                            call,
                            Hypercall::ConsoleWrite
                                | Hypercall::ZeroFrames
                                | Hypercall::Random
                                | Hypercall::ArmedCopy
                                | Hypercall::CopyFrames
                        ),
                        "{:?} refused: {:?}",
                        call,
                        error
                    );
                }
            }
        }
    }
}

//! The VMM side of hypercalls: decode the registers of an `in` from the hypercall port into a
//! request, check it, act. Nothing the guest passes can make this panic: bad numbers and bad
//! arguments get an error reply, and a kernel that reports garbage is stopped as crashed.

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

/// Handles the hypercall in `regs` made by vCPU `vcpu`; returns the 32-bit reply.
pub fn handle(
    vcpu: u32,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    context: &HypercallContext<'_>,
    state: &RunState,
    console: &mut VcpuConsole,
) -> u32 {
    let args = [regs.rdi, regs.rsi, regs.rdx, regs.rcx, regs.r8, regs.r9];
    let Some(call) = Hypercall::from_raw(regs.rax) else {
        return HypercallError::UnknownHypercall.reply();
    };
    match call {
        Hypercall::ConsoleWrite => {
            let (vaddr, len, flags) = (args[0], args[1], args[2]);
            let writer = Writer::from_raw(args[3], context.program_names.len());
            let Some(writer) = writer.filter(|_| len <= MAX_CONSOLE_WRITE) else {
                return HypercallError::InvalidArgument.reply();
            };
            let require_user = flags & CONSOLE_USER_BUFFER != 0;
            match memory::read_virtual(context.mem, sregs.cr3, vaddr, len as usize, require_user) {
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
        Hypercall::ReportTopology => match read_report(context.mem, args[0]) {
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
        Hypercall::ProgramStart => {
            state.program_started(args[0]);
            0
        }
        Hypercall::ProgramExit => {
            context.flush_program(vcpu, args[0], console);
            state.program_ended(args[0], ProgramEnd::Exited { code: args[1] });
            0
        }
        Hypercall::ProgramFault => {
            let (vector, error_code, rip, cr2) = (args[1], args[2], args[3], args[4]);
            context.flush_program(vcpu, args[0], console);
            context.sink.vmm_note(&format!(
                "program {} killed on vCPU {vcpu}: {} at rip {rip:#x}, error code {error_code:#x}{}",
                context.program_name(args[0]),
                exception_name(vector),
                if vector == 14 { format!(", address {cr2:#x}") } else { String::new() },
            ));
            state.program_ended(args[0], ProgramEnd::Killed { vector, error_code, rip, cr2 });
            0
        }
        Hypercall::Shutdown => {
            console.flush_all(vcpu, context.program_names, context.sink);
            state.end(GuestEnd::Shutdown { code: args[0] });
            0
        }
        Hypercall::KernelFault => {
            console.flush_all(vcpu, context.program_names, context.sink);
            let reason = CrashReason::Exception {
                vector: args[0],
                error_code: args[1],
                rip: args[2],
                cr2: args[3],
                cs: args[4],
                rsp: args[5],
            };
            state.end(GuestEnd::crash(vcpu, reason, None));
            0
        }
        // RDI = the ring to drain. Without a trace session there is nothing to drain: the reply
        // says nothing was consumed, and a kernel that traces anyway counts what it drops.
        Hypercall::TraceFlush => context.trace.map_or(0, |trace| trace.flush(vcpu, args[0])),
        Hypercall::KernelPanic => {
            console.flush_all(vcpu, context.program_names, context.sink);
            state.end(GuestEnd::crash(vcpu, CrashReason::KernelPanic, None));
            0
        }
        Hypercall::DomainTerminated => {
            let (program, reason, address, realm, rip) = (args[0], args[1], args[2], args[3], args[4]);
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
        Hypercall::Mark => {
            state.mark(vcpu, args[1], args[0]);
            0
        }
        Hypercall::ZeroFrames => {
            let (paddr, pages) = (args[0], args[1]);
            match pages.checked_mul(PAGE_SIZE).and_then(|len| usize::try_from(len).ok()) {
                Some(_) if paddr % PAGE_SIZE == 0 => {
                    // A page at a time: a range that leaves guest RAM fails where it leaves.
                    let zeroes = [0u8; PAGE_SIZE as usize];
                    let ok = (0..pages)
                        .all(|page| context.mem.write_slice(&zeroes, GuestAddress(paddr + page * PAGE_SIZE)).is_ok());
                    if ok {
                        0
                    } else {
                        HypercallError::BadAddress.reply()
                    }
                }
                _ => HypercallError::InvalidArgument.reply(),
            }
        }
        // RDX (the page) and RCX (the realm) are for the kernel's own counts and trace.
        Hypercall::LatencyCharge => match context.latency.charge(vcpu, args[0], args[1], &|| state.stopping()) {
            Ok(ns) => ns,
            Err(error) => error.reply(),
        },
        Hypercall::ArmedCopy => reply(armed_copy(context.mem, args[0], args[1], args[2])),
        Hypercall::CopyFrames => reply(copy_frames(context.mem, args[0], args[1], args[2])),
        Hypercall::ReportLatency => match read_latency_report(context.mem, args[0], context.latency.node_count()) {
            Ok(report) => {
                state.set_latency_report(report);
                0
            }
            Err(error) => {
                context.sink.vmm_note(&format!("ignored the kernel's latency report from vCPU {vcpu}: {error}"));
                error.reply()
            }
        },
        Hypercall::Random => {
            let (vaddr, len) = (args[0], args[1]);
            if len > PAGE_SIZE {
                return HypercallError::InvalidArgument.reply();
            }
            let mut bytes = vec![0u8; len as usize];
            if getrandom(&mut bytes).is_err() {
                return HypercallError::InvalidArgument.reply();
            }
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
const MAX_REALM_TABLES: u64 = MAX_REALM_PAGES / 512;
const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_NO_EXECUTE: u64 = 1 << 63;

/// The guest-physical range of `pages` pages at `gpa`, checked: page aligned, not wrapping,
/// and wholly in guest RAM.
fn page_run(mem: &GuestMemoryMmap, gpa: u64, pages: u64) -> Result<std::ops::Range<u64>, HypercallError> {
    if !gpa.is_multiple_of(PAGE_SIZE) {
        return Err(HypercallError::InvalidArgument);
    }
    let end = pages.checked_mul(PAGE_SIZE).and_then(|len| gpa.checked_add(len)).ok_or(HypercallError::BadAddress)?;
    let len = usize::try_from(end - gpa).map_err(|_| HypercallError::BadAddress)?;
    if !GuestMemoryBackend::check_range(mem, GuestAddress(gpa), len) {
        return Err(HypercallError::BadAddress);
    }
    Ok(gpa..end)
}

fn overlap(a: &std::ops::Range<u64>, b: &std::ops::Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// `ArmedCopy`: builds, in the zeroed run at `copy`, the armed copy of the `tables` contiguous
/// page tables at `source`: a directory whose entry i points at copy table i, and copy tables
/// in which every present no-execute entry (a data page) is made not present and armed. Code
/// pages (executable) stay as they are. Everything is checked before anything is written.
fn armed_copy(mem: &GuestMemoryMmap, source: u64, copy: u64, tables: u64) -> Result<(), HypercallError> {
    if tables == 0 || tables > MAX_REALM_TABLES {
        return Err(HypercallError::InvalidArgument);
    }
    let source_run = page_run(mem, source, tables)?;
    let copy_run = page_run(mem, copy, 1 + tables)?;
    if overlap(&source_run, &copy_run) {
        return Err(HypercallError::InvalidArgument);
    }
    let mut directory = [0u64; 512];
    for (i, entry) in directory.iter_mut().take(tables as usize).enumerate() {
        *entry = (copy + (1 + i as u64) * PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    }
    let memory_error = |_| HypercallError::BadAddress;
    mem.write_slice(directory.as_bytes(), GuestAddress(copy)).map_err(memory_error)?;
    let mut table = [0u64; 512];
    for i in 0..tables {
        mem.read_slice(table.as_mut_bytes(), GuestAddress(source + i * PAGE_SIZE)).map_err(memory_error)?;
        for entry in &mut table {
            if *entry & PTE_PRESENT != 0 && *entry & PTE_NO_EXECUTE != 0 {
                *entry = (*entry & !PTE_PRESENT) | ARMED;
            }
        }
        mem.write_slice(table.as_bytes(), GuestAddress(copy + (1 + i) * PAGE_SIZE)).map_err(memory_error)?;
    }
    Ok(())
}

/// `CopyFrames`: copies `pages` pages from `source` to `destination` (a realm's frames moving
/// to another node), a page at a time, after checking both runs.
fn copy_frames(mem: &GuestMemoryMmap, source: u64, destination: u64, pages: u64) -> Result<(), HypercallError> {
    if pages > MAX_REALM_PAGES {
        return Err(HypercallError::InvalidArgument);
    }
    let source_run = page_run(mem, source, pages)?;
    let destination_run = page_run(mem, destination, pages)?;
    if overlap(&source_run, &destination_run) {
        return Err(HypercallError::InvalidArgument);
    }
    let mut page = [0u8; PAGE_SIZE as usize];
    for i in 0..pages {
        let offset = i * PAGE_SIZE;
        mem.read_slice(&mut page, GuestAddress(source + offset)).map_err(|_| HypercallError::BadAddress)?;
        mem.write_slice(&page, GuestAddress(destination + offset)).map_err(|_| HypercallError::BadAddress)?;
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

/// Fills `buffer` from the host's random source.
fn getrandom(buffer: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buffer)
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

    #[test]
    fn garbage_from_the_guest_gets_error_replies_not_panics() {
        let (mem, sink, state) = setup();
        // Page tables full of garbage too.
        let noise: Vec<u8> = (0..(1u32 << 16)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        mem.write_slice(&noise, GuestAddress(0)).unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            // Mostly valid numbers (except the ones that end the run), with wild arguments.
            let number = match next() % 5 {
                0 => next(),
                1 => Hypercall::ConsoleWrite as u64,
                2 => Hypercall::ReportTopology as u64,
                // LatencyCharge, ArmedCopy, CopyFrames, ReportLatency.
                3 => 14 + next() % 4,
                _ => next() % 6,
            };
            let args = [next(), next() % 70_000, next(), next(), next(), next()];
            call(number, args, next() % (32 << 20), &mem, &sink, &state);
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

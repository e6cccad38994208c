//! The VMM side of hypercalls: decode the registers of an `in` from the hypercall port into a
//! request, check it, act. Nothing the guest passes can make this panic: bad numbers and bad
//! arguments get an error reply, and a kernel that reports garbage is stopped as crashed.

use kvm_bindings::{kvm_regs, kvm_sregs};
use psyche_abi::hypercall::{Hypercall, HypercallError, CONSOLE_USER_BUFFER};
use psyche_abi::layout::PAGE_SIZE;
use psyche_abi::realm::Termination;
use psyche_abi::report::{TopologyReport, TOPOLOGY_REPORT_MAGIC};
use psyche_abi::{MAX_CPUS, MAX_NODES};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::FromBytes;

use crate::console::{ConsoleSink, LineBuffer};
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
}

impl HypercallContext<'_> {
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
    line: &mut LineBuffer,
) -> u32 {
    let args = [regs.rdi, regs.rsi, regs.rdx, regs.rcx, regs.r8, regs.r9];
    let Some(call) = Hypercall::from_raw(regs.rax) else {
        return HypercallError::UnknownHypercall.reply();
    };
    match call {
        Hypercall::ConsoleWrite => {
            let (vaddr, len, flags) = (args[0], args[1], args[2]);
            if len > MAX_CONSOLE_WRITE {
                return HypercallError::InvalidArgument.reply();
            }
            let require_user = flags & CONSOLE_USER_BUFFER != 0;
            match memory::read_virtual(context.mem, sregs.cr3, vaddr, len as usize, require_user) {
                Ok(bytes) => {
                    line.push(vcpu, &bytes, context.sink);
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
            state.program_ended(args[0], ProgramEnd::Exited { code: args[1] });
            0
        }
        Hypercall::ProgramFault => {
            let (vector, error_code, rip, cr2) = (args[1], args[2], args[3], args[4]);
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
            line.flush(vcpu, context.sink);
            state.end(GuestEnd::Shutdown { code: args[0] });
            0
        }
        Hypercall::KernelFault => {
            line.flush(vcpu, context.sink);
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
            line.flush(vcpu, context.sink);
            state.end(GuestEnd::crash(vcpu, CrashReason::KernelPanic, None));
            0
        }
        Hypercall::DomainTerminated => {
            let (program, reason, address, realm, rip) = (args[0], args[1], args[2], args[3], args[4]);
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
        // Not served yet (the latency model is being built).
        Hypercall::LatencyCharge | Hypercall::ArmedCopy | Hypercall::CopyFrames | Hypercall::ReportLatency => {
            HypercallError::UnknownHypercall.reply()
        }
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

    fn call(number: u64, args: [u64; 6], cr3: u64, mem: &GuestMemoryMmap, sink: &CaptureSink, state: &RunState) -> u32 {
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
        let context = HypercallContext { mem, sink, program_names: &["p".to_owned()], trace: None };
        handle(0, &regs, &sregs, &context, state, &mut LineBuffer::default())
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
            let number = match next() % 4 {
                0 => next(),
                1 => Hypercall::ConsoleWrite as u64,
                2 => Hypercall::ReportTopology as u64,
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
}

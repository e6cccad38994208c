//! A trace session: drains the rings while the guest runs, collects the vCPUs' exits, and merges
//! everything into a [`Trace`] at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::Scope;

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use psyche_abi::hypercall::{HypercallError, HYPERCALL_PORT};
use psyche_abi::trace::{TraceKind, TraceRecord, VmExitKind};
use vm_memory::GuestMemoryMmap;

use super::ring::{take_budget, Ring};
use super::{Trace, TraceError, TraceMeta, TraceOptions, VcpuTrace};
use crate::boot::BootLayout;
use crate::console::ConsoleSink;
use crate::vm::RunState;

/// `IA32_TSC`.
const MSR_IA32_TSC: u32 = 0x10;

/// Exits a vCPU thread reserves from the session's record budget at a time (one atomic operation
/// per this many exits).
const EXIT_BUDGET_CHUNK: u64 = 1024;

/// The host's TSC.
pub(crate) fn host_tsc() -> u64 {
    // SAFETY: `rdtsc` has no preconditions on x86-64 (the only architecture KVM guests of this
    // VMM run on); it reads a counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Guest TSC minus host TSC for `vcpu`: its `IA32_TSC` read with `KVM_GET_MSRS` between two host
/// `rdtsc`s, against their midpoint, keeping the tightest of `tries` (each try is an ioctl of
/// some microseconds, and the first on a vCPU is often slow: two tries per vCPU at the start and
/// two at the end of a 24-vCPU run cost about 0.5 ms). KVM computes a guest's
/// `IA32_TSC` from the host TSC at the time of the read (times the TSC scaling ratio, 1 unless the
/// guest's TSC rate was changed, plus the vCPU's offset), so this is the offset up to half the
/// ioctl's duration (a few microseconds under a nested KVM, less on a real host): the VM exits'
/// timestamps are that precise. (`KVM_GET_CLOCK` would give kvmclock nanoseconds and a host TSC,
/// not the guest's TSC, which is what the kernel's records carry.)
fn tsc_offset(vcpu: &VcpuFd, cpu: u32, tries: usize) -> Result<i64, TraceError> {
    let fail = |source| TraceError::Tsc { cpu, source };
    let mut best: Option<(u64, i64)> = None;
    for _ in 0..tries.max(1) {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index: MSR_IA32_TSC, ..Default::default() }])
            .map_err(|_| fail(kvm_ioctls::Error::new(libc::ENOMEM)))?;
        let before = host_tsc();
        let read = vcpu.get_msrs(&mut msrs).map_err(fail)?;
        let after = host_tsc();
        let guest = match msrs.as_slice().first() {
            Some(entry) if read == 1 => entry.data,
            _ => return Err(fail(kvm_ioctls::Error::new(libc::EIO))),
        };
        let width = after.wrapping_sub(before);
        let host = before.wrapping_add(width / 2);
        let offset = guest.wrapping_sub(host) as i64;
        if best.is_none_or(|(narrowest, _)| width < narrowest) {
            best = Some((width, offset));
        }
    }
    Ok(best.map_or(0, |(_, offset)| offset))
}

/// The VM exits one vCPU thread saw, stamped on its guest's TSC timeline. Owned by that thread
/// (no lock per exit) and handed back with [`TraceSession::add_exits`] when the thread ends.
pub struct ExitLog<'s> {
    cpu: u32,
    offset: i64,
    records: Vec<TraceRecord>,
    /// Records reserved from the session's budget and not used yet.
    reserved: u64,
    lost: u64,
    budget: &'s AtomicU64,
}

impl ExitLog<'_> {
    /// Records the exit `vcpu.run()` just returned (call it at once: it is stamped now).
    pub fn record(&mut self, exit: &Result<VcpuExit<'_>, kvm_ioctls::Error>) {
        let tsc = host_tsc().wrapping_add_signed(self.offset);
        let (kind, arg1) = match exit {
            Ok(VcpuExit::IoIn(port, _)) if *port == HYPERCALL_PORT => (VmExitKind::Hypercall, u64::from(*port)),
            Ok(VcpuExit::IoIn(port, _)) => (VmExitKind::IoIn, u64::from(*port)),
            Ok(VcpuExit::IoOut(port, _)) => (VmExitKind::IoOut, u64::from(*port)),
            Ok(VcpuExit::MmioRead(address, _)) => (VmExitKind::MmioRead, *address),
            Ok(VcpuExit::MmioWrite(address, _)) => (VmExitKind::MmioWrite, *address),
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => (VmExitKind::Interrupted, 0),
            _ => (VmExitKind::Other, 0),
        };
        if self.reserved == 0 {
            self.reserved = take_budget(self.budget, EXIT_BUDGET_CHUNK);
            if self.reserved == 0 {
                self.lost = self.lost.saturating_add(1);
                return;
            }
        }
        self.reserved -= 1;
        let record =
            TraceRecord { tsc, kind: TraceKind::VmExit as u16, cpu: self.cpu as u16, arg0: kind as u32, arg1, arg2: 0 };
        self.records.push(record);
    }

    /// Notes the hypercall number (RAX) of the hypercall exit just recorded, in its arg2.
    pub fn note_hypercall(&mut self, number: u64) {
        if let Some(last) = self.records.last_mut() {
            if last.arg0 == VmExitKind::Hypercall as u32 {
                last.arg2 = number;
            }
        }
    }
}

/// Drains the trace rings of one traced run. See the [module docs](super).
pub struct TraceSession<'m> {
    mem: &'m GuestMemoryMmap,
    rings: Vec<Mutex<Ring>>,
    /// Exits handed in by the vCPU threads: (cpu, records, exits not kept for the record limit).
    exits: Mutex<Vec<(u32, Vec<TraceRecord>, u64)>>,
    offsets: Vec<i64>,
    budget: AtomicU64,
    options: TraceOptions,
    meta: TraceMeta,
}

impl<'m> TraceSession<'m> {
    /// Starts a session over the rings `layout` placed in `mem`, measuring each vCPU's TSC
    /// offset (call it after the vCPUs are set up, before they run).
    pub fn new(
        mem: &'m GuestMemoryMmap,
        layout: &BootLayout,
        vcpus: &[VcpuFd],
        meta: TraceMeta,
        options: TraceOptions,
    ) -> Result<Self, TraceError> {
        let mut rings = Vec::with_capacity(layout.vcpus.len());
        let mut offsets = Vec::with_capacity(layout.vcpus.len());
        for (start, vcpu) in layout.vcpus.iter().zip(vcpus) {
            if start.trace_paddr == 0 {
                return Err(TraceError::NoTraceArea { cpu: start.index });
            }
            rings.push(Mutex::new(Ring::new(start.index, start.trace_paddr)));
            offsets.push(tsc_offset(vcpu, start.index, 2)?);
        }
        let meta = TraceMeta { tsc_offsets: offsets.clone(), ..meta };
        Ok(Self {
            mem,
            rings,
            exits: Mutex::new(Vec::new()),
            offsets,
            budget: AtomicU64::new(options.max_records),
            options,
            meta,
        })
    }

    fn drain(&self, cpu: usize) {
        if let Some(ring) = self.rings.get(cpu) {
            // A poisoned lock cannot happen (panic = "abort"); draining on is harmless anyway.
            let mut ring = ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            ring.drain(self.mem, &self.budget);
        }
    }

    /// Drains every ring once.
    pub fn drain_all(&self) {
        for cpu in 0..self.rings.len() {
            self.drain(cpu);
        }
    }

    /// Serves the `TraceFlush` hypercall of vCPU `caller` for ring `cpu` (RDI): drains it and
    /// replies 0, or refuses a ring that does not exist.
    pub fn flush(&self, caller: u32, cpu: u64) -> u32 {
        let Some(index) = usize::try_from(cpu).ok().filter(|&index| index < self.rings.len()) else {
            return HypercallError::InvalidArgument.reply();
        };
        self.drain(index);
        if let Some(ring) = usize::try_from(caller).ok().and_then(|caller| self.rings.get(caller)) {
            let mut ring = ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            ring.stats.flushes = ring.stats.flushes.saturating_add(1);
        }
        0
    }

    /// Starts the background drainer in `scope`: once `ready` lets it go, it drains every ring
    /// each [`TraceOptions::drain_interval`] until `state` says the vCPUs are stopping. Without
    /// it (no interval, or no thread to be had) the rings are drained on the kernel's flushes
    /// and at the end, and nothing is lost either. Returns whether the thread started (and so
    /// will call `ready`).
    pub fn spawn_drainer<'scope>(
        &'scope self,
        scope: &'scope Scope<'scope, '_>,
        state: &'scope RunState,
        sink: &dyn ConsoleSink,
        ready: impl FnOnce() -> bool + Send + 'scope,
    ) -> bool {
        let Some(interval) = self.options.drain_interval else { return false };
        let spawned = std::thread::Builder::new().name("trace-drainer".into()).spawn_scoped(scope, move || {
            if !ready() {
                return;
            }
            while !state.stopping() {
                self.drain_all();
                std::thread::sleep(interval);
            }
        });
        if let Err(error) = &spawned {
            sink.vmm_note(&format!("trace: no drainer thread ({error}); the rings are drained when full"));
        }
        spawned.is_ok()
    }

    /// A vCPU thread's log of exits.
    pub fn exit_log(&self, cpu: u32) -> ExitLog<'_> {
        let offset = usize::try_from(cpu).ok().and_then(|cpu| self.offsets.get(cpu)).copied().unwrap_or(0);
        ExitLog { cpu, offset, records: Vec::with_capacity(1024), reserved: 0, lost: 0, budget: &self.budget }
    }

    /// Hands a vCPU thread's exits to the session (when the thread ends).
    pub fn add_exits(&self, log: ExitLog<'_>) {
        self.budget.fetch_add(log.reserved, Ordering::AcqRel);
        if let Ok(mut exits) = self.exits.lock() {
            exits.push((log.cpu, log.records, log.lost));
        }
    }

    /// Drains what is left (call it after every vCPU has stopped), measures how far each
    /// vCPU's TSC offset drifted, and merges each vCPU's ring records and exits in time order.
    pub fn finish(self, vcpus: &[VcpuFd]) -> Trace {
        self.drain_all();
        let mut meta = self.meta;
        meta.tsc_drift = vcpus
            .iter()
            .zip(&self.offsets)
            .enumerate()
            .map(|(cpu, (vcpu, before))| tsc_offset(vcpu, cpu as u32, 2).map_or(0, |after| after.wrapping_sub(*before)))
            .collect();
        let mut exits = self.exits.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
        let vcpus = self
            .rings
            .into_iter()
            .map(|ring| {
                let ring = ring.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
                let cpu = ring.stats.cpu;
                let mut stats = ring.stats;
                let mut vm_exits = Vec::new();
                for (_, records, lost) in exits.iter_mut().filter(|(of, ..)| *of == cpu) {
                    stats.lost_limit = stats.lost_limit.saturating_add(*lost);
                    vm_exits.append(records);
                }
                let records = merge(ring.records, vm_exits);
                stats.records = records.len() as u64;
                VcpuTrace { cpu, records, stats }
            })
            .collect();
        Trace::new(meta, vcpus)
    }
}

/// Merges two time-ordered sequences (a ring's records and the exits), stably: on equal times
/// the kernel's record comes first.
pub(crate) fn merge(guest: Vec<TraceRecord>, mut vmm: Vec<TraceRecord>) -> Vec<TraceRecord> {
    // The exits of one thread are in order already; sort anyway (stable, cheap when sorted).
    vmm.sort_by_key(|record| record.tsc);
    let mut merged = Vec::with_capacity(guest.len() + vmm.len());
    let mut vmm = vmm.into_iter().peekable();
    for record in guest {
        while let Some(exit) = vmm.next_if(|exit| exit.tsc < record.tsc) {
            merged.push(exit);
        }
        merged.push(record);
    }
    merged.extend(vmm);
    merged
}

#[cfg(test)]
mod tests {
    use psyche_abi::trace::{TraceRingHeader, TRACE_RECORDS_OFFSET, TRACE_RING_CAPACITY};
    use vm_memory::{Bytes, GuestAddress};
    use zerocopy::IntoBytes;

    use super::*;

    /// A session over two rings in `mem`, without KVM (no TSC offsets to measure).
    fn session(mem: &GuestMemoryMmap, max_records: u64) -> TraceSession<'_> {
        let meta = TraceMeta {
            topology: "t".to_owned(),
            nodes: Vec::new(),
            distances: Vec::new(),
            tsc_khz: 1_000_000,
            vcpus: 2,
            programs: Vec::new(),
            kernel: String::new(),
            tsc_offsets: vec![0, 0],
            tsc_drift: Vec::new(),
        };
        let options = TraceOptions { drain_interval: None, max_records };
        TraceSession {
            mem,
            rings: vec![Mutex::new(Ring::new(0, 0x1_0000)), Mutex::new(Ring::new(1, 0x4_0000))],
            exits: Mutex::new(Vec::new()),
            offsets: vec![0, 0],
            budget: AtomicU64::new(options.max_records),
            options,
            meta,
        }
    }

    /// The kernel of cpu `cpu` wrote records `0..head` (tsc = 10 + n) and counted `lost`.
    fn kernel_wrote(mem: &GuestMemoryMmap, base: u64, cpu: u16, head: u64, lost: u64) {
        for n in head.saturating_sub(TRACE_RING_CAPACITY)..head {
            let record = TraceRecord { tsc: 10 + n, kind: TraceKind::TimerTick as u16, cpu, ..TraceRecord::default() };
            let address = base + TRACE_RECORDS_OFFSET + (n % TRACE_RING_CAPACITY) * 32;
            mem.write_slice(record.as_bytes(), GuestAddress(address)).unwrap();
        }
        let header = TraceRingHeader { head, tail: 0, lost, capacity: TRACE_RING_CAPACITY };
        mem.write_slice(header.as_bytes(), GuestAddress(base)).unwrap();
    }

    #[test]
    fn a_flush_drains_the_ring_named_and_refuses_others() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let session = session(&mem, u64::MAX);
        kernel_wrote(&mem, 0x4_0000, 1, TRACE_RING_CAPACITY, 0);
        assert_eq!(session.flush(1, 1), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x4_0000 + 8)).unwrap(), TRACE_RING_CAPACITY);
        assert_eq!(session.flush(1, 2), HypercallError::InvalidArgument.reply());
        assert_eq!(session.flush(1, u64::MAX), HypercallError::InvalidArgument.reply());
        let trace = session.finish(&[]);
        assert_eq!(trace.vcpus[1].records.len() as u64, TRACE_RING_CAPACITY);
        assert_eq!(trace.vcpus[1].stats.flushes, 1);
        assert_eq!(trace.summary.flushes, 1);
    }

    #[test]
    fn overruns_kernel_losses_and_the_record_limit_reach_the_summary() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let session = session(&mem, 2500);
        // Ring 0 ran 1000 records past a full ring and the kernel dropped 5 more.
        kernel_wrote(&mem, 0x1_0000, 0, TRACE_RING_CAPACITY + 1000, 5);
        kernel_wrote(&mem, 0x4_0000, 1, 600, 0);
        session.drain_all();
        // vCPU 1's thread saw exits: 2 of them, past the limit.
        let mut log = session.exit_log(1);
        log.record(&Err(kvm_ioctls::Error::new(libc::EINTR)));
        log.record(&Err(kvm_ioctls::Error::new(libc::EINTR)));
        session.add_exits(log);
        let trace = session.finish(&[]);
        let summary = &trace.summary;
        assert_eq!((summary.lost_overrun, summary.lost_kernel), (1000, 5));
        // 2048 + 600 ring records and 2 exits against a limit of 2500.
        assert_eq!(summary.records, 2500);
        assert_eq!(summary.lost_limit, TRACE_RING_CAPACITY + 600 + 2 - 2500);
        assert_eq!(summary.lost, 1000 + 5 + summary.lost_limit);
        assert_eq!(summary.corrupt, 1);
        assert!(
            summary.problems[0].starts_with("vCPU 0: the ring's head 3048 ran 3048 records ahead"),
            "{:?}",
            summary.problems
        );
    }

    fn at(tsc: u64, kind: TraceKind) -> TraceRecord {
        TraceRecord { tsc, kind: kind as u16, ..TraceRecord::default() }
    }

    #[test]
    fn merging_keeps_time_order_and_puts_the_kernel_first_on_ties() {
        let guest = vec![at(10, TraceKind::GateEnter), at(20, TraceKind::GateExit), at(30, TraceKind::GateEnter)];
        let vmm = vec![at(15, TraceKind::VmExit), at(20, TraceKind::VmExit), at(40, TraceKind::VmExit)];
        let merged = merge(guest, vmm);
        let times: Vec<(u64, u16)> = merged.iter().map(|r| (r.tsc, r.kind)).collect();
        assert_eq!(times, [(10, 14), (15, 1), (20, 15), (20, 1), (30, 14), (40, 1)]);
    }

    #[test]
    fn host_tsc_moves_forward() {
        let a = host_tsc();
        let b = host_tsc();
        assert!(b >= a);
    }
}

//! Tracing: the host side of the per-vCPU trace rings, the trace file, and the profile.
//!
//! # How a trace is made
//!
//! A traced boot (`VmConfig::trace`, `psyche-vmm --trace PATH`) gives every vCPU a trace area in
//! guest memory (a [`TraceRingHeader`](psyche_abi::trace::TraceRingHeader) page, then
//! [`TRACE_RING_CAPACITY`](psyche_abi::trace::TRACE_RING_CAPACITY) records) and boots the kernel
//! built with its `trace` feature, which writes one fixed-size record per event into its own
//! CPU's ring without leaving the guest. A [`TraceSession`] drains the rings:
//!
//! * a background drainer thread reads every ring about once a millisecond while the guest
//!   runs (no VM exit per event: it reads guest memory directly);
//! * when a ring is full anyway, the kernel makes the `TraceFlush` hypercall and the session
//!   drains that ring before replying;
//! * after the vCPUs have stopped, a final drain takes what is left.
//!
//! The session also records the VM exits the vCPU threads see (kind
//! `TraceKind::VmExit`), each in a plain `Vec` owned by its
//! vCPU thread (no lock per exit), stamped on the guest's TSC timeline: at the start of the run the
//! session reads each vCPU's `IA32_TSC` with `KVM_GET_MSRS` between two host `rdtsc`s and keeps
//! the difference (guest TSC = host TSC + offset, which is how KVM runs an unscaled guest TSC);
//! at the end it measures again and keeps the drift in the trace's metadata. At the end every
//! vCPU's ring records and exits are merged in timestamp order into a [`Trace`].
//!
//! # Nothing is trusted, nothing is dropped silently
//!
//! The rings are guest memory: a head that moved backwards or ran more than a ring ahead of the
//! tail, records of unknown kinds, of another CPU, or whose time goes backwards are counted as
//! corrupt (and the first few described) in the trace's [`TraceSummary`]; records a ring overran
//! and records the kernel dropped (its `lost` counter) are counted as lost; a session keeps at
//! most [`TraceOptions::max_records`] records and counts the rest as lost too. Every drain pass
//! does at most one ring's worth of work per vCPU, so a guest flooding its ring costs the VMM a
//! bounded amount of work per pass and cannot make it fall behind without that being counted.
//!
//! # Files and profiles
//!
//! [`chrome`] writes a [`Trace`] as Chrome trace-event JSON (Perfetto and chrome://tracing open
//! it) and reads it back; [`analysis`] pairs records into spans (gate calls, protected
//! invocations, upcalls); [`profile`] prints the per-path, per-realm and per-vCPU profile and
//! draws flame graphs.

pub mod analysis;
pub mod chrome;
pub mod profile;
#[cfg(test)]
mod props;
mod ring;
mod session;

use std::collections::BTreeMap;
use std::time::Duration;

use psyche_abi::hypercall::Hypercall;
use psyche_abi::syscall::Syscall;
use psyche_abi::trace::{TraceKind, TraceRecord, VmExitKind};
use serde::{Deserialize, Serialize};

pub(crate) use session::host_tsc;
pub use session::{ExitLog, TraceSession};

/// Version of the trace file layout (`metadata.psyche_trace`).
pub const TRACE_FILE_VERSION: u32 = 1;

/// Most problem descriptions kept per vCPU (the counts are always complete).
const MAX_PROBLEMS: usize = 8;

/// Why a trace session could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("vCPU {cpu}: reading its TSC (KVM_GET_MSRS of IA32_TSC) failed: {source}")]
    Tsc { cpu: u32, source: kvm_ioctls::Error },
    #[error("vCPU {cpu} has no trace area: the guest was laid out without tracing")]
    NoTraceArea { cpu: u32 },
}

/// Knobs of a trace session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceOptions {
    /// How often the background drainer reads the rings; `None`: no drainer (the rings are read
    /// only when the kernel asks with `TraceFlush`, and at the end).
    pub drain_interval: Option<Duration>,
    /// Most records (ring records and VM exits together) one session keeps; what comes after is
    /// counted as lost.
    pub max_records: u64,
}

impl Default for TraceOptions {
    fn default() -> Self {
        Self { drain_interval: Some(Duration::from_millis(1)), max_records: 4 << 20 }
    }
}

impl TraceOptions {
    /// The defaults, changed by `PSYCHE_VMM_TRACE_DRAIN_US` (the drainer's period in
    /// microseconds; 0 turns the drainer off, to exercise the kernel's flushes) and
    /// `PSYCHE_VMM_TRACE_MAX_RECORDS`. Values that are not numbers are ignored.
    pub fn from_env() -> Self {
        let mut options = Self::default();
        let number = |name: &str| std::env::var(name).ok().and_then(|value| value.trim().parse::<u64>().ok());
        if let Some(micros) = number("PSYCHE_VMM_TRACE_DRAIN_US") {
            options.drain_interval = (micros > 0).then(|| Duration::from_micros(micros));
        }
        if let Some(max) = number("PSYCHE_VMM_TRACE_MAX_RECORDS") {
            options.max_records = max;
        }
        options
    }
}

/// One node of the machine, as the topology file describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceNode {
    pub id: u32,
    pub cpus: Vec<u32>,
    pub memory_bytes: u64,
}

/// What a trace is of: the machine, the clock, the programs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceMeta {
    /// The topology's name.
    pub topology: String,
    pub nodes: Vec<TraceNode>,
    /// The SLIT-style distance matrix.
    pub distances: Vec<Vec<u8>>,
    /// The guest TSC's frequency (from `KVM_GET_TSC_KHZ`); 0 when KVM did not say.
    pub tsc_khz: u64,
    pub vcpus: u32,
    /// Program names, by index.
    pub programs: Vec<String>,
    /// Where the kernel came from.
    pub kernel: String,
    /// Per vCPU: guest TSC minus host TSC, measured when the session started.
    pub tsc_offsets: Vec<i64>,
    /// Per vCPU: how far that offset moved by the end of the run (cycles; 0 when the guest TSC
    /// runs at the host's rate, as the VM exits' timestamps assume).
    pub tsc_drift: Vec<i64>,
}

impl TraceMeta {
    /// The description of a run on `topology`.
    pub fn new(topology: &crate::topology::Topology, tsc_khz: u64, programs: &[String], kernel: &str) -> Self {
        Self {
            topology: topology.name.clone(),
            nodes: topology
                .nodes
                .iter()
                .map(|node| TraceNode { id: node.id, cpus: node.cpus.clone(), memory_bytes: node.memory_bytes })
                .collect(),
            distances: topology.distance_matrix().to_vec(),
            tsc_khz,
            vcpus: topology.cpu_count() as u32,
            programs: programs.to_vec(),
            kernel: kernel.to_owned(),
            tsc_offsets: Vec::new(),
            tsc_drift: Vec::new(),
        }
    }

    /// The node of `cpu`, if the topology has it.
    pub fn node_of(&self, cpu: u32) -> Option<u32> {
        self.nodes.iter().find(|node| node.cpus.contains(&cpu)).map(|node| node.id)
    }
}

/// What was kept, lost and found corrupt on one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStats {
    pub cpu: u32,
    /// Records kept (ring records and VM exits).
    pub records: u64,
    /// Records the kernel dropped because its ring stayed full (the ring's `lost` counter).
    pub lost_kernel: u64,
    /// Records overwritten before the VMM could read them (the ring's head ran more than a ring
    /// ahead of its tail).
    pub lost_overrun: u64,
    /// Records the VMM read but did not keep: the session's record limit was reached.
    pub lost_limit: u64,
    /// Bad ring states and bad records seen.
    pub corrupt: u64,
    /// `TraceFlush` hypercalls served.
    pub flushes: u64,
    /// The first few problems, described.
    pub problems: Vec<String>,
}

impl VcpuStats {
    /// Every lost record.
    pub fn lost(&self) -> u64 {
        self.lost_kernel.saturating_add(self.lost_overrun).saturating_add(self.lost_limit)
    }
}

/// The records of one vCPU, in timestamp order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuTrace {
    pub cpu: u32,
    pub records: Vec<TraceRecord>,
    pub stats: VcpuStats,
}

/// Counts over a whole trace: what `psyche-vmm` prints and puts in `--summary-json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSummary {
    /// Records kept.
    pub records: u64,
    /// Records kept, by kind name.
    pub by_kind: BTreeMap<String, u64>,
    /// Every lost record (the sum of the three below).
    pub lost: u64,
    pub lost_kernel: u64,
    pub lost_overrun: u64,
    pub lost_limit: u64,
    /// Bad ring states and bad records.
    pub corrupt: u64,
    /// `TraceFlush` hypercalls served.
    pub flushes: u64,
    /// The first problems of each vCPU, prefixed with it.
    pub problems: Vec<String>,
}

/// A finished trace: the machine and clock, then each vCPU's records in timestamp order.
#[derive(Clone, PartialEq)]
pub struct Trace {
    pub meta: TraceMeta,
    pub vcpus: Vec<VcpuTrace>,
    pub summary: TraceSummary,
}

impl std::fmt::Debug for Trace {
    // The records can be millions: show the counts.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trace").field("meta", &self.meta).field("summary", &self.summary).finish_non_exhaustive()
    }
}

impl Trace {
    /// Builds a trace from its parts, computing the summary.
    pub fn new(meta: TraceMeta, vcpus: Vec<VcpuTrace>) -> Self {
        let mut summary = TraceSummary::default();
        for vcpu in &vcpus {
            for record in &vcpu.records {
                *summary.by_kind.entry(kind_name(record.kind)).or_default() += 1;
            }
            let stats = &vcpu.stats;
            summary.records += vcpu.records.len() as u64;
            summary.lost_kernel = summary.lost_kernel.saturating_add(stats.lost_kernel);
            summary.lost_overrun = summary.lost_overrun.saturating_add(stats.lost_overrun);
            summary.lost_limit = summary.lost_limit.saturating_add(stats.lost_limit);
            summary.corrupt = summary.corrupt.saturating_add(stats.corrupt);
            summary.flushes = summary.flushes.saturating_add(stats.flushes);
            summary.problems.extend(stats.problems.iter().map(|problem| format!("vCPU {}: {problem}", vcpu.cpu)));
        }
        summary.lost = summary.lost_kernel.saturating_add(summary.lost_overrun).saturating_add(summary.lost_limit);
        Self { meta, vcpus, summary }
    }

    /// Cycles to nanoseconds at this trace's TSC rate (`None` when the rate is unknown).
    pub fn cycles_to_ns(&self, cycles: u64) -> Option<u64> {
        cycles_to_ns(cycles, self.meta.tsc_khz)
    }

    /// Whether any guest (kernel-written) record was kept.
    pub fn has_guest_records(&self) -> bool {
        self.vcpus.iter().flat_map(|v| &v.records).any(|r| r.kind != TraceKind::VmExit as u16)
    }
}

/// Cycles to nanoseconds at `tsc_khz` (`None` when the rate is unknown).
pub fn cycles_to_ns(cycles: u64, tsc_khz: u64) -> Option<u64> {
    (tsc_khz != 0).then(|| (u128::from(cycles) * 1_000_000 / u128::from(tsc_khz)).min(u128::from(u64::MAX)) as u64)
}

/// Nanoseconds to cycles at `tsc_khz` (0 when the rate is unknown).
pub fn ns_to_cycles(ns: u64, tsc_khz: u64) -> u64 {
    (u128::from(ns) * u128::from(tsc_khz) / 1_000_000).min(u128::from(u64::MAX)) as u64
}

/// The name of a record kind as trace files spell it; `kind<N>` for numbers no kernel writes.
pub fn kind_name(raw: u16) -> String {
    match TraceKind::from_raw(raw) {
        Some(kind) => kind.name().to_owned(),
        None => format!("kind{raw}"),
    }
}

/// The kind called `name` in trace files.
pub fn kind_from_name(name: &str) -> Option<TraceKind> {
    (0..=u16::from(u8::MAX)).filter_map(TraceKind::from_raw).find(|kind| kind.name() == name)
}

/// `CpuInfo` -> `cpu_info`.
fn snake_case(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A system call's name (`write`, `cpu_info`, ...), or `syscall<N>` for a number the ABI does not
/// define.
pub fn syscall_name(number: u64) -> String {
    match Syscall::from_raw(number) {
        Some(call) => snake_case(&format!("{call:?}")),
        None => format!("syscall{number}"),
    }
}

/// The name of the system call a gate record says the kernel ran (arg0 of `gate_enter` and
/// `gate_exit`): `no_such_call` for a number that named none (RAX is in the record's arg1),
/// the call's name otherwise (`syscall<N>` for a number this VMM does not know).
pub fn gate_call_name(arg0: u32) -> String {
    if arg0 == psyche_abi::trace::GATE_NO_SUCH_CALL {
        return "no_such_call".to_owned();
    }
    syscall_name(u64::from(arg0))
}

/// A hypercall's name (`console_write`, `trace_flush`, ...), or `hypercall<N>`.
pub fn hypercall_name(number: u64) -> String {
    match Hypercall::from_raw(number) {
        Some(call) => snake_case(&format!("{call:?}")),
        None => format!("hypercall{number}"),
    }
}

/// A VM exit kind's name (arg0 of a `vm_exit` record).
pub fn vm_exit_name(raw: u32) -> String {
    const KINDS: [(VmExitKind, &str); 7] = [
        (VmExitKind::Hypercall, "hypercall"),
        (VmExitKind::IoIn, "io_in"),
        (VmExitKind::IoOut, "io_out"),
        (VmExitKind::MmioRead, "mmio_read"),
        (VmExitKind::MmioWrite, "mmio_write"),
        (VmExitKind::Interrupted, "interrupted"),
        (VmExitKind::Other, "other"),
    ];
    name_in(KINDS.iter().map(|&(kind, name)| (kind as u32, name)), raw, "exit")
}

/// A realm-open outcome's name (arg0 of a `realm_open` record).
pub fn open_outcome_name(raw: u32) -> String {
    use psyche_abi::trace::OpenOutcome;
    const OUTCOMES: [(OpenOutcome, &str); 4] = [
        (OpenOutcome::MappedReadWrite, "mapped-rw"),
        (OpenOutcome::MappedReadOnly, "mapped-ro"),
        (OpenOutcome::Protected, "protected"),
        (OpenOutcome::Refused, "refused"),
    ];
    name_in(OUTCOMES.iter().map(|&(outcome, name)| (outcome as u32, name)), raw, "outcome")
}

/// The name `table` gives `raw`, or `raw` after `unknown_prefix` for a value it does not list.
fn name_in<'a>(mut table: impl Iterator<Item = (u32, &'a str)>, raw: u32, unknown_prefix: &str) -> String {
    table.find(|&(value, _)| value == raw).map_or_else(|| format!("{unknown_prefix}{raw}"), |(_, name)| name.to_owned())
}

/// An upcall kind's name (arg0 of an `upcall` record: `invocation_arrived`, `blocked`, ...), or
/// its number for a kind the ABI does not define.
pub fn upcall_name(raw: u32) -> String {
    match psyche_abi::upcall::Upcall::from_raw(u64::from(raw)) {
        Some(kind) => snake_case(&format!("{kind:?}")),
        None => format!("{raw}"),
    }
}

#[cfg(test)]
mod tests;

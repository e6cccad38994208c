//! What the kernel reports to the VMM about the machine it found: the CPUs that actually
//! checked in, the memory its allocators manage per node, and the distances it will use.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{CpuMask, MAX_NODES};

/// `TopologyReport::magic`: "PSYREPRT".
pub const TOPOLOGY_REPORT_MAGIC: u64 = u64::from_le_bytes(*b"PSYREPRT");

/// One node as the kernel sees it.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct NodeReport {
    /// CPUs that checked in and found themselves on this node (by their CPUID APIC ID).
    pub cpus: CpuMask,
    /// Bytes of RAM the kernel manages on this node.
    pub memory_bytes: u64,
}

/// The report ([`crate::hypercall::Hypercall::ReportTopology`]).
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct TopologyReport {
    /// [`TOPOLOGY_REPORT_MAGIC`].
    pub magic: u64,
    /// CPUs that checked in.
    pub cpus_online: u32,
    /// Nodes (entries of `nodes`).
    pub node_count: u32,
    /// LAPIC timer ticks per second as the kernel calibrated it against the TSC (0 if not).
    pub lapic_timer_hz: u64,
    /// The nodes, by id.
    pub nodes: [NodeReport; MAX_NODES],
    /// The distance table the kernel uses.
    pub distances: [[u8; MAX_NODES]; MAX_NODES],
}

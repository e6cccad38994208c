//! Remote-memory latency: how the kernel makes a NUMA guest pay for remote accesses, and what it
//! reports about them.
//!
//! Every page of a created realm lives on the realm's home node. On a CPU of another node, the
//! kernel maps the realm through a per-CPU copy of its page tables in which every data page is
//! *armed*: not present, with [`ARMED`] set. A touch of an armed page is a latency trap: the
//! kernel asks the VMM to charge the latency for (CPU's node, home node)
//! ([`crate::hypercall::Hypercall::LatencyCharge`]), records a
//! [`crate::trace::TraceKind::LatencyTrap`], counts it per realm and node pair, and opens the
//! page: until the CPU's next quantum boundary (`Window`) or for one instruction (`Exact`,
//! `Account`, by single-stepping it). Code pages are never armed: read-only code would be
//! replicated on every node of a real NUMA machine, and trapping every instruction fetch
//! measures nothing.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::MAX_NODES;

/// Software bit 9 of a page-table entry: a remote page, armed to trap (the entry is not present
/// but keeps its frame address, so the kernel and the VMM can still translate through it).
pub const ARMED: u64 = 1 << 9;

/// How remote accesses are charged (`BootInfo::latency_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum LatencyMode {
    /// No trap, no charge.
    Off = 0,
    /// A trapped page stays open on that CPU until its next quantum: cheap, approximate. Each
    /// window is charged the full latency once, in real time.
    Window = 1,
    /// Every remote access traps and is charged in real time: slow, faithful.
    Exact = 2,
    /// Every remote access traps and is counted and charged to the vCPU's virtual clock, but no
    /// real time is spent: fast, deterministic tests.
    Account = 3,
}

impl LatencyMode {
    /// Decodes `BootInfo::latency_mode`; `None` for an unknown value.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Off,
            1 => Self::Window,
            2 => Self::Exact,
            3 => Self::Account,
            _ => return None,
        })
    }

    /// Whether remote pages are armed at all.
    pub fn traps(self) -> bool {
        self != Self::Off
    }

    /// Whether a trapped page is opened for one instruction only.
    pub fn per_access(self) -> bool {
        matches!(self, Self::Exact | Self::Account)
    }
}

/// `LatencyReport::magic`: "PSYLATNC".
pub const LATENCY_REPORT_MAGIC: u64 = u64::from_le_bytes(*b"PSYLATNC");

/// What the kernel counted, reported once when the machine shuts down
/// ([`crate::hypercall::Hypercall::ReportLatency`]).
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct LatencyReport {
    /// [`LATENCY_REPORT_MAGIC`].
    pub magic: u64,
    /// The [`LatencyMode`] the kernel ran with.
    pub mode: u32,
    /// Nodes (rows and columns used in the matrices).
    pub node_count: u32,
    /// Realms moved to another node.
    pub migrations: u64,
    /// Latency traps taken, `traps[from][to]`: by a CPU of node `from` on a page homed on `to`.
    pub traps: [[u64; MAX_NODES]; MAX_NODES],
    /// Nanoseconds the VMM charged for them (spent in real time, or on the virtual clock).
    pub charged_ns: [[u64; MAX_NODES]; MAX_NODES],
    /// Guest TSC cycles the trapping CPUs spent in the charge hypercalls (read just before and
    /// just after each): what the charges cost as the guest's own clock saw them, VM exits
    /// included. Against an `account` run, whose charges take no time, the difference is the
    /// charged latency as the guest measured it.
    pub charge_cycles: [[u64; MAX_NODES]; MAX_NODES],
}

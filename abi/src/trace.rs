//! Trace records and the per-vCPU trace ring.
//!
//! The kernel writes fixed-size [`TraceRecord`]s into a ring in its CPU's trace area (given by
//! the VMM in [`crate::boot::CpuInfo::trace_paddr`]) without leaving the guest; the VMM drains
//! the rings from the host while the guest runs. When a ring is full the kernel asks the VMM to
//! drain it ([`crate::hypercall::Hypercall::TraceFlush`]) before writing, so nothing is lost;
//! if the VMM cannot keep up anyway, the kernel counts what it dropped in
//! [`TraceRingHeader::lost`] and the VMM reports it.
//!
//! Only a kernel built with tracing writes records: psyche-vmm boots that kernel when asked for
//! a trace, and a kernel without any tracing code otherwise, so that tracing off costs nothing.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Bytes of one vCPU's trace area: one page of header, then the records.
pub const TRACE_AREA_SIZE: u64 = 4096 + TRACE_RING_CAPACITY * core::mem::size_of::<TraceRecord>() as u64;
/// Offset of the first record in the trace area.
pub const TRACE_RECORDS_OFFSET: u64 = 4096;
/// Records in one ring (a power of two: the slot of record `n` is `n % capacity`).
pub const TRACE_RING_CAPACITY: u64 = 2048;

/// The ring header, at the start of the trace area. `head` and `lost` are written only by the
/// kernel, `tail` only by the VMM; each side reads the other's with acquire ordering.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct TraceRingHeader {
    /// Records ever written by the kernel.
    pub head: u64,
    /// Records ever consumed by the VMM.
    pub tail: u64,
    /// Records the kernel dropped because the ring stayed full.
    pub lost: u64,
    /// [`TRACE_RING_CAPACITY`], as the kernel sees it.
    pub capacity: u64,
}

/// One event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct TraceRecord {
    /// Guest TSC when the event happened.
    pub tsc: u64,
    /// A [`TraceKind`].
    pub kind: u16,
    /// The vCPU.
    pub cpu: u16,
    /// First argument (meaning by kind).
    pub arg0: u32,
    /// Second argument.
    pub arg1: u64,
    /// Third argument.
    pub arg2: u64,
}

/// What a record means, and what its arguments are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum TraceKind {
    /// VMM side: a VM exit. arg0 = [`VmExitKind`], arg1 = port or address.
    VmExit = 1,
    /// A page fault taken by the kernel. arg0 = error code, arg1 = CR2, arg2 = RIP.
    PageFault = 2,
    /// A realm open decided on a fault or an explicit open. arg0 = [`OpenOutcome`],
    /// arg1 = realm id, arg2 = protection domain id.
    RealmOpen = 3,
    /// A protected invocation began (caller side). arg0 = operation (whole: the kernel checks
    /// it is below [`crate::upcall::MAX_OPERATIONS`] before any invocation begins), arg1 = realm
    /// id, arg2 = invocation id (joins begin, callee and end).
    InvocationBegin = 4,
    /// A protected invocation ended (caller side). Arguments as for the begin.
    InvocationEnd = 5,
    /// An upcall. arg0 = upcall kind, arg1 = protection domain id, arg2 = kind-specific.
    Upcall = 6,
    /// A remote-memory latency trap. arg0 = from node << 16 | to node, arg1 = page address,
    /// arg2 = nanoseconds charged.
    LatencyTrap = 7,
    /// The CPU switched protection domain. arg1 = from, arg2 = to.
    DomainSwitch = 8,
    /// A LAPIC timer interrupt.
    TimerTick = 9,
    /// A realm was created. arg0 = home node, arg1 = realm id, arg2 = base address.
    RealmCreate = 10,
    /// A realm was destroyed. arg1 = realm id.
    RealmDestroy = 11,
    /// A program entered CPL3. arg0 = program index.
    ProgramStart = 12,
    /// A program ended. arg0 = program index; arg2 = 0 when it exited, arg1 being its exit code
    /// (any u64 the program passed), or 1 when the kernel ended it (arg1 = 0).
    ProgramExit = 13,
    /// Entry to the kernel gate. arg0 = the system call the kernel runs (a
    /// [`crate::syscall::Syscall`] number), decided from the whole of RAX, or
    /// [`GATE_NO_SUCH_CALL`] when RAX names none; arg1 = RAX as the program passed it.
    GateEnter = 14,
    /// Return from the kernel gate. arg0 as for the entry, arg1 = the result returned.
    GateExit = 15,
    /// A protected invocation arrived in the callee's domain. Arguments as for the begin.
    InvocationArrive = 16,
    /// A realm moved to another node. arg0 = from node << 16 | to node, arg1 = realm id,
    /// arg2 = pages copied.
    RealmMigrate = 17,
}

impl TraceKind {
    /// Decodes a kind; `None` for values no version of the kernel writes.
    pub fn from_raw(raw: u16) -> Option<Self> {
        use TraceKind::*;
        Some(match raw {
            1 => VmExit,
            2 => PageFault,
            3 => RealmOpen,
            4 => InvocationBegin,
            5 => InvocationEnd,
            6 => Upcall,
            7 => LatencyTrap,
            8 => DomainSwitch,
            9 => TimerTick,
            10 => RealmCreate,
            11 => RealmDestroy,
            12 => ProgramStart,
            13 => ProgramExit,
            14 => GateEnter,
            15 => GateExit,
            16 => InvocationArrive,
            17 => RealmMigrate,
            _ => return None,
        })
    }

    /// A short name, as used in trace files.
    pub fn name(self) -> &'static str {
        match self {
            Self::VmExit => "vm_exit",
            Self::PageFault => "page_fault",
            Self::RealmOpen => "realm_open",
            Self::InvocationBegin => "invocation_begin",
            Self::InvocationEnd => "invocation_end",
            Self::Upcall => "upcall",
            Self::LatencyTrap => "latency_trap",
            Self::DomainSwitch => "domain_switch",
            Self::TimerTick => "timer_tick",
            Self::RealmCreate => "realm_create",
            Self::RealmDestroy => "realm_destroy",
            Self::ProgramStart => "program_start",
            Self::ProgramExit => "program_exit",
            Self::GateEnter => "gate_enter",
            Self::GateExit => "gate_exit",
            Self::InvocationArrive => "invocation_arrive",
            Self::RealmMigrate => "realm_migrate",
        }
    }
}

/// arg0 of a gate record for a number that names no system call the gate runs (the call is
/// answered [`crate::syscall::SysError::NoSuchCall`]). No system call has this number.
pub const GATE_NO_SUCH_CALL: u32 = 0;

/// VM exits, by kind (arg0 of [`TraceKind::VmExit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum VmExitKind {
    Hypercall = 1,
    IoIn = 2,
    IoOut = 3,
    MmioRead = 4,
    MmioWrite = 5,
    Interrupted = 6,
    Other = 7,
}

/// The outcome of a realm open (arg0 of [`TraceKind::RealmOpen`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum OpenOutcome {
    /// Mapped for optimized access, read-write.
    MappedReadWrite = 0,
    /// Mapped for optimized read-only access.
    MappedReadOnly = 1,
    /// Handed over to protected invocation.
    Protected = 2,
    /// Refused: the keys give no right to it.
    Refused = 3,
}

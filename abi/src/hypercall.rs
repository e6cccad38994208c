//! Kernel -> VMM requests.
//!
//! A hypercall is one `in eax, HYPERCALL_PORT` executed at CPL0 with the hypercall number in
//! RAX and its arguments in RDI, RSI, RDX, RCX, R8, R9 (registers, because every memory
//! operand costs the emulated CPL0 path about a microsecond on our hosts). The VMM reads the
//! registers at the I/O exit and answers with the 32-bit value the `in` returns: zero or a
//! positive count on success, a negative [`HypercallError`] otherwise. Numbers the VMM does
//! not know, and arguments it cannot use, get an error reply; they never stop the VMM.

/// The I/O port of the hypercall (an 8-bit port, so the `in` takes it as an immediate).
pub const HYPERCALL_PORT: u16 = 0x99;

/// Hypercall numbers (RAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Hypercall {
    /// Print bytes on the console of the calling vCPU. RDI = virtual address (translated
    /// through the calling vCPU's current page tables), RSI = length, RDX = flags
    /// ([`CONSOLE_USER_BUFFER`]), RCX = who prints: a program index (its protection domain) or
    /// [`CONSOLE_KERNEL`]. The VMM assembles each writer's lines apart and tags them with it.
    /// Returns the number of bytes written.
    ConsoleWrite = 1,
    /// The kernel's report of the machine it found. RDI = guest-physical address of a
    /// [`crate::report::TopologyReport`].
    ReportTopology = 2,
    /// Program RDI is about to enter CPL3 for the first time.
    ProgramStart = 3,
    /// Program RDI exited with code RSI.
    ProgramExit = 4,
    /// Program RDI was terminated by the kernel for a fault: RSI = vector, RDX = error code,
    /// RCX = RIP, R8 = CR2.
    ProgramFault = 5,
    /// Every program has ended: stop the machine. RDI = the guest's exit code.
    Shutdown = 6,
    /// The kernel itself took an exception it cannot handle: RDI = vector, RSI = error code,
    /// RDX = RIP, RCX = CR2, R8 = CS, R9 = RSP. Does not return.
    KernelFault = 7,
    /// The kernel hit a fatal condition of its own (a Rust panic, a broken boot info): the
    /// message was printed with [`Hypercall::ConsoleWrite`] first. Does not return.
    KernelPanic = 8,
    /// The calling vCPU's trace ring is full: drain it now. Returns when the VMM has consumed
    /// what it could (the kernel re-reads the ring's tail).
    TraceFlush = 9,
    /// The kernel terminated program RDI's protection domain: RSI = a
    /// [`crate::realm::Termination`], RDX = the address touched, RCX = the realm.
    DomainTerminated = 10,
    /// Zero RSI pages of guest-physical memory from RDI (bulk work the kernel must not do at
    /// emulated speed: frames are zeroed here before they are reused).
    ZeroFrames = 11,
    /// Fill RSI bytes at guest-virtual RDI (translated through the current page tables; every
    /// page must be user-writable) with random bytes from the host.
    Random = 12,
    /// A program's mark (`Syscall::Mark`): RDI = the mark, RSI = the program.
    Mark = 13,
    /// A remote-memory latency trap: a CPU of node RDI touched page RDX (guest-virtual) of
    /// realm RCX, homed on node RSI. The VMM charges the latency for (RDI, RSI) as the boot's
    /// [`crate::latency::LatencyMode`] says (spinning or sleeping the vCPU, or on its virtual
    /// clock) and returns the nanoseconds charged.
    LatencyCharge = 14,
    /// Builds the armed copy of a realm's page tables (bulk work the kernel must not do at
    /// emulated speed). RDI = guest-physical address of the realm's first page table (its
    /// tables are contiguous), RSI = guest-physical address of the copy (a zeroed run of
    /// 1 + RDX frames: directory, then tables), RDX = number of tables. The copy's directory
    /// points entry i at its table i; each of its tables is the realm's with every present
    /// no-execute entry made not present and [`crate::latency::ARMED`].
    ArmedCopy = 15,
    /// Copies RDX pages of guest-physical memory from RDI to RSI (a realm's frames moving to
    /// another node).
    CopyFrames = 16,
    /// The kernel's latency counts at shutdown. RDI = guest-physical address of a
    /// [`crate::latency::LatencyReport`].
    ReportLatency = 17,
}

impl Hypercall {
    /// Decodes a hypercall number.
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::ConsoleWrite,
            2 => Self::ReportTopology,
            3 => Self::ProgramStart,
            4 => Self::ProgramExit,
            5 => Self::ProgramFault,
            6 => Self::Shutdown,
            7 => Self::KernelFault,
            8 => Self::KernelPanic,
            9 => Self::TraceFlush,
            10 => Self::DomainTerminated,
            11 => Self::ZeroFrames,
            12 => Self::Random,
            13 => Self::Mark,
            14 => Self::LatencyCharge,
            15 => Self::ArmedCopy,
            16 => Self::CopyFrames,
            17 => Self::ReportLatency,
            _ => return None,
        })
    }
}

/// [`Hypercall::ConsoleWrite`] flag: the buffer comes from a program, so every page of it must
/// be user-accessible in the current page tables (the VMM checks as the CPU would at CPL3).
pub const CONSOLE_USER_BUFFER: u64 = 1 << 0;

/// [`Hypercall::ConsoleWrite`] writer (RCX): the kernel's own output.
pub const CONSOLE_KERNEL: u64 = u64::MAX;

/// Error replies (negated in the 32-bit reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum HypercallError {
    /// Unknown hypercall number.
    UnknownHypercall = 1,
    /// An address argument is not mapped (or not user-accessible when it must be).
    BadAddress = 2,
    /// Another argument is out of range.
    InvalidArgument = 3,
}

impl HypercallError {
    /// The value the `in` returns for this error.
    pub const fn reply(self) -> u32 {
        (-(self as i32)) as u32
    }

    /// Decodes a reply; `None` when it is not an error.
    pub fn from_reply(reply: u32) -> Option<Self> {
        Some(match reply as i32 {
            -1 => Self::UnknownHypercall,
            -2 => Self::BadAddress,
            -3 => Self::InvalidArgument,
            _ => return None,
        })
    }
}

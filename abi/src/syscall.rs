//! Program -> kernel requests through the kernel gate.
//!
//! The gate is `int 4` (vector [`KERNEL_GATE_VECTOR`], a DPL-3 interrupt gate): on our hosts
//! `syscall` does not work from CPL3 and `int N` arrives as #UD for every N but 3 and 4. The
//! number goes in RAX, arguments in RDI, RSI, RDX, R10, R8, R9; the result comes back in RAX
//! (a negative [`SysError`] on failure). Every other register is preserved.
//!
//! Protected invocations have a gate of their own, `int3` (vector
//! [`INVOCATION_GATE_VECTOR`]), so that their kernel path starts without telling them apart
//! from every other call. RDI tells the two uses apart: a realm number (below 2^32) calls it
//! ([`Syscall::ProtectedCall`]), an invocation id (at least [`MIN_INVOCATION_ID`]) returns that
//! invocation ([`Syscall::InvocationReturn`]); each has its own registers (see the two). RAX
//! is not looked at; through `int 4` the two numbers are [`SysError::NoSuchCall`]. No debugger
//! runs programs, so the breakpoint vector is free.

/// Interrupt vector of the kernel gate.
pub const KERNEL_GATE_VECTOR: u8 = 4;

/// Interrupt vector of the protected-invocation gate (`int3`).
pub const INVOCATION_GATE_VECTOR: u8 = 3;

/// Every invocation id is at least this, and every realm number below it: RDI at the
/// invocation gate is one or the other.
pub const MIN_INVOCATION_ID: u64 = 1 << 32;

/// System-call numbers (RAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Syscall {
    /// Print bytes on the console. RDI = buffer, RSI = length. Returns bytes written.
    Write = 1,
    /// End the calling program. RDI = exit code (0..=119 reach psyche-vmm's exit status).
    Exit = 2,
    /// Returns the calling CPU's index in the low 32 bits and its node in the high 32.
    CpuInfo = 3,
    /// Returns the number of CPUs online in the low 32 bits and of nodes in the high 32.
    MachineInfo = 4,
    /// Creates a realm. RDI = address of a [`crate::realm::RealmSpec`]. Returns the realm id
    /// (its range starts at [`crate::realm::realm_base`]). The realm and its frames are charged
    /// to the caller's share ([`SysError::OverQuota`] beyond it).
    RealmCreate = 5,
    /// Destroys realm RDI and every realm it owns, transitively. Needs the destroy right.
    RealmDestroy = 6,
    /// Opens realm RDI into the caller's view now, presenting the key at RSI (which need not be
    /// in the thread's key list), RDX = [`crate::realm::OpenMode`].
    RealmOpen = 7,
    /// Sets the rights of the key at RSI on realm RDI's access list to RDX (0 removes the
    /// entry). Needs the initialize right. Domains that have the realm open lose it when
    /// rights are taken away: their next touch is checked against the new list.
    AclSet = 8,
    /// Fills RSI bytes at RDI with random bytes from the host (keys are made from these).
    Random = 9,
    /// Tells the kernel where the calling domain's [`crate::upcall::ProcessorBlock`] is (RDI),
    /// and reads its handler and quantum from it.
    SetProcessorBlock = 10,
    /// Publishes realm RSI under the 64-bit name RDI (a rendezvous for programs of one boot).
    /// Needs the initialize right on the realm, unless it is the caller's own root realm. A
    /// name belongs to the domain that published it first: only that domain may bind it to
    /// another realm ([`SysError::NameTaken`] for the others). Each domain holds at most its
    /// share of the name table ([`SysError::OverQuota`]). A name goes away when its realm is
    /// destroyed, or when its publisher or the domain whose root realm it names ends.
    NamePublish = 11,
    /// Returns the realm published under the name RDI in the low 32 bits, and the protection
    /// domain that published it in the high 32 (so that a client can tell whose name it found).
    NameLookup = 12,
    /// Does nothing: the gate's entry stub returns at once (the null kernel gate of the
    /// benchmarks).
    Null = 13,
    /// Passes the mark RDI to the VMM, which notes how many kernel instructions this vCPU had
    /// executed when it arrived (when psyche-vmm counts them: `bench`).
    Mark = 14,
    /// Ends an upcall: restores the thread whose [`crate::upcall::ContextBlock`] is at RDI and
    /// runs it. Does not return.
    Resume = 15,
    /// Registers the calling domain's operation table: RDI = base, RSI = count (entries
    /// [`crate::upcall::OPERATION_ENTRY_SIZE`] apart, in its root realm).
    RegisterOperations = 16,
    /// Through the invocation gate (RDI at least [`MIN_INVOCATION_ID`]): completes invocation
    /// RDI with result RAX. When it is the one this CPU is running, the caller resumes at once
    /// and this does not return; a deferred one is completed for its caller (a completed
    /// upcall) and this returns 0.
    InvocationReturn = 17,
    /// The callee will complete invocation RDI later (a server thread has it): the caller's
    /// domain gets its processor back with a blocked upcall. Does not return.
    InvocationDefer = 18,
    /// Through the invocation gate (RDI below [`MIN_INVOCATION_ID`]): a protected invocation,
    /// insisting on protection: RDI = realm, RDX = operation, R8, R9,
    /// R10, R11 = its arguments (not the usual registers: these are where the callee's
    /// invocation-arrived upcall takes them, so the kernel need not move them). Returns its
    /// result. The same as a call of the operation's entry when the caller's view does not map
    /// the realm.
    ProtectedCall = 19,
    /// Nothing to run: this processor waits until an upcall arrives for the domain. Does not
    /// return (the upcall handler runs next), except with `Busy` inside a protected invocation,
    /// where the processor is the caller's.
    Idle = 20,
    /// Wakes domain RDI's processor if it idles (a wakeup upcall), so that a thread another
    /// domain unblocked gets to run.
    Wake = 21,
    /// Returns the address of realm RDI's operation table (registered by the domain whose root
    /// it is), so that callers can call its entries.
    Operations = 22,
    /// Returns realm RDI's home node: where its frames are.
    RealmHome = 23,
    /// Moves realm RDI to node RSI: its frames are copied there, and every view maps the same
    /// addresses to the new frames. Needs the initialize right. Users of the realm wait while
    /// it moves and never see it half copied. The new frames are charged to the share of the
    /// realm's creator on that node ([`SysError::OverQuota`] beyond it).
    RealmMigrate = 24,
    /// Moves the calling protection domain to CPU RDI: the call returns 0 there (every thread
    /// of the domain goes along; its upcall work area for that CPU is made when first needed).
    MoveToCpu = 25,
    /// Returns how many latency traps realm RDI has taken since it was created or last moved:
    /// from CPUs of node RSI, or from every node when RSI is `u64::MAX`.
    RealmTraps = 26,
}

impl Syscall {
    /// Decodes a system-call number.
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::Write,
            2 => Self::Exit,
            3 => Self::CpuInfo,
            4 => Self::MachineInfo,
            5 => Self::RealmCreate,
            6 => Self::RealmDestroy,
            7 => Self::RealmOpen,
            8 => Self::AclSet,
            9 => Self::Random,
            10 => Self::SetProcessorBlock,
            11 => Self::NamePublish,
            12 => Self::NameLookup,
            13 => Self::Null,
            14 => Self::Mark,
            15 => Self::Resume,
            16 => Self::RegisterOperations,
            17 => Self::InvocationReturn,
            18 => Self::InvocationDefer,
            19 => Self::ProtectedCall,
            20 => Self::Idle,
            21 => Self::Wake,
            22 => Self::Operations,
            23 => Self::RealmHome,
            24 => Self::RealmMigrate,
            25 => Self::MoveToCpu,
            26 => Self::RealmTraps,
            _ => return None,
        })
    }
}

/// System-call errors (returned negated in RAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i64)]
pub enum SysError {
    /// No such system call.
    NoSuchCall = 1,
    /// A pointer argument is not a mapped, user-accessible range.
    BadAddress = 2,
    /// Another argument is out of range.
    InvalidArgument = 3,
    /// No such realm (or name).
    NotFound = 4,
    /// The caller's keys do not carry the right this needs.
    NoRight = 5,
    /// Not enough memory on the node (or anywhere near it).
    OutOfMemory = 6,
    /// The realm cannot be destroyed now (it is the root realm of a running domain).
    Busy = 7,
    /// A fixed-size table is full (realms, access-list entries, names).
    TableFull = 8,
    /// The name is published by another protection domain, which alone may bind it again.
    NameTaken = 9,
    /// The caller's share is used up: of realms, of the memory of the node (frames of its
    /// realms, page tables and work areas), or of the name table. Other programs keep theirs.
    OverQuota = 10,
}

impl SysError {
    /// Decodes a return value; `None` when it is not an error.
    pub fn from_return(value: i64) -> Option<Self> {
        Some(match value {
            -1 => Self::NoSuchCall,
            -2 => Self::BadAddress,
            -3 => Self::InvalidArgument,
            -4 => Self::NotFound,
            -5 => Self::NoRight,
            -6 => Self::OutOfMemory,
            -7 => Self::Busy,
            -8 => Self::TableFull,
            -9 => Self::NameTaken,
            -10 => Self::OverQuota,
            _ => return None,
        })
    }

    /// The value returned in RAX for this error.
    pub const fn to_return(self) -> i64 {
        -(self as i64)
    }
}

/// Highest program exit code psyche-vmm passes through as its own exit status; higher codes
/// are reported as out of range (psyche-vmm uses 120..=127 for its own outcomes).
pub const MAX_PASSTHROUGH_EXIT_CODE: u64 = 119;

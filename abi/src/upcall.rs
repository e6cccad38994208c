//! Threads, upcalls and protected invocations: the shapes shared by the kernel and the
//! user-level thread packages of realm-sdk.
//!
//! The kernel knows no threads. It knows, per protection domain, a [`ProcessorBlock`] in the
//! domain's memory: which thread's [`ContextBlock`] is current, and where the domain's upcall
//! handler is. When something happens that the domain's scheduler must decide about, the
//! kernel saves the current thread's registers in its context block and enters the handler at
//! CPL3 with an [`Upcall`] in registers, on a work area the kernel maps for that domain and
//! CPU. An upcall never returns: the handler picks a thread and resumes it
//! (`Syscall::Resume`), or idles the processor (`Syscall::Idle`).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::realm::Key;

/// A user thread's registers, as the kernel saves them for an upcall and restores them on
/// `Syscall::Resume`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Registers {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A thread's x87, MMX and SSE state, as `fxsave64` writes it and `fxrstor64` reads it
/// (512 bytes, 16-byte aligned). Protection domains never share it: the kernel saves and loads
/// it wherever it switches between them, and saves it with a thread's registers for an upcall.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(16))]
pub struct FpuImage(pub [u8; FPU_IMAGE_SIZE]);

/// Bytes of an [`FpuImage`].
pub const FPU_IMAGE_SIZE: usize = 512;
/// Offset of the x87 control word in an [`FpuImage`] (16 bits).
pub const FPU_FCW_OFFSET: usize = 0;
/// Offset of MXCSR in an [`FpuImage`] (32 bits; its reserved bits must stay clear, or
/// `fxrstor64` faults).
pub const FPU_MXCSR_OFFSET: usize = 24;

impl FpuImage {
    /// The state a thread starts with, and what an upcall handler and a protected invocation's
    /// callee find: every register zero and empty, the x87 control word 0x37F and MXCSR 0x1F80
    /// (every exception masked, round to nearest), as after `fninit` and at reset.
    pub const INITIAL: Self = {
        let mut bytes = [0; FPU_IMAGE_SIZE];
        bytes[FPU_FCW_OFFSET] = 0x7F;
        bytes[FPU_FCW_OFFSET + 1] = 0x03;
        bytes[FPU_MXCSR_OFFSET] = 0x80;
        bytes[FPU_MXCSR_OFFSET + 1] = 0x1F;
        Self(bytes)
    };

    /// The x87 control word.
    pub fn fcw(&self) -> u16 {
        u16::from_le_bytes([self.0[FPU_FCW_OFFSET], self.0[FPU_FCW_OFFSET + 1]])
    }

    /// MXCSR.
    pub fn mxcsr(&self) -> u32 {
        let b = &self.0[FPU_MXCSR_OFFSET..FPU_MXCSR_OFFSET + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Default for FpuImage {
    fn default() -> Self {
        Self::INITIAL
    }
}

/// A thread's context block, in its domain's memory (64-byte aligned, within one page).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ContextBlock {
    /// Address of the thread's key list ([`Key`] array).
    pub keys: u64,
    /// Keys in the list (at most [`crate::realm::MAX_THREAD_KEYS`]).
    pub key_count: u64,
    /// Where the kernel saves the thread's registers for an upcall.
    pub registers: Registers,
    /// Zero.
    pub reserved: [u64; 4],
    /// Where the kernel saves the thread's x87/SSE state with its registers. `Syscall::Resume`
    /// does not load it (the kernel never loads an image a program wrote): the thread package
    /// loads it itself (`fxrstor64`) just before it resumes the thread.
    pub fpu: FpuImage,
}

impl Registers {
    /// Every register zero.
    pub const ZERO: Self = Self {
        rax: 0,
        rbx: 0,
        rcx: 0,
        rdx: 0,
        rsi: 0,
        rdi: 0,
        rbp: 0,
        rsp: 0,
        r8: 0,
        r9: 0,
        r10: 0,
        r11: 0,
        r12: 0,
        r13: 0,
        r14: 0,
        r15: 0,
        rip: 0,
        rflags: 0,
    };
}

impl ContextBlock {
    /// A context block with no keys, every register zero and the initial x87/SSE state (for
    /// statics: `Default` is not const).
    pub const EMPTY: Self =
        Self { keys: 0, key_count: 0, registers: Registers::ZERO, reserved: [0; 4], fpu: FpuImage::INITIAL };
}

/// Offset of [`ContextBlock::fpu`].
pub const CONTEXT_FPU_OFFSET: usize = core::mem::offset_of!(ContextBlock, fpu);
const _: () = assert!(CONTEXT_FPU_OFFSET == 192 && core::mem::size_of::<ContextBlock>() == 704);

/// Bytes of a context block.
pub const CONTEXT_BLOCK_SIZE: usize = core::mem::size_of::<ContextBlock>();

/// A protection domain's processor block (`Syscall::SetProcessorBlock`), in its memory.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ProcessorBlock {
    /// Address of the running thread's [`ContextBlock`]. The thread package keeps it current
    /// when it switches threads (a store, no system call); the kernel reads it when it saves
    /// a thread for an upcall and when it checks keys.
    pub current: u64,
    /// Entry of the domain's upcall handler (0: the domain takes no upcalls; then a fault ends
    /// the domain and protected invocations of its realms are refused).
    pub upcall_handler: u64,
    /// Length of a time slice in microseconds: a time-limit upcall ends each one (0: none).
    pub quantum_us: u64,
    /// Non-zero while the thread package is in a critical section (switching threads): the
    /// kernel then defers a time-limit upcall, setting this to [`CRITICAL_PREEMPTED`] so that
    /// the package yields when it leaves the section.
    pub critical: u64,
}

/// [`ProcessorBlock::critical`]: a time slice ended during the critical section.
pub const CRITICAL_PREEMPTED: u64 = 2;

/// Why an upcall happened (RDI at the handler's entry); its arguments follow in RSI, RDX,
/// RCX, R8, R9, R10 and R11. The handler starts on its work area with every other register
/// zero, except an invocation-arrived upcall on the kernel's fast path (the invocation runs on
/// the caller's CPU): there RAX, RBX, RBP and R12-R15 hold what the caller left in them, as the
/// callee's registers other than RAX reach the caller after `Syscall::InvocationReturn`. The
/// kernel passes no kernel value either way; each side clears what it does not mean to show
/// (realm-sdk's call and return stubs do) before it enters the gate.
///
/// A completed or wakeup upcall that interrupts a running thread (rather than an idle
/// processor) names that thread's context block, saved, in R9 (0 when none was running).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Upcall {
    /// A protected invocation of one of this domain's operations arrived. RSI = invocation id
    /// (at least [`crate::syscall::MIN_INVOCATION_ID`]), RDX = operation, RCX = the calling
    /// domain (with [`ARRIVED_PLACED`] and [`ARRIVED_INTERRUPTED`] possibly set), R8..R11 = the
    /// operation's four arguments.
    /// The handler ends it with `Syscall::InvocationReturn` (or defers it).
    InvocationArrived = 1,
    /// A thread of this domain is blocked in a protected invocation the callee deferred.
    /// RSI = its context block (saved, to be resumed when the invocation completes),
    /// RDX = invocation id.
    Blocked = 2,
    /// A protected invocation a thread of this domain was blocked in has completed; the result
    /// is in that thread's saved RAX. RSI = its context block, RDX = invocation id,
    /// RCX = the result.
    Completed = 3,
    /// The running thread's time slice ended. RSI = its context block.
    TimeLimit = 4,
    /// The running thread took a hardware fault. RSI = its context block (RIP at the faulting
    /// instruction), RDX = vector, RCX = error code, R8 = CR2.
    Fault = 5,
    /// The processor had nothing to run (`Syscall::Idle`) and someone woke it
    /// (`Syscall::Wake`): a thread may have become runnable.
    Wakeup = 6,
}

impl Upcall {
    /// Decodes an upcall kind.
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::InvocationArrived,
            2 => Self::Blocked,
            3 => Self::Completed,
            4 => Self::TimeLimit,
            5 => Self::Fault,
            6 => Self::Wakeup,
            _ => return None,
        })
    }
}

/// [`Upcall::InvocationArrived`], in RCX: the invocation was placed on this domain's own
/// processor, near its data, because the caller runs on another NUMA node. The caller's domain
/// has its processor back already (a blocked upcall), so `Syscall::InvocationReturn` completes
/// the invocation and returns to the handler, which then schedules as after any upcall; there
/// is nothing to defer.
pub const ARRIVED_PLACED: u64 = 1 << 63;
/// [`Upcall::InvocationArrived`], in RCX, with [`ARRIVED_PLACED`]: the upcall interrupted the
/// thread the processor block names as current, which the kernel saved in its context block.
pub const ARRIVED_INTERRUPTED: u64 = 1 << 62;

/// Operation entries of a realm (`Syscall::RegisterOperations`) are this far apart: operation
/// `i` of a table at `base` is at `base + i * OPERATION_ENTRY_SIZE`. A call of an entry the
/// caller's view does not map is a protected invocation of operation `i`.
pub const OPERATION_ENTRY_SIZE: u64 = 16;
/// Most operations a realm registers.
pub const MAX_OPERATIONS: u64 = 256;
/// Offset in a domain's root realm of the upcall work areas the kernel maps: per CPU, one for
/// each level a handler can run at there ([`UPCALL_LEVELS`]), `(cpu * UPCALL_LEVELS + level) *
/// UPCALL_STACK_SIZE` on.
pub const UPCALL_AREA_OFFSET: u64 = 512 << 20;
/// Levels of work area per CPU: level 0 for upcalls into the domain's own scheduler, level
/// `d + 1` for a protected invocation made at invocation depth `d` (the kernel nests at most
/// 8 on a CPU), so that a domain invoked again, deeper in the
/// same chain (A invokes B, which invokes A), or by another program while its earlier
/// activation is set aside at a slice's end, never starts on a stack in use.
pub const UPCALL_LEVELS: u64 = 9;
/// Bytes of one upcall work area (its stack).
pub const UPCALL_STACK_SIZE: u64 = 16 * 1024;

/// Operation results are values below 2^63; at or above are negated
/// `crate::syscall::SysError`s, which is also how a protected invocation that could not be made
/// (no such realm or operation, no right) returns in RAX, as a system call does.
pub const MAX_OPERATION_RESULT: u64 = i64::MAX as u64;
const _: () = assert!(core::mem::size_of::<Key>() == 16);

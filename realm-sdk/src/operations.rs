//! A program's operations: the protocol of its root realm, invoked by other domains.
//!
//! A program registers up to [`MAX_OPERATIONS`] functions. The kernel learns where their
//! entries are (a table of 16-byte stubs in this program's image, so in its root realm); a
//! caller whose view maps this realm calls an entry and runs the operation as an ordinary
//! procedure call (optimized invocation); a caller that may only invoke with protection calls
//! the same entry, faults, and the kernel runs the operation here, in this domain, through an
//! invocation-arrived upcall (protected invocation). [`Remote`] is the caller's side.
//!
//! Operations 0 and 1 of every program are [`crate::threads::block`]'s and
//! [`crate::threads::unblock`]'s partners for other domains: `unblock(thread)` and
//! `wake()`, the pair every root realm provides.
//!
//! An operation can also be *message-style*: its invocations are queued for this program's
//! server threads ([`next_request`], [`reply`]) instead of run in the handler; the caller's
//! domain gets its processor back meanwhile (a blocked upcall), and its thread continues when
//! the reply comes (a completed upcall).

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use psyche_abi::syscall::Syscall;
use psyche_abi::upcall::ARRIVED_PLACED;

use crate::sys::{raw_syscall, result, SysError};
use crate::threads::{self, ThreadId};

/// Most operations a program registers (the stubs below).
pub const MAX_OPERATIONS: usize = 16;
/// The unblock operation every program offers (argument: a thread id).
pub const UNBLOCK: u64 = 0;
/// The wake operation every program offers (no argument).
pub const WAKE: u64 = 1;

/// An operation: four arguments, one result (below 2^63).
pub type Operation = extern "sysv64" fn(u64, u64, u64, u64) -> u64;

extern "sysv64" fn no_operation(_: u64, _: u64, _: u64, _: u64) -> u64 {
    SysError::NoSuchCall.to_return() as u64
}

extern "sysv64" fn unblock_operation(thread: u64, _: u64, _: u64, _: u64) -> u64 {
    match threads::unblock(ThreadId(thread as u32)) {
        Ok(()) => 0,
        Err(error) => error.to_return() as u64,
    }
}

extern "sysv64" fn wake_operation(_: u64, _: u64, _: u64, _: u64) -> u64 {
    let _ = threads::wake(crate::program_index() as u32);
    0
}

/// The operations' functions, read by the entry stubs (so an optimized caller reaches them
/// too: this table is in the root realm it has open).
#[no_mangle]
static mut REALM_SDK_OPERATIONS: [Operation; MAX_OPERATIONS] = [no_operation; MAX_OPERATIONS];
/// Which operations are message-style.
static MESSAGE_STYLE: [AtomicBool; MAX_OPERATIONS] = [const { AtomicBool::new(false) }; MAX_OPERATIONS];

// The entry table: stub i jumps to operation i. Stubs are 16 bytes apart, as the kernel
// expects (`OPERATION_ENTRY_SIZE`).
global_asm!(
    r#"
    .section .text
    .balign 16
    .global realm_sdk_operation_entries
realm_sdk_operation_entries:
    .set i, 0
    .rept 16
    .balign 16
    jmp qword ptr [rip + REALM_SDK_OPERATIONS + i * 8]
    .set i, i + 1
    .endr
    "#
);

extern "C" {
    static realm_sdk_operation_entries: u8;
}

/// Registers this program's operations (2.. onward; 0 and 1 are unblock and wake), makes them
/// invocable by other domains, and turns upcalls on if they are not (with no time slicing).
pub fn register(operations: &[Operation]) -> Result<(), SysError> {
    if operations.len() + 2 > MAX_OPERATIONS {
        return Err(SysError::InvalidArgument);
    }
    // SAFETY: the table is written here, by the main thread, before the kernel is told about
    // it; nobody calls an entry before that.
    unsafe {
        let table = &mut *core::ptr::addr_of_mut!(REALM_SDK_OPERATIONS);
        table[UNBLOCK as usize] = unblock_operation;
        table[WAKE as usize] = wake_operation;
        for (slot, &operation) in table[2..].iter_mut().zip(operations) {
            *slot = operation;
        }
    }
    let base = core::ptr::addr_of!(realm_sdk_operation_entries) as u64;
    result(raw_syscall(Syscall::RegisterOperations as u64, base, MAX_OPERATIONS as u64, 0))?;
    if !threads::enabled() {
        threads::enable(0)?;
    }
    Ok(())
}

/// Makes operation `operation` message-style: its invocations wait for a server thread.
pub fn message_style(operation: u64) {
    if let Some(flag) = MESSAGE_STYLE.get(operation as usize) {
        flag.store(true, Ordering::Release);
    }
}

/// A queued invocation of a message-style operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub invocation: u64,
    pub operation: u64,
    pub caller: u64,
    pub args: [u64; 4],
}

const QUEUE: usize = 64;

/// A bounded queue of requests, safe between the invocation handlers (any processor) and the
/// server threads (a sequence number per slot: Vyukov's bounded MPMC queue).
struct RequestQueue {
    slots: [(AtomicU64, [AtomicU64; 7]); QUEUE],
    head: AtomicUsize,
    tail: AtomicUsize,
}

static REQUESTS: RequestQueue = RequestQueue {
    slots: [const { (AtomicU64::new(0), [const { AtomicU64::new(0) }; 7]) }; QUEUE],
    head: AtomicUsize::new(0),
    tail: AtomicUsize::new(0),
};
/// Server threads waiting for a request.
static WAITING: [AtomicU64; threads::MAX_THREADS] = [const { AtomicU64::new(u64::MAX) }; threads::MAX_THREADS];

impl RequestQueue {
    fn init_once(&self) {
        static DONE: AtomicBool = AtomicBool::new(false);
        if !DONE.swap(true, Ordering::AcqRel) {
            for (i, slot) in self.slots.iter().enumerate() {
                slot.0.store(i as u64, Ordering::Relaxed);
            }
        }
    }

    fn push(&self, request: &Request) -> bool {
        let mut tail = self.tail.load(Ordering::Relaxed);
        loop {
            let slot = &self.slots[tail % QUEUE];
            let sequence = slot.0.load(Ordering::Acquire);
            if sequence == tail as u64 {
                if self.tail.compare_exchange_weak(tail, tail + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    let words = [
                        request.invocation,
                        request.operation,
                        request.caller,
                        request.args[0],
                        request.args[1],
                        request.args[2],
                        request.args[3],
                    ];
                    for (cell, word) in slot.1.iter().zip(words) {
                        cell.store(word, Ordering::Relaxed);
                    }
                    slot.0.store(tail as u64 + 1, Ordering::Release);
                    return true;
                }
                tail = self.tail.load(Ordering::Relaxed);
            } else if sequence < tail as u64 {
                return false;
            } else {
                tail = self.tail.load(Ordering::Relaxed);
            }
        }
    }

    fn pop(&self) -> Option<Request> {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            let slot = &self.slots[head % QUEUE];
            let sequence = slot.0.load(Ordering::Acquire);
            if sequence == head as u64 + 1 {
                if self.head.compare_exchange_weak(head, head + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    let w: [u64; 7] = core::array::from_fn(|i| slot.1[i].load(Ordering::Relaxed));
                    slot.0.store((head + QUEUE) as u64, Ordering::Release);
                    return Some(Request {
                        invocation: w[0],
                        operation: w[1],
                        caller: w[2],
                        args: [w[3], w[4], w[5], w[6]],
                    });
                }
                head = self.head.load(Ordering::Relaxed);
            } else if sequence < head as u64 + 1 {
                return None;
            } else {
                head = self.head.load(Ordering::Relaxed);
            }
        }
    }
}

/// The next request for a message-style operation; blocks the calling (server) thread until
/// one arrives.
pub fn next_request() -> Request {
    REQUESTS.init_once();
    let me = threads::current();
    loop {
        if let Some(request) = REQUESTS.pop() {
            return request;
        }
        WAITING[me.0 as usize].store(u64::from(me.0), Ordering::Release);
        // A request queued between the pop and the flag would not have unblocked us.
        if let Some(request) = REQUESTS.pop() {
            WAITING[me.0 as usize].store(u64::MAX, Ordering::Release);
            return request;
        }
        threads::block();
        WAITING[me.0 as usize].store(u64::MAX, Ordering::Release);
    }
}

/// Answers a request: its caller continues with `value`.
pub fn reply(request: &Request, value: u64) -> Result<(), SysError> {
    result(invocation_return(request.invocation, value)).map(|_| ())
}

/// `Syscall::InvocationReturn`: the caller of `invocation` continues with `value` (what
/// [`reply`] does for a request; an id this domain is not serving gets an error back). Every
/// other register is cleared first: the kernel's fast path passes the caller what it does not
/// use as it is, and nothing of this domain's should go with the answer.
pub fn invocation_return(invocation: u64, value: u64) -> i64 {
    let result: i64;
    // SAFETY: a system call; RBX and RBP, which asm cannot name, are saved around it, and every
    // other register it clears is declared clobbered.
    unsafe {
        core::arch::asm!(
            "push rbx",
            "push rbp",
            "xor ebx, ebx",
            "xor ebp, ebp",
            // The invocation gate (`psyche_abi::syscall::INVOCATION_GATE_VECTOR`).
            "int3",
            "pop rbp",
            "pop rbx",
            inlateout("rax") value as i64 => result,
            inlateout("rdi") invocation => _,
            inlateout("rsi") 0u64 => _, inlateout("rdx") 0u64 => _, inlateout("rcx") 0u64 => _, inlateout("r8") 0u64 => _,
            inlateout("r9") 0u64 => _, inlateout("r10") 0u64 => _, inlateout("r11") 0u64 => _,
            inlateout("r12") 0u64 => _, inlateout("r13") 0u64 => _, inlateout("r14") 0u64 => _,
            inlateout("r15") 0u64 => _,
        );
    }
    result
}

/// Runs an arrived invocation (in the upcall handler). One that runs on the caller's processor
/// ends with the caller resuming, so this does not return; one the kernel placed on this
/// domain's own processor (`ARRIVED_PLACED` in `caller`) returns once it is answered or queued,
/// and the handler schedules as after any upcall.
pub(crate) fn dispatch(invocation: u64, operation: u64, caller: u64, args: [u64; 4]) {
    let placed = caller & ARRIVED_PLACED != 0;
    let caller = caller & u64::from(u32::MAX);
    let message = MESSAGE_STYLE.get(operation as usize).is_some_and(|flag| flag.load(Ordering::Acquire));
    if message {
        REQUESTS.init_once();
        let request = Request { invocation, operation, caller, args };
        if REQUESTS.push(&request) {
            if let Some(waiter) = WAITING.iter().find_map(|w| {
                let thread = w.swap(u64::MAX, Ordering::AcqRel);
                (thread != u64::MAX).then_some(thread)
            }) {
                let _ = threads::unblock(ThreadId(waiter as u32));
            }
            if placed {
                // The caller is blocked already; a server thread will answer.
                return;
            }
            raw_syscall(Syscall::InvocationDefer as u64, invocation, 0, 0);
        }
        // The queue is full (or the kernel would not defer): the caller gets an error.
        invocation_return(invocation, SysError::TableFull.to_return() as u64);
        if placed {
            return;
        }
        crate::exit(107)
    }
    // SAFETY: the table is only written before registration.
    let function = unsafe { (*core::ptr::addr_of!(REALM_SDK_OPERATIONS)).get(operation as usize).copied() };
    let value = function.map_or(SysError::NoSuchCall.to_return() as u64, |f| f(args[0], args[1], args[2], args[3]));
    invocation_return(invocation, value);
    if !placed {
        crate::exit(108)
    }
}

/// Another domain's operations, seen from here.
#[derive(Clone, Copy, Debug)]
pub struct Remote {
    realm: u32,
    entries: u64,
    /// Whether this view maps the realm (optimized invocation) or not (protected).
    optimized: bool,
    /// Always go through the kernel, even with optimized rights.
    insist: bool,
}

impl Remote {
    /// The operations of the program whose root realm is `realm`. Decides once how to invoke
    /// them: if this domain's keys let it open the realm, invocations are procedure calls;
    /// otherwise they are protected.
    pub fn new(realm: u32) -> Result<Self, SysError> {
        let entries = result(raw_syscall(Syscall::Operations as u64, u64::from(realm), 0, 0))?;
        // SAFETY: `Realm` is only used for its explicit-open calls here.
        let handle: crate::realm::Realm<u8> = unsafe { crate::realm::Realm::attach(realm) };
        let optimized = handle.open(false).is_ok();
        Ok(Self { realm, entries, optimized, insist: false })
    }

    /// The same, insisting on protection: every invocation goes through the kernel into the
    /// realm's own domain, whatever this domain's rights.
    pub fn protected(realm: u32) -> Result<Self, SysError> {
        let entries = result(raw_syscall(Syscall::Operations as u64, u64::from(realm), 0, 0))?;
        Ok(Self { realm, entries, optimized: false, insist: true })
    }

    /// Whether invocations are procedure calls.
    pub fn is_optimized(&self) -> bool {
        self.optimized && !self.insist
    }

    /// The realm.
    pub fn realm(&self) -> u32 {
        self.realm
    }

    /// Invokes operation `operation` with four arguments.
    pub fn call(&self, operation: u64, args: [u64; 4]) -> Result<u64, SysError> {
        let value = if self.is_optimized() {
            let entry: Operation = self.entry(operation);
            entry(args[0], args[1], args[2], args[3]) as i64
        } else {
            protected_call(self.realm, operation, args)
        };
        result(value)
    }

    /// Invokes operation `operation` by calling its entry, whatever the view: a protected
    /// invocation by fault on entry when the realm is not open here.
    pub fn call_entry(&self, operation: u64, args: [u64; 4]) -> Result<u64, SysError> {
        // SAFETY: the stub saves the registers a call must preserve around the entry call,
        // which the kernel's return from a protected invocation does not keep.
        let value = unsafe { call_entry(self.entries + operation * 16, args[0], args[1], args[2], args[3]) };
        result(value)
    }

    fn entry(&self, operation: u64) -> Operation {
        let address = self.entries + operation.min(MAX_OPERATIONS as u64 - 1) * 16;
        // SAFETY: the entry is a stub in the callee's image, open in this view (optimized).
        unsafe { core::mem::transmute::<u64, Operation>(address) }
    }
}

/// A protected invocation through the kernel gate (the fast way after the first entry fault).
pub fn protected_call(realm: u32, operation: u64, args: [u64; 4]) -> i64 {
    let value: i64;
    // SAFETY: the kernel runs the operation in the callee's domain and resumes here with the
    // result in RAX; every other register may be changed, so all are declared clobbered
    // (RBX and RBP, which asm cannot name as clobbers, are saved around it).
    unsafe {
        core::arch::asm!(
            "push rbx",
            "push rbp",
            // The kernel hands the callee what it does not use as it is: nothing of ours goes.
            "xor ebx, ebx",
            "xor ebp, ebp",
            "xor ecx, ecx",
            "xor esi, esi",
            "xor r12d, r12d",
            "xor r13d, r13d",
            "xor r14d, r14d",
            "xor r15d, r15d",
            // The invocation gate (`psyche_abi::syscall::INVOCATION_GATE_VECTOR`).
            "int3",
            "pop rbp",
            "pop rbx",
            inlateout("rax") 0i64 => value,
            // Where the callee's handler takes them (`Syscall::ProtectedCall`).
            inlateout("rdi") u64::from(realm) => _,
            inlateout("rdx") operation => _,
            inlateout("r8") args[0] => _,
            inlateout("r9") args[1] => _,
            inlateout("r10") args[2] => _,
            inlateout("r11") args[3] => _,
            out("rcx") _, out("rsi") _, out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
        );
    }
    value
}

extern "sysv64" {
    fn call_entry(entry: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> i64;
}

// Calls an operation entry with the four arguments in RDI, RSI, RDX, RCX, saving the
// callee-saved registers first: a protected invocation by fault returns with them changed.
global_asm!(
    r#"
    .section .text
    .global call_entry
call_entry:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov rax, rdi
    mov rdi, rsi
    mov rsi, rdx
    mov rdx, rcx
    mov rcx, r8
    sub rsp, 8
    call rax
    add rsp, 8
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
    "#
);

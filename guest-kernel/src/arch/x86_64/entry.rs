//! Every way into the kernel, in assembly: the boot entry, the exception stubs, the kernel gate
//! (`int 4`), the interrupt stubs, and the way out to CPL3.
//!
//! The CPL0 paths are short on purpose: on our hosts each kernel instruction costs ~0.6 us
//! (~1 us with a memory operand), so the gate passes arguments in registers and saves nothing
//! it does not have to.

use core::arch::global_asm;

use psyche_abi::layout::{USER_CS, USER_DS};
use psyche_abi::upcall::Registers;

/// Registers saved by the exception stubs, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// Boot entry: the VMM starts every vCPU here with RSP on its per-CPU stack, RDI = vCPU index
// and RSI = boot info. `call` (not `jmp`) leaves RSP as the SysV ABI expects at a function's
// entry.
global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    cld
    call {kernel_main}
1:  hlt
    jmp 1b
    "#,
    kernel_main = sym crate::kernel_main,
);

// Every entry from CPL3 that runs Rust (or any string instruction) first clears the flags
// user code may leave set and the CPU does not clear on the way in: DF, which turns the
// kernel's `rep movsb`/`stosb` (memcpy, memset) downwards over its own stack, and AC, which
// would lift SMAP for the whole entry. One `popfq` of 0x2 clears both (and keeps IF clear, as
// the interrupt gate left it): `clac` would be one instruction, but this host's emulated CPL0
// cannot execute it (KVM_EXIT_INTERNAL_ERROR), and `cld` alone leaves AC. Paths that stay in
// assembly and touch no string instruction (the null call, the invocation gate's round trip,
// the wake-up IPI) skip it.
global_asm!(
    r#"
    .macro CLEAR_USER_FLAGS
    push 2
    popfq
    .endm
    "#
);

// Exception stubs: vectors without a CPU-pushed error code push a zero so that every frame
// has the same layout, then the vector, then all general-purpose registers.
global_asm!(
    r#"
    .section .text
    .macro EXCEPTION_NO_ERROR n
    .global psyche_exception_\n
psyche_exception_\n:
    push 0
    push \n
    jmp psyche_exception_common
    .endm

    .macro EXCEPTION_WITH_ERROR n
    .global psyche_exception_\n
psyche_exception_\n:
    push \n
    jmp psyche_exception_common
    .endm

    EXCEPTION_NO_ERROR 0
    EXCEPTION_NO_ERROR 1
    EXCEPTION_NO_ERROR 2
    EXCEPTION_NO_ERROR 5
    EXCEPTION_NO_ERROR 6
    EXCEPTION_NO_ERROR 7
    EXCEPTION_WITH_ERROR 8
    EXCEPTION_NO_ERROR 9
    EXCEPTION_WITH_ERROR 10
    EXCEPTION_WITH_ERROR 11
    EXCEPTION_WITH_ERROR 12
    EXCEPTION_WITH_ERROR 13
    EXCEPTION_WITH_ERROR 14
    EXCEPTION_NO_ERROR 15
    EXCEPTION_NO_ERROR 16
    EXCEPTION_WITH_ERROR 17
    EXCEPTION_NO_ERROR 18
    EXCEPTION_NO_ERROR 19
    EXCEPTION_NO_ERROR 20
    EXCEPTION_WITH_ERROR 21
    EXCEPTION_NO_ERROR 22
    EXCEPTION_NO_ERROR 23
    EXCEPTION_NO_ERROR 24
    EXCEPTION_NO_ERROR 25
    EXCEPTION_NO_ERROR 26
    EXCEPTION_NO_ERROR 27
    EXCEPTION_NO_ERROR 28
    EXCEPTION_WITH_ERROR 29
    EXCEPTION_WITH_ERROR 30
    EXCEPTION_NO_ERROR 31

psyche_exception_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    CLEAR_USER_FLAGS
    mov rdi, rsp
    call {dispatch}
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

    .section .rodata
    .balign 8
    .global psyche_exception_stubs
psyche_exception_stubs:
    .quad psyche_exception_0, psyche_exception_1, psyche_exception_2, 0
    .quad 0, psyche_exception_5, psyche_exception_6, psyche_exception_7
    .quad psyche_exception_8, psyche_exception_9, psyche_exception_10, psyche_exception_11
    .quad psyche_exception_12, psyche_exception_13, psyche_exception_14, psyche_exception_15
    .quad psyche_exception_16, psyche_exception_17, psyche_exception_18, psyche_exception_19
    .quad psyche_exception_20, psyche_exception_21, psyche_exception_22, psyche_exception_23
    .quad psyche_exception_24, psyche_exception_25, psyche_exception_26, psyche_exception_27
    .quad psyche_exception_28, psyche_exception_29, psyche_exception_30, psyche_exception_31
    "#,
    dispatch = sym crate::exception_dispatch,
);

// The kernel gate (`int 4`, DPL 3). RAX = number, arguments in RDI, RSI, RDX, R10, R8, R9.
// The null call returns at once, so that benchmarks see the bare cost of the gate.
// The dispatcher is a SysV function of seven arguments: the six in their registers (R10 moved
// to RCX) and the number on the stack. The caller-saved registers it may have used are cleared
// before returning so no kernel value reaches CPL3; RBX, RBP, R12-R15 are preserved by the
// dispatcher itself. The CPU's frame leaves RSP 8 off a 16-byte boundary; the push (or the
// `sub`) restores the alignment SysV functions expect.
global_asm!(
    r#"
    .section .text
    .global psyche_kernel_gate
psyche_kernel_gate:
    cmp rax, {null}
    je 2f
    CLEAR_USER_FLAGS
    push rax
    mov rcx, r10
    call {dispatch}
1:  add rsp, 8
    xor ecx, ecx
    xor edx, edx
    xor esi, esi
    xor edi, edi
    xor r8d, r8d
    xor r9d, r9d
    xor r10d, r10d
    xor r11d, r11d
    iretq
    // The null system call: straight back with 0.
2:  xor eax, eax
    iretq

    // What the invocation gate's assembly cannot do, Rust does: a return (RDI at least
    // `MIN_INVOCATION_ID`) or a call. These return only with an error for the caller (or 0 for
    // the return of a deferred invocation). Their arguments are still in the gate's registers.
    .global psyche_slow_invocation
psyche_slow_invocation:
    CLEAR_USER_FLAGS
    sub rsp, 8
    mov rcx, rdi
    shr rcx, 32
    jnz 3f
    // ProtectedCall's registers (RDI, RDX, R8-R11) to the function's (RDI, RSI, RDX, RCX, R8, R9).
    mov rsi, rdx
    mov rdx, r8
    mov rcx, r9
    mov r8, r10
    mov r9, r11
    call {protected_call_gate}
    jmp 1b
    // InvocationReturn's (RDI, RAX) to the function's (RDI, RSI).
3:  mov rsi, rax
    call {invocation_return_gate}
    jmp 1b
    "#,
    dispatch = sym crate::syscall_dispatch,
    protected_call_gate = sym crate::upcalls::protected_call_gate,
    invocation_return_gate = sym crate::upcalls::invocation_return_gate,
    null = const psyche_abi::syscall::Syscall::Null as u64,
);

// The invocation gate (`int3`, DPL 3): RDI is a realm number for a call, an invocation id
// for a return (`psyche_abi::syscall::INVOCATION_GATE_VECTOR`). With tracing, the invocation
// paths are the Rust ones, which emit every event.
#[cfg(feature = "trace")]
global_asm!(
    r#"
    .section .text
    .global psyche_invocation_gate
psyche_invocation_gate:
    jmp psyche_slow_invocation
    "#
);

// The protected invocation's round trip in assembly, for the case the Rust path
// (`upcalls::protected_call_gate`, `upcalls::invocation_return`) calls common: the call is the
// one this CPU last checked in full from this depth, with nothing changed since (the depth's
// `InvocationSlot` has a non-zero operation count), and the return is of the innermost
// invocation, by its callee, with nothing changed since the call (the count is still not 0).
// They do what the Rust path does, field for field, with the slot as the record: the switch
// of domain and view (only without latency traps, where slots are filled, so there is nothing
// to re-arm and the master view is the one in CR3), the gate stack one stride lower or higher,
// the id, and the upcall or the resumption. Anything else goes to Rust.
//
// The slot of the depth a call is made from lies `SLOT_BELOW_FRAME` below the CPU's frame of
// the call; the return comes one stride lower. The callee's handler is entered through the
// frame the slot keeps for it.
//
// Until a path commits, the gate's argument registers stay as they came: the Rust path takes
// them from there.
//
// Registers: the caller's and the callee's own values may pass through (each chose to hand
// them over; realm-sdk's stubs clear what they do not mean to pass); every register the path
// used for kernel values is overwritten or cleared, but for the caller's own domain word
// (`caller_state`), which it resumes with in RCX.
//
// Call: RDI = realm, RDX = operation, R8-R11 = arguments (`Syscall::ProtectedCall`): where the
// callee's handler gets them, with RDI = kind, RSI = id, RCX = caller.
// Return: RDI = id, RAX = result: the caller resumes with it in RAX.
#[cfg(not(feature = "trace"))]
global_asm!(
    r#"
    .section .text
    .global psyche_invocation_gate
psyche_invocation_gate:
    // The innermost invocation's id (in the slot of the depth above; at depth 0 the guard's)
    // sends its return on at once; a realm number is never an id.
    cmp rdi, [rsp + {frame_stride} - {slot} + {s_id}]
    je 2f
    cmp rdi, [rsp - {slot} + {s_realm}]
    jne psyche_slow_invocation
    cmp rdx, [rsp - {slot} + {s_operations}]
    jae psyche_slow_invocation
    // The caller (low half) and this CPU's upcall state (high half), as when checked.
    mov rsi, [rsp - {slot} + {s_area}]
    mov rcx, [rsi + {p_domain}]
    cmp rcx, [rsp - {slot} + {s_caller_state}]
    jne psyche_slow_invocation
    // Committed. Into the callee's domain (`domain` and `upcall_domain` in one store: its
    // handler runs) and view (`switch_to`).
    mov rdi, [rsp - {slot} + {s_callee_state}]
    mov [rsi + {p_domain}], rdi
    mov rdi, [rsp - {slot} + {s_callee_view}]
    mov cr3, rdi
    // The caller's x87/SSE state waits in this depth's area; the callee starts clean (`fpu`).
    mov rdi, [rsp - {slot} + {s_fpu}]
    fxsave64 [rdi]
    fxrstor64 [rip + {fpu_initial}]
    // The caller's frame stays where the CPU wrote it: the callee's entries start below.
    sub qword ptr [rsi + {tss_rsp0}], {frame_stride}
    // The id (the slot's next) in RSI, the kind in RDI, the caller in RCX; the operation and
    // its arguments are in place already (RDX, R8-R11).
    mov rsi, [rsp - {slot} + {s_id}]
    mov edi, {arrived}
    mov ecx, ecx
    lea rsp, [rsp - {slot} + {s_entry}]
    iretq

    // The return, its id checked.
2:  cmp qword ptr [rsp + {frame_stride} - {slot} + {s_operations}], 0
    je psyche_slow_invocation
    // By the callee: without latency traps (a slot is filled only then) each domain has its
    // own view.
    mov rcx, cr3
    cmp rcx, [rsp + {frame_stride} - {slot} + {s_callee_view}]
    jne psyche_slow_invocation
    mov rsi, [rsp + {frame_stride} - {slot} + {s_area}]
    // Popped: the slot's next id, so that a late answer from elsewhere finds nothing. Stored,
    // not added: an answer from elsewhere that marked the id since the test above loses (the
    // handler answered first), and its mark does not pass to the next id.
    lea rcx, [rdi + {id_step}]
    mov [rsp + {frame_stride} - {slot} + {s_id}], rcx
    // Back to the caller's x87/SSE state (the callee's goes), view, domain and upcall state.
    mov rcx, [rsp + {frame_stride} - {slot} + {s_fpu}]
    fxrstor64 [rcx]
    mov rcx, [rsp + {frame_stride} - {slot} + {s_caller_view}]
    mov cr3, rcx
    mov rcx, [rsp + {frame_stride} - {slot} + {s_caller_state}]
    mov [rsi + {p_domain}], rcx
    // Out through the caller's frame, one stride up, as the CPU wrote it at its call (or the
    // kernel for a call by fault): its RFLAGS are the caller's own, as the null call returns
    // them. The result is in RAX already.
    add qword ptr [rsi + {tss_rsp0}], {frame_stride}
    add rsp, {frame_stride}
    xor esi, esi
    iretq
    "#,
    arrived = const psyche_abi::upcall::Upcall::InvocationArrived as u64,
    id_step = const crate::upcalls::ID_STEP,
    p_domain = const super::cpu::PERCPU_OFFSET as usize + core::mem::offset_of!(PerCpu, domain),
    slot = const super::cpu::SLOT_BELOW_FRAME,
    s_realm = const core::mem::offset_of!(InvocationSlot, realm),
    s_operations = const core::mem::offset_of!(InvocationSlot, operations),
    s_caller_state = const core::mem::offset_of!(InvocationSlot, caller_state),
    s_callee_state = const core::mem::offset_of!(InvocationSlot, callee_state),
    s_callee_view = const core::mem::offset_of!(InvocationSlot, callee_view),
    s_caller_view = const core::mem::offset_of!(InvocationSlot, caller_view),
    s_entry = const core::mem::offset_of!(InvocationSlot, entry),
    s_area = const core::mem::offset_of!(InvocationSlot, area),
    s_id = const core::mem::offset_of!(InvocationSlot, id),
    s_fpu = const core::mem::offset_of!(InvocationSlot, fpu),
    fpu_initial = sym super::fpu::PSYCHE_FPU_INITIAL,
    tss_rsp0 = const super::cpu::TSS_OFFSET + 4,
    frame_stride = const super::cpu::FRAME_STRIDE,
);

#[cfg(not(feature = "trace"))]
use super::cpu::{InvocationSlot, PerCpu};

// Interrupt stubs. They run on IST2. The timer and the upcall IPI may end in an upcall, which
// needs every register of the interrupted thread: they share the exception path's frame.
global_asm!(
    r#"
    .section .text
    .global psyche_timer_interrupt
psyche_timer_interrupt:
    push 0
    push {timer_vector}
    jmp psyche_exception_common

    .global psyche_upcall_interrupt
psyche_upcall_interrupt:
    push 0
    push {upcall_vector}
    jmp psyche_exception_common

    .global psyche_flush_interrupt
psyche_flush_interrupt:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    CLEAR_USER_FLAGS
    call {flush}
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    iretq

    // A wake-up IPI only has to end `hlt`: acknowledge it (x2APIC EOI) and return.
    .global psyche_wakeup_interrupt
psyche_wakeup_interrupt:
    push rax
    push rcx
    push rdx
    mov ecx, 0x80b
    xor eax, eax
    xor edx, edx
    wrmsr
    pop rdx
    pop rcx
    pop rax
    iretq

    // Spurious interrupts are not acknowledged.
    .global psyche_spurious_interrupt
psyche_spurious_interrupt:
    iretq
    "#,
    flush = sym crate::tlb::flush_interrupt,
    timer_vector = const super::cpu::TIMER_VECTOR as u64,
    upcall_vector = const super::cpu::UPCALL_VECTOR as u64,
);

// The two fast ways back to CPL3, with their registers passed in registers (no structure
// copies: at emulated CPL0 a copy costs an instruction per byte).
//
// psyche_return_to_user(rip, rsp, rflags, rax): resume a caller (every other register zero).
// psyche_enter_upcall(handler, stack, kind, a0, a1, a2, a3, a4, a5, a6): enter an upcall
// handler with RDI = kind and the arguments in RSI, RDX, RCX, R8, R9, R10, R11 (the last four
// arrive on the stack).
global_asm!(
    r#"
    .section .text
    .global psyche_return_to_user
psyche_return_to_user:
    push {user_ds}
    push rsi
    push rdx
    push {user_cs}
    push rdi
    mov rax, rcx
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    xor esi, esi
    xor edi, edi
    xor ebp, ebp
    xor r8d, r8d
    xor r9d, r9d
    xor r10d, r10d
    xor r11d, r11d
    xor r12d, r12d
    xor r13d, r13d
    xor r14d, r14d
    xor r15d, r15d
    iretq

    .global psyche_enter_upcall
psyche_enter_upcall:
    mov rax, rdi
    mov r10, [rsp + 8]
    mov r11, [rsp + 16]
    mov rbx, [rsp + 24]
    mov rbp, [rsp + 32]
    push {user_ds}
    push rsi
    push 0x202
    push {user_cs}
    push rax
    mov rdi, rdx
    mov rsi, rcx
    mov rdx, r8
    mov rcx, r9
    mov r8, r10
    mov r9, r11
    mov r10, rbx
    mov r11, rbp
    xor eax, eax
    xor ebx, ebx
    xor ebp, ebp
    xor r12d, r12d
    xor r13d, r13d
    xor r14d, r14d
    xor r15d, r15d
    iretq
    "#,
    user_ds = const USER_DS as u64,
    user_cs = const USER_CS as u64,
);

// Back to CPL3 with every register from a `Registers` (RDI points at it, in kernel memory).
// RFLAGS has been made safe by the caller.
global_asm!(
    r#"
    .section .text
    .global psyche_resume_user
psyche_resume_user:
    push {user_ds}
    push qword ptr [rdi + 7 * 8]
    push qword ptr [rdi + 17 * 8]
    push {user_cs}
    push qword ptr [rdi + 16 * 8]
    mov rax, [rdi + 0 * 8]
    mov rbx, [rdi + 1 * 8]
    mov rcx, [rdi + 2 * 8]
    mov rdx, [rdi + 3 * 8]
    mov rsi, [rdi + 4 * 8]
    mov rbp, [rdi + 6 * 8]
    mov r8, [rdi + 8 * 8]
    mov r9, [rdi + 9 * 8]
    mov r10, [rdi + 10 * 8]
    mov r11, [rdi + 11 * 8]
    mov r12, [rdi + 12 * 8]
    mov r13, [rdi + 13 * 8]
    mov r14, [rdi + 14 * 8]
    mov r15, [rdi + 15 * 8]
    mov rdi, [rdi + 5 * 8]
    iretq
    "#,
    user_ds = const USER_DS as u64,
    user_cs = const USER_CS as u64,
);

extern "C" {
    /// Entry addresses of the 32 exception stubs (0 for vectors 3 and 4, the invocation and
    /// kernel gates).
    pub static psyche_exception_stubs: [u64; 32];
    pub fn psyche_kernel_gate();
    pub fn psyche_invocation_gate();
    pub fn psyche_timer_interrupt();
    pub fn psyche_wakeup_interrupt();
    pub fn psyche_flush_interrupt();
    pub fn psyche_upcall_interrupt();
    pub fn psyche_spurious_interrupt();
}

extern "sysv64" {
    /// Leaves the kernel for CPL3 with every register from `registers`.
    fn psyche_resume_user(registers: *const Registers) -> !;
}

extern "sysv64" {
    fn psyche_return_to_user(rip: u64, rsp: u64, rflags: u64, rax: u64) -> !;
    #[allow(clippy::too_many_arguments)]
    fn psyche_enter_upcall(
        handler: u64,
        stack: u64,
        kind: u64,
        a0: u64,
        a1: u64,
        a2: u64,
        a3: u64,
        a4: u64,
        a5: u64,
        a6: u64,
    ) -> !;
}

/// Resumes a caller at `rip` with RSP = `rsp`, RAX = `rax` and every other register zero.
pub fn return_to_user(rip: u64, rsp: u64, rflags: u64, rax: u64) -> ! {
    // SAFETY: the stub builds an iretq frame with user selectors from these values: the CPU
    // ends up at CPL3 whatever they are (a bad RIP or RSP faults there).
    unsafe { psyche_return_to_user(rip, rsp, user_rflags(rflags), rax) }
}

/// The RFLAGS user code gets back: IF=1, IOPL=0, and of its own only the arithmetic and
/// direction flags (CF PF AF ZF SF DF OF), so no trap, alignment-check or IOPL bit leaks in.
fn user_rflags(rflags: u64) -> u64 {
    const KEPT: u64 = 0x0CD5;
    (rflags & KEPT) | 0x202
}

/// Enters an upcall handler at `handler` on `stack` (interrupts on) with `kind` and its seven
/// arguments, and the initial x87/SSE state: whatever ran before (perhaps another domain) must
/// already have been saved where it belongs (`fpu`).
pub fn enter_upcall(handler: u64, stack: u64, kind: u64, args: [u64; 7]) -> ! {
    let [a0, a1, a2, a3, a4, a5, a6] = args;
    super::fpu::load_initial();
    // SAFETY: as for `return_to_user`: user selectors, so the handler runs at CPL3.
    unsafe { psyche_enter_upcall(handler, stack, kind, a0, a1, a2, a3, a4, a5, a6) }
}

/// Resumes user code with exactly these registers (RFLAGS is forced to IF=1, IOPL=0 and only
/// the arithmetic and direction flags kept; RIP must be a user address).
pub fn resume_user(registers: &Registers) -> ! {
    let mut registers = *registers;
    registers.rflags = user_rflags(registers.rflags);
    // SAFETY: the stub only loads the registers and builds an iretq frame with user selectors,
    // so whatever the values, the CPU ends up at CPL3 (a bad RIP or RSP faults there).
    unsafe { psyche_resume_user(&registers) }
}

/// Starts user code at `entry` on `stack` with RDI, RSI, RDX = `args`, every other register
/// zero and interrupts enabled: the same way in as an upcall handler's.
pub fn enter_user(entry: u64, stack: u64, args: [u64; 3]) -> ! {
    let [rdi, rsi, rdx] = args;
    enter_upcall(entry, stack, rdi, [rsi, rdx, 0, 0, 0, 0, 0])
}

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
    EXCEPTION_NO_ERROR 3
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
    .quad psyche_exception_0, psyche_exception_1, psyche_exception_2, psyche_exception_3
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

// The kernel gate (`int 4`, DPL 3). RAX = number, arguments in RDI, RSI, RDX, R10, R8, R9
// (ProtectedCall excepted: see `psyche_fast_call`).
// The null call returns at once, so that benchmarks see the bare cost of the gate. A protected
// invocation's call and return go straight to their own functions (SysV, their arguments in
// place, R10 moved to RCX), past the generic dispatch: every kernel instruction costs here.
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
    cmp rax, {protected_call}
    je psyche_fast_call
    cmp rax, {invocation_return}
    je psyche_fast_return
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

    // What the fast paths cannot do, Rust does; these return only with an error for the
    // caller. Their arguments are still in the gate's registers.
    .global psyche_slow_call
psyche_slow_call:
    // ProtectedCall's registers (RDI, RDX, R8-R11) to the function's (RDI, RSI, RDX, RCX, R8, R9).
    sub rsp, 8
    mov rsi, rdx
    mov rdx, r8
    mov rcx, r9
    mov r8, r10
    mov r9, r11
    call {protected_call_gate}
    jmp 1b
    .global psyche_slow_return
psyche_slow_return:
    sub rsp, 8
    call {invocation_return_gate}
    jmp 1b
    "#,
    dispatch = sym crate::syscall_dispatch,
    protected_call_gate = sym crate::upcalls::protected_call_gate,
    invocation_return_gate = sym crate::upcalls::invocation_return_gate,
    null = const psyche_abi::syscall::Syscall::Null as u64,
    protected_call = const psyche_abi::syscall::Syscall::ProtectedCall as u64,
    invocation_return = const psyche_abi::syscall::Syscall::InvocationReturn as u64,
);

// With tracing, the invocation paths are the Rust ones, which emit every event.
#[cfg(feature = "trace")]
global_asm!(
    r#"
    .section .text
    .global psyche_fast_call
psyche_fast_call:
    jmp psyche_slow_call
    .global psyche_fast_return
psyche_fast_return:
    jmp psyche_slow_return
    "#
);

// The protected invocation's round trip in assembly, for the case the Rust path
// (`upcalls::protected_call_gate`, `upcalls::invocation_return`) calls common: the call is the
// one this CPU checked last (`InvokeCache`) with nothing changed since (the check generation),
// and the return is of the innermost invocation, with the caller still alive (the generation
// stored at the call). They do what the Rust path does, field for field: the record, the
// per-CPU id, the switch of views (only without latency traps, where the cache is filled and
// records get a current generation, so there is nothing to re-arm), and the upcall or the
// resumption. Anything else goes to Rust. Not written: the record's operation, which only
// traces read (a traced kernel has no assembly path).
//
// Until a path commits, the gate's argument registers stay as they came: the Rust path takes
// them from there.
//
// Registers: the caller's and the callee's own values may pass through (each chose to hand
// them over; realm-sdk's stubs clear what they do not mean to pass); every register the path
// used for kernel values is overwritten or cleared.
//
// Call: RDI = realm, RDX = operation, R8-R11 = arguments (`Syscall::ProtectedCall`): where the
// callee's handler gets them, with RDI = kind, RSI = id, RCX = caller.
// Return: RDI = id, RSI = result; the caller resumes with RAX = result.
#[cfg(not(feature = "trace"))]
global_asm!(
    r#"
    .section .text
    .global psyche_fast_call
psyche_fast_call:
    mov rax, rsp
    and rax, {area_mask}
    cmp rdi, [rax + {c_realm}]
    jne psyche_slow_call
    // The caller (low half) and this CPU's upcall state (high half).
    mov rcx, [rax + {p_domain}]
    cmp ecx, [rax + {c_caller}]
    jne psyche_slow_call
    cmp rdx, [rax + {c_operations}]
    jae psyche_slow_call
    mov rsi, [rip + {generation}]
    cmp rsi, [rax + {c_generation}]
    jne psyche_slow_call
    cmp qword ptr [rax + {p_depth}], {max_depth}
    jae psyche_slow_call
    // Committed (RDI is free now). The record at this depth: RDI + field.
    mov rdi, [rax + {p_depth}]
    inc qword ptr [rax + {p_depth}]
    imul rdi, rdi, {r_size}
    add rdi, rax
    mov [rdi + {r_caller_state}], rcx
    mov [rdi + {r_generation}], rsi
    mov rsi, [rax + {p_master}]
    mov [rdi + {r_caller_view}], rsi
    // The caller's frame stays where the CPU wrote it: the callee's entries start below.
    sub qword ptr [rax + {tss_rsp0}], {frame_stride}
    mov rcx, [rax + {c_callee_state}]
    mov [rdi + {r_callee}], ecx
    // The id: this CPU's next (`upcalls::next_invocation_id`); no lock prefix, no other writer.
    mov rsi, 0x10000
    xadd [rax + {p_next_invocation}], rsi
    mov [rdi + {r_id}], rsi
    // Into the callee's view (`switch_to`; without traps its local view is its master view),
    // its handler running: `domain` and `upcall_domain` in one store.
    mov [rax + {p_domain}], rcx
    mov rcx, [rax + {c_master}]
    mov [rax + {p_master}], rcx
    mov cr3, rcx
    // The handler's frame, below the caller's: its entry, its work area, interrupts on.
    push {user_ds}
    push qword ptr [rax + {c_top}]
    push 0x202
    push {user_cs}
    push qword ptr [rax + {c_handler}]
    // The operation and its arguments are in place already (RDX, R8-R11); the id is in RSI.
    mov edi, {arrived}
    mov ecx, [rax + {c_caller}]
    xor eax, eax
    iretq

psyche_fast_return:
    mov rax, rsp
    and rax, {area_mask}
    mov rcx, [rax + {p_depth}]
    // The innermost record: RCX + field - size (at depth 0 the guard, whose callee is no
    // domain, so the test of the callee fails).
    imul rcx, rcx, {r_size}
    add rcx, rax
    cmp rdi, [rcx + {r_id} - {r_size}]
    jne psyche_slow_return
    mov r11d, [rax + {p_domain}]
    cmp r11d, [rcx + {r_callee} - {r_size}]
    jne psyche_slow_return
    mov r11, [rip + {generation}]
    cmp r11, [rcx + {r_generation} - {r_size}]
    jne psyche_slow_return
    // Popped: its id cleared, so that a late answer from elsewhere finds nothing.
    mov qword ptr [rcx + {r_id} - {r_size}], 0
    dec qword ptr [rax + {p_depth}]
    // Back to the caller's domain, upcall state and views.
    mov r11, [rcx + {r_caller_state} - {r_size}]
    mov [rax + {p_domain}], r11
    mov r11, [rcx + {r_caller_view} - {r_size}]
    mov [rax + {p_master}], r11
    mov cr3, r11
    // Out through the caller's frame, one stride up, as the CPU wrote it at its call (or the
    // kernel for a call by fault): its RFLAGS are the caller's own, as the null call returns
    // them.
    add qword ptr [rax + {tss_rsp0}], {frame_stride}
    add rsp, {frame_stride}
    // RCX held a kernel address, R11 a view; RDI (the id) is the callee's own.
    mov rax, rsi
    xor ecx, ecx
    xor r11d, r11d
    iretq
    "#,
    area_mask = const !(psyche_abi::layout::PERCPU_AREA_SIZE - 1),
    generation = sym crate::upcalls::CHECK_GENERATION,
    max_depth = const super::cpu::MAX_NESTED_INVOCATIONS,
    arrived = const psyche_abi::upcall::Upcall::InvocationArrived as u64,
    p_domain = const percpu::P + core::mem::offset_of!(PerCpu, domain),
    p_depth = const percpu::P + core::mem::offset_of!(PerCpu, invocation_depth),
    p_master = const percpu::P + core::mem::offset_of!(PerCpu, master_pml4),
    p_next_invocation = const percpu::P + core::mem::offset_of!(PerCpu, next_invocation),
    c_realm = const percpu::C + core::mem::offset_of!(InvokeCache, realm),
    c_caller = const percpu::C + core::mem::offset_of!(InvokeCache, caller),
    c_callee_state = const percpu::C + core::mem::offset_of!(InvokeCache, callee_state),
    c_operations = const percpu::C + core::mem::offset_of!(InvokeCache, operations),
    c_generation = const percpu::C + core::mem::offset_of!(InvokeCache, generation),
    c_handler = const percpu::C + core::mem::offset_of!(InvokeCache, handler),
    c_top = const percpu::C + core::mem::offset_of!(InvokeCache, top),
    c_master = const percpu::C + core::mem::offset_of!(InvokeCache, master),
    r_size = const core::mem::size_of::<InvocationRecord>(),
    r_id = const percpu::R + core::mem::offset_of!(InvocationRecord, id),
    r_caller_state = const percpu::R + core::mem::offset_of!(InvocationRecord, caller_state),
    r_callee = const percpu::R + core::mem::offset_of!(InvocationRecord, callee),
    r_caller_view = const percpu::R + core::mem::offset_of!(InvocationRecord, caller_view),
    r_generation = const percpu::R + core::mem::offset_of!(InvocationRecord, generation),
    tss_rsp0 = const super::cpu::TSS_OFFSET + 4,
    frame_stride = const super::cpu::FRAME_STRIDE,
    user_ds = const USER_DS as u64,
    user_cs = const USER_CS as u64,
);

/// Offsets in the per-CPU area, for the assembly fast paths.
#[cfg(not(feature = "trace"))]
mod percpu {
    use super::super::cpu::{PerCpu, PERCPU_OFFSET};

    /// The `PerCpu` block.
    pub const P: usize = PERCPU_OFFSET as usize;
    /// Its invocation cache.
    pub const C: usize = P + core::mem::offset_of!(PerCpu, invoke_cache);
    /// Its first invocation record.
    pub const R: usize = P + core::mem::offset_of!(PerCpu, invocations);
}

#[cfg(not(feature = "trace"))]
use super::cpu::{InvocationRecord, InvokeCache, PerCpu};

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
    /// Entry addresses of the 32 exception stubs (0 for vector 4, which is the kernel gate).
    pub static psyche_exception_stubs: [u64; 32];
    pub fn psyche_kernel_gate();
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
/// arguments.
pub fn enter_upcall(handler: u64, stack: u64, kind: u64, args: [u64; 7]) -> ! {
    let [a0, a1, a2, a3, a4, a5, a6] = args;
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

//! System calls through the kernel gate (`int 4`; see `psyche_abi::syscall`).

use core::arch::asm;

pub use psyche_abi::syscall::{SysError, Syscall};

/// Makes system call `call` with up to three arguments.
fn syscall3(call: Syscall, a0: u64, a1: u64, a2: u64) -> i64 {
    raw_syscall(call as u64, a0, a1, a2)
}

/// A system call's return value as a result.
pub fn result(value: i64) -> Result<u64, SysError> {
    match SysError::from_return(value) {
        Some(error) => Err(error),
        None => Ok(value as u64),
    }
}

/// Writes bytes to the console; returns how many were written (at most a page per call).
pub fn write(bytes: &[u8]) -> Result<usize, SysError> {
    result(syscall3(Syscall::Write, bytes.as_ptr() as u64, bytes.len() as u64, 0)).map(|n| n as usize)
}

/// Writes whatever memory `ptr` names, without Rust's guarantees: for programs that test the
/// kernel's checks of bad pointers.
pub fn write_raw(ptr: u64, len: u64) -> Result<usize, SysError> {
    result(syscall3(Syscall::Write, ptr, len, 0)).map(|n| n as usize)
}

/// Ends the program with `code` (0..=119 become psyche-vmm's exit status).
pub fn exit(code: u32) -> ! {
    syscall3(Syscall::Exit, u64::from(code), 0, 0);
    // The kernel never returns from Exit.
    loop {
        core::hint::spin_loop();
    }
}

/// The CPU a program runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    pub index: u32,
    pub node: u32,
}

/// The CPU the caller runs on.
pub fn cpu() -> Cpu {
    let raw = syscall3(Syscall::CpuInfo, 0, 0, 0) as u64;
    Cpu { index: raw as u32, node: (raw >> 32) as u32 }
}

/// The machine as the kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Machine {
    pub cpus_online: u32,
    pub nodes: u32,
}

/// The machine.
pub fn machine() -> Machine {
    let raw = syscall3(Syscall::MachineInfo, 0, 0, 0) as u64;
    Machine { cpus_online: raw as u32, nodes: (raw >> 32) as u32 }
}

/// Makes a system call with a raw number (for programs that test the kernel's checks).
pub fn raw_syscall(number: u64, a0: u64, a1: u64, a2: u64) -> i64 {
    let ret: i64;
    // SAFETY: the kernel gate only reads the argument registers and the memory the call's
    // contract names; it returns in RAX and clobbers the other SysV caller-saved registers.
    // Unknown numbers get an error back.
    unsafe {
        asm!(
            "int 4",
            inlateout("rax") number as i64 => ret,
            inlateout("rdi") a0 => _,
            inlateout("rsi") a1 => _,
            inlateout("rdx") a2 => _,
            out("rcx") _, out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Moves the calling protection domain, with all its threads, to CPU `cpu`: the call returns
/// there. Refused (`Busy`) inside an upcall handler or a protected invocation.
pub fn move_to_cpu(cpu: u32) -> Result<(), SysError> {
    let value: i64;
    // SAFETY: the call returns (here, or on the other CPU) with RAX set and every other
    // register possibly changed, so all are declared clobbered (RBX and RBP, which asm cannot
    // name as clobbers, are saved around it).
    unsafe {
        asm!(
            "push rbx",
            "push rbp",
            "int 4",
            "pop rbp",
            "pop rbx",
            inlateout("rax") Syscall::MoveToCpu as u64 as i64 => value,
            inlateout("rdi") u64::from(cpu) => _,
            out("rsi") _, out("rdx") _, out("rcx") _, out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
        );
    }
    result(value).map(|_| ())
}

/// The null system call: enters the kernel gate and comes straight back.
#[inline]
pub fn null() {
    raw_syscall(Syscall::Null as u64, 0, 0, 0);
}

/// Passes a mark to the VMM (which counts kernel instructions between marks in `bench`).
pub fn mark(value: u64) {
    raw_syscall(Syscall::Mark as u64, value, 0, 0);
}

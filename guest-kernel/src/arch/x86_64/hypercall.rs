//! Hypercalls: one `in` from the hypercall port, arguments in registers (see psyche-abi).

use core::arch::asm;

use psyche_abi::hypercall::{Hypercall, HYPERCALL_PORT};

/// Makes hypercall `call` with up to six arguments and returns the VMM's 32-bit reply.
pub fn hypercall(call: Hypercall, args: [u64; 6]) -> u32 {
    let reply: u64;
    // SAFETY: the `in` exits to the VMM, which reads the registers and writes only EAX; it
    // touches no memory of ours except what the arguments point at and the hypercall allows.
    unsafe {
        asm!(
            "in eax, {port}",
            port = const HYPERCALL_PORT,
            inlateout("rax") call as u64 => reply,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rdx") args[2],
            in("rcx") args[3],
            in("r8") args[4],
            in("r9") args[5],
            options(nostack, preserves_flags),
        );
    }
    reply as u32
}

/// A hypercall after which the VMM stops this vCPU.
pub fn hypercall_final(call: Hypercall, args: [u64; 6]) -> ! {
    hypercall(call, args);
    super::cpu::halt_forever()
}

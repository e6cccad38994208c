//! Does something a program must not do, chosen by its first argument, so that tests can check
//! the kernel stops it and says why: `page-fault` (reads an unmapped address), `kernel-read`
//! (reads kernel memory), `invalid-opcode`, `port-io`, `bad-write` (hands the kernel a kernel
//! pointer to print), `bad-syscall` (an unknown system-call number).
#![no_std]
#![no_main]

use realm_sdk::sys::{raw_syscall, write_raw, SysError};
use realm_sdk::{println, Program};

realm_sdk::entry!(main);

fn main(program: Program) -> u32 {
    let what = program.args.get(0).unwrap_or("page-fault");
    println!("fault: doing '{what}'");
    match what {
        // SAFETY: deliberately broken; the kernel must stop the program here.
        "page-fault" => unsafe { core::arch::asm!("mov rax, [0x10]", out("rax") _) },
        // SAFETY: deliberately broken; the kernel must stop the program here.
        "kernel-read" => unsafe {
            core::arch::asm!("mov rax, [{addr}]", addr = in(reg) 0xFFFF_FFFF_8010_0000u64, out("rax") _)
        },
        // SAFETY: deliberately broken; the kernel must stop the program here.
        "invalid-opcode" => unsafe { core::arch::asm!("ud2") },
        // SAFETY: deliberately broken; the kernel must stop the program here.
        "port-io" => unsafe { core::arch::asm!("out 0x99, al", in("al") 0u8) },
        "bad-write" => {
            // Errors come back as values; the program reports what it got.
            let result = write_raw(0xFFFF_FFFF_8010_0000, 16);
            println!("fault: write of a kernel pointer returned {result:?}");
            return if result == Err(SysError::BadAddress) { 0 } else { 1 };
        }
        "bad-syscall" => {
            let result = raw_syscall(9999, 0, 0, 0);
            println!("fault: system call 9999 returned {result}");
            return if SysError::from_return(result) == Some(SysError::NoSuchCall) { 0 } else { 1 };
        }
        _ => {
            println!("fault: unknown fault '{what}'");
            return 2;
        }
    }
    println!("fault: still running after '{what}'");
    1
}

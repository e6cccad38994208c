//! Makes exactly N system calls of one kind, then exits 0: a workload with known counts for
//! tracing tests and for measuring the kernel gate.
//!
//! `psyche-vmm --program gates -- N [cpu|machine|invalid]`: N calls of `cpu_info` (the default),
//! `machine_info`, or of a number no kernel defines (the kernel answers "no such call"). After
//! them it prints one line (a `write` call) and exits (an `exit` call). Exit code 2 for bad
//! arguments.
#![no_std]
#![no_main]

use realm_sdk::{println, Program};

realm_sdk::entry!(main);

/// A system-call number no kernel defines.
const INVALID_CALL: u64 = 0xFFFF;

fn main(program: Program) -> u32 {
    let Some(count) = program.args.get(0).and_then(|arg| arg.parse::<u64>().ok()) else {
        println!("gates: usage: gates N [cpu|machine|invalid]");
        return 2;
    };
    let kind = program.args.get(1).unwrap_or("cpu");
    match kind {
        "cpu" => (0..count).for_each(|_| {
            core::hint::black_box(realm_sdk::cpu());
        }),
        "machine" => (0..count).for_each(|_| {
            core::hint::black_box(realm_sdk::machine());
        }),
        "invalid" => (0..count).for_each(|_| {
            core::hint::black_box(realm_sdk::sys::raw_syscall(INVALID_CALL, 0, 0, 0));
        }),
        _ => {
            println!("gates: unknown kind '{kind}': use cpu, machine or invalid");
            return 2;
        }
    }
    println!("gates: program {} made {count} {kind} calls", program.index);
    0
}

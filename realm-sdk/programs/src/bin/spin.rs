//! Spins for a while (argument 0: milliseconds, default 200) counting, then reports when it ran
//! and how much it got done: `spin: program K on cpu C from T0 to T1: N iterations`. Several
//! on one vCPU show the kernel's time slicing (their intervals overlap, their counts are
//! alike). Used by tests/tests/slices.rs.
#![no_std]
#![no_main]

use realm_sdk::threads::tsc;
use realm_sdk::{cpu, println, Program};

realm_sdk::entry!(main);

fn main(program: Program) -> u32 {
    let millis = program.args.get(0).and_then(|a| a.parse::<u64>().ok()).unwrap_or(200);
    // The TSC runs at about 2.6 GHz on our hosts; the exact rate does not matter here.
    let length = millis * 2_600_000;
    let start = tsc();
    let mut iterations = 0u64;
    while tsc() - start < length {
        iterations += 1;
        core::hint::spin_loop();
    }
    let end = tsc();
    println!("spin: program {} on cpu {} from {start} to {end}: {iterations} iterations", program.index, cpu().index);
    0
}

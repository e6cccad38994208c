//! The default program: greets from CPL3 with what the kernel says about the machine.
#![no_std]
#![no_main]

use realm_sdk::{cpu, machine, println, Program};

realm_sdk::entry!(main);

fn main(program: Program) -> u32 {
    let cpu = cpu();
    let machine = machine();
    println!(
        "hello from program {} at CPL3 on cpu {} (node {}) of a machine with {} CPUs online on {} nodes",
        program.index, cpu.index, cpu.node, machine.cpus_online, machine.nodes
    );
    0
}

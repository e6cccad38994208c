//! Never ends: for testing `psyche-vmm --timeout`.
#![no_std]
#![no_main]

use realm_sdk::{println, Program};

realm_sdk::entry!(main);

fn main(_program: Program) -> u32 {
    println!("hang: spinning forever");
    loop {
        core::hint::spin_loop();
    }
}

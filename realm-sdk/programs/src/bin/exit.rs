//! Exits with the code given as its first argument (default 0): `psyche-vmm ... --program exit -- 37`.
#![no_std]
#![no_main]

use realm_sdk::{println, Program};

realm_sdk::entry!(main);

fn main(program: Program) -> u32 {
    let Some(arg) = program.args.get(0) else { return 0 };
    match arg.parse::<u32>() {
        Ok(code) => {
            println!("exit: exiting with code {code}");
            code
        }
        Err(_) => {
            println!("exit: '{arg}' is not an exit code");
            2
        }
    }
}

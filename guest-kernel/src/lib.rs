//! The Psyche kernel's core: the parts of the kernel that are plain Rust, free of x86 details,
//! and unit-tested on the host. The `psyche-kernel` binary (`src/main.rs`) wraps them with the
//! architecture code in `src/arch/`.
#![cfg_attr(not(test), no_std)]

pub mod cmdline;
pub mod frames;
pub mod machine;
pub mod names;
pub mod quotas;
pub mod realms;
pub mod sync;

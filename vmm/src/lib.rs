//! psyche-vmm: a KVM virtual machine monitor that boots the Psyche guest kernel on a machine
//! shaped by a topology file.
//!
//! The binary is a thin layer over [`cli`]; tests and tools use [`vm::run`] directly.

pub mod bench;
pub mod boot;
pub mod cli;
pub mod console;
pub mod hypercall;
pub mod images;
pub mod kernel_profile;
pub mod latency;
pub mod memory;
pub mod seccomp;
pub mod topology;
pub mod trace;
pub mod vcpu;
pub mod vm;

pub use console::{CaptureSink, ConsoleSink, StdioSink};
pub use vm::{run, Outcome, VmConfig, VmError};

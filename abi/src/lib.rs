//! The one place where every layout and number shared by the three sides of Psyche on KVM is
//! defined: `psyche-vmm` (host), the guest kernel (CPL0) and `realm-sdk` (CPL3).
//!
//! * [`layout`]: the guest-physical and virtual memory map the VMM sets up before boot.
//! * [`boot`]: the boot info the VMM writes and the kernel reads.
//! * [`hypercall`]: kernel -> VMM requests (port I/O).
//! * [`latency`]: the remote-memory latency model the kernel enforces and reports on.
//! * [`syscall`]: program -> kernel requests through the kernel gate (`int 4`).
//! * [`report`]: what the kernel reports back about the machine it found.
//! * [`realm`]: realms, keys, rights, access lists and context blocks.
//! * [`note`]: the ELF note that marks a kernel image as a Psyche kernel.
//! * [`trace`]: trace records and the per-vCPU trace rings.
//! * [`upcall`]: threads' context blocks, processor blocks, upcalls, protected invocations.
#![no_std]

pub mod boot;
pub mod hypercall;
pub mod latency;
pub mod layout;
pub mod note;
pub mod realm;
pub mod report;
pub mod syscall;
pub mod trace;
pub mod upcall;

/// Version of everything in this crate. The VMM refuses a kernel whose note carries another.
pub const ABI_VERSION: u32 = 4;

/// Most vCPUs a guest can have (bounded by the per-node CPU masks below).
pub const MAX_CPUS: usize = 256;
/// Most NUMA nodes a guest can have (bounded by the distance matrix in the boot info).
pub const MAX_NODES: usize = 64;
/// Most guest programs one boot can load.
pub const MAX_PROGRAMS: usize = 16;

/// A set of CPUs, one bit per CPU index.
pub type CpuMask = [u64; MAX_CPUS / 64];

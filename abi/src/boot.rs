//! The boot info: everything the kernel learns about the machine, written by the VMM at
//! [`crate::layout::BOOT_INFO_PADDR`] before any vCPU runs.
//!
//! Boot protocol: every vCPU starts at the kernel's ELF entry point, in 64-bit mode at CPL0,
//! interrupts off, with CR3 = [`crate::layout::PAGE_TABLES_PADDR`], the boot GDT loaded,
//! RSP at the top of its per-CPU kernel stack, and
//! * RDI = the vCPU index (0 is the bootstrap processor),
//! * RSI = the virtual address (direct map) of the boot info.
//!
//! All guest RAM is zero except what the VMM loaded, so the kernel never needs to clear a
//! frame it takes from a node's free range.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{MAX_CPUS, MAX_NODES, MAX_PROGRAMS};

/// `BootInfo::magic`: "PSYCHEBI".
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"PSYCHEBI");
/// Most loadable segments of one program (its argument page included).
pub const MAX_SEGMENTS: usize = 8;
/// Room for the kernel command line.
pub const CMDLINE_MAX: usize = 256;

/// Segment may be written.
pub const SEGMENT_WRITE: u32 = 1 << 0;
/// Segment may be executed.
pub const SEGMENT_EXEC: u32 = 1 << 1;

/// One vCPU.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CpuInfo {
    /// The APIC ID the vCPU reports in CPUID (leaf 1 EBX[31:24] and leaf 0xB EDX).
    pub apic_id: u32,
    /// The NUMA node the vCPU belongs to.
    pub node: u32,
    /// Guest-physical base of the vCPU's per-CPU area
    /// ([`crate::layout::PERCPU_AREA_SIZE`] bytes, zeroed, in its node when it has memory).
    pub percpu_paddr: u64,
    /// Guest-physical base of the vCPU's trace area ([`crate::trace::TRACE_AREA_SIZE`] bytes,
    /// zeroed), or 0 when this boot is not traced.
    pub trace_paddr: u64,
}

/// One NUMA node's memory. A node without memory has `mem_size == 0`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct NodeInfo {
    /// Guest-physical base of the node's RAM.
    pub mem_base: u64,
    /// Bytes of RAM in the node.
    pub mem_size: u64,
    /// `[free_base, free_end)` is the part of the node's RAM the VMM did not use: all zero,
    /// page aligned, the kernel's to allocate.
    pub free_base: u64,
    /// End of the free range.
    pub free_end: u64,
}

/// One page-granular loadable segment of a program, already copied (and relocated) into
/// guest-physical memory by the VMM; the kernel only maps it.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Segment {
    /// Page-aligned virtual address in the program's slot.
    pub vaddr: u64,
    /// Page-aligned guest-physical address of the first page.
    pub paddr: u64,
    /// Number of 4 KiB pages (physically contiguous).
    pub pages: u64,
    /// [`SEGMENT_WRITE`] | [`SEGMENT_EXEC`]; every segment is readable.
    pub flags: u32,
    /// Zero.
    pub reserved: u32,
}

/// One guest program.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ProgramInfo {
    /// Virtual entry point. The program starts at CPL3 with RDI = [`ProgramInfo::args_vaddr`],
    /// RSI = [`ProgramInfo::args_len`], RDX = the program index, RSP at the top of its stack.
    pub entry: u64,
    /// Virtual base of the program's slot ([`crate::layout::program_slot`]).
    pub slot_base: u64,
    /// Virtual address of the program's arguments: NUL-terminated strings, one after another.
    pub args_vaddr: u64,
    /// Total bytes of the arguments, terminators included.
    pub args_len: u64,
    /// Number of valid entries in `segments`.
    pub segment_count: u32,
    /// Zero.
    pub reserved: u32,
    /// The program's segments (the argument page is one of them, read-only).
    pub segments: [Segment; MAX_SEGMENTS],
}

/// The boot info.
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`crate::ABI_VERSION`].
    pub version: u32,
    /// Number of vCPUs (entries of `cpus`).
    pub cpu_count: u32,
    /// Number of NUMA nodes (entries of `nodes` and rows/columns of `distances`).
    pub node_count: u32,
    /// Number of programs (entries of `programs`).
    pub program_count: u32,
    /// TSC frequency in kHz as KVM reports it (0 when unknown).
    pub tsc_khz: u64,
    /// Length of `cmdline`.
    pub cmdline_len: u32,
    /// How remote-memory accesses are charged: a [`crate::latency::LatencyMode`].
    pub latency_mode: u32,
    /// The kernel command line (`psyche-vmm --cmdline`), UTF-8, not terminated.
    pub cmdline: [u8; CMDLINE_MAX],
    /// The vCPUs, by index.
    pub cpus: [CpuInfo; MAX_CPUS],
    /// The nodes, by id.
    pub nodes: [NodeInfo; MAX_NODES],
    /// ACPI SLIT distances: `distances[a][b]` is the distance from node a to node b
    /// (10 local, 11..=254 remote, 255 unreachable).
    pub distances: [[u8; MAX_NODES]; MAX_NODES],
    /// The programs, in the order given to the VMM.
    pub programs: [ProgramInfo; MAX_PROGRAMS],
}

impl BootInfo {
    /// The command line as bytes (clamped to the buffer, whatever `cmdline_len` says).
    pub fn cmdline(&self) -> &[u8] {
        let len = (self.cmdline_len as usize).min(CMDLINE_MAX);
        &self.cmdline[..len]
    }
}

const _: () = assert!(core::mem::size_of::<BootInfo>() as u64 <= crate::layout::BOOT_INFO_MAX);

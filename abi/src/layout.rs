//! The memory map. Guest-physical addresses (`*_PADDR`) are laid down by the VMM in node 0's
//! region; virtual addresses are those of the page tables the VMM builds before boot.
//!
//! Virtual address space:
//! * lower half (`0 .. 0x0000_8000_0000_0000`): the uniform address space of realms and
//!   programs, user-accessible, the same virtual-to-physical mapping in every view;
//! * [`DIRECT_MAP_BASE`]: all guest-physical memory, supervisor only, 2 MiB pages;
//! * [`KERNEL_VIRT_BASE`]: the first GiB of guest-physical memory again, where the kernel is
//!   linked (`-C code-model=kernel` wants it in the top 2 GiB).

/// Size of a small page.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a large page (used by the VMM for the kernel's mappings).
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;

/// The boot GDT the VMM loads on every vCPU (null, kernel code, kernel data).
pub const BOOT_GDT_PADDR: u64 = 0x1000;
/// Selector of the 64-bit kernel code segment in the boot GDT and in the kernel's own GDTs.
pub const KERNEL_CS: u16 = 0x08;
/// Selector of the kernel data segment.
pub const KERNEL_DS: u16 = 0x10;
/// Selector of the user data segment (RPL 3) in the kernel's GDTs.
pub const USER_DS: u16 = 0x18 | 3;
/// Selector of the 64-bit user code segment (RPL 3) in the kernel's GDTs.
pub const USER_CS: u16 = 0x20 | 3;
/// Selector of the TSS in the kernel's GDTs (takes two slots).
pub const TSS_SELECTOR: u16 = 0x28;

/// The VMM's page tables (PML4 first) live in `[PAGE_TABLES_PADDR, PAGE_TABLES_END)`.
pub const PAGE_TABLES_PADDR: u64 = 0x1_0000;
/// End of the page-table area; it bounds how much guest memory can be direct-mapped.
pub const PAGE_TABLES_END: u64 = 0x8_0000;
/// Where the VMM writes the [`crate::boot::BootInfo`].
pub const BOOT_INFO_PADDR: u64 = 0x8_0000;
/// Room reserved for the boot info.
pub const BOOT_INFO_MAX: u64 = 0x2_0000;
/// Lowest physical address a kernel segment may be loaded at.
pub const KERNEL_PADDR: u64 = 0x10_0000;

/// Virtual base of the direct map of all guest-physical memory.
pub const DIRECT_MAP_BASE: u64 = 0xFFFF_8000_0000_0000;
/// Virtual base of the kernel image window: virtual = physical + this, for physical < 1 GiB.
pub const KERNEL_VIRT_BASE: u64 = 0xFFFF_FFFF_8000_0000;
/// Size of the kernel image window.
pub const KERNEL_WINDOW_SIZE: u64 = 1 << 30;

/// Guest-physical addresses in `[MMIO_HOLE_START, MMIO_HOLE_END)` are never RAM: the LAPIC and
/// IOAPIC live there. A node region that would cross it starts at `MMIO_HOLE_END` instead.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// Program `k` is loaded (it is a static PIE) at `PROGRAM_BASE + k * PROGRAM_SLOT_SIZE`: its
/// slot is realm `k`, the root realm of its protection domain (see [`crate::realm`]); its
/// image, its argument page and its stack all stay in that slot.
pub const PROGRAM_BASE: u64 = crate::realm::REALM_SPACE_BASE;
/// Size of one program slot: one realm's range.
pub const PROGRAM_SLOT_SIZE: u64 = crate::realm::REALM_STRIDE;
/// Size of the user stack the kernel maps at the top of a program's slot.
pub const USER_STACK_SIZE: u64 = 256 * 1024;

/// Every vCPU gets a zeroed per-CPU area of this size in its own node's memory (or the
/// nearest node with memory). Its layout: the CPU's GDT and TSS in the first page (the
/// kernel fills them), then its stacks.
pub const PERCPU_AREA_SIZE: u64 = 64 * 1024;
/// Offset of the top of the kernel stack in the per-CPU area: the VMM starts the vCPU with RSP
/// here, and the kernel reuses it as TSS.RSP0 (the stack of the kernel gate).
pub const PERCPU_KERNEL_STACK_TOP: u64 = 0x8000;
/// Offset of the top of the exception stack (IST1).
pub const PERCPU_EXCEPTION_STACK_TOP: u64 = 0xC000;
/// Offset of the top of the interrupt stack (IST2).
pub const PERCPU_INTERRUPT_STACK_TOP: u64 = 0x1_0000;

/// Virtual address of guest-physical `paddr` in the direct map.
pub const fn direct_map(paddr: u64) -> u64 {
    DIRECT_MAP_BASE + paddr
}

/// Virtual base of program slot `index`.
pub const fn program_slot(index: usize) -> u64 {
    PROGRAM_BASE + index as u64 * PROGRAM_SLOT_SIZE
}

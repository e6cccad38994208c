//! User mappings in 4-level page tables, reached through the direct map.
//!
//! Page-table frames come zeroed from the frame pools, so a new table needs no clearing. Runs
//! of pages that share a last-level table are mapped without walking again: a walk costs ~20
//! emulated instructions on our hosts, a PTE store ~2.

use psyche_abi::layout::{direct_map, PAGE_SIZE};
use x86_64::structures::paging::{PageTable, PageTableFlags};

/// Why a mapping failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// No frame left for a page table.
    OutOfFrames,
    /// The virtual address is not in the user half, or not page aligned.
    BadAddress,
    /// A large page is already mapped there.
    Conflict,
}

impl MapError {
    /// What went wrong, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Self::OutOfFrames => "no frame left for a page table",
            Self::BadAddress => "not a page-aligned user address",
            Self::Conflict => "a large page is mapped there",
        }
    }
}

/// Permissions of a user mapping.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    pub write: bool,
    pub execute: bool,
}

fn table(paddr: u64) -> &'static mut PageTable {
    // SAFETY: page tables are whole frames of guest RAM, always mapped in the direct map; the
    // kernel only edits the tables of the address space it is building, from one CPU at a time.
    unsafe { &mut *(direct_map(paddr) as *mut PageTable) }
}

/// The next-level table under `entry`, created (from `alloc`) if absent.
fn next_table(
    parent: &mut PageTable,
    index: usize,
    alloc: &mut dyn FnMut() -> Option<u64>,
) -> Result<&'static mut PageTable, MapError> {
    let entry = &mut parent[index];
    if entry.is_unused() {
        let frame = alloc().ok_or(MapError::OutOfFrames)?;
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::USER_ACCESSIBLE;
        entry.set_addr(x86_64::PhysAddr::new_truncate(frame), flags);
    } else if entry.flags().contains(PageTableFlags::HUGE_PAGE) {
        return Err(MapError::Conflict);
    }
    Ok(table(entry.addr().as_u64()))
}

/// Maps `pages` pages from `vaddr` to the physically contiguous frames from `paddr`,
/// user-accessible, in the address space whose PML4 is at `pml4`.
pub fn map_user(
    pml4: u64,
    vaddr: u64,
    paddr: u64,
    pages: u64,
    access: Access,
    alloc: &mut dyn FnMut() -> Option<u64>,
) -> Result<(), MapError> {
    let mut flags = PageTableFlags::PRESENT | PageTableFlags::USER_ACCESSIBLE;
    if access.write {
        flags |= PageTableFlags::WRITABLE;
    }
    if !access.execute {
        flags |= PageTableFlags::NO_EXECUTE;
    }
    let end = pages.checked_mul(PAGE_SIZE).and_then(|len| vaddr.checked_add(len)).ok_or(MapError::BadAddress)?;
    if !vaddr.is_multiple_of(PAGE_SIZE) || end > 0x0000_8000_0000_0000 {
        return Err(MapError::BadAddress);
    }
    let mut page = 0;
    while page < pages {
        let va = vaddr + page * PAGE_SIZE;
        let l4 = table(pml4);
        let l3 = next_table(l4, (va >> 39) as usize & 511, alloc)?;
        let l2 = next_table(l3, (va >> 30) as usize & 511, alloc)?;
        let l1 = next_table(l2, (va >> 21) as usize & 511, alloc)?;
        // Fill this last-level table as far as the run goes.
        let mut index = (va >> 12) as usize & 511;
        while index < 512 && page < pages {
            let frame = x86_64::PhysAddr::new_truncate(paddr + page * PAGE_SIZE);
            l1[index].set_addr(frame, flags);
            index += 1;
            page += 1;
        }
    }
    Ok(())
}

//! Page tables: protection domains' views, realms' shared page directories, and checked reads
//! of user memory.
//!
//! The address space is uniform: a realm's pages are mapped by one page directory (and its page
//! tables), built once, and every view that opens the realm points one PDPT entry at that
//! directory. Opening a realm is therefore one store whatever its size, and a read-only open is
//! the same directory under a PDPT entry without the writable bit (the CPU takes the most
//! restrictive permission along the walk). Page-table frames come zeroed from the frame pools,
//! so a new table needs no clearing (at emulated CPL0 speed, clearing 4 KiB costs ~265 us).

use psyche_abi::layout::{direct_map, PAGE_SIZE};
use psyche_abi::realm::{MAX_REALMS, REALM_SPACE_BASE};
use x86_64::structures::paging::page_table::PageTableEntry;
use x86_64::structures::paging::{PageTable, PageTableFlags};
use x86_64::PhysAddr;
use zerocopy::FromBytes;

/// Why a mapping failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// No frame left for a page table.
    OutOfFrames,
    /// The offset is not page aligned or not inside a realm's range.
    BadAddress,
}

impl MapError {
    /// What went wrong, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Self::OutOfFrames => "no frame left for a page table",
            Self::BadAddress => "not a page-aligned offset inside a realm",
        }
    }
}

/// Permissions of a mapping.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    pub write: bool,
    pub execute: bool,
}

/// A protection domain's view: its PML4 and the PDPT that covers realm space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub pml4: u64,
    pub realm_pdpt: u64,
}

const TABLE: PageTableFlags =
    PageTableFlags::PRESENT.union(PageTableFlags::WRITABLE).union(PageTableFlags::USER_ACCESSIBLE);
const REALM_PML4_INDEX: usize = (REALM_SPACE_BASE >> 39) as usize & 511;
const KERNEL_PML4_INDICES: [usize; 2] = [256, 511];

fn table(paddr: u64) -> &'static mut PageTable {
    // SAFETY: page tables are whole frames of guest RAM, always reachable through the direct
    // map; the kernel edits them only under its lock.
    unsafe { &mut *(direct_map(paddr) as *mut PageTable) }
}

/// A new view: a PML4 sharing the kernel's half of the boot page tables, and an empty PDPT
/// for realm space.
pub fn new_view(boot_pml4: u64, alloc: &mut dyn FnMut() -> Option<u64>) -> Result<View, MapError> {
    let pml4 = alloc().ok_or(MapError::OutOfFrames)?;
    let realm_pdpt = alloc().ok_or(MapError::OutOfFrames)?;
    let boot = table(boot_pml4);
    let new = table(pml4);
    for index in KERNEL_PML4_INDICES {
        new[index] = boot[index].clone();
    }
    new[REALM_PML4_INDEX].set_addr(PhysAddr::new_truncate(realm_pdpt), TABLE);
    Ok(View { pml4, realm_pdpt })
}

fn leaf_flags(access: Access) -> PageTableFlags {
    let mut flags = PageTableFlags::PRESENT | PageTableFlags::USER_ACCESSIBLE;
    if access.write {
        flags |= PageTableFlags::WRITABLE;
    }
    if !access.execute {
        flags |= PageTableFlags::NO_EXECUTE;
    }
    flags
}

/// Maps `pages` physically contiguous frames from `paddr` at byte `offset` of the realm whose
/// page directory is `directory`, creating page tables from `alloc` as needed.
pub fn map_in_directory(
    directory: u64,
    offset: u64,
    paddr: u64,
    pages: u64,
    access: Access,
    alloc: &mut dyn FnMut() -> Option<u64>,
) -> Result<(), MapError> {
    let end = pages.checked_mul(PAGE_SIZE).and_then(|len| offset.checked_add(len)).ok_or(MapError::BadAddress)?;
    if !offset.is_multiple_of(PAGE_SIZE) || end > 1 << 30 {
        return Err(MapError::BadAddress);
    }
    let flags = leaf_flags(access);
    let pd = table(directory);
    let mut page = 0;
    while page < pages {
        let at = offset + page * PAGE_SIZE;
        let entry = &mut pd[(at >> 21) as usize & 511];
        if entry.is_unused() {
            entry.set_addr(PhysAddr::new_truncate(alloc().ok_or(MapError::OutOfFrames)?), TABLE);
        }
        let pt = table(entry.addr().as_u64());
        let mut index = (at >> 12) as usize & 511;
        while index < 512 && page < pages {
            pt[index].set_addr(PhysAddr::new_truncate(paddr + page * PAGE_SIZE), flags);
            index += 1;
            page += 1;
        }
    }
    Ok(())
}

/// Frames a created realm of `pages` pages needs in its run: its page directory, its page
/// tables, its data.
pub fn realm_run_pages(pages: u64) -> u64 {
    1 + pages.div_ceil(512) + pages
}

/// Builds the tables of a created realm inside its zeroed run: the directory first, then the
/// page tables, then the data pages, mapped read-write and not executable. Returns the
/// directory's address.
pub fn build_realm_tables(run: u64, pages: u64) -> u64 {
    let tables = pages.div_ceil(512);
    let data = run + (1 + tables) * PAGE_SIZE;
    let mut next_table = run + PAGE_SIZE;
    let mut alloc = || {
        let frame = next_table;
        next_table += PAGE_SIZE;
        Some(frame)
    };
    // The run was sized by `realm_run_pages`, so neither error can happen.
    let _ = map_in_directory(run, 0, data, pages, Access { write: true, execute: false }, &mut alloc);
    run
}

/// Opens realm `realm` into `view`: one PDPT entry pointing at the realm's directory.
pub fn open(view: &View, realm: u32, directory: u64, writable: bool) {
    let mut flags = PageTableFlags::PRESENT | PageTableFlags::USER_ACCESSIBLE;
    if writable {
        flags |= PageTableFlags::WRITABLE;
    }
    if (realm as usize) < MAX_REALMS {
        table(view.realm_pdpt)[realm as usize].set_addr(PhysAddr::new_truncate(directory), flags);
    }
}

/// Closes realm `realm` in `view`. The caller flushes the TLBs that may hold it.
pub fn close(view: &View, realm: u32) {
    if (realm as usize) < MAX_REALMS {
        table(view.realm_pdpt)[realm as usize].set_unused();
    }
}

/// The view whose PML4 is at `pml4` (its realm PDPT read from the PML4 entry).
pub fn view_at(pml4: u64) -> View {
    View { pml4, realm_pdpt: table(pml4)[REALM_PML4_INDEX].addr().as_u64() }
}

/// How `view` has realm `realm` open: `None` when it does not, else whether writably.
pub fn opened(view: &View, realm: u32) -> Option<bool> {
    let entry = table(view.realm_pdpt).iter().nth(realm as usize)?;
    let flags = entry.flags();
    flags.contains(PageTableFlags::PRESENT).then_some(flags.contains(PageTableFlags::WRITABLE))
}

/// The page-table entry that maps realm-space address `vaddr` in `view`, if the view has the
/// realm open and a page table covers the address (the entry itself may be empty or armed).
pub fn leaf_entry(view: &View, vaddr: u64) -> Option<&'static mut PageTableEntry> {
    let realm = psyche_abi::realm::realm_of(vaddr)?;
    let pdpt_entry = &table(view.realm_pdpt)[realm as usize];
    if !pdpt_entry.flags().contains(PageTableFlags::PRESENT) {
        return None;
    }
    let pd_entry = &table(pdpt_entry.addr().as_u64())[(vaddr >> 21) as usize & 511];
    if !pd_entry.flags().contains(PageTableFlags::PRESENT) {
        return None;
    }
    Some(&mut table(pd_entry.addr().as_u64())[(vaddr >> 12) as usize & 511])
}

/// Whether a page-table entry is a remote page armed to trap.
pub fn is_armed(entry: &PageTableEntry) -> bool {
    let flags = entry.flags();
    !flags.contains(PageTableFlags::PRESENT) && flags.bits() & psyche_abi::latency::ARMED != 0
}

/// Opens an armed entry (a latency trap was charged for it).
pub fn disarm(entry: &mut PageTableEntry) {
    let flags = entry.flags();
    entry.set_flags(flags | PageTableFlags::PRESENT);
}

/// Arms an entry that was opened after a trap again; `false` if it was not one.
pub fn rearm(entry: &mut PageTableEntry) -> bool {
    let flags = entry.flags();
    if flags.bits() & psyche_abi::latency::ARMED == 0 || !flags.contains(PageTableFlags::PRESENT) {
        return false;
    }
    entry.set_flags(flags - PageTableFlags::PRESENT);
    true
}

/// The physical address behind user address `vaddr` in the page tables at `cr3`, if a CPL3
/// access (a write, with `write`) would succeed.
pub fn translate_user(cr3: u64, vaddr: u64, write: bool) -> Option<u64> {
    if vaddr >= 0x0000_8000_0000_0000 {
        return None;
    }
    let mut table_paddr = cr3 & 0x000F_FFFF_FFFF_F000;
    for level in (0..4).rev() {
        let entry = &table(table_paddr)[(vaddr >> (12 + 9 * level)) as usize & 511];
        let flags = entry.flags();
        if !flags.contains(PageTableFlags::PRESENT | PageTableFlags::USER_ACCESSIBLE)
            || (write && !flags.contains(PageTableFlags::WRITABLE))
        {
            return None;
        }
        if level == 0 || flags.contains(PageTableFlags::HUGE_PAGE) {
            let page_mask = (1u64 << (12 + 9 * level)) - 1;
            return Some((entry.addr().as_u64() & !page_mask) | (vaddr & page_mask));
        }
        table_paddr = entry.addr().as_u64();
    }
    None
}

/// Where, in the direct map, a user `T` at `vaddr` lies, if CPL3 code could reach all of it
/// (and write it, if `write`); `None` for a `T` that would cross a page boundary.
pub fn user_pointer<T>(cr3: u64, vaddr: u64, write: bool) -> Option<*mut T> {
    let size = core::mem::size_of::<T>() as u64;
    if vaddr % PAGE_SIZE + size > PAGE_SIZE {
        return None;
    }
    translate_user(cr3, vaddr, write).map(|paddr| direct_map(paddr) as *mut T)
}

/// Reads a `T` from user memory at `vaddr` as CPL3 code could, through the direct map (so a
/// bad pointer is an error, never a kernel fault). `T` must not cross a page boundary.
pub fn read_user<T: FromBytes>(cr3: u64, vaddr: u64) -> Option<T> {
    let pointer = user_pointer::<T>(cr3, vaddr, false)?;
    // SAFETY: the page is guest RAM (it is mapped), reached through the direct map, and `T` is
    // valid for any bytes.
    Some(unsafe { core::ptr::read_unaligned(pointer) })
}

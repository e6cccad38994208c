//! Guest memory: one region per NUMA node, and reading guest memory the way the guest's own
//! page tables see it.

use std::ops::Range;

use psyche_abi::latency::ARMED;
use psyche_abi::layout::{LARGE_PAGE_SIZE, MMIO_HOLE_END, MMIO_HOLE_START, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::topology::Topology;

/// Where one node's RAM lies in guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeRegion {
    pub node: u32,
    pub base: u64,
    pub size: u64,
}

impl NodeRegion {
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    pub fn contains(&self, gpa: u64) -> bool {
        (self.base..self.end()).contains(&gpa)
    }
}

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host would not map the guest's RAM.
    #[error("cannot allocate {bytes} bytes of guest memory: {source}")]
    Allocate { bytes: u64, source: vm_memory::mmap::FromRangesError },
}

/// Lays the nodes out one after the other from address 0, in node order, on 2 MiB
/// boundaries, skipping the MMIO hole below 4 GiB. Nodes without memory get no region.
pub fn plan(topology: &Topology) -> Vec<NodeRegion> {
    let mut next = 0u64;
    let mut regions = Vec::new();
    for node in &topology.nodes {
        if node.memory_bytes == 0 {
            continue;
        }
        let size = node.memory_bytes.next_multiple_of(LARGE_PAGE_SIZE);
        if next < MMIO_HOLE_END && next + size > MMIO_HOLE_START {
            next = MMIO_HOLE_END;
        }
        regions.push(NodeRegion { node: node.id, base: next, size });
        next += size;
    }
    regions
}

/// Maps the planned regions in the host.
pub fn allocate(regions: &[NodeRegion]) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<_> = regions.iter().map(|r| (GuestAddress(r.base), r.size as usize)).collect();
    let bytes = regions.iter().map(|r| r.size).sum();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate { bytes, source })
}

/// Why a guest-virtual address could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("virtual address {0:#x} is not mapped")]
    NotMapped(u64),
    #[error("virtual address {0:#x} is not accessible from CPL3")]
    NotUser(u64),
    #[error("virtual address {0:#x} is not canonical")]
    NonCanonical(u64),
    #[error("virtual address {0:#x} is not writable")]
    NotWritable(u64),
}

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Translates `vaddr` through the 4-level page tables at `cr3`, as the CPU would. With
/// `require_user`, every level must allow CPL3 access. Page tables that point outside guest
/// RAM count as "not mapped"; nothing the guest writes in them can make this fail otherwise.
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, vaddr: u64, require_user: bool) -> Result<u64, TranslateError> {
    translate_for(mem, cr3, vaddr, require_user, false)
}

/// [`translate`], and with `require_write` every level must allow writing too.
pub fn translate_for(
    mem: &GuestMemoryMmap,
    cr3: u64,
    vaddr: u64,
    require_user: bool,
    require_write: bool,
) -> Result<u64, TranslateError> {
    let sign = (vaddr as i64) >> 47;
    if sign != 0 && sign != -1 {
        return Err(TranslateError::NonCanonical(vaddr));
    }
    let mut table = cr3 & ADDRESS_MASK;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (vaddr >> shift) & 511;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).map_err(|_| TranslateError::NotMapped(vaddr))?;
        // An armed remote page (`psyche_abi::latency::ARMED`) is not present only so that the
        // guest's touches of it trap; it keeps its frame, and the VMM reads and writes through
        // it (a console buffer in a remote realm) without charging latency.
        let armed_page = level == 0 && entry & ARMED != 0;
        if entry & PRESENT == 0 && !armed_page {
            return Err(TranslateError::NotMapped(vaddr));
        }
        if require_user && entry & USER == 0 {
            return Err(TranslateError::NotUser(vaddr));
        }
        if require_write && entry & WRITABLE == 0 {
            return Err(TranslateError::NotWritable(vaddr));
        }
        let frame = entry & ADDRESS_MASK;
        if level == 0 || (entry & HUGE != 0 && level <= 2) {
            let page_mask = (1u64 << shift) - 1;
            return Ok((frame & !page_mask) | (vaddr & page_mask));
        }
        table = frame;
    }
    Err(TranslateError::NotMapped(vaddr))
}

/// Reads `len` bytes at guest-virtual `vaddr` through the page tables at `cr3`, page by page.
pub fn read_virtual(
    mem: &GuestMemoryMmap,
    cr3: u64,
    vaddr: u64,
    len: usize,
    require_user: bool,
) -> Result<Vec<u8>, TranslateError> {
    let mut bytes = vec![0; len];
    for (pa, piece) in page_pieces(mem, cr3, vaddr, len, require_user, false)? {
        mem.read_slice(&mut bytes[piece.clone()], pa)
            .map_err(|_| TranslateError::NotMapped(vaddr + piece.start as u64))?;
    }
    Ok(bytes)
}

/// Writes `bytes` at user-writable guest-virtual `vaddr` through the page tables at `cr3`. Every
/// page is translated and checked first: a buffer that is not wholly mapped, user-writable and
/// in guest RAM is refused with nothing written.
pub fn write_virtual(mem: &GuestMemoryMmap, cr3: u64, vaddr: u64, bytes: &[u8]) -> Result<(), TranslateError> {
    for (pa, piece) in page_pieces(mem, cr3, vaddr, bytes.len(), true, true)? {
        mem.write_slice(&bytes[piece.clone()], pa)
            .map_err(|_| TranslateError::NotMapped(vaddr + piece.start as u64))?;
    }
    Ok(())
}

/// Splits `len` bytes at guest-virtual `vaddr` at page boundaries and translates each piece as
/// [`translate_for`] does: the guest-physical address of each and its range within the `len`
/// bytes, every one checked to lie in guest RAM (so that accessing them cannot fail).
fn page_pieces(
    mem: &GuestMemoryMmap,
    cr3: u64,
    vaddr: u64,
    len: usize,
    require_user: bool,
    require_write: bool,
) -> Result<Vec<(GuestAddress, Range<usize>)>, TranslateError> {
    let mut pieces = Vec::with_capacity(len / PAGE_SIZE as usize + 2);
    let mut done = 0;
    while done < len {
        let va = vaddr.checked_add(done as u64).ok_or(TranslateError::NonCanonical(vaddr))?;
        let pa = translate_for(mem, cr3, va, require_user, require_write)?;
        let chunk = ((PAGE_SIZE - (va % PAGE_SIZE)) as usize).min(len - done);
        if !GuestMemoryBackend::check_range(mem, GuestAddress(pa), chunk) {
            return Err(TranslateError::NotMapped(va));
        }
        pieces.push((GuestAddress(pa), done..done + chunk));
        done += chunk;
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(sizes: &[&str]) -> Topology {
        let mut text = String::from("name = \"t\"\n");
        for (id, size) in sizes.iter().enumerate() {
            let cpus = if id == 0 { "[0]" } else { "[]" };
            text += &format!("[[node]]\nid = {id}\ncpus = {cpus}\nmemory = \"{size}\"\n");
        }
        Topology::parse(&text, "test").unwrap()
    }

    #[test]
    fn regions_skip_empty_nodes_and_the_mmio_hole() {
        let regions = plan(&topology(&["2G", "0", "2G"]));
        assert_eq!(
            regions,
            vec![
                NodeRegion { node: 0, base: 0, size: 2 << 30 },
                NodeRegion { node: 2, base: MMIO_HOLE_END, size: 2 << 30 },
            ]
        );
    }

    #[test]
    fn translation_walks_all_levels_and_checks_user_access() {
        let regions = plan(&topology(&["16M"]));
        let mem = allocate(&regions).unwrap();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> page 0x9000 (user),
        // and a supervisor-only 2 MiB page at 0x20_0000 -> 0x40_0000.
        mem.write_obj(0x2000u64 | PRESENT | USER, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x3000u64 | PRESENT | USER, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x4000u64 | PRESENT | USER, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0x40_0000u64 | PRESENT | HUGE, GuestAddress(0x3008)).unwrap();
        mem.write_obj(0x9000u64 | PRESENT | USER, GuestAddress(0x4000 + 5 * 8)).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x9010)).unwrap();

        assert_eq!(translate(&mem, 0x1000, 0x5010, true), Ok(0x9010));
        assert_eq!(read_virtual(&mem, 0x1000, 0x5010, 5, true).unwrap(), b"hello");
        assert_eq!(translate(&mem, 0x1000, 0x20_0123, false), Ok(0x40_0123));
        assert_eq!(translate(&mem, 0x1000, 0x20_0123, true), Err(TranslateError::NotUser(0x20_0123)));
        assert_eq!(translate(&mem, 0x1000, 0x6000, false), Err(TranslateError::NotMapped(0x6000)));
        assert_eq!(
            translate(&mem, 0x1000, 0x0000_8000_0000_0000, false),
            Err(TranslateError::NonCanonical(0x0000_8000_0000_0000))
        );
        // An armed remote page is still translated; only a leaf entry can be armed.
        mem.write_obj(0x9000u64 | ARMED | USER, GuestAddress(0x4000 + 7 * 8)).unwrap();
        assert_eq!(read_virtual(&mem, 0x1000, 0x7010, 5, true).unwrap(), b"hello");
        mem.write_obj(0x4000u64 | ARMED | USER, GuestAddress(0x3000 + 2 * 8)).unwrap();
        assert_eq!(translate(&mem, 0x1000, 0x40_7000, false), Err(TranslateError::NotMapped(0x40_7000)));
        // A page table pointing outside guest RAM is "not mapped", not a crash.
        mem.write_obj(0xFFFF_F000u64 | PRESENT | USER, GuestAddress(0x4000 + 6 * 8)).unwrap();
        assert!(read_virtual(&mem, 0x1000, 0x6000, 4, false).is_err());
    }

    #[test]
    fn a_write_that_is_not_wholly_allowed_writes_nothing() {
        let mem = allocate(&plan(&topology(&["16M"]))).unwrap();
        // 0x5000 is a user-writable page (frame 0x9000), 0x6000 user read-only (frame 0xA000),
        // 0x7000 user-writable with its frame outside guest RAM.
        mem.write_obj(0x2000u64 | PRESENT | WRITABLE | USER, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x3000u64 | PRESENT | WRITABLE | USER, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x4000u64 | PRESENT | WRITABLE | USER, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0x9000u64 | PRESENT | WRITABLE | USER, GuestAddress(0x4000 + 5 * 8)).unwrap();
        mem.write_obj(0xA000u64 | PRESENT | USER, GuestAddress(0x4000 + 6 * 8)).unwrap();
        mem.write_obj((1u64 << 40) | PRESENT | WRITABLE | USER, GuestAddress(0x4000 + 4 * 8)).unwrap();
        let page = |frame: u64| {
            let mut bytes = vec![0u8; PAGE_SIZE as usize];
            mem.read_slice(&mut bytes, GuestAddress(frame)).unwrap();
            bytes
        };
        let before = page(0x9000);
        assert_eq!(write_virtual(&mem, 0x1000, 0x5FF0, &[0xEE; 32]), Err(TranslateError::NotWritable(0x6000)));
        assert_eq!(page(0x9000), before, "the writable page was written although the next one is read-only");
        assert_eq!(write_virtual(&mem, 0x1000, 0x4FF0, &[0xEE; 32]), Err(TranslateError::NotMapped(0x4FF0)));
        assert_eq!(page(0x9000), before);
        assert_eq!(write_virtual(&mem, 0x1000, 0x5FF0, &[0xEE; 16]), Ok(()));
        assert_eq!(&page(0x9000)[0xFF0..], &[0xEE; 16]);
    }
}

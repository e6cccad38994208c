//! Everything written into guest memory before the first vCPU runs, done here at native speed
//! rather than by the guest at emulated CPL0 speed: the kernel, the programs (relocated), the
//! page tables, the boot GDT, the per-CPU areas and the boot info.

pub mod kernel;
pub mod program;
#[cfg(test)]
mod props;

use psyche_abi::boot::{BootInfo, CpuInfo, NodeInfo, ProgramInfo, BOOT_INFO_MAGIC, CMDLINE_MAX};
use psyche_abi::layout::{
    direct_map, BOOT_GDT_PADDR, BOOT_INFO_PADDR, DIRECT_MAP_BASE, KERNEL_VIRT_BASE, KERNEL_WINDOW_SIZE,
    LARGE_PAGE_SIZE, PAGE_SIZE, PAGE_TABLES_END, PAGE_TABLES_PADDR, PERCPU_AREA_SIZE,
};
use psyche_abi::trace::TRACE_AREA_SIZE;
use psyche_abi::{ABI_VERSION, MAX_PROGRAMS};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{FromZeros, IntoBytes};

use crate::memory::NodeRegion;
use crate::topology::Topology;

/// A program to load: its name (for messages) and its ELF image.
#[derive(Clone, Debug)]
pub struct ProgramImage {
    pub name: String,
    pub image: std::borrow::Cow<'static, [u8]>,
}

/// Why the guest could not be laid out.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {origin}: {source}")]
    Kernel { origin: String, source: kernel::KernelError },
    #[error("program {name}: {source}")]
    Program { name: String, source: program::ProgramError },
    #[error("{count} programs given, but at most {MAX_PROGRAMS} can run in one boot")]
    TooManyPrograms { count: usize },
    #[error("the kernel command line is {0} bytes long; at most {CMDLINE_MAX} fit")]
    CmdlineTooLong(usize),
    #[error("node {node} has no room left for {what}")]
    OutOfMemory { node: u32, what: &'static str },
    #[error("guest memory reaches {0:#x}, more than the boot page tables can map")]
    TooMuchMemory(u64),
    #[error(
        "latency mode {mode}: an access from node {from} to node {to} costs {ns} ns, more than the \
         {max} ns one latency charge can reply (a hypercall reply is 32 bits, negative ones are \
         errors): lower latency.matrix_ns or latency.local_ns",
        max = crate::latency::MAX_CHARGE_NS
    )]
    LatencyTooLong { mode: crate::topology::LatencyMode, from: u32, to: u32, ns: u32 },
    #[error("writing the boot data into guest memory failed: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// How each vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct VcpuStart {
    pub index: u32,
    pub apic_id: u32,
    pub node: u32,
    /// Initial RSP (the top of the vCPU's kernel stack, a direct-map address).
    pub stack_top: u64,
    /// Guest-physical base of the vCPU's trace area (0 when not tracing).
    pub trace_paddr: u64,
}

/// The result of laying the guest out.
#[derive(Debug)]
pub struct BootLayout {
    /// Kernel entry point (virtual).
    pub entry: u64,
    /// CR3 for every vCPU.
    pub cr3: u64,
    /// Base (virtual) and limit of the boot GDT.
    pub gdt: (u64, u16),
    /// Virtual address of the boot info, passed in RSI.
    pub boot_info_vaddr: u64,
    pub vcpus: Vec<VcpuStart>,
}

/// What to boot.
pub struct BootRequest<'a> {
    pub topology: &'a Topology,
    pub regions: &'a [NodeRegion],
    pub kernel: &'a [u8],
    pub kernel_origin: &'a str,
    pub programs: &'a [ProgramImage],
    pub args: &'a [String],
    pub cmdline: &'a str,
    pub tsc_khz: u64,
    /// Give every vCPU a trace ring.
    pub trace: bool,
}

/// Bump allocation of guest-physical memory per node, from the bottom of each region.
struct Placement {
    next: Vec<Option<(u64, u64)>>,
}

impl Placement {
    fn new(topology: &Topology, regions: &[NodeRegion]) -> Self {
        let mut next = vec![None; topology.node_count()];
        for region in regions {
            next[region.node as usize] = Some((region.base, region.end()));
        }
        Self { next }
    }

    fn skip_to(&mut self, node: u32, address: u64) {
        if let Some(Some((next, _))) = self.next.get_mut(node as usize) {
            *next = (*next).max(address);
        }
    }

    fn alloc(&mut self, node: u32, bytes: u64, align: u64) -> Option<u64> {
        let (next, end) = self.next.get_mut(node as usize)?.as_mut()?;
        let start = next.next_multiple_of(align);
        let stop = start.checked_add(bytes)?;
        if stop > *end {
            return None;
        }
        *next = stop;
        Some(start)
    }
}

/// Lays the guest out in `mem`.
pub fn lay_out(mem: &GuestMemoryMmap, request: &BootRequest<'_>) -> Result<BootLayout, BootError> {
    let topology = request.topology;
    let node0 = request
        .regions
        .iter()
        .find(|r| r.node == 0)
        .copied()
        .ok_or(BootError::OutOfMemory { node: 0, what: "the kernel" })?;
    if request.programs.len() > MAX_PROGRAMS {
        return Err(BootError::TooManyPrograms { count: request.programs.len() });
    }
    if request.cmdline.len() > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(request.cmdline.len()));
    }

    let kernel = kernel::load(mem, request.kernel, node0.end())
        .map_err(|source| BootError::Kernel { origin: request.kernel_origin.to_owned(), source })?;
    let mut placement = Placement::new(topology, request.regions);
    placement.skip_to(0, kernel.end.next_multiple_of(PAGE_SIZE));

    let mut info = Box::new(BootInfo::new_zeroed());
    info.magic = BOOT_INFO_MAGIC;
    info.version = ABI_VERSION;
    info.cpu_count = topology.cpu_count() as u32;
    info.node_count = topology.node_count() as u32;
    info.program_count = request.programs.len() as u32;
    info.tsc_khz = request.tsc_khz;
    info.cmdline_len = request.cmdline.len() as u32;
    info.latency_mode = latency_mode(topology)? as u32;
    info.cmdline[..request.cmdline.len()].copy_from_slice(request.cmdline.as_bytes());

    for (index, program) in request.programs.iter().enumerate() {
        let mut alloc = |bytes| placement.alloc(0, bytes, PAGE_SIZE);
        let loaded: ProgramInfo = program::load(mem, &program.image, index, request.args, &mut alloc)
            .map_err(|source| BootError::Program { name: program.name.clone(), source })?;
        info.programs[index] = loaded;
    }

    let mut vcpus = Vec::with_capacity(topology.cpu_count());
    for cpu in 0..topology.cpu_count() as u32 {
        let node = topology.node_of_cpu(cpu).unwrap_or(0);
        // A CPU of a memory-less node keeps its per-CPU data on the nearest node with memory.
        let home = topology.nearest_node_with_memory(node);
        let area = placement
            .alloc(home, PERCPU_AREA_SIZE, PERCPU_AREA_SIZE)
            .ok_or(BootError::OutOfMemory { node: home, what: "per-CPU areas" })?;
        let trace_paddr = if request.trace {
            placement
                .alloc(home, TRACE_AREA_SIZE, PAGE_SIZE)
                .ok_or(BootError::OutOfMemory { node: home, what: "trace rings" })?
        } else {
            0
        };
        info.cpus[cpu as usize] = CpuInfo { apic_id: cpu, node, percpu_paddr: area, trace_paddr };
        vcpus.push(VcpuStart {
            index: cpu,
            apic_id: cpu,
            node,
            stack_top: direct_map(area) + psyche_abi::layout::PERCPU_KERNEL_STACK_TOP,
            trace_paddr,
        });
    }

    for node in 0..topology.node_count() as u32 {
        let region = request.regions.iter().find(|r| r.node == node);
        let entry = match (region, placement.next.get(node as usize).copied().flatten()) {
            (Some(region), Some((next, end))) => NodeInfo {
                mem_base: region.base,
                mem_size: region.size,
                free_base: next.next_multiple_of(PAGE_SIZE),
                free_end: end,
            },
            _ => NodeInfo { mem_base: 0, mem_size: 0, free_base: 0, free_end: 0 },
        };
        info.nodes[node as usize] = entry;
        for other in 0..topology.node_count() as u32 {
            info.distances[node as usize][other as usize] = topology.distance(node, other);
        }
    }

    let max_address = request.regions.iter().map(NodeRegion::end).max().unwrap_or(0);
    write_page_tables(mem, request.regions, max_address)?;
    write_boot_gdt(mem)?;
    mem.write_slice(info.as_bytes(), GuestAddress(BOOT_INFO_PADDR))?;

    Ok(BootLayout {
        entry: kernel.entry,
        cr3: PAGE_TABLES_PADDR,
        gdt: (direct_map(BOOT_GDT_PADDR), 3 * 8 - 1),
        boot_info_vaddr: direct_map(BOOT_INFO_PADDR),
        vcpus,
    })
}

/// The boot info's latency mode, after checking that every charge the mode can make fits in
/// a hypercall reply.
fn latency_mode(topology: &Topology) -> Result<psyche_abi::latency::LatencyMode, BootError> {
    let mode = topology.latency_mode();
    if mode.to_abi().traps() {
        let nodes = topology.node_count() as u32;
        for (from, to) in (0..nodes).flat_map(|from| (0..nodes).map(move |to| (from, to))) {
            match topology.latency_ns(from, to) {
                Some(ns) if from != to && ns > crate::latency::MAX_CHARGE_NS => {
                    return Err(BootError::LatencyTooLong { mode, from, to, ns });
                }
                _ => {}
            }
        }
    }
    Ok(mode.to_abi())
}

const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
const PTE_GLOBAL: u64 = 1 << 8;
const PTE_NO_EXECUTE: u64 = 1 << 63;

/// Builds the kernel's half of the address space (the lower half stays empty for the kernel
/// to fill): the direct map of all RAM (no-execute) and the kernel window over the first GiB,
/// both with 2 MiB pages.
fn write_page_tables(mem: &GuestMemoryMmap, regions: &[NodeRegion], max_address: u64) -> Result<(), BootError> {
    let gib = 1u64 << 30;
    let direct_tables = max_address.div_ceil(gib);
    // PML4, direct-map PDPT, kernel PDPT, kernel PD, then one PD per GiB of the direct map.
    let pages = 4 + direct_tables;
    if PAGE_TABLES_PADDR + pages * PAGE_SIZE > PAGE_TABLES_END || direct_tables > 512 {
        return Err(BootError::TooMuchMemory(max_address));
    }
    let mut tables = vec![0u64; (pages * 512) as usize];
    let table_address = |i: u64| PAGE_TABLES_PADDR + i * PAGE_SIZE;
    let (pml4, direct_pdpt, kernel_pdpt, kernel_pd) = (0usize, 1usize, 2usize, 3usize);
    let entry = |table: usize, index: u64| table * 512 + index as usize;

    tables[entry(pml4, (DIRECT_MAP_BASE >> 39) & 511)] = table_address(1) | PTE_PRESENT | PTE_WRITABLE;
    tables[entry(pml4, (KERNEL_VIRT_BASE >> 39) & 511)] = table_address(2) | PTE_PRESENT | PTE_WRITABLE;
    tables[entry(kernel_pdpt, (KERNEL_VIRT_BASE >> 30) & 511)] = table_address(3) | PTE_PRESENT | PTE_WRITABLE;
    for i in 0..direct_tables {
        tables[entry(direct_pdpt, i)] = table_address(4 + i) | PTE_PRESENT | PTE_WRITABLE;
    }
    let large = PTE_PRESENT | PTE_WRITABLE | PTE_HUGE | PTE_GLOBAL;
    for region in regions {
        let mut address = region.base;
        while address < region.end() {
            let pd = 4 + (address / gib) as usize;
            tables[entry(pd, (address / LARGE_PAGE_SIZE) % 512)] = address | large | PTE_NO_EXECUTE;
            if address < KERNEL_WINDOW_SIZE {
                tables[entry(kernel_pd, address / LARGE_PAGE_SIZE)] = address | large;
            }
            address += LARGE_PAGE_SIZE;
        }
    }
    mem.write_slice(tables.as_bytes(), GuestAddress(PAGE_TABLES_PADDR))?;
    Ok(())
}

/// The boot GDT: null, 64-bit kernel code, kernel data (the selectors of `psyche_abi::layout`).
fn write_boot_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let gdt: [u64; 3] = [0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF];
    mem.write_slice(gdt.as_bytes(), GuestAddress(BOOT_GDT_PADDR))?;
    Ok(())
}

/// A copy of an image on an 8-byte boundary: `object` reads ELF headers in place and needs
/// them aligned, which `include_bytes!` data and `Vec<u8>` do not promise.
pub(crate) struct Aligned {
    words: Vec<u64>,
    len: usize,
}

impl Aligned {
    pub(crate) fn new(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        words.as_mut_bytes()[..bytes.len()].copy_from_slice(bytes);
        Self { words, len: bytes.len() }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.words.as_bytes()[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use psyche_abi::latency::LatencyMode;

    use super::*;

    fn two_nodes(latency: &str) -> Topology {
        let text = format!(
            "name = \"t\"\n[[node]]\nid = 0\ncpus = [0]\nmemory = \"16M\"\n\
             [[node]]\nid = 1\ncpus = [1]\nmemory = \"16M\"\n{latency}"
        );
        Topology::parse(&text, "test").unwrap()
    }

    #[test]
    fn the_boot_info_latency_mode_follows_the_topology_and_every_charge_fits_a_reply() {
        assert_eq!(latency_mode(&two_nodes("")).unwrap(), LatencyMode::Off);
        let account = two_nodes("[latency]\nlocal_ns = 100\nmode = \"account\"\n");
        assert_eq!(latency_mode(&account).unwrap(), LatencyMode::Account);
        let huge = "[latency]\nlocal_ns = 100\nmatrix_ns = [[100, 3000000000], [200, 100]]\n";
        let error = latency_mode(&two_nodes(huge)).unwrap_err().to_string();
        assert!(error.contains("from node 0 to node 1 costs 3000000000 ns"), "{error}");
        // Latency off: no charge is ever made, so no cost is too long.
        let off = format!("{huge}mode = \"off\"\n");
        assert_eq!(latency_mode(&two_nodes(&off)).unwrap(), LatencyMode::Off);
    }
}

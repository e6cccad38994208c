//! The machine the kernel finds: boot-info validation, the CPU -> node map, and the report the
//! kernel sends back to the VMM.

use psyche_abi::boot::{BootInfo, BOOT_INFO_MAGIC};
use psyche_abi::layout::PAGE_SIZE;
use psyche_abi::report::{TopologyReport, TOPOLOGY_REPORT_MAGIC};
use psyche_abi::{CpuMask, ABI_VERSION, MAX_CPUS, MAX_NODES, MAX_PROGRAMS};

/// Why the kernel refuses a boot info.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// The magic number is wrong: this is not a boot info.
    BadMagic,
    /// Written for another ABI version.
    VersionMismatch { found: u32 },
    /// No CPUs, or more than [`MAX_CPUS`].
    CpuCount { count: u32 },
    /// No nodes, or more than [`MAX_NODES`].
    NodeCount { count: u32 },
    /// More than [`MAX_PROGRAMS`] programs.
    ProgramCount { count: u32 },
    /// A CPU names a node that does not exist.
    CpuNode { cpu: usize, node: u32 },
    /// A node's free range is not a page-aligned part of its memory.
    FreeRange { node: usize },
    /// A distance-table diagonal entry is not 10.
    Diagonal { node: usize },
}

impl BootInfoError {
    /// What is wrong, in words (without formatting numbers: see the kernel's console module).
    pub fn describe(&self) -> &'static str {
        match self {
            Self::BadMagic => "bad magic number (not a boot info)",
            Self::VersionMismatch { .. } => "written for another ABI version",
            Self::CpuCount { .. } => "no CPUs, or too many",
            Self::NodeCount { .. } => "no nodes, or too many",
            Self::ProgramCount { .. } => "too many programs",
            Self::CpuNode { .. } => "a CPU names a node that does not exist",
            Self::FreeRange { .. } => "a node's free range is not a page-aligned part of its memory",
            Self::Diagonal { .. } => "a distance-table diagonal entry is not 10",
        }
    }
}

/// Checks everything in the boot info the kernel relies on.
pub fn validate(info: &BootInfo) -> Result<(), BootInfoError> {
    if info.magic != BOOT_INFO_MAGIC {
        return Err(BootInfoError::BadMagic);
    }
    if info.version != ABI_VERSION {
        return Err(BootInfoError::VersionMismatch { found: info.version });
    }
    if info.cpu_count == 0 || info.cpu_count as usize > MAX_CPUS {
        return Err(BootInfoError::CpuCount { count: info.cpu_count });
    }
    if info.node_count == 0 || info.node_count as usize > MAX_NODES {
        return Err(BootInfoError::NodeCount { count: info.node_count });
    }
    if info.program_count as usize > MAX_PROGRAMS {
        return Err(BootInfoError::ProgramCount { count: info.program_count });
    }
    for (cpu, entry) in info.cpus[..info.cpu_count as usize].iter().enumerate() {
        if entry.node >= info.node_count {
            return Err(BootInfoError::CpuNode { cpu, node: entry.node });
        }
    }
    for (node, entry) in info.nodes[..info.node_count as usize].iter().enumerate() {
        let mem_end = entry.mem_base.checked_add(entry.mem_size);
        let aligned = (entry.free_base | entry.free_end) % PAGE_SIZE == 0;
        let inside = mem_end.is_some_and(|end| {
            entry.mem_base <= entry.free_base && entry.free_base <= entry.free_end && entry.free_end <= end
        });
        if !aligned || !inside {
            return Err(BootInfoError::FreeRange { node });
        }
        if info.distances[node][node] != 10 {
            return Err(BootInfoError::Diagonal { node });
        }
    }
    Ok(())
}

/// The index of the CPU whose APIC ID is `apic_id`, from a validated boot info.
pub fn cpu_of_apic_id(info: &BootInfo, apic_id: u32) -> Option<usize> {
    info.cpus[..(info.cpu_count as usize).min(MAX_CPUS)].iter().position(|cpu| cpu.apic_id == apic_id)
}

/// Sets `cpu`'s bit in `mask`.
pub fn mask_set(mask: &mut CpuMask, cpu: usize) {
    if let Some(word) = mask.get_mut(cpu / 64) {
        *word |= 1 << (cpu % 64);
    }
}

/// What the kernel found, as it reports it to the VMM.
pub struct Findings<'a> {
    /// CPUs that checked in, per node (by the node each CPU found itself on).
    pub online: &'a [CpuMask],
    /// Bytes of RAM the kernel manages, per node.
    pub memory_bytes: &'a dyn Fn(usize) -> u64,
    /// Calibrated LAPIC timer frequency.
    pub lapic_timer_hz: u64,
}

/// Fills `report` from a validated boot info and the kernel's findings.
pub fn fill_report(info: &BootInfo, findings: &Findings<'_>, report: &mut TopologyReport) {
    let nodes = (info.node_count as usize).min(MAX_NODES);
    report.magic = TOPOLOGY_REPORT_MAGIC;
    report.node_count = nodes as u32;
    report.lapic_timer_hz = findings.lapic_timer_hz;
    let mut cpus_online = 0;
    for node in 0..nodes {
        let mask = findings.online.get(node).copied().unwrap_or_default();
        cpus_online += mask.iter().map(|word| word.count_ones()).sum::<u32>();
        report.nodes[node].cpus = mask;
        report.nodes[node].memory_bytes = (findings.memory_bytes)(node);
        report.distances[node][..nodes].copy_from_slice(&info.distances[node][..nodes]);
    }
    report.cpus_online = cpus_online;
}

/// The node whose RAM holds guest-physical address `paddr`, if any.
pub fn node_of_paddr(info: &BootInfo, paddr: u64) -> Option<u32> {
    let nodes = &info.nodes[..(info.node_count as usize).min(info.nodes.len())];
    nodes
        .iter()
        .position(|node| node.mem_size != 0 && paddr >= node.mem_base && paddr - node.mem_base < node.mem_size)
        .map(|node| node as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    fn two_node_info() -> Box<BootInfo> {
        let mut info = Box::new(BootInfo::new_zeroed());
        info.magic = BOOT_INFO_MAGIC;
        info.version = ABI_VERSION;
        info.cpu_count = 3;
        info.node_count = 2;
        for (cpu, node) in [(0, 0), (1, 1), (2, 1)] {
            info.cpus[cpu].apic_id = cpu as u32 * 2;
            info.cpus[cpu].node = node;
        }
        info.nodes[0].mem_size = 0x100_0000;
        info.nodes[0].free_base = 0x40_0000;
        info.nodes[0].free_end = 0x100_0000;
        info.nodes[1].mem_base = 0x100_0000;
        info.nodes[1].mem_size = 0x100_0000;
        info.nodes[1].free_base = 0x100_0000;
        info.nodes[1].free_end = 0x200_0000;
        info.distances[0][0] = 10;
        info.distances[0][1] = 21;
        info.distances[1][0] = 31;
        info.distances[1][1] = 10;
        info
    }

    #[test]
    fn every_frame_has_the_node_whose_memory_holds_it() {
        let info = two_node_info();
        assert_eq!(node_of_paddr(&info, 0), Some(0));
        assert_eq!(node_of_paddr(&info, 0xFF_F000), Some(0));
        assert_eq!(node_of_paddr(&info, 0x100_0000), Some(1));
        assert_eq!(node_of_paddr(&info, 0x1FF_FFFF), Some(1));
        assert_eq!(node_of_paddr(&info, 0x200_0000), None);
        assert_eq!(node_of_paddr(&info, u64::MAX), None);
    }

    #[test]
    fn accepts_a_good_boot_info() {
        assert_eq!(validate(&two_node_info()), Ok(()));
    }

    #[test]
    fn rejects_broken_boot_infos() {
        let mut info = two_node_info();
        info.magic = 0;
        assert_eq!(validate(&info), Err(BootInfoError::BadMagic));

        let mut info = two_node_info();
        info.cpus[2].node = 2;
        assert_eq!(validate(&info), Err(BootInfoError::CpuNode { cpu: 2, node: 2 }));

        let mut info = two_node_info();
        info.nodes[1].free_end = 0x300_0000;
        assert_eq!(validate(&info), Err(BootInfoError::FreeRange { node: 1 }));

        let mut info = two_node_info();
        info.nodes[1].mem_base = u64::MAX;
        assert_eq!(validate(&info), Err(BootInfoError::FreeRange { node: 1 }));

        let mut info = two_node_info();
        info.cpu_count = MAX_CPUS as u32 + 1;
        assert_eq!(validate(&info), Err(BootInfoError::CpuCount { count: MAX_CPUS as u32 + 1 }));

        let mut info = two_node_info();
        info.distances[1][1] = 0;
        assert_eq!(validate(&info), Err(BootInfoError::Diagonal { node: 1 }));
    }

    #[test]
    fn finds_cpus_by_apic_id() {
        let info = two_node_info();
        assert_eq!(cpu_of_apic_id(&info, 4), Some(2));
        assert_eq!(cpu_of_apic_id(&info, 3), None);
    }

    #[test]
    fn report_counts_what_checked_in() {
        let info = two_node_info();
        let mut online = [[0u64; 4]; 2];
        mask_set(&mut online[0], 0);
        mask_set(&mut online[1], 2);
        let mut report = Box::new(TopologyReport::new_zeroed());
        let memory = |node: usize| (node as u64 + 1) << 20;
        fill_report(&info, &Findings { online: &online, memory_bytes: &memory, lapic_timer_hz: 7 }, &mut report);
        assert_eq!(report.cpus_online, 2);
        assert_eq!(report.node_count, 2);
        assert_eq!(report.nodes[1].cpus[0], 0b100);
        assert_eq!(report.nodes[1].memory_bytes, 2 << 20);
        assert_eq!(report.distances[1][0], 31);
        assert_eq!(report.lapic_timer_hz, 7);
    }
}

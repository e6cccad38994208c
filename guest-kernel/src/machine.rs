//! The machine the kernel finds: boot-info validation, the CPU -> node map, and the report the
//! kernel sends back to the VMM.

use psyche_abi::boot::{BootInfo, BOOT_INFO_MAGIC, MAX_SEGMENTS};
use psyche_abi::layout::{program_slot, PAGE_SIZE, PERCPU_AREA_SIZE, PROGRAM_SLOT_SIZE, USER_STACK_SIZE};
use psyche_abi::report::{TopologyReport, TOPOLOGY_REPORT_MAGIC};
use psyche_abi::trace::TRACE_AREA_SIZE;
use psyche_abi::{CpuMask, ABI_VERSION, MAX_CPUS, MAX_NODES, MAX_PROGRAMS};

use crate::sync::SpinLock;

/// The highest TSC frequency the kernel accepts (100 GHz): its timer arithmetic multiplies
/// the frequency by up to a few thousand in 64 bits.
pub const MAX_TSC_KHZ: u64 = 100_000_000;

/// Something the VMM placed in guest-physical memory for the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Area {
    /// A CPU's per-CPU area (its kernel stacks and data).
    PerCpu { cpu: usize },
    /// A CPU's trace ring.
    Trace { cpu: usize },
    /// A loadable segment of a program (or its argument page).
    Segment { program: usize, segment: usize },
}

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
    /// A TSC frequency above [`MAX_TSC_KHZ`].
    TscKhz,
    /// A CPU names a node that does not exist.
    CpuNode { cpu: usize, node: u32 },
    /// Two CPUs have the same APIC ID.
    ApicId { cpu: usize },
    /// A node's free range is not a page-aligned part of its memory, or covers the kernel.
    FreeRange { node: usize },
    /// A node's memory overlaps another node's.
    NodeOverlap { node: usize },
    /// A distance-table diagonal entry is not 10.
    Diagonal { node: usize },
    /// A program's slot base is not its slot, or its segment count is 0 or too large.
    ProgramSlot { program: usize },
    /// A program segment is empty, not page aligned, or not inside its slot.
    SegmentVirtual { program: usize, segment: usize },
    /// An area is misaligned, not inside one node's memory, or in a free range or the kernel.
    Misplaced(Area),
    /// Two areas overlap.
    Overlap(Area, Area),
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
            Self::TscKhz => "the TSC frequency is above 100 GHz",
            Self::CpuNode { .. } => "a CPU names a node that does not exist",
            Self::ApicId { .. } => "two CPUs have the same APIC ID",
            Self::FreeRange { .. } => {
                "a node's free range is not a page-aligned part of its memory, or covers the kernel"
            }
            Self::NodeOverlap { .. } => "two nodes' memory overlaps",
            Self::Diagonal { .. } => "a distance-table diagonal entry is not 10",
            Self::ProgramSlot { .. } => "a program is not in its slot, or has no segments or too many",
            Self::SegmentVirtual { .. } => "a program segment is empty, unaligned or outside its slot",
            Self::Misplaced(Area::PerCpu { .. }) => {
                "a per-CPU area is unaligned, not in one node's memory, or in a free range or the kernel"
            }
            Self::Misplaced(Area::Trace { .. }) => {
                "a trace area is unaligned, not in one node's memory, or in a free range or the kernel"
            }
            Self::Misplaced(Area::Segment { .. }) => {
                "a program segment is unaligned, not in one node's memory, or in a free range or the kernel"
            }
            Self::Overlap(..) => "two per-CPU areas, trace areas or program segments overlap",
        }
    }
}

/// Checks everything in the boot info the kernel relies on. `kernel_end` is the physical end
/// of the kernel image: nothing below it (the boot GDT, page tables, boot info and the kernel)
/// may be free memory or part of a program.
///
/// Accepted, the boot info gives: counts in range; every CPU a node that exists and an APIC
/// ID of its own; every node a page-aligned free range inside its memory, above the kernel,
/// with no two nodes' memory overlapping (so no frame is in two pools); 10 on the distance
/// diagonal; a TSC frequency the timer arithmetic can scale; and every area the VMM placed
/// (per-CPU areas, trace areas, program segments) aligned, inside one node's memory, outside
/// every free range and the kernel, and overlapping no other (so no program maps a frame the
/// kernel or another program uses).
pub fn validate(info: &BootInfo, kernel_end: u64) -> Result<(), BootInfoError> {
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
    if info.tsc_khz > MAX_TSC_KHZ {
        return Err(BootInfoError::TscKhz);
    }
    let nodes = &info.nodes[..info.node_count as usize];
    for (node, entry) in nodes.iter().enumerate() {
        let mem_end = entry.mem_base.checked_add(entry.mem_size);
        let aligned = (entry.free_base | entry.free_end) % PAGE_SIZE == 0;
        let inside = mem_end.is_some_and(|end| {
            entry.mem_base <= entry.free_base && entry.free_base <= entry.free_end && entry.free_end <= end
        });
        let over_kernel = entry.free_base < entry.free_end && entry.free_base < kernel_end;
        if !aligned || !inside || over_kernel {
            return Err(BootInfoError::FreeRange { node });
        }
        // Earlier nodes' ends were checked not to overflow, and so was this one's.
        let end = entry.mem_base + entry.mem_size;
        if nodes[..node]
            .iter()
            .any(|other| overlaps(entry.mem_base, end, other.mem_base, other.mem_base + other.mem_size))
        {
            return Err(BootInfoError::NodeOverlap { node });
        }
        if info.distances[node][node] != 10 {
            return Err(BootInfoError::Diagonal { node });
        }
    }
    let cpus = &info.cpus[..info.cpu_count as usize];
    // APIC IDs, sorted (with their CPU) so that a duplicate is a neighbour: the VMM numbers
    // them in order, so the insertion sort is linear, where comparing every pair would cost
    // seconds of emulated CPL0 on a 256-CPU machine.
    let mut scratch = SCRATCH.lock();
    let Scratch { ids, areas: placed_areas } = &mut *scratch;
    for (cpu, entry) in cpus.iter().enumerate() {
        if entry.node >= info.node_count {
            return Err(BootInfoError::CpuNode { cpu, node: entry.node });
        }
        ids[cpu] = (entry.apic_id, cpu as u32);
    }
    let ids = &mut ids[..cpus.len()];
    insertion_sort(ids, |&(id, _)| u64::from(id));
    if let Some(pair) = ids.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(BootInfoError::ApicId { cpu: pair[0].1.max(pair[1].1) as usize });
    }
    for (index, program) in info.programs[..info.program_count as usize].iter().enumerate() {
        let count = program.segment_count as usize;
        if program.slot_base != program_slot(index) || !(1..=MAX_SEGMENTS).contains(&count) {
            return Err(BootInfoError::ProgramSlot { program: index });
        }
        // The top of the slot is the stack's.
        let image_end = program.slot_base + (PROGRAM_SLOT_SIZE - USER_STACK_SIZE);
        for (segment, entry) in program.segments[..count].iter().enumerate() {
            let end = entry.pages.checked_mul(PAGE_SIZE).and_then(|bytes| entry.vaddr.checked_add(bytes));
            let inside = end.is_some_and(|end| program.slot_base <= entry.vaddr && end <= image_end);
            if entry.pages == 0 || entry.vaddr % PAGE_SIZE != 0 || !inside {
                return Err(BootInfoError::SegmentVirtual { program: index, segment });
            }
        }
    }
    // This runs at emulated CPL0 speed (about a microsecond an instruction): each area is
    // checked on its own, then all are sorted by base (the VMM places them in order, so the
    // insertion sort is about linear) and only neighbours are compared, where comparing every
    // pair would cost seconds on a 256-CPU machine.
    let mut count = 0;
    for (index, (area, base, size, align)) in areas(info).enumerate() {
        let Some(end) = base.checked_add(size) else { return Err(BootInfoError::Misplaced(area)) };
        // Node memories are disjoint and hold their free ranges, so an area inside one node's
        // memory can only meet that node's free range.
        let home = nodes
            .iter()
            .find(|node| node.mem_size > 0 && node.mem_base <= base && end <= node.mem_base + node.mem_size);
        let placed = home.is_some_and(|node| !overlaps(base, end, node.free_base, node.free_end));
        if !base.is_multiple_of(align) || base < kernel_end || !placed {
            return Err(BootInfoError::Misplaced(area));
        }
        // `areas` yields at most MAX_AREAS areas (its slices are bounded by the maxima).
        placed_areas[index] = (base, end, index, area);
        count = index + 1;
    }
    let sorted = &mut placed_areas[..count];
    insertion_sort(sorted, |&(base, ..)| base);
    // Sorted by base, an area that overlaps any other overlaps the one before it (ends past
    // its neighbour's base), or the neighbour is empty: the ends are compared with the
    // furthest end so far.
    let mut furthest: Option<(u64, usize, Area)> = None;
    for &(base, end, index, area) in sorted.iter() {
        if base == end {
            continue;
        }
        if let Some((furthest_end, other_index, other)) = furthest {
            if base < furthest_end {
                return Err(if other_index < index {
                    BootInfoError::Overlap(other, area)
                } else {
                    BootInfoError::Overlap(area, other)
                });
            }
        }
        if furthest.is_none_or(|(furthest_end, ..)| end > furthest_end) {
            furthest = Some((end, index, area));
        }
    }
    Ok(())
}

/// Most areas [`areas`] yields.
const MAX_AREAS: usize = 2 * MAX_CPUS + MAX_PROGRAMS * MAX_SEGMENTS;

/// Room for `validate` to sort in: too big for a kernel stack, and static so that nothing
/// zeroes it at run time (`rep stos` at emulated CPL0).
struct Scratch {
    ids: [(u32, u32); MAX_CPUS],
    areas: [(u64, u64, usize, Area); MAX_AREAS],
}

static SCRATCH: SpinLock<Scratch> =
    SpinLock::new(Scratch { ids: [(0, 0); MAX_CPUS], areas: [(0, 0, 0, Area::PerCpu { cpu: 0 }); MAX_AREAS] });

/// Sorts `items` by `key`, stably: linear on input that is already nearly in order, as the
/// VMM's is, and without the recursion and copies of the library's sorts.
fn insertion_sort<T: Copy>(items: &mut [T], key: impl Fn(&T) -> u64) {
    for i in 1..items.len() {
        let item = items[i];
        let mut j = i;
        while j > 0 && key(&items[j - 1]) > key(&item) {
            items[j] = items[j - 1];
            j -= 1;
        }
        items[j] = item;
    }
}

/// Whether `[a, a_end)` and `[b, b_end)` share a byte (empty ranges share none).
fn overlaps(a: u64, a_end: u64, b: u64, b_end: u64) -> bool {
    a < a_end && b < b_end && a < b_end && b < a_end
}

/// Every area the VMM placed, as (what, base, size, alignment): the per-CPU areas, the trace
/// rings of CPUs that have one, then the program segments (whose sizes the caller checked
/// not to overflow).
fn areas(info: &BootInfo) -> impl Iterator<Item = (Area, u64, u64, u64)> + '_ {
    let cpus = &info.cpus[..(info.cpu_count as usize).min(MAX_CPUS)];
    let programs = &info.programs[..(info.program_count as usize).min(MAX_PROGRAMS)];
    let per_cpu = cpus
        .iter()
        .enumerate()
        .map(|(cpu, entry)| (Area::PerCpu { cpu }, entry.percpu_paddr, PERCPU_AREA_SIZE, PERCPU_AREA_SIZE));
    let traces = cpus
        .iter()
        .enumerate()
        .filter(|(_, entry)| entry.trace_paddr != 0)
        .map(|(cpu, entry)| (Area::Trace { cpu }, entry.trace_paddr, TRACE_AREA_SIZE, PAGE_SIZE));
    let segments = programs.iter().enumerate().flat_map(|(program, entry)| {
        let count = (entry.segment_count as usize).min(MAX_SEGMENTS);
        entry.segments[..count].iter().enumerate().map(move |(segment, it)| {
            (Area::Segment { program, segment }, it.paddr, it.pages.wrapping_mul(PAGE_SIZE), PAGE_SIZE)
        })
    });
    per_cpu.chain(traces).chain(segments)
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
    use psyche_abi::boot::Segment;
    use zerocopy::FromZeros;

    /// Where the test's kernel image ends.
    const KERNEL_END: u64 = 0x20_0000;

    fn two_node_info() -> Box<BootInfo> {
        let mut info = Box::new(BootInfo::new_zeroed());
        info.magic = BOOT_INFO_MAGIC;
        info.version = ABI_VERSION;
        info.cpu_count = 3;
        info.node_count = 2;
        // The per-CPU areas sit between the kernel and node 0's free range.
        for (cpu, node) in [(0, 0), (1, 1), (2, 1)] {
            info.cpus[cpu].apic_id = cpu as u32 * 2;
            info.cpus[cpu].node = node;
            info.cpus[cpu].percpu_paddr = KERNEL_END + cpu as u64 * PERCPU_AREA_SIZE;
        }
        // One program: a two-page segment and its argument page, after the per-CPU areas.
        info.program_count = 1;
        let program = &mut info.programs[0];
        program.slot_base = program_slot(0);
        program.segment_count = 2;
        program.segments[0] = Segment { vaddr: program_slot(0), paddr: 0x38_0000, pages: 2, flags: 0, reserved: 0 };
        program.segments[1] =
            Segment { vaddr: program_slot(0) + 2 * PAGE_SIZE, paddr: 0x38_2000, pages: 1, flags: 0, reserved: 0 };
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
        assert_eq!(validate(&two_node_info(), KERNEL_END), Ok(()));
        // Tracing adds a ring per CPU, placed like the per-CPU areas.
        let mut info = two_node_info();
        for cpu in 0..3 {
            info.cpus[cpu].trace_paddr = 0x30_0000 + cpu as u64 * TRACE_AREA_SIZE.next_multiple_of(PAGE_SIZE);
        }
        assert_eq!(validate(&info, KERNEL_END), Ok(()));
    }

    /// What the property tests (`tests/boot_info_props.rs`) found accepted before these checks
    /// existed: each would let the kernel hand a frame out twice, map kernel memory into a
    /// program, or overflow its timer arithmetic.
    #[test]
    fn rejects_boot_infos_whose_areas_or_ids_clash() {
        let check = |change: &dyn Fn(&mut BootInfo), expected: BootInfoError| {
            let mut info = two_node_info();
            change(&mut info);
            assert_eq!(validate(&info, KERNEL_END), Err(expected));
        };
        check(&|info| info.cpus[2].apic_id = 0, BootInfoError::ApicId { cpu: 2 });
        check(&|info| info.tsc_khz = MAX_TSC_KHZ + 1, BootInfoError::TscKhz);
        // Node 1's memory inside node 0's: a frame in both pools.
        let grow_down = |info: &mut BootInfo| {
            info.nodes[1].mem_base = 0xF0_0000;
            info.nodes[1].mem_size = 0x110_0000;
        };
        check(&grow_down, BootInfoError::NodeOverlap { node: 1 });
        // A free range over the kernel image.
        check(&|info| info.nodes[0].free_base = 0x10_0000, BootInfoError::FreeRange { node: 0 });
        let cpu1 = Area::PerCpu { cpu: 1 };
        check(&|info| info.cpus[1].percpu_paddr += PAGE_SIZE, BootInfoError::Misplaced(cpu1));
        check(&|info| info.cpus[1].percpu_paddr = 0x40_0000, BootInfoError::Misplaced(cpu1));
        check(&|info| info.cpus[1].percpu_paddr = 0x300_0000, BootInfoError::Misplaced(cpu1));
        check(&|info| info.cpus[1].percpu_paddr = 0, BootInfoError::Misplaced(cpu1));
        check(&|info| info.cpus[1].percpu_paddr = KERNEL_END, BootInfoError::Overlap(Area::PerCpu { cpu: 0 }, cpu1));
        check(&|info| info.cpus[0].trace_paddr = 0x4_0000, BootInfoError::Misplaced(Area::Trace { cpu: 0 }));
        check(&|info| info.programs[0].slot_base = program_slot(1), BootInfoError::ProgramSlot { program: 0 });
        check(&|info| info.programs[0].segment_count = 0, BootInfoError::ProgramSlot { program: 0 });
        check(
            &|info| info.programs[0].segment_count = MAX_SEGMENTS as u32 + 1,
            BootInfoError::ProgramSlot { program: 0 },
        );
        let segment = |segment| Area::Segment { program: 0, segment };
        check(
            &|info| info.programs[0].segments[0].pages = u64::MAX,
            BootInfoError::SegmentVirtual { program: 0, segment: 0 },
        );
        check(&|info| info.programs[0].segments[1].vaddr = 0, BootInfoError::SegmentVirtual { program: 0, segment: 1 });
        // A program mapping the page tables, a per-CPU area (kernel stacks) or free memory.
        check(&|info| info.programs[0].segments[0].paddr = 0x1_0000, BootInfoError::Misplaced(segment(0)));
        check(
            &|info| info.programs[0].segments[1].paddr = KERNEL_END,
            BootInfoError::Overlap(Area::PerCpu { cpu: 0 }, segment(1)),
        );
        check(&|info| info.programs[0].segments[1].paddr = 0x40_0000, BootInfoError::Misplaced(segment(1)));
        check(&|info| info.programs[0].segments[1].paddr = 0x38_1000, BootInfoError::Overlap(segment(0), segment(1)));
    }

    #[test]
    fn rejects_broken_boot_infos() {
        let mut info = two_node_info();
        info.magic = 0;
        assert_eq!(validate(&info, KERNEL_END), Err(BootInfoError::BadMagic));

        let mut info = two_node_info();
        info.cpus[2].node = 2;
        assert_eq!(validate(&info, KERNEL_END), Err(BootInfoError::CpuNode { cpu: 2, node: 2 }));

        let mut info = two_node_info();
        info.nodes[1].free_end = 0x300_0000;
        assert_eq!(validate(&info, KERNEL_END), Err(BootInfoError::FreeRange { node: 1 }));

        let mut info = two_node_info();
        info.nodes[1].mem_base = u64::MAX;
        assert_eq!(validate(&info, KERNEL_END), Err(BootInfoError::FreeRange { node: 1 }));

        let mut info = two_node_info();
        info.cpu_count = MAX_CPUS as u32 + 1;
        assert_eq!(validate(&info, KERNEL_END), Err(BootInfoError::CpuCount { count: MAX_CPUS as u32 + 1 }));

        let mut info = two_node_info();
        info.distances[1][1] = 0;
        assert_eq!(validate(&info, KERNEL_END), Err(BootInfoError::Diagonal { node: 1 }));
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

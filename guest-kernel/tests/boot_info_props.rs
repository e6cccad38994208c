//! Property tests of the kernel's boot-info validation (`machine::validate`): whatever the boot
//! info holds (random bytes, or a boot info laid out as psyche-vmm lays one out and then
//! mutated field by field), validation accepts it exactly when it satisfies every invariant the
//! kernel relies on afterwards. The invariants are written out again here, plainly and
//! independently of `validate`, as the specification it is checked against.

use proptest::prelude::*;
use psyche_abi::boot::{BootInfo, Segment, BOOT_INFO_MAGIC, MAX_SEGMENTS};
use psyche_abi::layout::{program_slot, KERNEL_PADDR, PAGE_SIZE, PERCPU_AREA_SIZE, PROGRAM_SLOT_SIZE, USER_STACK_SIZE};
use psyche_abi::trace::TRACE_AREA_SIZE;
use psyche_abi::{ABI_VERSION, MAX_CPUS, MAX_NODES, MAX_PROGRAMS};
use psyche_kernel::machine::{validate, MAX_TSC_KHZ};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

/// Cases per property: validation is cheap, so many.
const CASES: u32 = 512;

/// Where the test's kernel image ends (the VMM loads the kernel at `KERNEL_PADDR`).
const KERNEL_END: u64 = KERNEL_PADDR + (1 << 20);

/// A guest-physical range `[start, end)`, in u128 so that no sum overflows.
#[derive(Clone, Copy, Debug)]
struct Range {
    start: u128,
    end: u128,
}

impl Range {
    fn new(start: u64, len: u128) -> Self {
        Self { start: u128::from(start), end: u128::from(start) + len }
    }

    /// Empty ranges overlap nothing.
    fn overlaps(&self, other: &Range) -> bool {
        self.start < self.end && other.start < other.end && self.start < other.end && other.start < self.end
    }

    fn within(&self, outer: &Range) -> bool {
        outer.start <= self.start && self.end <= outer.end
    }
}

/// Every invariant the kernel relies on once the boot info is validated, or the first one
/// that does not hold.
fn invariants(info: &BootInfo, kernel_end: u64) -> Result<(), String> {
    if info.magic != BOOT_INFO_MAGIC || info.version != ABI_VERSION {
        return Err("magic or version".into());
    }
    let (cpus, nodes, programs) = (info.cpu_count as usize, info.node_count as usize, info.program_count as usize);
    if !(1..=MAX_CPUS).contains(&cpus) || !(1..=MAX_NODES).contains(&nodes) || programs > MAX_PROGRAMS {
        return Err("counts".into());
    }
    if info.tsc_khz > MAX_TSC_KHZ {
        return Err("tsc_khz".into());
    }
    // Low memory (GDT, page tables, boot info) and the kernel image.
    let reserved = Range::new(0, u128::from(kernel_end));
    let mut memory = Vec::new();
    let mut free = Vec::new();
    for node in 0..nodes {
        let entry = &info.nodes[node];
        let ram = Range::new(entry.mem_base, u128::from(entry.mem_size));
        if ram.end > 1 << 64 {
            return Err(format!("node {node}: memory past the end of the address space"));
        }
        if !entry.free_base.is_multiple_of(PAGE_SIZE)
            || !entry.free_end.is_multiple_of(PAGE_SIZE)
            || entry.free_base > entry.free_end
        {
            return Err(format!("node {node}: free range"));
        }
        let range = Range { start: u128::from(entry.free_base), end: u128::from(entry.free_end) };
        if !range.within(&ram) {
            return Err(format!("node {node}: free range outside its memory"));
        }
        if range.overlaps(&reserved) {
            return Err(format!("node {node}: free range over the kernel"));
        }
        if info.distances[node][node] != 10 {
            return Err(format!("node {node}: diagonal"));
        }
        if entry.mem_size > 0 {
            memory.push(ram);
        }
        free.push(range);
    }
    for (a, first) in memory.iter().enumerate() {
        if memory[a + 1..].iter().any(|second| first.overlaps(second)) {
            return Err("node memories overlap".into());
        }
    }
    // Every range the VMM placed (per-CPU areas, trace areas, program segments) is RAM of
    // some node, outside every free range and the kernel, and overlaps no other.
    let mut placed: Vec<(String, Range)> = Vec::new();
    for cpu in 0..cpus {
        let entry = &info.cpus[cpu];
        if entry.node as usize >= nodes {
            return Err(format!("cpu {cpu}: node"));
        }
        if info.cpus[..cpu].iter().any(|other| other.apic_id == entry.apic_id) {
            return Err(format!("cpu {cpu}: APIC ID used twice"));
        }
        if !entry.percpu_paddr.is_multiple_of(PERCPU_AREA_SIZE) {
            return Err(format!("cpu {cpu}: per-CPU area alignment"));
        }
        placed.push((format!("cpu {cpu} area"), Range::new(entry.percpu_paddr, u128::from(PERCPU_AREA_SIZE))));
        if entry.trace_paddr != 0 {
            if !entry.trace_paddr.is_multiple_of(PAGE_SIZE) {
                return Err(format!("cpu {cpu}: trace area alignment"));
            }
            placed.push((format!("cpu {cpu} trace"), Range::new(entry.trace_paddr, u128::from(TRACE_AREA_SIZE))));
        }
    }
    for index in 0..programs {
        let program = &info.programs[index];
        if program.slot_base != program_slot(index) {
            return Err(format!("program {index}: slot"));
        }
        let count = program.segment_count as usize;
        if !(1..=MAX_SEGMENTS).contains(&count) {
            return Err(format!("program {index}: segment count"));
        }
        let image = Range::new(program.slot_base, u128::from(PROGRAM_SLOT_SIZE - USER_STACK_SIZE));
        for (n, segment) in program.segments[..count].iter().enumerate() {
            let bytes = u128::from(segment.pages) * u128::from(PAGE_SIZE);
            if segment.pages == 0 || segment.vaddr % PAGE_SIZE != 0 || segment.paddr % PAGE_SIZE != 0 {
                return Err(format!("program {index} segment {n}: shape"));
            }
            if !Range::new(segment.vaddr, bytes).within(&image) {
                return Err(format!("program {index} segment {n}: outside the slot"));
            }
            placed.push((format!("program {index} segment {n}"), Range::new(segment.paddr, bytes)));
        }
    }
    for (a, (what, range)) in placed.iter().enumerate() {
        if !memory.iter().any(|ram| range.within(ram)) {
            return Err(format!("{what}: not in one node's memory"));
        }
        if range.overlaps(&reserved) || free.iter().any(|free| range.overlaps(free)) {
            return Err(format!("{what}: in a free range or over the kernel"));
        }
        if let Some((other, _)) = placed[a + 1..].iter().find(|(_, other)| range.overlaps(other)) {
            return Err(format!("{what}: overlaps {other}"));
        }
    }
    Ok(())
}

/// The shape of a machine and its programs, from which a boot info is laid out the way
/// psyche-vmm's `boot::lay_out` does it.
#[derive(Clone, Debug)]
struct Machine {
    /// Memory of each node, in 2 MiB units (node 0 always has some).
    node_units: Vec<u64>,
    /// The node of each vCPU.
    cpu_nodes: Vec<u32>,
    /// The page counts of each program's loadable segments.
    programs: Vec<Vec<u64>>,
    traced: bool,
    tsc_khz: u64,
    /// Off-diagonal distances, row by row.
    distances: Vec<u8>,
}

fn machine() -> impl Strategy<Value = Machine> {
    (1usize..=4, 1usize..=8)
        .prop_flat_map(|(nodes, cpus)| {
            (
                (16u64..=64, proptest::collection::vec(0u64..=16, nodes - 1)),
                proptest::collection::vec(0..nodes as u32, cpus),
                proptest::collection::vec(proptest::collection::vec(1u64..=16, 1..MAX_SEGMENTS), 0..=4),
                any::<bool>(),
                0u64..=5_000_000,
                proptest::collection::vec(11u8..=255, nodes * nodes),
            )
        })
        .prop_map(|((node0, rest), cpu_nodes, programs, traced, tsc_khz, distances)| Machine {
            node_units: std::iter::once(node0).chain(rest).collect(),
            cpu_nodes,
            programs,
            traced,
            tsc_khz,
            distances,
        })
}

/// Bump allocation per node, as the VMM's `Placement` does it.
struct Placement {
    next: Vec<(u64, u64)>,
}

impl Placement {
    fn alloc(&mut self, node: usize, bytes: u64, align: u64) -> u64 {
        let (next, end) = &mut self.next[node];
        let start = next.next_multiple_of(align);
        assert!(start + bytes <= *end, "the test machine has room for everything");
        *next = start + bytes;
        start
    }
}

/// The boot info psyche-vmm would write for `machine`.
fn lay_out(machine: &Machine) -> Box<BootInfo> {
    let mut info = Box::new(BootInfo::new_zeroed());
    info.magic = BOOT_INFO_MAGIC;
    info.version = ABI_VERSION;
    info.cpu_count = machine.cpu_nodes.len() as u32;
    info.node_count = machine.node_units.len() as u32;
    info.program_count = machine.programs.len() as u32;
    info.tsc_khz = machine.tsc_khz;
    let mut base = 0;
    let mut next = Vec::new();
    for units in &machine.node_units {
        let size = units * (2 << 20);
        next.push((base, base + size));
        base += size;
    }
    let mut placement = Placement { next: next.clone() };
    placement.next[0].0 = KERNEL_END;
    for (index, pages) in machine.programs.iter().enumerate() {
        let total: u64 = pages.iter().sum::<u64>() + 1;
        let block = placement.alloc(0, total * PAGE_SIZE, PAGE_SIZE);
        let program = &mut info.programs[index];
        program.slot_base = program_slot(index);
        program.entry = program.slot_base;
        let mut first = 0;
        for (n, &count) in pages.iter().chain([&1]).enumerate() {
            program.segments[n] = Segment {
                vaddr: program.slot_base + first * PAGE_SIZE,
                paddr: block + first * PAGE_SIZE,
                pages: count,
                flags: 0,
                reserved: 0,
            };
            first += count;
        }
        program.segment_count = pages.len() as u32 + 1;
        program.args_vaddr = program.slot_base + (total - 1) * PAGE_SIZE;
    }
    for (cpu, &node) in machine.cpu_nodes.iter().enumerate() {
        // A CPU of a memory-less node keeps its areas on a node with memory (node 0 here).
        let home = if machine.node_units[node as usize] > 0 { node as usize } else { 0 };
        let entry = &mut info.cpus[cpu];
        entry.apic_id = cpu as u32;
        entry.node = node;
        entry.percpu_paddr = placement.alloc(home, PERCPU_AREA_SIZE, PERCPU_AREA_SIZE);
        if machine.traced {
            entry.trace_paddr = placement.alloc(home, TRACE_AREA_SIZE, PAGE_SIZE);
        }
    }
    let count = machine.node_units.len();
    for (node, (&(mem_base, end), &(free, _))) in next.iter().zip(&placement.next).enumerate() {
        let entry = &mut info.nodes[node];
        entry.mem_base = mem_base;
        entry.mem_size = end - mem_base;
        entry.free_base = free.next_multiple_of(PAGE_SIZE);
        entry.free_end = end;
        for other in 0..count {
            info.distances[node][other] = if node == other { 10 } else { machine.distances[node * count + other] };
        }
    }
    info
}

/// Byte offsets (and widths) of the fields the laid-out machine uses: where mutations land.
fn live_fields(info: &BootInfo) -> Vec<(usize, usize)> {
    let base = info as *const BootInfo as usize;
    let at = |field: *const u8| field as usize - base;
    let mut fields = vec![
        (at(std::ptr::addr_of!(info.cpu_count).cast()), 4),
        (at(std::ptr::addr_of!(info.node_count).cast()), 4),
        (at(std::ptr::addr_of!(info.program_count).cast()), 4),
        (at(std::ptr::addr_of!(info.tsc_khz).cast()), 8),
    ];
    for cpu in &info.cpus[..info.cpu_count as usize] {
        fields.push((at(std::ptr::addr_of!(cpu.apic_id).cast()), 4));
        fields.push((at(std::ptr::addr_of!(cpu.node).cast()), 4));
        fields.push((at(std::ptr::addr_of!(cpu.percpu_paddr).cast()), 8));
        fields.push((at(std::ptr::addr_of!(cpu.trace_paddr).cast()), 8));
    }
    for node in &info.nodes[..info.node_count as usize] {
        for field in [&node.mem_base, &node.mem_size, &node.free_base, &node.free_end] {
            fields.push((at((field as *const u64).cast()), 8));
        }
    }
    for row in &info.distances[..info.node_count as usize] {
        for cell in &row[..info.node_count as usize] {
            fields.push((at(cell), 1));
        }
    }
    for program in &info.programs[..info.program_count as usize] {
        fields.push((at(std::ptr::addr_of!(program.slot_base).cast()), 8));
        fields.push((at(std::ptr::addr_of!(program.segment_count).cast()), 4));
        for segment in &program.segments[..program.segment_count as usize] {
            for field in [&segment.vaddr, &segment.paddr, &segment.pages] {
                fields.push((at((field as *const u64).cast()), 8));
            }
        }
    }
    fields
}

/// One change to a field of a boot info.
#[derive(Clone, Debug)]
enum Mutation {
    /// Field `pick` (an index into the live fields, modulo their number) becomes `value`.
    Set { pick: usize, value: u64 },
    /// Field `pick` moves by `delta` (a page, a byte, an area...).
    Add { pick: usize, delta: i64 },
    /// Field `pick` gets bit `bit` flipped.
    Flip { pick: usize, bit: u32 },
    /// Field `pick` takes the value of field `from`: duplicated APIC IDs, overlapping ranges.
    Copy { pick: usize, from: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let special =
        prop_oneof![Just(0u64), Just(1), Just(u64::MAX), Just(PAGE_SIZE), Just(MAX_TSC_KHZ + 1), any::<u64>()];
    let delta = prop_oneof![
        Just(1i64),
        Just(-1),
        Just(PAGE_SIZE as i64),
        Just(-(PAGE_SIZE as i64)),
        Just(PERCPU_AREA_SIZE as i64),
        Just(-(2 << 20))
    ];
    prop_oneof![
        (any::<usize>(), special).prop_map(|(pick, value)| Mutation::Set { pick, value }),
        (any::<usize>(), delta).prop_map(|(pick, delta)| Mutation::Add { pick, delta }),
        (any::<usize>(), 0u32..64).prop_map(|(pick, bit)| Mutation::Flip { pick, bit }),
        (any::<usize>(), any::<usize>()).prop_map(|(pick, from)| Mutation::Copy { pick, from }),
    ]
}

fn read(bytes: &[u8], (offset, width): (usize, usize)) -> u64 {
    let mut word = [0u8; 8];
    word[..width].copy_from_slice(&bytes[offset..offset + width]);
    u64::from_le_bytes(word)
}

fn write(bytes: &mut [u8], (offset, width): (usize, usize), value: u64) {
    bytes[offset..offset + width].copy_from_slice(&value.to_le_bytes()[..width]);
}

fn apply(info: &mut BootInfo, fields: &[(usize, usize)], mutation: &Mutation) {
    let bytes = info.as_mut_bytes();
    let field = |pick: usize| fields[pick % fields.len()];
    match *mutation {
        Mutation::Set { pick, value } => write(bytes, field(pick), value),
        Mutation::Add { pick, delta } => {
            let value = read(bytes, field(pick)).wrapping_add_signed(delta);
            write(bytes, field(pick), value);
        }
        Mutation::Flip { pick, bit } => {
            let (offset, width) = field(pick);
            let value = read(bytes, (offset, width)) ^ (1 << (bit % (width as u32 * 8)));
            write(bytes, (offset, width), value);
        }
        Mutation::Copy { pick, from } => {
            let value = read(bytes, field(from));
            write(bytes, field(pick), value);
        }
    }
}

/// Validation and the invariants agree on `info`.
fn agrees(info: &BootInfo) -> Result<(), TestCaseError> {
    let verdict = validate(info, KERNEL_END);
    let truth = invariants(info, KERNEL_END);
    prop_assert_eq!(verdict.is_ok(), truth.is_ok(), "validate says {:?}, the invariants say {:?}", verdict, truth);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// The boot info the VMM writes is accepted, and satisfies the invariants.
    #[test]
    fn a_boot_info_laid_out_like_the_vmms_is_accepted(machine in machine()) {
        let info = lay_out(&machine);
        prop_assert_eq!(invariants(&info, KERNEL_END), Ok(()));
        prop_assert_eq!(validate(&info, KERNEL_END), Ok(()));
    }

    /// A boot info with some of its fields changed is accepted only if the invariants still
    /// hold (and is not refused if they do).
    #[test]
    fn a_mutated_boot_info_is_refused_or_satisfies_every_invariant(
        machine in machine(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut info = lay_out(&machine);
        let fields = live_fields(&info);
        for mutation in &mutations {
            apply(&mut info, &fields, mutation);
        }
        agrees(&info)?;
    }

    /// Random bytes, given the right magic and version and often small counts (so that the
    /// checks past the header are reached), are refused or satisfy every invariant.
    #[test]
    fn random_bytes_are_refused_or_satisfy_every_invariant(
        bytes in proptest::collection::vec(any::<u8>(), std::mem::size_of::<BootInfo>()),
        header in any::<bool>(),
        counts in (0u32..4, 0u32..4, 0u32..3),
    ) {
        let mut info = BootInfo::read_from_bytes(&bytes).expect("the size of a boot info");
        if header {
            info.magic = BOOT_INFO_MAGIC;
            info.version = ABI_VERSION;
            (info.cpu_count, info.node_count, info.program_count) = counts;
        }
        agrees(&info)?;
    }
}

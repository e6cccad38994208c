//! Property tests of the program loader and relocator: the built-in program images, mutated
//! (bytes flipped, the file truncated, header, program-header, dynamic-section and relocation
//! fields changed), either load or are refused with an error, never panic, and never write
//! guest memory outside the block the loader was given for the program; what loads is a
//! program whose every segment lies in its slot and in that block. The images as built load,
//! with exactly the bytes of their segments and their relocations applied. The kernel loader
//! gets the same mutations of the built-in kernel.

use proptest::prelude::*;
use psyche_abi::boot::{ProgramInfo, MAX_SEGMENTS, SEGMENT_EXEC};
use psyche_abi::layout::{program_slot, PAGE_SIZE, PROGRAM_SLOT_SIZE, USER_STACK_SIZE};
use psyche_abi::MAX_PROGRAMS;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::program::{self, ProgramError};
use crate::images::PROGRAMS;

/// Cases per property: each loads a program into a fresh guest memory and reads all of it
/// back (about 5 ms in a debug build).
const CASES: u32 = 256;
/// Cases of mutated images: enough that each key field gets its extreme values several times.
const MUTATED_CASES: u32 = 1024;

/// The guest memory of a test load, and where in it the loader's block may start.
const MEMORY: u64 = 8 << 20;
const BLOCK: u64 = 2 << 20;

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn read_u16(bytes: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// The fields of an ELF image (offset, width), by kind: where mutations land.
#[derive(Debug, Default)]
struct Fields {
    header: Vec<(usize, usize)>,
    program_headers: Vec<(usize, usize)>,
    dynamic: Vec<(usize, usize)>,
    relocations: Vec<(usize, usize)>,
    /// The fields the loader's checks are about: the program-header table's place and size,
    /// the entry point, the loadable and dynamic segments' offsets and sizes, the relocation
    /// table's address, size and entry size, and the first relocation.
    key: Vec<(usize, usize)>,
}

/// The loadable segments of a well-formed image: (vaddr, file offset, file size, mem size).
fn loads(image: &[u8]) -> Vec<(u64, u64, u64, u64)> {
    let (phoff, phnum) = (read_u64(image, 0x20) as usize, read_u16(image, 0x38) as usize);
    (0..phnum)
        .map(|i| phoff + i * 56)
        .filter(|&at| u32::from_le_bytes(image[at..at + 4].try_into().unwrap()) == 1)
        .map(|at| {
            (read_u64(image, at + 16), read_u64(image, at + 8), read_u64(image, at + 32), read_u64(image, at + 40))
        })
        .collect()
}

/// The image's relocation table: (file offset, entries), found through its dynamic section.
fn relocation_table(image: &[u8]) -> Option<(usize, usize)> {
    let (phoff, phnum) = (read_u64(image, 0x20) as usize, read_u16(image, 0x38) as usize);
    let dynamic = (0..phnum)
        .map(|i| phoff + i * 56)
        .find(|&at| u32::from_le_bytes(image[at..at + 4].try_into().unwrap()) == 2)?;
    let (offset, size) = (read_u64(image, dynamic + 8) as usize, read_u64(image, dynamic + 32) as usize);
    let (mut rela, mut rela_size) = (None, 0);
    for entry in (offset..offset + size).step_by(16) {
        match read_u64(image, entry) {
            7 => rela = Some(read_u64(image, entry + 8)),
            8 => rela_size = read_u64(image, entry + 8) as usize,
            _ => {}
        }
    }
    let rela = rela?;
    let (vaddr, file_offset, ..) =
        loads(image).into_iter().find(|&(vaddr, _, file_size, _)| (vaddr..vaddr + file_size).contains(&rela))?;
    Some(((file_offset + rela - vaddr) as usize, rela_size / 24))
}

fn fields(image: &[u8]) -> Fields {
    let mut fields = Fields {
        // e_type, e_machine, e_entry, e_phoff, e_phentsize, e_phnum.
        header: vec![(0x10, 2), (0x12, 2), (0x18, 8), (0x20, 8), (0x36, 2), (0x38, 2)],
        key: vec![(0x18, 8), (0x20, 8), (0x38, 2)],
        ..Fields::default()
    };
    let (phoff, phnum) = (read_u64(image, 0x20) as usize, read_u16(image, 0x38) as usize);
    for i in 0..phnum {
        let at = phoff + i * 56;
        // p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz.
        fields.program_headers.extend([(at, 4), (at + 4, 4), (at + 8, 8), (at + 16, 8), (at + 32, 8), (at + 40, 8)]);
        let kind = u32::from_le_bytes(image[at..at + 4].try_into().unwrap());
        if kind == 1 || kind == 2 {
            fields.key.extend([(at + 8, 8), (at + 16, 8), (at + 32, 8), (at + 40, 8)]);
        }
        if kind == 2 {
            let (offset, size) = (read_u64(image, at + 8) as usize, read_u64(image, at + 32) as usize);
            for entry in (offset..offset + size).step_by(16) {
                fields.dynamic.extend([(entry, 8), (entry + 8, 8)]);
                // DT_RELA, DT_RELASZ, DT_RELAENT.
                if (7..=9).contains(&read_u64(image, entry)) {
                    fields.key.push((entry + 8, 8));
                }
            }
        }
    }
    if let Some((table, count)) = relocation_table(image) {
        for entry in (0..count).map(|n| table + n * 24) {
            fields.relocations.extend([(entry, 8), (entry + 8, 8), (entry + 16, 8)]);
        }
        fields.key.extend([(table, 8), (table + 8, 8), (table + 16, 8)]);
    }
    fields
}

/// One change to an image.
#[derive(Clone, Debug)]
enum Mutation {
    /// A field of kind `kind` (header, program header, dynamic entry, relocation, or, for 4, a
    /// key field), picked by `pick`, becomes `value`.
    Field { kind: u8, pick: usize, value: Value },
    /// Bit `bit` of byte `at` (modulo the length) flips.
    Flip { at: usize, bit: u8 },
    /// The image is cut to `keep` thousandths of its length.
    Truncate { keep: u16 },
}

/// A new value for a field.
#[derive(Clone, Debug)]
enum Value {
    Fixed(u64),
    Add(i64),
    /// The value of another field of the same kind.
    CopyOf(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let room = PROGRAM_SLOT_SIZE - USER_STACK_SIZE - 2 * PAGE_SIZE;
    let fixed = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 7),
        Just(1 << 63),
        Just(PAGE_SIZE),
        Just(room),
        Just(room + 1),
        Just(PROGRAM_SLOT_SIZE),
        any::<u64>(),
        any::<u16>().prop_map(u64::from),
    ];
    let value = prop_oneof![
        3 => fixed.prop_map(Value::Fixed),
        1 => prop_oneof![Just(1i64), Just(-1), Just(8), Just(-8), Just(24), Just(PAGE_SIZE as i64), Just(-4096)]
            .prop_map(Value::Add),
        1 => any::<usize>().prop_map(Value::CopyOf),
    ];
    prop_oneof![
        4 => (Just(4), any::<usize>(), value.clone()).prop_map(|(kind, pick, value)| Mutation::Field { kind, pick, value }),
        4 => (0u8..4, any::<usize>(), value).prop_map(|(kind, pick, value)| Mutation::Field { kind, pick, value }),
        1 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        1 => (0u16..1000).prop_map(|keep| Mutation::Truncate { keep }),
    ]
}

fn apply(image: &mut Vec<u8>, fields: &Fields, mutation: &Mutation) {
    match mutation {
        Mutation::Field { kind, pick, value } => {
            let list = match kind {
                0 => &fields.header,
                1 => &fields.program_headers,
                2 => &fields.dynamic,
                3 => &fields.relocations,
                _ => &fields.key,
            };
            let list = if list.is_empty() { &fields.header } else { list };
            let (at, width) = list[pick % list.len()];
            let get = |image: &[u8], (at, width): (usize, usize)| {
                let mut word = [0u8; 8];
                word[..width].copy_from_slice(image.get(at..at + width).unwrap_or(&[0; 8][..width]));
                u64::from_le_bytes(word)
            };
            let new = match *value {
                Value::Fixed(fixed) => fixed,
                Value::Add(delta) => get(image, (at, width)).wrapping_add_signed(delta),
                Value::CopyOf(from) => get(image, list[from % list.len()]),
            };
            // An earlier truncation may have cut the field off.
            if let Some(bytes) = image.get_mut(at..at + width) {
                bytes.copy_from_slice(&new.to_le_bytes()[..width]);
            }
        }
        Mutation::Flip { at, bit } => {
            if !image.is_empty() {
                let at = at % image.len();
                image[at] ^= 1 << bit;
            }
        }
        Mutation::Truncate { keep } => image.truncate(image.len() * usize::from(*keep) / 1000),
    }
}

/// What a test load gives: the loader's result, the block it was handed (base, bytes), and the
/// whole guest memory afterwards.
type Loaded = (Result<ProgramInfo, ProgramError>, Option<(u64, u64)>, Vec<u8>);

/// Loads `image` as program `index` into a fresh guest memory whose allocator hands out one
/// block at [`BLOCK`].
fn load(image: &[u8], index: usize, args: &[String]) -> Loaded {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).expect("guest memory");
    let mut block = None;
    let mut alloc = |bytes: u64| {
        assert!(block.is_none(), "the loader asked for a second block");
        let fits = bytes.is_multiple_of(PAGE_SIZE) && bytes <= MEMORY - BLOCK;
        fits.then(|| {
            block = Some((BLOCK, bytes));
            BLOCK
        })
    };
    let result = program::load(&mem, image, index, args, &mut alloc);
    let mut contents = vec![0u8; MEMORY as usize];
    mem.read_slice(&mut contents, GuestAddress(0)).expect("read guest memory back");
    (result, block, contents)
}

/// Guest memory outside `block` is as it was (all zero).
fn untouched_outside(contents: &[u8], block: Option<(u64, u64)>) -> Result<(), TestCaseError> {
    static ZERO: [u8; 1 << 16] = [0; 1 << 16];
    let (start, end) = block.map_or((0, 0), |(base, bytes)| (base as usize, (base + bytes) as usize));
    for (n, chunk) in contents.chunks(ZERO.len()).enumerate() {
        let at = n * ZERO.len();
        // Compare whole chunks (memcmp); look closer only at chunks that differ.
        if chunk == &ZERO[..chunk.len()] {
            continue;
        }
        let outside = chunk.iter().enumerate().find(|&(i, &byte)| byte != 0 && !(start..end).contains(&(at + i)));
        if let Some((i, byte)) = outside {
            return Err(TestCaseError::fail(format!(
                "guest memory at {:#x} became {byte:#x}, outside the program's block {start:#x}..{end:#x}",
                at + i
            )));
        }
    }
    Ok(())
}

/// A loaded program lies in its slot and its block: every segment page aligned, virtual
/// addresses in the slot below the stack, physical ones in the block at the same offset.
fn well_placed(info: &ProgramInfo, index: usize, block: Option<(u64, u64)>) -> Result<(), TestCaseError> {
    let slot = program_slot(index);
    prop_assert_eq!(info.slot_base, slot);
    let Some((base, bytes)) = block else { return Err(TestCaseError::fail("loaded without a block")) };
    let count = info.segment_count as usize;
    prop_assert!((2..=MAX_SEGMENTS).contains(&count), "{} segments", count);
    let mut entry_ok = false;
    for segment in &info.segments[..count] {
        let size = segment.pages * PAGE_SIZE;
        prop_assert!(segment.pages > 0 && segment.vaddr.is_multiple_of(PAGE_SIZE));
        prop_assert!(segment.vaddr >= slot && segment.vaddr + size <= slot + PROGRAM_SLOT_SIZE - USER_STACK_SIZE);
        prop_assert!(segment.paddr >= base && segment.paddr + size <= base + bytes, "{:?}", segment);
        prop_assert_eq!(segment.paddr - base, segment.vaddr - slot);
        entry_ok |= segment.flags & SEGMENT_EXEC != 0 && (segment.vaddr..segment.vaddr + size).contains(&info.entry);
    }
    prop_assert!(entry_ok, "entry {:#x} outside the executable segments", info.entry);
    let args = &info.segments[count - 1];
    prop_assert!(info.args_vaddr == args.vaddr && info.args_len <= PAGE_SIZE);
    Ok(())
}

fn arguments() -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        4 => proptest::collection::vec("[a-z0-9=]{0,12}", 0..4),
        1 => (4000usize..4200).prop_map(|len| vec!["x".repeat(len)]),
    ]
}

/// Each built-in program loads, each loadable segment holds exactly its file bytes except
/// where a relocation wrote the slot's address plus its addend, and nothing is written
/// outside the block.
#[test]
fn the_built_in_programs_load_with_their_relocations_applied() {
    for &(name, image) in PROGRAMS {
        let index = 3;
        let (result, block, contents) = load(image, index, &["a".to_owned(), "bc".to_owned()]);
        let info = result.unwrap_or_else(|error| panic!("{name}: {error}"));
        let check = untouched_outside(&contents, block).and_then(|()| well_placed(&info, index, block));
        check.unwrap_or_else(|error| panic!("{name}: {error}"));
        let (base, _) = block.expect("a block");
        let mut expected = vec![0u8; MEMORY as usize];
        for (vaddr, offset, file_size, mem_size) in loads(image) {
            let at = (base + vaddr) as usize;
            expected[at..at + file_size as usize]
                .copy_from_slice(&image[offset as usize..(offset + file_size) as usize]);
            expected[at + file_size as usize..at + mem_size as usize].fill(0);
        }
        let (table, count) = relocation_table(image).unwrap_or((0, 0));
        assert!(count > 0, "{name} has relocations");
        for entry in (0..count).map(|n| table + n * 24) {
            let (offset, addend) = (read_u64(image, entry), read_u64(image, entry + 16));
            let at = (base + offset) as usize;
            expected[at..at + 8].copy_from_slice(&program_slot(index).wrapping_add(addend).to_le_bytes());
        }
        let args_at = (base + info.args_vaddr - info.slot_base) as usize;
        expected[args_at..args_at + 5].copy_from_slice(b"a\0bc\0");
        assert!(contents == expected, "{name}: the loaded image differs from its file and relocations");
    }
}

/// Found by the property test below: a relocation table size (DT_RELASZ) so large that the
/// table's end overflows made the loader panic instead of refusing the image.
#[test]
fn a_relocation_table_size_that_overflows_is_refused() {
    let image = crate::images::program("hello").expect("the hello program");
    let fields = fields(image);
    let (table, count) = relocation_table(image).expect("a relocation table");
    let size = fields.dynamic.iter().find(|&&(at, _)| at >= 8 && read_u64(image, at) == (count * 24) as u64);
    let &(at, _) = size.filter(|&&(at, _)| read_u64(image, at - 8) == 8).expect("DT_RELASZ");
    assert!(table > 0);
    for huge in [u64::MAX, u64::MAX - 0x1000, 1 << 63] {
        let mut image = image.to_vec();
        image[at..at + 8].copy_from_slice(&huge.to_le_bytes());
        let (result, block, contents) = load(&image, 0, &[]);
        let error = result.map(|_| ()).expect_err("refused").to_string();
        assert_eq!(error, "not an ELF file: the relocation table is not in a loaded segment");
        untouched_outside(&contents, block).expect("nothing written outside the block");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: MUTATED_CASES, ..ProptestConfig::default() })]

    /// A mutated image loads or is refused, never panics and never writes outside its block.
    #[test]
    fn a_mutated_program_loads_in_its_slot_or_is_refused(
        program in 0..PROGRAMS.len(),
        index in 0..MAX_PROGRAMS,
        mutations in proptest::collection::vec(mutation(), 1..4),
        args in arguments(),
    ) {
        let (_, original) = PROGRAMS[program];
        let fields = fields(original);
        let mut image = original.to_vec();
        for mutation in &mutations {
            apply(&mut image, &fields, mutation);
        }
        let (result, block, contents) = load(&image, index, &args);
        untouched_outside(&contents, block)?;
        if let Ok(info) = result {
            well_placed(&info, index, block)?;
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// The kernel loader, given a mutated kernel, loads it or refuses it, never panics, and
    /// writes nothing outside `[KERNEL_PADDR, limit)`.
    #[test]
    fn a_mutated_kernel_loads_below_its_limit_or_is_refused(
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let original = crate::images::KERNEL;
        let fields = fields(original);
        let mut image = original.to_vec();
        for mutation in &mutations {
            apply(&mut image, &fields, mutation);
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).expect("guest memory");
        let limit = MEMORY - (1 << 20);
        if let Ok(kernel) = super::kernel::load(&mem, &image, limit) {
            prop_assert!(kernel.end <= limit, "the kernel ends at {:#x}, past {:#x}", kernel.end, limit);
        }
        let mut contents = vec![0u8; MEMORY as usize];
        mem.read_slice(&mut contents, GuestAddress(0)).expect("read guest memory back");
        untouched_outside(&contents, Some((psyche_abi::layout::KERNEL_PADDR, limit - psyche_abi::layout::KERNEL_PADDR)))?;
    }

    /// Arbitrary bytes, with an ELF header's magic half the time, are refused (or, very
    /// rarely, a program), never a panic or a write outside the block.
    #[test]
    fn arbitrary_bytes_are_refused(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        elf_magic in any::<bool>(),
    ) {
        if elf_magic && bytes.len() >= 20 {
            // ELF, 64-bit, little-endian, version 1; ET_DYN for x86-64.
            bytes[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
            bytes[16..20].copy_from_slice(&[3, 0, 62, 0]);
        }
        let (result, block, contents) = load(&bytes, 0, &[]);
        untouched_outside(&contents, block)?;
        if let Ok(info) = result {
            well_placed(&info, 0, block)?;
        }
    }
}

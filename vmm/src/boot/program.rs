//! Guest programs: static PIEs, loaded and relocated by the VMM into their slot of the uniform
//! address space, so that any number of independently linked programs can share one boot.

use object::elf::{
    FileHeader64, DT_REL, DT_RELA, DT_RELAENT, DT_RELASZ, EM_X86_64, ET_DYN, ET_EXEC, PF_W, PF_X, PT_DYNAMIC,
    PT_INTERP, PT_LOAD, R_X86_64_NONE, R_X86_64_RELATIVE,
};
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use object::LittleEndian;
use psyche_abi::boot::{ProgramInfo, Segment, MAX_SEGMENTS, SEGMENT_EXEC, SEGMENT_WRITE};
use psyche_abi::layout::{program_slot, PAGE_SIZE, PROGRAM_SLOT_SIZE, USER_STACK_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `DT_RELR` (packed relative relocations, newer linkers), which `object` does not name.
const DT_RELR: u32 = 36;

/// Why a program cannot be loaded. The program's name is added by the caller.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("not an ELF file: {0}")]
    NotElf(String),
    #[error("not an x86-64 program")]
    WrongMachine,
    #[error("not a static PIE (it is linked at a fixed address); build it on realm-sdk, which links with -static-pie")]
    NotPie,
    #[error("dynamically linked (it names an interpreter); guest programs must be static PIEs")]
    Dynamic,
    #[error("has no loadable segment")]
    Empty,
    #[error("has more than {} loadable segments", MAX_SEGMENTS - 1)]
    TooManySegments,
    #[error("segments {0} and {1} share a page; link with -z max-page-size=4096")]
    SharedPage(usize, usize),
    #[error("needs {0:#x} bytes, more than its slot leaves room for")]
    TooLarge(u64),
    #[error("segment {0} lies outside the file")]
    Truncated(usize),
    #[error("uses {0} relocations, which this loader does not apply (only RELA with R_X86_64_RELATIVE)")]
    UnsupportedRelocations(&'static str),
    #[error("has a relocation of type {0}; only R_X86_64_RELATIVE is supported in a static PIE")]
    RelocationType(u32),
    #[error("has a relocation at {0:#x}, outside its loaded segments")]
    RelocationTarget(u64),
    #[error("has an entry point ({0:#x}) outside its executable segments")]
    Entry(u64),
    #[error("arguments take {0} bytes; at most {PAGE_SIZE} fit")]
    ArgumentsTooLong(usize),
    #[error("does not fit in node 0's memory")]
    OutOfMemory,
    #[error("cannot be written to guest memory: {0}")]
    GuestMemory(String),
}

/// Writes bytes at an offset of the program's physical block.
type WriteAt<'a> = dyn Fn(&[u8], u64) -> Result<(), ProgramError> + 'a;

struct Loadable {
    vaddr: u64,
    file_offset: u64,
    file_size: u64,
    mem_size: u64,
    flags: u32,
}

/// Loads `image` as program `index`, taking physical memory from `alloc(bytes)` (which must
/// return page-aligned, zeroed, contiguous guest-physical memory). `args` become its argument
/// block.
pub fn load(
    mem: &GuestMemoryMmap,
    image: &[u8],
    index: usize,
    args: &[String],
    alloc: &mut dyn FnMut(u64) -> Option<u64>,
) -> Result<ProgramInfo, ProgramError> {
    let aligned = super::Aligned::new(image);
    let image = aligned.bytes();
    let not_elf = |e: object::read::Error| ProgramError::NotElf(e.to_string());
    let header = FileHeader64::<LittleEndian>::parse(image).map_err(not_elf)?;
    let endian = header.endian().map_err(not_elf)?;
    if header.e_machine(endian) != EM_X86_64 {
        return Err(ProgramError::WrongMachine);
    }
    match header.e_type(endian) {
        ET_DYN => {}
        ET_EXEC => return Err(ProgramError::NotPie),
        _ => return Err(ProgramError::WrongMachine),
    }
    let headers = header.program_headers(endian, image).map_err(not_elf)?;
    if headers.iter().any(|h| h.p_type(endian) == PT_INTERP) {
        return Err(ProgramError::Dynamic);
    }

    let mut loadables = Vec::new();
    for h in headers.iter().filter(|h| h.p_type(endian) == PT_LOAD && h.p_memsz(endian) > 0) {
        let mut flags = 0;
        if h.p_flags(endian) & PF_W != 0 {
            flags |= SEGMENT_WRITE;
        }
        if h.p_flags(endian) & PF_X != 0 {
            flags |= SEGMENT_EXEC;
        }
        loadables.push(Loadable {
            vaddr: h.p_vaddr(endian),
            file_offset: h.p_offset(endian),
            file_size: h.p_filesz(endian),
            mem_size: h.p_memsz(endian),
            flags,
        });
    }
    if loadables.is_empty() {
        return Err(ProgramError::Empty);
    }
    if loadables.len() > MAX_SEGMENTS - 1 {
        return Err(ProgramError::TooManySegments);
    }
    loadables.sort_by_key(|l| l.vaddr);

    // Page span of each segment, checked against the slot and against each other.
    let room = PROGRAM_SLOT_SIZE - USER_STACK_SIZE - 2 * PAGE_SIZE;
    let mut spans = Vec::new();
    for (i, l) in loadables.iter().enumerate() {
        let end = l.vaddr.checked_add(l.mem_size).filter(|&end| end <= room).ok_or(ProgramError::TooLarge(l.vaddr))?;
        if l.file_size > l.mem_size || l.file_offset.checked_add(l.file_size).is_none_or(|e| e > image.len() as u64) {
            return Err(ProgramError::Truncated(i));
        }
        let first = l.vaddr / PAGE_SIZE;
        let last = end.div_ceil(PAGE_SIZE);
        if let Some(&(_, previous_last)) = spans.last() {
            if first < previous_last {
                return Err(ProgramError::SharedPage(i - 1, i));
            }
        }
        spans.push((first, last));
    }
    let image_pages = spans.last().map_or(0, |&(_, last)| last);
    let args_page = image_pages;
    let total = (image_pages + 1) * PAGE_SIZE;
    if total > room {
        return Err(ProgramError::TooLarge(total));
    }

    // One physically contiguous block for the whole image and its argument page: then
    // physical = block + (virtual - slot base) everywhere, which keeps relocation simple.
    let block = alloc(total).ok_or(ProgramError::OutOfMemory)?;
    let slot = program_slot(index);
    let write = |bytes: &[u8], offset: u64| {
        mem.write_slice(bytes, GuestAddress(block + offset)).map_err(|e| ProgramError::GuestMemory(e.to_string()))
    };
    for l in &loadables {
        let start = l.file_offset as usize;
        write(&image[start..start + l.file_size as usize], l.vaddr)?;
    }

    apply_relocations(image, header, endian, &loadables, slot, &write)?;

    let arg_bytes: Vec<u8> = args.iter().flat_map(|a| a.bytes().chain([0])).collect();
    if arg_bytes.len() as u64 > PAGE_SIZE {
        return Err(ProgramError::ArgumentsTooLong(arg_bytes.len()));
    }
    write(&arg_bytes, args_page * PAGE_SIZE)?;

    let entry = header.e_entry(endian);
    if !loadables.iter().any(|l| l.flags & SEGMENT_EXEC != 0 && (l.vaddr..l.vaddr + l.mem_size).contains(&entry)) {
        return Err(ProgramError::Entry(entry));
    }

    let mut segments = [Segment::default(); MAX_SEGMENTS];
    for ((l, &(first, last)), segment) in loadables.iter().zip(&spans).zip(segments.iter_mut()) {
        *segment = Segment {
            vaddr: slot + first * PAGE_SIZE,
            paddr: block + first * PAGE_SIZE,
            pages: last - first,
            flags: l.flags,
            reserved: 0,
        };
    }
    segments[loadables.len()] = Segment {
        vaddr: slot + args_page * PAGE_SIZE,
        paddr: block + args_page * PAGE_SIZE,
        pages: 1,
        flags: 0,
        reserved: 0,
    };
    Ok(ProgramInfo {
        entry: slot + entry,
        slot_base: slot,
        args_vaddr: slot + args_page * PAGE_SIZE,
        args_len: arg_bytes.len() as u64,
        segment_count: loadables.len() as u32 + 1,
        reserved: 0,
        segments,
    })
}

/// Applies the image's R_X86_64_RELATIVE relocations for a load at `slot`.
fn apply_relocations(
    image: &[u8],
    header: &FileHeader64<LittleEndian>,
    endian: LittleEndian,
    loadables: &[Loadable],
    slot: u64,
    write: &WriteAt<'_>,
) -> Result<(), ProgramError> {
    let not_elf = |e: object::read::Error| ProgramError::NotElf(e.to_string());
    let headers = header.program_headers(endian, image).map_err(not_elf)?;
    let Some(dynamic) = headers.iter().find(|h| h.p_type(endian) == PT_DYNAMIC) else { return Ok(()) };
    let entries = dynamic.dynamic(endian, image).map_err(not_elf)?.unwrap_or(&[]);
    let (mut rela, mut rela_size, mut rela_entry) = (None, 0, 24);
    for entry in entries {
        let tag = entry.d_tag(endian) as u32;
        let value = entry.d_val(endian);
        match tag {
            DT_RELA => rela = Some(value),
            DT_RELASZ => rela_size = value,
            DT_RELAENT => rela_entry = value,
            DT_REL => return Err(ProgramError::UnsupportedRelocations("REL")),
            DT_RELR => return Err(ProgramError::UnsupportedRelocations("RELR (packed)")),
            _ => {}
        }
    }
    let Some(rela) = rela else { return Ok(()) };
    if rela_entry != 24 {
        return Err(ProgramError::NotElf(format!("relocation entries of {rela_entry} bytes")));
    }
    // The table is found by virtual address: map it back to the file through its segment.
    // `rela_size` is the file's word: the end is computed without overflow.
    let file_offset = loadables
        .iter()
        .find(|l| {
            let segment_end = l.vaddr + l.file_size;
            (l.vaddr..segment_end).contains(&rela) && rela.checked_add(rela_size).is_some_and(|end| end <= segment_end)
        })
        .map(|l| l.file_offset + (rela - l.vaddr))
        .ok_or(ProgramError::NotElf("the relocation table is not in a loaded segment".into()))?;
    let table = image
        .get(file_offset as usize..(file_offset + rela_size) as usize)
        .ok_or(ProgramError::NotElf("the relocation table lies outside the file".into()))?;
    for raw in table.chunks_exact(24) {
        let word = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let (offset, info, addend) = (word(0), word(1), word(2));
        match info as u32 {
            R_X86_64_NONE => continue,
            R_X86_64_RELATIVE => {}
            other => return Err(ProgramError::RelocationType(other)),
        }
        let target_ok = loadables.iter().any(|l| l.vaddr <= offset && offset.saturating_add(8) <= l.vaddr + l.mem_size);
        if !target_ok {
            return Err(ProgramError::RelocationTarget(offset));
        }
        write(&slot.wrapping_add(addend).to_le_bytes(), offset)?;
    }
    Ok(())
}

//! The guest kernel image: checked to be a Psyche kernel of our ABI, then loaded with
//! linux-loader.

use std::io::Cursor;

use linux_loader::loader::{elf::Elf, KernelLoader};
use object::elf::{FileHeader64, EM_X86_64, ET_EXEC, PT_LOAD, PT_NOTE};
use object::read::elf::{FileHeader, ProgramHeader};
use object::LittleEndian;
use psyche_abi::layout::{KERNEL_PADDR, KERNEL_VIRT_BASE, KERNEL_WINDOW_SIZE};
use psyche_abi::note::{NOTE_NAME, NOTE_NAME_LEN, NOTE_TYPE_ABI};
use psyche_abi::ABI_VERSION;
use vm_memory::GuestMemoryMmap;

/// Why a kernel image cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("not an ELF file: {0}")]
    NotElf(String),
    #[error("an ELF file, but not an x86-64 executable")]
    WrongKind,
    #[error(
        "an ELF file, but not a Psyche kernel (it has no Psyche ABI note; a Psyche kernel is built from guest-kernel/)"
    )]
    NoPsycheNote,
    #[error("a Psyche kernel for ABI version {found}, but this psyche-vmm speaks version {ABI_VERSION}: rebuild one of them")]
    AbiMismatch { found: u32 },
    #[error("segment at physical {paddr:#x} (+{size:#x}) is outside [{KERNEL_PADDR:#x}, {limit:#x}), where this VMM loads kernels")]
    SegmentPlacement { paddr: u64, size: u64, limit: u64 },
    #[error("segment at virtual {vaddr:#x} is not linked at its physical address + {KERNEL_VIRT_BASE:#x}")]
    SegmentLink { vaddr: u64 },
    #[error("the entry point {0:#x} is not in an executable segment")]
    Entry(u64),
    #[error("loading the kernel into guest memory failed: {0}")]
    Load(linux_loader::loader::Error),
}

/// Where the loaded kernel lies.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Virtual entry point.
    pub entry: u64,
    /// First guest-physical byte after the kernel.
    pub end: u64,
}

/// Checks `image` is a Psyche kernel that fits below `limit` (the end of node 0, or of the
/// kernel window if smaller), then loads it.
pub fn load(mem: &GuestMemoryMmap, image: &[u8], limit: u64) -> Result<LoadedKernel, KernelError> {
    let aligned = super::Aligned::new(image);
    let image = aligned.bytes();
    let header = FileHeader64::<LittleEndian>::parse(image).map_err(|e| KernelError::NotElf(e.to_string()))?;
    let endian = header.endian().map_err(|e| KernelError::NotElf(e.to_string()))?;
    if header.e_machine(endian) != EM_X86_64 || header.e_type(endian) != ET_EXEC {
        return Err(KernelError::WrongKind);
    }
    let segments = header.program_headers(endian, image).map_err(|e| KernelError::NotElf(e.to_string()))?;
    let limit = limit.min(KERNEL_WINDOW_SIZE);
    let entry = header.e_entry(endian);
    let mut note_version = None;
    let mut entry_ok = false;
    for segment in segments {
        match segment.p_type(endian) {
            PT_NOTE => {
                let Ok(Some(mut notes)) = segment.notes(endian, image) else { continue };
                while let Ok(Some(note)) = notes.next() {
                    let name_ok = note.name() == &NOTE_NAME[..NOTE_NAME_LEN as usize - 1];
                    if name_ok && note.n_type(endian) == NOTE_TYPE_ABI {
                        if let Ok(bytes) = <[u8; 4]>::try_from(note.desc()) {
                            note_version = Some(u32::from_le_bytes(bytes));
                        }
                    }
                }
            }
            PT_LOAD => {
                let (paddr, vaddr, size) = (segment.p_paddr(endian), segment.p_vaddr(endian), segment.p_memsz(endian));
                let end = paddr.checked_add(size);
                if paddr < KERNEL_PADDR || end.is_none_or(|end| end > limit) {
                    return Err(KernelError::SegmentPlacement { paddr, size, limit });
                }
                if vaddr != paddr.wrapping_add(KERNEL_VIRT_BASE) {
                    return Err(KernelError::SegmentLink { vaddr });
                }
                let executable = segment.p_flags(endian) & object::elf::PF_X != 0;
                entry_ok |= executable && (vaddr..vaddr + size).contains(&entry);
            }
            _ => {}
        }
    }
    match note_version {
        None => return Err(KernelError::NoPsycheNote),
        Some(found) if found != ABI_VERSION => return Err(KernelError::AbiMismatch { found }),
        Some(_) => {}
    }
    if !entry_ok {
        return Err(KernelError::Entry(entry));
    }
    let result = Elf::load(mem, None, &mut Cursor::new(image), None).map_err(KernelError::Load)?;
    Ok(LoadedKernel { entry, end: result.kernel_end })
}

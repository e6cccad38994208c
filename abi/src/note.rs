//! The ELF note that marks a kernel image as a Psyche kernel, so that the VMM can refuse any
//! other ELF with a clear error instead of booting it into a triple fault.
//!
//! The kernel carries it in a `.note.psyche` section (a `PT_NOTE` segment): the usual note
//! header with name [`NOTE_NAME`], type [`NOTE_TYPE_ABI`] and a 4-byte descriptor holding
//! [`crate::ABI_VERSION`].

/// Note name, NUL included.
pub const NOTE_NAME: &[u8; 8] = b"Psyche\0\0";
/// Length of the name as the note header gives it (NUL included, padding excluded).
pub const NOTE_NAME_LEN: u32 = 7;
/// Note type: the descriptor is the ABI version.
pub const NOTE_TYPE_ABI: u32 = 1;

/// The whole note, laid out as the ELF spec wants it (4-byte words, name padded to 4).
#[repr(C, align(4))]
pub struct AbiNote {
    /// Length of the name.
    pub namesz: u32,
    /// Length of the descriptor.
    pub descsz: u32,
    /// [`NOTE_TYPE_ABI`].
    pub note_type: u32,
    /// [`NOTE_NAME`].
    pub name: [u8; 8],
    /// [`crate::ABI_VERSION`].
    pub version: u32,
}

/// The note a kernel embeds.
pub const ABI_NOTE: AbiNote = AbiNote {
    namesz: NOTE_NAME_LEN,
    descsz: 4,
    note_type: NOTE_TYPE_ABI,
    name: *NOTE_NAME,
    version: crate::ABI_VERSION,
};

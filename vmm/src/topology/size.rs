//! Memory sizes as topology files write them: `"64M"`, `"2G"`, `"0"` or a plain number of
//! bytes, with the QEMU and Cloud Hypervisor meaning of the suffixes (powers of 1024).

/// Units from the largest down, so that [`format`] picks the largest exact one.
const UNITS: [(char, u32); 4] = [('T', 40), ('G', 30), ('M', 20), ('K', 10)];

/// Why a size string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SizeError {
    /// Not digits followed by at most one K, M, G or T.
    Malformed,
    /// Well formed, but more bytes than a `u64` holds.
    TooLarge,
}

/// Parses `"64M"`, `"64m"`, `"1G"`, `"0"` or `"4096"` into bytes.
pub(super) fn parse(text: &str) -> Result<u64, SizeError> {
    let (digits, shift) = match text.char_indices().last() {
        Some((at, last)) if last.is_ascii_alphabetic() => {
            let shift = UNITS
                .iter()
                .find(|(unit, _)| unit.eq_ignore_ascii_case(&last))
                .map(|&(_, shift)| shift)
                .ok_or(SizeError::Malformed)?;
            (&text[..at], shift)
        }
        _ => (text, 0),
    };
    // `u64::from_str` alone would also take a leading `+`.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SizeError::Malformed);
    }
    let value: u64 = digits.parse().map_err(|_| SizeError::TooLarge)?;
    value.checked_mul(1 << shift).ok_or(SizeError::TooLarge)
}

/// Writes `bytes` the way a topology file would: with the largest suffix that divides it
/// exactly (`"64M"`, `"3G"`), or as a plain number of bytes.
pub(super) fn format(bytes: u64) -> String {
    if bytes == 0 {
        return "0".to_owned();
    }
    UNITS
        .iter()
        .find(|&&(_, shift)| bytes.trailing_zeros() >= shift)
        .map_or_else(|| bytes.to_string(), |&(unit, shift)| format!("{}{unit}", bytes >> shift))
}

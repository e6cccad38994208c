//! A per-function profile of kernel instructions: the RIPs psyche-vmm sampled while
//! single-stepping the kernel (`--count-kernel-instructions --profile-kernel`), attributed to
//! the kernel image's function symbols. On hosts where every CPL0 instruction is emulated, the
//! instruction count of a path is its cost, and this says where it goes.

use object::elf::{FileHeader64, SHT_SYMTAB, STT_FUNC};
use object::read::elf::{FileHeader, Sym};
use object::LittleEndian;

use crate::boot::Aligned;

/// Why the profile could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("the kernel image cannot be read as ELF: {0}")]
    Elf(String),
    #[error("the kernel image has no symbol table (was it stripped?)")]
    NoSymbols,
}

/// The kernel's functions: (start, end, name), sorted by start.
fn functions(image: &[u8]) -> Result<Vec<(u64, u64, String)>, ProfileError> {
    let aligned = Aligned::new(image);
    let data = aligned.bytes();
    let elf = |e: object::read::Error| ProfileError::Elf(e.to_string());
    let header = FileHeader64::<LittleEndian>::parse(data).map_err(elf)?;
    let endian = header.endian().map_err(elf)?;
    let sections = header.sections(endian, data).map_err(elf)?;
    let table = sections.symbols(endian, data, SHT_SYMTAB).map_err(elf)?;
    if table.is_empty() {
        return Err(ProfileError::NoSymbols);
    }
    let strings = table.strings();
    let mut functions: Vec<(u64, u64, String)> = table
        .iter()
        .filter(|symbol| symbol.st_type() == STT_FUNC && symbol.st_size(endian) > 0)
        .filter_map(|symbol| {
            let name = symbol.name(endian, strings).ok()?;
            let name = format!("{:#}", rustc_demangle::demangle(&String::from_utf8_lossy(name)));
            let start = symbol.st_value(endian);
            Some((start, start + symbol.st_size(endian), name))
        })
        .collect();
    functions.sort();
    Ok(functions)
}

/// The `top` functions by instructions executed, as a table.
pub fn profile(image: &[u8], rips: &[u64], top: usize) -> Result<String, ProfileError> {
    let functions = functions(image)?;
    let mut counts = std::collections::HashMap::<&str, u64>::new();
    for &rip in rips {
        let at = functions.partition_point(|(start, _, _)| *start <= rip);
        let name = at
            .checked_sub(1)
            .map(|i| &functions[i])
            .filter(|(_, end, _)| rip < *end)
            .map_or("(outside any function: assembly stubs)", |(_, _, name)| name.as_str());
        *counts.entry(name).or_default() += 1;
    }
    let mut rows: Vec<_> = counts.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let total = rips.len().max(1) as f64;
    let mut text = format!("kernel instructions by function ({} stepped):\n", rips.len());
    for (name, count) in rows.iter().take(top) {
        text += &format!("{count:>10} {:>6.1}%  {name}\n", *count as f64 * 100.0 / total);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_kernel_profiles_by_function() {
        let functions = functions(crate::images::KERNEL).unwrap();
        let entry = functions.iter().find(|(_, _, name)| name.contains("kernel_main")).expect("kernel_main");
        let text = profile(crate::images::KERNEL, &[entry.0, entry.0 + 1, 0x10], 5).unwrap();
        assert!(text.starts_with("kernel instructions by function (3 stepped):"), "{text}");
        assert!(text.contains("2   66.7%") && text.contains("kernel_main"), "{text}");
        assert!(text.contains("(outside any function"), "{text}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(profile(b"not an elf", &[1, 2], 5), Err(ProfileError::Elf(_))));
    }
}

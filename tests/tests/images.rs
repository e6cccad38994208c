//! Bad kernel and program images are refused with a clear error before anything runs.

use psyche_tests::Boot;
use psyche_vmm::boot::ProgramImage;
use psyche_vmm::images;
use psyche_vmm::VmError;

fn boot_error(boot: Boot) -> String {
    match boot.try_run() {
        Err(VmError::Boot(error)) => error.to_string(),
        Err(other) => panic!("expected a boot error, got {other}"),
        Ok(run) => panic!("expected a boot error, but the guest ran: {:?}", run.outcome.end),
    }
}

/// The built-in kernel with `from` replaced by `to` (same length) once.
fn patched_kernel(from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut image = images::KERNEL.to_vec();
    let at = image.windows(from.len()).position(|w| w == from).expect("pattern in the kernel");
    image[at..at + to.len()].copy_from_slice(to);
    image
}

#[test]
fn a_kernel_that_is_not_elf_is_refused() {
    let message = boot_error(Boot::new("uma").kernel(b"#!/bin/sh\necho hello\n".to_vec()));
    assert!(message.starts_with("kernel <test kernel>: not an ELF file"), "{message}");
}

#[test]
fn an_elf_that_is_not_a_psyche_kernel_is_refused() {
    let message = boot_error(Boot::new("uma").kernel(patched_kernel(b"Psyche\0", b"Pseudo\0")));
    assert!(message.contains("not a Psyche kernel"), "{message}");
    // A program is an ELF too, but not an executable kernel.
    let message = boot_error(Boot::new("uma").kernel(images::program("hello").unwrap().to_vec()));
    assert!(message.contains("not an x86-64 executable"), "{message}");
}

#[test]
fn a_kernel_of_another_abi_version_is_refused() {
    let note = [b"Psyche\0\0".as_slice(), &psyche_abi::ABI_VERSION.to_le_bytes()].concat();
    let other = [b"Psyche\0\0".as_slice(), &(psyche_abi::ABI_VERSION + 1).to_le_bytes()].concat();
    let message = boot_error(Boot::new("uma").kernel(patched_kernel(&note, &other)));
    assert!(message.contains(&format!("ABI version {}", psyche_abi::ABI_VERSION + 1)), "{message}");
}

#[test]
fn a_truncated_kernel_is_refused() {
    let image = images::KERNEL[..images::KERNEL.len() / 3].to_vec();
    let message = boot_error(Boot::new("uma").kernel(image));
    assert!(message.starts_with("kernel <test kernel>:"), "{message}");
}

#[test]
fn bad_programs_are_refused() {
    let kernel_as_program = ProgramImage { name: "kernel".into(), image: images::KERNEL.into() };
    let message = boot_error(Boot::new("uma").program_images(vec![kernel_as_program]));
    assert!(message.starts_with("program kernel: not a static PIE"), "{message}");
    let text = ProgramImage { name: "notes.txt".into(), image: b"hello".to_vec().into() };
    let message = boot_error(Boot::new("uma").program_images(vec![text]));
    assert!(message.starts_with("program notes.txt: not an ELF file"), "{message}");
}

#[test]
fn more_programs_than_a_boot_holds_are_refused() {
    let message = boot_error(Boot::new("uma").programs(&["hello"; 17]));
    assert!(message.contains("17 programs given, but at most 16 can run in one boot"), "{message}");
}

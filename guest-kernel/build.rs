//! Links the kernel binary as a freestanding ELF at the top of the address space (see
//! `linker.ld`). Only the binary gets these arguments; the library stays a normal host crate
//! so its unit tests run on the host.
fn main() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("linker.ld");
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie", "-Wl,--gc-sections", "-Wl,--build-id=none"] {
        println!("cargo:rustc-link-arg-bin=psyche-kernel={arg}");
    }
    println!("cargo:rustc-link-arg-bin=psyche-kernel=-Wl,-T,{}", script.display());
    println!("cargo:rerun-if-changed={}", script.display());
}

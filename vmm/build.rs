//! Builds the guest kernel and the guest programs and embeds them in psyche-vmm, so that the
//! binary boots a guest with nothing else on disk.
//!
//! Guest code is built for the host triple (`x86_64-unknown-linux-gnu`, the only target with a
//! prebuilt libcore on our machines) as freestanding binaries, by a nested `cargo build` with
//! its own target directory and its own RUSTFLAGS. The explicit `--target` keeps those flags
//! off build scripts and proc macros.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// The kernel lives in the top 2 GiB and never uses the red zone (interrupts arrive on its
/// stacks). It is built without SSE: on our hosts CPL0 is emulated by KVM's instruction
/// emulator, which cannot execute most SSE instructions (a `pxor` at CPL0 is a KVM internal
/// error). rustc warns that dropping SSE from this target's ABI will become an error; the
/// kernel passes no floats, and moves to a soft-float target when one can be installed here.
/// Programs are static PIEs the VMM relocates into their slots; CPL3 runs natively, SSE and all.
const KERNEL_RUSTFLAGS: &str =
    "-C relocation-model=static -C code-model=kernel -C no-redzone=y -C target-feature=-sse,-sse2";
const PROGRAM_RUSTFLAGS: &str = "-C relocation-model=pie";

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("vmm/ is inside the workspace").to_path_buf();
    for watched in ["abi", "guest-rt", "guest-kernel", "realm-sdk", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    let kernel_dir = out_dir.join("guest-target/kernel");
    cargo_build(&root, &["-p", "psyche-kernel", "--bin", "psyche-kernel"], KERNEL_RUSTFLAGS, &kernel_dir);
    let kernel = kernel_dir.join(TRIPLE).join("release/psyche-kernel");
    // The same kernel with tracing compiled in, booted for --trace (its own target directory, so
    // the two feature sets do not rebuild each other).
    let traced_dir = out_dir.join("guest-target/kernel-traced");
    let traced_selection = ["-p", "psyche-kernel", "--bin", "psyche-kernel", "--features", "trace"];
    cargo_build(&root, &traced_selection, KERNEL_RUSTFLAGS, &traced_dir);
    let traced_kernel = traced_dir.join(TRIPLE).join("release/psyche-kernel");

    let programs_dir = out_dir.join("guest-target/programs");
    cargo_build(&root, &["-p", "psyche-programs", "--bins"], PROGRAM_RUSTFLAGS, &programs_dir);
    let mut programs: Vec<String> = std::fs::read_dir(root.join("realm-sdk/programs/src/bin"))
        .expect("realm-sdk/programs/src/bin is readable")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    programs.sort();

    let mut code = String::new();
    writeln!(code, "/// The guest kernel built from `guest-kernel/`.").unwrap();
    writeln!(code, "pub static KERNEL: &[u8] = include_bytes!({:?});", kernel.display().to_string()).unwrap();
    writeln!(code, "/// The guest kernel with tracing compiled in (`--features trace`).").unwrap();
    writeln!(code, "pub static KERNEL_TRACED: &[u8] = include_bytes!({:?});", traced_kernel.display().to_string())
        .unwrap();
    writeln!(code, "/// The programs built from `realm-sdk/programs/src/bin/`, by name.").unwrap();
    writeln!(code, "pub static PROGRAMS: &[(&str, &[u8])] = &[").unwrap();
    for name in &programs {
        let path = programs_dir.join(TRIPLE).join("release").join(name);
        writeln!(code, "    ({name:?}, include_bytes!({:?})),", path.display().to_string()).unwrap();
    }
    writeln!(code, "];").unwrap();
    std::fs::write(out_dir.join("guest_images.rs"), code).expect("OUT_DIR is writable");
}

fn cargo_build(root: &Path, selection: &[&str], rustflags: &str, target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(root)
        .args(["build", "--release", "--target", TRIPLE, "--target-dir"])
        .arg(target_dir)
        .args(selection)
        .env("RUSTFLAGS", rustflags);
    // What the outer build set for itself (flags, clippy, coverage wrappers) must not leak into
    // the guest build.
    for variable in [
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CLIPPY_ARGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        command.env_remove(variable);
    }
    let status = command.status().expect("cannot run cargo for the guest build");
    assert!(status.success(), "building the guest ({}) failed", selection.join(" "));
}

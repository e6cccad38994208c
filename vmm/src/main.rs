//! The `psyche-vmm` binary: see `psyche_vmm::cli`.
fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(psyche_vmm::cli::main(std::env::args_os()))
}

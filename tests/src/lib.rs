//! Helpers for the guest tests: boot a real guest under /dev/kvm through the psyche-vmm
//! library and keep everything the guest printed and reported.
//!
//! Every test that boots a guest calls [`Boot::run`], which first checks for KVM: on a host
//! without it the test fails with a message saying so (it never passes silently).

use std::path::PathBuf;
use std::time::Duration;

use psyche_vmm::boot::ProgramImage;
use psyche_vmm::console::Writer;
use psyche_vmm::topology::{self, Topology};
use psyche_vmm::vm::{self, GuestEnd, Outcome};
use psyche_vmm::{CaptureSink, VmConfig};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace").to_path_buf()
}

/// Every topology file shipped in `topologies/`, sorted.
pub fn shipped_topologies() -> Vec<PathBuf> {
    let dir = workspace_root().join("topologies");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

/// Fails the test, loudly, when this host has no usable KVM.
pub fn require_kvm() {
    if let Err(message) = vm::check_kvm() {
        panic!("this test boots a real guest and needs KVM, which this host does not offer: {message}");
    }
}

/// A guest to boot.
pub struct Boot {
    config: VmConfig,
}

/// What a finished guest left behind.
pub struct Run {
    pub outcome: Outcome,
    pub console: CaptureSink,
}

impl Boot {
    /// The machine of a shipped topology name or a path, with the default kernel and program
    /// and a 60-second safety timeout.
    pub fn new(topology: &str) -> Self {
        let topology: Topology = topology::resolve(topology).unwrap_or_else(|e| panic!("{e}"));
        let mut config = VmConfig::with_defaults(topology);
        config.timeout = Some(Duration::from_secs(60));
        Self { config }
    }

    /// Runs these built-in programs instead of the default.
    pub fn programs(mut self, names: &[&str]) -> Self {
        self.config.programs = names
            .iter()
            .map(|name| ProgramImage::builtin(name).unwrap_or_else(|| panic!("no built-in program {name}")))
            .collect();
        self
    }

    /// Runs these program images instead of the default.
    pub fn program_images(mut self, programs: Vec<ProgramImage>) -> Self {
        self.config.programs = programs;
        self
    }

    /// Gives the programs these arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.config.args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Sets the kernel command line.
    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.config.cmdline = cmdline.to_owned();
        self
    }

    /// Charges remote-memory latency this way (`off`, `window`, `exact`, `account`) instead of
    /// the topology's way.
    pub fn latency_mode(mut self, mode: &str) -> Self {
        let mode = mode.parse().unwrap_or_else(|e| panic!("{e}"));
        let topology = self.config.topology.clone();
        self.config.topology = topology.with_latency_mode(mode).unwrap_or_else(|e| panic!("{e}"));
        self
    }

    /// Traces the run (the kernel built with tracing; `Run::outcome.trace` holds the records).
    pub fn traced(mut self) -> Self {
        self.config.trace = true;
        self.config.kernel = psyche_vmm::images::KERNEL_TRACED.into();
        self.config.kernel_origin = psyche_vmm::images::KERNEL_TRACED_ORIGIN.to_owned();
        self
    }

    /// Replaces the kernel image.
    pub fn kernel(mut self, image: Vec<u8>) -> Self {
        self.config.kernel = image.into();
        self.config.kernel_origin = "<test kernel>".to_owned();
        self
    }

    /// Stops the guest after `seconds`.
    pub fn timeout(mut self, seconds: f64) -> Self {
        self.config.timeout = Some(Duration::from_secs_f64(seconds));
        self
    }

    /// The configuration as built so far.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Boots the guest and runs it to its end.
    pub fn run(self) -> Run {
        self.try_run().unwrap_or_else(|e| panic!("the VM did not start: {e}"))
    }

    /// Boots the guest; setup errors come back as values.
    pub fn try_run(self) -> Result<Run, psyche_vmm::VmError> {
        require_kvm();
        let console = CaptureSink::default();
        let outcome = vm::run(&self.config, &console)?;
        Ok(Run { outcome, console })
    }
}

impl Run {
    /// The guest's console output, one line each, with its vCPU.
    pub fn lines(&self) -> Vec<(u32, String)> {
        self.console.lines()
    }

    /// Whether some guest line contains `text`.
    pub fn printed(&self, text: &str) -> bool {
        self.console.lines().iter().any(|(_, line)| line.contains(text))
    }

    /// Whether some line that program `index` printed contains `text` (another program printing
    /// the same words does not count: for tests that judge by what a victim says).
    pub fn printed_by(&self, index: u32, text: &str) -> bool {
        self.console.entries().iter().any(|line| line.writer == Writer::Program(index) && line.text.contains(text))
    }

    /// Panics with everything the guest printed unless it shut down normally with `code`.
    pub fn expect_exit(&self, code: u64) {
        match &self.outcome.end {
            GuestEnd::Shutdown { code: actual } if *actual == code && !self.outcome.program_faulted() => {}
            other => panic!(
                "expected the guest to exit with {code}, but: {other:?}\nprograms: {:?}\nconsole:\n{}notes: {:?}",
                self.outcome.programs,
                self.console.text(),
                self.console.notes()
            ),
        }
    }
}

//! A VM from start to end: KVM objects, guest memory, boot layout, one thread per vCPU, the
//! watchdog, and the outcome.

use std::borrow::Cow;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use psyche_abi::syscall::MAX_PASSTHROUGH_EXIT_CODE;
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot::{self, BootError, BootRequest, ProgramImage};
use crate::console::ConsoleSink;
use crate::hypercall::{exception_name, HypercallContext};
use crate::latency::{GuestLatencyReport, LatencyCharger, LatencyTotals};
use crate::memory::{self, MemoryError};
use crate::seccomp::{self, Role, Seccomp, SeccompError};
use crate::topology::Topology;
use crate::trace::{Trace, TraceError, TraceMeta, TraceOptions, TraceSession};
use crate::vcpu::{self, CrashRegisters, Kicker, VcpuSetupError};

/// Everything needed to boot a guest.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub topology: Topology,
    /// The kernel ELF image.
    pub kernel: Cow<'static, [u8]>,
    /// Where the kernel came from, for messages.
    pub kernel_origin: String,
    pub programs: Vec<ProgramImage>,
    /// Arguments every program receives.
    pub args: Vec<String>,
    /// The kernel command line.
    pub cmdline: String,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// Give every vCPU a trace ring (the kernel must be one built with tracing to fill them:
    /// see [`crate::images::KERNEL_TRACED`]).
    pub trace: bool,
    /// Single-step the kernel on this vCPU and count its instructions (user code is not
    /// stepped); the counts at each program mark (`Syscall::Mark`) land in [`Outcome::marks`].
    /// Slow: for measuring kernel paths (`psyche-vmm bench`). Only one vCPU is stepped: an idle
    /// vCPU under single-step spins through `hlt` instead of sleeping.
    pub count_kernel_instructions: Option<u32>,
    /// With `count_kernel_instructions`, also record the RIP of every kernel instruction
    /// stepped ([`Outcome::kernel_rips`]), for a per-function profile of kernel paths.
    pub profile_kernel: bool,
    /// Testing only: behave as if the OS refused to start the thread of this vCPU (EAGAIN, as
    /// when a process is out of threads), to check that the threads already started are
    /// stopped and joined and the run ends with [`VmError::Thread`].
    #[doc(hidden)]
    pub fail_vcpu_thread: Option<u32>,
    /// Which threads get a seccomp filter (see [`crate::seccomp`]): [`Seccomp::VmThreads`]
    /// by default, so that the caller's thread is left as it was; the binary confines its main
    /// thread too ([`Seccomp::AllThreads`]).
    pub seccomp: Seccomp,
    /// Testing only: make a thread of this role (vCPU 0, the drainer, or the caller) attempt
    /// a system call no filter allows once the threads are ready, to check that it is stopped.
    /// Where no filter stops it, a note says so and the run goes on.
    #[doc(hidden)]
    pub seccomp_probe: Option<Role>,
}

impl VmConfig {
    /// A configuration for `topology` with the built-in kernel, the default program, no
    /// arguments, an empty command line and no timeout.
    pub fn with_defaults(topology: Topology) -> Self {
        Self {
            topology,
            kernel: Cow::Borrowed(crate::images::KERNEL),
            kernel_origin: crate::images::KERNEL_ORIGIN.to_owned(),
            programs: vec![
                ProgramImage::builtin(crate::images::DEFAULT_PROGRAM).expect("the default program is built in")
            ],
            args: Vec::new(),
            cmdline: String::new(),
            timeout: None,
            trace: false,
            count_kernel_instructions: None,
            profile_kernel: false,
            fail_vcpu_thread: None,
            seccomp: Seccomp::VmThreads,
            seccomp_probe: None,
        }
    }
}

/// Checks that this host offers KVM to us; the error says what is missing. Guest tests call
/// this first so that a host without KVM fails them with a clear message.
pub fn check_kvm() -> Result<(), String> {
    match Kvm::new() {
        Ok(_) => Ok(()),
        Err(error) => Err(VmError::KvmUnavailable(error).to_string()),
    }
}

/// Why a VM could not be started (nothing the guest did: the guest has not run yet).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (psyche-vmm needs KVM: a Linux host with the kvm module and read-write access to /dev/kvm)")]
    KvmUnavailable(kvm_ioctls::Error),
    #[error("{what} failed: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("the topology asks for {wanted} vCPUs, but this host's KVM allows at most {max}")]
    TooManyVcpus { wanted: usize, max: usize },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    VcpuSetup(#[from] VcpuSetupError),
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Thread { index: u32, source: std::io::Error },
    #[error("cannot install the signal handler that stops vCPUs: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    #[error("tracing: {0}")]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Why the guest kernel is considered crashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrashReason {
    /// An exception the kernel could not handle (reported by the kernel itself).
    Exception { vector: u64, error_code: u64, rip: u64, cr2: u64, cs: u64, rsp: u64 },
    /// A Rust panic in the kernel (its message is on the console just before).
    KernelPanic,
    /// The vCPU shut down: a triple fault.
    TripleFault,
    /// KVM could not enter the guest (hardware reason code).
    FailedEntry(u64),
    /// KVM hit an internal error running the guest (KVM_INTERNAL_ERROR_* sub-error).
    KvmInternalError { suberror: u32 },
    /// An exit this VMM does not expect.
    UnexpectedExit(String),
    /// KVM_RUN itself failed.
    RunFailed(String),
    /// `hlt` reached user space, which the in-kernel irqchip should make impossible.
    HaltedWithoutIrqchip,
    /// The kernel's topology report was unreadable.
    BadReport(String),
}

impl std::fmt::Display for CrashReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exception { vector, error_code, rip, cr2, cs, rsp } => {
                write!(f, "{} in the kernel: rip {rip:#x}, error code {error_code:#x}", exception_name(*vector))?;
                if *vector == 14 {
                    write!(f, ", cr2 {cr2:#x}")?;
                }
                write!(f, ", cs {cs:#x}, rsp {rsp:#x}")
            }
            Self::KernelPanic => write!(f, "kernel panic (message above)"),
            Self::TripleFault => write!(f, "triple fault (the vCPU shut down)"),
            Self::FailedEntry(reason) => write!(f, "KVM could not enter the guest (hardware reason {reason:#x})"),
            Self::KvmInternalError { suberror: 1 } => write!(
                f,
                "KVM could not emulate the instruction at rip (where CPL0 is emulated, as on nested hosts, an SSE instruction in the kernel or an exception with no usable IDT ends this way)"
            ),
            Self::KvmInternalError { suberror: 3 } => write!(
                f,
                "KVM could not deliver an exception or interrupt (no usable IDT or stack: the equivalent of a triple fault)"
            ),
            Self::KvmInternalError { suberror } => write!(f, "KVM internal error (sub-error {suberror})"),
            Self::UnexpectedExit(exit) => write!(f, "unexpected exit {exit}"),
            Self::RunFailed(error) => write!(f, "KVM_RUN failed: {error}"),
            Self::HaltedWithoutIrqchip => write!(f, "hlt exit (no in-kernel irqchip?)"),
            Self::BadReport(problem) => write!(f, "bad topology report: {problem}"),
        }
    }
}

/// How the guest ended.
#[derive(Clone, Debug)]
pub enum GuestEnd {
    /// The kernel shut the machine down after its last program ended.
    Shutdown { code: u64 },
    /// The kernel crashed.
    KernelCrash { vcpu: u32, reason: CrashReason, registers: Option<CrashRegisters> },
    /// `--timeout` expired.
    TimedOut { after: Duration },
}

impl GuestEnd {
    pub(crate) fn crash(vcpu: u32, reason: CrashReason, registers: Option<CrashRegisters>) -> Self {
        Self::KernelCrash { vcpu, reason, registers }
    }
}

/// How one program ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "end", rename_all = "kebab-case")]
pub enum ProgramEnd {
    Exited {
        code: u64,
    },
    /// Killed for a CPU exception.
    Killed {
        vector: u64,
        error_code: u64,
        rip: u64,
        cr2: u64,
    },
    /// Its protection domain was terminated for breaking the realm rules: `reason` is a
    /// `psyche_abi::realm::Termination`, `address` what it touched, `realm` the realm there.
    Terminated {
        reason: u64,
        address: u64,
        realm: u64,
        rip: u64,
    },
}

/// What the VMM saw of one program.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramRecord {
    pub name: String,
    pub started: bool,
    #[serde(flatten)]
    pub end: Option<ProgramEnd>,
}

/// One node as the guest kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeReport {
    pub id: u32,
    pub cpus: Vec<u32>,
    pub memory_bytes: u64,
}

/// The machine as the guest kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GuestReport {
    pub cpus_online: u32,
    pub lapic_timer_hz: u64,
    pub nodes: Vec<NodeReport>,
    pub distances: Vec<Vec<u8>>,
    /// The kernel's latency counts (`ReportLatency`), when it sent them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<GuestLatencyReport>,
}

/// psyche-vmm's exit statuses other than a guest exit code passed through.
///
/// A guest's own exit code passes through when it is 0..=119 ([`MAX_PASSTHROUGH_EXIT_CODE`]),
/// so every outcome of the VMM's own has a status in 120..=125, which no guest code can
/// produce: a guest that exits 2 must not look like a bad topology file. Nothing goes above
/// 125, because shells give 126 and 127 their own meanings (not executable, not found) and
/// report a process killed by signal N as 128 + N (134 for an abort, 159 for SIGSYS).
pub mod status {
    /// The guest exited with a code above the pass-through range.
    pub const EXIT_CODE_OUT_OF_RANGE: u8 = 120;
    /// A host-side failure (KVM, memory, threads), or a VMM thread that made a system call
    /// its seccomp filter forbids.
    pub const HOST_ERROR: u8 = 121;
    /// Bad input: command line, topology file, kernel or program image, trace file.
    pub const BAD_INPUT: u8 = 122;
    /// The kernel killed a program for a fault.
    pub const PROGRAM_FAULT: u8 = 123;
    /// `--timeout` expired.
    pub const TIMEOUT: u8 = 124;
    /// The guest kernel crashed.
    pub const KERNEL_CRASH: u8 = 125;

    /// Every status of the VMM's own, for checks that none is a guest code.
    pub const ALL: [u8; 6] = [EXIT_CODE_OUT_OF_RANGE, HOST_ERROR, BAD_INPUT, PROGRAM_FAULT, TIMEOUT, KERNEL_CRASH];
}

/// The outcome of a run.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub end: GuestEnd,
    pub vcpus: usize,
    pub nodes: usize,
    /// From the start of `run` to the first program starting at CPL3.
    pub boot: Option<Duration>,
    pub wall: Duration,
    /// From the guest's end (or the timeout) to every vCPU thread stopped and joined.
    pub stop: Duration,
    /// What the kernel reported, if it got that far.
    pub guest: Option<GuestReport>,
    pub programs: Vec<ProgramRecord>,
    /// The trace of a traced run (`VmConfig::trace`): every vCPU's records and, in its
    /// `summary`, the records per kind, the lost and the corrupt ones.
    pub trace: Option<Trace>,
    /// The program marks seen, with kernel-instruction counts when counting.
    pub marks: Vec<Mark>,
    /// The guest's TSC frequency as KVM reports it (0 if unknown).
    pub tsc_khz: u64,
    /// The RIP of every kernel instruction stepped (`VmConfig::profile_kernel`).
    pub kernel_rips: Vec<u64>,
    /// The remote-memory latency the VMM charged; `None` when latency is off.
    pub latency: Option<LatencyTotals>,
}

impl Outcome {
    /// The guest's own exit code, when it shut down normally.
    pub fn guest_exit_code(&self) -> Option<u64> {
        match self.end {
            GuestEnd::Shutdown { code } => Some(code),
            _ => None,
        }
    }

    /// Whether the kernel killed any program.
    pub fn program_faulted(&self) -> bool {
        self.programs.iter().any(|p| matches!(p.end, Some(ProgramEnd::Killed { .. } | ProgramEnd::Terminated { .. })))
    }

    /// psyche-vmm's exit status for this outcome.
    pub fn exit_status(&self) -> u8 {
        match self.end {
            GuestEnd::Shutdown { .. } if self.program_faulted() => status::PROGRAM_FAULT,
            GuestEnd::Shutdown { code } if code <= MAX_PASSTHROUGH_EXIT_CODE => code as u8,
            GuestEnd::Shutdown { .. } => status::EXIT_CODE_OUT_OF_RANGE,
            GuestEnd::TimedOut { .. } => status::TIMEOUT,
            GuestEnd::KernelCrash { .. } => status::KERNEL_CRASH,
        }
    }
}

/// State shared by the vCPU threads and the watchdog.
pub struct RunState {
    stop: AtomicBool,
    /// When the stop was first asked for (the guest ended, or the timeout expired).
    stop_asked: OnceLock<Instant>,
    end: Mutex<Option<GuestEnd>>,
    ended: Condvar,
    started: Instant,
    first_program: Mutex<Option<Duration>>,
    report: Mutex<Option<GuestReport>>,
    latency_report: Mutex<Option<GuestLatencyReport>>,
    programs: Mutex<Vec<ProgramRecord>>,
    /// Kernel instructions each vCPU has executed (when counting).
    kernel_instructions: Vec<AtomicU64>,
    marks: Mutex<Vec<Mark>>,
    profile_kernel: bool,
    kernel_rips: Mutex<Vec<u64>>,
}

/// A program's mark, and how many kernel instructions its vCPU had executed by then.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Mark {
    pub vcpu: u32,
    pub program: u64,
    pub value: u64,
    pub kernel_instructions: u64,
}

impl RunState {
    pub(crate) fn new(started: Instant, program_names: &[String], vcpus: usize) -> Self {
        Self {
            stop: AtomicBool::new(false),
            stop_asked: OnceLock::new(),
            end: Mutex::new(None),
            ended: Condvar::new(),
            started,
            first_program: Mutex::new(None),
            report: Mutex::new(None),
            latency_report: Mutex::new(None),
            programs: Mutex::new(
                program_names
                    .iter()
                    .map(|name| ProgramRecord { name: name.clone(), started: false, end: None })
                    .collect(),
            ),
            kernel_instructions: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            marks: Mutex::new(Vec::new()),
            profile_kernel: false,
            kernel_rips: Mutex::new(Vec::new()),
        }
    }

    /// Whether kernel RIPs are being sampled.
    pub(crate) fn profiling_kernel(&self) -> bool {
        self.profile_kernel
    }

    /// Records the RIP of a stepped kernel instruction (at most 16 M of them).
    pub(crate) fn sample_kernel_rip(&self, rip: u64) {
        if let Ok(mut rips) = self.kernel_rips.lock() {
            if rips.len() < 16 << 20 {
                rips.push(rip);
            }
        }
    }

    /// Counts one kernel instruction of `vcpu` (a single-step exit).
    pub(crate) fn count_kernel_instruction(&self, vcpu: u32) {
        if let Some(count) = self.kernel_instructions.get(vcpu as usize) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn mark(&self, vcpu: u32, program: u64, value: u64) {
        let kernel_instructions =
            self.kernel_instructions.get(vcpu as usize).map_or(0, |count| count.load(Ordering::Relaxed));
        if let Ok(mut marks) = self.marks.lock() {
            // A guest that marks without end cannot grow this without bound.
            if marks.len() < 1 << 20 {
                marks.push(Mark { vcpu, program, value, kernel_instructions });
            }
        }
    }

    /// Whether the vCPUs should stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn ask_stop(&self) {
        self.stop_asked.get_or_init(Instant::now);
        self.stop.store(true, Ordering::Release);
    }

    /// Records how the guest ended (the first end wins) and stops every vCPU.
    pub fn end(&self, end: GuestEnd) {
        if let Ok(mut slot) = self.end.lock() {
            slot.get_or_insert(end);
        }
        self.ask_stop();
        self.ended.notify_all();
    }

    pub(crate) fn wait(&self, timeout: Option<Duration>) -> GuestEnd {
        let deadline = timeout.map(|t| self.started + t);
        let mut slot = match self.end.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        loop {
            if let Some(end) = slot.clone() {
                return end;
            }
            match deadline {
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        let end = GuestEnd::TimedOut { after: timeout.unwrap_or_default() };
                        *slot = Some(end.clone());
                        self.ask_stop();
                        return end;
                    }
                    slot = match self.ended.wait_timeout(slot, deadline - now) {
                        Ok((slot, _)) => slot,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                }
                None => {
                    slot = match self.ended.wait(slot) {
                        Ok(slot) => slot,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                }
            }
        }
    }

    pub(crate) fn set_report(&self, report: GuestReport) {
        if let Ok(mut slot) = self.report.lock() {
            *slot = Some(report);
        }
    }

    pub(crate) fn set_latency_report(&self, report: GuestLatencyReport) {
        if let Ok(mut slot) = self.latency_report.lock() {
            *slot = Some(report);
        }
    }

    /// The kernel's latency report, if it sent one.
    pub(crate) fn latency_report(&self) -> Option<GuestLatencyReport> {
        self.latency_report.lock().ok().and_then(|report| report.clone())
    }

    pub(crate) fn program_started(&self, index: u64) {
        if let Ok(mut first) = self.first_program.lock() {
            first.get_or_insert_with(|| self.started.elapsed());
        }
        if let Ok(mut programs) = self.programs.lock() {
            if let Some(program) = usize::try_from(index).ok().and_then(|i| programs.get_mut(i)) {
                program.started = true;
            }
        }
    }

    pub(crate) fn program_ended(&self, index: u64, end: ProgramEnd) {
        if let Ok(mut programs) = self.programs.lock() {
            if let Some(program) = usize::try_from(index).ok().and_then(|i| programs.get_mut(i)) {
                program.end.get_or_insert(end);
            }
        }
    }
}

/// Holds the threads of a VM back until every one of them has started and is ready, so that
/// no guest instruction runs before all are (and, with seccomp, confined); or, when start-up
/// failed, sends them home without running anything.
#[derive(Default)]
struct StartGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    arrived: usize,
    failure: Option<VmError>,
    /// `Some(true)`: run; `Some(false)`: start-up failed, return at once.
    decision: Option<bool>,
}

impl StartGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // panic = "abort": a poisoned lock cannot happen.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Called by each thread once it is ready (or failed to get ready); waits for the decision
    /// and returns whether to run.
    fn arrive_and_wait(&self, ready: Result<(), VmError>) -> bool {
        let mut state = self.lock();
        state.arrived += 1;
        if let Err(error) = ready {
            state.failure.get_or_insert(error);
        }
        self.changed.notify_all();
        loop {
            if let Some(go) = state.decision {
                return go;
            }
            state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Waits until `threads` threads have arrived; returns the first failure one reported.
    fn wait_for(&self, threads: usize) -> Option<VmError> {
        let mut state = self.lock();
        while state.arrived < threads {
            state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.failure.take()
    }

    fn decide(&self, go: bool) {
        self.lock().decision = Some(go);
        self.changed.notify_all();
    }
}

/// Boots the guest described by `config` and runs it to its end. Guest output goes to `sink`.
pub fn run(config: &VmConfig, sink: &dyn ConsoleSink) -> Result<Outcome, VmError> {
    let started = Instant::now();
    let topology = &config.topology;
    let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
    let max_vcpus = kvm.get_max_vcpus();
    if topology.cpu_count() > max_vcpus {
        return Err(VmError::TooManyVcpus { wanted: topology.cpu_count(), max: max_vcpus });
    }
    let kvm_err = |what| move |source| VmError::Kvm { what, source };
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;

    let regions = memory::plan(topology);
    let mem = memory::allocate(&regions)?;
    register_memory(&vm, &mem)?;
    // The TSS area is required on Intel hosts before any vCPU runs; it lies in the MMIO hole.
    vm.set_tss_address(0xFFFB_D000).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;

    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus: Vec<VcpuFd> = (0..topology.cpu_count() as u64)
        .map(|index| vm.create_vcpu(index).map_err(kvm_err("KVM_CREATE_VCPU")))
        .collect::<Result<_, _>>()?;
    let tsc_khz = vcpus.first().and_then(|vcpu| vcpu.get_tsc_khz().ok()).unwrap_or(0) as u64;

    let layout = boot::lay_out(
        &mem,
        &BootRequest {
            topology,
            regions: &regions,
            kernel: &config.kernel,
            kernel_origin: &config.kernel_origin,
            programs: &config.programs,
            args: &config.args,
            cmdline: &config.cmdline,
            tsc_khz,
            trace: config.trace,
        },
    )?;
    for (vcpu, start) in vcpus.iter().zip(&layout.vcpus) {
        vcpu::set_up(vcpu, start, &layout, &vcpu::cpuid_for(&supported, start.apic_id))?;
        if config.count_kernel_instructions == Some(start.index) {
            vcpu::single_step(vcpu, start.index)?;
        }
    }

    let program_names: Vec<String> = config.programs.iter().map(|p| p.name.clone()).collect();
    let mut state = RunState::new(started, &program_names, vcpus.len());
    state.profile_kernel = config.profile_kernel && config.count_kernel_instructions.is_some();
    let trace = match config.trace {
        true => {
            let meta = TraceMeta::new(topology, tsc_khz, &program_names, &config.kernel_origin);
            Some(TraceSession::new(&mem, &layout, &vcpus, meta, TraceOptions::from_env())?)
        }
        false => None,
    };
    let latency = LatencyCharger::new(topology, vcpus.len()).with_tsc_khz(tsc_khz);
    let context =
        HypercallContext { mem: &mem, sink, program_names: &program_names, trace: trace.as_ref(), latency: &latency };
    vcpu::install_kick_handler().map_err(VmError::KickHandler)?;
    let kicker = Kicker::default();
    let gate = StartGate::default();
    // The filters are built before any thread starts (building one allocates and can fail).
    let pid = std::process::id();
    let confined = |role| match (config.seccomp, role) {
        (Seccomp::Off, _) | (Seccomp::VmThreads, Role::Main) => false,
        (Seccomp::VmThreads | Seccomp::AllThreads, _) => true,
    };
    let vcpu_filters = vcpus
        .iter()
        .enumerate()
        .map(|(index, vcpu)| {
            confined(Role::Vcpu).then(|| seccomp::filter(Role::Vcpu, index as u32, vcpu.as_raw_fd(), pid)).transpose()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let drainer_filter = confined(Role::Drainer).then(|| seccomp::filter(Role::Drainer, 0, -1, pid)).transpose()?;
    let main_filter = confined(Role::Main).then(|| seccomp::filter(Role::Main, 0, -1, pid)).transpose()?;
    let probe = |role: Role, name: &str| {
        if config.seccomp_probe == Some(role) && seccomp::probe() {
            sink.vmm_note(&format!("seccomp probe: the {name} thread opened a socket: it is not confined"));
        }
    };
    let confine = |filter: Option<&seccompiler::BpfProgram>, role, index| match filter {
        Some(filter) => seccomp::confine(filter, role, index).map_err(VmError::from),
        None => Ok(()),
    };

    let end = std::thread::scope(|scope| -> Result<GuestEnd, VmError> {
        let mut failure = None;
        let mut handles = Vec::with_capacity(vcpus.len());
        for ((index, vcpu), filter) in vcpus.iter_mut().enumerate().zip(&vcpu_filters) {
            let index = index as u32;
            let (context, state, kicker, gate, probe, confine) = (&context, &state, &kicker, &gate, &probe, &confine);
            let spawned = if config.fail_vcpu_thread == Some(index) {
                Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
            } else {
                std::thread::Builder::new().name(format!("vcpu{index}")).spawn_scoped(scope, move || {
                    if gate.arrive_and_wait(confine(filter.as_ref(), Role::Vcpu, index)) {
                        if index == 0 {
                            probe(Role::Vcpu, "vcpu0");
                        }
                        vcpu::run(vcpu, index, context, state, kicker);
                    }
                })
            };
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(source) => {
                    failure = Some(VmError::Thread { index, source });
                    break;
                }
            }
        }
        let mut threads = handles.len();
        if let (None, Some(trace)) = (&failure, &trace) {
            let (gate, probe, confine, filter) = (&gate, &probe, &confine, drainer_filter.as_ref());
            let ready = move || {
                let go = gate.arrive_and_wait(confine(filter, Role::Drainer, 0));
                if go {
                    probe(Role::Drainer, "trace-drainer");
                }
                go
            };
            if trace.spawn_drainer(scope, &state, sink, ready) {
                threads += 1;
            }
        }
        // Every thread that started waits at the gate, confined, so none has run a guest
        // instruction yet; the caller's own thread is confined last, when it has nothing left
        // to start.
        let failure =
            failure.or_else(|| gate.wait_for(threads)).or_else(|| confine(main_filter.as_ref(), Role::Main, 0).err());
        gate.decide(failure.is_none());
        if let Some(error) = failure {
            // The threads return from the gate without running anything; the scope joins them.
            return Err(error);
        }
        probe(Role::Main, "main");
        let end = state.wait(config.timeout);
        // The stop flag is set: one kick takes each vCPU out of KVM_RUN at once.
        kicker.kick_all();
        for handle in handles {
            // A vCPU thread only ends by returning; a panic there is a VMM bug that
            // panic = "abort" has already reported.
            let _ = handle.join();
        }
        Ok(end)
    })?;

    let stop = state.stop_asked.get().map_or(Duration::ZERO, Instant::elapsed);
    let boot = state.first_program.lock().ok().and_then(|first| *first);
    let mut guest = state.report.lock().ok().and_then(|report| report.clone());
    if let Some(guest) = &mut guest {
        guest.latency = state.latency_report();
    }
    let programs = state.programs.lock().map(|p| p.clone()).unwrap_or_default();
    let marks = state.marks.lock().map(|m| m.clone()).unwrap_or_default();
    let kernel_rips = state.kernel_rips.lock().map(|r| r.clone()).unwrap_or_default();
    let trace = trace.map(|session| session.finish(&vcpus));
    Ok(Outcome {
        end,
        vcpus: topology.cpu_count(),
        nodes: topology.node_count(),
        boot,
        wall: started.elapsed(),
        stop,
        guest,
        programs,
        trace,
        marks,
        tsc_khz,
        kernel_rips,
        latency: latency.mode().traps().then(|| latency.totals()),
    })
}

/// Gives KVM one memory slot per node region.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| VmError::Kvm { what: "mapping guest memory", source: kvm_ioctls::Error::new(libc::EFAULT) })?;
        let slot_info = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM's use of
        // it (the vCPUs stop before `run` returns and drops both).
        unsafe { vm.set_user_memory_region(slot_info) }
            .map_err(|source| VmError::Kvm { what: "KVM_SET_USER_MEMORY_REGION", source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_s_own_statuses_are_no_guest_code_and_no_shell_status() {
        let mut seen = std::collections::BTreeSet::new();
        for status in status::ALL {
            assert!(u64::from(status) > MAX_PASSTHROUGH_EXIT_CODE, "{status} is also a guest exit code");
            assert!(status <= 125, "{status} means something else to a shell");
            assert!(seen.insert(status), "{status} stands for two outcomes");
        }
    }
}

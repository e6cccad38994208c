//! The `psyche-vmm` command line. `main.rs` only calls [`main`]; everything else is here so
//! that the binary's behaviour (exit statuses included) is one function tests can call.

use std::borrow::Cow;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::boot::ProgramImage;
use crate::console::{ConsoleSink, StdioSink};
use crate::images;
use crate::seccomp::{Role, Seccomp};
use crate::topology::{self, LatencyMode, Topology};
use crate::trace;
use crate::vm::{self, status, GuestEnd, Outcome, VmConfig};

const AFTER_HELP: &str = "\
EXIT STATUS:
    0..=119  the guest's exit code (the first non-zero exit code of its programs)
    120      the guest exited with a code above 119
    121      host error (no usable /dev/kvm, out of memory, ...), or a psyche-vmm thread
             stopped by its seccomp filter (the message names the thread and the call)
    122      bad input: command line, topology file, kernel or program image, trace file
    123      the kernel ended a program: a fault, or a broken realm rule (the reason is printed)
    124      --timeout expired
    125      the guest kernel crashed (exception, panic, triple fault, failed entry)

EXAMPLES:
    psyche-vmm --topology topologies/butterfly.toml
    psyche-vmm --topology uma.toml --program exit -- 37
    psyche-vmm --topology uma --program realms --program hello --quota 0:realms=8,memory=16M -- exhaust
    psyche-vmm topology show butterfly.toml
    psyche-vmm --topology uma --trace run.json --program gates -- 1000
    psyche-vmm profile run.json --flamegraph run.svg";

/// Boot the Psyche guest kernel on a NUMA machine described by a topology file.
///
/// Guest console output goes to stdout, one line at a time tagged with its vCPU and its writer
/// (`[vcpu 0 kernel]`, `[vcpu 3 hello#3]`), control bytes escaped; the VMM's own messages and the
/// closing summary go to stderr.
#[derive(Debug, Parser)]
#[command(name = "psyche-vmm", version, after_help = AFTER_HELP, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect topology files.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// List the programs built into this binary (names usable with --program).
    Programs,
    /// Summarise a trace written by --trace: per invocation path (gate:<system call>,
    /// protected:<realm>/<operation>, upcall:<kind>) count, mean, p50, p99 and max in cycles and
    /// ns; per realm opens, page faults, remote latency traps and migrations; per vCPU the time
    /// split between user, kernel, idle and latency charges.
    Profile {
        /// The trace file (Chrome trace-event JSON written by `psyche-vmm --trace PATH`).
        #[arg(value_name = "TRACE")]
        trace: PathBuf,
        /// Also draw a flame graph of the invocation paths (SVG), stacks like
        /// `vcpu0;program 0;gate:write` weighted by cycles.
        #[arg(long, value_name = "OUT.svg")]
        flamegraph: Option<PathBuf>,
    },
    /// Benchmark the invocation paths inside the guest (TSC cycles: median and p99, per
    /// operation) and count the kernel instructions of each path by single-stepping the kernel
    /// in a second run.
    ///
    /// On a topology with a [latency] table, also measure remote-memory accesses
    /// (remote_access): the guest program `numa matrix N` reads a page homed on every
    /// node from every node, with migration off, in exact, account and window mode. Per node
    /// pair it reports the configured latency; what the VMM really spent per charge (host
    /// clock, exact run: the charging's accuracy); the guest-observed extra cost of a remote
    /// access (the kernel's TSC cycles around each charge, per trap, exact minus account run,
    /// and whether that is within 10% of configured); and the trap floor (the program's time
    /// per remote read in the account run, where nothing is charged), next to the local read.
    /// Up to 8 nodes as node x node matrices, beyond as min/median/max over the pairs and the
    /// worst pairs. The window run gives what the VMM spent per window charge. Under a nested
    /// KVM the floor (hundreds of us) and host noise dwarf latencies of 0.1 to 4 us, so the
    /// guest-observed extra is noise there; the VMM-spent numbers are not.
    Bench {
        /// The machine to run on (a file or a shipped name).
        #[arg(long, short = 't', value_name = "FILE")]
        topology: String,
        /// Also write the results as JSON: [{"path", "n", "cycles_median", "cycles_p99",
        /// "ns_median", "kernel_instructions"}, ...], then the remote_access rows:
        /// {"path": "remote_access F->T", "from", "to", "n" (charges in the exact run),
        /// "configured_ns", "spent_ns", "guest_extra_ns", "floor_ns", "within_10pct"} per
        /// pair (null where not measured) and {"path": "remote_access window", "n",
        /// "configured_ns", "spent_ns" (means per window charge), "spent_over_charged_pair_median"}.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
        /// Skip the (slower) run that counts kernel instructions.
        #[arg(long)]
        no_count: bool,
        /// Charge remote-memory latency this way in the invocation-path runs instead of as the
        /// topology says (see the option of the same name when booting). The remote_access
        /// runs always use exact, account and window.
        #[arg(long, value_name = "MODE")]
        latency_mode: Option<LatencyMode>,
        /// Reads the remote_access program times per node pair (1 to 256; every read of a
        /// remote page traps, at about 0.4 ms each under a nested KVM).
        #[arg(long, value_name = "N", default_value_t = crate::bench::remote::DEFAULT_ACCESSES,
              value_parser = clap::value_parser!(u64).range(1..=crate::bench::remote::MAX_ACCESSES))]
        remote_accesses: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Print the machine a topology file describes, the way `numactl --hardware` does.
    Show {
        /// A topology file, or the name of a shipped one (e.g. `butterfly`).
        file: String,
    },
    /// List the shipped topologies.
    List,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The machine to boot: a topology TOML file, or the name of a shipped topology
    /// (butterfly, uma, two-socket, ring8, asymmetric) when no such file exists.
    #[arg(long, short = 't', value_name = "FILE")]
    pub topology: Option<String>,

    /// The guest kernel ELF [default: the kernel built into this binary].
    #[arg(long, value_name = "ELF")]
    pub kernel: Option<PathBuf>,

    /// A guest program to run: an ELF file (a static PIE built on realm-sdk) or the name of a
    /// built-in program (see `psyche-vmm programs`). Repeat for several programs (at most 16);
    /// program k runs on vCPU k mod (vCPUs), and a vCPU with several time-slices them.
    /// [default: hello]
    #[arg(long = "program", short = 'p', value_name = "PROGRAM")]
    pub programs: Vec<String>,

    /// The kernel command line: `timer=off` skips the LAPIC timer check at boot;
    /// `crash=page-fault|invalid-opcode|triple-fault|panic` makes the kernel crash on purpose
    /// after boot (to see how crashes are reported); `migrate=N` moves a realm to a node once
    /// N of its latency traps came from there (default 64), `migrate=off` never moves one;
    /// `quota=...` is what --quota passes on.
    #[arg(long, value_name = "OPTIONS", default_value = "")]
    pub cmdline: String,

    /// A share of the machine, instead of the fair default (by default every program gets an
    /// equal part of each node's free memory, of the 496 realm ids and of the 64 names):
    /// `realms=N,memory=SIZE,names=N` (any of the three) for every program, or `K:realms=N,...`
    /// for program K (which wins over the form for every program). memory is what the program
    /// may hold on each node (its realms' frames, page tables, stack, views and work areas),
    /// like "4M". A program over its share gets OverQuota from the call; the others keep theirs.
    /// Repeatable; shares above the default can add up to more than the machine has.
    #[arg(long, value_name = "[K:]SHARE", value_parser = parse_quota)]
    pub quota: Vec<Quota>,

    /// How remote-memory accesses are charged, instead of the topology's `[latency] mode` (any
    /// mode but off needs a `[latency]` table). The kernel traps a CPU's touches of memory
    /// homed on another node and the VMM charges the topology's latency for the node pair; the
    /// closing summary and --summary-json report the traps and the time charged.
    #[arg(long, value_name = "MODE")]
    pub latency_mode: Option<LatencyMode>,

    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,

    /// Write a JSON summary of the run here: exit code, sizes, boot and wall time, and the
    /// machine as the guest kernel reported it.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,

    /// Trace the run into PATH: the kernel's events (gate calls, faults, invocations, upcalls,
    /// ticks, program start and exit) and the VM exits, per vCPU, as Chrome trace-event JSON
    /// that ui.perfetto.dev and chrome://tracing open; `psyche-vmm profile PATH` summarises it.
    /// Boots the built-in kernel with tracing compiled in, unless --kernel is given.
    #[arg(long, value_name = "PATH")]
    pub trace: Option<PathBuf>,

    /// Single-step the kernel on this vCPU and count its instructions (user code runs
    /// unstepped); the counts at each program mark (`realm_sdk::sys::mark`) are printed at the
    /// end. Slow: for measuring kernel paths.
    #[arg(long, value_name = "VCPU", num_args = 0..=1, default_missing_value = "0")]
    pub count_kernel_instructions: Option<u32>,

    /// With --count-kernel-instructions: also attribute every kernel instruction stepped to
    /// its function (the kernel image's symbols) and print the functions that ran the most.
    #[arg(long, requires = "count_kernel_instructions")]
    pub profile_kernel: bool,

    /// Run without the seccomp filters that otherwise confine every psyche-vmm thread to the
    /// system calls it needs from before the guest's first instruction (a vCPU thread: KVM_RUN
    /// and register reads on its own vCPU, writes, memory, futexes, clocks, exit). For
    /// debugging, e.g. with strace; with the filters on, a thread that makes another call is
    /// stopped with a message naming it, and exit status 121.
    #[arg(long)]
    pub no_seccomp: bool,

    /// Testing only: make a thread of this kind attempt a system call no filter allows, to
    /// check that it is stopped.
    #[arg(long, value_name = "THREAD", hide = true)]
    pub seccomp_probe: Option<Role>,

    /// Arguments for the guest programs (after `--`).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

/// One `--quota`: a share for every program, or for one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quota {
    /// The program it is for (`None`: every program).
    pub program: Option<usize>,
    pub realms: Option<u64>,
    /// Bytes per node.
    pub memory: Option<u64>,
    pub names: Option<u64>,
}

impl Quota {
    /// The kernel command-line word that says the same (`quota=[K:]realms=N,memory=SIZE,names=N`).
    pub fn kernel_word(&self) -> String {
        let mut pairs = Vec::new();
        if let Some(realms) = self.realms {
            pairs.push(format!("realms={realms}"));
        }
        if let Some(memory) = self.memory {
            pairs.push(format!("memory={}", topology::format_size(memory)));
        }
        if let Some(names) = self.names {
            pairs.push(format!("names={names}"));
        }
        let program = self.program.map(|k| format!("{k}:")).unwrap_or_default();
        format!("quota={program}{}", pairs.join(","))
    }
}

/// Parses a `--quota` value: `[K:]key=value,...` with keys realms, memory and names.
pub fn parse_quota(text: &str) -> Result<Quota, String> {
    let (program, pairs) = match text.split_once(':') {
        Some((k, rest)) => {
            let k: usize = k
                .parse()
                .ok()
                .filter(|&k| k < psyche_abi::MAX_PROGRAMS)
                .ok_or_else(|| format!("'{k}' is not a program index (0 to {})", psyche_abi::MAX_PROGRAMS - 1))?;
            (Some(k), rest)
        }
        None => (None, text),
    };
    let mut quota = Quota { program, ..Quota::default() };
    if pairs.is_empty() {
        return Err("give at least one of realms=N, memory=SIZE, names=N".to_owned());
    }
    for pair in pairs.split(',') {
        let (key, value) =
            pair.split_once('=').ok_or_else(|| format!("'{pair}' is not key=value (keys: realms, memory, names)"))?;
        let count = || {
            value
                .parse::<u64>()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("{key}: '{value}' is not a number"))
        };
        let (slot, parsed) = match key {
            "realms" => (&mut quota.realms, count()?),
            "names" => (&mut quota.names, count()?),
            "memory" => (
                &mut quota.memory,
                topology::parse_size(value).ok_or_else(|| {
                    format!("memory: '{value}' is not a size: use a number of bytes or a number with a K, M, G or T suffix, like \"4M\"")
                })?,
            ),
            _ => return Err(format!("unknown share '{key}' (known: realms, memory, names)")),
        };
        if slot.replace(parsed).is_some() {
            return Err(format!("{key} is given twice"));
        }
    }
    Ok(quota)
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text.parse().map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !(seconds > 0.0 && seconds <= 365.0 * 86400.0) {
        return Err(format!("{text} is not a usable timeout: give a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A failure before the guest runs: the message and the exit status.
struct Failure {
    message: String,
    status: u8,
}

impl Failure {
    fn bad_input(message: impl Into<String>) -> Self {
        Self { message: message.into(), status: status::BAD_INPUT }
    }
}

/// Runs psyche-vmm with `args` (including the program name); returns the exit status.
pub fn main<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() { status::BAD_INPUT } else { 0 };
        }
    };
    let result = match cli.command {
        Some(Command::Topology(TopologyCommand::Show { file })) => show_topology(&file),
        Some(Command::Topology(TopologyCommand::List)) => {
            let names: String = topology::builtin_names().map(|name| format!("{name}\n")).collect();
            print_out(&names);
            Ok(0)
        }
        Some(Command::Programs) => {
            let names: String = images::PROGRAMS.iter().map(|(name, _)| format!("{name}\n")).collect();
            print_out(&names);
            Ok(0)
        }
        Some(Command::Profile { trace, flamegraph }) => profile(&trace, flamegraph.as_deref()),
        Some(Command::Bench { topology, json, no_count, latency_mode, remote_accesses }) => {
            bench(&topology, latency_mode, json.as_deref(), !no_count, remote_accesses)
        }
        None => run(&cli.run, &StdioSink),
    };
    match result {
        Ok(status) => status,
        Err(failure) => {
            print_err(&format!("psyche-vmm: {}\n", failure.message));
            failure.status
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error worth dying for.
fn print_out(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// Writes to stderr, ignoring failures like [`print_out`].
fn print_err(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

fn bench(
    topology: &str,
    latency_mode: Option<LatencyMode>,
    json: Option<&Path>,
    count: bool,
    remote_accesses: u64,
) -> Result<u8, Failure> {
    let topology = machine(topology, latency_mode)?;
    // An unwritable JSON path is found before the benchmark runs.
    let json_file = json
        .map(|path| {
            std::fs::File::create(path)
                .map_err(|e| Failure::bad_input(format!("cannot write the results to {}: {e}", path.display())))
        })
        .transpose()?;
    let skipped = crate::bench::remote::skipped(&topology);
    print_err(&format!(
        "psyche-vmm: benchmarking on {}{}{}\n",
        topology.name,
        if count { ", then counting kernel instructions" } else { "" },
        if skipped.is_none() { ", then timing remote accesses" } else { "" }
    ));
    let host_error = |e: crate::bench::BenchError| Failure { message: e.to_string(), status: status::HOST_ERROR };
    let results = crate::bench::run(&topology, count).map_err(host_error)?;
    print_out(&crate::bench::table(&results));
    let mut rows: Vec<serde_json::Value> =
        results.iter().filter_map(|result| serde_json::to_value(result).ok()).collect();
    match skipped {
        Some(reason) => print_out(&format!("{reason}\n")),
        None => {
            let remote = crate::bench::remote::run(&topology, remote_accesses).map_err(host_error)?;
            print_out(&crate::bench::remote::table(&remote));
            rows.extend(crate::bench::remote::json_rows(&remote));
        }
    }
    if let Some(mut file) = json_file {
        let text = serde_json::to_string_pretty(&rows).unwrap_or_default();
        file.write_all(text.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .map_err(|e| Failure { message: format!("cannot write the results: {e}"), status: status::HOST_ERROR })?;
    }
    Ok(0)
}

fn show_topology(file: &str) -> Result<u8, Failure> {
    let topology = topology::resolve(file).map_err(|e| Failure::bad_input(e.to_string()))?;
    print_out(&topology.numactl_hardware());
    Ok(0)
}

/// The topology `arg` names, with its latency mode replaced by `latency_mode` if given.
fn machine(arg: &str, latency_mode: Option<LatencyMode>) -> Result<Topology, Failure> {
    let topology = topology::resolve(arg).map_err(|e| Failure::bad_input(e.to_string()))?;
    match latency_mode {
        Some(mode) => topology.with_latency_mode(mode).map_err(|e| Failure::bad_input(format!("--latency-mode: {e}"))),
        None => Ok(topology),
    }
}

/// Builds the VM configuration from the command line.
fn config(args: &RunArgs) -> Result<VmConfig, Failure> {
    let Some(topology_arg) = &args.topology else {
        return Err(Failure::bad_input(
            "no machine given: use --topology FILE (try --topology butterfly.toml, or --help)",
        ));
    };
    let topology = machine(topology_arg, args.latency_mode)?;
    let (kernel, kernel_origin) = match &args.kernel {
        Some(path) => {
            let bytes = std::fs::read(path)
                .map_err(|e| Failure::bad_input(format!("cannot read kernel {}: {e}", path.display())))?;
            (Cow::Owned(bytes), path.display().to_string())
        }
        None if args.trace.is_some() => (Cow::Borrowed(images::KERNEL_TRACED), images::KERNEL_TRACED_ORIGIN.to_owned()),
        None => (Cow::Borrowed(images::KERNEL), images::KERNEL_ORIGIN.to_owned()),
    };
    let names = if args.programs.is_empty() { vec![images::DEFAULT_PROGRAM.to_owned()] } else { args.programs.clone() };
    let programs: Vec<ProgramImage> = names.iter().map(|name| load_program(name)).collect::<Result<_, _>>()?;
    // Shares reach the kernel as `quota=` words on its command line.
    let mut cmdline = args.cmdline.clone();
    for quota in &args.quota {
        if let Some(k) = quota.program.filter(|&k| k >= programs.len()) {
            return Err(Failure::bad_input(format!(
                "--quota {k}:...: there is no program {k} (this boot runs {} program{})",
                programs.len(),
                if programs.len() == 1 { "" } else { "s" }
            )));
        }
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&quota.kernel_word());
    }
    Ok(VmConfig {
        topology,
        kernel,
        kernel_origin,
        programs,
        args: args.args.clone(),
        cmdline,
        timeout: args.timeout,
        trace: args.trace.is_some(),
        count_kernel_instructions: args.count_kernel_instructions,
        profile_kernel: args.profile_kernel,
        fail_vcpu_thread: None,
        seccomp: if args.no_seccomp { Seccomp::Off } else { Seccomp::AllThreads },
        seccomp_probe: args.seccomp_probe,
    })
}

fn load_program(name: &str) -> Result<ProgramImage, Failure> {
    let path = Path::new(name);
    if path.is_file() {
        let bytes = std::fs::read(path).map_err(|e| Failure::bad_input(format!("cannot read program {name}: {e}")))?;
        return Ok(ProgramImage { name: name.to_owned(), image: Cow::Owned(bytes) });
    }
    match ProgramImage::builtin(name) {
        Some(program) => Ok(program),
        None => {
            let known: Vec<&str> = images::PROGRAMS.iter().map(|(n, _)| *n).collect();
            Err(Failure::bad_input(format!(
                "program {name}: no such file, and no built-in program of that name (built-in: {})",
                known.join(", ")
            )))
        }
    }
}

/// Boots the guest and reports how it ended.
fn run(args: &RunArgs, sink: &dyn ConsoleSink) -> Result<u8, Failure> {
    let config = config(args)?;
    // An unwritable summary path is found before the guest runs, not after.
    let summary_file = match &args.summary_json {
        Some(path) => Some(
            std::fs::File::create(path)
                .map_err(|e| Failure::bad_input(format!("cannot write the summary to {}: {e}", path.display())))?,
        ),
        None => None,
    };
    // So is an unwritable trace path.
    let trace_file = match &args.trace {
        Some(path) => Some(
            std::fs::File::create(path)
                .map_err(|e| Failure::bad_input(format!("cannot write the trace to {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let outcome = vm::run(&config, sink).map_err(|error| {
        let status = match error {
            vm::VmError::Boot(_) => status::BAD_INPUT,
            _ => status::HOST_ERROR,
        };
        Failure { message: error.to_string(), status }
    })?;
    print_err(&summary_text(&config, &outcome));
    if config.profile_kernel {
        match crate::kernel_profile::profile(&config.kernel, &outcome.kernel_rips, 30) {
            Ok(text) => print_err(&text),
            Err(error) => print_err(&format!("psyche-vmm: no kernel profile: {error}\n")),
        }
    }
    if config.count_kernel_instructions.is_some() {
        let marks: String = outcome
            .marks
            .iter()
            .map(|m| {
                format!(
                    "psyche-vmm: mark {} of program {} on vCPU {}: {} kernel instructions so far\n",
                    m.value, m.program, m.vcpu, m.kernel_instructions
                )
            })
            .collect();
        print_err(&marks);
    }
    if let (Some(file), Some(path), Some(trace)) = (trace_file, &args.trace, &outcome.trace) {
        print_err(&trace_text(&config, trace, path));
        let analysis = trace::analysis::analyze(trace);
        let mut out = std::io::BufWriter::new(file);
        trace::chrome::write(trace, &analysis, &mut out).and_then(|()| out.flush()).map_err(|e| Failure {
            message: format!("cannot write the trace to {}: {e}", path.display()),
            status: status::HOST_ERROR,
        })?;
    }
    if let Some(mut file) = summary_file {
        let json = summary_json(&config, &outcome);
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        file.write_all(text.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .map_err(|e| Failure { message: format!("cannot write the summary: {e}"), status: status::HOST_ERROR })?;
    }
    Ok(outcome.exit_status())
}

/// What a traced run says about its trace.
fn trace_text(config: &VmConfig, trace: &trace::Trace, path: &Path) -> String {
    let summary = &trace.summary;
    let kinds: Vec<String> = summary.by_kind.iter().map(|(kind, n)| format!("{kind} {n}")).collect();
    let mut text = format!(
        "psyche-vmm: trace: {} records ({}), lost {}, corrupt {}, written to {}\n",
        summary.records,
        kinds.join(", "),
        summary.lost,
        summary.corrupt,
        path.display()
    );
    if summary.lost > 0 {
        text += &format!(
            "psyche-vmm: trace: {} records lost: {} dropped by the kernel (its ring stayed full), {} overwritten in the rings, {} past the VMM's record limit\n",
            summary.lost, summary.lost_kernel, summary.lost_overrun, summary.lost_limit
        );
    }
    for problem in &summary.problems {
        text += &format!("psyche-vmm: trace: corrupt: {problem}\n");
    }
    if !trace.has_guest_records() {
        text += &format!(
            "psyche-vmm: trace: the kernel wrote no trace records: is {} built with its trace feature?\n",
            config.kernel_origin
        );
    }
    text
}

/// `psyche-vmm profile`: prints the profile of a trace file, and draws its flame graph.
fn profile(path: &Path, flamegraph: Option<&Path>) -> Result<u8, Failure> {
    let trace = trace::chrome::read(path).map_err(|e| Failure::bad_input(e.to_string()))?;
    let analysis = trace::analysis::analyze(&trace);
    print_out(&trace::profile::text(&trace, &analysis, &path.display().to_string()));
    if let Some(out) = flamegraph {
        let title = format!("psyche-vmm: {} ({})", path.display(), trace.meta.topology);
        let mut svg = Vec::new();
        trace::profile::flamegraph(&analysis, &title, &mut svg)
            .map_err(|e| Failure::bad_input(format!("no flame graph for {}: {e}", path.display())))?;
        std::fs::write(out, svg)
            .map_err(|e| Failure::bad_input(format!("cannot write the flame graph to {}: {e}", out.display())))?;
    }
    Ok(0)
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

/// The closing summary, for people.
pub fn summary_text(config: &VmConfig, outcome: &Outcome) -> String {
    let mut text = String::new();
    let ending = match &outcome.end {
        GuestEnd::Shutdown { code } if outcome.program_faulted() => {
            format!("the guest shut down with code {code} after the kernel killed a program")
        }
        GuestEnd::Shutdown { code } if outcome.exit_status() == status::EXIT_CODE_OUT_OF_RANGE => {
            format!("the guest exited with code {code}, above the pass-through range 0..=119")
        }
        GuestEnd::Shutdown { code } => format!("the guest exited with code {code}"),
        GuestEnd::TimedOut { after } => format!("stopped the guest after the {:.3} s timeout", after.as_secs_f64()),
        GuestEnd::KernelCrash { vcpu, reason, registers } => {
            let mut line = format!("the guest kernel crashed on vCPU {vcpu}: {reason}");
            if let Some(r) = registers {
                line += &format!(
                    "\n    rip {:#x}  rsp {:#x}  rflags {:#x}  cs {:#x}  cr0 {:#x}  cr2 {:#x}  cr3 {:#x}",
                    r.rip, r.rsp, r.rflags, r.cs, r.cr0, r.cr2, r.cr3
                );
            }
            line
        }
    };
    text += &format!("psyche-vmm: {ending} (exit status {})\n", outcome.exit_status());
    let online = outcome
        .guest
        .as_ref()
        .map_or("no report from the kernel".to_owned(), |g| format!("the kernel saw {} online", g.cpus_online));
    text += &format!(
        "psyche-vmm: machine {}: {} vCPUs on {} nodes ({online})\n",
        config.topology.name, outcome.vcpus, outcome.nodes
    );
    let boot = outcome.boot.map_or("no program started".to_owned(), |b| format!("boot {:.1} ms", millis(b)));
    text += &format!("psyche-vmm: {boot}, wall {:.1} ms\n", millis(outcome.wall));
    text += &latency_text(outcome);
    text
}

/// Nodes up to which the summary shows remote traps as a full from/to table.
const LATENCY_TABLE_MAX_NODES: usize = 8;
/// Node pairs the summary lists when the table would be larger.
const LATENCY_TOP_PAIRS: usize = 5;

/// Nanoseconds in the unit that suits them.
fn ns_text(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.1} us", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.3} s", ns as f64 / 1e9),
    }
}

/// The summary's latency section: what the VMM charged, what the kernel reported. Empty when
/// latency is off.
fn latency_text(outcome: &Outcome) -> String {
    let Some(latency) = &outcome.latency else { return String::new() };
    let mut text = format!(
        "psyche-vmm: latency {}: {} remote traps charged, {} in total\n",
        latency.mode,
        latency.total_charges(),
        ns_text(latency.total_charged_ns())
    );
    let nodes = latency.charges.len();
    if latency.total_charges() > 0 && nodes <= LATENCY_TABLE_MAX_NODES {
        text += "psyche-vmm:   traps from node (row) to node (column):\n";
        let header: String = (0..nodes).map(|to| format!(" {to:>9}")).collect();
        text += &format!("psyche-vmm:   {:>4}{header}\n", "");
        for (from, row) in latency.charges.iter().enumerate() {
            let cells: String = row.iter().map(|count| format!(" {count:>9}")).collect();
            text += &format!("psyche-vmm:   {from:>4}{cells}\n");
        }
    } else if latency.total_charges() > 0 {
        let mut pairs: Vec<(u64, u64, usize, usize)> = latency
            .charges
            .iter()
            .zip(&latency.charged_ns)
            .enumerate()
            .flat_map(|(from, (counts, ns))| {
                counts.iter().zip(ns).enumerate().map(move |(to, (&count, &ns))| (ns, count, from, to))
            })
            .filter(|&(_, count, _, _)| count > 0)
            .collect();
        pairs.sort_unstable_by(|a, b| b.cmp(a));
        let top: Vec<String> = pairs
            .iter()
            .take(LATENCY_TOP_PAIRS)
            .map(|&(ns, count, from, to)| format!("{from}->{to} {count} ({})", ns_text(ns)))
            .collect();
        text += &format!("psyche-vmm:   most charged node pairs: {}\n", top.join(", "));
    }
    if matches!(latency.mode, LatencyMode::Window | LatencyMode::Exact) && latency.total_charged_ns() > 0 {
        let spent = latency.total_spent_ns();
        text += &format!(
            "psyche-vmm:   spent on the host clock: {} ({:.1}% of the charged time)\n",
            ns_text(spent),
            100.0 * spent as f64 / latency.total_charged_ns() as f64
        );
    }
    if latency.mode == LatencyMode::Account {
        let clocks = &latency.virtual_ns;
        let total: u64 = clocks.iter().sum();
        let per_vcpu = if total == 0 {
            String::new()
        } else if clocks.len() <= LATENCY_TABLE_MAX_NODES {
            let each: Vec<String> = clocks.iter().enumerate().map(|(v, &ns)| format!("{v}: {}", ns_text(ns))).collect();
            format!("; per vCPU {}", each.join(", "))
        } else {
            let (busiest, most) = clocks.iter().enumerate().max_by_key(|&(_, ns)| *ns).unwrap_or((0, &0));
            format!("; most on vCPU {busiest}: {}", ns_text(*most))
        };
        text += &format!("psyche-vmm:   virtual clock: {} in total{per_vcpu}\n", ns_text(total));
    }
    match outcome.guest.as_ref().and_then(|guest| guest.latency.as_ref()) {
        Some(report) => {
            let traps: u64 = report.traps.iter().flatten().sum();
            text += &format!(
                "psyche-vmm:   the kernel counted {traps} latency traps and {} realm migrations\n",
                report.migrations
            );
        }
        None => text += "psyche-vmm:   no latency report from the kernel\n",
    }
    text
}

/// The `--summary-json` document. Everything under "guest" is what the guest kernel reported.
pub fn summary_json(config: &VmConfig, outcome: &Outcome) -> serde_json::Value {
    let end = match &outcome.end {
        GuestEnd::Shutdown { .. } if outcome.program_faulted() => json!({"kind": "program-fault"}),
        GuestEnd::Shutdown { .. } => json!({"kind": "exited"}),
        GuestEnd::TimedOut { after } => json!({"kind": "timeout", "after_ms": millis(*after)}),
        GuestEnd::KernelCrash { vcpu, reason, registers } => {
            json!({"kind": "kernel-crash", "vcpu": vcpu, "reason": reason.to_string(), "registers": registers})
        }
    };
    json!({
        "exit_code": outcome.guest_exit_code(),
        "exit_status": outcome.exit_status(),
        "end": end,
        "topology": config.topology.name,
        "vcpus": outcome.vcpus,
        "nodes": outcome.nodes,
        "boot_ms": outcome.boot.map(millis),
        "wall_ms": millis(outcome.wall),
        "stop_ms": millis(outcome.stop),
        "programs": outcome.programs,
        "guest": outcome.guest,
        "latency": outcome.latency,
        "trace": outcome.trace.as_ref().map(|trace| &trace.summary),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::latency::{GuestLatencyReport, LatencyTotals};
    use crate::vm::GuestReport;

    fn outcome(nodes: usize, latency: Option<LatencyTotals>, guest_latency: Option<GuestLatencyReport>) -> Outcome {
        let guest = GuestReport {
            cpus_online: 2,
            lapic_timer_hz: 1,
            nodes: Vec::new(),
            distances: Vec::new(),
            latency: guest_latency,
        };
        Outcome {
            end: GuestEnd::Shutdown { code: 0 },
            vcpus: 2,
            nodes,
            boot: None,
            wall: Duration::from_millis(5),
            stop: Duration::from_micros(40),
            guest: Some(guest),
            programs: Vec::new(),
            trace: None,
            marks: Vec::new(),
            tsc_khz: 0,
            kernel_rips: Vec::new(),
            latency,
        }
    }

    fn totals(mode: LatencyMode, charges: Vec<Vec<u64>>, virtual_ns: Vec<u64>) -> LatencyTotals {
        let charged_ns = charges.iter().map(|row| row.iter().map(|n| n * 300).collect()).collect();
        let spent_ns = vec![vec![0; charges.len()]; charges.len()];
        LatencyTotals { mode, charges, charged_ns, spent_ns, virtual_ns }
    }

    #[test]
    fn the_latency_summary_shows_a_small_machine_s_table_and_the_kernel_s_report() {
        let latency = totals(LatencyMode::Account, vec![vec![0, 4], vec![6, 0]], vec![1200, 1800]);
        let report = GuestLatencyReport {
            mode: LatencyMode::Account,
            traps: vec![vec![0, 4], vec![6, 0]],
            charged_ns: vec![vec![0, 1200], vec![1800, 0]],
            charge_cycles: vec![vec![0, 90_000], vec![120_000, 0]],
            migrations: 2,
        };
        let text = latency_text(&outcome(2, Some(latency), Some(report)));
        assert!(text.contains("latency account: 10 remote traps charged, 3.0 us in total"), "{text}");
        assert!(text.contains("   1         6         0\n"), "{text}");
        assert!(text.contains("virtual clock: 3.0 us in total; per vCPU 0: 1.2 us, 1: 1.8 us"), "{text}");
        assert!(text.contains("the kernel counted 10 latency traps and 2 realm migrations"), "{text}");
        assert_eq!(latency_text(&outcome(2, None, None)), "", "nothing when latency is off");
    }

    #[test]
    fn a_large_machine_gets_its_top_pairs_not_a_table() {
        let mut charges = vec![vec![0u64; 12]; 12];
        (charges[3][4], charges[5][1], charges[0][11]) = (7, 9, 1);
        let text = latency_text(&outcome(12, Some(totals(LatencyMode::Window, charges, vec![0, 0])), None));
        assert!(text.contains("most charged node pairs: 5->1 9 (2.7 us), 3->4 7 (2.1 us), 0->11 1 (300 ns)"), "{text}");
        assert!(!text.contains("virtual clock"), "{text}");
        assert!(text.contains("no latency report from the kernel"), "{text}");
    }

    #[test]
    fn the_summary_json_has_the_vmm_s_and_the_kernel_s_latency() {
        let topology = Topology::parse(
            "name = \"t\"\n[[node]]\nid = 0\ncpus = [0]\nmemory = \"16M\"\n[[node]]\nid = 1\ncpus = [1]\nmemory = \"16M\"\n",
            "test",
        )
        .unwrap();
        let config = VmConfig::with_defaults(topology);
        let report = GuestLatencyReport {
            mode: LatencyMode::Exact,
            traps: vec![vec![0, 1], vec![0, 0]],
            charged_ns: vec![vec![0, 300], vec![0, 0]],
            charge_cycles: vec![vec![0, 25_000], vec![0, 0]],
            migrations: 0,
        };
        let latency = totals(LatencyMode::Exact, vec![vec![0, 1], vec![0, 0]], vec![0, 0]);
        let json = summary_json(&config, &outcome(2, Some(latency), Some(report)));
        assert_eq!(
            json["latency"],
            json!({
                "mode": "exact",
                "charges": [[0, 1], [0, 0]],
                "charged_ns": [[0, 300], [0, 0]],
                "spent_ns": [[0, 0], [0, 0]],
                "virtual_ns": [0, 0]
            })
        );
        assert_eq!(
            json["guest"]["latency"],
            json!({
                "mode": "exact",
                "traps": [[0, 1], [0, 0]],
                "charged_ns": [[0, 300], [0, 0]],
                "charge_cycles": [[0, 25_000], [0, 0]],
                "migrations": 0
            })
        );
        let json = summary_json(&config, &outcome(2, None, None));
        assert!(json["latency"].is_null() && json["guest"].get("latency").is_none());
    }

    #[test]
    fn quotas_parse_into_kernel_words() {
        let all = parse_quota("realms=8,memory=4M,names=2").unwrap();
        assert_eq!(all, Quota { program: None, realms: Some(8), memory: Some(4 << 20), names: Some(2) });
        assert_eq!(all.kernel_word(), "quota=realms=8,memory=4M,names=2");
        let one = parse_quota("3:memory=12288").unwrap();
        assert_eq!(one.kernel_word(), "quota=3:memory=12K");
        assert_eq!(parse_quota("memory=0").unwrap().kernel_word(), "quota=memory=0");
    }

    #[test]
    fn bad_quotas_say_what_is_wrong() {
        for (text, message) in [
            ("", "give at least one of realms=N, memory=SIZE, names=N"),
            ("7:", "give at least one"),
            ("16:realms=1", "'16' is not a program index (0 to 15)"),
            ("x:realms=1", "'x' is not a program index"),
            ("realms", "'realms' is not key=value"),
            ("realms=-1", "realms: '-1' is not a number"),
            ("names=+3", "names: '+3' is not a number"),
            ("memory=4Q", "memory: '4Q' is not a size"),
            ("pages=3", "unknown share 'pages' (known: realms, memory, names)"),
            ("realms=1,realms=2", "realms is given twice"),
            ("realms=1,", "'' is not key=value"),
        ] {
            let error = parse_quota(text).unwrap_err();
            assert!(error.contains(message), "{text}: {error}");
        }
    }

    #[test]
    fn quotas_go_on_the_kernel_command_line_for_programs_that_exist() {
        let cli = Cli::try_parse_from([
            "psyche-vmm",
            "--topology",
            "uma",
            "--program",
            "hello",
            "--program",
            "hello",
            "--cmdline",
            "timer=off",
            "--quota",
            "realms=4",
            "--quota",
            "1:memory=1M",
        ])
        .unwrap();
        let built = config(&cli.run).unwrap_or_else(|f| panic!("{}", f.message));
        assert_eq!(built.cmdline, "timer=off quota=realms=4 quota=1:memory=1M");
        let cli = Cli::try_parse_from(["psyche-vmm", "--topology", "uma", "--quota", "1:realms=4"]).unwrap();
        let Err(failure) = config(&cli.run) else { panic!("program 1 does not exist") };
        assert_eq!(failure.status, status::BAD_INPUT);
        assert!(failure.message.contains("there is no program 1 (this boot runs 1 program)"), "{}", failure.message);
    }
}

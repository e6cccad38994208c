//! `psyche-vmm bench`: the invocation-path benchmark. The guest program `bench` times each path
//! inside the guest with the TSC; a second run single-steps the kernel to count the kernel
//! instructions of each path between program marks. This module runs both and puts the
//! numbers together. [`remote`] measures what a remote-memory access costs.

pub mod remote;

use std::time::Duration;

use serde::Serialize;

use crate::boot::ProgramImage;
use crate::console::CaptureSink;
use crate::topology::Topology;
use crate::vm::{self, GuestEnd, Mark, VmConfig, VmError};

/// One path's numbers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PathResult {
    pub path: String,
    /// Samples taken.
    pub n: u64,
    /// Median cycles per operation.
    pub cycles_median: f64,
    /// 99th-percentile cycles per operation.
    pub cycles_p99: f64,
    /// The median in nanoseconds (from the TSC frequency KVM reports).
    pub ns_median: f64,
    /// Kernel (CPL0) instructions one operation executes, counted by single-stepping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_instructions: Option<f64>,
}

/// Why the benchmark did not produce numbers.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("the benchmark guest did not finish cleanly: {0}")]
    Guest(String),
    #[error("the benchmark guest printed no result for {0}")]
    Missing(&'static str),
}

/// The paths, in the order the guest reports them, and the marks that bracket each in the
/// counting run (see realm-sdk/programs/src/bin/bench.rs).
const PATHS: [(&str, u64); 8] = [
    ("procedure_call", 2),
    ("inline_access", 4),
    ("optimized_invocation", 6),
    ("null_kernel_gate", 8),
    ("optimized_first_touch", 10),
    ("protected_invocation", 12),
    ("upcall_delivery", 14),
    ("thread_switch_user", 16),
];
/// Per marked run, how many operations of the path happen (a yield there and back is two
/// thread switches).
fn operations_per_run(path: &str) -> f64 {
    if path == "thread_switch_user" {
        2.0
    } else {
        1.0
    }
}
/// Runs of each path between its marks in the counting run.
const COUNTED_RUNS: f64 = 10.0;

/// The benchmark guest on `topology`. The invocation paths are measured without latency traps
/// (they are the kernel's mechanisms; remote-memory costs are the `remote_access` rows), except
/// in the `placed` run, which keeps the topology's latency mode.
fn config(topology: &Topology, args: &[&str], count: bool) -> VmConfig {
    let machine = if args.first() == Some(&"placed") {
        topology.clone()
    } else {
        topology.clone().with_latency_mode(crate::topology::LatencyMode::Off).unwrap_or_else(|_| topology.clone())
    };
    let mut config = VmConfig::with_defaults(machine);
    // Program 0 measures; program 1 serves the null operation to the key both are given.
    let bench = ProgramImage::builtin("bench").expect("the bench program is built in");
    config.programs = vec![bench.clone(), bench];
    let key = format!("{:016x}{:016x}", random_u64(), random_u64());
    config.args = args.iter().map(|a| a.to_string()).chain([key]).collect();
    config.timeout = Some(Duration::from_secs(600));
    if count {
        // The program runs on vCPU 0; the LAPIC timer check would only add stepped spinning.
        config.count_kernel_instructions = Some(0);
        config.cmdline = "timer=off".to_owned();
    }
    config
}

fn finished(outcome: &vm::Outcome, console: &CaptureSink) -> Result<(), BenchError> {
    match outcome.end {
        GuestEnd::Shutdown { code: 0 } if !outcome.program_faulted() => Ok(()),
        ref other => Err(BenchError::Guest(format!("{other:?}; guest output:\n{}", console.text()))),
    }
}

/// Parses `bench: path=NAME n=N batch=B median=M p99=P`.
fn parse_line(line: &str) -> Option<(String, u64, f64, f64)> {
    let rest = line.strip_prefix("bench: ")?;
    let field = |name: &str| rest.split(' ').find_map(|word| word.strip_prefix(name)?.strip_prefix('='));
    Some((
        field("path")?.to_owned(),
        field("n")?.parse().ok()?,
        field("median")?.parse().ok()?,
        field("p99")?.parse().ok()?,
    ))
}

/// Kernel instructions per run of each path, from the marks of the counting run: the
/// instructions between a path's two marks, less those of a mark itself (marks 0 and 1 have
/// nothing between them), over the runs.
pub fn kernel_instructions(marks: &[Mark]) -> Vec<Option<f64>> {
    let at = |value: u64| marks.iter().find(|m| m.value == value).map(|m| m.kernel_instructions as f64);
    let overhead = match (at(0), at(1)) {
        (Some(a), Some(b)) => b - a,
        _ => return vec![None; PATHS.len()],
    };
    PATHS
        .iter()
        .map(|&(path, first)| {
            Some(((at(first + 1)? - at(first)? - overhead) / COUNTED_RUNS / operations_per_run(path)).max(0.0))
        })
        .collect()
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // Only needs to differ between runs: the key is handed to both programs on the command line.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher
        .write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.finish()
}

/// A host baseline measured in the same run: a round trip through two pipes between two host
/// threads (`host_pipe_roundtrip`), median and p99 in nanoseconds over `n` round trips.
pub fn host_pipe_roundtrip(n: usize) -> Option<(f64, f64)> {
    use std::io::{Read, Write};
    let (mut to_child_read, mut to_child_write) = std::io::pipe().ok()?;
    let (mut to_parent_read, mut to_parent_write) = std::io::pipe().ok()?;
    let child = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while to_child_read.read_exact(&mut byte).is_ok() {
            if to_parent_write.write_all(&byte).is_err() {
                break;
            }
        }
    });
    let mut samples = Vec::with_capacity(n);
    let mut byte = [0u8; 1];
    for _ in 0..n {
        let start = std::time::Instant::now();
        to_child_write.write_all(&byte).ok()?;
        to_parent_read.read_exact(&mut byte).ok()?;
        samples.push(start.elapsed().as_nanos() as f64);
    }
    drop(to_child_write);
    let _ = child.join();
    samples.sort_by(f64::total_cmp);
    Some((samples[n / 2], samples[(n * 99 / 100).min(n - 1)]))
}

/// Runs the benchmark on `topology`; with `count`, also counts kernel instructions.
pub fn run(topology: &Topology, count: bool) -> Result<Vec<PathResult>, BenchError> {
    let console = CaptureSink::default();
    let outcome = vm::run(&config(topology, &[], false), &console)?;
    finished(&outcome, &console)?;
    let ns_per_cycle = if outcome.tsc_khz > 0 { 1e6 / outcome.tsc_khz as f64 } else { f64::NAN };
    let lines: Vec<_> = console.lines().iter().filter_map(|(_, line)| parse_line(line)).collect();

    let counts = if count {
        let console = CaptureSink::default();
        let outcome = vm::run(&config(topology, &["count"], true), &console)?;
        finished(&outcome, &console)?;
        kernel_instructions(&outcome.marks)
    } else {
        vec![None; PATHS.len()]
    };

    let mut results = PATHS
        .iter()
        .zip(counts)
        .map(|(&(path, _), kernel_instructions)| {
            let (_, n, median, p99) = lines.iter().find(|l| l.0 == path).ok_or(BenchError::Missing(path))?;
            Ok(PathResult {
                path: path.to_owned(),
                n: *n,
                cycles_median: *median,
                cycles_p99: *p99,
                ns_median: median * ns_per_cycle,
                kernel_instructions,
            })
        })
        .collect::<Result<Vec<_>, BenchError>>()?;
    if topology.latency_mode() != crate::topology::LatencyMode::Off {
        // Where remote memory costs, an invocation from another node runs on the callee's CPU.
        let console = CaptureSink::default();
        let outcome = vm::run(&config(topology, &["placed"], false), &console)?;
        finished(&outcome, &console)?;
        let placed =
            console.lines().iter().filter_map(|(_, line)| parse_line(line)).find(|l| l.0 == "protected_invocation");
        let (_, n, median, p99) = placed.ok_or(BenchError::Missing("protected_invocation_placed"))?;
        results.push(PathResult {
            path: "protected_invocation_placed".to_owned(),
            n,
            cycles_median: median,
            cycles_p99: p99,
            ns_median: median * ns_per_cycle,
            kernel_instructions: None,
        });
    }
    const PIPE_ROUND_TRIPS: usize = 2000;
    if let Some((median_ns, p99_ns)) = host_pipe_roundtrip(PIPE_ROUND_TRIPS) {
        let cycles_per_ns = 1.0 / ns_per_cycle;
        results.push(PathResult {
            path: "host_pipe_roundtrip".to_owned(),
            n: PIPE_ROUND_TRIPS as u64,
            cycles_median: median_ns * cycles_per_ns,
            cycles_p99: p99_ns * cycles_per_ns,
            ns_median: median_ns,
            kernel_instructions: None,
        });
    }
    Ok(results)
}

/// The results as a table.
pub fn table(results: &[PathResult]) -> String {
    let mut text = format!(
        "{:<24} {:>6} {:>14} {:>14} {:>12} {:>10}\n",
        "path", "n", "cycles median", "cycles p99", "ns median", "CPL0 insns"
    );
    for r in results {
        let instructions = r.kernel_instructions.map_or("-".to_owned(), |n| format!("{n:.0}"));
        text += &format!(
            "{:<24} {:>6} {:>14.1} {:>14.1} {:>12.1} {:>10}\n",
            r.path, r.n, r.cycles_median, r.cycles_p99, r.ns_median, instructions
        );
    }
    let find = |path: &str| results.iter().find(|r| r.path == path).map(|r| r.cycles_median);
    if let (Some(call), Some(invocation)) = (find("procedure_call"), find("optimized_invocation")) {
        text += &format!("optimized_invocation / procedure_call = {:.2} (target <= 1.2)\n", invocation / call);
    }
    if let (Some(gate), Some(protected)) = (find("null_kernel_gate"), find("protected_invocation")) {
        text +=
            &format!("protected_invocation / null_kernel_gate = {:.2} (target <= 8, stretch 6)\n", protected / gate);
    }
    if let (Some(call), Some(switch)) = (find("procedure_call"), find("thread_switch_user")) {
        text += &format!("thread_switch_user / procedure_call = {:.2} (target <= 20)\n", switch / call);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines() {
        assert_eq!(
            parse_line("bench: path=null_kernel_gate n=2000 batch=1 median=18590.00 p99=19214.00"),
            Some(("null_kernel_gate".to_owned(), 2000, 18590.0, 19214.0))
        );
        assert_eq!(parse_line("hello"), None);
        assert_eq!(parse_line("bench: path=x n=two"), None);
    }

    #[test]
    fn instruction_counts_subtract_the_marks_own_cost() {
        let mark = |value, kernel_instructions| Mark { vcpu: 0, program: 0, value, kernel_instructions };
        let marks: Vec<Mark> = [(0, 100), (1, 150), (2, 200), (3, 250), (4, 300), (5, 350), (6, 400), (7, 450)]
            .into_iter()
            .chain([(8, 500), (9, 750), (10, 1000), (11, 3050)])
            .map(|(v, k)| mark(v, k))
            .collect();
        let counts = kernel_instructions(&marks);
        assert_eq!(&counts[..5], &[Some(0.0), Some(0.0), Some(0.0), Some(20.0), Some(200.0)]);
        assert_eq!(&counts[5..], &[None, None, None]);
        assert_eq!(kernel_instructions(&marks[2..]), vec![None; PATHS.len()]);
    }
}

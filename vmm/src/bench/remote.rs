//! `psyche-vmm bench`'s `remote_access` measurement: what a remote-memory access costs a guest
//! program, reported in layers because on a slow host the layers differ by orders of magnitude.
//!
//! The guest program `numa matrix N` reads a one-page realm homed on every node from the first
//! CPU of every node (`migrate=off`, so the realms stay put). It runs three times:
//!
//! * `exact`: every remote read traps and the VMM spends the pair's latency in real time. The
//!   VMM's `spent_ns` per charge (host clock) is how accurately it charges.
//! * `account`: every remote read traps, nothing is spent. The kernel's `charge_cycles` per trap
//!   of the exact run minus those of this run is the extra cost the guest's own clock saw. The
//!   program's cycles per remote read here are the trap path without any charge: the floor.
//! * `window`: a trap opens the page until the next quantum; the VMM's spent ns per window
//!   charge against the configured latency.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{finished, BenchError};
use crate::boot::ProgramImage;
use crate::console::CaptureSink;
use crate::latency::{GuestLatencyReport, LatencyTotals};
use crate::topology::{LatencyMode, Topology};
use crate::vm::{self, VmConfig};

/// Reads per cell the program times, unless told otherwise.
pub const DEFAULT_ACCESSES: u64 = 32;
/// The most reads per cell the program times.
pub const MAX_ACCESSES: u64 = 256;
/// How close the guest-observed extra must come to the configured latency to count as matching.
const TOLERANCE: f64 = 0.10;
/// Up to this many nodes, the text shows node x node matrices; beyond, statistics over pairs.
const MATRIX_MAX_NODES: usize = 8;
/// Worst pairs listed for a large machine.
const WORST_PAIRS: usize = 5;

/// One remote node pair's numbers (a `remote_access F->T` row of `--json`). `None` (JSON null)
/// where a run did not measure the pair.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RemotePair {
    /// `remote_access F->T`.
    pub path: String,
    pub from: usize,
    pub to: usize,
    /// Charges the VMM made for the pair in the exact run.
    pub n: u64,
    /// The topology's latency for the pair.
    pub configured_ns: u32,
    /// What the VMM really spent per charge in the exact run, on the host clock.
    pub spent_ns: Option<f64>,
    /// The extra cost of one remote access as the guest's clock saw it: the kernel's TSC cycles
    /// around each charge hypercall, per trap, exact run minus account run.
    pub guest_extra_ns: Option<f64>,
    /// The program's median time per remote read in the account run: the trap path alone.
    pub floor_ns: Option<f64>,
    /// Whether `guest_extra_ns` is within 10% of `configured_ns`.
    pub within_10pct: Option<bool>,
}

/// The window run's charges, all pairs together (the `remote_access window` row of `--json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WindowCharges {
    /// `remote_access window`.
    pub path: String,
    /// Window charges made.
    pub n: u64,
    /// Configured latency per charge (mean over the charges).
    pub configured_ns: f64,
    /// What the VMM really spent per charge, on the host clock (mean over the charges: one
    /// preempted vCPU thread moves it).
    pub spent_ns: f64,
    /// Per pair, the time spent over the time charged; the median over the pairs charged (not
    /// moved by a few preempted charges).
    pub spent_over_charged_pair_median: Option<f64>,
}

/// Everything the remote_access measurement found.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteAccess {
    /// Reads timed per cell.
    pub accesses: u64,
    pub nodes: usize,
    /// Every remote pair from a node with CPUs to a node with memory.
    pub pairs: Vec<RemotePair>,
    /// Per node, the program's median time of a local read in the account run (never trapped).
    pub local_ns: Vec<Option<f64>>,
    pub window: Option<WindowCharges>,
    /// The three runs, boot to shutdown.
    pub elapsed: Duration,
}

/// What one run of `numa matrix` left.
#[derive(Clone, Debug)]
struct MatrixRun {
    guest: GuestLatencyReport,
    vmm: LatencyTotals,
    /// `cycles[from][to]`: the program's median TSC cycles per read.
    cycles: Vec<Vec<Option<u64>>>,
    tsc_khz: u64,
}

/// Why the measurement cannot run on `topology`, if it cannot.
pub fn skipped(topology: &Topology) -> Option<String> {
    topology.latency.is_none().then(|| {
        format!(
            "remote_access: skipped: topology {} has no [latency] table, so remote accesses are never \
             trapped or charged and there is nothing to measure",
            topology.name
        )
    })
}

/// Runs `numa matrix ACCESSES` in exact, account and window mode on `topology` and puts the
/// numbers together.
pub fn run(topology: &Topology, accesses: u64) -> Result<RemoteAccess, BenchError> {
    let accesses = accesses.clamp(1, MAX_ACCESSES);
    let start = Instant::now();
    let exact = matrix_run(topology, LatencyMode::Exact, accesses)?;
    let account = matrix_run(topology, LatencyMode::Account, accesses)?;
    let window = matrix_run(topology, LatencyMode::Window, accesses)?;
    let mut result = compute(topology, &exact, &account, &window.vmm);
    result.accesses = accesses;
    result.elapsed = start.elapsed();
    Ok(result)
}

fn matrix_run(topology: &Topology, mode: LatencyMode, accesses: u64) -> Result<MatrixRun, BenchError> {
    let topology = topology.clone().with_latency_mode(mode).map_err(|e| BenchError::Guest(e.to_string()))?;
    let nodes = topology.node_count();
    let mut config = VmConfig::with_defaults(topology);
    config.programs = vec![ProgramImage::builtin("numa").ok_or(BenchError::Missing("the built-in numa program"))?];
    config.args = vec!["matrix".to_owned(), accesses.to_string()];
    // Realms moving toward their users would turn remote reads into local ones.
    config.cmdline = "migrate=off".to_owned();
    config.timeout = Some(Duration::from_secs(600));
    let console = CaptureSink::default();
    let outcome = vm::run(&config, &console)?;
    finished(&outcome, &console)?;
    let guest =
        outcome.guest.and_then(|guest| guest.latency).ok_or(BenchError::Missing("the kernel's latency report"))?;
    let vmm = outcome.latency.ok_or(BenchError::Missing("the VMM's latency totals"))?;
    Ok(MatrixRun { guest, vmm, cycles: parse_matrix(&console.lines(), nodes), tsc_khz: outcome.tsc_khz })
}

/// The program's `numa: row F: c0 .. c(n-1)` lines as `cycles[from][to]`; `None` where a row
/// is missing or malformed (a node without CPUs) or a cell is 0 (a node without memory).
fn parse_matrix(lines: &[(u32, String)], nodes: usize) -> Vec<Vec<Option<u64>>> {
    let mut cycles = vec![vec![None; nodes]; nodes];
    for (_, line) in lines {
        let Some((from, cells)) = line.strip_prefix("numa: row ").and_then(|rest| rest.split_once(':')) else {
            continue;
        };
        let Some(row) = from.parse::<usize>().ok().and_then(|from| cycles.get_mut(from)) else { continue };
        let cells: Option<Vec<u64>> = cells.split_whitespace().map(|cell| cell.parse().ok()).collect();
        if let Some(cells) = cells.filter(|cells| cells.len() == nodes) {
            *row = cells.into_iter().map(|cell| (cell > 0).then_some(cell)).collect();
        }
    }
    cycles
}

/// `matrix[from][to]`, if the (guest-reported) matrix has it.
fn cell(matrix: &[Vec<u64>], from: usize, to: usize) -> Option<u64> {
    matrix.get(from)?.get(to).copied()
}

/// Charge cycles per trap for (from, to) in one run.
fn cycles_per_trap(report: &GuestLatencyReport, from: usize, to: usize) -> Option<f64> {
    let traps = cell(&report.traps, from, to).filter(|&traps| traps > 0)?;
    Some(cell(&report.charge_cycles, from, to)? as f64 / traps as f64)
}

fn compute(topology: &Topology, exact: &MatrixRun, account: &MatrixRun, window: &LatencyTotals) -> RemoteAccess {
    let nodes = topology.node_count();
    let ns_per_cycle = |khz: u64| (khz > 0).then(|| 1e6 / khz as f64);
    let (exact_ns, account_ns) = (ns_per_cycle(exact.tsc_khz), ns_per_cycle(account.tsc_khz));
    let read_ns = |from: usize, to: usize| Some(account.cycles.get(from)?.get(to).copied()?? as f64 * account_ns?);
    let mut pairs = Vec::new();
    for (from, from_node) in topology.nodes.iter().enumerate() {
        for (to, to_node) in topology.nodes.iter().enumerate() {
            let configured = topology.latency_ns(from as u32, to as u32);
            let Some(configured_ns) = configured.filter(|_| from != to) else { continue };
            if from_node.cpus.is_empty() || to_node.memory_bytes == 0 {
                continue;
            }
            let n = cell(&exact.vmm.charges, from, to).unwrap_or(0);
            let spent_ns =
                (n > 0).then(|| cell(&exact.vmm.spent_ns, from, to)).flatten().map(|ns| ns as f64 / n as f64);
            let guest_extra_ns =
                match (cycles_per_trap(&exact.guest, from, to), cycles_per_trap(&account.guest, from, to)) {
                    (Some(exact_cycles), Some(account_cycles)) => {
                        exact_ns.map(|ns| (exact_cycles - account_cycles) * ns)
                    }
                    _ => None,
                };
            let within_10pct = guest_extra_ns
                .map(|extra| (extra - f64::from(configured_ns)).abs() <= TOLERANCE * f64::from(configured_ns));
            pairs.push(RemotePair {
                path: format!("remote_access {from}->{to}"),
                from,
                to,
                n,
                configured_ns,
                spent_ns,
                guest_extra_ns,
                floor_ns: read_ns(from, to),
                within_10pct,
            });
        }
    }
    let charges = window.total_charges();
    let window = (charges > 0).then(|| WindowCharges {
        path: "remote_access window".to_owned(),
        n: charges,
        configured_ns: window.total_charged_ns() as f64 / charges as f64,
        spent_ns: window.total_spent_ns() as f64 / charges as f64,
        spent_over_charged_pair_median: spread(
            window
                .charged_ns
                .iter()
                .flatten()
                .zip(window.spent_ns.iter().flatten())
                .filter(|&(&charged, _)| charged > 0)
                .map(|(&charged, &spent)| spent as f64 / charged as f64)
                .collect(),
        )
        .map(|(_, median, _)| median),
    });
    RemoteAccess {
        accesses: 0,
        nodes,
        pairs,
        local_ns: (0..nodes).map(|node| read_ns(node, node)).collect(),
        window,
        elapsed: Duration::ZERO,
    }
}

/// The `--json` rows: one per pair, then the window row.
pub fn json_rows(result: &RemoteAccess) -> Vec<serde_json::Value> {
    let pairs = result.pairs.iter().filter_map(|pair| serde_json::to_value(pair).ok());
    pairs.chain(result.window.iter().filter_map(|window| serde_json::to_value(window).ok())).collect()
}

/// Min, median and max.
fn spread(mut values: Vec<f64>) -> Option<(f64, f64, f64)> {
    values.sort_by(f64::total_cmp);
    Some((*values.first()?, values[values.len() / 2], *values.last()?))
}

fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map_or("-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// The results as text.
pub fn table(result: &RemoteAccess) -> String {
    let mut text = format!(
        "remote_access: `numa matrix {}` (migrate=off) in exact, account and window mode, {} remote pairs: {:.1} s\n",
        result.accesses,
        result.pairs.len(),
        result.elapsed.as_secs_f64()
    );
    // (title, short title, value of a pair, decimals)
    type Column = (&'static str, &'static str, fn(&RemotePair) -> Option<f64>, usize);
    let columns: [Column; 4] = [
        ("configured ns per remote access", "configured ns", |p| Some(f64::from(p.configured_ns)), 0),
        (
            "VMM-spent ns per charge (exact run, host clock: the charging's accuracy)",
            "VMM-spent ns per charge",
            |p| p.spent_ns,
            0,
        ),
        (
            "guest-observed extra ns per remote access (charge cycles per trap, exact minus account)",
            "guest-observed extra ns",
            |p| p.guest_extra_ns,
            0,
        ),
        (
            "trap floor us per remote read (the program's median in the account run)",
            "trap floor us",
            |p| p.floor_ns.map(|ns| ns / 1e3),
            1,
        ),
    ];
    if result.nodes <= MATRIX_MAX_NODES {
        for (title, _, value, decimals) in columns {
            text += &format!("  {title}, rows from, columns to:\n        ");
            text += &(0..result.nodes).map(|to| format!("{to:>10}")).collect::<String>();
            text += "\n";
            for from in 0..result.nodes {
                text += &format!("  {from:>4}  ");
                for to in 0..result.nodes {
                    let pair = result.pairs.iter().find(|p| p.from == from && p.to == to);
                    text += &format!("{:>10}", fmt(pair.and_then(value), decimals));
                }
                text += "\n";
            }
        }
    } else {
        text += &format!("  {:<26} {:>10} {:>10} {:>10}\n", "over the pairs", "min", "median", "max");
        for (_, short, value, decimals) in columns {
            let stats = spread(result.pairs.iter().filter_map(value).collect());
            let [min, median, max] = stats.map_or([None; 3], |(a, b, c)| [Some(a), Some(b), Some(c)]);
            text += &format!(
                "  {short:<26} {:>10} {:>10} {:>10}\n",
                fmt(min, decimals),
                fmt(median, decimals),
                fmt(max, decimals)
            );
        }
        let off = |p: &RemotePair, value: Option<f64>| value.map(|v| (v - f64::from(p.configured_ns)).abs());
        for (what, value) in [
            ("guest-observed extra", (|p: &RemotePair| p.guest_extra_ns) as fn(&RemotePair) -> Option<f64>),
            ("VMM-spent", |p: &RemotePair| p.spent_ns),
        ] {
            let mut worst: Vec<(f64, &RemotePair)> =
                result.pairs.iter().filter_map(|p| Some((off(p, value(p))?, p))).collect();
            worst.sort_by(|a, b| b.0.total_cmp(&a.0));
            let listed: Vec<String> = worst
                .iter()
                .take(WORST_PAIRS)
                .map(|(_, p)| format!("{}->{} {} ns (of {})", p.from, p.to, fmt(value(p), 0), p.configured_ns))
                .collect();
            text += &format!("  worst pairs, {what} against configured: {}\n", listed.join(", "));
        }
    }
    if let Some((min, median, max)) = spread(result.local_ns.iter().flatten().copied().collect()) {
        text += &format!(
            "  local read (never trapped, account run): {median:.0} ns median over nodes ({min:.0} to {max:.0})\n"
        );
    }
    let measured: Vec<bool> = result.pairs.iter().filter_map(|p| p.within_10pct).collect();
    text += &format!(
        "  guest-observed extra within 10% of configured: {} of {} pairs\n",
        measured.iter().filter(|&&within| within).count(),
        result.pairs.len()
    );
    if let Some(window) = &result.window {
        let off = 100.0 * (window.spent_ns / window.configured_ns - 1.0);
        let median_off = window.spent_over_charged_pair_median.map(|ratio| 100.0 * (ratio - 1.0));
        text += &format!(
            "  window: {} charges; per charge {:.0} ns configured, {:.1} ns spent by the VMM ({off:+.1}%; \
             median over pairs {}%){}\n",
            window.n,
            window.configured_ns,
            window.spent_ns,
            median_off.map_or("-".to_owned(), |off| format!("{off:+.1}")),
            if median_off.is_some_and(|off| off.abs() <= 1.0) { ": the charge per window is exact" } else { "" }
        );
    }
    text += &note(result);
    text
}

/// One line on what dominates the guest-observed numbers.
fn note(result: &RemoteAccess) -> String {
    let floor = spread(result.pairs.iter().filter_map(|p| p.floor_ns).collect());
    let largest = result.pairs.iter().map(|p| p.configured_ns).max().unwrap_or(0);
    let noise = result
        .pairs
        .iter()
        .filter_map(|p| Some((p.guest_extra_ns? - f64::from(p.configured_ns)).abs()))
        .max_by(f64::total_cmp);
    match (floor, noise) {
        (Some((_, floor, _)), Some(noise)) if floor > 10.0 * f64::from(largest) || noise > f64::from(largest) => {
            format!(
                "  note: on this host the trap floor ({:.1} us per remote read) and host noise (guest-observed \
             extra off by up to {:.1} us) dominate latencies of at most {largest} ns: trust the VMM-spent numbers\n",
                floor / 1e3,
                noise / 1e3
            )
        }
        (Some((_, floor, _)), Some(noise)) => format!(
            "  note: trap floor {:.1} us per remote read, guest-observed extra off by up to {noise:.0} ns\n",
            floor / 1e3
        ),
        _ => "  note: some runs measured nothing for some pairs (see the dashes)\n".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[&str]) -> Vec<(u32, String)> {
        text.iter().map(|line| (0, line.to_string())).collect()
    }

    #[test]
    fn matrix_rows_parse_and_bad_rows_are_dropped() {
        let parsed = parse_matrix(
            &lines(&["numa: matrix: ...", "numa: row 1: 1000 52 0", "numa: row 0: 52 x 3", "numa: row 9: 1 2 3"]),
            3,
        );
        assert_eq!(parsed, vec![vec![None; 3], vec![Some(1000), Some(52), None], vec![None; 3]]);
        assert_eq!(parse_matrix(&lines(&["numa: row 0: 1 2"]), 3)[0], vec![None; 3], "too few cells");
    }

    fn two_nodes() -> Topology {
        let text = "name = \"t\"\n[[node]]\nid = 0\ncpus = [0]\nmemory = \"16M\"\n\
                    [[node]]\nid = 1\ncpus = [1]\nmemory = \"16M\"\n\
                    [latency]\nlocal_ns = 100\nmatrix_ns = [[100, 1000], [2000, 100]]\nmode = \"account\"\n";
        Topology::parse(text, "test").unwrap()
    }

    fn matrix_run(mode: LatencyMode, charge_cycles: [u64; 2], spent: [u64; 2], cycles: u64) -> MatrixRun {
        let traps = vec![vec![0, 10], vec![20, 0]];
        let guest = GuestLatencyReport {
            mode,
            traps: traps.clone(),
            charged_ns: vec![vec![0, 10_000], vec![40_000, 0]],
            charge_cycles: vec![vec![0, charge_cycles[0]], vec![charge_cycles[1], 0]],
            migrations: 0,
        };
        let vmm = LatencyTotals {
            mode,
            charges: traps,
            charged_ns: guest.charged_ns.clone(),
            spent_ns: vec![vec![0, spent[0]], vec![spent[1], 0]],
            virtual_ns: vec![0, 0],
        };
        let cycles = vec![vec![Some(50), Some(cycles)], vec![Some(cycles), Some(50)]];
        MatrixRun { guest, vmm, cycles, tsc_khz: 1_000_000 }
    }

    #[test]
    fn pairs_put_the_three_runs_together() {
        // 1 GHz: a cycle is a nanosecond. 0->1: 10 traps, 1000 ns configured, 1050 cycles more
        // per trap in the exact run. 1->0: 20 traps, 2000 configured, 1500 more: off by 25%.
        let exact = matrix_run(LatencyMode::Exact, [10 * 6050, 20 * 6500], [10_100, 40_400], 9000);
        let account = matrix_run(LatencyMode::Account, [10 * 5000, 20 * 5000], [0, 0], 90_000);
        let window_totals = LatencyTotals {
            charges: vec![vec![0, 3], vec![1, 0]],
            charged_ns: vec![vec![0, 3000], vec![2000, 0]],
            spent_ns: vec![vec![0, 3010], vec![2010, 0]],
            ..exact.vmm.clone()
        };
        let result = compute(&two_nodes(), &exact, &account, &window_totals);
        assert_eq!(result.pairs.len(), 2);
        let (a, b) = (&result.pairs[0], &result.pairs[1]);
        assert_eq!((a.path.as_str(), a.n, a.configured_ns, a.spent_ns), ("remote_access 0->1", 10, 1000, Some(1010.0)));
        assert_eq!((a.guest_extra_ns, a.floor_ns, a.within_10pct), (Some(1050.0), Some(90_000.0), Some(true)));
        assert_eq!(
            (b.path.as_str(), b.spent_ns, b.guest_extra_ns, b.within_10pct),
            ("remote_access 1->0", Some(2020.0), Some(1500.0), Some(false))
        );
        assert_eq!(result.local_ns, vec![Some(50.0), Some(50.0)]);
        let window = result.window.as_ref().unwrap();
        assert_eq!((window.n, window.configured_ns, window.spent_ns), (4, 1250.0, 1255.0));

        let rows = json_rows(&result);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0]["path"], "remote_access 0->1");
        assert_eq!(rows[0]["within_10pct"], true);
        assert_eq!(rows[2]["path"], "remote_access window");

        let text = table(&result);
        assert!(text.contains("guest-observed extra within 10% of configured: 1 of 2 pairs"), "{text}");
        assert!(text.contains("(+0.4%; median over pairs +0.5%): the charge per window is exact"), "{text}");
        assert!(text.contains("note: on this host the trap floor (90.0 us per remote read)"), "{text}");
        let small_floor = MatrixRun { cycles: vec![vec![Some(50), Some(7000)]; 2], ..account };
        let text = table(&compute(&two_nodes(), &exact, &small_floor, &window_totals));
        assert!(text.contains("note: trap floor 7.0 us per remote read, guest-observed extra off by up to 500 ns"));
    }

    #[test]
    fn missing_reports_give_dashes_not_panics() {
        let mut exact = matrix_run(LatencyMode::Exact, [0, 0], [0, 0], 0);
        exact.guest.traps = Vec::new();
        exact.vmm.charges = vec![vec![0]];
        exact.cycles = Vec::new();
        exact.tsc_khz = 0;
        let account = exact.clone();
        let result = compute(&two_nodes(), &exact, &account, &exact.vmm);
        assert!(result
            .pairs
            .iter()
            .all(|p| p.spent_ns.is_none() && p.guest_extra_ns.is_none() && p.floor_ns.is_none()));
        assert!(result.window.is_none());
        let text = table(&result);
        assert!(text.contains("0 of 2 pairs") && text.contains("nothing for some pairs"), "{text}");
    }
}

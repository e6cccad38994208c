//! `psyche-vmm profile`: the text profile of a trace and its flame graph.

use std::fmt::Write as _;
use std::io::Write;

use super::analysis::{self, Analysis};
use super::{cycles_to_ns, open_outcome_name, Trace};

/// Why a flame graph could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum FlameGraphError {
    #[error("the trace has no gate calls, invocations or upcalls to draw")]
    Empty,
    #[error("drawing the flame graph failed: {0}")]
    Draw(std::io::Error),
}

fn ns_text(cycles: u64, tsc_khz: u64) -> String {
    cycles_to_ns(cycles, tsc_khz).map_or_else(|| "?".to_owned(), |ns| ns.to_string())
}

fn percent(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 * 100.0 / total as f64
    }
}

fn millis(cycles: u64, tsc_khz: u64) -> String {
    if tsc_khz == 0 {
        return "?".to_owned();
    }
    format!("{:.3}", cycles as f64 / tsc_khz as f64)
}

/// The profile of `trace`, as `psyche-vmm profile` prints it. `source` names the trace.
pub fn text(trace: &Trace, analysis: &Analysis, source: &str) -> String {
    let meta = &trace.meta;
    let khz = meta.tsc_khz;
    let summary = &trace.summary;
    let mut out = String::new();
    let span = analysis.last_tsc.saturating_sub(analysis.first_tsc);
    let _ = writeln!(
        out,
        "trace {source}: machine {}, {} vCPUs on {} nodes, TSC {khz} kHz",
        meta.topology,
        meta.vcpus,
        meta.nodes.len()
    );
    let _ = writeln!(
        out,
        "{} records over {} ms; lost {}, corrupt {}",
        summary.records,
        millis(span, khz),
        summary.lost,
        summary.corrupt
    );
    if summary.lost > 0 {
        let _ = writeln!(
            out,
            "warning: {} records were lost (kernel ring full: {}, overrun: {}, VMM record limit: {}): counts below are short",
            summary.lost, summary.lost_kernel, summary.lost_overrun, summary.lost_limit
        );
    }
    for problem in &summary.problems {
        let _ = writeln!(out, "warning: {problem}");
    }
    for (what, count) in &analysis.unmatched {
        let _ = writeln!(out, "note: {count} x {what}");
    }

    let _ = writeln!(out, "\ninvocation paths (cycles | ns)");
    let paths = analysis::path_stats(analysis);
    let width = paths.iter().map(|p| p.path.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(
        out,
        "{:<width$} {:>8} {:>10} {:>10} {:>10} {:>10} | {:>10} {:>10} {:>10} {:>10}",
        "path", "count", "mean", "p50", "p99", "max", "mean", "p50", "p99", "max"
    );
    if paths.is_empty() {
        let _ = writeln!(out, "(none)");
    }
    for path in &paths {
        let _ = write!(
            out,
            "{:<width$} {:>8} {:>10} {:>10} {:>10} {:>10} | {:>10} {:>10} {:>10} {:>10}",
            path.path,
            path.count,
            path.mean,
            path.p50,
            path.p99,
            path.max,
            ns_text(path.mean, khz),
            ns_text(path.p50, khz),
            ns_text(path.p99, khz),
            ns_text(path.max, khz),
        );
        if path.inferred > 0 {
            let _ = write!(out, "  ({} ended inferred)", path.inferred);
        }
        if path.unfinished > 0 {
            let _ = write!(out, "  ({} unfinished)", path.unfinished);
        }
        out.push('\n');
    }

    let _ = writeln!(out, "\nrealms");
    let realms = analysis::realm_stats(trace);
    let _ = writeln!(
        out,
        "{:<10} {:>5} {:>18} {:<40} {:>11} {:>12} {:>13} {:>10}",
        "realm", "home", "base", "opens", "page faults", "remote traps", "latency (ns)", "migrations"
    );
    if realms.is_empty() {
        let _ = writeln!(out, "(no realm events and no page faults)");
    }
    for realm in &realms {
        let id = realm.realm.map_or_else(|| "(none)".to_owned(), |id| id.to_string());
        let home = realm.home_node.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let base = realm.base.map_or_else(|| "-".to_owned(), |b| format!("{b:#x}"));
        let opens: Vec<String> =
            realm.opens.iter().map(|(outcome, n)| format!("{} {n}", open_outcome_name(*outcome))).collect();
        let opens = if opens.is_empty() { "-".to_owned() } else { opens.join(", ") };
        let _ = writeln!(
            out,
            "{id:<10} {home:>5} {base:>18} {opens:<40} {:>11} {:>12} {:>13} {:>10}",
            realm.page_faults, realm.remote_traps, realm.latency_ns, realm.migrations
        );
    }

    let _ = writeln!(out, "\nvCPU time (ms and share of the trace's {} ms)", millis(span, khz));
    let _ = writeln!(
        out,
        "{:<6} {:>5} {:<10} {:>16} {:>16} {:>16} {:>16}",
        "vcpu", "node", "programs", "user", "kernel", "idle", "latency"
    );
    for split in analysis::time_split(trace, analysis) {
        let node = meta.node_of(split.cpu).map_or_else(|| "-".to_owned(), |n| n.to_string());
        let programs: Vec<String> = split.programs.iter().map(u32::to_string).collect();
        let programs = if programs.is_empty() { "-".to_owned() } else { programs.join(",") };
        let cell = |cycles: u64| format!("{} {:>5.1}%", millis(cycles, khz), percent(cycles, split.total));
        let _ = writeln!(
            out,
            "{:<6} {node:>5} {programs:<10} {:>16} {:>16} {:>16} {:>16}",
            split.cpu,
            cell(split.user),
            cell(split.kernel),
            cell(split.idle),
            cell(split.latency)
        );
    }
    let _ = writeln!(
        out,
        "(idle: no program on the vCPU, or its program in the idle call; kernel: inside other gate calls; latency: remote-memory latency charged; user: the rest)"
    );
    out
}

/// Writes a flame graph of the trace's invocation paths (stacks `vcpu0;program 0;gate:write`,
/// weighted by cycles) as SVG.
pub fn flamegraph(analysis: &Analysis, title: &str, out: &mut dyn Write) -> Result<(), FlameGraphError> {
    let lines = analysis::folded_stacks(analysis);
    if lines.is_empty() {
        return Err(FlameGraphError::Empty);
    }
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.count_name = "cycles".to_owned();
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out).map_err(FlameGraphError::Draw)
}

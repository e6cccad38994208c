//! The trace file: Chrome trace-event JSON, as Perfetto (ui.perfetto.dev) and chrome://tracing
//! read it, and read back by `psyche-vmm profile`.
//!
//! ```text
//! {"displayTimeUnit":"ns",
//! "metadata":{"psyche_trace":1,"topology":{"name":..,"nodes":[..],"distances":[[..]]},"tsc_khz":..,
//!             "tsc_base":..,"vcpus":..,"programs":[..],"kernel":..,"tsc_offsets":[..],"tsc_drift":[..],
//!             "vcpu_stats":[..],"summary":{..}},
//! "traceEvents":[
//! {"name":"process_name","ph":"M","ts":0,"pid":1,"tid":1,"args":{"name":"psyche-vmm: butterfly"}},
//! {"name":"gate:cpu_info","ph":"X","ts":12.345,"dur":7.120,"pid":1,"tid":1,"cat":"gate","args":{..}},
//! ...
//! ]}
//! ```
//!
//! * One process (pid 1), one track per vCPU (tid = vCPU index + 1: Perfetto keeps tid 0 for the
//!   idle task; named `vcpu N (node M)`). A span that overlaps another on its vCPU without nesting
//!   in it (possible for protected invocations, whose caller goes on running) goes on an extra
//!   track of that vCPU, tid `N + 1 + 10000 * k`.
//! * Spans ([`super::analysis`]) are `X` events; every other record is a thread-scoped instant
//!   (`i`); each protected invocation has a flow (`s` on the caller's span, `f` on the callee's,
//!   `id` = the invocation id, category `invocation`).
//! * Timestamps are microseconds (three decimals: nanoseconds) since the trace's first record,
//!   from the guest TSC at `tsc_khz`.
//! * Every event made from records keeps them whole in its args (`record`, or `begin` and `end`
//!   for a span closed by a record of its own vCPU): kind name, cpu, seq (the record's position in
//!   its vCPU's merged stream), tsc, arg0..arg2. Each record is in exactly one event, so that the
//!   profile is recomputed exactly from the file.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;

use psyche_abi::trace::{TraceKind, TraceRecord, VmExitKind};
use serde::{Deserialize, Serialize};

use super::analysis::{Analysis, SpanKind};
use super::{
    hypercall_name, kind_from_name, kind_name, open_outcome_name, vm_exit_name, Trace, TraceMeta, TraceNode,
    TraceSummary, VcpuStats, VcpuTrace, TRACE_FILE_VERSION,
};

/// The process id of every event.
const PID: u32 = 1;
/// tid of a vCPU's extra track k: vCPU + 1 + k * this.
const LANE_TID_STRIDE: u64 = 10_000;

/// The tid of track `lane` of vCPU `cpu`.
fn tid(cpu: u32, lane: usize) -> u64 {
    u64::from(cpu) + 1 + lane as u64 * LANE_TID_STRIDE
}

/// Why a trace file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceFileError {
    #[error("cannot read the trace {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error(
        "{path} ends in the middle of its JSON (line {line}, column {column}): the trace is truncated; record it again"
    )]
    Truncated { path: String, line: usize, column: usize },
    #[error("{path} is not JSON: {source}")]
    Syntax { path: String, source: serde_json::Error },
    #[error("{path} is not a psyche-vmm trace: {what} (write one with `psyche-vmm --trace PATH ...`)")]
    NotATrace { path: String, what: String },
    #[error("{path} is a psyche-vmm trace of version {found}; this psyche-vmm reads version {TRACE_FILE_VERSION}")]
    Version { path: String, found: u64 },
    #[error("{path} is corrupt: {what}")]
    Corrupt { path: String, what: String },
}

/// The `metadata` object of a trace file.
#[derive(Debug, Serialize, Deserialize)]
struct FileMetadata {
    psyche_trace: u32,
    topology: FileTopology,
    tsc_khz: u64,
    /// The TSC of the first record: timestamps count from it.
    tsc_base: u64,
    vcpus: u32,
    programs: Vec<String>,
    kernel: String,
    tsc_offsets: Vec<i64>,
    tsc_drift: Vec<i64>,
    vcpu_stats: Vec<VcpuStats>,
    summary: TraceSummary,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileTopology {
    name: String,
    nodes: Vec<TraceNode>,
    distances: Vec<Vec<u8>>,
}

/// A record as files keep it.
#[derive(Debug, Serialize, Deserialize)]
struct FileRecord {
    kind: String,
    cpu: u32,
    seq: u64,
    tsc: u64,
    arg0: u32,
    arg1: u64,
    arg2: u64,
}

impl FileRecord {
    fn new(record: &TraceRecord, seq: usize) -> Self {
        Self {
            kind: kind_name(record.kind),
            cpu: u32::from(record.cpu),
            seq: seq as u64,
            tsc: record.tsc,
            arg0: record.arg0,
            arg1: record.arg1,
            arg2: record.arg2,
        }
    }
}

/// What the reader needs of an event (the rest is for the viewers).
#[derive(Debug, Deserialize)]
struct FileEvent {
    #[serde(default)]
    args: Option<FileArgs>,
}

#[derive(Debug, Deserialize)]
struct FileArgs {
    record: Option<FileRecord>,
    begin: Option<FileRecord>,
    end: Option<FileRecord>,
}

#[derive(Debug, Deserialize)]
struct FileDocument {
    metadata: Option<serde_json::Value>,
    #[serde(rename = "traceEvents")]
    trace_events: Vec<FileEvent>,
}

/// A JSON string.
fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// Nanoseconds as microseconds with three decimals.
fn micros(ns: u64) -> String {
    format!("{}.{:03}", ns / 1000, ns % 1000)
}

struct Clock {
    base: u64,
    khz: u64,
}

impl Clock {
    /// Nanoseconds since the first record (at 1 GHz when the TSC rate is unknown).
    fn ns(&self, tsc: u64) -> u64 {
        let khz = if self.khz == 0 { 1_000_000 } else { self.khz };
        (u128::from(tsc.saturating_sub(self.base)) * 1_000_000 / u128::from(khz)).min(u128::from(u64::MAX)) as u64
    }
}

fn record_json(record: &TraceRecord, seq: usize) -> String {
    serde_json::to_string(&FileRecord::new(record, seq)).unwrap_or_default()
}

/// The name of the instant event of a record that is in no span.
fn instant_name(record: &TraceRecord) -> String {
    match TraceKind::from_raw(record.kind) {
        Some(TraceKind::VmExit) if record.arg0 == VmExitKind::Hypercall as u32 => {
            format!("exit:hypercall({})", hypercall_name(record.arg2))
        }
        Some(TraceKind::VmExit) => format!("exit:{}", vm_exit_name(record.arg0)),
        Some(TraceKind::RealmOpen) => format!("realm_open:{}", open_outcome_name(record.arg0)),
        Some(TraceKind::RealmMigrate) => format!("realm_migrate:{}->{}", record.arg0 >> 16, record.arg0 & 0xFFFF),
        _ => kind_name(record.kind),
    }
}

fn category(kind: SpanKind) -> &'static str {
    match kind {
        SpanKind::Gate => "gate",
        SpanKind::Protected | SpanKind::Invoked => "invocation",
        SpanKind::Upcall => "upcall",
    }
}

/// Writes `trace` (with its `analysis`) as Chrome trace-event JSON.
pub fn write(trace: &Trace, analysis: &Analysis, out: &mut dyn Write) -> io::Result<()> {
    let clock = Clock { base: analysis.first_tsc, khz: trace.meta.tsc_khz };
    let meta = &trace.meta;
    let metadata = FileMetadata {
        psyche_trace: TRACE_FILE_VERSION,
        topology: FileTopology {
            name: meta.topology.clone(),
            nodes: meta.nodes.clone(),
            distances: meta.distances.clone(),
        },
        tsc_khz: meta.tsc_khz,
        tsc_base: clock.base,
        vcpus: meta.vcpus,
        programs: meta.programs.clone(),
        kernel: meta.kernel.clone(),
        tsc_offsets: meta.tsc_offsets.clone(),
        tsc_drift: meta.tsc_drift.clone(),
        vcpu_stats: trace.vcpus.iter().map(|v| v.stats.clone()).collect(),
        summary: trace.summary.clone(),
    };
    writeln!(out, "{{\"displayTimeUnit\":\"ns\",")?;
    writeln!(out, "\"metadata\":{},", serde_json::to_string(&metadata).map_err(io::Error::other)?)?;
    writeln!(out, "\"traceEvents\":[")?;

    let mut first = true;
    let mut emit = |out: &mut dyn Write, line: &str| -> io::Result<()> {
        if !std::mem::take(&mut first) {
            out.write_all(b",\n")?;
        }
        out.write_all(line.as_bytes())
    };
    let process = format!("psyche-vmm: {}", meta.topology);
    emit(
        out,
        &format!(
            "{{\"name\":\"process_name\",\"ph\":\"M\",\"ts\":0,\"pid\":{PID},\"tid\":1,\"args\":{{\"name\":{}}}}}",
            quote(&process)
        ),
    )?;

    // Tracks: each vCPU's own, and the extra ones its overlapping spans need.
    let mut extra: Vec<(u32, usize)> = analysis
        .spans
        .iter()
        .zip(&analysis.placements)
        .filter(|(_, placement)| placement.lane > 0)
        .map(|(span, placement)| (span.cpu, placement.lane))
        .collect();
    extra.sort_unstable();
    extra.dedup();
    for vcpu in &trace.vcpus {
        let node = meta.node_of(vcpu.cpu).map_or_else(String::new, |node| format!(" (node {node})"));
        let lanes = extra.iter().filter(|(cpu, _)| *cpu == vcpu.cpu).map(|(_, lane)| *lane);
        for lane in std::iter::once(0).chain(lanes) {
            let tid = tid(vcpu.cpu, lane);
            let name = if lane == 0 {
                format!("vcpu {}{node}", vcpu.cpu)
            } else {
                format!("vcpu {} overlap {lane}", vcpu.cpu)
            };
            emit(
                out,
                &format!(
                    "{{\"name\":\"thread_name\",\"ph\":\"M\",\"ts\":0,\"pid\":{PID},\"tid\":{tid},\"args\":{{\"name\":{}}}}}",
                    quote(&name)
                ),
            )?;
            let order = u64::from(vcpu.cpu) * 100 + lane as u64;
            emit(
                out,
                &format!(
                    "{{\"name\":\"thread_sort_index\",\"ph\":\"M\",\"ts\":0,\"pid\":{PID},\"tid\":{tid},\"args\":{{\"sort_index\":{order}}}}}"
                ),
            )?;
        }
    }

    // Flows: a protected invocation's caller span to its first callee span.
    let mut callee: HashMap<u64, usize> = HashMap::new();
    for (index, span) in analysis.spans.iter().enumerate() {
        if let (SpanKind::Invoked, Some(id)) = (span.kind, span.invocation) {
            callee.entry(id).or_insert(index);
        }
    }
    let mut caller: HashMap<u64, usize> = HashMap::new();
    for (index, span) in analysis.spans.iter().enumerate() {
        if let (SpanKind::Protected, Some(id)) = (span.kind, span.invocation) {
            if callee.contains_key(&id) {
                caller.entry(id).or_insert(index);
            }
        }
    }

    // Per vCPU: its events in time order (spans before instants at equal times, parents first).
    let position: HashMap<u32, usize> = trace.vcpus.iter().enumerate().map(|(v, vcpu)| (vcpu.cpu, v)).collect();
    let mut events: Vec<Vec<(u64, String)>> = vec![Vec::new(); trace.vcpus.len()];
    for (index, (span, placement)) in analysis.spans.iter().zip(&analysis.placements).enumerate() {
        let Some(&v) = position.get(&span.cpu) else { continue };
        let Some(vcpu) = trace.vcpus.get(v) else { continue };
        let Some(begin) = vcpu.records.get(span.begin_record) else { continue };
        let tid = tid(span.cpu, placement.lane);
        let (start, end) = (clock.ns(span.start), clock.ns(span.end));
        let mut args = format!("\"begin\":{}", record_json(begin, span.begin_record));
        if let Some(record) = span.end_record.and_then(|i| vcpu.records.get(i).map(|r| (r, i))) {
            args += &format!(",\"end\":{}", record_json(record.0, record.1));
        }
        args += &format!(
            ",\"cycles\":{},\"finished\":{},\"end_inferred\":{}",
            span.cycles(),
            span.finished,
            span.inferred_end
        );
        if let Some(program) = span.program {
            args += &format!(",\"program\":{program}");
        }
        let line = format!(
            "{{\"name\":{},\"ph\":\"X\",\"ts\":{},\"dur\":{},\"pid\":{PID},\"tid\":{tid},\"cat\":\"{}\",\"args\":{{{args}}}}}",
            quote(&span.path),
            micros(start),
            micros(end - start),
            category(span.kind),
        );
        events[v].push((start, line));
        let flow = match (span.kind, span.invocation) {
            (SpanKind::Protected, Some(id)) if caller.get(&id) == Some(&index) => Some(("s", id, "")),
            (SpanKind::Invoked, Some(id)) if callee.get(&id) == Some(&index) && caller.contains_key(&id) => {
                Some(("f", id, ",\"bp\":\"e\""))
            }
            _ => None,
        };
        if let Some((ph, id, bind)) = flow {
            // A nanosecond into its span, so that a viewer that orders events of equal times
            // its own way still finds the span open when it binds the flow to it.
            let at = start + (end - start).min(2) / 2;
            let line = format!(
                "{{\"name\":\"invocation\",\"ph\":\"{ph}\",\"ts\":{},\"pid\":{PID},\"tid\":{tid},\"cat\":\"invocation\",\"id\":{id}{bind}}}",
                micros(at)
            );
            events[v].push((at, line));
        }
    }
    for (v, vcpu) in trace.vcpus.iter().enumerate() {
        let consumed = analysis.consumed.get(v);
        for (i, record) in vcpu.records.iter().enumerate() {
            if consumed.and_then(|c| c.get(i)).copied().unwrap_or(false) {
                continue;
            }
            let ts = clock.ns(record.tsc);
            let line = format!(
                "{{\"name\":{},\"ph\":\"i\",\"s\":\"t\",\"ts\":{},\"pid\":{PID},\"tid\":{},\"cat\":{},\"args\":{{\"record\":{}}}}}",
                quote(&instant_name(record)),
                micros(ts),
                tid(vcpu.cpu, 0),
                quote(&kind_name(record.kind)),
                record_json(record, i)
            );
            events[v].push((ts, line));
        }
    }
    for vcpu_events in &mut events {
        vcpu_events.sort_by_key(|(ts, _)| *ts);
        for (_, line) in vcpu_events.iter() {
            emit(out, line)?;
        }
    }
    writeln!(out, "\n]}}")?;
    Ok(())
}

/// Reads a trace file written by [`write()`], checking it whole.
pub fn read(path: &Path) -> Result<Trace, TraceFileError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TraceFileError::Read { path: name.clone(), source })?;
    parse(&bytes, &name)
}

/// Parses the bytes of a trace file; `name` is for messages.
pub fn parse(bytes: &[u8], name: &str) -> Result<Trace, TraceFileError> {
    let path = || name.to_owned();
    let not_a_trace = |what: String| TraceFileError::NotATrace { path: path(), what };
    let corrupt = |what: String| TraceFileError::Corrupt { path: path(), what };
    let document: FileDocument = serde_json::from_slice(bytes).map_err(|error| match error.classify() {
        serde_json::error::Category::Eof => {
            TraceFileError::Truncated { path: path(), line: error.line(), column: error.column() }
        }
        serde_json::error::Category::Data => not_a_trace(error.to_string()),
        _ => TraceFileError::Syntax { path: path(), source: error },
    })?;
    let Some(metadata) = document.metadata else {
        return Err(not_a_trace("it has no \"metadata\" object".to_owned()));
    };
    match metadata.get("psyche_trace").and_then(serde_json::Value::as_u64) {
        None => return Err(not_a_trace("its metadata has no psyche_trace version".to_owned())),
        Some(version) if version != u64::from(TRACE_FILE_VERSION) => {
            return Err(TraceFileError::Version { path: path(), found: version })
        }
        Some(_) => {}
    }
    let metadata: FileMetadata =
        serde_json::from_value(metadata).map_err(|error| corrupt(format!("metadata: {error}")))?;
    let vcpus = metadata.vcpus as usize;
    if vcpus == 0 || vcpus > psyche_abi::MAX_CPUS {
        return Err(corrupt(format!("metadata: {vcpus} vCPUs")));
    }
    if metadata.vcpu_stats.len() != vcpus {
        return Err(corrupt(format!(
            "metadata: vcpu_stats has {} entries for {vcpus} vCPUs",
            metadata.vcpu_stats.len()
        )));
    }

    let mut records: Vec<Vec<(u64, TraceRecord)>> = vec![Vec::new(); vcpus];
    for (index, event) in document.trace_events.into_iter().enumerate() {
        let Some(args) = event.args else { continue };
        for record in [args.record, args.begin, args.end].into_iter().flatten() {
            let Some(kind) = kind_from_name(&record.kind) else {
                return Err(corrupt(format!("traceEvents[{index}]: unknown record kind {:?}", record.kind)));
            };
            let Some(slot) = records.get_mut(record.cpu as usize) else {
                return Err(corrupt(format!(
                    "traceEvents[{index}]: a record of cpu {} in a trace of {vcpus} vCPUs",
                    record.cpu
                )));
            };
            let raw = TraceRecord {
                tsc: record.tsc,
                kind: kind as u16,
                cpu: record.cpu as u16,
                arg0: record.arg0,
                arg1: record.arg1,
                arg2: record.arg2,
            };
            slot.push((record.seq, raw));
        }
    }

    let mut traces = Vec::with_capacity(vcpus);
    for (cpu, (mut list, stats)) in records.into_iter().zip(metadata.vcpu_stats).enumerate() {
        list.sort_by_key(|(seq, _)| *seq);
        for (position, (seq, _)) in list.iter().enumerate() {
            if *seq != position as u64 {
                return Err(corrupt(format!(
                    "vCPU {cpu}: its record {position} has sequence number {seq}: records are missing or repeated"
                )));
            }
        }
        if list.len() as u64 != stats.records {
            return Err(corrupt(format!(
                "vCPU {cpu}: the metadata counts {} records, the events hold {}",
                stats.records,
                list.len()
            )));
        }
        if let Some(pair) = list.windows(2).find(|pair| pair[1].1.tsc < pair[0].1.tsc) {
            return Err(corrupt(format!("vCPU {cpu}: record {} goes back in time", pair[1].0)));
        }
        if stats.cpu as usize != cpu {
            return Err(corrupt(format!("metadata: vcpu_stats[{cpu}] is for cpu {}", stats.cpu)));
        }
        traces.push(VcpuTrace { cpu: cpu as u32, records: list.into_iter().map(|(_, r)| r).collect(), stats });
    }
    let meta = TraceMeta {
        topology: metadata.topology.name,
        nodes: metadata.topology.nodes,
        distances: metadata.topology.distances,
        tsc_khz: metadata.tsc_khz,
        vcpus: metadata.vcpus,
        programs: metadata.programs,
        kernel: metadata.kernel,
        tsc_offsets: metadata.tsc_offsets,
        tsc_drift: metadata.tsc_drift,
    };
    Ok(Trace::new(meta, traces))
}

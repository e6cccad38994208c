//! From records to spans: what the trace file's durations and the profile are made of.
//!
//! Both the trace writer and `psyche-vmm profile` call [`analyze`] on the same records, so the
//! profile of a trace file is exactly the profile of the run that wrote it.
//!
//! * **Gate call** (`gate:<system call>`): a `gate_enter` and the next `gate_exit` of the same
//!   system call on the same vCPU, named by the call the kernel ran (`gate:no_such_call` for a
//!   number that named none, whatever its low 32 bits). Calls that leave the kernel another way end where the trace
//!   shows it: at the program's `program_exit` (`exit`), at the `upcall` the kernel delivers
//!   instead of returning (a protected call, a block), or else at the call's last kernel record
//!   (invocation and domain-switch records, hypercall exits, kernel-mode faults) before a record
//!   that only comes from outside the kernel (another gate entry, a tick, a user-mode fault): a
//!   call that resumes another thread, like `invocation_return`, writes no record when it
//!   leaves. Such an end is marked inferred.
//! * **Protected invocation** (`protected:<realm>/<operation>`): an `invocation_begin` and the
//!   `invocation_end` with the same invocation id (arg2), on the caller's vCPU.
//! * **Invoked** (`invoked:<realm>/<operation>`): on the callee's vCPU, from the
//!   `invocation_arrive` of that id until the caller's `invocation_end` (the callee's kernel writes
//!   no record when it hands the result back, so the caller's end is when it was done).
//! * **Upcall** (`upcall:<kind>`): an upcall's handler runs from the `upcall` record until the
//!   kernel next writes a record on that vCPU (a gate call, a fault, a tick, ...): upcalls do not
//!   return, so this is the time the domain ran on the upcall before the kernel saw it again.
//!
//! A span whose end never came is kept, marked unfinished, up to the vCPU's last record; the
//! statistics leave unfinished spans out and count them.

use std::collections::{BTreeMap, HashMap};

use psyche_abi::trace::{TraceKind, TraceRecord};

use super::{gate_call_name, ns_to_cycles, upcall_name, Trace};

/// What a span is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpanKind {
    Gate,
    Protected,
    Invoked,
    Upcall,
}

/// A duration on one vCPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub cpu: u32,
    pub kind: SpanKind,
    /// `gate:write`, `protected:3/1`, `invoked:3/1`, `upcall:2`.
    pub path: String,
    /// Guest TSC at the start and the end.
    pub start: u64,
    pub end: u64,
    /// The record that opened it (an index into the vCPU's records).
    pub begin_record: usize,
    /// The record that closed it, when that record is on the same vCPU and belongs to it.
    pub end_record: Option<usize>,
    /// Whether its end was seen.
    pub finished: bool,
    /// Whether its end is the last kernel record of a gate call that left the kernel without a
    /// record saying so (see the module docs).
    pub inferred_end: bool,
    /// The protected invocation's id (joins caller and callee).
    pub invocation: Option<u64>,
    /// The program running on the vCPU when it started.
    pub program: Option<u32>,
}

impl Span {
    /// Its length in cycles.
    pub fn cycles(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
}

/// Where a span sits among the others of its vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// 0: the vCPU's own track; k > 0: an extra track for spans that overlap without nesting.
    pub lane: usize,
    /// The span it is nested in (an index into [`Analysis::spans`]).
    pub parent: Option<usize>,
}

/// The spans of a trace.
#[derive(Clone, Debug, Default)]
pub struct Analysis {
    pub spans: Vec<Span>,
    /// Same order as `spans`.
    pub placements: Vec<Placement>,
    /// Per vCPU, per record: whether a span carries it (as its begin or end record).
    pub consumed: Vec<Vec<bool>>,
    /// Records that match nothing (a gate exit with no entry, an invocation end with no begin).
    pub unmatched: BTreeMap<String, u64>,
    /// First and last timestamp of the whole trace.
    pub first_tsc: u64,
    pub last_tsc: u64,
}

fn is(record: &TraceRecord, kind: TraceKind) -> bool {
    record.kind == kind as u16
}

/// What a record says about a gate call that is open on its vCPU.
enum InGate {
    /// The kernel wrote it inside the call.
    Inside,
    /// The call ended with it (an upcall delivered instead of a return).
    EndsAt,
    /// Only code outside the call writes it: the call ended before.
    After,
    /// It says nothing either way (a VM exit other than a hypercall, e.g. a kick).
    Neutral,
}

fn in_gate(record: &TraceRecord) -> InGate {
    /// Page-fault error code bit: the access was made at CPL3.
    const PF_USER: u32 = 1 << 2;
    match TraceKind::from_raw(record.kind) {
        Some(
            TraceKind::InvocationBegin
            | TraceKind::InvocationArrive
            | TraceKind::InvocationEnd
            | TraceKind::DomainSwitch
            | TraceKind::RealmOpen
            | TraceKind::RealmCreate
            | TraceKind::RealmDestroy
            | TraceKind::RealmMigrate,
        ) => InGate::Inside,
        Some(TraceKind::VmExit) if record.arg0 == psyche_abi::trace::VmExitKind::Hypercall as u32 => InGate::Inside,
        Some(TraceKind::VmExit) => InGate::Neutral,
        Some(TraceKind::PageFault) if record.arg0 & PF_USER == 0 => InGate::Inside,
        Some(TraceKind::Upcall) => InGate::EndsAt,
        _ => InGate::After,
    }
}

/// An open gate call: the span, and the time of its last kernel record so far.
struct OpenGate {
    span: Span,
    last_inside: u64,
}

/// Pairs the records of `trace` into spans and places them.
pub fn analyze(trace: &Trace) -> Analysis {
    let mut analysis = Analysis {
        consumed: trace.vcpus.iter().map(|v| vec![false; v.records.len()]).collect(),
        first_tsc: trace.vcpus.iter().filter_map(|v| v.records.first()).map(|r| r.tsc).min().unwrap_or(0),
        last_tsc: trace.vcpus.iter().filter_map(|v| v.records.last()).map(|r| r.tsc).max().unwrap_or(0),
        ..Analysis::default()
    };
    let mut unmatched = |what: &str| *analysis.unmatched.entry(what.to_owned()).or_default() += 1;

    // Invocation records by id, across vCPUs: (tsc, vcpu position, record index, program).
    type Ends = HashMap<u64, Vec<(u64, usize, usize, Option<u32>)>>;
    let (mut begins, mut ends, mut arrives): (Ends, Ends, Ends) = Default::default();
    let mut spans = Vec::new();

    for (v, vcpu) in trace.vcpus.iter().enumerate() {
        let last = vcpu.records.last().map_or(0, |r| r.tsc);
        let mut program: Option<u32> = None;
        let mut gate: Option<OpenGate> = None;
        let mut upcall: Option<Span> = None;
        for (i, record) in vcpu.records.iter().enumerate() {
            // A gate call that left the kernel without a gate_exit.
            if !is(record, TraceKind::GateExit) && !is(record, TraceKind::ProgramExit) {
                match (gate.take(), in_gate(record)) {
                    (Some(mut open), InGate::Inside) => {
                        open.last_inside = record.tsc;
                        gate = Some(open);
                    }
                    (Some(mut open), InGate::EndsAt) => {
                        open.span.end = record.tsc;
                        open.span.finished = true;
                        spans.push(open.span);
                    }
                    (Some(mut open), InGate::After) => {
                        open.span.end = open.last_inside;
                        open.span.finished = true;
                        open.span.inferred_end = true;
                        spans.push(open.span);
                    }
                    (open, _) => gate = open,
                }
            }
            let guest = !is(record, TraceKind::VmExit);
            if guest {
                if let Some(mut open) = upcall.take() {
                    open.end = record.tsc;
                    open.finished = true;
                    spans.push(open);
                }
            }
            let span = |kind, path: String| Span {
                cpu: vcpu.cpu,
                kind,
                path,
                start: record.tsc,
                end: last,
                begin_record: i,
                end_record: None,
                finished: false,
                inferred_end: false,
                invocation: None,
                program,
            };
            match TraceKind::from_raw(record.kind) {
                Some(TraceKind::GateEnter) => {
                    let span = span(SpanKind::Gate, format!("gate:{}", gate_call_name(record.arg0)));
                    gate = Some(OpenGate { span, last_inside: record.tsc });
                }
                Some(TraceKind::GateExit) => match gate.take() {
                    Some(mut open)
                        if vcpu.records.get(open.span.begin_record).is_some_and(|b| b.arg0 == record.arg0) =>
                    {
                        open.span.end = record.tsc;
                        open.span.end_record = Some(i);
                        open.span.finished = true;
                        spans.push(open.span);
                    }
                    other => {
                        gate = other;
                        unmatched("gate_exit without gate_enter");
                    }
                },
                Some(TraceKind::ProgramStart) => program = Some(record.arg0),
                Some(TraceKind::ProgramExit) => {
                    if let Some(mut open) = gate.take() {
                        // The exit gate (or a program killed in a call) ends with the program.
                        open.span.end = record.tsc;
                        open.span.finished = true;
                        spans.push(open.span);
                    }
                    program = None;
                }
                Some(TraceKind::Upcall) => {
                    upcall = Some(span(SpanKind::Upcall, format!("upcall:{}", upcall_name(record.arg0))));
                }
                Some(TraceKind::InvocationBegin) => {
                    begins.entry(record.arg2).or_default().push((record.tsc, v, i, program))
                }
                Some(TraceKind::InvocationEnd) => {
                    ends.entry(record.arg2).or_default().push((record.tsc, v, i, program))
                }
                Some(TraceKind::InvocationArrive) => {
                    arrives.entry(record.arg2).or_default().push((record.tsc, v, i, program))
                }
                _ => {}
            }
        }
        spans.extend(gate.map(|open| open.span));
        spans.extend(upcall);
    }

    // Protected invocations: each begin with the first unused end of its id at or after it; each
    // arrival with the latest begin of its id at or before it. Sorted lists and a moving cursor:
    // a guest that gives every invocation the same id costs n log n, not n squared.
    let mut ids: Vec<u64> = begins.keys().chain(ends.keys()).chain(arrives.keys()).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let mut id_begins = begins.remove(&id).unwrap_or_default();
        let mut id_ends = ends.remove(&id).unwrap_or_default();
        let mut id_arrives = arrives.remove(&id).unwrap_or_default();
        id_begins.sort_unstable();
        id_ends.sort_unstable();
        id_arrives.sort_unstable();
        // The end matched to each begin (ends before every remaining begin match none).
        let mut pairs = Vec::with_capacity(id_begins.len());
        let mut next_end = id_ends.iter().peekable();
        for begin in &id_begins {
            while next_end.next_if(|end| end.0 < begin.0).is_some() {
                unmatched("invocation_end without invocation_begin");
            }
            pairs.push((*begin, next_end.next().copied()));
        }
        for _ in next_end {
            unmatched("invocation_end without invocation_begin");
        }
        for &((tsc, v, i, program), end) in &pairs {
            let Some(vcpu) = trace.vcpus.get(v) else { continue };
            let Some(record) = vcpu.records.get(i) else { continue };
            let last = vcpu.records.last().map_or(tsc, |r| r.tsc);
            let (end_tsc, end_record, finished) = match end {
                Some((end_tsc, ev, ei, _)) => (end_tsc, (ev == v).then_some(ei), true),
                None => (last.max(tsc), None, false),
            };
            spans.push(Span {
                cpu: vcpu.cpu,
                kind: SpanKind::Protected,
                path: format!("protected:{}/{}", record.arg1, record.arg0),
                start: tsc,
                end: end_tsc,
                begin_record: i,
                end_record,
                finished,
                inferred_end: false,
                invocation: Some(id),
                program,
            });
        }
        for &(tsc, v, i, program) in &id_arrives {
            let Some(vcpu) = trace.vcpus.get(v) else { continue };
            let Some(record) = vcpu.records.get(i) else { continue };
            // The latest begin at or before the arrival.
            let before = pairs.partition_point(|(begin, _)| begin.0 <= tsc);
            let caller = before.checked_sub(1).and_then(|k| pairs.get(k));
            if caller.is_none() {
                unmatched("invocation_arrive without invocation_begin");
            }
            let (end, finished) = match caller.and_then(|(_, end)| *end) {
                Some((end, ..)) if end >= tsc => (end, true),
                _ => (tsc, false),
            };
            spans.push(Span {
                cpu: vcpu.cpu,
                kind: SpanKind::Invoked,
                path: format!("invoked:{}/{}", record.arg1, record.arg0),
                start: tsc,
                end,
                begin_record: i,
                end_record: None,
                finished,
                inferred_end: false,
                invocation: Some(id),
                program,
            });
        }
    }

    let position: HashMap<u32, usize> = trace.vcpus.iter().enumerate().map(|(v, vcpu)| (vcpu.cpu, v)).collect();
    for span in &spans {
        if let Some(consumed) = position.get(&span.cpu).and_then(|&v| analysis.consumed.get_mut(v)) {
            for index in std::iter::once(span.begin_record).chain(span.end_record) {
                if let Some(slot) = consumed.get_mut(index) {
                    *slot = true;
                }
            }
        }
    }
    // Longest first among equal starts, so that a parent precedes its children.
    spans.sort_by(|a, b| {
        (a.cpu, a.start, std::cmp::Reverse(a.end), a.kind).cmp(&(b.cpu, b.start, std::cmp::Reverse(b.end), b.kind))
    });
    analysis.placements = place(&spans);
    analysis.spans = spans;
    analysis
}

/// Nests each vCPU's spans (sorted by vCPU, start, longest first) on tracks: a span goes on the
/// first track where it fits inside the innermost open span, or opens none.
fn place(spans: &[Span]) -> Vec<Placement> {
    /// Most tracks one vCPU's spans are spread over.
    const MAX_LANES: usize = 16;
    let mut placements = Vec::with_capacity(spans.len());
    // Per lane: the stack of open spans (end, index).
    let mut lanes: Vec<Vec<(u64, usize)>> = Vec::new();
    let mut cpu = None;
    for (index, span) in spans.iter().enumerate() {
        if cpu != Some(span.cpu) {
            cpu = Some(span.cpu);
            lanes.clear();
        }
        let mut placed = None;
        for (lane, stack) in lanes.iter_mut().enumerate() {
            while stack.last().is_some_and(|&(end, _)| end <= span.start) {
                stack.pop();
            }
            match stack.last() {
                None => {
                    placed = Some(Placement { lane, parent: None });
                }
                Some(&(end, parent)) if end >= span.end => {
                    placed = Some(Placement { lane, parent: Some(parent) });
                }
                Some(_) => continue,
            }
            stack.push((span.end, index));
            break;
        }
        let placement = placed.unwrap_or_else(|| {
            if lanes.len() < MAX_LANES {
                lanes.push(vec![(span.end, index)]);
            }
            // Past the last track, spans share it whether they nest or not: the work per span
            // stays bounded whatever a guest records.
            Placement { lane: lanes.len() - 1, parent: None }
        });
        placements.push(placement);
    }
    placements
}

/// Statistics of one invocation path, in cycles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathStats {
    pub path: String,
    pub count: u64,
    /// Of `count`, the calls whose end was inferred (see the module docs).
    pub inferred: u64,
    pub unfinished: u64,
    pub mean: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// The nearest-rank percentile `p` (0..=100) of sorted values.
pub fn percentile(sorted: &[u64], p: u64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() as u64 * p).div_ceil(100).max(1);
    sorted.get(rank as usize - 1).copied().unwrap_or(0)
}

/// Per path (gate calls, protected invocations, upcalls): count, mean, p50, p99 and max of the
/// finished spans, sorted by path.
pub fn path_stats(analysis: &Analysis) -> Vec<PathStats> {
    // Per path: the lengths of its finished spans, how many ends were inferred, how many never came.
    let mut by_path: BTreeMap<&str, (Vec<u64>, u64, u64)> = BTreeMap::new();
    for span in analysis.spans.iter().filter(|s| s.kind != SpanKind::Invoked) {
        let entry = by_path.entry(&span.path).or_default();
        if span.finished {
            entry.0.push(span.cycles());
            entry.1 += u64::from(span.inferred_end);
        } else {
            entry.2 += 1;
        }
    }
    by_path
        .into_iter()
        .map(|(path, (mut cycles, inferred, unfinished))| {
            cycles.sort_unstable();
            let count = cycles.len() as u64;
            let sum: u128 = cycles.iter().map(|&c| u128::from(c)).sum();
            PathStats {
                path: path.to_owned(),
                count,
                inferred,
                unfinished,
                mean: if count == 0 { 0 } else { (sum / u128::from(count)) as u64 },
                p50: percentile(&cycles, 50),
                p99: percentile(&cycles, 99),
                max: cycles.last().copied().unwrap_or(0),
            }
        })
        .collect()
}

/// What happened to one realm.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RealmStats {
    /// `None`: faults and traps at addresses in no realm the trace saw created.
    pub realm: Option<u64>,
    pub home_node: Option<u32>,
    pub base: Option<u64>,
    /// Opens by outcome (arg0 of `realm_open`).
    pub opens: BTreeMap<u32, u64>,
    pub page_faults: u64,
    pub remote_traps: u64,
    pub latency_ns: u64,
    /// Moves to another node (`realm_migrate`); `home_node` stays the home it was created on.
    pub migrations: u64,
}

/// Per realm: opens by outcome, page faults, remote-latency traps and migrations. A fault or trap belongs to
/// the realm whose range (`psyche_abi::realm::realm_of`) holds its address; one outside every
/// realm's range to the `None` row.
pub fn realm_stats(trace: &Trace) -> Vec<RealmStats> {
    let mut realms: BTreeMap<Option<u64>, RealmStats> = BTreeMap::new();
    let records = || trace.vcpus.iter().flat_map(|v| v.records.iter());
    for record in records().filter(|r| is(r, TraceKind::RealmCreate)) {
        let realm = realms.entry(Some(record.arg1)).or_default();
        realm.realm = Some(record.arg1);
        realm.home_node = Some(record.arg0);
        realm.base = Some(record.arg2);
    }
    let owner = |address: u64| psyche_abi::realm::realm_of(address).map(u64::from);
    for record in records() {
        let (key, apply): (Option<u64>, fn(&mut RealmStats, &TraceRecord)) = match TraceKind::from_raw(record.kind) {
            Some(TraceKind::RealmOpen) => {
                (Some(record.arg1), |realm, record| *realm.opens.entry(record.arg0).or_default() += 1)
            }
            Some(TraceKind::PageFault) => (owner(record.arg1), |realm, _| realm.page_faults += 1),
            Some(TraceKind::LatencyTrap) => (owner(record.arg1), |realm, record| {
                realm.remote_traps += 1;
                realm.latency_ns = realm.latency_ns.saturating_add(record.arg2);
            }),
            Some(TraceKind::RealmMigrate) => (Some(record.arg1), |realm, _| realm.migrations += 1),
            _ => continue,
        };
        let realm = realms.entry(key).or_default();
        realm.realm = key;
        apply(realm, record);
    }
    // Realms first, by id; the unattributed row last.
    let mut rows: Vec<RealmStats> = realms.into_values().collect();
    rows.sort_by_key(|row| (row.realm.is_none(), row.realm));
    rows
}

/// How one vCPU spent the trace's time, in cycles (see [`time_split`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimeSplit {
    pub cpu: u32,
    pub total: u64,
    pub user: u64,
    pub kernel: u64,
    pub idle: u64,
    pub latency: u64,
    /// Programs that ran on it.
    pub programs: Vec<u32>,
}

/// Per vCPU, the trace's whole time (first to last record of any vCPU) split four ways:
/// * **idle**: no program on the vCPU (before its `program_start`, after its `program_exit`, or
///   all the time when none ran there; boot is idle time), or its program waiting in the kernel's
///   `idle` call (its domain had nothing to run);
/// * **kernel**: inside other gate calls (to their end as the module docs define it);
/// * **latency**: the remote-memory latency the kernel charged (`latency_trap` arg2, in ns,
///   converted to cycles);
/// * **user**: the rest of the time a program was on the vCPU.
pub fn time_split(trace: &Trace, analysis: &Analysis) -> Vec<TimeSplit> {
    let (first, last) = (analysis.first_tsc, analysis.last_tsc);
    let total = last.saturating_sub(first);
    let idle_call = format!("gate:{}", gate_call_name(psyche_abi::syscall::Syscall::Idle as u32));
    // Per vCPU: cycles in gate calls, and in the idle call.
    let mut in_gates: HashMap<u32, (u64, u64)> = HashMap::new();
    for span in analysis.spans.iter().filter(|s| s.kind == SpanKind::Gate) {
        let (kernel, idle) = in_gates.entry(span.cpu).or_default();
        let sum = if span.path == idle_call { idle } else { kernel };
        *sum = sum.saturating_add(span.cycles());
    }
    trace
        .vcpus
        .iter()
        .map(|vcpu| {
            let mut split = TimeSplit { cpu: vcpu.cpu, total, ..TimeSplit::default() };
            let mut running: Option<u64> = None;
            let mut active = 0u64;
            for record in &vcpu.records {
                match TraceKind::from_raw(record.kind) {
                    Some(TraceKind::ProgramStart) => {
                        running.get_or_insert(record.tsc);
                        split.programs.push(record.arg0);
                    }
                    Some(TraceKind::ProgramExit) => {
                        if let Some(start) = running.take() {
                            active = active.saturating_add(record.tsc.saturating_sub(start));
                        }
                    }
                    Some(TraceKind::LatencyTrap) => {
                        split.latency = split.latency.saturating_add(ns_to_cycles(record.arg2, trace.meta.tsc_khz));
                    }
                    _ => {}
                }
            }
            if let Some(start) = running {
                active = active.saturating_add(last.saturating_sub(start));
            }
            let (kernel, waiting) = in_gates.get(&vcpu.cpu).copied().unwrap_or_default();
            let waiting = waiting.min(active);
            split.kernel = kernel.min(active - waiting);
            split.latency = split.latency.min(active - waiting - split.kernel);
            split.user = active - waiting - split.kernel - split.latency;
            split.idle = total.saturating_sub(active).saturating_add(waiting);
            split
        })
        .collect()
}

/// Folded stacks for a flame graph, `vcpu0;program 0;gate:write <cycles>`: each span's own time
/// (its length less its nested spans'), under its vCPU, its program and the spans it is in.
pub fn folded_stacks(analysis: &Analysis) -> Vec<String> {
    /// Most nested spans one stack shows.
    const MAX_FRAMES: usize = 32;
    let spans = &analysis.spans;
    let mut own: Vec<u64> = spans.iter().map(Span::cycles).collect();
    for (index, placement) in analysis.placements.iter().enumerate() {
        if let (Some(parent), Some(span)) = (placement.parent, spans.get(index)) {
            if let Some(time) = own.get_mut(parent) {
                *time = time.saturating_sub(span.cycles());
            }
        }
    }
    // Summed in u128: a trace that is not the kernel's (an edited file) can hold spans whose
    // cycles add up past 2^64, which the flame graph's own sums (usize) would overflow on.
    let mut folded: BTreeMap<String, u128> = BTreeMap::new();
    for (index, span) in spans.iter().enumerate() {
        let mut frames = vec![span.path.clone()];
        let mut up = analysis.placements.get(index).and_then(|p| p.parent);
        while let Some(parent) = up {
            if frames.len() == MAX_FRAMES {
                // Deeper nesting than anyone can read: cut, and say so.
                frames.push("...".to_owned());
                break;
            }
            frames.push(spans.get(parent).map_or_else(String::new, |s| s.path.clone()));
            up = analysis.placements.get(parent).and_then(|p| p.parent);
        }
        let program = span.program.map_or_else(|| "kernel".to_owned(), |p| format!("program {p}"));
        frames.push(program);
        frames.push(format!("vcpu{}", span.cpu));
        frames.reverse();
        let weight = own.get(index).copied().unwrap_or(0);
        *folded.entry(frames.join(";")).or_default() += u128::from(weight);
    }
    // Scaled down by a power of two if the whole would not fit in a u64 (and so in the flame
    // graph's usize): the proportions are what a flame graph shows.
    let total: u128 = folded.values().sum();
    let shift = (128 - total.leading_zeros()).saturating_sub(63);
    folded
        .into_iter()
        .map(|(stack, weight)| (stack, weight >> shift))
        .filter(|(_, weight)| *weight > 0)
        .map(|(stack, weight)| format!("{stack} {weight}"))
        .collect()
}

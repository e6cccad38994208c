//! Tests of the trace module on synthetic records: pairing, placement, the file format both ways,
//! the profile, flame graphs, and the errors bad files get.

use std::sync::atomic::AtomicU64;

use psyche_abi::syscall::Syscall;
use psyche_abi::trace::{
    TraceKind, TraceRecord, TraceRingHeader, VmExitKind, TRACE_RECORDS_OFFSET, TRACE_RING_CAPACITY,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

use super::analysis::{self, analyze, SpanKind};
use super::chrome::{self, TraceFileError};
use super::ring::Ring;
use super::*;

/// Where realm 7 lives.
const REALM7: u64 = psyche_abi::realm::realm_base(7);
const KHZ: u64 = 2_000_000; // 2 GHz: 2 cycles a nanosecond

fn meta(vcpus: u32) -> TraceMeta {
    TraceMeta {
        topology: "test".to_owned(),
        nodes: vec![
            TraceNode { id: 0, cpus: (0..vcpus).filter(|c| c % 2 == 0).collect(), memory_bytes: 64 << 20 },
            TraceNode { id: 1, cpus: (0..vcpus).filter(|c| c % 2 == 1).collect(), memory_bytes: 64 << 20 },
        ],
        distances: vec![vec![10, 21], vec![21, 10]],
        tsc_khz: KHZ,
        vcpus,
        programs: vec!["gates".to_owned()],
        kernel: "<test>".to_owned(),
        tsc_offsets: vec![0; vcpus as usize],
        tsc_drift: vec![0; vcpus as usize],
    }
}

fn rec(cpu: u16, tsc: u64, kind: TraceKind, arg0: u32, arg1: u64, arg2: u64) -> TraceRecord {
    TraceRecord { tsc, kind: kind as u16, cpu, arg0, arg1, arg2 }
}

fn trace_of(vcpus: u32, records: Vec<TraceRecord>) -> Trace {
    let mut per_cpu: Vec<VcpuTrace> = (0..vcpus).map(|cpu| VcpuTrace { cpu, ..VcpuTrace::default() }).collect();
    for record in records {
        per_cpu[usize::from(record.cpu)].records.push(record);
    }
    for vcpu in &mut per_cpu {
        vcpu.records.sort_by_key(|r| r.tsc);
        vcpu.stats = VcpuStats { cpu: vcpu.cpu, records: vcpu.records.len() as u64, ..VcpuStats::default() };
    }
    Trace::new(meta(vcpus), per_cpu)
}

const CPU_INFO: u32 = Syscall::CpuInfo as u32;
const WRITE: u32 = Syscall::Write as u32;
const EXIT: u32 = Syscall::Exit as u32;

/// A program on vCPU 0 that makes `n` cpu_info calls of 100 + 10 k cycles, a write with a
/// console hypercall in it, and exits; vCPU 1 only ticks.
fn gates_trace(n: u64) -> Trace {
    use TraceKind::*;
    let mut records = vec![rec(0, 1000, ProgramStart, 0, 0, 0)];
    let mut t = 2000;
    for k in 0..n {
        records.push(rec(0, t, GateEnter, CPU_INFO, 0, 0));
        records.push(rec(0, t + 100 + 10 * k, GateExit, CPU_INFO, 0, 0));
        t += 2000;
    }
    records.push(rec(0, t, GateEnter, WRITE, 0, 0));
    records.push(rec(0, t + 50, VmExit, VmExitKind::Hypercall as u32, 0x99, 1));
    records.push(rec(0, t + 300, GateExit, WRITE, 0, 0));
    records.push(rec(0, t + 1000, GateEnter, EXIT, 0, 0));
    records.push(rec(0, t + 1500, ProgramExit, 0, 0, 0));
    records.push(rec(1, 500, TimerTick, 0, 0, 0));
    records.push(rec(1, t + 2000, VmExit, VmExitKind::Interrupted as u32, 0, 0));
    trace_of(2, records)
}

/// A protected invocation from vCPU 0 to vCPU 1, with an upcall on each side and a gate call
/// inside it on the caller.
fn invocation_trace() -> Trace {
    use TraceKind::*;
    let records = vec![
        rec(0, 100, ProgramStart, 0, 0, 0),
        rec(1, 100, ProgramStart, 1, 0, 0),
        rec(0, 1000, RealmCreate, 1, 7, REALM7),
        rec(0, 2000, PageFault, 4, REALM7 + 0x1000, 0x1234),
        rec(0, 2100, RealmOpen, 2, 7, 1),
        rec(0, 2200, InvocationBegin, 3, 7, 42),
        rec(0, 2300, Upcall, 1, 1, 42),
        rec(0, 2600, GateEnter, CPU_INFO, 0, 0),
        rec(0, 2700, GateExit, CPU_INFO, 0, 0),
        rec(1, 2400, InvocationArrive, 3, 7, 42),
        rec(1, 2450, Upcall, 0, 2, 42),
        rec(1, 2900, LatencyTrap, 1, REALM7 + 0x2000, 500),
        rec(1, 3500, DomainSwitch, 0, 2, 1),
        rec(0, 4000, InvocationEnd, 3, 7, 42),
        rec(0, 4100, Upcall, 2, 1, 42),
        rec(0, 4400, ProgramExit, 0, 0, 0),
        rec(1, 4500, ProgramExit, 1, 0, 0),
    ];
    trace_of(2, records)
}

fn to_file(trace: &Trace) -> Vec<u8> {
    let mut bytes = Vec::new();
    chrome::write(trace, &analyze(trace), &mut bytes).unwrap();
    bytes
}

#[test]
fn gate_calls_pair_by_system_call_and_the_exit_gate_ends_with_the_program() {
    let trace = gates_trace(100);
    let analysis = analyze(&trace);
    let stats = analysis::path_stats(&analysis);
    let paths: Vec<(&str, u64)> = stats.iter().map(|p| (p.path.as_str(), p.count)).collect();
    assert_eq!(paths, [("gate:cpu_info", 100), ("gate:exit", 1), ("gate:write", 1)]);
    let cpu_info = &stats[0];
    // Durations 100, 110, ..., 1090.
    assert_eq!((cpu_info.mean, cpu_info.p50, cpu_info.p99, cpu_info.max), (595, 590, 1080, 1090));
    assert_eq!(stats[1].mean, 500);
    assert!(analysis.unmatched.is_empty(), "{:?}", analysis.unmatched);
}

#[test]
fn a_gate_call_that_named_no_call_is_profiled_as_such() {
    use psyche_abi::trace::GATE_NO_SUCH_CALL;
    use TraceKind::*;
    // RAX = 2^32 + 19 and RAX = 19 through the kernel gate: the kernel ran neither as a
    // protected call, and recorded RAX beside its verdict.
    let no_such_call = -(psyche_abi::syscall::SysError::NoSuchCall as i64) as u64;
    let trace = trace_of(
        1,
        vec![
            rec(0, 10, ProgramStart, 0, 0, 0),
            rec(0, 20, GateEnter, GATE_NO_SUCH_CALL, (1 << 32) + 19, 0),
            rec(0, 30, GateExit, GATE_NO_SUCH_CALL, no_such_call, 0),
            rec(0, 40, GateEnter, GATE_NO_SUCH_CALL, 19, 0),
            rec(0, 60, GateExit, GATE_NO_SUCH_CALL, no_such_call, 0),
        ],
    );
    let stats = analysis::path_stats(&analyze(&trace));
    let paths: Vec<(&str, u64, u64)> = stats.iter().map(|p| (p.path.as_str(), p.count, p.max)).collect();
    assert_eq!(paths, [("gate:no_such_call", 2, 20)]);
}

#[test]
fn percentiles_are_nearest_rank() {
    assert_eq!(analysis::percentile(&[], 50), 0);
    assert_eq!(analysis::percentile(&[7], 99), 7);
    let values: Vec<u64> = (1..=200).collect();
    assert_eq!(analysis::percentile(&values, 50), 100);
    assert_eq!(analysis::percentile(&values, 99), 198);
    assert_eq!(analysis::percentile(&values, 100), 200);
}

#[test]
fn unmatched_records_are_counted_not_paired() {
    use TraceKind::*;
    let trace = trace_of(
        1,
        vec![
            rec(0, 10, GateExit, CPU_INFO, 0, 0),
            rec(0, 20, GateEnter, CPU_INFO, 0, 0),
            rec(0, 30, GateEnter, WRITE, 0, 0),
            rec(0, 40, GateExit, CPU_INFO, 0, 0),
            rec(0, 50, InvocationEnd, 1, 1, 99),
        ],
    );
    let analysis = analyze(&trace);
    assert_eq!(analysis.unmatched.get("gate_exit without gate_enter"), Some(&2));
    assert_eq!(analysis.unmatched.get("invocation_end without invocation_begin"), Some(&1));
    let stats = analysis::path_stats(&analysis);
    // cpu_info left the kernel unseen: it ends at its last kernel record (its own entry).
    let cpu_info = stats.iter().find(|p| p.path == "gate:cpu_info").unwrap();
    assert_eq!((cpu_info.count, cpu_info.inferred, cpu_info.max), (1, 1, 0));
    // The write call never returned: unfinished, left out of the statistics.
    let write = stats.iter().find(|p| p.path == "gate:write").unwrap();
    assert_eq!((write.count, write.unfinished), (0, 1));
}

#[test]
fn gate_calls_that_leave_by_an_upcall_or_unseen_end_where_the_trace_shows_it() {
    use TraceKind::*;
    const CALL: u32 = Syscall::ProtectedCall as u32;
    const RETURN: u32 = Syscall::InvocationReturn as u32;
    let trace = trace_of(
        1,
        vec![
            rec(0, 50, ProgramStart, 0, 0, 0),
            // The caller's protected call: the kernel delivers the arrival upcall instead of
            // returning.
            rec(0, 100, GateEnter, CALL, 0, 0),
            rec(0, 110, InvocationBegin, 2, 0, 1),
            rec(0, 120, InvocationArrive, 2, 0, 1),
            rec(0, 130, VmExit, VmExitKind::Interrupted as u32, 0, 0),
            rec(0, 140, Upcall, 1, 3, 1),
            // The callee returns: the kernel resumes the caller without a record.
            rec(0, 300, GateEnter, RETURN, 0, 0),
            rec(0, 310, InvocationEnd, 0, 0, 1),
            rec(0, 320, VmExit, VmExitKind::Hypercall as u32, 0x99, 1),
            rec(0, 330, DomainSwitch, 0, 3, 2),
            // Back in the caller, at CPL3: a fault there is not part of the call.
            rec(0, 900, PageFault, 4 | 2, 0x1000, 0x2000),
        ],
    );
    let analysis = analyze(&trace);
    let gate = |path: &str| analysis.spans.iter().find(|s| s.path == path).unwrap();
    let call = gate("gate:protected_call");
    assert_eq!((call.start, call.end, call.finished, call.inferred_end), (100, 140, true, false));
    let ret = gate("gate:invocation_return");
    assert_eq!((ret.start, ret.end, ret.finished, ret.inferred_end), (300, 330, true, true));
    // The upcall's handler ran until the callee entered the kernel again.
    let upcall = gate("upcall:invocation_arrived");
    assert_eq!((upcall.start, upcall.end), (140, 300));
    let splits = analysis::time_split(&trace, &analysis);
    assert_eq!(splits[0].kernel, 40 + 30);
}

#[test]
fn a_protected_invocation_spans_the_caller_and_the_callee_joined_by_a_flow() {
    let trace = invocation_trace();
    let analysis = analyze(&trace);
    let find = |path: &str| analysis.spans.iter().find(|s| s.path == path).unwrap();
    let protected = find("protected:7/3");
    assert_eq!((protected.cpu, protected.start, protected.end, protected.finished), (0, 2200, 4000, true));
    let invoked = find("invoked:7/3");
    assert_eq!((invoked.cpu, invoked.start, invoked.end, invoked.finished), (1, 2400, 4000, true));
    // Upcalls last until the kernel's next record on their vCPU.
    let upcall = find("upcall:invocation_arrived");
    assert_eq!((upcall.start, upcall.end), (2300, 2600));
    let callee_upcall = find("upcall:0");
    assert_eq!((callee_upcall.start, callee_upcall.end), (2450, 2900));
    // The gate call and the upcall nest inside the invocation on the caller's track.
    for path in ["gate:cpu_info", "upcall:invocation_arrived"] {
        let index = analysis.spans.iter().position(|s| s.path == path).unwrap();
        let parent = analysis.placements[index].parent.map(|p| analysis.spans[p].path.as_str());
        assert_eq!(parent, Some("protected:7/3"), "{path}");
        assert_eq!(analysis.placements[index].lane, 0);
    }

    let file = String::from_utf8(to_file(&trace)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&file).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    let flows: Vec<(&str, u64, u64)> = events
        .iter()
        .filter(|e| e["cat"] == "invocation" && (e["ph"] == "s" || e["ph"] == "f"))
        .map(|e| (e["ph"].as_str().unwrap(), e["id"].as_u64().unwrap(), e["tid"].as_u64().unwrap()))
        .collect();
    assert_eq!(flows, [("s", 42, 1), ("f", 42, 2)], "(tid = vCPU + 1)");
    let finish = events.iter().find(|e| e["ph"] == "f").unwrap();
    assert_eq!(finish["bp"], "e");

    let profile = profile::text(&trace, &analysis, "synthetic");
    assert!(profile.contains("protected:7/3"), "{profile}");
    assert!(profile.contains("upcall:invocation_arrived"), "{profile}");
    assert!(!profile.contains("invoked:"), "the callee side is not a path of its own:\n{profile}");
}

#[test]
fn spans_that_overlap_without_nesting_go_on_an_extra_track() {
    use TraceKind::*;
    // The invocation ends inside a gate call that began before it ended.
    let trace = trace_of(
        1,
        vec![
            rec(0, 100, InvocationBegin, 1, 5, 8),
            rec(0, 200, GateEnter, CPU_INFO, 0, 0),
            rec(0, 300, InvocationEnd, 1, 5, 8),
            rec(0, 400, GateExit, CPU_INFO, 0, 0),
        ],
    );
    let analysis = analyze(&trace);
    let lanes: Vec<(&str, usize)> =
        analysis.spans.iter().zip(&analysis.placements).map(|(s, p)| (s.path.as_str(), p.lane)).collect();
    assert_eq!(lanes, [("protected:5/1", 0), ("gate:cpu_info", 1)]);
    let file = String::from_utf8(to_file(&trace)).unwrap();
    assert!(file.contains("\"tid\":10001"), "{file}");
    assert!(file.contains("vcpu 0 overlap 1"), "{file}");
}

/// Checks the trace-event format rules the viewers rely on.
fn check_trace_event_format(file: &str) {
    let json: serde_json::Value = serde_json::from_str(file).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    let mut flows: std::collections::HashMap<(String, u64), (u32, u32)> = Default::default();
    let mut last_ts: std::collections::HashMap<u64, f64> = Default::default();
    for event in events {
        for field in ["name", "ph", "ts", "pid", "tid"] {
            assert!(event.get(field).is_some(), "no {field} in {event}");
        }
        let ph = event["ph"].as_str().unwrap();
        assert!(["M", "X", "i", "s", "f"].contains(&ph), "{event}");
        if ph == "X" {
            assert!(event["dur"].as_f64().unwrap() >= 0.0, "{event}");
        }
        if ph == "s" || ph == "f" {
            let entry =
                flows.entry((event["cat"].as_str().unwrap().to_owned(), event["id"].as_u64().unwrap())).or_default();
            if ph == "s" {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
        if ph != "M" {
            let tid = event["tid"].as_u64().unwrap();
            let ts = event["ts"].as_f64().unwrap();
            let last = last_ts.entry(tid).or_insert(0.0);
            assert!(ts >= *last, "time goes back on tid {tid}: {event}");
            *last = ts;
        }
    }
    for (key, (starts, finishes)) in flows {
        assert_eq!((starts, finishes), (1, 1), "flow {key:?}");
    }
    assert!(json["metadata"]["topology"]["distances"].is_array());
    assert!(json["metadata"]["tsc_khz"].is_u64());
}

#[test]
fn files_follow_the_trace_event_format() {
    check_trace_event_format(&String::from_utf8(to_file(&gates_trace(50))).unwrap());
    check_trace_event_format(&String::from_utf8(to_file(&invocation_trace())).unwrap());
}

#[test]
fn a_file_reads_back_to_the_same_trace_and_the_same_profile() {
    for trace in [gates_trace(300), invocation_trace()] {
        let file = to_file(&trace);
        let back = chrome::parse(&file, "t.json").unwrap();
        assert_eq!(back, trace);
        let (a, b) = (analyze(&trace), analyze(&back));
        assert_eq!(profile::text(&trace, &a, "x"), profile::text(&back, &b, "x"));
    }
}

#[test]
fn timestamps_are_microseconds_from_the_first_record() {
    let file = String::from_utf8(to_file(&gates_trace(1))).unwrap();
    // vCPU 1's tick at TSC 500 is the first record; vCPU 0's program starts at 1000: 500 cycles
    // at 2 GHz later, 0.25 us.
    assert!(file.contains("\"name\":\"program_start\",\"ph\":\"i\",\"s\":\"t\",\"ts\":0.250,"), "{file}");
    assert!(file.contains("\"name\":\"gate:cpu_info\",\"ph\":\"X\",\"ts\":0.750,\"dur\":0.050,"), "{file}");
}

#[test]
fn the_profile_splits_each_vcpus_time() {
    let trace = invocation_trace();
    let analysis = analyze(&trace);
    let splits = analysis::time_split(&trace, &analysis);
    // The trace runs from 100 to 4500.
    assert_eq!(splits[0].total, 4400);
    // vCPU 0: a program from 100 to 4400; one gate call of 100 cycles; idle 100 (after its exit).
    assert_eq!((splits[0].user, splits[0].kernel, splits[0].idle, splits[0].latency), (4200, 100, 100, 0));
    // vCPU 1: program 100..4500, 500 ns of latency = 1000 cycles at 2 GHz.
    assert_eq!((splits[1].user, splits[1].kernel, splits[1].idle, splits[1].latency), (3400, 0, 0, 1000));
}

#[test]
fn realms_count_opens_faults_and_remote_traps() {
    let rows = analysis::realm_stats(&invocation_trace());
    assert_eq!(rows.len(), 1);
    let realm = &rows[0];
    assert_eq!((realm.realm, realm.home_node, realm.base), (Some(7), Some(1), Some(REALM7)));
    assert_eq!(realm.opens.get(&2), Some(&1));
    assert_eq!((realm.page_faults, realm.remote_traps, realm.latency_ns), (1, 1, 500));
    // Without realms, faults land in the unattributed row.
    let faults = trace_of(1, vec![rec(0, 5, TraceKind::PageFault, 2, 0x1000, 0)]);
    let rows = analysis::realm_stats(&faults);
    assert_eq!((rows[0].realm, rows[0].page_faults), (None, 1));
}

#[test]
fn realm_migrations_are_kernel_work_counted_per_realm_and_instants_in_the_file() {
    use TraceKind::*;
    let from_1_to_0 = 1 << 16;
    let trace = trace_of(
        1,
        vec![
            rec(0, 100, ProgramStart, 0, 0, 0),
            rec(0, 200, RealmCreate, 1, 7, REALM7),
            rec(0, 1000, GateEnter, CPU_INFO, 0, 0),
            rec(0, 1100, RealmMigrate, from_1_to_0, 7, 12),
            rec(0, 1200, GateExit, CPU_INFO, 0, 0),
            rec(0, 2000, RealmMigrate, 1, 7, 12),
            rec(0, 3000, ProgramExit, 0, 0, 0),
        ],
    );
    let analysis = analyze(&trace);
    let gate = analysis.spans.iter().find(|s| s.path == "gate:cpu_info").unwrap();
    assert!(gate.finished && !gate.inferred_end, "a migration inside a gate call does not end it: {gate:?}");
    let rows = analysis::realm_stats(&trace);
    assert_eq!((rows.len(), rows[0].migrations, rows[0].home_node), (1, 2, Some(1)));
    let text = profile::text(&trace, &analysis, "t.json");
    let mut realm_table = text.lines().skip_while(|l| !l.starts_with("realm "));
    let (header, row) = (realm_table.next().unwrap(), realm_table.next().unwrap());
    assert!(header.ends_with("migrations") && row.ends_with(" 2"), "{header}\n{row}");

    let file = String::from_utf8(to_file(&trace)).unwrap();
    assert!(file.contains("\"name\":\"realm_migrate:1->0\",\"ph\":\"i\""), "{file}");
    assert!(file.contains("\"name\":\"realm_migrate:0->1\""), "{file}");
    let back = chrome::parse(file.as_bytes(), "t.json").unwrap();
    assert_eq!(back.vcpus[0].records, trace.vcpus[0].records);
}

#[test]
fn flame_graphs_stack_vcpu_program_and_path() {
    let analysis = analyze(&invocation_trace());
    let stacks = analysis::folded_stacks(&analysis);
    assert!(stacks.contains(&"vcpu0;program 0;protected:7/3;gate:cpu_info 100".to_owned()), "{stacks:?}");
    // The invocation's own time is its length less what is nested in it.
    assert!(stacks.contains(&"vcpu0;program 0;protected:7/3 1400".to_owned()), "{stacks:?}");
    let mut svg = Vec::new();
    profile::flamegraph(&analysis, "test", &mut svg).unwrap();
    let svg = String::from_utf8(svg).unwrap();
    assert!(svg.starts_with("<?xml") && svg.contains("gate:cpu_info"), "{}", &svg[..200.min(svg.len())]);

    let empty = analyze(&trace_of(1, vec![rec(0, 5, TraceKind::TimerTick, 0, 0, 0)]));
    assert!(matches!(profile::flamegraph(&empty, "t", &mut Vec::new()), Err(profile::FlameGraphError::Empty)));
}

#[test]
fn ring_overflow_and_kernel_losses_reach_the_summary_and_the_profile() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let base = 0x1_0000;
    let mut ring = Ring::new(0, base);
    // The kernel says it dropped 12 records, and its head is 3000 records ahead of the tail.
    for n in 0..3000u64 {
        let record = rec(0, 100 + n, TraceKind::GateEnter, CPU_INFO, n, 0);
        let address = base + TRACE_RECORDS_OFFSET + (n % TRACE_RING_CAPACITY) * 32;
        mem.write_slice(record.as_bytes(), GuestAddress(address)).unwrap();
    }
    let header = TraceRingHeader { head: 3000, tail: 0, lost: 12, capacity: TRACE_RING_CAPACITY };
    mem.write_slice(header.as_bytes(), GuestAddress(base)).unwrap();
    ring.drain(&mem, &AtomicU64::new(u64::MAX));

    let mut stats = ring.stats.clone();
    stats.records = ring.records.len() as u64;
    let trace = Trace::new(meta(1), vec![VcpuTrace { cpu: 0, records: ring.records.clone(), stats }]);
    assert_eq!(trace.summary.lost_kernel, 12);
    assert_eq!(trace.summary.lost_overrun, 3000 - TRACE_RING_CAPACITY);
    assert_eq!(trace.summary.lost, 12 + 3000 - TRACE_RING_CAPACITY);
    assert_eq!(trace.summary.corrupt, 1);
    assert_eq!(trace.summary.records, TRACE_RING_CAPACITY);
    // It survives the file, and the profile warns.
    let back = chrome::parse(&to_file(&trace), "t.json").unwrap();
    assert_eq!(back.summary, trace.summary);
    let text = profile::text(&back, &analyze(&back), "t.json");
    assert!(text.contains("warning: 964 records were lost (kernel ring full: 12, overrun: 952"), "{text}");
    assert!(text.contains("warning: vCPU 0: record") || text.contains("ran 3000 records ahead"), "{text}");
}

fn parse_error(bytes: &[u8]) -> String {
    match chrome::parse(bytes, "bad.json") {
        Ok(_) => panic!("{} parsed", String::from_utf8_lossy(bytes)),
        Err(error) => error.to_string(),
    }
}

#[test]
fn truncated_and_corrupt_files_get_clear_errors() {
    let good = String::from_utf8(to_file(&gates_trace(20))).unwrap();

    // Cut anywhere: truncated.
    for cut in [1, good.len() / 3, good.len() / 2, good.len() - 3] {
        let message = parse_error(&good.as_bytes()[..cut]);
        assert!(message.starts_with("bad.json ends in the middle of its JSON"), "{message}");
        assert!(message.contains("truncated"), "{message}");
    }
    assert!(matches!(chrome::parse(b"", "e"), Err(TraceFileError::Truncated { .. })));
    assert!(parse_error(b"<html>").starts_with("bad.json is not JSON:"));
    let message = parse_error(br#"{"traceEvents":[]}"#);
    assert!(message.contains("is not a psyche-vmm trace: it has no \"metadata\""), "{message}");
    let message = parse_error(br#"{"traceEvents":[],"metadata":{"other":1}}"#);
    assert!(message.contains("no psyche_trace version"), "{message}");
    let message = parse_error(br#"[1,2,3]"#);
    assert!(message.contains("is not a psyche-vmm trace"), "{message}");
    let message = parse_error(good.replacen("\"psyche_trace\":1", "\"psyche_trace\":9", 1).as_bytes());
    assert!(message.contains("version 9; this psyche-vmm reads version 1"), "{message}");

    // Edited records.
    let message = parse_error(good.replacen("\"kind\":\"gate_exit\"", "\"kind\":\"teleport\"", 1).as_bytes());
    assert!(message.starts_with("bad.json is corrupt: traceEvents[") && message.contains("teleport"), "{message}");
    let message = parse_error(
        good.replacen("\"kind\":\"gate_enter\",\"cpu\":0,", "\"kind\":\"gate_enter\",\"cpu\":77,", 1).as_bytes(),
    );
    assert!(message.contains("a record of cpu 77 in a trace of 2 vCPUs"), "{message}");
    let message = parse_error(good.replacen("\"seq\":5,", "\"seq\":500,", 1).as_bytes());
    assert!(message.contains("records are missing or repeated"), "{message}");
    let message = parse_error(good.replacen("\"tsc\":", "\"tsc\":\"x\",\"was\":", 1).as_bytes());
    assert!(message.contains("is not a psyche-vmm trace"), "{message}");
    let message = parse_error(good.replacen("\"tsc_khz\":2000000,", "", 1).as_bytes());
    assert!(message.contains("metadata: missing field `tsc_khz`"), "{message}");
    // A whole event removed (still valid JSON): the count no longer matches.
    let lines: Vec<&str> = good.lines().collect();
    let cut = lines.iter().position(|l| l.contains("\"gate:cpu_info\"")).unwrap();
    let mut edited: Vec<&str> = lines.clone();
    edited.remove(cut);
    let message = parse_error(edited.join("\n").as_bytes());
    assert!(message.contains("missing or repeated") || message.contains("the metadata counts"), "{message}");
}

#[test]
fn names_follow_the_abi() {
    assert_eq!(syscall_name(3), "cpu_info");
    assert_eq!(syscall_name(0xFFFF), "syscall65535");
    assert_eq!(gate_call_name(psyche_abi::trace::GATE_NO_SUCH_CALL), "no_such_call");
    assert_eq!(gate_call_name(Syscall::ProtectedCall as u32), "protected_call");
    assert_eq!(hypercall_name(9), "trace_flush");
    assert_eq!(vm_exit_name(VmExitKind::Interrupted as u32), "interrupted");
    for raw in 1..=17 {
        let kind = TraceKind::from_raw(raw).unwrap();
        assert_eq!(kind_from_name(kind.name()), Some(kind));
    }
    assert_eq!(kind_from_name("nope"), None);
    assert_eq!(kind_name(999), "kind999");
    assert_eq!(upcall_name(2), "blocked");
    assert_eq!(upcall_name(77), "77");
}

#[test]
fn spans_are_sorted_and_gate_spans_are_of_kind_gate() {
    let analysis = analyze(&gates_trace(3));
    assert!(analysis.spans.windows(2).all(|w| (w[0].cpu, w[0].start) <= (w[1].cpu, w[1].start)));
    assert!(analysis.spans.iter().all(|s| s.kind == SpanKind::Gate));
}

#[test]
fn pathological_records_cost_bounded_work() {
    use TraceKind::*;
    // 40000 invocations that all carry id 0 and overlap in a staircase (each ends after the next
    // begins): pairing must not be quadratic, and they spread over a bounded number of tracks.
    let n = 20_000u64;
    let mut records = Vec::new();
    for k in 0..n {
        records.push(rec(0, 10 * k, InvocationBegin, 1, 1, 0));
        records.push(rec(0, 10 * k + 15, InvocationEnd, 1, 1, 0));
    }
    let trace = trace_of(1, records);
    let started = std::time::Instant::now();
    let analysis = analyze(&trace);
    let stats = analysis::path_stats(&analysis);
    assert_eq!(stats[0].count, n);
    assert!(analysis.placements.iter().all(|p| p.lane < 16));
    let file = to_file(&trace);
    assert!(chrome::parse(&file, "t").is_ok());
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
}

#[test]
fn invocations_with_a_reused_id_pair_in_time_order() {
    use TraceKind::*;
    let trace = trace_of(
        2,
        vec![
            rec(0, 10, InvocationBegin, 1, 1, 5),
            rec(1, 12, InvocationArrive, 1, 1, 5),
            rec(0, 20, InvocationEnd, 1, 1, 5),
            rec(0, 30, InvocationBegin, 2, 1, 5),
            rec(1, 33, InvocationArrive, 2, 1, 5),
            rec(0, 40, InvocationEnd, 2, 1, 5),
            rec(0, 50, InvocationEnd, 2, 1, 5),
        ],
    );
    let analysis = analyze(&trace);
    let spans: Vec<(&str, u64, u64)> = analysis.spans.iter().map(|s| (s.path.as_str(), s.start, s.end)).collect();
    assert_eq!(
        spans,
        [("protected:1/1", 10, 20), ("protected:1/2", 30, 40), ("invoked:1/1", 12, 20), ("invoked:1/2", 33, 40)]
    );
    assert_eq!(analysis.unmatched.get("invocation_end without invocation_begin"), Some(&1));
}

#[test]
fn deep_nesting_is_cut_in_flame_graph_stacks() {
    // 5000 invocations begun and never ended: each nests in the one before.
    let records = (0..5000u64).map(|k| rec(0, k, TraceKind::InvocationBegin, 1, 1, k)).collect();
    let analysis = analyze(&trace_of(1, records));
    let stacks = analysis::folded_stacks(&analysis);
    assert!(stacks.iter().all(|stack| stack.split(';').count() <= 2 + 32 + 1), "{:?}", stacks.last());
    assert!(stacks.iter().any(|stack| stack.contains(";...;")));
}

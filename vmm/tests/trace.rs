//! Tracing end to end: traced boots of a workload with known counts, judged by the trace file the
//! binary wrote (what the guest kernel recorded), `psyche-vmm profile` on it, and the errors bad
//! paths and bad files get. Tests that boot a guest need /dev/kvm and fail saying so without it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use psyche_abi::hypercall::Hypercall;
use psyche_abi::syscall::Syscall;
use psyche_abi::trace::VmExitKind;
use serde_json::Value;

/// The exit status of bad input (see `psyche-vmm --help`).
const BAD_INPUT: i32 = psyche_vmm::vm::status::BAD_INPUT as i32;
/// More calls than a ring holds (2048 records), twice over: the ring wraps, and fills.
const N: u64 = 5000;

fn require_kvm() {
    if let Err(message) = psyche_vmm::vm::check_kvm() {
        panic!("this test boots a real guest and needs KVM, which this host does not offer: {message}");
    }
}

fn psyche_vmm(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_psyche-vmm"));
    command.current_dir(env!("CARGO_MANIFEST_DIR")).args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("psyche-vmm runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("psyche-trace-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// One raw record, as the trace file keeps it.
#[derive(Clone, Debug)]
struct Record {
    kind: String,
    seq: u64,
    tsc: u64,
    arg0: u64,
    arg2: u64,
}

/// A trace file: its JSON, and every vCPU's records in their order.
struct TraceFile {
    json: Value,
    records: HashMap<u64, Vec<Record>>,
}

impl TraceFile {
    fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let json: Value =
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        let mut records: HashMap<u64, Vec<Record>> = HashMap::new();
        for event in json["traceEvents"].as_array().expect("traceEvents is an array") {
            for key in ["record", "begin", "end"] {
                let raw = &event["args"][key];
                if raw.is_null() {
                    continue;
                }
                let field = |name: &str| raw[name].as_u64().unwrap_or_else(|| panic!("{name} in {raw}"));
                records.entry(field("cpu")).or_default().push(Record {
                    kind: raw["kind"].as_str().expect("kind").to_owned(),
                    seq: field("seq"),
                    tsc: field("tsc"),
                    arg0: field("arg0"),
                    arg2: field("arg2"),
                });
            }
        }
        for list in records.values_mut() {
            list.sort_by_key(|r| r.seq);
        }
        Self { json, records }
    }

    fn of(&self, cpu: u64) -> &[Record] {
        self.records.get(&cpu).map_or(&[], Vec::as_slice)
    }

    fn count(&self, cpu: u64, kind: &str, arg0: u64) -> usize {
        self.of(cpu).iter().filter(|r| r.kind == kind && r.arg0 == arg0).count()
    }

    fn summary(&self, field: &str) -> u64 {
        self.json["metadata"]["summary"][field].as_u64().unwrap_or_else(|| panic!("summary.{field}"))
    }
}

/// Boots `gates N` traced into `path` and returns the trace.
fn traced_gates(path: &Path, env: &[(&str, &str)]) -> TraceFile {
    require_kvm();
    let n = N.to_string();
    let args = ["--topology", "uma", "--trace", path.to_str().unwrap(), "--program", "gates", "--", &n];
    let output = psyche_vmm(&args, env);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}\n{}", text(&output.stdout));
    assert!(text(&output.stdout).contains(&format!("gates: program 0 made {N} cpu calls")), "{}", text(&output.stdout));
    assert!(stderr.contains("psyche-vmm: trace: ") && stderr.contains("lost 0, corrupt 0"), "{stderr}");
    TraceFile::read(path)
}

/// The checks every recorded trace must pass: exact counts on the program's vCPU, nothing lost
/// or corrupt, time order, and the VMM's exits placed inside the kernel's gate calls.
fn check_gates_trace(trace: &TraceFile) {
    let cpu_info = Syscall::CpuInfo as u64;
    assert_eq!(trace.count(0, "gate_enter", cpu_info), N as usize, "gate_enter records of cpu_info on vCPU 0");
    assert_eq!(trace.count(0, "gate_exit", cpu_info), N as usize, "gate_exit records of cpu_info on vCPU 0");
    for cpu in 1..4 {
        assert_eq!(trace.count(cpu, "gate_enter", cpu_info), 0, "vCPU {cpu} ran no program");
    }
    assert_eq!(trace.count(0, "program_start", 0), 1);
    assert_eq!(trace.count(0, "program_exit", 0), 1);
    assert_eq!(trace.summary("lost"), 0);
    assert_eq!(trace.summary("corrupt"), 0);

    for (cpu, records) in &trace.records {
        for (position, pair) in records.windows(2).enumerate() {
            assert_eq!(pair[0].seq, position as u64, "vCPU {cpu}: records are numbered in order");
            assert!(pair[1].tsc >= pair[0].tsc, "vCPU {cpu}: record {} goes back in time", pair[1].seq);
        }
    }

    // The kernel's gate_enter/gate_exit of the write call bracket the VMM's console hypercall exit:
    // the exits' timestamps are on the guest's TSC timeline.
    let records = trace.of(0);
    let write = Syscall::Write as u64;
    let console = Hypercall::ConsoleWrite as u64;
    let mut checked = 0;
    for (i, record) in records.iter().enumerate() {
        if record.kind == "gate_enter" && record.arg0 == write {
            let exit = records[i..]
                .iter()
                .position(|r| r.kind == "gate_exit")
                .map(|k| &records[i + k])
                .expect("write returns");
            let inside: Vec<&Record> = records[i..]
                .iter()
                .take_while(|r| r.seq < exit.seq)
                .filter(|r| r.kind == "vm_exit" && r.arg0 == VmExitKind::Hypercall as u64 && r.arg2 == console)
                .collect();
            assert_eq!(inside.len(), 1, "one console hypercall inside the write call at seq {}", record.seq);
            checked += 1;
        }
    }
    assert!(checked >= 1, "the program's write call is in the trace");
}

/// The trace-event format rules Perfetto and chrome://tracing rely on.
fn check_trace_event_format(json: &Value, vcpus: usize) {
    let events = json["traceEvents"].as_array().expect("traceEvents");
    let mut flows: HashMap<(String, u64), (u32, u32)> = HashMap::new();
    let mut last_ts: HashMap<u64, f64> = HashMap::new();
    let mut thread_names = 0;
    for event in events {
        for field in ["name", "ph", "ts", "pid", "tid"] {
            assert!(!event[field].is_null(), "event without {field}: {event}");
        }
        let ph = event["ph"].as_str().expect("ph is a string");
        match ph {
            "M" => thread_names += usize::from(event["name"] == "thread_name"),
            "X" => assert!(event["dur"].as_f64().is_some_and(|d| d >= 0.0), "X without dur: {event}"),
            "i" => assert_eq!(event["s"], "t", "{event}"),
            "s" | "f" => {
                let key = (event["cat"].as_str().unwrap_or("").to_owned(), event["id"].as_u64().expect("flow id"));
                let entry = flows.entry(key).or_default();
                if ph == "s" {
                    entry.0 += 1
                } else {
                    entry.1 += 1
                }
            }
            other => panic!("unexpected phase {other}: {event}"),
        }
        if ph != "M" {
            let tid = event["tid"].as_u64().expect("tid");
            let ts = event["ts"].as_f64().expect("ts is a number");
            let last = last_ts.entry(tid).or_insert(f64::MIN);
            assert!(ts >= *last, "tid {tid}: time goes back at {event}");
            *last = ts;
        }
    }
    assert!(thread_names >= vcpus, "a named track per vCPU");
    for (key, pair) in flows {
        assert_eq!(pair, (1, 1), "flow {key:?} pairs up");
    }
    let metadata = &json["metadata"];
    assert!(metadata["tsc_khz"].as_u64().is_some_and(|khz| khz > 0), "{metadata}");
    assert!(metadata["topology"]["nodes"].as_array().is_some_and(|nodes| !nodes.is_empty()), "{metadata}");
    assert_eq!(
        metadata["topology"]["distances"].as_array().map(Vec::len),
        metadata["topology"]["nodes"].as_array().map(Vec::len)
    );
}

#[test]
fn a_traced_run_of_n_gate_calls_records_exactly_n_and_profile_counts_them() {
    let dir = scratch("gates");
    let path = dir.join("gates.json");
    let trace = traced_gates(&path, &[]);
    check_gates_trace(&trace);
    check_trace_event_format(&trace.json, 4);
    assert_eq!(trace.json["metadata"]["topology"]["name"], "uma");

    // The profile of that file counts the same N calls.
    let svg = dir.join("gates.svg");
    let output = psyche_vmm(&["profile", path.to_str().unwrap(), "--flamegraph", svg.to_str().unwrap()], &[]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}\n{stdout}", text(&output.stderr));
    let line = stdout.lines().find(|l| l.starts_with("gate:cpu_info ")).unwrap_or_else(|| panic!("{stdout}"));
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(columns.get(1), Some(&N.to_string().as_str()), "{line}");
    // mean <= p99 <= max, in cycles and in ns.
    let number = |k: usize| columns.get(k).and_then(|c| c.parse::<u64>().ok()).unwrap_or_else(|| panic!("{line}"));
    assert!(number(3) <= number(4) && number(4) <= number(5), "{line}");
    assert!(number(8) <= number(9) && number(9) <= number(10), "{line}");
    assert!(stdout.contains("lost 0, corrupt 0"), "{stdout}");
    let cpu0 = stdout.lines().find(|l| l.starts_with("0 ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(cpu0.contains('%'), "{cpu0}");
    let svg = std::fs::read_to_string(&svg).expect("the flame graph is written");
    assert!(
        svg.contains("<svg") && svg.contains("vcpu0") && svg.contains("gate:cpu_info"),
        "{}",
        &svg[..300.min(svg.len())]
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn with_the_drainer_off_the_kernel_flushes_its_full_ring_and_nothing_is_lost() {
    let dir = scratch("flush");
    let path = dir.join("flush.json");
    let trace = traced_gates(&path, &[("PSYCHE_VMM_TRACE_DRAIN_US", "0")]);
    check_gates_trace(&trace);
    // 2N + a few records through a 2048-record ring: the kernel asked for a drain at least
    // (2N / 2048) times, each a hypercall exit the VMM recorded.
    let flushes = trace
        .of(0)
        .iter()
        .filter(|r| {
            r.kind == "vm_exit" && r.arg0 == VmExitKind::Hypercall as u64 && r.arg2 == Hypercall::TraceFlush as u64
        })
        .count() as u64;
    assert!(flushes >= 2 * N / 2048, "{flushes} flushes");
    assert_eq!(trace.summary("flushes"), flushes);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_default_demo_traces_every_vcpu() {
    require_kvm();
    let dir = scratch("demo");
    let path = dir.join("demo.json");
    let output = psyche_vmm(&["--topology", "butterfly", "--trace", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let trace = TraceFile::read(&path);
    check_trace_event_format(&trace.json, 24);
    assert_eq!(trace.json["metadata"]["topology"]["nodes"].as_array().map(Vec::len), Some(24));
    assert_eq!(trace.summary("lost"), 0);
    assert_eq!(trace.summary("corrupt"), 0);
    // hello: one program on vCPU 0, with its gate calls; every vCPU has a track.
    assert_eq!(trace.count(0, "program_start", 0), 1);
    assert!(trace.of(0).iter().any(|r| r.kind == "gate_enter"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unwritable_trace_path_is_refused_before_the_guest_starts() {
    let output = psyche_vmm(&["--topology", "uma", "--trace", "/nonexistent-dir/trace.json"], &[]);
    assert_eq!(output.status.code(), Some(BAD_INPUT));
    let stderr = text(&output.stderr);
    assert!(stderr.starts_with("psyche-vmm: cannot write the trace to /nonexistent-dir/trace.json:"), "{stderr}");
    assert!(output.stdout.is_empty(), "the guest must not run: {}", text(&output.stdout));
}

#[test]
fn profile_refuses_missing_truncated_and_foreign_files_as_bad_input() {
    let dir = scratch("bad-files");
    let missing = dir.join("missing.json");
    let output = psyche_vmm(&["profile", missing.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(BAD_INPUT));
    assert!(text(&output.stderr).contains(&format!("cannot read the trace {}", missing.display())));

    let cases = [
        (
            "truncated.json",
            "{\"displayTimeUnit\":\"ns\",\n\"metadata\":{\"psyche_trace\":1,",
            "ends in the middle of its JSON",
        ),
        ("html.json", "<html></html>", "is not JSON"),
        (
            "other.json",
            "{\"traceEvents\":[{\"name\":\"a\",\"ph\":\"i\",\"ts\":1,\"pid\":1,\"tid\":1}]}",
            "is not a psyche-vmm trace",
        ),
    ];
    for (name, content, expected) in cases {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        let output = psyche_vmm(&["profile", path.to_str().unwrap()], &[]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(BAD_INPUT), "{name}: {stderr}");
        assert!(stderr.starts_with(&format!("psyche-vmm: {}", path.display())), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(output.stdout.is_empty(), "{name}: no profile for a bad file");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_trace_cut_short_is_refused_by_profile() {
    let dir = scratch("cut");
    let path = dir.join("full.json");
    let trace = traced_gates(&path, &[]);
    drop(trace);
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.json");
    // Cut just after an event (a cut inside a number would be a syntax error, not an early
    // end, and get the other message).
    let end = bytes[..bytes.len() * 2 / 3].iter().rposition(|&b| b == b'}').expect("an event") + 1;
    std::fs::write(&cut, &bytes[..end]).unwrap();
    let output = psyche_vmm(&["profile", cut.to_str().unwrap()], &[]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(BAD_INPUT), "{stderr}");
    assert!(stderr.contains("cut.json ends in the middle of its JSON") && stderr.contains("truncated"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// X events on one track must nest (Perfetto refuses slices that overlap without nesting).
fn check_nesting(json: &Value) {
    let mut open: HashMap<u64, Vec<f64>> = HashMap::new();
    for event in json["traceEvents"].as_array().expect("traceEvents") {
        if event["ph"] != "X" {
            continue;
        }
        let (tid, start) = (event["tid"].as_u64().expect("tid"), event["ts"].as_f64().expect("ts"));
        let end = start + event["dur"].as_f64().expect("dur");
        let stack = open.entry(tid).or_default();
        while stack.last().is_some_and(|&top| top <= start + 1e-9) {
            stack.pop();
        }
        if let Some(&top) = stack.last() {
            assert!(end <= top + 1e-9, "tid {tid}: {event} overlaps its enclosing slice (ending {top})");
        }
        stack.push(end);
    }
}

#[test]
fn protected_invocations_of_a_real_guest_are_joined_by_flows() {
    require_kvm();
    let dir = scratch("invocations");
    let path = dir.join("invocations.json");
    // The server/client scenario of the upcalls program (see tests/tests/upcalls.rs, which judges
    // the scenario itself; here only its trace is judged). Its last operation faults in the
    // server, which ends the server's domain: status 123.
    let key = "0123456789abcdeffedcba9876543210";
    let args =
        ["--topology", "two-socket", "--timeout", "60", "--trace", path.to_str().unwrap(), "--program", "upcalls"];
    let output = psyche_vmm(&[&args[..], &["--program", "upcalls", "--", "server", key]].concat(), &[]);
    let status = output.status.code();
    assert_eq!(status, Some(i32::from(psyche_vmm::vm::status::PROGRAM_FAULT)), "{}", text(&output.stderr));
    let trace = TraceFile::read(&path);
    check_trace_event_format(&trace.json, 8);
    check_nesting(&trace.json);
    assert_eq!(trace.summary("lost"), 0);
    assert_eq!(trace.summary("corrupt"), 0);
    // Every invocation the kernel began arrived, and the file joins each pair with a flow.
    let all: Vec<&Record> = trace.records.values().flatten().collect();
    let ids = |kind: &str| {
        let mut ids: Vec<u64> = all.iter().filter(|r| r.kind == kind).map(|r| r.arg2).collect();
        ids.sort_unstable();
        ids
    };
    let begins = ids("invocation_begin");
    assert!(!begins.is_empty(), "the scenario makes protected invocations");
    assert_eq!(begins, ids("invocation_arrive"));
    let flows = trace.json["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "s").count();
    assert_eq!(flows, begins.len());
    // profile times them.
    let output = psyche_vmm(&["profile", path.to_str().unwrap()], &[]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(stdout.lines().any(|l| l.starts_with("protected:")), "{stdout}");
    let _ = std::fs::remove_dir_all(dir);
}

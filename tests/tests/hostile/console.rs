//! Console and trace accounting (issue 11, findings 6 and 7): a program that prints control
//! bytes, carriage returns, invalid UTF-8 and half lines beside another program on its vCPU must
//! not reach the terminal raw, overwrite a tag or glue its lines to another's; one that makes
//! kernel-gate calls with numbers that name nothing must show in the trace and the profile as
//! exactly that.

use std::collections::BTreeMap;

use psyche_abi::syscall::Syscall;
use psyche_abi::trace::{TraceKind, GATE_NO_SUCH_CALL};
use psyche_tests::Boot;
use psyche_vmm::console::Writer;
use psyche_vmm::trace::{analysis, profile};

/// The key program 0 grants the turns realm to (any 32 hex digits).
const KEY: &str = "6e6f6973795f6b65795f666f725f3034";

/// The console lines of the run, by tag, in order.
fn by_tag(run: &psyche_tests::Run) -> BTreeMap<String, Vec<String>> {
    let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in run.console.entries() {
        lines.entry(entry.tag).or_default().push(entry.text);
    }
    lines
}

#[test]
fn hostile_console_output_is_escaped_and_kept_apart_per_program() {
    // uma has 4 vCPUs: programs 0 and 4 share vCPU 0.
    let run = Boot::new("uma").programs(&["noisy"; 5]).args(&["console", KEY]).run();
    run.expect_exit(0);
    let lines = by_tag(&run);
    let transcript = run.console.transcript();
    let get = |tag: &str| lines.get(tag).cloned().unwrap_or_default();

    // Two programs' half lines on one vCPU: each line whole, under its own program's tag.
    for (tag, index) in [("vcpu 0 noisy#0", 0), ("vcpu 0 noisy#4", 4)] {
        assert_eq!(
            get(tag),
            [
                format!("noisy: program {index} begins a line, and program {index} ends it"),
                format!("noisy: console: program {index} done")
            ],
            "{transcript}"
        );
    }

    // Control bytes escaped (TAB kept), a CR mid-line cannot move back over the tag, a line
    // that looks like the kernel's is tagged with its program, a backslash the program printed
    // is doubled, a CRLF line end is a line end.
    assert_eq!(
        get("vcpu 1 noisy#1"),
        [
            r"noisy: bell\x07 nul\x00 esc\x1b[2J\x1b[31mred\x1b[0m del\x7f bs\x08 tab	end",
            r"noisy: innocent\x0d[vcpu 1 kernel] psyche: forged by program 1",
            "psyche: 4 of 4 CPUs online, says program 1",
            r"noisy: a backslash \\x1b is text",
            "noisy: a crlf line",
            "noisy: console: program 1 done",
        ],
        "{transcript}"
    );

    // Invalid UTF-8 byte by byte, Unicode controls and overrides escaped, text kept; a long
    // line split where the VMM's limit is; a flood without a newline in bounded lines.
    let mut expected = vec![
        r"noisy: invalid \xff\xfe \xc3( \xe2\x82 end".to_owned(),
        r"noisy: unicode ✓ grüße \u{9b}31m \u{202e}reversed".to_owned(),
        "L".repeat(psyche_vmm::console::MAX_LINE),
        "L".repeat(5000 - psyche_vmm::console::MAX_LINE),
    ];
    expected.extend((0..256 * 1024 / psyche_vmm::console::MAX_LINE).map(|_| "F".repeat(psyche_vmm::console::MAX_LINE)));
    expected.push("noisy: console: program 2 done".to_owned());
    let got = get("vcpu 2 noisy#2");
    assert_eq!(got.len(), expected.len(), "{:?}", got.iter().map(|l| &l[..l.len().min(80)]).collect::<Vec<_>>());
    assert!(got == expected, "program 2's lines differ");

    // Half a line, then the program's exit: the exit prints it.
    assert_eq!(get("vcpu 3 noisy#3"), ["noisy: last words without a newline"], "{transcript}");

    // The kernel's own lines keep the kernel's tag, and only the kernel's do.
    let kernel: Vec<_> = run.console.entries().into_iter().filter(|e| e.writer == Writer::Kernel).collect();
    assert!(kernel.iter().any(|e| e.tag == "vcpu 0 kernel" && e.text.starts_with("psyche: 4 of 4 CPUs online")));
    assert!(kernel.iter().all(|e| e.tag.ends_with(" kernel")), "{kernel:?}");
    let tags: Vec<&String> = lines.keys().collect();
    let expected_tags =
        ["vcpu 0 kernel", "vcpu 0 noisy#0", "vcpu 0 noisy#4", "vcpu 1 noisy#1", "vcpu 2 noisy#2", "vcpu 3 noisy#3"];
    assert_eq!(tags, expected_tags, "{transcript}");

    // What reaches the terminal: tags intact at the start of every line, and no byte a terminal
    // would act on but TAB.
    for line in transcript.lines() {
        assert!(expected_tags.iter().any(|tag| line.starts_with(&format!("[{tag}] "))), "{line}");
        assert!(line.chars().all(|c| c == '\t' || !c.is_control()), "a control character reached stdout: {line:?}");
        assert!(!line.contains('\u{202e}'), "{line:?}");
    }
}

#[test]
fn gate_numbers_that_name_no_call_are_traced_and_profiled_as_such() {
    let run = Boot::new("uma").traced().programs(&["noisy"]).args(&["gate"]).run();
    run.expect_exit(0);
    assert!(run.printed_by(0, "noisy: gate: 8 numbers, all no such call"), "{}", run.console.text());
    let trace = run.outcome.trace.as_ref().expect("a trace");
    let vcpu0 = trace.vcpus.iter().find(|v| v.cpu == 0).expect("vCPU 0's records");
    let gates: Vec<_> = vcpu0.records.iter().filter(|r| r.kind == TraceKind::GateEnter as u16).collect();

    // Every call the program made through `int 4` that names nothing is recorded as "no such
    // call", in order, with RAX whole beside it: the program made these and no others.
    let unknown: Vec<u64> = gates.iter().filter(|r| r.arg0 == GATE_NO_SUCH_CALL).map(|r| r.arg1).collect();
    assert_eq!(unknown, [(1 << 32) + 19, (1 << 32) + 2, (1 << 32) + 1, 19, 17, 0, 1 << 63 | 3, u64::MAX]);
    // A call the kernel ran is recorded as that call, and RAX was exactly its number.
    for record in gates.iter().filter(|r| r.arg0 != GATE_NO_SUCH_CALL) {
        assert_eq!(record.arg1, u64::from(record.arg0), "{record:?}");
    }
    // No protected call or invocation return happened, so none is recorded.
    let invocation_gate = [Syscall::ProtectedCall as u32, Syscall::InvocationReturn as u32];
    for vcpu in &trace.vcpus {
        for record in &vcpu.records {
            let gate = record.kind == TraceKind::GateEnter as u16 || record.kind == TraceKind::GateExit as u16;
            assert!(!(gate && invocation_gate.contains(&record.arg0)), "vCPU {}: {record:?}", vcpu.cpu);
        }
    }
    // The program exited (code 0, not ended by the kernel).
    let exit = vcpu0.records.iter().find(|r| r.kind == TraceKind::ProgramExit as u16).expect("program_exit");
    assert_eq!((exit.arg0, exit.arg1, exit.arg2), (0, 0, 0));

    // The profile names them so.
    let analysis = analysis::analyze(trace);
    let stats = analysis::path_stats(&analysis);
    let count = |path: &str| stats.iter().find(|p| p.path == path).map(|p| p.count);
    assert_eq!(count("gate:no_such_call"), Some(8));
    assert_eq!(count("gate:protected_call"), None);
    assert_eq!(count("gate:invocation_return"), None);
    assert_eq!(count("gate:exit"), Some(1));
    let text = profile::text(trace, &analysis, "test");
    assert!(text.contains("gate:no_such_call") && !text.contains("protected_call"), "{text}");
}

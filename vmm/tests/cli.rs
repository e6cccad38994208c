//! The psyche-vmm binary as a user meets it: help, exit statuses, messages, the summary file.
//! Tests that boot a guest need /dev/kvm and fail with a clear message without it.

use std::path::Path;
use std::process::{Command, Output};

fn psyche_vmm(args: &[&str]) -> Output {
    psyche_vmm_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn psyche_vmm_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_psyche-vmm")).current_dir(dir).args(args).output().expect("psyche-vmm runs")
}

fn require_kvm() {
    if let Err(message) = psyche_vmm::vm::check_kvm() {
        panic!("this test boots a real guest and needs KVM, which this host does not offer: {message}");
    }
}

/// The exit status of bad input (see `psyche-vmm --help`).
const BAD_INPUT: i32 = psyche_vmm::vm::status::BAD_INPUT as i32;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_explains_every_flag_and_exit_status() {
    let output = psyche_vmm(&["--help"]);
    assert!(output.status.success());
    let help = text(&output.stdout);
    for needle in [
        "--topology",
        "--kernel",
        "--program",
        "--timeout",
        "--summary-json",
        "--cmdline",
        "--latency-mode",
        "--no-seccomp",
        "EXIT STATUS",
        "121",
        "122",
        "124",
        "125",
    ] {
        assert!(help.contains(needle), "--help does not mention {needle}:\n{help}");
    }
    assert!(!help.contains("--seccomp-probe"), "a testing switch is not for users:\n{help}");
}

#[test]
fn a_missing_topology_argument_is_a_usage_error() {
    let output = psyche_vmm(&[]);
    assert_eq!(output.status.code(), Some(BAD_INPUT));
    assert!(text(&output.stderr).contains("no machine given: use --topology FILE"));
}

#[test]
fn a_malformed_topology_is_rejected_with_its_location_and_the_bad_input_status() {
    let dir = std::env::temp_dir().join(format!("psyche-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bad.toml"), "name = \"bad\"\n[[node]]\nid = 0\ncpus = [0]\nmemory = \"12Q\"\n").unwrap();
    let output = psyche_vmm_in(&dir, &["--topology", "bad.toml"]);
    assert_eq!(output.status.code(), Some(BAD_INPUT));
    let stderr = text(&output.stderr);
    assert!(stderr.starts_with("psyche-vmm: bad.toml:5:10: node[0].memory:"), "{stderr}");
    assert!(stdout_is_empty(&output), "nothing may boot");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_latency_mode_without_a_latency_table_is_bad_input() {
    for args in
        [&["--topology", "uma", "--latency-mode", "account"][..], &["bench", "-t", "uma", "--latency-mode", "exact"]]
    {
        let output = psyche_vmm(args);
        assert_eq!(output.status.code(), Some(BAD_INPUT));
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains("--latency-mode: latency mode") && stderr.contains("topology uma has no [latency] table"),
            "{stderr}"
        );
        assert!(stdout_is_empty(&output), "nothing may boot");
    }
    let output = psyche_vmm(&["--topology", "uma", "--latency-mode", "sometimes"]);
    assert_eq!(output.status.code(), Some(BAD_INPUT));
}

fn stdout_is_empty(output: &Output) -> bool {
    output.stdout.is_empty()
}

#[test]
fn an_unknown_topology_name_lists_the_shipped_ones() {
    let output = psyche_vmm(&["--topology", "cray-t3e"]);
    assert_eq!(output.status.code(), Some(BAD_INPUT));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("cray-t3e") && stderr.contains("butterfly"), "{stderr}");
}

#[test]
fn topology_show_prints_like_numactl() {
    let output = psyche_vmm(&["topology", "show", "two-socket"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.starts_with("available: 2 nodes (0-1)\nnode 0 cpus: 0 1 2 3\nnode 0 size: 512 MB\n"), "{stdout}");
    assert!(stdout.contains("node distances:"), "{stdout}");
}

#[test]
fn a_missing_kernel_file_is_a_clear_error() {
    let output = psyche_vmm(&["--topology", "uma", "--kernel", "/nonexistent/kernel.elf"]);
    assert_eq!(output.status.code(), Some(BAD_INPUT));
    assert!(text(&output.stderr).contains("cannot read kernel /nonexistent/kernel.elf"));
}

#[test]
fn an_unknown_program_is_a_clear_error() {
    let output = psyche_vmm(&["--topology", "uma", "--program", "nethack"]);
    assert_eq!(output.status.code(), Some(BAD_INPUT));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("program nethack: no such file, and no built-in program of that name"), "{stderr}");
}

#[test]
fn an_unwritable_summary_path_is_reported_before_the_guest_starts() {
    let output = psyche_vmm(&["--topology", "uma", "--summary-json", "/nonexistent/dir/summary.json"]);
    assert_eq!(output.status.code(), Some(BAD_INPUT));
    assert!(text(&output.stderr).contains("cannot write the summary to /nonexistent/dir/summary.json"));
    assert!(stdout_is_empty(&output), "the guest must not have run");
}

#[test]
fn the_guest_exit_code_is_the_exit_status() {
    require_kvm();
    let output = psyche_vmm(&["--topology", "uma", "--program", "exit", "--", "37"]);
    assert_eq!(output.status.code(), Some(37), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("[vcpu 0 exit#0] exit: exiting with code 37"));
}

#[test]
fn guest_exit_codes_1_and_2_are_not_the_vmm_s_statuses() {
    require_kvm();
    for code in [1, 2] {
        let output = psyche_vmm(&["--topology", "uma", "--program", "exit", "--", &code.to_string()]);
        assert_eq!(output.status.code(), Some(code), "{}", text(&output.stderr));
    }
    assert_eq!(BAD_INPUT, 122);
    assert_eq!(psyche_vmm::vm::status::HOST_ERROR, 121);
    let output = psyche_vmm(&["--topology", "uma", "--no-such-flag"]);
    assert_eq!(output.status.code(), Some(BAD_INPUT), "{}", text(&output.stderr));
}

#[test]
fn a_shipped_topology_name_works_from_any_directory() {
    require_kvm();
    let output = psyche_vmm_in(&std::env::temp_dir(), &["--topology", "butterfly.toml"]);
    assert_eq!(output.status.code(), Some(0), "{:?} {}", output.status, text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("[vcpu 0 kernel] psyche: 24 of 24 CPUs online on 24 nodes"), "{stdout}");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("machine butterfly: 24 vCPUs on 24 nodes"), "{stderr}");
}

#[test]
fn timeout_and_crashes_have_their_own_statuses() {
    require_kvm();
    let output = psyche_vmm(&["--topology", "uma", "--program", "hang", "--timeout", "0.5"]);
    assert_eq!(output.status.code(), Some(124), "{}", text(&output.stderr));
    let output = psyche_vmm(&["--topology", "uma", "--cmdline", "crash=page-fault"]);
    assert_eq!(output.status.code(), Some(125));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("the guest kernel crashed on vCPU 0: page fault (#PF) in the kernel"), "{stderr}");
    assert!(stderr.contains("cr2 0x8"), "{stderr}");
    let output = psyche_vmm(&["--topology", "uma", "--program", "fault"]);
    assert_eq!(output.status.code(), Some(123));
    assert!(text(&output.stderr).contains("program 0 (fault) killed on vCPU 0: page fault (#PF)"));
}

#[test]
fn the_summary_json_carries_what_the_guest_reported() {
    require_kvm();
    let path = std::env::temp_dir().join(format!("psyche-summary-{}.json", std::process::id()));
    let output = psyche_vmm(&["--topology", "asymmetric", "--summary-json", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(summary["exit_code"], 0);
    assert_eq!(summary["vcpus"], 4);
    assert_eq!(summary["nodes"], 3);
    assert!(summary["boot_ms"].as_f64().unwrap() > 0.0);
    assert!(summary["wall_ms"].as_f64().unwrap() >= summary["boot_ms"].as_f64().unwrap());
    let guest = &summary["guest"];
    assert_eq!(guest["cpus_online"], 4);
    assert_eq!(guest["nodes"][2]["cpus"], serde_json::json!([]));
    assert_eq!(guest["nodes"][2]["memory_bytes"], 128u64 << 20);
    assert_eq!(guest["distances"][1][0], 22);
    assert_eq!(guest["distances"][0][1], 16);
    // asymmetric.toml has a [latency] table; the summary reports what was charged.
    assert_eq!(summary["latency"]["charges"].as_array().map(Vec::len), Some(3));
}

#[test]
fn the_latency_mode_can_be_overridden_and_is_reported() {
    require_kvm();
    let output = psyche_vmm(&["--topology", "two-socket", "--latency-mode", "account"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("psyche-vmm: latency account: "), "{}", text(&output.stderr));
    let output = psyche_vmm(&["--topology", "two-socket", "--latency-mode", "off"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(!text(&output.stderr).contains("psyche-vmm: latency"), "{}", text(&output.stderr));
}

#[test]
fn a_thread_that_makes_a_forbidden_system_call_is_stopped_with_a_message_and_status_121() {
    require_kvm();
    let trace = std::env::temp_dir().join(format!("psyche-seccomp-{}.json", std::process::id()));
    let trace = trace.to_str().unwrap();
    // Each of psyche-vmm's threads opens a socket once the guest is about to run: the vCPU
    // threads, the trace drainer (there is one with --trace) and the main thread.
    for (probe, thread) in [("vcpu", "vcpu0"), ("drainer", "trace-drainer"), ("main", "main")] {
        let args = ["--topology", "uma", "--trace", trace, "--seccomp-probe", probe];
        let output = psyche_vmm(&args);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(121), "{probe}: {:?}\n{stderr}", output.status);
        let message = format!(
            "psyche-vmm: seccomp: the {thread} thread made system call 41 (socket) with arguments 0x2, 0x1, 0x0, which its filter forbids"
        );
        assert!(stderr.contains(&message), "{probe}: {stderr}");
        assert!(!stderr.contains("the guest exited"), "{probe}: the run went on: {stderr}");

        // Without the filters the same call goes through and the guest runs to its end: the
        // filter is what stopped it.
        let output = psyche_vmm(&[&args[..], &["--no-seccomp"]].concat());
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{probe} --no-seccomp: {stderr}");
        let note = format!("psyche-vmm: seccomp probe: the {thread} thread opened a socket: it is not confined");
        assert!(stderr.contains(&note), "{probe} --no-seccomp: {stderr}");
    }
    let _ = std::fs::remove_file(trace);
}

//! Booting: every shipped machine comes up and the guest kernel's own report of it matches the
//! topology file; programs run at CPL3, print through the kernel gate and pass exit codes on.

use psyche_tests::{shipped_topologies, Boot};
use psyche_vmm::topology::Topology;
use psyche_vmm::vm::{status, GuestEnd, ProgramEnd};

#[test]
fn every_shipped_topology_boots_and_the_guest_reports_it() {
    let files = shipped_topologies();
    assert!(files.len() >= 5, "expected at least five shipped topologies, found {files:?}");
    for file in files {
        let topology = Topology::load(&file).unwrap_or_else(|e| panic!("{e}"));
        let run = Boot::new(file.to_str().expect("UTF-8 path")).run();
        run.expect_exit(0);
        let report =
            run.outcome.guest.as_ref().unwrap_or_else(|| panic!("{}: the kernel sent no report", file.display()));
        let name = &topology.name;
        assert_eq!(report.cpus_online as usize, topology.cpu_count(), "{name}: CPUs online");
        assert_eq!(report.nodes.len(), topology.node_count(), "{name}: node count");
        for (seen, configured) in report.nodes.iter().zip(&topology.nodes) {
            assert_eq!(seen.id, configured.id, "{name}: node order");
            assert_eq!(seen.cpus, configured.cpus, "{name}: CPUs of node {}", seen.id);
            assert_eq!(seen.memory_bytes, configured.memory_bytes, "{name}: memory of node {}", seen.id);
        }
        assert_eq!(report.distances, topology.distance_matrix(), "{name}: distances");
        assert!(report.lapic_timer_hz > 0, "{name}: the kernel did not calibrate its LAPIC timer");
        // The guest program printed from CPL3 what the kernel told it about the machine.
        let greeting = format!(
            "hello from program 0 at CPL3 on cpu 0 (node 0) of a machine with {} CPUs online on {} nodes",
            topology.cpu_count(),
            topology.node_count()
        );
        assert!(run.printed(&greeting), "{name}: no greeting in\n{}", run.console.text());
        assert!(run.outcome.boot.is_some(), "{name}: no program start was seen");
    }
}

#[test]
fn console_lines_are_tagged_with_the_vcpu_that_printed_them() {
    // Program k runs on vCPU k: the second program's line must come from vCPU 1.
    let run = Boot::new("uma").programs(&["hello", "hello"]).run();
    run.expect_exit(0);
    let lines = run.lines();
    assert!(lines.iter().any(|(vcpu, line)| *vcpu == 0 && line.starts_with("hello from program 0 at CPL3 on cpu 0")));
    assert!(lines.iter().any(|(vcpu, line)| *vcpu == 1 && line.starts_with("hello from program 1 at CPL3 on cpu 1")));
}

#[test]
fn a_program_exit_code_becomes_the_guest_exit_code() {
    for code in [0u64, 3, 37, 119] {
        let run = Boot::new("two-socket").programs(&["exit"]).args(&[&code.to_string()]).run();
        run.expect_exit(code);
        assert_eq!(run.outcome.exit_status(), code as u8);
        assert!(run.printed(&format!("exit: exiting with code {code}")));
    }
}

#[test]
fn exit_codes_above_the_passthrough_range_get_their_own_status() {
    let run = Boot::new("uma").programs(&["exit"]).args(&["200"]).run();
    run.expect_exit(200);
    assert_eq!(run.outcome.exit_status(), status::EXIT_CODE_OUT_OF_RANGE);
}

#[test]
fn independently_linked_programs_share_one_boot() {
    // Both are static PIEs linked at the same address; the VMM relocates each into its slot.
    let run = Boot::new("ring8").programs(&["hello", "exit", "hello"]).args(&["5"]).run();
    run.expect_exit(5);
    assert!(run.lines().iter().any(|(vcpu, line)| *vcpu == 1 && line == "exit: exiting with code 5"));
    assert!(run.printed("hello from program 2 at CPL3 on cpu 2 (node 2)"));
    let ends: Vec<_> = run.outcome.programs.iter().map(|p| p.end).collect();
    assert_eq!(
        ends,
        vec![
            Some(ProgramEnd::Exited { code: 0 }),
            Some(ProgramEnd::Exited { code: 5 }),
            Some(ProgramEnd::Exited { code: 0 })
        ]
    );
}

#[test]
fn a_hung_guest_is_stopped_by_the_timeout() {
    let run = Boot::new("butterfly").programs(&["hang"]).timeout(1.0).run();
    assert!(matches!(run.outcome.end, GuestEnd::TimedOut { .. }), "{:?}", run.outcome.end);
    assert_eq!(run.outcome.exit_status(), status::TIMEOUT);
    assert!(run.printed("hang: spinning forever"), "the program never ran");
    assert!(run.outcome.wall.as_secs_f64() >= 1.0);
}

#[test]
fn a_cpu_on_a_memoryless_node_still_boots() {
    let toml = r#"
name = "cpu-only-node"
[[node]]
id = 0
cpus = [0]
memory = "32M"
[[node]]
id = 1
cpus = [1]
memory = "0"
"#;
    let dir = std::env::temp_dir().join(format!("psyche-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cpu-only-node.toml");
    std::fs::write(&path, toml).unwrap();
    let run = Boot::new(path.to_str().unwrap()).programs(&["hello", "hello"]).run();
    run.expect_exit(0);
    let report = run.outcome.guest.clone().expect("report");
    assert_eq!(report.nodes[1].cpus, vec![1]);
    assert_eq!(report.nodes[1].memory_bytes, 0);
    assert!(run.printed("hello from program 1 at CPL3 on cpu 1 (node 1)"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_vcpu_thread_that_cannot_start_ends_the_run_with_a_host_error_before_the_guest_runs() {
    psyche_tests::require_kvm();
    // vCPU 0 (nothing started yet), a middle one and the last one of an 8-vCPU machine.
    for failing in [0, 3, 7] {
        let mut config = psyche_vmm::VmConfig::with_defaults(psyche_vmm::topology::resolve("two-socket").unwrap());
        config.fail_vcpu_thread = Some(failing);
        // Run it on a thread of its own: a start-up that never returns fails the test instead of
        // hanging it.
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let console = psyche_vmm::CaptureSink::default();
            let outcome = psyche_vmm::vm::run(&config, &console);
            let _ = done.send((outcome.map(|o| o.end), console.lines()));
        });
        let (outcome, lines) = result
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("vCPU {failing}: the run did not end after its thread failed to start"));
        match outcome {
            Err(error @ psyche_vmm::VmError::Thread { index, .. }) => {
                assert_eq!(index, failing);
                assert!(
                    error.to_string().starts_with(&format!("cannot start the thread of vCPU {failing}:")),
                    "{error}"
                );
            }
            other => panic!("vCPU {failing}: expected a thread error, got {other:?}"),
        }
        // The threads that had started were sent home from the start gate: no guest instruction
        // ran, so the kernel printed nothing.
        assert!(lines.is_empty(), "vCPU {failing}: the guest ran: {lines:?}");
    }
}

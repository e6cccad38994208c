//! Confinement through the library: `vm::run` puts a seccomp filter on the threads it starts
//! and, by default, leaves its caller's thread alone (a test harness runs many VMs from its own
//! threads). The binary confines its main thread too; `vmm/tests/cli.rs` checks that a thread
//! making a forbidden call is stopped, in a child process.

use std::time::{Duration, Instant};

use psyche_tests::Boot;
use psyche_vmm::seccomp::{Role, Seccomp};
use psyche_vmm::CaptureSink;

/// The seccomp mode (0 none, 2 filter) of every thread of this process named `vcpu*`, as the
/// kernel reports it: polled until `threads` vCPU threads all have `mode` (a thread installs
/// its filter just after it starts), or, failing that within the guest's run, the last time
/// `threads` of them were seen.
fn vcpu_thread_modes(threads: usize, mode: &str) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = Vec::new();
    loop {
        let mut modes = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let mode = status.lines().find_map(|line| line.strip_prefix("Seccomp:")).map(str::trim);
            if let (true, Some(mode)) = (comm.starts_with("vcpu"), mode) {
                modes.push((comm.trim().to_owned(), mode.to_owned()));
            }
        }
        modes.sort();
        if modes.len() >= threads {
            if modes.iter().all(|(_, seen)| seen == mode) {
                return modes;
            }
            last = modes;
        }
        if Instant::now() > deadline {
            return last;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The seccomp mode of the calling thread.
fn own_mode() -> String {
    let status = std::fs::read_to_string("/proc/thread-self/status").expect("/proc/thread-self/status");
    status.lines().find_map(|line| line.strip_prefix("Seccomp:")).map(|mode| mode.trim().to_owned()).unwrap_or_default()
}

#[test]
fn the_library_confines_the_vm_s_threads_by_default_and_not_the_caller_nor_anything_with_seccomp_off() {
    psyche_tests::require_kvm();
    for (seccomp, want) in [(Seccomp::VmThreads, "2"), (Seccomp::Off, "0")] {
        let mut config = Boot::new("uma").programs(&["hang"]).timeout(3.0).config().clone();
        if seccomp == Seccomp::VmThreads {
            assert_eq!(config.seccomp, Seccomp::VmThreads, "the library default");
        }
        config.seccomp = seccomp;
        // The caller's thread makes a forbidden call once the guest is about to run.
        config.seccomp_probe = Some(Role::Main);
        let running = std::thread::spawn(move || {
            let console = CaptureSink::default();
            let outcome = psyche_vmm::vm::run(&config, &console).unwrap_or_else(|e| panic!("{e}"));
            (outcome, console.notes(), own_mode())
        });
        let modes = vcpu_thread_modes(4, want);
        let (outcome, notes, caller_mode) = running.join().expect("the VM's caller");
        assert_eq!(modes.len(), 4, "{seccomp:?}: the 4 vCPU threads of uma: {modes:?}");
        for (thread, mode) in &modes {
            assert_eq!(mode, want, "{seccomp:?}: the seccomp mode of {thread}");
        }
        assert_eq!(outcome.exit_status(), psyche_vmm::vm::status::TIMEOUT, "{seccomp:?}: {:?}", outcome.end);
        // The call went through, and the caller's thread is as it was.
        assert!(
            notes.iter().any(|note| note == "seccomp probe: the main thread opened a socket: it is not confined"),
            "{seccomp:?}: {notes:?}"
        );
        assert_eq!(caller_mode, "0", "{seccomp:?}: the caller's thread has a filter");
    }
}

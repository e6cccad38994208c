//! The kernel time-slices the protection domains that share a processor: with twice as many
//! programs as vCPUs, the two programs of each vCPU run interleaved (their running intervals
//! overlap) and get similar shares, as the programs themselves report.

use psyche_tests::Boot;

/// (program, cpu, start TSC, end TSC, iterations) from `spin: program K on cpu C from T0 to T1:
/// N iterations`.
fn parse(line: &str) -> Option<(u32, u32, u64, u64, u64)> {
    let rest = line.strip_prefix("spin: program ")?;
    let words: Vec<&str> = rest.split([' ', ':']).filter(|w| !w.is_empty()).collect();
    // K on cpu C from T0 to T1 N iterations
    Some((
        words[0].parse().ok()?,
        words[3].parse().ok()?,
        words[5].parse().ok()?,
        words[7].parse().ok()?,
        words[8].parse().ok()?,
    ))
}

#[test]
fn programs_sharing_a_vcpu_are_time_sliced_with_equal_shares() {
    let run = Boot::new("uma").programs(&["spin"; 8]).args(&["300"]).timeout(60.0).run();
    run.expect_exit(0);
    let reports: Vec<_> = run.lines().iter().filter_map(|(_, line)| parse(line)).collect();
    assert_eq!(reports.len(), 8, "{}", run.console.text());
    for cpu in 0..4 {
        let on_cpu: Vec<_> = reports.iter().filter(|r| r.1 == cpu).collect();
        assert_eq!(on_cpu.len(), 2, "two programs on vCPU {cpu}: {reports:?}");
        let (a, b) = (on_cpu[0], on_cpu[1]);
        // Interleaved: each started before the other ended.
        assert!(a.2 < b.3 && b.2 < a.3, "vCPU {cpu}: {a:?} and {b:?} did not overlap");
        // Similar shares over the time both ran (the later starter also runs alone at its end,
        // so allow a factor of four).
        let (low, high) = (a.4.min(b.4), a.4.max(b.4));
        assert!(high <= 4 * low, "vCPU {cpu}: shares {} and {} are not alike", a.4, b.4);
    }
}

#[test]
fn twelve_domains_on_eight_vcpus_with_threads_and_tasks_all_finish() {
    // Each `mixed` program creates a realm and has threads and tasks of its own block and
    // unblock each other under 1 ms time slices; four vCPUs carry two programs each. This is
    // the load under which a broken kernel lock once gave two programs the same realm.
    let run = Boot::new("two-socket").programs(&["mixed"; 12]).timeout(120.0).run();
    run.expect_exit(0);
    let passed = run.lines().iter().filter(|(_, line)| line == "mixed: passed").count();
    assert_eq!(passed, 12, "{}", run.console.text());
}

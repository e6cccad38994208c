//! The two thread packages in one realm: preemptive threads and run-to-completion tasks pass
//! a baton round a ring through semaphores that record waiters of either kind (the `mixed`
//! program), judged by what the guest reports.

use psyche_tests::{Boot, Run};

fn ring(topology: &str, args: &[&str]) -> Run {
    // Longer than the program's own patience, so that a stuck ring reports itself.
    let run = Boot::new(topology).programs(&["mixed"]).args(args).timeout(150.0).run();
    run.expect_exit(0);
    assert!(run.printed("mixed: passed"), "{}", run.console.text());
    run
}

fn assert_printed(run: &Run, lines: &[&str]) {
    for line in lines {
        assert!(run.printed(line), "missing '{line}' in\n{}", run.console.text());
    }
}

#[test]
fn threads_and_tasks_block_and_unblock_each_other_round_a_ring_under_time_slices() {
    let run = ring("two-socket", &[]);
    assert_printed(
        &run,
        &[
            "mixed: check 6: ok (the spinner ran, and a time slice gave main the processor back)",
            // Who passed the baton to whom (each usually finds the next one waiting: "unblocked").
            "mixed: round 2: thread A (thread 2) ",
            "mixed: round 2: task X (task 0) ",
            "mixed: round 2: thread B (thread 3) ",
            "mixed: round 2: task Y (task 1) ",
            "threads unblocked tasks: A unblocked X",
            "tasks unblocked threads: X unblocked B",
            "mixed: thread A took 50 turns",
            "mixed: task X took 50 turns",
            "mixed: thread B took 50 turns",
            "mixed: task Y took 50 turns",
            "every member took 50 turns: [50, 50, 50, 50]",
            "200 turns in all",
            "(0 out of order)",
            "both tasks ran to completion (2 spawned, 2 completed)",
            "permits [1, 0, 0, 0], 0 waiting",
            "time slices took the processor from the spinner, which never yields",
        ],
    );
    // The tasks' own package unblocked the executor thread (tasks::unblock -> threads::unblock).
    assert!(run.printed("the executor thread blocked for lack of work and was unblocked through tasks::unblock"));
}

#[test]
fn a_longer_ring_on_eight_nodes() {
    let run = ring("ring8", &["300"]);
    assert_printed(&run, &["mixed: round 300: task X (task 0) ", "every member took 300 turns", "1200 turns in all"]);
}

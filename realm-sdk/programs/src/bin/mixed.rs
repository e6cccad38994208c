//! Threads of both packages in one realm: two preemptive threads ([`realm_sdk::threads`]) and
//! two run-to-completion tasks ([`realm_sdk::tasks`], on an executor thread) pass a baton round
//! a ring, thread A -> task X -> thread B -> task Y -> thread A, for N rounds (argument 0;
//! default 50). The ring is a realm made with `Realm::create`: one
//! [`realm_sdk::sync::Semaphore`] per member, which records its waiter as a thread or a task
//! and unblocks it with that package's own unblock. A spinner thread that never yields runs
//! all along, with 1 ms time slices, so preemption interleaves with the blocking (and lands
//! inside threads' turns and inside tasks' polls).
//!
//! Prints who unblocked whom in the first rounds, the counts at the end, every check, and
//! `mixed: passed` (exit 0) or the failed check (its number is the exit code). Used by
//! tests/tests/mixed.rs.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use realm_sdk::realm::Realm;
use realm_sdk::sync::{Semaphore, Waiter};
use realm_sdk::tasks::{self, Poll, TaskContext};
use realm_sdk::threads;
use realm_sdk::{println, Program};

realm_sdk::entry!(main);

/// A numbered check of this program (see [`realm_sdk::check`]).
macro_rules! check {
    ($code:expr, $ok:expr, $($what:tt)*) => {
        realm_sdk::check!("mixed", $code, $ok, $($what)*)
    };
}

const DEFAULT_ROUNDS: u64 = 50;
const MEMBERS: usize = 4;
/// Ring order: even members are threads, odd ones tasks.
const NAMES: [&str; MEMBERS] = ["thread A", "task X", "thread B", "task Y"];
/// Work done in each turn, in TSC cycles (~40 us at 2.6 GHz).
const WORK: u64 = 100_000;
/// A gap this long between two reads of the TSC means the reader lost the processor
/// (~100 us: a time slice's upcall path alone takes about that long here).
const GAP: u64 = 260_000;
/// How long main waits for the ring (~100 s of TSC). A liveness bound, not a speed target: the
/// ring's pace is set by time slices and how the two packages' threads happen to interleave
/// with them, and 1200 turns on ring8 take from 2 to 20 s on a 2-core host.
const PATIENCE: u64 = 260_000_000_000;

/// The realm the ring lives in.
struct Ring {
    /// Member i waits on `baton[i]` and passes the baton on by releasing `baton[i + 1]`.
    baton: [Semaphore; MEMBERS],
    /// Turns taken, per member.
    rounds: [AtomicU64; MEMBERS],
    /// Times member i's release unblocked the next member (it was registered as waiting).
    unblocked: [AtomicU64; MEMBERS],
    /// Times member i lost the processor in the middle of its turn.
    interrupted: [AtomicU64; MEMBERS],
    /// The member that took the last turn.
    last: AtomicU64,
    /// Turns that did not follow the previous member's.
    out_of_order: AtomicU64,
    /// Turns taken, all members.
    passes: AtomicU64,
}

impl Ring {
    fn new() -> Self {
        Self {
            // Thread A holds the baton first.
            baton: [Semaphore::new(1), Semaphore::new(0), Semaphore::new(0), Semaphore::new(0)],
            rounds: [const { AtomicU64::new(0) }; MEMBERS],
            unblocked: [const { AtomicU64::new(0) }; MEMBERS],
            interrupted: [const { AtomicU64::new(0) }; MEMBERS],
            last: AtomicU64::new(MEMBERS as u64 - 1),
            out_of_order: AtomicU64::new(0),
            passes: AtomicU64::new(0),
        }
    }
}

fn attach(realm: u64) -> Realm<Ring> {
    // SAFETY: every member is given the id of the realm main created to hold a `Ring`.
    unsafe { Realm::attach(realm as u32) }
}

/// Spins for `cycles`; whether the processor was taken away meanwhile.
fn work(cycles: u64) -> bool {
    let start = threads::tsc();
    let mut last = start;
    let mut interrupted = false;
    while last - start < cycles {
        let now = threads::tsc();
        interrupted |= now - last > GAP;
        last = now;
    }
    interrupted
}

/// Member `me`'s turn `round` (it holds the baton): check the order, work, pass the baton on.
fn take_turn(ring: &Ring, me: usize, myself: Waiter, round: u64, rounds: u64) {
    let previous = ring.last.swap(me as u64, Ordering::AcqRel);
    if previous != ((me + MEMBERS - 1) % MEMBERS) as u64 {
        ring.out_of_order.fetch_add(1, Ordering::Relaxed);
    }
    if work(WORK) {
        ring.interrupted[me].fetch_add(1, Ordering::Relaxed);
    }
    ring.rounds[me].fetch_add(1, Ordering::AcqRel);
    ring.passes.fetch_add(1, Ordering::AcqRel);
    let next = (me + 1) % MEMBERS;
    let verbose = round <= 2 || round == rounds;
    match ring.baton[next].release() {
        Some(waiter) => {
            ring.unblocked[me].fetch_add(1, Ordering::Relaxed);
            if verbose {
                println!("mixed: round {round}: {} ({myself}) unblocked {} ({waiter})", NAMES[me], NAMES[next]);
            }
        }
        None if verbose => {
            println!(
                "mixed: round {round}: {} ({myself}) passed the baton to {}, which was not waiting",
                NAMES[me], NAMES[next]
            );
        }
        None => {}
    }
}

/// Threads A and B: `arg` is the realm id (high half) and the member (low half).
extern "sysv64" fn member_thread(arg: u64) {
    let realm = attach(arg >> 32);
    let ring = realm.get();
    let me = (arg as u32 as usize) % MEMBERS;
    let rounds = ROUNDS.load(Ordering::Acquire);
    let myself = Waiter::current_thread();
    for round in 1..=rounds {
        ring.baton[me].acquire();
        take_turn(ring, me, myself, round, rounds);
    }
}

/// Tasks X and Y. Their state: [realm id, member, turns taken, turns to take].
fn member_task(cx: &mut TaskContext) -> Poll {
    let realm = attach(cx.words[0]);
    let ring = realm.get();
    let me = (cx.words[1] as usize) % MEMBERS;
    loop {
        if cx.words[2] >= cx.words[3] {
            return Poll::Done;
        }
        if !ring.baton[me].poll_acquire(cx) {
            // Registered on the baton: the member before us unblocks this task.
            return Poll::Pending;
        }
        cx.words[2] += 1;
        take_turn(ring, me, Waiter::task(cx), cx.words[2], cx.words[3]);
    }
}

static ROUNDS: AtomicU64 = AtomicU64::new(0);
static SPINNER_STARTED: AtomicBool = AtomicBool::new(false);
static FINISHED: AtomicBool = AtomicBool::new(false);
static SPINS: AtomicU64 = AtomicU64::new(0);
static SPINNER_GAPS: AtomicU64 = AtomicU64::new(0);

/// Never yields: only time slices take the processor from it.
extern "sysv64" fn spinner(_: u64) {
    SPINNER_STARTED.store(true, Ordering::Release);
    let mut last = threads::tsc();
    while !FINISHED.load(Ordering::Acquire) {
        let now = threads::tsc();
        if now - last > GAP {
            SPINNER_GAPS.fetch_add(1, Ordering::Relaxed);
        }
        last = now;
        SPINS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Yields until `done` or until `PATIENCE` has passed; whether `done`.
fn wait_until(done: impl Fn() -> bool) -> bool {
    let start = threads::tsc();
    while !done() {
        if threads::tsc() - start > PATIENCE {
            return false;
        }
        threads::yield_now();
    }
    true
}

fn main(program: Program) -> u32 {
    let rounds = match program.args.get(0) {
        None => DEFAULT_ROUNDS,
        Some(text) => text.parse().unwrap_or(0),
    };
    check!(2, (1..=100_000).contains(&rounds), "{rounds} rounds");
    ROUNDS.store(rounds, Ordering::Release);
    check!(3, threads::enable(1000).is_ok(), "upcalls on, 1 ms time slices");
    let realm = Realm::create(Ring::new()).build();
    check!(4, realm.is_ok(), "create the ring's realm: {:?}", realm.as_ref().map(Realm::id));
    let Ok(realm) = realm else { return 4 };
    let ring = realm.get();
    let id = u64::from(realm.id());
    println!("mixed: the ring lives in realm {id} at {:#x}, the same address in every domain", realm.as_ptr() as u64);

    check!(5, threads::spawn(spinner, 0).is_ok(), "spawn a spinner thread that never yields");
    check!(
        6,
        wait_until(|| SPINNER_STARTED.load(Ordering::Acquire)),
        "the spinner ran, and a time slice gave main the processor back"
    );

    let a = threads::spawn(member_thread, id << 32);
    let b = threads::spawn(member_thread, id << 32 | 2);
    let x = tasks::spawn(member_task, [id, 1, 0, rounds]);
    let y = tasks::spawn(member_task, [id, 3, 0, rounds]);
    check!(7, a.is_ok() && b.is_ok() && x.is_ok() && y.is_ok(), "spawn threads A and B and tasks X and Y");
    let (Ok(a), Ok(b), Ok(x), Ok(y)) = (a, b, x, y) else { return 7 };
    let executor = tasks::spawn_executor();
    check!(8, executor.is_ok(), "spawn the executor thread for the tasks: {executor:?}");
    println!(
        "mixed: thread A is thread {}, thread B thread {}, task X task {}, task Y task {}, executor thread {}",
        a.0,
        b.0,
        x.0,
        y.0,
        executor.map_or(u32::MAX, |t| t.0)
    );

    let all = MEMBERS as u64 * rounds;
    let finished = wait_until(|| ring.passes.load(Ordering::Acquire) >= all);
    FINISHED.store(true, Ordering::Release);
    check!(9, finished, "the ring went round: {} of {all} turns", ring.passes.load(Ordering::Acquire));
    threads::join_all();

    let count = |counters: &[AtomicU64; MEMBERS]| -> [u64; MEMBERS] {
        core::array::from_fn(|i| counters[i].load(Ordering::Acquire))
    };
    let (turns, unblocked, interrupted) = (count(&ring.rounds), count(&ring.unblocked), count(&ring.interrupted));
    for me in 0..MEMBERS {
        println!(
            "mixed: {} took {} turns, unblocked {} {} times, lost the processor in {} turns",
            NAMES[me],
            turns[me],
            NAMES[(me + 1) % MEMBERS],
            unblocked[me],
            interrupted[me]
        );
    }
    let stats = tasks::stats();
    println!(
        "mixed: tasks: {} polls; the executor thread blocked {} times, unblocked by tasks::unblock {} times",
        stats.polls, stats.executor_blocks, stats.executor_wakeups
    );
    println!(
        "mixed: the spinner spun {} times and lost the processor {} times",
        SPINS.load(Ordering::Relaxed),
        SPINNER_GAPS.load(Ordering::Relaxed)
    );

    check!(10, turns == [rounds; MEMBERS], "every member took {rounds} turns: {turns:?}");
    check!(11, ring.passes.load(Ordering::Acquire) == all, "{all} turns in all");
    check!(
        12,
        ring.out_of_order.load(Ordering::Acquire) == 0,
        "the baton went thread, task, thread, task in order every time ({} out of order)",
        ring.out_of_order.load(Ordering::Acquire)
    );
    check!(
        13,
        unblocked[0] > 0 && unblocked[2] > 0,
        "threads unblocked tasks: A unblocked X {} times, B unblocked Y {} times",
        unblocked[0],
        unblocked[2]
    );
    check!(
        14,
        unblocked[1] > 0 && unblocked[3] > 0,
        "tasks unblocked threads: X unblocked B {} times, Y unblocked A {} times",
        unblocked[1],
        unblocked[3]
    );
    check!(
        15,
        stats.spawned == 2 && stats.completed == 2 && tasks::live() == 0,
        "both tasks ran to completion ({} spawned, {} completed)",
        stats.spawned,
        stats.completed
    );
    check!(
        16,
        stats.executor_wakeups > 0,
        "the executor thread blocked for lack of work and was unblocked through tasks::unblock ({} times)",
        stats.executor_wakeups
    );
    let permits: [u64; MEMBERS] = core::array::from_fn(|i| ring.baton[i].available());
    let waiting: usize = ring.baton.iter().map(Semaphore::waiting).sum();
    check!(
        17,
        permits == [1, 0, 0, 0] && waiting == 0,
        "the baton is back with thread A and nobody waits: permits {permits:?}, {waiting} waiting"
    );
    check!(
        18,
        SPINS.load(Ordering::Relaxed) > 0 && SPINNER_GAPS.load(Ordering::Relaxed) > 0,
        "time slices took the processor from the spinner, which never yields"
    );
    println!("mixed: passed");
    0
}

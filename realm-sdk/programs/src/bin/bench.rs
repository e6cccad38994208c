//! The invocation-path benchmark run by `psyche-vmm bench` as two programs: program 1 serves a
//! null operation (the last argument is the key that may invoke it), program 0 measures. Times each
//! path inside the guest with the TSC and prints one line per path:
//! `bench: path=NAME n=SAMPLES batch=B median=CYCLES p99=CYCLES` (cycles per operation;
//! cheap paths are timed in batches of B operations so that the TSC reads do not dominate).
//!
//! With the argument `count`, it instead brackets a few runs of each path with marks
//! (`sys::mark`), so that psyche-vmm, single-stepping the kernel, can count the kernel
//! instructions each path executes.
#![no_std]
#![no_main]

use core::arch::x86_64::{_mm_lfence, _rdtsc};
use core::hint::black_box;
use core::sync::atomic::{AtomicU64, Ordering};

use realm_sdk::operations::{self, Remote};
use realm_sdk::realm::{self, Realm, Rights};
use realm_sdk::{println, sys, threads, Program};

realm_sdk::entry!(main);

const SAMPLES: usize = 2000;
const BATCH: u64 = 256;
const FIRST_TOUCHES: usize = 200;

/// The data of the benchmark realm, and the same shape in the program's own memory.
struct Cell {
    value: AtomicU64,
}

static LOCAL: Cell = Cell { value: AtomicU64::new(1) };

/// The operation: the same code whether called on local data (a procedure call) or on a
/// realm's data (an optimized invocation).
#[inline(never)]
fn operation(cell: &Cell) -> u64 {
    cell.value.load(Ordering::Relaxed) + 1
}

fn tsc() -> u64 {
    // SAFETY: lfence and rdtsc have no preconditions; lfence keeps rdtsc from being reordered.
    unsafe {
        _mm_lfence();
        let t = _rdtsc();
        _mm_lfence();
        t
    }
}

/// Times `SAMPLES` batches of `batch` runs of `f`, returns per-operation cycles, sorted.
fn time_batches(batch: u64, mut f: impl FnMut()) -> [f64; SAMPLES] {
    let mut samples = [0f64; SAMPLES];
    for sample in samples.iter_mut() {
        let start = tsc();
        for _ in 0..batch {
            f();
        }
        *sample = (tsc() - start) as f64 / batch as f64;
    }
    samples.sort_unstable_by(f64::total_cmp);
    samples
}

fn report(path: &str, batch: u64, sorted: &[f64]) {
    // Unused sample slots hold f64::MAX (see `time_each`).
    let n = sorted.iter().take_while(|&&s| s != f64::MAX).count().max(1);
    let sorted = &sorted[..n];
    let median = sorted[n / 2];
    let p99 = sorted[(n * 99 / 100).min(n - 1)];
    println!("bench: path={path} n={n} batch={batch} median={median:.2} p99={p99:.2}");
}

extern "sysv64" fn null_operation(_: u64, _: u64, _: u64, _: u64) -> u64 {
    0
}

/// Ends the server (its caller gets an error back: the domain it invoked is gone).
extern "sysv64" fn stop_operation(_: u64, _: u64, _: u64, _: u64) -> u64 {
    realm_sdk::exit(0)
}

/// Operation numbers (0 and 1 are every program's unblock and wake).
const NULL: u64 = 2;
const STOP: u64 = 3;

/// Program 1: offers the null operation to the key it was given, then waits for ever. With
/// the argument `placed` it first moves to the last CPU, on another node than the measuring
/// program (on every multi-node machine we ship), so that where remote memory costs, the
/// kernel places its protected invocations on its own CPU.
fn serve(program: &Program) -> u32 {
    let Some(key) = program.args.iter().last().and_then(realm::parse_key) else {
        println!("bench: the server needs a key");
        return 2;
    };
    if program.args.get(0) == Some("placed") && move_to_cpu(realm_sdk::machine().cpus_online - 1).is_err() {
        return 6;
    }
    if operations::register(&[null_operation, stop_operation]).is_err() {
        return 3;
    }
    // SAFETY: only the root realm's id is used.
    let root: Realm<u8> = unsafe { Realm::attach(realm_sdk::program_index() as u32) };
    if root.set_rights(&key, Rights::INVOKE_PROTECTED).is_err() || root.publish("bench-server").is_err() {
        return 4;
    }
    loop {
        threads::block();
    }
}

/// The server's null operation, invoked with protection.
fn server(program: &Program) -> Option<Remote> {
    let key = program.args.iter().last().and_then(realm::parse_key)?;
    realm_sdk::keys::add(key).ok()?;
    let id = realm::wait_for("bench-server", 1_000_000_000).ok()?;
    Remote::protected(id).ok()
}

extern "sysv64" fn yielder(_: u64) {
    loop {
        threads::yield_now();
    }
}

use realm_sdk::sys::move_to_cpu;

fn main(program: Program) -> u32 {
    if program.index == 1 {
        return serve(&program);
    }
    let Some(remote) = server(&program) else {
        println!("bench: no server to invoke");
        return 5;
    };
    let code = if program.args.get(0) == Some("count") { count(&remote) } else { measure(&remote) };
    // The server has served: stop it, so that the machine shuts down.
    let _ = remote.call(STOP, [0; 4]);
    code
}

fn measure(remote: &Remote) -> u32 {
    let Ok(realm) = Realm::create(Cell { value: AtomicU64::new(1) }).build() else {
        println!("bench: cannot create the benchmark realm");
        return 3;
    };

    // Warm up every path once.
    black_box(operation(black_box(&LOCAL)));
    black_box(realm.invoke(operation));

    report(
        "procedure_call",
        BATCH,
        &time_batches(BATCH, || {
            black_box(operation(black_box(&LOCAL)));
        }),
    );
    report(
        "inline_access",
        BATCH,
        &time_batches(BATCH, || {
            black_box(black_box(&realm).get().value.load(Ordering::Relaxed));
        }),
    );
    report(
        "optimized_invocation",
        BATCH,
        &time_batches(BATCH, || {
            black_box(black_box(&realm).invoke(operation));
        }),
    );
    report("null_kernel_gate", 1, &time_batches(1, sys::null));

    // First touch: fault, open, restart. Each sample touches a realm never opened here.
    let mut cycles = [0f64; FIRST_TOUCHES];
    let mut made = 0;
    for sample in cycles.iter_mut() {
        // SAFETY: an all-zero AtomicU64 is valid.
        let Ok(fresh) = (unsafe { Realm::create(Cell { value: AtomicU64::new(0) }).build_zeroed() }) else { break };
        let start = tsc();
        black_box(fresh.get().value.load(Ordering::Relaxed));
        *sample = (tsc() - start) as f64;
        let _ = fresh.destroy();
        made += 1;
    }
    let touched = &mut cycles[..made];
    touched.sort_unstable_by(f64::total_cmp);
    if touched.is_empty() {
        println!("bench: no realm for the first-touch path");
        return 4;
    }
    report("optimized_first_touch", 1, touched);

    // Protected invocation: caller to callee's domain and back, through the kernel.
    black_box(remote.call(NULL, [0; 4])).ok();
    report(
        "protected_invocation",
        1,
        &time_each(500, || {
            black_box(remote.call(NULL, [0; 4])).ok();
        }),
    );
    // An upcall: into the kernel, out through the domain's handler, back to this thread.
    if threads::enable(0).is_err() {
        return 6;
    }
    report(
        "upcall_delivery",
        1,
        &time_each(500, || {
            threads::upcall_round_trip().ok();
        }),
    );
    // A voluntary switch between two user threads: a yield there and back is two switches.
    if threads::spawn(yielder, 0).is_err() {
        return 7;
    }
    let round_trips = time_batches(BATCH, threads::yield_now);
    let per_switch: [f64; SAMPLES] = core::array::from_fn(|i| round_trips[i] / 2.0);
    report("thread_switch_user", BATCH * 2, &per_switch);
    0
}

/// Times `n` single runs of `f` (n <= SAMPLES), sorted.
fn time_each(n: usize, mut f: impl FnMut()) -> [f64; SAMPLES] {
    let mut samples = [f64::MAX; SAMPLES];
    for sample in samples.iter_mut().take(n) {
        let start = tsc();
        f();
        *sample = (tsc() - start) as f64;
    }
    samples[..n].sort_unstable_by(f64::total_cmp);
    samples
}

/// Marks around a few runs of each path: psyche-vmm counts the kernel instructions between.
fn count(remote: &Remote) -> u32 {
    let Ok(realm) = Realm::create(Cell { value: AtomicU64::new(1) }).build() else { return 3 };
    const RUNS: u64 = 10;
    // Mark 0/1: nothing between (the cost of a mark itself).
    sys::mark(0);
    sys::mark(1);
    sys::mark(2);
    for _ in 0..RUNS {
        black_box(operation(black_box(&LOCAL)));
    }
    sys::mark(3);
    sys::mark(4);
    for _ in 0..RUNS {
        black_box(black_box(&realm).get().value.load(Ordering::Relaxed));
    }
    sys::mark(5);
    sys::mark(6);
    for _ in 0..RUNS {
        black_box(black_box(&realm).invoke(operation));
    }
    sys::mark(7);
    sys::mark(8);
    for _ in 0..RUNS {
        sys::null();
    }
    sys::mark(9);
    let mut fresh = [None; RUNS as usize];
    for slot in fresh.iter_mut() {
        // SAFETY: an all-zero AtomicU64 is valid.
        *slot = unsafe { Realm::create(Cell { value: AtomicU64::new(0) }).build_zeroed() }.ok();
    }
    sys::mark(10);
    for realm in fresh.iter().flatten() {
        black_box(realm.get().value.load(Ordering::Relaxed));
    }
    sys::mark(11);
    // As in the timed run: the first invocation (checked in full, then remembered) is not counted.
    black_box(remote.call(NULL, [0; 4])).ok();
    sys::mark(12);
    for _ in 0..RUNS {
        black_box(remote.call(NULL, [0; 4])).ok();
    }
    sys::mark(13);
    if threads::enable(0).is_err() {
        return 6;
    }
    sys::mark(14);
    for _ in 0..RUNS {
        threads::upcall_round_trip().ok();
    }
    sys::mark(15);
    if threads::spawn(yielder, 0).is_err() {
        return 7;
    }
    sys::mark(16);
    for _ in 0..RUNS {
        threads::yield_now();
    }
    sys::mark(17);
    println!("bench: counted {RUNS} runs per path");
    0
}

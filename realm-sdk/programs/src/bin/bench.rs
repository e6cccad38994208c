//! The invocation-path benchmark run by `psyche-vmm bench`. Times each path inside the guest
//! with the TSC and prints one line per path:
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

use realm_sdk::realm::Realm;
use realm_sdk::{println, sys, Program};

realm_sdk::entry!(main);

const SAMPLES: usize = 2000;
const BATCH: u64 = 64;
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
    let median = sorted[sorted.len() / 2];
    let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
    println!("bench: path={path} n={} batch={batch} median={median:.2} p99={p99:.2}", sorted.len());
}

fn main(program: Program) -> u32 {
    if program.args.get(0) == Some("count") {
        return count();
    }
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
    0
}

/// Marks around a few runs of each path: psyche-vmm counts the kernel instructions between.
fn count() -> u32 {
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
    println!("bench: counted {RUNS} runs per path");
    0
}

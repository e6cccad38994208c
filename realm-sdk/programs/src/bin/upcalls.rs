//! Exercises upcalls, user-level threads and protected invocations; the first argument picks
//! the scenario and the program index the role. Every check is printed; the exit code names
//! the first that failed (0: all passed). Used by tests/tests/upcalls.rs.
//!
//! * `threads`: preemptive threads (time-limit upcalls) that block and unblock each other.
//! * `fault`: a thread faults (a fault upcall); the others go on.
//! * `server` / `client` (program 0 / the others): the server offers operations; clients
//!   invoke them with protection (by fault on entry, and through the gate), including a
//!   message-style one answered by server threads (blocked and completed upcalls), one that
//!   faults in the callee, and one of a realm that does not exist.
//! * `orphan` (program 0 serves, 1 is the victim, 2 the killer): the server runs a long
//!   operation for the victim; the killer ends the victim meanwhile (it invokes an operation of
//!   the victim's that faults), lets the operation finish, and checks the server still answers.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use realm_sdk::abi::syscall::{Syscall, MIN_INVOCATION_ID};
use realm_sdk::abi::upcall::ProcessorBlock;
use realm_sdk::operations::{self, Remote};
use realm_sdk::sys::SysError;
use realm_sdk::threads;
use realm_sdk::{println, realm, Program};

realm_sdk::entry!(main);

/// A numbered check of this program (see [`realm_sdk::check`]).
macro_rules! check {
    ($code:expr, $ok:expr, $($what:tt)*) => {
        realm_sdk::check!("upcalls", $code, $ok, $($what)*)
    };
}

fn main(program: Program) -> u32 {
    let scenario = program.args.get(0).unwrap_or("");
    let code = match (scenario, program.index) {
        ("threads", _) => threads_scenario(),
        ("fault", _) => fault_scenario(),
        ("garbage-context", _) => garbage_context(),
        ("server", 0) => server(&program),
        ("many", 0) => many_server(&program),
        ("many", _) => many_client(&program),
        ("revoke", 0) => revoke_server(&program),
        ("revoke", _) => revoke_client(&program),
        ("orphan", 0) => many_server(&program),
        ("orphan", 1) => orphan_victim(&program),
        ("orphan", _) => orphan_killer(&program),
        ("server", _) => client(&program),
        _ => {
            println!("upcalls: unknown scenario '{scenario}'");
            return 2;
        }
    };
    println!("upcalls: {scenario}: {}", if code == 0 { "passed" } else { "FAILED" });
    code
}

static COUNTERS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static PING: AtomicU64 = AtomicU64::new(0);
static WAITER: AtomicU64 = AtomicU64::new(u64::MAX);

/// Spins until stopped, counting: only preemption lets the others run.
extern "sysv64" fn spinner(index: u64) {
    let start = threads::tsc();
    // About 30 ms of TSC, whatever the clock.
    while threads::tsc() - start < 80_000_000 {
        COUNTERS[index as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Blocks until the main thread unblocks it, five times, answering each time.
extern "sysv64" fn ponger(_: u64) {
    WAITER.store(u64::from(threads::current().0), Ordering::Release);
    for _ in 0..5 {
        threads::block();
        PING.fetch_add(1, Ordering::AcqRel);
    }
}

fn threads_scenario() -> u32 {
    check!(3, threads::enable(1000).is_ok(), "upcalls on, 1 ms time slices");
    for i in 0..3 {
        check!(4, threads::spawn(spinner, i).is_ok(), "spawn spinner {i}");
    }
    let Ok(pong) = threads::spawn(ponger, 0) else { return 5 };
    // Wait until the ponger blocked, then unblock it five times, yielding in between.
    while WAITER.load(Ordering::Acquire) == u64::MAX {
        threads::yield_now();
    }
    for round in 1..=5 {
        check!(6, threads::unblock(pong).is_ok(), "unblock round {round}");
        let start = threads::tsc();
        while PING.load(Ordering::Acquire) < round && threads::tsc() - start < 5_000_000_000 {
            threads::yield_now();
        }
        check!(7, PING.load(Ordering::Acquire) == round, "ponger answered round {round}");
    }
    threads::join_all();
    let counts: [u64; 3] = core::array::from_fn(|i| COUNTERS[i].load(Ordering::Relaxed));
    println!("upcalls: spinners counted {counts:?}");
    check!(8, counts.iter().all(|&c| c > 0), "every spinner ran (it never yields: time slicing made that happen)");
    0
}

extern "sysv64" fn faulter(_: u64) {
    println!("upcalls: faulting thread touches address 0x10");
    // SAFETY: deliberately faults.
    unsafe { core::arch::asm!("mov rax, [0x10]", out("rax") _) };
    println!("upcalls: the faulting thread went on");
}

extern "sysv64" fn survivor(_: u64) {
    COUNTERS[0].fetch_add(1, Ordering::Relaxed);
}

fn fault_scenario() -> u32 {
    check!(3, threads::enable(0).is_ok(), "upcalls on");
    check!(4, threads::spawn(faulter, 0).is_ok(), "spawn the faulter");
    check!(5, threads::spawn(survivor, 0).is_ok(), "spawn a survivor");
    threads::join_all();
    check!(6, threads::faulted() == 1, "one thread died of its fault ({})", threads::faulted());
    check!(7, COUNTERS[0].load(Ordering::Relaxed) == 1, "the survivor ran");
    0
}

fn garbage_context() -> u32 {
    check!(3, threads::enable(1000).is_ok(), "upcalls on, 1 ms time slices");
    // A processor block whose current thread's context block is kernel memory: the first
    // time slice's end cannot save the thread. (It lives on this stack, which outlives it.)
    let block = ProcessorBlock {
        current: 0xFFFF_FFFF_8010_0000,
        upcall_handler: threads::upcall_entry_address(),
        quantum_us: 1000,
        critical: 0,
    };
    let address = core::hint::black_box(&block as *const ProcessorBlock as u64);
    // Said first: the next time slice may end as soon as the block is registered.
    println!("upcalls: spinning until the time slice ends");
    check!(4, realm_sdk::keys::set_processor_block_raw(address).is_ok(), "register it");
    let start = threads::tsc();
    while threads::tsc() - start < 10_000_000_000 {
        core::hint::spin_loop();
    }
    println!("upcalls: still running: the kernel should have stopped this domain");
    9
}

// --- many clients at once ---

const STOP: u64 = 6;
const SUM: u64 = 7;
const UNBLOCK_CALLER: u64 = 8;
const WHERE: u64 = 9;
const LINGER: u64 = 10;
const LINGERING: u64 = 11;
const RELEASE: u64 = 12;
const REVOKE: u64 = 10;

/// The handed-out key, for `revoke_rights`.
static HANDED_OUT: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
/// Takes the handed-out key's right to invoke us away.
extern "sysv64" fn revoke_rights(_: u64, _: u64, _: u64, _: u64) -> u64 {
    let key = realm::Key([HANDED_OUT[0].load(Ordering::Acquire), HANDED_OUT[1].load(Ordering::Acquire)]);
    // SAFETY: only our root realm's id is used.
    let root: realm::Realm<u8> = unsafe { realm::Realm::attach(realm_sdk::program_index() as u32) };
    match root.set_rights(&key, realm::Rights::NONE) {
        Ok(()) => 0,
        Err(error) => error.to_return() as u64,
    }
}

/// `revoke KEY`, program 0: serves until a client has had its right taken away and says it
/// was refused.
fn revoke_server(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    HANDED_OUT[0].store(key.0[0], Ordering::Release);
    HANDED_OUT[1].store(key.0[1], Ordering::Release);
    let operations: [operations::Operation; 9] =
        [add, square_slowly, crash, who, stop, sum, unblock_caller, where_am_i, revoke_rights];
    check!(3, operations::register(&operations).is_ok(), "register the operations");
    // The client raises a flag here once it has been refused: a realm of ours, so that it
    // outlives the client.
    let Ok(done) = realm::Realm::create(AtomicU64::new(0)).grant(key, realm::Rights::INVOKE_OPTIMIZED).build() else {
        return 5;
    };
    check!(4, done.publish("revoke-done").is_ok(), "publish the client's flag");
    // SAFETY: only our root realm's id is used.
    let root: realm::Realm<u8> = unsafe { realm::Realm::attach(realm_sdk::program_index() as u32) };
    check!(6, root.set_rights(&key, realm::Rights::INVOKE_PROTECTED).is_ok(), "let the key invoke us");
    check!(7, root.publish("server").is_ok(), "publish");
    let start = threads::tsc();
    loop {
        if done.get().load(Ordering::Acquire) != 0 {
            return 0;
        }
        if threads::tsc() - start > 100_000_000_000 {
            println!("upcalls: the revoked client never reported");
            return 8;
        }
        threads::yield_now();
    }
}

/// `revoke KEY`, program 1: invokes, has its right taken away, and is refused at once (the
/// kernel's per-CPU cache of checked calls must not let the next one through).
fn revoke_client(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    check!(30, realm_sdk::keys::add(key).is_ok(), "hold the handed-out key");
    let Ok(realm) = realm::wait_for("server", 200_000_000) else { return 31 };
    let Ok(remote) = Remote::protected(realm) else { return 32 };
    let mut sum = 0;
    for i in 0..50 {
        sum += remote.call(ADD, [i, 1, 0, 0]).unwrap_or(0);
    }
    check!(33, sum == (1..=50).sum::<u64>(), "50 invocations before: {sum}");
    let Ok(done_id) = realm::wait_for("revoke-done", 1000) else { return 34 };
    // SAFETY: the server made this realm holding an AtomicU64.
    let done: realm::Realm<AtomicU64> = unsafe { realm::Realm::attach(done_id) };
    let revoked = remote.call(REVOKE, [0; 4]);
    check!(35, revoked == Ok(0), "the server took our right away: {revoked:?}");
    let refused = remote.call(ADD, [1, 2, 0, 0]);
    check!(36, refused == Err(SysError::NoRight), "the next invocation is refused: {refused:?}");
    let again = remote.call(WHO, [0; 4]);
    check!(37, again == Err(SysError::NoRight), "and the one after: {again:?}");
    done.get().store(1, Ordering::Release);
    0
}

/// The CPU the operation runs on: its index, and its node in the high 32 bits.
/// 0: no `linger` runs; 1: one runs; 2: it was told to end.
static LINGER_STATE: AtomicU64 = AtomicU64::new(0);

/// Runs until `release` (or 30 s of TSC), then returns 1.
extern "sysv64" fn linger(_: u64, _: u64, _: u64, _: u64) -> u64 {
    LINGER_STATE.store(1, Ordering::Release);
    let start = threads::tsc();
    while LINGER_STATE.load(Ordering::Acquire) == 1 && threads::tsc() - start < 80_000_000_000 {
        core::hint::spin_loop();
    }
    LINGER_STATE.store(0, Ordering::Release);
    1
}

extern "sysv64" fn lingering(_: u64, _: u64, _: u64, _: u64) -> u64 {
    LINGER_STATE.load(Ordering::Acquire)
}

extern "sysv64" fn release(_: u64, _: u64, _: u64, _: u64) -> u64 {
    LINGER_STATE.store(2, Ordering::Release);
    0
}

extern "sysv64" fn where_am_i(_: u64, _: u64, _: u64, _: u64) -> u64 {
    let cpu = realm_sdk::cpu();
    u64::from(cpu.node) << 32 | u64::from(cpu.index)
}

/// Unblocks thread `thread` of the domain whose root realm is `realm`, through that domain's
/// own unblock operation (operation 0 of every program): a protected invocation made from
/// inside this invocation's handler.
extern "sysv64" fn unblock_caller(realm: u64, thread: u64, _: u64, _: u64) -> u64 {
    match Remote::protected(realm as u32).and_then(|caller| caller.call(operations::UNBLOCK, [thread, 0, 0, 0])) {
        Ok(value) => value,
        Err(error) => error.to_return() as u64,
    }
}

/// Sums `count` words at `address`: a reference parameter. The words are in a realm of the
/// caller's, which this domain opens on first touch with its own keys.
extern "sysv64" fn sum(address: u64, count: u64, _: u64, _: u64) -> u64 {
    let words = address as *const u64;
    // SAFETY: the caller passes a realm of `count` words it let us open; if it lied, the
    // touch ends this domain and the caller gets an error.
    (0..count.min(512)).map(|i| unsafe { words.add(i as usize).read_volatile() }).sum()
}
static STOPPED: AtomicU64 = AtomicU64::new(0);
static CLIENTS: AtomicU64 = AtomicU64::new(u64::MAX);

/// A client is done; the last one ends the server (its own call then returns an error: the
/// domain it invoked is gone).
extern "sysv64" fn stop(_: u64, _: u64, _: u64, _: u64) -> u64 {
    if STOPPED.fetch_add(1, Ordering::AcqRel) + 1 >= CLIENTS.load(Ordering::Acquire) {
        println!("upcalls: every client is done");
        realm_sdk::exit(0);
    }
    0
}

/// `many KEY CLIENTS`: program 0 serves; programs 1..=CLIENTS invoke it at once, from every
/// vCPU, with protection.
fn many_server(program: &Program) -> u32 {
    let clients = program.args.get(2).and_then(|n| n.parse::<u64>().ok()).unwrap_or(1);
    CLIENTS.store(clients, Ordering::Release);
    server(program)
}

fn many_client(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    check!(3, realm_sdk::keys::add(key).is_ok(), "hold the handed-out key");
    let Ok(realm) = realm::wait_for("server", 200_000_000) else { return 4 };
    let Ok(remote) = Remote::new(realm) else { return 5 };
    let me = program.index;
    let mut wrong = 0;
    for i in 0..200 {
        let got = remote.call(ADD, [i, me * 1000, 0, 0]);
        if got != Ok(i + me * 1000) {
            if wrong == 0 {
                println!("upcalls: client {me}: call {i} returned {got:?}");
            }
            wrong += 1;
        }
    }
    check!(6, wrong == 0, "client {me} on cpu {}: 200 protected invocations, {wrong} wrong", realm_sdk::cpu().index);
    let squared = remote.call(SQUARE_SLOWLY, [me, 0, 0, 0]);
    check!(7, squared == Ok(me * me), "client {me}: message-style square: {squared:?}");
    // Where the server's operations run for us: here, or (where remote memory costs) on the
    // server's own processor when we are on another node.
    if let Ok(place) = remote.call(WHERE, [0; 4]) {
        let here = realm_sdk::cpu();
        println!(
            "upcalls: client {me} on cpu {} node {}: the operation ran on cpu {} node {}",
            here.index,
            here.node,
            place as u32,
            place >> 32
        );
    }
    let _ = remote.call(STOP, [0; 4]);
    0
}

// --- server ---

const ADD: u64 = 2;
const SQUARE_SLOWLY: u64 = 3;
const CRASH: u64 = 4;
const WHO: u64 = 5;

extern "sysv64" fn add(a: u64, b: u64, _: u64, _: u64) -> u64 {
    a + b
}

extern "sysv64" fn square_slowly(_: u64, _: u64, _: u64, _: u64) -> u64 {
    // Message-style: served by `server_thread`; the handler never calls this.
    SysError::NoSuchCall.to_return() as u64
}

extern "sysv64" fn crash(_: u64, _: u64, _: u64, _: u64) -> u64 {
    // SAFETY: deliberately faults in the callee.
    unsafe { core::arch::asm!("mov rax, [0x18]", out("rax") _) };
    0
}

extern "sysv64" fn who(_: u64, _: u64, _: u64, _: u64) -> u64 {
    realm_sdk::program_index()
}

/// A server thread: answers message-style requests.
extern "sysv64" fn server_thread(_: u64) {
    loop {
        let request = operations::next_request();
        // Argument 1, when given, is the address of a flag in a realm of the caller's (shared
        // with the handed-out key): the caller's other thread raises it once the caller is
        // blocked in this invocation. Waiting for it (up to about 4 s) makes the deferral
        // certain to come first, however loaded the host is.
        let flag = request.args[1] as *const AtomicU64;
        if !flag.is_null() {
            let start = threads::tsc();
            // SAFETY: a realm of the caller's we may open; if it lied, this domain ends.
            while unsafe { (*flag).load(Ordering::Acquire) } == 0 && threads::tsc() - start < 10_000_000_000 {
                threads::yield_now();
            }
        }
        let value = request.args[0] * request.args[0];
        if operations::reply(&request, value).is_err() {
            println!("upcalls: reply to invocation {} failed", request.invocation);
        }
    }
}

fn server(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    check!(
        3,
        operations::register(&[
            add,
            square_slowly,
            crash,
            who,
            stop,
            sum,
            unblock_caller,
            where_am_i,
            linger,
            lingering,
            release
        ])
        .is_ok(),
        "register the operations"
    );
    check!(4, realm_sdk::keys::add(key).is_ok(), "hold the handed-out key (to see callers' reference parameters)");
    operations::message_style(SQUARE_SLOWLY);
    for _ in 0..2 {
        check!(5, threads::spawn(server_thread, 0).is_ok(), "spawn a server thread");
    }
    // Our root realm is the realm clients invoke: the handed-out key may invoke it, protected.
    // SAFETY: only its id is used.
    let root: realm::Realm<u8> = unsafe { realm::Realm::attach(realm_sdk::program_index() as u32) };
    check!(6, root.set_rights(&key, realm::Rights::INVOKE_PROTECTED).is_ok(), "let the key invoke us");
    check!(7, root.publish("server").is_ok(), "publish");
    println!("upcalls: server ready");
    // The handlers and the server threads do the work from here; this thread waits.
    loop {
        threads::block();
    }
}

fn client(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    check!(16, realm_sdk::keys::add(key).is_ok(), "hold the handed-out key");
    let Ok(realm) = realm::wait_for("server", 200_000_000) else { return 3 };
    let Ok(remote) = Remote::new(realm) else { return 4 };
    check!(5, !remote.is_optimized(), "no rights on the server's root realm: invocations are protected");
    // By fault on entry, then through the gate.
    let by_fault = remote.call_entry(ADD, [20, 22, 0, 0]);
    check!(6, by_fault == Ok(42), "add by fault on entry: {by_fault:?}");
    let by_gate = remote.call(ADD, [1000, program.index, 0, 0]);
    check!(7, by_gate == Ok(1000 + program.index), "add through the gate: {by_gate:?}");
    // A reference parameter: a realm of ours, shared with the key the server holds.
    let Ok(numbers) = realm::Realm::create([0u64; 64]).grant(key, realm::Rights::INVOKE_OPTIMIZED_READ_ONLY).build()
    else {
        return 18;
    };
    // SAFETY: the realm is ours and nobody else writes it.
    unsafe { (0..64).for_each(|i| (*numbers.as_ptr())[i] = i as u64 * 2) };
    let total = remote.call(SUM, [numbers.as_ptr() as u64, 64, 0, 0]);
    check!(
        19,
        total == Ok((0..64u64).map(|i| i * 2).sum()),
        "the server summed our realm through a pointer: {total:?}"
    );
    // Cross-domain unblock: a thread of ours blocks; the server unblocks it through our root
    // realm's unblock operation (which the handed-out key may invoke), from inside an
    // invocation of its own.
    check!(20, operations::register(&[]).is_ok(), "offer our root realm's operations");
    // SAFETY: only our root realm's id is used.
    let root: realm::Realm<u8> = unsafe { realm::Realm::attach(realm_sdk::program_index() as u32) };
    check!(21, root.set_rights(&key, realm::Rights::INVOKE_PROTECTED).is_ok(), "let the key invoke us");
    let Ok(sleeper) = threads::spawn(sleeper, 0) else { return 22 };
    while !SLEEPING.load(Ordering::Acquire) {
        threads::yield_now();
    }
    let woken = remote.call(UNBLOCK_CALLER, [u64::from(root.id()), u64::from(sleeper.0), 0, 0]);
    check!(23, woken == Ok(0), "the server unblocked our thread through our unblock operation: {woken:?}");
    let start = threads::tsc();
    while !AWOKE.load(Ordering::Acquire) && threads::tsc() - start < 10_000_000_000 {
        threads::yield_now();
    }
    check!(24, AWOKE.load(Ordering::Acquire), "the unblocked thread ran");
    let whose = remote.call(WHO, [0; 4]);
    check!(8, whose == Ok(0), "the operation ran in the server's domain: {whose:?}");
    // Many in a row.
    let mut sum = 0;
    for i in 0..100 {
        sum += remote.call(ADD, [i, 1, 0, 0]).unwrap_or(0);
    }
    check!(9, sum == (0..100).map(|i| i + 1).sum::<u64>(), "100 invocations: {sum}");
    // Bad input at the invocation gate, right after calls this CPU remembers: an operation past
    // the server's count, the call through the ordinary gate, a return of nothing running.
    let past = remote.call(100, [0; 4]);
    check!(26, past == Err(SysError::InvalidArgument), "an operation past the server's count: {past:?}");
    let through_int4 = realm_sdk::sys::raw_syscall(Syscall::ProtectedCall as u64, u64::from(realm), ADD, 0);
    check!(27, through_int4 == SysError::NoSuchCall.to_return(), "ProtectedCall through int 4: {through_int4}");
    let stray = operations::invocation_return(MIN_INVOCATION_ID + 12_345, 7);
    check!(28, stray == SysError::NotFound.to_return(), "the return of an invocation that is not running: {stray}");
    // Message-style: this thread blocks in the invocation while another of ours runs.
    check!(10, threads::enable(0).is_ok(), "client upcalls on");
    let Ok(_) = threads::spawn(ticker, 0) else { return 11 };
    let Ok(flag) = realm::Realm::create(AtomicU64::new(0)).grant(key, realm::Rights::INVOKE_OPTIMIZED).build() else {
        return 25;
    };
    TICKER_FLAG.store(flag.as_ptr() as u64, Ordering::Release);
    let squared = remote.call(SQUARE_SLOWLY, [12, flag.as_ptr() as u64, 0, 0]);
    check!(12, squared == Ok(144), "message-style square: {squared:?}");
    let ticks = TICKS.load(Ordering::Acquire);
    println!("upcalls: client {} squared while its ticker ran {ticks} times", program.index);
    check!(17, ticks == 3, "another thread ran while this one was blocked in the invocation");
    // The callee faults: we get an error, the server's domain ends.
    let crashed = remote.call(CRASH, [0; 4]);
    check!(13, crashed.is_err(), "an operation that faults in the callee returns an error: {crashed:?}");
    // A realm that is not there.
    let missing = Remote::new(400);
    check!(14, missing.is_err(), "no operations at a realm that does not exist: {:?}", missing.err());
    let gone = remote.call(ADD, [1, 1, 0, 0]);
    check!(15, gone.is_err(), "invoking the ended server is an error: {gone:?}");
    threads::join_all();
    0
}

// --- orphan ---

/// Offers one operation, which faults, publishes itself, then has the server linger for it. The
/// killer ends this domain meanwhile: the call never returns.
fn orphan_victim(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    check!(40, realm_sdk::keys::add(key).is_ok(), "victim: hold the handed-out key");
    check!(41, operations::register(&[crash]).is_ok(), "victim: offer an operation that faults");
    // SAFETY: only our root realm's id is used.
    let root: realm::Realm<u8> = unsafe { realm::Realm::attach(realm_sdk::program_index() as u32) };
    check!(42, root.set_rights(&key, realm::Rights::INVOKE_PROTECTED).is_ok(), "victim: let the key invoke us");
    check!(43, root.publish("victim").is_ok(), "victim: publish");
    let Ok(server) = realm::wait_for("server", 200_000_000).and_then(Remote::new) else { return 44 };
    let lingered = server.call(LINGER, [0; 4]);
    println!("upcalls: victim: linger returned {lingered:?}, though this domain should have ended");
    45
}

/// Ends the victim while the server runs its call, then checks the server outlived it.
fn orphan_killer(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(realm::parse_key) else { return 2 };
    check!(50, realm_sdk::keys::add(key).is_ok(), "killer: hold the handed-out key");
    let Ok(server) = realm::wait_for("server", 200_000_000).and_then(Remote::new) else { return 51 };
    let Ok(victim) = realm::wait_for("victim", 200_000_000).and_then(Remote::new) else { return 52 };
    let wait_for_linger = |state: u64| {
        let start = threads::tsc();
        while server.call(LINGERING, [0; 4]) != Ok(state) {
            if threads::tsc() - start > 80_000_000_000 {
                return false;
            }
        }
        true
    };
    check!(53, wait_for_linger(1), "killer: the server runs the victim's call");
    let crashed = victim.call(2, [0; 4]);
    check!(54, crashed.is_err(), "killer: the victim's operation faulted, ending its domain: {crashed:?}");
    check!(55, server.call(RELEASE, [0; 4]) == Ok(0), "killer: release the server's call");
    check!(56, wait_for_linger(0), "killer: the server's call returned to its ended caller");
    // The return reaches the kernel on the victim's vCPU a moment after.
    let start = threads::tsc();
    while threads::tsc() - start < 200_000_000 {
        core::hint::spin_loop();
    }
    let alive = server.call(ADD, [2, 3, 0, 0]);
    check!(57, alive == Ok(5), "killer: the server outlived the caller it was serving: {alive:?}");
    let _ = server.call(STOP, [0; 4]);
    0
}

static TICKS: AtomicU64 = AtomicU64::new(0);
static SLEEPING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
static AWOKE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Blocks until someone unblocks it.
extern "sysv64" fn sleeper(_: u64) {
    SLEEPING.store(true, Ordering::Release);
    threads::block();
    AWOKE.store(true, Ordering::Release);
}

/// Where the ticker raises the server's flag (0: nowhere).
static TICKER_FLAG: AtomicU64 = AtomicU64::new(0);

extern "sysv64" fn ticker(_: u64) {
    for _ in 0..3 {
        TICKS.fetch_add(1, Ordering::AcqRel);
        threads::yield_now();
    }
    // This thread only runs while the main one is blocked in the invocation: tell the server.
    let flag = TICKER_FLAG.load(Ordering::Acquire) as *const AtomicU64;
    if !flag.is_null() {
        // SAFETY: the flag realm is ours and holds an AtomicU64.
        unsafe { (*flag).store(1, Ordering::Release) };
    }
}

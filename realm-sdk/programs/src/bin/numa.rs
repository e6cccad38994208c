//! Exercises the NUMA machine: remote-memory latency traps, realm migration and domains moving
//! between CPUs. The first argument picks the scenario; every check's outcome is printed and the
//! exit code names the first that failed (0: all passed). Used by tests/tests/numa.rs and by
//! `psyche-vmm bench`.
//!
//! * `pattern READS WRITES`: on its own CPU, touches one page of a realm homed on every other
//!   node READS + WRITES times (volatile accesses, one trap each in `account` and `exact`
//!   modes), and a realm homed on its own node as often (never charged). Checks the realms'
//!   trap counts and the data.
//! * `migrate KEY ROUNDS`: program 0 makes a realm homed on a remote node and moves it from
//!   node to node ROUNDS times while program 1 (holding KEY) keeps adding to a counter in it
//!   from another CPU; then program 1 keeps using it until the kernel's policy moves it to
//!   program 1's node. Checks that no increment was lost, the data and addresses stayed, and
//!   remote traps stop after the move.
//! * `tour`: moves the domain to the first CPU of every node and back, checking where it runs.
//! * `follow TOUCHES`: the demo of the kernel's migration policy. A realm starts on node 0;
//!   the domain moves to the first CPU of each other node in turn and touches the realm there
//!   until the kernel moves it over, then TOUCHES times more, printing how many touches it
//!   took and how many of the later ones trapped (none: the realm is local from then on).
//! * `matrix ACCESSES`: from the first CPU of every node, times ACCESSES reads of a realm homed
//!   on every node (TSC cycles per read, median of the run) and prints the matrix.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use realm_sdk::keys;
use realm_sdk::realm::{self, parse_key, Home, Realm, Rights};
use realm_sdk::sys::{move_to_cpu, SysError};
use realm_sdk::threads::tsc;
use realm_sdk::{cpu, machine, println, Program};

realm_sdk::entry!(main);

/// Ends the scenario with `code` unless `condition` holds; prints the check either way.
macro_rules! check {
    ($code:expr, $condition:expr, $($what:tt)*) => {{
        if $condition {
            println!("numa: check {}: ok ({})", $code, format_args!($($what)*));
        } else {
            println!("numa: check {}: FAILED ({})", $code, format_args!($($what)*));
            return $code;
        }
    }};
}

/// One page of words.
type Page = [u64; 512];

fn main(program: Program) -> u32 {
    let scenario = program.args.get(0).unwrap_or("");
    let number = |n: usize, default: u64| program.args.get(n).and_then(|text| text.parse().ok()).unwrap_or(default);
    let code = match scenario {
        "pattern" => pattern(number(1, 3), number(2, 2)),
        "migrate" => migrate(&program, number(2, 4)),
        "tour" => tour(),
        "follow" => follow(number(1, 200)),
        "matrix" => matrix(number(1, 64)),
        _ => {
            println!("numa: unknown scenario '{scenario}' (pattern, migrate, tour, matrix)");
            return 2;
        }
    };
    if code == 0 {
        println!("numa: passed");
    }
    code
}

/// A zeroed one-page realm homed on `node`, not yet touched.
fn page_on(node: u32) -> Result<Realm<Page>, SysError> {
    // SAFETY: an all-zero page of words is a valid page.
    unsafe { Realm::<Page>::create([0; 512]).home(Home::Node(node)).build_zeroed() }
}

fn read(realm: &Realm<Page>, word: usize) -> u64 {
    // SAFETY: `word` < 512 (callers index a page), inside the realm; a volatile read is exactly
    // one access, so exactly one latency trap when the page is armed.
    unsafe { (realm.as_ptr() as *const u64).add(word % 512).read_volatile() }
}

fn write(realm: &Realm<Page>, word: usize, value: u64) {
    // SAFETY: as for `read`.
    unsafe { (realm.as_ptr() as *mut u64).add(word % 512).write_volatile(value) }
}

/// Nodes with memory (a realm can live only on those), as a bit set.
fn nodes_with_memory(nodes: u32) -> u64 {
    (0..nodes.min(64)).filter(|&node| page_on(node).and_then(|r| r.destroy()).is_ok()).fold(0, |set, n| set | 1 << n)
}

fn pattern(reads: u64, writes: u64) -> u32 {
    let here = cpu();
    let nodes = machine().nodes;
    let with_memory = nodes_with_memory(nodes);
    println!("numa: pattern from cpu {} node {}: {reads} reads and {writes} writes per realm", here.index, here.node);
    let touches = reads + writes;
    for node in (0..nodes).filter(|&node| with_memory & 1 << node != 0) {
        let realm = match page_on(node) {
            Ok(realm) => realm,
            Err(error) => {
                println!("numa: cannot make a realm on node {node}: {error:?}");
                return 3;
            }
        };
        check!(4, realm.traps(None) == Ok(0), "realm on node {node} starts with no traps");
        let word = 8 * node as usize + 1;
        let mut sum = 0;
        for i in 0..writes {
            write(&realm, word, 1000 * u64::from(node) + i);
        }
        // Marks around the reads: with --count-kernel-instructions, psyche-vmm counts the
        // kernel instructions of `reads` latency traps between them.
        realm_sdk::sys::mark(1000 + u64::from(node));
        for _ in 0..reads {
            sum += read(&realm, word);
        }
        realm_sdk::sys::mark(2000 + u64::from(node));
        let last = if writes == 0 { 0 } else { 1000 * u64::from(node) + writes - 1 };
        check!(5, sum == reads * last, "node {node}: read back what was written");
        let expected = if node == here.node { 0 } else { touches };
        let traps = realm.traps(Some(here.node));
        println!("numa: pattern: node {} -> node {node}: {} traps", here.node, traps.unwrap_or(u64::MAX));
        check!(6, traps == Ok(expected), "node {} -> node {node}: {traps:?} traps, expected {expected}", here.node);
        check!(7, realm.traps(None) == Ok(expected), "no other node trapped on it");
        check!(8, realm.home() == Ok(node), "it stayed on node {node}");
        check!(9, realm.destroy().is_ok(), "destroy");
    }
    0
}

/// The migration scenario's realm, the one that moves.
#[repr(C)]
struct Moving {
    /// Increments from both programs.
    counter: AtomicU64,
    /// Written once at creation; checked after every move.
    pattern: [u64; 256],
}

/// The migration scenario's flags, in a realm of their own: waiting on a flag in `Moving`
/// would make the waiter one of its users, and the kernel's policy would follow it.
#[repr(C)]
struct Flags {
    /// Program 1 is done.
    user_done: AtomicU64,
    /// Program 0 is done moving the realm.
    mover_done: AtomicU64,
}

fn pattern_word(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5
}

/// Increments each program adds while the realm moves.
const ADDS: u64 = 300;

fn migrate(program: &Program, rounds: u64) -> u32 {
    let Some(key) = program.args.get(1).and_then(parse_key) else {
        println!("numa: migrate needs a key (32 hex digits)");
        return 2;
    };
    let here = cpu();
    let nodes = machine().nodes;
    let with_memory = nodes_with_memory(nodes);
    if program.index == 0 {
        let Some(first) = (0..nodes).find(|&n| n != here.node && with_memory & 1 << n != 0) else {
            println!("numa: migrate needs a second node with memory");
            return 3;
        };
        let mut pattern = [0u64; 256];
        for (i, word) in pattern.iter_mut().enumerate() {
            *word = pattern_word(i);
        }
        let moving = Moving { counter: AtomicU64::new(0), pattern };
        let flags = Flags { user_done: AtomicU64::new(0), mover_done: AtomicU64::new(0) };
        let (Ok(realm), Ok(flags)) = (
            Realm::create(moving).home(Home::Node(first)).grant(key, Rights::ALL).build(),
            Realm::create(flags).grant(key, Rights::ALL).build(),
        ) else {
            println!("numa: cannot make the realms");
            return 4;
        };
        let base = realm.as_ptr() as u64;
        check!(5, flags.publish("moving-flags").is_ok() && realm.publish("moving").is_ok(), "publish");
        let mut moves = 0;
        let mut node = first;
        for round in 0..rounds {
            // Visit every node with memory in turn, this one included.
            node = (1..=nodes).map(|step| (node + step) % nodes).find(|&n| with_memory & 1 << n != 0).unwrap_or(node);
            check!(6, realm.migrate(node) == Ok(()), "round {round}: move to node {node}");
            moves += 1;
            // The user's traps may have made the kernel move it on already (its policy).
            let now = realm.home();
            check!(7, now.is_ok(), "round {round}: moved to node {node}, now on node {now:?}");
            realm.get().counter.fetch_add(ADDS / rounds.max(1), Ordering::AcqRel);
            check!(8, realm.as_ptr() as u64 == base, "round {round}: same address");
            let intact = realm.get().pattern.iter().enumerate().all(|(i, &word)| word == pattern_word(i));
            check!(9, intact, "round {round}: data intact after the move");
        }
        // Home to the mover's node, then leave it to the user: the kernel should follow it.
        check!(12, realm.migrate(here.node) == Ok(()), "move to the mover's node {}", here.node);
        flags.get().mover_done.store(1, Ordering::Release);
        println!("numa: mover moved the realm {moves} times");
        let start = tsc();
        while flags.get().user_done.load(Ordering::Acquire) == 0 {
            if tsc() - start > 100_000_000_000 {
                println!("numa: the user never finished");
                return 10;
            }
            core::hint::spin_loop();
        }
        let total = realm.get().counter.load(Ordering::Acquire);
        let expected = ADDS / rounds.max(1) * rounds + ADDS;
        check!(11, total == expected, "counter {total}, expected {expected}: no increment lost");
        0
    } else {
        // Run on another node than the mover: the last CPU (another node on every shipped
        // topology with more than one).
        let last = machine().cpus_online - 1;
        check!(19, move_to_cpu(last) == Ok(()) && cpu().index == last, "move to cpu {last}");
        let here = cpu();
        check!(20, keys::add(key).is_ok(), "add the shared key");
        let (Ok(id), Ok(flags_id)) = (realm::wait_for("moving", 100_000_000), realm::wait_for("moving-flags", 1000))
        else {
            println!("numa: the mover's realms were never published");
            return 21;
        };
        // SAFETY: program 0 made these realms holding a `Moving` and `Flags`.
        let (realm, flags): (Realm<Moving>, Realm<Flags>) = unsafe { (Realm::attach(id), Realm::attach(flags_id)) };
        let base = realm.as_ptr() as u64;
        for _ in 0..ADDS {
            realm.get().counter.fetch_add(1, Ordering::AcqRel);
        }
        let start = tsc();
        while flags.get().mover_done.load(Ordering::Acquire) == 0 {
            if tsc() - start > 100_000_000_000 {
                println!("numa: the mover never finished");
                return 22;
            }
            core::hint::spin_loop();
        }
        // Now the realm is only used from here: the kernel's policy should bring it home.
        let remote_before = realm.traps(None).unwrap_or(0);
        let mut touches = 0u64;
        while realm.home() != Ok(here.node) && touches < 10_000 {
            touches += 1;
            // SAFETY: a word of the realm's pattern; volatile, so every touch is an access.
            unsafe { core::ptr::addr_of!(realm.get().pattern[touches as usize % 256]).read_volatile() };
        }
        check!(
            23,
            realm.home() == Ok(here.node),
            "the kernel moved it to node {} after {touches} touches ({remote_before} traps before)",
            here.node
        );
        let intact = realm.get().pattern.iter().enumerate().all(|(i, &word)| word == pattern_word(i));
        check!(24, intact, "data intact after the kernel's move");
        check!(25, realm.as_ptr() as u64 == base, "same address");
        let after = realm.traps(Some(here.node));
        check!(26, after == Ok(0), "no traps from here once it is local: {after:?} after {touches} touches");
        flags.get().user_done.store(1, Ordering::Release);
        0
    }
}

fn tour() -> u32 {
    let start = cpu();
    let nodes = machine().nodes;
    let cpus = machine().cpus_online;
    for node in 0..nodes {
        let Some(target) = (0..cpus).find(|&c| cpu_node(c) == Some(node)) else { continue };
        check!(30, move_to_cpu(target) == Ok(()), "move to cpu {target}");
        let now = cpu();
        check!(31, now.index == target && now.node == node, "running on cpu {} node {}", now.index, now.node);
    }
    check!(32, move_to_cpu(cpus) == Err(SysError::InvalidArgument), "a CPU that does not exist is refused");
    check!(33, move_to_cpu(start.index) == Ok(()) && cpu().index == start.index, "back home");
    0
}

fn follow(touches: u64) -> u32 {
    let machine = machine();
    let start = cpu().index;
    let realm = match page_on(0) {
        Ok(realm) => realm,
        Err(error) => {
            println!("numa: cannot make a realm on node 0: {error:?}");
            return 40;
        }
    };
    let mut visited = 0;
    for target in 0..machine.cpus_online {
        if move_to_cpu(target).is_err() {
            continue;
        }
        let here = cpu();
        if here.node == 0 || here.node < visited {
            continue;
        }
        visited = here.node + 1;
        // Touch until the realm is here (every touch traps in account and exact mode, one per
        // window in window mode, so this takes longer there), then TOUCHES times more: those
        // never trap.
        let start = tsc();
        let mut moved_after = 0u64;
        while realm.home() != Ok(here.node) {
            if tsc() - start > 50_000_000_000 {
                println!("numa: follow: the realm never came to node {} in {moved_after} touches", here.node);
                return 41;
            }
            read(&realm, moved_after as usize);
            moved_after += 1;
        }
        for touch in 0..touches {
            read(&realm, touch as usize);
        }
        let traps_after = realm.traps(Some(here.node)).unwrap_or(u64::MAX);
        println!(
            "numa: follow: node {}: the realm moved here after {moved_after} touches; {touches} touches since, {traps_after} traps",
            here.node
        );
        check!(42, traps_after == 0, "node {}: no traps once the realm is local", here.node);
    }
    check!(43, visited > 0, "visited another node");
    let _ = move_to_cpu(start);
    let _ = realm.destroy();
    0
}

/// The node of CPU `cpu`, found by going there (the kernel says which node each CPU is on).
fn cpu_node(target: u32) -> Option<u32> {
    let here = cpu().index;
    move_to_cpu(target).ok()?;
    let node = cpu().node;
    move_to_cpu(here).ok()?;
    Some(node)
}

fn matrix(accesses: u64) -> u32 {
    let nodes = machine().nodes;
    let cpus = machine().cpus_online;
    let with_memory = nodes_with_memory(nodes);
    let home = cpu().index;
    // Where each node's first CPU is.
    let mut first_cpu = [u32::MAX; 64];
    for cpu_index in 0..cpus {
        if move_to_cpu(cpu_index).is_ok() {
            let node = cpu().node as usize;
            if node < 64 && first_cpu[node] == u32::MAX {
                first_cpu[node] = cpu_index;
            }
        }
    }
    let mut realms: [Option<Realm<Page>>; 64] = [const { None }; 64];
    for node in (0..nodes.min(64)).filter(|&n| with_memory & 1 << n != 0) {
        realms[node as usize] = page_on(node).ok();
    }
    println!("numa: matrix: TSC cycles per read, median of {accesses}, rows from, columns to");
    for from in 0..nodes.min(64) {
        let target = first_cpu[from as usize];
        if target == u32::MAX || move_to_cpu(target).is_err() {
            continue;
        }
        let mut row = [0u64; 64];
        for (to, realm) in realms.iter().enumerate().take(nodes as usize) {
            let Some(realm) = realm else { continue };
            row[to] = median_read_cycles(realm, accesses);
        }
        let cells = &row[..nodes as usize];
        print_row(from, cells);
    }
    let _ = move_to_cpu(home);
    for realm in realms.into_iter().flatten() {
        let _ = realm.destroy();
    }
    0
}

/// Median TSC cycles of one read of `realm` (the first read, which opens it, not counted).
fn median_read_cycles(realm: &Realm<Page>, accesses: u64) -> u64 {
    const MAX: usize = 256;
    let mut samples = [0u64; MAX];
    let n = (accesses as usize).clamp(1, MAX);
    read(realm, 0);
    for sample in samples.iter_mut().take(n) {
        let start = tsc();
        read(realm, 0);
        *sample = tsc() - start;
    }
    let samples = &mut samples[..n];
    samples.sort_unstable();
    samples[n / 2]
}

fn print_row(from: u32, cells: &[u64]) {
    use core::fmt::Write as _;
    // One line, one kernel entry: the console buffers until the newline.
    let mut console = realm_sdk::console::Console::new();
    let _ = write!(console, "numa: row {from}:");
    for cell in cells {
        let _ = write!(console, " {cell}");
    }
    let _ = writeln!(console);
}

//! Exercises realms, keys and access lists; the first argument picks the scenario and the
//! program index picks the role. Every check's outcome is printed, and the exit code says
//! which check failed (0: all passed). Used by the guest tests in tests/tests/realms.rs.
//!
//! * `share KEY`: program 0 creates a realm, lets KEY use it, and publishes it; the others
//!   hold KEY, find the realm, check its data and a pointer stored in it, and add to a counter.
//! * `rights`: every right allowed and refused, as values.
//! * `touch-refused`: touches a realm it has no right to (the kernel terminates it).
//! * `write-read-only`: reads a realm it may only read, then writes it (terminated).
//! * `revoke`: opens a realm, has its right taken away, is refused on re-opening, then touches
//!   it (terminated: the revocation reached the open view).
//! * `destroy`: destruction, reuse of the freed range, and the ownership hierarchy.
//! * `exhaust`: creates realms until its share of memory and of the realm table runs out, then
//!   recovers.
//! * `forge`: guessed keys, kernel pointers and wild pointers in system calls.
//! * `bad-context-block`: points the kernel at a context block in kernel memory, then touches a
//!   realm (terminated: the kernel cannot read its keys).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use realm_sdk::keys;
use realm_sdk::realm::{self, generate_key, parse_key, Home, Key, Realm, Rights};
use realm_sdk::sys::{raw_syscall, SysError, Syscall};
use realm_sdk::{cpu, println, Program};

realm_sdk::entry!(main);

use realm_sdk::abi::upcall as psyche_abi_upcall;

/// The shared realm of `share`.
struct Shared {
    /// Sum of what the users added.
    counter: AtomicU64,
    /// Users done.
    done: AtomicU64,
    data: [u64; 64],
    /// Points at `data` inside the realm: valid in every domain, since the address space is
    /// uniform.
    pointer: *const u64,
}

// SAFETY: `data` and `pointer` are written once, before the realm is published; the rest is
// atomic.
unsafe impl Sync for Shared {}

fn main(program: Program) -> u32 {
    let scenario = program.args.get(0).unwrap_or("");
    let code = match scenario {
        "share" => share(&program),
        "rights" => rights(),
        "touch-refused" => touch_refused(),
        "write-read-only" => write_read_only(),
        "revoke" => revoke(),
        "destroy" => destroy(),
        "exhaust" => exhaust(),
        "forge" => forge(),
        "bad-context-block" => bad_context_block(),
        _ => {
            println!("realms: unknown scenario '{scenario}'");
            return 2;
        }
    };
    println!("realms: {scenario}: {}", if code == 0 { "passed" } else { "FAILED" });
    code
}

/// Fails with `code` unless `ok`, saying what was checked.
/// A numbered check of this program (see [`realm_sdk::check`]).
macro_rules! check {
    ($code:expr, $ok:expr, $($what:tt)*) => {
        realm_sdk::check!("realms", $code, $ok, $($what)*)
    };
}

fn share(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(parse_key) else {
        println!("realms: share needs a key (32 hex digits)");
        return 2;
    };
    let users = program.args.get(2).and_then(|n| n.parse::<u64>().ok()).unwrap_or(1);
    let here = cpu();
    if program.index == 0 {
        let mut data = [0u64; 64];
        for (i, word) in data.iter_mut().enumerate() {
            *word = i as u64 * 3 + 1;
        }
        let shared = Shared { counter: AtomicU64::new(0), done: AtomicU64::new(0), data, pointer: core::ptr::null() };
        let realm = match Realm::create(shared).home(Home::Node(here.node)).grant(key, Rights::INVOKE_OPTIMIZED).build()
        {
            Ok(realm) => realm,
            Err(error) => {
                println!("realms: create failed: {error:?}");
                return 3;
            }
        };
        // SAFETY: nobody else can see the realm before it is published.
        unsafe { (*realm.as_ptr()).pointer = (*realm.as_ptr()).data.as_ptr() };
        println!("realms: owner made realm {} at {:#x} on node {}", realm.id(), realm.as_ptr() as u64, here.node);
        check!(4, realm.publish("share").is_ok(), "publish");
        // Wait for every user.
        let mut spins = 0u64;
        while realm.get().done.load(Ordering::Acquire) < users {
            spins += 1;
            if spins > 4_000_000_000 {
                println!("realms: the users never finished");
                return 5;
            }
            core::hint::spin_loop();
        }
        let total = realm.get().counter.load(Ordering::Acquire);
        println!("realms: owner saw counter {total}");
        check!(6, total == users * 1000, "counter is {total}, expected {}", users * 1000);
        0
    } else {
        check!(10, keys::add(key).is_ok(), "add the shared key");
        let id = match realm::wait_for("share", 100_000_000) {
            Ok(id) => id,
            Err(error) => {
                println!("realms: lookup failed: {error:?}");
                return 11;
            }
        };
        // SAFETY: program 0 made this realm holding a `Shared`.
        let realm: Realm<Shared> = unsafe { Realm::attach(id) };
        // The first touch: a fault, the kernel opens the realm into this view.
        let shared = realm.get();
        let pointer = shared.pointer;
        println!(
            "realms: user {} on cpu {} node {} sees realm {} at {:#x}, pointer {:#x}",
            program.index,
            here.index,
            here.node,
            id,
            realm.as_ptr() as u64,
            pointer as u64
        );
        check!(12, pointer == shared.data.as_ptr(), "the stored pointer points into the realm here too");
        // SAFETY: the pointer is inside the realm, which is open in this view now.
        let through_pointer: u64 = (0..64).map(|i| unsafe { *pointer.add(i) }).sum();
        let expected: u64 = (0..64u64).map(|i| i * 3 + 1).sum();
        check!(13, through_pointer == expected, "data read through the pointer: {through_pointer}");
        for _ in 0..1000 {
            realm.invoke(|s| s.counter.fetch_add(1, Ordering::AcqRel));
        }
        realm.get().done.fetch_add(1, Ordering::AcqRel);
        0
    }
}

fn rights() -> u32 {
    let keys: [Key; 6] = core::array::from_fn(|_| generate_key().unwrap_or_default());
    let [read_only, read_write, protected, destroyer, initializer, stranger] = keys;
    let realm = Realm::create(AtomicU64::new(7))
        .grant(read_only, Rights::INVOKE_OPTIMIZED_READ_ONLY)
        .grant(read_write, Rights::INVOKE_OPTIMIZED)
        .grant(protected, Rights::INVOKE_PROTECTED)
        .grant(destroyer, Rights::DESTROY)
        .grant(initializer, Rights::INITIALIZE)
        .build();
    let Ok(realm) = realm else { return 3 };
    check!(4, realm.open_with(&read_only, true).is_ok(), "read-only key opens read-only");
    check!(5, realm.open_with(&read_only, false) == Err(SysError::NoRight), "read-only key cannot open read-write");
    check!(6, realm.open_with(&read_write, false).is_ok(), "read-write key opens read-write");
    check!(7, realm.open_with(&read_write, true).is_ok(), "read-write key opens read-only");
    check!(
        8,
        realm.open_with(&protected, true) == Err(SysError::NoRight),
        "protected-only key gets no optimized access"
    );
    check!(9, realm.open_with(&stranger, true) == Err(SysError::NoRight), "a key not on the list gets nothing");
    // Without our own key in the list, what is left are keys we choose to hold.
    let own = keys::own_key().unwrap_or_default();
    let Ok(victim) =
        Realm::create(0u64).grant(destroyer, Rights::DESTROY).grant(initializer, Rights::INITIALIZE).build()
    else {
        return 12;
    };
    keys::remove(&own);
    check!(13, realm::destroy(victim.id()) == Err(SysError::NoRight), "destroy without the destroy right is refused");
    check!(
        14,
        victim.set_rights(&stranger, Rights::ALL) == Err(SysError::NoRight),
        "access-list edit without initialize is refused"
    );
    check!(15, keys::add(initializer).is_ok(), "hold the initialize key");
    check!(
        16,
        victim.set_rights(&stranger, Rights::INVOKE_OPTIMIZED_READ_ONLY).is_ok(),
        "initialize right edits the access list"
    );
    check!(17, victim.open_with(&stranger, true).is_ok(), "the new entry works at once");
    check!(
        18,
        victim.set_rights(&stranger, Rights(1 << 9)) == Err(SysError::InvalidArgument),
        "unknown rights are refused"
    );
    check!(19, keys::add(destroyer).is_ok(), "hold the destroy key");
    check!(20, realm::destroy(victim.id()).is_ok(), "destroy right destroys");
    check!(21, victim.open_with(&stranger, true) == Err(SysError::NotFound), "a destroyed realm is gone");
    check!(22, realm.get().load(Ordering::Relaxed) == 7, "in-line read of an open realm");
    0
}

fn touch_refused() -> u32 {
    let Ok(realm) = Realm::create(AtomicU64::new(1)).build() else { return 3 };
    let own = keys::own_key().unwrap_or_default();
    // Keep only the rights to manage it: that closes it in this view, and the next touch is
    // checked against a list that gives our keys no access.
    check!(4, realm.set_rights(&own, Rights::INITIALIZE | Rights::DESTROY).is_ok(), "drop our access rights");
    check!(5, realm.open(true) == Err(SysError::NoRight), "asking first gets an error, not termination");
    println!("realms: touching realm {} without a right", realm.id());
    let value = realm.get().load(Ordering::Relaxed);
    println!("realms: read {value}: the kernel should have stopped this domain");
    9
}

fn write_read_only() -> u32 {
    let Ok(reader) = generate_key() else { return 3 };
    let Ok(realm) = Realm::create(AtomicU64::new(41)).grant(reader, Rights::INVOKE_OPTIMIZED_READ_ONLY).build() else {
        return 4;
    };
    // Recreate the situation of a reader: a fresh realm never opened here, read-only key only.
    let Ok(fresh) = Realm::create(AtomicU64::new(42)).grant(reader, Rights::INVOKE_OPTIMIZED_READ_ONLY).build() else {
        return 5;
    };
    let own = keys::own_key().unwrap_or_default();
    // Close `fresh` here: taking our own rights away closes it in this view.
    check!(6, fresh.set_rights(&own, Rights::INITIALIZE | Rights::DESTROY).is_ok(), "drop our optimized rights");
    check!(7, keys::add(reader).is_ok(), "hold the read-only key");
    let _ = realm;
    let value = fresh.get().load(Ordering::Relaxed);
    check!(8, value == 42, "read through a read-only open: {value}");
    println!("realms: writing realm {} through a read-only open", fresh.id());
    fresh.get().store(43, Ordering::Relaxed);
    println!("realms: the write went through: the kernel should have stopped this domain");
    9
}

fn revoke() -> u32 {
    let Ok(user) = generate_key() else { return 3 };
    let Ok(realm) = Realm::create(AtomicU64::new(5)).grant(user, Rights::INVOKE_OPTIMIZED).build() else { return 4 };
    let own = keys::own_key().unwrap_or_default();
    // Use it through `user` only.
    check!(5, realm.set_rights(&own, Rights::INITIALIZE).is_ok(), "keep only initialize for ourselves");
    check!(6, keys::add(user).is_ok(), "hold the user key");
    check!(7, realm.get().load(Ordering::Relaxed) == 5, "opened through the user key");
    // Adding rights leaves the open view alone.
    check!(8, realm.set_rights(&user, Rights::INVOKE_OPTIMIZED | Rights::DESTROY).is_ok(), "grant more");
    check!(9, realm.get().load(Ordering::Relaxed) == 5, "still open after a grant");
    // Taking them away closes it here: the next touch is checked against the new list.
    check!(10, realm.set_rights(&user, Rights::NONE).is_ok(), "revoke the user key");
    check!(11, realm.open(true) == Err(SysError::NoRight), "re-opening is refused");
    println!("realms: touching realm {} after revocation", realm.id());
    let value = realm.get().load(Ordering::Relaxed);
    println!("realms: read {value} after revocation: the kernel should have stopped this domain");
    12
}

fn destroy() -> u32 {
    let Ok(first) = Realm::create(AtomicU64::new(1)).build() else { return 3 };
    let first_id = first.id();
    let first_address = first.as_ptr() as u64;
    check!(4, first.destroy().is_ok(), "destroy");
    let Ok(second) = Realm::create(AtomicU64::new(2)).build() else { return 5 };
    println!(
        "realms: realm {first_id} at {first_address:#x} destroyed; the next is realm {} at {:#x}",
        second.id(),
        second.as_ptr() as u64
    );
    check!(6, second.as_ptr() as u64 == first_address, "the freed range is reused");
    check!(7, second.get().load(Ordering::Relaxed) == 2, "the reused range holds the new realm's data");
    // Ownership: a parent owns a child, which owns a grandchild.
    let Ok(parent) = Realm::create(AtomicU64::new(10)).build() else { return 8 };
    let Ok(child) = Realm::create(AtomicU64::new(11)).owner(&parent).build() else { return 9 };
    let Ok(grandchild) = Realm::create(AtomicU64::new(12)).owner(&child).build() else { return 10 };
    check!(11, grandchild.get().load(Ordering::Relaxed) == 12, "grandchild is usable");
    check!(12, parent.destroy().is_ok(), "destroy the parent");
    check!(13, child.open(true) == Err(SysError::NotFound), "the child went with it");
    check!(14, grandchild.open(true) == Err(SysError::NotFound), "and the grandchild");
    check!(15, second.get().load(Ordering::Relaxed) == 2, "an unrelated realm is untouched");
    // A root realm (program 0's) goes only with its program, whatever the keys.
    check!(16, realm::destroy(0) == Err(SysError::Busy), "root realms are busy: they go with their programs");
    0
}

fn exhaust() -> u32 {
    // Big realms until the home node runs out of memory.
    let mut big = [0u32; 64];
    let mut made = 0;
    let error = loop {
        match Realm::create(0u64).extra_pages(1023).build() {
            Ok(realm) if made < big.len() => {
                big[made] = realm.id();
                made += 1;
            }
            Ok(_) => break SysError::InvalidArgument,
            Err(error) => break error,
        }
    };
    println!("realms: {made} realms of 4 MiB, then {error:?}");
    // Its share of the node ends it (OverQuota), or the node itself when the share is all of it.
    check!(3, error == SysError::OverQuota || error == SysError::OutOfMemory, "memory runs out cleanly");
    for &id in &big[..made] {
        if realm::destroy(id).is_err() {
            return 4;
        }
    }
    // Small realms until the realm table is full.
    let mut small = 0u32;
    let error = loop {
        match Realm::create(0u64).build() {
            Ok(_) => small += 1,
            Err(error) => break error,
        }
    };
    println!("realms: {small} realms of one page, then {error:?}");
    check!(
        5,
        matches!(error, SysError::OverQuota | SysError::TableFull | SysError::OutOfMemory),
        "the table fills cleanly"
    );
    // Everything comes back: destroy them all (by id) and make a big one again.
    for id in 16..512 {
        let _ = realm::destroy(id);
    }
    check!(6, Realm::create(0u64).extra_pages(1023).build().is_ok(), "memory is reclaimed");
    0
}

fn forge() -> u32 {
    let Ok(realm) = Realm::create(AtomicU64::new(3)).build() else { return 3 };
    let mut refused = 0;
    for _ in 0..1000 {
        let guess = generate_key().unwrap_or_default();
        if realm.open_with(&guess, true) == Err(SysError::NoRight) {
            refused += 1;
        }
    }
    check!(4, refused == 1000, "1000 guessed keys refused ({refused})");
    let kernel = 0xFFFF_FFFF_8010_0000u64;
    let create = raw_syscall(Syscall::RealmCreate as u64, kernel, 0, 0);
    check!(5, SysError::from_return(create) == Some(SysError::BadAddress), "a kernel pointer as realm spec: {create}");
    let open = raw_syscall(Syscall::RealmOpen as u64, u64::from(realm.id()), kernel, 0);
    check!(6, SysError::from_return(open) == Some(SysError::BadAddress), "a kernel pointer as key: {open}");
    let wild = raw_syscall(Syscall::RealmOpen as u64, u64::from(realm.id()), 0x1234_5678_9abc, 0);
    check!(7, SysError::from_return(wild) == Some(SysError::BadAddress), "a wild pointer as key: {wild}");
    let random = raw_syscall(Syscall::Random as u64, kernel, 16, 0);
    check!(8, SysError::from_return(random) == Some(SysError::BadAddress), "random bytes into the kernel: {random}");
    let code = raw_syscall(Syscall::Random as u64, main as *const () as u64, 16, 0);
    check!(9, SysError::from_return(code) == Some(SysError::BadAddress), "random bytes over our own code: {code}");
    let id = raw_syscall(Syscall::RealmDestroy as u64, 1 << 40, 0, 0);
    check!(10, SysError::from_return(id) == Some(SysError::NotFound), "a realm id out of range: {id}");
    check!(11, realm.get().load(Ordering::Relaxed) == 3, "our own realm is fine");
    0
}

fn bad_context_block() -> u32 {
    let Ok(realm) = Realm::create(AtomicU64::new(1)).build() else { return 3 };
    let Ok(other) = Realm::create(AtomicU64::new(2)).build() else { return 4 };
    let own = keys::own_key().unwrap_or_default();
    // Close `other` here so that touching it needs the keys.
    check!(
        5,
        other.set_rights(&own, Rights::INITIALIZE | Rights::DESTROY | Rights::INVOKE_OPTIMIZED).is_ok(),
        "keep our rights"
    );
    let _ = realm;
    check!(
        6,
        keys::set_processor_block_raw(0xFFFF_FFFF_8010_0000) == Err(SysError::BadAddress),
        "a processor block in kernel memory is refused"
    );
    // A processor block of our own whose current thread's context block is kernel memory.
    static BLOCK: psyche_abi_upcall::ProcessorBlock = psyche_abi_upcall::ProcessorBlock {
        current: 0xFFFF_FFFF_8010_0000,
        upcall_handler: 0,
        quantum_us: 0,
        critical: 0,
    };
    check!(7, keys::set_processor_block_raw(&BLOCK as *const _ as u64).is_ok(), "point the kernel at kernel memory");
    println!("realms: touching realm {} with a context block in kernel memory", other.id());
    let _ = other.get().load(Ordering::Relaxed);
    println!("realms: the touch went through: the kernel should have stopped this domain");
    9
}

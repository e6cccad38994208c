//! A hostile program against the name table and the shares of the machine, and the victims it
//! runs beside. Every program of the boot gets the same arguments; program 0 is the victim,
//! every other program a squatter. Each side prints its checks and exits with the number of
//! the first that failed (0: all passed). Used by tests/tests/hostile/{names,quotas}.rs.
//!
//! * `names VICTIM SQUATTER`: the squatter tries to take the victim's name over, to publish
//!   the victim's realms under names of its own, and to fill the name table; it sees each
//!   refusal (NameTaken, NoRight, NotFound, OverQuota after its share of SQUATTER names). The
//!   victim, while the squatter holds its whole share, finds its name still its own, publishes
//!   its own whole share (VICTIM names), and once the squatter has ended finds the squatter's
//!   names gone and its own realm intact.
//! * `realms VICTIM SQUATTER`: the squatter creates realms until its share (SQUATTER realms)
//!   runs out (OverQuota), gives some back and takes them again; the victim then creates its
//!   whole share (VICTIM realms) and checks a secret in each.
//! * `memory`: the squatter fills its share of every node's memory with realms of shrinking
//!   sizes until each is refused (OverQuota); the victim then makes an 8 MiB realm on every
//!   node and checks its contents.
//! * `after-end SIZE` (bytes, or with an M suffix): as `memory`, but the victim's share is all of node 0 (`quota=0:...`):
//!   while the squatter holds its share, a realm of BYTES on node 0 is refused for want of
//!   memory (OutOfMemory, not OverQuota); once the squatter has ended its frames are back and
//!   the same realm is made.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use realm_sdk::realm::{self, Home, Published, Realm};
use realm_sdk::sys::SysError;
use realm_sdk::{machine, println, Program};

realm_sdk::entry!(main);

/// Lookups a wait may take (each is a kernel call of a few hundred emulated instructions).
const PATIENCE: u64 = 20_000_000;

/// The victim's secret, kept in its realms.
const SECRET: u64 = 0x5ec2_e7c0_ffee_0042;

fn main(program: Program) -> u32 {
    let scenario = program.args.get(0).unwrap_or("");
    let victim = program.index == 0;
    let role = if victim { "victim" } else { "squatter" };
    // A count, or a size in bytes with an optional M suffix.
    let number = |n: usize| {
        let arg = program.args.get(n)?;
        match arg.strip_suffix('M') {
            Some(megabytes) => megabytes.parse::<u64>().ok()?.checked_mul(1 << 20),
            None => arg.parse::<u64>().ok(),
        }
    };
    let code = match (scenario, victim) {
        ("names", true) => victim_names(number(1).unwrap_or(0)),
        ("names", false) => squatter_names(&program, number(2).unwrap_or(0)),
        ("realms", true) => victim_realms(number(1).unwrap_or(0)),
        ("realms", false) => squatter_realms(&program, number(2).unwrap_or(0)),
        ("memory", true) => victim_memory(),
        ("memory" | "after-end", false) => squatter_memory(&program),
        ("after-end", true) => victim_after_end(number(1).unwrap_or(0)),
        _ => {
            println!("squatter: unknown scenario '{scenario}'");
            return 2;
        }
    };
    println!("{role}: {scenario}: {}", if code == 0 { "passed" } else { "FAILED" });
    code
}

/// A numbered check of the victim.
macro_rules! victim_check {
    ($code:expr, $ok:expr, $($what:tt)*) => {
        realm_sdk::check!("victim", $code, $ok, $($what)*)
    };
}

/// A numbered check of the squatter: what it saw of its own attempts.
macro_rules! squatter_check {
    ($code:expr, $ok:expr, $($what:tt)*) => {
        realm_sdk::check!("squatter", $code, $ok, $($what)*)
    };
}

/// Waits until `name` is published by a program `accept`s the binding of.
fn wait_until(name: &str, mut accept: impl FnMut(Result<Published, SysError>) -> bool) -> bool {
    (0..PATIENCE).any(|_| {
        let done = accept(realm::lookup_published(name));
        if !done {
            core::hint::spin_loop();
        }
        done
    })
}

/// A realm of `pages` pages on `home`, not touched (so not opened here).
fn blank_realm(pages: u64, home: Home) -> Result<Realm<AtomicU64>, SysError> {
    // SAFETY: an all-zero AtomicU64 is a valid AtomicU64.
    unsafe { Realm::create(AtomicU64::new(0)).extra_pages(pages - 1).home(home).build_zeroed() }
}

/// This program's root realm (published, never touched through this handle).
fn root_realm(program: &Program) -> Realm<u8> {
    // SAFETY: the handle is only published, never dereferenced.
    unsafe { Realm::attach(program.index as u32) }
}

fn victim_names(share: u64) -> u32 {
    let Ok(vault) = Realm::create(AtomicU64::new(SECRET)).build() else { return 3 };
    victim_check!(4, vault.publish("vault").is_ok(), "publish the vault");
    let mut squatter = None;
    victim_check!(
        5,
        wait_until("squatter-here", |found| {
            squatter = found.ok();
            found.is_ok()
        }),
        "the squatter shows up"
    );
    let Some(squatter) = squatter else { return 5 };
    victim_check!(
        6,
        squatter.publisher != 0,
        "the lookup says who published the squatter's name: program {}",
        squatter.publisher
    );
    // The squatter signals that it holds its whole share by binding its name to its root realm.
    victim_check!(
        7,
        wait_until("squatter-here", |found| found.is_ok_and(|p| p.realm == p.publisher)),
        "the squatter holds its whole share of the names"
    );
    victim_check!(
        8,
        realm::lookup_from("vault", 0) == Ok(vault.id()),
        "the vault's name still names the vault, published by this program"
    );
    // Its own whole share is there: the vault's name, SHARE - 2 more, and the signal.
    let mut published = 1;
    for i in 0..share.saturating_sub(2) {
        let name = NameBuf::new("victim-", i);
        if let Err(error) = vault.publish(name.as_str()) {
            println!("victim: publishing name {} of {share} failed: {error:?}", published + 1);
            break;
        }
        published += 1;
    }
    victim_check!(9, published + 1 == share, "{published} names published beside the squatter's");
    victim_check!(10, vault.publish("victim-saw").is_ok(), "the last name of the share");
    let over = vault.publish("one-too-many");
    victim_check!(11, over == Err(SysError::OverQuota), "a name beyond the share: {over:?}");
    victim_check!(12, wait_until("squatter-here", |found| found == Err(SysError::NotFound)), "the squatter ends");
    victim_check!(13, realm::lookup("squatter-0") == Err(SysError::NotFound), "the ended squatter's names are gone");
    victim_check!(14, realm::lookup_from("vault", 0) == Ok(vault.id()), "the vault is still published by this program");
    let secret = vault.get().load(Ordering::Relaxed);
    victim_check!(15, secret == SECRET, "the secret is intact: {secret:#x}");
    0
}

fn squatter_names(program: &Program, share: u64) -> u32 {
    let (Ok(first), Ok(second)) = (blank_realm(1, Home::Creator), blank_realm(1, Home::Creator)) else { return 3 };
    squatter_check!(4, first.publish("squatter-here").is_ok(), "publish a name of its own");
    let Ok(vault) = realm::wait_for_published("vault", PATIENCE) else { return 5 };
    println!("squatter: the victim's vault is realm {}, published by program {}", vault.realm, vault.publisher);
    let taken = first.publish("vault");
    squatter_check!(6, taken == Err(SysError::NameTaken), "take over the victim's name: {taken:?}");
    squatter_check!(7, realm::lookup("vault") == Ok(vault.realm), "the victim's name still names the vault");
    // SAFETY: only published, never touched.
    let victims_vault: Realm<u8> = unsafe { Realm::attach(vault.realm) };
    let stolen = victims_vault.publish("stolen");
    squatter_check!(
        8,
        stolen == Err(SysError::NoRight),
        "publish the victim's realm under a name of its own: {stolen:?}"
    );
    // SAFETY: as above.
    let victims_root: Realm<u8> = unsafe { Realm::attach(0) };
    let root = victims_root.publish("stolen-root");
    squatter_check!(9, root == Err(SysError::NoRight), "publish the victim's root realm: {root:?}");
    // SAFETY: as above; no realm has this id.
    let nothing: Realm<u8> = unsafe { Realm::attach(400) };
    let missing = nothing.publish("nothing");
    squatter_check!(10, missing == Err(SysError::NotFound), "publish a realm that does not exist: {missing:?}");
    squatter_check!(11, realm::lookup("stolen") == Err(SysError::NotFound), "no refused name was published");
    // A name goes with its realm.
    let Ok(doomed) = blank_realm(1, Home::Creator) else { return 12 };
    squatter_check!(13, doomed.publish("doomed").is_ok(), "publish a realm it will destroy");
    squatter_check!(14, doomed.destroy().is_ok(), "destroy it");
    squatter_check!(15, realm::lookup("doomed") == Err(SysError::NotFound), "its name went with it");
    // A name of its own can be bound again, by it.
    squatter_check!(16, second.publish("squatter-here").is_ok(), "bind its own name to another of its realms");
    squatter_check!(17, realm::lookup("squatter-here") == Ok(second.id()), "the name follows");
    // Fill the table: its share ends it, not the table.
    let mut filled = 0;
    let error = loop {
        let name = NameBuf::new("squatter-", filled);
        match first.publish(name.as_str()) {
            Ok(()) => filled += 1,
            Err(error) => break error,
        }
        if filled > 1000 {
            break SysError::InvalidArgument;
        }
    };
    println!("squatter: published {filled} more names, then {error:?}");
    squatter_check!(18, error == SysError::OverQuota, "the table is refused by its share: {error:?}");
    squatter_check!(19, filled + 1 == share, "its share is {share} names: it holds {}", filled + 1);
    // The signal: its name bound to its root realm (a binding again, not a new entry).
    squatter_check!(20, root_realm(program).publish("squatter-here").is_ok(), "bind its name to its root realm");
    squatter_check!(21, realm::wait_for("victim-saw", PATIENCE).is_ok(), "the victim saw it");
    0
}

fn victim_realms(share: u64) -> u32 {
    victim_check!(
        3,
        realm::wait_for("squatter-full", PATIENCE).is_ok(),
        "the squatter holds its whole share of realms"
    );
    // Its own whole share, each realm with the secret in it.
    let mut made = [0u32; 512];
    let mut count = 0;
    let error = loop {
        match Realm::create(AtomicU64::new(SECRET ^ count as u64)).build() {
            Ok(realm) if count < made.len() => {
                made[count] = realm.id();
                count += 1;
            }
            Ok(_) => break SysError::InvalidArgument,
            Err(error) => break error,
        }
    };
    println!("victim: made {count} realms beside the squatter's, then {error:?}");
    victim_check!(4, count as u64 == share, "its share is {share} realms");
    victim_check!(5, error == SysError::OverQuota, "its own share ends it: {error:?}");
    let intact = made[..count].iter().enumerate().all(|(i, &id)| {
        // SAFETY: made above, holding an AtomicU64.
        let realm: Realm<AtomicU64> = unsafe { Realm::attach(id) };
        realm.get().load(Ordering::Relaxed) == SECRET ^ i as u64
    });
    victim_check!(6, intact, "every realm holds its secret");
    for &id in &made[..count] {
        if realm::destroy(id).is_err() {
            return 7;
        }
    }
    victim_check!(8, Realm::create(AtomicU64::new(SECRET)).build().is_ok(), "destroyed realms give the share back");
    victim_check!(9, root_publish("victim-done").is_ok(), "say so");
    victim_check!(10, squatter_ended(), "the squatter ends");
    0
}

/// Waits for the squatter to end (its names go with it): the victim's own names, which the
/// squatter waits for, must outlive its wait.
fn squatter_ended() -> bool {
    wait_until("squatter-full", |found| found == Err(SysError::NotFound))
}

fn squatter_realms(program: &Program, share: u64) -> u32 {
    let mut made = [0u32; 512];
    let mut count = 0;
    let error = loop {
        match blank_realm(1, Home::Creator) {
            Ok(realm) if count < made.len() => {
                made[count] = realm.id();
                count += 1;
            }
            Ok(_) => break SysError::InvalidArgument,
            Err(error) => break error,
        }
    };
    println!("squatter: made {count} realms, then {error:?}");
    squatter_check!(3, error == SysError::OverQuota, "its share ends it, not the table: {error:?}");
    squatter_check!(4, count as u64 == share, "its share is {share} realms");
    // Destroying gives the share back; taking it again ends at the same place.
    let give_back = count.min(10);
    for &id in &made[count - give_back..count] {
        if realm::destroy(id).is_err() {
            return 5;
        }
    }
    let again = (0..give_back).filter(|_| blank_realm(1, Home::Creator).is_ok()).count();
    squatter_check!(6, again == give_back, "{again} of the {give_back} realms given back made again");
    let over = blank_realm(1, Home::Creator).err();
    squatter_check!(7, over == Some(SysError::OverQuota), "and then the share is used up again: {over:?}");
    squatter_check!(8, root_realm(program).publish("squatter-full").is_ok(), "say so");
    squatter_check!(9, realm::wait_for("victim-done", PATIENCE).is_ok(), "wait for the victim");
    0
}

/// Publishes this program's root realm under `name` (a signal for the other side).
fn root_publish(name: &str) -> Result<(), SysError> {
    // SAFETY: only published, never touched.
    let root: Realm<u8> = unsafe { Realm::attach(realm_sdk::program_index() as u32) };
    root.publish(name)
}

/// Data pages of the realms the squatter fills memory with, largest first.
const SIZES: [u64; 6] = [1024, 256, 64, 16, 4, 1];

fn squatter_memory(program: &Program) -> u32 {
    // The victim's own start (its stack and view on its node) comes first, so that the frames
    // the squatter takes and gives back there are one run (`after-end` needs them contiguous).
    squatter_check!(6, realm::wait_for("victim-ready", PATIENCE).is_ok(), "the victim has started");
    let nodes = machine().nodes;
    for node in 0..nodes {
        let mut pages = 0;
        for &size in &SIZES {
            let error = loop {
                match blank_realm(size, Home::Node(node)) {
                    Ok(_) => pages += size,
                    Err(error) => break error,
                }
            };
            squatter_check!(
                3,
                error == SysError::OverQuota,
                "node {node}: realms of {size} pages end with its share: {error:?}"
            );
        }
        println!("squatter: node {node}: {} KiB of realm data, then OverQuota", pages * 4);
    }
    squatter_check!(4, root_realm(program).publish("squatter-full").is_ok(), "say so");
    squatter_check!(5, realm::wait_for("victim-done", PATIENCE).is_ok(), "wait for the victim");
    0
}

/// An 8 MiB realm on every node, its pages written and read back.
fn victim_memory() -> u32 {
    victim_check!(9, root_publish("victim-ready").is_ok(), "say it has started");
    victim_check!(
        3,
        realm::wait_for("squatter-full", PATIENCE).is_ok(),
        "the squatter holds its whole share of memory"
    );
    for node in 0..machine().nodes {
        let realm = blank_realm(2048, Home::Node(node));
        victim_check!(4, realm.is_ok(), "node {node}: an 8 MiB realm beside the squatter's: {:?}", realm.err());
        let Ok(realm) = realm else { return 4 };
        victim_check!(5, fill_and_check(&realm, 2048, node), "node {node}: every page holds what was written");
    }
    victim_check!(6, root_publish("victim-done").is_ok(), "say so");
    victim_check!(7, squatter_ended(), "the squatter ends");
    0
}

fn victim_after_end(bytes: u64) -> u32 {
    let pages = bytes / 4096;
    victim_check!(9, root_publish("victim-ready").is_ok(), "say it has started");
    victim_check!(
        3,
        realm::wait_for("squatter-full", PATIENCE).is_ok(),
        "the squatter holds its whole share of memory"
    );
    let early = blank_realm(pages, Home::Node(0)).err();
    victim_check!(
        4,
        early == Some(SysError::OutOfMemory),
        "{} KiB on node 0 while the squatter holds its share: {early:?}",
        bytes / 1024
    );
    victim_check!(5, root_publish("victim-done").is_ok(), "say so");
    victim_check!(6, squatter_ended(), "the squatter ends (its names go)");
    let realm = blank_realm(pages, Home::Node(0));
    victim_check!(
        7,
        realm.is_ok(),
        "{} KiB on node 0 once the squatter's frames are back: {:?}",
        bytes / 1024,
        realm.err()
    );
    let Ok(realm) = realm else { return 7 };
    victim_check!(8, fill_and_check(&realm, pages, 0), "every page holds what was written");
    0
}

/// Writes a word into every page of `realm` (`pages` pages), then reads them all back.
fn fill_and_check(realm: &Realm<AtomicU64>, pages: u64, node: u32) -> bool {
    let base = realm.as_ptr() as *mut u64;
    let word = |page: u64| SECRET ^ page ^ u64::from(node) << 48;
    for page in 0..pages {
        // SAFETY: the realm has `pages` pages, ours alone; the first touch opens it.
        unsafe { base.add((page * 512) as usize).write_volatile(word(page)) };
    }
    // SAFETY: as above.
    (0..pages).all(|page| unsafe { base.add((page * 512) as usize).read_volatile() } == word(page))
}

/// A name made of a prefix and a number, without an allocator.
struct NameBuf {
    bytes: [u8; 32],
    len: usize,
}

impl NameBuf {
    fn new(prefix: &str, n: u64) -> Self {
        let mut bytes = [0u8; 32];
        let len = prefix.len().min(12);
        bytes[..len].copy_from_slice(&prefix.as_bytes()[..len]);
        let mut digits = [0u8; 20];
        let mut count = 0;
        let mut rest = n;
        loop {
            digits[count] = b'0' + (rest % 10) as u8;
            count += 1;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        for (i, digit) in digits[..count].iter().rev().enumerate() {
            bytes[len + i] = *digit;
        }
        Self { bytes, len: len + count }
    }

    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

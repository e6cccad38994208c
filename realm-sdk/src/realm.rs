//! Realms: data (and the code that works on it) at a place in the uniform address space that
//! means the same in every protection domain, guarded by keys and access lists.
//!
//! ```ignore
//! use core::sync::atomic::{AtomicU64, Ordering};
//! use realm_sdk::realm::{Home, Key, Realm, Rights};
//!
//! struct Counter { value: AtomicU64 }
//!
//! let friend = realm_sdk::realm::generate_key()?;      // hand it out however you like
//! let counter = Realm::create(Counter { value: AtomicU64::new(0) })
//!     .home(Home::Node(1))
//!     .grant(friend, Rights::INVOKE_OPTIMIZED)
//!     .build()?;
//! // An optimized invocation: a procedure call on data mapped into this domain's view.
//! counter.invoke(|c| c.value.fetch_add(1, Ordering::Relaxed));
//! ```
//!
//! A domain that holds `friend` in its key list can use the same realm by id
//! ([`Realm::attach`]): its first touch faults, the kernel checks the key list against the access
//! list and maps the realm, and from then on every access is an ordinary memory access. Without
//! the right, the first touch terminates the domain; [`Realm::open`] asks first and returns an
//! error instead.

use core::mem::size_of;

use psyche_abi::realm::{realm_base, realm_of, OpenMode, RealmSpec, HOME_NODE_OF_CALLER, OWNER_CALLER_ROOT};
pub use psyche_abi::realm::{AclEntry, Key, Rights, MAX_ACL_ENTRIES};
use psyche_abi::syscall::Syscall;

use crate::keys;
use crate::sys::{raw_syscall, result, SysError};

/// Where a realm's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Home {
    /// The node of the CPU that creates it.
    Creator,
    /// This node.
    Node(u32),
}

/// Makes a new key from the host's random source.
pub fn generate_key() -> Result<Key, SysError> {
    let mut key = Key::default();
    let bytes = size_of::<Key>() as u64;
    let ptr = &mut key as *mut Key as u64;
    result(raw_syscall(Syscall::Random as u64, ptr, bytes, 0))?;
    Ok(key)
}

/// A realm holding a `T`, seen from this protection domain. The handle is the realm's address
/// (the same in every domain), so an invocation is a call with a pointer argument.
pub struct Realm<T> {
    base: *mut T,
}

// SAFETY: a realm handle is an id; the data it names is shared memory, which `T: Sync` makes
// safe to reach from several threads and domains at once.
unsafe impl<T: Sync> Sync for Realm<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Send for Realm<T> {}

impl<T> Clone for Realm<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Realm<T> {}

/// How a realm is to be made ([`Realm::create`]).
pub struct RealmBuilder<T> {
    value: T,
    home: Home,
    owner: Option<u32>,
    extra_pages: u64,
    acl: [AclEntry; MAX_ACL_ENTRIES],
    acl_len: usize,
}

impl<T: Sync> RealmBuilder<T> {
    /// Puts the realm's memory on a node.
    pub fn home(mut self, home: Home) -> Self {
        self.home = home;
        self
    }

    /// Makes `owner` the realm's owner (destroying the owner destroys this realm too). The
    /// default owner is this domain's root realm.
    pub fn owner<U>(mut self, owner: &Realm<U>) -> Self {
        self.owner = Some(owner.id());
        self
    }

    /// Reserves this many pages after the `T` (the realm's heap, for example).
    pub fn extra_pages(mut self, pages: u64) -> Self {
        self.extra_pages = pages;
        self
    }

    /// Gives `key` these rights in the access list. The creating domain's own key always gets
    /// every right.
    pub fn grant(mut self, key: Key, rights: Rights) -> Self {
        if self.acl_len < MAX_ACL_ENTRIES {
            self.acl[self.acl_len] = AclEntry { key, rights, reserved: 0 };
            self.acl_len += 1;
        }
        self
    }

    /// Creates the realm and moves the value into it.
    pub fn build(self) -> Result<Realm<T>, SysError> {
        let (realm, value) = self.create_untouched()?;
        // The first touch opens the realm into this view (our own key has every right).
        // SAFETY: the realm is new, at least `size_of::<T>()` bytes, and ours alone so far.
        unsafe { realm.as_ptr().write(value) };
        Ok(realm)
    }

    /// Creates the realm without touching it: its memory is all zero and it is not open in
    /// this view yet (the first touch will fault and open it). The value is dropped.
    ///
    /// # Safety
    /// An all-zero `T` must be a valid `T` (atomics, integers, arrays of them).
    pub unsafe fn build_zeroed(self) -> Result<Realm<T>, SysError> {
        self.create_untouched().map(|(realm, _)| realm)
    }

    fn create_untouched(self) -> Result<(Realm<T>, T), SysError> {
        let own_key = keys::own_key()?;
        let mut acl = self.acl;
        let mut acl_len = self.acl_len;
        if acl_len >= MAX_ACL_ENTRIES {
            return Err(SysError::TableFull);
        }
        acl[acl_len] = AclEntry { key: own_key, rights: Rights::ALL, reserved: 0 };
        acl_len += 1;
        let spec = RealmSpec {
            pages: (size_of::<T>() as u64).div_ceil(4096).max(1) + self.extra_pages,
            home_node: match self.home {
                Home::Creator => HOME_NODE_OF_CALLER,
                Home::Node(node) => node,
            },
            owner: self.owner.unwrap_or(OWNER_CALLER_ROOT),
            acl: acl.as_ptr() as u64,
            acl_len: acl_len as u64,
        };
        let id = result(raw_syscall(Syscall::RealmCreate as u64, &spec as *const RealmSpec as u64, 0, 0))? as u32;
        Ok((Realm { base: realm_base(id) as *mut T }, self.value))
    }
}

impl<T> Realm<T> {
    /// Its id.
    pub fn id(&self) -> u32 {
        realm_of(self.base as u64).unwrap_or(u32::MAX)
    }

    /// Where it starts: the same address in every domain.
    pub fn as_ptr(&self) -> *mut T {
        self.base
    }
}

impl<T: Sync> Realm<T> {
    /// Starts making a realm that will hold `value`.
    pub fn create(value: T) -> RealmBuilder<T> {
        RealmBuilder {
            value,
            home: Home::Creator,
            owner: None,
            extra_pages: 0,
            acl: [AclEntry::default(); MAX_ACL_ENTRIES],
            acl_len: 0,
        }
    }

    /// The realm with this id, made elsewhere (another domain published it, say). Nothing is
    /// checked until it is touched.
    ///
    /// # Safety
    /// The realm must hold a `T` (its creator's type).
    pub unsafe fn attach(id: u32) -> Self {
        Self { base: realm_base(id) as *mut T }
    }

    /// The data, for in-line access. The first touch opens the realm (or terminates this domain
    /// if its keys give no right: use [`Realm::open`] first to get an error instead).
    pub fn get(&self) -> &T {
        // SAFETY: the realm holds a `T` (creation or `attach`'s contract), shared as `Sync`.
        unsafe { &*self.as_ptr() }
    }

    /// An optimized invocation of one of the realm's operations: a procedure call on the data.
    #[inline]
    pub fn invoke<R>(&self, operation: impl FnOnce(&T) -> R) -> R {
        operation(self.get())
    }

    /// Opens the realm now, with the first key of this thread's list that allows `mode`;
    /// an error (not termination) if none does.
    pub fn open(&self, read_only: bool) -> Result<(), SysError> {
        let mut last = SysError::NoRight;
        for key in keys::list() {
            match self.open_with(&key, read_only) {
                Ok(()) => return Ok(()),
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    /// Opens the realm now, presenting `key` (which need not be in the key list).
    pub fn open_with(&self, key: &Key, read_only: bool) -> Result<(), SysError> {
        let mode = if read_only { OpenMode::ReadOnly } else { OpenMode::ReadWrite };
        result(raw_syscall(Syscall::RealmOpen as u64, u64::from(self.id()), key as *const Key as u64, mode as u64))
            .map(|_| ())
    }

    /// Sets `key`'s rights in the access list (needs the initialize right). Taking rights away
    /// closes the realm in every domain that has it open: their next touch is checked again.
    pub fn set_rights(&self, key: &Key, rights: Rights) -> Result<(), SysError> {
        result(raw_syscall(Syscall::AclSet as u64, u64::from(self.id()), key as *const Key as u64, u64::from(rights.0)))
            .map(|_| ())
    }

    /// Destroys the realm and everything it owns (needs the destroy right).
    pub fn destroy(self) -> Result<(), SysError> {
        destroy(self.id())
    }

    /// The node its frames are on now.
    pub fn home(&self) -> Result<u32, SysError> {
        result(raw_syscall(Syscall::RealmHome as u64, u64::from(self.id()), 0, 0)).map(|node| node as u32)
    }

    /// Moves it to node `node` (needs the initialize right): same addresses, new frames. Users
    /// wait while it moves.
    pub fn migrate(&self, node: u32) -> Result<(), SysError> {
        result(raw_syscall(Syscall::RealmMigrate as u64, u64::from(self.id()), u64::from(node), 0)).map(|_| ())
    }

    /// Latency traps it has taken since it was created or last moved: from CPUs of `node`, or
    /// from all nodes.
    pub fn traps(&self, node: Option<u32>) -> Result<u64, SysError> {
        let node = node.map_or(u64::MAX, u64::from);
        result(raw_syscall(Syscall::RealmTraps as u64, u64::from(self.id()), node, 0))
    }

    /// Publishes the realm under `name` for other programs of this boot. Needs the initialize
    /// right on it (every realm this program creates has it through its own key), unless it is
    /// this program's root realm. The name is this program's from then on: publishing it again
    /// binds it to another realm, and another program that tries gets
    /// [`SysError::NameTaken`]. Each program may hold its share of the names of the boot
    /// ([`SysError::OverQuota`] beyond it); a name goes away with its realm and with the
    /// program that published it.
    pub fn publish(&self, name: &str) -> Result<(), SysError> {
        result(raw_syscall(Syscall::NamePublish as u64, name_hash(name), u64::from(self.id()), 0)).map(|_| ())
    }
}

/// Destroys realm `id` and everything it owns (needs the destroy right).
pub fn destroy(id: u32) -> Result<(), SysError> {
    result(raw_syscall(Syscall::RealmDestroy as u64, u64::from(id), 0, 0)).map(|_| ())
}

/// What a name is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// The realm.
    pub realm: u32,
    /// The program (protection domain) that published the name.
    pub publisher: u32,
}

/// The realm published under `name`, and who published it.
pub fn lookup_published(name: &str) -> Result<Published, SysError> {
    result(raw_syscall(Syscall::NameLookup as u64, name_hash(name), 0, 0))
        .map(|raw| Published { realm: raw as u32, publisher: (raw >> 32) as u32 })
}

/// The realm published under `name`, if any (by whichever program published it: see
/// [`lookup_from`] to insist on one).
pub fn lookup(name: &str) -> Result<u32, SysError> {
    lookup_published(name).map(|published| published.realm)
}

/// The realm program `program` published under `name`: [`SysError::NameTaken`] when another
/// program holds the name (a client that knows whom it wants is never given a squatter's
/// realm).
pub fn lookup_from(name: &str, program: u64) -> Result<u32, SysError> {
    let published = lookup_published(name)?;
    if u64::from(published.publisher) != program {
        return Err(SysError::NameTaken);
    }
    Ok(published.realm)
}

/// Waits (polling) until a realm is published under `name`, up to `tries` lookups.
pub fn wait_for(name: &str, tries: u64) -> Result<u32, SysError> {
    wait_for_published(name, tries).map(|published| published.realm)
}

/// As [`wait_for`], with the publisher.
pub fn wait_for_published(name: &str, tries: u64) -> Result<Published, SysError> {
    for _ in 0..tries {
        match lookup_published(name) {
            Err(SysError::NotFound) => core::hint::spin_loop(),
            other => return other,
        }
    }
    Err(SysError::NotFound)
}

/// Names are 64-bit FNV-1a hashes of strings.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3))
}

/// Parses a key written as 32 hexadecimal digits (how keys are handed out on command lines).
pub fn parse_key(text: &str) -> Option<Key> {
    if text.len() != 32 || !text.is_ascii() {
        return None;
    }
    let high = u64::from_str_radix(&text[..16], 16).ok()?;
    let low = u64::from_str_radix(&text[16..], 16).ok()?;
    Some(Key([high, low]))
}

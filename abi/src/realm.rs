//! Realms, keys, rights and access lists: the shapes shared by the kernel and realm-sdk.
//!
//! A realm is data plus the code that is its protocol, at a unique range of the uniform address
//! space: realm `id` occupies `[realm_base(id), realm_base(id) + REALM_STRIDE)` in every
//! protection domain's view, with the same physical frames behind it, so a pointer stored in
//! a realm means the same thing to every domain that can see it. Program `k`'s image, argument
//! page and stack form realm `k`, the root realm of its protection domain.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Base of the realm part of the address space (PML4 slot 128).
pub const REALM_SPACE_BASE: u64 = 0x0000_4000_0000_0000;
/// Address-space room of one realm: 1 GiB, one PDPT entry, so opening a realm in a view is one
/// page-table store whatever its size.
pub const REALM_STRIDE: u64 = 1 << 30;
/// Most realms that exist at once (their ranges fill one PML4 entry: 512 GiB).
pub const MAX_REALMS: usize = 512;
/// Most pages one realm may have.
pub const MAX_REALM_PAGES: u64 = 64 * 1024;
/// Most entries of one realm's access list.
pub const MAX_ACL_ENTRIES: usize = 8;
/// Most keys a thread's key list may hold.
pub const MAX_THREAD_KEYS: usize = 16;

/// Virtual base of realm `id`.
pub const fn realm_base(id: u32) -> u64 {
    REALM_SPACE_BASE + id as u64 * REALM_STRIDE
}

/// The realm whose range holds `vaddr`, if it lies in realm space.
pub const fn realm_of(vaddr: u64) -> Option<u32> {
    if vaddr < REALM_SPACE_BASE || vaddr >= REALM_SPACE_BASE + MAX_REALMS as u64 * REALM_STRIDE {
        return None;
    }
    Some(((vaddr - REALM_SPACE_BASE) / REALM_STRIDE) as u32)
}

/// A key: 128 uninterpreted bits. Keys come from a real random source (the host's, through
/// the kernel: `Syscall::Random`) and grant whatever access lists pair them with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Key(pub [u64; 2]);

/// Rights a key can carry on a realm (a bit set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(transparent)]
pub struct Rights(pub u32);

impl Rights {
    /// No right.
    pub const NONE: Self = Self(0);
    /// Initialize: change the realm's protocol and its access list.
    pub const INITIALIZE: Self = Self(1 << 0);
    /// Destroy the realm.
    pub const DESTROY: Self = Self(1 << 1);
    /// Invoke its operations through the kernel, in the realm's own protection domain.
    pub const INVOKE_PROTECTED: Self = Self(1 << 2);
    /// Open it into the caller's view, read-write: invocations are procedure calls.
    pub const INVOKE_OPTIMIZED: Self = Self(1 << 3);
    /// Open it into the caller's view, read-only.
    pub const INVOKE_OPTIMIZED_READ_ONLY: Self = Self(1 << 4);
    /// Every right.
    pub const ALL: Self = Self(0b1_1111);

    /// Whether every right of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether the bits are all known rights.
    pub const fn is_valid(self) -> bool {
        self.0 & !Self::ALL.0 == 0
    }
}

impl core::ops::BitOr for Rights {
    type Output = Self;
    fn bitor(self, other: Self) -> Self {
        self.union(other)
    }
}

/// One access-list entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct AclEntry {
    pub key: Key,
    pub rights: Rights,
    /// Zero.
    pub reserved: u32,
}

/// What `Syscall::RealmCreate` is given (by address).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RealmSpec {
    /// Size in 4 KiB pages (1..=[`MAX_REALM_PAGES`]).
    pub pages: u64,
    /// Home node, or [`HOME_NODE_OF_CALLER`] for the caller's node.
    pub home_node: u32,
    /// Owner realm, or [`OWNER_CALLER_ROOT`] for the caller's root realm. Destroying the owner
    /// destroys what it owns.
    pub owner: u32,
    /// Address of the initial access list ([`AclEntry`] array).
    pub acl: u64,
    /// Entries in the initial access list (at most [`MAX_ACL_ENTRIES`]).
    pub acl_len: u64,
}

/// [`RealmSpec::home_node`]: the node of the creating CPU.
pub const HOME_NODE_OF_CALLER: u32 = u32::MAX;
/// [`RealmSpec::owner`]: the creator's root realm.
pub const OWNER_CALLER_ROOT: u32 = u32::MAX;

/// How a realm is opened into a view (`Syscall::RealmOpen`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum OpenMode {
    ReadWrite = 0,
    ReadOnly = 1,
}

/// Why the kernel terminated a protection domain (`Hypercall::DomainTerminated`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Termination {
    /// It touched a realm its keys give it no right to.
    NoRight = 1,
    /// It wrote a realm it has open read-only.
    WriteReadOnly = 2,
    /// It touched realm space where no realm is (or past a realm's end).
    NoRealm = 3,
    /// It touched (not called) a realm open to it for protected invocation only.
    ProtectedOnly = 4,
    /// Its processor block, context block or key list is not memory of its own.
    BadContextBlock = 5,
    /// Its upcall handler faulted, or gave the kernel a thread to resume that cannot run.
    UpcallFailed = 6,
    /// It executed a page that holds data (mapped no-execute).
    ExecutedData = 7,
    /// Its stack grew past the bottom of the stack the kernel mapped for it.
    StackOverflow = 8,
    /// It asked to resume a thread (`Syscall::Resume`) whose context block is not memory of
    /// its own, or whose RIP is not a user address.
    BadResume = 9,
}

impl Termination {
    /// Decodes a termination reason.
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::NoRight,
            2 => Self::WriteReadOnly,
            3 => Self::NoRealm,
            4 => Self::ProtectedOnly,
            5 => Self::BadContextBlock,
            6 => Self::UpcallFailed,
            7 => Self::ExecutedData,
            8 => Self::StackOverflow,
            9 => Self::BadResume,
            _ => return None,
        })
    }

    /// In words.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NoRight => "touched a realm its keys give it no right to",
            Self::WriteReadOnly => "wrote a realm it has open read-only",
            Self::NoRealm => "touched realm space where no realm is",
            Self::ProtectedOnly => {
                "touched a realm open to it for protected invocation only (call its operations instead)"
            }
            Self::BadContextBlock => "has a processor block, context block or key list that is not memory of its own",
            Self::UpcallFailed => "has an upcall handler that faulted or asked to resume a thread that cannot run",
            Self::ExecutedData => "executed a page of data (mapped no-execute)",
            Self::StackOverflow => "ran its stack past the bottom of the stack the kernel mapped for it",
            Self::BadResume => {
                "asked to resume a thread whose context block is not memory of its own or whose RIP is not a user address"
            }
        }
    }
}

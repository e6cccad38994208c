//! The realm table: which realms exist, where their memory is, who owns them, their access
//! lists, and which protection domains have them open. Also the open decision: what a set of
//! keys allows on a realm.
//!
//! Plain data and logic, unit-tested on the host; the kernel binary holds one table under its
//! lock and does the page-table work the decisions call for.

use psyche_abi::realm::{AclEntry, Key, Rights, MAX_ACL_ENTRIES, MAX_REALMS};

/// Most protection domains at once (a realm records the domains that have it open in a u64).
pub const MAX_DOMAINS: usize = 64;

/// No owner: a root realm, or a realm whose owner is gone.
pub const NO_OWNER: u32 = u32::MAX;

/// Charged to no domain's share: a root realm (its frames are its domain's, charged as it
/// starts).
pub const NO_ACCOUNT: u32 = u32::MAX;

/// One realm.
#[derive(Clone, Copy, Debug, Default)]
pub struct Realm {
    /// Whether the id is in use.
    pub live: bool,
    /// Pages of data.
    pub pages: u64,
    /// Home node: where its frames are.
    pub home: u32,
    /// Owner realm, or [`NO_OWNER`].
    pub owner: u32,
    /// The protection domain whose share it is charged to (its creator), or [`NO_ACCOUNT`].
    pub account: u32,
    /// Guest-physical base of the realm's frame run: its page directory, then its page tables,
    /// then its data pages (one contiguous run, freed as one).
    pub run: u64,
    /// Frames in the run.
    pub run_pages: u64,
    /// Guest-physical address of the page directory that maps the realm; every view that opens
    /// the realm points one PDPT entry at it.
    pub directory: u64,
    /// The access list (entries with no rights are empty).
    pub acl: [AclEntry; MAX_ACL_ENTRIES],
    /// Bit d: protection domain d has the realm open.
    pub open_in: u64,
    /// Bit d: protection domain d may invoke the realm's operations with protection (its keys
    /// were checked once; no invocation checks them again).
    pub protected_in: u64,
    /// The protection domain this realm is the root of, if any.
    pub root_of: Option<u32>,
    /// Page tables in its run (after the directory; 0 for a root realm, whose tables are not
    /// in one run).
    pub tables: u64,
    /// Guest-physical address of its NUMA page: its armed copies per CPU and its latency traps
    /// per node (0: none yet).
    pub numa: u64,
}

/// What a set of keys allows on a realm when a domain touches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Open it read-write: optimized invocation.
    ReadWrite,
    /// Open it read-only: optimized read-only invocation.
    ReadOnly,
    /// Only protected invocation is allowed.
    ProtectedOnly,
    /// No right at all.
    Refused,
}

/// Why a table operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    NotFound,
    TableFull,
    AclFull,
}

/// The realm table.
pub struct RealmTable {
    realms: [Realm; MAX_REALMS],
    /// One past the highest id ever used: scans stop here (at emulated CPL0 a scan of the
    /// whole table costs milliseconds).
    high_water: usize,
}

impl Default for RealmTable {
    fn default() -> Self {
        Self::new()
    }
}

impl RealmTable {
    /// An empty table.
    pub const fn new() -> Self {
        const EMPTY: Realm = Realm {
            live: false,
            pages: 0,
            home: 0,
            owner: NO_OWNER,
            account: NO_ACCOUNT,
            run: 0,
            run_pages: 0,
            directory: 0,
            acl: [AclEntry { key: Key([0; 2]), rights: Rights(0), reserved: 0 }; MAX_ACL_ENTRIES],
            open_in: 0,
            protected_in: 0,
            root_of: None,
            tables: 0,
            numa: 0,
        };
        Self { realms: [EMPTY; MAX_REALMS], high_water: 0 }
    }

    /// The live realm `id`.
    pub fn get(&self, id: u32) -> Option<&Realm> {
        self.realms.get(id as usize).filter(|realm| realm.live)
    }

    /// The live realm `id`, to change.
    pub fn get_mut(&mut self, id: u32) -> Option<&mut Realm> {
        self.realms.get_mut(id as usize).filter(|realm| realm.live)
    }

    /// Takes the lowest free id at or above `first` (ids below are reserved for programs' root
    /// realms); the freed ranges of destroyed realms are reused this way.
    pub fn insert(&mut self, first: u32, realm: Realm) -> Result<u32, TableError> {
        let id = (first as usize..MAX_REALMS).find(|&id| !self.realms[id].live).ok_or(TableError::TableFull)?;
        self.realms[id] = Realm { live: true, ..realm };
        self.high_water = self.high_water.max(id + 1);
        Ok(id as u32)
    }

    /// Puts `realm` at a reserved id (a program's root realm).
    pub fn insert_at(&mut self, id: u32, realm: Realm) -> Result<(), TableError> {
        let slot = self.realms.get_mut(id as usize).ok_or(TableError::NotFound)?;
        *slot = Realm { live: true, ..realm };
        self.high_water = self.high_water.max(id as usize + 1);
        Ok(())
    }

    /// Removes realm `id`, returning what it was.
    pub fn remove(&mut self, id: u32) -> Option<Realm> {
        let slot = self.realms.get_mut(id as usize).filter(|realm| realm.live)?;
        let realm = *slot;
        *slot = Realm { live: false, ..Realm::default() };
        Some(realm)
    }

    /// The rights `keys` carry on realm `id` (the union over the matching entries).
    pub fn rights(&self, id: u32, keys: &[Key]) -> Rights {
        let Some(realm) = self.get(id) else { return Rights::NONE };
        realm
            .acl
            .iter()
            .filter(|entry| entry.rights != Rights::NONE && keys.contains(&entry.key))
            .fold(Rights::NONE, |rights, entry| rights | entry.rights)
    }

    /// What touching realm `id` with `keys` leads to.
    pub fn decide(&self, id: u32, keys: &[Key]) -> Decision {
        decision(self.rights(id, keys))
    }

    /// Sets `key`'s rights on realm `id` (none removes the entry). Returns whether rights were
    /// taken away, in which case every view that has the realm open must close it.
    pub fn set_rights(&mut self, id: u32, key: Key, rights: Rights) -> Result<bool, TableError> {
        let realm = self.get_mut(id).ok_or(TableError::NotFound)?;
        if let Some(entry) = realm.acl.iter_mut().find(|e| e.rights != Rights::NONE && e.key == key) {
            let reduced = !rights.contains(entry.rights);
            entry.rights = rights;
            return Ok(reduced);
        }
        if rights == Rights::NONE {
            return Ok(false);
        }
        let free = realm.acl.iter_mut().find(|e| e.rights == Rights::NONE).ok_or(TableError::AclFull)?;
        *free = AclEntry { key, rights, reserved: 0 };
        Ok(false)
    }

    /// Realm `id` and every live realm it owns, transitively, owners before what they own;
    /// written into `out`, returning how many. Cycles cannot arise (an owner exists before what
    /// it owns), but the walk is bounded by the table size anyway.
    pub fn ownership_tree(&self, id: u32, out: &mut [u32; MAX_REALMS]) -> usize {
        if self.get(id).is_none() {
            return 0;
        }
        out[0] = id;
        let mut len = 1;
        let mut next = 0;
        while next < len {
            let owner = out[next];
            next += 1;
            for (candidate, realm) in self.realms[..self.high_water].iter().enumerate() {
                let candidate = candidate as u32;
                if realm.live && realm.owner == owner && !out[..len].contains(&candidate) && len < MAX_REALMS {
                    out[len] = candidate;
                    len += 1;
                }
            }
        }
        len
    }

    /// Live realms.
    pub fn count(&self) -> usize {
        self.realms.iter().filter(|realm| realm.live).count()
    }

    /// Ids of the live realms (in order).
    pub fn live_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.realms[..self.high_water].iter().enumerate().filter(|(_, r)| r.live).map(|(id, _)| id as u32)
    }
}

/// Whether a set of rights lets its holder invoke with protection (holders of optimized rights
/// may insist on protection too).
pub fn may_invoke_protected(rights: Rights) -> bool {
    rights.contains(Rights::INVOKE_PROTECTED)
        || rights.contains(Rights::INVOKE_OPTIMIZED)
        || rights.contains(Rights::INVOKE_OPTIMIZED_READ_ONLY)
}

/// The decision for a set of rights: optimized access when allowed (read-write before
/// read-only), else protected invocation, else nothing.
pub fn decision(rights: Rights) -> Decision {
    if rights.contains(Rights::INVOKE_OPTIMIZED) {
        Decision::ReadWrite
    } else if rights.contains(Rights::INVOKE_OPTIMIZED_READ_ONLY) {
        Decision::ReadOnly
    } else if rights.contains(Rights::INVOKE_PROTECTED) {
        Decision::ProtectedOnly
    } else {
        Decision::Refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Key = Key([1, 2]);
    const B: Key = Key([3, 4]);
    const FORGED: Key = Key([1, 3]);

    fn realm_with(acl: &[(Key, Rights)], owner: u32) -> Realm {
        let mut realm = Realm { owner, pages: 1, ..Realm::default() };
        for (entry, &(key, rights)) in realm.acl.iter_mut().zip(acl) {
            *entry = AclEntry { key, rights, reserved: 0 };
        }
        realm
    }

    #[test]
    fn decisions_follow_the_strongest_matching_right() {
        let mut table = RealmTable::new();
        let id = table
            .insert(16, realm_with(&[(A, Rights::INVOKE_OPTIMIZED_READ_ONLY), (B, Rights::INVOKE_PROTECTED)], NO_OWNER))
            .unwrap();
        assert_eq!(id, 16);
        assert_eq!(table.decide(id, &[A]), Decision::ReadOnly);
        assert_eq!(table.decide(id, &[B]), Decision::ProtectedOnly);
        assert_eq!(table.decide(id, &[B, A]), Decision::ReadOnly);
        assert_eq!(table.decide(id, &[FORGED]), Decision::Refused);
        assert_eq!(table.decide(id, &[]), Decision::Refused);
        assert_eq!(table.decide(99, &[A]), Decision::Refused);
        table.set_rights(id, FORGED, Rights::INVOKE_OPTIMIZED).unwrap();
        assert_eq!(table.decide(id, &[FORGED]), Decision::ReadWrite);
    }

    #[test]
    fn taking_rights_away_is_reported_and_adding_is_not() {
        let mut table = RealmTable::new();
        let id = table.insert(16, realm_with(&[(A, Rights::ALL)], NO_OWNER)).unwrap();
        assert_eq!(table.set_rights(id, B, Rights::INVOKE_OPTIMIZED), Ok(false));
        assert_eq!(table.set_rights(id, B, Rights::ALL), Ok(false));
        assert_eq!(table.set_rights(id, B, Rights::INVOKE_OPTIMIZED_READ_ONLY), Ok(true));
        assert_eq!(table.set_rights(id, B, Rights::NONE), Ok(true));
        assert_eq!(table.rights(id, &[B]), Rights::NONE);
        assert_eq!(table.set_rights(id, B, Rights::NONE), Ok(false));
        assert_eq!(table.set_rights(77, B, Rights::ALL), Err(TableError::NotFound));
    }

    #[test]
    fn access_lists_are_bounded() {
        let mut table = RealmTable::new();
        let id = table.insert(16, Realm::default()).unwrap();
        for i in 0..MAX_ACL_ENTRIES as u64 {
            table.set_rights(id, Key([i, 0]), Rights::DESTROY).unwrap();
        }
        assert_eq!(table.set_rights(id, Key([99, 0]), Rights::DESTROY), Err(TableError::AclFull));
    }

    #[test]
    fn freed_ids_are_reused_lowest_first() {
        let mut table = RealmTable::new();
        let a = table.insert(16, Realm::default()).unwrap();
        let b = table.insert(16, Realm::default()).unwrap();
        let c = table.insert(16, Realm::default()).unwrap();
        assert_eq!((a, b, c), (16, 17, 18));
        table.remove(b).unwrap();
        assert_eq!(table.insert(16, Realm::default()), Ok(17));
        assert_eq!(table.count(), 3);
    }

    #[test]
    fn the_table_fills_up_cleanly() {
        let mut table = RealmTable::new();
        for _ in 16..MAX_REALMS {
            table.insert(16, Realm::default()).unwrap();
        }
        assert_eq!(table.insert(16, Realm::default()), Err(TableError::TableFull));
    }

    #[test]
    fn ownership_trees_include_grandchildren_owner_first() {
        let mut table = RealmTable::new();
        let root = table.insert(16, realm_with(&[], NO_OWNER)).unwrap();
        let child = table.insert(16, realm_with(&[], root)).unwrap();
        let other = table.insert(16, realm_with(&[], NO_OWNER)).unwrap();
        let grandchild = table.insert(16, realm_with(&[], child)).unwrap();
        let mut out = [0; MAX_REALMS];
        let len = table.ownership_tree(root, &mut out);
        assert_eq!(&out[..len], &[root, child, grandchild]);
        assert_eq!(table.ownership_tree(other, &mut out), 1);
        assert_eq!(table.ownership_tree(400, &mut out), 0);
    }
}

//! The rendezvous table: 64-bit names bound to realms, for the programs of one boot.
//!
//! The rules (the kernel checks the right before it calls [`NameTable::publish`]):
//! * publishing a realm needs the initialize right on it (or it is the publisher's own root
//!   realm): advertising a realm under a name is part of its protocol, which the initialize
//!   right governs;
//! * a name belongs to the protection domain that published it first: only that domain may
//!   bind it to another realm (holding rights on the realm it names is not enough, or the
//!   holder of a shared realm could take over its creator's name);
//! * a name goes away when the realm it names is destroyed, or when its publisher or the
//!   domain whose root realm it names ends;
//! * each domain holds at most its share of the table, so that one program cannot fill it.
//!
//! Plain data and logic, unit-tested on the host; the kernel holds one table under its lock.

/// Entries in the table for the whole boot.
pub const MAX_NAMES: usize = 64;

/// The realm of a free entry.
const FREE: u32 = u32::MAX;

/// One binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: u64,
    /// The realm it names ([`FREE`] for a free entry).
    pub realm: u32,
    /// The protection domain that published it (the only one that may bind it again).
    pub publisher: u32,
}

/// Why a publish is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameError {
    /// Another domain published this name.
    Taken,
    /// The publisher holds its whole share of the table.
    OverShare,
    /// The table is full (only when shares were set to add up to more than the table).
    Full,
}

/// The table.
pub struct NameTable {
    entries: [Entry; MAX_NAMES],
}

impl Default for NameTable {
    fn default() -> Self {
        Self::new()
    }
}

impl NameTable {
    /// An empty table.
    pub const fn new() -> Self {
        Self { entries: [Entry { name: 0, realm: FREE, publisher: 0 }; MAX_NAMES] }
    }

    /// Binds `name` to `realm` for `publisher`, which may hold at most `share` names: a new
    /// name takes an entry of its share, a name it published already is bound again.
    pub fn publish(&mut self, publisher: u32, name: u64, realm: u32, share: usize) -> Result<(), NameError> {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.realm != FREE && e.name == name) {
            if entry.publisher != publisher {
                return Err(NameError::Taken);
            }
            entry.realm = realm;
            return Ok(());
        }
        if self.held_by(publisher) >= share {
            return Err(NameError::OverShare);
        }
        let free = self.entries.iter_mut().find(|e| e.realm == FREE).ok_or(NameError::Full)?;
        // Field by field: a structure store is a `rep movs`, emulated per byte at CPL0.
        free.name = name;
        free.realm = realm;
        free.publisher = publisher;
        Ok(())
    }

    /// The realm `name` is bound to and the domain that published it.
    pub fn lookup(&self, name: u64) -> Option<(u32, u32)> {
        self.entries.iter().find(|e| e.realm != FREE && e.name == name).map(|e| (e.realm, e.publisher))
    }

    /// How many names `publisher` holds.
    pub fn held_by(&self, publisher: u32) -> usize {
        self.entries.iter().filter(|e| e.realm != FREE && e.publisher == publisher).count()
    }

    /// Forgets every name bound to one of `realms` (they were destroyed).
    pub fn forget_realms(&mut self, realms: &[u32]) {
        for entry in self.entries.iter_mut().filter(|e| e.realm != FREE && realms.contains(&e.realm)) {
            entry.realm = FREE;
        }
    }

    /// Forgets every name `domain` published, and every name of `root`, its root realm: the
    /// domain has ended.
    pub fn forget_domain(&mut self, domain: u32, root: u32) {
        for entry in self.entries.iter_mut().filter(|e| e.realm != FREE && (e.publisher == domain || e.realm == root)) {
            entry.realm = FREE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_belongs_to_its_first_publisher() {
        let mut table = NameTable::new();
        assert_eq!(table.publish(0, 7, 20, 4), Ok(()));
        assert_eq!(table.publish(1, 7, 21, 4), Err(NameError::Taken));
        assert_eq!(table.lookup(7), Some((20, 0)));
        // Its publisher may bind it again, without taking another entry.
        assert_eq!(table.publish(0, 7, 22, 1), Ok(()));
        assert_eq!(table.lookup(7), Some((22, 0)));
        assert_eq!(table.held_by(0), 1);
        assert_eq!(table.lookup(8), None);
    }

    #[test]
    fn each_publisher_holds_only_its_share() {
        let mut table = NameTable::new();
        for name in 0..4 {
            assert_eq!(table.publish(1, name, 30, 4), Ok(()));
        }
        assert_eq!(table.publish(1, 99, 30, 4), Err(NameError::OverShare));
        // Another publisher's share is untouched.
        for name in 100..104 {
            assert_eq!(table.publish(2, name, 31, 4), Ok(()));
        }
        assert_eq!(table.held_by(1), 4);
        assert_eq!(table.held_by(2), 4);
    }

    #[test]
    fn shares_larger_than_the_table_end_at_a_full_table() {
        let mut table = NameTable::new();
        for name in 0..MAX_NAMES as u64 {
            assert_eq!(table.publish(0, name, 16, usize::MAX), Ok(()));
        }
        assert_eq!(table.publish(1, 1000, 17, usize::MAX), Err(NameError::Full));
    }

    #[test]
    fn names_of_destroyed_realms_and_ended_domains_go_away() {
        let mut table = NameTable::new();
        table.publish(0, 1, 20, 8).unwrap();
        table.publish(0, 2, 21, 8).unwrap();
        table.publish(1, 3, 22, 8).unwrap();
        // Domain 1 published domain 2's root realm (it holds the initialize right on it).
        table.publish(1, 4, 2, 8).unwrap();
        table.publish(2, 5, 23, 8).unwrap();
        table.forget_realms(&[21, 99]);
        assert_eq!(table.lookup(2), None);
        assert_eq!(table.lookup(1), Some((20, 0)));
        table.forget_domain(2, 2);
        assert_eq!(table.lookup(4), None, "a name of the ended domain's root realm");
        assert_eq!(table.lookup(5), None, "a name the ended domain published");
        assert_eq!(table.lookup(3), Some((22, 1)));
        // Freed entries count for nobody and are reused.
        assert_eq!(table.held_by(2), 0);
        assert_eq!(table.publish(3, 2, 24, 1), Ok(()));
        assert_eq!(table.lookup(2), Some((24, 3)));
    }
}

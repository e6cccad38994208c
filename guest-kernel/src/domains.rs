//! Protection domains and the realms they open: the kernel state behind the realm system calls
//! and the open-on-first-touch fault path.
//!
//! Program k is protection domain k; its root realm is realm k (its image, arguments and stack)
//! and its view starts with that realm alone. Other realms enter a view when the domain first
//! touches them and its thread's keys allow it (or when it opens one explicitly with a key),
//! and leave it when rights are taken away or the realm is destroyed.

use psyche_abi::boot::{BootInfo, SEGMENT_EXEC, SEGMENT_WRITE};
use psyche_abi::hypercall::Hypercall;
use psyche_abi::layout::{PAGE_SIZE, PAGE_TABLES_PADDR, PROGRAM_SLOT_SIZE, USER_STACK_SIZE};
use psyche_abi::realm::{
    realm_of, AclEntry, ContextBlock, Key, OpenMode, RealmSpec, Rights, Termination, HOME_NODE_OF_CALLER,
    MAX_ACL_ENTRIES, MAX_REALMS, MAX_REALM_PAGES, MAX_THREAD_KEYS, OWNER_CALLER_ROOT,
};
use psyche_abi::syscall::SysError;
use psyche_abi::trace::{OpenOutcome, TraceKind};
use psyche_abi::MAX_PROGRAMS;
use psyche_kernel::frames::{Frame, FramePools};
use psyche_kernel::realms::{Decision, Realm, RealmTable, TableError, MAX_DOMAINS, NO_OWNER};

use crate::arch::x86_64::hypercall::hypercall;
use crate::arch::x86_64::paging::{self, Access, View};
use crate::{tlb, trace};

/// Most names the rendezvous table holds.
const MAX_NAMES: usize = 32;

/// A protection domain.
#[derive(Clone, Copy, Debug, Default)]
pub struct Domain {
    pub live: bool,
    /// Its root realm.
    pub root: u32,
    pub view: View,
    /// User address of its thread's context block (0: none, so no keys).
    pub context_block: u64,
}

/// The kernel's state (under `crate::KERNEL`).
pub struct Kernel {
    pub frames: FramePools,
    pub realms: RealmTable,
    domains: [Domain; MAX_DOMAINS],
    names: [(u64, u32); MAX_NAMES],
}

/// The keys a thread presents.
pub struct KeyList {
    keys: [Key; MAX_THREAD_KEYS],
    len: usize,
}

impl KeyList {
    pub fn as_slice(&self) -> &[Key] {
        &self.keys[..self.len]
    }

    fn one(key: Key) -> Self {
        let mut keys = [Key::default(); MAX_THREAD_KEYS];
        keys[0] = key;
        Self { keys, len: 1 }
    }
}

fn table_error(error: TableError) -> SysError {
    match error {
        TableError::NotFound => SysError::NotFound,
        TableError::TableFull | TableError::AclFull => SysError::TableFull,
    }
}

fn info() -> &'static BootInfo {
    crate::boot_info()
}

impl Kernel {
    pub const fn new() -> Self {
        const NO_DOMAIN: Domain =
            Domain { live: false, root: 0, view: View { pml4: 0, realm_pdpt: 0 }, context_block: 0 };
        Self {
            frames: FramePools::empty(),
            realms: RealmTable::new(),
            domains: [NO_DOMAIN; MAX_DOMAINS],
            names: [(0, u32::MAX); MAX_NAMES],
        }
    }

    fn domain(&self, domain: u32) -> Option<&Domain> {
        self.domains.get(domain as usize).filter(|d| d.live)
    }

    /// A frame for kernel tables, from `node` or the nearest node with some left.
    fn table_frame(&mut self, node: u32) -> Option<u64> {
        let distances = &info().distances;
        self.frames.alloc_near(node as usize, |a, b| distances[a][b]).map(|frame| frame.0)
    }

    /// Makes program `index` protection domain `index`: its root realm (image, arguments and a
    /// stack from `node`) and a view holding just that realm. Returns the view.
    pub fn create_program_domain(&mut self, info: &BootInfo, index: usize, node: u32) -> Result<View, &'static str> {
        let program = &info.programs[index];
        let view = paging::new_view(PAGE_TABLES_PADDR, &mut || self.table_frame(node))
            .map_err(|_| "no memory for its view")?;
        let directory = self.table_frame(node).ok_or("no memory for its page directory")?;
        let segments = &program.segments[..(program.segment_count as usize).min(program.segments.len())];
        for segment in segments {
            let access =
                Access { write: segment.flags & SEGMENT_WRITE != 0, execute: segment.flags & SEGMENT_EXEC != 0 };
            let offset = segment.vaddr.wrapping_sub(program.slot_base);
            paging::map_in_directory(directory, offset, segment.paddr, segment.pages, access, &mut || {
                self.table_frame(node)
            })
            .map_err(|e| e.describe())?;
        }
        // The stack comes from this CPU's node: a thread's stack is its most local data.
        let stack_pages = USER_STACK_SIZE / PAGE_SIZE;
        let distances = &info.distances;
        let stack = self.frames.alloc_run(node as usize, stack_pages).or_else(|| {
            let nearest = (0..info.node_count as usize)
                .filter(|&n| self.frames.free_bytes(n) >= USER_STACK_SIZE)
                .min_by_key(|&n| distances[node as usize][n])?;
            self.frames.alloc_run(nearest, stack_pages)
        });
        let stack = stack.ok_or("no memory for its stack")?;
        let access = Access { write: true, execute: false };
        paging::map_in_directory(
            directory,
            PROGRAM_SLOT_SIZE - USER_STACK_SIZE,
            stack.0,
            stack_pages,
            access,
            &mut || self.table_frame(node),
        )
        .map_err(|e| e.describe())?;

        let id = index as u32;
        let root = Realm {
            pages: 0,
            home: node,
            owner: NO_OWNER,
            directory,
            open_in: 1 << index,
            root_of: Some(id),
            ..Realm::default()
        };
        self.realms.insert_at(id, root).map_err(|_| "its root realm id is out of range")?;
        paging::open(&view, id, directory, true);
        self.domains[index] = Domain { live: true, root: id, view, context_block: 0 };
        Ok(view)
    }

    /// Protection domain `domain` is over: everything its root realm owns is destroyed.
    pub fn end_domain(&mut self, domain: u32) {
        let Some(root) = self.domain(domain).map(|d| d.root) else { return };
        if let Some(slot) = self.domains.get_mut(domain as usize) {
            slot.live = false;
        }
        let mut owned = [0u32; MAX_REALMS];
        let count = (0..MAX_REALMS as u32).filter(|&id| self.realms.get(id).is_some_and(|r| r.owner == root)).fold(
            0,
            |count, id| {
                owned[count] = id;
                count + 1
            },
        );
        for &id in &owned[..count] {
            let _ = self.destroy_tree(id);
        }
        for id in 0..MAX_REALMS as u32 {
            if let Some(realm) = self.realms.get_mut(id) {
                realm.open_in &= !(1u64 << (domain % 64));
            }
        }
    }

    /// The keys of `domain`'s thread, read from its context block (through `cr3`, its view).
    pub fn thread_keys(&self, domain: u32, cr3: u64) -> Result<KeyList, Termination> {
        let mut list = KeyList { keys: [Key::default(); MAX_THREAD_KEYS], len: 0 };
        let block_address = self.domain(domain).map_or(0, |d| d.context_block);
        if block_address == 0 {
            return Ok(list);
        }
        let block: ContextBlock = paging::read_user(cr3, block_address).ok_or(Termination::BadContextBlock)?;
        if block.key_count > MAX_THREAD_KEYS as u64 {
            return Err(Termination::BadContextBlock);
        }
        for i in 0..block.key_count {
            let address = block.keys.wrapping_add(i * core::mem::size_of::<Key>() as u64);
            list.keys[i as usize] = paging::read_user(cr3, address).ok_or(Termination::BadContextBlock)?;
        }
        list.len = block.key_count as usize;
        Ok(list)
    }

    pub fn set_context_block(&mut self, domain: u32, address: u64) -> Result<(), SysError> {
        let slot = self.domains.get_mut(domain as usize).filter(|d| d.live).ok_or(SysError::InvalidArgument)?;
        slot.context_block = address;
        Ok(())
    }

    /// Opens realm `id` into `domain`'s view the way `decision` says.
    fn open_in(&mut self, domain: u32, id: u32, decision: Decision) -> Option<OpenOutcome> {
        let view = self.domain(domain)?.view;
        let realm = self.realms.get_mut(id)?;
        let writable = match decision {
            Decision::ReadWrite => true,
            Decision::ReadOnly => false,
            Decision::ProtectedOnly | Decision::Refused => return None,
        };
        paging::open(&view, id, realm.directory, writable);
        realm.open_in |= 1 << (domain % 64);
        Some(if writable { OpenOutcome::MappedReadWrite } else { OpenOutcome::MappedReadOnly })
    }

    /// The open-on-first-touch path: `domain` touched `address` (a write if `write`), which its
    /// view does not map (or maps read-only, if `present`). Ok means the instruction can be
    /// restarted.
    pub fn fault(
        &mut self,
        domain: u32,
        cr3: u64,
        address: u64,
        write: bool,
        present: bool,
    ) -> Result<(), (Termination, u32)> {
        let id = realm_of(address).ok_or((Termination::NoRealm, u32::MAX))?;
        let realm = self.realms.get(id).ok_or((Termination::NoRealm, id))?;
        if realm.open_in & (1 << (domain % 64)) != 0 {
            // Open already: the page is past the realm's end, or a write to a read-only open.
            let reason = if present && write { Termination::WriteReadOnly } else { Termination::NoRealm };
            return Err((reason, id));
        }
        let keys = self.thread_keys(domain, cr3).map_err(|reason| (reason, id))?;
        let decision = self.realms.decide(id, keys.as_slice());
        let outcome = match decision {
            Decision::Refused => OpenOutcome::Refused,
            Decision::ProtectedOnly => OpenOutcome::Protected,
            _ => self.open_in(domain, id, decision).ok_or((Termination::NoRealm, id))?,
        };
        trace::emit(TraceKind::RealmOpen, outcome as u32, u64::from(id), u64::from(domain));
        match outcome {
            OpenOutcome::Refused => Err((Termination::NoRight, id)),
            OpenOutcome::Protected => Err((Termination::ProtectedOnly, id)),
            OpenOutcome::MappedReadOnly if write => Err((Termination::WriteReadOnly, id)),
            _ => Ok(()),
        }
    }

    /// `Syscall::RealmOpen`: opens realm `id` with an explicitly presented key.
    pub fn open_with_key(&mut self, domain: u32, id: u32, key: Key, mode: u64) -> Result<(), SysError> {
        if self.realms.get(id).is_none() {
            return Err(SysError::NotFound);
        }
        let keys = KeyList::one(key);
        let decision = match (self.realms.decide(id, keys.as_slice()), mode) {
            (Decision::ReadWrite, m) if m == OpenMode::ReadWrite as u64 => Decision::ReadWrite,
            (Decision::ReadWrite | Decision::ReadOnly, m) if m == OpenMode::ReadOnly as u64 => Decision::ReadOnly,
            (_, m) if m > OpenMode::ReadOnly as u64 => return Err(SysError::InvalidArgument),
            _ => return Err(SysError::NoRight),
        };
        let outcome = self.open_in(domain, id, decision).ok_or(SysError::InvalidArgument)?;
        trace::emit(TraceKind::RealmOpen, outcome as u32, u64::from(id), u64::from(domain));
        Ok(())
    }

    /// `Syscall::RealmCreate`.
    pub fn create_realm(
        &mut self,
        domain: u32,
        cpu_node: u32,
        spec: &RealmSpec,
        acl: &[AclEntry],
        keys: &KeyList,
    ) -> Result<u32, SysError> {
        let root = self.domain(domain).ok_or(SysError::InvalidArgument)?.root;
        if spec.pages == 0 || spec.pages > MAX_REALM_PAGES || acl.len() > MAX_ACL_ENTRIES {
            return Err(SysError::InvalidArgument);
        }
        if acl.iter().any(|entry| !entry.rights.is_valid()) {
            return Err(SysError::InvalidArgument);
        }
        let home = match spec.home_node {
            HOME_NODE_OF_CALLER => cpu_node,
            node if node < info().node_count => node,
            _ => return Err(SysError::InvalidArgument),
        };
        let owner = match spec.owner {
            OWNER_CALLER_ROOT => root,
            owner if owner == root => root,
            owner => {
                // Owning a realm means destroying it with the owner: that takes the owner's
                // destroy right.
                self.realms.get(owner).ok_or(SysError::NotFound)?;
                if !self.realms.rights(owner, keys.as_slice()).contains(Rights::DESTROY) {
                    return Err(SysError::NoRight);
                }
                owner
            }
        };
        let run_pages = paging::realm_run_pages(spec.pages);
        let run = self.frames.alloc_run(home as usize, run_pages).ok_or(SysError::OutOfMemory)?;
        let directory = paging::build_realm_tables(run.0, spec.pages);
        let mut realm = Realm { pages: spec.pages, home, owner, run: run.0, run_pages, directory, ..Realm::default() };
        for (slot, entry) in realm.acl.iter_mut().zip(acl) {
            *slot = *entry;
        }
        match self.realms.insert(MAX_PROGRAMS as u32, realm) {
            Ok(id) => {
                trace::emit(TraceKind::RealmCreate, home, u64::from(id), psyche_abi::realm::realm_base(id));
                Ok(id)
            }
            Err(error) => {
                // Its tables are in the run: zero them again before the run goes back.
                release_run(&mut self.frames, home, run, run_pages);
                Err(table_error(error))
            }
        }
    }

    /// `Syscall::RealmDestroy`.
    pub fn destroy_realm(&mut self, id: u32, keys: &KeyList) -> Result<(), SysError> {
        self.realms.get(id).ok_or(SysError::NotFound)?;
        if !self.realms.rights(id, keys.as_slice()).contains(Rights::DESTROY) {
            return Err(SysError::NoRight);
        }
        self.destroy_tree(id)
    }

    /// Destroys realm `id` and everything it owns: closed in every view (with a TLB shootdown
    /// before any frame is reused), frames zeroed and given back, ids freed.
    fn destroy_tree(&mut self, id: u32) -> Result<(), SysError> {
        let mut tree = [0u32; MAX_REALMS];
        let count = self.realms.ownership_tree(id, &mut tree);
        let tree = &tree[..count];
        if tree.iter().any(|&r| self.realms.get(r).is_some_and(|realm| realm.root_of.is_some())) {
            return Err(SysError::Busy);
        }
        let mut closed_in = 0u64;
        for &r in tree {
            let Some(realm) = self.realms.get(r) else { continue };
            closed_in |= realm.open_in;
            self.close_everywhere(r, realm.open_in);
        }
        self.shootdown(closed_in);
        for &r in tree {
            if let Some(realm) = self.realms.remove(r) {
                release_run(&mut self.frames, realm.home, Frame(realm.run), realm.run_pages);
                trace::emit(TraceKind::RealmDestroy, 0, u64::from(r), 0);
            }
        }
        self.names.iter_mut().filter(|(_, realm)| tree.contains(realm)).for_each(|name| *name = (0, u32::MAX));
        Ok(())
    }

    fn close_everywhere(&mut self, id: u32, domains: u64) {
        for (d, domain) in self.domains.iter().enumerate() {
            if domains & (1 << d) != 0 && domain.live && domain.root != id {
                paging::close(&domain.view, id);
            }
        }
        if let Some(realm) = self.realms.get_mut(id) {
            // A root realm stays open in its own domain.
            realm.open_in = realm.root_of.map_or(0, |root| domains & (1 << (root % 64)));
        }
    }

    fn shootdown(&self, domains: u64) {
        let info = info();
        tlb::shootdown(domains, info.cpu_count as usize, |cpu| info.cpus[cpu].apic_id);
    }

    /// `Syscall::AclSet`.
    pub fn set_rights(&mut self, id: u32, key: Key, rights: Rights, keys: &KeyList) -> Result<(), SysError> {
        self.realms.get(id).ok_or(SysError::NotFound)?;
        if !rights.is_valid() {
            return Err(SysError::InvalidArgument);
        }
        if !self.realms.rights(id, keys.as_slice()).contains(Rights::INITIALIZE) {
            return Err(SysError::NoRight);
        }
        let reduced = self.realms.set_rights(id, key, rights).map_err(table_error)?;
        if reduced {
            // Rights were taken away: every view that has the realm open loses it, and its next
            // touch is checked against the new list.
            let open_in = self.realms.get(id).map_or(0, |realm| realm.open_in);
            self.close_everywhere(id, open_in);
            self.shootdown(open_in);
        }
        Ok(())
    }

    /// `Syscall::NamePublish`.
    pub fn publish(&mut self, name: u64, id: u32) -> Result<(), SysError> {
        self.realms.get(id).ok_or(SysError::NotFound)?;
        if let Some(slot) = self.names.iter_mut().find(|(n, realm)| *n == name && *realm != u32::MAX) {
            slot.1 = id;
            return Ok(());
        }
        let free = self.names.iter_mut().find(|(_, realm)| *realm == u32::MAX).ok_or(SysError::TableFull)?;
        *free = (name, id);
        Ok(())
    }

    /// `Syscall::NameLookup`.
    pub fn lookup(&self, name: u64) -> Result<u32, SysError> {
        self.names
            .iter()
            .find(|(n, realm)| *n == name && *realm != u32::MAX)
            .map(|&(_, id)| id)
            .ok_or(SysError::NotFound)
    }
}

/// Zeroes a run (in bulk, by the VMM) and gives it back to its node.
fn release_run(frames: &mut FramePools, node: u32, run: Frame, pages: u64) {
    // A run the VMM would not zero is kept out of circulation rather than handed out dirty.
    if hypercall(Hypercall::ZeroFrames, [run.0, pages, 0, 0, 0, 0]) == 0 {
        frames.free_run(node as usize, run, pages);
    }
}

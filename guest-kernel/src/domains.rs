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
    realm_base, realm_of, AclEntry, Key, OpenMode, RealmSpec, Rights, Termination, HOME_NODE_OF_CALLER,
    MAX_ACL_ENTRIES, MAX_REALMS, MAX_REALM_PAGES, MAX_THREAD_KEYS, OWNER_CALLER_ROOT, REALM_STRIDE,
};
use psyche_abi::syscall::SysError;
use psyche_abi::trace::{OpenOutcome, TraceKind};
use psyche_abi::upcall::{
    ContextBlock, ProcessorBlock, MAX_OPERATIONS, OPERATION_ENTRY_SIZE, UPCALL_AREA_OFFSET, UPCALL_LEVELS,
    UPCALL_STACK_SIZE,
};
use psyche_abi::MAX_PROGRAMS;
use psyche_abi::{CpuMask, MAX_CPUS};
use psyche_kernel::frames::{Frame, FramePools};
use psyche_kernel::names::{NameError, NameTable};
use psyche_kernel::quotas::Quotas;
use psyche_kernel::realms::{Decision, Realm, RealmTable, TableError, MAX_DOMAINS, NO_ACCOUNT, NO_OWNER};

use crate::arch::x86_64::hypercall::hypercall;
use crate::arch::x86_64::paging::{self, Access, View};
use crate::{tlb, trace};

/// How a faulting access touched memory.
#[derive(Clone, Copy, Debug)]
pub struct Touch {
    pub write: bool,
    pub present: bool,
    pub fetch: bool,
}

/// What a realm-space fault comes to, when it does not end the domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The realm is open now: restart the instruction.
    Restart,
    /// A call of an operation entry of a realm open for protected invocation.
    Protected,
    /// A remote page opened for one access: restart the instruction and single-step it, so
    /// that the page is armed again after it (`numa`).
    Step,
}

// Every CPU's work areas, at every level, fit in the root realm below the program's stack.
const _: () = assert!(
    UPCALL_AREA_OFFSET + MAX_CPUS as u64 * UPCALL_LEVELS * UPCALL_STACK_SIZE <= PROGRAM_SLOT_SIZE - USER_STACK_SIZE
);

/// A protection domain.
#[derive(Clone, Copy, Debug, Default)]
pub struct Domain {
    pub live: bool,
    /// Its root realm.
    pub root: u32,
    pub view: View,
    /// User address of its processor block (0: none, so no keys and no upcalls).
    pub processor_block: u64,
    /// Its upcall handler, from the processor block (0: it takes no upcalls).
    pub handler: u64,
    /// Its time slice, from the processor block (0: no time-limit upcalls).
    pub quantum_us: u64,
    /// Its operation table (base, count): entries of its root realm callers invoke.
    pub operations: (u64, u64),
    /// Per work-area level, the CPUs on which that level's area is mapped.
    pub work_areas: [CpuMask; UPCALL_LEVELS as usize],
    /// The CPU its program runs on.
    pub home_cpu: u32,
    /// Upcalls waiting for the domain to be entered on its home CPU.
    pub pending: [PendingUpcall; MAX_PENDING_UPCALLS],
    pub pending_count: usize,
    /// Set when another domain took its (shared) processor at a slice's end.
    pub preempted: Option<Preempted>,
    /// Its processor idles for it (`Syscall::Idle`): it runs again when an upcall waits.
    pub idle: bool,
    /// Guest-physical address of the frame listing its per-CPU views (0: none yet; `numa`).
    pub cpu_views: u64,
}

/// A domain's state when another took its processor.
#[derive(Clone, Copy, Debug, Default)]
pub struct Preempted {
    pub registers: psyche_abi::upcall::Registers,
    /// The deferred invocation whose result it waits for in the kernel (0: none): it resumes
    /// with the result in RAX, once there is one (`upcalls::wait_for_completion`).
    pub waiting_for: u64,
    /// Its slice ended inside protected invocations or its upcall handler, which `aside` keeps:
    /// `registers` are the innermost activation's.
    pub aside: bool,
}

/// Most upcalls that can wait for a domain.
pub const MAX_PENDING_UPCALLS: usize = 16;

/// An upcall to deliver later: its kind and arguments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingUpcall {
    pub kind: u64,
    pub args: [u64; 3],
}

/// A protected invocation the callee deferred (`Syscall::InvocationDefer`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deferred {
    pub id: u64,
    pub caller: u32,
    pub callee: u32,
    /// The caller's blocked thread: its context block (0 when the caller takes no upcalls and
    /// waits in the kernel instead).
    pub thread: u64,
    /// Completed, with this result.
    pub result: Option<u64>,
    /// Still running on the caller's CPU (not deferred yet): a result that arrives now is kept
    /// for the deferral to find.
    pub running: bool,
    /// The operation and its arguments, for an invocation placed on the callee's own CPU.
    pub operation: u64,
    pub args: [u64; 4],
    /// The CPU where a caller without upcalls waits for the result.
    pub waiter: u32,
}

/// Most deferred invocations at once.
pub const MAX_DEFERRED: usize = 64;

/// The kernel's state (under `crate::KERNEL`).
pub struct Kernel {
    pub frames: FramePools,
    pub realms: RealmTable,
    domains: [Domain; MAX_DOMAINS],
    names: NameTable,
    /// Every domain's share of realms, names and frames, and what it holds.
    pub quotas: Quotas,
    pub deferred: [Deferred; MAX_DEFERRED],
    next_invocation: u64,
    /// How remote-memory latency is enforced (set at boot).
    pub policy: crate::numa::Policy,
    /// Latency traps and charges by node pair, and migrations.
    pub latency: psyche_abi::latency::LatencyReport,
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
        const NO_DOMAIN: Domain = Domain {
            live: false,
            root: 0,
            view: View { pml4: 0, realm_pdpt: 0 },
            processor_block: 0,
            handler: 0,
            quantum_us: 0,
            operations: (0, 0),
            work_areas: [[0; MAX_CPUS / 64]; UPCALL_LEVELS as usize],
            home_cpu: 0,
            pending: [PendingUpcall { kind: 0, args: [0; 3] }; MAX_PENDING_UPCALLS],
            pending_count: 0,
            preempted: None,
            idle: false,
            cpu_views: 0,
        };
        Self {
            frames: FramePools::empty(),
            realms: RealmTable::new(),
            domains: [NO_DOMAIN; MAX_DOMAINS],
            names: NameTable::new(),
            quotas: Quotas::new(),
            deferred: [Deferred {
                id: 0,
                caller: 0,
                callee: 0,
                thread: 0,
                result: None,
                running: false,
                operation: 0,
                args: [0; 4],
                waiter: 0,
            }; MAX_DEFERRED],
            next_invocation: psyche_abi::syscall::MIN_INVOCATION_ID,
            policy: crate::numa::Policy { mode: psyche_abi::latency::LatencyMode::Off, migrate_after: 0 },
            latency: crate::numa::empty_report(),
        }
    }

    pub fn domain(&self, domain: u32) -> Option<&Domain> {
        self.domains.get(domain as usize).filter(|d| d.live)
    }

    pub fn domain_mut(&mut self, domain: u32) -> Option<&mut Domain> {
        self.domains.get_mut(domain as usize).filter(|d| d.live)
    }

    /// A fresh invocation of `callee` by `caller` (one placed on the callee's CPU), with its
    /// slot in the invocation table (the id is chosen so that its slot is the first one
    /// `invocation` looks at; an id whose slot is held by a long invocation, a deferred one say,
    /// is skipped). `None` when every slot is busy.
    pub fn begin_invocation(&mut self, caller: u32, callee: u32) -> Option<u64> {
        for _ in 0..MAX_DEFERRED {
            let id = self.next_invocation;
            self.next_invocation += 1;
            let slot = &mut self.deferred[slot_of(id)];
            if slot.id == 0 {
                // Field by field: a structure store is a `rep movs`, emulated per byte at CPL0.
                slot.id = id;
                slot.caller = caller;
                slot.callee = callee;
                slot.thread = 0;
                slot.result = None;
                slot.running = true;
                // A caller that takes no upcalls waits for a deferred result on this CPU.
                slot.waiter = crate::arch::x86_64::cpu::this_cpu().index;
                return Some(id);
            }
        }
        None
    }

    /// Enters invocation `id` (a per-CPU one that its callee defers) in the table: its caller's
    /// blocked thread is `thread` (0: none, the caller waits in the kernel on this CPU). False
    /// when the table is full.
    pub fn defer_invocation(&mut self, id: u64, caller: u32, callee: u32, thread: u64) -> bool {
        let start = slot_of(id);
        let Some(index) = (0..MAX_DEFERRED).map(|i| (start + i) % MAX_DEFERRED).find(|&i| self.deferred[i].id == 0)
        else {
            return false;
        };
        let slot = &mut self.deferred[index];
        // Field by field: a structure store is a `rep movs`, emulated per byte at CPL0.
        slot.id = id;
        slot.caller = caller;
        slot.callee = callee;
        slot.thread = thread;
        slot.result = None;
        slot.running = false;
        slot.waiter = crate::arch::x86_64::cpu::this_cpu().index;
        true
    }

    /// The invocation table's entry for `id`: at its slot, or (a deferred per-CPU id whose slot
    /// was taken) after it.
    pub fn invocation(&mut self, id: u64) -> Option<&mut Deferred> {
        if id == 0 {
            return None;
        }
        let start = slot_of(id);
        let index = (0..MAX_DEFERRED).map(|i| (start + i) % MAX_DEFERRED).find(|&i| self.deferred[i].id == id)?;
        self.deferred.get_mut(index)
    }

    /// Forgets invocation `id`.
    pub fn end_invocation(&mut self, id: u64) {
        if let Some(slot) = self.invocation(id) {
            // A free slot is one with id 0 (`begin_invocation` sets every field it reads).
            slot.id = 0;
        }
    }

    /// A frame for `account`'s kernel tables (a domain's views and page tables), from `node`
    /// or the nearest node with some left; charged to the account but never refused for its
    /// share (`psyche_kernel::quotas`: what a domain needs to run).
    pub(crate) fn table_frame(&mut self, account: u32, node: u32) -> Option<u64> {
        self.forced_run(account, node, 1).map(|frame| frame.0)
    }

    /// `pages` contiguous frames from `node` or the nearest node with them, charged to
    /// `account` whatever its share says (see [`Kernel::table_frame`]).
    fn forced_run(&mut self, account: u32, node: u32, pages: u64) -> Option<Frame> {
        let distances = &info().distances;
        let (from, frame) = self.frames.alloc_run_near_where(node as usize, pages, |a, b| distances[a][b], |_| true)?;
        self.quotas.force_pages(account, from as u32, pages);
        Some(frame)
    }

    /// `pages` contiguous frames from `node`, charged to `account`: `OverQuota` when its share
    /// of the node has no room for them, `OutOfMemory` when the node has not got them.
    pub(crate) fn charged_run(&mut self, account: u32, node: u32, pages: u64) -> Result<Frame, SysError> {
        self.quotas.charge_pages(account, node, pages).map_err(|_| SysError::OverQuota)?;
        self.frames.alloc_run(node as usize, pages).ok_or_else(|| {
            self.quotas.credit_pages(account, node, pages);
            SysError::OutOfMemory
        })
    }

    /// `pages` contiguous frames from `node` or the nearest node where `account`'s share has
    /// room for them, charged to it; the node they came from, too.
    pub(crate) fn charged_run_near(&mut self, account: u32, node: u32, pages: u64) -> Option<(u32, Frame)> {
        let distances = &info().distances;
        let quotas = &self.quotas;
        let (from, frame) = self.frames.alloc_run_near_where(
            node as usize,
            pages,
            |a, b| distances[a][b],
            |n| quotas.has_room(account, n as u32, pages),
        )?;
        // The share had room there: this cannot be refused.
        self.quotas.force_pages(account, from as u32, pages);
        Some((from as u32, frame))
    }

    /// Gives a run charged to `account` back: zeroed, in its node's pool again and off the
    /// account. Frames the pool could not take (a full free-run list, a run the VMM would not
    /// zero) stay on the account, so that they are lost to the domain that held them and
    /// never to another domain's share.
    pub(crate) fn release_charged(&mut self, account: u32, node: u32, run: Frame, pages: u64) {
        if release_run(&mut self.frames, node, run, pages) {
            self.quotas.credit_pages(account, node, pages);
        }
    }

    /// Makes program `index` protection domain `index`: its root realm (image, arguments and a
    /// stack from `node`) and a view holding just that realm. Returns the view.
    pub fn create_program_domain(
        &mut self,
        info: &BootInfo,
        index: usize,
        node: u32,
        cpu: u32,
    ) -> Result<View, &'static str> {
        let program = &info.programs[index];
        // Everything made here is the domain's, on its account (never refused: it needs it to
        // run at all).
        let id = index as u32;
        let view = paging::new_view(PAGE_TABLES_PADDR, &mut || self.table_frame(id, node))
            .map_err(|_| "no memory for its view")?;
        let directory = self.table_frame(id, node).ok_or("no memory for its page directory")?;
        let segments = &program.segments[..(program.segment_count as usize).min(program.segments.len())];
        for segment in segments {
            let access =
                Access { write: segment.flags & SEGMENT_WRITE != 0, execute: segment.flags & SEGMENT_EXEC != 0 };
            let offset = segment.vaddr.wrapping_sub(program.slot_base);
            paging::map_in_directory(directory, offset, segment.paddr, segment.pages, access, &mut || {
                self.table_frame(id, node)
            })
            .map_err(|e| e.describe())?;
        }
        // The stack comes from this CPU's node: a thread's stack is its most local data.
        let stack_pages = USER_STACK_SIZE / PAGE_SIZE;
        let stack = self.forced_run(id, node, stack_pages).ok_or("no memory for its stack")?;
        let access = Access { write: true, execute: false };
        paging::map_in_directory(
            directory,
            PROGRAM_SLOT_SIZE - USER_STACK_SIZE,
            stack.0,
            stack_pages,
            access,
            &mut || self.table_frame(id, node),
        )
        .map_err(|e| e.describe())?;

        let root = Realm {
            pages: 0,
            home: node,
            owner: NO_OWNER,
            account: NO_ACCOUNT,
            directory,
            open_in: 1 << index,
            root_of: Some(id),
            ..Realm::default()
        };
        self.realms.insert_at(id, root).map_err(|_| "its root realm id is out of range")?;
        paging::open(&view, id, directory, true);
        self.domains[index] = Domain { live: true, root: id, view, home_cpu: cpu, ..Domain::default() };
        Ok(view)
    }

    /// Protection domain `domain` is over: everything its root realm owns is destroyed.
    pub fn end_domain(&mut self, domain: u32) {
        let Some(root) = self.domain(domain).map(|d| d.root) else { return };
        // Invocations of it, or by it, checked earlier are no longer right.
        crate::upcalls::forget_checks();
        if let Some(slot) = self.domains.get_mut(domain as usize) {
            slot.live = false;
        }
        // Its names go, and names of its root realm, which no one serves now.
        self.names.forget_domain(domain, root);
        // Only live ids are visited (the table's high-water mark bounds the scan).
        let mut owned = [0u32; MAX_REALMS];
        let mut count = 0;
        for id in self.realms.live_ids() {
            if self.realms.get(id).is_some_and(|r| r.owner == root) {
                owned[count] = id;
                count += 1;
            }
        }
        for &id in &owned[..count] {
            let _ = self.destroy_tree(id);
        }
        let bit = !(1u64 << (domain % 64));
        let mut live = [0u32; MAX_REALMS];
        let mut count = 0;
        for id in self.realms.live_ids() {
            live[count] = id;
            count += 1;
        }
        for &id in &live[..count] {
            if let Some(realm) = self.realms.get_mut(id) {
                realm.open_in &= bit;
                realm.protected_in &= bit;
            }
        }
    }

    /// The keys of `domain`'s thread, read from its context block (through `cr3`, its view).
    pub fn thread_keys(&self, domain: u32, cr3: u64) -> Result<KeyList, Termination> {
        let mut list = KeyList { keys: [Key::default(); MAX_THREAD_KEYS], len: 0 };
        let processor = self.domain(domain).map_or(0, |d| d.processor_block);
        if processor == 0 {
            return Ok(list);
        }
        let processor: ProcessorBlock = paging::read_user(cr3, processor).ok_or(Termination::BadContextBlock)?;
        if processor.current == 0 {
            return Ok(list);
        }
        let block: ContextBlock = paging::read_user(cr3, processor.current).ok_or(Termination::BadContextBlock)?;
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

    /// `Syscall::SetProcessorBlock`: reads the block once for the handler and quantum.
    pub fn set_processor_block(&mut self, domain: u32, cr3: u64, address: u64) -> Result<(), SysError> {
        let block: ProcessorBlock = paging::read_user(cr3, address).ok_or(SysError::BadAddress)?;
        if block.upcall_handler >= 0x0000_8000_0000_0000 || block.quantum_us > 10_000_000 {
            return Err(SysError::InvalidArgument);
        }
        let slot = self.domain_mut(domain).ok_or(SysError::InvalidArgument)?;
        // A new handler: invocations checked with the old one are checked again.
        crate::upcalls::forget_checks();
        slot.processor_block = address;
        slot.handler = block.upcall_handler;
        slot.quantum_us = block.quantum_us;
        Ok(())
    }

    /// `Syscall::RegisterOperations`: the table must lie in the domain's root realm.
    pub fn register_operations(&mut self, domain: u32, base: u64, count: u64) -> Result<(), SysError> {
        let slot = self.domain_mut(domain).ok_or(SysError::InvalidArgument)?;
        let end = count.checked_mul(OPERATION_ENTRY_SIZE).and_then(|len| base.checked_add(len));
        let root = realm_base(slot.root);
        if count > MAX_OPERATIONS || end.is_none_or(|end| base < root || end > root + REALM_STRIDE) {
            return Err(SysError::InvalidArgument);
        }
        // A new operation count: invocations checked against the old one are checked again.
        crate::upcalls::forget_checks();
        slot.operations = (base, count);
        Ok(())
    }

    /// Maps `domain`'s upcall work area of `level` for `cpu` (frames from `node`) if it is not
    /// yet, and returns the top of its stack (see `UPCALL_LEVELS`).
    pub fn work_area(&mut self, domain: u32, cpu: u32, level: usize, node: u32) -> Option<u64> {
        // Fields, not the whole domain: copying a struct is a `rep movs`, emulated per byte at
        // CPL0 on our hosts.
        let d = self.domain(domain)?;
        let root = d.root;
        let index = u64::from(cpu) * UPCALL_LEVELS + level as u64;
        let offset = UPCALL_AREA_OFFSET + index * UPCALL_STACK_SIZE;
        let top = realm_base(root) + offset + UPCALL_STACK_SIZE;
        let (word, bit) = (cpu as usize / 64, 1u64 << (cpu % 64));
        if d.work_areas.get(level)?.get(word)? & bit != 0 {
            return Some(top);
        }
        let pages = UPCALL_STACK_SIZE / PAGE_SIZE;
        // The domain's, on its account (never refused: it needs it to take upcalls here).
        let stack = self.forced_run(domain, node, pages)?;
        let directory = self.realms.get(root)?.directory;
        let access = Access { write: true, execute: false };
        paging::map_in_directory(directory, offset, stack.0, pages, access, &mut || self.table_frame(domain, node))
            .ok()?;
        self.domain_mut(domain)?.work_areas[level][word] |= bit;
        Some(top)
    }

    /// The domain whose root realm holds `address`, and the operation whose entry it is.
    pub fn operation_at(&self, address: u64) -> Option<(u32, u64)> {
        let realm = realm_of(address)?;
        let domain = self.realms.get(realm)?.root_of?;
        let (base, count) = self.domain(domain)?.operations;
        let offset = address.checked_sub(base)?;
        (offset % OPERATION_ENTRY_SIZE == 0 && offset / OPERATION_ENTRY_SIZE < count)
            .then_some((domain, offset / OPERATION_ENTRY_SIZE))
    }

    /// Queues an upcall for `domain`; false if its queue is full.
    pub fn queue_upcall(&mut self, domain: u32, upcall: PendingUpcall) -> bool {
        let Some(d) = self.domain_mut(domain) else { return false };
        if d.pending_count == MAX_PENDING_UPCALLS {
            return false;
        }
        d.pending[d.pending_count] = upcall;
        d.pending_count += 1;
        true
    }

    /// Takes the oldest upcall waiting for `domain`.
    pub fn take_upcall(&mut self, domain: u32) -> Option<PendingUpcall> {
        let d = self.domain_mut(domain)?;
        if d.pending_count == 0 {
            return None;
        }
        let upcall = d.pending[0];
        d.pending.copy_within(1..d.pending_count, 0);
        d.pending_count -= 1;
        Some(upcall)
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
        self.open_here(domain, id);
        Some(if writable { OpenOutcome::MappedReadWrite } else { OpenOutcome::MappedReadOnly })
    }

    /// The open-on-first-touch path: `domain` touched `address` (a write if `write`, an
    /// instruction fetch if `fetch`), which its view does not map (or maps read-only, if
    /// `present`). `Restart` means the realm is open now; `Protected` that the touch was a call
    /// of an operation entry of a realm the domain may invoke only with protection.
    pub fn fault(
        &mut self,
        domain: u32,
        cr3: u64,
        address: u64,
        access: Touch,
    ) -> Result<FaultOutcome, (Termination, u32)> {
        let id = realm_of(address).ok_or((Termination::NoRealm, u32::MAX))?;
        let realm = self.realms.get(id).ok_or((Termination::NoRealm, id))?;
        let bit = 1u64 << (domain % 64);
        if realm.open_in & bit != 0 {
            // Open already: a NUMA matter (this CPU's view catching up, a latency trap), or the
            // page is past the realm's end, or a write to a read-only open.
            return self.remote_fault(domain, id, address, access).ok_or((crate::numa::open_realm_error(access), id));
        }
        let protected_before = realm.protected_in & bit != 0;
        let decision = if protected_before {
            Decision::ProtectedOnly
        } else {
            let keys = self.thread_keys(domain, cr3).map_err(|reason| (reason, id))?;
            self.realms.decide(id, keys.as_slice())
        };
        let outcome = match decision {
            Decision::Refused => OpenOutcome::Refused,
            Decision::ProtectedOnly => OpenOutcome::Protected,
            _ => self.open_in(domain, id, decision).ok_or((Termination::NoRealm, id))?,
        };
        if !protected_before {
            trace::emit(TraceKind::RealmOpen, outcome as u32, u64::from(id), u64::from(domain));
        }
        match outcome {
            OpenOutcome::Refused => Err((Termination::NoRight, id)),
            OpenOutcome::Protected if access.fetch => {
                if let Some(realm) = self.realms.get_mut(id) {
                    realm.protected_in |= bit;
                }
                Ok(FaultOutcome::Protected)
            }
            OpenOutcome::Protected => Err((Termination::ProtectedOnly, id)),
            OpenOutcome::MappedReadOnly if access.write => Err((Termination::WriteReadOnly, id)),
            _ => Ok(FaultOutcome::Restart),
        }
    }

    /// Whether `domain` may invoke realm `id` with protection: checked against its keys once,
    /// then remembered until the realm's access list loses rights.
    pub fn may_invoke_protected(&mut self, domain: u32, cr3: u64, id: u32) -> Result<(), SysError> {
        let bit = 1u64 << (domain % 64);
        let realm = self.realms.get(id).ok_or(SysError::NotFound)?;
        if realm.protected_in & bit != 0 {
            return Ok(());
        }
        let keys = self.thread_keys(domain, cr3).map_err(|_| SysError::BadAddress)?;
        if !psyche_kernel::realms::may_invoke_protected(self.realms.rights(id, keys.as_slice())) {
            return Err(SysError::NoRight);
        }
        if let Some(realm) = self.realms.get_mut(id) {
            realm.protected_in |= bit;
        }
        Ok(())
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
        // The realm is on its creator's account: one of its realms, and its frames on `home`.
        self.quotas.charge_realm(domain).map_err(|_| SysError::OverQuota)?;
        let run_pages = paging::realm_run_pages(spec.pages);
        let run = self.charged_run(domain, home, run_pages).inspect_err(|_| self.quotas.credit_realm(domain))?;
        let directory = paging::build_realm_tables(run.0, spec.pages);
        let tables = spec.pages.div_ceil(512);
        let mut realm = Realm {
            pages: spec.pages,
            home,
            owner,
            account: domain,
            run: run.0,
            run_pages,
            directory,
            tables,
            ..Realm::default()
        };
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
                self.release_charged(domain, home, run, run_pages);
                self.quotas.credit_realm(domain);
                Err(table_error(error))
            }
        }
    }

    /// `Syscall::RealmDestroy`.
    pub fn destroy_realm(&mut self, id: u32, keys: &KeyList) -> Result<(), SysError> {
        let realm = self.realms.get(id).ok_or(SysError::NotFound)?;
        // A program's root realm goes only with its program, whatever rights are held.
        if realm.root_of.is_some() {
            return Err(SysError::Busy);
        }
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
                // Fields, not the whole realm: a structure copy is a `rep movs` at CPL0.
                let (account, home, run, run_pages) = (realm.account, realm.home, realm.run, realm.run_pages);
                self.release_numa(realm.numa, realm.tables, account);
                self.release_charged(account, home, Frame(run), run_pages);
                self.quotas.credit_realm(account);
                trace::emit(TraceKind::RealmDestroy, 0, u64::from(r), 0);
            }
        }
        self.names.forget_realms(tree);
        Ok(())
    }

    fn close_everywhere(&mut self, id: u32, domains: u64) {
        if let Some(realm) = self.realms.get_mut(id) {
            realm.protected_in = 0;
        }
        // Rights to invoke it are remembered per CPU too (`upcalls::protected_call_gate`).
        crate::upcalls::forget_checks();
        let mut others = 0u64;
        for (d, domain) in self.domains.iter().enumerate() {
            if domains & (1 << d) != 0 && domain.live && domain.root != id {
                paging::close(&domain.view, id);
                others |= 1 << d;
            }
        }
        self.close_in_cpu_views(id, others);
        if let Some(realm) = self.realms.get_mut(id) {
            // A root realm stays open in its own domain.
            realm.open_in = realm.root_of.map_or(0, |root| domains & (1 << (root % 64)));
        }
    }

    pub(crate) fn shootdown(&self, domains: u64) {
        let info = info();
        tlb::shootdown(domains, info.cpu_count as usize, |cpu| info.cpus[cpu].apic_id);
    }

    /// `Syscall::AclSet`. A domain may always edit its own root realm's list (that is how it
    /// lets others invoke its operations); other lists need the initialize right.
    pub fn set_rights(
        &mut self,
        domain: u32,
        id: u32,
        key: Key,
        rights: Rights,
        keys: &KeyList,
    ) -> Result<(), SysError> {
        let realm = self.realms.get(id).ok_or(SysError::NotFound)?;
        if !rights.is_valid() {
            return Err(SysError::InvalidArgument);
        }
        let own_root = realm.root_of == Some(domain);
        if !own_root && !self.realms.rights(id, keys.as_slice()).contains(Rights::INITIALIZE) {
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

    /// `Syscall::NamePublish` by `domain`, whose thread holds `keys` (`None`: not read,
    /// because the realm is the domain's own root realm). The rules are `psyche_kernel::names`'s.
    pub fn publish(&mut self, domain: u32, name: u64, id: u32, keys: Option<&KeyList>) -> Result<(), SysError> {
        let realm = self.realms.get(id).ok_or(SysError::NotFound)?;
        match realm.root_of {
            Some(root) if root == domain => {}
            // The root realm of an ended domain serves no one: it is not there to publish.
            Some(root) if self.domain(root).is_none() => return Err(SysError::NotFound),
            _ => {
                let rights = keys.map_or(Rights::NONE, |keys| self.realms.rights(id, keys.as_slice()));
                if !rights.contains(Rights::INITIALIZE) {
                    return Err(SysError::NoRight);
                }
            }
        }
        let share = self.quotas.name_share(domain);
        self.names.publish(domain, name, id, share).map_err(|error| match error {
            NameError::Taken => SysError::NameTaken,
            NameError::OverShare => SysError::OverQuota,
            NameError::Full => SysError::TableFull,
        })
    }

    /// `Syscall::NameLookup`: the realm, and its publisher in the high 32 bits.
    pub fn lookup(&self, name: u64) -> Result<u64, SysError> {
        let (realm, publisher) = self.names.lookup(name).ok_or(SysError::NotFound)?;
        Ok(u64::from(publisher) << 32 | u64::from(realm))
    }
}

/// The invocation table slot where the search for invocation `id` starts: the id's low bits
/// mixed with the next ones (per-CPU ids keep their CPU in the low bits).
fn slot_of(id: u64) -> usize {
    ((id ^ (id >> 16)) % MAX_DEFERRED as u64) as usize
}

/// Zeroes a run (in bulk, by the VMM) and gives it back to its node. Returns whether its
/// pool has it again.
fn release_run(frames: &mut FramePools, node: u32, run: Frame, pages: u64) -> bool {
    // A run the VMM would not zero is kept out of circulation rather than handed out dirty.
    hypercall(Hypercall::ZeroFrames, [run.0, pages, 0, 0, 0, 0]) == 0 && frames.free_run(node as usize, run, pages)
}

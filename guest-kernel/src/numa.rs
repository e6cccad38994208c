//! The NUMA machine: remote-memory latency traps, per-CPU views, realm migration.
//!
//! With a latency mode other than `off`, a domain runs on each CPU through its own *per-CPU
//! view* (a PML4 and realm PDPT built the first time the domain runs there). A realm homed on
//! the CPU's node, and every root realm (a program's image, stack and work areas, which stay
//! unarmed: see below), appear in it through the realm's shared directory, as before. A realm
//! homed on another node appears through the realm's *armed copy* for that CPU: its directory
//! and page tables copied by the VMM with every data page armed (`psyche_abi::latency`). A
//! touch of an armed page traps here: the VMM charges the latency for (this node, home node),
//! the trap is counted and traced, and the page opens on this CPU only, until the next quantum
//! (window mode) or for the one instruction, which the CPU single-steps (exact and account
//! modes). The copies are per CPU, not per node, so that opening a page never needs another
//! CPU's TLB to be flushed.
//!
//! The domain's *master view* (`Domain::view`) stays what it was without latency traps: every
//! realm it has open, through the shared directories. The kernel opens and closes realms there
//! and translates user pointers through it; per-CPU views catch up lazily, on a fault.
//!
//! Root realms are not armed: they hold the program's own image, stack and upcall work areas,
//! which a real NUMA machine would keep on (or replicate to) the node that runs the program.
//! Shared data lives in created realms, and those are armed.
//!
//! Migration moves a realm's frames to another node while every user waits: its entries are
//! closed in every view (with a TLB shootdown) under the kernel lock, the VMM copies the frames,
//! and the views are pointed at the new directory before the lock is released. A CPU that
//! touches the realm meanwhile faults, waits for the lock, and finds the realm in its new home.

use core::sync::atomic::{AtomicU32, Ordering};

use psyche_abi::hypercall::Hypercall;
use psyche_abi::latency::{LatencyMode, LatencyReport, LATENCY_REPORT_MAGIC};
use psyche_abi::layout::{direct_map, PAGE_SIZE, PAGE_TABLES_PADDR};
use psyche_abi::realm::Termination;
use psyche_abi::syscall::SysError;
use psyche_abi::trace::TraceKind;
use psyche_abi::{MAX_CPUS, MAX_NODES};
use psyche_kernel::frames::Frame;
use psyche_kernel::realms::MAX_DOMAINS;

use crate::arch::x86_64::cpu::{this_cpu, MAX_REMOTE_OPEN};
use crate::arch::x86_64::hypercall::hypercall;
use crate::arch::x86_64::paging::{self, View};
use crate::domains::{FaultOutcome, Kernel, Touch};
use crate::trace;

/// No frames for an armed copy of a realm's tables (or the VMM would not build it).
struct NoMemoryForCopy;

/// A realm's NUMA page (one frame, made when the realm is first mapped on a remote CPU, on
/// the realm's account): the directory of its armed copy on each CPU, its latency traps by the
/// node that took them, and the domain each copy is charged to (the one whose touch made it).
#[repr(C)]
struct NumaPage {
    copies: [u64; MAX_CPUS],
    traps: [u64; MAX_NODES],
    payers: [u8; MAX_CPUS],
}

const _: () = assert!(MAX_DOMAINS <= u8::MAX as usize);

const _: () = assert!(core::mem::size_of::<NumaPage>() as u64 <= PAGE_SIZE);

fn numa_page(paddr: u64) -> &'static mut NumaPage {
    // SAFETY: a whole frame of guest RAM the kernel owns (reached through the direct map), only
    // touched under the kernel lock.
    unsafe { &mut *(direct_map(paddr) as *mut NumaPage) }
}

/// A domain's per-CPU views: the PML4 it runs on, by CPU (one frame).
fn cpu_views(paddr: u64) -> &'static mut [u64; MAX_CPUS] {
    // SAFETY: as for `numa_page`.
    unsafe { &mut *(direct_map(paddr) as *mut [u64; MAX_CPUS]) }
}

/// The page tables a domain runs on here, and the ones the kernel reads its memory through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Views {
    /// The domain's master view.
    pub master: u64,
    /// The view this CPU loads in CR3 (the master view when nothing is armed).
    pub local: u64,
}

/// The latency policy of this boot.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub mode: LatencyMode,
    /// Move a realm to a node once that many of its traps came from the node (0: never).
    pub migrate_after: u64,
}

/// The kernel's latency counts, reported to the VMM at shutdown.
pub const fn empty_report() -> LatencyReport {
    // SAFETY: LatencyReport is plain integers (zerocopy FromZeros); all-zero is valid.
    let mut report: LatencyReport = unsafe { core::mem::zeroed() };
    report.magic = LATENCY_REPORT_MAGIC;
    report
}

impl Kernel {
    /// The views `domain` runs on and is read through on this CPU, building its per-CPU view
    /// the first time it runs here.
    pub fn views_here(&mut self, domain: u32) -> Option<Views> {
        let master = self.domain(domain)?.view.pml4;
        if !self.policy.mode.traps() {
            return Some(Views { master, local: master });
        }
        let percpu = this_cpu();
        let (cpu, node) = (percpu.index as usize, percpu.node);
        let mut table = self.domain(domain)?.cpu_views;
        if table == 0 {
            table = self.table_frame(domain, node)?;
            self.domain_mut(domain)?.cpu_views = table;
        }
        let local = cpu_views(table)[cpu];
        if local != 0 {
            return Some(Views { master, local });
        }
        // Empty at first: realms enter it on their first touch here (`remote_fault`).
        let view = paging::new_view(PAGE_TABLES_PADDR, &mut || self.table_frame(domain, node)).ok()?;
        cpu_views(table)[cpu] = view.pml4;
        Some(Views { master, local: view.pml4 })
    }

    /// The per-CPU views of `domain` that exist.
    fn each_cpu_view(&self, domain: u32, mut visit: impl FnMut(View)) {
        let Some(table) = self.domain(domain).map(|d| d.cpu_views).filter(|&t| t != 0) else { return };
        let cpus = crate::boot_info().cpu_count as usize;
        for &pml4 in cpu_views(table).iter().take(cpus) {
            if pml4 != 0 {
                visit(paging::view_at(pml4));
            }
        }
    }

    /// Closes realm `id` in every per-CPU view of the domains in `domains` (their master
    /// views are the caller's business). The caller flushes the TLBs.
    pub fn close_in_cpu_views(&self, id: u32, domains: u64) {
        if !self.policy.mode.traps() {
            // No per-CPU views exist.
            return;
        }
        // Only the domains named, lowest first: a scan of all of them costs hundreds of
        // emulated instructions on every close.
        let mut rest = domains;
        while rest != 0 {
            let domain = rest.trailing_zeros();
            rest &= rest - 1;
            self.each_cpu_view(domain, |view| paging::close(&view, id));
        }
    }

    /// The directory through which this CPU maps realm `id` for `domain`: the shared one, or
    /// this CPU's armed copy when the realm is homed on another node. Without memory for the
    /// copy (or room in the shares it is charged to), the shared one: the domain goes on, its
    /// touches of this realm uncharged on this CPU (the console says so), rather than ending
    /// for want of a page table.
    fn directory_here(&mut self, id: u32, domain: u32) -> Option<u64> {
        let shared = self.realms.get(id)?.directory;
        match self.armed_copy_here(id, domain) {
            Ok(Some(copy)) => Some(copy),
            Ok(None) => Some(shared),
            Err(NoMemoryForCopy) => {
                crate::console::kprintln!(
                    "psyche: no memory for an armed copy of realm {} on cpu {}: its accesses there go uncharged",
                    crate::console::Dec(id.into()),
                    crate::console::Dec(this_cpu().index.into())
                );
                Some(shared)
            }
        }
    }

    /// This CPU's armed copy of realm `id`'s tables, made now for `domain`'s touch if needed;
    /// `None` when the realm needs none here (it is local, or a root realm). The NUMA page is
    /// charged to the realm's account, the copy to `domain`'s.
    fn armed_copy_here(&mut self, id: u32, domain: u32) -> Result<Option<u64>, NoMemoryForCopy> {
        let percpu = this_cpu();
        let (cpu, node) = (percpu.index as usize, percpu.node);
        let Some(realm) = self.realms.get(id) else { return Ok(None) };
        let (directory, home, tables, account) = (realm.directory, realm.home, realm.tables, realm.account);
        if realm.root_of.is_some() || home == node || tables == 0 {
            return Ok(None);
        }
        let mut numa = realm.numa;
        if numa == 0 {
            numa = self.charged_run_near(account, home, 1).ok_or(NoMemoryForCopy)?.1 .0;
            if let Some(realm) = self.realms.get_mut(id) {
                realm.numa = numa;
            }
        }
        let copy = numa_page(numa).copies[cpu];
        if copy != 0 {
            return Ok(Some(copy));
        }
        let (from, copy) = self.charged_run_near(domain, node, 1 + tables).ok_or(NoMemoryForCopy)?;
        // The realm's page tables follow its directory in its run (`paging::build_realm_tables`).
        if hypercall(Hypercall::ArmedCopy, [directory + PAGE_SIZE, copy.0, tables, 0, 0, 0]) != 0 {
            self.release_charged(domain, from, copy, 1 + tables);
            return Err(NoMemoryForCopy);
        }
        let page = numa_page(numa);
        page.copies[cpu] = copy.0;
        page.payers[cpu] = domain as u8;
        Ok(Some(copy.0))
    }

    /// Frees a realm's armed copies (each back to the domain it is charged to) and its NUMA
    /// page (back to `account`, the realm's): it is being destroyed or moved, every view has
    /// closed it and the TLBs are flushed.
    pub fn release_numa(&mut self, numa: u64, tables: u64, account: u32) {
        if numa == 0 {
            return;
        }
        for cpu in 0..crate::boot_info().cpu_count as usize {
            let page = numa_page(numa);
            let (copy, payer) = (page.copies[cpu], page.payers[cpu]);
            if copy != 0 {
                self.release_charged(u32::from(payer), node_of(copy), Frame(copy), 1 + tables);
            }
        }
        self.release_charged(account, node_of(numa), Frame(numa), 1);
    }

    /// Brings realm `id` into this CPU's view of `domain` (after its master view opened it).
    pub fn open_here(&mut self, domain: u32, id: u32) {
        let Some(master) = self.domain(domain).map(|d| d.view) else { return };
        let local = paging::view_at(current_pml4());
        if local == master {
            return;
        }
        if let (Some(writable), Some(directory)) = (paging::opened(&master, id), self.directory_here(id, domain)) {
            paging::open(&local, id, directory, writable);
        }
    }

    /// A fault in realm `id`, which `domain` has open: the realm is missing from this CPU's
    /// view (it catches up now), the page is armed (a latency trap), or the mapping came back
    /// while this CPU waited for the lock (a migration). `None` when it is none of these: a
    /// page past the realm's end, or a touch the mapping forbids.
    pub fn remote_fault(&mut self, domain: u32, id: u32, address: u64, touch: Touch) -> Option<FaultOutcome> {
        let master = self.domain(domain)?.view;
        let local = paging::view_at(current_pml4());
        if local != master && paging::opened(&local, id).is_none() {
            self.open_here(domain, id);
            return paging::opened(&local, id).is_some().then_some(FaultOutcome::Restart);
        }
        let entry = paging::leaf_entry(&local, address)?;
        if !paging::is_armed(entry) {
            let mapped = entry.flags().contains(x86_64::structures::paging::PageTableFlags::PRESENT);
            return (mapped && !touch.present).then_some(FaultOutcome::Restart);
        }
        let percpu = this_cpu();
        let (from, page) = (percpu.node, address & !(PAGE_SIZE - 1));
        // An armed page means this CPU's copy exists, so the NUMA page does too.
        let (home, numa) = self.realms.get(id).map(|realm| (realm.home, realm.numa))?;
        let start = crate::arch::x86_64::cpu::rdtsc();
        let reply = hypercall(Hypercall::LatencyCharge, [u64::from(from), u64::from(home), page, u64::from(id), 0, 0]);
        let spent = crate::arch::x86_64::cpu::rdtsc().wrapping_sub(start);
        // An error reply (an unreachable pair, say) charges nothing; the page opens anyway.
        let ns = u64::from(reply).min(i32::MAX as u64);
        trace::emit(TraceKind::LatencyTrap, from << 16 | home, page, ns);
        let (from_index, home_index) = (from as usize % MAX_NODES, home as usize % MAX_NODES);
        self.latency.traps[from_index][home_index] += 1;
        self.latency.charged_ns[from_index][home_index] += ns;
        self.latency.charge_cycles[from_index][home_index] += spent;
        paging::disarm(entry);
        if percpu.remote_open_count == MAX_REMOTE_OPEN {
            rearm_here();
        }
        percpu.remote_open[percpu.remote_open_count] = page;
        percpu.remote_open_count += 1;
        let traps = &mut numa_page(numa).traps[from_index];
        *traps += 1;
        let policy = self.policy;
        if policy.migrate_after != 0 && *traps >= policy.migrate_after && self.frames.total_bytes(from_index) > 0 {
            // Most of its use comes from here: move it here. The page opened above goes with
            // the old copy, and the touch is restarted against the new home.
            if self.migrate(id, from).is_ok() {
                rearm_here();
                return Some(FaultOutcome::Restart);
            }
        }
        Some(if policy.mode.per_access() { FaultOutcome::Step } else { FaultOutcome::Restart })
    }

    /// Moves realm `id` to node `to`: see the module comment.
    pub fn migrate(&mut self, id: u32, to: u32) -> Result<(), SysError> {
        // Fields, not the whole realm: a structure copy is a `rep movs`, emulated per byte.
        let realm = self.realms.get(id).ok_or(SysError::NotFound)?;
        let (home, old_run, run_pages, tables, pages) =
            (realm.home, realm.run, realm.run_pages, realm.tables, realm.pages);
        let (open_in, old_directory, numa, account) = (realm.open_in, realm.directory, realm.numa, realm.account);
        if realm.root_of.is_some() || to >= crate::boot_info().node_count {
            return Err(SysError::InvalidArgument);
        }
        if home == to {
            return Ok(());
        }
        // The new frames are on the realm's account, on the node it moves to.
        let run = self.charged_run(account, to, run_pages)?;
        // Every user stops: no view maps the realm, and no TLB remembers it.
        let mut writable = [None; MAX_DOMAINS];
        for (domain, flag) in writable.iter_mut().enumerate() {
            if open_in & (1 << domain) != 0 {
                if let Some(d) = self.domain(domain as u32) {
                    *flag = paging::opened(&d.view, id);
                    paging::close(&d.view, id);
                }
            }
        }
        self.close_in_cpu_views(id, open_in);
        self.shootdown(open_in);
        let data = old_run + (1 + tables) * PAGE_SIZE;
        let new_data = run.0 + (1 + tables) * PAGE_SIZE;
        if hypercall(Hypercall::CopyFrames, [data, new_data, pages, 0, 0, 0]) != 0 {
            // Nothing moved: the users find the realm where it was.
            self.reopen(id, old_directory, &writable);
            self.release_charged(account, to, run, run_pages);
            return Err(SysError::OutOfMemory);
        }
        let directory = paging::build_realm_tables(run.0, pages);
        self.release_numa(numa, tables, account);
        self.release_charged(account, home, Frame(old_run), run_pages);
        if let Some(slot) = self.realms.get_mut(id) {
            slot.home = to;
            slot.run = run.0;
            slot.directory = directory;
            slot.numa = 0;
        }
        self.reopen(id, directory, &writable);
        self.latency.migrations += 1;
        trace::emit(TraceKind::RealmMigrate, home << 16 | to, u64::from(id), pages);
        Ok(())
    }

    /// Points the master views that had realm `id` open back at it, at `directory`.
    fn reopen(&self, id: u32, directory: u64, writable: &[Option<bool>; MAX_DOMAINS]) {
        for (domain, flag) in writable.iter().enumerate() {
            if let (Some(writable), Some(d)) = (flag, self.domain(domain as u32)) {
                paging::open(&d.view, id, directory, *writable);
            }
        }
    }

    /// `Syscall::RealmTraps`: realm `id`'s traps since it was created or moved, from `node`
    /// (every node for `u64::MAX`).
    pub fn realm_traps(&self, id: u32, node: u64) -> Result<u64, SysError> {
        let realm = self.realms.get(id).ok_or(SysError::NotFound)?;
        if realm.numa == 0 {
            return Ok(0);
        }
        let traps = &numa_page(realm.numa).traps;
        match node {
            u64::MAX => Ok(traps.iter().sum()),
            node if node < u64::from(crate::boot_info().node_count) => Ok(traps[node as usize]),
            _ => Err(SysError::InvalidArgument),
        }
    }

    /// Sends the latency counts to the VMM (once, at shutdown).
    pub fn report_latency(&mut self) {
        if !self.policy.mode.traps() {
            return;
        }
        self.latency.mode = self.policy.mode as u32;
        self.latency.node_count = crate::boot_info().node_count;
        let paddr = &self.latency as *const LatencyReport as u64 - psyche_abi::layout::KERNEL_VIRT_BASE;
        hypercall(Hypercall::ReportLatency, [paddr, 0, 0, 0, 0, 0]);
    }
}

/// The latency mode, for paths that run without the kernel lock.
static MODE: AtomicU32 = AtomicU32::new(LatencyMode::Off as u32);

/// Records the boot's latency mode (the bootstrap processor, before any program runs).
pub fn set_mode(mode: LatencyMode) {
    MODE.store(mode as u32, Ordering::Release);
}

/// Whether remote memory costs anything on this machine (a latency mode other than off).
pub fn traps() -> bool {
    MODE.load(Ordering::Acquire) != LatencyMode::Off as u32
}

/// Whether remote pages stay open for a window (until this CPU's next quantum boundary).
pub fn windowed() -> bool {
    MODE.load(Ordering::Acquire) == LatencyMode::Window as u32
}

/// A quantum boundary on this CPU: in window mode, the remote pages it opened close again.
pub fn end_windows() {
    if windowed() {
        rearm_here();
    }
}

/// The node whose memory holds `paddr`.
fn node_of(paddr: u64) -> u32 {
    psyche_kernel::machine::node_of_paddr(crate::boot_info(), paddr).unwrap_or(0)
}

fn current_pml4() -> u64 {
    x86_64::registers::control::Cr3::read_raw().0.start_address().as_u64()
}

/// Arms again every page this CPU opened after a latency trap: at the end of its window (a
/// quantum boundary or a domain switch) or after the single-stepped instruction.
///
/// No lock is needed: the pages are in this CPU's own copies, and a CPU that frees a copy
/// first closes it in every view and waits for this CPU to flush its TLB, which it does only
/// with interrupts on, never in the middle of this.
pub fn rearm_here() {
    let percpu = this_cpu();
    if percpu.remote_open_count == 0 {
        return;
    }
    let view = paging::view_at(current_pml4());
    for &page in &percpu.remote_open[..percpu.remote_open_count] {
        if let Some(entry) = paging::leaf_entry(&view, page) {
            if paging::rearm(entry) {
                x86_64::instructions::tlb::flush(x86_64::VirtAddr::new_truncate(page));
            }
        }
    }
    percpu.remote_open_count = 0;
}

/// The termination a fault in an open realm comes to when it is not a NUMA matter.
pub fn open_realm_error(touch: Touch) -> Termination {
    if touch.present && touch.write {
        Termination::WriteReadOnly
    } else {
        Termination::NoRealm
    }
}

//! Shares: how many realms, how many names and how many frames on each node one protection
//! domain may hold, so that a program that takes all it can takes only its own share and every
//! other program keeps its own.
//!
//! A domain's *account* is charged for every frame the kernel takes for it: its realms' frame
//! runs (directory, page tables and data), their NUMA pages, the armed copies of other realms'
//! tables made for its touches, its stack, its views and its upcall work areas. Frames go back
//! to the account when they go back to a pool (a realm destroyed, by its owner or at the end of
//! the program; a realm moved off a node). Calls that create something refuse a charge beyond
//! the share (`SysError::OverQuota`); the frames a domain needs just to run on a CPU (its stack
//! and views at its start, its per-CPU view and work area when it first runs there) are charged
//! but never refused, since no call is there to fail: the fair default keeps room for those on
//! every node.
//!
//! Shares are per node: a domain's share of a node is the part of that node's memory it may
//! hold, so a program that fills one node leaves every other program its part of it. They are
//! set once per boot: by default the free memory of each node, less the room kept for per-CPU
//! structures, divided equally among the programs loaded, and the realm ids and name-table
//! entries likewise; the kernel command line (`quota=`) overrides them for every program or for
//! one.
//!
//! Plain data and logic, unit-tested on the host; the kernel holds one set under its lock.

use psyche_abi::realm::MAX_REALMS;
use psyche_abi::{MAX_NODES, MAX_PROGRAMS};

use crate::names::MAX_NAMES;

/// Frames the fair default keeps on a node, per CPU of that node and per program, for what a
/// domain needs to run on a CPU: a per-CPU view (2 frames), an upcall work area (4) and a page
/// table for it (1), and one frame for the list of its per-CPU views.
pub const PER_CPU_PAGES: u64 = 8;

/// Realm ids programs can create realms at (the first [`MAX_PROGRAMS`] are root realms).
pub const CREATABLE_REALMS: u64 = (MAX_REALMS - MAX_PROGRAMS) as u64;

/// A share, or an override of some of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuotaSpec {
    /// Realms the domain may hold at once.
    pub realms: Option<u64>,
    /// Bytes of each node's memory it may hold.
    pub memory: Option<u64>,
    /// Names it may have published at once.
    pub names: Option<u64>,
}

impl QuotaSpec {
    /// Whether it overrides anything.
    pub fn is_set(&self) -> bool {
        self.realms.is_some() || self.memory.is_some() || self.names.is_some()
    }
}

/// A charge the account's share has no room for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverShare;

/// One domain's share and what it holds of it.
#[derive(Clone, Copy, Debug)]
struct Account {
    realm_limit: u64,
    name_limit: u64,
    page_limit: [u64; MAX_NODES],
    realms: u64,
    pages: [u64; MAX_NODES],
}

/// Every domain's account (domain k is program k).
pub struct Quotas {
    accounts: [Account; MAX_PROGRAMS],
}

impl Default for Quotas {
    fn default() -> Self {
        Self::new()
    }
}

/// The fair default of a node's pages for one of `programs` programs: its free pages less
/// [`PER_CPU_PAGES`] per CPU of the node for every program, divided equally.
pub fn fair_pages(programs: u64, free_pages: u64, cpus: u64) -> u64 {
    let programs = programs.max(1);
    free_pages.saturating_sub(programs.saturating_mul(cpus).saturating_mul(PER_CPU_PAGES)) / programs
}

impl Quotas {
    /// No shares at all (nothing can be charged until [`Quotas::configure`]).
    pub const fn new() -> Self {
        const EMPTY: Account =
            Account { realm_limit: 0, name_limit: 0, page_limit: [0; MAX_NODES], realms: 0, pages: [0; MAX_NODES] };
        Self { accounts: [EMPTY; MAX_PROGRAMS] }
    }

    /// Sets the shares of `programs` programs on a machine whose node n has `free_pages(n)`
    /// free pages and `cpus(n)` CPUs: `each[k]`, then `all`, then the fair default. Each of the
    /// two is asked once per node (this runs at emulated CPL0 at boot).
    pub fn configure(
        &mut self,
        programs: usize,
        nodes: usize,
        free_pages: impl Fn(usize) -> u64,
        cpus: impl Fn(usize) -> u64,
        all: &QuotaSpec,
        each: &[QuotaSpec],
    ) {
        let count = programs.clamp(1, MAX_PROGRAMS) as u64;
        // The fair share of each node is the same for every program.
        let mut fair = [0u64; MAX_NODES];
        for (node, pages) in fair.iter_mut().enumerate().take(nodes.min(MAX_NODES)) {
            *pages = fair_pages(count, free_pages(node), cpus(node));
        }
        for (k, account) in self.accounts.iter_mut().enumerate().take(programs.min(MAX_PROGRAMS)) {
            let mine = each.get(k).copied().unwrap_or_default();
            account.realm_limit = mine.realms.or(all.realms).unwrap_or(CREATABLE_REALMS / count);
            account.name_limit = mine.names.or(all.names).unwrap_or(MAX_NAMES as u64 / count);
            let memory = mine.memory.or(all.memory);
            for (limit, &fair) in account.page_limit.iter_mut().zip(&fair).take(nodes.min(MAX_NODES)) {
                *limit = memory.map_or(fair, |bytes| bytes / psyche_abi::layout::PAGE_SIZE);
            }
        }
    }

    fn account(&mut self, account: u32) -> Option<&mut Account> {
        self.accounts.get_mut(account as usize)
    }

    /// Charges `pages` frames of `node` to `account`, if its share there has room.
    pub fn charge_pages(&mut self, account: u32, node: u32, pages: u64) -> Result<(), OverShare> {
        let a = self.account(account).ok_or(OverShare)?;
        let (used, limit) = match (a.pages.get(node as usize), a.page_limit.get(node as usize)) {
            (Some(&used), Some(&limit)) => (used, limit),
            _ => return Err(OverShare),
        };
        if used.saturating_add(pages) > limit {
            return Err(OverShare);
        }
        a.pages[node as usize] = used + pages;
        Ok(())
    }

    /// Whether `account`'s share of `node` has room for `pages` more frames.
    pub fn has_room(&self, account: u32, node: u32, pages: u64) -> bool {
        let Some(a) = self.accounts.get(account as usize) else { return false };
        match (a.pages.get(node as usize), a.page_limit.get(node as usize)) {
            (Some(&used), Some(&limit)) => used.saturating_add(pages) <= limit,
            _ => false,
        }
    }

    /// Charges frames `account` needs to run, whatever its share says (see the module
    /// comment). Frames of no account (none yet) are charged to nobody.
    pub fn force_pages(&mut self, account: u32, node: u32, pages: u64) {
        if let Some(used) = self.account(account).and_then(|a| a.pages.get_mut(node as usize)) {
            *used = used.saturating_add(pages);
        }
    }

    /// Gives `pages` frames of `node` back to `account`.
    pub fn credit_pages(&mut self, account: u32, node: u32, pages: u64) {
        if let Some(used) = self.account(account).and_then(|a| a.pages.get_mut(node as usize)) {
            *used = used.saturating_sub(pages);
        }
    }

    /// Charges one realm to `account`, if its share has room.
    pub fn charge_realm(&mut self, account: u32) -> Result<(), OverShare> {
        let a = self.account(account).ok_or(OverShare)?;
        if a.realms >= a.realm_limit {
            return Err(OverShare);
        }
        a.realms += 1;
        Ok(())
    }

    /// Gives one realm back to `account`.
    pub fn credit_realm(&mut self, account: u32) {
        if let Some(a) = self.account(account) {
            a.realms = a.realms.saturating_sub(1);
        }
    }

    /// How many names `account` may have published at once.
    pub fn name_share(&self, account: u32) -> usize {
        self.accounts.get(account as usize).map_or(0, |a| usize::try_from(a.name_limit).unwrap_or(usize::MAX))
    }

    /// Frames of `node` charged to `account`.
    pub fn pages_held(&self, account: u32, node: u32) -> u64 {
        self.accounts.get(account as usize).and_then(|a| a.pages.get(node as usize)).copied().unwrap_or(0)
    }

    /// `account`'s share of `node`, in frames.
    pub fn page_share(&self, account: u32, node: u32) -> u64 {
        self.accounts.get(account as usize).and_then(|a| a.page_limit.get(node as usize)).copied().unwrap_or(0)
    }

    /// Realms charged to `account`, and its share of them.
    pub fn realms_held(&self, account: u32) -> (u64, u64) {
        self.accounts.get(account as usize).map_or((0, 0), |a| (a.realms, a.realm_limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_programs_two_nodes(all: QuotaSpec, each: &[QuotaSpec]) -> Quotas {
        let mut quotas = Quotas::new();
        // Node 0: 1000 free pages, 2 CPUs; node 1: 500 free pages, no CPU.
        let free = |node: usize| [1000, 500][node];
        let cpus = |node: usize| [2, 0][node];
        quotas.configure(2, 2, free, cpus, &all, each);
        quotas
    }

    #[test]
    fn the_default_divides_each_node_and_the_tables_equally() {
        let quotas = two_programs_two_nodes(QuotaSpec::default(), &[]);
        // (1000 - 2 programs * 2 CPUs * 8) / 2 and 500 / 2.
        assert_eq!(quotas.page_share(0, 0), 484);
        assert_eq!(quotas.page_share(1, 0), 484);
        assert_eq!(quotas.page_share(1, 1), 250);
        assert_eq!(quotas.realms_held(0), (0, CREATABLE_REALMS / 2));
        assert_eq!(quotas.name_share(1), MAX_NAMES / 2);
        // Nothing for a domain that is not a program.
        assert_eq!(quotas.page_share(2, 0), 0);
        assert_eq!(fair_pages(0, 100, 0), 100, "no programs counts as one");
        assert_eq!(fair_pages(4, 10, 1), 0, "a node too small for the reserve has no share");
    }

    #[test]
    fn overrides_go_per_program_then_for_all() {
        let all = QuotaSpec { realms: Some(10), memory: Some(40960), names: None };
        let one = QuotaSpec { realms: Some(3), memory: None, names: Some(1) };
        let quotas = two_programs_two_nodes(all, &[QuotaSpec::default(), one]);
        assert_eq!(quotas.realms_held(0).1, 10);
        assert_eq!(quotas.realms_held(1).1, 3);
        assert_eq!(quotas.page_share(0, 1), 10, "40960 bytes are 10 pages, on every node");
        assert_eq!(quotas.page_share(1, 0), 10, "program 1 gets memory from the override for all");
        assert_eq!(quotas.name_share(0), MAX_NAMES / 2);
        assert_eq!(quotas.name_share(1), 1);
    }

    #[test]
    fn one_account_running_out_leaves_the_other_its_share() {
        let mut quotas = two_programs_two_nodes(QuotaSpec::default(), &[]);
        assert_eq!(quotas.charge_pages(1, 0, 400), Ok(()));
        assert_eq!(quotas.charge_pages(1, 0, 85), Err(OverShare));
        assert_eq!(quotas.charge_pages(1, 0, 84), Ok(()));
        assert!(!quotas.has_room(1, 0, 1));
        assert!(quotas.has_room(0, 0, 484));
        assert_eq!(quotas.charge_pages(0, 0, 484), Ok(()));
        // Node 1 is a separate share.
        assert_eq!(quotas.charge_pages(1, 1, 250), Ok(()));
        // Giving back makes room again.
        quotas.credit_pages(1, 0, 100);
        assert_eq!(quotas.pages_held(1, 0), 384);
        assert_eq!(quotas.charge_pages(1, 0, 100), Ok(()));
        // Unknown accounts and nodes are refused, and credits to them do nothing.
        assert_eq!(quotas.charge_pages(u32::MAX, 0, 1), Err(OverShare));
        assert_eq!(quotas.charge_pages(0, MAX_NODES as u32, 1), Err(OverShare));
        quotas.credit_pages(u32::MAX, 0, 1);
        quotas.credit_pages(0, 0, 10_000);
        assert_eq!(quotas.pages_held(0, 0), 0, "a credit never goes below zero");
    }

    #[test]
    fn forced_charges_count_but_are_never_refused() {
        let mut quotas = two_programs_two_nodes(QuotaSpec { memory: Some(4096), ..QuotaSpec::default() }, &[]);
        quotas.force_pages(0, 0, 70);
        assert_eq!(quotas.pages_held(0, 0), 70);
        assert_eq!(quotas.charge_pages(0, 0, 1), Err(OverShare), "the forced frames used the share up");
        quotas.force_pages(u32::MAX, 0, 5);
    }

    #[test]
    fn realm_counts_are_bounded_and_given_back() {
        let mut quotas = two_programs_two_nodes(QuotaSpec { realms: Some(2), ..QuotaSpec::default() }, &[]);
        assert_eq!(quotas.charge_realm(0), Ok(()));
        assert_eq!(quotas.charge_realm(0), Ok(()));
        assert_eq!(quotas.charge_realm(0), Err(OverShare));
        assert_eq!(quotas.charge_realm(1), Ok(()), "the other program's realms are its own");
        quotas.credit_realm(0);
        assert_eq!(quotas.charge_realm(0), Ok(()));
        assert_eq!(quotas.charge_realm(99), Err(OverShare));
        quotas.credit_realm(99);
    }
}

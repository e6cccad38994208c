//! Physical frames, from one pool per NUMA node.
//!
//! Every frame handed out is zero: a pool starts as the VMM's free range of its node, which is
//! never-touched (zero) guest RAM, and the kernel never zeroes a frame itself (at CPL0 on our
//! hosts `rep stos` over 4 KiB costs ~265 us). Runs of frames given back are zeroed first, in
//! bulk by the VMM, and kept in a per-node list of free runs (sorted, merged with their
//! neighbours) that allocation tries before the bump pointer.

use psyche_abi::layout::PAGE_SIZE;
use psyche_abi::MAX_NODES;

/// A guest-physical frame address (4 KiB aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frame(pub u64);

/// Most separate free runs a node keeps; a run given back when the list is full is lost
/// (counted in [`FramePools::leaked_pages`]).
pub const MAX_FREE_RUNS: usize = 32;

/// A run of zeroed free frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Run {
    base: u64,
    pages: u64,
}

/// One node's pool: free runs, then a bump pointer over never-touched memory.
#[derive(Clone, Copy, Debug)]
struct NodePool {
    next: u64,
    end: u64,
    /// Bytes of RAM the node has in all (reported, not allocated from).
    total: u64,
    runs: [Run; MAX_FREE_RUNS],
    run_count: usize,
}

impl NodePool {
    const EMPTY: Self =
        Self { next: 0, end: 0, total: 0, runs: [Run { base: 0, pages: 0 }; MAX_FREE_RUNS], run_count: 0 };
}

/// The frame pools of all nodes.
#[derive(Debug)]
pub struct FramePools {
    pools: [NodePool; MAX_NODES],
    nodes: usize,
    leaked: u64,
}

impl FramePools {
    /// No pools at all.
    pub const fn empty() -> Self {
        Self { pools: [NodePool::EMPTY; MAX_NODES], nodes: 0, leaked: 0 }
    }

    /// Gives node `node` the free range `[base, end)` of a node with `total` bytes of RAM.
    /// The range is trimmed inward to whole pages. Nodes beyond [`MAX_NODES`] are ignored
    /// (the boot info cannot describe them).
    pub fn add_node(&mut self, node: usize, base: u64, end: u64, total: u64) {
        let Some(pool) = self.pools.get_mut(node) else { return };
        let next = base.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let end = end & !(PAGE_SIZE - 1);
        *pool = NodePool { next, end: end.max(next), total, ..NodePool::EMPTY };
        self.nodes = self.nodes.max(node + 1);
    }

    /// A zeroed frame from `node`'s pool, or `None` when it is empty.
    pub fn alloc(&mut self, node: usize) -> Option<Frame> {
        self.alloc_run(node, 1)
    }

    /// `pages` physically contiguous zeroed frames from `node`: the first free run that is
    /// large enough, else the never-touched rest of the node.
    pub fn alloc_run(&mut self, node: usize, pages: u64) -> Option<Frame> {
        let pool = self.pools.get_mut(node)?;
        if pages == 0 {
            return None;
        }
        if let Some(i) = pool.runs[..pool.run_count].iter().position(|run| run.pages >= pages) {
            let run = &mut pool.runs[i];
            let frame = Frame(run.base);
            run.base += pages * PAGE_SIZE;
            run.pages -= pages;
            if run.pages == 0 {
                pool.runs.copy_within(i + 1..pool.run_count, i);
                pool.run_count -= 1;
            }
            return Some(frame);
        }
        let bytes = pages.checked_mul(PAGE_SIZE)?;
        if pool.end.saturating_sub(pool.next) < bytes {
            return None;
        }
        let frame = Frame(pool.next);
        pool.next += bytes;
        Some(frame)
    }

    /// Gives back `pages` frames from `base` on `node`. They must already be zero. Returns
    /// whether the pool took them: false when they were lost to a full free-run list (or the
    /// node does not exist), so that whoever was charged for them stays charged.
    pub fn free_run(&mut self, node: usize, base: Frame, pages: u64) -> bool {
        let Some(pool) = self.pools.get_mut(node) else { return false };
        if pages == 0 {
            return true;
        }
        let end = base.0 + pages * PAGE_SIZE;
        // Back at the bump pointer: just move it back, over a free run that now ends there too
        // (or a large run could no longer be made of memory that is free and contiguous).
        if end == pool.next {
            pool.next = base.0;
            if let Some(last) = pool.runs[..pool.run_count].last().copied() {
                if last.base + last.pages * PAGE_SIZE == pool.next {
                    pool.next = last.base;
                    pool.run_count -= 1;
                }
            }
            return true;
        }
        let at = pool.runs[..pool.run_count].partition_point(|run| run.base < base.0);
        let merges_before = at > 0 && pool.runs[at - 1].base + pool.runs[at - 1].pages * PAGE_SIZE == base.0;
        let merges_after = at < pool.run_count && pool.runs[at].base == end;
        match (merges_before, merges_after) {
            (true, true) => {
                pool.runs[at - 1].pages += pages + pool.runs[at].pages;
                pool.runs.copy_within(at + 1..pool.run_count, at);
                pool.run_count -= 1;
            }
            (true, false) => pool.runs[at - 1].pages += pages,
            (false, true) => {
                pool.runs[at].base = base.0;
                pool.runs[at].pages += pages;
            }
            (false, false) if pool.run_count < MAX_FREE_RUNS => {
                pool.runs.copy_within(at..pool.run_count, at + 1);
                pool.runs[at] = Run { base: base.0, pages };
                pool.run_count += 1;
            }
            (false, false) => {
                self.leaked += pages;
                return false;
            }
        }
        true
    }

    /// Pages given back that did not fit in a full free-run list.
    pub fn leaked_pages(&self) -> u64 {
        self.leaked
    }

    /// A zeroed frame from `node` or, when it has none left, from the node nearest to it by
    /// `distance` (ties go to the lower id; unreachable nodes, distance 255, are never used).
    pub fn alloc_near(&mut self, node: usize, distance: impl Fn(usize, usize) -> u8) -> Option<Frame> {
        self.alloc_run_near(node, 1, distance)
    }

    /// `pages` contiguous zeroed frames from `node` or, when it cannot give them, from the
    /// nearest node by `distance` with that much free (as for [`FramePools::alloc_near`]).
    pub fn alloc_run_near(&mut self, node: usize, pages: u64, distance: impl Fn(usize, usize) -> u8) -> Option<Frame> {
        self.alloc_run_near_where(node, pages, distance, |_| true).map(|(_, frame)| frame)
    }

    /// As [`FramePools::alloc_run_near`], from nodes `allowed` accepts only (a share with room
    /// there, say); returns the node the frames came from too.
    pub fn alloc_run_near_where(
        &mut self,
        node: usize,
        pages: u64,
        distance: impl Fn(usize, usize) -> u8,
        allowed: impl Fn(usize) -> bool,
    ) -> Option<(usize, Frame)> {
        if allowed(node) {
            if let Some(frames) = self.alloc_run(node, pages) {
                return Some((node, frames));
            }
        }
        let bytes = pages.checked_mul(PAGE_SIZE)?;
        let nearest = (0..self.nodes)
            .filter(|&other| other != node && self.free_bytes(other) >= bytes && allowed(other))
            .filter(|&other| distance(node, other) != 255)
            .min_by_key(|&other| (distance(node, other), other))?;
        self.alloc_run(nearest, pages).map(|frames| (nearest, frames))
    }

    /// Bytes still free on `node`.
    pub fn free_bytes(&self, node: usize) -> u64 {
        self.pools.get(node).map_or(0, |pool| {
            let runs: u64 = pool.runs[..pool.run_count].iter().map(|run| run.pages * PAGE_SIZE).sum();
            pool.end - pool.next + runs
        })
    }

    /// Bytes of RAM on `node`, used or not.
    pub fn total_bytes(&self, node: usize) -> u64 {
        self.pools.get(node).map_or(0, |pool| pool.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distance(a: usize, b: usize) -> u8 {
        const D: [[u8; 3]; 3] = [[10, 20, 30], [20, 10, 255], [30, 255, 10]];
        D[a][b]
    }

    #[test]
    fn allocates_page_aligned_frames_until_empty() {
        let mut pools = FramePools::empty();
        pools.add_node(0, 0x1001, 0x4000, 0x10_0000);
        assert_eq!(pools.alloc(0), Some(Frame(0x2000)));
        assert_eq!(pools.alloc(0), Some(Frame(0x3000)));
        assert_eq!(pools.alloc(0), None);
        assert_eq!(pools.total_bytes(0), 0x10_0000);
    }

    #[test]
    fn falls_back_to_the_nearest_reachable_node() {
        let mut pools = FramePools::empty();
        pools.add_node(0, 0x1000, 0x2000, 0x1000);
        pools.add_node(1, 0x0, 0x0, 0);
        pools.add_node(2, 0x10_0000, 0x10_1000, 0x1000);
        // Node 1 is empty; node 0 is at distance 20, node 2 unreachable.
        assert_eq!(pools.alloc_near(1, distance), Some(Frame(0x1000)));
        assert_eq!(pools.alloc_near(1, distance), None);
        assert_eq!(pools.alloc_near(2, distance), Some(Frame(0x10_0000)));
    }

    #[test]
    fn runs_fall_back_to_the_nearest_node_with_room() {
        let mut pools = FramePools::empty();
        pools.add_node(0, 0x1000, 0x3000, 0x2000);
        pools.add_node(1, 0x10_0000, 0x10_1000, 0x1000);
        pools.add_node(2, 0x20_0000, 0x20_4000, 0x4000);
        // Node 1 has one frame: two come from node 0 (distance 20), not node 2 (unreachable).
        assert_eq!(pools.alloc_run_near(1, 2, distance), Some(Frame(0x1000)));
        assert_eq!(pools.alloc_run_near(1, 2, distance), None);
        assert_eq!(pools.alloc_run_near(1, 1, distance), Some(Frame(0x10_0000)));
        assert_eq!(pools.alloc_run_near(0, 3, distance), Some(Frame(0x20_0000)));
    }

    #[test]
    fn nearest_allowed_node_only() {
        let mut pools = FramePools::empty();
        pools.add_node(0, 0x1000, 0x3000, 0x2000);
        pools.add_node(1, 0x10_0000, 0x10_2000, 0x2000);
        pools.add_node(2, 0x20_0000, 0x20_4000, 0x4000);
        // Node 0 has room but is not allowed: node 1 is the nearest allowed one.
        assert_eq!(pools.alloc_run_near_where(0, 1, distance, |n| n != 0), Some((1, Frame(0x10_0000))));
        // From node 1, node 0 is allowed and nearest once node 1 is not.
        assert_eq!(pools.alloc_run_near_where(1, 2, distance, |n| n != 1), Some((0, Frame(0x1000))));
        assert_eq!(pools.alloc_run_near_where(2, 1, distance, |_| false), None);
    }

    #[test]
    fn runs_are_reused_first_fit_and_merged() {
        let mut pools = FramePools::empty();
        pools.add_node(0, 0x10_0000, 0x20_0000, 0x10_0000);
        let a = pools.alloc_run(0, 4).unwrap();
        let b = pools.alloc_run(0, 2).unwrap();
        let c = pools.alloc_run(0, 4).unwrap();
        let _d = pools.alloc_run(0, 1).unwrap();
        assert_eq!((a.0, b.0, c.0), (0x10_0000, 0x10_4000, 0x10_6000));
        let free_before = pools.free_bytes(0);
        pools.free_run(0, a, 4);
        pools.free_run(0, c, 4);
        // A 3-page request fits in the first run.
        assert_eq!(pools.alloc_run(0, 3), Some(Frame(0x10_0000)));
        pools.free_run(0, Frame(0x10_0000), 3);
        // Freeing b joins a, b and c into one run of 10 pages.
        pools.free_run(0, b, 2);
        assert_eq!(pools.free_bytes(0), free_before + 10 * PAGE_SIZE);
        assert_eq!(pools.alloc_run(0, 10), Some(Frame(0x10_0000)));
    }

    #[test]
    fn a_run_at_the_bump_pointer_goes_back_to_it() {
        let mut pools = FramePools::empty();
        pools.add_node(0, 0x1000, 0x9000, 0x8000);
        let a = pools.alloc_run(0, 8).unwrap();
        assert_eq!(pools.alloc_run(0, 1), None);
        pools.free_run(0, a, 8);
        assert_eq!(pools.alloc_run(0, 8), Some(a));
    }

    #[test]
    fn the_bump_pointer_takes_back_a_free_run_that_ends_at_it() {
        let mut pools = FramePools::empty();
        pools.add_node(0, 0x1000, 0x9000, 0x8000);
        let a = pools.alloc_run(0, 3).unwrap();
        let b = pools.alloc_run(0, 2).unwrap();
        pools.free_run(0, a, 3);
        pools.free_run(0, b, 2);
        // All eight pages are one run again.
        assert_eq!(pools.alloc_run(0, 8), Some(a));
    }

    #[test]
    fn a_full_run_list_leaks_and_says_so() {
        let mut pools = FramePools::empty();
        pools.add_node(0, 0, 0x100_0000, 0x100_0000);
        let frames: Vec<_> = (0..2 * MAX_FREE_RUNS + 2).map(|_| pools.alloc(0).unwrap()).collect();
        // Free every other frame: no two are neighbours.
        let kept = frames.iter().step_by(2).map(|frame| pools.free_run(0, *frame, 1)).filter(|&kept| kept).count();
        assert_eq!(kept, MAX_FREE_RUNS, "the pool says which run it could not keep");
        assert_eq!(pools.leaked_pages(), 1);
    }

    #[test]
    fn out_of_range_nodes_are_harmless() {
        let mut pools = FramePools::empty();
        pools.add_node(MAX_NODES, 0, 0x1000, 0x1000);
        assert_eq!(pools.alloc(MAX_NODES), None);
        assert_eq!(pools.free_bytes(MAX_NODES + 5), 0);
    }
}

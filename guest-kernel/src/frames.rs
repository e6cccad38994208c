//! Physical frames, from one pool per NUMA node.
//!
//! Every frame handed out is zero: a pool starts as the VMM's free range of its node, which is
//! never-touched (zero) guest RAM, and the kernel never zeroes a frame itself (at CPL0 on our
//! hosts `rep stos` over 4 KiB costs ~265 us). Freed frames will be recycled through a pool of
//! frames zeroed in bulk outside the kernel; until that exists, frames are only allocated.

use psyche_abi::layout::PAGE_SIZE;
use psyche_abi::MAX_NODES;

/// A guest-physical frame address (4 KiB aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frame(pub u64);

/// One node's pool: a bump pointer over never-touched memory.
#[derive(Clone, Copy, Debug, Default)]
struct NodePool {
    next: u64,
    end: u64,
    /// Bytes of RAM the node has in all (reported, not allocated from).
    total: u64,
}

/// The frame pools of all nodes.
#[derive(Debug)]
pub struct FramePools {
    pools: [NodePool; MAX_NODES],
    nodes: usize,
}

impl FramePools {
    /// No pools at all.
    pub const fn empty() -> Self {
        Self { pools: [NodePool { next: 0, end: 0, total: 0 }; MAX_NODES], nodes: 0 }
    }

    /// Gives node `node` the free range `[base, end)` of a node with `total` bytes of RAM.
    /// The range is trimmed inward to whole pages. Nodes beyond [`MAX_NODES`] are ignored
    /// (the boot info cannot describe them).
    pub fn add_node(&mut self, node: usize, base: u64, end: u64, total: u64) {
        let Some(pool) = self.pools.get_mut(node) else { return };
        let next = base.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let end = end & !(PAGE_SIZE - 1);
        *pool = NodePool { next, end: end.max(next), total };
        self.nodes = self.nodes.max(node + 1);
    }

    /// A zeroed frame from `node`'s pool, or `None` when it is empty.
    pub fn alloc(&mut self, node: usize) -> Option<Frame> {
        let pool = self.pools.get_mut(node)?;
        if pool.next >= pool.end {
            return None;
        }
        let frame = Frame(pool.next);
        pool.next += PAGE_SIZE;
        Some(frame)
    }

    /// A zeroed frame from `node` or, when it has none left, from the node nearest to it by
    /// `distance` (ties go to the lower id; unreachable nodes, distance 255, are never used).
    pub fn alloc_near(&mut self, node: usize, distance: impl Fn(usize, usize) -> u8) -> Option<Frame> {
        if let Some(frame) = self.alloc(node) {
            return Some(frame);
        }
        let nearest = (0..self.nodes)
            .filter(|&other| other != node && self.free_bytes(other) > 0)
            .filter(|&other| distance(node, other) != 255)
            .min_by_key(|&other| (distance(node, other), other))?;
        self.alloc(nearest)
    }

    /// Bytes still free on `node`.
    pub fn free_bytes(&self, node: usize) -> u64 {
        self.pools.get(node).map_or(0, |pool| pool.end - pool.next)
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
    fn out_of_range_nodes_are_harmless() {
        let mut pools = FramePools::empty();
        pools.add_node(MAX_NODES, 0, 0x1000, 0x1000);
        assert_eq!(pools.alloc(MAX_NODES), None);
        assert_eq!(pools.free_bytes(MAX_NODES + 5), 0);
    }
}

//! Reading one vCPU's trace ring from guest memory, trusting nothing in it.
//!
//! The kernel owns the header's `head` and `lost`, the VMM owns `tail`; records `[tail, head)`
//! are the VMM's to read (record `n` is in slot `n % capacity`). A drain reads `head` (acquire),
//! copies the records, checks each, and then publishes the new `tail` (release), which frees
//! their slots for the kernel.

use std::sync::atomic::{AtomicU64, Ordering};

use psyche_abi::trace::{TraceKind, TraceRecord, TRACE_RECORDS_OFFSET, TRACE_RING_CAPACITY};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::FromBytes;

use super::{VcpuStats, MAX_PROBLEMS};

const RECORD_SIZE: u64 = core::mem::size_of::<TraceRecord>() as u64;
const HEAD_OFFSET: u64 = 0;
const TAIL_OFFSET: u64 = 8;
const LOST_OFFSET: u64 = 16;
const CAPACITY_OFFSET: u64 = 24;

/// The VMM's side of one ring.
pub(crate) struct Ring {
    cpu: u32,
    /// Guest-physical base of the trace area.
    base: u64,
    /// Records consumed: the VMM's own count, never read back from the guest.
    tail: u64,
    /// The time of the last record kept (records of one CPU never go back in time).
    last_tsc: u64,
    bad_capacity_seen: bool,
    /// Reused copy buffer (at most one ring's worth).
    buffer: Vec<u8>,
    pub(crate) records: Vec<TraceRecord>,
    pub(crate) stats: VcpuStats,
}

/// Takes up to `wanted` records from `budget`; returns how many were granted.
pub(crate) fn take_budget(budget: &AtomicU64, wanted: u64) -> u64 {
    let mut granted = 0;
    let _ = budget.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
        granted = left.min(wanted);
        Some(left - granted)
    });
    granted
}

impl Ring {
    pub(crate) fn new(cpu: u32, base: u64) -> Self {
        Self {
            cpu,
            base,
            tail: 0,
            last_tsc: 0,
            bad_capacity_seen: false,
            buffer: Vec::new(),
            records: Vec::new(),
            stats: VcpuStats { cpu, ..VcpuStats::default() },
        }
    }

    /// Counts a corrupt state or record; describes the first few.
    fn problem(&mut self, describe: impl FnOnce() -> String) {
        self.stats.corrupt = self.stats.corrupt.saturating_add(1);
        if self.stats.problems.len() < MAX_PROBLEMS {
            self.stats.problems.push(describe());
        }
    }

    fn address(&self, offset: u64) -> GuestAddress {
        GuestAddress(self.base.wrapping_add(offset))
    }

    /// Reads what the kernel published since the last drain: at most one ring's worth of
    /// records, whatever the header says. Records beyond `budget` are read (to free their slots)
    /// but not kept.
    pub(crate) fn drain(&mut self, mem: &GuestMemoryMmap, budget: &AtomicU64) {
        let capacity = TRACE_RING_CAPACITY;
        let Ok(head) = mem.load::<u64>(self.address(HEAD_OFFSET), Ordering::Acquire) else {
            let base = self.base;
            self.problem(|| format!("the ring header at {base:#x} is not in guest memory"));
            return;
        };
        if let Ok(lost) = mem.load::<u64>(self.address(LOST_OFFSET), Ordering::Acquire) {
            if lost < self.stats.lost_kernel {
                let before = self.stats.lost_kernel;
                self.problem(|| format!("the kernel's lost counter went back from {before} to {lost}"));
            } else {
                self.stats.lost_kernel = lost;
            }
        }
        if let Ok(seen) = mem.load::<u64>(self.address(CAPACITY_OFFSET), Ordering::Acquire) {
            // 0: the kernel has not set its ring up (yet, or at all: a kernel without tracing).
            if seen != 0 && seen != capacity && !self.bad_capacity_seen {
                self.bad_capacity_seen = true;
                self.problem(|| format!("the ring header says its capacity is {seen}, not {capacity}"));
            }
        }
        if head < self.tail {
            let tail = self.tail;
            self.problem(|| format!("the ring's head moved back to {head} below its tail {tail}; resynchronised"));
            self.tail = head;
            self.publish_tail(mem);
            return;
        }
        let mut available = head - self.tail;
        if available > capacity {
            let skipped = available - capacity;
            let tail = self.tail;
            self.problem(|| {
                format!(
                    "the ring's head {head} ran {available} records ahead of its tail {tail}: {skipped} overwritten"
                )
            });
            self.stats.lost_overrun = self.stats.lost_overrun.saturating_add(skipped);
            self.tail = head - capacity;
            available = capacity;
        }
        if available == 0 {
            return;
        }

        // Copy [tail, head) out in at most two pieces (the ring wraps once at most).
        let bytes = (available * RECORD_SIZE) as usize;
        self.buffer.resize(bytes, 0);
        let slot = self.tail % capacity;
        let first = available.min(capacity - slot);
        let records = TRACE_RECORDS_OFFSET;
        let (front_at, back_at) = (self.address(records + slot * RECORD_SIZE), self.address(records));
        let (front, back) = self.buffer.split_at_mut((first * RECORD_SIZE) as usize);
        let copied = mem.read_slice(front, front_at).and_then(|()| {
            if back.is_empty() {
                Ok(())
            } else {
                mem.read_slice(back, back_at)
            }
        });
        if copied.is_err() {
            let base = self.base;
            self.problem(|| format!("the ring's records at {:#x} are not in guest memory", base + records));
            self.tail = head;
            self.publish_tail(mem);
            return;
        }

        let mut granted = take_budget(budget, available);
        let buffer = std::mem::take(&mut self.buffer);
        for (n, chunk) in buffer.chunks_exact(RECORD_SIZE as usize).enumerate() {
            let Ok(record) = TraceRecord::read_from_bytes(chunk) else { continue };
            let number = self.tail + n as u64;
            if let Err(problem) = self.check(&record) {
                self.problem(|| format!("record {number}: {problem}"));
                continue;
            }
            self.last_tsc = record.tsc;
            if granted > 0 {
                granted -= 1;
                self.records.push(record);
            } else {
                self.stats.lost_limit = self.stats.lost_limit.saturating_add(1);
            }
        }
        self.buffer = buffer;
        // Records found corrupt were granted but not kept: give their share back.
        budget.fetch_add(granted, Ordering::AcqRel);
        self.tail = head;
        self.publish_tail(mem);
    }

    /// Why `record` cannot be one this CPU's kernel wrote.
    fn check(&self, record: &TraceRecord) -> Result<(), String> {
        match TraceKind::from_raw(record.kind) {
            None => return Err(format!("unknown kind {}", record.kind)),
            Some(TraceKind::VmExit) => return Err("kind vm_exit, which only the VMM writes".to_owned()),
            Some(_) => {}
        }
        if u32::from(record.cpu) != self.cpu {
            return Err(format!("written for cpu {} in the ring of cpu {}", record.cpu, self.cpu));
        }
        if record.tsc < self.last_tsc {
            return Err(format!("its time {} is before the previous record's {}", record.tsc, self.last_tsc));
        }
        Ok(())
    }

    fn publish_tail(&mut self, mem: &GuestMemoryMmap) {
        if mem.store(self.tail, self.address(TAIL_OFFSET), Ordering::Release).is_err() {
            let base = self.base;
            self.problem(|| format!("cannot write the ring's tail at {:#x}", base + TAIL_OFFSET));
        }
    }
}

#[cfg(test)]
mod tests {
    use psyche_abi::trace::{TraceRingHeader, TRACE_AREA_SIZE};
    use zerocopy::IntoBytes;

    use super::*;

    const BASE: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    fn record(cpu: u16, n: u64) -> TraceRecord {
        TraceRecord { tsc: 1000 + n, kind: TraceKind::GateEnter as u16, cpu, arg0: 3, arg1: n, arg2: 0 }
    }

    /// Writes records `range` as the kernel would (slot n % capacity), then the header.
    fn kernel_writes(mem: &GuestMemoryMmap, cpu: u16, range: std::ops::Range<u64>, lost: u64) {
        for n in range.clone() {
            let slot = n % TRACE_RING_CAPACITY;
            let address = BASE + TRACE_RECORDS_OFFSET + slot * RECORD_SIZE;
            mem.write_slice(record(cpu, n).as_bytes(), GuestAddress(address)).unwrap();
        }
        let tail = mem.read_obj::<u64>(GuestAddress(BASE + TAIL_OFFSET)).unwrap();
        let header = TraceRingHeader { head: range.end, tail, lost, capacity: TRACE_RING_CAPACITY };
        mem.write_slice(header.as_bytes(), GuestAddress(BASE)).unwrap();
    }

    fn unlimited() -> AtomicU64 {
        AtomicU64::new(u64::MAX)
    }

    #[test]
    fn the_area_fits_the_header_and_the_records() {
        assert_eq!(TRACE_AREA_SIZE, TRACE_RECORDS_OFFSET + TRACE_RING_CAPACITY * RECORD_SIZE);
        assert_eq!(RECORD_SIZE, 32);
    }

    #[test]
    fn drains_in_order_across_the_wrap_and_publishes_the_tail() {
        let mem = memory();
        let mut ring = Ring::new(2, BASE);
        let budget = unlimited();
        let mut written = 0;
        // Several rounds, each writing less than a ring, so that slots wrap around.
        for round in [1000, 1500, 2048, 7, 2000] {
            kernel_writes(&mem, 2, written..written + round, 0);
            written += round;
            ring.drain(&mem, &budget);
            assert_eq!(mem.read_obj::<u64>(GuestAddress(BASE + TAIL_OFFSET)).unwrap(), written);
        }
        assert_eq!(ring.records.len() as u64, written);
        assert!(ring.records.iter().enumerate().all(|(n, r)| r.arg1 == n as u64));
        assert_eq!(ring.stats.corrupt, 0, "{:?}", ring.stats.problems);
        assert_eq!(ring.stats.lost(), 0);
    }

    #[test]
    fn a_head_more_than_a_ring_ahead_is_an_overrun_counted_as_lost_and_corrupt() {
        let mem = memory();
        let mut ring = Ring::new(0, BASE);
        let budget = unlimited();
        kernel_writes(&mem, 0, 0..100, 0);
        ring.drain(&mem, &budget);
        // The kernel (wrongly) wrote 5000 more without waiting: the oldest 2952 were overwritten.
        kernel_writes(&mem, 0, 100..5100, 0);
        ring.drain(&mem, &budget);
        assert_eq!(ring.stats.lost_overrun, 5000 - TRACE_RING_CAPACITY);
        assert_eq!(ring.stats.corrupt, 1);
        assert!(ring.stats.problems[0].contains("ran 5000 records ahead"), "{:?}", ring.stats.problems);
        // What survived is the newest ring's worth, in order.
        assert_eq!(ring.records.len() as u64, 100 + TRACE_RING_CAPACITY);
        assert_eq!(ring.records.last().unwrap().arg1, 5099);
        assert_eq!(ring.records[100].arg1, 5100 - TRACE_RING_CAPACITY);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(BASE + TAIL_OFFSET)).unwrap(), 5100);
    }

    #[test]
    fn the_kernels_lost_counter_is_reported() {
        let mem = memory();
        let mut ring = Ring::new(0, BASE);
        kernel_writes(&mem, 0, 0..10, 77);
        ring.drain(&mem, &unlimited());
        assert_eq!(ring.stats.lost_kernel, 77);
        assert_eq!(ring.stats.lost(), 77);
        assert_eq!(ring.stats.corrupt, 0);
        // A counter that goes back is itself corrupt; the highest value stands.
        kernel_writes(&mem, 0, 10..11, 5);
        ring.drain(&mem, &unlimited());
        assert_eq!(ring.stats.lost_kernel, 77);
        assert_eq!(ring.stats.corrupt, 1);
    }

    #[test]
    fn bad_records_are_counted_and_skipped() {
        let mem = memory();
        let mut ring = Ring::new(1, BASE);
        kernel_writes(&mem, 1, 0..6, 0);
        let put = |slot: u64, record: TraceRecord| {
            let address = BASE + TRACE_RECORDS_OFFSET + slot * RECORD_SIZE;
            mem.write_slice(record.as_bytes(), GuestAddress(address)).unwrap();
        };
        put(1, TraceRecord { kind: 999, ..record(1, 1) });
        put(2, TraceRecord { cpu: 7, ..record(1, 2) });
        put(3, TraceRecord { kind: TraceKind::VmExit as u16, ..record(1, 3) });
        put(4, TraceRecord { tsc: 3, ..record(1, 4) });
        ring.drain(&mem, &unlimited());
        assert_eq!(ring.records.iter().map(|r| r.arg1).collect::<Vec<_>>(), [0, 5]);
        assert_eq!(ring.stats.corrupt, 4);
        let problems = ring.stats.problems.join("\n");
        for needle in ["unknown kind 999", "for cpu 7", "only the VMM writes", "before the previous"] {
            assert!(problems.contains(needle), "{problems}");
        }
    }

    #[test]
    fn a_head_that_moves_back_is_corrupt_and_resynchronised() {
        let mem = memory();
        let mut ring = Ring::new(0, BASE);
        kernel_writes(&mem, 0, 0..50, 0);
        ring.drain(&mem, &unlimited());
        mem.write_obj(10u64, GuestAddress(BASE + HEAD_OFFSET)).unwrap();
        ring.drain(&mem, &unlimited());
        assert_eq!(ring.stats.corrupt, 1);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(BASE + TAIL_OFFSET)).unwrap(), 10);
        assert_eq!(ring.records.len(), 50);
    }

    #[test]
    fn garbage_headers_cost_bounded_work_and_never_panic() {
        let mem = memory();
        let mut ring = Ring::new(0, BASE);
        let budget = AtomicU64::new(10_000);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let noise: Vec<u8> = (0..64).map(|i| (x >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            mem.write_slice(&noise[..32], GuestAddress(BASE)).unwrap();
            mem.write_slice(&noise, GuestAddress(BASE + TRACE_RECORDS_OFFSET + (x % 2048) * 32)).unwrap();
            let before = ring.records.len() + ring.stats.lost_limit as usize;
            ring.drain(&mem, &budget);
            let after = ring.records.len() + ring.stats.lost_limit as usize;
            assert!(after - before <= TRACE_RING_CAPACITY as usize);
        }
        assert!(ring.stats.corrupt > 0);
        assert!(ring.stats.problems.len() <= MAX_PROBLEMS);
        assert!(ring.records.len() <= 10_000);
    }

    #[test]
    fn records_past_the_budget_are_lost_not_kept() {
        let mem = memory();
        let mut ring = Ring::new(0, BASE);
        let budget = AtomicU64::new(30);
        kernel_writes(&mem, 0, 0..100, 0);
        ring.drain(&mem, &budget);
        assert_eq!(ring.records.len(), 30);
        assert_eq!(ring.stats.lost_limit, 70);
        assert_eq!(budget.load(Ordering::Acquire), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(BASE + TAIL_OFFSET)).unwrap(), 100);
    }
}

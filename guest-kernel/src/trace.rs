//! Trace records into this CPU's ring (see `psyche_abi::trace`).
//!
//! With the `trace` feature off, [`emit`] is an empty inline function: the default kernel has
//! no tracing code on any path. With it on, an event costs an `rdtsc`, four stores and the
//! head update, all to this CPU's own ring, without leaving the guest.

#[cfg(feature = "trace")]
pub use enabled::*;

#[cfg(not(feature = "trace"))]
pub use disabled::*;

#[cfg(not(feature = "trace"))]
mod disabled {
    use psyche_abi::trace::TraceKind;

    /// Records an event (nothing: this kernel is built without tracing).
    #[inline(always)]
    pub fn emit(_kind: TraceKind, _arg0: u32, _arg1: u64, _arg2: u64) {}

    /// Sets up this CPU's ring (nothing to do without tracing).
    #[inline(always)]
    pub fn init_this_cpu(_trace_paddr: u64) {}
}

#[cfg(feature = "trace")]
mod enabled {
    use core::ptr::{addr_of, addr_of_mut};
    use core::sync::atomic::{compiler_fence, Ordering};

    use psyche_abi::hypercall::Hypercall;
    use psyche_abi::layout::direct_map;
    use psyche_abi::trace::{TraceKind, TraceRecord, TraceRingHeader, TRACE_RECORDS_OFFSET, TRACE_RING_CAPACITY};

    use crate::arch::x86_64::cpu::{self, this_cpu};
    use crate::arch::x86_64::hypercall::hypercall;

    /// Sets up this CPU's ring from the boot info's trace area (0: this boot is not traced).
    pub fn init_this_cpu(trace_paddr: u64) {
        if trace_paddr == 0 {
            return;
        }
        let ring = direct_map(trace_paddr);
        // SAFETY: the VMM gave this CPU the zeroed trace area at `trace_paddr`; only this CPU
        // writes the kernel's fields of its header.
        unsafe { addr_of_mut!((*(ring as *mut TraceRingHeader)).capacity).write_volatile(TRACE_RING_CAPACITY) };
        let percpu = this_cpu();
        percpu.trace_ring = ring;
        percpu.trace_limit = TRACE_RING_CAPACITY;
    }

    /// Records an event on this CPU's ring: four stores and the head update. The VMM's tail
    /// is read only when the head reaches the limit cached at the last read (each memory
    /// access costs about a microsecond at emulated CPL0).
    #[inline(always)]
    pub fn emit(kind: TraceKind, arg0: u32, arg1: u64, arg2: u64) {
        let percpu = this_cpu();
        let ring = percpu.trace_ring;
        if ring == 0 {
            return;
        }
        let header = ring as *mut TraceRingHeader;
        // SAFETY: `ring` is this CPU's trace area (set by `init_this_cpu`); the kernel owns
        // `head` and `lost`, the VMM owns `tail`, and records in [tail, head) are the VMM's to
        // read. Volatile accesses keep the order the VMM relies on; x86 stores are not
        // reordered with each other.
        unsafe {
            let head = addr_of!((*header).head).read_volatile();
            if head >= percpu.trace_limit && !make_room(percpu.index, header, head) {
                return;
            }
            let slot = head & (TRACE_RING_CAPACITY - 1);
            // The record's words: TSC; kind, CPU and arg0 packed as `TraceRecord` lays them out
            // (little-endian); arg1; arg2.
            let words = (ring + TRACE_RECORDS_OFFSET + slot * core::mem::size_of::<TraceRecord>() as u64) as *mut u64;
            words.write_volatile(cpu::rdtsc());
            words.add(1).write_volatile(kind as u64 | u64::from(percpu.index as u16) << 16 | u64::from(arg0) << 32);
            words.add(2).write_volatile(arg1);
            words.add(3).write_volatile(arg2);
            compiler_fence(Ordering::Release);
            addr_of_mut!((*header).head).write_volatile(head + 1);
        }
    }

    /// The ring looked full at the cached limit: re-read the VMM's tail, and ask it to drain
    /// if the ring really is full. False (and the loss counted) if it stays full.
    #[cold]
    unsafe fn make_room(cpu: u32, header: *mut TraceRingHeader, head: u64) -> bool {
        // SAFETY: as in `emit`.
        unsafe {
            let mut tail = addr_of!((*header).tail).read_volatile();
            if head - tail >= TRACE_RING_CAPACITY {
                hypercall(Hypercall::TraceFlush, [u64::from(cpu), 0, 0, 0, 0, 0]);
                tail = addr_of!((*header).tail).read_volatile();
                if head - tail >= TRACE_RING_CAPACITY {
                    let lost = addr_of_mut!((*header).lost);
                    lost.write_volatile(lost.read_volatile() + 1);
                    return false;
                }
            }
            this_cpu().trace_limit = tail + TRACE_RING_CAPACITY;
            true
        }
    }
}

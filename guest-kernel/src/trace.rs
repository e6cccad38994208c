//! Trace records into this CPU's ring (see `psyche_abi::trace`).
//!
//! With the `trace` feature off, [`emit`] is an empty inline function: the default kernel has
//! no tracing code on any path. With it on, an event costs an `rdtsc`, five stores and the
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
        this_cpu().trace_ring = ring;
    }

    /// Records an event on this CPU's ring.
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
            if head - addr_of!((*header).tail).read_volatile() >= TRACE_RING_CAPACITY {
                hypercall(Hypercall::TraceFlush, [percpu.index as u64, 0, 0, 0, 0, 0]);
                if head - addr_of!((*header).tail).read_volatile() >= TRACE_RING_CAPACITY {
                    let lost = addr_of_mut!((*header).lost);
                    lost.write_volatile(lost.read_volatile() + 1);
                    return;
                }
            }
            let slot = head & (TRACE_RING_CAPACITY - 1);
            let record = (ring + TRACE_RECORDS_OFFSET) as *mut TraceRecord;
            record.add(slot as usize).write_volatile(TraceRecord {
                tsc: cpu::rdtsc(),
                kind: kind as u16,
                cpu: percpu.index as u16,
                arg0,
                arg1,
                arg2,
            });
            compiler_fence(Ordering::Release);
            addr_of_mut!((*header).head).write_volatile(head + 1);
        }
    }
}

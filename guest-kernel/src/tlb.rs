//! TLB shootdown. When a realm is closed in views that other CPUs may be running (its access
//! list lost rights, or it is destroyed), those CPUs must drop their cached translations before
//! the change counts: they get a flush IPI and the closing CPU waits for each to acknowledge.
//!
//! The waiting CPU holds the kernel lock, so every CPU that waits for that lock does so with
//! interrupts enabled ([`crate::kernel_lock`]); otherwise the two would wait for each other.

use core::sync::atomic::{AtomicU64, Ordering};

use psyche_abi::MAX_CPUS;

use crate::arch::x86_64::{cpu, lapic};

/// Bumped by each shootdown.
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// The last generation each CPU flushed for.
static FLUSHED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// The protection domain CPU `cpu` runs (`u32::MAX`: none): its `PerCpu::domain`, which every
/// switch of views writes before it loads CR3 (the assembly invocation paths included).
fn current_domain(cpu: usize) -> u32 {
    let Some(block) = cpu::cpu_block(cpu) else { return u32::MAX };
    // SAFETY: another CPU's per-CPU block, alive for the machine's lifetime; a word read.
    unsafe { core::ptr::addr_of!((*block).domain).read_volatile() }
}

/// Flushes every CPU running one of the domains in `domains` (bit d = domain d), this one
/// included, and returns once all have.
pub fn shootdown(domains: u64, cpu_count: usize, apic_id: impl Fn(usize) -> u32) {
    if domains == 0 {
        return;
    }
    let me = cpu::this_cpu().index as usize;
    let generation = GENERATION.fetch_add(1, Ordering::AcqRel) + 1;
    let mut targets = [false; MAX_CPUS];
    for (other, target) in targets.iter_mut().enumerate().take(cpu_count) {
        let domain = current_domain(other);
        if domain < 64 && domains & (1 << domain) != 0 {
            if other == me {
                flush_local();
            } else {
                *target = true;
                lapic::send_ipi(apic_id(other), cpu::FLUSH_VECTOR);
            }
        }
    }
    for (other, &target) in targets.iter().enumerate().take(cpu_count) {
        while target && FLUSHED[other].load(Ordering::Acquire) < generation {
            // Interrupts on: a flush request aimed at this CPU must not wait behind this loop.
            cpu::wait_briefly_with_interrupts();
        }
    }
}

/// Drops this CPU's non-global translations.
pub fn flush_local() {
    let (frame, flags) = x86_64::registers::control::Cr3::read_raw();
    // SAFETY: writing back the current CR3 changes nothing but the TLB.
    unsafe { x86_64::registers::control::Cr3::write_raw(frame, flags) };
}

/// The flush IPI (on IST2).
pub extern "sysv64" fn flush_interrupt() {
    flush_local();
    let me = cpu::this_cpu().index as usize;
    FLUSHED[me].store(GENERATION.load(Ordering::Acquire), Ordering::Release);
    lapic::end_of_interrupt();
}

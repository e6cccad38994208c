//! The local APIC in x2APIC mode: every register is an MSR, and on our hosts `wrmsr` costs
//! about a `nop` at CPL0 (an xAPIC MMIO access would be an emulated memory operand).

use x86_64::registers::model_specific::Msr;

const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const X2APIC_EOI: u32 = 0x80B;
const X2APIC_SPURIOUS: u32 = 0x80F;
const X2APIC_ICR: u32 = 0x830;
const X2APIC_LVT_TIMER: u32 = 0x832;
const X2APIC_TIMER_INITIAL: u32 = 0x838;
const X2APIC_TIMER_CURRENT: u32 = 0x839;
const X2APIC_TIMER_DIVIDE: u32 = 0x83E;
const LVT_MASKED: u64 = 1 << 16;
const DIVIDE_BY_1: u64 = 0b1011;

fn write(register: u32, value: u64) {
    // SAFETY: x2APIC registers are architectural; this module only writes documented values.
    unsafe { Msr::new(register).write(value) };
}

fn read(register: u32) -> u64 {
    // SAFETY: reading an x2APIC register has no side effects.
    unsafe { Msr::new(register).read() }
}

/// Whether CPUID offers x2APIC mode.
pub fn has_x2apic() -> bool {
    let leaf = core::arch::x86_64::__cpuid(1);
    leaf.ecx & (1 << 21) != 0
}

/// Enables this CPU's LAPIC in x2APIC mode, with the timer masked.
pub fn init(spurious_vector: u8) {
    // SAFETY: enabling x2APIC mode on a CPU that offers it (checked by the caller).
    unsafe {
        let mut base = Msr::new(IA32_APIC_BASE);
        let value = base.read();
        base.write(value | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
    }
    write(X2APIC_SPURIOUS, 0x100 | spurious_vector as u64);
    write(X2APIC_TIMER_DIVIDE, DIVIDE_BY_1);
    write(X2APIC_LVT_TIMER, LVT_MASKED);
}

/// Acknowledges the interrupt being handled.
pub fn end_of_interrupt() {
    write(X2APIC_EOI, 0);
}

/// Starts the timer counting down from `ticks`, masked (for calibration).
pub fn start_masked_countdown(ticks: u32) {
    write(X2APIC_LVT_TIMER, LVT_MASKED);
    write(X2APIC_TIMER_INITIAL, ticks as u64);
}

/// The timer's current count.
pub fn current_count() -> u32 {
    read(X2APIC_TIMER_CURRENT) as u32
}

/// Arms a one-shot timer interrupt on `vector` after `ticks`.
pub fn arm_one_shot(vector: u8, ticks: u32) {
    write(X2APIC_LVT_TIMER, vector as u64);
    write(X2APIC_TIMER_INITIAL, ticks as u64);
}

/// Arms a periodic timer interrupt on `vector` every `ticks`.
pub fn arm_periodic(vector: u8, ticks: u32) {
    write(X2APIC_LVT_TIMER, 1 << 17 | vector as u64);
    write(X2APIC_TIMER_INITIAL, ticks as u64);
}

/// Stops the timer.
pub fn stop_timer() {
    write(X2APIC_TIMER_INITIAL, 0);
    write(X2APIC_LVT_TIMER, LVT_MASKED);
}

/// Sends a fixed IPI on `vector` to the CPU with x2APIC ID `apic_id`.
pub fn send_ipi(apic_id: u32, vector: u8) {
    write(X2APIC_ICR, (apic_id as u64) << 32 | vector as u64);
}

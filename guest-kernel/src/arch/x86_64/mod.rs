//! x86_64: entry and trap stubs, descriptor tables, the local APIC, paging and hypercalls.
pub mod cpu;
pub mod entry;
pub mod fpu;
pub mod hypercall;
pub mod lapic;
pub mod paging;

//! One vCPU: its initial state (64-bit mode, set from the boot layout), its run loop, and the
//! kick that takes it out of KVM_RUN when the VM stops.

use std::cell::Cell;
use std::sync::{Mutex, OnceLock};

use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_regs, kvm_segment, CpuId, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuExit, VcpuFd};
use psyche_abi::hypercall::HYPERCALL_PORT;
use psyche_abi::layout::{KERNEL_CS, KERNEL_DS};

use crate::boot::{BootLayout, VcpuStart};
use crate::hypercall::{self, HypercallContext};
use crate::vm::{CrashReason, GuestEnd, RunState};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_PGE: u64 = 1 << 7;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
#[error("vCPU {index}: {what} failed: {source}")]
pub struct VcpuSetupError {
    pub index: u32,
    pub what: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: if code { 0xB } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// CPUID for vCPU `apic_id`: KVM's supported set, with this vCPU's APIC ID in leaf 1 and in
/// the x2APIC topology leaves (the kernel finds its node by it).
pub fn cpuid_for(supported: &CpuId, apic_id: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00FF_FFFF) | (apic_id << 24),
            0xB | 0x1F => entry.edx = apic_id,
            _ => {}
        }
    }
    cpuid
}

/// Puts the vCPU in 64-bit mode at the kernel entry, on its own stack.
pub fn set_up(vcpu: &VcpuFd, start: &VcpuStart, layout: &BootLayout, cpuid: &CpuId) -> Result<(), VcpuSetupError> {
    let fail = |what| move |source| VcpuSetupError { index: start.index, what, source };
    vcpu.set_cpuid2(cpuid).map_err(fail("KVM_SET_CPUID2"))?;

    let mut sregs = vcpu.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    sregs.cs = segment(KERNEL_CS, true);
    let data = segment(KERNEL_DS, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    // VM entry wants a usable TR and LDT; the kernel loads its own TSS at once.
    sregs.tr = kvm_segment { limit: 0xFFFF, type_: 11, present: 1, ..Default::default() };
    sregs.ldt = kvm_segment { limit: 0xFFFF, type_: 2, present: 1, ..Default::default() };
    sregs.gdt.base = layout.gdt.0;
    sregs.gdt.limit = layout.gdt.1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    sregs.cr3 = layout.cr3;
    sregs.cr4 = CR4_PAE | CR4_PGE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
    vcpu.set_sregs(&sregs).map_err(fail("KVM_SET_SREGS"))?;

    // The prebuilt libcore uses SSE: start with the x87 and SSE control words at their reset
    // defaults.
    let fpu = kvm_fpu { fcw: 0x37F, mxcsr: 0x1F80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(fail("KVM_SET_FPU"))?;

    let regs = kvm_regs {
        rip: layout.entry,
        rsp: start.stack_top,
        rdi: u64::from(start.index),
        rsi: layout.boot_info_vaddr,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(fail("KVM_SET_REGS"))?;

    // With the in-kernel irqchip, secondary vCPUs would wait for INIT/SIPI; ours start at once.
    vcpu.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(fail("KVM_SET_MP_STATE"))?;
    Ok(())
}

/// Makes the vCPU exit after every kernel instruction (see `VmConfig::count_kernel_instructions`).
pub fn single_step(vcpu: &VcpuFd, index: u32) -> Result<(), VcpuSetupError> {
    let debug = kvm_bindings::kvm_guest_debug {
        control: kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP,
        ..Default::default()
    };
    vcpu.set_guest_debug(&debug).map_err(|source| VcpuSetupError { index, what: "KVM_SET_GUEST_DEBUG", source })
}

/// What the run loop does after an exit, once the exit's borrow of the vCPU has ended.
enum AfterExit {
    Continue,
    /// KVM_RUN returned for a signal (a kick, or `immediate_exit` still set).
    Interrupted,
    Hypercall,
    Crash(CrashReason),
    InternalError,
    /// A single-step exit: sample RIP if profiling the kernel.
    Stepped,
}

thread_local! {
    /// The vCPU the calling thread runs, while it runs it: what the kick handler stops. Null on
    /// every other thread (and a const initializer without a destructor, so that the handler
    /// can read it at any time).
    static KICK_TARGET: Cell<*mut VcpuFd> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// The kick, as Firecracker does it: set the interrupted thread's `immediate_exit`, so that a
/// KVM_RUN in progress returns at once (the signal interrupts it) and so does the next one (a
/// kick that lands just before the thread enters KVM_RUN is not lost: KVM sees the flag). One
/// kick per thread is then enough; nothing is polled.
extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let target = KICK_TARGET.with(Cell::get);
    if !target.is_null() {
        // SAFETY: the pointer is set by `run` on this very thread to the vCPU it is running,
        // which outlives that call, and cleared before `run` returns; the handler interrupts
        // this thread only, and writes one byte of the vCPU's kvm_run mapping, which the run
        // loop never holds a reference to across a blocking call.
        unsafe { (*target).set_kvm_immediate_exit(1) };
    }
}

/// Installs the kick handler for the process (once; every VM shares it).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    *INSTALLED.get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), kick))
}

/// Clears the thread's kick target when `run` returns.
struct KickTargetGuard;

impl KickTargetGuard {
    fn set(vcpu: &mut VcpuFd) -> Self {
        KICK_TARGET.with(|target| target.set(vcpu));
        Self
    }
}

impl Drop for KickTargetGuard {
    fn drop(&mut self) {
        KICK_TARGET.with(|target| target.set(std::ptr::null_mut()));
    }
}

/// The vCPU threads of one VM, to kick when it stops.
#[derive(Default)]
pub struct Kicker {
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl Kicker {
    /// Registers the calling thread, once its kick target is set and before it first looks
    /// at the stop flag: a thread registered after [`Kicker::kick_all`] took the lock sees
    /// the flag set (the lock orders the two).
    fn register(&self) {
        if let Ok(mut threads) = self.threads.lock() {
            // SAFETY: pthread_self has no preconditions.
            threads.push(unsafe { libc::pthread_self() });
        }
    }

    /// Kicks every registered vCPU thread once. Call it after the stop flag is set, while the
    /// threads are not joined yet.
    pub fn kick_all(&self) {
        if let Ok(threads) = self.threads.lock() {
            for &thread in threads.iter() {
                // SAFETY: the thread is a scoped thread that has not been joined, so its
                // descriptor is valid even if it has returned already, and the signal has a
                // handler that only sets a flag.
                unsafe { libc::pthread_kill(thread, kick_signal()) };
            }
        }
    }
}

/// Runs the vCPU until the guest ends or the VMM stops it.
pub fn run(vcpu: &mut VcpuFd, index: u32, context: &HypercallContext<'_>, state: &RunState, kicker: &Kicker) {
    let mut console = crate::console::VcpuConsole::default();
    let mut exits = context.trace.map(|trace| trace.exit_log(index));
    let _target = KickTargetGuard::set(vcpu);
    kicker.register();
    while !state.stopping() {
        let exit = vcpu.run();
        if let Some(exits) = exits.as_mut() {
            exits.record(&exit);
        }
        let after = match exit {
            Ok(VcpuExit::IoIn(port, data)) if port == HYPERCALL_PORT && data.len() == 4 => AfterExit::Hypercall,
            // No device anywhere: reads float high, writes go nowhere.
            Ok(VcpuExit::IoIn(_, data)) | Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0xFF);
                AfterExit::Continue
            }
            Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::MmioWrite(..)) => AfterExit::Continue,
            Ok(VcpuExit::Debug(_)) => {
                // Single-stepping (only asked for when counting kernel instructions; CPL3 code
                // does not exit on these hosts).
                state.count_kernel_instruction(index);
                AfterExit::Stepped
            }
            Ok(VcpuExit::Hlt) => AfterExit::Crash(CrashReason::HaltedWithoutIrqchip),
            Ok(VcpuExit::Shutdown) => AfterExit::Crash(CrashReason::TripleFault),
            Ok(VcpuExit::FailEntry(reason, _)) => AfterExit::Crash(CrashReason::FailedEntry(reason)),
            Ok(VcpuExit::InternalError) => AfterExit::InternalError,
            Ok(other) => AfterExit::Crash(CrashReason::UnexpectedExit(format!("{other:?}"))),
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => AfterExit::Interrupted,
            Err(error) => AfterExit::Crash(CrashReason::RunFailed(error.to_string())),
        };
        match after {
            AfterExit::Continue => {}
            // Only a stopping VM kicks, and the loop ends then; a signal that is not a kick
            // must not leave the flag set, or every KVM_RUN after it would return at once.
            AfterExit::Interrupted if !state.stopping() => vcpu.set_kvm_immediate_exit(0),
            AfterExit::Interrupted => {}
            AfterExit::Stepped => {
                if state.profiling_kernel() {
                    if let Ok(regs) = vcpu.get_regs() {
                        state.sample_kernel_rip(regs.rip);
                    }
                }
            }
            AfterExit::Hypercall => {
                let reply = match (vcpu.get_regs(), vcpu.get_sregs()) {
                    (Ok(regs), Ok(sregs)) => {
                        if let Some(exits) = exits.as_mut() {
                            exits.note_hypercall(regs.rax);
                        }
                        hypercall::handle(index, &regs, &sregs, context, state, &mut console)
                    }
                    (Err(error), _) | (_, Err(error)) => {
                        let reason = CrashReason::RunFailed(format!("reading registers: {error}"));
                        state.end(GuestEnd::crash(index, reason, None));
                        break;
                    }
                };
                set_io_in_data(vcpu, reply);
            }
            AfterExit::InternalError => {
                let reason = CrashReason::KvmInternalError { suberror: internal_error_suberror(vcpu) };
                state.end(GuestEnd::crash(index, reason, CrashRegisters::read(vcpu)));
            }
            AfterExit::Crash(reason) => {
                let registers = CrashRegisters::read(vcpu);
                state.end(GuestEnd::crash(index, reason, registers));
            }
        }
    }
    console.flush_all(index, context.program_names, context.sink);
    if let (Some(trace), Some(exits)) = (context.trace, exits) {
        trace.add_exits(exits);
    }
}

/// The sub-error of a KVM_EXIT_INTERNAL_ERROR.
fn internal_error_suberror(vcpu: &mut VcpuFd) -> u32 {
    let run = vcpu.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the live member.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

/// Fills in the 4-byte result of the pending `in` (KVM completes it on the next KVM_RUN).
fn set_io_in_data(vcpu: &mut VcpuFd, value: u32) {
    let run = vcpu.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_IO, so the `io` member of the union is the live one.
    let io = unsafe { run.__bindgen_anon_1.io };
    if io.size != 4 || io.count != 1 {
        return;
    }
    let base = run as *mut kvm_bindings::kvm_run as *mut u8;
    // SAFETY: KVM guarantees `data_offset` points at `size * count` bytes inside the mapped
    // kvm_run area, which `run` borrows for this call.
    unsafe { base.add(io.data_offset as usize).cast::<[u8; 4]>().write_unaligned(value.to_le_bytes()) };
}

/// The registers that matter when a guest crashes.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct CrashRegisters {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cs: u16,
}

impl CrashRegisters {
    /// Reads them, if KVM still answers.
    pub fn read(vcpu: &VcpuFd) -> Option<Self> {
        let regs = vcpu.get_regs().ok()?;
        let sregs = vcpu.get_sregs().ok()?;
        Some(Self {
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cs: sregs.cs.selector,
        })
    }
}

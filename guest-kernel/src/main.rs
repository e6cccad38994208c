//! The Psyche guest kernel.
//!
//! Boot: the VMM starts every vCPU at `_start` in 64-bit mode (see `psyche_abi::boot`). The
//! bootstrap processor (vCPU 0) writes the IDT, checks the boot info, sets up the frame pools
//! and the LAPIC, waits for every other CPU to check in, reports the machine it found to the
//! VMM and starts the programs at CPL3. The other CPUs set up their own GDT and TSS, check in
//! by the APIC ID that CPUID gives them, and wait for a program to run.
#![no_std]
#![no_main]

mod arch;
mod aside;
mod console;
mod domains;
mod numa;
mod sched;
mod tlb;
mod trace;
mod upcalls;

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use psyche_abi::boot::{BootInfo, ProgramInfo};
use psyche_abi::hypercall::{Hypercall, HypercallError, CONSOLE_USER_BUFFER};
use psyche_abi::layout::{KERNEL_VIRT_BASE, PAGE_SIZE, PROGRAM_SLOT_SIZE};
use psyche_abi::note::{AbiNote, ABI_NOTE};
use psyche_abi::realm::{AclEntry, Key, RealmSpec, Rights, Termination, MAX_ACL_ENTRIES};
use psyche_abi::report::TopologyReport;
use psyche_abi::syscall::{SysError, Syscall};
use psyche_abi::trace::{TraceKind, GATE_NO_SUCH_CALL};
use psyche_abi::{CpuMask, MAX_CPUS, MAX_NODES, MAX_PROGRAMS};
use psyche_kernel::cmdline::{self, CrashTest};
use psyche_kernel::machine::{self, Findings};
use psyche_kernel::sync::{SpinLock, SpinLockGuard};
// Links memcpy and friends, which the prebuilt libcore expects.
use psyche_guest_rt as _;

use arch::x86_64::cpu::{self, this_cpu};
use arch::x86_64::entry::{enter_user, ExceptionFrame};
use arch::x86_64::hypercall::{hypercall, hypercall_final};
use arch::x86_64::{lapic, paging};
use console::{kprintln, Dec};
use domains::Kernel;

/// Stops the machine with a message: for conditions the kernel cannot go on from. Unlike a
/// panic, the message may carry arguments (formatted with `Dec`, never libcore's SSE
/// integer code).
macro_rules! fatal {
    ($($arg:tt)*) => {{
        kprintln!("psyche: fatal: {}", format_args!($($arg)*));
        hypercall_final(Hypercall::KernelPanic, [0; 6])
    }};
}

/// Marks this ELF as a Psyche kernel of our ABI version; psyche-vmm refuses any other.
#[used]
#[link_section = ".note.psyche"]
static ABI_VERSION_NOTE: AbiNote = ABI_NOTE;

/// The boot info, set by the bootstrap processor before any other CPU reads it.
static BOOT_INFO: AtomicU64 = AtomicU64::new(0);
/// Set once the IDT is complete; no CPU enables interrupts before.
static IDT_READY: AtomicBool = AtomicBool::new(false);
/// CPUs that checked in.
static CPUS_CHECKED_IN: AtomicU32 = AtomicU32::new(0);
/// The CPUs that checked in, by the node they found themselves on.
static ONLINE: [[AtomicU64; MAX_CPUS / 64]; MAX_NODES] =
    [const { [const { AtomicU64::new(0) }; MAX_CPUS / 64] }; MAX_NODES];
/// Programs still running.
static PROGRAMS_RUNNING: AtomicU32 = AtomicU32::new(0);
/// Whether each program has ended.
static PROGRAM_ENDED: [AtomicBool; MAX_PROGRAMS] = [const { AtomicBool::new(false) }; MAX_PROGRAMS];
/// Exit code of each program that has ended.
static EXIT_CODES: [AtomicU64; MAX_PROGRAMS] = [const { AtomicU64::new(0) }; MAX_PROGRAMS];
/// The LAPIC timer's frequency, as calibrated at boot.
static LAPIC_HZ: AtomicU64 = AtomicU64::new(0);
/// LAPIC timer interrupts taken (all CPUs).
static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);
/// Frames, realms and protection domains, under one lock (a big kernel lock: every kernel path
/// that takes it is a few dozen instructions).
static KERNEL: SpinLock<Kernel> = SpinLock::new(Kernel::new());
/// The report for the VMM; written by the bootstrap processor only.
static REPORT: SpinLock<TopologyReport> = SpinLock::new(zeroed_report());

const fn zeroed_report() -> TopologyReport {
    // SAFETY: TopologyReport is plain integers (zerocopy FromZeros); all-zero is valid.
    unsafe { core::mem::zeroed() }
}

pub(crate) fn boot_info() -> &'static BootInfo {
    // SAFETY: set by kernel_main from the VMM's pointer before anything calls this; the VMM
    // wrote the boot info before starting any vCPU and nobody writes it afterwards.
    unsafe { &*(BOOT_INFO.load(Ordering::Acquire) as *const BootInfo) }
}

/// The kernel lock, for paths that run after boot. It waits with interrupts let in, because the
/// holder may be waiting for this CPU to acknowledge a TLB flush (see `tlb`).
fn kernel_lock() -> SpinLockGuard<'static, Kernel> {
    loop {
        if let Some(guard) = KERNEL.try_lock() {
            return guard;
        }
        while KERNEL.is_locked() {
            cpu::wait_briefly_with_interrupts();
        }
    }
}

extern "C" {
    /// The end of the kernel image, page aligned (`linker.ld`).
    static __kernel_end: u8;
}

/// The guest-physical address just past the kernel image: the boot info must give none of
/// the memory below it to the kernel's frame pools or to a program.
fn kernel_end_paddr() -> u64 {
    (core::ptr::addr_of!(__kernel_end) as u64).wrapping_sub(KERNEL_VIRT_BASE)
}

/// Entered from `_start` on every CPU.
extern "sysv64" fn kernel_main(cpu_index: u64, boot_info_vaddr: u64) -> ! {
    let cpu_index = cpu_index as usize;
    BOOT_INFO.store(boot_info_vaddr, Ordering::Release);
    let info = boot_info();
    if cpu_index == 0 {
        cpu::build_idt();
        IDT_READY.store(true, Ordering::Release);
    }
    let Some(me) = info.cpus.get(cpu_index) else { cpu::halt_forever() };
    // SAFETY: the VMM gives each vCPU its own per-CPU area and starts it on that area's stack.
    unsafe { cpu::init_this_cpu(cpu_index as u32, me.node, me.percpu_paddr) };
    trace::init_this_cpu(me.trace_paddr);
    if cpu_index == 0 {
        bootstrap_processor(info)
    } else {
        while !IDT_READY.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        lapic::init(cpu::SPURIOUS_VECTOR);
        check_in(info);
        idle()
    }
}

/// Records that this CPU is up, on the node its own APIC ID says.
fn check_in(info: &BootInfo) {
    let apic_id = cpu::cpuid_apic_id();
    let percpu = this_cpu();
    let Some(found) = machine::cpu_of_apic_id(info, apic_id) else {
        kprintln!(
            "psyche: cpu {} has APIC ID {}, which the boot info does not list",
            Dec(percpu.index.into()),
            Dec(apic_id.into())
        );
        return;
    };
    if found != percpu.index as usize {
        kprintln!("psyche: cpu {} has the APIC ID of cpu {}", Dec(percpu.index.into()), Dec(found as u64));
        return;
    }
    let node = info.cpus[found].node as usize;
    if let Some(mask) = ONLINE.get(node) {
        mask[found / 64].fetch_or(1 << (found % 64), Ordering::AcqRel);
    }
    CPUS_CHECKED_IN.fetch_add(1, Ordering::AcqRel);
}

fn bootstrap_processor(info: &'static BootInfo) -> ! {
    if !cpu::has_smep_and_smap() {
        kprintln!("psyche: warning: this CPU offers no SMEP or no SMAP: a kernel bug could run or touch a user page");
    }
    if let Err(error) = machine::validate(info, kernel_end_paddr()) {
        fatal!("the boot info is unusable: {}", error.describe());
    }
    let options = match cmdline::parse(info.cmdline()) {
        Ok(options) => options,
        Err(unknown) => fatal!(
            "unknown kernel option '{}' (known: crash=page-fault|invalid-opcode|triple-fault|panic, timer=on|off, migrate=off|<traps>, quota=[<program>:]realms=<n>,memory=<size>,names=<n>)",
            core::str::from_utf8(unknown.0).unwrap_or("<not UTF-8>")
        ),
    };
    if let Some(program) = options.program_quota.iter().skip(info.program_count as usize).position(|q| q.is_set()) {
        fatal!(
            "the kernel option quota={}:... sets a share for program {}, but this boot has {} programs",
            Dec((program + info.program_count as usize) as u64),
            Dec((program + info.program_count as usize) as u64),
            Dec(info.program_count.into())
        );
    }
    let Some(mode) = psyche_abi::latency::LatencyMode::from_raw(info.latency_mode) else {
        fatal!("the boot info asks for latency mode {}, which this kernel does not know", Dec(info.latency_mode.into()))
    };
    {
        let mut guard = KERNEL.lock();
        let kernel = &mut *guard;
        let nodes = info.node_count as usize;
        for (node, entry) in info.nodes[..nodes].iter().enumerate() {
            kernel.frames.add_node(node, entry.free_base, entry.free_end, entry.mem_size);
        }
        // Every program's share of realms, names and each node's frames, fixed for the boot.
        // CPUs per node in one pass (validated: every CPU's node is below the node count).
        let mut node_cpus = [0u64; MAX_NODES];
        for cpu in &info.cpus[..info.cpu_count as usize] {
            node_cpus[cpu.node as usize] += 1;
        }
        kernel.quotas.configure(
            info.program_count as usize,
            nodes,
            |node| kernel.frames.free_bytes(node) / PAGE_SIZE,
            |node| node_cpus[node],
            &options.quota,
            &options.program_quota,
        );
        let migrate_after = options.migrate_after.unwrap_or(cmdline::DEFAULT_MIGRATE_AFTER);
        kernel.policy = numa::Policy { mode, migrate_after };
        numa::set_mode(mode);
    }
    if !lapic::has_x2apic() {
        fatal!("this CPU offers no x2APIC mode");
    }
    lapic::init(cpu::SPURIOUS_VECTOR);
    check_in(info);

    let timer_hz = if options.skip_timer_check { 0 } else { check_lapic_timer(info.tsc_khz) };
    LAPIC_HZ.store(timer_hz, Ordering::Release);
    wait_for_check_ins(info);
    report_machine(info, timer_hz);

    if let Some(crash) = options.crash {
        crash_deliberately(crash);
    }

    let programs = info.program_count as usize;
    PROGRAMS_RUNNING.store(programs as u32, Ordering::Release);
    if programs == 0 {
        hypercall_final(Hypercall::Shutdown, [0; 6]);
    }
    // Program k runs on CPU k mod (CPUs); a CPU with several time-slices them.
    sched::assign(programs, info.cpu_count as usize);
    for cpu in 1..programs.min(info.cpu_count as usize) {
        lapic::send_ipi(info.cpus[cpu].apic_id, cpu::WAKEUP_VECTOR);
    }
    idle()
}

/// Calibrates the LAPIC timer against the TSC and checks that its interrupt arrives. Returns
/// its frequency in Hz (0 when the TSC frequency is unknown).
fn check_lapic_timer(tsc_khz: u64) -> u64 {
    if tsc_khz == 0 {
        return 0;
    }
    // 200 us of TSC is plenty: the timer counts at ~1 GHz under KVM.
    let window = tsc_khz / 5;
    lapic::start_masked_countdown(u32::MAX);
    let start = cpu::rdtsc();
    while cpu::rdtsc() - start < window {
        core::hint::spin_loop();
    }
    let counted = u64::from(u32::MAX - lapic::current_count());
    let elapsed = cpu::rdtsc() - start;
    lapic::stop_timer();
    let hz = counted * tsc_khz * 1000 / elapsed.max(1);

    let ticks_before = TIMER_TICKS.load(Ordering::Acquire);
    lapic::arm_one_shot(cpu::TIMER_VECTOR, (hz / 20_000).clamp(1, u32::MAX as u64) as u32);
    let deadline = cpu::rdtsc() + tsc_khz * 100;
    while TIMER_TICKS.load(Ordering::Acquire) == ticks_before {
        if cpu::rdtsc() > deadline {
            fatal!("the LAPIC timer interrupt did not arrive within 100 ms");
        }
        cpu::wait_for_interrupt();
    }
    hz
}

/// Waits (up to two seconds of TSC) for every CPU to check in; reports the ones that did not.
fn wait_for_check_ins(info: &BootInfo) {
    let expected = info.cpu_count;
    let deadline = cpu::rdtsc() + info.tsc_khz.max(1_000_000) * 2000;
    while CPUS_CHECKED_IN.load(Ordering::Acquire) < expected && cpu::rdtsc() < deadline {
        core::hint::spin_loop();
    }
    let online = CPUS_CHECKED_IN.load(Ordering::Acquire);
    if online < expected {
        kprintln!("psyche: only {} of {} CPUs checked in", Dec(online.into()), Dec(expected.into()));
    }
}

fn report_machine(info: &BootInfo, lapic_timer_hz: u64) {
    let nodes = info.node_count as usize;
    let mut online: [CpuMask; MAX_NODES] = [[0; MAX_CPUS / 64]; MAX_NODES];
    for (mask, node) in online.iter_mut().zip(ONLINE.iter()).take(nodes) {
        for (word, atomic) in mask.iter_mut().zip(node.iter()) {
            *word = atomic.load(Ordering::Acquire);
        }
    }
    let kernel = KERNEL.lock();
    let memory = |node: usize| kernel.frames.total_bytes(node);
    let mut report = REPORT.lock();
    machine::fill_report(
        info,
        &Findings { online: &online[..nodes], memory_bytes: &memory, lapic_timer_hz },
        &mut report,
    );
    let report_paddr = &*report as *const TopologyReport as u64 - psyche_abi::layout::KERNEL_VIRT_BASE;
    hypercall(Hypercall::ReportTopology, [report_paddr, 0, 0, 0, 0, 0]);
    kprintln!(
        "psyche: {} of {} CPUs online on {} nodes, LAPIC timer {} MHz",
        Dec(report.cpus_online.into()),
        Dec(info.cpu_count.into()),
        Dec(nodes as u64),
        Dec(lapic_timer_hz / 1_000_000)
    );
}

fn crash_deliberately(crash: CrashTest) -> ! {
    kprintln!("psyche: crashing on purpose ({})", crash.name());
    match crash {
        // SAFETY: deliberately faults; address 8 is never mapped.
        CrashTest::PageFault => unsafe { core::arch::asm!("mov rax, [8]", out("rax") _) },
        // SAFETY: deliberately raises #UD.
        CrashTest::InvalidOpcode => unsafe { core::arch::asm!("ud2") },
        CrashTest::TripleFault => {
            cpu::load_empty_idt();
            // SAFETY: deliberately raises #BP with no IDT: the CPU shuts down.
            unsafe { core::arch::asm!("int3") };
        }
        CrashTest::Panic => panic!("deliberate kernel panic (crash=panic)"),
    }
    cpu::halt_forever()
}

/// The LAPIC timer's calibrated frequency (0 when it could not be calibrated).
pub(crate) fn lapic_hz() -> u64 {
    LAPIC_HZ.load(Ordering::Acquire)
}

/// Waits for work: a domain of this CPU to start or resume.
pub(crate) fn idle() -> ! {
    loop {
        sched::switch_from(u32::MAX);
        cpu::wait_for_interrupt();
    }
}

/// Makes program `index` a protection domain (its root realm and its view) and enters it at
/// CPL3.
pub(crate) fn start_program(info: &BootInfo, index: usize) -> ! {
    let program: &ProgramInfo = &info.programs[index];
    let node = this_cpu().node;
    let views = {
        let mut kernel = KERNEL.lock();
        let created = kernel.create_program_domain(info, index, node, this_cpu().index);
        match created.map(|_| kernel.views_here(index as u32)) {
            Ok(Some(views)) => views,
            Ok(None) => fatal!("cannot start program {}: no memory for its view", Dec(index as u64)),
            Err(problem) => fatal!("cannot start program {}: {}", Dec(index as u64), problem),
        }
    };
    let percpu = this_cpu();
    percpu.program = index as u32;
    // The view shares the kernel's half of the boot page tables, so the kernel keeps running;
    // its user half maps exactly the program's root realm.
    upcalls::switch_to(index as u32, views);
    sched::tick_if_needed();
    hypercall(Hypercall::ProgramStart, [index as u64, 0, 0, 0, 0, 0]);
    trace::emit(TraceKind::ProgramStart, index as u32, 0, 0);
    let stack_top = program.slot_base + PROGRAM_SLOT_SIZE;
    enter_user(program.entry, stack_top, [program.args_vaddr, program.args_len, index as u64])
}

/// The program on this CPU has ended (`code` is `None` when the kernel ended it).
fn program_ended(code: Option<u64>) -> ! {
    domain_finished(this_cpu().domain, code)
}

/// Protection domain `domain` is over (the kernel ended it): its program ends, and this CPU
/// goes back to what it was doing before the domain ran here: the caller of an invocation the
/// domain was serving (who gets an error), or nothing.
pub(crate) fn domain_ended(domain: u32) -> ! {
    domain_finished(domain, None)
}

/// Protection domain `domain`'s program ended with `code` (`None`: the kernel ended it). If
/// this CPU was running the domain for an invocation, the caller continues with an error;
/// otherwise this CPU waits for work.
fn domain_finished(domain: u32, code: Option<u64>) -> ! {
    finish_program(domain, code);
    let percpu = this_cpu();
    if percpu.program == domain {
        percpu.program = u32::MAX;
    }
    // The caller of the invocation the domain served here, if any, gets an error (and so on
    // out, past callers that ended too).
    let serving = cpu::invocation_depth().checked_sub(1).is_some_and(|depth| cpu::slot(depth).callee() == domain);
    if serving {
        upcalls::unwind(SysError::NotFound)
    }
    leave_domain()
}

/// This CPU stops running its domain and waits for work.
pub(crate) fn leave_domain() -> ! {
    numa::rearm_here();
    let percpu = this_cpu();
    percpu.domain = u32::MAX;
    percpu.upcall_domain = u32::MAX;
    cpu::set_invocation_depth(0);
    idle()
}

/// Records the end of program `index` once: its domain and what it owns go, and the last
/// program to end shuts the machine down.
fn finish_program(index: u32, code: Option<u64>) {
    let Some(ended) = PROGRAM_ENDED.get(index as usize) else { return };
    if ended.swap(true, Ordering::AcqRel) {
        return;
    }
    sched::ended(index);
    // The domain is gone: so is everything its root realm owns. Its home CPU stops at its next
    // kernel entry, if it is not this one.
    let home = kernel_lock().domain(index).map(|d| d.home_cpu);
    // Invocations it had set aside run on for their callees (`sched::next_runnable`).
    kernel_lock().end_domain(index);
    upcalls::abandon_invocations(index);
    if let Some(home) = home.filter(|&home| home != this_cpu().index) {
        lapic::send_ipi(boot_info().cpus[home as usize].apic_id, cpu::UPCALL_VECTOR);
    }
    // Whether the kernel ended it has a word of its own: any exit code is a program's to pass.
    trace::emit(TraceKind::ProgramExit, index, code.unwrap_or(0), u64::from(code.is_none()));
    if let Some(slot) = EXIT_CODES.get(index as usize) {
        slot.store(code.unwrap_or(0), Ordering::Release);
    }
    if let Some(code) = code {
        hypercall(Hypercall::ProgramExit, [u64::from(index), code, 0, 0, 0, 0]);
    }
    if PROGRAMS_RUNNING.fetch_sub(1, Ordering::AcqRel) == 1 {
        // The guest's exit code: the first non-zero program exit code, in program order.
        let programs = boot_info().program_count as usize;
        let code = EXIT_CODES[..programs].iter().map(|code| code.load(Ordering::Acquire)).find(|&code| code != 0);
        kernel_lock().report_latency();
        hypercall_final(Hypercall::Shutdown, [code.unwrap_or(0), 0, 0, 0, 0, 0]);
    }
}

/// The kernel gate: called by `psyche_kernel_gate` with the program's arguments.
pub(crate) extern "sysv64" fn syscall_dispatch(
    a0: u64,
    a1: u64,
    a2: u64,
    a3: u64,
    a4: u64,
    a5: u64,
    number: u64,
) -> i64 {
    // The trace records the call `syscall` runs, decided from the whole of RAX: a number that
    // names none is recorded as such, with RAX itself beside it. (Only a traced kernel computes
    // it: the untraced gate decides with `syscall`'s jump table alone.)
    let traced = gate_call(number).map_or(GATE_NO_SUCH_CALL, |call| call as u32);
    trace::emit(TraceKind::GateEnter, traced, number, 0);
    let result = syscall(number, [a0, a1, a2, a3, a4, a5]);
    trace::emit(TraceKind::GateExit, traced, result as u64, 0);
    result
}

/// The system call the kernel gate runs for RAX = `number`, as `syscall` decides it: none for a
/// number the ABI does not define, nor for the invocation gate's own calls (`ProtectedCall`,
/// `InvocationReturn`), which `int 4` does not make.
fn gate_call(number: u64) -> Option<Syscall> {
    Syscall::from_raw(number).filter(|call| !matches!(call, Syscall::ProtectedCall | Syscall::InvocationReturn))
}

/// Runs system call `number` (the decision `gate_call` describes).
fn syscall(number: u64, args: [u64; 6]) -> i64 {
    let [a0, a1, ..] = args;
    match Syscall::from_raw(number) {
        Some(Syscall::Write) => {
            // The VMM checks every page of the buffer is user-accessible, as a CPL3 read would,
            // and keeps the running domain's lines apart from every other writer's.
            let len = a1.min(PAGE_SIZE);
            let writer = u64::from(this_cpu().domain);
            let reply = through_master_view(|| {
                hypercall(Hypercall::ConsoleWrite, [a0, len, CONSOLE_USER_BUFFER, writer, 0, 0])
            });
            match HypercallError::from_reply(reply) {
                None => i64::from(reply),
                Some(error) => user_buffer_error(error).to_return(),
            }
        }
        Some(Syscall::Random) => {
            let len = a1.min(PAGE_SIZE);
            match HypercallError::from_reply(through_master_view(|| {
                hypercall(Hypercall::Random, [a0, len, 0, 0, 0, 0])
            })) {
                None => len as i64,
                Some(error) => user_buffer_error(error).to_return(),
            }
        }
        Some(Syscall::Exit) => program_ended(Some(a0)),
        Some(Syscall::CpuInfo) => {
            let percpu = this_cpu();
            (u64::from(percpu.node) << 32 | u64::from(percpu.index)) as i64
        }
        Some(Syscall::Mark) => {
            hypercall(Hypercall::Mark, [a0, u64::from(this_cpu().program), 0, 0, 0, 0]);
            0
        }
        Some(Syscall::MachineInfo) => {
            let online = u64::from(CPUS_CHECKED_IN.load(Ordering::Acquire));
            (u64::from(boot_info().node_count) << 32 | online) as i64
        }
        Some(call) => match realm_syscall(call, args) {
            Ok(value) => value as i64,
            Err(error) => error.to_return(),
        },
        None => SysError::NoSuchCall.to_return(),
    }
}

/// Runs `f` (a hypercall on a program's buffer, which the VMM translates through CR3) on the
/// running domain's master view, which maps every realm it has open and arms none.
fn through_master_view(f: impl FnOnce() -> u32) -> u32 {
    let local = x86_64::registers::control::Cr3::read_raw();
    let master = cpu::master_view();
    if master == 0 || master == local.0.start_address().as_u64() {
        return f();
    }
    let frame = x86_64::structures::paging::PhysFrame::containing_address(x86_64::PhysAddr::new_truncate(master));
    // SAFETY: every view shares the kernel's half of the address space; the master view maps a
    // superset of the realms of the local one, with the same frames.
    unsafe { x86_64::registers::control::Cr3::write_raw(frame, local.1) };
    let reply = f();
    // SAFETY: as above, back to the view the CPU was on.
    unsafe { x86_64::registers::control::Cr3::write_raw(local.0, local.1) };
    reply
}

/// The system calls on realms, keys and names.
fn realm_syscall(call: Syscall, args: [u64; 6]) -> Result<u64, SysError> {
    let percpu = this_cpu();
    let (domain, node) = (percpu.domain, percpu.node);
    // Looked up only by the calls that read the program's memory.
    let cr3 = cpu::master_view;
    let realm_id = |raw: u64| u32::try_from(raw).map_err(|_| SysError::NotFound);
    let read_key = |address: u64| paging::read_user::<Key>(cr3(), address).ok_or(SysError::BadAddress);
    let mut kernel = kernel_lock();
    let keys = || kernel.thread_keys(domain, cr3()).map_err(|_| SysError::BadAddress);
    match call {
        Syscall::RealmCreate => {
            let spec: RealmSpec = paging::read_user(cr3(), args[0]).ok_or(SysError::BadAddress)?;
            if spec.acl_len > MAX_ACL_ENTRIES as u64 {
                return Err(SysError::InvalidArgument);
            }
            let mut acl = [AclEntry::default(); MAX_ACL_ENTRIES];
            for (i, entry) in acl.iter_mut().enumerate().take(spec.acl_len as usize) {
                let address = spec.acl.wrapping_add((i * core::mem::size_of::<AclEntry>()) as u64);
                *entry = paging::read_user(cr3(), address).ok_or(SysError::BadAddress)?;
            }
            let keys = keys()?;
            kernel.create_realm(domain, node, &spec, &acl[..spec.acl_len as usize], &keys).map(u64::from)
        }
        Syscall::RealmDestroy => {
            let keys = keys()?;
            kernel.destroy_realm(realm_id(args[0])?, &keys).map(|()| 0)
        }
        Syscall::RealmOpen => {
            let key = read_key(args[1])?;
            kernel.open_with_key(domain, realm_id(args[0])?, key, args[2]).map(|()| 0)
        }
        Syscall::AclSet => {
            let key = read_key(args[1])?;
            let rights = Rights(u32::try_from(args[2]).map_err(|_| SysError::InvalidArgument)?);
            let keys = keys()?;
            kernel.set_rights(domain, realm_id(args[0])?, key, rights, &keys).map(|()| 0)
        }
        Syscall::SetProcessorBlock => {
            kernel.set_processor_block(domain, cr3(), args[0])?;
            let quantum = kernel.domain(domain).map_or(0, |d| d.quantum_us);
            drop(kernel);
            sched::timer_at_most(quantum, LAPIC_HZ.load(Ordering::Acquire));
            Ok(0)
        }
        Syscall::RegisterOperations => kernel.register_operations(domain, args[0], args[1]).map(|()| 0),
        Syscall::InvocationDefer => {
            drop(kernel);
            upcalls::invocation_defer(args[0])
        }
        Syscall::Resume => {
            drop(kernel);
            upcalls::resume(args[0])
        }
        Syscall::Idle => {
            drop(kernel);
            // Inside an invocation the processor is the caller's, not the callee's to idle (and
            // an idle loop there could never give it to another domain).
            if cpu::invocation_depth() != 0 {
                return Err(SysError::Busy);
            }
            upcalls::idle()
        }
        Syscall::Wake => {
            drop(kernel);
            upcalls::wake(realm_id(args[0])?)
        }
        Syscall::Operations => {
            let id = realm_id(args[0])?;
            let owner = kernel.realms.get(id).and_then(|r| r.root_of).ok_or(SysError::NotFound)?;
            let (base, count) = kernel.domain(owner).map_or((0, 0), |d| d.operations);
            if count == 0 {
                return Err(SysError::NotFound);
            }
            Ok(base)
        }
        Syscall::NamePublish => {
            let id = realm_id(args[1])?;
            // A domain's own root realm needs no right: its keys are not read for it.
            let own_root = kernel.realms.get(id).is_some_and(|r| r.root_of == Some(domain));
            let keys = if own_root { None } else { Some(keys()?) };
            kernel.publish(domain, args[0], id, keys.as_ref()).map(|()| 0)
        }
        Syscall::RealmHome => {
            kernel.realms.get(realm_id(args[0])?).map(|r| u64::from(r.home)).ok_or(SysError::NotFound)
        }
        Syscall::RealmMigrate => {
            let id = realm_id(args[0])?;
            kernel.realms.get(id).ok_or(SysError::NotFound)?;
            let keys = keys()?;
            if !kernel.realms.rights(id, keys.as_slice()).contains(Rights::INITIALIZE) {
                return Err(SysError::NoRight);
            }
            // A node without memory cannot be a realm's home: `migrate` finds no frames there.
            let to = u32::try_from(args[1]).map_err(|_| SysError::InvalidArgument)?;
            kernel.migrate(id, to).map(|()| 0)
        }
        Syscall::RealmTraps => kernel.realm_traps(realm_id(args[0])?, args[1]),
        Syscall::MoveToCpu => {
            drop(kernel);
            let (rip, rsp, rflags) = gate_frame();
            let to = u32::try_from(args[0]).map_err(|_| SysError::InvalidArgument)?;
            sched::move_to(to, rip, rsp, rflags)
        }
        Syscall::NameLookup => kernel.lookup(args[0]),
        // Through the invocation gate only (`upcalls::protected_call_gate`,
        // `upcalls::invocation_return_gate`): `int 4` makes neither (`gate_call`).
        Syscall::ProtectedCall
        | Syscall::InvocationReturn
        | Syscall::Write
        | Syscall::Exit
        | Syscall::CpuInfo
        | Syscall::MachineInfo
        | Syscall::Null
        | Syscall::Mark
        | Syscall::Random => Err(SysError::NoSuchCall),
    }
}

/// What a program learns when the VMM refuses a hypercall on its buffer: a page it may not
/// touch is a bad address, anything else a bad argument.
fn user_buffer_error(error: HypercallError) -> SysError {
    match error {
        HypercallError::BadAddress => SysError::BadAddress,
        _ => SysError::InvalidArgument,
    }
}

/// A page fault at CPL3 in realm space: a touch of a realm outside the view opens it if the
/// thread's keys allow, a call of an operation entry of a realm open for protected invocation
/// becomes that invocation, and anything else is a fault for the domain (a fault upcall if it
/// takes upcalls, else its end).
fn user_page_fault(frame: &mut ExceptionFrame, address: u64) {
    let percpu = this_cpu();
    let domain = percpu.domain;
    let cr3 = cpu::master_view();
    let touch = domains::Touch {
        write: frame.error_code & 0b10 != 0,
        present: frame.error_code & 0b1 != 0,
        fetch: frame.error_code & 0b1_0000 != 0,
    };
    let realm = psyche_abi::realm::realm_of(address).unwrap_or(u32::MAX);
    let result = if touch.present && touch.fetch {
        // Executing a no-execute page is not a question of opening a realm.
        Err((Termination::ExecutedData, realm))
    } else {
        kernel_lock().fault(domain, cr3, address, touch).map_err(|(reason, realm)| {
            // Just below the stack of its own slot: the stack ran out, whatever else is there.
            let stack_bottom = psyche_abi::layout::program_slot(domain as usize) + PROGRAM_SLOT_SIZE
                - psyche_abi::layout::USER_STACK_SIZE;
            let below_stack = address < stack_bottom && address >= stack_bottom - STACK_OVERFLOW_REACH;
            (if reason == Termination::NoRealm && below_stack { Termination::StackOverflow } else { reason }, realm)
        })
    };
    let result: Result<(), (Termination, u32)> = match result {
        Ok(domains::FaultOutcome::Restart) => return,
        Ok(domains::FaultOutcome::Step) => {
            // The #DB after the instruction arms the page again (`debug_trap`).
            frame.rflags |= TRAP_FLAG;
            return;
        }
        Ok(domains::FaultOutcome::Protected) => {
            let operation = kernel_lock().operation_at(address);
            // The caller's `call` pushed its return address: the invocation returns there.
            let return_address = paging::read_user::<u64>(cr3, frame.rsp);
            match (operation, return_address) {
                (Some((callee, operation)), Some(rip)) => {
                    let args = [frame.rdi, frame.rsi, frame.rdx, frame.rcx];
                    upcalls::invoke(callee, operation, args, rip, frame.rsp + 8, frame.rflags, None)
                }
                _ => Err((Termination::ProtectedOnly, psyche_abi::realm::realm_of(address).unwrap_or(u32::MAX))),
            }
        }
        Err(error) => Err(error),
    };
    if let Err((reason, realm)) = result {
        // A domain with a scheduler hears about it as a fault; others end.
        upcalls::fault(frame, address);
        hypercall(
            Hypercall::DomainTerminated,
            [u64::from(domain), reason as u64, address, u64::from(realm), frame.rip, 0],
        );
        domain_ended(domain);
    }
}

/// How far below the bottom of a program's stack a fault still counts as the stack running out
/// (a function's frame, or a large local array, can reach that far in one go).
const STACK_OVERFLOW_REACH: u64 = 1 << 20;

/// RFLAGS.TF: single-step.
const TRAP_FLAG: u64 = 1 << 8;

/// A #DB from CPL3: the end of an instruction single-stepped over a remote page opened for it
/// (exact and account latency modes). Programs cannot set TF usefully themselves, so a stray
/// one is simply cleared.
fn debug_trap(frame: &mut ExceptionFrame) {
    numa::rearm_here();
    frame.rflags &= !TRAP_FLAG;
}

/// The return RIP, RSP and RFLAGS of the running program's kernel-gate entry (the gate's stack
/// starts lower for each protected invocation running: `cpu::set_invocation_depth`).
pub(crate) fn gate_frame() -> (u64, u64, u64) {
    cpu::gate_frame_at(cpu::invocation_depth())
}

/// Every exception lands here (on IST1), and the interrupts that may end in an upcall (on
/// IST2).
extern "sysv64" fn exception_dispatch(frame: &mut ExceptionFrame) {
    let from_user = frame.cs & 3 == 3;
    match frame.vector as u8 {
        cpu::TIMER_VECTOR => {
            TIMER_TICKS.fetch_add(1, Ordering::AcqRel);
            trace::emit(TraceKind::TimerTick, 0, 0, 0);
            lapic::end_of_interrupt();
            // A quantum boundary: latency windows close.
            numa::end_windows();
            if from_user {
                stop_if_domain_ended();
                sched::tick(&upcalls::registers_of(frame), boot_info().tsc_khz);
                upcalls::time_limit(frame);
            }
            return;
        }
        cpu::UPCALL_VECTOR => {
            lapic::end_of_interrupt();
            if from_user {
                stop_if_domain_ended();
                sched::tick_if_needed();
                upcalls::pending(frame);
            }
            return;
        }
        _ => {}
    }
    let cr2 = if frame.vector == 14 { cpu::cr2() } else { 0 };
    if frame.vector == 14 {
        trace::emit(TraceKind::PageFault, frame.error_code as u32, cr2, frame.rip);
    }
    if from_user && frame.vector == 1 {
        debug_trap(frame);
        return;
    }
    if from_user && frame.vector == 14 && psyche_abi::realm::realm_of(cr2).is_some() {
        // Realm space: open on first touch, a protected invocation, or a fault for the domain.
        // Returns to restart the instruction.
        user_page_fault(frame, cr2);
        return;
    }
    if from_user {
        // A program fault: its scheduler's, if it has one; otherwise the program ends.
        upcalls::fault(frame, cr2);
        let program = this_cpu().domain as u64;
        hypercall(Hypercall::ProgramFault, [program, frame.vector, frame.error_code, frame.rip, cr2, 0]);
        domain_ended(this_cpu().domain)
    }
    hypercall_final(Hypercall::KernelFault, [frame.vector, frame.error_code, frame.rip, cr2, frame.cs, frame.rsp])
}

/// A CPU still running a domain another CPU ended stops now.
fn stop_if_domain_ended() {
    let domain = this_cpu().domain;
    if domain != u32::MAX && kernel_lock().domain(domain).is_none() {
        domain_ended(domain);
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    // Only messages without arguments are printed: formatting libcore's own arguments (an
    // index, a length) would run its SSE code, which cannot run at CPL0 here (see `Dec`).
    let message = info.message().as_str().unwrap_or("(message with arguments not shown)");
    kprintln!("psyche: kernel panic: {}", message);
    if let Some(location) = info.location() {
        kprintln!("psyche:   at {}:{}", location.file(), Dec(location.line().into()));
    }
    hypercall_final(Hypercall::KernelPanic, [0; 6])
}

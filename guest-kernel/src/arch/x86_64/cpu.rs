//! Per-CPU state and descriptor tables.
//!
//! Each vCPU's per-CPU area (64 KiB, 64 KiB-aligned, in its own node, zeroed; placed by the
//! VMM) holds its GDT and TSS in the first page, its [`PerCpu`] block, and its stacks. Because
//! every kernel stack of a CPU lies inside its area, `RSP & !(area size - 1)` finds the area
//! in two instructions, with no MSR and no `swapgs`.
//!
//! The IDT is shared: every CPU handles every vector the same way, so one table, written once
//! by the bootstrap processor, is enough.

use core::arch::asm;
use core::ptr::addr_of_mut;

use psyche_abi::layout::{
    direct_map, KERNEL_CS, PERCPU_AREA_SIZE, PERCPU_EXCEPTION_STACK_TOP, PERCPU_INTERRUPT_STACK_TOP,
    PERCPU_KERNEL_STACK_TOP, TSS_SELECTOR,
};
use psyche_abi::syscall::{INVOCATION_GATE_VECTOR, KERNEL_GATE_VECTOR};
use psyche_abi::upcall::FPU_IMAGE_SIZE;
use x86_64::instructions::tables::{lgdt, lidt, load_tss};
use x86_64::structures::gdt::SegmentSelector;
use x86_64::structures::tss::TaskStateSegment;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use super::entry;

/// Vector of the LAPIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of the wake-up IPI.
pub const WAKEUP_VECTOR: u8 = 0x40;
/// Vector of the TLB-flush IPI.
pub const FLUSH_VECTOR: u8 = 0x41;
/// Vector of the IPI that tells a CPU an upcall is waiting for the domain it runs.
pub const UPCALL_VECTOR: u8 = 0x42;
/// Vector of spurious LAPIC interrupts.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

const GDT_OFFSET: u64 = 0x000;
pub(crate) const TSS_OFFSET: u64 = 0x080;
pub(crate) const PERCPU_OFFSET: u64 = 0x200;

/// The kernel's per-CPU block.
#[repr(C)]
pub struct PerCpu {
    /// vCPU index.
    pub index: u32,
    /// NUMA node.
    pub node: u32,
    /// Index of the program this CPU runs, if any (`u32::MAX` when idle).
    pub program: u32,
    /// Virtual address of this CPU's trace ring (0 when not tracing).
    pub trace_ring: u64,
    /// The ring's head may grow to here before the VMM's tail must be read again.
    pub trace_limit: u64,
    /// The protection domain this CPU runs (`u32::MAX` when idle).
    pub domain: u32,
    /// The domain whose upcall handler runs on this CPU now (`u32::MAX`: none).
    pub upcall_domain: u32,
    /// The protected invocations made from each depth on this CPU (`slot`, `invocation_depth`).
    pub slots: [InvocationSlot; SLOTS],
    /// The running domain's master view, with latency traps on: read it through
    /// [`master_view`]. Without traps a domain's master view is the view in CR3, which the
    /// assembly invocation paths switch without writing this.
    pub master_pml4: u64,
    /// Remote pages this CPU opened after latency traps, to arm again (`numa::rearm_here`).
    pub remote_open: [u64; MAX_REMOTE_OPEN],
    pub remote_open_count: usize,
    /// Per depth, an id the slot's next invocation must be above: the ids its slot used while
    /// a chain was set aside (`aside`), which that chain's return moves past.
    pub fresh_ids: [u64; MAX_NESTED_INVOCATIONS],
}

impl PerCpu {
    /// `domain` (low half) and `upcall_domain` (high half) as the one word the assembly paths
    /// compare, save and restore (`InvocationSlot::caller_state`).
    pub fn state(&self) -> u64 {
        u64::from(self.domain) | u64::from(self.upcall_domain) << 32
    }
}

/// Most remote pages one CPU keeps open at once; one more arms them all again first.
pub const MAX_REMOTE_OPEN: usize = 32;

/// Most protected invocations nested on one CPU.
pub const MAX_NESTED_INVOCATIONS: usize = 8;

/// One slot per depth a protected invocation can be made from, and a guard at each end:
/// `PerCpu::slots[MAX_NESTED_INVOCATIONS - depth]` serves depth `depth`, from -1 (the guard
/// whose callee is no domain, so that a return at depth 0 fails its test) to
/// `MAX_NESTED_INVOCATIONS` (the guard whose operation count 0 turns every call away).
pub const SLOTS: usize = MAX_NESTED_INVOCATIONS + 2;

/// A depth's slot: the protected invocation this CPU last checked in full from that depth
/// (the cache the assembly path enters callees by: `entry::psyche_invocation_gate`), which is
/// also the record of the one running from it, if any. The slots lie in reverse order of depth
/// at the kernel gate stack's own stride, so that each is at a fixed distance from the gate
/// frame of its depth (`SLOT_BELOW_FRAME`): the assembly finds it from RSP, with no depth and
/// no multiplication.
///
/// As a cache it is valid while `operations` is not 0: whatever could make it wrong zeroes that
/// on every CPU (`upcalls::forget_checks`). As a record it is valid from the call to the
/// return, which may take the assembly path while the count is still not 0 (nothing changed,
/// the caller is alive); where the caller resumes is the caller's gate frame, kept in place on the kernel
/// stack (`FRAME_STRIDE`). A running invocation has no entry in the kernel's invocation table
/// unless the callee defers it; until then a server thread of the callee answering it from
/// another CPU leaves its result here (`upcalls::answer_running`).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default)]
pub struct InvocationSlot {
    /// The realm number as the caller passes it (a full register, compared as is).
    pub realm: u64,
    /// The callee's operation count (0: nothing remembered).
    pub operations: u64,
    /// This CPU's `PerCpu::domain` (the caller, low half) and `upcall_domain` (high half) at
    /// the call, as one word: the assembly compares, saves and restores them with one move each.
    pub caller_state: u64,
    /// The callee as `domain` and `upcall_domain` both (its handler runs).
    pub callee_state: u64,
    /// The views to load in CR3 for the callee and, at the return, for the caller.
    pub callee_view: u64,
    pub caller_view: u64,
    /// The frame `iretq` enters the callee's handler through: RIP (the handler), CS, RFLAGS,
    /// RSP (the top of its work area on this CPU), SS.
    pub entry: [u64; 5],
    /// The direct-map address of this CPU's per-CPU area (one load, where computing it from
    /// RSP takes two instructions).
    pub area: u64,
    /// The running invocation's id, or the next one's when none runs (`upcalls::ANSWERED` is
    /// set once a server thread answered it from elsewhere). Written by other CPUs only under
    /// the kernel lock, and then atomically.
    pub id: u64,
    /// The answer from elsewhere (valid with `ANSWERED`).
    pub answer: u64,
    /// The operation invoked (for the trace; the assembly path does not write it).
    pub operation: u64,
    /// The direct-map address of this depth's area of the CPU (`fpu::FpuImage`), where the
    /// caller's x87/SSE state waits while the invocation made from this depth runs (0 in the
    /// guards). Written once, at boot.
    pub fpu: u64,
}

const _: () = assert!(core::mem::size_of::<InvocationSlot>() == 128);

impl InvocationSlot {
    /// A slot with nothing in it.
    pub const EMPTY: Self = Self {
        realm: 0,
        operations: 0,
        caller_state: 0,
        callee_state: 0,
        callee_view: 0,
        caller_view: 0,
        entry: [0; 5],
        area: 0,
        id: 0,
        answer: 0,
        operation: 0,
        fpu: 0,
    };

    /// The calling domain.
    pub fn caller(&self) -> u32 {
        self.caller_state as u32
    }

    /// Whether the caller was itself inside its upcall handler (a nested invocation).
    pub fn caller_in_upcall(&self) -> bool {
        (self.caller_state >> 32) as u32 == self.caller_state as u32
    }

    /// The called domain.
    pub fn callee(&self) -> u32 {
        self.callee_state as u32
    }
}

/// Offset in the per-CPU area of the invocation callers' x87/SSE areas, one per depth
/// (`InvocationSlot::fpu`): the lowest 4 KiB of the kernel stack's page range, which leaves
/// the stack 24 KiB.
const INVOCATION_FPU_OFFSET: u64 = 0x1000;
const _: () = assert!(
    INVOCATION_FPU_OFFSET + (MAX_NESTED_INVOCATIONS * FPU_IMAGE_SIZE) as u64 <= 0x2000
        && INVOCATION_FPU_OFFSET >= PERCPU_OFFSET + core::mem::size_of::<PerCpu>() as u64
);

/// How much lower the kernel gate's stack starts for each protected invocation running on a
/// CPU: the CPU's frame of the caller's gate entry (or the one the kernel writes for a call by
/// fault) stays where it is, above, until the invocation returns through it
/// (`set_invocation_depth`, `gate_frame_at`). It is also the slots' stride (see
/// [`InvocationSlot`]).
pub const FRAME_STRIDE: u64 = core::mem::size_of::<InvocationSlot>() as u64;

/// Where the slot of depth d lies, below the base of the kernel gate frame of depth d (the RSP
/// of an entry from CPL3 at that depth).
pub(crate) const SLOT_BELOW_FRAME: u64 = PERCPU_KERNEL_STACK_TOP
    - 40
    - (PERCPU_OFFSET + core::mem::offset_of!(PerCpu, slots) as u64 + MAX_NESTED_INVOCATIONS as u64 * FRAME_STRIDE);

const _: () = assert!(
    FRAME_STRIDE >= 40
        && FRAME_STRIDE.is_multiple_of(16)
        && PERCPU_OFFSET + core::mem::size_of::<PerCpu>() as u64 <= 0x1000
        && SLOT_BELOW_FRAME > MAX_NESTED_INVOCATIONS as u64 * FRAME_STRIDE
);

/// The slot of invocations made from depth `depth` on the CPU whose block is `percpu` (-1 and
/// `MAX_NESTED_INVOCATIONS` are the guards).
pub fn slot_of(percpu: *mut PerCpu, depth: isize) -> *mut InvocationSlot {
    let index = (MAX_NESTED_INVOCATIONS as isize - depth).clamp(0, SLOTS as isize - 1) as usize;
    // SAFETY: an index in bounds of a block that lives for the machine's lifetime.
    unsafe { core::ptr::addr_of_mut!((*percpu).slots[index]) }
}

/// This CPU's slot of invocations made from depth `depth`.
pub fn slot(depth: usize) -> &'static mut InvocationSlot {
    // SAFETY: this CPU's own block; other CPUs touch a slot's `id`, `answer` and `operations`
    // only, atomically.
    unsafe { &mut *slot_of(this_cpu(), depth as isize) }
}

/// This CPU's invocation depth: how many protected invocations it runs, nested; kept in
/// TSS.RSP0 alone, which the assembly paths move.
pub fn invocation_depth() -> usize {
    invocation_depth_of(this_cpu_area())
}

/// The invocation depth of the CPU whose per-CPU area is at `area`.
pub fn invocation_depth_of(area: u64) -> usize {
    let tss = (area + TSS_OFFSET) as *const TaskStateSegment;
    // SAFETY: a CPU's TSS (written by `init_this_cpu`); the field is unaligned in the packed
    // structure.
    let rsp0 = unsafe { core::ptr::addr_of!((*tss).privilege_stack_table[0]).read_unaligned() }.as_u64();
    ((area + PERCPU_KERNEL_STACK_TOP).saturating_sub(rsp0) / FRAME_STRIDE) as usize
}

/// The running domain's master view (see `PerCpu::master_pml4`).
pub fn master_view() -> u64 {
    if crate::numa::traps() {
        this_cpu().master_pml4
    } else {
        x86_64::registers::control::Cr3::read_raw().0.start_address().as_u64()
    }
}

/// Sets this CPU's invocation depth, and with it where the kernel gate's stack starts
/// (TSS.RSP0): below the frames of the invocations running.
pub fn set_invocation_depth(depth: usize) {
    let area = this_cpu_area();
    let rsp0 = area + PERCPU_KERNEL_STACK_TOP - FRAME_STRIDE * depth as u64;
    let tss = (area + TSS_OFFSET) as *mut TaskStateSegment;
    // SAFETY: this CPU's TSS (written by `init_this_cpu`); the field is unaligned in the packed
    // structure.
    unsafe { addr_of_mut!((*tss).privilege_stack_table[0]).write_unaligned(VirtAddr::new_truncate(rsp0)) };
}

/// Where the CPU's frame of a kernel gate entry made at invocation depth `depth` lies (five
/// words: RIP, CS, RFLAGS, RSP, SS).
fn gate_frame_address(depth: usize) -> *mut u64 {
    (this_cpu_area() + PERCPU_KERNEL_STACK_TOP - FRAME_STRIDE * depth as u64 - 40) as *mut u64
}

/// The return RIP, RSP and RFLAGS of the kernel gate entry made at invocation depth `depth`:
/// the running one's at the current depth, the caller's of a running invocation at its depth.
/// Read word by word (a structure read is a byte-by-byte copy at emulated CPL0).
pub fn gate_frame_at(depth: usize) -> (u64, u64, u64) {
    let frame = gate_frame_address(depth);
    // SAFETY: the frame lies in this CPU's kernel stack, above the stack the kernel runs on
    // now (or it is the frame of the entry the kernel runs for).
    unsafe { (frame.read(), frame.add(3).read(), frame.add(2).read()) }
}

/// Writes the frame of a protected invocation made at depth `depth` by a fault (no gate entry
/// wrote one): its return goes through it as through a gate entry's.
pub fn write_gate_frame(depth: usize, rip: u64, rsp: u64, rflags: u64) {
    let frame = gate_frame_address(depth);
    // SAFETY: as in `gate_frame_at`: above the stack the kernel runs on (a fault runs on IST1),
    // or the running entry's own frame, which is not returned through.
    unsafe {
        frame.write(rip);
        frame.add(1).write(psyche_abi::layout::USER_CS as u64);
        frame.add(2).write(rflags);
        frame.add(3).write(rsp);
        frame.add(4).write(psyche_abi::layout::USER_DS as u64);
    }
}

/// The lowest address of the kernel stack's gate frames: every gate frame of every invocation
/// depth lies above it, on the CPU whose area is at `area`.
pub fn below_gate_frames(area: u64) -> u64 {
    area + PERCPU_KERNEL_STACK_TOP - FRAME_STRIDE * (MAX_NESTED_INVOCATIONS as u64 + 1)
}

/// Runs `f(arg)` on this CPU's kernel stack below every gate frame, if the kernel runs above
/// that now: for code that writes the gate frames of several depths (`sched::take_back`),
/// which would otherwise overwrite its own stack. The frames of the caller are abandoned: `f`
/// never returns, and `arg` is all it gets.
pub fn below_gate_frames_run(f: extern "sysv64" fn(u64) -> !, arg: u64) -> ! {
    let rsp: u64;
    // SAFETY: reading RSP has no side effects.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    let top = (below_gate_frames(rsp & !(PERCPU_AREA_SIZE - 1)) - 64) & !15;
    if rsp <= top {
        f(arg)
    }
    // SAFETY: `top` is inside this CPU's kernel stack, below every gate frame and below nothing
    // live: the kernel runs above it now, and nothing returns to the frames it leaves.
    unsafe {
        asm!(
            "mov rsp, {top}",
            "call {f}",
            "ud2",
            top = in(reg) top,
            f = in(reg) f,
            in("rdi") arg,
            options(noreturn),
        )
    }
}

/// The per-CPU area of the CPU this runs on (direct-map address).
pub fn this_cpu_area() -> u64 {
    let rsp: u64;
    // SAFETY: reading RSP has no side effects.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    rsp & !(PERCPU_AREA_SIZE - 1)
}

// The assembly paths move `domain` and `upcall_domain` as one word (`caller_state`).
const _: () = assert!(
    core::mem::offset_of!(PerCpu, upcall_domain) == core::mem::offset_of!(PerCpu, domain) + 4
        && core::mem::offset_of!(PerCpu, domain) % 8 == 0
);

/// The per-CPU block of CPU `index` (another CPU's, to be read with care), if it exists.
pub fn cpu_block(index: usize) -> Option<*mut PerCpu> {
    let info = crate::boot_info();
    let cpu = info.cpus.get(index).filter(|_| index < info.cpu_count as usize)?;
    Some((direct_map(cpu.percpu_paddr) + PERCPU_OFFSET) as *mut PerCpu)
}

/// The per-CPU block of the CPU this runs on.
pub fn this_cpu() -> &'static mut PerCpu {
    let rsp: u64;
    // SAFETY: reading RSP has no side effects.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    let area = rsp & !(PERCPU_AREA_SIZE - 1);
    // SAFETY: every kernel stack lies in its CPU's per-CPU area (see the module comment), whose
    // PerCpu block was written by `init_this_cpu` before anything calls this; only this CPU
    // touches its own block.
    unsafe { &mut *((area + PERCPU_OFFSET) as *mut PerCpu) }
}

/// Sets up this CPU's GDT, TSS and per-CPU block and loads the shared IDT.
///
/// # Safety
/// `percpu_paddr` must be this CPU's per-CPU area, and nothing else may use it.
pub unsafe fn init_this_cpu(index: u32, node: u32, percpu_paddr: u64) {
    let area = direct_map(percpu_paddr);
    let gdt = (area + GDT_OFFSET) as *mut u64;
    let tss = (area + TSS_OFFSET) as *mut TaskStateSegment;
    // SAFETY: the caller gives us the area; the GDT and TSS offsets are inside its first page.
    // The TSS is packed, so its fields are written unaligned.
    unsafe {
        let tss_base = tss as u64;
        let tss_limit = core::mem::size_of::<TaskStateSegment>() as u64 - 1;
        gdt.add(1).write(0x00AF_9A00_0000_FFFF); // kernel code, 64-bit (KERNEL_CS)
        gdt.add(2).write(0x00CF_9200_0000_FFFF); // kernel data (KERNEL_DS)
        gdt.add(3).write(0x00CF_F200_0000_FFFF); // user data, DPL 3 (USER_DS)
        gdt.add(4).write(0x00AF_FA00_0000_FFFF); // user code, 64-bit, DPL 3 (USER_CS)
                                                 // 64-bit available TSS: a 16-byte descriptor in slots 5 and 6 (TSS_SELECTOR).
        gdt.add(5).write(
            (tss_limit & 0xFFFF)
                | (tss_base & 0xFF_FFFF) << 16
                | 0x89 << 40
                | ((tss_limit >> 16) & 0xF) << 48
                | ((tss_base >> 24) & 0xFF) << 56,
        );
        gdt.add(6).write(tss_base >> 32);

        addr_of_mut!((*tss).privilege_stack_table[0])
            .write_unaligned(VirtAddr::new_truncate(area + PERCPU_KERNEL_STACK_TOP));
        addr_of_mut!((*tss).interrupt_stack_table[0])
            .write_unaligned(VirtAddr::new_truncate(area + PERCPU_EXCEPTION_STACK_TOP));
        addr_of_mut!((*tss).interrupt_stack_table[1])
            .write_unaligned(VirtAddr::new_truncate(area + PERCPU_INTERRUPT_STACK_TOP));
        // No I/O permission bitmap: every port access from CPL3 faults.
        addr_of_mut!((*tss).iomap_base).write_unaligned(core::mem::size_of::<TaskStateSegment>() as u16);

        let percpu = (area + PERCPU_OFFSET) as *mut PerCpu;
        percpu.write(PerCpu {
            index,
            node,
            program: u32::MAX,
            trace_ring: 0,
            trace_limit: 0,
            domain: u32::MAX,
            upcall_domain: u32::MAX,
            slots: core::array::from_fn(|i| {
                let depth = MAX_NESTED_INVOCATIONS as isize - i as isize;
                let fpu = if (0..MAX_NESTED_INVOCATIONS as isize).contains(&depth) {
                    area + INVOCATION_FPU_OFFSET + depth as u64 * FPU_IMAGE_SIZE as u64
                } else {
                    0
                };
                InvocationSlot {
                    id: crate::upcalls::first_invocation_id(index, depth),
                    area,
                    fpu,
                    ..InvocationSlot::default()
                }
            }),
            master_pml4: 0,
            remote_open: [0; MAX_REMOTE_OPEN],
            remote_open_count: 0,
            fresh_ids: [0; MAX_NESTED_INVOCATIONS],
        });
        // The guard above depth 0: its callee is no domain.
        (*percpu).slots[SLOTS - 1].callee_state = u64::MAX;

        enable_protection_features();

        // The boot GDT has the same kernel selectors, so CS and SS stay valid across the switch.
        lgdt(&DescriptorTablePointer { limit: 7 * 8 - 1, base: VirtAddr::new_truncate(gdt as u64) });
        load_tss(SegmentSelector(TSS_SELECTOR));
        lidt(&DescriptorTablePointer {
            limit: core::mem::size_of::<Idt>() as u16 - 1,
            base: VirtAddr::new_truncate(addr_of_mut!(IDT) as u64),
        });
    }
}

/// CR4.UMIP: `sgdt`, `sidt`, `sldt`, `smsw` and `str` fault at CPL3 instead of showing kernel
/// addresses.
const CR4_UMIP: u64 = 1 << 11;
/// CR4.SMEP: the kernel never executes a user page (a jump there is a kernel fault, not code
/// running at CPL0).
const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP: the kernel never reads or writes a user page through its user address (it reaches
/// program memory through the direct map, after checking the view's page tables).
const CR4_SMAP: u64 = 1 << 21;

/// The protection features this CPU offers that the kernel turns on, as CR4 bits.
pub fn offered_protection_features() -> u64 {
    let leaf7 = core::arch::x86_64::__cpuid_count(7, 0);
    let mut bits = 0;
    if leaf7.ebx & (1 << 7) != 0 {
        bits |= CR4_SMEP;
    }
    if leaf7.ebx & (1 << 20) != 0 {
        bits |= CR4_SMAP;
    }
    if leaf7.ecx & (1 << 2) != 0 {
        bits |= CR4_UMIP;
    }
    bits
}

/// Whether this CPU offers SMEP and SMAP (defence in depth: the kernel's entry stubs clear DF
/// and AC whatever the CPU offers).
pub fn has_smep_and_smap() -> bool {
    offered_protection_features() & (CR4_SMEP | CR4_SMAP) == CR4_SMEP | CR4_SMAP
}

/// Turns on SMEP, SMAP and UMIP, as far as this CPU offers them.
fn enable_protection_features() {
    let mut cr4: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags)) };
    cr4 |= offered_protection_features();
    // SAFETY: only bits CPUID says this CPU has; the kernel touches no user page through its
    // user address and executes none.
    unsafe { asm!("mov cr4, {}", in(reg) cr4, options(nostack, preserves_flags)) };
}

/// One 16-byte interrupt gate.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    low: u64,
    high: u64,
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static mut IDT: Idt = Idt([Gate { low: 0, high: 0 }; 256]);

fn set_gate(vector: u8, handler: u64, ist: u8, dpl: u8) {
    let gate = Gate {
        low: (handler & 0xFFFF)
            | (KERNEL_CS as u64) << 16
            | (ist as u64 & 7) << 32
            | (0x8E | (dpl as u64 & 3) << 5) << 40 // present, 64-bit interrupt gate
            | ((handler >> 16) & 0xFFFF) << 48,
        high: handler >> 32,
    };
    // SAFETY: only the bootstrap processor writes the IDT, before any other CPU enables
    // interrupts (`idt_ready` orders the two).
    unsafe { (*addr_of_mut!(IDT)).0[vector as usize] = gate };
}

/// Fills the shared IDT. Exceptions run on IST1, so that a fault never lands on a stack the
/// kernel is using. Interrupts use no IST: from CPL3 they start at the top of TSS.RSP0 (free
/// while user code runs), and at CPL0 they arrive only where the kernel lets them in
/// (`wait_for_interrupt`, `wait_briefly_with_interrupts`), always in the kernel's own code,
/// built without the red zone, so they nest on the current stack. An IST stack would not nest:
/// a handler that waits with interrupts on (for the kernel lock, or idle) would be overwritten
/// by the next interrupt. The kernel and invocation gates run on TSS.RSP0, entered only from
/// CPL3.
pub fn build_idt() {
    // SAFETY: the stub table is a static of the assembly in `entry`.
    let stubs = unsafe { &*core::ptr::addr_of!(entry::psyche_exception_stubs) };
    for (vector, &stub) in stubs.iter().enumerate() {
        if stub != 0 {
            set_gate(vector as u8, stub, 1, 0);
        }
    }
    set_gate(KERNEL_GATE_VECTOR, entry::psyche_kernel_gate as *const () as u64, 0, 3);
    // In place of the breakpoint exception's stub: `int3` from CPL3 is the invocation gate.
    set_gate(INVOCATION_GATE_VECTOR, entry::psyche_invocation_gate as *const () as u64, 0, 3);
    set_gate(TIMER_VECTOR, entry::psyche_timer_interrupt as *const () as u64, 0, 0);
    set_gate(WAKEUP_VECTOR, entry::psyche_wakeup_interrupt as *const () as u64, 0, 0);
    set_gate(SPURIOUS_VECTOR, entry::psyche_spurious_interrupt as *const () as u64, 0, 0);
    set_gate(FLUSH_VECTOR, entry::psyche_flush_interrupt as *const () as u64, 0, 0);
    set_gate(UPCALL_VECTOR, entry::psyche_upcall_interrupt as *const () as u64, 0, 0);
}

/// Loads an empty IDT: the next exception shuts the CPU down (used by `crash=triple-fault`).
pub fn load_empty_idt() {
    // SAFETY: deliberately breaks exception handling; only the crash test calls it.
    unsafe { lidt(&DescriptorTablePointer { limit: 0, base: VirtAddr::new_truncate(0) }) };
}

/// Reads CR2 (the faulting address of the last #PF).
pub fn cr2() -> u64 {
    x86_64::registers::control::Cr2::read_raw()
}

/// The TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The APIC ID this CPU reports in CPUID leaf 1 (EBX[31:24]).
pub fn cpuid_apic_id() -> u32 {
    let leaf = core::arch::x86_64::__cpuid(1);
    leaf.ebx >> 24
}

/// Waits with interrupts enabled until an interrupt arrives, then disables them again.
pub fn wait_for_interrupt() {
    // SAFETY: `sti; hlt` is atomic with respect to interrupts (STI's shadow covers HLT), so a
    // wake-up sent just before cannot be lost; the IDT is complete before any CPU gets here.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// Lets pending interrupts in for a moment (used while spinning in the kernel).
pub fn wait_briefly_with_interrupts() {
    // SAFETY: the IDT is complete; interrupt handlers run on IST2 and take no lock.
    unsafe { asm!("sti", "pause", "cli", options(nomem, nostack)) };
}

/// Stops this CPU for good (interrupts off).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: halting with interrupts off only stops this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

//! A protected invocation through a raw `int3` with x87/SSE state of the caller's choosing in
//! place at the gate, and that state as it came back: the probe of the FPU attacks of the
//! hostile suite (`hostile` and `victim` both include this file).

/// What the caller puts in place before the call.
pub struct FpuState {
    /// The two quadwords every XMM register holds.
    pub xmm: [u64; 2],
    pub mxcsr: u32,
    pub fcw: u16,
}

/// The state after the call: XMM0-15 as quadword pairs, then MXCSR and the control word.
pub struct After {
    pub xmm: [[u64; 2]; 16],
    pub mxcsr: u32,
    pub fcw: u16,
}

impl After {
    /// Whether every XMM register, MXCSR and the control word are what `state` put there.
    pub fn is(&self, state: &FpuState) -> bool {
        self.xmm.iter().all(|q| *q == state.xmm) && self.mxcsr == state.mxcsr && self.fcw == state.fcw
    }

    /// How many XMM registers hold `value`.
    pub fn holding(&self, value: [u64; 2]) -> usize {
        self.xmm.iter().filter(|q| **q == value).count()
    }
}

// Reached RIP-relative by the call's assembly, which has no register left for pointers. Only
// the program's main thread uses them.
static mut LOAD: [u64; 2] = [0; 2];
static mut SETTINGS: [u32; 2] = [0; 2];
static mut STORED: [u64; 34] = [0; 34];

/// Invokes operation `operation` of realm `realm` with protection, `state` in place, and
/// returns RAX and the state after the call (MXCSR and the control word are the defaults again
/// when this returns).
pub fn protected_call_with(realm: u32, operation: u64, state: &FpuState) -> (u64, After) {
    // SAFETY: the main thread's own statics (see above).
    unsafe {
        *core::ptr::addr_of_mut!(LOAD) = state.xmm;
        *core::ptr::addr_of_mut!(SETTINGS) = [state.mxcsr, u32::from(state.fcw)];
    }
    let rax: u64;
    // SAFETY: a protected call through the invocation gate; every register the kernel or the
    // callee may change is declared; MXCSR and the control word are the defaults again before
    // the block ends.
    unsafe {
        core::arch::asm!(
            "push rbx",
            "push rbp",
            "ldmxcsr [rip + {settings}]",
            "fldcw [rip + {settings} + 4]",
            "movdqu xmm0, [rip + {load}]",
            ".irp r, 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            "movdqa xmm\\r, xmm0",
            ".endr",
            "int3",
            "pop rbp",
            "pop rbx",
            ".irp r, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            "movdqu [rip + {stored} + \\r * 16], xmm\\r",
            ".endr",
            "stmxcsr [rip + {stored} + 256]",
            "fnstcw [rip + {stored} + 264]",
            "sub rsp, 8",
            "mov dword ptr [rsp], 0x1F80",
            "ldmxcsr [rsp]",
            "mov word ptr [rsp], 0x037F",
            "fldcw [rsp]",
            "add rsp, 8",
            settings = sym SETTINGS,
            load = sym LOAD,
            stored = sym STORED,
            inlateout("rax") 0u64 => rax,
            inlateout("rdi") u64::from(realm) => _,
            inlateout("rdx") operation => _,
            inlateout("r8") 0u64 => _,
            inlateout("r9") 0u64 => _,
            inlateout("r10") 0u64 => _,
            inlateout("r11") 0u64 => _,
            out("rcx") _, out("rsi") _, out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
        );
    }
    // SAFETY: written by the block above, on this thread.
    let stored = unsafe { *core::ptr::addr_of!(STORED) };
    let mut xmm = [[0; 2]; 16];
    for (register, pair) in xmm.iter_mut().zip(stored.chunks(2)) {
        *register = [pair[0], pair[1]];
    }
    (rax, After { xmm, mxcsr: stored[32] as u32, fcw: stored[33] as u16 })
}

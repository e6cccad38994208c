//! Confinement, as Firecracker confines its threads: each thread of a running VM gets a seccomp
//! filter (built with the rust-vmm `seccompiler` crate) that allows only the system calls that
//! thread makes, installed before the guest's first instruction. A guest that found a bug in
//! the VMM's handling of its exits would own a vCPU thread that can still only run its own
//! vCPU, write, allocate memory (never executable), wait and exit: no files to open, no
//! sockets, no processes, no other VM's file descriptors.
//!
//! What each thread may call was found by tracing psyche-vmm (`strace -f`) over the test
//! suite's workloads and by reading the code and what glibc and std do underneath:
//!
//! - every thread: `write`/`writev` (console lines, notes, files opened before the run),
//!   memory (`mmap`, `mprotect` without `PROT_EXEC`, `munmap`, `madvise`, `mremap`, `brk`:
//!   glibc's allocator), `futex` (locks, condition variables, joins), time (`clock_gettime`,
//!   `gettimeofday` where the vDSO falls back to them, `clock_nanosleep`, `nanosleep`,
//!   `sched_yield`), signals (`rt_sigreturn` after the kick, `rt_sigprocmask`, `sigaltstack`
//!   and `restart_syscall`), `getpid`, `gettid`, `tgkill` to this process only (an abort
//!   raises SIGABRT this way) and `exit`/`exit_group`;
//! - a vCPU thread, besides: `ioctl` on its own vCPU's file descriptor with `KVM_RUN`,
//!   `KVM_GET_REGS` and `KVM_GET_SREGS` only, and `getrandom` (the `Random` hypercall);
//! - the trace drainer: nothing more (it reads guest memory and sleeps);
//! - the main thread of the binary (waits for the guest's end, kicks the vCPUs, joins them,
//!   then writes the summary and the trace): `ioctl` with `KVM_GET_MSRS` (the trace's TSC
//!   drift), `close` and `fcntl(F_GETFD)` (dropping the VM's file descriptors).
//!
//! A forbidden call is trapped: the SIGSYS handler prints which thread made which call, with
//! its first arguments, and ends psyche-vmm with [`status::HOST_ERROR`], as Firecracker does.
//! A system call added to a VMM thread's path must be added here, or every run that takes that
//! path ends this way (`--no-seccomp` runs without the filters, to find it with strace).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

use crate::vm::status;

/// Which of psyche-vmm's threads get a seccomp filter during a run ([`crate::VmConfig::seccomp`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seccomp {
    /// No filter anywhere (`--no-seccomp`: for debugging, e.g. with strace or gdb).
    Off,
    /// Filters on the threads `vm::run` starts (the vCPU threads and the trace drainer); the
    /// thread that called `vm::run` is left as it was. The library's default: a program that
    /// runs VMs (the test suites run many, from their own threads) goes on doing anything
    /// after `vm::run` returns, and a filter can never be removed from a thread.
    VmThreads,
    /// Those and the calling thread too, once the VM is built and before the guest's first
    /// instruction: that thread then only waits, kicks and joins the vCPUs, writes what it has
    /// (the summary, the trace) to files opened before, frees memory and exits. The binary's
    /// default, whose main thread does nothing else after the run.
    AllThreads,
}

/// A thread of a running VM, as its filter and its messages know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// A vCPU thread.
    Vcpu,
    /// The trace drainer (only with --trace).
    Drainer,
    /// The thread that called `vm::run` (the binary's main thread: the watchdog and the end
    /// of the run).
    Main,
}

/// Why the filters could not be built or installed (a host error: nothing the guest did).
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {role} thread: {source}")]
    Build { role: String, source: seccompiler::BackendError },
    #[error("cannot install the seccomp filter of the {role} thread: {source} (--no-seccomp runs without)")]
    Install { role: String, source: seccompiler::Error },
    #[error("cannot install the SIGSYS handler that reports forbidden system calls: {0}")]
    Handler(std::io::Error),
}

fn role_name(role: Role, index: u32) -> String {
    match role {
        Role::Vcpu => format!("vcpu{index}"),
        Role::Drainer => "trace-drainer".to_owned(),
        Role::Main => "main".to_owned(),
    }
}

/// A condition on argument `index` (compared as 32 bits: file descriptors, ioctl requests, pids
/// and fcntl commands are ints to the kernel).
fn arg32(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
}

/// A rule of one condition.
fn when(
    condition: Result<SeccompCondition, seccompiler::BackendError>,
) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![condition?])
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// What every thread of a running VM may call.
fn common_rules(pid: u32) -> Result<Rules, seccompiler::BackendError> {
    let mut rules = Rules::new();
    for call in [
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_futex,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_sched_yield,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ] {
        rules.insert(call, Vec::new());
    }
    // Memory, never executable: nothing in psyche-vmm makes code at run time.
    let not_executable = || when(arg32(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0));
    rules.insert(libc::SYS_mmap, vec![not_executable()?]);
    rules.insert(libc::SYS_mprotect, vec![not_executable()?]);
    // Signals to this process's own threads only (kicks, and abort's SIGABRT).
    rules.insert(libc::SYS_tgkill, vec![when(arg32(0, SeccompCmpOp::Eq, u64::from(pid)))?]);
    Ok(rules)
}

// The KVM ioctls the filters allow, numbered as kvm-ioctls numbers them (which does not export
// them).
const KVMIO: u32 = 0xAE;
vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);

/// The ioctls a vCPU thread makes on its vCPU: run it, read its registers at an exit.
fn vcpu_ioctls() -> [u64; 3] {
    [KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS()]
}

/// What the thread of a vCPU whose file descriptor is `vcpu_fd` may call.
fn vcpu_rules(vcpu_fd: RawFd, pid: u32) -> Result<Rules, seccompiler::BackendError> {
    let mut rules = common_rules(pid)?;
    let ioctls = vcpu_ioctls()
        .into_iter()
        .map(|request| {
            SeccompRule::new(vec![arg32(0, SeccompCmpOp::Eq, vcpu_fd as u64)?, arg32(1, SeccompCmpOp::Eq, request)?])
        })
        .collect::<Result<_, _>>()?;
    rules.insert(libc::SYS_ioctl, ioctls);
    rules.insert(libc::SYS_getrandom, Vec::new());
    Ok(rules)
}

/// What the thread that called `vm::run` may call once the guest runs.
fn main_rules(pid: u32) -> Result<Rules, seccompiler::BackendError> {
    let mut rules = common_rules(pid)?;
    rules.insert(libc::SYS_ioctl, vec![when(arg32(1, SeccompCmpOp::Eq, KVM_GET_MSRS()))?]);
    rules.insert(libc::SYS_close, Vec::new());
    rules.insert(libc::SYS_fcntl, vec![when(arg32(1, SeccompCmpOp::Eq, libc::F_GETFD as u64))?]);
    Ok(rules)
}

/// The rules of `role`'s thread (for a vCPU, the one whose file descriptor is `vcpu_fd`).
fn rules(role: Role, vcpu_fd: RawFd, pid: u32) -> Result<Rules, seccompiler::BackendError> {
    match role {
        Role::Vcpu => vcpu_rules(vcpu_fd, pid),
        // The drainer reads guest memory and sleeps: nothing more than every thread.
        Role::Drainer => common_rules(pid),
        Role::Main => main_rules(pid),
    }
}

/// The filter of `role`'s thread (vCPU `index`, whose file descriptor is `vcpu_fd`; both are
/// ignored for the other roles) in process `pid`: a forbidden call traps into the SIGSYS
/// handler.
pub fn filter(role: Role, index: u32, vcpu_fd: RawFd, pid: u32) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { role: role_name(role, index), source };
    let rules = rules(role, vcpu_fd, pid).map_err(build)?;
    let filter =
        SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64).map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

thread_local! {
    /// The calling thread's role and index, for the SIGSYS handler's message (a const
    /// initializer without a destructor: the handler may read it at any time).
    static ROLE: Cell<Option<(Role, u32)>> = const { Cell::new(None) };
}

/// Installs `filter` on the calling thread, which is `role` (vCPU `index`). Irreversible.
pub fn confine(filter: &BpfProgram, role: Role, index: u32) -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    ROLE.with(|slot| slot.set(Some((role, index))));
    seccompiler::apply_filter(filter).map_err(|source| SeccompError::Install { role: role_name(role, index), source })
}

/// Installs the process's SIGSYS handler, once.
fn install_sigsys_handler() -> Result<(), SeccompError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler is an extern "C"
        // function with the SA_SIGINFO signature and is async-signal-safe (see `on_sigsys`).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL));
            }
        }
        Ok(())
    });
    installed.map_err(|errno| SeccompError::Handler(std::io::Error::from_raw_os_error(errno)))
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: i32 = 1;

/// A message built without allocating (the handler may have interrupted the allocator).
struct Message {
    bytes: [u8; 512],
    len: usize,
}

impl Message {
    fn push(&mut self, text: &[u8]) {
        let room = self.bytes.len() - self.len;
        let take = text.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&text[..take]);
        self.len += take;
    }

    fn decimal(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[at..]);
    }

    fn hex(&mut self, value: u64) {
        self.push(b"0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let nibble = ((value >> (shift * 4)) & 0xF) as usize;
            if nibble != 0 || started || shift == 0 {
                started = true;
                self.push(&[b"0123456789abcdef"[nibble]]);
            }
        }
    }
}

/// The names of the system calls a compromised or buggy thread is likeliest to make.
fn syscall_name(number: i64) -> &'static str {
    match number {
        libc::SYS_read => "read",
        libc::SYS_open => "open",
        libc::SYS_openat => "openat",
        libc::SYS_close => "close",
        libc::SYS_mmap => "mmap",
        libc::SYS_mprotect => "mprotect",
        libc::SYS_ioctl => "ioctl",
        libc::SYS_socket => "socket",
        libc::SYS_connect => "connect",
        libc::SYS_clone => "clone",
        libc::SYS_clone3 => "clone3",
        libc::SYS_fork => "fork",
        libc::SYS_execve => "execve",
        libc::SYS_kill => "kill",
        libc::SYS_tgkill => "tgkill",
        libc::SYS_fcntl => "fcntl",
        libc::SYS_ptrace => "ptrace",
        libc::SYS_prctl => "prctl",
        libc::SYS_rt_sigaction => "rt_sigaction",
        libc::SYS_getrandom => "getrandom",
        _ => "",
    }
}

/// Reports a forbidden system call and ends psyche-vmm. Async-signal-safe: it reads a
/// thread-local cell and the signal's own data, formats into a stack buffer and calls only
/// `write` and `_exit`, which every filter allows.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let mut message = Message { bytes: [0; 512], len: 0 };
    message.push(b"psyche-vmm: seccomp: the ");
    match ROLE.with(Cell::get) {
        Some((Role::Vcpu, index)) => {
            message.push(b"vcpu");
            message.decimal(u64::from(index));
        }
        Some((Role::Drainer, _)) => message.push(b"trace-drainer"),
        Some((Role::Main, _)) => message.push(b"main"),
        None => message.push(b"(unnamed)"),
    }
    message.push(b" thread made system call ");
    // SAFETY: the kernel passes a valid siginfo; for SIGSYS from seccomp (si_code SYS_SECCOMP)
    // its union holds `_sigsys { void *_call_addr; int _syscall; unsigned _arch; }` after the
    // three ints of the header and their padding, i.e. the call number at byte 24.
    let (code, number) = unsafe { ((*info).si_code, info.cast::<u8>().add(24).cast::<i32>().read()) };
    message.decimal(number as u64);
    let name = syscall_name(i64::from(number));
    if !name.is_empty() {
        message.push(b" (");
        message.push(name.as_bytes());
        message.push(b")");
    }
    if !context.is_null() {
        // SAFETY: with SA_SIGINFO the third argument is the interrupted thread's ucontext, whose
        // registers hold the trapped call's arguments (RDI, RSI, RDX).
        let gregs = unsafe { (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        message.push(b" with arguments ");
        for (i, register) in [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX].into_iter().enumerate() {
            if i > 0 {
                message.push(b", ");
            }
            message.hex(gregs[register as usize] as u64);
        }
    }
    if code != SYS_SECCOMP {
        message.push(b" (SIGSYS not from seccomp)");
    }
    message.push(b", which its filter forbids: stopping (run with --no-seccomp to debug)\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid for `len` bytes.
    unsafe {
        libc::write(2, message.bytes.as_ptr().cast(), message.len);
        libc::_exit(i32::from(status::HOST_ERROR));
    }
}

/// Testing only ([`crate::VmConfig::seccomp_probe`]): makes a call no filter allows (opening a
/// socket, as code that took over a thread might); returns whether it went through, i.e. the
/// calling thread is not confined. Under a filter it does not return: psyche-vmm ends.
pub fn probe() -> bool {
    // SAFETY: socket has no memory arguments; a descriptor it returns is closed at once.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd >= 0 {
            libc::close(fd);
        }
        fd >= 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Installs `role`'s rules on a thread of its own, with violations made `EPERM` instead of
    /// trapping (the test process must go on), and runs `body` there.
    fn in_confined_thread<T: Send + 'static>(
        role: Role,
        vcpu_fd: RawFd,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            let rules = rules(role, vcpu_fd, std::process::id()).unwrap();
            let errno = SeccompAction::Errno(libc::EPERM as u32);
            let filter = SeccompFilter::new(rules, errno, SeccompAction::Allow, TargetArch::x86_64).unwrap();
            seccompiler::apply_filter(&BpfProgram::try_from(filter).unwrap()).unwrap();
            body()
        })
        .join()
        .unwrap()
    }

    /// A call's result and errno.
    fn result(value: libc::c_long) -> (libc::c_long, i32) {
        (value, if value < 0 { std::io::Error::last_os_error().raw_os_error().unwrap_or(0) } else { 0 })
    }

    /// A spare descriptor (a duplicate of stdin) to stand in for a vCPU's: the filter only
    /// looks at numbers.
    fn spare_fd() -> RawFd {
        // SAFETY: dup has no memory arguments.
        let fd = unsafe { libc::dup(0) };
        assert!(fd >= 0);
        fd
    }

    fn ioctl(fd: RawFd, request: u64) -> (libc::c_long, i32) {
        // SAFETY: these requests on a descriptor that is not KVM's fail without touching memory.
        result(unsafe { libc::ioctl(fd, request as _, 0) } as libc::c_long)
    }

    fn socket() -> (libc::c_long, i32) {
        // SAFETY: no memory arguments; a descriptor it returns is closed at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: the descriptor was just opened here.
            unsafe { libc::close(fd) };
        }
        result(fd as libc::c_long)
    }

    fn open() -> (libc::c_long, i32) {
        // SAFETY: a valid C string; a descriptor it returns is closed at once.
        let fd = unsafe { libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) };
        if fd >= 0 {
            // SAFETY: the descriptor was just opened here.
            unsafe { libc::close(fd) };
        }
        result(fd as libc::c_long)
    }

    /// Maps a page with `prot`; whether it worked, and the errno.
    fn map(prot: libc::c_int) -> (bool, i32) {
        // SAFETY: an anonymous private mapping, unmapped at once.
        unsafe {
            let page = libc::mmap(std::ptr::null_mut(), 4096, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            if page == libc::MAP_FAILED {
                return (false, std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            libc::munmap(page, 4096);
            (true, 0)
        }
    }

    const DENIED: (libc::c_long, i32) = (-1, libc::EPERM);

    #[test]
    fn the_filters_build_for_every_role_with_the_ioctl_numbers_kvm_uses() {
        let pid = std::process::id();
        for role in [Role::Vcpu, Role::Drainer, Role::Main] {
            assert!(!filter(role, 3, 17, pid).unwrap().is_empty(), "{role:?}");
        }
        // As strace and the kernel's headers number them.
        assert_eq!(
            (KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS(), KVM_GET_MSRS()),
            (0xAE80, 0x8090_AE81, 0x8138_AE83, 0xC008_AE88)
        );
    }

    #[test]
    fn a_vcpu_thread_may_run_its_own_vcpu_allocate_and_print_and_nothing_else() {
        let own = spare_fd();
        let seen = in_confined_thread(Role::Vcpu, own, move || {
            // Allocation, locks and formatting go on working.
            let text = format!("{}", vec![1u8; 300_000].len());
            let mut random = [0u8; 16];
            // SAFETY: the buffer is valid for 16 bytes.
            let random = result(unsafe { libc::getrandom(random.as_mut_ptr().cast(), 16, 0) } as libc::c_long);
            (
                text,
                random,
                [ioctl(own, KVM_RUN()), ioctl(own, KVM_GET_REGS()), ioctl(own, KVM_GET_SREGS())],
                [ioctl(own, KVM_GET_MSRS()), ioctl(own + 100, KVM_RUN()), socket(), open()],
                [map(libc::PROT_READ | libc::PROT_WRITE), map(libc::PROT_READ | libc::PROT_EXEC)],
            )
        });
        let (text, random, allowed, denied, maps) = seen;
        assert_eq!(text, "300000");
        assert_eq!(random, (16, 0));
        for call in allowed {
            // They reach the kernel, which refuses them: the descriptor is no vCPU.
            assert_ne!(call.1, libc::EPERM, "{call:?}");
        }
        assert_eq!(denied, [DENIED; 4], "another ioctl, another descriptor, a socket, a file");
        assert_eq!(maps, [(true, 0), (false, libc::EPERM)], "data memory yes, executable memory no");
        // SAFETY: closing the descriptor this test duplicated.
        unsafe { libc::close(own) };
    }

    #[test]
    fn the_drainer_may_not_touch_kvm_and_the_main_thread_only_reads_msrs() {
        let fd = spare_fd();
        let drainer = in_confined_thread(Role::Drainer, fd, move || [ioctl(fd, KVM_RUN()), socket(), open()]);
        assert_eq!(drainer, [DENIED; 3]);
        let main = in_confined_thread(Role::Main, fd, move || {
            // SAFETY: the descriptor belongs to this test, and is closed once.
            let closed = result(unsafe { libc::close(fd) } as libc::c_long);
            (ioctl(fd, KVM_GET_MSRS()), [ioctl(fd, KVM_RUN()), socket(), open()], closed)
        });
        assert_ne!(main.0 .1, libc::EPERM, "{:?}", main.0);
        assert_eq!(main.1, [DENIED; 3]);
        assert_eq!(main.2, (0, 0), "closing");
    }
}

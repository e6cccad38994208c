//! Synchronization shared by both thread packages: threads of [`crate::threads`] and tasks of
//! [`crate::tasks`] wait on the same objects and wake each other.
//!
//! This is Psyche's rule for mixing thread packages in a realm: every package provides a
//! *block* and an *unblock* (for threads, [`crate::threads::block`] / [`crate::threads::unblock`],
//! the pair every root realm offers; for tasks, returning [`crate::tasks::Poll::Pending`] /
//! [`crate::tasks::unblock`]); a shared object is plain memory and atomics that records who
//! waits as a [`Waiter`] (package, domain, id), and whoever signals calls the unblock of the
//! waiter's own package. Neither package knows the other.
//!
//! [`Semaphore`] holds no pointers and is valid all-zero, so it can live in a realm
//! (`Realm<T>` with `T` containing semaphores), at the same address in every domain that
//! opens it.
//!
//! Wake-ups are never lost: a waiter registers itself, then looks at the permits again; a
//! releaser adds its permit, then looks for waiters (sequentially consistent atomics, so one
//! of the two sees the other). The packages' own unblocks keep a permit (threads) or a
//! runnable bit (tasks) for a waiter that has not reached its block yet. A wake-up can be
//! spurious (a thread's `block` returns, a task is polled), never missing: waits loop.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::operations;
use crate::sys::{result, SysError};
use crate::tasks::{self, TaskContext, TaskId};
use crate::threads::{self, ThreadId};

/// Most waiters registered on one semaphore at once (more wait by yielding).
pub const MAX_WAITERS: usize = 8;

/// Someone who can wait: a thread or a task, of some protection domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiter {
    /// A thread of the default package.
    Thread { domain: u32, thread: ThreadId },
    /// A run-to-completion task.
    Task { domain: u32, task: TaskId },
}

const KIND_THREAD: u64 = 1;
const KIND_TASK: u64 = 2;
const DOMAIN_BITS: u32 = 30;

impl Waiter {
    /// The calling thread.
    pub fn current_thread() -> Self {
        Self::Thread { domain: crate::program_index() as u32, thread: threads::current() }
    }

    /// The task being polled.
    pub fn task(cx: &TaskContext) -> Self {
        Self::Task { domain: crate::program_index() as u32, task: cx.id() }
    }

    /// As one non-zero word: the package in bits 62-63, the domain in bits 32-61, the id below.
    pub fn to_raw(self) -> u64 {
        let (kind, domain, id) = match self {
            Self::Thread { domain, thread } => (KIND_THREAD, domain, thread.0),
            Self::Task { domain, task } => (KIND_TASK, domain, task.0),
        };
        kind << 62 | (u64::from(domain) & ((1 << DOMAIN_BITS) - 1)) << 32 | u64::from(id)
    }

    /// The waiter [`Waiter::to_raw`] made this word of (`None` for 0 and other non-waiters).
    pub fn from_raw(raw: u64) -> Option<Self> {
        let domain = ((raw >> 32) & ((1 << DOMAIN_BITS) - 1)) as u32;
        let id = raw as u32;
        match raw >> 62 {
            KIND_THREAD => Some(Self::Thread { domain, thread: ThreadId(id) }),
            KIND_TASK => Some(Self::Task { domain, task: TaskId(id) }),
            _ => None,
        }
    }

    /// Wakes the waiter with its own package's unblock: `threads::unblock` for a thread,
    /// `tasks::unblock` for a task. A thread of another domain is unblocked through that
    /// domain's root realm (operation [`operations::UNBLOCK`], which needs the right to invoke
    /// it); tasks of another domain cannot be reached (`NoSuchCall`).
    pub fn unblock(self) -> Result<(), SysError> {
        let here = crate::program_index() as u32;
        match self {
            Self::Thread { domain, thread } if domain == here => threads::unblock(thread),
            Self::Task { domain, task } if domain == here => tasks::unblock(task),
            Self::Thread { domain, thread } => {
                result(operations::protected_call(domain, operations::UNBLOCK, [u64::from(thread.0), 0, 0, 0]))
                    .map(|_| ())
            }
            Self::Task { .. } => Err(SysError::NoSuchCall),
        }
    }
}

impl fmt::Display for Waiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, domain, id) = match *self {
            Self::Thread { domain, thread } => ("thread", domain, thread.0),
            Self::Task { domain, task } => ("task", domain, task.0),
        };
        if domain == crate::program_index() as u32 {
            write!(f, "{what} {id}")
        } else {
            write!(f, "{what} {id} of domain {domain}")
        }
    }
}

/// A counting semaphore that threads and tasks wait on alike.
///
/// A thread waits with [`Semaphore::acquire`] (it blocks); a task with
/// [`Semaphore::poll_acquire`] (`false`: it is registered, return `Poll::Pending`). Anyone
/// releases with [`Semaphore::release`], which unblocks one registered waiter with its own
/// package's unblock. A task that gives up waiting before it got a permit calls
/// [`Semaphore::cancel`].
#[derive(Debug)]
#[repr(C)]
pub struct Semaphore {
    permits: AtomicU64,
    /// Registered waiters ([`Waiter::to_raw`]; 0: free).
    waiters: [AtomicU64; MAX_WAITERS],
    /// Waiters unblocked by releases, so far.
    unblocks: AtomicU64,
}

impl Default for Semaphore {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Semaphore {
    /// A semaphore with `permits` permits and no waiters. (All-zero memory is `new(0)`.)
    pub const fn new(permits: u64) -> Self {
        Self {
            permits: AtomicU64::new(permits),
            waiters: [const { AtomicU64::new(0) }; MAX_WAITERS],
            unblocks: AtomicU64::new(0),
        }
    }

    /// Takes a permit if there is one, without waiting.
    pub fn try_acquire(&self) -> bool {
        self.permits.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| p.checked_sub(1)).is_ok()
    }

    /// Takes a permit, blocking the calling thread (of the default package) until there is one.
    /// Not for tasks: they use [`Semaphore::poll_acquire`].
    pub fn acquire(&self) {
        let me = Waiter::current_thread();
        loop {
            if self.try_acquire() {
                self.acquired(me);
                return;
            }
            if !self.register(me) {
                // Every entry is taken: wait by letting the others run.
                threads::yield_now();
                continue;
            }
            // A release between the first look and the registration saw no waiter: look again.
            if self.try_acquire() {
                self.acquired(me);
                return;
            }
            threads::block();
        }
    }

    /// A task's acquire: `true` if it took a permit; `false` if there is none, in which case
    /// the task is registered and should return `Poll::Pending` (a release unblocks it and it
    /// is polled again; it calls this again then).
    pub fn poll_acquire(&self, cx: &TaskContext) -> bool {
        let me = Waiter::task(cx);
        if self.try_acquire() {
            self.acquired(me);
            return true;
        }
        if !self.register(me) {
            // Every entry is taken: be polled again soon.
            let _ = tasks::unblock(cx.id());
            return false;
        }
        if self.try_acquire() {
            self.acquired(me);
            return true;
        }
        false
    }

    /// Withdraws `waiter` (a task that stopped waiting without a permit, say). A wake-up it
    /// absorbed is passed on.
    pub fn cancel(&self, waiter: Waiter) {
        self.acquired(waiter);
    }

    /// Adds a permit and unblocks one registered waiter, if any: which one (for the curious).
    pub fn release(&self) -> Option<Waiter> {
        self.permits.fetch_add(1, Ordering::SeqCst);
        self.wake_one()
    }

    /// Permits available now.
    pub fn available(&self) -> u64 {
        self.permits.load(Ordering::SeqCst)
    }

    /// Waiters registered now.
    pub fn waiting(&self) -> usize {
        self.waiters.iter().filter(|w| w.load(Ordering::SeqCst) != 0).count()
    }

    /// Waiters unblocked by releases so far.
    pub fn unblocks(&self) -> u64 {
        self.unblocks.load(Ordering::Relaxed)
    }

    /// Registers `waiter` (kept if it is already registered); false if the table is full.
    fn register(&self, waiter: Waiter) -> bool {
        let raw = waiter.to_raw();
        if self.waiters.iter().any(|w| w.load(Ordering::SeqCst) == raw) {
            return true;
        }
        self.waiters.iter().any(|w| w.compare_exchange(0, raw, Ordering::SeqCst, Ordering::SeqCst).is_ok())
    }

    /// `waiter` got its permit (or gave up): it takes its entry back. A releaser may have
    /// claimed that entry just before and sent it a wake-up meant for a waiter: while permits
    /// remain, that wake-up goes on to the next registered waiter, so none of them is left
    /// blocked beside a free permit.
    fn acquired(&self, waiter: Waiter) {
        let raw = waiter.to_raw();
        for entry in &self.waiters {
            let _ = entry.compare_exchange(raw, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
        if self.permits.load(Ordering::SeqCst) > 0 {
            self.wake_one();
        }
    }

    /// Unblocks one registered waiter (skipping those that are gone).
    fn wake_one(&self) -> Option<Waiter> {
        for entry in &self.waiters {
            let raw = entry.load(Ordering::SeqCst);
            if raw == 0 || entry.compare_exchange(raw, 0, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                continue;
            }
            if let Some(waiter) = Waiter::from_raw(raw) {
                if waiter.unblock().is_ok() {
                    self.unblocks.fetch_add(1, Ordering::Relaxed);
                    return Some(waiter);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_round_trip_through_one_word() {
        for waiter in [
            Waiter::Thread { domain: 0, thread: ThreadId(0) },
            Waiter::Thread { domain: 7, thread: ThreadId(15) },
            Waiter::Task { domain: 0, task: TaskId(31) },
            Waiter::Task { domain: (1 << DOMAIN_BITS) - 1, task: TaskId(u32::MAX) },
        ] {
            assert_ne!(waiter.to_raw(), 0);
            assert_eq!(Waiter::from_raw(waiter.to_raw()), Some(waiter));
        }
        assert_eq!(Waiter::from_raw(0), None);
        assert_eq!(Waiter::from_raw(3 << 62), None);
    }

    #[test]
    fn permits_count_without_waiters() {
        let semaphore = Semaphore::new(2);
        assert!(semaphore.try_acquire());
        assert!(semaphore.try_acquire());
        assert!(!semaphore.try_acquire());
        assert_eq!(semaphore.release(), None);
        assert_eq!(semaphore.available(), 1);
        assert!(semaphore.try_acquire());
        assert_eq!(semaphore.unblocks(), 0);
    }

    #[test]
    fn registration_is_idempotent_and_bounded() {
        let semaphore = Semaphore::default();
        let waiter = |i| Waiter::Thread { domain: 9, thread: ThreadId(i) };
        assert!(semaphore.register(waiter(1)));
        assert!(semaphore.register(waiter(1)));
        assert_eq!(semaphore.waiting(), 1);
        for i in 2..=MAX_WAITERS as u32 {
            assert!(semaphore.register(waiter(i)));
        }
        assert!(!semaphore.register(waiter(100)));
        semaphore.cancel(waiter(1));
        assert_eq!(semaphore.waiting(), MAX_WAITERS - 1);
    }
}

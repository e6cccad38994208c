//! realm-sdk's second thread package: run-to-completion tasks on an executor thread.
//!
//! A task is a function `fn(&mut TaskContext) -> Poll` plus a few words of inline state
//! ([`TaskContext::words`]). It has **no stack of its own**: every time the executor *polls*
//! it, it runs on the executor's stack from the top of its function to a `return`, keeping
//! whatever must survive between polls in its words (a state machine). A task that cannot go
//! on registers itself as a waiter somewhere (a [`crate::sync::Semaphore`], say) and returns
//! [`Poll::Pending`]; [`unblock`] makes it runnable again, and the executor polls it once more.
//!
//! How this differs from [`crate::threads`]:
//!
//! * **No stack per task.** A thread costs a 32 KiB stack and a context block; a task costs
//!   a table slot of a few words. There are at most [`MAX_TASKS`] tasks (fixed tables, no heap).
//! * **No preemption inside a task, among tasks.** Tasks run one at a time on one executor
//!   thread, each poll to completion: no other task runs in the middle of a poll, so tasks
//!   need no locks among themselves. The executor thread itself is an ordinary thread of the
//!   default package and may be preempted by a time slice in the middle of a poll, letting
//!   *threads* run: data shared with threads still needs atomics.
//! * **Cheap switches.** Going from one task to the next is a function return and a function
//!   call: no registers saved, no kernel.
//! * **Blocking means returning.** A task must never call [`crate::threads::block`] (that
//!   would block the executor thread and every task with it). When no task is runnable, the
//!   executor thread blocks itself with `threads::block`; an [`unblock`] from any thread (or
//!   from an invocation handler on another processor) sets the task's runnable bit and, if the
//!   executor thread sleeps, unblocks it with `threads::unblock`.
//!
//! A poll may be spurious (a wakeup meant for an earlier wait, say): a task always checks
//! its condition again when polled, as a thread checks its condition after `threads::block`.
//!
//! ```ignore
//! use realm_sdk::tasks::{self, Poll, TaskContext};
//!
//! fn countdown(cx: &mut TaskContext) -> Poll {
//!     cx.words[0] -= 1;
//!     if cx.words[0] == 0 { Poll::Done } else { Poll::Yield }
//! }
//! tasks::spawn(countdown, [3, 0, 0, 0])?;
//! tasks::spawn_executor()?;      // a thread that polls tasks until none is left
//! ```
//!
//! There is one executor per program (the tables are this program's statics).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::println;
use crate::sys::SysError;
use crate::threads::{self, ThreadId};

/// Most tasks that exist at once.
pub const MAX_TASKS: usize = 32;
/// Words of inline state per task.
pub const STATE_WORDS: usize = 4;

const FREE: u8 = 0;
/// Being set up by a spawner.
const CLAIMED: u8 = 1;
const LIVE: u8 = 2;

/// No executor thread.
const NONE: u32 = u32::MAX;

/// A task: its index in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskId(pub u32);

/// What a poll of a task says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// Cannot go on: the task registered itself as a waiter; an [`unblock`] polls it again.
    Pending,
    /// Can go on, but lets the other runnable tasks run first: polled again soon.
    Yield,
    /// Finished: the slot is freed.
    Done,
}

/// A task's function.
pub type TaskFn = fn(&mut TaskContext) -> Poll;

/// What a task sees when polled: who it is and its inline state, kept between polls.
#[derive(Debug)]
pub struct TaskContext {
    id: TaskId,
    /// The task's state, as it left it at its last poll (as given to [`spawn`] at first).
    pub words: [u64; STATE_WORDS],
}

impl TaskContext {
    /// The task being polled.
    pub fn id(&self) -> TaskId {
        self.id
    }
}

struct Slot {
    state: AtomicU8,
    function: UnsafeCell<TaskFn>,
    context: UnsafeCell<TaskContext>,
}

struct Table {
    slots: [Slot; MAX_TASKS],
}

// SAFETY: a slot's function and context are written by the spawner that claimed the slot
// (state CLAIMED) before it publishes it (state LIVE, release), and after that only by the one
// executor thread (the EXECUTOR claim), which reads the state with acquire first.
unsafe impl Sync for Table {}

fn finished(_: &mut TaskContext) -> Poll {
    Poll::Done
}

static TABLE: Table = Table {
    slots: [const {
        Slot {
            state: AtomicU8::new(FREE),
            function: UnsafeCell::new(finished),
            context: UnsafeCell::new(TaskContext { id: TaskId(0), words: [0; STATE_WORDS] }),
        }
    }; MAX_TASKS],
};

/// Bit i: task i is runnable (set by [`unblock`], cleared by the executor before each poll).
static RUNNABLE: AtomicU32 = AtomicU32::new(0);
/// Tasks spawned and not yet done.
static LIVE_TASKS: AtomicU32 = AtomicU32::new(0);
/// The executor's thread (NONE: none runs).
static EXECUTOR: AtomicU32 = AtomicU32::new(NONE);
/// The executor thread found no runnable task and is blocking (or blocked): an unblock must
/// unblock it.
static SLEEPING: AtomicBool = AtomicBool::new(false);

static SPAWNED: AtomicU64 = AtomicU64::new(0);
static COMPLETED: AtomicU64 = AtomicU64::new(0);
static POLLS: AtomicU64 = AtomicU64::new(0);
static EXECUTOR_BLOCKS: AtomicU64 = AtomicU64::new(0);
static EXECUTOR_WAKEUPS: AtomicU64 = AtomicU64::new(0);

/// Counts since the program started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Tasks spawned.
    pub spawned: u64,
    /// Tasks that returned [`Poll::Done`].
    pub completed: u64,
    /// Polls, all tasks together.
    pub polls: u64,
    /// Times the executor thread blocked for lack of runnable tasks.
    pub executor_blocks: u64,
    /// Times an [`unblock`] unblocked the sleeping executor thread.
    pub executor_wakeups: u64,
}

/// The counts so far.
pub fn stats() -> Stats {
    Stats {
        spawned: SPAWNED.load(Ordering::Relaxed),
        completed: COMPLETED.load(Ordering::Relaxed),
        polls: POLLS.load(Ordering::Relaxed),
        executor_blocks: EXECUTOR_BLOCKS.load(Ordering::Relaxed),
        executor_wakeups: EXECUTOR_WAKEUPS.load(Ordering::Relaxed),
    }
}

/// Tasks spawned and not yet done.
pub fn live() -> u32 {
    LIVE_TASKS.load(Ordering::Acquire)
}

/// Makes a task that runs `function` with inline state `words`; it is runnable at once (it is
/// first polled when an executor runs). From any thread or task of this program.
pub fn spawn(function: TaskFn, words: [u64; STATE_WORDS]) -> Result<TaskId, SysError> {
    let (index, slot) = TABLE
        .slots
        .iter()
        .enumerate()
        .find(|(_, slot)| slot.state.compare_exchange(FREE, CLAIMED, Ordering::AcqRel, Ordering::Relaxed).is_ok())
        .ok_or(SysError::TableFull)?;
    let id = TaskId(index as u32);
    // SAFETY: the slot is CLAIMED: ours alone until it is published below (the executor
    // touches LIVE slots only).
    unsafe {
        *slot.function.get() = function;
        *slot.context.get() = TaskContext { id, words };
    }
    LIVE_TASKS.fetch_add(1, Ordering::AcqRel);
    SPAWNED.fetch_add(1, Ordering::Relaxed);
    slot.state.store(LIVE, Ordering::Release);
    // The task exists from here on: if the executor thread cannot be woken (it ended), the
    // task waits, runnable, for the next executor.
    let _ = unblock(id);
    Ok(id)
}

/// Makes task `task` runnable (a task that is running now is polled once more after this
/// poll), and unblocks the executor thread if it sleeps for lack of work. Safe from any thread,
/// from any task, and from invocation handlers on other processors.
pub fn unblock(task: TaskId) -> Result<(), SysError> {
    let slot = TABLE.slots.get(task.0 as usize).ok_or(SysError::InvalidArgument)?;
    if slot.state.load(Ordering::Acquire) != LIVE {
        return Err(SysError::NotFound);
    }
    // Dekker with the executor: it sets SLEEPING, then looks at RUNNABLE; we set RUNNABLE,
    // then look at SLEEPING. One of the two sees the other's store.
    RUNNABLE.fetch_or(1 << task.0, Ordering::SeqCst);
    if SLEEPING.swap(false, Ordering::SeqCst) {
        let executor = EXECUTOR.load(Ordering::Acquire);
        if executor != NONE {
            EXECUTOR_WAKEUPS.fetch_add(1, Ordering::Relaxed);
            // The executor may not have reached `threads::block` yet: the permit waits for it.
            threads::unblock(ThreadId(executor))?;
        }
    }
    Ok(())
}

/// Runs the executor on the calling thread: polls runnable tasks, round robin, until no task
/// is left (spawn the first tasks before calling this); blocks the thread while tasks exist
/// but none is runnable. `Busy` if another thread is the executor already.
pub fn run_executor() -> Result<(), SysError> {
    let me = threads::current().0;
    EXECUTOR.compare_exchange(NONE, me, Ordering::AcqRel, Ordering::Acquire).map_err(|_| SysError::Busy)?;
    let mut next = 0u32;
    loop {
        let runnable = RUNNABLE.load(Ordering::SeqCst);
        if runnable == 0 {
            if LIVE_TASKS.load(Ordering::Acquire) == 0 {
                break;
            }
            SLEEPING.store(true, Ordering::SeqCst);
            if RUNNABLE.load(Ordering::SeqCst) != 0 || LIVE_TASKS.load(Ordering::Acquire) == 0 {
                SLEEPING.store(false, Ordering::SeqCst);
                continue;
            }
            EXECUTOR_BLOCKS.fetch_add(1, Ordering::Relaxed);
            // Returns when an unblock came (before or after this call), or spuriously: the
            // loop looks again either way.
            threads::block();
            SLEEPING.store(false, Ordering::SeqCst);
            continue;
        }
        // The first runnable task at or after `next`.
        let task = (runnable.rotate_right(next).trailing_zeros() + next) % MAX_TASKS as u32;
        next = (task + 1) % MAX_TASKS as u32;
        // Cleared before the poll: an unblock during the poll sets it again.
        RUNNABLE.fetch_and(!(1 << task), Ordering::SeqCst);
        poll(task);
    }
    EXECUTOR.store(NONE, Ordering::Release);
    Ok(())
}

fn poll(task: u32) {
    let slot = &TABLE.slots[task as usize];
    if slot.state.load(Ordering::Acquire) != LIVE {
        return;
    }
    POLLS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the slot is LIVE and this thread is the executor (the only one that touches
    // LIVE slots' function and context); the task function gets its own context only.
    let outcome = unsafe {
        let function = *slot.function.get();
        function(&mut *slot.context.get())
    };
    match outcome {
        Poll::Pending => {}
        Poll::Yield => {
            RUNNABLE.fetch_or(1 << task, Ordering::SeqCst);
        }
        Poll::Done => {
            RUNNABLE.fetch_and(!(1 << task), Ordering::SeqCst);
            slot.state.store(FREE, Ordering::Release);
            COMPLETED.fetch_add(1, Ordering::Relaxed);
            LIVE_TASKS.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

extern "sysv64" fn executor_thread(_: u64) {
    if let Err(error) = run_executor() {
        println!("tasks: the executor thread could not run: {error:?}");
    }
}

/// Starts a thread of the default package that runs the executor ([`run_executor`]) and ends
/// when no task is left. Needs upcalls on ([`threads::enable`]).
pub fn spawn_executor() -> Result<ThreadId, SysError> {
    threads::spawn(executor_thread, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn countdown(cx: &mut TaskContext) -> Poll {
        cx.words[0] -= 1;
        cx.words[1] += 1;
        if cx.words[0] == 0 {
            Poll::Done
        } else {
            Poll::Yield
        }
    }

    // One test only: the tables are global. No task ever waits, so the executor never blocks
    // (which would need the kernel).
    #[test]
    fn tasks_that_yield_run_to_completion_round_robin() {
        let a = spawn(countdown, [3, 0, 0, 0]).unwrap();
        let b = spawn(countdown, [5, 0, 0, 0]).unwrap();
        assert_ne!(a, b);
        assert_eq!(live(), 2);
        run_executor().unwrap();
        assert_eq!(live(), 0);
        let counts = stats();
        assert_eq!((counts.spawned, counts.completed, counts.polls, counts.executor_blocks), (2, 2, 8, 0));
        assert_eq!(unblock(a), Err(SysError::NotFound));
        assert_eq!(unblock(TaskId(MAX_TASKS as u32)), Err(SysError::InvalidArgument));
        // Slots are reused.
        assert_eq!(spawn(countdown, [1, 0, 0, 0]).unwrap(), a);
        run_executor().unwrap();
        assert_eq!(stats().completed, 3);
    }
}

//! This thread's key list and context block.
//!
//! The kernel learns where the thread's context block is once, at program start
//! (`Syscall::SetContextBlock`), and reads the key list it points to whenever the thread
//! touches a realm outside its view. Adding or removing a key is a store in this program's
//! memory, no system call. Each program starts with a key of its own, which every realm it
//! creates lists with every right.
//!
//! One thread per program for now: the list is a single static. (User-level threads, with a
//! context block each, come with upcalls.)

use core::cell::UnsafeCell;

use psyche_abi::realm::{ContextBlock, Key, MAX_THREAD_KEYS};
use psyche_abi::syscall::Syscall;

use crate::sys::{raw_syscall, result, SysError};

#[repr(C, align(64))]
struct Thread {
    block: ContextBlock,
    keys: [Key; MAX_THREAD_KEYS],
    own: Key,
}

struct ThreadCell(UnsafeCell<Thread>);

// SAFETY: a program has one thread; nothing else touches this memory but the kernel, which
// only reads it while that thread is stopped in a fault or system call.
unsafe impl Sync for ThreadCell {}

static THREAD: ThreadCell = ThreadCell(UnsafeCell::new(Thread {
    block: ContextBlock { keys: 0, key_count: 0 },
    keys: [Key([0; 2]); MAX_THREAD_KEYS],
    own: Key([0; 2]),
}));

fn thread() -> &'static mut Thread {
    // SAFETY: see `ThreadCell`; callers never hold two of these references at once.
    unsafe { &mut *THREAD.0.get() }
}

/// Registers the context block and makes this program's own key. Called by the entry point.
pub(crate) fn init() -> Result<(), SysError> {
    let thread = thread();
    thread.block.keys = thread.keys.as_ptr() as u64;
    result(raw_syscall(Syscall::SetContextBlock as u64, &thread.block as *const ContextBlock as u64, 0, 0))?;
    let own = crate::realm::generate_key()?;
    thread.own = own;
    add(own)
}

/// This program's own key (on every realm it creates, with every right).
pub fn own_key() -> Result<Key, SysError> {
    let own = thread().own;
    if own == Key::default() {
        return Err(SysError::NotFound);
    }
    Ok(own)
}

/// Adds a key to this thread's list (a no-op if it is there).
pub fn add(key: Key) -> Result<(), SysError> {
    let thread = thread();
    let count = thread.block.key_count as usize;
    if thread.keys[..count].contains(&key) {
        return Ok(());
    }
    if count == MAX_THREAD_KEYS {
        return Err(SysError::TableFull);
    }
    thread.keys[count] = key;
    thread.block.key_count += 1;
    Ok(())
}

/// Removes a key from this thread's list; realms it opened stay open.
pub fn remove(key: &Key) {
    let thread = thread();
    let count = thread.block.key_count as usize;
    if let Some(at) = thread.keys[..count].iter().position(|k| k == key) {
        thread.keys.copy_within(at + 1..count, at);
        thread.block.key_count -= 1;
    }
}

/// A copy of the current list.
pub fn list() -> impl Iterator<Item = Key> {
    let thread = thread();
    let count = thread.block.key_count as usize;
    let keys = thread.keys;
    (0..count).map(move |i| keys[i])
}

/// Points the kernel at another context block (for programs that test the kernel's checks).
pub fn set_context_block_raw(address: u64) -> Result<(), SysError> {
    result(raw_syscall(Syscall::SetContextBlock as u64, address, 0, 0)).map(|_| ())
}

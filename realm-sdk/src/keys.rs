//! The program's key list.
//!
//! Every thread's context block points to the same list, so that the keys a program holds are
//! the keys each of its threads presents; the kernel reads the list of the current thread
//! whenever it touches a realm outside the view. Adding or removing a key is a store in this
//! program's memory, no system call. Each program starts with a key of its own, which every
//! realm it creates lists with every right.

use core::cell::UnsafeCell;

use psyche_abi::realm::{Key, MAX_THREAD_KEYS};

use crate::sys::SysError;

// The keys first: 16-byte keys at a 64-byte aligned start never cross a page, as the kernel
// requires when it reads them.
#[repr(C, align(64))]
struct Thread {
    keys: [Key; MAX_THREAD_KEYS],
    count: u64,
    own: Key,
}

struct ThreadCell(UnsafeCell<Thread>);

// SAFETY: keys are added and removed by the program's threads one at a time (key-list edits
// are not made from upcall handlers); the kernel only reads the list.
unsafe impl Sync for ThreadCell {}

static THREAD: ThreadCell =
    ThreadCell(UnsafeCell::new(Thread { count: 0, keys: [Key([0; 2]); MAX_THREAD_KEYS], own: Key([0; 2]) }));

fn thread() -> &'static mut Thread {
    // SAFETY: see `ThreadCell`; callers never hold two of these references at once.
    unsafe { &mut *THREAD.0.get() }
}

/// Makes this program's own key. Called by the entry point, after the processor block is
/// registered (so that the kernel can write the random bytes through the current view).
pub(crate) fn init() -> Result<(), SysError> {
    let own = crate::realm::generate_key()?;
    thread().own = own;
    add(own)
}

/// Where the list is and how long, for context blocks.
pub(crate) fn location() -> (u64, u64) {
    let thread = thread();
    (thread.keys.as_ptr() as u64, core::ptr::addr_of!(thread.count) as u64)
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
    let count = thread.count as usize;
    if thread.keys[..count].contains(&key) {
        return Ok(());
    }
    if count == MAX_THREAD_KEYS {
        return Err(SysError::TableFull);
    }
    thread.keys[count] = key;
    thread.count += 1;
    crate::threads::keys_changed(thread.count);
    Ok(())
}

/// Removes a key from this thread's list; realms it opened stay open.
pub fn remove(key: &Key) {
    let thread = thread();
    let count = thread.count as usize;
    if let Some(at) = thread.keys[..count].iter().position(|k| k == key) {
        thread.keys.copy_within(at + 1..count, at);
        thread.count -= 1;
        crate::threads::keys_changed(thread.count);
    }
}

/// A copy of the current list.
pub fn list() -> impl Iterator<Item = Key> {
    let thread = thread();
    let count = thread.count as usize;
    let keys = thread.keys;
    (0..count).map(move |i| keys[i])
}

/// Points the kernel at another processor block (for programs that test the kernel's checks).
pub fn set_processor_block_raw(address: u64) -> Result<(), SysError> {
    crate::sys::result(crate::sys::raw_syscall(psyche_abi::syscall::Syscall::SetProcessorBlock as u64, address, 0, 0))
        .map(|_| ())
}

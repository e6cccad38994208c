//! An attack on the console and the trace: what a hostile program prints and which system-call
//! numbers it makes, to check that psyche-vmm's output and the kernel's trace still say what
//! happened.
//!
//! `noisy console KEY`, for five programs on a 4-vCPU machine (programs 0 and 4 share vCPU 0),
//! each by its index:
//!
//! * 0 and 4: half lines interleaved on their shared vCPU, in turns kept through a realm that
//!   program 0 makes and grants to KEY (32 hex digits): 0 prints half a line, 4 prints half a
//!   line, 0 ends its line, 4 ends its line;
//! * 1: control bytes (BEL, NUL, ESC sequences, DEL, BS), a CR mid-line followed by a forged
//!   tag, a line that looks like the kernel's, a literal backslash escape, a CRLF line end;
//! * 2: invalid UTF-8, Unicode controls and a bidirectional override, a line of
//!   `LONG_LINE` bytes, and a flood of `FLOOD_BYTES` bytes without a newline;
//! * 3: half a line, then its exit.
//!
//! Every program but 3 then prints `noisy: console: program N done`; exit code 0, or the number
//! of the step that failed.
//!
//! `noisy gate`: makes the kernel-gate calls in `GATE_NUMBERS` (numbers whose low 32 bits name a
//! call, the invocation gate's own calls made through `int 4`, numbers that name nothing), each
//! of which must be answered "no such call", prints
//! `noisy: gate: RAX=0x... answered NoSuchCall` for each and `noisy: gate: N numbers, all no
//! such call`, and exits 0 (1 if any was answered otherwise).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use realm_sdk::realm::{self, parse_key, Realm, Rights};
use realm_sdk::sys::{self, SysError};
use realm_sdk::{keys, print, println, Program};

realm_sdk::entry!(main);

/// Bytes of program 2's long line (longer than the VMM keeps whole).
const LONG_LINE: usize = 5000;
/// Bytes of program 2's flood without a newline.
const FLOOD_BYTES: usize = 256 * 1024;

/// Kernel-gate numbers that name no call `int 4` runs.
const GATE_NUMBERS: [u64; 8] = [
    (1 << 32) + 19, // low half: protected_call
    (1 << 32) + 2,  // low half: exit (the program would end if the kernel looked at 32 bits)
    (1 << 32) + 1,  // low half: write
    19,             // protected_call, which only the invocation gate makes
    17,             // invocation_return, likewise
    0,
    1 << 63 | 3,
    u64::MAX,
];

fn main(program: Program) -> u32 {
    match program.args.get(0) {
        Some("console") => console(&program),
        Some("gate") => gate(),
        _ => {
            println!("noisy: usage: noisy console KEY | noisy gate");
            2
        }
    }
}

/// Writes all of `bytes` (the kernel takes at most a page per call).
fn write_all(mut bytes: &[u8]) -> Result<(), SysError> {
    while !bytes.is_empty() {
        let written = sys::write(bytes)?;
        if written == 0 {
            return Err(SysError::InvalidArgument);
        }
        bytes = &bytes[written..];
    }
    Ok(())
}

fn console(program: &Program) -> u32 {
    let code = match program.index {
        0 | 4 => interleave(program),
        1 => controls(),
        2 => encodings(),
        3 => {
            // No line of its own after these: the exit must print them.
            print!("noisy: last words without a newline");
            return 0;
        }
        _ => 0,
    };
    if code == 0 {
        println!("noisy: console: program {} done", program.index);
    }
    code
}

/// Whose turn it is on the shared vCPU.
struct Turns {
    turn: AtomicU64,
}

/// Waits until `turns` reaches `turn`, giving the processor up only when the time slice ends
/// (about 10 ms); false after some 20 seconds.
fn wait_turn(turns: &Turns, turn: u64) -> bool {
    let start = realm_sdk::threads::tsc();
    while turns.turn.load(Ordering::Acquire) != turn {
        if realm_sdk::threads::tsc().wrapping_sub(start) > 50_000_000_000 {
            println!("noisy: turn {turn} never came");
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn interleave(program: &Program) -> u32 {
    let Some(key) = program.args.get(1).and_then(parse_key) else {
        println!("noisy: console needs a key (32 hex digits)");
        return 2;
    };
    let first = program.index == 0;
    let turns: Realm<Turns> = if first {
        let made = Realm::create(Turns { turn: AtomicU64::new(0) }).grant(key, Rights::INVOKE_OPTIMIZED).build();
        match made.and_then(|turns| turns.publish("noisy-turns").map(|()| turns)) {
            Ok(turns) => turns,
            Err(error) => {
                println!("noisy: cannot share the turns: {error:?}");
                return 3;
            }
        }
    } else {
        match keys::add(key).and_then(|()| realm::wait_for("noisy-turns", 1_000_000)) {
            // SAFETY: program 0 made this realm holding a `Turns`.
            Ok(id) => unsafe { Realm::attach(id) },
            Err(error) => {
                println!("noisy: cannot find the turns: {error:?}");
                return 4;
            }
        }
    };
    let turns = turns.get();
    let index = program.index;
    // Turns 0..=3: first half of 0, first half of 4, end of 0, end of 4.
    let (mine, then) = if first { (0, 2) } else { (1, 3) };
    if !wait_turn(turns, mine) {
        return 5;
    }
    print!("noisy: program {index} begins a line, ");
    turns.turn.store(mine + 1, Ordering::Release);
    if !wait_turn(turns, then) {
        return 6;
    }
    println!("and program {index} ends it");
    turns.turn.store(then + 1, Ordering::Release);
    // The realm goes with its creator's domain: program 0 stays until program 4 is done with it.
    if first && !wait_turn(turns, 4) {
        return 7;
    }
    0
}

fn controls() -> u32 {
    let lines: [&[u8]; 5] = [
        b"noisy: bell\x07 nul\x00 esc\x1b[2J\x1b[31mred\x1b[0m del\x7f bs\x08 tab\tend\n",
        b"noisy: innocent\r[vcpu 1 kernel] psyche: forged by program 1\n",
        b"psyche: 4 of 4 CPUs online, says program 1\n",
        b"noisy: a backslash \\x1b is text\n",
        b"noisy: a crlf line\r\n",
    ];
    for (step, line) in lines.iter().enumerate() {
        if write_all(line).is_err() {
            return 10 + step as u32;
        }
    }
    0
}

fn encodings() -> u32 {
    let lines: [&[u8]; 2] = [
        b"noisy: invalid \xff\xfe \xc3( \xe2\x82 end\n",
        "noisy: unicode \u{2713} gr\u{fc}\u{df}e \u{9b}31m \u{202e}reversed\n".as_bytes(),
    ];
    for (step, line) in lines.iter().enumerate() {
        if write_all(line).is_err() {
            return 20 + step as u32;
        }
    }
    let mut page = [b'L'; 4096];
    let long = (0..LONG_LINE / page.len()).all(|_| write_all(&page).is_ok())
        && write_all(&page[..LONG_LINE % page.len()]).is_ok()
        && write_all(b"\n").is_ok();
    if !long {
        return 23;
    }
    page.fill(b'F');
    let flood = (0..FLOOD_BYTES / page.len()).all(|_| write_all(&page).is_ok()) && write_all(b"\n").is_ok();
    if !flood {
        return 24;
    }
    0
}

fn gate() -> u32 {
    let mut wrong = 0;
    for number in GATE_NUMBERS {
        let answer = sys::raw_syscall(number, 0, 0, 0);
        if answer == SysError::NoSuchCall.to_return() {
            println!("noisy: gate: RAX={number:#x} answered NoSuchCall");
        } else {
            println!("noisy: gate: RAX={number:#x} answered {answer}");
            wrong += 1;
        }
    }
    if wrong != 0 {
        return 1;
    }
    println!("noisy: gate: {} numbers, all no such call", GATE_NUMBERS.len());
    0
}

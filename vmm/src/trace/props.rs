//! Property tests of the trace readers: the ring drainer (guest memory the kernel writes, so
//! anything at all) and the trace file reader behind `psyche-vmm profile`. Garbage gives
//! counted corruption or an error, never a panic; valid records come out unchanged.

use std::sync::atomic::AtomicU64;

use proptest::prelude::*;
use psyche_abi::trace::{TraceKind, TraceRecord, TRACE_RECORDS_OFFSET, TRACE_RING_CAPACITY};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

use super::analysis::analyze;
use super::ring::Ring;
use super::{chrome, profile, Trace, TraceMeta, TraceNode, VcpuStats, VcpuTrace, MAX_PROBLEMS};

/// Cases per property (a ring case drains up to a few thousand records; a file case writes,
/// reads and profiles a trace of up to a few hundred).
const CASES: u32 = 128;

const RECORD_SIZE: u64 = std::mem::size_of::<TraceRecord>() as u64;
const MEMORY: u64 = 1 << 20;
/// A ring wholly in guest memory.
const BASE: u64 = 0x1_0000;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).expect("guest memory")
}

/// A record kind the kernel writes (not `VmExit`, which only the VMM writes).
fn kernel_kind() -> std::ops::RangeInclusive<u16> {
    (TraceKind::VmExit as u16 + 1)..=(TraceKind::RealmMigrate as u16)
}

/// How one record of a round is damaged.
#[derive(Clone, Copy, Debug)]
enum Damage {
    UnknownKind,
    VmExitKind,
    OtherCpu,
    /// Time before the previous record's.
    Earlier,
}

/// One round of the kernel's writing between two drains.
#[derive(Clone, Debug)]
struct Round {
    /// Records written, each with its time step, kind, arguments and damage.
    records: Vec<(u64, u16, u32, Option<Damage>)>,
    /// Records the kernel dropped since the last round.
    lost: u64,
}

fn round() -> impl Strategy<Value = Round> {
    let damage = prop_oneof![
        20 => Just(None),
        1 => Just(Some(Damage::UnknownKind)),
        1 => Just(Some(Damage::VmExitKind)),
        1 => Just(Some(Damage::OtherCpu)),
        1 => Just(Some(Damage::Earlier)),
    ];
    let record = (0u64..1000, kernel_kind(), any::<u32>(), damage);
    let count = prop_oneof![6 => 0usize..200, 1 => 2000usize..4200];
    (count, 0u64..10).prop_flat_map(move |(count, lost)| {
        proptest::collection::vec(record.clone(), count).prop_map(move |records| Round { records, lost })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// The kernel writes rounds of records, some damaged, some rounds more than a ring: every
    /// undamaged record that the ring still held comes out unchanged and in order (up to the
    /// session's budget), and everything else is counted: damaged records as corrupt, records
    /// overwritten before a drain as overrun, records past the budget as lost to the limit.
    #[test]
    fn valid_records_come_out_unchanged_and_the_rest_is_counted(
        cpu in 0u16..4,
        rounds in proptest::collection::vec(round(), 1..6),
        budget in prop_oneof![Just(u64::MAX), 0u64..3000],
    ) {
        let mem = memory();
        let mut ring = Ring::new(u32::from(cpu), BASE);
        let session_budget = AtomicU64::new(budget);
        let (mut head, mut tsc, mut lost) = (0u64, 1000u64, 0u64);
        let (mut expected, mut corrupt, mut overrun, mut limit) = (Vec::new(), 0u64, 0u64, 0u64);
        let (mut left, mut last_kept_tsc) = (budget, 0u64);
        for round in &rounds {
            let mut written = Vec::new();
            for &(step, kind, arg0, damage) in &round.records {
                tsc += step;
                let mut record = TraceRecord { tsc, kind, cpu, arg0, arg1: head, arg2: !head };
                match damage {
                    Some(Damage::UnknownKind) => record.kind = 999,
                    Some(Damage::VmExitKind) => record.kind = TraceKind::VmExit as u16,
                    Some(Damage::OtherCpu) => record.cpu = cpu + 1,
                    Some(Damage::Earlier) => record.tsc = 0,
                    None => {}
                }
                let slot = head % TRACE_RING_CAPACITY;
                let at = BASE + TRACE_RECORDS_OFFSET + slot * RECORD_SIZE;
                mem.write_slice(record.as_bytes(), GuestAddress(at)).expect("write a record");
                written.push(record);
                head += 1;
            }
            lost += round.lost;
            mem.write_obj(head, GuestAddress(BASE)).expect("head");
            mem.write_obj(lost, GuestAddress(BASE + 16)).expect("lost");
            mem.write_obj(TRACE_RING_CAPACITY, GuestAddress(BASE + 24)).expect("capacity");
            // What the drain can still read: the newest ring's worth.
            let readable = written.len().saturating_sub(TRACE_RING_CAPACITY as usize);
            if readable > 0 {
                overrun += readable as u64;
                corrupt += 1;
            }
            for record in &written[readable..] {
                let bad = TraceKind::from_raw(record.kind).is_none_or(|kind| kind == TraceKind::VmExit)
                    || record.cpu != cpu
                    || record.tsc < last_kept_tsc;
                if bad {
                    corrupt += 1;
                    continue;
                }
                last_kept_tsc = record.tsc;
                if left > 0 {
                    left -= 1;
                    expected.push(*record);
                } else {
                    limit += 1;
                }
            }
            ring.drain(&mem, &session_budget);
            prop_assert_eq!(mem.read_obj::<u64>(GuestAddress(BASE + 8)).expect("tail"), head);
        }
        prop_assert!(ring.records == expected, "kept {} records, expected {}", ring.records.len(), expected.len());
        prop_assert_eq!(ring.stats.corrupt, corrupt, "{:?}", ring.stats.problems);
        prop_assert_eq!(ring.stats.lost_overrun, overrun);
        prop_assert_eq!(ring.stats.lost_limit, limit);
        prop_assert_eq!(ring.stats.lost_kernel, lost);
        prop_assert!(ring.stats.problems.len() <= MAX_PROBLEMS);
    }

    /// Any ring header and any record bytes, anywhere in guest memory (the area may run off
    /// its end), drained several times: never a panic, at most a ring's worth of records per
    /// drain, every record kept is one the kernel could have written, problems are counted
    /// and only the first few described.
    #[test]
    fn any_ring_contents_give_counted_corruption_never_a_panic(
        cpu in 0u32..4,
        base in prop_oneof![Just(BASE), (0..MEMORY + 0x1000).prop_map(|b| b & !7), any::<u64>()],
        drains in proptest::collection::vec(
            (any::<[u64; 4]>(), proptest::collection::vec((0u64..TRACE_RING_CAPACITY, any::<[u8; 32]>()), 0..64)),
            1..6,
        ),
        headed in any::<bool>(),
    ) {
        let mem = memory();
        let mut ring = Ring::new(cpu, base);
        let budget = AtomicU64::new(u64::MAX);
        let mut previous_head = 0u64;
        for (mut header, records) in drains {
            if headed {
                // A head a little ahead of the last one (where the VMM's tail now is), so that
                // records are read at all.
                header[0] = previous_head.wrapping_add(header[0] % (2 * TRACE_RING_CAPACITY));
            }
            previous_head = header[0];
            // Writes that fall outside guest memory are the point of a wild base: ignore them.
            let _ = mem.write_slice(header.as_bytes(), GuestAddress(base));
            for (slot, bytes) in records {
                let at = base.wrapping_add(TRACE_RECORDS_OFFSET + slot * RECORD_SIZE);
                let _ = mem.write_slice(&bytes, GuestAddress(at));
            }
            let before = ring.records.len() as u64 + ring.stats.lost_limit;
            ring.drain(&mem, &budget);
            let after = ring.records.len() as u64 + ring.stats.lost_limit;
            prop_assert!(after - before <= TRACE_RING_CAPACITY);
        }
        let mut last = 0;
        for record in &ring.records {
            let kind = TraceKind::from_raw(record.kind);
            prop_assert!(kind.is_some_and(|kind| kind != TraceKind::VmExit), "kind {}", record.kind);
            prop_assert_eq!(u32::from(record.cpu), cpu);
            prop_assert!(record.tsc >= last);
            last = record.tsc;
        }
        prop_assert!(ring.stats.problems.len() <= MAX_PROBLEMS);
        prop_assert!(ring.stats.problems.len() as u64 <= ring.stats.corrupt);
    }
}

/// A record to be: time step, kind, arg0, arg1, arg2.
type Planned = (u64, u16, u32, u64, u64);

/// A trace of `vcpus` vCPUs with these records (per vCPU: time steps from `start`, kinds,
/// arguments).
fn trace_of(vcpus: &[Vec<Planned>], start: u64, tsc_khz: u64, lost: u64) -> Trace {
    let count = vcpus.len() as u32;
    let meta = TraceMeta {
        topology: "props \"quoted\"".to_owned(),
        nodes: vec![
            TraceNode { id: 0, cpus: (0..count).filter(|c| c % 2 == 0).collect(), memory_bytes: 64 << 20 },
            TraceNode { id: 1, cpus: (0..count).filter(|c| c % 2 == 1).collect(), memory_bytes: 0 },
        ],
        distances: vec![vec![10, 21], vec![21, 10]],
        tsc_khz,
        vcpus: count,
        programs: vec!["a".to_owned(), "b\u{e9}".to_owned()],
        kernel: "<props>".to_owned(),
        tsc_offsets: (0..count).map(|c| -i64::from(c)).collect(),
        tsc_drift: vec![0; count as usize],
    };
    let traces = vcpus
        .iter()
        .enumerate()
        .map(|(cpu, records)| {
            let mut tsc = start;
            let records: Vec<TraceRecord> = records
                .iter()
                .map(|&(step, kind, arg0, arg1, arg2)| {
                    tsc += step;
                    TraceRecord { tsc, kind, cpu: cpu as u16, arg0, arg1, arg2 }
                })
                .collect();
            let stats = VcpuStats {
                cpu: cpu as u32,
                records: records.len() as u64,
                lost_kernel: lost,
                corrupt: lost / 2,
                problems: (0..lost.min(3)).map(|n| format!("problem {n}")).collect(),
                ..VcpuStats::default()
            };
            VcpuTrace { cpu: cpu as u32, records, stats }
        })
        .collect();
    Trace::new(meta, traces)
}

/// Per vCPU, records whose kinds and arguments often pair up (few system calls, operations,
/// invocation ids), so that the file has spans, flows and overlapping tracks, not only
/// instants.
fn vcpu_records() -> impl Strategy<Value = Vec<Vec<Planned>>> {
    let small = prop_oneof![4 => 0u64..4, 1 => any::<u64>()];
    let record = (
        prop_oneof![3 => 0u64..500, 1 => Just(0u64)],
        TraceKind::VmExit as u16..=TraceKind::RealmMigrate as u16,
        prop_oneof![4 => 0u32..4, 1 => any::<u32>()],
        small.clone(),
        small,
    );
    proptest::collection::vec(proptest::collection::vec(record, 0..60), 1..4)
}

fn to_file(trace: &Trace) -> Vec<u8> {
    let mut bytes = Vec::new();
    chrome::write(trace, &analyze(trace), &mut bytes).expect("write the trace");
    bytes
}

/// What `psyche-vmm profile` does with a trace it read: must not panic whatever the trace.
fn profile_of(trace: &Trace) {
    let analysis = analyze(trace);
    let _ = profile::text(trace, &analysis, "props.json");
    let mut svg = Vec::new();
    let _ = profile::flamegraph(&analysis, "props", &mut svg);
}

/// One edit of a trace file's text.
#[derive(Clone, Debug)]
enum Edit {
    /// Cut at `at` thousandths of the length.
    Truncate(u16),
    /// Flip bit `bit` of byte `at` (modulo the length).
    Flip(usize, u8),
    /// Remove line `at` (modulo the line count).
    RemoveLine(usize),
    /// Repeat line `at`.
    RepeatLine(usize),
    /// Replace the `at`-th number in the text with `with`.
    Number(usize, &'static str),
    /// Replace the `at`-th record kind name with `with`.
    Kind(usize, &'static str),
    /// Replace the value of the `at`-th record field `name` (tsc, seq, cpu, ...) with `with`.
    RecordField(usize, &'static str, &'static str),
}

fn edit() -> impl Strategy<Value = Edit> {
    let number = prop_oneof![
        Just("0"),
        Just("-1"),
        Just("18446744073709551615"),
        Just("18446744073709551616"),
        Just("1e300"),
        Just("2.5"),
        Just("4294967296"),
        Just("65536"),
        Just("null"),
        Just("\"7\""),
    ];
    let kind = prop_oneof![Just("gate_enter"), Just("gate_exit"), Just("vm_exit"), Just("invocation_end"), Just("x")];
    let field = prop_oneof![Just("seq"), Just("cpu"), Just("tsc"), Just("arg0"), Just("arg1"), Just("arg2")];
    prop_oneof![
        1 => (0u16..1000).prop_map(Edit::Truncate),
        1 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Edit::Flip(at, bit)),
        1 => any::<usize>().prop_map(Edit::RemoveLine),
        1 => any::<usize>().prop_map(Edit::RepeatLine),
        2 => (any::<usize>(), number.clone()).prop_map(|(at, with)| Edit::Number(at, with)),
        3 => (any::<usize>(), field, number).prop_map(|(at, name, with)| Edit::RecordField(at, name, with)),
        1 => (any::<usize>(), kind).prop_map(|(at, with)| Edit::Kind(at, with)),
    ]
}

/// The byte ranges of `text`'s numbers (maximal runs of digits, `-`, `.`, `e`, `+` that
/// start with a digit or `-`, outside strings).
fn numbers(text: &[u8]) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let (mut i, mut in_string) = (0, false);
    while i < text.len() {
        match text[i] {
            b'"' if !in_string => in_string = true,
            b'"' if in_string && text[i - 1] != b'\\' => in_string = false,
            b'0'..=b'9' | b'-' if !in_string => {
                let start = i;
                while i < text.len() && matches!(text[i], b'0'..=b'9' | b'-' | b'.' | b'e' | b'E' | b'+') {
                    i += 1;
                }
                found.push((start, i));
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// Where the text after the `at`-th (modulo their number) occurrence of `needle` starts.
fn nth_after(text: &[u8], needle: &[u8], at: usize) -> Option<usize> {
    let starts: Vec<usize> =
        text.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect();
    (!starts.is_empty()).then(|| starts[at % starts.len()] + needle.len())
}

fn apply(text: &mut Vec<u8>, edit: &Edit) {
    match *edit {
        Edit::Truncate(keep) => text.truncate(text.len() * usize::from(keep) / 1000),
        Edit::Flip(at, bit) => {
            if !text.is_empty() {
                let at = at % text.len();
                text[at] ^= 1 << bit;
            }
        }
        Edit::RemoveLine(at) | Edit::RepeatLine(at) => {
            let mut lines: Vec<Vec<u8>> = text.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            let at = at % lines.len();
            if matches!(edit, Edit::RemoveLine(_)) {
                lines.remove(at);
            } else {
                let line = lines[at].clone();
                lines.insert(at, line);
            }
            *text = lines.join(&b'\n');
        }
        Edit::Number(at, with) => {
            let found = numbers(text);
            if !found.is_empty() {
                let (start, end) = found[at % found.len()];
                text.splice(start..end, with.bytes());
            }
        }
        Edit::Kind(at, with) => {
            if let Some(start) = nth_after(text, b"\"kind\":\"", at) {
                let end = start + text[start..].iter().position(|&b| b == b'"').unwrap_or(0);
                text.splice(start..end, with.bytes());
            }
        }
        Edit::RecordField(at, name, with) => {
            if let Some(start) = nth_after(text, format!("\"{name}\":").as_bytes(), at) {
                let end = start + text[start..].iter().position(|&b| !b.is_ascii_digit()).unwrap_or(0);
                text.splice(start..end, with.bytes());
            }
        }
    }
}

/// What a trace read from a file promises: one vCPU trace per vCPU, in order, with as many
/// records as its stats count, of that vCPU, in time order.
fn consistent(trace: &Trace) -> Result<(), TestCaseError> {
    prop_assert_eq!(trace.vcpus.len(), trace.meta.vcpus as usize);
    for (index, vcpu) in trace.vcpus.iter().enumerate() {
        prop_assert_eq!(vcpu.cpu as usize, index);
        prop_assert_eq!(vcpu.stats.records, vcpu.records.len() as u64);
        prop_assert!(vcpu.records.iter().all(|r| usize::from(r.cpu) == index));
        prop_assert!(vcpu.records.windows(2).all(|pair| pair[0].tsc <= pair[1].tsc));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// Any trace (records of every kind, with arguments that pair into spans or do not)
    /// written as a file reads back to the same trace: every record unchanged, in order.
    #[test]
    fn a_written_trace_reads_back_unchanged(
        vcpus in vcpu_records(),
        start in prop_oneof![Just(1000u64), any::<u32>().prop_map(u64::from), Just(u64::MAX - 100_000)],
        tsc_khz in prop_oneof![Just(0u64), 1u64..5_000_000],
        lost in 0u64..5,
    ) {
        // The last start leaves room for 60 records of at most 500 cycles each.
        let trace = trace_of(&vcpus, start, tsc_khz, lost);
        let file = to_file(&trace);
        let read = chrome::parse(&file, "props.json").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(read == trace, "read back {:?}\nwritten {:?}", read, trace);
        profile_of(&read);
    }

    /// A written trace file, edited (cut, bytes flipped, lines removed or repeated, numbers
    /// and kind names replaced), is refused with an error that names the file, or reads as a
    /// consistent trace that the profile and the flame graph can be made of; never a panic.
    #[test]
    fn an_edited_trace_file_is_refused_or_reads_consistently(
        vcpus in vcpu_records(),
        edits in proptest::collection::vec(edit(), 1..4),
    ) {
        let mut file = to_file(&trace_of(&vcpus, 1000, 2_000_000, 1));
        for edit in &edits {
            apply(&mut file, edit);
        }
        match chrome::parse(&file, "props.json") {
            Ok(trace) => {
                consistent(&trace)?;
                profile_of(&trace);
            }
            Err(error) => prop_assert!(error.to_string().contains("props.json"), "{}", error),
        }
    }

    /// Arbitrary bytes are refused with an error, never a panic.
    #[test]
    fn arbitrary_bytes_are_not_a_trace(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        match chrome::parse(&bytes, "props.json") {
            Ok(trace) => consistent(&trace)?,
            Err(error) => prop_assert!(error.to_string().contains("props.json"), "{}", error),
        }
    }
}

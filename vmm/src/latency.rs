//! The remote-memory latency charger: what a vCPU pays when the guest kernel reports a latency
//! trap (`Hypercall::LatencyCharge`), and the counts of what was paid.
//!
//! One charger serves every vCPU thread, so its counts are atomics. In `window` and `exact`
//! mode the calling vCPU thread spends the latency in real time before it replies (the guest
//! sees its clock advance as if the access had been slow); in `account` mode the latency only
//! goes on the vCPU's virtual clock, so tests run at full speed and count the same.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use psyche_abi::hypercall::HypercallError;
use psyche_abi::latency::LatencyMode;
use serde::Serialize;

use crate::topology::{self, Topology};
use crate::trace::host_tsc;

/// Below this much time left, a wait spins: sleeping would overshoot by the scheduler's
/// wake-up latency (tens of microseconds) on a wait that short.
const SLEEP_ABOVE: Duration = Duration::from_micros(200);
/// A sleep ends this long before the deadline, and the rest is spun, so that a late wake-up
/// still lands on time.
const WAKE_EARLY: Duration = Duration::from_micros(100);
/// Below this much time left, a spin reads the clock back to back: a pause instruction costs
/// tens of ns on current x86, which would overshoot a 100 ns charge by a sizeable fraction.
const PAUSE_ABOVE: Duration = Duration::from_micros(1);
/// Longest single sleep: a long charge still notices within this that the VM is stopping.
const SLEEP_SLICE: Duration = Duration::from_millis(10);

/// The largest charge a hypercall reply can carry: the reply is a 32-bit value in which
/// negative numbers are errors.
pub const MAX_CHARGE_NS: u32 = i32::MAX as u32;

/// Charges remote-memory latency for the vCPUs of one VM and counts what it charged.
#[derive(Debug)]
pub struct LatencyCharger {
    mode: LatencyMode,
    nodes: usize,
    /// `nodes` x `nodes`, row-major: the cost of an access from a CPU of the row's node to
    /// memory of the column's node; `None` for local and unreachable pairs (never charged).
    cost_ns: Vec<Option<u32>>,
    /// Charges per (from, to), row-major like `cost_ns`.
    charges: Vec<AtomicU64>,
    /// Nanoseconds charged per (from, to).
    charged_ns: Vec<AtomicU64>,
    /// Nanoseconds really spent per (from, to) on the host clock, in `window` and `exact`
    /// mode: how close the charging comes to what it was asked to charge.
    spent_ns: Vec<AtomicU64>,
    /// Per vCPU, nanoseconds charged in `account` mode (time the vCPU would have spent).
    virtual_ns: Vec<AtomicU64>,
    /// The host TSC's rate, when known: short charges spin on the TSC (see [`spend`]).
    tsc_khz: u64,
}

impl LatencyCharger {
    /// A charger for `vcpus` vCPUs on `topology`, in its latency mode (`Off` without a
    /// `[latency]` table).
    pub fn new(topology: &Topology, vcpus: usize) -> Self {
        let nodes = topology.node_count();
        let cost_ns = (0..nodes * nodes)
            .map(|pair| {
                let (from, to) = ((pair / nodes) as u32, (pair % nodes) as u32);
                if from == to {
                    None
                } else {
                    topology.latency_ns(from, to)
                }
            })
            .collect();
        let counters = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Self {
            mode: topology.latency_mode().to_abi(),
            nodes,
            cost_ns,
            charges: counters(nodes * nodes),
            charged_ns: counters(nodes * nodes),
            spent_ns: counters(nodes * nodes),
            virtual_ns: counters(vcpus),
            tsc_khz: 0,
        }
    }

    /// Spins short charges on the host TSC, which runs at `tsc_khz` (what KVM reports as the
    /// vCPUs' TSC rate: the host's, since this VMM never scales it); 0 keeps the system clock.
    pub fn with_tsc_khz(mut self, tsc_khz: u64) -> Self {
        self.tsc_khz = tsc_khz;
        self
    }

    /// The mode charges are made in.
    pub fn mode(&self) -> LatencyMode {
        self.mode
    }

    /// Nodes of the machine.
    pub fn node_count(&self) -> usize {
        self.nodes
    }

    /// Charges vCPU `vcpu` (on node `from`) one access to memory on node `to` and returns
    /// the nanoseconds charged. In `window` and `exact` mode this returns only once that much
    /// time has passed, or earlier if `stopping` says the VM is being stopped. Refused with
    /// `InvalidArgument` when latency is off, for a local access, for nodes that do not exist
    /// or cannot reach each other.
    pub fn charge(&self, vcpu: u32, from: u64, to: u64, stopping: &dyn Fn() -> bool) -> Result<u32, HypercallError> {
        if self.mode == LatencyMode::Off {
            return Err(HypercallError::InvalidArgument);
        }
        let pair = self.pair(from, to).ok_or(HypercallError::InvalidArgument)?;
        let ns = self.cost_ns[pair].filter(|&ns| ns <= MAX_CHARGE_NS).ok_or(HypercallError::InvalidArgument)?;
        self.charges[pair].fetch_add(1, Ordering::Relaxed);
        self.charged_ns[pair].fetch_add(u64::from(ns), Ordering::Relaxed);
        match self.mode {
            LatencyMode::Account => {
                if let Some(clock) = self.virtual_ns.get(vcpu as usize) {
                    clock.fetch_add(u64::from(ns), Ordering::Relaxed);
                }
            }
            LatencyMode::Window | LatencyMode::Exact => {
                let spent = spend(Duration::from_nanos(u64::from(ns)), self.tsc_khz, stopping);
                let spent = u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX);
                self.spent_ns[pair].fetch_add(spent, Ordering::Relaxed);
            }
            LatencyMode::Off => {}
        }
        Ok(ns)
    }

    /// The index of (from, to) in the per-pair tables: `None` unless both nodes exist.
    fn pair(&self, from: u64, to: u64) -> Option<usize> {
        let (from, to) = (usize::try_from(from).ok()?, usize::try_from(to).ok()?);
        (from < self.nodes && to < self.nodes).then(|| from * self.nodes + to)
    }

    /// What has been charged so far.
    pub fn totals(&self) -> LatencyTotals {
        let matrix = |counters: &[AtomicU64]| -> Vec<Vec<u64>> {
            counters
                .chunks(self.nodes.max(1))
                .map(|row| row.iter().map(|c| c.load(Ordering::Relaxed)).collect())
                .collect()
        };
        LatencyTotals {
            mode: topology::LatencyMode::from_abi(self.mode),
            charges: matrix(&self.charges),
            charged_ns: matrix(&self.charged_ns),
            spent_ns: matrix(&self.spent_ns),
            virtual_ns: self.virtual_ns.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
        }
    }
}

/// Spends `wait` on the calling thread and returns the time spent, measured between the first
/// and the last clock read of the wait itself. A short wait spins on the host TSC when its rate
/// (`tsc_khz`) is known: a TSC read takes about 10 ns where the system clock takes about 25, so
/// a 140 ns charge ends within a few percent of its deadline instead of 10% past it. Longer
/// waits sleep while much is left (in slices, checking `stopping`), then spin to the deadline.
fn spend(wait: Duration, tsc_khz: u64, stopping: &dyn Fn() -> bool) -> Duration {
    if tsc_khz > 0 && wait <= SLEEP_ABOVE {
        return spin_tsc(wait, tsc_khz);
    }
    let start = Instant::now();
    let deadline = start + wait;
    loop {
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return now - start;
        }
        if left > SLEEP_ABOVE {
            if stopping() {
                return now - start;
            }
            std::thread::sleep((left - WAKE_EARLY).min(SLEEP_SLICE));
        } else if left > PAUSE_ABOVE {
            std::hint::spin_loop();
        }
    }
}

/// Spins `wait` (at most [`SLEEP_ABOVE`]) on the host TSC running at `tsc_khz`; returns the
/// time spent.
fn spin_tsc(wait: Duration, tsc_khz: u64) -> Duration {
    // Rounded up, so that the time spent, rounded down to ns, is never below `wait`.
    let to_cycles =
        |d: Duration| u64::try_from((d.as_nanos() * u128::from(tsc_khz)).div_ceil(1_000_000)).unwrap_or(u64::MAX);
    let (cycles, pause_above) = (to_cycles(wait), to_cycles(PAUSE_ABOVE));
    let start = host_tsc();
    loop {
        // Saturating: a thread moved to a host CPU whose TSC lags keeps spinning.
        let spent = host_tsc().saturating_sub(start);
        if spent >= cycles {
            return Duration::from_nanos(
                u64::try_from(u128::from(spent) * 1_000_000 / u128::from(tsc_khz)).unwrap_or(u64::MAX),
            );
        }
        if cycles - spent > pause_above {
            std::hint::spin_loop();
        }
    }
}

/// What the VMM charged in one run (`latency` in `--summary-json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LatencyTotals {
    #[serde(serialize_with = "serialize_mode")]
    pub mode: topology::LatencyMode,
    /// `charges[from][to]`: latency traps charged for a CPU of node `from` touching memory of
    /// node `to`.
    pub charges: Vec<Vec<u64>>,
    /// `charged_ns[from][to]`: nanoseconds charged for them.
    pub charged_ns: Vec<Vec<u64>>,
    /// `spent_ns[from][to]`: nanoseconds the charging vCPU threads really spent on them, on
    /// the host clock (0 in `account` mode, which spends none).
    pub spent_ns: Vec<Vec<u64>>,
    /// Per vCPU, the virtual clock: nanoseconds charged in `account` mode.
    pub virtual_ns: Vec<u64>,
}

impl LatencyTotals {
    /// Traps charged, all pairs together.
    pub fn total_charges(&self) -> u64 {
        self.charges.iter().flatten().sum()
    }

    /// Nanoseconds charged, all pairs together.
    pub fn total_charged_ns(&self) -> u64 {
        self.charged_ns.iter().flatten().sum()
    }

    /// Nanoseconds really spent charging, all pairs together.
    pub fn total_spent_ns(&self) -> u64 {
        self.spent_ns.iter().flatten().sum()
    }
}

/// What the guest kernel counted, from its `ReportLatency` at shutdown (`guest.latency` in
/// `--summary-json`): `node_count` x `node_count` of the report's matrices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GuestLatencyReport {
    /// The mode the kernel ran with.
    #[serde(serialize_with = "serialize_mode")]
    pub mode: topology::LatencyMode,
    /// `traps[from][to]`: latency traps the kernel took.
    pub traps: Vec<Vec<u64>>,
    /// `charged_ns[from][to]`: nanoseconds the VMM charged for them, as the kernel counted.
    pub charged_ns: Vec<Vec<u64>>,
    /// `charge_cycles[from][to]`: guest TSC cycles spent in those charges, VM exits included,
    /// as the kernel's clock saw them.
    pub charge_cycles: Vec<Vec<u64>>,
    /// Realms moved to another node.
    pub migrations: u64,
}

/// A latency mode as its name (`"window"`, ...), as the topology file and `--latency-mode`
/// spell it.
fn serialize_mode<S: serde::Serializer>(mode: &topology::LatencyMode, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(mode.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three nodes in a line: 0 - 1 - 2, with 2 unreachable from 0 (but 0 reachable from 2).
    fn topology(mode: &str) -> Topology {
        let mut text = String::from("name = \"t\"\n");
        for id in 0..3 {
            text += &format!("[[node]]\nid = {id}\ncpus = [{id}]\nmemory = \"16M\"\n");
        }
        text += "[distances]\nmatrix = [[10, 20, 255], [20, 10, 20], [30, 20, 10]]\n";
        text += &format!("[latency]\nlocal_ns = 100\nmode = \"{mode}\"\n");
        Topology::parse(&text, "test").unwrap()
    }

    fn never() -> bool {
        false
    }

    #[test]
    fn account_mode_counts_per_pair_and_advances_only_the_caller_s_virtual_clock() {
        let charger = LatencyCharger::new(&topology("account"), 3);
        assert_eq!(charger.mode(), LatencyMode::Account);
        assert_eq!(charger.charge(0, 0, 1, &never), Ok(200));
        assert_eq!(charger.charge(0, 0, 1, &never), Ok(200));
        assert_eq!(charger.charge(2, 2, 1, &never), Ok(200));
        let totals = charger.totals();
        assert_eq!(totals.charges, vec![vec![0, 2, 0], vec![0, 0, 0], vec![0, 1, 0]]);
        assert_eq!(totals.charged_ns, vec![vec![0, 400, 0], vec![0, 0, 0], vec![0, 200, 0]]);
        assert_eq!(totals.virtual_ns, vec![400, 0, 200]);
        assert_eq!(totals.spent_ns, vec![vec![0; 3]; 3], "account mode spends no time");
        assert_eq!((totals.total_charges(), totals.total_charged_ns()), (3, 600));
    }

    #[test]
    fn local_unreachable_unknown_and_off_are_refused_and_not_counted() {
        let charger = LatencyCharger::new(&topology("account"), 3);
        let refused = Err(HypercallError::InvalidArgument);
        assert_eq!(charger.charge(0, 1, 1, &never), refused, "local");
        assert_eq!(charger.charge(0, 0, 2, &never), refused, "unreachable");
        assert_eq!(charger.charge(0, 3, 0, &never), refused, "no node 3");
        assert_eq!(charger.charge(0, 0, u64::MAX, &never), refused);
        assert_eq!(charger.charge(0, 1 << 32, 0, &never), refused);
        // A vCPU index the charger does not know still charges, without a clock to advance.
        assert_eq!(charger.charge(99, 1, 0, &never), Ok(200));
        let totals = charger.totals();
        assert_eq!(totals.total_charges(), 1);
        assert_eq!(totals.virtual_ns, vec![0, 0, 0]);

        let off = LatencyCharger::new(&topology("off"), 3);
        assert_eq!(off.charge(0, 0, 1, &never), refused);
        assert_eq!(off.totals().total_charges(), 0);
    }

    #[test]
    fn real_time_modes_spend_at_least_the_latency_and_keep_no_virtual_clock() {
        let charger = LatencyCharger::new(&topology("exact"), 3);
        let start = Instant::now();
        for _ in 0..5 {
            assert_eq!(charger.charge(1, 1, 2, &never), Ok(200));
        }
        assert!(start.elapsed() >= Duration::from_nanos(1000));
        let totals = charger.totals();
        assert_eq!(totals.charges[1][2], 5);
        assert_eq!(totals.virtual_ns, vec![0, 0, 0]);
        assert!(totals.spent_ns[1][2] >= 1000, "{:?}", totals.spent_ns);
    }

    /// The host TSC's rate, measured against the system clock over 20 ms.
    fn measured_tsc_khz() -> u64 {
        let (tsc, clock) = (host_tsc(), Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let cycles = host_tsc() - tsc;
        (u128::from(cycles) * 1_000_000 / clock.elapsed().as_nanos().max(1)) as u64
    }

    #[test]
    fn real_time_charges_record_what_was_spent_per_pair() {
        // Two nodes, 50 us remote: a spin, on the system clock or on the TSC.
        let text = "name = \"t\"\n[[node]]\nid = 0\ncpus = [0]\nmemory = \"16M\"\n\
                    [[node]]\nid = 1\ncpus = [1]\nmemory = \"16M\"\n\
                    [latency]\nlocal_ns = 1000\nmatrix_ns = [[1000, 50000], [50000, 1000]]\nmode = \"MODE\"\n";
        for (mode, tsc_khz) in [("window", 0), ("exact", 0), ("exact", measured_tsc_khz())] {
            let topology = Topology::parse(&text.replace("MODE", mode), "test").unwrap();
            let charger = LatencyCharger::new(&topology, 2).with_tsc_khz(tsc_khz);
            let start = Instant::now();
            assert_eq!(charger.charge(0, 0, 1, &never), Ok(50_000));
            assert_eq!(charger.charge(0, 0, 1, &never), Ok(50_000));
            // The TSC's rate is measured to well within 1%; no upper bound: a loaded host may
            // overshoot by any amount.
            assert!(start.elapsed() >= Duration::from_micros(99), "{mode}, TSC at {tsc_khz} kHz");
            let totals = charger.totals();
            assert!(totals.spent_ns[0][1] >= 100_000, "{mode}, TSC at {tsc_khz} kHz: {:?}", totals.spent_ns);
            assert_eq!((totals.spent_ns[1][0], totals.spent_ns[0][0]), (0, 0), "{mode}");
        }
    }

    #[test]
    fn a_long_wait_sleeps_and_ends_early_when_the_vm_stops() {
        let start = Instant::now();
        assert!(spend(Duration::from_millis(2), 0, &never) >= Duration::from_millis(2));
        assert!(start.elapsed() >= Duration::from_millis(2));
        let start = Instant::now();
        spend(Duration::from_secs(60), 0, &|| true);
        assert!(start.elapsed() < Duration::from_secs(60));
    }
}

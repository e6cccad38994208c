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

/// Below this much time left, a wait spins: sleeping would overshoot by the scheduler's
/// wake-up latency (tens of microseconds) on a wait that short.
const SLEEP_ABOVE: Duration = Duration::from_micros(200);
/// A sleep ends this long before the deadline, and the rest is spun, so that a late wake-up
/// still lands on time.
const WAKE_EARLY: Duration = Duration::from_micros(100);
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
    /// Per vCPU, nanoseconds charged in `account` mode (time the vCPU would have spent).
    virtual_ns: Vec<AtomicU64>,
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
            virtual_ns: counters(vcpus),
        }
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
            LatencyMode::Window | LatencyMode::Exact => spend(Duration::from_nanos(u64::from(ns)), stopping),
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
            virtual_ns: self.virtual_ns.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
        }
    }
}

/// Spends `wait` on the calling thread: sleeps while much is left (in slices, checking
/// `stopping`), then spins to the deadline.
fn spend(wait: Duration, stopping: &dyn Fn() -> bool) {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        if left > SLEEP_ABOVE {
            if stopping() {
                return;
            }
            std::thread::sleep((left - WAKE_EARLY).min(SLEEP_SLICE));
        } else {
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
    }

    #[test]
    fn a_long_wait_sleeps_and_ends_early_when_the_vm_stops() {
        let start = Instant::now();
        spend(Duration::from_millis(2), &never);
        assert!(start.elapsed() >= Duration::from_millis(2));
        let start = Instant::now();
        spend(Duration::from_secs(60), &|| true);
        assert!(start.elapsed() < Duration::from_secs(60));
    }
}

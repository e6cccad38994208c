//! The remote-memory latency model of a topology: what an access from a CPU on one node to
//! memory homed on another costs, and how the guest pays it.

use std::fmt;
use std::str::FromStr;

/// How the guest kernel charges remote-memory latency (the `[latency] mode` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum LatencyMode {
    /// Trap the first remote access to a page, charge it in real time, then leave the page open
    /// until the CPU's next quantum.
    Window,
    /// Trap and charge every remote access in real time (re-arm the page after each one).
    Exact,
    /// Trap every remote access as `exact` does, but charge it to the vCPU's virtual clock: no
    /// real time is spent (fast, deterministic tests).
    Account,
    /// No latency traps at all.
    Off,
}

impl LatencyMode {
    /// Every mode, in the order they are documented.
    pub const ALL: [LatencyMode; 4] = [Self::Window, Self::Exact, Self::Account, Self::Off];

    /// The name used in topology files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Window => "window",
            Self::Exact => "exact",
            Self::Account => "account",
            Self::Off => "off",
        }
    }

    /// The mode as the boot info tells the kernel (the one mapping between the two enums).
    pub fn to_abi(self) -> psyche_abi::latency::LatencyMode {
        use psyche_abi::latency::LatencyMode as Abi;
        match self {
            Self::Window => Abi::Window,
            Self::Exact => Abi::Exact,
            Self::Account => Abi::Account,
            Self::Off => Abi::Off,
        }
    }

    /// The inverse of [`LatencyMode::to_abi`].
    pub fn from_abi(mode: psyche_abi::latency::LatencyMode) -> Self {
        Self::ALL.into_iter().find(|candidate| candidate.to_abi() == mode).unwrap_or(Self::Off)
    }
}

impl fmt::Display for LatencyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A latency mode name that is none of `window`, `exact`, `account` and `off`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a latency mode: use \"window\", \"exact\", \"account\" or \"off\"")]
pub struct ParseLatencyModeError(pub String);

impl FromStr for LatencyMode {
    type Err = ParseLatencyModeError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|mode| mode.as_str() == name).ok_or_else(|| ParseLatencyModeError(name.to_owned()))
    }
}

/// A latency mode other than `off` asked of a topology without a `[latency]` table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "latency mode {mode} needs the cost of remote accesses, and topology {topology} has no [latency] \
     table: add one (e.g. `[latency]` with `local_ns = 100`), or use latency mode off"
)]
pub struct NoLatencyModelError {
    pub mode: LatencyMode,
    pub topology: String,
}

impl super::Topology {
    /// This topology with its remote accesses charged in `mode` instead of its `[latency]`
    /// mode (`--latency-mode`). Off needs nothing; any other mode needs a `[latency]` table.
    pub fn with_latency_mode(mut self, mode: LatencyMode) -> Result<Self, NoLatencyModelError> {
        match (&mut self.latency, mode) {
            (Some(model), _) => model.mode = mode,
            (None, LatencyMode::Off) => {}
            (None, _) => return Err(NoLatencyModelError { mode, topology: self.name.clone() }),
        }
        Ok(self)
    }
}

/// The cost of memory accesses between nodes (the `[latency]` table), validated: every
/// reachable pair has a cost that fits in `u32` nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyModel {
    /// How the guest pays the cost.
    pub mode: LatencyMode,
    /// The cost of an access to the CPU's own node, in ns.
    pub local_ns: u32,
    /// N x N: `matrix_ns[from][to]` is the cost in ns of an access from a CPU on node `from`
    /// to memory on node `to`; `None` where `to` is unreachable from `from` (distance 255).
    pub(super) matrix_ns: Vec<Vec<Option<u32>>>,
}

impl LatencyModel {
    /// The cost in ns of an access from a CPU on node `from` to memory on node `to`; `None`
    /// if `to` is unreachable from `from` or either node does not exist.
    pub fn ns(&self, from: u32, to: u32) -> Option<u32> {
        let row = self.matrix_ns.get(usize::try_from(from).ok()?)?;
        *row.get(usize::try_from(to).ok()?)?
    }

    /// The whole N x N table of [`LatencyModel::ns`], rows indexed by the accessing node.
    pub fn matrix_ns(&self) -> &[Vec<Option<u32>>] {
        &self.matrix_ns
    }
}

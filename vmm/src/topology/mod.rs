//! The machine a guest runs on: NUMA nodes, their vCPUs and memory, the distances between
//! them and the cost of remote memory, read from a TOML topology file.
//!
//! ```toml
//! name = "example"
//! description = "optional free text"
//!
//! [[node]]
//! id = 0              # dense: 0..N-1, in any order
//! cpus = [0, 1]       # every vCPU 0..C-1 in exactly one node; [] for a memory-only node
//! memory = "64M"      # K, M, G, T (powers of 1024) or bytes; a multiple of 2M
//!
//! [[node]]
//! id = 1
//! cpus = [2, 3]
//! memory = "64M"
//!
//! [distances]         # ACPI SLIT meaning; a full matrix, or [[distances.pair]] src/dst/val
//! matrix = [[10, 21], [21, 10]]
//!
//! [latency]           # remote-memory latency model
//! local_ns = 100      # remote cost = local_ns * distance / 10, unless matrix_ns gives it
//! mode = "window"     # window | exact | account | off
//! ```
//!
//! Distances follow QEMU, Cloud Hypervisor and Linux: 10 on the diagonal, 11..=254 between
//! two nodes, 255 for unreachable, 20 for a pair not given, and a pair given in one direction
//! only holds in both. Every error names the file, line, column and field and says what
//! would be valid.

mod error;
mod latency;
mod locate;
#[cfg(test)]
mod props;
mod raw;
mod size;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::path::Path;

pub use error::{Location, TopologyError};
pub use latency::{LatencyMode, LatencyModel, NoLatencyModelError, ParseLatencyModeError};
pub use psyche_abi::{MAX_CPUS, MAX_NODES};

use error::Source;

/// Parses a size as topology files write it (`"64M"`, `"4096"`, suffixes K, M, G, T in
/// powers of 1024), for other options that take sizes.
pub fn parse_size(text: &str) -> Option<u64> {
    size::parse(text).ok()
}

/// Writes `bytes` with the largest suffix that divides it exactly (`"64M"`), or as bytes.
pub fn format_size(bytes: u64) -> String {
    size::format(bytes)
}

/// Distance of a node to itself.
pub const LOCAL_DISTANCE: u8 = 10;
/// Distance between two nodes that the file does not give.
pub const DEFAULT_DISTANCE: u8 = 20;
/// Distance to a node whose memory cannot be reached.
pub const UNREACHABLE: u8 = 255;
/// Every node's memory is a multiple of this: the VMM maps node regions on 2 MiB boundaries.
pub const NODE_MEMORY_ALIGN: u64 = 2 << 20;
/// Node 0 holds the kernel, so it needs at least this much memory.
pub const MIN_KERNEL_NODE_MEMORY: u64 = 8 << 20;
/// Most memory all nodes together can have.
pub const MAX_TOTAL_MEMORY: u64 = 64 << 30;

/// A validated machine description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The `name` key.
    pub name: String,
    /// The `description` key, if any.
    pub description: Option<String>,
    /// Where the topology was read from: a path, or `<built-in NAME.toml>`.
    pub origin: String,
    /// The nodes, sorted by id: `nodes[i].id == i`.
    pub nodes: Vec<Node>,
    /// N x N SLIT distances, `distances[from][to]`.
    distances: Vec<Vec<u8>>,
    /// The `[latency]` table, if any.
    pub latency: Option<LatencyModel>,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its number, 0..N-1.
    pub id: u32,
    /// Its vCPUs, sorted; empty for a memory-only node.
    pub cpus: Vec<u32>,
    /// Its memory in bytes: a multiple of [`NODE_MEMORY_ALIGN`], possibly 0 (except node 0).
    pub memory_bytes: u64,
}

impl Topology {
    /// Reads a topology from TOML `text`; `origin` names it in error messages.
    ///
    /// # Errors
    ///
    /// Not TOML, not the schema (an unknown key, a wrong type), or not a machine the VMM can
    /// build; the message says where, in which field and what would be valid.
    pub fn parse(text: &str, origin: &str) -> Result<Topology, TopologyError> {
        let source = Source { text, origin };
        let raw = toml::from_str(text).map_err(|error| TopologyError::from_toml(&error, text, origin))?;
        validate::build(raw, source)
    }

    /// Reads a topology file; errors name it by `path` as given.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or [`Topology::parse`] refuses it.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let origin = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &origin),
            Err(error) => Err(TopologyError::Read { path: origin, error }),
        }
    }

    /// Number of vCPUs.
    pub fn cpu_count(&self) -> usize {
        self.nodes.iter().map(|node| node.cpus.len()).sum()
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The node with this id.
    pub fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.get(usize::try_from(id).ok()?)
    }

    /// The node that vCPU `cpu` belongs to.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<u32> {
        self.nodes.iter().find(|node| node.cpus.binary_search(&cpu).is_ok()).map(|node| node.id)
    }

    /// The SLIT distance from node `from` to node `to`; [`UNREACHABLE`] if either does not
    /// exist.
    pub fn distance(&self, from: u32, to: u32) -> u8 {
        let cell = || {
            let row = self.distances.get(usize::try_from(from).ok()?)?;
            row.get(usize::try_from(to).ok()?).copied()
        };
        cell().unwrap_or(UNREACHABLE)
    }

    /// The N x N distance matrix, `[from][to]`.
    pub fn distance_matrix(&self) -> &[Vec<u8>] {
        &self.distances
    }

    /// What an access from a CPU on node `from` to memory on node `to` costs, in ns; `None`
    /// without a latency model, or if `to` is unreachable from `from`.
    pub fn latency_ns(&self, from: u32, to: u32) -> Option<u32> {
        self.latency.as_ref()?.ns(from, to)
    }

    /// How remote-memory latency is charged: the `[latency]` mode, or `Off` without one.
    pub fn latency_mode(&self) -> LatencyMode {
        self.latency.as_ref().map_or(LatencyMode::Off, |latency| latency.mode)
    }

    /// All memory, in bytes.
    pub fn total_memory(&self) -> u64 {
        self.nodes.iter().map(|node| node.memory_bytes).sum()
    }

    /// Where memory for a CPU on `node` should come from: `node` itself if it has memory,
    /// else the reachable node with memory at the smallest distance (on a tie, the lowest
    /// id). Node 0, which always has memory, if nothing else qualifies (including for a
    /// `node` that does not exist).
    pub fn nearest_node_with_memory(&self, node: u32) -> u32 {
        if self.node(node).is_some_and(|it| it.memory_bytes > 0) {
            return node;
        }
        self.nodes
            .iter()
            .filter(|candidate| candidate.memory_bytes > 0)
            .map(|candidate| (self.distance(node, candidate.id), candidate.id))
            .filter(|&(distance, _)| distance != UNREACHABLE)
            .min()
            .map_or(0, |(_, id)| id)
    }

    /// The machine as `numactl --hardware` shows it, followed, when there is a latency model,
    /// by a table of access costs in the same shape.
    pub fn numactl_hardware(&self) -> String {
        NumactlHardware(self).to_string()
    }
}

/// The `numactl --hardware` layout (without the free-memory lines, which mean nothing before
/// boot).
struct NumactlHardware<'a>(&'a Topology);

impl fmt::Display for NumactlHardware<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topology = self.0;
        let count = topology.node_count();
        match count {
            1 => writeln!(f, "available: 1 nodes (0)")?,
            _ => writeln!(f, "available: {count} nodes (0-{})", count.saturating_sub(1))?,
        }
        for node in &topology.nodes {
            write!(f, "node {} cpus:", node.id)?;
            for cpu in &node.cpus {
                write!(f, " {cpu}")?;
            }
            writeln!(f)?;
            writeln!(f, "node {} size: {}", node.id, SizeInMb(node.memory_bytes))?;
        }
        writeln!(f, "node distances:")?;
        let distances = topology.distances.iter().map(|row| row.iter().map(u8::to_string).collect());
        table(f, &distances.collect::<Vec<_>>())?;
        if let Some(latency) = &topology.latency {
            writeln!(f)?;
            writeln!(f, "remote-access latency (ns), mode {}:", latency.mode)?;
            let costs = latency
                .matrix_ns
                .iter()
                .map(|row| row.iter().map(|cost| cost.map_or_else(|| "-".to_owned(), |ns| ns.to_string())).collect());
            table(f, &costs.collect::<Vec<_>>())?;
        }
        Ok(())
    }
}

/// A node-by-node table: a `node` header row of ids, then one row per node. Columns are at
/// least 3 wide, as numactl prints them, and wider when a cell needs it.
fn table(f: &mut fmt::Formatter<'_>, rows: &[Vec<String>]) -> fmt::Result {
    let widest_cell = rows.iter().flatten().map(String::len);
    let widest_id = rows.len().saturating_sub(1).to_string().len();
    let width = widest_cell.chain([widest_id, 3]).max().unwrap_or(3);
    write!(f, "node")?;
    for id in 0..rows.len() {
        write!(f, " {id:>width$}")?;
    }
    writeln!(f)?;
    for (id, row) in rows.iter().enumerate() {
        write!(f, "{id:>3}:")?;
        for cell in row {
            write!(f, " {cell:>width$}")?;
        }
        writeln!(f)?;
    }
    Ok(())
}

/// A node size as numactl prints it: whole MB, or kB below 1 MB (0 stays "0 MB", as numactl
/// prints a memoryless node).
struct SizeInMb(u64);

impl fmt::Display for SizeInMb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            bytes @ 1..0x10_0000 => write!(f, "{} kB", bytes >> 10),
            bytes => write!(f, "{} MB", bytes >> 20),
        }
    }
}

/// The shipped topologies, embedded so that the binary needs nothing else on disk:
/// (file name, contents).
pub const BUILTIN: &[(&str, &str)] = &[
    ("asymmetric.toml", include_str!("../../../topologies/asymmetric.toml")),
    ("butterfly.toml", include_str!("../../../topologies/butterfly.toml")),
    ("ring8.toml", include_str!("../../../topologies/ring8.toml")),
    ("two-socket.toml", include_str!("../../../topologies/two-socket.toml")),
    ("uma.toml", include_str!("../../../topologies/uma.toml")),
];

/// Names of the shipped topologies, without `.toml`.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTIN.iter().map(|(file, _)| file.strip_suffix(".toml").unwrap_or(file))
}

/// Resolves a `--topology` argument: an existing file is loaded; otherwise a shipped
/// topology is taken by name (`butterfly`, `butterfly.toml`, or `topologies/butterfly.toml`,
/// so that commands written from the repository root work anywhere) with origin
/// `<built-in butterfly.toml>`.
///
/// # Errors
///
/// [`TopologyError::NotFound`], which lists the shipped names, if `arg` is neither; or an
/// error of [`Topology::load`] or [`Topology::parse`].
pub fn resolve(arg: &str) -> Result<Topology, TopologyError> {
    let path = Path::new(arg);
    if path.exists() {
        return Topology::load(path);
    }
    let name = arg.strip_prefix("topologies/").unwrap_or(arg);
    let name = name.strip_suffix(".toml").unwrap_or(name);
    match BUILTIN.iter().find(|(file, _)| file.strip_suffix(".toml") == Some(name)) {
        Some((file, text)) => Topology::parse(text, &format!("<built-in {file}>")),
        None => {
            Err(TopologyError::NotFound { arg: arg.to_owned(), shipped: builtin_names().map(str::to_owned).collect() })
        }
    }
}

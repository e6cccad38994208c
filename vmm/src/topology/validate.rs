//! From the file as read ([`RawTopology`]) to a [`Topology`] the VMM can build: every rule
//! of the format is checked here, and every error says where, what and what would be valid.

use psyche_abi::{MAX_CPUS, MAX_NODES};
use toml::Spanned;

use super::error::{Source, TopologyError};
use super::latency::{LatencyMode, LatencyModel};
use super::raw::{Int, Matrix, RawDistances, RawLatency, RawNode, RawPair, RawSize, RawTopology};
use super::{
    size, Node, Topology, DEFAULT_DISTANCE, LOCAL_DISTANCE, MAX_TOTAL_MEMORY, MIN_KERNEL_NODE_MEMORY,
    NODE_MEMORY_ALIGN, UNREACHABLE,
};

type Result<T> = std::result::Result<T, TopologyError>;

/// Checks `raw`, read from `source`, and builds the topology it describes.
pub(super) fn build(raw: RawTopology, source: Source<'_>) -> Result<Topology> {
    let name = name(raw.name, source)?;
    let nodes = nodes(&raw.node, source)?;
    let distances = match &raw.distances {
        Some(table) => distances(table, &nodes, source)?,
        None => default_distances(nodes.len()),
    };
    let latency = raw.latency.as_ref().map(|table| latency(table, &distances, source)).transpose()?;
    Ok(Topology { name, description: raw.description, origin: source.origin.to_owned(), nodes, distances, latency })
}

fn name(raw: Option<Spanned<String>>, source: Source<'_>) -> Result<String> {
    const HOW: &str = "give the machine a name, like name = \"two-socket\"";
    let raw = raw.ok_or_else(|| TopologyError::field_in_file(source, "name", format!("missing: {HOW}")))?;
    if raw.get_ref().trim().is_empty() {
        return Err(TopologyError::field(source, &raw.span(), "name", format!("is empty: {HOW}")));
    }
    Ok(raw.into_inner())
}

/// The nodes sorted by id, after checking ids, vCPUs and memory.
fn nodes(raw: &[Spanned<RawNode>], source: Source<'_>) -> Result<Vec<Node>> {
    if raw.is_empty() {
        return Err(TopologyError::field_in_file(
            source,
            "node",
            "no nodes: describe the machine with at least one [[node]] table \
             (with id, cpus and memory)",
        ));
    }
    if let Some(extra) = raw.get(MAX_NODES) {
        return Err(TopologyError::field(
            source,
            &extra.span(),
            format!("node[{MAX_NODES}]"),
            format!("too many nodes: at most {MAX_NODES} are supported, and this file has {}", raw.len()),
        ));
    }
    let ids = node_ids(raw, source)?;
    let cpus = node_cpus(raw, &ids, source)?;
    let memory = raw
        .iter()
        .zip(&ids)
        .enumerate()
        .map(|(index, (node, &id))| node_memory(node, index, id, source))
        .collect::<Result<Vec<u64>>>()?;
    let total = memory.iter().fold(0u64, |sum, &bytes| sum.saturating_add(bytes));
    if total > MAX_TOTAL_MEMORY {
        return Err(TopologyError::machine(
            source,
            format!(
                "total memory is {}, more than the limit of {}: give the nodes less memory",
                size::format(total),
                size::format(MAX_TOTAL_MEMORY)
            ),
        ));
    }

    let mut nodes: Vec<Node> =
        (0u32..).take(raw.len()).map(|id| Node { id, cpus: Vec::new(), memory_bytes: 0 }).collect();
    for ((&id, bytes), node_cpus) in ids.iter().zip(memory).zip(cpus) {
        if let Some(node) = nodes.get_mut(id) {
            node.memory_bytes = bytes;
            node.cpus = node_cpus;
        }
    }
    Ok(nodes)
}

/// The id of each node, in file order; ids are checked to be 0..N-1, each used once.
fn node_ids(raw: &[Spanned<RawNode>], source: Source<'_>) -> Result<Vec<usize>> {
    let count = raw.len();
    let valid = match count {
        1 => "there is 1 node, so its id must be 0".to_owned(),
        _ => format!("there are {count} nodes, so the ids must be 0..={}, each used once", count.saturating_sub(1)),
    };
    // The file index of the node that has each id.
    let mut index_of_id: Vec<Option<usize>> = vec![None; count];
    let mut ids = Vec::with_capacity(count);
    for (index, node) in raw.iter().enumerate() {
        let field = format!("node[{index}].id");
        let Some(id) = &node.get_ref().id else {
            return Err(TopologyError::field(
                source,
                &node.span(),
                field,
                format!("missing: number the node, like id = {index}; {valid}"),
            ));
        };
        let Int(value) = *id.get_ref();
        let slot = index_below(value, count).and_then(|id| index_of_id.get_mut(id).map(|slot| (id, slot)));
        let Some((id_index, slot)) = slot else {
            return Err(TopologyError::field(
                source,
                &id.span(),
                field,
                format!("node id {value} is out of range: {valid}"),
            ));
        };
        if let Some(first) = *slot {
            return Err(TopologyError::field(
                source,
                &id.span(),
                field,
                format!("node id {value} is already used by node[{first}]; {valid}"),
            ));
        }
        *slot = Some(index);
        ids.push(id_index);
    }
    Ok(ids)
}

/// The sorted vCPUs of each node, in file order; every vCPU 0..C-1 must be in exactly one.
fn node_cpus(raw: &[Spanned<RawNode>], ids: &[usize], source: Source<'_>) -> Result<Vec<Vec<u32>>> {
    const ONCE: &str = "every vCPU must be in exactly one node";
    // The file index of the node that has each vCPU.
    let mut owner: Vec<Option<usize>> = vec![None; MAX_CPUS];
    for (index, node) in raw.iter().enumerate() {
        let field = format!("node[{index}].cpus");
        let Some(cpus) = &node.get_ref().cpus else {
            return Err(TopologyError::field(
                source,
                &node.span(),
                field,
                "missing: list the node's vCPUs, like cpus = [0, 1], \
                 or write cpus = [] for a node with memory only",
            ));
        };
        for cpu in cpus {
            let Int(value) = *cpu.get_ref();
            let Some(slot) = index_below(value, MAX_CPUS).and_then(|cpu| owner.get_mut(cpu)) else {
                return Err(TopologyError::field(
                    source,
                    &cpu.span(),
                    field,
                    format!(
                        "vCPU {value} is out of range: vCPUs are numbered 0..={}, \
                         at most {MAX_CPUS} of them",
                        MAX_CPUS - 1
                    ),
                ));
            };
            match *slot {
                Some(other) if other == index => {
                    return Err(TopologyError::field(
                        source,
                        &cpu.span(),
                        field,
                        format!("vCPU {value} is listed twice; {ONCE}"),
                    ));
                }
                Some(other) => {
                    let other_id = ids.get(other).copied().unwrap_or(other);
                    return Err(TopologyError::field(
                        source,
                        &cpu.span(),
                        field,
                        format!("vCPU {value} is already in node {other_id}; {ONCE}"),
                    ));
                }
                None => *slot = Some(index),
            }
        }
    }

    let Some(highest) = owner.iter().rposition(Option::is_some) else {
        return Err(TopologyError::machine(
            source,
            "no node has a vCPU: the machine needs at least one, like cpus = [0] in node 0",
        ));
    };
    if let Some(missing) = owner.iter().take(highest).position(Option::is_none) {
        return Err(TopologyError::machine(
            source,
            format!(
                "vCPUs must be numbered 0..C-1 without gaps: vCPU {missing} is missing \
                 (the highest listed is {highest}); add it to one node's cpus, \
                 or renumber the vCPUs"
            ),
        ));
    }
    let mut cpus = vec![Vec::new(); raw.len()];
    // Walking the vCPUs in order leaves each node's list sorted.
    for (cpu, owner) in (0u32..).zip(owner) {
        if let Some(list) = owner.and_then(|index| cpus.get_mut(index)) {
            list.push(cpu);
        }
    }
    Ok(cpus)
}

/// The memory of the node at file `index`, which has id `id`, in bytes.
fn node_memory(node: &Spanned<RawNode>, index: usize, id: usize, source: Source<'_>) -> Result<u64> {
    const SIZES: &str = "use a number of bytes or a number with a K, M, G or T suffix, like \"64M\"";
    let field = format!("node[{index}].memory");
    let Some(memory) = &node.get_ref().memory else {
        return Err(TopologyError::field(
            source,
            &node.span(),
            field,
            "missing: give the node's memory, like memory = \"64M\", or \"0\" for none",
        ));
    };
    let raw = memory.get_ref();
    let error = |message: String| TopologyError::field(source, &memory.span(), field.clone(), message);
    let bytes = match raw {
        RawSize::Bytes(bytes) => {
            u64::try_from(*bytes).map_err(|_| error(format!("{raw} is not a size: it is negative; {SIZES}")))?
        }
        RawSize::Text(text) => size::parse(text).map_err(|why| match why {
            size::SizeError::Malformed => error(format!("{raw} is not a size: {SIZES}")),
            size::SizeError::TooLarge => error(format!(
                "{raw} is too large: all memory together is limited to {}",
                size::format(MAX_TOTAL_MEMORY)
            )),
        })?,
    };
    if bytes > MAX_TOTAL_MEMORY {
        return Err(error(format!(
            "{raw} is too large: all memory together is limited to {}",
            size::format(MAX_TOTAL_MEMORY)
        )));
    }
    if id == 0 && bytes < MIN_KERNEL_NODE_MEMORY {
        return Err(error(format!(
            "node 0 has {raw} but needs at least {}: it holds the kernel",
            size::format(MIN_KERNEL_NODE_MEMORY)
        )));
    }
    if bytes % NODE_MEMORY_ALIGN != 0 {
        let down = bytes - bytes % NODE_MEMORY_ALIGN;
        let up = down.saturating_add(NODE_MEMORY_ALIGN);
        let choices = match down {
            0 => format!("{:?}", size::format(up)),
            _ => format!("{:?} or {:?}", size::format(down), size::format(up)),
        };
        return Err(error(format!(
            "{raw} is not a multiple of {align}: the VMM maps each node's memory on \
             {mib} MiB boundaries; use {choices}",
            align = size::format(NODE_MEMORY_ALIGN),
            mib = NODE_MEMORY_ALIGN >> 20
        )));
    }
    Ok(bytes)
}

/// Local on the diagonal, the default everywhere else.
fn default_distances(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|from| (0..count).map(|to| if from == to { LOCAL_DISTANCE } else { DEFAULT_DISTANCE }).collect())
        .collect()
}

/// The distance matrix from `[distances]`: a full matrix, or pairs over the defaults. Every
/// node with vCPUs must reach node 0, where the kernel is: its vCPUs run kernel code.
fn distances(raw: &RawDistances, nodes: &[Node], source: Source<'_>) -> Result<Vec<Vec<u8>>> {
    let count = nodes.len();
    let has_cpus = |node: usize| nodes.get(node).is_some_and(|node| !node.cpus.is_empty());
    match (&raw.matrix, &raw.pair) {
        (Some(matrix), Some(pairs)) => Err(TopologyError::field(
            source,
            &pairs.first().map_or_else(|| matrix.span(), Spanned::span),
            "distances",
            "give either a matrix or [[distances.pair]] tables, not both",
        )),
        (Some(matrix), None) => {
            let rows = square(matrix, count, "distances.matrix", source)?;
            let mut distances = default_distances(count);
            for ((from, row), cells) in rows.iter().enumerate().zip(&mut distances) {
                for ((to, entry), cell) in row.iter().enumerate().zip(cells) {
                    let error = |message| {
                        TopologyError::field(source, &entry.span(), format!("distances.matrix[{from}][{to}]"), message)
                    };
                    *cell = distance(*entry.get_ref(), from == to).map_err(error)?;
                    if to == 0 && *cell == UNREACHABLE && has_cpus(from) {
                        return Err(error(kernel_unreachable(from)));
                    }
                }
            }
            Ok(distances)
        }
        (None, Some(pairs)) => pair_distances(pairs, count, has_cpus, source),
        (None, None) => Ok(default_distances(count)),
    }
}

/// The distance matrix from `[[distances.pair]]` tables: each pair sets one direction, and
/// the other too unless it is given by a pair of its own.
fn pair_distances(
    pairs: &[Spanned<RawPair>],
    count: usize,
    has_cpus: impl Fn(usize) -> bool,
    source: Source<'_>,
) -> Result<Vec<Vec<u8>>> {
    let mut distances = default_distances(count);
    // The index of the pair that gave each direction.
    let mut given: Vec<Vec<Option<usize>>> = vec![vec![None; count]; count];
    for (index, pair) in pairs.iter().enumerate() {
        let field = format!("distances.pair[{index}]");
        let part = |name: &str, value: &Option<Spanned<Int>>| {
            value.clone().ok_or_else(|| {
                TopologyError::field(
                    source,
                    &pair.span(),
                    format!("{field}.{name}"),
                    "missing: each [[distances.pair]] needs src, dst and val, \
                     like src = 0, dst = 1, val = 21",
                )
            })
        };
        let raw = pair.get_ref();
        let (src, dst, val) = (part("src", &raw.src)?, part("dst", &raw.dst)?, part("val", &raw.val)?);
        let node = |name: &str, value: &Spanned<Int>| {
            let Int(id) = *value.get_ref();
            index_below(id, count).ok_or_else(|| {
                TopologyError::field(
                    source,
                    &value.span(),
                    format!("{field}.{name}"),
                    format!("node {id} does not exist: {}", node_ids_are(count)),
                )
            })
        };
        let (from, to) = (node("src", &src)?, node("dst", &dst)?);
        let value = distance(*val.get_ref(), from == to)
            .map_err(|message| TopologyError::field(source, &val.span(), format!("{field}.val"), message))?;
        let Some(slot) = given.get_mut(from).and_then(|row| row.get_mut(to)) else {
            continue;
        };
        if let Some(first) = *slot {
            return Err(TopologyError::field(
                source,
                &pair.span(),
                field,
                format!(
                    "the distance from node {from} to node {to} is already given by \
                     distances.pair[{first}]; give each direction once"
                ),
            ));
        }
        *slot = Some(index);
        set(&mut distances, from, to, value);
    }
    let given_by = |from, to| get(&given, from, to).flatten();
    for from in 0..count {
        for to in 0..count {
            let one_way = given_by(from, to).is_some() && given_by(to, from).is_none();
            if let (true, Some(value)) = (one_way, get(&distances, from, to)) {
                set(&mut distances, to, from, value);
            }
        }
    }
    for node in (0..count).filter(|&node| has_cpus(node)) {
        if get(&distances, node, 0) != Some(UNREACHABLE) {
            continue;
        }
        let (index, note) = match given_by(node, 0) {
            Some(index) => (Some(index), ""),
            None => (given_by(0, node), "; this pair is given one way only, so it holds both ways"),
        };
        let val = index.and_then(|index| pairs.get(index)?.get_ref().val.as_ref());
        let message = format!("{}{note}", kernel_unreachable(node));
        return Err(match (index, val) {
            (Some(index), Some(val)) => {
                TopologyError::field(source, &val.span(), format!("distances.pair[{index}].val"), message)
            }
            _ => TopologyError::machine(source, message),
        });
    }
    Ok(distances)
}

/// A checked distance: 10 on the diagonal; 11..=254, or 255 for unreachable, off it.
fn distance(Int(value): Int, diagonal: bool) -> std::result::Result<u8, String> {
    match (diagonal, u8::try_from(value)) {
        (true, Ok(LOCAL_DISTANCE)) => Ok(LOCAL_DISTANCE),
        (true, _) => Err(format!(
            "distance {value} is invalid: a node's distance to itself (the diagonal) must be \
             {LOCAL_DISTANCE}"
        )),
        (false, Ok(LOCAL_DISTANCE)) => Err(format!(
            "distance {value} is invalid: {LOCAL_DISTANCE} is only for a node's distance to \
             itself; off-diagonal distances are 11..=254, or 255 for unreachable"
        )),
        (false, Ok(value @ 11..=UNREACHABLE)) => Ok(value),
        (false, _) => Err(format!(
            "distance {value} is invalid: off-diagonal distances are 11..=254, \
             or 255 for unreachable"
        )),
    }
}

/// Why a node with vCPUs may not be unreachable from node 0.
fn kernel_unreachable(node: usize) -> String {
    format!(
        "node {node} has vCPUs but cannot reach node 0 (distance {UNREACHABLE}): node 0 holds \
         the kernel, so every node with vCPUs needs a distance below {UNREACHABLE} to it"
    )
}

/// The `[latency]` table, against the checked distances.
fn latency(raw: &RawLatency, distances: &[Vec<u8>], source: Source<'_>) -> Result<LatencyModel> {
    let mode = match &raw.mode {
        // A [latency] table is there to be used.
        None => LatencyMode::Window,
        Some(mode) => mode.get_ref().parse().map_err(|error: super::ParseLatencyModeError| {
            TopologyError::field(source, &mode.span(), "latency.mode", error.to_string())
        })?,
    };
    let Some(local) = &raw.local_ns else {
        const MISSING: &str = "missing: give the cost of a local memory access in ns, like local_ns = 100";
        return Err(match source.table_span("latency") {
            Some(span) => TopologyError::field(source, &span, "latency.local_ns", MISSING),
            None => TopologyError::field_in_file(source, "latency.local_ns", MISSING),
        });
    };
    let local_ns = nanoseconds(*local.get_ref(), "a local access costs at least 1 ns")
        .map_err(|message| TopologyError::field(source, &local.span(), "latency.local_ns", message))?;
    let matrix_ns = match &raw.matrix_ns {
        Some(matrix) => given_latencies(matrix, local_ns, distances, source)?,
        None => computed_latencies(local, local_ns, distances, source)?,
    };
    Ok(LatencyModel { mode, local_ns, matrix_ns })
}

/// Latencies from `latency.matrix_ns`: the diagonal must be `local_ns`, and unreachable
/// pairs must be 0 (there is no access to cost).
fn given_latencies(
    matrix: &Spanned<Matrix>,
    local_ns: u32,
    distances: &[Vec<u8>],
    source: Source<'_>,
) -> Result<Vec<Vec<Option<u32>>>> {
    let rows = square(matrix, distances.len(), "latency.matrix_ns", source)?;
    let mut latencies = Vec::with_capacity(rows.len());
    for (from, row) in rows.iter().enumerate() {
        let mut costs = Vec::with_capacity(row.len());
        for (to, entry) in row.iter().enumerate() {
            let Int(value) = *entry.get_ref();
            let error = |message: String| {
                TopologyError::field(source, &entry.span(), format!("latency.matrix_ns[{from}][{to}]"), message)
            };
            let cost = if from == to {
                if value != i64::from(local_ns) {
                    return Err(error(format!(
                        "{value} ns differs from latency.local_ns ({local_ns} ns): the diagonal \
                         is the cost of a local access, so make them equal"
                    )));
                }
                Some(local_ns)
            } else if get(distances, from, to) == Some(UNREACHABLE) {
                if value != 0 {
                    return Err(error(format!(
                        "{value} ns is invalid: node {from} cannot reach node {to} (distance \
                         {UNREACHABLE}), so this access has no latency: write 0 here"
                    )));
                }
                None
            } else {
                Some(
                    nanoseconds(Int(value), "a remote access costs at least 1 ns (0 is only for unreachable pairs)")
                        .map_err(error)?,
                )
            };
            costs.push(cost);
        }
        latencies.push(costs);
    }
    Ok(latencies)
}

/// Latencies from `local_ns` alone: `local_ns * distance / 10`, as the SLIT scales them.
fn computed_latencies(
    local: &Spanned<Int>,
    local_ns: u32,
    distances: &[Vec<u8>],
    source: Source<'_>,
) -> Result<Vec<Vec<Option<u32>>>> {
    let mut latencies = Vec::with_capacity(distances.len());
    for (from, row) in distances.iter().enumerate() {
        let mut costs = Vec::with_capacity(row.len());
        for (to, &distance) in row.iter().enumerate() {
            if distance == UNREACHABLE {
                costs.push(None);
                continue;
            }
            let error = |cost: String| {
                TopologyError::field(
                    source,
                    &local.span(),
                    "latency.local_ns",
                    format!(
                        "{local_ns} ns makes an access from node {from} to node {to} (distance \
                         {distance}) cost {cost} ns, which does not fit in u32 nanoseconds (at \
                         most {}): lower local_ns, or give every cost in latency.matrix_ns",
                        u32::MAX
                    ),
                )
            };
            let cost = u64::from(local_ns)
                .checked_mul(u64::from(distance))
                .map(|scaled| scaled / u64::from(LOCAL_DISTANCE))
                .ok_or_else(|| error(format!("{local_ns} * {distance} / 10 (more than u64 holds)")))?;
            costs.push(Some(u32::try_from(cost).map_err(|_| error(cost.to_string()))?));
        }
        latencies.push(costs);
    }
    Ok(latencies)
}

/// A checked cost: 1 ns or more, and within `u32`.
fn nanoseconds(Int(value): Int, at_least_one: &str) -> std::result::Result<u32, String> {
    match u32::try_from(value) {
        Ok(0) => Err(format!("0 ns is invalid: {at_least_one}")),
        Ok(ns) => Ok(ns),
        Err(_) if value < 0 => Err(format!("{value} ns is invalid: {at_least_one}")),
        Err(_) => Err(format!("{value} ns does not fit in u32 nanoseconds (at most {})", u32::MAX)),
    }
}

/// The rows of an N x N `matrix` (N = `count` nodes), after checking its shape.
fn square<'a>(
    matrix: &'a Spanned<Matrix>,
    count: usize,
    field: &str,
    source: Source<'_>,
) -> Result<Vec<&'a [Spanned<Int>]>> {
    let rows = matrix.get_ref();
    if rows.len() != count {
        return Err(TopologyError::field(
            source,
            &matrix.span(),
            field,
            format!(
                "has {} for {}: it must be {count} x {count}, row i for node i",
                plural(rows.len(), "row"),
                plural(count, "node"),
            ),
        ));
    }
    rows.iter()
        .enumerate()
        .map(|(index, row)| {
            if row.get_ref().len() == count {
                Ok(row.get_ref().as_slice())
            } else {
                Err(TopologyError::field(
                    source,
                    &row.span(),
                    format!("{field}[{index}]"),
                    format!(
                        "has {} for {}: each row must have {count}, entry j for node j",
                        plural(row.get_ref().len(), "entry"),
                        plural(count, "node"),
                    ),
                ))
            }
        })
        .collect()
}

/// `value` as an index into something of `len` elements, if it is one.
fn index_below(value: i64, len: usize) -> Option<usize> {
    usize::try_from(value).ok().filter(|&index| index < len)
}

/// "node ids are 0..=2", for messages about references to nodes.
fn node_ids_are(count: usize) -> String {
    match count {
        1 => "the only node is 0".to_owned(),
        _ => format!("node ids are 0..={}", count.saturating_sub(1)),
    }
}

fn plural(count: usize, noun: &str) -> String {
    match (count, noun) {
        (1, _) => format!("1 {noun}"),
        (_, "entry") => format!("{count} entries"),
        _ => format!("{count} {noun}s"),
    }
}

fn get<T: Copy>(matrix: &[Vec<T>], row: usize, column: usize) -> Option<T> {
    matrix.get(row)?.get(column).copied()
}

fn set<T>(matrix: &mut [Vec<T>], row: usize, column: usize, value: T) {
    if let Some(cell) = matrix.get_mut(row).and_then(|cells| cells.get_mut(column)) {
        *cell = value;
    }
}

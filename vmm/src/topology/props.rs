//! Property tests of the topology reader: whatever the text (arbitrary strings, machines
//! generated field by field and then broken, the shipped files edited line by line), parsing
//! gives an error that says where (a line and column, or the field's path, or, for the
//! machine as a whole, the file), or a machine whose invariants hold, which `topology show`
//! prints faithfully and which, written back as TOML, parses to the same machine. Machines
//! generated valid parse to exactly what the format says (ids sorted, pairs given one way
//! holding both ways, latencies scaled from distances).

use std::fmt::Write as _;

use proptest::prelude::*;

use super::*;

/// Cases per property: a parse is well under a millisecond, even in a debug build.
const CASES: u32 = 256;

const ORIGIN: &str = "props.toml";

/// A TOML string literal.
fn quote(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// The error says where it is.
fn locates(error: &TopologyError, text: &str) -> Result<(), TestCaseError> {
    let lines = text.split('\n').count();
    let placed = |at: &Location| match at.position {
        Some((line, column)) => line >= 1 && line <= lines && column >= 1,
        None => true,
    };
    match error {
        TopologyError::Syntax { at, .. } => {
            prop_assert!(at.position.is_some() && placed(at), "{}", error);
            prop_assert_eq!(&at.origin, ORIGIN);
        }
        TopologyError::Field { at, field, message } => {
            prop_assert!(!field.is_empty() && !message.is_empty() && placed(at), "{}", error);
            prop_assert_eq!(&at.origin, ORIGIN);
        }
        TopologyError::Machine { at, message } => {
            prop_assert!(!message.is_empty() && placed(at), "{}", error);
            prop_assert_eq!(&at.origin, ORIGIN);
        }
        other => return Err(TestCaseError::fail(format!("parsing text gave {other:?}"))),
    }
    prop_assert!(error.to_string().starts_with(ORIGIN));
    Ok(())
}

/// Every invariant of a validated machine.
fn holds(topology: &Topology) -> Result<(), TestCaseError> {
    let count = topology.node_count();
    prop_assert!((1..=MAX_NODES).contains(&count));
    prop_assert!(!topology.name.trim().is_empty());
    let cpus = topology.cpu_count();
    prop_assert!((1..=MAX_CPUS).contains(&cpus));
    let mut owners = vec![0; cpus];
    for (index, node) in topology.nodes.iter().enumerate() {
        prop_assert_eq!(node.id as usize, index, "dense ids in order");
        prop_assert!(node.cpus.windows(2).all(|pair| pair[0] < pair[1]), "sorted cpus");
        for &cpu in &node.cpus {
            prop_assert!((cpu as usize) < cpus, "vCPU {} of {}", cpu, cpus);
            owners[cpu as usize] += 1;
        }
        prop_assert!(node.memory_bytes.is_multiple_of(NODE_MEMORY_ALIGN));
    }
    prop_assert!(owners.iter().all(|&n| n == 1), "every vCPU in exactly one node");
    prop_assert!(topology.nodes[0].memory_bytes >= MIN_KERNEL_NODE_MEMORY);
    prop_assert!(topology.total_memory() <= MAX_TOTAL_MEMORY);
    let distances = topology.distance_matrix();
    prop_assert_eq!(distances.len(), count);
    for (from, row) in distances.iter().enumerate() {
        prop_assert_eq!(row.len(), count);
        for (to, &distance) in row.iter().enumerate() {
            if from == to {
                prop_assert_eq!(distance, LOCAL_DISTANCE);
            } else {
                prop_assert!(distance > LOCAL_DISTANCE, "distance {} from {} to {}", distance, from, to);
            }
        }
        if !topology.nodes[from].cpus.is_empty() {
            prop_assert!(row[0] != UNREACHABLE, "node {} has vCPUs and cannot reach node 0", from);
        }
    }
    if let Some(latency) = &topology.latency {
        prop_assert!(latency.local_ns >= 1);
        prop_assert_eq!(latency.matrix_ns().len(), count);
        for (from, row) in latency.matrix_ns().iter().enumerate() {
            prop_assert_eq!(row.len(), count);
            for (to, &cost) in row.iter().enumerate() {
                let reachable = distances[from][to] != UNREACHABLE;
                prop_assert_eq!(cost.is_some(), reachable);
                prop_assert!(cost.is_none_or(|ns| ns >= 1));
                if from == to {
                    prop_assert_eq!(cost, Some(latency.local_ns));
                }
            }
        }
    }
    Ok(())
}

/// What `topology show` printed, read back: per node its vCPUs and size, the distance table,
/// and the latency mode and table.
type Shown = (Vec<(Vec<u32>, u64)>, Vec<Vec<u8>>, Option<(String, Vec<Vec<Option<u32>>>)>);

/// Reads `numactl --hardware`-style output back (the inverse of `numactl_hardware`).
fn read_show(text: &str) -> Option<Shown> {
    let mut lines = text.lines();
    let available = lines.next()?.strip_prefix("available: ")?;
    let count: usize = available.split(' ').next()?.parse().ok()?;
    let mut nodes = Vec::new();
    for node in 0..count {
        let cpus = lines.next()?.strip_prefix(&format!("node {node} cpus:"))?;
        let cpus = cpus.split_whitespace().map(str::parse).collect::<Result<Vec<u32>, _>>().ok()?;
        let size = lines.next()?.strip_prefix(&format!("node {node} size: "))?;
        let bytes = match size.split_once(' ')? {
            (mb, "MB") => mb.parse::<u64>().ok()? << 20,
            (kb, "kB") => kb.parse::<u64>().ok()? << 10,
            _ => return None,
        };
        nodes.push((cpus, bytes));
    }
    let table = |lines: &mut std::str::Lines<'_>| -> Option<Vec<Vec<String>>> {
        let header: Vec<&str> = lines.next()?.split_whitespace().collect();
        if header.first() != Some(&"node") || header.len() != count + 1 {
            return None;
        }
        (0..count)
            .map(|row| {
                let line = lines.next()?;
                let (id, cells) = line.split_once(':')?;
                (id.trim() == row.to_string()).then(|| cells.split_whitespace().map(str::to_owned).collect())
            })
            .collect()
    };
    if lines.next()? != "node distances:" {
        return None;
    }
    let distances = table(&mut lines)?
        .into_iter()
        .map(|row| row.iter().map(|cell| cell.parse().ok()).collect::<Option<Vec<u8>>>())
        .collect::<Option<Vec<_>>>()?;
    let latency = match lines.next() {
        None => None,
        Some(_blank) => {
            let mode = lines.next()?.strip_prefix("remote-access latency (ns), mode ")?.strip_suffix(':')?;
            let costs = table(&mut lines)?
                .into_iter()
                .map(|row| {
                    row.iter()
                        .map(|cell| if cell == "-" { Some(None) } else { cell.parse().ok().map(Some) })
                        .collect::<Option<Vec<Option<u32>>>>()
                })
                .collect::<Option<Vec<_>>>()?;
            Some((mode.to_owned(), costs))
        }
    };
    lines.next().is_none().then_some((nodes, distances, latency))
}

/// The machine written back as a topology file (every value explicit).
fn to_toml(topology: &Topology) -> String {
    let mut text = format!("name = {}\n", quote(&topology.name));
    if let Some(description) = &topology.description {
        let _ = writeln!(text, "description = {}", quote(description));
    }
    for node in &topology.nodes {
        let cpus: Vec<String> = node.cpus.iter().map(u32::to_string).collect();
        let _ =
            write!(text, "[[node]]\nid = {}\ncpus = [{}]\nmemory = {}\n", node.id, cpus.join(", "), node.memory_bytes);
    }
    let rows = |rows: Vec<Vec<String>>| rows.iter().map(|row| format!("[{}]", row.join(", "))).collect::<Vec<_>>();
    let distances = topology.distance_matrix().iter().map(|row| row.iter().map(u8::to_string).collect()).collect();
    let _ = writeln!(text, "[distances]\nmatrix = [{}]", rows(distances).join(", "));
    if let Some(latency) = &topology.latency {
        let costs = latency
            .matrix_ns()
            .iter()
            .map(|row| row.iter().map(|cost| cost.unwrap_or(0).to_string()).collect())
            .collect();
        let _ = writeln!(
            text,
            "[latency]\nlocal_ns = {}\nmatrix_ns = [{}]\nmode = {}",
            latency.local_ns,
            rows(costs).join(", "),
            quote(latency.mode.as_str())
        );
    }
    text
}

/// A parsed machine is printed faithfully by `topology show`, and written back as TOML it
/// parses to itself.
fn round_trips(topology: &Topology) -> Result<(), TestCaseError> {
    holds(topology)?;
    let shown = topology.numactl_hardware();
    let Some((nodes, distances, latency)) = read_show(&shown) else {
        return Err(TestCaseError::fail(format!("cannot read back:\n{shown}")));
    };
    let expected: Vec<(Vec<u32>, u64)> = topology.nodes.iter().map(|n| (n.cpus.clone(), n.memory_bytes)).collect();
    prop_assert_eq!(nodes, expected);
    prop_assert_eq!(distances.as_slice(), topology.distance_matrix());
    let expected = topology.latency.as_ref().map(|l| (l.mode.as_str().to_owned(), l.matrix_ns().to_vec()));
    prop_assert_eq!(latency, expected);
    let text = to_toml(topology);
    match Topology::parse(&text, &topology.origin) {
        Ok(again) => prop_assert_eq!(&again, topology, "{}", text),
        Err(error) => return Err(TestCaseError::fail(format!("{error}\n{text}"))),
    }
    Ok(())
}

/// Parsing `text` gives a located error or a machine that round-trips.
fn parses_or_locates(text: &str) -> Result<(), TestCaseError> {
    match Topology::parse(text, ORIGIN) {
        Ok(topology) => round_trips(&topology),
        Err(error) => locates(&error, text),
    }
}

/// A memory size as a file may write it.
#[derive(Clone, Debug)]
enum Memory {
    Text(String),
    Bytes(i64),
}

#[derive(Clone, Debug)]
struct NodeSpec {
    id: Option<i64>,
    cpus: Option<Vec<i64>>,
    memory: Option<Memory>,
}

#[derive(Clone, Debug)]
enum Distances {
    Default,
    Matrix(Vec<Vec<i64>>),
    Pairs(Vec<(Option<i64>, Option<i64>, Option<i64>)>),
    Both(Vec<Vec<i64>>, Vec<(Option<i64>, Option<i64>, Option<i64>)>),
}

#[derive(Clone, Debug)]
struct LatencySpec {
    local_ns: Option<i64>,
    matrix_ns: Option<Vec<Vec<i64>>>,
    mode: Option<String>,
}

/// A topology file, field by field.
#[derive(Clone, Debug)]
struct Spec {
    name: Option<String>,
    description: Option<String>,
    nodes: Vec<NodeSpec>,
    distances: Distances,
    latency: Option<LatencySpec>,
    /// A key no table has, if any.
    unknown: Option<String>,
}

fn int_list(values: &[i64]) -> String {
    values.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
}

fn matrix_text(rows: &[Vec<i64>]) -> String {
    rows.iter().map(|row| format!("[{}]", int_list(row))).collect::<Vec<_>>().join(", ")
}

impl Spec {
    fn text(&self) -> String {
        let mut text = String::new();
        if let Some(name) = &self.name {
            let _ = writeln!(text, "name = {}", quote(name));
        }
        if let Some(description) = &self.description {
            let _ = writeln!(text, "description = {}", quote(description));
        }
        if let Some(key) = &self.unknown {
            let _ = writeln!(text, "{key} = 1");
        }
        for node in &self.nodes {
            text.push_str("[[node]]\n");
            if let Some(id) = node.id {
                let _ = writeln!(text, "id = {id}");
            }
            if let Some(cpus) = &node.cpus {
                let _ = writeln!(text, "cpus = [{}]", int_list(cpus));
            }
            match &node.memory {
                Some(Memory::Text(size)) => {
                    let _ = writeln!(text, "memory = {}", quote(size));
                }
                Some(Memory::Bytes(bytes)) => {
                    let _ = writeln!(text, "memory = {bytes}");
                }
                None => {}
            }
        }
        let pairs = |text: &mut String, pairs: &[(Option<i64>, Option<i64>, Option<i64>)]| {
            for (src, dst, val) in pairs {
                text.push_str("[[distances.pair]]\n");
                for (key, value) in [("src", src), ("dst", dst), ("val", val)] {
                    if let Some(value) = value {
                        let _ = writeln!(text, "{key} = {value}");
                    }
                }
            }
        };
        match &self.distances {
            Distances::Default => {}
            Distances::Matrix(rows) => {
                let _ = writeln!(text, "[distances]\nmatrix = [{}]", matrix_text(rows));
            }
            Distances::Pairs(list) => pairs(&mut text, list),
            Distances::Both(rows, list) => {
                let _ = writeln!(text, "[distances]\nmatrix = [{}]", matrix_text(rows));
                pairs(&mut text, list);
            }
        }
        if let Some(latency) = &self.latency {
            text.push_str("[latency]\n");
            if let Some(local) = latency.local_ns {
                let _ = writeln!(text, "local_ns = {local}");
            }
            if let Some(rows) = &latency.matrix_ns {
                let _ = writeln!(text, "matrix_ns = [{}]", matrix_text(rows));
            }
            if let Some(mode) = &latency.mode {
                let _ = writeln!(text, "mode = {}", quote(mode));
            }
        }
        text
    }

    /// The machine a valid spec describes, computed from the format's rules.
    fn expected(&self) -> Topology {
        let count = self.nodes.len();
        let mut nodes: Vec<Node> = (0..count as u32).map(|id| Node { id, cpus: Vec::new(), memory_bytes: 0 }).collect();
        for spec in &self.nodes {
            let node = &mut nodes[spec.id.unwrap_or(0) as usize];
            node.cpus = spec.cpus.clone().unwrap_or_default().into_iter().map(|cpu| cpu as u32).collect();
            node.cpus.sort_unstable();
            node.memory_bytes = match &spec.memory {
                Some(Memory::Bytes(bytes)) => *bytes as u64,
                Some(Memory::Text(text)) => size::parse(text).unwrap_or(0),
                None => 0,
            };
        }
        let mut distances: Vec<Vec<u8>> =
            (0..count).map(|a| (0..count).map(|b| if a == b { 10 } else { 20 }).collect()).collect();
        match &self.distances {
            Distances::Matrix(rows) => {
                for (a, row) in rows.iter().enumerate() {
                    for (b, &value) in row.iter().enumerate() {
                        distances[a][b] = value as u8;
                    }
                }
            }
            Distances::Pairs(pairs) => {
                let given: Vec<(usize, usize, u8)> = pairs
                    .iter()
                    .map(|&(s, d, v)| (s.unwrap_or(0) as usize, d.unwrap_or(0) as usize, v.unwrap_or(0) as u8))
                    .collect();
                for &(s, d, v) in &given {
                    distances[s][d] = v;
                }
                for &(s, d, v) in &given {
                    if !given.iter().any(|&(s2, d2, _)| s2 == d && d2 == s) {
                        distances[d][s] = v;
                    }
                }
            }
            Distances::Default | Distances::Both(..) => {}
        }
        let latency = self.latency.as_ref().map(|spec| {
            let local_ns = spec.local_ns.unwrap_or(1) as u32;
            let matrix_ns = match &spec.matrix_ns {
                Some(rows) => rows
                    .iter()
                    .enumerate()
                    .map(|(a, row)| {
                        row.iter()
                            .enumerate()
                            .map(|(b, &ns)| (distances[a][b] != UNREACHABLE).then_some(ns as u32))
                            .collect()
                    })
                    .collect(),
                None => distances
                    .iter()
                    .map(|row| {
                        row.iter()
                            .map(|&d| (d != UNREACHABLE).then(|| (u64::from(local_ns) * u64::from(d) / 10) as u32))
                            .collect()
                    })
                    .collect(),
            };
            let mode =
                spec.mode.as_deref().map_or(LatencyMode::Window, |mode| mode.parse().unwrap_or(LatencyMode::Off));
            LatencyModel { mode, local_ns, matrix_ns }
        });
        Topology {
            name: self.name.clone().unwrap_or_default(),
            description: self.description.clone(),
            origin: ORIGIN.to_owned(),
            nodes,
            distances,
            latency,
        }
    }
}

/// Sizes written the ways a file may write them.
fn memory_of(bytes: u64, style: u8) -> Memory {
    match style % 4 {
        0 => Memory::Bytes(bytes as i64),
        1 => Memory::Text(format!("{}M", bytes >> 20)),
        2 => Memory::Text(format!("{}k", bytes >> 10)),
        _ => Memory::Text(size::format(bytes)),
    }
}

/// A valid topology file: 1 to 5 nodes in any order, 1 to 8 vCPUs spread over them, memory
/// in every style, distances by default, as a matrix or as pairs (one way or both), and
/// sometimes a latency table.
fn valid_spec() -> impl Strategy<Value = Spec> {
    (1usize..=5, 1usize..=8).prop_flat_map(|(count, cpus)| {
        let order = Just((0..count as i64).collect::<Vec<_>>()).prop_shuffle();
        let owners = proptest::collection::vec(0..count, cpus);
        let memory = proptest::collection::vec((0u64..=16, any::<u8>()), count);
        let off_diagonal = proptest::collection::vec(prop_oneof![8 => 11i64..=254, 1 => Just(255i64)], count * count);
        let pairs = proptest::collection::vec((0..count, 0..count, 11i64..=254, any::<bool>()), 0..6);
        let latency = proptest::option::of((
            1i64..=1000,
            any::<bool>(),
            proptest::collection::vec(1i64..=100_000, count * count),
            proptest::option::of(prop_oneof![Just("window"), Just("exact"), Just("account"), Just("off")]),
        ));
        (
            order,
            owners,
            memory,
            0u8..3,
            off_diagonal,
            pairs,
            latency,
            "[a-z][a-z0-9 -]{0,11}",
            proptest::option::of(any::<String>()),
        )
            .prop_map(move |(order, owners, memory, style, off, pairs, latency, name, description)| {
                let nodes = order
                    .iter()
                    .map(|&id| {
                        let (units, format) = memory[id as usize];
                        // Node 0 holds the kernel: at least 8M.
                        let units = if id == 0 { units.max(4) } else { units };
                        let cpus = (0..cpus as i64).filter(|&cpu| owners[cpu as usize] == id as usize).rev().collect();
                        NodeSpec { id: Some(id), cpus: Some(cpus), memory: Some(memory_of(units * (2 << 20), format)) }
                    })
                    .collect();
                // 255 only where neither side is node 0 (every node with vCPUs reaches node 0).
                let cell = |a: usize, b: usize| match (a == b, off[a * count + b]) {
                    (true, _) => 10,
                    (false, 255) if a == 0 || b == 0 => 254,
                    (false, value) => value,
                };
                let distances = match style {
                    0 => Distances::Default,
                    1 => Distances::Matrix((0..count).map(|a| (0..count).map(|b| cell(a, b)).collect()).collect()),
                    _ => {
                        let mut seen = Vec::new();
                        let list = pairs
                            .into_iter()
                            .filter(|&(s, d, _, _)| {
                                !seen.contains(&(s, d)) && {
                                    seen.push((s, d));
                                    true
                                }
                            })
                            .map(|(s, d, v, _)| (Some(s as i64), Some(d as i64), Some(if s == d { 10 } else { v })))
                            .collect();
                        Distances::Pairs(list)
                    }
                };
                let spec = Spec { name: Some(name), description, nodes, distances, latency: None, unknown: None };
                let latency = latency.map(|(local, given, costs, mode)| {
                    let matrix = spec.expected().distances;
                    let matrix_ns = given.then(|| {
                        (0..count)
                            .map(|a| {
                                (0..count)
                                    .map(|b| match (a == b, matrix[a][b]) {
                                        (true, _) => local,
                                        (false, UNREACHABLE) => 0,
                                        (false, _) => costs[a * count + b],
                                    })
                                    .collect()
                            })
                            .collect()
                    });
                    LatencySpec { local_ns: Some(local), matrix_ns, mode: mode.map(str::to_owned) }
                });
                Spec { latency, ..spec }
            })
    })
}

/// One way of breaking a spec: a field changed to an edge or out-of-range value, removed, or
/// duplicated.
#[derive(Clone, Debug)]
enum Break {
    Name(Option<&'static str>),
    NodeId(usize, Option<i64>),
    NodeCpus(usize, Option<Vec<i64>>),
    AddCpu(usize, i64),
    NodeMemory(usize, Option<Memory>),
    DuplicateNode(usize),
    RemoveNode(usize),
    ManyNodes,
    Distance(usize, usize, i64),
    DistanceRow(usize),
    PairField(usize, u8, Option<i64>),
    DuplicatePair(usize),
    BothForms,
    LocalNs(Option<i64>),
    Cost(usize, usize, i64),
    Mode(&'static str),
    Unknown,
}

fn breakage() -> impl Strategy<Value = Break> {
    let number = prop_oneof![
        Just(-1i64),
        Just(0),
        Just(1),
        Just(9),
        Just(10),
        Just(11),
        Just(254),
        Just(255),
        Just(256),
        Just(63),
        Just(64),
        Just(255),
        Just(256),
        Just(i64::from(u32::MAX)),
        Just(i64::from(u32::MAX) + 1),
        Just(i64::MAX),
        Just(i64::MIN),
    ];
    let sizes = prop_oneof![
        Just(Memory::Text("0".into())),
        Just(Memory::Text("1M".into())),
        Just(Memory::Text("3M".into())),
        Just(Memory::Text("6M".into())),
        Just(Memory::Text("64G".into())),
        Just(Memory::Text("66G".into())),
        Just(Memory::Text("16777216T".into())),
        Just(Memory::Text("99999999999999999999".into())),
        Just(Memory::Text("".into())),
        Just(Memory::Text("-2M".into())),
        Just(Memory::Text("2MB".into())),
        Just(Memory::Bytes(-1)),
        Just(Memory::Bytes(4097)),
        Just(Memory::Bytes(i64::MAX)),
    ];
    let index = any::<usize>();
    prop_oneof![
        proptest::option::of(prop_oneof![Just(""), Just("   "), Just("x")]).prop_map(Break::Name),
        (index, proptest::option::of(number.clone())).prop_map(|(n, id)| Break::NodeId(n, id)),
        (index, proptest::option::of(proptest::collection::vec(number.clone(), 0..3)))
            .prop_map(|(n, cpus)| Break::NodeCpus(n, cpus)),
        (index, prop_oneof![number.clone(), 0i64..10]).prop_map(|(n, cpu)| Break::AddCpu(n, cpu)),
        (index, proptest::option::of(sizes)).prop_map(|(n, memory)| Break::NodeMemory(n, memory)),
        index.prop_map(Break::DuplicateNode),
        index.prop_map(Break::RemoveNode),
        Just(Break::ManyNodes),
        (index, index, number.clone()).prop_map(|(a, b, v)| Break::Distance(a, b, v)),
        index.prop_map(Break::DistanceRow),
        (index, 0u8..3, proptest::option::of(number.clone())).prop_map(|(p, f, v)| Break::PairField(p, f, v)),
        index.prop_map(Break::DuplicatePair),
        Just(Break::BothForms),
        proptest::option::of(number.clone()).prop_map(Break::LocalNs),
        (index, index, number).prop_map(|(a, b, v)| Break::Cost(a, b, v)),
        prop_oneof![Just("fast"), Just(""), Just("Window")].prop_map(Break::Mode),
        Just(Break::Unknown),
    ]
}

impl Spec {
    fn broken(mut self, how: &Break) -> Spec {
        let count = self.nodes.len();
        if count == 0 {
            // Already broken past the point of more node edits (a file without nodes).
            return self;
        }
        match how {
            Break::Name(name) => self.name = name.map(str::to_owned),
            Break::NodeId(n, id) => self.nodes[n % count].id = *id,
            Break::NodeCpus(n, cpus) => self.nodes[n % count].cpus = cpus.clone(),
            Break::AddCpu(n, cpu) => self.nodes[n % count].cpus.get_or_insert_with(Vec::new).push(*cpu),
            Break::NodeMemory(n, memory) => self.nodes[n % count].memory = memory.clone(),
            Break::DuplicateNode(n) => self.nodes.push(self.nodes[n % count].clone()),
            Break::RemoveNode(n) => {
                self.nodes.remove(n % count);
            }
            Break::ManyNodes => {
                let spare = |id| NodeSpec { id: Some(id), cpus: Some(vec![]), memory: Some(Memory::Text("0".into())) };
                self.nodes.extend((count as i64..=MAX_NODES as i64).map(spare));
            }
            Break::Distance(a, b, value) => match &mut self.distances {
                Distances::Matrix(rows) | Distances::Both(rows, _) => {
                    let rows_len = rows.len().max(1);
                    if let Some(row) = rows.get_mut(a % rows_len) {
                        let len = row.len().max(1);
                        if let Some(cell) = row.get_mut(b % len) {
                            *cell = *value;
                        }
                    }
                }
                _ => {
                    self.distances =
                        Distances::Pairs(vec![(Some((a % count) as i64), Some((b % count) as i64), Some(*value))])
                }
            },
            Break::DistanceRow(a) => match &mut self.distances {
                Distances::Matrix(rows) | Distances::Both(rows, _) => {
                    let len = rows.len().max(1);
                    if let Some(row) = rows.get_mut(a % len) {
                        row.pop();
                    }
                }
                _ => self.distances = Distances::Matrix(vec![vec![10]; count + 1]),
            },
            Break::PairField(p, field, value) => {
                if let Distances::Pairs(list) | Distances::Both(_, list) = &mut self.distances {
                    if !list.is_empty() {
                        let len = list.len();
                        let pair = &mut list[p % len];
                        match field {
                            0 => pair.0 = *value,
                            1 => pair.1 = *value,
                            _ => pair.2 = *value,
                        }
                    }
                }
            }
            Break::DuplicatePair(p) => {
                if let Distances::Pairs(list) = &mut self.distances {
                    if !list.is_empty() {
                        let pair = list[p % list.len()];
                        list.push(pair);
                    }
                }
            }
            Break::BothForms => {
                let rows = (0..count).map(|a| (0..count).map(|b| if a == b { 10 } else { 20 }).collect()).collect();
                self.distances = Distances::Both(rows, vec![(Some(0), Some(0), Some(10))]);
            }
            Break::LocalNs(value) => {
                self.latency.get_or_insert(LatencySpec { local_ns: None, matrix_ns: None, mode: None }).local_ns =
                    *value;
            }
            Break::Cost(a, b, value) => {
                let latency =
                    self.latency.get_or_insert(LatencySpec { local_ns: Some(100), matrix_ns: None, mode: None });
                let rows = latency.matrix_ns.get_or_insert_with(|| vec![vec![100; count]; count]);
                let rows_len = rows.len().max(1);
                if let Some(row) = rows.get_mut(a % rows_len) {
                    let len = row.len().max(1);
                    if let Some(cell) = row.get_mut(b % len) {
                        *cell = *value;
                    }
                }
            }
            Break::Mode(mode) => {
                self.latency.get_or_insert(LatencySpec { local_ns: Some(100), matrix_ns: None, mode: None }).mode =
                    Some((*mode).to_owned());
            }
            Break::Unknown => self.unknown = Some("cores".to_owned()),
        }
        self
    }
}

/// One edit of a shipped file's text.
#[derive(Clone, Debug)]
enum Edit {
    RemoveLine(usize),
    RepeatLine(usize),
    SwapLines(usize, usize),
    InsertLine(usize, &'static str),
    /// Replace the `at`-th number with `with`.
    Number(usize, &'static str),
    /// Replace the `at`-th string with `with`.
    Text(usize, &'static str),
    /// Cut at `at` thousandths of the length (on a character boundary).
    Truncate(u16),
}

fn edit() -> impl Strategy<Value = Edit> {
    let line = prop_oneof![
        Just("[[node]]"),
        Just("id = 0"),
        Just("id = 9"),
        Just("cpus = []"),
        Just("cpus = [0]"),
        Just("memory = \"2M\""),
        Just("[distances]"),
        Just("matrix = [[10]]"),
        Just("[[distances.pair]]"),
        Just("src = 0"),
        Just("val = 255"),
        Just("[latency]"),
        Just("local_ns = 4294967295"),
        Just("mode = \"exact\""),
        Just("name = \"\""),
        Just("[node]"),
        Just("id.x = 1"),
        Just("extra = true"),
        Just("[[latency]]"),
        Just("matrix = 1"),
        Just("cpus = \"0\""),
    ];
    let number = prop_oneof![
        Just("-1"),
        Just("0"),
        Just("10"),
        Just("11"),
        Just("255"),
        Just("256"),
        Just("64"),
        Just("4294967296"),
        Just("9223372036854775808"),
        Just("1.5"),
        Just("\"3\""),
        Just("[]"),
        Just("{}"),
    ];
    let text = prop_oneof![Just("0"), Just("1M"), Just("65G"), Just("x"), Just(""), Just("exact"), Just("2M")];
    let index = any::<usize>();
    prop_oneof![
        1 => index.prop_map(Edit::RemoveLine),
        1 => index.prop_map(Edit::RepeatLine),
        1 => (index, index).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        1 => (index, line).prop_map(|(at, line)| Edit::InsertLine(at, line)),
        3 => (index, number).prop_map(|(at, with)| Edit::Number(at, with)),
        1 => (index, text).prop_map(|(at, with)| Edit::Text(at, with)),
        1 => (0u16..1000).prop_map(Edit::Truncate),
    ]
}

/// A byte range of a text.
type Span = (usize, usize);

/// The byte ranges of the numbers and of the string contents of a TOML text, outside
/// comments (roughly: enough to find values to replace).
fn tokens(text: &str) -> (Vec<Span>, Vec<Span>) {
    let (mut numbers, mut strings) = (Vec::new(), Vec::new());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' => {
                let start = i + 1;
                i = start;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    i += 1;
                }
                strings.push((start, i));
            }
            b'0'..=b'9' | b'-' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'-') {
                    i += 1;
                }
                numbers.push((start, i));
                continue;
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                // A key or a bare word: skip it whole, so that digits in keys are not numbers.
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'-') {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    (numbers, strings)
}

fn apply(text: &mut String, edit: &Edit) {
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    let count = lines.len();
    match *edit {
        Edit::RemoveLine(at) => {
            lines.remove(at % count);
        }
        Edit::RepeatLine(at) => {
            let line = lines[at % count].clone();
            lines.insert(at % count, line);
        }
        Edit::SwapLines(a, b) => lines.swap(a % count, b % count),
        Edit::InsertLine(at, line) => lines.insert(at % (count + 1), line.to_owned()),
        Edit::Number(at, with) | Edit::Text(at, with) => {
            let (numbers, strings) = tokens(text);
            let found = if matches!(edit, Edit::Number(..)) { numbers } else { strings };
            if !found.is_empty() {
                let (start, end) = found[at % found.len()];
                text.replace_range(start..end, with);
            }
            return;
        }
        Edit::Truncate(keep) => {
            let mut cut = text.len() * usize::from(keep) / 1000;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            return;
        }
    }
    *text = lines.join("\n");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// Any string at all: a located error (or, by chance, a machine that round-trips).
    #[test]
    fn any_text_is_a_located_error_or_a_machine(text in any::<String>()) {
        parses_or_locates(&text)?;
    }

    /// Text made of TOML's own characters and words, which gets further into the parser.
    #[test]
    fn toml_like_text_is_a_located_error_or_a_machine(
        text in "([\\[\\]{}=,.\"' \n#0-9a-z_-]|node|cpus|memory|id|distances|matrix|pair|src|dst|val|latency|local_ns|matrix_ns|mode|name){0,80}",
    ) {
        parses_or_locates(&text)?;
    }

    /// A machine generated valid parses to exactly the machine the format describes, and
    /// round-trips.
    #[test]
    fn a_valid_machine_parses_to_what_the_format_says(spec in valid_spec()) {
        let text = spec.text();
        let topology = Topology::parse(&text, ORIGIN).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&topology, &spec.expected(), "{}", text);
        round_trips(&topology)?;
    }

    /// A generated machine with fields changed to edge and out-of-range values, removed or
    /// duplicated: a located error, or a machine whose invariants hold and that round-trips.
    #[test]
    fn a_broken_machine_is_a_located_error_or_a_valid_machine(
        spec in valid_spec(),
        breaks in proptest::collection::vec(breakage(), 1..4),
    ) {
        let spec = breaks.iter().fold(spec, |spec, how| spec.broken(how));
        parses_or_locates(&spec.text())?;
    }

    /// The shipped topologies, edited line by line and value by value.
    #[test]
    fn an_edited_shipped_topology_is_a_located_error_or_a_valid_machine(
        file in 0..BUILTIN.len(),
        edits in proptest::collection::vec(edit(), 1..4),
    ) {
        let mut text = BUILTIN[file].1.to_owned();
        for edit in &edits {
            apply(&mut text, edit);
        }
        parses_or_locates(&text)?;
    }
}

/// The shipped topologies themselves round-trip.
#[test]
fn the_shipped_topologies_round_trip() {
    for (file, text) in BUILTIN {
        let topology = Topology::parse(text, file).unwrap_or_else(|error| panic!("{error}"));
        round_trips(&topology).unwrap_or_else(|error| panic!("{file}: {error}"));
    }
}

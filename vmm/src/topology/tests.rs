//! Unit tests of the topology reader. The error message of every rule is checked in full by
//! `tests/topology_files.rs`; these check the derived facts and the corner cases.

use super::*;

/// Two nodes of two vCPUs, 64M each, followed by `rest`.
fn two_nodes(rest: &str) -> String {
    format!(
        "name = \"t\"\n\
         [[node]]\nid = 0\ncpus = [0, 1]\nmemory = \"64M\"\n\
         [[node]]\nid = 1\ncpus = [2, 3]\nmemory = \"64M\"\n{rest}"
    )
}

/// Three nodes: 0 and 1 with a vCPU each, 2 with `memory2` and no vCPU; then `rest`.
fn three_nodes(memory2: &str, rest: &str) -> String {
    format!(
        "name = \"t\"\n\
         [[node]]\nid = 0\ncpus = [0]\nmemory = \"16M\"\n\
         [[node]]\nid = 1\ncpus = [1]\nmemory = \"0\"\n\
         [[node]]\nid = 2\ncpus = []\nmemory = \"{memory2}\"\n{rest}"
    )
}

fn parse(text: &str) -> Topology {
    Topology::parse(text, "t.toml").unwrap_or_else(|error| panic!("{error}"))
}

fn error(text: &str) -> String {
    match Topology::parse(text, "t.toml") {
        Ok(topology) => panic!("parsed: {topology:?}"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn sizes() {
    assert_eq!(size::parse("64M"), Ok(64 << 20));
    assert_eq!(size::parse("64m"), Ok(64 << 20));
    assert_eq!(size::parse("2G"), Ok(2 << 30));
    assert_eq!(size::parse("1T"), Ok(1 << 40));
    assert_eq!(size::parse("512K"), Ok(512 << 10));
    assert_eq!(size::parse("4096"), Ok(4096));
    assert_eq!(size::parse("0"), Ok(0));
    for malformed in ["", "M", "12Q", "+5M", "-5M", "5 M", "5MB", "1.5G", "0x10", "６M"] {
        assert_eq!(size::parse(malformed), Err(size::SizeError::Malformed), "{malformed:?}");
    }
    for too_large in ["99999999999999999999", "16777216T", "18446744073709551615K"] {
        assert_eq!(size::parse(too_large), Err(size::SizeError::TooLarge), "{too_large:?}");
    }

    assert_eq!(size::format(0), "0");
    assert_eq!(size::format(64 << 20), "64M");
    assert_eq!(size::format(1536 << 20), "1536M");
    assert_eq!(size::format(3 << 30), "3G");
    assert_eq!(size::format(4097), "4097");

    let integer = parse(&two_nodes("").replace("memory = \"64M\"", "memory = 67_108_864"));
    assert_eq!(integer.nodes[0].memory_bytes, 64 << 20);
    assert_eq!(integer.total_memory(), 128 << 20);
}

#[test]
fn line_and_column_count_characters() {
    let text = "a = 1\nb = \"é\" x";
    let at = error::Location::at("f", text, text.find('x').unwrap_or_default());
    assert_eq!(at.to_string(), "f:2:9");
    // Offsets past the end or inside a character are clamped, not a panic.
    assert_eq!(error::Location::at("f", text, 999).to_string(), "f:2:10");
    assert_eq!(error::Location::at("f", text, 11).to_string(), "f:2:6");
}

#[test]
fn nodes_and_cpus_are_sorted() {
    let topology = parse(
        "name = \"t\"\n\
         [[node]]\nid = 1\ncpus = [3, 1]\nmemory = \"4M\"\n\
         [[node]]\nid = 0\ncpus = [2, 0]\nmemory = \"8M\"\n",
    );
    assert_eq!(
        topology.nodes,
        [
            Node { id: 0, cpus: vec![0, 2], memory_bytes: 8 << 20 },
            Node { id: 1, cpus: vec![1, 3], memory_bytes: 4 << 20 },
        ]
    );
    assert_eq!(topology.cpu_count(), 4);
    assert_eq!(topology.node_of_cpu(3), Some(1));
    assert_eq!(topology.node_of_cpu(2), Some(0));
    assert_eq!(topology.node_of_cpu(4), None);
    assert_eq!(topology.origin, "t.toml");
    assert_eq!(topology.latency, None);
    assert_eq!(topology.latency_mode(), LatencyMode::Off);
}

#[test]
fn missing_pairs_default_to_20() {
    let topology = parse(&three_nodes("16M", "[[distances.pair]]\nsrc = 0\ndst = 1\nval = 31\n"));
    assert_eq!(topology.distance(0, 2), 20);
    assert_eq!(topology.distance(2, 1), 20);
    let defaults = parse(&two_nodes(""));
    assert_eq!(defaults.distance_matrix(), [vec![10, 20], vec![20, 10]]);
}

#[test]
fn a_pair_given_one_way_holds_both_ways() {
    let topology = parse(&two_nodes("[[distances.pair]]\nsrc = 1\ndst = 0\nval = 30\n"));
    assert_eq!(topology.distance(0, 1), 30);
    assert_eq!(topology.distance(1, 0), 30);
}

#[test]
fn a_pair_given_both_ways_may_be_asymmetric() {
    let topology = parse(&two_nodes(
        "[[distances.pair]]\nsrc = 0\ndst = 1\nval = 16\n\
         [[distances.pair]]\nsrc = 1\ndst = 0\nval = 22\n",
    ));
    assert_eq!(topology.distance_matrix(), [vec![10, 16], vec![22, 10]]);
    let matrix = parse(&two_nodes("[distances]\nmatrix = [[10, 16], [22, 10]]\n"));
    assert_eq!(matrix.distance_matrix(), topology.distance_matrix());
}

#[test]
fn the_diagonal_is_10() {
    // QEMU accepts a pair from a node to itself if it says 10.
    let topology = parse(&two_nodes("[[distances.pair]]\nsrc = 1\ndst = 1\nval = 10\n"));
    assert_eq!(topology.distance(1, 1), 10);
    assert_eq!(
        error(&two_nodes("[[distances.pair]]\nsrc = 1\ndst = 1\nval = 11\n")),
        "t.toml:13:7: distances.pair[0].val: distance 11 is invalid: a node's distance to \
         itself (the diagonal) must be 10"
    );
    assert_eq!(
        error(&two_nodes("[distances]\nmatrix = [[10, 21], [21, 255]]\n")),
        "t.toml:11:26: distances.matrix[1][1]: distance 255 is invalid: a node's distance to \
         itself (the diagonal) must be 10"
    );
}

#[test]
fn distance_bounds() {
    for (value, valid) in
        [(-1, false), (0, false), (9, false), (10, false), (11, true), (254, true), (255, true), (256, false)]
    {
        // Node 1 -> node 0 is given too, so that node 1 can reach the kernel even at 255.
        let text = two_nodes(&format!(
            "[[distances.pair]]\nsrc = 0\ndst = 1\nval = {value}\n\
             [[distances.pair]]\nsrc = 1\ndst = 0\nval = 21\n"
        ));
        assert_eq!(Topology::parse(&text, "t").is_ok(), valid, "distance {value}");
    }
}

#[test]
fn unreachable_memory_has_no_latency() {
    let topology = parse(&three_nodes(
        "32M",
        "[[distances.pair]]\nsrc = 0\ndst = 2\nval = 255\n\
         [[distances.pair]]\nsrc = 2\ndst = 0\nval = 40\n\
         [latency]\nlocal_ns = 100\n",
    ));
    assert_eq!(topology.distance(0, 2), UNREACHABLE);
    assert_eq!(topology.distance(2, 0), 40);
    assert_eq!(topology.latency_ns(0, 2), None);
    assert_eq!(topology.latency_ns(2, 0), Some(400));
    assert_eq!(topology.latency_ns(0, 0), Some(100));
    assert_eq!(topology.latency_ns(0, 1), Some(200));
    // Nodes that do not exist are unreachable.
    assert_eq!(topology.distance(0, 3), UNREACHABLE);
    assert_eq!(topology.distance(u32::MAX, 0), UNREACHABLE);
    assert_eq!(topology.latency_ns(3, 0), None);
}

#[test]
fn latency_from_local_ns_and_distance() {
    let topology = parse(&two_nodes("[distances]\nmatrix = [[10, 21], [33, 10]]\n[latency]\nlocal_ns = 95\n"));
    let latency = topology.latency.as_ref().expect("a latency model");
    assert_eq!(latency.mode, LatencyMode::Window, "the default with a [latency] table");
    assert_eq!(latency.local_ns, 95);
    // 95 * 21 / 10 = 199.5 and 95 * 33 / 10 = 313.5, rounded down.
    assert_eq!(latency.matrix_ns(), [vec![Some(95), Some(199)], vec![Some(313), Some(95)]]);
    assert_eq!(topology.latency_ns(1, 0), Some(313));
    assert_eq!(topology.latency_mode(), LatencyMode::Window);
}

#[test]
fn the_latency_mode_can_be_overridden_but_not_invented() {
    let with_model = parse(&two_nodes("[latency]\nlocal_ns = 90\nmode = \"exact\"\n"));
    for mode in LatencyMode::ALL {
        let overridden = with_model.clone().with_latency_mode(mode).unwrap();
        assert_eq!(overridden.latency_mode(), mode);
        assert_eq!(overridden.latency_ns(0, 1), with_model.latency_ns(0, 1));
        assert_eq!(LatencyMode::from_abi(mode.to_abi()), mode);
    }
    let without = parse(&two_nodes(""));
    assert_eq!(without.clone().with_latency_mode(LatencyMode::Off).unwrap().latency, None);
    assert_eq!(
        without.with_latency_mode(LatencyMode::Account).unwrap_err().to_string(),
        "latency mode account needs the cost of remote accesses, and topology t has no [latency] table: \
         add one (e.g. `[latency]` with `local_ns = 100`), or use latency mode off"
    );
}

#[test]
fn latency_given_explicitly() {
    let topology =
        parse(&two_nodes("[latency]\nlocal_ns = 90\nmatrix_ns = [[90, 140], [150, 90]]\nmode = \"exact\"\n"));
    assert_eq!(topology.latency_ns(0, 1), Some(140));
    assert_eq!(topology.latency_ns(1, 0), Some(150));
    assert_eq!(topology.latency_mode(), LatencyMode::Exact);
    assert_eq!(
        error(&two_nodes("[latency]\nlocal_ns = 90\nmatrix_ns = [[90, 0], [150, 90]]\n")),
        "t.toml:12:19: latency.matrix_ns[0][1]: 0 ns is invalid: a remote access costs at \
         least 1 ns (0 is only for unreachable pairs)"
    );
    assert_eq!(
        error(&two_nodes("[latency]\nlocal_ns = 90\nmatrix_ns = [[90, 4294967296], [1, 90]]\n")),
        "t.toml:12:19: latency.matrix_ns[0][1]: 4294967296 ns does not fit in u32 \
         nanoseconds (at most 4294967295)"
    );
}

#[test]
fn latency_overflow() {
    // The largest local_ns and distance still fit in u64; the product does not fit in u32.
    assert_eq!(
        error(&two_nodes("[distances]\nmatrix = [[10, 254], [254, 10]]\n[latency]\nlocal_ns = 4294967295\n")),
        "t.toml:13:12: latency.local_ns: 4294967295 ns makes an access from node 0 to node 1 \
         (distance 254) cost 109092169293 ns, which does not fit in u32 nanoseconds (at most \
         4294967295): lower local_ns, or give every cost in latency.matrix_ns"
    );
    assert_eq!(
        error(&two_nodes("[latency]\nlocal_ns = 4294967296\n")),
        "t.toml:11:12: latency.local_ns: 4294967296 ns does not fit in u32 nanoseconds (at \
         most 4294967295)"
    );
    // Just fits: 429496729 * 100 / 10.
    let topology = parse(&two_nodes("[distances]\nmatrix = [[10, 100], [100, 10]]\n[latency]\nlocal_ns = 429496729\n"));
    assert_eq!(topology.latency_ns(0, 1), Some(4294967290));
}

#[test]
fn latency_modes() {
    for mode in LatencyMode::ALL {
        assert_eq!(mode.to_string().parse(), Ok(mode));
        let value = clap::ValueEnum::to_possible_value(&mode).expect("not skipped");
        assert_eq!(value.get_name(), mode.as_str());
    }
    assert_eq!(
        "Window".parse::<LatencyMode>().map_err(|error| error.to_string()),
        Err("\"Window\" is not a latency mode: use \"window\", \"exact\", \"account\" or \"off\"".into())
    );
    let off = parse(&two_nodes("[latency]\nlocal_ns = 100\nmode = \"off\"\n"));
    assert_eq!(off.latency_mode(), LatencyMode::Off);
    assert_eq!(off.latency_ns(0, 1), Some(200), "the model is kept, only not charged");
}

#[test]
fn nearest_node_with_memory() {
    // Node 1 has no memory: node 2 is nearer to it than node 0.
    let nearer = parse(&three_nodes("16M", "[distances]\nmatrix = [[10, 30, 20], [30, 10, 15], [20, 15, 10]]\n"));
    assert_eq!(nearer.nearest_node_with_memory(1), 2);
    assert_eq!(nearer.nearest_node_with_memory(0), 0);
    assert_eq!(nearer.nearest_node_with_memory(2), 2);
    // A tie goes to the lowest id.
    let tie = parse(&three_nodes("16M", ""));
    assert_eq!(tie.nearest_node_with_memory(1), 0);
    // Unreachable memory does not count.
    let unreachable = parse(&three_nodes("16M", "[distances]\nmatrix = [[10, 30, 20], [30, 10, 255], [20, 15, 10]]\n"));
    assert_eq!(unreachable.nearest_node_with_memory(1), 0);
    // An empty node falls back to the kernel's node.
    let empty = parse(&three_nodes("0", ""));
    assert_eq!(empty.nearest_node_with_memory(2), 0);
    assert_eq!(empty.nearest_node_with_memory(7), 0);
}

#[test]
fn numactl_hardware() {
    let topology = parse(&three_nodes(
        "32M",
        "[distances]\nmatrix = [[10, 21, 255], [21, 10, 31], [255, 31, 10]]\n\
         [latency]\nlocal_ns = 500\nmode = \"account\"\n",
    ));
    assert_eq!(
        topology.numactl_hardware(),
        "available: 3 nodes (0-2)\n\
         node 0 cpus: 0\n\
         node 0 size: 16 MB\n\
         node 1 cpus: 1\n\
         node 1 size: 0 MB\n\
         node 2 cpus:\n\
         node 2 size: 32 MB\n\
         node distances:\n\
         node   0   1   2\n\
         \x20 0:  10  21 255\n\
         \x20 1:  21  10  31\n\
         \x20 2: 255  31  10\n\
         \n\
         remote-access latency (ns), mode account:\n\
         node    0    1    2\n\
         \x20 0:  500 1050    -\n\
         \x20 1: 1050  500 1550\n\
         \x20 2:    - 1550  500\n"
    );
    let uma = parse("name = \"u\"\n[[node]]\nid = 0\ncpus = [0, 1]\nmemory = \"8M\"\n");
    assert_eq!(
        uma.numactl_hardware(),
        "available: 1 nodes (0)\n\
         node 0 cpus: 0 1\n\
         node 0 size: 8 MB\n\
         node distances:\n\
         node   0\n\
         \x20 0:  10\n"
    );
    assert_eq!(SizeInMb(512 << 10).to_string(), "512 kB");
    assert_eq!(SizeInMb((1 << 20) + 1).to_string(), "1 MB");
}

#[test]
fn builtin_topologies() {
    let builtin = |name| resolve(name).unwrap_or_else(|error| panic!("{error}"));

    let butterfly = builtin("butterfly");
    assert_eq!(butterfly.origin, "<built-in butterfly.toml>");
    assert_eq!((butterfly.node_count(), butterfly.cpu_count()), (24, 24));
    assert_eq!(butterfly.node_of_cpu(17), Some(17));
    assert_eq!(butterfly.distance(3, 20), 80);
    assert_eq!(butterfly.latency_ns(3, 20), Some(4000));
    assert_eq!(butterfly.latency_ns(5, 5), Some(500));
    assert_eq!(butterfly.latency_mode(), LatencyMode::Window);
    assert_eq!(butterfly.total_memory(), 24 * (16 << 20));

    let uma = builtin("uma");
    assert_eq!((uma.node_count(), uma.cpu_count()), (1, 4));
    assert_eq!(uma.total_memory(), 256 << 20);
    assert_eq!(uma.latency, None);

    let two_socket = builtin("two-socket");
    assert_eq!((two_socket.node_count(), two_socket.cpu_count()), (2, 8));
    assert_eq!(two_socket.distance(0, 1), 21);
    assert_eq!(two_socket.latency_ns(1, 0), Some(140));
    assert_eq!(two_socket.latency_ns(1, 1), Some(90));

    let ring = builtin("ring8");
    assert_eq!((ring.node_count(), ring.cpu_count()), (8, 8));
    assert_eq!(ring.distance(0, 4), 34);
    assert_eq!(ring.distance(1, 7), 22);
    assert_eq!(ring.latency_ns(6, 1), Some(280));

    let asymmetric = builtin("asymmetric");
    assert_eq!((asymmetric.node_count(), asymmetric.cpu_count()), (3, 4));
    assert_eq!(asymmetric.nodes[2].cpus, [] as [u32; 0]);
    assert_eq!((asymmetric.distance(0, 1), asymmetric.distance(1, 0)), (16, 22));
    assert_eq!((asymmetric.distance(2, 0), asymmetric.distance(2, 1)), (30, 40));
    assert_eq!(asymmetric.latency_ns(1, 2), Some(400));
    assert_eq!(asymmetric.latency_mode(), LatencyMode::Account);
    assert_eq!(asymmetric.nearest_node_with_memory(2), 2);
}

#[test]
fn resolve_by_name_file_or_not_at_all() {
    for name in ["uma", "uma.toml", "topologies/uma.toml"] {
        let topology = resolve(name).unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(topology.origin, "<built-in uma.toml>", "{name}");
    }
    assert_eq!(
        resolve("no-such-machine").map_err(|error| error.to_string()),
        Err("no-such-machine: no such file, and no shipped topology has this name; shipped \
             topologies: asymmetric, butterfly, ring8, two-socket, uma"
            .to_owned())
    );

    // A file wins over a shipped topology of the same name.
    let dir = std::env::temp_dir().join(format!("psyche-topology-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let path = dir.join("uma.toml");
    std::fs::write(&path, "name = \"mine\"\n[[node]]\nid = 0\ncpus = [0]\nmemory = \"8M\"\n").expect("write");
    let argument = path.to_str().expect("a UTF-8 path");
    let mine = resolve(argument);
    let missing = dir.join("missing.toml");
    let unreadable = Topology::load(&missing).map(|_| ()).map_err(|error| error.to_string());
    let _ = std::fs::remove_dir_all(&dir);

    let mine = mine.unwrap_or_else(|error| panic!("{error}"));
    assert_eq!((mine.name.as_str(), mine.origin.as_str()), ("mine", argument));
    assert_eq!(
        unreadable,
        Err(format!("{}: cannot read the topology file: No such file or directory (os error 2)", missing.display()))
    );
}

#[test]
fn schema_errors_name_their_field() {
    assert_eq!(
        error(&two_nodes("[[distances.pair]]\nsrc = 0\ndst = 1\nval = 21\nvalue = 3\n")),
        "t.toml:14:1: distances.pair[0].value: unknown key `value`, expected one of `src`, \
         `dst`, `val`"
    );
    assert_eq!(
        error("name = \"t\"\nnode = [{ id = 0, cpus = [0, \"1\"], memory = \"8M\" }]\n"),
        "t.toml:2:30: node[0].cpus[1]: invalid type: string \"1\", expected a whole number"
    );
    assert_eq!(
        error("name = \"t\"\nnode = [{ id = 0, cpus = [0], memory = true }]\n"),
        "t.toml:2:40: node[0].memory: invalid type: boolean `true`, expected a size like \
         \"64M\" or a number of bytes"
    );
    assert_eq!(
        error(&two_nodes("[distances]\nmatrix = [[10, 21.5], [21, 10]]\n")),
        "t.toml:11:16: distances.matrix[0][1]: invalid type: floating point `21.5`, expected a \
         whole number"
    );
    assert_eq!(
        error(&two_nodes("[latency]\nlocal_ns = 1\n[latency.extra]\nx = 1\n")),
        "t.toml:12:10: latency.extra: unknown key `extra`, expected one of `local_ns`, \
         `matrix_ns`, `mode`"
    );
    assert_eq!(error(""), "t.toml: name: missing: give the machine a name, like name = \"two-socket\"");
}

#[test]
fn no_input_panics() {
    // Every prefix, and one-character edits everywhere, of real files: errors, never a panic.
    let edits = ["", "-1", "\"", "[", ".", "\n", "é", "99999999999999999999"];
    // (Not the butterfly: its 24 x 24 matrix makes this slow without testing anything new.)
    for (name, text) in BUILTIN.iter().filter(|(name, _)| *name != "butterfly.toml") {
        for (at, _) in text.char_indices() {
            let _ = Topology::parse(&text[..at], "prefix");
            if *name != "two-socket.toml" {
                continue;
            }
            let rest = text[at..].chars().skip(1).collect::<String>();
            for edit in edits {
                let _ = Topology::parse(&format!("{}{edit}{rest}", &text[..at]), "edit");
            }
        }
    }
}

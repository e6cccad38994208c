//! Topology files against the topology reader: every shipped topology loads, and every file in
//! `tests/malformed-topologies/` fails with exactly the message its first line expects:
//!
//! ```toml
//! # expect: tests/malformed-topologies/duplicate-id.toml:9:6: node[1].id: ...
//! ```
//!
//! Paths are relative to the crate directory (where cargo runs integration tests), so that
//! the file names in the messages do not depend on where the checkout is.

use std::path::{Path, PathBuf};

use psyche_vmm::topology::{Topology, BUILTIN};

const MALFORMED: &str = "tests/malformed-topologies";
const SHIPPED: &str = "../topologies";

/// The `.toml` files in `dir` (relative to the crate directory), sorted by name.
fn toml_files(dir: &str) -> Vec<PathBuf> {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).expect("enter the crate directory");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("{dir}: {error}"))
        .map(|entry| entry.expect("read a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn malformed_topologies_fail_with_the_expected_message() {
    let files = toml_files(MALFORMED);
    assert!(files.len() >= 10, "{MALFORMED}: only {} files; the error messages deserve more", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("read the file");
        let Some(expected) = text.lines().next().and_then(|line| line.strip_prefix("# expect: ")) else {
            failures.push(format!("{}: first line is not `# expect: <message>`", path.display()));
            continue;
        };
        match Topology::load(path) {
            Ok(topology) => failures.push(format!("{}: loaded without error as {:?}", path.display(), topology.name)),
            Err(error) if error.to_string() == expected => {}
            Err(error) => failures.push(format!("{}:\n  expected: {expected}\n  got:      {error}", path.display())),
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn shipped_topologies_load() {
    let files = toml_files(SHIPPED);
    assert!(!files.is_empty(), "{SHIPPED}: no topologies");
    for path in &files {
        if let Err(error) = Topology::load(path) {
            panic!("{error}");
        }
    }
}

#[test]
fn every_shipped_topology_is_built_in() {
    let files = toml_files(SHIPPED);
    let names: Vec<&str> = files.iter().filter_map(|path| path.file_name()?.to_str()).collect();
    let builtin: Vec<&str> = BUILTIN.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, builtin, "BUILTIN must list every file in {SHIPPED}, sorted");
    for (name, text) in BUILTIN {
        let on_disk = std::fs::read_to_string(Path::new(SHIPPED).join(name)).expect("read");
        assert_eq!(*text, on_disk, "{name}: the embedded copy is stale");
    }
}

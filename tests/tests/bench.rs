//! The benchmark produces every path, measured in the guest, with kernel-instruction counts
//! from single-stepping. (Speed targets are checked by reading its output, not here.)

use psyche_vmm::bench;
use psyche_vmm::topology;

#[test]
fn every_path_is_measured_and_only_kernel_paths_run_kernel_instructions() {
    psyche_tests::require_kvm();
    let topology = topology::resolve("two-socket").unwrap();
    let results = bench::run(&topology, true).unwrap_or_else(|e| panic!("{e}"));
    let paths: Vec<&str> = results.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        ["procedure_call", "inline_access", "optimized_invocation", "null_kernel_gate", "optimized_first_touch"]
    );
    for result in &results {
        assert!(result.n > 0 && result.cycles_median > 0.0 && result.cycles_p99 >= result.cycles_median, "{result:?}");
        assert!(result.ns_median > 0.0, "{result:?}");
    }
    let instructions =
        |path: &str| results.iter().find(|r| r.path == path).and_then(|r| r.kernel_instructions).unwrap();
    // An optimized invocation is a procedure call: no kernel at all.
    assert_eq!(instructions("procedure_call"), 0.0);
    assert_eq!(instructions("inline_access"), 0.0);
    assert_eq!(instructions("optimized_invocation"), 0.0);
    // The null gate returns from its entry stub; a first touch runs the whole open path.
    assert!((1.0..=10.0).contains(&instructions("null_kernel_gate")), "{}", instructions("null_kernel_gate"));
    assert!(instructions("optimized_first_touch") > 50.0);
    let table = bench::table(&results);
    assert!(table.contains("optimized_invocation / procedure_call"), "{table}");
}

//! The hostile-program suite: attack programs run beside victim programs, each test judged by
//! what the victim reports (its secret intact, its state as it left it, that it finished) and
//! by the kernel's verdict on the attacker. One module per class of attack.

mod console;
mod contained;
mod cpl0;
mod fpu;
mod names;
mod quotas;
mod rules;
mod starvation;

use std::path::PathBuf;

use psyche_tests::Run;

/// A machine with one vCPU, so that every program loaded time-slices with the others: the
/// attacker and the victim share the processor. Written once per test process.
pub fn uniprocessor() -> String {
    let path: PathBuf = std::env::temp_dir().join(format!("psyche-hostile-uniprocessor-{}.toml", std::process::id()));
    if !path.exists() {
        std::fs::write(&path, "name = \"uniprocessor\"\n[[node]]\nid = 0\ncpus = [0]\nmemory = \"64M\"\n")
            .expect("the temporary directory is writable");
    }
    path.display().to_string()
}

/// Both sides of a `squatter` scenario passed every check, and the guest shut down normally.
pub fn both_passed(run: &Run, scenario: &str) {
    run.expect_exit(0);
    for side in ["victim", "squatter"] {
        assert!(run.printed(&format!("{side}: {scenario}: passed")), "{side} did not pass:\n{}", run.console.text());
    }
}

/// `side` printed check `what` as passed.
pub fn saw(run: &Run, side: &str, what: &str) {
    let found = run
        .lines()
        .iter()
        .any(|(_, line)| line.starts_with(&format!("{side}: check ")) && line.ends_with(&format!(": ok ({what})")));
    assert!(found, "{side} did not report '{what}':\n{}", run.console.text());
}

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

//! Building the example plugins for tests: every crate under `plugins/`,
//! for wasm32-wasip2, once per test process. The gateway's end-to-end tests
//! and the bench crate's smoke test both include this file, so it uses
//! nothing but the standard library.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root: the parent of the crate that includes this file.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("a workspace member has a parent")
        .to_owned()
}

/// Path of a compiled example plugin (`event-log`, `fault-spin`, …),
/// building them all on first use. A failed build fails the test loudly.
pub fn plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // A target directory of its own, so this nested cargo never waits
        // on the lock of the cargo that runs the tests.
        let target = workspace().join("target").join("e2e-plugins");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(workspace())
            .args([
                "build",
                "--quiet",
                "--profile",
                "plugin",
                "--target",
                "wasm32-wasip2",
            ])
            .arg("--target-dir")
            .arg(&target);
        // Every crate under plugins/, by its package name.
        for manifest in std::fs::read_dir(workspace().join("plugins"))
            .expect("plugins/ exists")
            .filter_map(Result::ok)
            .map(|e| e.path().join("Cargo.toml"))
            .filter(|m| m.exists())
        {
            let text = std::fs::read_to_string(&manifest).expect("read plugin manifest");
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("name = \""))
                .and_then(|l| l.strip_suffix('"'))
                .unwrap_or_else(|| panic!("no package name in {}", manifest.display()));
            cmd.args(["-p", name]);
        }
        let status = cmd.status().expect("cargo runs");
        assert!(
            status.success(),
            "building the example plugins for wasm32-wasip2 failed ({status}); \
             is the target installed? (`rustup target add wasm32-wasip2`)"
        );
        target.join("wasm32-wasip2").join("plugin")
    });
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

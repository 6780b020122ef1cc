//! Export the WIT package the gateway accepts (`watchgate:plugin@X.Y.Z`, read
//! from `plugin-sdk/wit/plugin.wit`) as `WATCHGATE_WIT_PACKAGE`, so
//! `watchgate --version` names it without a second copy of the version.

use std::path::Path;

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let wit = Path::new(&manifest_dir).join("../plugin-sdk/wit/plugin.wit");
    println!("cargo:rerun-if-changed={}", wit.display());
    let text = std::fs::read_to_string(&wit)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", wit.display()));
    let package = wit_package(&text)
        .unwrap_or_else(|| panic!("no `package NAME;` line in {}", wit.display()));
    println!("cargo:rustc-env=WATCHGATE_WIT_PACKAGE={package}");
}

/// The name in the first `package NAME;` line, e.g. `watchgate:plugin@0.1.0`.
fn wit_package(text: &str) -> Option<&str> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("package")?;
        // `package` must be a whole word: not `packages` or `package-foo`.
        if !rest.starts_with(char::is_whitespace) {
            return None;
        }
        let name = rest.trim().strip_suffix(';')?.trim();
        (!name.is_empty() && !name.contains(char::is_whitespace)).then_some(name)
    })
}

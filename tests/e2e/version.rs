//! `watchgate --version` names the crate version and the plugin WIT package
//! the gateway accepts, as declared in `plugin-sdk/wit/plugin.wit`.

use std::process::Command;

use crate::support::workspace;

#[test]
fn version_names_crate_version_and_wit_package() {
    let wit_path = workspace().join("plugin-sdk/wit/plugin.wit");
    let wit = std::fs::read_to_string(&wit_path).expect("read plugin.wit");
    // Read independently of gateway/build.rs: the first `package NAME;` line.
    let package = wit
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("package ")?.strip_suffix(';'))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no `package NAME;` line in {}", wit_path.display()));
    assert!(package.starts_with("watchgate:plugin@"), "{package}");

    let out = Command::new(env!("CARGO_BIN_EXE_watchgate"))
        .arg("--version")
        .output()
        .expect("run watchgate --version");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim_end(),
        format!(
            "watchgate {} (plugin world {package})",
            env!("CARGO_PKG_VERSION")
        ),
    );
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
    assert!(stdout.contains(package), "{stdout}");
}

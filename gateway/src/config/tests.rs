//! Tests of the gateway config file and the sidecar: defaults, path
//! resolution, and errors naming the file, line and key.

use std::path::{Path, PathBuf};

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/wg/watchgate.toml"), text)
}

#[test]
fn resolves_relative_paths_against_the_config_file() {
    let c = parse(
        "[plugins]\ndir = \"p\"\n[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"watched\"\n",
    )
    .unwrap();
    assert_eq!(c.plugins.dir, PathBuf::from("/etc/wg/p"));
    let SourceConfig::File(f) = &c.sources[0].spec else {
        panic!("not a file source")
    };
    assert_eq!(f.path, PathBuf::from("/etc/wg/watched"));
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9464");
}

#[test]
fn runtime_defaults_written_before_the_files_quota_still_parse() {
    let c = parse(
        "[runtime]\ndefaults = { fuel = 5, timeout_ms = 100, memory_mb = 16 }\n[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"w\"\n",
    )
    .unwrap();
    assert_eq!(c.runtime.defaults.files_mb, 64);
    assert_eq!(c.runtime.defaults.files_count, 1000);
    let err = parse(
        "[runtime]\ndefaults = { fuel = 5, timeout_ms = 100, memory_mb = 16, files_mb = 0 }\n[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"w\"\n",
    )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("runtime.defaults.files_mb must be at least 1"),
        "{err}"
    );
}

#[test]
fn unknown_top_level_key_names_file_key_and_line() {
    let err = parse("[admin]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("/etc/wg/watchgate.toml:3:"), "{err}");
    assert!(err.contains("lisen"), "{err}");
}

#[test]
fn unknown_source_key_names_the_source_and_line() {
    let err =
        parse("[admin]\n\n[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"w\"\npth = 1\n")
            .unwrap_err()
            .to_string();
    assert!(err.contains("watchgate.toml:7:1:"), "{err}");
    assert!(err.contains("source[0]") && err.contains("pth"), "{err}");
}

#[test]
fn rejects_unknown_kind_and_duplicate_names() {
    let err = parse("[[source]]\nname = \"a\"\nkind = \"redis\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown source kind \"redis\""), "{err}");
    let err = parse(
        "[[source]]\nname = \"a\"\nkind = \"file\"\npath = \"x\"\n[[source]]\nname = \"a\"\nkind = \"file\"\npath = \"y\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(":5:") && err.contains("duplicate source name"),
        "{err}"
    );
}

#[test]
fn sidecar_checks_sources_and_limits() {
    let c = parse("[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"w\"\n").unwrap();
    let p = Path::new("/srv/plugins/x.toml");
    let ok = Sidecar::parse(
        p,
        "[[subscribe]]\nsource = \"local\"\nprefix = \"a/\"\n[limits]\nfuel = 5\n[grants]\nfiles = \"../out\"\n",
        &c,
    )
    .unwrap();
    assert_eq!(ok.grants.files, Some(PathBuf::from("/srv/out")));
    assert_eq!(ok.limits.fuel, Some(5));
    let err = Sidecar::parse(p, "[[subscribe]]\nsource = \"nope\"\n", &c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no source named \"nope\""), "{err}");
    let err = Sidecar::parse(p, "[limits]\nmemory_mb = 100000\n", &c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("limits.memory_mb"), "{err}");
    let quota = Sidecar::parse(p, "[limits]\nfiles_mb = 5\nfiles_count = 7\n", &c).unwrap();
    let limits = c.runtime.defaults.merged(quota.limits);
    assert_eq!((limits.files_mb, limits.files_count), (5, 7));
    assert_eq!(limits.memory_mb, c.runtime.defaults.memory_mb);
    for zero in ["files_mb", "files_count"] {
        let err = Sidecar::parse(p, &format!("[limits]\n{zero} = 0\n"), &c)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("limits.{zero} must be at least 1")),
            "{err}"
        );
    }
    let err = Sidecar::parse(p, "[grants]\nnetwork = true\n", &c)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("x.toml:2:") && err.contains("network"),
        "{err}"
    );
    let err = Sidecar::parse(p, "[grants]\nhttp = [\"hooks.example.com\"]\n", &c)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("grants.http[0]") && err.contains("port"),
        "{err}"
    );
    let err = Sidecar::parse(
        p,
        "[grants]\nkv = [{ source = \"nope\", prefix = \"/a/\" }]\n",
        &c,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("grants.kv[0].source"), "{err}");
}

#[test]
fn compile_limits_have_defaults_and_must_be_positive() {
    let c = parse("").unwrap();
    assert_eq!(c.runtime.max_plugin_bytes, 32 << 20);
    assert_eq!(c.runtime.max_plugin_functions, 50_000);
    assert_eq!(c.runtime.max_function_bytes, 512 << 10);
    assert_eq!(
        c.runtime.compile_timeout,
        std::time::Duration::from_secs(300)
    );
    assert_eq!(c.runtime.compile_concurrency, 2);
    assert_eq!(
        c.plugins.compile_ready_wait,
        std::time::Duration::from_secs(5)
    );
    let c = parse("[runtime]\ncompile_timeout = \"1500ms\"\nmax_plugin_functions = 7\n").unwrap();
    assert_eq!(
        c.runtime.compile_timeout,
        std::time::Duration::from_millis(1500)
    );
    assert_eq!(c.runtime.max_plugin_functions, 7);
    let err = parse("[runtime]\ncompile_concurrency = 0\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("runtime.compile_concurrency"), "{err}");
    let err = parse("[runtime]\ncompile_timeout = \"0s\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("runtime.compile_timeout"), "{err}");
}

#[test]
fn dead_letter_caps_default_and_are_overridden_per_plugin() {
    let c = parse("[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"w\"\n").unwrap();
    assert_eq!(
        c.plugins.dead_letters,
        DeadLetterCap {
            count: 1000,
            bytes: 16 << 20
        }
    );
    let c = parse("[plugins]\nmax_dead_letters = 50\nmax_dead_letter_bytes = 65536\n").unwrap();
    let p = Path::new("/srv/plugins/x.toml");
    let default = Sidecar::parse(p, "", &c).unwrap();
    assert_eq!(
        default.dead_letters(&c),
        DeadLetterCap {
            count: 50,
            bytes: 65536
        }
    );
    let own = Sidecar::parse(p, "max_dead_letters = 7\n", &c).unwrap();
    assert_eq!(
        own.dead_letters(&c),
        DeadLetterCap {
            count: 7,
            bytes: 65536
        }
    );
}

#[test]
fn reveal_values_is_off_by_default_and_only_on_loopback() {
    assert!(!parse("").unwrap().admin.reveal_values);
    let on = parse("[admin]\nlisten = \"127.0.0.1:0\"\nreveal_values = true\n").unwrap();
    assert!(on.admin.reveal_values);
    let err = parse("[admin]\nlisten = \"0.0.0.0:9464\"\nreveal_values = true\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin.reveal_values") && err.contains("loopback"),
        "{err}"
    );
    let err = parse("[admin]\nreveal_values = \"yes\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("watchgate.toml:2:") && err.contains("boolean"),
        "{err}"
    );
}

//! `watchgate-bench --quick` still works: every case runs and reports.
//!
//! This is the smoke mode only: it checks the suite runs end to end and
//! writes a well-formed report, never how fast anything is (benchmarks are
//! measured with a release build of `watchgate-bench`, not in tests).
//!
//! The process and etcd cases run the `watchgate` binary that cargo built
//! next to `watchgate-bench`. `cargo test --workspace` and `cargo nextest
//! run --workspace` build it in the same run (the gateway's end-to-end
//! tests need it); with `-p watchgate-bench` alone, build it first
//! (`cargo build -p watchgate`).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

// The gateway's end-to-end tests build the plugins the same way, into the
// same directory, so they are built once for both.
#[path = "../../tests/e2e/plugins.rs"]
mod plugins;

use plugins::plugin;

/// The plugins the cases load.
const PLUGINS: [&str; 6] = [
    "noop",
    "fault-by-key",
    "fault-panic",
    "fault-spin",
    "fault-slow",
    "bench-probe",
];

#[test]
fn the_quick_benchmark_runs_every_case_and_writes_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for p in PLUGINS {
        std::fs::copy(plugin(p), plugins.join(format!("{p}.wasm"))).unwrap();
    }
    let bench = Path::new(env!("CARGO_BIN_EXE_watchgate-bench"));
    let gateway = bench.with_file_name(format!("watchgate{}", std::env::consts::EXE_SUFFIX));
    assert!(
        gateway.is_file(),
        "{} is missing: build it first (`cargo build -p watchgate`)",
        gateway.display()
    );
    let out = Command::new(bench)
        .arg("--quick")
        .arg("--plugins")
        .arg(&plugins)
        .arg("--gateway")
        .arg(&gateway)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stderr}");

    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("bench/results.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["quick"], true);
    let cases = report["cases"].as_array().unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c["case"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "dispatch",
            "trap_recovery",
            "fanout",
            "isolation",
            "memory",
            "hot_reload",
            "cold_start",
            "e2e_latency",
            "scale_sync",
            "scale_churn",
            "scale_files"
        ]
    );
    for c in cases {
        let figures = c["figures"].as_object().unwrap();
        assert!(!figures.is_empty(), "{c:#}");
        for (name, f) in figures {
            let runs = f["runs"].as_array().unwrap();
            assert!(!runs.is_empty(), "{name}: no runs");
            assert!(
                runs.iter()
                    .all(|v| v.as_f64().is_some_and(|v| v.is_finite() && v >= 0.0)),
                "{name}: {f}"
            );
        }
    }
    let dispatch = &cases[0];
    assert!(dispatch["ratio_to_floor"].as_f64().unwrap() > 0.0);
    assert!(
        dispatch["figures"]["floor_bare_wasmtime_events_per_s"]["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // Every change of the churn case arrived.
    assert_eq!(cases[9]["met"], true, "{:#}", cases[9]);
    let md = std::fs::read_to_string(dir.path().join("BENCHMARKS.md")).unwrap();
    assert!(
        md.contains("| dispatch | floor_bare_wasmtime_events_per_s |"),
        "{md}"
    );
    assert!(
        md.contains("quick (smoke sizes: not a measurement)"),
        "{md}"
    );
}

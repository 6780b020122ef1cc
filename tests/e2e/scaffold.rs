//! `watchgate plugin new`: in every language, the new plugin builds with the
//! command `plugin new` prints and passes `plugin test` on its own sample
//! events. The real toolchains run: cargo, componentize-py (installed into
//! the repository's `.tools/py` on first use), node with the JavaScript
//! SDK's tools (`npm ci` on first use) and Go. A missing one fails the test.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{wait_for, watchgate, workspace};

/// A build's bound. Python and JavaScript builds take 20-40 s on an idle
/// 2-core machine, Rust's first one about a minute (the SDK's
/// dependencies); a machine busy with other builds takes several times
/// that.
const BUILD_DEADLINE: Duration = Duration::from_secs(900);

/// The log lines the scaffold's handler writes for its `events.jsonl`.
const LOGGED: [&str; 3] = [
    "put main app/port = 8080",
    "put main app/port = 8081",
    "delete main app/port = <deleted or binary>",
];

/// The build command `plugin new` printed: the line after `cd DIR` under
/// "next:".
fn printed_build_command(out: &str) -> String {
    let mut next = out
        .lines()
        .skip_while(|l| l.trim() != "next:")
        .skip(1)
        .map(str::trim);
    let cd = next.next().unwrap_or_default();
    assert!(cd.starts_with("cd "), "no `cd` under next: in\n{out}");
    next.next()
        .unwrap_or_else(|| panic!("no build command under next: in\n{out}"))
        .to_owned()
}

/// Run `command` with `sh` in `dir` within [`BUILD_DEADLINE`]; its output
/// goes to files beside `dir`, shown when it fails.
fn build(lang: &str, dir: &Path, command: &str) -> Duration {
    let log_path = dir.with_extension("build.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let started = Instant::now();
    let mut child = Command::new("sh")
        .args(["-c", command])
        .current_dir(dir)
        // The Rust scaffold's dependencies are built once for every test
        // run, in a target directory no other cargo holds locked.
        .env(
            "CARGO_TARGET_DIR",
            workspace().join("target").join("e2e-scaffold"),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        // Its own process group, so a build past its deadline is stopped
        // with everything it started.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("{lang}: cannot run sh -c {command:?}: {e}"));
    let deadline = started + BUILD_DEADLINE;
    let status = wait_for(
        &format!("{lang}: `{command}`"),
        BUILD_DEADLINE + Duration::from_secs(5),
        || {
            if Instant::now() > deadline {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
                let _ = child.wait();
                panic!(
                    "{lang}: `{command}` did not finish within {BUILD_DEADLINE:?}:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            child.try_wait().unwrap()
        },
    );
    assert!(
        status.success(),
        "{lang}: `{command}` failed ({status}) in {}; is the {lang} toolchain installed?\n{}",
        dir.display(),
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    started.elapsed()
}

/// `plugin new`, the printed build, then `plugin test` on the sample
/// events, for one language.
fn scaffold_builds_and_passes(lang: &str, root: &Path, config: &Path) {
    let name = format!("my-{lang}-plugin");
    let dir = root.join(&name);
    let (code, out, err) = watchgate(&[
        "plugin",
        "new",
        &name,
        "--lang",
        lang,
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{lang}: {out}{err}");
    for file in [
        "build.sh",
        "README.md",
        "sidecar.example.toml",
        "events.jsonl",
        ".gitignore",
    ] {
        assert!(dir.join(file).is_file(), "{lang}: no {file}");
    }
    let command = printed_build_command(&out);
    let took = build(lang, &dir, &command);
    eprintln!("{lang}: `{command}` took {took:.1?}");
    let wasm = format!("{name}.wasm");
    assert!(
        dir.join(&wasm).is_file(),
        "{lang}: the build wrote no {wasm}"
    );
    assert!(
        out.contains(&format!(
            "watchgate plugin test {wasm} --events events.jsonl"
        )),
        "{out}"
    );

    // As printed, run in the plugin's directory; the config only gives the
    // compile of a 12-19 MB Python or JavaScript component more than the
    // default 60 s on a busy machine.
    let result = Command::new(env!("CARGO_BIN_EXE_watchgate"))
        .args(["plugin", "test", &wasm, "--events", "events.jsonl"])
        .arg("--config")
        .arg(config)
        .current_dir(&dir)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&result.stdout);
    let err = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(0), "{lang}: {out}{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["manifest"]["name"], name.as_str(), "{lang}: {out}");
    assert_eq!(lines[0]["manifest"]["version"], "0.1.0", "{lang}: {out}");
    assert_eq!(
        lines[0]["capabilities"]["requested"],
        serde_json::json!([]),
        "{lang}: {out}"
    );
    let outcomes: Vec<(&str, &str, &str)> = lines
        .iter()
        .filter(|l| l.get("outcome").is_some())
        .map(|l| {
            (
                l["kind"].as_str().unwrap(),
                l["key"].as_str().unwrap(),
                l["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("put", "app/port", "ok"),
            ("put", "app/port", "ok"),
            ("delete", "app/port", "ok")
        ],
        "{lang}: {out}"
    );
    let logged: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["log"]["message"].as_str())
        .collect();
    assert_eq!(logged, LOGGED, "{lang}: {out}");
}

#[test]
fn plugin_new_in_every_language_builds_with_its_printed_command_and_passes_plugin_test() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("slow-compile.toml");
    std::fs::write(&config, "[runtime]\ncompile_timeout = \"600s\"\n").unwrap();
    // In sequence: each build takes most of the machine.
    for lang in ["rust", "python", "js", "go"] {
        scaffold_builds_and_passes(lang, root.path(), &config);
    }
}

#[test]
fn plugin_new_refuses_a_bad_name_a_used_directory_an_unknown_language_and_a_wrong_sdk() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("p");
    let dir = dir.to_str().unwrap();

    let (code, _, err) = watchgate(&["plugin", "new", "../x", "--dir", dir]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not a plugin name"), "{err}");

    let (code, _, err) = watchgate(&["plugin", "new", "p", "--lang", "cobol", "--dir", dir]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid value 'cobol'")
            && err.contains("[possible values: rust, python, js, go]"),
        "{err}"
    );

    // A directory that is no watchgate plugin-sdk is named, with what its
    // language's build would miss.
    let elsewhere = root.path().join("not-an-sdk");
    std::fs::create_dir(&elsewhere).unwrap();
    let (code, _, err) = watchgate(&[
        "plugin",
        "new",
        "p",
        "--lang",
        "go",
        "--dir",
        dir,
        "--sdk",
        elsewhere.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("not-an-sdk") && err.contains("go/go.mod") && err.contains("--sdk"),
        "{err}"
    );
    assert!(!Path::new(dir).exists(), "a refused plugin new wrote files");

    let (code, out, err) = watchgate(&["plugin", "new", "p", "--lang", "python", "--dir", dir]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = watchgate(&["plugin", "new", "p", "--dir", dir]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("already exists"), "{err}");
}

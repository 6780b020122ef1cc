//! The `commands` capability with real processes: `capability-probe` runs,
//! triggers and signals what its sidecar grants; the commands are shell
//! scripts the test writes into its temporary directory (`/bin/sh` as the
//! granted program, the script as its argument: the operator's choice).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::support::{Gateway, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

/// Write an executable-by-sh script `name` into the gateway's directory.
fn script(g: &Gateway, name: &str, body: &str) -> PathBuf {
    let path = g.path(name);
    std::fs::write(&path, format!("{body}\n")).unwrap();
    path
}

/// A `capability-probe` installed as `probe` with these `[grants]` lines
/// (the files grant is `out/probe`).
fn install_probe(g: &Gateway, grants: &str) {
    std::fs::create_dir_all(g.path("cwd")).unwrap();
    g.install(
        "probe",
        "capability-probe",
        &format!(
            "retry_attempts = 1\n[limits]\ntimeout_ms = 10000\n[grants]\nfiles = \"../out/probe\"\n{grants}\n"
        ),
    );
}

/// Hand the probe one operation (a file in `watched/`).
fn send(g: &Gateway, key: &str, op: &Value) {
    std::fs::write(g.path(&format!("watched/{key}")), op.to_string()).unwrap();
}

/// The probe's log lines that start with `prefix`.
fn probe_lines(g: &Gateway, prefix: &str) -> Vec<String> {
    g.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["plugin"] == "probe")
        .filter_map(|v| v["fields"]["message"].as_str().map(str::to_owned))
        .filter(|m| m.starts_with(prefix))
        .collect()
}

/// Wait for the probe's first log line starting with `prefix`.
fn wait_line(g: &Gateway, prefix: &str) -> String {
    wait_for(&format!("a probe line {prefix:?}"), DEADLINE, || {
        probe_lines(g, prefix).into_iter().next()
    })
}

fn commands_count(g: &Gateway, outcome: &str) -> f64 {
    g.metric(&format!(
        "watchgate_capability_calls_total{{plugin=\"probe\",capability=\"commands\",outcome=\"{outcome}\"}}"
    ))
}

/// Whether process `pid` is gone (or a zombie about to be).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
fn a_run_gets_exit_code_tails_its_file_an_empty_env_and_the_fixed_dir() {
    let mut g = Gateway::new();
    let show = script(
        &g,
        "show.sh",
        "echo \"file=$1\"\necho \"pwd=$(pwd)\"\necho oops >&2\nexit 7",
    );
    let cwd = g.path("cwd");
    install_probe(
        &g,
        &format!(
            "commands = {{ show = [\"/bin/sh\", \"{}\", \"{{file}}\"], env = [\"/usr/bin/env\"] }}\ncommand_env = {{ GREETING = \"hi\" }}\ncommand_dir = \"{}\"\n",
            show.display(),
            cwd.display()
        ),
    );
    g.start();
    send(
        &g,
        "a",
        &serde_json::json!({"op": "run", "name": "show", "file": "conf/app.conf"}),
    );
    let line = wait_line(&g, "probe run ");
    let root = g.path("out/probe").canonicalize().unwrap();
    let cwd = cwd.canonicalize().unwrap();
    assert!(
        line.starts_with("probe run ok exit=7 timed_out=false"),
        "{line}"
    );
    for want in [
        format!("file={}", root.join("conf/app.conf").display()),
        format!("pwd={}", cwd.display()),
        "stderr=\"oops\\n\"".to_owned(),
    ] {
        assert!(line.contains(&want), "{want} not in {line}");
    }
    // The run is counted, as a failure (exit 7), and logged with its tails.
    wait_for("the run counted", DEADLINE, || {
        (g.metric("watchgate_plugin_command_failures_total{plugin=\"probe\",command=\"show\"}")
            == 1.0)
            .then_some(())
    });
    assert_eq!(
        g.metric("watchgate_plugin_command_runs_total{plugin=\"probe\",command=\"show\"}"),
        1.0
    );
    wait_line(&g, "command `show` exited with 7");
    wait_line(&g, "command `show` stderr: oops");
    // The environment is the operator's list and nothing else.
    send(&g, "e", &serde_json::json!({"op": "run", "name": "env"}));
    let line = wait_line(&g, "probe run ok exit=0");
    assert!(
        line.ends_with("stdout=\"GREETING=hi\\n\" stderr=\"\""),
        "{line}"
    );

    // A path out of the grant is refused before anything runs, and so is
    // a command that was not granted: errors, never traps.
    send(
        &g,
        "b",
        &serde_json::json!({"op": "run", "name": "show", "file": "../../etc/passwd"}),
    );
    let refused = wait_line(&g, "probe run err command `show`");
    assert!(refused.contains("`..` is not allowed"), "{refused}");
    send(&g, "c", &serde_json::json!({"op": "trigger", "name": "rm"}));
    let refused = wait_line(&g, "probe trigger err");
    assert!(
        refused.contains("\"rm\" is not granted")
            && refused.contains("granted: [\"env\", \"show\"]"),
        "{refused}"
    );
    send(
        &g,
        "d",
        &serde_json::json!({"op": "signal", "name": "nginx"}),
    );
    wait_line(&g, "probe signal err");
    wait_for("the refusals counted", DEADLINE, || {
        (commands_count(&g, "denied") == 3.0).then_some(())
    });
    assert_eq!(
        g.metric("watchgate_plugin_command_runs_total{plugin=\"probe\",command=\"show\"}"),
        1.0
    );
    assert_eq!(
        g.metric("watchgate_plugin_invocations_total{plugin=\"probe\",outcome=\"trap\"}"),
        0.0
    );
    g.stop_within(Duration::from_secs(15));
}

#[test]
fn triggers_while_a_command_runs_fold_into_one_more_run() {
    let mut g = Gateway::new();
    let runs = g.path("runs");
    let release = g.path("release");
    let slow = script(
        &g,
        "slow.sh",
        &format!(
            "echo run >> {}\nwhile [ ! -e {} ]; do /bin/sleep 0.02; done",
            runs.display(),
            release.display()
        ),
    );
    install_probe(
        &g,
        &format!(
            "commands = {{ slow = [\"/bin/sh\", \"{}\"] }}\n",
            slow.display()
        ),
    );
    g.start();
    for i in 0..20 {
        send(
            &g,
            &format!("t{i:02}"),
            &serde_json::json!({"op": "trigger", "name": "slow"}),
        );
    }
    wait_for("20 triggers handled", DEADLINE, || {
        (commands_count(&g, "ok") + commands_count(&g, "coalesced") == 20.0).then_some(())
    });
    assert_eq!(commands_count(&g, "ok"), 1.0, "one trigger started it");
    assert_eq!(commands_count(&g, "coalesced"), 19.0);
    std::fs::write(&release, "").unwrap();
    let runs_metric = "watchgate_plugin_command_runs_total{plugin=\"probe\",command=\"slow\"}";
    wait_for("the run and its one re-run", DEADLINE, || {
        (g.metric(runs_metric) == 2.0).then_some(())
    });
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap().lines().count(),
        2,
        "at most one re-run"
    );
    // The loop is idle again: a new trigger starts a new run at once.
    send(
        &g,
        "u",
        &serde_json::json!({"op": "trigger", "name": "slow"}),
    );
    wait_for("a fresh run", DEADLINE, || {
        (g.metric(runs_metric) == 3.0).then_some(())
    });
    assert_eq!(commands_count(&g, "ok"), 2.0);
    g.stop_within(Duration::from_secs(15));
}

#[test]
fn a_hanging_command_is_killed_at_its_timeout_with_its_children() {
    let mut g = Gateway::new();
    let child_pid = g.path("grandchild.pid");
    let hang = script(
        &g,
        "hang.sh",
        &format!("/bin/sleep 120 &\necho $! > {}\nwait", child_pid.display()),
    );
    install_probe(
        &g,
        &format!(
            "commands = {{ hang = [\"/bin/sh\", \"{}\"] }}\ncommand_timeout = \"1s\"\n",
            hang.display()
        ),
    );
    g.start();
    send(&g, "h", &serde_json::json!({"op": "run", "name": "hang"}));
    let line = wait_line(&g, "probe run ");
    assert!(
        line.starts_with("probe run ok exit=none timed_out=true"),
        "{line}"
    );
    let pid = read_pid(&child_pid).expect("the script recorded its child");
    wait_for("the grandchild to be killed", DEADLINE, || {
        gone(pid).then_some(())
    });
    wait_line(&g, "command `hang` was killed at its timeout");
    assert_eq!(
        g.metric("watchgate_plugin_command_failures_total{plugin=\"probe\",command=\"hang\"}"),
        1.0
    );
    g.stop_within(Duration::from_secs(15));
}

#[test]
fn a_signal_delivers_sighup_to_the_process_in_the_granted_pid_file() {
    let mut g = Gateway::new();
    let pid_file = g.path("hupper.pid");
    let got = g.path("hup");
    let hupper = script(
        &g,
        "hupper.sh",
        &format!(
            "trap 'echo hup >> {}' HUP\necho $$ > {}\nwhile :; do /bin/sleep 0.05; done",
            got.display(),
            pid_file.display()
        ),
    );
    let mut target = std::process::Command::new("/bin/sh")
        .arg(&hupper)
        .spawn()
        .unwrap();
    install_probe(
        &g,
        &format!(
            "signals = {{ hupper = \"{}\", stale = \"{}\" }}\n",
            pid_file.display(),
            g.path("missing.pid").display()
        ),
    );
    g.start();
    wait_for("the pid file", DEADLINE, || read_pid(&pid_file));
    send(
        &g,
        "s",
        &serde_json::json!({"op": "signal", "name": "hupper"}),
    );
    wait_line(&g, "probe signal ok");
    wait_for("the HUP to arrive", DEADLINE, || {
        std::fs::read_to_string(&got)
            .ok()
            .filter(|t| t.contains("hup"))
    });
    send(
        &g,
        "t",
        &serde_json::json!({"op": "signal", "name": "stale"}),
    );
    let err = wait_line(&g, "probe signal err");
    assert!(err.contains("missing.pid"), "{err}");
    let _ = target.kill();
    let _ = target.wait();
    g.stop_within(Duration::from_secs(15));
}

#[test]
fn shutdown_kills_a_running_command_within_the_grace() {
    let mut g = Gateway::with_sources(
        "[gateway]\nshutdown_grace = \"2s\"\n\n[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"watched\"\ndebounce_ms = 20\n",
    );
    let child_pid = g.path("grandchild.pid");
    let leader_pid = g.path("leader.pid");
    let hang = script(
        &g,
        "hang.sh",
        &format!(
            "echo $$ > {}\n/bin/sleep 120 &\necho $! > {}\nwait",
            leader_pid.display(),
            child_pid.display()
        ),
    );
    install_probe(
        &g,
        &format!(
            "commands = {{ hang = [\"/bin/sh\", \"{}\"] }}\ncommand_timeout = \"120s\"\n",
            hang.display()
        ),
    );
    g.start();
    send(
        &g,
        "h",
        &serde_json::json!({"op": "trigger", "name": "hang"}),
    );
    let child = wait_for("the grandchild", DEADLINE, || read_pid(&child_pid));
    let leader = wait_for("the leader", DEADLINE, || read_pid(&leader_pid));
    g.stop_within(Duration::from_secs(8));
    for pid in [leader, child] {
        wait_for("the command's processes to be gone", DEADLINE, || {
            gone(pid).then_some(())
        });
    }
}

#[test]
fn plugin_test_reports_commands_and_runs_them_only_when_asked() {
    let g = Gateway::new();
    let marker = g.path("ran");
    let touch = script(
        &g,
        "touch.sh",
        &format!("echo \"$1\" > {}", marker.display()),
    );
    install_probe(
        &g,
        &format!(
            "commands = {{ touch = [\"/bin/sh\", \"{}\", \"{{file}}\"] }}\n",
            touch.display()
        ),
    );
    let events = g.path("events.jsonl");
    let root = g.path("out/probe");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("old.conf"), "old").unwrap();
    let lines: String = [
        serde_json::json!({"op": "run", "name": "touch", "file": "x.conf"}),
        serde_json::json!({"op": "read", "path": "old.conf"}),
        serde_json::json!({"op": "rename", "from": "old.conf", "to": "new.conf"}),
    ]
    .iter()
    .enumerate()
    .map(|(i, op)| {
        format!(
            "{}\n",
            serde_json::json!({"source": "local", "key": format!("k{i}"), "kind": "put", "value": op.to_string()})
        )
    })
    .collect();
    std::fs::write(&events, lines).unwrap();
    let wasm = g.path("plugins.d/probe.wasm");
    let config = g.config_path();
    let args = [
        "plugin",
        "test",
        wasm.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let (code, out, err) = g.cli(&args);
    assert_eq!(code, 0, "{out}\n{err}");
    let effect = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["effect"] == "commands")
        .unwrap_or_else(|| panic!("no commands effect in\n{out}"));
    assert_eq!(effect["performed"], false);
    assert_eq!(effect["detail"]["op"], "run");
    let root = g.path("out/probe").canonicalize().unwrap();
    assert_eq!(
        effect["detail"]["argv"][2],
        root.join("x.conf").display().to_string()
    );
    assert!(!marker.exists(), "ran without --perform");
    // A read is carried out; a rename is reported, not performed.
    assert!(out.contains("probe read ok old"), "{out}");
    let rename = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["effect"] == "files" && v["detail"]["op"] == "rename")
        .unwrap_or_else(|| panic!("no rename effect in\n{out}"));
    assert_eq!(rename["performed"], false);
    assert!(root.join("old.conf").exists() && !root.join("new.conf").exists());
    let mut performing = args.to_vec();
    performing.push("--perform");
    let (code, out, err) = g.cli(&performing);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().trim(),
        root.join("x.conf").display().to_string()
    );
    assert!(!root.join("old.conf").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("new.conf")).unwrap(),
        "old"
    );
}

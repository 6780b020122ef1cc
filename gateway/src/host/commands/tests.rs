//! Tests of the `commands` grant: its checks, `{file}` and the runner.

use super::*;
use crate::host::files::FilesQuota;
use crate::host::log::TracingSink;

fn grants(text: &str) -> Grants {
    toml::from_str(text).unwrap()
}

fn grant(g: &Grants, files: Option<&FilesGrant>) -> CommandsGrant {
    let metrics = Metrics::shared();
    let log = Arc::new(PluginLog::new(
        "p",
        1000,
        Arc::new(TracingSink),
        metrics.clone(),
    ));
    CommandsGrant::new(
        g,
        files.map(FilesGrant::root),
        log,
        metrics,
        Duration::from_secs(1),
        None,
    )
    .unwrap()
}

#[test]
fn grants_parse_and_are_checked() {
    let g = grants(
        r#"
        files = "/srv/out"
        commands = { reload = ["/usr/sbin/nginx", "-s", "reload"], check = ["/usr/sbin/nginx", "-t", "-c", "{file}"] }
        command_env = { PATH = "/usr/bin" }
        command_dir = "/srv"
        command_timeout = "5s"
        signals = { nginx = "/run/nginx.pid" }
        "#,
    );
    validate(&g).unwrap();
    assert_eq!(g.command_timeout, Some(Duration::from_secs(5)));
    assert!(g.names().contains(&"commands"));
    let refused = [
        (r#"commands = { x = [] }"#, "give the argv"),
        (r#"commands = { x = ["nginx", "-t"] }"#, "absolute path"),
        (r#"commands = { x = ["{file}"] }"#, "absolute path"),
        (
            r#"commands = { x = ["/bin/cat", "{file}"] }"#,
            "no grants.files",
        ),
        (r#"commands = { "a b" = ["/bin/true"] }"#, "must be 1-64"),
        (r#"command_env = { A = "1" }"#, "names none"),
        (
            r#"commands = { x = ["/bin/true"] }
command_env = { "A=B" = "1" }"#,
            "environment variable",
        ),
        (
            r#"commands = { x = ["/bin/true"] }
command_timeout = "0s""#,
            "more than 0",
        ),
        (r#"signals = { "" = "/run/x.pid" }"#, "must be 1-64"),
    ];
    for (text, want) in refused {
        let e = validate(&grants(text)).unwrap_err();
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn file_is_replaced_by_a_path_inside_the_grant_only() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let files = FilesGrant::new(
        dir.path(),
        FilesQuota {
            bytes: 1 << 20,
            entries: 100,
        },
    )
    .unwrap();
    let g = grant(
        &grants(
            r#"
            files = "/unused"
            commands = { check = ["/usr/sbin/nginx", "-t", "-c", "{file}", "--x={file}.bak"], reload = ["/bin/true"] }
            "#,
        ),
        Some(&files),
    );
    let root = dir.path().canonicalize().unwrap();
    let spec = g
        .spec("check", Some("conf/nginx.conf"), Some(&files))
        .unwrap();
    let abs = root.join("conf/nginx.conf").display().to_string();
    assert_eq!(
        spec.argv,
        [
            "/usr/sbin/nginx".to_owned(),
            "-t".into(),
            "-c".into(),
            abs.clone(),
            format!("--x={abs}.bak")
        ]
    );
    // The working directory defaults to the files grant; the environment
    // is empty; the timeout is the default.
    assert_eq!(spec.dir, root);
    assert!(spec.env.is_empty());
    assert_eq!(spec.timeout, DEFAULT_TIMEOUT);
    std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
    for bad in ["../etc/passwd", "/etc/passwd", "out/x", "a/../../x"] {
        let (outcome, message) = g.spec("check", Some(bad), Some(&files)).unwrap_err();
        assert_eq!(outcome, "denied", "{bad}: {message}");
    }
    let (outcome, message) = g.spec("check", None, Some(&files)).unwrap_err();
    assert_eq!(outcome, "invalid", "{message}");
    let (outcome, _) = g.spec("check", Some("x"), None).unwrap_err();
    assert_eq!(outcome, "denied");
    // A command without {file} ignores it.
    assert_eq!(
        g.spec("reload", Some("../x"), Some(&files)).unwrap().argv,
        ["/bin/true"]
    );
    let (outcome, message) = g.spec("rm -rf /", None, Some(&files)).unwrap_err();
    assert_eq!(outcome, "denied");
    assert!(
        message.contains(r#"granted: ["check", "reload"]"#),
        "{message}"
    );
    assert!(g.pid_file("nginx").unwrap_err().1.contains("granted: []"));
}

#[test]
fn a_run_returns_its_exit_code_and_output_tails_and_ends_at_its_time() {
    let g = grant(
        &grants(
            r#"
            commands = { say = ["/bin/sh", "-c", "echo out; echo err >&2; head -c 10000 /dev/zero | tr '\\0' x; echo; echo last; exit 3"], hang = ["/bin/sh", "-c", "sleep 30"] }
            command_timeout = "300ms"
            "#,
        ),
        None,
    );
    let far = Instant::now() + Duration::from_secs(60);
    let f = g
        .runner()
        .run(&g.spec("say", None, None).unwrap(), far)
        .unwrap();
    assert_eq!(f.exit_code, Some(3));
    assert!(f.killed.is_none());
    assert_eq!(f.stderr_tail, "err\n");
    assert!(
        f.stdout_tail.len() <= process::TAIL,
        "{}",
        f.stdout_tail.len()
    );
    assert!(f.stdout_tail.ends_with("x\nlast\n"), "{}", f.stdout_tail);
    let started = Instant::now();
    let f = g
        .runner()
        .run(&g.spec("hang", None, None).unwrap(), far)
        .unwrap();
    assert_eq!(f.killed, Some(Killed::TimedOut));
    assert_eq!(f.exit_code, None);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The call's deadline, sooner than the timeout, ends it too.
    let f = g
        .runner()
        .run(
            &g.spec("hang", None, None).unwrap(),
            Instant::now() + Duration::from_millis(50),
        )
        .unwrap();
    assert!(f.killed.is_some() && f.duration < Duration::from_millis(300));
    assert!(g.runner().wait_idle(Instant::now()));
}

#[test]
fn triggers_fold_into_one_rerun_and_a_stop_kills_what_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    let g = grant(
        &grants(&format!(
            r#"
            commands = {{ slow = ["/bin/sh", "-c", "echo run >> {}; sleep 0.3"], hang = ["/bin/sh", "-c", "sleep 30"] }}
            "#,
            marks.display()
        )),
        None,
    );
    let runner = g.runner().clone();
    let spec = g.spec("slow", None, None).unwrap();
    assert!(runner.trigger(spec.clone()).unwrap());
    for _ in 0..20 {
        assert!(!runner.trigger(spec.clone()).unwrap());
    }
    assert!(runner.wait_idle(Instant::now() + Duration::from_secs(10)));
    let runs = std::fs::read_to_string(&marks).unwrap();
    assert_eq!(runs.lines().count(), 2, "{runs}");
    // At most MAX_RUNNING at once.
    let hang = g.spec("hang", None, None).unwrap();
    assert!(runner.trigger(hang.clone()).unwrap());
    for i in 1..MAX_RUNNING {
        let mut other = hang.clone();
        other.name = format!("hang{i}");
        assert!(runner.trigger(other).unwrap());
    }
    let (outcome, _) = runner
        .run(&spec, Instant::now() + Duration::from_secs(1))
        .unwrap_err();
    assert_eq!(outcome, "busy");
    // Dropping the grant (an unload) kills them after its grace (1 s).
    let started = Instant::now();
    drop(g);
    assert!(runner.wait_idle(Instant::now() + Duration::from_secs(10)));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(runner.trigger(spec).unwrap_err().0, "error");
}

#[test]
fn a_signal_needs_a_pid_file_holding_a_live_pid_above_one() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("x.pid");
    assert!(process::hangup(&pid_file).unwrap_err().contains("x.pid"));
    for bad in ["", "1", "0", "-5", "abc"] {
        std::fs::write(&pid_file, bad).unwrap();
        let e = process::hangup(&pid_file).unwrap_err();
        assert!(e.contains("above 1"), "{bad}: {e}");
    }
    std::fs::write(&pid_file, "999999999\n").unwrap();
    assert!(process::hangup(&pid_file).is_err());
}

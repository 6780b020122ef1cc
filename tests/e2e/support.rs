//! Shared test harness: build the plugins, start a gateway, wait for
//! conditions with deadlines, read metrics and the event log.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use crate::plugins::plugin;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("gateway/ has a parent")
        .to_owned()
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// Poll `f` until it returns `Some`, or panic after `deadline` with `what`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Run `watchgate ARGS…` to completion: exit code, stdout, stderr.
pub fn watchgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_watchgate"))
        .args(args)
        .output()
        .expect("run watchgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The default `shutdown_grace`.
pub const GRACE: Duration = Duration::from_secs(10);

/// Write a file atomically (temporary hidden file, then rename), the way
/// deployment tools do.
pub fn write_atomic(path: &Path, contents: &[u8]) {
    let dir = path.parent().expect("has a parent");
    std::fs::create_dir_all(dir).expect("create dir");
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name")
    ));
    std::fs::write(&tmp, contents).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// One test's gateway: a temporary directory with `watched/`, `plugins.d/`
/// and `out/`, a config, and (once started) the running process.
pub struct Gateway {
    /// The temporary directory.
    pub dir: tempfile::TempDir,
    /// Admin port.
    pub port: u16,
    child: Option<Child>,
}

impl Gateway {
    /// A gateway directory with a file source named `local` over `watched/`.
    pub fn new() -> Gateway {
        Self::with_sources(
            "[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"watched\"\ndebounce_ms = 20\n",
        )
    }

    /// A gateway directory whose config has the given `[[source]]` tables.
    pub fn with_sources(sources: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["watched", "plugins.d", "out"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        // Port 0: the gateway picks a free port and logs it, so parallel
        // tests never race for one.
        let g = Gateway {
            dir,
            port: 0,
            child: None,
        };
        std::fs::write(
            g.config_path(),
            format!(
                "[admin]\nlisten = \"127.0.0.1:0\"\n\n[plugins]\ndir = \"plugins.d\"\n# Ready means every plugin is running: tests send events at once.\ncompile_ready_wait = \"10m\"\n\n{sources}"
            ),
        )
        .expect("write config");
        g
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("watchgate.toml")
    }

    /// A path under the temporary directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Install a compiled example plugin as `name`, with a sidecar.
    pub fn install(&self, name: &str, example: &str, sidecar: &str) {
        if !sidecar.is_empty() {
            write_atomic(
                &self.path(&format!("plugins.d/{name}.toml")),
                sidecar.as_bytes(),
            );
        }
        let bytes = std::fs::read(plugin(example)).expect("read plugin");
        write_atomic(&self.path(&format!("plugins.d/{name}.wasm")), &bytes);
    }

    /// Install `event-log` writing into `out/NAME/events.jsonl`.
    pub fn install_event_log(&self, name: &str) {
        self.install(
            name,
            "event-log",
            &format!("[grants]\nfiles = \"../out/{name}\"\n"),
        );
    }

    /// Start the gateway and wait until `/readyz` says ready.
    pub fn start(&mut self) {
        self.spawn();
        wait_for(
            "the gateway to become ready",
            Duration::from_secs(60),
            || {
                self.assert_running();
                let (code, _) = self.get("/readyz")?;
                (code == 200).then_some(())
            },
        );
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("started").id()
    }

    /// Start the gateway and wait until its admin port answers (ready or
    /// not).
    pub fn spawn(&mut self) {
        let log = std::fs::File::create(self.path("gateway.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_watchgate"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(self.config_path())
            .env("WATCHGATE_LOG", "info,watchgate=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start watchgate");
        self.child = Some(child);
        self.port = wait_for(
            "the admin address in the log",
            Duration::from_secs(60),
            || {
                self.assert_running();
                admin_port(&self.log())
            },
        );
        wait_for("the admin port to answer", Duration::from_secs(60), || {
            self.assert_running();
            self.get("/livez").map(|_| ())
        });
    }

    /// Panic with the log if the process exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("watchgate exited with {status}; log:\n{}", self.log());
        }
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("gateway.log")).unwrap_or_default()
    }

    /// GET an admin path: status and body, or `None` if not answering.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        match ureq::get(&url).timeout(Duration::from_secs(5)).call() {
            Ok(r) => Some((r.status(), r.into_string().ok()?)),
            Err(ureq::Error::Status(code, r)) => Some((code, r.into_string().ok()?)),
            Err(_) => None,
        }
    }

    /// GET a JSON admin path.
    pub fn json(&self, path: &str) -> Value {
        let (code, body) = self.get(path).expect("admin answers");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} ({code}): {e}: {body}"))
    }

    /// The names of the running plugins (the first page of `/v1/plugins`,
    /// which holds every plugin a test loads).
    pub fn plugin_names(&self) -> Vec<String> {
        self.json("/v1/plugins")["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The `/v1/plugins` report of plugin `name`, if it runs.
    pub fn plugin_report(&self, name: &str) -> Option<Value> {
        self.json("/v1/plugins")["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
    }

    /// Every sample of the Prometheus text, `name{labels}` → value.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let (_, body) = self.get("/metrics").expect("metrics answer");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }

    /// One metric sample, 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics().get(sample).copied().unwrap_or(0.0)
    }

    /// The complete lines `event-log` installed as `name` wrote so far (a
    /// line still being appended is left for the next read).
    pub fn events(&self, name: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(self.path(&format!("out/{name}/events.jsonl")))
            .unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect()
    }

    /// Wait until `name` logged at least `n` events; returns them.
    pub fn wait_events(&mut self, name: &str, n: usize, deadline: Duration) -> Vec<Value> {
        wait_for(&format!("{n} events in {name}"), deadline, || {
            self.assert_running();
            let e = self.events(name);
            (e.len() >= n).then_some(e)
        })
    }

    /// Kill the gateway with SIGKILL (a crash) and wait until it is gone.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("started");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Run `watchgate ARGS…` to completion: exit code, stdout, stderr.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        watchgate(args)
    }

    /// SIGTERM, and assert the gateway exits 0 within `bound`.
    pub fn stop_within(&mut self, bound: Duration) {
        let stopping = std::time::Instant::now();
        let status = self.stop();
        assert_eq!(status.code(), Some(0), "log:\n{}", self.log());
        assert!(
            stopping.elapsed() < bound,
            "shutdown took {:?} (bound {bound:?})",
            stopping.elapsed()
        );
    }

    /// Wait for the gateway to exit on its own, within `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("started");
        wait_for("watchgate to exit", deadline, || {
            child.try_wait().ok().flatten()
        })
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("started");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        wait_for("watchgate to exit", Duration::from_secs(20), || {
            child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // A failing test shows what the gateway logged last: CI keeps only
        // the test output.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "--- last {} gateway log lines ---\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The admin port the gateway logged (JSON log lines).
fn admin_port(log: &str) -> Option<u16> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["message"] == "Admin server listening.")
        .and_then(|v| {
            v["fields"]["addr"]
                .as_str()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
}

/// `(kind, key, value)` of event-log lines.
pub fn kkv(events: &[Value]) -> Vec<(String, String, Option<String>)> {
    events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default().to_owned(),
                e["key"].as_str().unwrap_or_default().to_owned(),
                e["value"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

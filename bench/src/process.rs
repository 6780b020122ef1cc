//! Cases that run the `watchgate` binary itself: memory, hot reload and
//! cold start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{BenchArgs, CaseResult, Samples, free_port, variant, write_atomic};

/// A gateway process in its own directory.
pub(super) struct Proc {
    pub(super) dir: tempfile::TempDir,
    gateway: PathBuf,
    port: u16,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
}

impl Proc {
    /// A directory with `watched/` (one file), `plugins.d/`, `out/` and a
    /// config with `sources` (default: a file source over `watched/`), to
    /// be run by the `watchgate` binary `args` name.
    pub(super) fn new(args: &BenchArgs, sources: Option<&str>) -> anyhow::Result<Proc> {
        let gateway = args.gateway()?;
        let dir = tempfile::tempdir()?;
        for d in ["watched", "plugins.d", "out"] {
            std::fs::create_dir_all(dir.path().join(d))?;
        }
        std::fs::write(dir.path().join("watched/a"), "1")?;
        let port = free_port()?;
        let sources = sources.map_or_else(
            || "[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"watched\"\ndebounce_ms = 5\n".to_owned(),
            str::to_owned,
        );
        std::fs::write(
            dir.path().join("watchgate.toml"),
            format!(
                "[admin]\nlisten = \"127.0.0.1:{port}\"\n\n[plugins]\ndir = \"plugins.d\"\n\
                 # Ready means every plugin runs: the cases time that.\n\
                 compile_ready_wait = \"10m\"\n\n\
                 [runtime]\nmax_instances = 1024\n\n{sources}"
            ),
        )?;
        Ok(Proc {
            dir,
            gateway,
            port,
            child: None,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    pub(super) fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Install `wasm` as `name` with an optional sidecar.
    pub(super) fn install(&self, name: &str, wasm: &[u8], sidecar: &str) -> anyhow::Result<()> {
        if !sidecar.is_empty() {
            write_atomic(
                &self.path(&format!("plugins.d/{name}.toml")),
                sidecar.as_bytes(),
            )?;
        }
        write_atomic(&self.path(&format!("plugins.d/{name}.wasm")), wasm)
    }

    /// Start the gateway and wait until `/readyz` answers 200; returns how
    /// long that took.
    pub(super) fn start(&mut self) -> anyhow::Result<Duration> {
        let log = std::fs::File::create(self.path("gateway.log"))?;
        let started = Instant::now();
        let child = Command::new(&self.gateway)
            .args(["run", "--config"])
            .arg(self.path("watchgate.toml"))
            .env("WATCHGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let limit = Duration::from_secs(600);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                anyhow::bail!(
                    "the gateway exited with {status}: {}",
                    std::fs::read_to_string(self.path("gateway.log")).unwrap_or_default()
                );
            }
            if self.get("/readyz") == Some(200) {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(started.elapsed() < limit, "not ready within {limit:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The status of a GET on the admin port.
    pub(super) fn get(&self, path: &str) -> Option<u16> {
        self.text(path).map(|(s, _)| s)
    }

    /// Status and body of a GET on the admin port.
    pub(super) fn text(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        self.rt.block_on(async {
            let r = reqwest::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            let status = r.status().as_u16();
            Some((status, r.text().await.ok()?))
        })
    }

    /// One sample of the Prometheus text, 0 when absent.
    pub(super) fn metric(&self, sample: &str) -> f64 {
        self.text("/metrics")
            .and_then(|(_, body)| {
                body.lines()
                    .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// Resident memory of the process, KiB.
    pub(super) fn rss_kib(&self) -> anyhow::Result<f64> {
        rss_kib(self.child.as_ref().map(Child::id).unwrap_or(0))
    }

    /// SIGTERM and wait.
    pub(super) fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Wait until `path` exists and is not empty; how long that took from
/// `since`.
pub(super) fn wait_file(path: &Path, since: Instant, limit: Duration) -> anyhow::Result<Duration> {
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
            return Ok(since.elapsed());
        }
        anyhow::ensure!(
            since.elapsed() < limit,
            "{} did not appear within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Memory: resident memory idle, and with idle loaded plugins.
pub(super) fn memory(args: &BenchArgs) -> anyhow::Result<CaseResult> {
    let counts: &[usize] = if args.quick {
        &[0, 1, 10]
    } else {
        &[0, 1, 100, 500]
    };
    let noop = std::fs::read(args.plugin("noop")?)?;
    let runs = if args.quick { 1 } else { 3 };
    let mut s = Samples::default();
    for _ in 0..runs {
        let mut idle = 0.0;
        for &n in counts {
            let mut p = Proc::new(args, None)?;
            for i in 0..n {
                // Subscribed to nothing that exists: loaded, never called.
                p.install(
                    &format!("noop{i}"),
                    &variant(&noop, i),
                    "[[subscribe]]\nsource = \"local\"\nprefix = \"nothing/\"\n",
                )?;
            }
            p.start()?;
            let rss = p.rss_kib()?;
            s.add(&format!("rss_{n:03}_plugins_mib"), "MiB", rss / 1024.0);
            if n == 0 {
                idle = rss;
            } else {
                s.add(
                    &format!("per_plugin_{n:03}_kib"),
                    "KiB",
                    (rss - idle) / n as f64,
                );
            }
            p.stop()?;
        }
    }
    s.note(
        "Each plugin is a distinct copy of the no-op plugin (its own digest, compiled on its own), \
         loaded with its worker thread and queue, never called (an instance exists only while a \
         plugin has work).",
    );
    let largest = *counts.last().unwrap_or(&1);
    Ok(s.finish(
        "memory",
        "Resident memory (VmRSS) of the gateway process when ready: idle with a file source, \
         then with idle loaded plugins; per plugin is the growth over idle divided by the count.",
        "< 1 MiB per idle loaded plugin",
        move |s| {
            let per = s
                .median(&format!("per_plugin_{largest:03}_kib"))
                .unwrap_or(f64::MAX);
            (None, Default::default(), Some(per < 1024.0))
        },
    ))
}

/// Hot reload: a new `.wasm` dropped in → its first event served.
pub(super) fn hot_reload(args: &BenchArgs) -> anyhow::Result<CaseResult> {
    let probe = std::fs::read(args.plugin("bench-probe")?)?;
    let mut p = Proc::new(args, None)?;
    p.start()?;
    let mut s = Samples::default();
    let n = if args.quick { 2 } else { 10 };
    for i in 0..n {
        let name = format!("probe{i}");
        let sidecar = format!("[grants]\nfiles = \"../out/{name}\"\n");
        write_atomic(
            &p.path(&format!("plugins.d/{name}.toml")),
            sidecar.as_bytes(),
        )?;
        let wasm = variant(&probe, 1000 + i);
        let started = Instant::now();
        write_atomic(&p.path(&format!("plugins.d/{name}.wasm")), &wasm)?;
        let took = wait_file(
            &p.path(&format!("out/{name}/entries.log")),
            started,
            Duration::from_secs(60),
        )?;
        s.add("reload_to_first_event_ms", "ms", took.as_secs_f64() * 1e3);
    }
    p.stop()?;
    s.note(
        "From the atomic rename of a new 70 KB plugin into the watched plugin directory to its \
         first event (the current keys, as puts) written by it: directory notification, \
         debounce, compile, start, first call.",
    );
    Ok(s.finish(
        "hot_reload",
        "A new plugin file dropped into the running gateway's plugin directory, until it has \
         served its first event.",
        "< 250 ms for a small plugin",
        |s| {
            let ms = s.median("reload_to_first_event_ms").unwrap_or(f64::MAX);
            (None, Default::default(), Some(ms < 250.0))
        },
    ))
}

/// Cold start of 50 plugins, without and with the compiled-code cache.
pub(super) fn cold_start(args: &BenchArgs) -> anyhow::Result<CaseResult> {
    let n = if args.quick { 5 } else { 50 };
    let noop = std::fs::read(args.plugin("noop")?)?;
    let mut s = Samples::default();
    for _ in 0..args.runs() {
        let mut p = Proc::new(args, None)?;
        for i in 0..n {
            p.install(&format!("noop{i}"), &variant(&noop, i), "")?;
        }
        // The first start compiles everything and fills the cache in the
        // state directory; the second starts from the cache.
        let cold = p.start()?;
        p.stop()?;
        let cached = p.start()?;
        p.stop()?;
        s.add("uncached_ms", "ms", cold.as_secs_f64() * 1e3);
        s.add("cached_ms", "ms", cached.as_secs_f64() * 1e3);
    }
    s.note(format!(
        "{n} distinct copies of the no-op plugin; from process start to `/readyz` answering 200 \
         (every plugin loaded, the file source synced)."
    ));
    Ok(s.finish(
        "cold_start",
        "Gateway start with 50 plugins until ready: first with an empty compiled-code cache, then \
         with the cache the first start left in the state directory.",
        "< 300 ms with the cache",
        |s| {
            let cached = s.median("cached_ms").unwrap_or(f64::MAX);
            let cold = s.median("uncached_ms").unwrap_or(0.0);
            let mut r = std::collections::BTreeMap::new();
            if cached > 0.0 {
                r.insert("uncached to cached".to_owned(), cold / cached);
            }
            (None, r, Some(cached < 300.0))
        },
    ))
}

/// Resident memory of process `pid`, in KiB.
pub(super) fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
}

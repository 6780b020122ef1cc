//! Real etcd processes for end-to-end tests: one member ([`Etcd`]) or a
//! cluster ([`EtcdCluster`]), each on free loopback ports with its data and
//! its log in a temporary directory, plus [`etcdctl`] to act on them.
//!
//! This module owns the processes it starts and must never leave one behind:
//! every [`Etcd`] kills and reaps its process on drop (resuming it first if
//! it was paused). It does not talk to etcd beyond `/health`, the maintenance
//! status and `etcdctl`; watch clients belong to the tests.
//!
//! Every listener binds 127.0.0.1 (client, peer and metrics URLs). A missing
//! `etcd` binary fails the test loudly; it is never a skip.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{free_port, wait_for};

/// The etcd server binary (Debian package `etcd-server`).
const ETCD: &str = "/usr/bin/etcd";
/// The etcd command-line client (Debian package `etcd-client`).
const ETCDCTL: &str = "/usr/bin/etcdctl";
/// How long a member (or a cluster) may take to report healthy.
const HEALTHY_DEADLINE: Duration = Duration::from_secs(30);
/// How long [`Etcd::stop`] waits after SIGTERM before it sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Fresh starts that lost a port race are retried this many times in all.
const START_ATTEMPTS: usize = 3;
/// Timeout of one health probe while waiting for a member.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Options for a member started with [`Etcd::start_with`] (or every member
/// of a cluster).
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// `--max-request-bytes` (etcd's default is 1.5 MiB; a 5 MB value needs
    /// more).
    pub max_request_bytes: Option<u64>,
    /// More command-line arguments, passed after the harness's own.
    pub extra_args: Vec<String>,
}

/// The loopback ports of one member.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    peer: u16,
    metrics: u16,
}

impl Ports {
    /// `n` members' worth of distinct free loopback ports.
    fn pick(n: usize) -> Vec<Ports> {
        let mut seen = std::collections::BTreeSet::new();
        let mut next = || loop {
            let port = free_port();
            if seen.insert(port) {
                return port;
            }
        };
        (0..n)
            .map(|_| Ports {
                client: next(),
                peer: next(),
                metrics: next(),
            })
            .collect()
    }
}

/// Why a member did not become healthy.
#[derive(Debug)]
enum NotHealthy {
    /// The process exited; `port_race` when it failed to bind a port.
    Exited { status: ExitStatus, port_race: bool },
    /// Still running but not healthy after [`HEALTHY_DEADLINE`].
    TimedOut,
}

impl std::fmt::Display for NotHealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotHealthy::Exited { status, port_race } => {
                write!(f, "exited with {status}")?;
                if *port_race {
                    write!(f, ", another process took one of its ports")?;
                }
                Ok(())
            }
            NotHealthy::TimedOut => write!(f, "not healthy after {HEALTHY_DEADLINE:?}"),
        }
    }
}

/// One etcd member: its process (while running), its temporary directory
/// (`data/` and `etcd.log`) and the flags to start it again.
pub struct Etcd {
    name: String,
    dir: tempfile::TempDir,
    ports: Ports,
    initial_cluster: String,
    token: String,
    opts: EtcdOptions,
    child: Option<Child>,
    paused: AtomicBool,
    /// Length of the log when the current process was spawned, to tell this
    /// run's bind errors from an earlier run's.
    log_offset: u64,
}

impl Etcd {
    /// A single-member cluster on free loopback ports with a temporary data
    /// directory; returns once `/health` says healthy.
    ///
    /// Panics if `etcd` is not installed, or (with etcd's log) if it does
    /// not become healthy within 30 s.
    pub fn start() -> Etcd {
        Etcd::start_with(EtcdOptions::default())
    }

    /// [`Etcd::start`] with options.
    pub fn start_with(opts: EtcdOptions) -> Etcd {
        let mut cluster = EtcdCluster::start_with(1, opts);
        cluster.members.pop().expect("one member")
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.client)
    }

    /// The client address.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.client))
    }

    /// The data directory (kept across [`Etcd::kill`] and [`Etcd::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The process id while the member runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether a process was started and not yet killed or stopped (a paused
    /// member counts as running).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// etcd's stderr (its log) so far, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// One `GET /health`: `Ok` when it answers `{"health":"true"}`, else a
    /// description (status and body, or the transport error such as a
    /// timeout or a refused connection).
    ///
    /// # Errors
    /// When the member is unreachable, does not answer within `timeout`, or
    /// answers anything but healthy.
    pub fn health(&self, timeout: Duration) -> Result<(), String> {
        let url = format!("{}/health", self.client_url());
        let body = match ureq::get(&url).timeout(timeout).call() {
            Ok(r) => r.into_string().map_err(|e| format!("reading {url}: {e}"))?,
            Err(ureq::Error::Status(code, r)) => {
                return Err(format!(
                    "{url}: {code} {}",
                    r.into_string().unwrap_or_default()
                ));
            }
            Err(e) => return Err(format!("{url}: {e}")),
        };
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{url}: {e}: {body}"))?;
        if v["health"] == "true" {
            Ok(())
        } else {
            Err(format!("{url}: {body}"))
        }
    }

    /// SIGKILL the process and reap it. Nothing happens if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL also ends a stopped process; no SIGCONT needed.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused.store(false, Ordering::SeqCst);
    }

    /// SIGTERM the process and reap it; SIGKILL it if it has not exited
    /// after 10 s. A paused member is resumed first so it can shut down.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), "TERM");
        if self.paused.swap(false, Ordering::SeqCst) {
            signal(child.id(), "CONT");
        }
        let start = Instant::now();
        let exited = wait_for(
            &format!("etcd {} to exit", self.name),
            STOP_GRACE * 2,
            || match child.try_wait() {
                Ok(Some(_)) => Some(true),
                Ok(None) if start.elapsed() < STOP_GRACE => None,
                _ => Some(false),
            },
        );
        if !exited {
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// Start the member again with the same name, ports, flags and data
    /// directory, and wait until it is healthy (in a cluster that needs a
    /// quorum). A running member is stopped first. Ports are not changed:
    /// losing a port race here panics.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        let start = Instant::now();
        let outcome = wait_for(
            &format!("etcd {} to restart", self.name),
            HEALTHY_DEADLINE * 2,
            || self.poll_healthy(start),
        );
        if let Err(e) = outcome {
            panic!(
                "etcd {} did not come back after a restart ({e}); log:\n{}",
                self.name,
                self.log()
            );
        }
    }

    /// SIGSTOP the process: it keeps its sockets but answers nothing.
    pub fn pause(&self) {
        let pid = self.pid().expect("pause: etcd is not running");
        signal(pid, "STOP");
        self.paused.store(true, Ordering::SeqCst);
    }

    /// SIGCONT a paused process.
    pub fn resume(&self) {
        let pid = self.pid().expect("resume: etcd is not running");
        signal(pid, "CONT");
        self.paused.store(false, Ordering::SeqCst);
    }

    /// The member id and the leader id it reports (`POST
    /// /v3/maintenance/status`), or `None` if it does not answer within
    /// `timeout`.
    pub fn status(&self, timeout: Duration) -> Option<(String, String)> {
        let url = format!("{}/v3/maintenance/status", self.client_url());
        let body = ureq::post(&url)
            .timeout(timeout)
            .send_string("{}")
            .ok()?
            .into_string()
            .ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let member = v["header"]["member_id"].as_str()?.to_owned();
        let leader = v["leader"].as_str()?.to_owned();
        Some((member, leader))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// A member that is configured but not started.
    fn new(
        name: String,
        ports: Ports,
        initial_cluster: String,
        token: String,
        opts: EtcdOptions,
    ) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix(&format!("etcd-{name}-"))
            .tempdir()
            .expect("tempdir for etcd");
        Etcd {
            name,
            dir,
            ports,
            initial_cluster,
            token,
            opts,
            child: None,
            paused: AtomicBool::new(false),
            log_offset: 0,
        }
    }

    /// Start the process with stderr appended to `etcd.log`.
    fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "etcd {} is already running",
            self.name
        );
        require(
            ETCD,
            "etcd not found: install Debian package etcd-server (scripts/test does this)",
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open etcd.log");
        self.log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let peer = |p: &Ports| format!("http://127.0.0.1:{}", p.peer);
        let mut cmd = Command::new(ETCD);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(self.client_url())
            .arg("--advertise-client-urls")
            .arg(self.client_url())
            .arg("--listen-peer-urls")
            .arg(peer(&self.ports))
            .arg("--initial-advertise-peer-urls")
            .arg(peer(&self.ports))
            .arg("--listen-metrics-urls")
            .arg(format!("http://127.0.0.1:{}", self.ports.metrics))
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ]);
        if let Some(bytes) = self.opts.max_request_bytes {
            cmd.arg("--max-request-bytes").arg(bytes.to_string());
        }
        cmd.args(&self.opts.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("spawn {ETCD}: {e}")));
    }

    /// One step of waiting for health: `Some(Ok)` when healthy, `Some(Err)`
    /// when the process exited or `start` is more than
    /// [`HEALTHY_DEADLINE`] ago, `None` to keep waiting.
    fn poll_healthy(&mut self, start: Instant) -> Option<Result<(), NotHealthy>> {
        let child = self.child.as_mut().expect("etcd was started");
        if let Ok(Some(status)) = child.try_wait() {
            self.child = None;
            let log = self.log();
            let this_run = log.get(self.log_offset as usize..).unwrap_or(&log);
            let port_race = this_run.contains("address already in use");
            return Some(Err(NotHealthy::Exited { status, port_race }));
        }
        if self.health(PROBE_TIMEOUT).is_ok() {
            return Some(Ok(()));
        }
        (start.elapsed() > HEALTHY_DEADLINE).then_some(Err(NotHealthy::TimedOut))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused.load(Ordering::SeqCst) {
                signal_quietly(child.id(), "CONT");
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A cluster of members that were started together (`m0`, `m1`, …).
pub struct EtcdCluster {
    /// The members, in start order. Kill, stop, pause or restart them one by
    /// one.
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    /// An `n`-member cluster on loopback; returns once every member is
    /// healthy (which includes having a leader).
    ///
    /// Panics as [`Etcd::start`] does.
    pub fn start(n: usize) -> EtcdCluster {
        EtcdCluster::start_with(n, EtcdOptions::default())
    }

    /// [`EtcdCluster::start`] with the same options for every member.
    pub fn start_with(n: usize, opts: EtcdOptions) -> EtcdCluster {
        assert!(n > 0, "a cluster needs a member");
        let token = unique_token();
        for attempt in 1..=START_ATTEMPTS {
            let ports = Ports::pick(n);
            let initial_cluster = ports
                .iter()
                .enumerate()
                .map(|(i, p)| format!("m{i}=http://127.0.0.1:{}", p.peer))
                .collect::<Vec<_>>()
                .join(",");
            let mut cluster = EtcdCluster {
                members: ports
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        Etcd::new(
                            format!("m{i}"),
                            *p,
                            initial_cluster.clone(),
                            token.clone(),
                            opts.clone(),
                        )
                    })
                    .collect(),
            };
            for m in &mut cluster.members {
                m.spawn();
            }
            match cluster.await_healthy() {
                Ok(()) => return cluster,
                Err((
                    _,
                    NotHealthy::Exited {
                        port_race: true, ..
                    },
                )) if attempt < START_ATTEMPTS => {
                    // Another process took a port between free_port() and
                    // etcd's bind: try again with new ports and new data
                    // directories (dropping this cluster kills the rest).
                    continue;
                }
                Err((i, e)) => panic!(
                    "etcd {} did not become healthy ({e}; attempt {attempt}); log:\n{}",
                    cluster.members[i].name,
                    cluster.members[i].log()
                ),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The client URLs of all members (running or not).
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(Etcd::client_url).collect()
    }

    /// Wait until every running member (started and not killed or stopped)
    /// is healthy; panics with the log of the first one that is not after
    /// 30 s.
    pub fn wait_healthy(&self) {
        let start = Instant::now();
        let result = wait_for("etcd members to be healthy", HEALTHY_DEADLINE * 2, || {
            let sick = self
                .members
                .iter()
                .position(|m| m.is_running() && m.health(PROBE_TIMEOUT).is_err());
            match sick {
                None => Some(Ok(())),
                Some(i) if start.elapsed() > HEALTHY_DEADLINE => Some(Err(i)),
                Some(_) => None,
            }
        });
        if let Err(i) = result {
            let m = &self.members[i];
            panic!(
                "etcd {} is not healthy ({:?}); log:\n{}",
                m.name,
                m.health(PROBE_TIMEOUT),
                m.log()
            );
        }
    }

    /// The index of the member that running members agree is the leader, or
    /// `None` while they do not agree or the leader does not answer.
    pub fn leader_index(&self) -> Option<usize> {
        let statuses: Vec<(usize, String, String)> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_running())
            .filter_map(|(i, m)| {
                let (member, leader) = m.status(PROBE_TIMEOUT)?;
                Some((i, member, leader))
            })
            .collect();
        let (_, _, leader) = statuses.first()?;
        if statuses.iter().any(|(_, _, l)| l != leader) {
            return None;
        }
        statuses
            .iter()
            .find(|(_, member, _)| member == leader)
            .map(|(i, _, _)| *i)
    }

    /// Wait until every member is healthy or one failed for good (index and
    /// reason).
    fn await_healthy(&mut self) -> Result<(), (usize, NotHealthy)> {
        let start = Instant::now();
        wait_for("etcd members to be healthy", HEALTHY_DEADLINE * 2, || {
            let mut all = true;
            for (i, m) in self.members.iter_mut().enumerate() {
                match m.poll_healthy(start) {
                    Some(Ok(())) => {}
                    Some(Err(NotHealthy::TimedOut)) => all = false,
                    Some(Err(e)) => return Some(Err((i, e))),
                    None => all = false,
                }
            }
            if all {
                Some(Ok(()))
            } else if start.elapsed() > HEALTHY_DEADLINE {
                let i = self
                    .members
                    .iter()
                    .position(|m| m.health(PROBE_TIMEOUT).is_err())
                    .unwrap_or(0);
                Some(Err((i, NotHealthy::TimedOut)))
            } else {
                None
            }
        })
    }
}

/// Run `etcdctl` (API v3) against `endpoints` (comma-separated URLs) and
/// return its stdout. Panics with its output if it fails.
pub fn etcdctl(endpoints: &str, args: &[&str]) -> String {
    try_etcdctl(endpoints, args)
        .unwrap_or_else(|e| panic!("etcdctl --endpoints={endpoints} {args:?} failed: {e}"))
}

/// Run `etcdctl` (API v3) against `endpoints`: stdout on success.
///
/// # Errors
/// The exit status, stdout and stderr when it exits unsuccessfully (for
/// tests that expect a refusal, such as a permission denied).
pub fn try_etcdctl(endpoints: &str, args: &[&str]) -> Result<String, String> {
    require(
        ETCDCTL,
        "etcdctl not found: install Debian package etcd-client (scripts/test does this)",
    );
    let out = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {ETCDCTL}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Panic with `message` unless `path` exists.
fn require(path: &str, message: &str) {
    assert!(Path::new(path).exists(), "{message}");
}

/// A cluster token no other test (or test run) uses.
fn unique_token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "watchgate-e2e-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Send `SIG<name>` to `pid` with kill(1); panics if that fails.
fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("run kill -{name} {pid}: {e}"));
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

/// [`signal`] for drop paths, where a second panic would abort.
fn signal_quietly(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key unique to this test.
    fn key(test: &str) -> String {
        format!("/{}/{test}/k", unique_token())
    }

    /// The local addresses (`/proc/net/tcp*` hex, `ADDR:PORT`) of the TCP
    /// sockets `pid` listens on.
    fn listening(pid: u32) -> Vec<String> {
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("read the fd table")
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter_map(|target| {
                let target = target.to_string_lossy().into_owned();
                Some(
                    target
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .to_owned(),
                )
            })
            .collect();
        ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .flat_map(|table| {
                let text = std::fs::read_to_string(table).unwrap_or_default();
                text.lines()
                    .skip(1)
                    .filter_map(|line| {
                        let f: Vec<&str> = line.split_whitespace().collect();
                        let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
                        (*state == "0A" && inodes.iter().any(|i| i == inode))
                            .then(|| (*local).to_owned())
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn single_member_survives_kill_and_pause() {
        let mut etcd = Etcd::start();
        let url = etcd.client_url();
        let k = key("single");

        let listeners = listening(etcd.pid().expect("running"));
        assert_eq!(listeners.len(), 3, "client, peer, metrics: {listeners:?}");
        assert!(
            listeners.iter().all(|a| a.starts_with("0100007F:")),
            "etcd listens on 127.0.0.1 only: {listeners:?}"
        );

        etcdctl(&url, &["put", &k, "v1"]);
        assert_eq!(
            etcdctl(&url, &["get", &k, "--print-value-only"]).trim(),
            "v1"
        );

        etcd.kill();
        assert!(etcd.pid().is_none());
        let down = etcd.health(Duration::from_secs(1));
        assert!(down.is_err(), "health after kill: {down:?}");

        let started = Instant::now();
        etcd.restart();
        eprintln!("restart after SIGKILL took {:?}", started.elapsed());
        assert_eq!(
            etcdctl(&url, &["get", &k, "--print-value-only"]).trim(),
            "v1",
            "the key survives a kill and restart"
        );

        etcd.pause();
        let timeout = Duration::from_millis(500);
        let probe = Instant::now();
        let paused = etcd.health(timeout);
        assert!(paused.is_err(), "health while paused: {paused:?}");
        assert!(
            probe.elapsed() >= timeout,
            "a paused etcd times out rather than refusing ({paused:?} after {:?})",
            probe.elapsed()
        );

        etcd.resume();
        wait_for("etcd to answer after SIGCONT", HEALTHY_DEADLINE, || {
            etcd.health(Duration::from_secs(1)).ok()
        });
        etcdctl(&url, &["put", &k, "v2"]);

        assert_gone_after_drop(etcd);
    }

    /// Drop `etcd` and check that its process is gone (reaped, not left
    /// as a zombie or still stopped).
    fn assert_gone_after_drop(etcd: Etcd) {
        let pid = etcd.pid().expect("running");
        drop(etcd);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "etcd {pid} is gone after drop"
        );
    }

    #[test]
    fn drop_reaps_a_paused_member() {
        let etcd = Etcd::start_with(EtcdOptions {
            max_request_bytes: Some(8 * 1024 * 1024),
            extra_args: vec!["--auto-compaction-retention=0".into()],
        });
        etcd.pause();
        assert_gone_after_drop(etcd);
    }

    #[test]
    fn cluster_elects_a_new_leader() {
        let mut cluster = EtcdCluster::start(3);
        cluster.wait_healthy();
        let endpoints = cluster.client_urls().join(",");
        let k = key("cluster");
        etcdctl(&endpoints, &["put", &k, "before"]);

        let leader = wait_for("a leader", HEALTHY_DEADLINE, || cluster.leader_index());
        let started = Instant::now();
        cluster.members[leader].stop();
        eprintln!("stopping the leader took {:?}", started.elapsed());

        let next = wait_for("a new leader", HEALTHY_DEADLINE, || {
            cluster.leader_index().filter(|&i| i != leader)
        });
        eprintln!("new leader m{next} after {:?}", started.elapsed());
        cluster.wait_healthy();
        etcdctl(&endpoints, &["put", &k, "after"]);
        assert_eq!(
            etcdctl(&endpoints, &["get", &k, "--print-value-only"]).trim(),
            "after"
        );

        let started = Instant::now();
        cluster.members[leader].restart();
        eprintln!("old leader rejoined after {:?}", started.elapsed());
        cluster.wait_healthy();
    }
}

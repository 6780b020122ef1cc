//! One granted command as a process: spawned without a shell into a
//! process group of its own, with only the operator's environment and
//! working directory, watched until it exits or must be killed.
//!
//! Owns spawning, the tails of its output, and the kills: at the end of its
//! time (its timeout, or the deadline of the `run` call waiting on it) or
//! at a stop (an unload or a shutdown past its grace), SIGKILL goes to the
//! whole process group, so what the command started dies with it. A
//! process group that still holds its output pipes [`PIPE_GRACE`] after
//! its leader exited is killed too. Everything here runs on plain threads
//! (a reaper per process, a reader per pipe); nothing blocks an async
//! runtime. It must not decide what runs: the argv, environment and
//! directory arrive checked.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Most bytes kept of the end of each output stream.
pub const TAIL: usize = 4096;
/// How long after its leader exited a command's output pipes may stay
/// open (held by processes it started) before its group is killed, and
/// again before their readers are let go.
const PIPE_GRACE: Duration = Duration::from_millis(500);
/// How long a killed process is waited for to be reaped.
const REAP_BOUND: Duration = Duration::from_secs(5);

/// What runs: checked by the grant.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The operator's name for the command.
    pub name: String,
    /// The argv, `{file}` substituted; `argv[0]` an absolute path.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Arc<BTreeMap<String, String>>,
    /// The working directory.
    pub dir: PathBuf,
    /// How long it may run.
    pub timeout: Duration,
}

/// Messages to the thread watching a process.
#[derive(Debug)]
pub enum Msg {
    /// The process with this id exited (or could not be waited for).
    Exited(u32, std::io::Result<ExitStatus>),
    /// Kill what runs at this instant (unload, shutdown).
    Stop(Instant),
}

/// Why a command was killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Killed {
    /// Its timeout or the call's deadline passed.
    TimedOut,
    /// The plugin was unloaded or the gateway shut down.
    Stopped,
}

/// How a command ended.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Its exit code; `None` when a signal ended it.
    pub exit_code: Option<i32>,
    /// Killed by the host, and why.
    pub killed: Option<Killed>,
    /// The end of its stdout.
    pub stdout_tail: String,
    /// The end of its stderr.
    pub stderr_tail: String,
    /// How long it ran.
    pub duration: Duration,
}

impl Finished {
    /// A failure for the metrics: a non-zero exit, a kill or a signal.
    pub fn failed(&self) -> bool {
        self.exit_code != Some(0) || self.killed.is_some()
    }
}

/// The last [`TAIL`] bytes written to a pipe.
#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    closed: bool,
}

fn read_tail(mut pipe: impl std::io::Read + Send + 'static) -> Arc<Mutex<Tail>> {
    let tail = Arc::new(Mutex::new(Tail::default()));
    let t = tail.clone();
    let spawned = std::thread::Builder::new()
        .name("command-output".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut t = t.lock();
                        t.bytes.extend_from_slice(&buf[..n]);
                        if t.bytes.len() > TAIL {
                            let cut = t.bytes.len() - TAIL;
                            t.bytes.drain(..cut);
                        }
                    }
                }
            }
            t.lock().closed = true;
        });
    if spawned.is_err() {
        tail.lock().closed = true;
    }
    tail
}

/// `bytes` as text of at most [`TAIL`] bytes, from a character boundary.
pub fn tail_text(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    if s.len() <= TAIL {
        return s.into_owned();
    }
    let from = s.ceil_char_boundary(s.len() - TAIL);
    s[from..].to_owned()
}

/// Send SIGKILL to process group `pgid`.
pub fn kill_group(pgid: u32) {
    #[cfg(target_os = "linux")]
    if let Some(pid) = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = pgid;
}

/// Run `spec` until it exits, `until` passes, or a [`Msg::Stop`] on
/// `rx` says when to kill it; `tx` is the sending end of `rx`, handed to
/// the reaper thread.
///
/// # Errors
/// When the process cannot be started.
pub fn run(
    spec: &Spec,
    until: Instant,
    mut stop_at: Option<Instant>,
    tx: &Sender<Msg>,
    rx: &Receiver<Msg>,
) -> Result<Finished, String> {
    let started = Instant::now();
    let mut child = std::process::Command::new(&spec.argv[0])
        .args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter())
        .current_dir(&spec.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| {
            format!(
                "command `{}`: cannot start {:?}: {e}",
                spec.name, spec.argv[0]
            )
        })?;
    let pid = child.id();
    let out = child.stdout.take().map(read_tail);
    let err = child.stderr.take().map(read_tail);
    let reaper_tx = tx.clone();
    let reaper = std::thread::Builder::new()
        .name("command-reaper".into())
        .spawn(move || {
            let status = child.wait();
            let _ = reaper_tx.send(Msg::Exited(pid, status));
        });
    if let Err(e) = reaper {
        // The child went with the closure: kill it, nothing can wait.
        kill_group(pid);
        return Err(format!("command `{}`: cannot watch it: {e}", spec.name));
    }
    let mut killed = None;
    let status = loop {
        let (at, why) = match stop_at {
            Some(s) if s < until => (s, Killed::Stopped),
            _ => (until, Killed::TimedOut),
        };
        let now = Instant::now();
        if killed.is_none() && now >= at {
            // Not reaped yet (its exit would have been received), so the
            // group id is still this command's.
            kill_group(pid);
            killed = Some(why);
            continue;
        }
        let wait = if killed.is_some() {
            REAP_BOUND
        } else {
            at - now
        };
        match rx.recv_timeout(wait) {
            Ok(Msg::Exited(p, status)) if p == pid => break status.ok(),
            Ok(Msg::Exited(..)) => {}
            Ok(Msg::Stop(s)) => stop_at = Some(stop_at.map_or(s, |o| o.min(s))),
            Err(RecvTimeoutError::Timeout) if killed.is_some() => break None,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break None,
        }
    };
    let duration = started.elapsed();
    // Processes the command left behind may hold its pipes open.
    let closed = |t: &Option<Arc<Mutex<Tail>>>| t.as_ref().is_none_or(|t| t.lock().closed);
    let pipes_closed = |by: Instant| {
        while Instant::now() < by {
            if closed(&out) && closed(&err) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        closed(&out) && closed(&err)
    };
    if !pipes_closed(Instant::now() + PIPE_GRACE) {
        kill_group(pid);
        pipes_closed(Instant::now() + PIPE_GRACE);
    }
    let text = |t: &Option<Arc<Mutex<Tail>>>| {
        t.as_ref()
            .map(|t| tail_text(&t.lock().bytes))
            .unwrap_or_default()
    };
    Ok(Finished {
        exit_code: status.and_then(|s| s.code()),
        killed,
        stdout_tail: text(&out),
        stderr_tail: text(&err),
        duration,
    })
}

/// Send SIGHUP to the process whose id is in `pid_file`.
///
/// # Errors
/// A missing or unreadable file, a file that holds no pid above 1, or no
/// such process.
pub fn hangup(pid_file: &std::path::Path) -> Result<u32, String> {
    let shown = pid_file.display();
    let mut text = String::new();
    std::fs::File::open(pid_file)
        .and_then(|f| f.take(64).read_to_string(&mut text))
        .map_err(|e| format!("pid file {shown}: {e}"))?;
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| format!("pid file {shown} does not hold a process id above 1"))?;
    #[cfg(target_os = "linux")]
    {
        let p = rustix::process::Pid::from_raw(pid)
            .ok_or_else(|| format!("pid file {shown}: bad process id {pid}"))?;
        rustix::process::kill_process(p, rustix::process::Signal::HUP)
            .map_err(|e| format!("SIGHUP to process {pid} (from {shown}): {e}"))?;
        Ok(pid.unsigned_abs())
    }
    #[cfg(not(target_os = "linux"))]
    Err(format!("signals are supported on Linux only (pid {pid})"))
}

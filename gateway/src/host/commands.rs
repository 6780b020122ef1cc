//! The `commands` capability: commands and signals the operator granted by
//! name.
//!
//! Owns the grant ([`CommandsGrant`]): its checks at load ([`validate`]),
//! the substitution of `{file}` by the absolute path of a file inside the
//! plugin's `files` grant (resolved like a write's target, so `..`,
//! absolute paths and symlinks out are refused), and the [`Runner`] that
//! bounds what runs: at most [`MAX_RUNNING`] commands of one plugin at
//! once, one triggered run per command with any number of further
//! triggers folded into one re-run, each run ended at its timeout (and, for
//! `run`, at the call's deadline). An unload or a shutdown stops its runner:
//! no more runs, and what still runs at the end of the grace is killed,
//! process group and all ([`Supervisor`] reaches every runner at shutdown).
//! Every run is counted, timed and logged with the tails of its output
//! through the plugin's log. A plugin names an entry; it never chooses the
//! argv, environment or working directory. Processes are [`process`]'s.

pub mod process;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::files::FilesGrant;
use super::log::{Level, PluginLog, Stream};
use super::{Grants, HostState, wit};
use crate::telemetry::Metrics;
use process::{Finished, Killed, Msg, Spec};

/// Most commands of one plugin running at once.
pub const MAX_RUNNING: usize = 4;
/// How long a command may run unless `command_timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// What a command's argv says where the plugin's file goes.
pub const FILE: &str = "{file}";
/// Most commands, and most signals, one grant may name.
pub const MAX_NAMES: usize = 64;

/// Whether `name` may name a command or a signal.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Check the `commands`, `command_*` and `signals` grants of a sidecar.
///
/// # Errors
/// The first problem, naming its key.
pub fn validate(g: &Grants) -> Result<(), String> {
    if g.commands.len() > MAX_NAMES || g.signals.len() > MAX_NAMES {
        return Err(format!(
            "grants.commands and grants.signals name at most {MAX_NAMES} entries each"
        ));
    }
    for (name, argv) in &g.commands {
        let key = format!("grants.commands.{name}");
        if !valid_name(name) {
            return Err(format!(
                "grants.commands: {name:?} must be 1-64 characters of A-Z a-z 0-9 - _ ."
            ));
        }
        let Some(program) = argv.first() else {
            return Err(format!(
                "{key}: give the argv, program first (an absolute path)"
            ));
        };
        if !Path::new(program).is_absolute() || program.contains(FILE) {
            return Err(format!(
                "{key}: the program {program:?} must be an absolute path (there is no shell and no PATH lookup)"
            ));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(format!("{key}: an argument holds a NUL byte"));
        }
        if g.files.is_none() && argv.iter().any(|a| a.contains(FILE)) {
            return Err(format!(
                "{key} uses {FILE}, which names a file inside the files grant, but there is no grants.files"
            ));
        }
    }
    for (k, v) in &g.command_env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(format!(
                "grants.command_env: {k:?} is not a usable environment variable"
            ));
        }
    }
    if g.commands.is_empty()
        && (!g.command_env.is_empty() || g.command_dir.is_some() || g.command_timeout.is_some())
    {
        return Err(
            "grants.command_env, command_dir and command_timeout apply to grants.commands, which names none".into(),
        );
    }
    if g.command_timeout.is_some_and(|t| t.is_zero()) {
        return Err("grants.command_timeout must be more than 0".into());
    }
    for (name, pid_file) in &g.signals {
        if !valid_name(name) {
            return Err(format!(
                "grants.signals: {name:?} must be 1-64 characters of A-Z a-z 0-9 - _ ."
            ));
        }
        if pid_file.as_os_str().is_empty() {
            return Err(format!("grants.signals.{name}: give the pid file"));
        }
    }
    Ok(())
}

/// A plugin-supplied string as shown in a refusal.
fn shown(s: &str) -> String {
    let cut = s.floor_char_boundary(64);
    if cut < s.len() {
        format!("{:?}…", &s[..cut])
    } else {
        format!("{s:?}")
    }
}

/// One plugin's granted commands and signals.
pub struct CommandsGrant {
    commands: BTreeMap<String, Vec<String>>,
    env: Arc<BTreeMap<String, String>>,
    dir: PathBuf,
    timeout: Duration,
    signals: BTreeMap<String, PathBuf>,
    grace: Duration,
    runner: Arc<Runner>,
}

impl std::fmt::Debug for CommandsGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandsGrant")
            .field("commands", &self.commands)
            .field("signals", &self.signals)
            .finish_non_exhaustive()
    }
}

impl Drop for CommandsGrant {
    /// The plugin version is gone (unloaded, replaced): no more runs, and
    /// what runs is killed once the grace has passed.
    fn drop(&mut self) {
        self.runner.stop(Instant::now() + self.grace);
    }
}

impl CommandsGrant {
    /// The grant of `grants` (none when it names no command or signal).
    /// `files_root` is the `files` grant's directory (the default working
    /// directory); an unload waits `grace` for running commands;
    /// `supervisor`, when given, can stop them all at shutdown.
    pub fn new(
        grants: &Grants,
        files_root: Option<&Path>,
        log: Arc<PluginLog>,
        metrics: Arc<Metrics>,
        grace: Duration,
        supervisor: Option<&Supervisor>,
    ) -> Option<CommandsGrant> {
        if grants.commands.is_empty() && grants.signals.is_empty() {
            return None;
        }
        let runner = Arc::new(Runner {
            log,
            metrics,
            state: Mutex::default(),
            idle: Condvar::new(),
        });
        if let Some(s) = supervisor {
            s.register(&runner);
        }
        Some(CommandsGrant {
            commands: grants.commands.clone(),
            env: Arc::new(grants.command_env.clone()),
            dir: grants
                .command_dir
                .clone()
                .or_else(|| files_root.map(Path::to_owned))
                .unwrap_or_else(|| PathBuf::from("/")),
            timeout: grants.command_timeout.unwrap_or(DEFAULT_TIMEOUT),
            signals: grants.signals.clone(),
            grace,
            runner,
        })
    }

    /// Its runner (for `plugin test` to wait on).
    pub fn runner(&self) -> &Arc<Runner> {
        &self.runner
    }

    /// What command `name` runs with `file`: the argv with `{file}`
    /// replaced by the file's absolute path inside `files`.
    ///
    /// # Errors
    /// `(outcome, message)`: `denied` for an ungranted name (the message
    /// names the granted ones) or a path outside the grant, `invalid` for a
    /// command that needs a file and was given none.
    pub fn spec(
        &self,
        name: &str,
        file: Option<&str>,
        files: Option<&FilesGrant>,
    ) -> Result<Spec, (&'static str, String)> {
        let Some(argv) = self.commands.get(name) else {
            let granted: Vec<&String> = self.commands.keys().collect();
            return Err((
                "denied",
                format!(
                    "command {} is not granted to this plugin (granted: {granted:?})",
                    shown(name)
                ),
            ));
        };
        let mut argv = argv.clone();
        if argv.iter().skip(1).any(|a| a.contains(FILE)) {
            let Some(file) = file else {
                return Err((
                    "invalid",
                    format!("command `{name}` takes a file ({FILE} is in its argv); give one"),
                ));
            };
            let Some(files) = files else {
                return Err((
                    "denied",
                    format!("command `{name}` takes a file, but there is no files grant"),
                ));
            };
            let path = files
                .resolve(file)
                .map_err(|e| ("denied", format!("command `{name}`: {e}")))?;
            let Some(path) = path.to_str() else {
                return Err((
                    "invalid",
                    format!("command `{name}`: the path is not UTF-8"),
                ));
            };
            for a in argv.iter_mut().skip(1) {
                *a = a.replace(FILE, path);
            }
        }
        Ok(Spec {
            name: name.to_owned(),
            argv,
            env: self.env.clone(),
            dir: self.dir.clone(),
            timeout: self.timeout,
        })
    }

    /// The pid file granted as `name`.
    ///
    /// # Errors
    /// `(denied, message)` naming the granted signals.
    pub fn pid_file(&self, name: &str) -> Result<&Path, (&'static str, String)> {
        self.signals.get(name).map(PathBuf::as_path).ok_or_else(|| {
            let granted: Vec<&String> = self.signals.keys().collect();
            (
                "denied",
                format!(
                    "signal {} is not granted to this plugin (granted: {granted:?})",
                    shown(name)
                ),
            )
        })
    }
}

/// What one plugin's commands are doing.
#[derive(Default)]
struct RunnerState {
    /// Commands running (a triggered command and its re-runs count once).
    running: usize,
    /// Triggered commands running, by name, each with its pending re-run.
    triggered: HashMap<String, Option<Spec>>,
    /// Stopping: what runs is killed at this instant.
    kill_at: Option<Instant>,
    /// The threads watching a process, to tell of a stop.
    live: HashMap<u64, Sender<Msg>>,
    next_id: u64,
}

/// Runs one plugin's commands, within its bounds, and stops them.
pub struct Runner {
    log: Arc<PluginLog>,
    metrics: Arc<Metrics>,
    state: Mutex<RunnerState>,
    idle: Condvar,
}

/// A run's place among the plugin's running commands.
struct Slot {
    id: u64,
    tx: Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
}

impl Runner {
    fn plugin(&self) -> &str {
        self.log.plugin()
    }

    fn begin(&self, st: &mut RunnerState) -> Result<Slot, (&'static str, String)> {
        if st.kill_at.is_some() {
            return Err(("error", "the plugin is stopping; no more commands".into()));
        }
        if st.running >= MAX_RUNNING {
            return Err((
                "busy",
                format!(
                    "{MAX_RUNNING} commands of this plugin are already running; try again later"
                ),
            ));
        }
        st.running += 1;
        st.next_id += 1;
        let (tx, rx) = mpsc::channel();
        st.live.insert(st.next_id, tx.clone());
        Ok(Slot {
            id: st.next_id,
            tx,
            rx,
        })
    }

    fn end(&self, st: &mut RunnerState, slot: &Slot) {
        st.running -= 1;
        st.live.remove(&slot.id);
        if st.running == 0 {
            self.idle.notify_all();
        }
    }

    /// Run `spec` until it ends or `until`, on this thread.
    fn execute(&self, spec: &Spec, until: Instant, slot: &Slot) -> Result<Finished, String> {
        let stop_at = self.state.lock().kill_at;
        let until = until.min(Instant::now() + spec.timeout);
        let r = process::run(spec, until, stop_at, &slot.tx, &slot.rx);
        self.record(spec, &r);
        r
    }

    /// Run `spec` and wait for it, at most its timeout and `until`.
    ///
    /// # Errors
    /// `(outcome, message)`: `busy` at [`MAX_RUNNING`], `error` when the
    /// plugin is stopping or the command cannot start.
    pub fn run(&self, spec: &Spec, until: Instant) -> Result<Finished, (&'static str, String)> {
        let slot = self.begin(&mut self.state.lock())?;
        let r = self.execute(spec, until, &slot);
        self.end(&mut self.state.lock(), &slot);
        r.map_err(|e| ("error", e))
    }

    /// Start `spec` in the background and return at once; `Ok(false)` when
    /// it is already running and this request became (or joined) its one
    /// pending re-run, which runs with the latest `spec`.
    ///
    /// # Errors
    /// `(outcome, message)`: `busy` at [`MAX_RUNNING`], `error` when the
    /// plugin is stopping or no thread can be started.
    pub fn trigger(self: &Arc<Self>, spec: Spec) -> Result<bool, (&'static str, String)> {
        let mut st = self.state.lock();
        if st.kill_at.is_some() {
            return Err(("error", "the plugin is stopping; no more commands".into()));
        }
        if let Some(pending) = st.triggered.get_mut(&spec.name) {
            *pending = Some(spec);
            return Ok(false);
        }
        let slot = self.begin(&mut st)?;
        st.triggered.insert(spec.name.clone(), None);
        drop(st);
        let runner = self.clone();
        let name = spec.name.clone();
        let mut next = spec;
        let spawned = std::thread::Builder::new()
            .name(format!("command-{name}"))
            .spawn(move || {
                loop {
                    let until = Instant::now() + next.timeout;
                    let _ = runner.execute(&next, until, &slot);
                    let mut guard = runner.state.lock();
                    let st = &mut *guard;
                    let pending = match st.triggered.get_mut(&next.name) {
                        Some(p) if st.kill_at.is_none() => p.take(),
                        _ => None,
                    };
                    match pending {
                        Some(spec) => next = spec,
                        None => {
                            st.triggered.remove(&next.name);
                            runner.end(st, &slot);
                            return;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            let mut st = self.state.lock();
            st.triggered.remove(&name);
            st.running -= 1;
            if st.running == 0 {
                self.idle.notify_all();
            }
            return Err((
                "error",
                format!("cannot start a thread for the command: {e}"),
            ));
        }
        Ok(true)
    }

    /// Stop: no more runs or re-runs, and what still runs at `kill_at` is
    /// killed. An earlier stop's instant stands when it is sooner.
    pub fn stop(&self, kill_at: Instant) {
        let mut st = self.state.lock();
        let at = st.kill_at.map_or(kill_at, |k| k.min(kill_at));
        st.kill_at = Some(at);
        for pending in st.triggered.values_mut() {
            *pending = None;
        }
        for tx in st.live.values() {
            let _ = tx.send(Msg::Stop(at));
        }
    }

    /// Wait until no command of the plugin runs, at most until `by`; true
    /// when none does.
    pub fn wait_idle(&self, by: Instant) -> bool {
        let mut st = self.state.lock();
        while st.running > 0 {
            if self.idle.wait_until(&mut st, by).timed_out() {
                return st.running == 0;
            }
        }
        true
    }

    /// Count, time and log one run.
    fn record(&self, spec: &Spec, r: &Result<Finished, String>) {
        let plugin = self.plugin();
        let (level, summary) = match r {
            Err(e) => (Level::Error, e.clone()),
            Ok(f) => {
                let how = match (f.killed, f.exit_code) {
                    (Some(Killed::TimedOut), _) => "was killed at its timeout".to_owned(),
                    (Some(Killed::Stopped), _) => "was killed by the plugin's stop".to_owned(),
                    (None, Some(code)) => format!("exited with {code}"),
                    (None, None) => "was ended by a signal".to_owned(),
                };
                let level = if f.failed() { Level::Warn } else { Level::Info };
                (
                    level,
                    format!(
                        "command `{}` {how} after {} ms",
                        spec.name,
                        f.duration.as_millis()
                    ),
                )
            }
        };
        let seconds = r.as_ref().map_or(0.0, |f| f.duration.as_secs_f64());
        let failed = r.as_ref().map_or(true, Finished::failed);
        self.metrics
            .command_ran(plugin, &spec.name, seconds, failed);
        self.log.line(level, Stream::Log, &summary);
        if let Ok(f) = r {
            // Each line stays under the log's bound with its prefix.
            for (stream, tail) in [("stdout", &f.stdout_tail), ("stderr", &f.stderr_tail)] {
                if !tail.trim().is_empty() {
                    let t = tail.trim_end();
                    let from = t.ceil_char_boundary(t.len().saturating_sub(3900));
                    let message = format!("command `{}` {stream}: {}", spec.name, &t[from..]);
                    self.log.line(level, Stream::Log, &message);
                }
            }
        }
    }
}

/// Every runner of the gateway, to stop them all at shutdown.
#[derive(Clone, Default)]
pub struct Supervisor(Arc<Mutex<Vec<Weak<Runner>>>>);

impl Supervisor {
    fn register(&self, runner: &Arc<Runner>) {
        let mut v = self.0.lock();
        v.retain(|r| r.strong_count() > 0);
        v.push(Arc::downgrade(runner));
    }

    fn live(&self) -> Vec<Arc<Runner>> {
        self.0.lock().iter().filter_map(Weak::upgrade).collect()
    }

    /// Stop every runner: what still runs at `kill_at` is killed.
    pub fn stop_all(&self, kill_at: Instant) {
        for r in self.live() {
            r.stop(kill_at);
        }
    }

    /// Wait until no command runs, at most until `by`; true when none does.
    pub fn wait_idle(&self, by: Instant) -> bool {
        self.live().iter().all(|r| r.wait_idle(by))
    }
}

impl From<Finished> for wit::commands::RunResult {
    fn from(f: Finished) -> Self {
        wit::commands::RunResult {
            exit_code: f.exit_code,
            timed_out: f.killed.is_some(),
            stdout_tail: f.stdout_tail,
            stderr_tail: f.stderr_tail,
            duration_ms: u64::try_from(f.duration.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

impl HostState {
    /// The commands grant and the checked spec of command `name`, reported
    /// to `plugin test` as operation `op`.
    fn command(
        &self,
        op: &str,
        name: &str,
        file: Option<&str>,
    ) -> Result<(&CommandsGrant, Spec), String> {
        let Some(grant) = &self.ctx.commands else {
            return Err(self.not_granted("commands"));
        };
        let spec = grant
            .spec(name, file, self.ctx.files.as_ref())
            .map_err(|e| self.refused("commands", e))?;
        self.ctx.effects.report(
            &self.ctx.name,
            "commands",
            serde_json::json!({
                "op": op,
                "name": name,
                "argv": spec.argv,
                "env": *spec.env,
                "dir": spec.dir,
                "timeout_ms": spec.timeout.as_millis() as u64,
            }),
        );
        Ok((grant, spec))
    }
}

impl wit::commands::Host for HostState {
    fn run(
        &mut self,
        name: String,
        file: Option<String>,
    ) -> Result<wit::commands::RunResult, String> {
        let (grant, spec) = self.command("run", &name, file.as_deref())?;
        if !self.ctx.effects.perform {
            self.count("commands", "ok");
            return Ok(wit::commands::RunResult {
                exit_code: Some(0),
                timed_out: false,
                stdout_tail: String::new(),
                stderr_tail: String::new(),
                duration_ms: 0,
            });
        }
        let runner = grant.runner.clone();
        match runner.run(&spec, self.waits_end()) {
            Ok(f) => {
                self.count("commands", "ok");
                Ok(f.into())
            }
            Err(e) => Err(self.refused("commands", e)),
        }
    }

    fn trigger(&mut self, name: String, file: Option<String>) -> Result<(), String> {
        let (grant, spec) = self.command("trigger", &name, file.as_deref())?;
        if !self.ctx.effects.perform {
            self.count("commands", "ok");
            return Ok(());
        }
        match grant.runner.trigger(spec) {
            Ok(true) => {
                self.count("commands", "ok");
                Ok(())
            }
            Ok(false) => {
                self.count("commands", "coalesced");
                Ok(())
            }
            Err(e) => Err(self.refused("commands", e)),
        }
    }

    fn signal(&mut self, name: String) -> Result<(), String> {
        let Some(grant) = &self.ctx.commands else {
            return Err(self.not_granted("commands"));
        };
        let pid_file = grant
            .pid_file(&name)
            .map_err(|e| self.refused("commands", e))?
            .to_owned();
        self.ctx.effects.report(
            &self.ctx.name,
            "commands",
            serde_json::json!({"op": "signal", "name": name, "pid_file": pid_file, "signal": "HUP"}),
        );
        if !self.ctx.effects.perform {
            self.count("commands", "ok");
            return Ok(());
        }
        match process::hangup(&pid_file) {
            Ok(pid) => {
                self.count("commands", "ok");
                self.ctx.log.line(
                    Level::Info,
                    Stream::Log,
                    &format!("signal `{name}`: SIGHUP sent to process {pid}"),
                );
                Ok(())
            }
            Err(e) => Err(self.refused("commands", ("error", e))),
        }
    }
}

#[cfg(test)]
mod tests;

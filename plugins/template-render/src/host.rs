//! The host capabilities template-render uses, behind a trait.
//!
//! The plugin logic in [`crate::apply`] talks to [`Host`] rather than to the
//! SDK directly, so the whole event flow runs in native unit tests against
//! an in-memory fake. [`Sdk`] is the real implementation; nothing here adds
//! behaviour of its own.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use watchgate_sdk::{commands, files, log, settings, snapshot, state};

/// How a command run ended (the host's `run-result`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunResult {
    /// Its exit code; `None` when it was killed.
    pub exit_code: Option<i32>,
    /// Killed for passing its timeout.
    pub timed_out: bool,
    /// The end of its standard output.
    pub stdout_tail: String,
    /// The end of its standard error.
    pub stderr_tail: String,
    /// How long it ran, in milliseconds.
    pub duration_ms: u64,
}

/// State, settings, files, commands, the snapshot, a clock and logging, as
/// the plugin needs them.
pub trait Host {
    /// Reads state `key`.
    fn state_get(&self, key: &str) -> Option<Vec<u8>>;
    /// Sets or (with `None`) removes state `key`.
    ///
    /// # Errors
    ///
    /// The host's message, for example when the state quota is exceeded.
    fn state_set(&self, key: &str, value: Option<&[u8]>) -> Result<(), String>;
    /// The sidecar setting `name` as text.
    fn setting(&self, name: &str) -> Option<String>;
    /// File `path` in the files grant; `None` when it does not exist.
    ///
    /// # Errors
    ///
    /// The host's message: no grant, path refused, or the read failed.
    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, String>;
    /// Atomically replaces file `path` in the files grant.
    ///
    /// # Errors
    ///
    /// As for [`Host::read_file`].
    fn replace_file(&self, path: &str, data: &[u8]) -> Result<(), String>;
    /// Renames `from` over `to`, both in the files grant, atomically.
    ///
    /// # Errors
    ///
    /// As for [`Host::read_file`].
    fn rename_file(&self, from: &str, to: &str) -> Result<(), String>;
    /// Removes `path` from the files grant; a missing file is fine.
    ///
    /// # Errors
    ///
    /// As for [`Host::read_file`].
    fn remove_file(&self, path: &str) -> Result<(), String>;
    /// Runs granted command `name` (with `{file}` standing for `file`) and
    /// waits for it.
    ///
    /// # Errors
    ///
    /// The host's message: not granted, or it could not start.
    fn run(&self, name: &str, file: Option<&str>) -> Result<RunResult, String>;
    /// Starts granted command `name` in the background.
    ///
    /// # Errors
    ///
    /// As for [`Host::run`].
    fn trigger(&self, name: &str, file: Option<&str>) -> Result<(), String>;
    /// Every key of `source` the plugin subscribes to, with its current
    /// value, in key order.
    ///
    /// # Errors
    ///
    /// The host's message: no snapshot grant, or the result is too large.
    fn scan(&self, source: &str) -> Result<Vec<(String, Vec<u8>)>, String>;
    /// A monotonic clock: time since some fixed point.
    fn now(&self) -> Duration;
    /// Sleeps for `d` (cut short by the call's deadline).
    fn sleep(&self, d: Duration);
    /// Logs at info level.
    fn info(&self, message: &str);
    /// Logs at warn level.
    fn warn(&self, message: &str);
}

/// The watchgate host, through the SDK.
pub struct Sdk;

impl Host for Sdk {
    fn state_get(&self, key: &str) -> Option<Vec<u8>> {
        state::get(key)
    }

    fn state_set(&self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        state::set(key, value)
    }

    fn setting(&self, name: &str) -> Option<String> {
        settings::get(name)
    }

    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        files::read(path)
    }

    fn replace_file(&self, path: &str, data: &[u8]) -> Result<(), String> {
        files::replace(path, data)
    }

    fn rename_file(&self, from: &str, to: &str) -> Result<(), String> {
        files::rename(from, to)
    }

    fn remove_file(&self, path: &str) -> Result<(), String> {
        files::remove(path)
    }

    fn run(&self, name: &str, file: Option<&str>) -> Result<RunResult, String> {
        commands::run(name, file).map(|r| RunResult {
            exit_code: r.exit_code,
            timed_out: r.timed_out,
            stdout_tail: r.stdout_tail,
            stderr_tail: r.stderr_tail,
            duration_ms: r.duration_ms,
        })
    }

    fn trigger(&self, name: &str, file: Option<&str>) -> Result<(), String> {
        commands::trigger(name, file)
    }

    fn scan(&self, source: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        snapshot::scan(source, "")
    }

    fn now(&self) -> Duration {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }

    fn info(&self, message: &str) {
        log::info(message);
    }

    fn warn(&self, message: &str) {
        log::warn(message);
    }
}

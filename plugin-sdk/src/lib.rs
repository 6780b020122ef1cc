//! Write watchgate plugins in plain Rust.
//!
//! A plugin is a type that implements [`Plugin`] and is registered with
//! [`export!`]. The gateway hands it one typed [`Event`] per change of a
//! watched key; the plugin reacts through the host capabilities in
//! [`log`](mod@log), [`state`], [`files`], [`http`], [`kv`], [`snapshot`]
//! and [`commands`],
//! and declares itself with [`manifest!`]. Build it for `wasm32-wasip2`
//! as a `cdylib`: the output is a WebAssembly component the gateway loads.
//!
//! This crate owns the mapping between the WIT contract
//! (`watchgate:plugin@0.1.0`, world `plugin`) and that Rust API. It must not
//! grow policy of its own: limits, grants and retries belong to the host.
//! The generated bindings live in a hidden module and are not part of the
//! API.
//!
//! # Example
//!
//! A complete plugin that logs every change:
//!
//! ```no_run
//! use watchgate_sdk::{Event, Plugin, export, log};
//!
//! struct Echo;
//!
//! impl Plugin for Echo {
//!     fn handle(event: Event) -> Result<(), String> {
//!         let value = event.value_str().unwrap_or("<binary or deleted>");
//!         log::info(format!("{} {} = {value}", event.source, event.key));
//!         Ok(())
//!     }
//! }
//!
//! export!(Echo);
//! ```
//!
//! Returning `Err` counts and logs the failure in the gateway, which retries
//! the event with backoff and finally dead-letters it (the operator's
//! failure policy). A panic traps the instance, which the host replaces;
//! repeated traps quarantine the plugin until a probe succeeds.

use std::fmt;

/// Generated bindings for the `watchgate:plugin/plugin` world.
///
/// Not part of the public API: use [`Plugin`], [`Event`] and the capability
/// modules instead. Public only so that [`export!`] can reach it from the
/// plugin crate.
#[doc(hidden)]
// The generated export shim for `handle` takes the flattened event record as
// sixteen core-wasm parameters.
#[allow(clippy::too_many_arguments)]
pub mod wit {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_watchgate_plugin",
        default_bindings_module: "watchgate_sdk::wit",
    });
}

/// Registers a type implementing [`Plugin`] as the component's export.
///
/// Use it exactly once, at the top level of the plugin crate, with the name
/// of the type: `export!(MyPlugin);` (see the example on [`Plugin`]). It
/// expands to the export glue generated from the WIT world, which is why the
/// plugin crate needs no direct dependency on `wit-bindgen`.
#[macro_export]
macro_rules! export {
    ($ty:ident) => {
        $crate::wit::__export_watchgate_plugin!($ty with_types_in $crate::wit);
    };
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The key was created or its value changed.
    Put,
    /// The key was removed.
    Delete,
}

impl EventKind {
    /// The lowercase name used in logs and files: `"put"` or `"delete"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Put => "put",
            Self::Delete => "delete",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change of one key in one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Name of the source in the gateway config (`[[source]] name`).
    pub source: String,
    /// Put or delete.
    pub kind: EventKind,
    /// The key, relative to the source (for the file source: the path
    /// relative to the watched directory, with `/` separators).
    pub key: String,
    /// The new value; `None` on delete.
    pub value: Option<Vec<u8>>,
    /// The value before this change, when the source knows it.
    pub prev_value: Option<Vec<u8>>,
    /// The source's revision of this change; never decreases per key.
    pub revision: u64,
    /// True when the event was synthesized by a relist rather than observed
    /// as a change.
    pub resync: bool,
    /// How many further changes of this key were folded into this event
    /// because the plugin's queue was full (0 when none).
    pub coalesced: u32,
    /// Source-specific extras (for example an MD5, a content hash).
    pub metadata: Vec<(String, String)>,
}

impl Event {
    /// True when the key was removed.
    #[must_use]
    pub fn is_delete(&self) -> bool {
        self.kind == EventKind::Delete
    }

    /// True when the key was created or changed.
    #[must_use]
    pub fn is_put(&self) -> bool {
        self.kind == EventKind::Put
    }

    /// The new value as bytes; `None` on delete.
    #[must_use]
    pub fn value_bytes(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }

    /// The new value as UTF-8 text; `None` on delete or when the value is
    /// not valid UTF-8.
    #[must_use]
    pub fn value_str(&self) -> Option<&str> {
        self.value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The previous value as UTF-8 text; `None` when unknown or not valid
    /// UTF-8.
    #[must_use]
    pub fn prev_value_str(&self) -> Option<&str> {
        self.prev_value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The first metadata value stored under `name`.
    #[must_use]
    pub fn metadata(&self, name: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl From<wit::watchgate::plugin::types::Event> for Event {
    fn from(e: wit::watchgate::plugin::types::Event) -> Self {
        use wit::watchgate::plugin::types::EventKind as Wk;
        Self {
            source: e.source,
            kind: match e.kind {
                Wk::Put => EventKind::Put,
                Wk::Delete => EventKind::Delete,
            },
            key: e.key,
            value: e.value,
            prev_value: e.prev_value,
            revision: e.revision,
            resync: e.resync,
            coalesced: e.coalesced,
            metadata: e.metadata,
        }
    }
}

/// Why a batch stopped: every event before `index` was handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// Index of the first event that was not handled.
    pub index: u32,
    /// Why handling stopped.
    pub message: String,
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "event {}: {}", self.index, self.message)
    }
}

impl std::error::Error for BatchError {}

/// A watchgate plugin: a handler for events.
///
/// Implement it on a unit struct and register the type with [`export!`].
/// Each call gets its own event; keep anything that must outlive an instance
/// in [`state`], since the host may replace the instance at any time (for
/// example after a trap).
///
/// # Example
///
/// ```no_run
/// use watchgate_sdk::{Event, Plugin, export, log};
///
/// struct Echo;
///
/// impl Plugin for Echo {
///     fn handle(event: Event) -> Result<(), String> {
///         let value = event.value_str().unwrap_or("<binary or deleted>");
///         log::info(format!("{} {} = {value}", event.source, event.key));
///         Ok(())
///     }
/// }
///
/// export!(Echo);
/// ```
pub trait Plugin {
    /// Handle one event.
    ///
    /// # Errors
    ///
    /// Return `Err` with a message when the event could not be handled. The
    /// gateway counts and logs it, retries it per the failure policy, then
    /// dead-letters it.
    fn handle(event: Event) -> Result<(), String>;

    /// Handle several events in order.
    ///
    /// The default calls [`Plugin::handle`] for each event and stops at the
    /// first error.
    ///
    /// # Errors
    ///
    /// Returns the index of the first event that failed and its message;
    /// all events before it were handled. An index outside `events` names
    /// no event: the gateway counts the whole batch as failed and calls
    /// [`Plugin::handle`] on each of its events.
    fn handle_batch(events: Vec<Event>) -> Result<(), BatchError> {
        for (index, event) in events.into_iter().enumerate() {
            if let Err(message) = Self::handle(event) {
                return Err(BatchError {
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    message,
                });
            }
        }
        Ok(())
    }
}

impl<T: Plugin> wit::Guest for T {
    fn handle(event: wit::watchgate::plugin::types::Event) -> Result<(), String> {
        T::handle(event.into())
    }

    fn handle_batch(
        events: Vec<wit::watchgate::plugin::types::Event>,
    ) -> Result<(), wit::watchgate::plugin::types::BatchError> {
        T::handle_batch(events.into_iter().map(Event::from).collect()).map_err(|e| {
            wit::watchgate::plugin::types::BatchError {
                index: e.index,
                message: e.message,
            }
        })
    }
}

pub mod log {
    //! Log lines into the gateway's own log, tagged with the plugin name.
    //!
    //! The host rate-limits logging per plugin, so a flood of lines is
    //! dropped rather than slowing the gateway. This module only forwards;
    //! it does not buffer or filter.
    //!
    //! ```no_run
    //! let key = "app/port";
    //! watchgate_sdk::log::info("rendered app.conf");
    //! watchgate_sdk::log!(warn, "key {key} is empty");
    //! ```

    use crate::wit::watchgate::plugin::log::{Level as WitLevel, log as host_log};

    /// Severity of a log line.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum Level {
        /// Very detailed tracing.
        Trace,
        /// Debugging detail.
        Debug,
        /// Normal operation.
        Info,
        /// Something unexpected that the plugin handled.
        Warn,
        /// Something failed.
        Error,
    }

    /// Write one log line at `level`.
    pub fn log(level: Level, message: impl AsRef<str>) {
        let level = match level {
            Level::Trace => WitLevel::Trace,
            Level::Debug => WitLevel::Debug,
            Level::Info => WitLevel::Info,
            Level::Warn => WitLevel::Warn,
            Level::Error => WitLevel::Error,
        };
        host_log(level, message.as_ref());
    }

    /// Write one line at trace level.
    pub fn trace(message: impl AsRef<str>) {
        log(Level::Trace, message);
    }

    /// Write one line at debug level.
    pub fn debug(message: impl AsRef<str>) {
        log(Level::Debug, message);
    }

    /// Write one line at info level.
    pub fn info(message: impl AsRef<str>) {
        log(Level::Info, message);
    }

    /// Write one line at warn level.
    pub fn warn(message: impl AsRef<str>) {
        log(Level::Warn, message);
    }

    /// Write one line at error level.
    pub fn error(message: impl AsRef<str>) {
        log(Level::Error, message);
    }
}

/// Formats and writes one log line: `log!(info, "count={}", n)`.
///
/// The first argument is the level (`trace`, `debug`, `info`, `warn`,
/// `error`); the rest are [`format!`] arguments.
#[macro_export]
macro_rules! log {
    (trace, $($arg:tt)+) => { $crate::log::trace(::std::format!($($arg)+)) };
    (debug, $($arg:tt)+) => { $crate::log::debug(::std::format!($($arg)+)) };
    (info, $($arg:tt)+) => { $crate::log::info(::std::format!($($arg)+)) };
    (warn, $($arg:tt)+) => { $crate::log::warn(::std::format!($($arg)+)) };
    (error, $($arg:tt)+) => { $crate::log::error(::std::format!($($arg)+)) };
}

pub mod state {
    //! A small per-plugin key/value store owned by the host.
    //!
    //! Values survive instance recycling (after a trap) and plugin
    //! replacement, so this is where a plugin keeps anything it must
    //! remember between events. The host enforces a quota; this module only
    //! forwards calls and adds no caching.

    use crate::wit::watchgate::plugin::state as host;

    /// Read a value; `None` when the key is unset.
    #[must_use]
    pub fn get(key: &str) -> Option<Vec<u8>> {
        host::get(key)
    }

    /// Set a value, or remove it with `None`. The host writes it to its
    /// store in the background; when too many of the plugin's writes are
    /// still waiting for the store, the call waits for room.
    ///
    /// # Errors
    ///
    /// Fails with the host's message when the plugin's state quota would be
    /// exceeded, or when no room came before the call's deadline was near.
    pub fn set(key: &str, value: Option<&[u8]>) -> Result<(), String> {
        host::set(key, value)
    }
}

pub mod settings {
    //! The operator's settings for this plugin: the `[settings]` table of
    //! its sidecar `NAME.toml`.
    //!
    //! ```no_run
    //! let url = watchgate_sdk::settings::get("url").ok_or("no url setting")?;
    //! # Ok::<(), &str>(())
    //! ```

    use crate::wit::watchgate::plugin::settings as host;

    /// The setting `name` as text (strings as written, other values in
    /// their TOML form); `None` when unset.
    #[must_use]
    pub fn get(name: &str) -> Option<String> {
        host::get(name)
    }
}

pub mod files {
    //! Access to the directory the operator granted.
    //!
    //! Available only with `[grants] files = "DIR"` in the plugin's sidecar.
    //! Paths are relative to that directory; absolute paths, `..` and
    //! symlinks leading out are refused by the host. Writes count against
    //! the grant's quota (`limits.files_mb`, `limits.files_count`). There is
    //! no listing.

    use crate::wit::watchgate::plugin::files as host;

    /// Append bytes to a file, creating it and its parent directories.
    ///
    /// # Errors
    ///
    /// Fails with the host's message when the plugin has no files grant, the
    /// path is refused, the grant's disk quota would be passed, or the write
    /// fails.
    pub fn append(path: &str, data: &[u8]) -> Result<(), String> {
        host::append(path, data)
    }

    /// Replace a file's contents atomically (the host writes a temporary
    /// file, then renames it over the target).
    ///
    /// # Errors
    ///
    /// Fails with the host's message when the plugin has no files grant, the
    /// path is refused, the grant's disk quota would be passed (the
    /// temporary file counts beside the old contents), or the write fails.
    pub fn replace(path: &str, data: &[u8]) -> Result<(), String> {
        host::replace(path, data)
    }

    /// A file's contents; `None` when it does not exist.
    ///
    /// # Errors
    ///
    /// Fails with the host's message when the plugin has no files grant, the
    /// path is refused, the file is larger than a read may return (the
    /// grant's `limits.files_mb`, at most 16 MiB; the message names the
    /// bound), or the read fails.
    pub fn read(path: &str) -> Result<Option<Vec<u8>>, String> {
        host::read(path)
    }

    /// Rename file `from` over `to` atomically, both inside the grant,
    /// creating the directories `to` needs.
    ///
    /// # Errors
    ///
    /// Fails with the host's message when the plugin has no files grant, a
    /// path is refused, `from` does not exist, the new directories would
    /// pass the quota, or the rename fails.
    pub fn rename(from: &str, to: &str) -> Result<(), String> {
        host::rename(from, to)
    }

    /// Remove a file; a file that does not exist is not an error.
    ///
    /// # Errors
    ///
    /// Fails with the host's message when the plugin has no files grant, the
    /// path is refused (a directory, a symlink) or the removal fails.
    pub fn remove(path: &str) -> Result<(), String> {
        host::remove(path)
    }
}

pub mod commands {
    //! Run the commands, and signal the processes, the operator granted by
    //! name.
    //!
    //! Available only with `[grants] commands = { NAME = [ARGV…] }` and
    //! `[grants] signals = { NAME = "PID FILE" }` in the plugin's sidecar.
    //! The plugin names an entry; the operator's grant fixes the argv, the
    //! environment and the working directory. `file`, a path inside the
    //! plugin's files grant, replaces `{file}` in the granted argv by its
    //! absolute path. A typical use renders a file, [`run`]s a check on it,
    //! renames it into place and [`trigger`]s a reload:
    //!
    //! ```no_run
    //! use watchgate_sdk::{commands, files};
    //!
    //! fn publish(conf: &[u8]) -> Result<(), String> {
    //!     files::replace("nginx.conf.new", conf)?;
    //!     let check = commands::run("check", Some("nginx.conf.new"))?;
    //!     if check.exit_code != Some(0) {
    //!         files::remove("nginx.conf.new")?;
    //!         return Err(format!("nginx -t failed: {}", check.stderr_tail));
    //!     }
    //!     files::rename("nginx.conf.new", "nginx.conf")?;
    //!     commands::trigger("reload", None)
    //! }
    //! ```

    use crate::wit::watchgate::plugin::commands as host;

    /// How a command run ended.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct RunResult {
        /// Its exit code; `None` when it was killed or ended by a signal.
        pub exit_code: Option<i32>,
        /// Killed for passing its timeout (`command_timeout`, 30 s by
        /// default) or the call's deadline, or by the plugin's unload.
        pub timed_out: bool,
        /// The end of its standard output (at most 4 KiB).
        pub stdout_tail: String,
        /// The end of its standard error (at most 4 KiB).
        pub stderr_tail: String,
        /// How long it ran, in milliseconds.
        pub duration_ms: u64,
    }

    impl RunResult {
        /// It exited with code 0.
        pub fn success(&self) -> bool {
            self.exit_code == Some(0) && !self.timed_out
        }
    }

    /// Run command `name` and wait for it to end, at most its timeout and
    /// the call's deadline (`limits.timeout_ms`; raise it for slow checks).
    /// A non-zero exit is a result, not an error.
    ///
    /// # Errors
    ///
    /// Fails with the host's message when the command is not granted (the
    /// message names the granted ones), `file` is refused or missing for a
    /// command whose argv has `{file}`, the plugin already runs its maximum
    /// of commands, or the command cannot start.
    pub fn run(name: &str, file: Option<&str>) -> Result<RunResult, String> {
        host::run(name, file).map(|r| RunResult {
            exit_code: r.exit_code,
            timed_out: r.timed_out,
            stdout_tail: r.stdout_tail,
            stderr_tail: r.stderr_tail,
            duration_ms: r.duration_ms,
        })
    }

    /// Start command `name` in the background and return at once. Asked
    /// again while it runs, it runs once more after it ends (with the
    /// latest `file`), however often it was asked. Its outcome is logged
    /// and counted by the host.
    ///
    /// # Errors
    ///
    /// As for [`run`], except that the command's own failure is not seen.
    pub fn trigger(name: &str, file: Option<&str>) -> Result<(), String> {
        host::trigger(name, file)
    }

    /// Send SIGHUP to the process whose id is in the pid file granted as
    /// `name`.
    ///
    /// # Errors
    ///
    /// Fails with the host's message when the signal is not granted, the
    /// pid file is missing or holds no process id, or there is no such
    /// process.
    pub fn signal(name: &str) -> Result<(), String> {
        host::signal(name)
    }
}

pub mod http {
    //! Outbound HTTP to the hosts the operator granted.
    //!
    //! Available only with `[grants] http = ["HOST:PORT", …]` in the
    //! plugin's sidecar. [`send`] queues the request and returns at once:
    //! the host sends it in the background with a timeout, retries with
    //! backoff, and a bound on requests in flight per plugin. The plugin
    //! never sees the response; the outcome is logged and counted by the
    //! gateway (`watchgate_capability_calls_total{capability="http"}`).
    //!
    //! ```no_run
    //! let id = watchgate_sdk::http::post_json("https://hooks.example.com/notify", br#"{"ok":true}"#)?;
    //! # Ok::<(), String>(())
    //! ```

    use crate::wit::watchgate::plugin::http as host;

    /// One outbound request.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Request {
        /// `GET`, `POST`, `PUT`, `PATCH`, `DELETE` or `HEAD`.
        pub method: String,
        /// An absolute `http://` or `https://` URL on a granted host.
        pub url: String,
        /// Request headers.
        pub headers: Vec<(String, String)>,
        /// Request body.
        pub body: Option<Vec<u8>>,
    }

    /// Queue `request`; returns the id the gateway logs it under.
    ///
    /// # Errors
    ///
    /// Fails with the host's message when the host is not granted, the
    /// request is malformed, or too many requests are in flight.
    pub fn send(request: Request) -> Result<u64, String> {
        host::send(&host::Request {
            method: request.method,
            url: request.url,
            headers: request.headers,
            body: request.body,
        })
    }

    /// Queue a `POST` of a JSON body to `url`.
    ///
    /// # Errors
    ///
    /// As for [`send`].
    pub fn post_json(url: &str, body: &[u8]) -> Result<u64, String> {
        send(Request {
            method: "POST".to_owned(),
            url: url.to_owned(),
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body: Some(body.to_vec()),
        })
    }
}

pub mod kv {
    //! Write back into a source that supports writes (etcd).
    //!
    //! Available only under the prefixes granted with
    //! `[grants] kv = [{ source = "NAME", prefix = "/PREFIX/" }]`. Writes are
    //! queued and performed by the host in the background, in order, with
    //! retries; `Ok` means the write was accepted.

    use crate::wit::watchgate::plugin::kv as host;

    /// Set `key` to `value` in `source`.
    ///
    /// # Errors
    ///
    /// Fails with the host's message when the source or prefix is not
    /// granted, the source cannot be written, or the write queue is full.
    pub fn put(source: &str, key: &str, value: &[u8]) -> Result<(), String> {
        host::put(source, key, value)
    }

    /// Remove `key` from `source`.
    ///
    /// # Errors
    ///
    /// As for [`put`].
    pub fn delete(source: &str, key: &str) -> Result<(), String> {
        host::delete(source, key)
    }
}

pub mod snapshot {
    //! Read the gateway's current view of the keys the plugin subscribes
    //! to.
    //!
    //! Available only with `[grants] snapshot = true`, and only for sources
    //! and prefixes in the plugin's subscriptions. Values are the newest the
    //! gateway has seen, which may be newer than the event being handled.

    use crate::wit::watchgate::plugin::snapshot as host;

    /// The current value of `key` in `source`; `None` when absent.
    ///
    /// # Errors
    ///
    /// Fails with the host's message when not granted or not subscribed.
    pub fn get(source: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
        host::get(source, key)
    }

    /// Every present key under `prefix` in `source`, in key order, at
    /// most 10,000 of them.
    ///
    /// # Errors
    ///
    /// As for [`get`]; also when the keys and values together would pass
    /// 4 MiB (the message names the limit): scan a narrower prefix.
    pub fn scan(source: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        host::scan(source, prefix)
    }
}

/// Declares what the plugin is and what it needs, inside the `.wasm` file.
///
/// The argument is TOML text (any constant `&str` expression, so
/// `concat!` and `env!` work). The SDK stores it in the component's
/// `watchgate-manifest` custom section; the gateway reads it at load time,
/// uses its subscriptions when the operator's sidecar gives none, and
/// reports the capabilities it asks for next to those the operator granted.
/// A manifest never grants anything by itself.
///
/// ```no_run
/// watchgate_sdk::manifest!(concat!(
///     "name = \"webhook-notify\"\n",
///     "version = \"", env!("CARGO_PKG_VERSION"), "\"\n",
///     "capabilities = [\"http\"]\n",
///     "[[subscribe]]\nsource = \"registry\"\nprefix = \"services/\"\n",
/// ));
/// ```
///
/// Keys: `name`, `version`, `description`, `capabilities` (any of `files`,
/// `http`, `kv`, `snapshot`, `commands`) and `[[subscribe]]` tables with `source` and
/// `prefix`, as in a sidecar.
#[macro_export]
macro_rules! manifest {
    ($toml:expr) => {
        const _: () = {
            const TEXT: &str = $toml;
            #[used]
            #[unsafe(link_section = "watchgate-manifest")]
            static MANIFEST: [u8; TEXT.len()] = $crate::__manifest_bytes(TEXT);
        };
    };
}

/// Copies the manifest text into a fixed-size array at compile time; used
/// by [`manifest!`].
#[doc(hidden)]
#[must_use]
pub const fn __manifest_bytes<const N: usize>(text: &str) -> [u8; N] {
    let bytes = text.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

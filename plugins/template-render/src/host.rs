//! The host capabilities template-render uses, behind a trait.
//!
//! The plugin logic in [`crate::apply`] talks to [`Host`] rather than to the
//! SDK directly, so the whole event flow runs in native unit tests against
//! an in-memory fake. [`Sdk`] is the real implementation; nothing here adds
//! behaviour of its own.

use watchgate_sdk::{files, log, state};

/// State, files and logging as the plugin needs them.
pub trait Host {
    /// Reads state `key`.
    fn state_get(&self, key: &str) -> Option<Vec<u8>>;
    /// Sets or (with `None`) removes state `key`.
    ///
    /// # Errors
    ///
    /// The host's message, for example when the state quota is exceeded.
    fn state_set(&self, key: &str, value: Option<&[u8]>) -> Result<(), String>;
    /// Atomically replaces file `path` in the files grant.
    ///
    /// # Errors
    ///
    /// The host's message: no grant, path refused, or the write failed.
    fn replace_file(&self, path: &str, data: &[u8]) -> Result<(), String>;
    /// Logs at info level.
    fn info(&self, message: &str);
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

    fn replace_file(&self, path: &str, data: &[u8]) -> Result<(), String> {
        files::replace(path, data)
    }

    fn info(&self, message: &str) {
        log::info(message);
    }
}

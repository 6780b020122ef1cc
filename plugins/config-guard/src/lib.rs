//! Validates JSON and YAML values under a prefix.
//!
//! Every put of a key under the `prefix` setting is checked: the value must
//! be UTF-8 text that parses in its format (see `validate::validate`;
//! JSON with `serde_json`, YAML 1.2 with the pure-Rust `saphyr` parser).
//! Deletes are always fine. Keys outside the prefix are skipped.
//!
//! - A valid value is logged at debug level.
//! - An invalid one is logged at error level, for example
//!   `config-guard: etcd app/config.json: invalid JSON: expected value at line 2 column 8`,
//!   and then, per `on_invalid`, the event succeeds (`log`) or fails with
//!   that message (`dead-letter`), so the gateway retries it and finally
//!   dead-letters it where an operator will see it.
//!
//! The plugin also marks invalid keys in its host state, which an operator
//! can inspect: `invalid/<key>` holds the reason while the key's current
//! value is invalid (cleared by a later valid put or a delete), and
//! `invalid-count` holds how many keys are marked.
//!
//! Settings (`[settings]` in the sidecar), read on every event:
//!
//! - `prefix` (default `""`, every key): only keys starting with it are
//!   checked;
//! - `format`: `"json"`, `"yaml"` or `"auto"` (default): by the key's
//!   extension, `.yaml`/`.yml` → YAML, anything else → JSON;
//! - `on_invalid`: `"log"` (default) or `"dead-letter"`.
//!
//! Grants: none; it uses only logging, settings and state, which are always
//! available. The manifest asks for no capabilities.

mod validate;

use watchgate_sdk::{Event, Plugin, export, log, manifest, settings, state};

use crate::validate::{FormatSetting, OnInvalid};

manifest!(concat!(
    "name = \"config-guard\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Validates JSON and YAML values under a prefix; logs or dead-letters invalid ones.\"\n",
    "capabilities = []\n",
));

/// State prefix of the invalid-key marks.
const INVALID_PREFIX: &str = "invalid/";
/// State key of the number of marked keys.
const COUNT_KEY: &str = "invalid-count";
/// Longest reason kept in a mark, in bytes.
const MAX_REASON: usize = 512;

/// The plugin: checks values, reports invalid ones.
struct ConfigGuard;

impl Plugin for ConfigGuard {
    fn handle(event: Event) -> Result<(), String> {
        apply(&Sdk, &event)
    }
}

export!(ConfigGuard);

/// State, settings and logging as the plugin needs them; behind a trait so
/// the event flow runs in native unit tests.
trait Host {
    fn state_get(&self, key: &str) -> Option<Vec<u8>>;
    fn state_set(&self, key: &str, value: Option<&[u8]>) -> Result<(), String>;
    fn setting(&self, name: &str) -> Option<String>;
    fn debug(&self, message: &str);
    fn warn(&self, message: &str);
    fn error(&self, message: &str);
}

/// The watchgate host, through the SDK.
struct Sdk;

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
    fn debug(&self, message: &str) {
        log::debug(message);
    }
    fn warn(&self, message: &str) {
        log::warn(message);
    }
    fn error(&self, message: &str) {
        log::error(message);
    }
}

/// Checks `event` per the settings.
fn apply(host: &impl Host, event: &Event) -> Result<(), String> {
    let prefix = host.setting("prefix").unwrap_or_default();
    let format = FormatSetting::parse(host.setting("format").as_deref())
        .map_err(|e| format!("config-guard: {e}"))?;
    let on_invalid = OnInvalid::parse(host.setting("on_invalid").as_deref())
        .map_err(|e| format!("config-guard: {e}"))?;
    if !event.key.starts_with(&prefix) {
        return Ok(());
    }

    let Some(value) = event.value_bytes().filter(|_| event.is_put()) else {
        mark(host, &event.key, None);
        return Ok(());
    };
    let format = format.for_key(&event.key);
    match validate::validate(value, format) {
        Ok(()) => {
            host.debug(&format!(
                "config-guard: {} {}: valid {format}",
                event.source, event.key
            ));
            mark(host, &event.key, None);
            Ok(())
        }
        Err(reason) => {
            let message = format!("config-guard: {} {}: {reason}", event.source, event.key);
            host.error(&message);
            mark(host, &event.key, Some(&reason));
            match on_invalid {
                OnInvalid::Log => Ok(()),
                OnInvalid::DeadLetter => Err(message),
            }
        }
    }
}

/// Sets (with a reason) or clears the invalid mark of `key`, keeping
/// `invalid-count` in step. A state failure (the quota) is logged, never
/// fatal: the marks are a convenience, the log is the report.
fn mark(host: &impl Host, key: &str, reason: Option<&str>) {
    let state_key = format!("{INVALID_PREFIX}{key}");
    let was_marked = host.state_get(&state_key).is_some();
    if reason.is_none() && !was_marked {
        return;
    }
    let reason = reason.map(|r| truncate(r, MAX_REASON));
    if let Err(e) = host.state_set(&state_key, reason.map(str::as_bytes)) {
        host.warn(&format!(
            "config-guard: cannot update {state_key} in state: {e}"
        ));
        return;
    }
    let delta: i64 = match (was_marked, reason.is_some()) {
        (false, true) => 1,
        (true, false) => -1,
        _ => return,
    };
    let count = host
        .state_get(COUNT_KEY)
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0);
    let count = (count + delta).max(0);
    let value = (count > 0).then(|| count.to_string());
    if let Err(e) = host.state_set(COUNT_KEY, value.as_deref().map(str::as_bytes)) {
        host.warn(&format!(
            "config-guard: cannot update {COUNT_KEY} in state: {e}"
        ));
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use watchgate_sdk::EventKind;

    use super::*;

    #[derive(Default)]
    struct Fake {
        state: RefCell<BTreeMap<String, String>>,
        settings: BTreeMap<&'static str, &'static str>,
        errors: RefCell<Vec<String>>,
        debugs: RefCell<Vec<String>>,
    }

    impl Host for Fake {
        fn state_get(&self, key: &str) -> Option<Vec<u8>> {
            self.state.borrow().get(key).map(|v| v.clone().into_bytes())
        }
        fn state_set(&self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
            let mut state = self.state.borrow_mut();
            match value {
                Some(v) => state.insert(key.to_owned(), String::from_utf8_lossy(v).into_owned()),
                None => state.remove(key),
            };
            Ok(())
        }
        fn setting(&self, name: &str) -> Option<String> {
            self.settings.get(name).map(|v| (*v).to_owned())
        }
        fn debug(&self, message: &str) {
            self.debugs.borrow_mut().push(message.to_owned());
        }
        fn warn(&self, _: &str) {}
        fn error(&self, message: &str) {
            self.errors.borrow_mut().push(message.to_owned());
        }
    }

    impl Fake {
        fn with(settings: &[(&'static str, &'static str)]) -> Self {
            Self {
                settings: settings.iter().copied().collect(),
                ..Self::default()
            }
        }
        fn send(&self, key: &str, value: Option<&str>) -> Result<(), String> {
            let event = Event {
                source: "etcd".to_owned(),
                kind: if value.is_some() {
                    EventKind::Put
                } else {
                    EventKind::Delete
                },
                key: key.to_owned(),
                value: value.map(|v| v.as_bytes().to_vec()),
                prev_value: None,
                revision: 1,
                resync: false,
                coalesced: 0,
                metadata: Vec::new(),
            };
            apply(self, &event)
        }
        fn get(&self, key: &str) -> Option<String> {
            self.state.borrow().get(key).cloned()
        }
    }

    #[test]
    fn invalid_values_are_logged_and_marked() {
        let h = Fake::default();
        assert_eq!(h.send("app/a.json", Some("{\"port\": 80}")), Ok(()));
        assert_eq!(h.debugs.borrow().len(), 1);
        assert!(h.state.borrow().is_empty());

        assert_eq!(h.send("app/a.json", Some("{\"port\": }")), Ok(()));
        assert_eq!(h.send("app/b.yaml", Some("a: [1")), Ok(()));
        assert_eq!(h.errors.borrow().len(), 2);
        assert!(
            h.errors.borrow()[0].starts_with("config-guard: etcd app/a.json: invalid JSON: "),
            "{:?}",
            h.errors
        );
        assert!(
            h.get("invalid/app/a.json")
                .unwrap()
                .starts_with("invalid JSON")
        );
        assert!(
            h.get("invalid/app/b.yaml")
                .unwrap()
                .starts_with("invalid YAML")
        );
        assert_eq!(h.get("invalid-count").as_deref(), Some("2"));

        // Invalid again: still counted once.
        assert_eq!(h.send("app/a.json", Some("nope")), Ok(()));
        assert_eq!(h.get("invalid-count").as_deref(), Some("2"));

        // A valid put and a delete clear the marks.
        assert_eq!(h.send("app/a.json", Some("[]")), Ok(()));
        assert_eq!(h.get("invalid/app/a.json"), None);
        assert_eq!(h.get("invalid-count").as_deref(), Some("1"));
        assert_eq!(h.send("app/b.yaml", None), Ok(()));
        assert!(h.state.borrow().is_empty(), "{:?}", h.state);
    }

    #[test]
    fn dead_letter_fails_the_event() {
        let h = Fake::with(&[("on_invalid", "dead-letter"), ("format", "yaml")]);
        let err = h.send("app/a.json", Some("a: [1")).unwrap_err();
        assert!(
            err.starts_with("config-guard: etcd app/a.json: invalid YAML: "),
            "{err}"
        );
        assert_eq!(h.send("app/a.json", Some("a: 1")), Ok(()));
        assert_eq!(h.send("app/c", None), Ok(()));
    }

    #[test]
    fn only_keys_under_the_prefix_are_checked() {
        let h = Fake::with(&[("prefix", "app/"), ("on_invalid", "dead-letter")]);
        assert_eq!(h.send("other/x.json", Some("{")), Ok(()));
        assert!(h.send("app/x.json", Some("{")).is_err());
    }

    #[test]
    fn bad_settings_fail_every_event() {
        let h = Fake::with(&[("format", "toml")]);
        assert!(h.send("a", None).unwrap_err().contains("`format`"));
        let h = Fake::with(&[("on_invalid", "ignore")]);
        assert!(h.send("a", None).unwrap_err().contains("`on_invalid`"));
    }

    #[test]
    fn long_reasons_are_truncated() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("aéb", 2), "a");
        assert_eq!(truncate("aéb", 3), "aé");
    }
}

//! Appends every event to `events.jsonl` in the plugin's files grant.
//!
//! One event becomes one JSON object on one line, written with a single
//! `files::append` call so lines from successive events never interleave.
//! The line format:
//!
//! ```text
//! {"source":"etcd","kind":"put","key":"app/port","value":"8080","revision":7,"resync":false,"coalesced":0}
//! ```
//!
//! `value` holds the value as text; a value that is not UTF-8 is written as
//! `value_b64` (standard base64 with padding) instead; a delete has neither.
//! In a cluster, `fencing_token` carries the owner's token.
//! The plugin keeps no state and never reads the file back.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use watchgate_sdk::{Event, Plugin, export, files};

/// The file every line is appended to, relative to the files grant.
const LOG_PATH: &str = "events.jsonl";

/// Appends one JSON line per event.
struct EventLog;

impl Plugin for EventLog {
    fn handle(event: Event) -> Result<(), String> {
        let line = json_line(&event)?;
        files::append(LOG_PATH, line.as_bytes())
            .map_err(|e| format!("event-log: append to {LOG_PATH} failed: {e}"))
    }
}

export!(EventLog);

watchgate_sdk::manifest!(concat!(
    "name = \"event-log\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Appends every event as one JSON line to events.jsonl.\"\n",
    "capabilities = [\"files\"]\n",
));

/// One line of `events.jsonl`; field order is the order on the line.
#[derive(Debug, Serialize)]
struct Line<'a> {
    source: &'a str,
    kind: &'static str,
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_b64: Option<String>,
    revision: u64,
    resync: bool,
    coalesced: u32,
    /// The cluster owner's fencing token, when the gateway runs in a
    /// cluster (from the event's `fencing_token` metadata).
    #[serde(skip_serializing_if = "Option::is_none")]
    fencing_token: Option<u64>,
}

/// Formats `event` as one JSON object followed by `\n`.
fn json_line(event: &Event) -> Result<String, String> {
    let (value, value_b64) = match event.value.as_deref() {
        None => (None, None),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => (Some(text), None),
            Err(_) => (None, Some(STANDARD.encode(bytes))),
        },
    };
    let line = Line {
        source: &event.source,
        kind: event.kind.as_str(),
        key: &event.key,
        value,
        value_b64,
        revision: event.revision,
        resync: event.resync,
        coalesced: event.coalesced,
        fencing_token: event.metadata("fencing_token").and_then(|v| v.parse().ok()),
    };
    let mut out = serde_json::to_string(&line).map_err(|e| {
        format!(
            "event-log: cannot encode event for key {:?}: {e}",
            event.key
        )
    })?;
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use watchgate_sdk::EventKind;

    use super::*;

    fn event(kind: EventKind, value: Option<&[u8]>) -> Event {
        Event {
            source: "etcd".to_owned(),
            kind,
            key: "app/port".to_owned(),
            value: value.map(<[u8]>::to_vec),
            prev_value: None,
            revision: 7,
            resync: false,
            coalesced: 0,
            metadata: Vec::new(),
        }
    }

    #[test]
    fn put_with_text_value() {
        let line = json_line(&event(EventKind::Put, Some(b"8080"))).unwrap();
        assert_eq!(
            line,
            "{\"source\":\"etcd\",\"kind\":\"put\",\"key\":\"app/port\",\"value\":\"8080\",\
             \"revision\":7,\"resync\":false,\"coalesced\":0}\n"
        );
    }

    #[test]
    fn put_with_binary_value_uses_base64() {
        let line = json_line(&event(EventKind::Put, Some(&[0xff, 0x00, 0x41]))).unwrap();
        assert!(line.contains("\"value_b64\":\"/wBB\""), "{line}");
        assert!(!line.contains("\"value\""), "{line}");
    }

    #[test]
    fn a_fencing_token_is_written_when_present() {
        let mut e = event(EventKind::Put, Some(b"1"));
        e.metadata = vec![("fencing_token".into(), "42".into())];
        let line = json_line(&e).unwrap();
        assert!(
            line.ends_with("\"coalesced\":0,\"fencing_token\":42}\n"),
            "{line}"
        );
    }

    #[test]
    fn delete_has_no_value() {
        let mut e = event(EventKind::Delete, None);
        e.resync = true;
        e.coalesced = 3;
        let line = json_line(&e).unwrap();
        assert_eq!(
            line,
            "{\"source\":\"etcd\",\"kind\":\"delete\",\"key\":\"app/port\",\
             \"revision\":7,\"resync\":true,\"coalesced\":3}\n"
        );
    }
}

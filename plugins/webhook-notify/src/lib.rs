//! POSTs every event as a JSON document to a webhook.
//!
//! For each event the plugin queues one `POST` to the `url` setting through
//! the host's `http` capability, with `content-type: application/json`:
//!
//! ```text
//! {"source":"etcd","kind":"put","key":"app/port","revision":7,
//!  "value":"8080","prev_value":"80","resync":false,"coalesced":0}
//! ```
//!
//! `value` and `prev_value` hold the values as text, or `null` when absent
//! (a delete; a previous value the source does not know). A value that is
//! not UTF-8 is sent as `null` with `value_base64` (or `prev_value_base64`)
//! holding it in standard base64 with padding.
//!
//! The host sends the request in the background with a timeout and
//! retries; the plugin never sees the response. When the host refuses to
//! queue it (no grant, a malformed URL, too many requests in flight) the
//! event fails with the host's message, so the gateway retries it and
//! finally dead-letters it.
//!
//! Settings (`[settings]` in the sidecar):
//!
//! - `url` (required): the webhook, an absolute `http://` or `https://` URL;
//! - `include_values` (`"true"` or `"false"`, default `"true"`): with
//!   `"false"` the `value*` and `prev_value*` fields are left out, for
//!   receivers that must not see configuration contents;
//! - `authorization` (optional): sent as the `Authorization` header, for
//!   example `"Bearer s3cret"`.
//!
//! Grants: `http = ["HOST:PORT"]` for the webhook's host. The manifest asks
//! for `http` and nothing else. The plugin keeps no state.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use watchgate_sdk::http::Request;
use watchgate_sdk::{Event, Plugin, export, http, log, manifest, settings};

manifest!(concat!(
    "name = \"webhook-notify\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"POSTs every event as JSON to a webhook URL.\"\n",
    "capabilities = [\"http\"]\n",
));

/// The `User-Agent` the requests carry.
const USER_AGENT: &str = concat!("watchgate-webhook-notify/", env!("CARGO_PKG_VERSION"));

/// The plugin: one POST per event.
struct WebhookNotify;

impl Plugin for WebhookNotify {
    fn handle(event: Event) -> Result<(), String> {
        apply(&Sdk, &event).map_err(|e| format!("webhook-notify: {e}"))
    }
}

export!(WebhookNotify);

/// Settings, outbound HTTP and logging as the plugin needs them; behind a
/// trait so the event flow runs in native unit tests.
trait Host {
    /// The setting `name`; `None` when unset.
    fn setting(&self, name: &str) -> Option<String>;
    /// Queues `request`; returns its id.
    fn send(&self, request: Request) -> Result<u64, String>;
    /// Logs at debug level.
    fn debug(&self, message: &str);
}

/// The watchgate host, through the SDK.
struct Sdk;

impl Host for Sdk {
    fn setting(&self, name: &str) -> Option<String> {
        settings::get(name)
    }

    fn send(&self, request: Request) -> Result<u64, String> {
        http::send(request)
    }

    fn debug(&self, message: &str) {
        log::debug(message);
    }
}

/// The plugin's settings, read on every event so a changed sidecar takes
/// effect at once.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Config {
    url: String,
    include_values: bool,
    authorization: Option<String>,
}

impl Config {
    /// Reads and checks the settings.
    fn read(host: &impl Host) -> Result<Self, String> {
        let url = host
            .setting("url")
            .filter(|u| !u.trim().is_empty())
            .ok_or("the `url` setting is missing; set `url` under [settings] in the sidecar")?;
        let include_values = match host.setting("include_values").as_deref().map(str::trim) {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                return Err(format!(
                    "the `include_values` setting must be \"true\" or \"false\", not {other:?}"
                ));
            }
        };
        Ok(Self {
            url: url.trim().to_owned(),
            include_values,
            authorization: host.setting("authorization").filter(|a| !a.is_empty()),
        })
    }
}

/// Sends `event` to the configured webhook.
fn apply(host: &impl Host, event: &Event) -> Result<(), String> {
    let config = Config::read(host)?;
    let body = body(event, config.include_values)?;
    let mut headers = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("user-agent".to_owned(), USER_AGENT.to_owned()),
    ];
    if let Some(auth) = &config.authorization {
        headers.push(("authorization".to_owned(), auth.clone()));
    }
    let id = host
        .send(Request {
            method: "POST".to_owned(),
            url: config.url.clone(),
            headers,
            body: Some(body.into_bytes()),
        })
        .map_err(|e| format!("cannot queue the POST to {}: {e}", config.url))?;
    host.debug(&format!(
        "queued request {id}: {} {} {} -> {}",
        event.kind, event.source, event.key, config.url
    ));
    Ok(())
}

/// The JSON document for one event; field order is the order in the body.
#[derive(Debug, Serialize)]
struct Body<'a> {
    source: &'a str,
    kind: &'static str,
    key: &'a str,
    revision: u64,
    /// Outer `None`: values not included; inner `None`: `null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_value: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_value_base64: Option<String>,
    resync: bool,
    coalesced: u32,
}

/// A value as `(text, base64)`: text when it is UTF-8, else `null` text and
/// the bytes in base64; both `None` when there is no value.
fn encode(value: Option<&[u8]>) -> (Option<&str>, Option<String>) {
    match value {
        None => (None, None),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => (Some(text), None),
            Err(_) => (None, Some(STANDARD.encode(bytes))),
        },
    }
}

/// Builds the request body for `event`.
fn body(event: &Event, include_values: bool) -> Result<String, String> {
    let (value, value_base64) = encode(event.value.as_deref());
    let (prev_value, prev_value_base64) = encode(event.prev_value.as_deref());
    let body = Body {
        source: &event.source,
        kind: event.kind.as_str(),
        key: &event.key,
        revision: event.revision,
        value: include_values.then_some(value),
        value_base64: value_base64.filter(|_| include_values),
        prev_value: include_values.then_some(prev_value),
        prev_value_base64: prev_value_base64.filter(|_| include_values),
        resync: event.resync,
        coalesced: event.coalesced,
    };
    serde_json::to_string(&body)
        .map_err(|e| format!("cannot encode the event for key {:?}: {e}", event.key))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use watchgate_sdk::EventKind;

    use super::*;

    fn event(kind: EventKind, value: Option<&[u8]>, prev: Option<&[u8]>) -> Event {
        Event {
            source: "etcd".to_owned(),
            kind,
            key: "app/port".to_owned(),
            value: value.map(<[u8]>::to_vec),
            prev_value: prev.map(<[u8]>::to_vec),
            revision: 7,
            resync: false,
            coalesced: 0,
            metadata: Vec::new(),
        }
    }

    #[derive(Default)]
    struct Fake {
        settings: BTreeMap<&'static str, &'static str>,
        sent: RefCell<Vec<Request>>,
        refuse: Option<&'static str>,
    }

    impl Host for Fake {
        fn setting(&self, name: &str) -> Option<String> {
            self.settings.get(name).map(|v| (*v).to_owned())
        }
        fn send(&self, request: Request) -> Result<u64, String> {
            if let Some(e) = self.refuse {
                return Err(e.to_owned());
            }
            self.sent.borrow_mut().push(request);
            Ok(1)
        }
        fn debug(&self, _: &str) {}
    }

    #[test]
    fn put_with_text_values() {
        let e = event(EventKind::Put, Some(b"8080"), Some(b"80"));
        assert_eq!(
            body(&e, true).unwrap(),
            r#"{"source":"etcd","kind":"put","key":"app/port","revision":7,"value":"8080","prev_value":"80","resync":false,"coalesced":0}"#
        );
    }

    #[test]
    fn delete_has_null_values() {
        let mut e = event(EventKind::Delete, None, None);
        e.resync = true;
        e.coalesced = 2;
        assert_eq!(
            body(&e, true).unwrap(),
            r#"{"source":"etcd","kind":"delete","key":"app/port","revision":7,"value":null,"prev_value":null,"resync":true,"coalesced":2}"#
        );
    }

    #[test]
    fn binary_values_use_base64() {
        let e = event(EventKind::Put, Some(&[0xff, 0x00, 0x41]), Some(&[0xfe]));
        let b = body(&e, true).unwrap();
        assert!(
            b.contains(
                r#""value":null,"value_base64":"/wBB","prev_value":null,"prev_value_base64":"/g==""#
            ),
            "{b}"
        );
    }

    #[test]
    fn values_can_be_left_out() {
        let e = event(EventKind::Put, Some(&[0xff]), Some(b"80"));
        assert_eq!(
            body(&e, false).unwrap(),
            r#"{"source":"etcd","kind":"put","key":"app/port","revision":7,"resync":false,"coalesced":0}"#
        );
    }

    #[test]
    fn posts_json_with_headers() {
        let host = Fake {
            settings: BTreeMap::from([
                ("url", "https://hooks.example.com/notify"),
                ("authorization", "Bearer t"),
                ("include_values", "false"),
            ]),
            ..Fake::default()
        };
        apply(&host, &event(EventKind::Put, Some(b"1"), None)).unwrap();
        let sent = host.sent.borrow();
        assert_eq!(sent.len(), 1);
        let r = &sent[0];
        assert_eq!(r.method, "POST");
        assert_eq!(r.url, "https://hooks.example.com/notify");
        assert!(
            r.headers
                .contains(&("content-type".into(), "application/json".into()))
        );
        assert!(
            r.headers
                .contains(&("authorization".into(), "Bearer t".into()))
        );
        let body: serde_json::Value = serde_json::from_slice(r.body.as_deref().unwrap()).unwrap();
        assert_eq!(body["key"], "app/port");
        assert!(body.get("value").is_none());
    }

    #[test]
    fn missing_url_and_bad_settings_are_named() {
        let e = event(EventKind::Put, Some(b"1"), None);
        let err = apply(&Fake::default(), &e).unwrap_err();
        assert!(err.contains("`url`"), "{err}");
        let host = Fake {
            settings: BTreeMap::from([("url", "http://h/"), ("include_values", "yes")]),
            ..Fake::default()
        };
        let err = apply(&host, &e).unwrap_err();
        assert!(err.contains("`include_values`"), "{err}");
        assert!(host.sent.borrow().is_empty());
    }

    #[test]
    fn a_refused_send_fails_the_event() {
        let host = Fake {
            settings: BTreeMap::from([("url", "http://127.0.0.1:9/")]),
            refuse: Some("host 127.0.0.1:9 is not granted"),
            ..Fake::default()
        };
        let err = apply(&host, &event(EventKind::Put, Some(b"1"), None)).unwrap_err();
        assert_eq!(
            err,
            "cannot queue the POST to http://127.0.0.1:9/: host 127.0.0.1:9 is not granted"
        );
    }
}

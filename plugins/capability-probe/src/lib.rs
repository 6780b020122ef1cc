//! Test fixture: performs the capability call each event asks for and logs
//! the result, so tests can drive `http`, `kv`, `snapshot` and `settings`
//! through a real plugin.
//!
//! The event's value is a JSON object with an `op`:
//! - `{"op": "http", "url": U, "method": M, "body": B}` sends a request;
//! - `{"op": "kv_put", "source": S, "key": K, "value": V}` and
//!   `{"op": "kv_delete", "source": S, "key": K}` write back;
//! - `{"op": "snapshot_get", "source": S, "key": K}` and
//!   `{"op": "snapshot_scan", "source": S, "prefix": P}` read;
//! - `{"op": "setting", "name": N}` reads a setting;
//! - `{"op": "run", "name": N, "file": F}` runs a granted command (`file`
//!   optional) and logs `exit=… timed_out=… stdout=… stderr=…`;
//! - `{"op": "trigger", "name": N, "file": F}` triggers one;
//! - `{"op": "signal", "name": N}` sends a granted signal;
//! - `{"op": "read", "path": P}`, `{"op": "rename", "from": A, "to": B}` and
//!   `{"op": "remove", "path": P}` use the files grant.
//!
//! Each call logs one line `probe <op> ok <detail>` or
//! `probe <op> err <message>`, and a refused call makes the event fail, so
//! tests see it in the outcome metrics too. Other values are ignored.

use serde_json::Value;
use watchgate_sdk::{Event, Plugin, commands, export, files, http, kv, log, settings, snapshot};

watchgate_sdk::manifest!(concat!(
    "name = \"capability-probe\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Performs the capability call each event asks for.\"\n",
    "capabilities = [\"http\", \"kv\", \"snapshot\"]\n",
    // Used when the operator's sidecar gives no subscriptions.
    "[[subscribe]]\nsource = \"local\"\nprefix = \"\"\n",
));

struct Probe;

fn field<'a>(v: &'a Value, name: &str) -> &'a str {
    v.get(name).and_then(Value::as_str).unwrap_or_default()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Plugin for Probe {
    fn handle(event: Event) -> Result<(), String> {
        let Some(v) = event
            .value_bytes()
            .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        else {
            return Ok(());
        };
        let op = field(&v, "op");
        let result: Result<String, String> = match op {
            "http" => http::send(http::Request {
                method: v
                    .get("method")
                    .and_then(Value::as_str)
                    .unwrap_or("POST")
                    .to_owned(),
                url: field(&v, "url").to_owned(),
                headers: vec![("content-type".to_owned(), "text/plain".to_owned())],
                body: Some(field(&v, "body").as_bytes().to_vec()),
            })
            .map(|id| format!("id={id}")),
            "kv_put" => kv::put(
                field(&v, "source"),
                field(&v, "key"),
                field(&v, "value").as_bytes(),
            )
            .map(|()| String::new()),
            "kv_delete" => {
                kv::delete(field(&v, "source"), field(&v, "key")).map(|()| String::new())
            }
            "snapshot_get" => snapshot::get(field(&v, "source"), field(&v, "key"))
                .map(|value| value.map_or_else(|| "none".to_owned(), |b| text(&b))),
            "snapshot_scan" => {
                snapshot::scan(field(&v, "source"), field(&v, "prefix")).map(|kvs| {
                    kvs.iter()
                        .map(|(k, b)| format!("{k}={}", text(b)))
                        .collect::<Vec<_>>()
                        .join(",")
                })
            }
            "setting" => Ok(settings::get(field(&v, "name")).unwrap_or_else(|| "none".to_owned())),
            "run" => {
                commands::run(field(&v, "name"), v.get("file").and_then(Value::as_str)).map(|r| {
                    format!(
                        "exit={} timed_out={} ms={} stdout={:?} stderr={:?}",
                        r.exit_code
                            .map_or_else(|| "none".to_owned(), |c| c.to_string()),
                        r.timed_out,
                        r.duration_ms,
                        r.stdout_tail,
                        r.stderr_tail
                    )
                })
            }
            "trigger" => {
                commands::trigger(field(&v, "name"), v.get("file").and_then(Value::as_str))
                    .map(|()| String::new())
            }
            "signal" => commands::signal(field(&v, "name")).map(|()| String::new()),
            "read" => files::read(field(&v, "path"))
                .map(|data| data.map_or_else(|| "none".to_owned(), |b| text(&b))),
            "rename" => files::rename(field(&v, "from"), field(&v, "to")).map(|()| String::new()),
            "remove" => files::remove(field(&v, "path")).map(|()| String::new()),
            _ => return Ok(()),
        };
        match result {
            Ok(detail) => {
                log::info(format!("probe {op} ok {detail}"));
                Ok(())
            }
            Err(e) => {
                log::info(format!("probe {op} err {e}"));
                Err(e)
            }
        }
    }
}

export!(Probe);

//! Fixture plugin that tries to reach everything it was not given.
//!
//! On every event it makes each of these attempts, independently of the
//! others:
//!
//! - files through WASI: read `/etc/passwd`, list `/`, list `.`, and write
//!   a file (the event's `path`, default `/tmp/watchgate-escape`);
//! - the environment: any variable at all, `HOME`, `PATH`, any program
//!   argument;
//! - the network through WASI: a TCP connect (the event's `tcp`, default
//!   `127.0.0.1:9`), a UDP bind on `0.0.0.0:0`, and a DNS lookup of
//!   `localhost:80`;
//! - host capabilities: `files::append("escape.txt")`,
//!   `files::replace("../escape.txt")` (a path escape even with a grant),
//!   `http::send` to the event's `http` URL (default
//!   `http://127.0.0.1:9/`), `kv::put("main", "/escape")`,
//!   `snapshot::get("main", "/")` and `settings::get("secret")`.
//!
//! Each attempt is either denied (an error, or no value) or ESCAPED (it
//! worked). Every attempt logs one line at info level, for example
//! `fault-escape: fs-read /etc/passwd: denied (<error>)` or
//! `fault-escape: ESCAPED fs-read /etc/passwd (<what it got>)`. The call
//! then returns `Err("fault-escape: escaped via a, b")` naming every attempt
//! that got through, or `Ok` when all were denied.
//!
//! The event's value may be a JSON object overriding the targets:
//! `{"path": "/tmp/x/escape", "tcp": "127.0.0.1:40000",
//! "http": "http://127.0.0.1:40000/"}`; a missing or unparsable value
//! means the defaults. Settings: none are needed (it probes `secret`).
//! Grants: meant to run with none. Its manifest declares the capabilities
//! it tries (`files`, `http`, `kv`, `snapshot`), which grants nothing.
//! It must stay a fixture.

use std::net::{TcpStream, ToSocketAddrs, UdpSocket};

use watchgate_sdk::{Event, Plugin, export, files, http, kv, log, manifest, settings, snapshot};

manifest!(concat!(
    "name = \"fault-escape\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Fixture: tries every access it was not given and reports what got through.\"\n",
    "capabilities = [\"files\", \"http\", \"kv\", \"snapshot\"]\n",
));

/// Default file written through WASI.
const DEFAULT_PATH: &str = "/tmp/watchgate-escape";
/// Default TCP target (the discard port).
const DEFAULT_TCP: &str = "127.0.0.1:9";
/// Default HTTP target.
const DEFAULT_HTTP: &str = "http://127.0.0.1:9/";

/// Tries every escape and reports what got through.
struct FaultEscape;

impl Plugin for FaultEscape {
    fn handle(event: Event) -> Result<(), String> {
        let targets = Targets::from_value(event.value_bytes());
        let outcomes = attempts(&targets);
        for line in outcomes.iter().map(Outcome::line) {
            log::info(line);
        }
        verdict(&outcomes)
    }
}

export!(FaultEscape);

/// Where the attempts aim; from the event's value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Targets {
    path: String,
    tcp: String,
    http: String,
}

impl Targets {
    /// Reads `path`, `tcp` and `http` from a JSON object; anything missing
    /// or unreadable keeps its default.
    fn from_value(value: Option<&[u8]>) -> Self {
        let json = value.and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok());
        let field = |name: &str, default: &str| {
            json.as_ref()
                .and_then(|j| j.get(name))
                .and_then(serde_json::Value::as_str)
                .unwrap_or(default)
                .to_owned()
        };
        Self {
            path: field("path", DEFAULT_PATH),
            tcp: field("tcp", DEFAULT_TCP),
            http: field("http", DEFAULT_HTTP),
        }
    }
}

/// The result of one attempt: `Ok(detail)` when it got through,
/// `Err(reason)` when it was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    what: String,
    result: Result<String, String>,
}

impl Outcome {
    fn new(what: impl Into<String>, result: Result<String, String>) -> Self {
        Self {
            what: what.into(),
            result,
        }
    }

    /// The log line for this attempt.
    fn line(&self) -> String {
        match &self.result {
            Ok(detail) => format!("fault-escape: ESCAPED {} ({detail})", self.what),
            Err(reason) => format!("fault-escape: {}: denied ({reason})", self.what),
        }
    }
}

/// `Err` naming every attempt that got through, or `Ok` when none did.
fn verdict(outcomes: &[Outcome]) -> Result<(), String> {
    let escaped: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.result.is_ok())
        .map(|o| o.what.as_str())
        .collect();
    if escaped.is_empty() {
        Ok(())
    } else {
        Err(format!("fault-escape: escaped via {}", escaped.join(", ")))
    }
}

/// Makes every attempt, in a fixed order.
fn attempts(t: &Targets) -> Vec<Outcome> {
    let io = |e: std::io::Error| e.to_string();
    let some = |found: bool, detail: String| if found { Ok(detail) } else { Err(detail) };
    vec![
        Outcome::new(
            "fs-read /etc/passwd",
            std::fs::read("/etc/passwd")
                .map(|b| format!("{} bytes", b.len()))
                .map_err(io),
        ),
        Outcome::new(
            "fs-list /",
            std::fs::read_dir("/")
                .map(|d| format!("{} entries", d.count()))
                .map_err(io),
        ),
        Outcome::new(
            "fs-list .",
            std::fs::read_dir(".")
                .map(|d| format!("{} entries", d.count()))
                .map_err(io),
        ),
        Outcome::new(
            format!("fs-write {}", t.path),
            std::fs::write(&t.path, b"watchgate fault-escape\n")
                .map(|()| "written".to_owned())
                .map_err(io),
        ),
        Outcome::new("env-vars", {
            let n = std::env::vars_os().count();
            some(n > 0, format!("{n} variables"))
        }),
        Outcome::new(
            "env HOME",
            std::env::var("HOME")
                .map(|v| format!("{} bytes", v.len()))
                .map_err(|e| e.to_string()),
        ),
        Outcome::new(
            "env PATH",
            std::env::var("PATH")
                .map(|v| format!("{} bytes", v.len()))
                .map_err(|e| e.to_string()),
        ),
        Outcome::new("args", {
            let n = std::env::args_os().count();
            some(n > 0, format!("{n} arguments"))
        }),
        Outcome::new(
            format!("tcp-connect {}", t.tcp),
            TcpStream::connect(t.tcp.as_str())
                .map(|s| format!("connected from {:?}", s.local_addr().ok()))
                .map_err(io),
        ),
        Outcome::new(
            "udp-bind 0.0.0.0:0",
            UdpSocket::bind("0.0.0.0:0")
                .map(|s| format!("bound {:?}", s.local_addr().ok()))
                .map_err(io),
        ),
        Outcome::new(
            "dns localhost:80",
            "localhost:80"
                .to_socket_addrs()
                .map(|a| format!("{:?}", a.collect::<Vec<_>>()))
                .map_err(io),
        ),
        Outcome::new(
            "files-append escape.txt",
            files::append("escape.txt", b"watchgate fault-escape\n")
                .map(|()| "appended".to_owned()),
        ),
        Outcome::new(
            "files-replace ../escape.txt",
            files::replace("../escape.txt", b"watchgate fault-escape\n")
                .map(|()| "replaced".to_owned()),
        ),
        Outcome::new(
            format!("http-send {}", t.http),
            http::send(http::Request {
                method: "POST".to_owned(),
                url: t.http.clone(),
                headers: Vec::new(),
                body: Some(b"watchgate fault-escape".to_vec()),
            })
            .map(|id| format!("request {id}")),
        ),
        Outcome::new(
            "kv-put main /escape",
            kv::put("main", "/escape", b"x").map(|()| "accepted".to_owned()),
        ),
        Outcome::new(
            "snapshot-get main /",
            snapshot::get("main", "/").map(|v| match v {
                Some(v) => format!("{} bytes", v.len()),
                None => "absent".to_owned(),
            }),
        ),
        Outcome::new(
            "settings-get secret",
            // The value itself is never logged.
            settings::get("secret")
                .map(|v| format!("{} bytes", v.len()))
                .ok_or_else(|| "none".to_owned()),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_default_and_override() {
        let d = Targets::from_value(None);
        assert_eq!(d.path, DEFAULT_PATH);
        assert_eq!(d.tcp, DEFAULT_TCP);
        assert_eq!(d.http, DEFAULT_HTTP);
        assert_eq!(Targets::from_value(Some(b"not json")), d);
        let t = Targets::from_value(Some(br#"{"path":"/tmp/x/escape","tcp":"127.0.0.1:40000"}"#));
        assert_eq!(t.path, "/tmp/x/escape");
        assert_eq!(t.tcp, "127.0.0.1:40000");
        assert_eq!(t.http, DEFAULT_HTTP);
    }

    #[test]
    fn lines_and_verdict() {
        let denied = Outcome::new("fs-read /etc/passwd", Err("no preopen".to_owned()));
        let escaped = Outcome::new("env HOME", Ok("5 bytes".to_owned()));
        assert_eq!(
            denied.line(),
            "fault-escape: fs-read /etc/passwd: denied (no preopen)"
        );
        assert_eq!(escaped.line(), "fault-escape: ESCAPED env HOME (5 bytes)");
        assert_eq!(verdict(std::slice::from_ref(&denied)), Ok(()));
        let both = [
            denied,
            escaped.clone(),
            Outcome::new("args", Ok(String::new())),
        ];
        assert_eq!(
            verdict(&both),
            Err("fault-escape: escaped via env HOME, args".to_owned())
        );
    }
}

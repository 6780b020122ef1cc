//! Fixture plugin that hands the host outbound requests no library should
//! see.
//!
//! The event's value is the base URL of a granted host (for example
//! `http://127.0.0.1:40000/`). On every event the plugin sends, through the
//! `http` capability, one request of each kind in [`ABUSES`]: 40,000
//! distinct header names (the input that once panicked the `http` crate
//! inside the host), one 1 MiB header value, headers that pass the total
//! bound though each is small, a 1 MiB URL, a 4 MiB body and a 1 MiB
//! method; then one well-formed `POST` to `<base>control/<key>`, which the
//! host should queue. Each logs one line, `abuse <kind> refused: <error>`
//! or `abuse <kind> queued id=<id>`. The call fails, naming them, when an
//! abuse was queued or the control request refused; otherwise it succeeds.
//! It must stay a fixture.
//!
//! Settings: none. Grants: `http = ["HOST:PORT"]` of the base URL.

use watchgate_sdk::{Event, Plugin, export, http, log, manifest};

manifest!(concat!(
    "name = \"fault-http-abuse\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Fixture: sends requests past every size bound to a granted host.\"\n",
    "capabilities = [\"http\"]\n",
));

/// The abusive requests, by the name each logs under.
const ABUSES: [&str; 6] = [
    "header-count",
    "header-size",
    "header-total",
    "url-size",
    "body-size",
    "method-size",
];

const MIB: usize = 1 << 20;

/// A well-formed `POST` to `url`.
fn post(url: String) -> http::Request {
    http::Request {
        method: "POST".to_owned(),
        url,
        headers: vec![("content-type".to_owned(), "text/plain".to_owned())],
        body: Some(b"abuse".to_vec()),
    }
}

/// The request of kind `abuse` against `base`.
fn abusive(abuse: &str, base: &str) -> http::Request {
    let mut req = post(format!("{base}{abuse}"));
    match abuse {
        "header-count" => {
            req.headers = (0..40_000)
                .map(|i| (format!("x-abuse-{i}"), "v".to_owned()))
                .collect();
        }
        "header-size" => req.headers.push(("x-abuse".to_owned(), "v".repeat(MIB))),
        "header-total" => req
            .headers
            .extend((0..8).map(|i| (format!("x-abuse-{i}"), "v".repeat(4096)))),
        "url-size" => req.url = format!("{base}{}", "u".repeat(MIB)),
        "body-size" => req.body = Some(vec![b'b'; 4 * MIB]),
        "method-size" => req.method = "POST".repeat(MIB / 4),
        _ => unreachable!("not an abuse: {abuse}"),
    }
    req
}

/// Sends every abuse, then the control request.
struct FaultHttpAbuse;

impl Plugin for FaultHttpAbuse {
    fn handle(event: Event) -> Result<(), String> {
        let base = event.value_str().unwrap_or_default().trim().to_owned();
        let mut wrong = Vec::new();
        for abuse in ABUSES {
            match http::send(abusive(abuse, &base)) {
                Ok(id) => {
                    log::info(format!("abuse {abuse} queued id={id}"));
                    wrong.push(abuse.to_owned());
                }
                Err(e) => log::info(format!("abuse {abuse} refused: {e}")),
            }
        }
        match http::send(post(format!("{base}control/{}", event.key))) {
            Ok(id) => log::info(format!("abuse control queued id={id}")),
            Err(e) => {
                log::info(format!("abuse control refused: {e}"));
                wrong.push("control".to_owned());
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "fault-http-abuse: not as expected: {}",
                wrong.join(", ")
            ))
        }
    }
}

export!(FaultHttpAbuse);

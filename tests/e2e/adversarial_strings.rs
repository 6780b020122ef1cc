//! Unbounded strings: a plugin whose error messages and log lines are tens
//! of MiB runs beside `event-log`. What the host keeps of them (the gateway
//! log, `/v1/plugins`, dead letters and their listing, the state directory)
//! must stay within the documented bounds, its dead letters within their
//! caps with the drops counted, and the operator must still be able to
//! unload it and stop the gateway.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::adversarial::{N, PER_EVENT, beside_event_log, outcome, rss_kb};
use crate::support::{GRACE, wait_for};

const FAULT: &str = "fault-huge-error";
/// The fixture's error message per call.
const ERROR_BYTES: usize = 40 << 20;
/// The host's bound on a plugin-supplied string (`text::MAX_TEXT`).
const MAX_TEXT: usize = 4096;
/// Room for the marker after a cut string, and the words the host puts
/// around it.
const MARKER_ROOM: usize = 256;
/// Each event's value: large enough that the dead letters reach the byte
/// cap below before the count cap, and span several pages of the listing.
const VALUE_BYTES: usize = 200 << 10;
/// The fixture's caps (its sidecar overrides the defaults).
const MAX_LETTERS: u64 = 20;
const MAX_LETTER_BYTES: u64 = 4 << 20;
/// The gateway log, after 72 failed calls each handing the host 49 MiB of
/// text: every plugin line is at most 4 KiB, and at most 50 of them a
/// second. Kept whole, the errors alone would be 2.8 GiB.
const LOG_BOUND: u64 = 8 << 20;
/// No line of the gateway log is longer than this.
const LINE_BOUND: usize = 16 << 10;
/// The state directory: the key index holds 24 values of 200 KiB, dead
/// letters are capped at 4 MiB, and compiled plugins are cached there too.
/// Kept whole, the dead letters alone would be 960 MiB.
const STATE_BOUND: u64 = 48 << 20;
/// `/v1/plugins` with two plugins.
const PLUGINS_ANSWER_BOUND: usize = 64 << 10;
/// One page of dead letters: at most 1 MiB of letters as stored, as JSON.
const LISTING_BOUND: usize = 2 << 20;
/// The gateway's RSS once every event was dead-lettered (about 120 MiB on
/// x86-64 Linux).
const RSS_BOUND_KB: u64 = 384 << 10;

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The `error` of each dead letter is the fixture's message cut to the
/// bound, with the marker naming its length and the limit.
fn assert_cut(what: &str, message: &str) {
    assert!(
        message.len() <= MAX_TEXT + MARKER_ROOM,
        "{what}: {} bytes kept",
        message.len()
    );
    assert!(
        message.contains(&format!(
            "[truncated: {ERROR_BYTES} bytes, limit {MAX_TEXT}]"
        )),
        "{what}: no marker in {:?}",
        &message[message.len().saturating_sub(80)..]
    );
}

#[test]
fn fault_huge_error_beside_event_log() {
    let sidecar = format!(
        "retry_backoff = \"1ms\"\nmax_dead_letters = {MAX_LETTERS}\nmax_dead_letter_bytes = {MAX_LETTER_BYTES}\n"
    );
    let mut g = beside_event_log(FAULT, &sidecar, |i| {
        format!("{i:02}{}", "v".repeat(VALUE_BYTES))
    });
    // Every event failed on every attempt and became a dead letter, kept
    // or dropped by the caps.
    wait_for(
        "every event of the fault dead-lettered",
        Duration::from_secs(120),
        || {
            (g.metric(&format!(
                "watchgate_dead_letters_total{{plugin=\"{FAULT}\"}}"
            )) == N as f64)
                .then_some(())
        },
    );
    g.assert_running();
    let m = g.metrics();
    let errors = outcome(&m, FAULT, "error");
    assert!(errors >= (3 * N) as f64, "{errors} failed calls");
    assert_eq!(outcome(&m, FAULT, "ok"), 0.0);
    // Each failed call's error was cut, and so were the log lines let
    // through.
    let cut = m
        .get(&format!(
            "watchgate_plugin_text_truncated_total{{plugin=\"{FAULT}\"}}"
        ))
        .copied()
        .unwrap_or(0.0);
    assert!(cut > errors, "{cut} strings cut for {errors} failed calls");
    let rss = rss_kb(g.pid());
    assert!(
        rss <= RSS_BOUND_KB,
        "gateway RSS {rss} kB after {errors} calls returning {ERROR_BYTES}-byte errors"
    );

    // /v1/plugins: small, the last failure cut.
    let (code, body) = g.get("/v1/plugins").expect("admin answers");
    assert_eq!(code, 200);
    assert!(
        body.len() <= PLUGINS_ANSWER_BOUND,
        "/v1/plugins answered {} bytes",
        body.len()
    );
    let plugins: Value = serde_json::from_str(&body).unwrap();
    let report = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == FAULT)
        .unwrap()
        .clone();
    assert_cut(
        "last_failure",
        report["last_failure"]["message"].as_str().unwrap(),
    );
    assert_eq!(report["max_dead_letters"], MAX_LETTERS, "{report:#}");
    assert_eq!(
        report["max_dead_letter_bytes"], MAX_LETTER_BYTES,
        "{report:#}"
    );

    // Dead letters: within both caps, the oldest dropped and counted.
    let letters_path = format!("/v1/plugins/{FAULT}/dead-letters");
    let (code, body) = g.get(&letters_path).expect("admin answers");
    assert_eq!(code, 200);
    assert!(
        body.len() <= LISTING_BOUND,
        "the dead-letter listing answered {} bytes",
        body.len()
    );
    let first: Value = serde_json::from_str(&body).unwrap();
    let kept = first["total"]["count"].as_u64().unwrap();
    let kept_bytes = first["total"]["bytes"].as_u64().unwrap();
    assert!(
        (1..=MAX_LETTERS).contains(&kept) && kept_bytes <= MAX_LETTER_BYTES,
        "{kept} dead letters of {kept_bytes} bytes kept"
    );
    assert!(
        kept < N as u64,
        "the byte cap dropped nothing: {kept} of {N} kept"
    );
    assert_eq!(report["dead_letters"], kept, "{report:#}");
    let dropped = g.metric(&format!(
        "watchgate_dead_letters_dropped_total{{plugin=\"{FAULT}\"}}"
    ));
    assert_eq!(dropped, (N as u64 - kept) as f64);
    // A page at a time, one letter per page: every kept letter once, the
    // newest events, in order.
    let mut keys = Vec::new();
    let mut next = Some(format!("{letters_path}?limit=1"));
    while let Some(path) = next {
        let page = g.json(&path);
        let letters = page["dead_letters"].as_array().unwrap();
        assert_eq!(letters.len(), 1, "{path}");
        assert_cut(&path, letters[0]["error"].as_str().unwrap());
        keys.push(letters[0]["event"]["key"].as_str().unwrap().to_owned());
        next = page["next"].as_str().map(str::to_owned);
    }
    let newest: Vec<String> = (N - kept as usize..N).map(|i| format!("k{i:02}")).collect();
    assert_eq!(keys, newest, "the oldest letters are the ones dropped");
    // The CLI follows the pages (over 1 MiB of letters: more than one).
    assert!(first["next"].is_string(), "one page held every letter");
    let config = g.config_path();
    let admin = format!("http://127.0.0.1:{}", g.port);
    let (code, stdout, stderr) = g.cli(&[
        "dead-letters",
        "list",
        "--config",
        config.to_str().unwrap(),
        "--plugin",
        FAULT,
        "--admin",
        &admin,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    let listed: Vec<&str> = listed["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["event"]["key"].as_str().unwrap())
        .collect();
    assert_eq!(listed, newest, "the CLI listed every page");

    // Every other listing pages too, and says how to go on.
    let page = g.json("/v1/plugins?limit=1");
    assert_eq!(page["plugins"][0]["name"], "event-log");
    let next = page["next"].as_str().expect("a next page").to_owned();
    let page = g.json(&next);
    assert_eq!(page["plugins"][0]["name"], FAULT);
    assert!(page["next"].is_null(), "{page:#}");
    let (code, body) = g.get("/v1/plugins?limit=100000").unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("from 1 to 1000"), "{body}");
    assert_eq!(g.json("/v1/sources?limit=1")["sources"][0]["name"], "local");

    // The gateway log: small, no long line, the drops explained.
    let log = g.log();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    eprintln!(
        "{FAULT}: gateway log {} bytes, longest line {longest} bytes, state dir {} bytes, RSS {rss} kB",
        log.len(),
        dir_bytes(&g.path("data"))
    );
    assert!(
        log.len() as u64 <= LOG_BOUND,
        "the gateway log grew to {} bytes",
        log.len()
    );
    assert!(longest <= LINE_BOUND, "a log line of {longest} bytes");
    assert!(
        log.contains("the oldest were dropped to keep the new one")
            && log.contains(&format!("\"max_dead_letter_bytes\":{MAX_LETTER_BYTES}")),
        "no line about the dropped dead letters naming the cap"
    );
    let state = dir_bytes(&g.path("data"));
    assert!(
        state <= STATE_BOUND,
        "the state directory grew to {state} bytes"
    );

    // The operator unloads it; event-log goes on, the letters stay listed.
    std::fs::remove_file(g.path(&format!("plugins.d/{FAULT}.wasm"))).unwrap();
    wait_for(
        &format!("{FAULT} unloaded"),
        Duration::from_secs(30),
        || {
            let names: Vec<Value> = g.json("/v1/plugins")["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["name"].clone())
                .collect();
            (names == ["event-log"]).then_some(())
        },
    );
    std::fs::write(g.path("watched/after"), "unloaded").unwrap();
    let events = g.wait_events("event-log", N + 1, PER_EVENT);
    assert_eq!(events[N]["key"], "after");
    assert_eq!(g.json(&letters_path)["total"]["count"], kept);

    // And stops the gateway within its grace (10 s by default).
    g.stop_within(GRACE + Duration::from_secs(2));
}

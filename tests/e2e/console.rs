//! The operator console at `/ui`, loaded in a real headless chromium
//! against a running gateway: what it shows, the dead-letter replay it
//! offers with the token, that it asks nothing of any other origin, and
//! what it says when the gateway goes away.
//!
//! With `WATCHGATE_SCREENSHOTS=DIR` the test also saves the screenshots
//! the README shows (`scripts/screenshots`).

use std::path::PathBuf;
use std::time::Duration;

use crate::browser::Browser;
use crate::support::{Gateway, wait_for};

const DEADLINE: Duration = Duration::from_secs(60);
const TOKEN: &str = "console-s3cret";

/// A gateway with the admin token, a healthy plugin (`log`), one that
/// quarantines itself (`fbk` on key `panic`) and one whose output is
/// blocked so it dead-letters (`blocked`).
fn gateway() -> Gateway {
    let g = Gateway::new();
    let path = g.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen(
            "listen = \"127.0.0.1:0\"\n",
            &format!("listen = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\nreveal_values = true\n"),
            1,
        ),
    )
    .unwrap();
    g.install_event_log("log");
    g.install(
        "fbk",
        "fault-by-key",
        "retry_attempts = 1\nquarantine_after = 1\n",
    );
    g.install(
        "blocked",
        "event-log",
        "retry_attempts = 1\n[grants]\nfiles = \"../out/blocked\"\n",
    );
    // event-log cannot append while its file is a directory.
    std::fs::create_dir_all(g.path("out/blocked/events.jsonl")).unwrap();
    g
}

fn screenshots() -> Option<PathBuf> {
    std::env::var_os("WATCHGATE_SCREENSHOTS").map(PathBuf::from)
}

#[test]
fn console_shows_states_and_replays_a_dead_letter_in_a_browser() {
    let mut g = gateway();
    g.start();
    std::fs::write(g.path("watched/panic"), "{\"feature\": true}").unwrap();
    wait_for("the change to settle", DEADLINE, || {
        let blocked = g.plugin_report("blocked")?;
        let fbk = g.plugin_report("fbk")?;
        (blocked["dead_letters"] == 1 && fbk["state"] == "quarantined").then_some(())
    });
    let origin = format!("http://127.0.0.1:{}", g.port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let b = Browser::start().await;
        b.client.goto(&format!("{origin}/ui")).await.unwrap();

        // The overview: every plugin with its state, the source, no cluster.
        b.wait_js(
            "the plugins and their states",
            "return !!document.querySelector('tr[data-plugin=\"log\"][data-state=\"running\"], tr[data-plugin=\"log\"][data-state=\"pooled\"]') \
             && !!document.querySelector('tr[data-plugin=\"fbk\"][data-state=\"quarantined\"]') \
             && !!document.querySelector('tr[data-plugin=\"blocked\"] td[data-dead-letters=\"1\"]');",
        )
        .await;
        let text = b.js("return document.getElementById('main').innerText").await;
        let text = text.as_str().unwrap();
        for want in ["local", "file", "connected", "quarantined", "Standalone", "Dead letters"] {
            assert!(text.contains(want), "{want:?} in:\n{text}");
        }
        // Rates need two polls.
        b.wait_js("a call rate", "return document.getElementById('main').innerText.includes('/s')")
            .await;
        if let Some(dir) = screenshots() {
            b.screenshot(&dir.join("console-overview.png")).await;
        }

        // The plugin detail, read-only without the token.
        b.show("#/plugin/blocked").await;
        b.wait_js(
            "the dead letter listed",
            "return document.querySelectorAll('#letters tr[data-letter]').length === 1",
        )
        .await;
        let detail = b.js("return document.getElementById('main').innerText").await;
        let detail = detail.as_str().unwrap();
        for want in ["Limits per call", "Capabilities", "files", "Read-only", "panic"] {
            assert!(detail.contains(want), "{want:?} in:\n{detail}");
        }
        assert_eq!(
            b.js("return document.getElementById('replay').disabled").await,
            true
        );

        // With the token, replay; the letter is handled once the plugin
        // can write again.
        b.client
            .find(fantoccini::Locator::Css("#token"))
            .await
            .unwrap()
            .send_keys(TOKEN)
            .await
            .unwrap();
        b.click("#token-set").await;
        std::fs::remove_dir(g.path("out/blocked/events.jsonl")).unwrap();
        if let Some(dir) = screenshots() {
            b.screenshot(&dir.join("console-plugin.png")).await;
        }
        b.click("#replay").await;
        b.wait_js(
            "the replay to be reported",
            "return document.getElementById('mutate-result').innerText.includes('Replayed 1')",
        )
        .await;
        b.wait_js(
            "the dead letter to go",
            "return !!document.getElementById('no-letters')",
        )
        .await;
        let events = g.wait_events("blocked", 1, DEADLINE);
        assert_eq!(events[0]["key"], "panic");

        // The trace page follows the same change.
        b.show("#/trace?source=local&key=panic").await;
        b.wait_js(
            "the trace",
            "return !!document.querySelector('#trace tr[data-plugin=\"log\"][data-status=\"handled\"]') \
             && !!document.querySelector('#trace tr[data-plugin=\"blocked\"][data-status=\"handled\"]') \
             && !!document.querySelector('#trace tr[data-plugin=\"fbk\"][data-status=\"dead_letter\"], #trace tr[data-plugin=\"fbk\"][data-status=\"quarantined\"]')",
        )
        .await;
        if let Some(dir) = screenshots() {
            b.screenshot(&dir.join("console-trace.png")).await;
        }

        // The live tail shows a new change and which plugins got it.
        b.show("#/tail").await;
        b.wait_js(
            "the stream to open",
            "return document.getElementById('tail-state').innerText.startsWith('Connected')",
        )
        .await;
        std::fs::write(g.path("watched/tail-me"), "v1").unwrap();
        b.wait_js(
            "the change in the tail",
            "const r = document.querySelector('#tail tr[data-key=\"tail-me\"]'); \
             return !!r && r.innerText.includes('log') && r.innerText.includes('v1');",
        )
        .await;
        if let Some(dir) = screenshots() {
            b.screenshot(&dir.join("console-tail.png")).await;
        }

        // Nothing was asked of any other origin.
        let urls = b.requested_urls().await;
        assert!(urls.len() > 3, "{urls:?}");
        for url in &urls {
            assert!(url.starts_with(&format!("{origin}/")), "{url} is outside the gateway");
        }

        // The gateway goes away: the page says so.
        assert!(g.stop().success());
        b.wait_js(
            "the down banner",
            "return document.getElementById('banner').innerText.includes('not answering')",
        )
        .await;
        b.close().await;
    });
}

#[test]
fn console_is_served_with_a_same_origin_policy() {
    let mut g = Gateway::new();
    g.start();
    let url = format!("http://127.0.0.1:{}/ui/", g.port);
    let r = ureq::get(&url).call().unwrap();
    let csp = r.header("content-security-policy").unwrap().to_owned();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    let body = r.into_string().unwrap();
    assert!(body.contains("/ui/app.js"), "{body}");
    for asset in ["app.js", "app.css", "icon.svg"] {
        let (code, _) = g.get(&format!("/ui/{asset}")).unwrap();
        assert_eq!(code, 200, "{asset}");
    }
    let (code, _) = g.get("/ui/missing.js").unwrap();
    assert_eq!(code, 404);
}

/// Open `/v1/events/stream` on `port`: the reader after the headers, or
/// the status line when it was refused.
fn open_stream(port: u16) -> Result<std::io::BufReader<std::net::TcpStream>, String> {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "GET /v1/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    if !status.contains(" 200 ") {
        return Err(status);
    }
    let mut line = String::new();
    while r.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
        line.clear();
    }
    Ok(r)
}

/// The next `change` event's data on a stream (chunked framing and
/// keep-alive comments skipped).
fn next_change(r: &mut std::io::BufReader<std::net::TcpStream>) -> serde_json::Value {
    use std::io::BufRead;
    let mut change = false;
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "the stream ended");
        let line = line.trim_end();
        if line == "event: change" {
            change = true;
        } else if let Some(data) = line.strip_prefix("data: ")
            && change
        {
            return serde_json::from_str(data).unwrap();
        }
    }
}

#[test]
fn console_stream_hides_values_and_caps_its_readers() {
    let mut g = Gateway::new();
    g.install_event_log("log");
    g.install(
        "elsewhere",
        "event-log",
        "[[subscribe]]\nsource = \"local\"\nprefix = \"other/\"\n\n[grants]\nfiles = \"../out/elsewhere\"\n",
    );
    g.start();
    let mut first = open_stream(g.port).expect("a stream");
    let mut others: Vec<_> = (1..8)
        .map(|_| open_stream(g.port).expect("a stream"))
        .collect();
    // The ninth reader at once is refused.
    let refused = open_stream(g.port).expect_err("the ninth stream is refused");
    assert!(refused.contains(" 503 "), "{refused}");
    std::fs::write(g.path("watched/secret"), "hunter2").unwrap();
    let change = next_change(&mut first);
    assert_eq!(change["source"], "local");
    assert_eq!(change["kind"], "put");
    assert_eq!(change["key"], "secret");
    assert_eq!(change["plugins"], serde_json::json!(["log"]));
    assert!(change.get("value").is_none(), "{change}");
    assert!(change["revision"].as_u64().unwrap() > 0);
    // A reader that leaves frees its place.
    others.pop();
    drop(others);
    // The server notices a reader has gone when it next writes to it: a
    // change makes it write.
    let mut n = 0;
    wait_for("a stream place to free up", DEADLINE, || {
        n += 1;
        std::fs::write(g.path("watched/poke"), n.to_string()).unwrap();
        open_stream(g.port).ok()
    });
}

//! `GET /v1/trace` and `watchgate trace`: where one change stands for
//! every plugin, on a running gateway with healthy, failing, retrying and
//! unsubscribed plugins.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Gateway, wait_for};

const DEADLINE: Duration = Duration::from_secs(60);

/// The plugin named `name` in a trace.
fn plugin<'a>(trace: &'a Value, name: &str) -> &'a Value {
    trace["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .find(|p| p["plugin"] == name)
        .unwrap_or_else(|| panic!("{name} in {trace}"))
}

/// The trace of `key` in `local`, once the key is known.
fn traced(g: &Gateway, key: &str) -> Option<Value> {
    let (code, body) = g.get(&format!("/v1/trace?source=local&key={key}"))?;
    (code == 200).then(|| serde_json::from_str(&body).expect("a trace is JSON"))
}

fn status(trace: &Value, name: &str) -> String {
    plugin(trace, name)["status"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn trace_tells_each_plugin_status_of_a_change() {
    let mut g = Gateway::new();
    g.install_event_log("log");
    g.install(
        "fbk",
        "fault-by-key",
        "retry_attempts = 2\nretry_backoff = \"1ms\"\n",
    );
    // Retries slowly, so a trace catches it between attempts.
    g.install(
        "stuck",
        "fault-by-key",
        "retry_attempts = 10\nretry_backoff = \"30s\"\n",
    );
    g.install(
        "elsewhere",
        "event-log",
        "[[subscribe]]\nsource = \"local\"\nprefix = \"other/\"\n\n[grants]\nfiles = \"../out/elsewhere\"\n",
    );
    g.start();
    std::fs::write(g.path("watched/error"), "1").unwrap();
    let trace = wait_for("the change to settle", DEADLINE, || {
        let t = traced(&g, "error")?;
        (status(&t, "log") == "handled"
            && status(&t, "fbk") == "dead_letter"
            && status(&t, "stuck") == "retrying")
            .then_some(t)
    });
    assert_eq!(trace["change"]["kind"], "put");
    assert_eq!(trace["change"]["latest"], true);
    let revision = trace["change"]["revision"].as_u64().unwrap();
    let log = plugin(&trace, "log");
    assert_eq!(log["revision"], revision);
    assert!(
        log["handled_at_ms"].as_u64().unwrap() > 1_700_000_000_000,
        "{log}"
    );
    let fbk = plugin(&trace, "fbk");
    assert_eq!(fbk["attempts"], 2);
    assert!(fbk["dead_letter"].is_u64(), "{fbk}");
    assert!(
        fbk["error"].as_str().unwrap().contains("requested error"),
        "{fbk}"
    );
    assert_eq!(plugin(&trace, "stuck")["attempts"], 1);
    assert_eq!(status(&trace, "elsewhere"), "not_subscribed");
    assert_eq!(trace["limits"]["queue_scan"], 4096);

    // Behind the retried event, the next change waits in the queue.
    std::fs::write(g.path("watched/next"), "1").unwrap();
    let t = wait_for("next to be queued behind", DEADLINE, || {
        let t = traced(&g, "next")?;
        (status(&t, "log") == "handled" && status(&t, "stuck") == "queued").then_some(t)
    });
    assert_eq!(plugin(&t, "stuck")["queue_position"], 0);
    assert_eq!(status(&t, "fbk"), "handled");

    // The command line reads the same answer.
    let admin = format!("http://127.0.0.1:{}", g.port);
    let (code, stdout, stderr) = g.cli(&[
        "trace", "--admin", &admin, "--source", "local", "--key", "error",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("local \"error\": put at revision {revision}")),
        "{stdout}"
    );
    for (name, want) in [
        ("log", "handled"),
        ("fbk", "dead_letter"),
        ("stuck", "retrying"),
        ("elsewhere", "not_subscribed"),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(name) && l.split_whitespace().nth(1) == Some(want)),
            "{name} {want}: {stdout}"
        );
    }
    let (code, stdout, _) = g.cli(&[
        "trace", "--admin", &admin, "--source", "local", "--key", "error", "--json",
    ]);
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["change"]["revision"], revision);

    // Unknown keys, sources and revisions are refused with the reason.
    let (code, body) = g.get("/v1/trace?source=local&key=never").unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no change of key \\\"never\\\""), "{body}");
    let (code, body) = g.get("/v1/trace?source=nope&key=error").unwrap();
    assert_eq!(code, 404, "{body}");
    let (code, body) = g
        .get(&format!(
            "/v1/trace?source=local&key=error&revision={}",
            revision + 1
        ))
        .unwrap();
    assert_eq!(code, 400, "{body}");
    let (code, _, stderr) = g.cli(&[
        "trace", "--admin", &admin, "--source", "local", "--key", "never",
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("404") && stderr.contains("never"),
        "{stderr}"
    );
}

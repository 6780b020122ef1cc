//! File changes reach `event-log` complete and in order.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Gateway, kkv, wait_for, write_atomic};

const DEADLINE: Duration = Duration::from_secs(30);
/// A key that sorts after every other one the tests write, so it comes last
/// in any batch it shares with them.
const MARKER: &str = "~marker";

/// Write the marker file and wait for its event: the file source reports
/// changes in order, so once the marker is in, every event caused by what
/// was written before it is in too. Returns the events before the marker,
/// and the marker's; panics if anything arrived after it.
fn events_until_marker(g: &mut Gateway) -> (Vec<Value>, Value) {
    std::fs::write(g.path(&format!("watched/{MARKER}")), "marker").unwrap();
    let mut all = wait_for("the marker to be reported", DEADLINE, || {
        g.assert_running();
        let e = g.events("event-log");
        e.iter().any(|e| e["key"] == MARKER).then_some(e)
    });
    let marker = all.pop().expect("the marker");
    assert_eq!(marker["key"], MARKER, "events after the marker: {all:#?}");
    (all, marker)
}

#[test]
fn file_changes_reach_event_log_complete_and_in_order() {
    let mut g = Gateway::new();
    std::fs::write(g.path("watched/pre-existing"), "before start").unwrap();
    std::fs::create_dir_all(g.path("watched/nested/deeper")).unwrap();
    std::fs::write(g.path("watched/nested/deeper/file"), "deep").unwrap();
    std::fs::write(g.path("watched/.hidden"), "never reported").unwrap();
    g.install_event_log("event-log");
    g.start();

    // The initial snapshot arrives as puts.
    let initial = g.wait_events("event-log", 2, DEADLINE);
    let mut snapshot = kkv(&initial);
    snapshot.sort();
    assert_eq!(
        snapshot,
        vec![
            (
                "put".into(),
                "nested/deeper/file".into(),
                Some("deep".into())
            ),
            (
                "put".into(),
                "pre-existing".into(),
                Some("before start".into())
            ),
        ]
    );

    // Phase by phase, waiting for each to land, so every state is observable.
    const N: usize = 25;
    for i in 0..N {
        write_atomic(
            &g.path(&format!("watched/k{i:02}")),
            format!("v1-{i}").as_bytes(),
        );
    }
    g.wait_events("event-log", 2 + N, DEADLINE);
    for i in 0..N {
        std::fs::write(g.path(&format!("watched/k{i:02}")), format!("v2-{i}")).unwrap();
    }
    g.wait_events("event-log", 2 + 2 * N, DEADLINE);
    for i in 0..10 {
        std::fs::remove_file(g.path(&format!("watched/k{i:02}"))).unwrap();
    }
    std::fs::write(g.path("watched/binary"), [0xffu8, 0x00, 0xfe]).unwrap();
    let all = g.wait_events("event-log", 2 + 2 * N + 11, DEADLINE);

    // Nothing more than expected arrives.
    let (all_again, marker) = events_until_marker(&mut g);
    assert_eq!(
        all_again.len(),
        all.len(),
        "unexpected extra events: {all_again:#?}"
    );

    // Per key: exactly put v1, put v2, then delete for the first ten.
    let mut per_key: HashMap<String, Vec<(String, Option<String>)>> = HashMap::new();
    for (kind, key, value) in kkv(&all) {
        per_key.entry(key).or_default().push((kind, value));
    }
    for i in 0..N {
        let key = format!("k{i:02}");
        let mut expected = vec![
            ("put".to_owned(), Some(format!("v1-{i}"))),
            ("put".to_owned(), Some(format!("v2-{i}"))),
        ];
        if i < 10 {
            expected.push(("delete".to_owned(), None));
        }
        assert_eq!(per_key[&key], expected, "history of {key}");
    }
    assert!(!per_key.contains_key(".hidden"));

    // Binary values are carried as base64.
    let bin = all.iter().find(|e| e["key"] == "binary").unwrap();
    assert_eq!(bin["value_b64"], "/wD+");
    assert!(bin.get("value").is_none());

    // Revisions never go down, every line names the source, nothing was
    // coalesced or synthesized.
    let revs: Vec<u64> = all
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert!(
        revs.windows(2).all(|w| w[0] <= w[1]),
        "revisions out of order: {revs:?}"
    );
    assert!(all.iter().all(|e| e["source"] == "local"));
    assert!(
        all.iter()
            .all(|e| e["coalesced"] == 0 && e["resync"] == false)
    );

    // The source's own view agrees.
    let sources = g.json("/v1/sources");
    let local = &sources["sources"][0];
    assert_eq!(local["name"], "local");
    assert_eq!(local["synced"], true);
    assert_eq!(local["revision"], marker["revision"]);
    assert!(marker["revision"].as_u64().unwrap() >= *revs.last().unwrap());
    // Every event, the marker too.
    let delivered = all.len() + 1;
    assert!(g.metric("watchgate_source_events_total{source=\"local\"}") >= delivered as f64);
    assert_eq!(
        g.metric("watchgate_plugin_invocations_total{plugin=\"event-log\",outcome=\"ok\"}"),
        delivered as f64
    );
    let status = g.stop();
    assert!(status.success(), "exit status {status}; log:\n{}", g.log());
}

#[test]
fn configmap_style_symlink_swap_yields_exact_puts_and_deletes() {
    let mut g = Gateway::new();
    let w = g.path("watched");
    // Kubernetes layout: ..data -> ..v1/, and top-level symlinks into ..data.
    std::fs::create_dir(w.join("..v1")).unwrap();
    std::fs::write(w.join("..v1/same"), "unchanged").unwrap();
    std::fs::write(w.join("..v1/changes"), "old").unwrap();
    std::fs::write(w.join("..v1/goes-away"), "bye").unwrap();
    std::os::unix::fs::symlink("..v1", w.join("..data")).unwrap();
    for k in ["same", "changes", "goes-away"] {
        std::os::unix::fs::symlink(format!("..data/{k}"), w.join(k)).unwrap();
    }
    g.install_event_log("event-log");
    g.start();
    g.wait_events("event-log", 3, DEADLINE);

    // The update: a new timestamped directory, ..data swapped atomically,
    // the vanished key's symlink removed.
    std::fs::create_dir(w.join("..v2")).unwrap();
    std::fs::write(w.join("..v2/same"), "unchanged").unwrap();
    std::fs::write(w.join("..v2/changes"), "new").unwrap();
    std::os::unix::fs::symlink("..v2", w.join("..data_tmp")).unwrap();
    std::fs::rename(w.join("..data_tmp"), w.join("..data")).unwrap();
    std::fs::remove_file(w.join("goes-away")).unwrap();
    std::fs::remove_dir_all(w.join("..v1")).unwrap();

    let all = wait_for("the swap to be reported", DEADLINE, || {
        let e = g.events("event-log");
        let tail = kkv(&e[3..]);
        tail.contains(&("delete".into(), "goes-away".into(), None))
            .then_some(e)
    });
    let (settled, _) = events_until_marker(&mut g);
    let mut tail = kkv(&settled[3..]);
    tail.sort();
    assert_eq!(
        tail,
        vec![
            ("delete".into(), "goes-away".into(), None),
            ("put".into(), "changes".into(), Some("new".into())),
        ],
        "all events: {all:#?}"
    );
}

//! Hostile tenants spending the host's disk through `files` and its memory
//! and state writer through `state`: each fixture runs beside `event-log`
//! (with the checks of [`beside_event_log`]), and the gateway must refuse
//! and count what passes the plugin's bound with a message naming it, keep
//! disk and memory under stated bounds, and still let the operator unload
//! the plugin and stop the gateway within its grace.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::Duration;

use crate::adversarial::{N, PER_EVENT, beside_event_log, outcome, rss_kb};
use crate::support::{GRACE, Gateway, wait_for};

/// The default `limits.files_mb`, in bytes.
const FILES_BYTES: u64 = 64 << 20;
/// The default `limits.files_count`.
const FILES_COUNT: u64 = 1000;

/// How often `plugin`'s calls to `capability` ended in `outcome`.
fn capability(g: &Gateway, plugin: &str, capability: &str, outcome: &str) -> f64 {
    g.metric(&format!(
        "watchgate_capability_calls_total{{plugin=\"{plugin}\",capability=\"{capability}\",outcome=\"{outcome}\"}}"
    ))
}

/// `watchgate_plugin_files_{name}` of `plugin`.
fn files_gauge(g: &Gateway, plugin: &str, name: &str) -> f64 {
    g.metric(&format!(
        "watchgate_plugin_files_{name}{{plugin=\"{plugin}\"}}"
    ))
}

/// What is under a directory: bytes of file contents, bytes allocated on
/// disk (directories included) and entries.
#[derive(Debug, PartialEq, Eq)]
struct DiskUse {
    bytes: u64,
    allocated: u64,
    entries: u64,
}

fn disk_use(dir: &Path) -> DiskUse {
    let mut used = DiskUse {
        bytes: 0,
        allocated: 0,
        entries: 0,
    };
    for entry in walkdir::WalkDir::new(dir).min_depth(1) {
        let meta = entry.unwrap().metadata().unwrap();
        used.entries += 1;
        used.allocated += meta.blocks() * 512;
        if meta.is_file() {
            used.bytes += meta.len();
        }
    }
    used
}

/// The operator deletes `plugin`'s file: the gateway drops it and keeps
/// delivering to `event-log`; then SIGTERM ends it, cleanly, within its
/// grace.
fn unload_and_stop(g: &mut Gateway, plugin: &str) {
    let delivered = g.events("event-log").len();
    std::fs::remove_file(g.path(&format!("plugins.d/{plugin}.wasm"))).unwrap();
    wait_for(
        &format!("{plugin} to be unloaded"),
        Duration::from_secs(30),
        || (g.plugin_names() == ["event-log"]).then_some(()),
    );
    std::fs::write(g.path("watched/after-unload"), "x").unwrap();
    let events = g.wait_events("event-log", delivered + 1, PER_EVENT);
    assert_eq!(events.last().unwrap()["key"], "after-unload");
    g.stop_within(GRACE + Duration::from_secs(2));
}

#[test]
fn fault_files_fill_is_held_to_its_quota_across_a_restart() {
    const FAULT: &str = "fault-files-fill";
    let mut g = beside_event_log(
        FAULT,
        &format!("[grants]\nfiles = \"../out/{FAULT}\"\n"),
        |i| i.to_string(),
    );
    wait_for(
        "every filling call to finish",
        Duration::from_secs(60),
        || (outcome(&g.metrics(), FAULT, "ok") >= N as f64).then_some(()),
    );
    assert_eq!(outcome(&g.metrics(), FAULT, "ok"), N as f64);
    // Each call had its append, its file creation and its replace refused
    // (a batch call cut short by its deadline and handled again event by
    // event counts its refusals too).
    let refused = capability(&g, FAULT, "files", "quota");
    assert!(refused >= (3 * N) as f64, "{refused} writes refused");
    let dir = g.path(&format!("out/{FAULT}"));
    let used = disk_use(&dir);
    // Filled to the byte and to the entry, and no further.
    assert_eq!(used.bytes, FILES_BYTES, "{used:?}");
    assert_eq!(used.entries, FILES_COUNT, "{used:?}");
    // Contents plus a block per entry at most.
    assert!(
        used.allocated <= FILES_BYTES + FILES_COUNT * 4096,
        "{used:?}"
    );
    assert_eq!(files_gauge(&g, FAULT, "bytes"), FILES_BYTES as f64);
    assert_eq!(files_gauge(&g, FAULT, "entries"), FILES_COUNT as f64);
    let log = g.log();
    assert!(
        !log.contains("not stopped"),
        "the fixture had to stop itself"
    );
    for refusal in [
        "append stopped after 64 MiB: append \\\"fill/big.log\\\" refused: files quota: 67108864 bytes are in use of the 67108864 allowed (limits.files_mb = 64); this write needs 1048576 more",
        "touch stopped after",
        "files and directories are in use of the 1000 allowed (limits.files_count)",
        "replace refused: replace \\\"big.conf\\\" refused: files quota",
    ] {
        assert!(log.contains(refusal), "no {refusal:?} in the log");
    }

    // A restart measures what is on disk: the quota does not start over.
    let status = g.stop();
    assert_eq!(status.code(), Some(0), "log:\n{}", g.log());
    g.start();
    assert_eq!(files_gauge(&g, FAULT, "bytes"), FILES_BYTES as f64);
    std::fs::write(g.path("watched/after-restart"), "x").unwrap();
    g.wait_events("event-log", N + 1, PER_EVENT);
    wait_for(
        "the call after the restart",
        Duration::from_secs(30),
        || (outcome(&g.metrics(), FAULT, "ok") >= 1.0).then_some(()),
    );
    assert_eq!(capability(&g, FAULT, "files", "quota"), 3.0);
    assert!(
        g.log().contains("append stopped after 0 MiB"),
        "an append passed the quota after the restart"
    );
    assert_eq!(disk_use(&dir), used);
    unload_and_stop(&mut g, FAULT);
}

#[test]
fn fault_state_flood_is_held_to_its_share_of_the_state_writer() {
    const FAULT: &str = "fault-state-flood";
    /// The fixture's sets of one key per event.
    const SAME_KEY_SETS: f64 = 100.0;
    /// How much the gateway may grow while the flood goes on. Without the
    /// bound every same-key value (256 KiB, 100 per event) was queued.
    const RSS_GROWTH_KB: u64 = 128 * 1024;
    /// The state store's file: the plugin's state is 8.25 MiB, rewritten
    /// over and over.
    const STORE_BYTES: u64 = 64 << 20;
    // Each call floods until a tenth of its deadline is left, and then has
    // that tenth to return: 150 ms, room enough for a busy machine to let
    // the guest run again, while 24 calls still take about half a minute.
    let mut g = beside_event_log(FAULT, "[limits]\ntimeout_ms = 1500\n", |i| i.to_string());
    let rss_after_delivery = rss_kb(g.pid());
    wait_for(
        "every flooding call to finish",
        Duration::from_secs(90),
        || {
            g.assert_running();
            (outcome(&g.metrics(), FAULT, "ok") >= N as f64).then_some(())
        },
    );
    let rss = rss_kb(g.pid());
    eprintln!("{FAULT}: RSS {rss_after_delivery} → {rss} kB after the flood");
    assert!(
        rss <= rss_after_delivery + RSS_GROWTH_KB,
        "gateway RSS grew from {rss_after_delivery} kB to {rss} kB"
    );
    assert_eq!(outcome(&g.metrics(), FAULT, "ok"), N as f64);
    // Every call flooded until a set was refused; those that found the
    // writer behind waited for it first.
    let busy = capability(&g, FAULT, "state", "busy");
    assert!(busy >= N as f64, "{busy} sets refused in {N} calls");
    let waits = g.metric(&format!(
        "watchgate_plugin_state_waits_total{{plugin=\"{FAULT}\"}}"
    ));
    assert!(waits >= 1.0, "no set waited for the writer");
    let accepted = capability(&g, FAULT, "state", "ok");
    assert!(
        accepted >= N as f64 * SAME_KEY_SETS,
        "only {accepted} sets accepted"
    );
    let log = g.log();
    assert!(
        log.contains("state flood: 100 same-key sets")
            && log.contains(
                "bytes) of this plugin are still waiting for the state store, at most 1024 writes and 1048576 bytes may wait"
            ),
        "no refusal naming the bound in the log"
    );
    let store = std::fs::metadata(g.path("data/state.redb")).unwrap().len();
    eprintln!(
        "{FAULT}: {accepted} sets accepted, {busy} refused, {waits} waited; state store {store} bytes"
    );
    assert!(
        store <= STORE_BYTES,
        "the state store grew to {store} bytes"
    );
    unload_and_stop(&mut g, FAULT);
}

//! A large initial sync completes and costs a bounded amount of memory per
//! key. Not a timing test: the deadline only catches a sync that never ends,
//! and speed is measured by `watchgate-bench`'s `scale_sync`.

use std::time::Duration;

use etcd_client::{Client, Txn, TxnOp};

use crate::adversarial::rss_kb;
use crate::etcd_harness::Etcd;
use crate::etcd_source::etcd_source;
use crate::support::{Gateway, wait_for};

/// Keys written under the source's prefix.
const KEYS: usize = 100_000;

/// Resident memory the gateway may grow by per key of a 100-byte value.
/// Generous: this debug build grows by about 2 KB per key (the release
/// build by about 1.5 KB, BENCHMARKS.md `scale_sync`). It catches what grows
/// memory by half again, such as each event kept twice over; smaller
/// regressions are for the bench's figures to show.
const MAX_BYTES_PER_KEY: u64 = 3 * 1024;

fn handled(g: &Gateway) -> f64 {
    g.metric("watchgate_plugin_invocations_total{plugin=\"noop\",outcome=\"ok\"}")
}

#[test]
fn a_hundred_thousand_key_sync_completes_within_a_memory_bound_per_key() {
    let etcd = Etcd::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = rt
        .block_on(Client::connect([etcd.client_url()], None))
        .expect("connect to etcd");
    for start in (0..KEYS).step_by(100) {
        let ops: Vec<TxnOp> = (start..start + 100)
            .map(|i| TxnOp::put(format!("/wg/{i:06}"), vec![b'v'; 100], None))
            .collect();
        rt.block_on(client.txn(Txn::new().and_then(ops)))
            .expect("etcd txn");
    }

    // The same gateway and plugin over a one-file source: what the keys'
    // memory is measured over.
    let mut base = Gateway::new();
    base.install("noop", "noop", "");
    base.start();
    let base_kb = rss_kb(base.pid());
    base.stop();

    let mut g = Gateway::with_sources(&etcd_source(&[etcd.client_url()], ""));
    g.install("noop", "noop", "queue_capacity = 200_000\n");
    g.start();
    wait_for("every key to be handled", Duration::from_secs(600), || {
        g.assert_running();
        (handled(&g) >= KEYS as f64).then_some(())
    });
    let kb = rss_kb(g.pid());
    let per_key = kb.saturating_sub(base_kb) * 1024 / KEYS as u64;
    eprintln!("{KEYS} keys: {kb} KiB resident, {base_kb} KiB without them: {per_key} B per key");
    assert!(
        per_key <= MAX_BYTES_PER_KEY,
        "{per_key} bytes per key (bound {MAX_BYTES_PER_KEY}): {kb} KiB with {KEYS} keys, {base_kb} KiB without"
    );
    let v = g.json("/v1/sources");
    assert_eq!(v["sources"][0]["synced"], true, "{v}");
    g.assert_running();
}

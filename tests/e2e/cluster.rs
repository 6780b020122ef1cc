//! Cluster mode: several real gateway processes coordinated through a real
//! etcd. Each plugin runs on exactly one live replica; a killed owner's
//! plugins resume elsewhere from its cursor; a replica cut off from etcd
//! stops dispatching before its lease can have expired; replicas joining
//! and leaving rebalance.
//!
//! The data comes from an etcd source on the same etcd (prefix `/wg/`); the
//! cluster's records live under its own prefix.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use watchgate::cluster::desired_owner;

use crate::etcd_harness::Etcd;
use crate::etcd_source::{Change, DEADLINE, SENTINEL, Store, changes, etcd_source, spawn_writer};
use crate::fault_proxy::{FaultProxy, Mode};
use crate::support::{Gateway, wait_for};

/// A replica named `name` coordinating through `coord`, reading data from
/// `data`, with an unfolded `event-log` per plugin name (`all` runs on
/// every replica).
fn replica(data: &str, coord: &str, name: &str, plugins: &[String], ttl: &str) -> Gateway {
    let config = format!(
        "[cluster]\netcd = [\"{coord}\"]\nname = \"{name}\"\nlease_ttl = \"{ttl}\"\n\n{}",
        etcd_source(&[data.to_owned()], "")
    );
    let g = Gateway::with_sources(&config);
    for p in plugins {
        let mode = if p == "all" {
            "mode = \"every-replica\"\n"
        } else {
            ""
        };
        g.install(
            p,
            "event-log",
            &format!("{mode}queue_capacity = 1_000_000\n[grants]\nfiles = \"../out/{p}\"\n"),
        );
    }
    g
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("p{i}")).collect()
}

/// Plugins each replica owns, by replica, as its `/v1/cluster` says.
fn owned(gs: &[&Gateway]) -> Vec<BTreeSet<String>> {
    gs.iter()
        .map(|g| {
            g.json("/v1/cluster")["owned"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        })
        .collect()
}

/// Wait until every plugin in `plugins` is owned by exactly one of `gs`,
/// its desired owner by rendezvous hashing over `gs`, with every replica
/// seeing `gs.len()` members; returns the ownership. (Without the desired
/// owner check, the moment a replica joins, before any hand-over began,
/// looked settled: the old owner still held everything.)
fn wait_settled(gs: &mut [&mut Gateway], plugins: &[String]) -> Vec<BTreeSet<String>> {
    wait_for("ownership to settle", DEADLINE, || {
        for g in gs.iter_mut() {
            g.assert_running();
        }
        let views: Vec<&Gateway> = gs.iter().map(|g| &**g).collect();
        let members_ok = views
            .iter()
            .all(|g| g.metric("watchgate_cluster_replicas") == views.len() as f64);
        let names: Vec<String> = views
            .iter()
            .map(|g| g.json("/v1/cluster")["name"].as_str().unwrap().to_owned())
            .collect();
        let members: BTreeSet<String> = names.iter().cloned().collect();
        let o = owned(&views);
        let desired = names.iter().zip(&o).all(|(name, owns)| {
            let want: BTreeSet<String> = plugins
                .iter()
                .filter(|p| desired_owner(p, &members) == Some(name.as_str()))
                .cloned()
                .collect();
            *owns == want
        });
        (members_ok && desired).then_some(o)
    })
}

/// The events `plugin` logged on `g`.
fn log_of(g: &Gateway, plugin: &str) -> Vec<Value> {
    g.events(plugin)
}

#[test]
fn each_plugin_runs_once_per_cluster_not_once_per_replica() {
    let etcd = Etcd::start();
    let url = etcd.client_url();
    let mut plugins = names(10);
    plugins.push("all".into());
    let mut a = replica(&url, &url, "gw-a", &plugins, "3s");
    let mut b = replica(&url, &url, "gw-b", &plugins, "3s");
    let mut c = replica(&url, &url, "gw-c", &plugins, "3s");
    a.start();
    b.start();
    c.start();
    let ten = names(10);
    let ownership = wait_settled(&mut [&mut a, &mut b, &mut c], &ten);
    assert!(
        ownership.iter().all(|o| !o.is_empty()),
        "plugins are spread over the replicas: {ownership:?}"
    );
    let view = a.json("/v1/cluster");
    assert_eq!(view["replicas"].as_array().unwrap().len(), 3, "{view:#}");

    let mut store = Store::connect(std::slice::from_ref(&url));
    let first = store.revision() + 1;
    for i in 0..50 {
        store
            .put(&format!("/wg/k{}", i % 7), format!("v{i}"))
            .unwrap();
    }
    store.put(SENTINEL, "end").unwrap();
    let history = store.history(first);
    let gs = [&a, &b, &c];
    for p in &ten {
        let lines = wait_for(&format!("{p} to see the sentinel"), DEADLINE, || {
            let all: Vec<Value> = gs.iter().flat_map(|g| log_of(g, p)).collect();
            all.iter().any(|e| e["key"] == SENTINEL).then_some(all)
        });
        let mut got = changes(&lines);
        got.sort_by_key(|c| c.3);
        assert_eq!(
            got, history,
            "{p}: every change exactly once in the cluster"
        );
        let owners: Vec<usize> = gs
            .iter()
            .enumerate()
            .filter(|(_, g)| !log_of(g, p).is_empty())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(owners.len(), 1, "{p} ran on replicas {owners:?}");
        assert!(
            lines
                .iter()
                .all(|e| e["fencing_token"].as_u64().unwrap_or(0) > 0),
            "{p}: every event carries the owner's fencing token"
        );
    }
    // `all` runs on every replica.
    for g in gs {
        let lines = wait_for("all to see the sentinel", DEADLINE, || {
            let l = log_of(g, "all");
            l.iter().any(|e| e["key"] == SENTINEL).then_some(l)
        });
        assert_eq!(changes(&lines), history);
    }
}

#[test]
fn killing_an_owner_moves_its_plugins_and_loses_nothing() {
    const CHANGES: usize = 2000;
    let etcd = Etcd::start();
    let url = etcd.client_url();
    let plugins = names(3);
    let mut gs: Vec<Gateway> = ["gw-a", "gw-b", "gw-c"]
        .iter()
        .map(|n| replica(&url, &url, n, &plugins, "3s"))
        .collect();
    for g in &mut gs {
        g.start();
    }
    {
        let mut refs: Vec<&mut Gateway> = gs.iter_mut().collect();
        wait_settled(&mut refs, &plugins);
    }
    let views: Vec<&Gateway> = gs.iter().collect();
    let victim = owned(&views)
        .iter()
        .position(|o| o.contains("p0"))
        .expect("someone owns p0");

    let mut store = Store::connect(std::slice::from_ref(&url));
    let first = store.revision() + 1;
    let (writer, progress) = spawn_writer(&url, CHANGES, 11, 40);
    wait_for("500 writes", DEADLINE, || {
        (progress.load(Ordering::SeqCst) >= 500).then_some(())
    });
    gs[victim].kill9();
    let killed = Instant::now();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let new_owner = wait_for("p0 to move", DEADLINE, || {
        survivors
            .iter()
            .copied()
            .find(|&i| owned(&[&gs[i]])[0].contains("p0"))
    });
    let moved_after = killed.elapsed();
    // Lease TTL (3 s) plus a few seconds.
    assert!(
        moved_after < Duration::from_secs(8),
        "p0 moved only after {moved_after:?}"
    );
    writer.join().unwrap();
    store.put(SENTINEL, "end").unwrap();
    let history = store.history(first);
    let lines = wait_for("p0 to see the sentinel", DEADLINE, || {
        let l = log_of(&gs[new_owner], "p0");
        l.iter().any(|e| e["key"] == SENTINEL).then_some(l)
    });
    let before = log_of(&gs[victim], "p0");
    let all: Vec<Change> = changes(&before)
        .into_iter()
        .chain(changes(&lines))
        .collect();
    let got: HashSet<&Change> = all.iter().collect();
    let missing: Vec<&Change> = history.iter().filter(|c| !got.contains(c)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} changes never reached p0: {:?}",
        missing.len(),
        history.len(),
        &missing[..missing.len().min(5)]
    );
    // In order per key on each replica.
    for (who, l) in [("old", &before), ("new", &lines)] {
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for (_, key, _, rev) in changes(l) {
            let prev = last.insert(key.clone(), rev).unwrap_or(0);
            assert!(rev > prev, "{who} owner: {key} went from {prev} to {rev}");
        }
    }
    let duplicates = all.len() - history.len();
    eprintln!(
        "p0 moved {moved_after:?} after kill -9; {} changes, {} delivered, {duplicates} duplicates",
        history.len(),
        all.len()
    );
    assert!(duplicates <= 500, "{duplicates} duplicates");
    let new_tokens: BTreeSet<u64> = lines
        .iter()
        .filter_map(|e| e["fencing_token"].as_u64())
        .collect();
    let old_tokens: BTreeSet<u64> = before
        .iter()
        .filter_map(|e| e["fencing_token"].as_u64())
        .collect();
    assert!(
        new_tokens.iter().min() > old_tokens.iter().max(),
        "the new owner's fencing token is newer: {old_tokens:?} then {new_tokens:?}"
    );
    assert!(gs[new_owner].metric("watchgate_cluster_handovers_total") >= 1.0);
}

#[test]
fn a_replica_cut_off_from_etcd_stops_before_its_lease_can_expire_elsewhere() {
    let etcd = Etcd::start();
    let url = etcd.client_url();
    let proxy = FaultProxy::start(etcd.client_addr());
    let plugins = names(4);
    let mut a = replica(&url, &proxy.url(), "gw-a", &plugins, "3s");
    let mut b = replica(&url, &url, "gw-b", &plugins, "3s");
    a.start();
    b.start();
    let ownership = wait_settled(&mut [&mut a, &mut b], &plugins);
    let p = ownership[0]
        .iter()
        .next()
        .expect("gw-a owns a plugin")
        .clone();

    // A steady stream of writes, each remembered with its time.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, count, url) = (stop.clone(), count.clone(), url.clone());
        std::thread::spawn(move || {
            let mut store = Store::connect(&[url]);
            let mut written: Vec<(u64, Instant)> = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let rev = store.retry(|s| s.put(&format!("/wg/k{}", i % 10), format!("v{i}")));
                written.push((rev as u64, Instant::now()));
                i += 1;
                count.store(i, Ordering::SeqCst);
                // Paced, so the stream spans the cut-off and the take-over.
                std::thread::sleep(Duration::from_millis(20));
            }
            written
        })
    };
    wait_for("writes before the cut", DEADLINE, || {
        (count.load(Ordering::SeqCst) >= 20).then_some(())
    });
    proxy.set_mode(Mode::Blackhole);
    let cut = Instant::now();
    wait_for("gw-b to take the plugin over", DEADLINE, || {
        owned(&[&b])[0].contains(&p).then_some(())
    });
    let taken = cut.elapsed();
    wait_for("gw-a to give up", DEADLINE, || {
        let v = a.json("/v1/cluster");
        (v["lease_valid"] == false && v["owned"].as_array().unwrap().is_empty()).then_some(())
    });
    let deadline = cut + Duration::from_secs(3);
    wait_for("the lease deadline to pass", DEADLINE, || {
        (Instant::now() > deadline).then_some(())
    });
    let now = count.load(Ordering::SeqCst);
    wait_for("writes after the take-over", DEADLINE, || {
        (count.load(Ordering::SeqCst) >= now + 20).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();

    // gw-a renewed at the latest just before the cut: its lease is over by
    // cut + TTL. It must not have handled any change written after that.
    let late: HashSet<u64> = written
        .iter()
        .filter(|(_, at)| *at > deadline)
        .map(|(rev, _)| *rev)
        .collect();
    assert!(
        !late.is_empty(),
        "the test wrote nothing after the deadline"
    );
    let a_revs: Vec<u64> = changes(&log_of(&a, &p)).iter().map(|c| c.3).collect();
    let overlap: Vec<&u64> = a_revs.iter().filter(|r| late.contains(r)).collect();
    assert!(
        overlap.is_empty(),
        "gw-a handled {} changes written after its lease had run out",
        overlap.len()
    );
    // Nothing lost: between them, every change reached the plugin.
    let mut store = Store::connect(std::slice::from_ref(&url));
    store.put(SENTINEL, "end").unwrap();
    wait_for("gw-b to see the sentinel", DEADLINE, || {
        log_of(&b, &p)
            .iter()
            .any(|e| e["key"] == SENTINEL)
            .then_some(())
    });
    let seen: HashSet<u64> = changes(&log_of(&a, &p))
        .into_iter()
        .chain(changes(&log_of(&b, &p)))
        .map(|c| c.3)
        .collect();
    let lost: Vec<&(u64, Instant)> = written.iter().filter(|(r, _)| !seen.contains(r)).collect();
    assert!(
        lost.is_empty(),
        "{} changes reached nobody (first {:?}, cut at {:?}); gw-a log:\n{}\ngw-b log:\n{}",
        lost.len(),
        lost.first().map(|(r, at)| (r, at.duration_since(cut))),
        cut.elapsed(),
        a.log(),
        b.log()
    );
    eprintln!("{p} moved {taken:?} after gw-a was cut off");

    // Healed, gw-a joins again with a new lease and gets its plugins back.
    proxy.set_mode(Mode::Pass);
    wait_for("gw-a to own its plugins again", DEADLINE, || {
        let v = a.json("/v1/cluster");
        (v["lease_valid"] == true && owned(&[&a])[0] == ownership[0]).then_some(())
    });
}

#[test]
fn replicas_joining_and_leaving_rebalance_ownership() {
    let etcd = Etcd::start();
    let url = etcd.client_url();
    let plugins = names(6);
    let mut a = replica(&url, &url, "gw-a", &plugins, "6s");
    let mut b = replica(&url, &url, "gw-b", &plugins, "6s");
    a.start();
    let alone = wait_settled(&mut [&mut a], &plugins);
    assert_eq!(alone[0].len(), 6);

    b.start();
    let two = wait_settled(&mut [&mut a, &mut b], &plugins);
    assert!(!two[1].is_empty(), "gw-b took some plugins: {two:?}");
    assert!(b.metric("watchgate_cluster_handovers_total") >= 1.0);

    // A clean stop hands its plugins back at once, without waiting for the
    // lease to run out.
    let stopping = Instant::now();
    assert!(b.stop().success());
    let back = wait_settled(&mut [&mut a], &plugins);
    assert_eq!(back[0].len(), 6);
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "hand-back took {:?}, as if waiting for the 6 s lease",
        stopping.elapsed()
    );
}

#[test]
fn trace_names_the_owning_replica_of_each_plugin() {
    let etcd = Etcd::start();
    let url = etcd.client_url();
    let mut plugins = names(4);
    plugins.push("all".into());
    let mut a = replica(&url, &url, "gw-a", &plugins, "3s");
    let mut b = replica(&url, &url, "gw-b", &plugins, "3s");
    a.start();
    b.start();
    let four = names(4);
    let ownership = wait_settled(&mut [&mut a, &mut b], &four);
    let mut store = Store::connect(std::slice::from_ref(&url));
    store.put(SENTINEL, "end").unwrap();
    let path = format!("/v1/trace?source=main&key={}", SENTINEL.replace('/', "%2F"));
    let owner_of = |name: &str| {
        if ownership[0].contains(name) {
            Some("gw-a")
        } else if ownership[1].contains(name) {
            Some("gw-b")
        } else {
            None
        }
    };
    for (g, mine) in [(&a, &ownership[0]), (&b, &ownership[1])] {
        // A replica learns the others' plugins from the cluster view it
        // refreshes, so its trace may name an owner a moment after its own
        // plugins have handled the change: wait for both.
        wait_for("the owners to handle the change, named", DEADLINE, || {
            let (code, body) = g.get(&path)?;
            let t: Value = serde_json::from_str(&body).ok().filter(|_| code == 200)?;
            let settled = t["plugins"].as_array()?.iter().all(|p| {
                let name = p["plugin"].as_str().unwrap_or("");
                let want = if name == "all" || mine.contains(name) {
                    "handled"
                } else {
                    "parked"
                };
                p["status"] == want && p["owner"].as_str() == owner_of(name)
            });
            settled.then_some(t)
        });
    }
}

//! Scale cases beside their anchors: many distinct etcd keys changing as
//! fast as etcd takes them, and a directory of many files.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::Client;

use super::etcd::{Etcd, etcd_source, now_ns};
use super::process::Proc;
use super::{BenchArgs, CaseResult, Check, Samples, percentile};

/// Churn: distinct keys written by many concurrent writers, unpaced, so the
/// rate is what etcd accepts; every change must reach the plugin.
pub(super) fn scale_churn(args: &BenchArgs) -> anyhow::Result<CaseResult> {
    let (keys, concurrency, probe_for, duration): (usize, &[usize], _, _) = if args.quick {
        (
            1_000,
            &[2, 4],
            Duration::from_millis(300),
            Duration::from_secs(1),
        )
    } else {
        (
            10_000,
            &[8, 16, 32, 64, 128],
            Duration::from_secs(3),
            Duration::from_secs(30),
        )
    };
    let probe = std::fs::read(args.plugin("bench-probe")?)?;
    let etcd = Etcd::start()?;
    let mut s = Samples::default();
    let mut gw = Proc::new(args, Some(&etcd_source(&etcd.url, "/churn/")))?;
    gw.install(
        "probe",
        &probe,
        "queue_capacity = 1_000_000\n[grants]\nfiles = \"../out/probe\"\n",
    )?;
    gw.start()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = rt.block_on(Client::connect([etcd.url.as_str()], None))?;
    // etcd fsyncs every commit and groups the writes that arrive meanwhile,
    // so the rate it accepts is set by how many writes wait at once: a few
    // seconds at each concurrency first, then the measured run at the best.
    let mut earlier = 0;
    let mut best = (0.0, 1);
    for &writers in concurrency {
        let t = Instant::now();
        let n = rt.block_on(write(&client, writers, keys, probe_for)).len();
        earlier += n;
        let rate = n as f64 / t.elapsed().as_secs_f64();
        eprintln!("scale_churn: {writers} writers: {rate:.0} puts/s");
        if rate > best.0 {
            best = (rate, writers);
        }
    }
    let writers = best.1;
    let started = Instant::now();
    let acks = rt.block_on(write(&client, writers, keys, duration));
    let wrote_for = started.elapsed();
    let sent = acks.len();
    let probe_log = gw.path("out/probe/entries.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    let entries = loop {
        let e = entries(&probe_log);
        if e.len() >= earlier + sent || Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let acked: HashMap<(&str, u128), u128> = acks
        .iter()
        .map(|(k, sent, acked)| ((k.as_str(), *sent), *acked))
        .collect();
    let delivered: Vec<f64> = entries
        .iter()
        .filter(|(k, _, sent)| acked.contains_key(&(k.as_str(), *sent)))
        .map(|(_, entered, sent)| entered.saturating_sub(*sent) as f64 / 1e6)
        .collect();
    let put: Vec<f64> = acks
        .iter()
        .map(|(_, sent, acked)| acked.saturating_sub(*sent) as f64 / 1e6)
        .collect();
    s.add(
        "accepted_changes_per_s",
        "changes/s",
        sent as f64 / wrote_for.as_secs_f64(),
    );
    s.add("writers", "writers", writers as f64);
    s.add("sent", "changes", sent as f64);
    s.add("delivered", "changes", delivered.len() as f64);
    s.add("etcd_put_p50_ms", "ms", percentile(&put, 50.0));
    s.add("etcd_put_p99_ms", "ms", percentile(&put, 99.0));
    s.add("latency_p50_ms", "ms", percentile(&delivered, 50.0));
    s.add("latency_p99_ms", "ms", percentile(&delivered, 99.0));
    s.add("rss_mib", "MiB", gw.rss_kib()? / 1024.0);
    gw.stop()?;
    s.note(format!(
        "{keys} distinct keys written for {duration:?} by concurrent writers, each putting its \
         next key as soon as etcd acknowledged the last (no pacing: the rate is what etcd 3.4, \
         which fsyncs every commit, accepts here beside the gateway); {probe_for:?} at each of \
         {concurrency:?} writers first, and the measured run with as many as gave the highest \
         rate (`writers`). Latency is put sent → \
         entry into the bench-probe plugin, which appends a line per change; `etcd_put` is the \
         same put's own acknowledgement, sent → acknowledged, the anchor for how late a change \
         can be at all. A change counts as delivered when the plugin's line names its key and \
         its send time."
    ));
    Ok(s.finish(
        "scale_churn",
        "10,000 distinct keys changing as fast as etcd accepts writes, through etcd into one \
         plugin: what arrives, and how late.",
        "every change delivered",
        |s| {
            let got = s.median("delivered").unwrap_or(0.0);
            let sent = s.median("sent").unwrap_or(f64::MAX);
            (None, Default::default(), Some(got >= sent && got > 0.0))
        },
    ))
}

/// `writers` concurrent writers putting `keys` distinct keys for
/// `duration`, each as soon as its last put was acknowledged:
/// `(key, sent_ns, acknowledged_ns)` per put.
async fn write(
    client: &Client,
    writers: usize,
    keys: usize,
    duration: Duration,
) -> Vec<(String, u128, u128)> {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            let mut n = 0usize;
            let start = Instant::now();
            while start.elapsed() < duration {
                let key = format!("/churn/k{:05}", (n * writers + w) % keys);
                let sent = now_ns();
                if c.put(key.clone(), sent.to_string(), None).await.is_err() {
                    break;
                }
                acks.push((key, sent, now_ns()));
                n += 1;
            }
            acks
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all
}

/// `(key, entered_ns, sent_ns)` from the bench-probe's `entries.log`.
fn entries(path: &Path) -> Vec<(String, u128, u128)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let key = f.next()?.to_owned();
            let entered = f.next()?.parse().ok()?;
            let sent = f.next()?.trim().parse().ok()?;
            Some((key, entered, sent))
        })
        .collect()
}

/// Bytes a tree takes: allocated on disk (what `du` counts) and apparent
/// (the files' lengths).
fn disk_bytes(root: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut allocated, mut apparent) = (0, 0);
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let m = std::fs::metadata(&d)?;
        allocated += m.blocks() * 512;
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                dirs.push(e.path());
            } else {
                allocated += m.blocks() * 512;
                apparent += m.len();
            }
        }
    }
    Ok((allocated, apparent))
}

/// The resident memory of a gateway with `plugin` over a one-file source:
/// what the memory of many keys is measured over.
pub(super) fn base_rss_kib(args: &BenchArgs, plugin: &[u8]) -> anyhow::Result<f64> {
    let mut gw = Proc::new(args, None)?;
    gw.install("noop", plugin, "")?;
    gw.start()?;
    let kib = gw.rss_kib()?;
    gw.stop()?;
    Ok(kib)
}

/// Scale: a file source over a directory of many small files, beside the
/// bytes those files take on disk.
pub(super) fn scale_files(args: &BenchArgs) -> anyhow::Result<CaseResult> {
    let n: usize = if args.quick { 2_000 } else { 100_000 };
    let per_dir = 1_000;
    let noop = std::fs::read(args.plugin("noop")?)?;
    let mut s = Samples::default();
    let sources = "[[source]]\nname = \"tree\"\nkind = \"file\"\npath = \"tree\"\n";
    let base_kib = base_rss_kib(args, &noop)?;
    s.add("base_rss_mib", "MiB", base_kib / 1024.0);
    for _ in 0..args.runs().min(3) {
        let mut gw = Proc::new(args, Some(sources))?;
        let tree = gw.path("tree");
        for i in 0..n {
            let dir = tree.join(format!("d{:03}", i / per_dir));
            if i % per_dir == 0 {
                std::fs::create_dir_all(&dir)?;
            }
            std::fs::write(dir.join(format!("f{i:06}.conf")), [b'v'; 100])?;
        }
        let (allocated, apparent) = disk_bytes(&tree)?;
        gw.install("noop", &noop, "queue_capacity = 200_000\n")?;
        let started = Instant::now();
        let ready = gw.start()?;
        let sample = "watchgate_plugin_invocations_total{plugin=\"noop\",outcome=\"ok\"}";
        let handled = |gw: &Proc, want: usize| -> anyhow::Result<Duration> {
            let since = Instant::now();
            while gw.metric(sample) < want as f64 {
                anyhow::ensure!(
                    since.elapsed() < Duration::from_secs(600),
                    "the plugin did not get {want} events"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(since.elapsed())
        };
        handled(&gw, n)?;
        let all_handled = started.elapsed();
        let synced_kib = gw.rss_kib()?;
        // One change: the source rescans the whole tree to find it, so the
        // memory after it includes what a rescan leaves behind.
        let one = tree.join("d000/f000000.conf");
        std::fs::write(&one, [b'w'; 100])?;
        let rescan = handled(&gw, n + 1)?;
        let after_kib = gw.rss_kib()?;
        let rss_kib = synced_kib.max(after_kib);
        let ratio = rss_kib * 1024.0 / allocated as f64;
        eprintln!(
            "scale_files: {n} files: ready {:.1}s, handled {:.1}s, one change {:.0} ms, \
             gateway {:.0} / {:.0} MiB, on disk {:.0} MiB allocated, {:.1} MiB apparent",
            ready.as_secs_f64(),
            all_handled.as_secs_f64(),
            rescan.as_secs_f64() * 1e3,
            synced_kib / 1024.0,
            after_kib / 1024.0,
            allocated as f64 / 1048576.0,
            apparent as f64 / 1048576.0
        );
        s.add("ready_s", "s", ready.as_secs_f64());
        s.add("all_handled_s", "s", all_handled.as_secs_f64());
        s.add("one_change_ms", "ms", rescan.as_secs_f64() * 1e3);
        s.add("rss_synced_mib", "MiB", synced_kib / 1024.0);
        s.add("rss_after_change_mib", "MiB", after_kib / 1024.0);
        s.add("disk_allocated_mib", "MiB", allocated as f64 / 1048576.0);
        s.add("disk_apparent_mib", "MiB", apparent as f64 / 1048576.0);
        s.add("rss_to_disk", "×", ratio);
        s.add(
            "bytes_per_file",
            "B",
            (rss_kib - base_kib).max(0.0) * 1024.0 / n as f64,
        );
        gw.stop()?;
    }
    let ratio = s.median("rss_to_disk").unwrap_or(f64::MAX);
    let checks = vec![Check {
        subject: format!("{}k", n / 1_000),
        figure: "rss_to_disk".into(),
        value: ratio,
        target: "≤ 1.5 × the bytes on disk",
        met: ratio <= 1.5,
    }];
    s.note(format!(
        "{n} files of 100 bytes, {per_dir} to a directory, under one file source with its \
         defaults, into one no-op plugin. ready is `/readyz` 200, handled the plugin called for \
         every file; then one file is changed, which the source finds by rescanning the tree \
         (`one_change`). Resident memory is read after the sync and after that change, and the \
         larger of the two is compared with the bytes the tree takes on disk as `du` counts \
         them (allocated blocks: `disk_allocated`); `disk_apparent` is the files' own lengths. \
         Bytes per file is the growth over `base_rss_mib` (the same plugin over a one-file \
         source), divided by the files."
    ));
    Ok(s.finish_with_checks(
        "scale_files",
        "A file source over 100,000 small files into one no-op plugin, beside the bytes the \
         files take on disk.",
        "resident memory ≤ 1.5 × the bytes on disk",
        checks,
        |_| Default::default(),
    ))
}

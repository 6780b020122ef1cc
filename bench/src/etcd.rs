//! Cases against a real etcd (Debian's `etcd-server`): end-to-end latency
//! next to `etcdctl watch`, and scale.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, Txn, TxnOp};
use parking_lot::Mutex;

use super::process::{Proc, rss_kib, wait_file};
use super::{BenchArgs, CaseResult, Check, Samples, free_port, percentile};

/// `etcd --version`, when etcd is installed.
pub(super) fn version() -> Option<String> {
    let out = Command::new("etcd").arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version: ").map(str::to_owned))
}

/// An etcd on loopback ports with a temporary data directory.
pub(super) struct Etcd {
    pub(super) child: Child,
    pub(super) url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub(super) fn start() -> anyhow::Result<Etcd> {
        anyhow::ensure!(
            version().is_some(),
            "etcd is not installed (Debian: apt-get install etcd-server etcd-client)"
        );
        let dir = tempfile::tempdir()?;
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{client}");
        let child = Command::new("etcd")
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("bench=http://127.0.0.1:{peer}"),
                "--quota-backend-bytes",
                &(4u64 << 30).to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let e = Etcd {
            child,
            url,
            _dir: dir,
        };
        let rt = runtime()?;
        let started = Instant::now();
        while rt
            .block_on(async {
                let mut c = Client::connect([e.url.as_str()], None).await?;
                c.get("/", None).await
            })
            .is_err()
        {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "etcd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(e)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub(super) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

pub(super) fn etcd_source(url: &str, prefix: &str) -> String {
    format!(
        "[[source]]\nname = \"etcd\"\nkind = \"etcd\"\nendpoints = [\"{url}\"]\nprefix = \"{prefix}\"\n"
    )
}

/// Latencies (µs) from `entries.log` lines `KEY ENTERED_NS SENT_NS`.
pub(super) fn probe_latencies(path: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let _key = f.next()?;
            let entered: u128 = f.next()?.parse().ok()?;
            let sent: u128 = f.next()?.trim().parse().ok()?;
            Some(entered.saturating_sub(sent) as f64 / 1e3)
        })
        .collect()
}

/// End-to-end latency: etcd put → plugin entry, next to `etcdctl watch`
/// and to `etcdctl watch -- CMD` running a shell handler per change.
pub(super) fn e2e_latency(args: &BenchArgs) -> anyhow::Result<CaseResult> {
    // Enough puts that the p99 rests on ten changes, not on one or two slow
    // wake-ups of a shared machine.
    let n = if args.quick { 20 } else { 1_000 };
    let probe = std::fs::read(args.plugin("bench-probe")?)?;
    let mut s = Samples::default();
    for _ in 0..args.runs() {
        let etcd = Etcd::start()?;
        let mut gw = Proc::new(args, Some(&etcd_source(&etcd.url, "/bench/")))?;
        gw.install("probe", &probe, "[grants]\nfiles = \"../out/probe\"\n")?;
        gw.start()?;
        // etcdctl watch: the time each change is printed.
        let mut watch = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &etcd.url, "watch", "--prefix", "/bench/"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let seen: Arc<Mutex<Vec<f64>>> = Arc::default();
        let reader = {
            let out = watch.stdout.take().expect("piped");
            let seen = seen.clone();
            std::thread::spawn(move || {
                // PUT / key / value, one line each.
                let mut lines = std::io::BufReader::new(out).lines();
                while let (Some(Ok(_)), Some(Ok(_)), Some(Ok(value))) =
                    (lines.next(), lines.next(), lines.next())
                {
                    let at = now_ns();
                    if let Ok(sent) = value.trim().parse::<u128>() {
                        seen.lock().push(at.saturating_sub(sent) as f64 / 1e3);
                    }
                }
            })
        };
        // etcdctl watch -- CMD: a shell per change, as users run callbacks.
        let exec_log = gw.path("out/exec.log");
        let mut exec = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &etcd.url,
                "watch",
                "--prefix",
                "/bench/",
                "--",
                "sh",
                "-c",
            ])
            .arg(format!(
                "echo \"$(date +%s%N) $ETCD_WATCH_VALUE\" >> {}",
                exec_log.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let rt = runtime()?;
        let mut client = rt.block_on(Client::connect([etcd.url.as_str()], None))?;
        // Both watchers are up once a warm-up change reaches them (they
        // start watching some time after their process starts).
        let started = Instant::now();
        while !exec_log.exists() || seen.lock().is_empty() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the etcdctl watchers saw nothing"
            );
            rt.block_on(client.put("/bench/warmup", now_ns().to_string(), None))?;
            std::thread::sleep(Duration::from_millis(100));
        }
        wait_file(
            &gw.path("out/probe/entries.log"),
            started,
            Duration::from_secs(30),
        )?;
        let probe_log = gw.path("out/probe/entries.log");
        let before = probe_latencies(&probe_log).len();
        seen.lock().clear();
        let exec_before = std::fs::read_to_string(&exec_log)?.lines().count();
        for i in 0..n {
            rt.block_on(client.put(format!("/bench/k{}", i % 10), now_ns().to_string(), None))?;
            // Paced: the latency of a change, not of a queue of them.
            std::thread::sleep(Duration::from_millis(20));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let exec_lat = loop {
            let lines: Vec<f64> = std::fs::read_to_string(&exec_log)?
                .lines()
                .skip(exec_before)
                .filter_map(|l| {
                    let (at, sent) = l.split_once(' ')?;
                    // etcdctl quotes the value.
                    let sent = sent.trim().trim_matches('"');
                    let (at, sent): (u128, u128) = (at.parse().ok()?, sent.parse().ok()?);
                    Some(at.saturating_sub(sent) as f64 / 1e3)
                })
                .collect();
            let probe_done = probe_latencies(&probe_log).len() >= before + n;
            if (lines.len() >= n && seen.lock().len() >= n && probe_done)
                || Instant::now() > deadline
            {
                break lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let gw_lat: Vec<f64> = probe_latencies(&probe_log)
            .into_iter()
            .skip(before)
            .collect();
        anyhow::ensure!(
            gw_lat.len() >= n,
            "the plugin saw {} of {n} changes",
            gw_lat.len()
        );
        let watch_lat = seen.lock().clone();
        s.add("watchgate_p50_us", "µs", percentile(&gw_lat, 50.0));
        s.add("watchgate_p99_us", "µs", percentile(&gw_lat, 99.0));
        s.add("etcdctl_watch_p50_us", "µs", percentile(&watch_lat, 50.0));
        s.add("etcdctl_watch_p99_us", "µs", percentile(&watch_lat, 99.0));
        s.add("etcdctl_exec_p50_us", "µs", percentile(&exec_lat, 50.0));
        s.add("etcdctl_exec_p99_us", "µs", percentile(&exec_lat, 99.0));
        let _ = watch.kill();
        let _ = exec.kill();
        let _ = watch.wait();
        let _ = exec.wait();
        let _ = reader.join();
        gw.stop()?;
    }
    s.note(format!(
        "{n} puts, one every 20 ms, each carrying its send time (wall clock, same machine). \
         watchgate: entry into the bench-probe plugin, which reads the clock first; etcdctl \
         watch: the moment its output line is read; etcdctl exec: `date` inside the shell \
         handler. Both tails come from thread wake-ups on a shared 2-core machine; the p99 \
         of each run is its tenth-slowest change."
    ));
    Ok(s.finish(
        "e2e_latency",
        "etcd put → plugin entry, next to what `etcdctl watch` itself sees for the same puts, \
         and to `etcdctl watch --prefix KEY -- sh -c …` running a shell handler per change.",
        "p99 no more than 1 ms above etcdctl watch",
        |s| {
            let ours = s.median("watchgate_p99_us").unwrap_or(f64::MAX);
            let theirs = s.median("etcdctl_watch_p99_us").unwrap_or(0.0);
            let exec = s.median("etcdctl_exec_p99_us").unwrap_or(0.0);
            let mut r = std::collections::BTreeMap::new();
            if theirs > 0.0 {
                r.insert("p99 to etcdctl watch".to_owned(), ours / theirs);
            }
            if ours > 0.0 {
                r.insert("etcdctl exec p99 to watchgate".to_owned(), exec / ours);
            }
            (None, r, Some(ours - theirs <= 1000.0))
        },
    ))
}

/// Write `n` keys under `prefix` in transactions of 100.
fn fill(
    rt: &tokio::runtime::Runtime,
    client: &mut Client,
    prefix: &str,
    n: usize,
) -> anyhow::Result<()> {
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|i| TxnOp::put(format!("{prefix}{i:06}"), vec![b'v'; 100], None))
            .collect();
        rt.block_on(client.txn(Txn::new().and_then(ops)))?;
    }
    Ok(())
}

/// Scale: the initial sync of many keys, next to etcd holding them.
pub(super) fn scale_sync(args: &BenchArgs) -> anyhow::Result<CaseResult> {
    let sizes: &[usize] = if args.quick {
        &[2_000]
    } else {
        &[100_000, 1_000_000]
    };
    let noop = std::fs::read(args.plugin("noop")?)?;
    let mut s = Samples::default();
    let mut checks = Vec::new();
    let base_kib = super::scale::base_rss_kib(args, &noop)?;
    s.add("base_rss_mib", "MiB", base_kib / 1024.0);
    for &n in sizes {
        let etcd = Etcd::start()?;
        let rt = runtime()?;
        let mut client = rt.block_on(Client::connect([etcd.url.as_str()], None))?;
        let filling = Instant::now();
        fill(&rt, &mut client, "/scale/", n)?;
        eprintln!(
            "scale_sync: {n} keys written in {:.1}s",
            filling.elapsed().as_secs_f64()
        );
        let label = if n >= 1_000_000 {
            format!("{}m", n / 1_000_000)
        } else {
            format!("{}k", n / 1_000)
        };
        // A million keys take a minute to write and a gigabyte of memory:
        // one run of that size, more of the smaller.
        let runs = if n >= 1_000_000 {
            1
        } else {
            args.runs().min(3)
        };
        for _ in 0..runs {
            let mut gw = Proc::new(args, Some(&etcd_source(&etcd.url, "/scale/")))?;
            gw.install("noop", &noop, "queue_capacity = 2_000_000\n")?;
            let started = Instant::now();
            let ready = gw.start()?;
            let sample = "watchgate_plugin_invocations_total{plugin=\"noop\",outcome=\"ok\"}";
            while gw.metric(sample) < n as f64 {
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(900),
                    "the plugin did not get every key"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let handled = started.elapsed();
            let gw_kib = gw.rss_kib()?;
            let etcd_kib = rss_kib(etcd.child.id())?;
            let ratio = gw_kib / etcd_kib;
            // Then idle for a while: the plugin's queue gives back its
            // room and the allocator its freed memory.
            let idle = Instant::now();
            let mut settled_kib = gw_kib;
            while idle.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(500));
                settled_kib = gw.rss_kib()?;
            }
            s.add(
                &format!("{label}_settled_rss_mib"),
                "MiB",
                settled_kib / 1024.0,
            );
            s.add(
                &format!("{label}_settled_rss_to_etcd"),
                "×",
                settled_kib / etcd_kib,
            );
            eprintln!(
                "scale_sync: {n} keys: ready {:.1}s, handled {:.1}s, gateway {:.0} MiB \
                 ({:.0} MiB settled), etcd {:.0} MiB",
                ready.as_secs_f64(),
                handled.as_secs_f64(),
                gw_kib / 1024.0,
                settled_kib / 1024.0,
                etcd_kib / 1024.0
            );
            s.add(&format!("{label}_ready_s"), "s", ready.as_secs_f64());
            s.add(
                &format!("{label}_all_handled_s"),
                "s",
                handled.as_secs_f64(),
            );
            s.add(&format!("{label}_rss_mib"), "MiB", gw_kib / 1024.0);
            s.add(&format!("{label}_etcd_rss_mib"), "MiB", etcd_kib / 1024.0);
            s.add(&format!("{label}_rss_to_etcd"), "×", ratio);
            s.add(
                &format!("{label}_bytes_per_key"),
                "B",
                (gw_kib - base_kib).max(0.0) * 1024.0 / n as f64,
            );
            gw.stop()?;
            if n >= 1_000_000 {
                checks.push(Check {
                    subject: label.clone(),
                    figure: "ready_s".into(),
                    value: ready.as_secs_f64(),
                    target: "≤ 30 s",
                    met: ready.as_secs_f64() <= 30.0,
                });
                checks.push(Check {
                    subject: label.clone(),
                    figure: "rss_to_etcd".into(),
                    value: ratio,
                    target: "≤ 1.5 × etcd",
                    met: ratio <= 1.5,
                });
            }
        }
    }
    s.note(
        "Keys of 100-byte values under one prefix, listed page by page at one revision, into one \
         no-op plugin. ready is `/readyz` 200 (the snapshot delivered), handled is the plugin \
         having been called for every key; resident memory of the gateway and of the etcd \
         holding the same keys are read once every key is handled, in the same run, and the \
         gateway's again after 10 s idle (`settled`: by then the plugin's queue has given back \
         the room of the backlog and the allocator its freed memory); the target is judged on \
         the first, the larger. Bytes per \
         key is the gateway's growth over its resident memory with no source (`base_rss_mib`: \
         the same plugin over a one-file source), divided by the keys.",
    );
    Ok(s.finish_with_checks(
        "scale_sync",
        "Initial sync of 100,000 and 1,000,000 etcd keys into the gateway and one no-op \
         plugin, beside etcd's own memory for them.",
        "1,000,000 keys: ready ≤ 30 s, resident memory ≤ 1.5 × etcd's",
        checks,
        |_| Default::default(),
    ))
}

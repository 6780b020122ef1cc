//! The `languages` case: the same plugin (`event-log`: one JSON line
//! appended per event) written in Rust, Python, JavaScript and Go, side by
//! side in one run.
//!
//! In process, through the `watchgate` library: the uncached compile (once
//! per language), a start from the compile cache to the first event, warm
//! calls one event at a time and in batches, and the call after a trap.
//! Through a `watchgate` process per language, sharing that compile cache:
//! the hot add of already-compiled code to its first event, and the
//! resident memory each loaded plugin adds.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use watchgate::event::Event;
use watchgate::host::PluginContext;
use watchgate::host::files::FilesGrant;
use watchgate::host::log::PluginLog;
use watchgate::runtime::instance::{LoadedPlugin, Sandbox};
use watchgate::runtime::{Limits, Runtime, RuntimeConfig};
use watchgate::telemetry::{Metrics, Outcome};

use super::process::{Proc, wait_file};
use super::{BenchArgs, CaseResult, Check, Samples, percentile, us, write_atomic};

/// The languages, each with its `event-log` plugin.
pub(crate) const LANGUAGES: [(&str, &str); 4] = [
    ("rust", "event-log"),
    ("python", "py-event-log"),
    ("javascript", "js-event-log"),
    ("go", "go-event-log"),
];

/// Events per `handle-batch` call.
const BATCH: usize = 64;

/// The targets: figure, bound, unit, what it means.
const TARGETS: [(&str, f64, &str); 5] = [
    ("warm_call_us", 50.0, "warm call ≤ 50 µs"),
    (
        "reinstantiate_ms",
        5.0,
        "re-instantiate after a trap ≤ 5 ms",
    ),
    ("cached_start_ms", 200.0, "cached start ≤ 200 ms"),
    ("hot_add_ms", 2000.0, "hot add of compiled code ≤ 2 s"),
    ("rss_per_plugin_mib", 32.0, "idle RSS ≤ 32 MiB per plugin"),
];

/// The runtime settings of the gateway the process part runs (its
/// `[runtime]` table, see [`Proc::new`]): the same engine settings, so
/// the code compiled here is a hit in that gateway's compile cache.
pub(crate) fn gateway_runtime() -> RuntimeConfig {
    RuntimeConfig {
        max_instances: 1024,
        ..RuntimeConfig::default()
    }
}

/// The context of a plugin named `name` with a `files` grant in `dir`
/// (created if missing), under the default limits.
pub(crate) fn files_context(name: &str, dir: &Path) -> anyhow::Result<Arc<PluginContext>> {
    let limits = RuntimeConfig::default().defaults;
    let metrics = Metrics::shared();
    let quiet = Arc::new(super::inproc::Quiet);
    let mut ctx = PluginContext::new(
        name,
        Arc::default(),
        Arc::new(PluginLog::new(name, 10, quiet, metrics.clone())),
        metrics,
    );
    ctx.files = Some(FilesGrant::new(dir, limits.files_quota())?);
    Ok(Arc::new(ctx))
}

/// `wasm` compiled by `runtime` as plugin `name`, its `files` grant in
/// `dir`, under the default limits.
fn with_files(
    runtime: &Runtime,
    wasm: &[u8],
    name: &str,
    dir: &Path,
) -> anyhow::Result<LoadedPlugin> {
    Ok(LoadedPlugin {
        compiled: runtime.compile(wasm)?,
        ctx: files_context(name, dir)?,
        version: 1,
        limits: RuntimeConfig::default().defaults,
    })
}

/// `n` puts of 100-byte values, each its own key, starting at revision
/// `from`.
pub(crate) fn puts(n: usize, from: u64) -> Vec<Event> {
    let src: Arc<str> = Arc::from("bench");
    let value = Bytes::from(vec![b'v'; 100]);
    (0..n)
        .map(|i| Event::put(&src, format!("app/k{i}"), value.clone(), from + i as u64))
        .collect()
}

/// CPU time of this process so far (user and system, every thread), s.
pub(crate) fn cpu_seconds() -> f64 {
    // Fields 14 and 15 of /proc/self/stat (after the parenthesised name)
    // are user and system time in clock ticks, 100 per second on Linux.
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .map_or(0.0, |ticks| ticks / 100.0)
}

/// Every plugin file, read, or an error naming the one missing.
pub(crate) fn read_all(args: &BenchArgs) -> anyhow::Result<Vec<Vec<u8>>> {
    LANGUAGES
        .iter()
        .map(|(_, p)| {
            let path = args.plugin(p)?;
            Ok(std::fs::read(path)?)
        })
        .collect()
}

/// The uncached compile of one language's plugin, filling `cache`, and
/// the sizes of its file and of its compiled code.
fn uncached(lang: &str, wasm: &[u8], cache: &Path, s: &mut Samples) -> anyhow::Result<()> {
    let f = |figure: &str| format!("{lang}_{figure}");
    // A fresh engine with an empty cache directory, which this compile
    // fills (the cached starts and the gateway read it).
    let runtime = Runtime::with_cache(&gateway_runtime(), Some(cache))?;
    let (cpu, started) = (cpu_seconds(), Instant::now());
    let compiled = runtime.compile(wasm)?;
    s.add(
        &f("uncached_compile_s"),
        "s",
        started.elapsed().as_secs_f64(),
    );
    s.add(&f("uncached_compile_cpu_s"), "s", cpu_seconds() - cpu);
    // What a loaded copy holds of code and data images: the compiled
    // artifact, as the cache keeps it before compression.
    let artifact = compiled.pre.instance_pre().component().serialize()?;
    s.add(&f("compiled_mb"), "MB", artifact.len() as f64 / 1e6);
    s.add(&f("wasm_mb"), "MB", wasm.len() as f64 / 1e6);
    Ok(())
}

/// One run of the in-process figures of one language, its code in
/// `cache`, its files in `files`: a restart from the cache, warm calls and
/// calls after a trap. Returns the warm call's median, µs.
fn round(
    args: &BenchArgs,
    lang: &str,
    name: &str,
    wasm: &[u8],
    cache: &Path,
    files: &Path,
    s: &mut Samples,
) -> anyhow::Result<f64> {
    let f = |figure: &str| format!("{lang}_{figure}");
    let (n, batches, traps) = if args.quick {
        (20, 2, 3)
    } else {
        (2_000, 40, 30)
    };
    let mut rev = 1;
    {
        // A restart: a new engine, the code from the cache, one instance,
        // one event.
        let runtime = Runtime::with_cache(&gateway_runtime(), Some(cache))?;
        let started = Instant::now();
        let plugin = with_files(&runtime, wasm, name, files)?;
        let loaded = started.elapsed();
        let mut sandbox = Sandbox::new(runtime.clone());
        let first = sandbox.call(&plugin, &puts(1, rev)[0]);
        rev += 1;
        anyhow::ensure!(first.outcome == Outcome::ok, "{name}: {:?}", first.message);
        let total = started.elapsed();
        s.add(&f("cached_start_ms"), "ms", total.as_secs_f64() * 1e3);
        s.add(&f("cache_load_ms"), "ms", loaded.as_secs_f64() * 1e3);
        s.add(
            &f("first_call_ms"),
            "ms",
            (total - loaded).as_secs_f64() * 1e3,
        );

        // Warm: one event per call, then `BATCH` per `handle-batch` call.
        let events = puts(n, rev);
        rev += n as u64;
        let mut warm = Vec::with_capacity(n);
        for e in &events {
            let r = sandbox.call(&plugin, e);
            anyhow::ensure!(r.outcome == Outcome::ok, "{name}: {:?}", r.message);
            warm.push(us(r.elapsed));
        }
        s.add(&f("warm_call_us"), "µs", percentile(&warm, 50.0));
        s.add(&f("warm_call_p99_us"), "µs", percentile(&warm, 99.0));
        let mut batched = Vec::with_capacity(batches);
        for _ in 0..batches {
            let events = puts(BATCH, rev);
            rev += BATCH as u64;
            let r = sandbox.call_batch(&plugin, &events);
            if r.handled < BATCH {
                // Reported, not fatal: the other figures still hold.
                let why = r.failure.and_then(|f| f.message).unwrap_or_default();
                let first = why.lines().next().unwrap_or_default().to_owned();
                let mut frames: Vec<&str> = why
                    .lines()
                    .filter_map(|l| l.split_once(" - ").map(|(_, f)| f.trim()))
                    .collect();
                frames.reverse();
                s.note(format!(
                    "{lang}: a `handle-batch` call of {BATCH} events failed, so \
                     `{lang}_batched_us_per_event` is missing: {first} {}",
                    frames.join(" → ")
                ));
                batched.clear();
                break;
            }
            batched.push(us(r.elapsed) / BATCH as f64);
        }
        if !batched.is_empty() {
            s.add(&f("batched_us_per_event"), "µs", percentile(&batched, 50.0));
        }

        // A trap (the same code, its fuel cut to 1, so every language
        // traps at its first instructions), then the next event: the call
        // that makes a fresh instance.
        let starved = LoadedPlugin {
            limits: Limits {
                fuel: 1,
                ..plugin.limits
            },
            ..plugin.clone()
        };
        let mut recovery = Vec::with_capacity(traps);
        for e in &puts(traps, rev) {
            let trapped = sandbox.call(&starved, e);
            anyhow::ensure!(
                trapped.outcome == Outcome::out_of_fuel && !sandbox.has_instance(),
                "{name}: no trap with fuel 1: {:?}",
                trapped.outcome
            );
            let r = sandbox.call(&plugin, e);
            anyhow::ensure!(r.outcome == Outcome::ok, "{name}: {:?}", r.message);
            recovery.push(r.elapsed.as_secs_f64() * 1e3);
        }
        s.add(&f("reinstantiate_ms"), "ms", percentile(&recovery, 50.0));
        Ok(percentile(&warm, 50.0))
    }
}

/// The process part for one language: a gateway sharing `cache` with an
/// empty plugin directory, then `copies` copies of the same file dropped
/// in under new names, each timed to its first event, with the gateway's
/// resident memory after each.
fn in_gateway(
    args: &BenchArgs,
    lang: &str,
    wasm: &[u8],
    cache: &Path,
    copies: usize,
    s: &mut Samples,
) -> anyhow::Result<()> {
    let mut p = Proc::new(args, None)?;
    std::fs::create_dir_all(p.path("data"))?;
    std::os::unix::fs::symlink(cache, p.path("data/compiled"))?;
    p.start()?;
    // Settled: the file source synced, nothing loaded.
    std::thread::sleep(Duration::from_millis(200));
    let idle = p.rss_kib()?;
    let mut rss = idle;
    for i in 0..copies {
        let name = format!("{lang}{i}");
        let sidecar = format!("[grants]\nfiles = \"../out/{name}\"\n");
        write_atomic(
            &p.path(&format!("plugins.d/{name}.toml")),
            sidecar.as_bytes(),
        )?;
        let started = Instant::now();
        write_atomic(&p.path(&format!("plugins.d/{name}.wasm")), wasm)?;
        let took = wait_file(
            &p.path(&format!("out/{name}/events.jsonl")),
            started,
            Duration::from_secs(120),
        )?;
        s.add(
            &format!("{lang}_hot_add_ms"),
            "ms",
            took.as_secs_f64() * 1e3,
        );
        std::thread::sleep(Duration::from_millis(200));
        let now = p.rss_kib()?;
        let figure = if i == 0 {
            "rss_first_plugin_mib"
        } else {
            "rss_next_plugin_mib"
        };
        s.add(&format!("{lang}_{figure}"), "MiB", (now - rss) / 1024.0);
        rss = now;
    }
    s.add(
        &format!("{lang}_rss_per_plugin_mib"),
        "MiB",
        (rss - idle) / 1024.0 / copies.max(1) as f64,
    );
    p.stop()
}

/// The per-language verdicts against the targets.
fn checks(s: &Samples) -> Vec<Check> {
    let mut out = Vec::new();
    for (lang, _) in LANGUAGES {
        for (figure, bound, target) in TARGETS {
            if let Some(v) = s.median(&format!("{lang}_{figure}")) {
                out.push(Check {
                    subject: lang.to_owned(),
                    figure: figure.to_owned(),
                    value: v,
                    target,
                    met: v <= bound,
                });
            }
        }
    }
    out
}

/// The `languages` case.
pub(super) fn languages(args: &BenchArgs) -> anyhow::Result<CaseResult> {
    let files = read_all(args)?;
    let copies = if args.quick { 1 } else { 4 };
    let mut s = Samples::default();
    let mut caches: Vec<tempfile::TempDir> = Vec::new();
    for ((lang, name), wasm) in LANGUAGES.iter().zip(&files) {
        let cache = tempfile::tempdir()?;
        eprintln!("  {lang}: {name}: uncached compile …");
        let started = Instant::now();
        uncached(lang, wasm, cache.path(), &mut s)?;
        eprintln!(
            "  {lang}: {name} in a gateway (compiled in {:.1} s) …",
            started.elapsed().as_secs_f64()
        );
        in_gateway(args, lang, wasm, cache.path(), copies, &mut s)?;
        caches.push(cache);
    }
    // The in-process runs: every language in each run, one after the
    // other, so each run's ratio to Rust pairs figures taken seconds apart.
    let dir = tempfile::tempdir()?;
    for run in 0..args.runs() {
        eprintln!(
            "  run {} of {}: every language in process …",
            run + 1,
            args.runs()
        );
        let mut warm = Vec::new();
        for (((lang, name), wasm), cache) in LANGUAGES.iter().zip(&files).zip(&caches) {
            let files = dir.path().join(format!("{lang}-{run}"));
            warm.push(round(args, lang, name, wasm, cache.path(), &files, &mut s)?);
        }
        for ((lang, _), w) in LANGUAGES.iter().zip(&warm).skip(1) {
            s.add(
                &format!("{lang}_warm_call_to_rust_paired"),
                "×",
                w / warm[0],
            );
        }
    }
    let checks = checks(&s);
    for c in &checks {
        eprintln!(
            "  {:<10} {:<20} {:>10} {} {}",
            c.subject,
            c.figure,
            super::fmt(c.value),
            if c.met { "PASS" } else { "MISS" },
            c.target
        );
    }
    let machine_cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    s.note(format!(
        "The same plugin in four languages: `event-log` (Rust), `py-event-log` \
         (componentize-py), `js-event-log` (componentize-js, SpiderMonkey) and `go-event-log` \
         (Go's wasip1 port and the SDK's adapter), each appending one JSON line per event to \
         `events.jsonl` through the `files` capability (the host opens, appends and closes \
         the file on every call, the same host work in every language). Events are puts of \
         100-byte values. Under the default limits (64 MiB, fuel 100M, 1 s), with the \
         gateway's engine settings ({machine_cores} cores here)."
    ));
    s.note(
        "In process: `uncached_compile` is one compile with an empty cache (wall and CPU \
         time of the process: wasmtime compiles functions in parallel on every core), once \
         per language per run of the bench; it fills the compile cache the rest reads. \
         `cached_start` is a restart: a new engine, the code from the cache \
         (`cache_load`: hashing the file, reading and decompressing the cached code), then \
         the first call (`first_call`: a new instance and one event). `warm_call` is the \
         median of 2,000 calls of one event on a live instance (the sandbox's per-call \
         limits included), and `warm_call_to_rust_paired` its ratio to Rust's in the same run \
         (each run takes every language in turn, seconds apart); `batched` is one `handle-batch` call of 64 events, per event. \
         `reinstantiate` is the call after a trap (the same code with its fuel cut to 1, \
         which traps in every language): a fresh instance from the `InstancePre` (pooling \
         allocator) and the event.",
    );
    s.note(format!(
        "In a gateway (a `watchgate` process per language, a file source over one file, its \
         compile cache the directory the in-process compile filled): {copies} copies of the \
         same file dropped into the plugin directory one after the other under new names, \
         each with a `files` grant; `hot_add` is from the rename to the first line of its \
         `events.jsonl` (directory notification, debounce, a compile that is a cache hit, \
         the instance, the current key as a put). `rss_per_plugin` is the gateway's VmRSS \
         growth over its idle RSS divided by the copies, each copy loaded and idle after its \
         first event (so with one live instance each); `rss_first_plugin` is the first \
         copy's share alone, `rss_next_plugin` each later copy's. `compiled` is the size of \
         the compiled artifact (machine code and data images) of one copy, uncompressed."
    ));
    s.note(
        "Where the time goes. Warm call: the host's `files.append` (the file opened, appended \
         to and closed on every call) is most of Rust's figure; the no-op plugin's bare call \
         in `dispatch` costs under 1 µs. Above that floor is each language's own work for one \
         event: about 5 µs for Go, about 30 µs for Python (CPython interpreting, the event \
         lowered into Python objects, `json.dumps`) and about 55 µs for JavaScript \
         (SpiderMonkey interpreting: no JIT inside WebAssembly). Batching saves little \
         (under 10 %): the cost is the interpreting, not the call. Python's warm call is a \
         few µs under the 50 µs bound on a quiet machine; in one run of this case on a busier \
         one its median was 66 µs while Rust's stayed at 13 µs: the interpreted calls slow \
         down more than Rust's when the machine is shared. Compile: the Python and \
         JavaScript components carry a whole interpreter (CPython, SpiderMonkey), so \
         compiling any plugin compiles the interpreter again, and every distinct file (a new \
         digest) pays it; the compiled artifact is about 45 MB (Python) and 53 MB \
         (JavaScript). Cached start: most of it is `cache_load`, reading, decompressing and \
         mapping those 45-53 MB (and hashing the 12-19 MB file for the cache key); the first \
         call is a new instance (Python's has 14 core instances and 213 pages, 13.3 MiB, of \
         initial memory; JavaScript's 4 and 145 pages, 9.1 MiB; Go's 4 and 39 pages, \
         2.4 MiB) and the event. Hot add is the same load behind the directory notification \
         and debounce, whose share is about Rust's figure.",
    );
    s.note(
        "Where the memory goes: the first copy loads the compiled code from the cache and \
         holds one instance; later copies of the same file share that code (the runtime \
         keeps compiled plugins in use by digest) and add their instance: its initial memory \
         and whatever the interpreter's first event dirties (CPython's and SpiderMonkey's \
         heaps). So a distinct Python or JavaScript plugin costs roughly its compiled \
         artifact plus its instance, over 32 MiB, and a copy its instance alone: about 37 MiB \
         for JavaScript and 80-100 MiB for Python, which stays over the bound (not yet \
         measured: how much of that is the interpreter's heap and how much the pooling \
         allocator keeps resident per slot).",
    );
    s.note(
        "Tried, as an experiment (`--only compile_tiers`, run only when named): Cranelift at \
         opt level `none` instead of the default `speed` compiled the Python and JavaScript \
         components 20-25 % faster and made their warm calls 10-20 % slower (Go and Rust: \
         compile 20-25 % faster, warm call within 6 %): not a first tier worth having. Winch \
         was not tried: the workspace's wasmtime is built without its `winch` feature, and \
         turning it on rebuilds wasmtime and everything above it.",
    );
    Ok(s.finish_with_checks(
        "languages",
        "The same `event-log` plugin in Rust, Python, JavaScript and Go, side by side: .wasm \
         size, uncached compile, cached start, warm call (single and batched), the call after \
         a trap, hot add of compiled code, resident memory per idle plugin.",
        "per language: warm call ≤ 50 µs, re-instantiate ≤ 5 ms, cached start ≤ 200 ms, hot \
         add ≤ 2 s, idle RSS ≤ 32 MiB per plugin",
        checks,
        |s| {
            let mut r = std::collections::BTreeMap::new();
            for (lang, _) in &LANGUAGES[1..] {
                if let Some(v) = s.median(&format!("{lang}_warm_call_to_rust_paired")) {
                    r.insert(format!("{lang} warm call to rust (paired)"), v);
                }
                let rust = s.median("rust_uncached_compile_s").unwrap_or(0.0);
                if let (Some(v), true) =
                    (s.median(&format!("{lang}_uncached_compile_s")), rust > 0.0)
                {
                    r.insert(format!("{lang} uncached compile to rust"), v / rust);
                }
            }
            r
        },
    ))
}

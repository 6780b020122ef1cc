//! The `compile_tiers` experiment, run only when named (`--only
//! compile_tiers`): is a faster first tier worth it? The uncached compile
//! of each language's `event-log` with Cranelift at its default opt level
//! (`speed`, the gateway's) and at `none`, and the warm call under each.
//!
//! The engine is the gateway's (`watchgate::runtime::engine_config`) with
//! the opt level as the one difference.

use std::time::Instant;

use wasmtime::component::Component;
use wasmtime::{Engine, OptLevel, Store};
use watchgate::host::HostState;
use watchgate::host::bindings::PluginPre;
use watchgate::runtime::RuntimeConfig;
use watchgate::runtime::instance::to_wit;

use super::languages::{LANGUAGES, cpu_seconds, files_context, puts, read_all};
use super::{BenchArgs, CaseResult, Samples, percentile, us};

/// The gateway's engine, compiling at `opt`.
fn engine(opt: OptLevel) -> anyhow::Result<Engine> {
    let mut cfg = watchgate::runtime::engine_config(&RuntimeConfig::default());
    cfg.cranelift_opt_level(opt);
    Ok(Engine::new(&cfg)?)
}

/// The experiment.
pub(super) fn compile_tiers(args: &BenchArgs) -> anyhow::Result<CaseResult> {
    let files = read_all(args)?;
    let dir = tempfile::tempdir()?;
    let (n, repeats) = if args.quick { (20, 1) } else { (2_000, 3) };
    let mut s = Samples::default();
    for ((lang, name), wasm) in LANGUAGES.iter().zip(&files) {
        for (tier, opt) in [("speed", OptLevel::Speed), ("none", OptLevel::None)] {
            eprintln!("  {lang}: {name}, opt level {tier} …");
            let engine = engine(opt)?;
            let linker = watchgate::runtime::linker(&engine)?;
            let (cpu, started) = (cpu_seconds(), Instant::now());
            let component = Component::new(&engine, wasm)?;
            s.add(
                &format!("{lang}_{tier}_compile_s"),
                "s",
                started.elapsed().as_secs_f64(),
            );
            s.add(
                &format!("{lang}_{tier}_compile_cpu_s"),
                "s",
                cpu_seconds() - cpu,
            );
            let pre = PluginPre::new(linker.instantiate_pre(&component)?)?;
            let ctx = files_context(name, &dir.path().join(format!("{lang}-{tier}")))?;
            let mut rev = 1;
            for _ in 0..repeats {
                let mut store = Store::new(&engine, HostState::new(ctx.clone(), usize::MAX));
                store.set_fuel(u64::MAX)?;
                store.set_epoch_deadline(u64::MAX / 2);
                let started = Instant::now();
                let plugin = pre.instantiate(&mut store)?;
                let mut first = true;
                let mut calls = Vec::with_capacity(n);
                for e in puts(n, rev) {
                    let arg = to_wit(&e);
                    let call = Instant::now();
                    if let Err(m) = plugin.call_handle(&mut store, &arg)? {
                        anyhow::bail!("{name}: {m}");
                    }
                    if first {
                        s.add(
                            &format!("{lang}_{tier}_first_call_ms"),
                            "ms",
                            started.elapsed().as_secs_f64() * 1e3,
                        );
                        first = false;
                    } else {
                        calls.push(us(call.elapsed()));
                    }
                }
                rev += n as u64;
                s.add(
                    &format!("{lang}_{tier}_warm_call_us"),
                    "µs",
                    percentile(&calls, 50.0),
                );
            }
        }
    }
    s.note(
        "One uncached compile per language and opt level (wall time, and CPU time of the \
         process: wasmtime compiles functions in parallel on every core), then the median of \
         2,000 warm calls on one instance, three times, in a plain loop (no per-call limits; \
         fuel still counted). `first_call` is instantiation and the first event.",
    );
    s.note(
        "Winch is not measured: the workspace's wasmtime is built without its `winch` \
         feature (not in `Cargo.toml`, not in `Cargo.lock`), and turning it on rebuilds \
         wasmtime and everything above it.",
    );
    Ok(s.finish(
        "compile_tiers",
        "Experiment: uncached compile time and warm call with Cranelift at its default opt \
         level (`speed`) and at `none`, per language.",
        "reported (no target set)",
        |s| {
            let mut r = std::collections::BTreeMap::new();
            for (lang, _) in LANGUAGES {
                for (figure, label) in [("compile_s", "compile"), ("warm_call_us", "warm call")] {
                    let speed = s.median(&format!("{lang}_speed_{figure}")).unwrap_or(0.0);
                    if let (Some(none), true) =
                        (s.median(&format!("{lang}_none_{figure}")), speed > 0.0)
                    {
                        r.insert(format!("{lang} {label} none to speed"), none / speed);
                    }
                }
            }
            (None, r, None)
        },
    ))
}

//! `watchgate-bench`: the benchmark suite of the `watchgate` gateway.
//!
//! Owns the runner and the report: each case runs several times, every
//! figure keeps its value per run, and the report gives the median and the
//! p99 over the runs next to the case's reference measured in the same run
//! (the physical floor, or the tool users would pick instead) and its
//! target. It writes `bench/results.json` and `BENCHMARKS.md`. The cases
//! live in the modules below: in-process ones (dispatch, fan-out,
//! isolation, trap recovery) through the `watchgate` library, ones that run
//! the `watchgate` binary (memory, hot reload, cold start) and ones against
//! a real etcd (end-to-end latency, scale). Timing here is measurement,
//! never a test verdict; `--quick` only checks that every case still runs.
//!
//! It is a crate of its own so that the gateway library and binary carry
//! none of it.

mod etcd;
mod inproc;
mod languages;
mod probe;
mod process;
mod scale;
mod tiers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Parser;
use serde::Serialize;
use tracing_subscriber::EnvFilter;

/// Run the watchgate benchmark suite; writes bench/results.json and
/// BENCHMARKS.md. Measure with a release build.
#[derive(Debug, Clone, Parser)]
#[command(name = "watchgate-bench", version, about)]
pub struct BenchArgs {
    /// Small sizes and few runs: checks that every case works, measures
    /// nothing.
    #[arg(long)]
    pub quick: bool,
    /// Directory of the compiled plugins (scripts/build-plugins).
    #[arg(long, default_value = "dist/plugins")]
    pub plugins: PathBuf,
    /// The `watchgate` binary the memory, hot reload, cold start and etcd
    /// cases run [default: `watchgate` next to this binary, as cargo builds
    /// both into one target directory].
    #[arg(long)]
    pub gateway: Option<PathBuf>,
    /// Where bench/results.json and BENCHMARKS.md are written.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Only the cases whose names contain this (repeatable).
    #[arg(long)]
    pub only: Vec<String>,
    /// Instead of the cases, one small fixed run of the dispatch path for
    /// `valgrind --tool=callgrind`: `dispatch`, `batched`, `route` (the
    /// producer alone), `sandboxed` or `floor`. Writes no report.
    #[arg(long, value_name = "MODE")]
    pub probe: Option<String>,
    /// Events of a `--probe` run.
    #[arg(long, default_value_t = 20_000)]
    pub probe_events: usize,
}

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    // The benchmarks provoke failures on purpose; only errors matter.
    let filter =
        EnvFilter::try_from_env("WATCHGATE_LOG").unwrap_or_else(|_| EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Some(mode) = &args.probe {
        return match probe::probe(&args, mode, args.probe_events) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("probe {mode}: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    ExitCode::from(u8::try_from(run(&args)).unwrap_or(1))
}

impl BenchArgs {
    /// Whether case `name` runs. `languages` compiles the Python and
    /// JavaScript components (tens of seconds each), so `--quick` leaves it
    /// out unless it is named; `compile_tiers` is an experiment that runs
    /// only when named.
    fn selects(&self, name: &str) -> bool {
        let named = self.only.iter().any(|o| name.contains(o.as_str()));
        match name {
            "compile_tiers" => self.only.iter().any(|o| o == name),
            "languages" if self.quick => named,
            _ => self.only.is_empty() || named,
        }
    }

    fn runs(&self) -> usize {
        if self.quick { 2 } else { 5 }
    }

    /// The `watchgate` binary the process cases start.
    fn gateway(&self) -> anyhow::Result<PathBuf> {
        let path = match &self.gateway {
            Some(p) => p.clone(),
            None => std::env::current_exe()?
                .parent()
                .ok_or_else(|| anyhow::anyhow!("this binary has no directory"))?
                .join(format!("watchgate{}", std::env::consts::EXE_SUFFIX)),
        };
        anyhow::ensure!(
            path.is_file(),
            "{} is missing: build it first (`cargo build --release -p watchgate`), or pass --gateway",
            path.display()
        );
        Ok(path)
    }

    fn plugin(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.plugins.join(format!("{name}.wasm"));
        anyhow::ensure!(
            p.is_file(),
            "{} is missing: build the plugins first (scripts/build-plugins)",
            p.display()
        );
        Ok(p)
    }
}

/// One measured quantity of a case, one value per run.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Unit of the values.
    pub unit: &'static str,
    /// Median over the runs.
    pub median: f64,
    /// 99th percentile over the runs.
    pub p99: f64,
    /// Every run's value.
    pub runs: Vec<f64>,
}

/// One case's results.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case name.
    pub case: &'static str,
    /// What it measures.
    pub what: &'static str,
    /// Figures by name (watchgate's and the references').
    pub figures: BTreeMap<String, Figure>,
    /// The headline ratio to the reference measured in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_floor: Option<f64>,
    /// Other ratios, by name.
    pub ratios: BTreeMap<String, f64>,
    /// The bar it is judged by.
    pub target: &'static str,
    /// Whether the median met it (`None`: not measured).
    pub met: Option<bool>,
    /// What explains the figures (a missed target, a skipped reference).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Verdicts per subject (a language), when the case judges several.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
}

/// One subject's figure against its target.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What is judged (a language).
    pub subject: String,
    /// The figure's name, without the subject.
    pub figure: String,
    /// Its median.
    pub value: f64,
    /// The bar.
    pub target: &'static str,
    /// Whether the median met it.
    pub met: bool,
}

/// Collects the per-run values of one case.
#[derive(Default)]
pub(crate) struct Samples {
    values: BTreeMap<String, (&'static str, Vec<f64>)>,
    notes: Vec<String>,
}

impl Samples {
    pub(crate) fn add(&mut self, name: &str, unit: &'static str, value: f64) {
        self.values
            .entry(name.to_owned())
            .or_insert((unit, Vec::new()))
            .1
            .push(value);
    }

    pub(crate) fn note(&mut self, note: impl Into<String>) {
        let n = note.into();
        if !self.notes.contains(&n) {
            self.notes.push(n);
        }
    }

    pub(crate) fn median(&self, name: &str) -> Option<f64> {
        self.values.get(name).map(|(_, v)| percentile(v, 50.0))
    }

    /// Every run's value of `name`.
    pub(crate) fn runs(&self, name: &str) -> &[f64] {
        self.values.get(name).map_or(&[], |(_, v)| v.as_slice())
    }

    /// The result of a case judged per subject: met when every check is.
    fn finish_with_checks(
        self,
        case: &'static str,
        what: &'static str,
        target: &'static str,
        checks: Vec<Check>,
        ratios: impl Fn(&Samples) -> BTreeMap<String, f64>,
    ) -> CaseResult {
        let met = (!checks.is_empty()).then(|| checks.iter().all(|c| c.met));
        let mut r = self.finish(case, what, target, |s| (None, ratios(s), met));
        r.checks = checks;
        r
    }

    fn finish(
        self,
        case: &'static str,
        what: &'static str,
        target: &'static str,
        judge: impl Fn(&Samples) -> (Option<f64>, BTreeMap<String, f64>, Option<bool>),
    ) -> CaseResult {
        let (ratio_to_floor, ratios, met) = judge(&self);
        CaseResult {
            checks: Vec::new(),
            case,
            what,
            figures: self
                .values
                .into_iter()
                .map(|(k, (unit, runs))| {
                    (
                        k,
                        Figure {
                            unit,
                            median: percentile(&runs, 50.0),
                            p99: percentile(&runs, 99.0),
                            runs,
                        },
                    )
                })
                .collect(),
            ratio_to_floor,
            ratios,
            target,
            met,
            notes: self.notes,
        }
    }
}

/// The `p`th percentile (nearest rank) of `values`; 0 when empty.
pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Microseconds of a duration.
pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The machine and versions, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// watchgate version.
    pub watchgate: &'static str,
    /// wasmtime version.
    pub wasmtime: &'static str,
    /// etcd version, when installed.
    pub etcd: Option<String>,
    /// Whether this binary was built with optimizations.
    pub optimized: bool,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib,
        // The gateway's version too: every crate takes the workspace's.
        watchgate: env!("CARGO_PKG_VERSION"),
        wasmtime: "48",
        etcd: etcd::version(),
        optimized: !cfg!(debug_assertions),
    }
}

#[derive(Serialize)]
struct Report<'a> {
    date: String,
    quick: bool,
    machine: &'a Machine,
    cases: &'a [CaseResult],
}

/// Run the suite and write the report; returns the exit code.
fn run(args: &BenchArgs) -> i32 {
    let machine = machine();
    if !machine.optimized && !args.quick {
        eprintln!(
            "warning: this is a debug build; measure with `cargo build --release -p watchgate && cargo run --release -p watchgate-bench`"
        );
    }
    type CaseFn = fn(&BenchArgs) -> anyhow::Result<CaseResult>;
    let cases: [(&str, CaseFn); 13] = [
        ("dispatch", inproc::dispatch),
        ("trap_recovery", inproc::trap_recovery),
        ("fanout", inproc::fanout),
        ("isolation", inproc::isolation),
        ("memory", process::memory),
        ("hot_reload", process::hot_reload),
        ("cold_start", process::cold_start),
        ("e2e_latency", etcd::e2e_latency),
        ("scale_sync", etcd::scale_sync),
        ("scale_churn", scale::scale_churn),
        ("scale_files", scale::scale_files),
        ("languages", languages::languages),
        ("compile_tiers", tiers::compile_tiers),
    ];
    let mut results = Vec::new();
    let mut failed = 0;
    let total = cases.iter().filter(|(n, _)| args.selects(n)).count();
    for (name, case) in cases {
        if !args.selects(name) {
            continue;
        }
        eprintln!("[{}/{total}] {name} …", results.len() + failed + 1);
        let started = std::time::Instant::now();
        match case(args) {
            Ok(r) => {
                eprintln!(
                    "[{}/{total}] {name}: done in {:.1} s{}",
                    results.len() + failed + 1,
                    started.elapsed().as_secs_f64(),
                    match r.met {
                        Some(true) => ", target met",
                        Some(false) => ", target missed",
                        None => "",
                    }
                );
                results.push(r);
            }
            Err(e) => {
                eprintln!(
                    "[{}/{total}] {name}: failed: {e:#}",
                    results.len() + failed + 1
                );
                failed += 1;
            }
        }
    }
    if let Err(e) = write_report(args, &machine, &results) {
        eprintln!("error: cannot write the report: {e:#}");
        return 1;
    }
    eprintln!(
        "wrote {} and {}",
        args.out.join("bench/results.json").display(),
        args.out.join("BENCHMARKS.md").display()
    );
    i32::from(failed > 0)
}

fn write_report(args: &BenchArgs, machine: &Machine, cases: &[CaseResult]) -> anyhow::Result<()> {
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let report = Report {
        date: date.clone(),
        quick: args.quick,
        machine,
        cases,
    };
    std::fs::create_dir_all(args.out.join("bench"))?;
    std::fs::write(
        args.out.join("bench/results.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(
        args.out.join("BENCHMARKS.md"),
        markdown(&date, args, machine, cases),
    )?;
    Ok(())
}

pub(crate) fn fmt(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn markdown(date: &str, args: &BenchArgs, m: &Machine, cases: &[CaseResult]) -> String {
    let mut s = String::new();
    s.push_str("# Benchmarks\n\n");
    s.push_str(
        "Written by `watchgate-bench` (`cargo build --release -p watchgate && cargo run \
         --release -p watchgate-bench`; see the README). Every case runs several times in one \
         process run; each figure gives the median and the p99 over those runs, and each ratio \
         compares with a reference measured in the same run, side by side, because the machine \
         is shared and noisy.\n\n",
    );
    s.push_str(&format!(
        "- date: {date}\n- mode: {}\n- machine: {} × {}, {} GiB\n- watchgate {} ({}), wasmtime {}, etcd {}\n\n",
        if args.quick { "quick (smoke sizes: not a measurement)" } else { "full" },
        m.cpus,
        m.cpu,
        m.memory_gib,
        m.watchgate,
        if m.optimized { "release build" } else { "debug build" },
        m.wasmtime,
        m.etcd.as_deref().unwrap_or("not installed"),
    ));
    s.push_str("| case | figure | median | p99 | unit |\n|---|---|---:|---:|---|\n");
    for c in cases {
        for (name, f) in &c.figures {
            s.push_str(&format!(
                "| {} | {name} | {} | {} | {} |\n",
                c.case,
                fmt(f.median),
                fmt(f.p99),
                f.unit
            ));
        }
    }
    s.push_str("\n## Targets\n\n| case | ratio | target | met |\n|---|---|---|---|\n");
    for c in cases {
        let mut ratios: Vec<String> = c
            .ratio_to_floor
            .map(|r| format!("to floor {r:.2}"))
            .into_iter()
            .collect();
        ratios.extend(c.ratios.iter().map(|(k, v)| format!("{k} {v:.2}")));
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            c.case,
            if ratios.is_empty() {
                "—".into()
            } else {
                ratios.join("; ")
            },
            c.target,
            match c.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            }
        ));
    }
    s.push_str("\n## Cases\n\n");
    for c in cases {
        s.push_str(&format!("### {}\n\n{}\n\n", c.case, c.what));
        if !c.checks.is_empty() {
            s.push_str("| subject | figure | median | target | met |\n|---|---|---:|---|---|\n");
            for k in &c.checks {
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    k.subject,
                    k.figure,
                    fmt(k.value),
                    k.target,
                    if k.met { "PASS" } else { "**MISS**" }
                ));
            }
            s.push('\n');
        }
        for n in &c.notes {
            s.push_str(&format!("- {n}\n"));
        }
        if !c.notes.is_empty() {
            s.push('\n');
        }
    }
    s
}

/// A free loopback port (released at once: the bench is not a test, and a
/// lost race only fails that case).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Write `bytes` to `path` atomically (a hidden temporary, then rename).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// `wasm` with a custom section appended: the same code under another
/// digest, so each copy compiles (and caches) on its own.
pub(crate) fn variant(wasm: &[u8], n: usize) -> Vec<u8> {
    let name = b"watchgate-bench";
    let payload = n.to_le_bytes();
    let mut out = wasm.to_vec();
    out.push(0);
    out.push((1 + name.len() + payload.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}

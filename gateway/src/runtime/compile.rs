//! Compiling plugin files from authors who do not trust each other, without
//! letting one file's compile hold up the others or take the machine.
//!
//! Owns the limits a file must pass before wasmtime sees it
//! ([`CompileLimits`]), the pre-scan that checks them ([`scan`]) and the
//! bounded pool compiles run on ([`CompilePool`], driven by
//! [`Runtime::compile_bounded`]). A compile's time and memory grow with
//! the functions and code it compiles, and faster than linearly with the
//! size of one function, so the pre-scan refuses a file by its size, its
//! function count and its largest function, reading the sections without
//! compiling anything. What passes runs on a thread and a rayon pool of its
//! own: wasmtime compiles functions in parallel on rayon's global pool
//! otherwise, where a small plugin's functions queue behind every function
//! of a large one. Small files and large ones queue apart, so a Rust
//! plugin never waits behind a Python one; in each lane at most
//! `compile_concurrency` compiles run at once, each waited for at most
//! `compile_timeout`. A file already compiled is not compiled again: one
//! in use is shared, one compiled before comes from the compile cache
//! without queueing, also after a restart. wasmtime cannot stop a compile, so
//! one past its time is abandoned: the caller gets
//! [`LoadError::CompileTimeout`], and the compile runs to its end in the
//! background, keeping its slot so abandoned compiles cannot pile up, and
//! its result is dropped. This module must not know where files come from
//! or which plugin a file is.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Semaphore, oneshot};
use wasmparser::{Parser, Payload};

use super::footprint::{Footprint, Reader};
use super::{Compiled, CompiledPlugin, LoadError, Runtime, RuntimeConfig};
use crate::background::lower_this_thread;

/// How much nicer than plugin calls and event delivery compile threads run:
/// a compile is background work, and a large one must not take a core from
/// the threads that serve running plugins.
const COMPILE_NICE: i32 = 10;

/// Digests remembered as compiled within the limits; past this many the
/// set starts over, so a stream of distinct files cannot grow it.
const MAX_KNOWN: usize = 4096;

/// The limits a plugin file must pass to be compiled, from `[runtime]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompileLimits {
    /// Largest file, in bytes (`max_plugin_bytes`).
    pub max_bytes: u64,
    /// Most functions (`max_plugin_functions`).
    pub max_functions: u64,
    /// Largest function body, in bytes (`max_function_bytes`).
    pub max_function_bytes: u64,
    /// Longest compile (`compile_timeout`).
    pub timeout: Duration,
}

impl CompileLimits {
    /// No limits: for files the caller trusts.
    pub const NONE: CompileLimits = CompileLimits {
        max_bytes: u64::MAX,
        max_functions: u64::MAX,
        max_function_bytes: u64::MAX,
        timeout: Duration::MAX,
    };
}

impl From<&RuntimeConfig> for CompileLimits {
    fn from(c: &RuntimeConfig) -> Self {
        CompileLimits {
            max_bytes: c.max_plugin_bytes,
            max_functions: c.max_plugin_functions,
            max_function_bytes: c.max_function_bytes,
            timeout: c.compile_timeout,
        }
    }
}

/// What the pre-scan counted in a file that passed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    /// File size.
    pub bytes: u64,
    /// Core functions defined in every nested module, plus the component's
    /// canonical functions (each compiles to a trampoline).
    pub functions: u64,
    /// The largest function body, in bytes.
    pub largest_function: u64,
    /// What it is made of and needs per instance.
    pub footprint: Footprint,
}

/// Check `wasm` against `limits` without compiling it: one pass over its
/// sections, nested modules and components included, stopping at the first
/// limit passed. Linear in the file size and allocation-free, so it is safe
/// to run on any file before anything else looks at it.
///
/// # Errors
/// The limit passed, or [`LoadError::Malformed`] when the sections cannot
/// be read.
pub fn scan(wasm: &[u8], limits: &CompileLimits) -> Result<Shape, LoadError> {
    let bytes = wasm.len() as u64;
    if bytes > limits.max_bytes {
        return Err(LoadError::TooLarge {
            bytes,
            limit: limits.max_bytes,
        });
    }
    super::check_header(wasm)?;
    let mut shape = Shape {
        bytes,
        ..Shape::default()
    };
    let mut reader = Reader::new(bytes);
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|e| LoadError::Malformed(e.to_string()))?;
        reader.feed(&payload);
        match payload {
            Payload::CodeSectionStart { count, .. } => shape.functions += u64::from(count),
            Payload::ComponentCanonicalSection(s) => shape.functions += u64::from(s.count()),
            Payload::CodeSectionEntry(body) => {
                let size = body.range().len() as u64;
                if size > limits.max_function_bytes {
                    return Err(LoadError::FunctionTooLarge {
                        bytes: size,
                        limit: limits.max_function_bytes,
                    });
                }
                shape.largest_function = shape.largest_function.max(size);
            }
            _ => {}
        }
        if shape.functions > limits.max_functions {
            return Err(LoadError::TooManyFunctions {
                functions: shape.functions,
                limit: limits.max_functions,
            });
        }
    }
    shape.footprint = reader.finish();
    Ok(shape)
}

/// Files up to this size compile in a lane of their own, so a small
/// plugin never waits behind the compile of a large one: the Python and
/// JavaScript SDKs' components (12 to 20 MB) take tens of seconds each,
/// a Rust or Go plugin (under 3 MB) well under one.
const SMALL_FILE: u64 = 4 << 20;

/// Where compiles run: a fixed number of slots per lane, the digests that
/// compiled within the limits before, and the compiled plugins in use.
pub(super) struct CompilePool {
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
    /// With the compile cache on, a file that compiled here before is a
    /// cache hit: it takes milliseconds and no slot, so it never waits
    /// behind a slow compile. Without the cache it would be a full compile,
    /// and takes a slot like any other.
    cached: bool,
    known: Mutex<HashSet<String>>,
    /// Where the digests in `known` are kept across restarts (one empty
    /// file each), so a restart's cache hits take no slot either. Should
    /// the cache have dropped the code since, the file compiles without a
    /// slot; it compiled within the limits before, so its cost is bounded.
    known_dir: Option<PathBuf>,
    /// Compiled plugins still in use by digest: a copy of a running file
    /// under another name is served from here without compiling at all.
    live: Mutex<HashMap<String, Weak<Compiled>>>,
    /// Digests whose compile ran past its time, with the limit it passed.
    /// The abandoned compile may still finish and fill the compile cache;
    /// without this, the same file dropped in again would then compile at
    /// once and be accepted, although it was refused as too slow.
    timed_out: Mutex<HashMap<String, Duration>>,
    running: OnceLock<Gauge>,
}

impl CompilePool {
    pub(super) fn new(concurrency: usize, cache: Option<&Path>) -> CompilePool {
        let known_dir = cache.map(|c| c.join("known"));
        if let Some(dir) = &known_dir
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "Cannot keep the list of compiled plugins; a restart compiles them in the queue.");
        }
        CompilePool {
            small: Arc::new(Semaphore::new(concurrency.max(1))),
            large: Arc::new(Semaphore::new(concurrency.max(1))),
            cached: cache.is_some(),
            known: Mutex::default(),
            known_dir,
            live: Mutex::default(),
            timed_out: Mutex::default(),
            running: OnceLock::new(),
        }
    }

    fn is_known(&self, digest: &str) -> bool {
        self.cached
            && (self.known.lock().contains(digest)
                || self
                    .known_dir
                    .as_ref()
                    .is_some_and(|d| d.join(digest).exists()))
    }

    fn remember(&self, digest: &str) {
        {
            let mut known = self.known.lock();
            if known.len() >= MAX_KNOWN {
                known.clear();
            }
            known.insert(digest.to_owned());
        }
        if let Some(dir) = &self.known_dir {
            let _ = std::fs::write(dir.join(digest), b"");
        }
    }

    /// A compiled plugin now in use, for [`CompilePool::in_use`].
    pub(super) fn share(&self, compiled: &CompiledPlugin) {
        let mut live = self.live.lock();
        if live.len() >= MAX_KNOWN {
            live.retain(|_, c| c.strong_count() > 0);
        }
        live.insert(compiled.digest.clone(), Arc::downgrade(&compiled.0));
    }

    /// The compiled plugin of `digest`, if one is still in use.
    fn in_use(&self, digest: &str) -> Option<CompiledPlugin> {
        self.live
            .lock()
            .get(digest)
            .and_then(Weak::upgrade)
            .map(CompiledPlugin)
    }

    /// The compile of `digest` passed `limit`.
    fn timed_out(&self, digest: &str, limit: Duration) {
        let mut timed_out = self.timed_out.lock();
        if timed_out.len() >= MAX_KNOWN {
            timed_out.clear();
        }
        timed_out.insert(digest.to_owned(), limit);
    }

    /// Whether `digest` took longer than `limit` before: it is refused at
    /// once, unless the limit has been raised since.
    fn too_slow(&self, digest: &str, limit: Duration) -> bool {
        self.timed_out
            .lock()
            .get(digest)
            .is_some_and(|passed| limit <= *passed)
    }

    fn gauge(&self, delta: i64) {
        if let Some(g) = self.running.get() {
            g.inc_by(delta);
        }
    }
}

impl Runtime {
    /// Count compiles running (abandoned ones included) in `gauge`.
    pub fn count_compiles_in(&self, gauge: Gauge) {
        let _ = self.compiles.running.set(gauge);
    }

    /// Compile and validate a plugin file from an untrusted author: the
    /// pre-scan against `limits`, then the compile on the bounded pool,
    /// waited for at most `limits.timeout` (time spent waiting for a slot
    /// does not count). Never blocks the async workers.
    ///
    /// # Errors
    /// [`LoadError`] saying why the file is not a usable plugin, naming the
    /// limit it passed.
    pub async fn compile_bounded(
        self: &Arc<Self>,
        wasm: Bytes,
        limits: &CompileLimits,
    ) -> Result<CompiledPlugin, LoadError> {
        let shape = scan(&wasm, limits)?;
        shape.footprint.fits_pool(self.config.max_memory_mb)?;
        let digest = super::digest(&wasm);
        if self.compiles.too_slow(&digest, limits.timeout) {
            return Err(LoadError::CompileTimeout {
                limit: limits.timeout,
            });
        }
        if let Some(compiled) = self.compiles.in_use(&digest) {
            return Ok(compiled);
        }
        let known = self.compiles.is_known(&digest);
        let slot = if known {
            None
        } else {
            let slots = if shape.bytes <= SMALL_FILE {
                self.compiles.small.clone()
            } else {
                self.compiles.large.clone()
            };
            // The semaphore is never closed.
            Some(slots.acquire_owned().await.map_err(|e| {
                LoadError::Compile(wasmtime::format_err!("compile pool closed: {e}"))
            })?)
        };
        let footprint = shape.footprint;
        let (tx, rx) = oneshot::channel();
        let runtime = self.clone();
        let waited_for = digest.clone();
        self.compiles.gauge(1);
        let started = Instant::now();
        let spawned = std::thread::Builder::new()
            .name("watchgate-compile".into())
            .spawn(move || {
                lower_this_thread(COMPILE_NICE, "watchgate-compile");
                let result = if known {
                    runtime.compile_digest(&wasm, digest, footprint)
                } else {
                    on_own_pool(|| runtime.compile_digest(&wasm, digest, footprint))
                };
                drop(slot);
                runtime.compiles.gauge(-1);
                let compiled = result.as_ref().ok().map(|c| c.digest.clone());
                if tx.send(result).is_ok() {
                    // Only a compile that ended in time proves the file
                    // compiles within the limits.
                    if let Some(digest) = compiled {
                        runtime.compiles.remember(&digest);
                    }
                } else {
                    tracing::info!(
                        seconds = started.elapsed().as_secs_f64(),
                        "An abandoned compile finished; its result is dropped."
                    );
                }
            });
        if let Err(e) = spawned {
            self.compiles.gauge(-1);
            return Err(LoadError::Compile(wasmtime::format_err!(
                "cannot start a compile thread: {e}"
            )));
        }
        match tokio::time::timeout(limits.timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(LoadError::Compile(wasmtime::format_err!(
                "the compile thread panicked"
            ))),
            Err(_) => {
                self.compiles.timed_out(&waited_for, limits.timeout);
                Err(LoadError::CompileTimeout {
                    limit: limits.timeout,
                })
            }
        }
    }

    /// [`Runtime::compile_bounded`] for callers outside an async runtime
    /// (`watchgate check`, `watchgate plugin test`). Must not be called from
    /// inside one.
    ///
    /// # Errors
    /// As [`Runtime::compile_bounded`].
    pub fn compile_blocking(
        self: &Arc<Self>,
        wasm: Bytes,
        limits: &CompileLimits,
    ) -> Result<CompiledPlugin, LoadError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| {
                LoadError::Compile(wasmtime::format_err!("cannot start a timer runtime: {e}"))
            })?;
        rt.block_on(self.compile_bounded(wasm, limits))
    }
}

/// Run `f` with a rayon pool of its own as the current pool, so the
/// parallel compile inside uses these threads and no other compile's.
fn on_own_pool<T: Send>(f: impl FnOnce() -> Result<T, LoadError> + Send) -> Result<T, LoadError> {
    let threads = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("watchgate-compile-{i}"))
        .start_handler(|_| lower_this_thread(COMPILE_NICE, "watchgate-compile"))
        .build()
        .map_err(|e| {
            LoadError::Compile(wasmtime::format_err!("cannot start compile threads: {e}"))
        })?;
    pool.install(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_encoder::{
        BlockType, CodeSection, Component, Function, FunctionSection, Module, ModuleSection,
        TypeSection, ValType,
    };

    /// A core module of `functions` functions of `ops` operations each;
    /// with `locals`, the operations keep that many locals live across
    /// branches, which is slow to compile.
    fn module(functions: u32, ops: u32, locals: u32) -> Module {
        let mut types = TypeSection::new();
        types.ty().function([], []);
        let mut funcs = FunctionSection::new();
        let mut code = CodeSection::new();
        for _ in 0..functions {
            funcs.function(0);
            let mut f = Function::new([(locals, ValType::I32)]);
            for i in 0..ops {
                let l = locals.max(1);
                if i % 64 == 0 {
                    f.instructions().local_get(i % l).if_(BlockType::Empty);
                }
                f.instructions()
                    .local_get(i % l)
                    .local_get(i.wrapping_mul(7) % l)
                    .i32_add()
                    .local_set(i.wrapping_mul(13).wrapping_add(1) % l);
                if i % 64 == 63 || i + 1 == ops {
                    f.instructions().end();
                }
            }
            f.instructions().end();
            code.function(&f);
        }
        let mut m = Module::new();
        m.section(&types).section(&funcs).section(&code);
        m
    }

    fn component(modules: &[Module]) -> Vec<u8> {
        let mut c = Component::new();
        for m in modules {
            c.section(&ModuleSection(m));
        }
        c.finish()
    }

    fn limits() -> CompileLimits {
        CompileLimits::from(&RuntimeConfig::default())
    }

    #[test]
    fn counts_functions_across_nested_modules() {
        let wasm = component(&[module(3, 10, 4), module(5, 200, 4)]);
        let shape = scan(&wasm, &limits()).unwrap();
        assert_eq!(shape.functions, 8);
        assert_eq!(shape.bytes, wasm.len() as u64);
        assert!(shape.largest_function > 200 * 4, "{shape:?}");
    }

    #[test]
    fn refusals_name_the_limit_and_its_value() {
        let wasm = component(&[module(40, 1, 1), module(40, 1, 1)]);
        let tight = CompileLimits {
            max_functions: 50,
            ..limits()
        };
        let e = scan(&wasm, &tight).unwrap_err().to_string();
        assert_eq!(
            e,
            "defines at least 80 functions, more than [runtime] max_plugin_functions = 50"
        );

        let small = CompileLimits {
            max_bytes: 100,
            ..limits()
        };
        let e = scan(&wasm, &small).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "is {} bytes, more than [runtime] max_plugin_bytes = 100",
                wasm.len()
            )
        );

        let wasm = component(&[module(1, 2000, 8)]);
        let e = scan(&wasm, &limits()).unwrap();
        let narrow = CompileLimits {
            max_function_bytes: e.largest_function - 1,
            ..limits()
        };
        let e = scan(&wasm, &narrow).unwrap_err().to_string();
        assert!(
            e.starts_with("has a function of ")
                && e.ends_with(&format!(
                    " bytes, more than [runtime] max_function_bytes = {}",
                    narrow.max_function_bytes
                )),
            "{e}"
        );

        let e = scan(&wasm[..wasm.len() - 3], &limits()).unwrap_err();
        assert!(matches!(e, LoadError::Malformed(_)), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_compile_is_abandoned_while_others_go_on() {
        let runtime = Runtime::new(&RuntimeConfig {
            compile_concurrency: 2,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let running = Gauge::default();
        runtime.count_compiles_in(running.clone());
        // Functions keeping a thousand locals live, seconds each to compile,
        // more of them than cores: on a shared rayon pool every thread
        // would be busy with them.
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let slow = Bytes::from(component(&[module(2 * cores as u32, 20_000, 1000)]));
        let quick = Bytes::from(component(&[module(10, 10, 2)]));
        let tight = CompileLimits {
            timeout: Duration::from_millis(200),
            ..limits()
        };
        let slow_again = slow.clone();
        let started = Instant::now();
        let slow_result = {
            let runtime = runtime.clone();
            tokio::spawn(async move { runtime.compile_bounded(slow, &tight).await })
        };
        while running.get() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The quick file compiles (and then fails the world check) while the
        // slow one holds its slot: neither the pool nor rayon makes it wait.
        let e = runtime.compile_bounded(quick, &limits()).await.unwrap_err();
        assert!(matches!(e, LoadError::Exports(_)), "{e}");
        let quick_done = started.elapsed();
        let e = slow_result.await.unwrap().unwrap_err();
        assert_eq!(
            e.to_string(),
            "did not compile within [runtime] compile_timeout = 200ms; the compile was abandoned"
        );
        assert_eq!(e.limit(), Some("compile_timeout"));
        // The same file again, under the same limit, is refused at once
        // rather than accepted from what the abandoned compile leaves in
        // the cache.
        let again = Instant::now();
        let e = runtime
            .compile_bounded(slow_again, &tight)
            .await
            .unwrap_err();
        assert_eq!(e.limit(), Some("compile_timeout"));
        assert!(
            again.elapsed() < Duration::from_millis(100),
            "{:?}",
            again.elapsed()
        );
        assert!(
            running.get() >= 1,
            "the abandoned compile still runs and holds its slot"
        );
        assert!(
            quick_done < Duration::from_secs(2),
            "the quick compile waited {quick_done:?}"
        );
    }
}

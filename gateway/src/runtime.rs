//! The sandbox: one wasmtime engine, compiled plugins, per-call limits.
//!
//! Owns the [`Engine`] (pooling allocator, fuel, epoch interruption, bounded
//! wasm stack), the one epoch ticker thread that turns wall-clock time into
//! deadlines, the [`Linker`] with the host imports (WASI's waits replaced
//! by ones held to the same deadline), and compilation of a
//! plugin file into a [`CompiledPlugin`] (validated against the world, ready
//! to instantiate). [`instance::Sandbox`] runs calls; [`compile`] bounds
//! what compiling an untrusted file may cost. Its settings are its
//! own: [`RuntimeConfig`] for the engine and [`Limits`] per call. This
//! module must not know about queues, routing or where plugin files come
//! from; it uses `host` for the store data and the WIT bindings, never the
//! reverse.

pub mod compile;
pub mod config;
pub mod footprint;
pub mod instance;
pub mod limits;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use compile::CompileLimits;
pub use config::RuntimeConfig;
pub use footprint::Footprint;
pub use limits::{Limits, PartialLimits};

use crate::host::HostState;
use crate::host::bindings::{Plugin, PluginPre};

/// How often the epoch advances; deadlines are accurate to about this.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The engine could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// wasmtime refused the engine configuration.
    #[error("cannot configure the wasm engine: {0:#}")]
    Engine(wasmtime::Error),
    /// The host imports could not be linked.
    #[error("cannot link host imports: {0:#}")]
    Linker(wasmtime::Error),
    /// The epoch ticker thread could not start.
    #[error("cannot start the epoch ticker thread: {0}")]
    Ticker(std::io::Error),
}

/// A plugin file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not a wasm file at all.
    #[error("not a WebAssembly file (no `\\0asm` header)")]
    NotWasm,
    /// A core module rather than a component.
    #[error(
        "a core wasm module, not a component; build the plugin for `wasm32-wasip2` with the watchgate SDK"
    )]
    CoreModule,
    /// Its sections cannot be read.
    #[error("cannot read the component: {0}")]
    Malformed(String),
    /// Larger than `max_plugin_bytes`.
    #[error("is {bytes} bytes, more than [runtime] max_plugin_bytes = {limit}")]
    TooLarge {
        /// The file's size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// More functions than `max_plugin_functions`.
    #[error(
        "defines at least {functions} functions, more than [runtime] max_plugin_functions = {limit}"
    )]
    TooManyFunctions {
        /// Functions counted before the scan stopped.
        functions: u64,
        /// The limit.
        limit: u64,
    },
    /// A function body larger than `max_function_bytes`.
    #[error("has a function of {bytes} bytes, more than [runtime] max_function_bytes = {limit}")]
    FunctionTooLarge {
        /// The function body's size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The compile took longer than `compile_timeout`.
    #[error(
        "did not compile within [runtime] compile_timeout = {limit:?}; the compile was abandoned"
    )]
    CompileTimeout {
        /// The limit.
        limit: Duration,
    },
    /// wasmtime could not compile it.
    #[error("does not compile: {0:#}")]
    Compile(wasmtime::Error),
    /// It imports something the host does not provide.
    #[error("imports something watchgate does not provide: {0:#}")]
    Imports(wasmtime::Error),
    /// It does not export the `watchgate:plugin` world's functions.
    #[error("does not export the watchgate:plugin@0.1.0 world: {0:#}")]
    Exports(wasmtime::Error),
    /// Its `watchgate-manifest` section is unreadable.
    #[error("{0}")]
    Manifest(String),
    /// One instance of it needs more than the instance pool gives a plugin.
    #[error("does not fit the instance pool: {0}")]
    DoesNotFit(String),
}

impl LoadError {
    /// The `[runtime]` limit the file passed, if that is why it was
    /// refused: the `limit` label of `watchgate_plugin_compile_refused`.
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            LoadError::TooLarge { .. } => Some("max_plugin_bytes"),
            LoadError::TooManyFunctions { .. } => Some("max_plugin_functions"),
            LoadError::FunctionTooLarge { .. } => Some("max_function_bytes"),
            LoadError::CompileTimeout { .. } => Some("compile_timeout"),
            LoadError::DoesNotFit(_) => Some("instance_pool"),
            _ => None,
        }
    }
}

/// A plugin compiled and validated against the world, ready to instantiate.
/// Cheap to clone: plugins loaded from the same file share one.
#[derive(Clone)]
pub struct CompiledPlugin(Arc<Compiled>);

/// What [`CompiledPlugin`] holds.
pub struct Compiled {
    /// Pre-linked instance template.
    pub pre: PluginPre<HostState>,
    /// SHA-256 of the file, hex.
    pub digest: String,
    /// File size in bytes.
    pub size: usize,
    /// The manifest the plugin carries, if any.
    pub manifest: Option<Arc<crate::manifest::Manifest>>,
    /// Its language and what one instance takes.
    pub footprint: Footprint,
}

impl std::ops::Deref for CompiledPlugin {
    type Target = Compiled;
    fn deref(&self) -> &Compiled {
        &self.0
    }
}

impl std::fmt::Debug for CompiledPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledPlugin")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .finish()
    }
}

/// The shared engine and linker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    ticker: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    compiles: compile::CompilePool,
}

impl Runtime {
    /// Set up the engine, linker and epoch ticker.
    ///
    /// # Errors
    /// [`RuntimeError`] when wasmtime refuses the configuration.
    pub fn new(config: &RuntimeConfig) -> Result<Arc<Runtime>, RuntimeError> {
        Self::with_cache(config, None)
    }

    /// Like [`Runtime::new`], keeping compiled code in `cache` (an absolute
    /// directory), so a plugin compiled once starts without compiling
    /// again, across restarts.
    ///
    /// # Errors
    /// [`RuntimeError`] when wasmtime refuses the configuration or the
    /// cache directory.
    pub fn with_cache(
        config: &RuntimeConfig,
        cache: Option<&std::path::Path>,
    ) -> Result<Arc<Runtime>, RuntimeError> {
        let mut cfg = engine_config(config);
        if let Some(dir) = cache {
            let mut c = wasmtime::CacheConfig::new();
            c.with_directory(dir);
            let cache = wasmtime::Cache::new(c).map_err(RuntimeError::Engine)?;
            cfg.cache(Some(cache));
        }
        let engine = Engine::new(&cfg).map_err(RuntimeError::Engine)?;
        // The call clock calibrates itself on its first read (up to 200 ms
        // against the monotonic clock): here, at start-up, not in the
        // first plugin call.
        let _ = instance::CallClock::now();
        let linker = linker(&engine).map_err(RuntimeError::Linker)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("watchgate-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(RuntimeError::Ticker)?
        };
        Ok(Arc::new(Runtime {
            engine,
            linker,
            config: config.clone(),
            ticker: Some(ticker),
            stop,
            compiles: compile::CompilePool::new(config.compile_concurrency, cache),
        }))
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The runtime settings this was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Compile and validate a plugin file, with no limits: for files you
    /// trust (tests, benchmarks). Plugin files from the directory and the
    /// plugin tools go through [`Runtime::compile_bounded`]. CPU-heavy:
    /// call it off the async workers.
    ///
    /// # Errors
    /// [`LoadError`] saying why the file is not a usable plugin.
    pub fn compile(&self, bytes: &[u8]) -> Result<CompiledPlugin, LoadError> {
        let footprint = compile::scan(bytes, &CompileLimits::NONE)?.footprint;
        footprint.fits_pool(self.config.max_memory_mb)?;
        self.compile_digest(bytes, digest(bytes), footprint)
    }

    /// Compile a file that passed the pre-scan, which gave `footprint`.
    fn compile_digest(
        &self,
        bytes: &[u8],
        digest: String,
        footprint: Footprint,
    ) -> Result<CompiledPlugin, LoadError> {
        let manifest = crate::manifest::read(bytes)
            .map_err(LoadError::Manifest)?
            .map(Arc::new);
        let component = Component::new(&self.engine, bytes).map_err(LoadError::Compile)?;
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(LoadError::Imports)?;
        let pre = PluginPre::new(instance_pre).map_err(LoadError::Exports)?;
        let compiled = CompiledPlugin(Arc::new(Compiled {
            pre,
            digest,
            size: bytes.len(),
            manifest,
            footprint,
        }));
        self.compiles.share(&compiled);
        Ok(compiled)
    }
}

/// The engine settings every plugin runs under: the component model, fuel,
/// epoch interruption, the bounded wasm stack and the pooling allocator
/// sized by `config` (no compile cache). Public so experiments can vary one
/// setting and keep the rest.
pub fn engine_config(config: &RuntimeConfig) -> wasmtime::Config {
    let max_memory = usize::try_from(config.max_memory_mb << 20).unwrap_or(usize::MAX);
    let n = config.max_instances.max(1);
    let mut pool = PoolingAllocationConfig::default();
    // Room for every instance to be as large as one plugin may be: the
    // totals only count, and memories and tables reserve address space,
    // not memory, until used.
    pool.total_component_instances(n)
        .total_core_instances(n * footprint::MAX_CORE_INSTANCES)
        .total_memories(n * footprint::MAX_MEMORIES)
        .total_tables(n * footprint::MAX_TABLES)
        .max_memories_per_component(footprint::MAX_MEMORIES)
        .max_tables_per_component(footprint::MAX_TABLES)
        .max_core_instances_per_component(footprint::MAX_CORE_INSTANCES)
        .max_memory_size(max_memory);
    let mut cfg = wasmtime::Config::new();
    cfg.wasm_component_model(true)
        .consume_fuel(true)
        .epoch_interruption(true)
        .max_wasm_stack(config.max_wasm_stack_kb * 1024)
        .memory_reservation(max_memory as u64)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    cfg
}

/// The host imports plugins are linked against on `engine`: WASI, its
/// waits replaced by ones bounded by the call's deadline, and the
/// `watchgate:plugin` interfaces.
///
/// # Errors
/// When an import cannot be added.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    crate::host::wait::add_to_linker(&mut linker)?;
    Plugin::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// A component, not a core module or something else.
fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 0x0d, 0, 0x01, 0]) => Ok(()),
        Some([0, b'a', b's', b'm', ..]) => Err(LoadError::CoreModule),
        _ => Err(LoadError::NotWasm),
    }
}

/// SHA-256 of a plugin file, hex: its identity in reports and caches.
pub fn digest(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

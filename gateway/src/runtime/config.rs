//! The `[runtime]` table: engine-wide settings and the ceilings no plugin
//! may exceed.
//!
//! Owns [`RuntimeConfig`] and its defaults. The gateway config file embeds
//! it as is; the checks that relate it to other tables live with the file
//! format. It must not build an engine; [`super::Runtime`] does.

use std::time::Duration;

use serde::Deserialize;

use super::limits::Limits;

/// `[runtime]`: defaults for every plugin and the ceilings no sidecar may
/// exceed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Limits for plugins whose sidecar sets none.
    #[serde(default = "default_limits")]
    pub defaults: Limits,
    /// Highest `memory_mb` a sidecar may ask for; also the size of each slot
    /// in the pooling allocator. Default 256.
    #[serde(default = "default_max_memory_mb")]
    pub max_memory_mb: u64,
    /// Highest `timeout_ms` a sidecar may ask for. Default 30 000.
    #[serde(default = "default_max_timeout_ms")]
    pub max_timeout_ms: u64,
    /// Maximum wasm stack per call, in KiB. Default 512.
    #[serde(default = "default_max_wasm_stack_kb")]
    pub max_wasm_stack_kb: usize,
    /// Plugin log lines allowed per second per plugin (stdout, stderr and
    /// the `log` import together, and the notices of dropped lines); the
    /// rest are counted and dropped. Default 50.
    #[serde(default = "default_log_lines_per_second")]
    pub log_lines_per_second: u32,
    /// Plugin instances that can be alive at once (one per loaded plugin,
    /// plus short-lived ones during a swap); sizes the pooling allocator.
    /// Default 128.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Keep compiled plugins in `compiled/` in the state directory, so a
    /// restart does not compile them again. Default true.
    #[serde(default = "default_true")]
    pub compile_cache: bool,
    /// Largest plugin file accepted, in bytes. Default 32 MiB.
    #[serde(default = "default_max_plugin_bytes")]
    pub max_plugin_bytes: u64,
    /// Most functions one plugin may define (core functions of every
    /// nested module plus the component's canonical functions): compile
    /// time and memory grow with each one. Default 50,000.
    #[serde(default = "default_max_plugin_functions")]
    pub max_plugin_functions: u64,
    /// Largest single function body, in bytes: compile time grows faster
    /// than linearly with a function's size. Default 512 KiB.
    #[serde(default = "default_max_function_bytes")]
    pub max_function_bytes: u64,
    /// How long a compile may take before the plugin is refused. wasmtime
    /// cannot stop a compile: one past its time runs to its end in the
    /// background, holding its slot, and its result is dropped. The
    /// pre-scan limits bound a compile's cost first; this is the last bound
    /// behind them, set well above the Python SDK's components, which take
    /// 20 to 30 s alone on two cores and several times that when sharing
    /// them. Default 300 s.
    #[serde(default = "default_compile_timeout", with = "humantime_serde")]
    pub compile_timeout: Duration,
    /// Compiles that may run at once (abandoned ones included), in each of
    /// the two lanes: files up to 4 MiB, and larger ones. Default 2.
    #[serde(default = "default_compile_concurrency")]
    pub compile_concurrency: usize,
}

fn default_true() -> bool {
    true
}

fn default_max_plugin_bytes() -> u64 {
    32 << 20
}

fn default_max_plugin_functions() -> u64 {
    50_000
}

fn default_max_function_bytes() -> u64 {
    512 << 10
}

fn default_compile_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_compile_concurrency() -> usize {
    2
}

fn default_max_instances() -> u32 {
    128
}

fn default_limits() -> Limits {
    Limits::DEFAULT
}
fn default_max_memory_mb() -> u64 {
    256
}
fn default_max_timeout_ms() -> u64 {
    30_000
}
fn default_max_wasm_stack_kb() -> usize {
    512
}
fn default_log_lines_per_second() -> u32 {
    50
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            defaults: default_limits(),
            max_memory_mb: default_max_memory_mb(),
            max_timeout_ms: default_max_timeout_ms(),
            max_wasm_stack_kb: default_max_wasm_stack_kb(),
            log_lines_per_second: default_log_lines_per_second(),
            max_instances: default_max_instances(),
            compile_cache: true,
            max_plugin_bytes: default_max_plugin_bytes(),
            max_plugin_functions: default_max_plugin_functions(),
            max_function_bytes: default_max_function_bytes(),
            compile_timeout: default_compile_timeout(),
            compile_concurrency: default_compile_concurrency(),
        }
    }
}

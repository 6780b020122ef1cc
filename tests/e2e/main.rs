//! End-to-end tests: the real `watchgate` binary (or library) with the real
//! example plugins compiled for `wasm32-wasip2`.
//!
//! The plugins are built once per test process by [`support::plugin`]; each
//! test runs its own gateway on a free loopback port in its own temporary
//! directory.

mod adversarial;
mod adversarial_blocking;
mod adversarial_compile;
mod adversarial_files_state;
mod adversarial_panics;
mod adversarial_strings;
mod browser;
mod cli;
mod cluster;
mod commands;
mod compile_fit;
mod console;
mod consul_source;
mod durable;
mod etcd_harness;
mod etcd_source;
mod fake_consul;
mod fake_nacos;
mod fault_proxy;
mod faults;
mod file_source;
mod hot_reload;
mod http_sink;
mod languages;
mod lifecycle;
mod loopback;
mod nacos_source;
mod nats_harness;
mod nats_source;
mod platform;
mod plugins;
mod pool;
mod runtime_limits;
mod scaffold;
mod scale;
mod support;
mod support_lang;
mod templates;
mod trace;
mod version;
mod zk_harness;
mod zookeeper_source;

//! watchgate: watch configuration and discovery stores, hand every change
//! to sandboxed WebAssembly plugins.
//!
//! The pipeline, left to right:
//!
//! * [`source`]: one task per configured store (etcd, Consul, Nacos, a
//!   directory) turns what it sees into [`event::Event`]s: put or delete,
//!   with revision and previous value.
//! * [`dispatch`]: routes each event by source and key prefix to the plugins
//!   subscribed to it, into one bounded queue per plugin that folds changes
//!   of the same key together when full instead of blocking the source.
//! * [`runtime`]: one wasmtime engine; each plugin is compiled once and run
//!   on its own worker thread, every call under fuel, a wall-clock deadline
//!   and a memory cap. A trap fails one call; a fresh instance serves the
//!   next.
//! * [`host`]: what a plugin may call back into, each capability behind the
//!   operator's grant.
//! * [`admin`]: health, readiness, metrics and a JSON view over HTTP.
//!
//! [`app`] wires these together and owns every task; [`config`] reads the
//! files that describe them.
//!
//! Modules use only modules below them, top to bottom: `main` and [`cli`];
//! [`app`], [`admin`], [`cluster`], [`plugin_dir`]; [`config`]; [`source`];
//! [`dispatch`]; [`runtime`]; [`host`]; and the leaves [`event`],
//! [`store`], [`telemetry`], [`text`] (the bound on plugin-supplied
//! strings), [`manifest`] and [`client`] (connections to stores that
//! several layers talk to). Each layer owns the settings it
//! acts on; [`config`] only assembles them from the file and checks them
//! against each other. A type two layers share lives in the lower one.

pub mod admin;
pub mod app;
pub mod background;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod dispatch;
pub mod event;
pub mod host;
pub mod manifest;
pub mod plugin_dir;
pub mod runtime;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod text;

//! Host bindings generated from `plugin-sdk/wit`, the one WIT package host
//! and guests share. Nothing but the generated code lives here.
//!
//! They live in `host` because the host implements the world's imports;
//! `runtime`, one layer up, instantiates the world and calls its exports
//! through them.

#![allow(missing_docs)]

wasmtime::component::bindgen!({
    path: "../plugin-sdk/wit",
    world: "plugin",
});

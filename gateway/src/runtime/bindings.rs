//! Host bindings generated from `plugin-sdk/wit`, the one WIT package host
//! and guests share. Nothing but the generated code lives here.

#![allow(missing_docs)]

wasmtime::component::bindgen!({
    path: "../plugin-sdk/wit",
    world: "plugin",
});

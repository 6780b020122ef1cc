//! WASI waits, each bounded by the deadline of the call it is part of.
//!
//! A guest that sleeps (`std::thread::sleep`, a clock pollable, a poll on
//! anything that never becomes ready) runs no wasm while it waits: it waits
//! in the host, where the epoch deadline that stops a spinning guest cannot
//! reach it. So the host's side of `wasi:io/poll` (`poll` and
//! `pollable.block`, every way WASI 0.2 waits) is this module's, linked
//! over wasmtime-wasi's own: a wait still pending at the call's deadline is
//! cut off, counted, and fails the call with [`WaitCutOff`], which the
//! runtime classifies as a timeout like an epoch interrupt. Nothing else
//! WASI offers a plugin can wait: stdin is empty and closed, there are no
//! preopened directories and no sockets, and the output streams never push
//! back. This module owns the deadline a store's waits are held to; the
//! runtime sets it when it arms a call, and decides what the failed call
//! leads to.

use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::p2::bindings::io::poll as async_poll;
use wasmtime_wasi::p2::bindings::sync::io::poll;
use wasmtime_wasi::runtime::in_tokio;

use super::{HostState, PluginContext};
use crate::telemetry::PluginCounter;

/// The clock plugin calls are timed with: the processor's time-stamp
/// counter, scaled to time by `quanta` (calibrated once per process, when
/// the runtime starts). The worker reads it once per call, and the call's
/// deadline is taken from that same read. A read takes about 16 ns where
/// the monotonic clock, read through the vDSO, takes about 24 ns
/// (5,000,000 reads of each on a 2-core Intel Xeon virtual machine; 10
/// and 25 ns on an AMD EPYC one). Where the counter is not invariant,
/// `quanta` reads the monotonic clock instead.
pub type CallClock = quanta::Instant;

/// When the call in progress must end, and the limit that says so.
#[derive(Clone, Copy, Debug)]
pub struct CallDeadline {
    /// When the call started.
    pub started: CallClock,
    /// The limit (`timeout_ms`).
    pub timeout_ms: u64,
}

impl CallDeadline {
    /// The deadline of a call that started at `started` under `timeout_ms`.
    pub fn starting_at(started: CallClock, timeout_ms: u64) -> CallDeadline {
        CallDeadline {
            started,
            timeout_ms,
        }
    }

    /// The instant the deadline passes, on the clock timers and waits use;
    /// `None` when it is too far off to be told from never. Worked out
    /// only when a call waits, so a call that does not reads no second
    /// clock.
    pub fn at(&self) -> Option<Instant> {
        let left = Duration::from_millis(self.timeout_ms).saturating_sub(self.started.elapsed());
        Instant::now().checked_add(left)
    }
}

/// A WASI wait the guest was still in when its call's deadline passed.
#[derive(Debug, thiserror::Error)]
#[error(
    "the plugin was still waiting in wasi:io/poll {wait} (a sleep or a wait on a pollable) \
     when its call deadline passed (timeout_ms = {timeout_ms}); the wait was cut off"
)]
pub struct WaitCutOff {
    /// `poll` or `pollable.block`.
    pub wait: &'static str,
    /// The call's limit.
    pub timeout_ms: u64,
}

/// [`HasData`] for the poll interface: the store's resource table, the
/// deadline of its call, and the plugin to count against.
pub struct BoundedWaits;

impl HasData for BoundedWaits {
    type Data<'a> = Waits<'a>;
}

/// One store's view for a wait.
pub struct Waits<'a> {
    table: &'a mut ResourceTable,
    deadline: Option<CallDeadline>,
    ctx: &'a PluginContext,
}

impl HostState {
    fn waits(&mut self) -> Waits<'_> {
        Waits {
            table: &mut self.table,
            deadline: self.deadline,
            ctx: &self.ctx,
        }
    }
}

/// Link `wasi:io/poll` with waits bounded by the call's deadline, over the
/// one [`wasmtime_wasi::p2::add_to_linker_sync`] linked.
///
/// # Errors
/// When wasmtime refuses the definitions.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let linked = poll::add_to_linker::<HostState, BoundedWaits>(linker, HostState::waits);
    linker.allow_shadowing(false);
    linked
}

/// Run `wait` until it ends, or until the deadline passes (no deadline:
/// until it ends), counting a cut-off against `ctx`.
fn bounded<T>(
    deadline: Option<CallDeadline>,
    ctx: &PluginContext,
    what: &'static str,
    wait: impl Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    let Some((deadline, at)) = deadline.and_then(|d| d.at().map(|at| (d, at))) else {
        return in_tokio(wait);
    };
    // The wait is polled before the deadline is looked at, so a wait that
    // is ready now (a zero-length sleep, a poll that only asks) still
    // answers after the deadline; the epoch interrupt ends the call once
    // the guest runs on. The timer is made inside the runtime `in_tokio`
    // enters: a worker thread has none of its own.
    match in_tokio(async move { tokio::time::timeout_at(at.into(), wait).await }) {
        Ok(result) => result,
        Err(_) => {
            ctx.metrics
                .count_plugin(PluginCounter::WaitCutOff, &ctx.name);
            Err(wasmtime::Error::new(WaitCutOff {
                wait: what,
                timeout_ms: deadline.timeout_ms,
            }))
        }
    }
}

impl poll::Host for Waits<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        let wait = async_poll::Host::poll(self.table, pollables);
        bounded(self.deadline, self.ctx, "poll", wait)
    }
}

impl poll::HostPollable for Waits<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        // Never waits: it polls the pollable once.
        in_tokio(async_poll::HostPollable::ready(self.table, pollable))
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        let wait = async_poll::HostPollable::block(self.table, pollable);
        bounded(self.deadline, self.ctx, "pollable.block", wait)
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.table, pollable)
    }
}

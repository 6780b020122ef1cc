//! Running calls: one [`Sandbox`] per plugin worker.
//!
//! Owns the live instance of one plugin and the per-call limits: fuel, an
//! epoch deadline and the memory cap. A trap fails that one call and drops
//! the instance (a trapped component cannot be entered again); the next call
//! gets a fresh instance from the `InstancePre`. This module must not decide
//! which events to run or in what order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Store, Trap};

use super::limits::{Limits, classify, trap_code};
use super::{CompiledPlugin, EPOCH_TICK, Runtime};
use crate::event::{Event, EventKind};
use crate::host::bindings::Plugin;
use crate::host::bindings::watchgate::plugin::types as wit;
use crate::host::{HostState, PluginContext};
use crate::telemetry::{Outcome, PluginCounter};

/// How one call went.
#[derive(Debug, Clone)]
pub struct CallReport {
    /// The outcome class (the metric label).
    pub outcome: Outcome,
    /// The handler's error, or the trap's description.
    pub message: Option<String>,
    /// The exact trap, when the call trapped.
    pub trap: Option<Trap>,
    /// Wall-clock time of the call, including instantiation when one was
    /// needed.
    pub elapsed: Duration,
}

struct Live {
    store: Store<HostState>,
    bindings: Plugin,
    version: u64,
}

/// One version of a plugin as the operator configured it: code, host
/// context (grants, state, log) and limits.
#[derive(Clone)]
pub struct LoadedPlugin {
    /// The compiled code.
    pub compiled: CompiledPlugin,
    /// Grants, state and log of the plugin.
    pub ctx: Arc<PluginContext>,
    /// Increases with every load; a new version replaces the live instance.
    pub version: u64,
    /// Per-call limits.
    pub limits: Limits,
}

/// One plugin's executor. Not shared: each worker thread owns one.
pub struct Sandbox {
    runtime: Arc<Runtime>,
    live: Option<Live>,
    /// The source of the last event lowered, and its name as the guest's
    /// string (see [`Sandbox::lower`]).
    source: Option<(Arc<str>, String)>,
}

/// Epochs to allow for a deadline of `timeout_ms`, rounded up, plus one for
/// the partial tick in progress.
fn deadline_ticks(timeout_ms: u64) -> u64 {
    let tick = EPOCH_TICK.as_millis().max(1) as u64;
    timeout_ms.div_ceil(tick) + 1
}

/// The guest's view of an event.
pub fn to_wit(e: &Event) -> wit::Event {
    to_wit_from(e, String::from(&*e.source))
}

/// [`to_wit`] with the source name given.
fn to_wit_from(e: &Event, source: String) -> wit::Event {
    wit::Event {
        source,
        kind: match e.kind {
            EventKind::Put => wit::EventKind::Put,
            EventKind::Delete => wit::EventKind::Delete,
        },
        key: String::from(&*e.key),
        value: e.value.as_ref().map(|v| v.to_vec()),
        prev_value: e.prev_value.as_ref().map(|v| v.to_vec()),
        revision: e.revision,
        resync: e.resync,
        coalesced: e.coalesced,
        metadata: e.metadata.clone(),
    }
}

/// Call `handle` on each event in turn with plain wasmtime: one instance,
/// limits set once and never re-armed, no queue, no metrics. The floor a
/// dispatched call is measured against (benchmarks).
///
/// # Errors
/// When instantiation or a call fails.
pub fn bare_calls(
    runtime: &Runtime,
    plugin: &LoadedPlugin,
    events: &[Event],
) -> wasmtime::Result<Duration> {
    let mut store = Store::new(
        runtime.engine(),
        HostState::new(plugin.ctx.clone(), usize::MAX),
    );
    store.set_fuel(u64::MAX)?;
    store.set_epoch_deadline(u64::MAX / 2);
    let bindings = plugin.compiled.pre.instantiate(&mut store)?;
    let start = Instant::now();
    for e in events {
        let arg = to_wit(e);
        if let Err(message) = bindings.call_handle(&mut store, &arg)? {
            wasmtime::bail!("handler failed: {message}");
        }
    }
    Ok(start.elapsed())
}

/// How one batch call went.
#[derive(Debug, Clone)]
pub struct BatchReport {
    /// Events handled, from the front of the batch.
    pub handled: usize,
    /// Why the rest was not: the handler's error on event `handled`
    /// (`attributed`), or a failure of the whole batch: a trap or limit
    /// somewhere in it, or a handler error whose index is outside it.
    pub failure: Option<CallReport>,
    /// Whether `failure` belongs to event `handled` (a handler error) rather
    /// than to the batch as a whole (which event is unknown).
    pub attributed: bool,
    /// Wall-clock time of the call.
    pub elapsed: Duration,
}

/// What a `batch-error` from a call on `len` events means. An index inside
/// the batch names the first event not handled. One outside it names no
/// event, so it cannot say how far the plugin got: taking it for "all
/// handled" would count a failing plugin as a healthy one and drop its
/// message, so the whole batch failed instead, and the message says why.
fn batch_error(e: wit::BatchError, len: usize, elapsed: Duration) -> BatchReport {
    let index = usize::try_from(e.index).unwrap_or(usize::MAX);
    let attributed = index < len;
    let message = if attributed {
        e.message
    } else {
        format!(
            "handle-batch failed with index {}, outside the batch of {len} events: {}",
            e.index, e.message
        )
    };
    BatchReport {
        handled: if attributed { index } else { 0 },
        failure: Some(CallReport {
            outcome: Outcome::error,
            message: Some(message),
            trap: None,
            elapsed,
        }),
        attributed,
        elapsed,
    }
}

impl Sandbox {
    /// A sandbox with no instance yet.
    pub fn new(runtime: Arc<Runtime>) -> Sandbox {
        Sandbox {
            runtime,
            live: None,
            source: None,
        }
    }

    /// [`to_wit`], the source name copied from the last event's when the
    /// source is the same. The producer changes the reference count of an
    /// event's source for every event it queues, and the count shares a
    /// cache line with the name: reading the name from there for every
    /// call would pull that line from the producer's core each time (and
    /// make the producer's next change pull it back). Comparing the
    /// pointers reads nothing shared.
    fn lower(&mut self, e: &Event) -> wit::Event {
        let source = match &self.source {
            Some((arc, name)) if Arc::ptr_eq(arc, &e.source) => name.clone(),
            _ => {
                let name = String::from(&*e.source);
                self.source = Some((e.source.clone(), name.clone()));
                name
            }
        };
        to_wit_from(e, source)
    }

    /// Whether an instance is alive (false after a trap until the next
    /// call).
    pub fn has_instance(&self) -> bool {
        self.live.is_some()
    }

    /// Drop the live instance, if any.
    pub fn recycle(&mut self) {
        self.live = None;
    }

    fn arm(store: &mut Store<HostState>, limits: &Limits) -> wasmtime::Result<()> {
        store.set_fuel(limits.fuel)?;
        store.set_epoch_deadline(deadline_ticks(limits.timeout_ms));
        store
            .data_mut()
            .arm_waits(Duration::from_millis(limits.timeout_ms));
        Ok(())
    }

    /// The live instance of this version of `plugin`, made if needed.
    fn live_for(&mut self, plugin: &LoadedPlugin) -> Result<&mut Live, (wasmtime::Error, bool)> {
        if self
            .live
            .as_ref()
            .is_none_or(|l| l.version != plugin.version)
        {
            self.instantiate(plugin)?;
        }
        Ok(self.live.as_mut().expect("instantiate succeeded"))
    }

    fn instantiate(&mut self, plugin: &LoadedPlugin) -> Result<(), (wasmtime::Error, bool)> {
        self.live = None;
        let limits = &plugin.limits;
        let memory = usize::try_from(limits.memory_mb << 20).unwrap_or(usize::MAX);
        let mut store = Store::new(
            self.runtime.engine(),
            HostState::new(plugin.ctx.clone(), memory),
        );
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        Self::arm(&mut store, limits).map_err(|e| (e, false))?;
        plugin
            .ctx
            .metrics
            .count_plugin(PluginCounter::Instantiation, &plugin.ctx.name);
        match plugin.compiled.pre.instantiate(&mut store) {
            Ok(bindings) => {
                self.live = Some(Live {
                    store,
                    bindings,
                    version: plugin.version,
                });
                Ok(())
            }
            Err(e) => {
                store.data().flush_output();
                let hit = store.data_mut().limiter.take_hit();
                Err((e, hit))
            }
        }
    }

    /// The one way into the guest: the live instance of `plugin` (made if
    /// needed) with its limits armed (`fuel` for this call), `enter` run
    /// on it, and the guest's output flushed. A trap (or a failed
    /// instantiation) drops the instance and becomes the call's report,
    /// timed from `start`.
    fn invoke<T>(
        &mut self,
        plugin: &LoadedPlugin,
        fuel: u64,
        start: Instant,
        enter: impl FnOnce(&Plugin, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallReport> {
        let failed = |e: wasmtime::Error, hit: bool, what: &str| CallReport {
            outcome: classify(&e, hit),
            trap: trap_code(&e),
            message: Some(format!("{what}: {e:#}")),
            elapsed: start.elapsed(),
        };
        let live = match self.live_for(plugin) {
            Ok(l) => l,
            Err((e, hit)) => return Err(failed(e, hit, "instantiation failed")),
        };
        let limits = Limits {
            fuel,
            ..plugin.limits
        };
        if let Err(e) = Self::arm(&mut live.store, &limits) {
            return Err(failed(e, false, "cannot set limits"));
        }
        let result = enter(&live.bindings, &mut live.store);
        live.store.data().flush_output();
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                let hit = live.store.data_mut().limiter.take_hit();
                self.live = None;
                Err(failed(e, hit, "trapped"))
            }
        }
    }

    /// Run `handle-batch` on several events in one call: the fuel of one
    /// call per event, but the deadline of a single call, so a slow batch
    /// times out and the caller falls back to one call per event.
    pub fn call_batch(&mut self, plugin: &LoadedPlugin, events: &[Event]) -> BatchReport {
        let start = Instant::now();
        let args: Vec<wit::Event> = events.iter().map(|e| self.lower(e)).collect();
        let fuel = plugin
            .limits
            .fuel
            .saturating_mul(events.len().max(1) as u64);
        let result = self.invoke(plugin, fuel, start, |b, store| {
            b.call_handle_batch(store, &args)
        });
        match result {
            Ok(Ok(())) => BatchReport {
                handled: events.len(),
                failure: None,
                attributed: false,
                elapsed: start.elapsed(),
            },
            Ok(Err(e)) => batch_error(e, events.len(), start.elapsed()),
            Err(report) => BatchReport {
                handled: 0,
                failure: Some(report),
                attributed: false,
                elapsed: start.elapsed(),
            },
        }
    }

    /// Run the handler on one event under the plugin's limits (a new
    /// version replaces the live instance first).
    pub fn call(&mut self, plugin: &LoadedPlugin, event: &Event) -> CallReport {
        self.call_since(plugin, event, Instant::now())
    }

    /// [`call`](Self::call), its time taken from `start`: in a run of calls,
    /// the end of the previous one (`start + elapsed`), so each call reads
    /// the clock once.
    pub fn call_since(
        &mut self,
        plugin: &LoadedPlugin,
        event: &Event,
        start: Instant,
    ) -> CallReport {
        let arg = self.lower(event);
        let result = self.invoke(plugin, plugin.limits.fuel, start, |b, store| {
            b.call_handle(store, &arg)
        });
        let (outcome, message) = match result {
            Ok(Ok(())) => (Outcome::ok, None),
            Ok(Err(message)) => (Outcome::error, Some(message)),
            Err(report) => return report,
        };
        CallReport {
            outcome,
            message,
            trap: None,
            elapsed: start.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::runtime::RuntimeConfig;

    #[test]
    fn each_lowered_event_is_named_by_its_own_source() {
        let runtime = Runtime::new(&RuntimeConfig {
            max_instances: 1,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let mut sandbox = Sandbox::new(runtime);
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        // The same name in another allocation, and a longer one.
        let a_again: Arc<str> = Arc::from("a");
        let ab: Arc<str> = Arc::from("ab");
        let names: Vec<String> = [&a, &b, &b, &a, &a_again, &ab, &a]
            .into_iter()
            .map(|source| {
                sandbox
                    .lower(&Event::put(source, "k", Bytes::from_static(b"v"), 1))
                    .source
            })
            .collect();
        assert_eq!(names, ["a", "b", "b", "a", "a", "ab", "a"]);
    }

    fn batch_error_at(index: u32, len: usize) -> BatchReport {
        batch_error(
            wit::BatchError {
                index,
                message: "no".into(),
            },
            len,
            Duration::from_millis(1),
        )
    }

    #[test]
    fn a_batch_error_inside_the_batch_names_its_event() {
        for index in [0, 3, 4] {
            let report = batch_error_at(index, 5);
            assert_eq!(report.handled, index as usize);
            assert!(report.attributed);
            let failure = report.failure.unwrap();
            assert_eq!(failure.outcome, Outcome::error);
            assert_eq!(failure.message.as_deref(), Some("no"));
        }
    }

    #[test]
    fn a_batch_error_outside_the_batch_fails_all_of_it() {
        for index in [5, 6, u32::MAX] {
            let report = batch_error_at(index, 5);
            assert_eq!(report.handled, 0, "index {index}");
            assert!(!report.attributed, "index {index}");
            let failure = report.failure.unwrap();
            assert_eq!(failure.outcome, Outcome::error);
            let message = failure.message.unwrap();
            assert!(
                message.ends_with(": no") && message.contains(&index.to_string()),
                "{message}"
            );
        }
    }
}

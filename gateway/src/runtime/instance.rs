//! Running calls: one [`Sandbox`] per plugin worker.
//!
//! Owns the live instance of one plugin and the per-call limits: fuel, an
//! epoch deadline and the memory cap. A trap fails that one call and drops
//! the instance (a trapped component cannot be entered again); the next call
//! gets a fresh instance from the `InstancePre`. A call's error message is
//! the guest's text: it is cut to [`MAX_TEXT`](crate::text::MAX_TEXT) here,
//! as it leaves the guest, so no log line, report or dead letter downstream
//! holds more. A panic of the host's own code inside a call (an import, or
//! lowering and lifting) is contained here too: the call fails as a trap
//! and the instance is dropped, since its store may have been left half-way
//! through a change. This module must not decide which events to run or in
//! what order.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Store, Trap};

use super::limits::{Limits, classify, trap_code};
use super::{CompiledPlugin, EPOCH_TICK, Runtime};
use crate::event::{Event, EventKind};
use crate::host::bindings::Plugin;
use crate::host::bindings::watchgate::plugin::types as wit;
pub use crate::host::wait::CallClock;
use crate::host::{HostState, PluginContext};
use crate::telemetry::{Outcome, PanicSite, PluginCounter};

/// How one call went.
#[derive(Debug, Clone)]
pub struct CallReport {
    /// The outcome class (the metric label).
    pub outcome: Outcome,
    /// The handler's error, or the trap's description, cut to
    /// [`MAX_TEXT`](crate::text::MAX_TEXT) bytes.
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
    /// The guest's view of the events of the last call, kept for the next.
    args: Args,
}

/// Above this, a lowered key or value buffer is not kept for the next
/// call: one large value would otherwise stay allocated per batch slot.
const KEEP_BUFFER: usize = 64 << 10;
/// The most the kept buffers of the slots one call filled may hold
/// together, so that an idle plugin whose values are just under
/// [`KEEP_BUFFER`] does not keep a batch's worth of them (64 slots × 3
/// buffers) allocated. Slots a call did not fill keep what their own last
/// call left them, so the whole stays under about twice this.
const KEEP_TOTAL: usize = 256 << 10;

/// The arguments of a call in the guest's types, refilled in place for
/// each call: the strings and byte lists keep their buffers, so lowering
/// an event copies its bytes once more but allocates and frees nothing
/// (three allocations and three frees per event otherwise, about a tenth
/// of a no-op call's instructions).
#[derive(Default)]
struct Args {
    events: Vec<wit::Event>,
    /// The source whose name each slot holds. The producer changes the
    /// reference count of an event's source for every event it queues,
    /// and the count shares a cache line with the name: reading the name
    /// for every call would pull that line from the producer's core each
    /// time (and make the producer's next change pull it back). Comparing
    /// the pointers reads nothing shared.
    named: Vec<Option<Arc<str>>>,
}

/// `slot` made to hold `v` (keeping its buffer).
fn set_bytes(slot: &mut Option<Vec<u8>>, v: Option<&[u8]>) {
    match v {
        Some(v) => {
            let buf = slot.get_or_insert_with(Vec::new);
            buf.clear();
            buf.extend_from_slice(v);
        }
        None => *slot = None,
    }
}

impl Args {
    /// `events` in the guest's types.
    fn fill(&mut self, events: &[Event]) -> &[wit::Event] {
        while self.events.len() < events.len() {
            self.events.push(to_wit_from(
                &Event::delete(&Arc::from(""), "", 0),
                String::new(),
            ));
            self.named.push(None);
        }
        for ((slot, named), e) in self.events.iter_mut().zip(&mut self.named).zip(events) {
            if !named.as_ref().is_some_and(|n| Arc::ptr_eq(n, &e.source)) {
                slot.source.clear();
                slot.source.push_str(&e.source);
                *named = Some(e.source.clone());
            }
            slot.kind = match e.kind {
                EventKind::Put => wit::EventKind::Put,
                EventKind::Delete => wit::EventKind::Delete,
            };
            slot.key.clear();
            slot.key.push_str(&e.key);
            set_bytes(&mut slot.value, e.value.as_deref());
            set_bytes(&mut slot.prev_value, e.prev_value.as_deref());
            slot.revision = e.revision;
            slot.resync = e.resync;
            slot.coalesced = e.coalesced;
            slot.metadata.clear();
            slot.metadata.extend_from_slice(&e.metadata);
        }
        &self.events[..events.len()]
    }

    /// Let go of the large buffers the last call, of `used` events,
    /// needed (only its slots: the others were trimmed after theirs, and
    /// walking all of them would cost a one-event call as much as a batch).
    fn trim(&mut self, used: usize) {
        let mut kept = 0usize;
        let mut keep = |capacity: usize| {
            kept += capacity;
            capacity <= KEEP_BUFFER && kept <= KEEP_TOTAL
        };
        for slot in self.events.iter_mut().take(used) {
            if !keep(slot.key.capacity()) {
                slot.key = String::new();
            }
            for v in [&mut slot.value, &mut slot.prev_value] {
                if !keep(v.as_ref().map_or(0, Vec::capacity)) {
                    *v = None;
                }
            }
            if slot.metadata.capacity() > 64 {
                slot.metadata = Vec::new();
            }
        }
    }
}

/// Epochs to allow for a deadline of `timeout_ms`, rounded up, plus one for
/// the partial tick in progress.
fn deadline_ticks(timeout_ms: u64) -> u64 {
    let tick = EPOCH_TICK.as_millis().max(1) as u64;
    timeout_ms.div_ceil(tick) + 1
}

/// The message a panic was raised with (`panic!` gives a `&str` or a
/// `String`; anything else has none to show).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    // A panic message may quote whatever input led to it, the guest's
    // included, so it is bounded like any text from the guest.
    let text = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    crate::text::clip(text).into_owned()
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
        metadata: e.metadata.to_vec(),
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

/// `message` cut to the host's bound; a cut is counted for `plugin`.
fn clipped(plugin: &LoadedPlugin, message: String) -> String {
    let (message, truncated) = crate::text::clip_owned(message);
    if truncated {
        plugin
            .ctx
            .metrics
            .count_plugin(PluginCounter::TextTruncated, &plugin.ctx.name);
    }
    message
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
            args: Args::default(),
        }
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

    /// Arm `limits` for a call that started at `start`.
    fn arm(
        store: &mut Store<HostState>,
        limits: &Limits,
        start: CallClock,
    ) -> wasmtime::Result<()> {
        store.set_fuel(limits.fuel)?;
        store.set_epoch_deadline(deadline_ticks(limits.timeout_ms));
        store.data_mut().arm_deadline(start, limits.timeout_ms);
        Ok(())
    }

    /// The live instance of this version of `plugin`, made if needed, and
    /// whether it was made now.
    fn live_for(
        &mut self,
        plugin: &LoadedPlugin,
    ) -> Result<(&mut Live, bool), (wasmtime::Error, bool)> {
        let made = self
            .live
            .as_ref()
            .is_none_or(|l| l.version != plugin.version);
        if made {
            self.instantiate(plugin)?;
        }
        Ok((self.live.as_mut().expect("instantiate succeeded"), made))
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
        Self::arm(&mut store, limits, CallClock::now()).map_err(|e| (e, false))?;
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
    /// timed from `start`; so does a panic of the host's own code anywhere
    /// in it, which is also logged and counted as a host panic. Whatever
    /// the guest sends, the worker calling this goes on.
    fn invoke<T>(
        &mut self,
        plugin: &LoadedPlugin,
        fuel: u64,
        start: CallClock,
        enter: impl FnOnce(&Plugin, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallReport> {
        // wasmtime unwinds a panic in an import out through the guest's
        // frames and resumes it here, in the host.
        let run = AssertUnwindSafe(|| self.enter(plugin, fuel, start, enter));
        std::panic::catch_unwind(run).unwrap_or_else(|payload| {
            // The store (and the host state in it) may be inconsistent:
            // never enter it again.
            self.live = None;
            let panic = panic_message(&*payload);
            plugin
                .ctx
                .metrics
                .host_panic(&plugin.ctx.name, PanicSite::Call, &panic);
            Err(CallReport {
                outcome: Outcome::trap,
                trap: None,
                message: Some(format!(
                    "the gateway panicked during this call (a gateway bug; the call counts as a \
                     trap and the instance was replaced): {panic}"
                )),
                elapsed: start.elapsed(),
            })
        })
    }

    /// [`invoke`](Self::invoke) but for a panic.
    fn enter<T>(
        &mut self,
        plugin: &LoadedPlugin,
        fuel: u64,
        start: CallClock,
        enter: impl FnOnce(&Plugin, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallReport> {
        // A trap's description carries the guest's backtrace, whose frame
        // names the guest chose.
        let failed = |e: wasmtime::Error, hit: bool, what: &str| CallReport {
            outcome: classify(&e, hit),
            trap: trap_code(&e),
            message: Some(clipped(plugin, format!("{what}: {e:#}"))),
            elapsed: start.elapsed(),
        };
        let (live, made) = match self.live_for(plugin) {
            Ok(l) => l,
            Err((e, hit)) => return Err(failed(e, hit, "instantiation failed")),
        };
        let limits = Limits {
            fuel,
            ..plugin.limits
        };
        // The call's limits start when its guest code does, as the epoch
        // deadline's do: the time a new instance took to make (milliseconds
        // for an interpreter's) is not taken from its waits.
        let armed_at = if made { CallClock::now() } else { start };
        if let Err(e) = Self::arm(&mut live.store, &limits, armed_at) {
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
        let start = CallClock::now();
        let mut args = std::mem::take(&mut self.args);
        let lowered = args.fill(events);
        let fuel = plugin
            .limits
            .fuel
            .saturating_mul(events.len().max(1) as u64);
        let result = self.invoke(plugin, fuel, start, |b, store| {
            b.call_handle_batch(store, lowered)
        });
        args.trim(events.len());
        self.args = args;
        match result {
            Ok(Ok(())) => BatchReport {
                handled: events.len(),
                failure: None,
                attributed: false,
                elapsed: start.elapsed(),
            },
            Ok(Err(e)) => batch_error(
                wit::BatchError {
                    message: clipped(plugin, e.message),
                    ..e
                },
                events.len(),
                start.elapsed(),
            ),
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
        self.call_since(plugin, event, CallClock::now())
    }

    /// [`call`](Self::call), its time taken from `start`: in a run of calls,
    /// the end of the previous one (`start + elapsed`), so each call reads
    /// the clock once.
    pub fn call_since(
        &mut self,
        plugin: &LoadedPlugin,
        event: &Event,
        start: CallClock,
    ) -> CallReport {
        let mut args = std::mem::take(&mut self.args);
        let lowered = args.fill(std::slice::from_ref(event));
        let result = self.invoke(plugin, plugin.limits.fuel, start, |b, store| {
            b.call_handle(store, &lowered[0])
        });
        args.trim(1);
        self.args = args;
        let (outcome, message) = match result {
            Ok(Ok(())) => (Outcome::ok, None),
            Ok(Err(message)) => (Outcome::error, Some(clipped(plugin, message))),
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

    #[test]
    fn each_lowered_event_is_named_by_its_own_source() {
        let mut args = Args::default();
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        // The same name in another allocation, and a longer one.
        let a_again: Arc<str> = Arc::from("a");
        let ab: Arc<str> = Arc::from("ab");
        let names: Vec<String> = [&a, &b, &b, &a, &a_again, &ab, &a]
            .into_iter()
            .map(|source| {
                args.fill(&[Event::put(source, "k", Bytes::from_static(b"v"), 1)])[0]
                    .source
                    .clone()
            })
            .collect();
        assert_eq!(names, ["a", "b", "b", "a", "a", "ab", "a"]);
    }

    #[test]
    fn the_kept_buffers_stay_within_their_total_after_a_batch_of_large_values() {
        let src: Arc<str> = Arc::from("s");
        let mut args = Args::default();
        let batch: Vec<Event> = (0..64)
            .map(|i| Event::put(&src, format!("k{i}"), Bytes::from(vec![1u8; 32 << 10]), i))
            .collect();
        args.fill(&batch);
        args.trim(batch.len());
        let kept: usize = args
            .events
            .iter()
            .map(|e| {
                e.key.capacity()
                    + e.value.as_ref().map_or(0, Vec::capacity)
                    + e.prev_value.as_ref().map_or(0, Vec::capacity)
            })
            .sum();
        assert!(kept <= KEEP_TOTAL, "{kept} bytes kept");
        // The first slots keep theirs: a batch of small events costs nothing.
        assert!(args.events[0].value.is_some());
        // And a refill after the trim is whole again.
        assert_eq!(
            args.fill(&batch)[63].value.as_deref(),
            Some(&[1u8; 32 << 10][..])
        );
    }

    #[test]
    fn a_refilled_slot_holds_only_its_new_event() {
        let src: Arc<str> = Arc::from("s");
        let mut args = Args::default();
        let mut first = Event::put(&src, "a-long-key", Bytes::from(vec![7u8; 300]), 1);
        first.prev_value = Some(Bytes::from_static(b"old"));
        first.metadata = thin_vec::thin_vec![("m".into(), "1".into())];
        first.coalesced = 2;
        first.resync = true;
        let big = Event::put(&src, "k", Bytes::from(vec![1u8; KEEP_BUFFER + 1]), 2);
        assert_eq!(args.fill(&[first.clone(), big]).len(), 2);
        args.trim(2);
        let later = [
            Event::delete(&src, "b", 3),
            Event::put(&src, "c", Bytes::new(), 4),
        ];
        let lowered = args.fill(&later);
        assert_eq!(lowered.len(), 2);
        for (l, e) in lowered.iter().zip(&later) {
            let fresh = to_wit(e);
            assert_eq!(
                (&l.source, &l.key, &l.value, &l.prev_value, l.revision),
                (
                    &fresh.source,
                    &fresh.key,
                    &fresh.value,
                    &fresh.prev_value,
                    fresh.revision
                )
            );
            assert_eq!(
                (l.resync, l.coalesced, &l.metadata),
                (false, 0, &fresh.metadata)
            );
            assert!(matches!(
                (l.kind, fresh.kind),
                (wit::EventKind::Put, wit::EventKind::Put)
                    | (wit::EventKind::Delete, wit::EventKind::Delete)
            ));
        }
        // The first event again: as it was lowered the first time.
        let again = &args.fill(std::slice::from_ref(&first))[0];
        let fresh = to_wit(&first);
        assert_eq!(
            (&again.key, &again.value, &again.prev_value, &again.metadata),
            (&fresh.key, &fresh.value, &fresh.prev_value, &fresh.metadata)
        );
        assert_eq!((again.resync, again.coalesced), (true, 2));
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

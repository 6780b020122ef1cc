//! A running plugin: its queue, its state, and the round loop that feeds
//! its sandbox.
//!
//! Each plugin has a worker thread of its own. A round takes events from
//! the queue in order and calls the plugin: a healthy plugin gets a backlog
//! in one `handle-batch` call (or one call per event while they succeed);
//! the first failure hands the failed event to [`failure`](super::failure)
//! for its retries. The same round runs on the shared [`pool`](super::pool)
//! once a plugin has proved quick, when there are more plugins than cores:
//! where a round runs is the worker's [`WorkerState`], not another loop. A
//! pooled round never waits (for a retry pause, a commit, a probe, a park);
//! it hands the plugin back to its own thread instead. A panic of the
//! gateway's own code is contained at two depths: inside a call the
//! sandbox turns it into a trap, and the round goes on; elsewhere in a
//! round it fails the worker, which `/v1/plugins` then shows, rather than
//! leave a dead thread behind a plugin that looks `running`. This module
//! must not route events or decide ownership.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use dashmap::DashMap;
use parking_lot::Mutex;

use super::Dispatcher;
use super::failure::{DropLog, FailureLog, Handled, Quarantine, is_trap};
use super::ownership::Replay;
use super::pool;
use super::queue::{EventQueue, PushStats};
use super::report::WorkerStats;
use super::route::PluginSpec;
pub(super) use super::state::WorkerState;
use super::thread::OwnThread;
use crate::event::Event;
use crate::runtime::instance::{BatchReport, CallClock, CallReport, Sandbox, panic_message};
use crate::store::{CursorProbe, Store};
use crate::telemetry::{Metrics, OUTCOMES, Outcome, PluginHandles};

/// Successful calls in a row before a plugin gets batches again.
pub(super) const HEALTHY_TO_BATCH: u32 = 16;

/// Most events a healthy plugin's worker takes from its queue at once when
/// each call gets one event (`batch_max = 1`); otherwise it takes one
/// call's worth.
const TAKE_AT_ONCE: usize = 64;

/// The longest its calls may take on average for a plugin to be pooled: a
/// pool thread is shared, so what it runs must be quick.
const QUICK_CALL: Duration = Duration::from_micros(250);

/// A pooled plugin whose calls in a round average more than this goes back
/// to its own thread.
const SLOW_CALL: Duration = Duration::from_millis(1);

/// Most events in one round on a pool thread, so a round stays short.
const POOLED_TAKE: usize = 32;

/// Quick, successful events in a row on its own thread before a plugin is
/// pooled (counted once it is healthy enough for batches); doubled each
/// time it leaves the pool, up to [`TO_POOL_MOST`], so a plugin that is
/// quick only now and then stops going back and forth. Kept low: until it
/// is pooled, every event costs a plugin a thread wake-up, and with a
/// hundred plugins starting at once those wake-ups are the worst latencies
/// of the fan-out benchmark.
const TO_POOL_FIRST: u64 = HEALTHY_TO_BATCH as u64;
const TO_POOL_MOST: u64 = TO_POOL_FIRST << 12;

/// How long a round on the worker's own thread waits for an event.
const IDLE_WAIT: Duration = Duration::from_millis(200);

/// Receives (plugin, time from delivery to the start of its call).
pub type Observer = Box<dyn Fn(&str, Duration) + Send + Sync>;

/// Per source without history: the highest position committed.
pub(super) type Watermarks = Arc<DashMap<String, Arc<AtomicU64>>>;

/// Which thread runs a round.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Own,
    Pool,
}

/// How a round ended, for the thread that ran it.
#[derive(PartialEq, Eq)]
enum RoundEnd {
    /// Go on where it runs.
    Stay,
    /// A pooled round: the plugin goes back to its own thread.
    ToOwn,
}

/// The call state of one worker, used by whichever thread runs its rounds:
/// its own, or a pool thread while it is pooled.
pub(super) struct Runner {
    pub(super) sandbox: Sandbox,
    pub(super) failures: FailureLog,
    /// Consecutive successful calls; batches only for a healthy plugin, so
    /// a failing or slow one is called (and limited) event by event.
    healthy: u32,
    /// Traps in a row, towards quarantine.
    pub(super) traps: u32,
    /// Successful events in a row on the worker's own thread, in rounds
    /// that waited for nothing, and the time their rounds took.
    quick: u64,
    quick_time: Duration,
    /// How many of those pool the plugin.
    to_pool: u64,
    /// A failed first attempt on the event now at the front of the queue,
    /// made in an earlier round: the next round goes on with its retries.
    carried: Option<(Event, CallReport)>,
}

/// Which event: source, position, key.
fn same_event(a: &Event, b: &Event) -> bool {
    a.seq == b.seq && a.source == b.source && a.key == b.key
}

/// A running plugin: its queue, settings and worker thread.
pub(super) struct Worker {
    pub(super) name: String,
    pub(super) spec: ArcSwap<PluginSpec>,
    pub(super) queue: Arc<EventQueue>,
    /// A [`WorkerState`].
    pub(super) state: AtomicU8,
    pub(super) thread: Mutex<Option<OwnThread>>,
    pub(super) stats: WorkerStats,
    pub(super) metrics: Arc<Metrics>,
    pub(super) store: Arc<Store>,
    /// The ownership's fencing token, passed to the plugin in each event's
    /// metadata as `fencing_token` (0: none).
    pub(super) fencing: AtomicU64,
    /// Held for the duration of a round's calls, so parking can wait for
    /// the call in flight.
    pub(super) calling: Mutex<()>,
    /// Sources it waits to replay from its handed-over cursor.
    pub(super) replay: Replay,
    /// Events taken from the queue for the round in progress.
    pub(super) in_batch: AtomicUsize,
    /// Told the queueing latency of each event when its call starts
    /// (benchmarks).
    observer: Arc<ArcSwapOption<Observer>>,
    pub(super) handles: PluginHandles,
    durable: Watermarks,
    /// Set while the plugin is quarantined (and kept while it is parked).
    pub(super) quarantine: Mutex<Option<Quarantine>>,
    /// The call state, held by the thread running a round.
    runner: Mutex<Runner>,
    /// Rate limits the lines about dead letters dropped by the caps.
    pub(super) drop_log: DropLog,
    /// On the pool's run queue or in a round there.
    scheduled: AtomicBool,
    pub(super) pool: Arc<pool::Pool<Worker>>,
}

impl Worker {
    /// Start the worker thread of `spec`, parked or taking events.
    pub(super) fn start(
        d: &Dispatcher,
        spec: PluginSpec,
        queue: Arc<EventQueue>,
        parked: bool,
    ) -> std::io::Result<Arc<Worker>> {
        let name = spec.loaded.ctx.name.clone();
        let runner = Runner {
            sandbox: Sandbox::new(d.runtime.clone()),
            failures: FailureLog::default(),
            healthy: HEALTHY_TO_BATCH,
            traps: 0,
            quick: 0,
            quick_time: Duration::ZERO,
            to_pool: TO_POOL_FIRST,
            carried: None,
        };
        let stats = WorkerStats::default();
        let state = if parked {
            WorkerState::Parked
        } else {
            WorkerState::Own
        };
        let worker = Arc::new(Worker {
            name: name.clone(),
            queue,
            spec: ArcSwap::from_pointee(spec),
            state: AtomicU8::new(state as u8),
            thread: Mutex::new(None),
            stats,
            handles: PluginHandles::new(&d.metrics, &name),
            metrics: d.metrics.clone(),
            store: d.store.clone(),
            fencing: AtomicU64::new(0),
            calling: Mutex::new(()),
            replay: Replay::default(),
            in_batch: AtomicUsize::new(0),
            observer: d.observer.clone(),
            durable: d.durable.clone(),
            quarantine: Mutex::new(None),
            runner: Mutex::new(runner),
            drop_log: DropLog::default(),
            scheduled: AtomicBool::new(false),
            pool: d.pool.clone(),
        });
        let w = worker.clone();
        let thread = OwnThread::spawn(format!("plugin-{name}"), move || w.run())?;
        *worker.thread.lock() = Some(thread);
        worker.pool.count(true);
        let weak = Arc::downgrade(&worker);
        worker.queue.on_push(Box::new(move || {
            if let Some(w) = weak.upgrade() {
                w.kick();
            }
        }));
        worker
            .store
            .register(&name, worker.queue.clone() as Arc<dyn CursorProbe>);
        Ok(worker)
    }

    /// Whether this plugin takes events of `source` here (its position
    /// there holds back the source's resume point and pruning).
    pub(super) fn takes_from(&self, source: &str) -> bool {
        self.state() != WorkerState::Parked && self.spec.load().subscribes_to(source)
    }

    /// Whether a delivery of `source` passes this plugin by: parked,
    /// failed (nothing would take it; its cursor stays, so it is given
    /// what it missed when it is loaded again), not subscribed, or waiting
    /// for the source to replay.
    pub(super) fn skips(&self, source: &str, spec: &PluginSpec) -> bool {
        matches!(self.state(), WorkerState::Parked | WorkerState::Failed)
            || !spec.subscribes_to(source)
            || self.replay.waiting_for(source)
    }

    /// Its cursor in `source`.
    pub(super) fn cursor(&self, source: &str) -> Option<u64> {
        self.queue
            .cursor_positions()
            .into_iter()
            .find(|(s, _)| &**s == source)
            .map(|(_, c)| c)
    }

    /// The worker thread: rounds of the queue unless the plugin is pooled
    /// (a pool thread runs its rounds then, and this one sleeps). A round
    /// that panics (a gateway bug: a call's own panics end as traps in the
    /// sandbox) fails the worker, and the thread ends.
    fn run(self: Arc<Self>) {
        loop {
            match self.state() {
                WorkerState::Stopped | WorkerState::Failed => break,
                WorkerState::Pooled if !self.pool.is_closed() => {
                    std::thread::park_timeout(IDLE_WAIT);
                    self.queue.idle();
                    continue;
                }
                WorkerState::Pooled => {
                    // The pool is gone (shutdown): take the plugin back.
                    self.shift(WorkerState::Pooled, WorkerState::Own);
                    continue;
                }
                WorkerState::Own | WorkerState::Quarantined | WorkerState::Parked => {}
            }
            let mut r = self.runner.lock();
            let round = AssertUnwindSafe(|| self.round(&mut r, Place::Own));
            if let Err(payload) = std::panic::catch_unwind(round) {
                r.sandbox.recycle();
                drop(r);
                self.fail(&panic_message(&*payload));
                break;
            }
            let quick = r.quick >= r.to_pool
                && r.quick_time < QUICK_CALL * u32::try_from(r.quick).unwrap_or(u32::MAX)
                && self.pool.worthwhile();
            if quick && self.shift(WorkerState::Own, WorkerState::Pooled) {
                r.quick = 0;
                r.quick_time = Duration::ZERO;
                drop(r);
                self.kick();
            }
        }
        // A failed worker keeps what is queued (for when it is loaded
        // again); a stopped one has let it go.
        let left = if self.state() == WorkerState::Failed {
            self.depth()
        } else {
            0
        };
        self.handles.depth.set(left as i64);
    }

    /// One round, in queue order, on `place`. An event is complete once
    /// handled or dead-lettered, and the cursor moves past it; an event
    /// interrupted by a stop or a park stays pending.
    fn round(&self, r: &mut Runner, place: Place) -> RoundEnd {
        let state = self.state();
        if place == Place::Pool
            && (state != WorkerState::Pooled || r.healthy < HEALTHY_TO_BATCH || r.carried.is_some())
        {
            return RoundEnd::ToOwn;
        }
        let probing = state == WorkerState::Quarantined;
        if probing && let Some(at) = self.next_probe() {
            // Read each round: a new version is probed at once.
            let left = at.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                std::thread::sleep(left.min(Duration::from_millis(50)));
                return RoundEnd::Stay;
            }
        }
        let per_call = self.spec.load().batch_max;
        // A healthy plugin takes a backlog in one go, however many events
        // each call gets: one lock and one completion for the lot. A
        // failing one takes one event at a time, so what waits stays in the
        // queue, where later changes can fold into it.
        let max = if probing || r.healthy < HEALTHY_TO_BATCH {
            1
        } else if per_call > 1 {
            per_call
        } else {
            TAKE_AT_ONCE
        };
        let batch = match place {
            Place::Own => self.queue.pop_many(max, IDLE_WAIT),
            Place::Pool => self.queue.take_many(max.min(POOLED_TAKE)),
        };
        self.in_batch.store(batch.len(), Ordering::SeqCst);
        self.handles.depth.set(self.depth() as i64);
        if batch.is_empty() {
            return RoundEnd::Stay;
        }
        let calling = self.calling.lock();
        let to_own = |w: &Worker| {
            w.in_batch.store(0, Ordering::SeqCst);
            match place {
                Place::Own => RoundEnd::Stay,
                Place::Pool => RoundEnd::ToOwn,
            }
        };
        if self.interrupted() {
            // Parked or stopped meanwhile: the events stay pending (for
            // the owner, or a restart).
            return to_own(self);
        }
        let mut batch = self.fenced(batch);
        let waited = !self.committed(&batch);
        if waited {
            if place == Place::Pool {
                self.queue.requeue_front(batch);
                return to_own(self);
            }
            if !self.wait_durable(&batch) {
                return to_own(self);
            }
        }
        // Loaded once the events are here and may be called (the take and
        // the commit may have waited): a version installed meanwhile
        // handles them.
        let spec = self.spec.load_full();
        self.observe(&batch);
        let started = Instant::now();
        let mut prior = match r.carried.take() {
            Some((e, report)) if same_event(&e, &batch[0]) => Some(report),
            Some((e, report)) => {
                // Its event changed meanwhile (folded with a newer
                // change): the attempt still counts.
                self.record(&e, &report);
                None
            }
            None => None,
        };
        if probing {
            let event = &batch[0];
            let report = r.sandbox.call(&spec.loaded, event);
            if is_trap(report.outcome) {
                self.record(event, &report);
                self.probe_failed(event, &report, &spec);
                self.in_batch.store(0, Ordering::SeqCst);
                return RoundEnd::Stay;
            }
            self.leave_quarantine();
            r.traps = 0;
            r.healthy = 0;
            prior = Some(report);
        }
        let mut quick = 0;
        if prior.is_none() && r.healthy >= HEALTHY_TO_BATCH {
            let (handled, failure) = self.first_attempts(r, &spec, &batch);
            quick = handled;
            let rest = batch.split_off(handled);
            self.queue
                .complete_and_retire(std::mem::replace(&mut batch, rest));
            r.healthy = r
                .healthy
                .saturating_add(u32::try_from(handled).unwrap_or(u32::MAX));
            if let Some(failure) = failure {
                // One call per event until the plugin is healthy again;
                // the failed event's retries come next, on its own thread.
                r.healthy = 0;
                r.carried = failure.map(|f| (batch[0].clone(), f));
                self.queue.requeue_front(std::mem::take(&mut batch));
            }
        }
        // What is left here runs with retries: on its own thread only (a
        // pooled round always takes the path above, and what it leaves is
        // either back in the queue or interrupted).
        let mut done = 0;
        for (i, event) in batch.iter().enumerate() {
            if self.interrupted() {
                break;
            }
            match self.handle_one(r, event, prior.take()) {
                Handled::Done(first_ok) => {
                    done = i + 1;
                    r.healthy = if first_ok {
                        r.healthy.saturating_add(1)
                    } else {
                        0
                    };
                }
                Handled::Interrupted => break,
                Handled::Quarantined => {
                    // This event and the rest wait for the probes.
                    self.queue.requeue_front(batch[i..].to_vec());
                    r.healthy = 0;
                    break;
                }
            }
        }
        // The rest stays pending (stopped or parked) or went back to the
        // queue (quarantined).
        batch.truncate(done);
        self.queue.complete_and_retire(batch);
        self.in_batch.store(0, Ordering::SeqCst);
        self.handles.depth.set(self.depth() as i64);
        drop(calling);
        let elapsed = started.elapsed();
        let handled = (quick + done) as u64;
        match place {
            Place::Pool if r.healthy < HEALTHY_TO_BATCH => RoundEnd::ToOwn,
            Place::Pool => {
                if elapsed < SLOW_CALL * u32::try_from(handled.max(1)).unwrap_or(u32::MAX) {
                    RoundEnd::Stay
                } else {
                    RoundEnd::ToOwn
                }
            }
            Place::Own => {
                // Towards the pool: quick, successful rounds that waited
                // for nothing.
                if !waited && !probing && r.healthy >= HEALTHY_TO_BATCH {
                    r.quick = r.quick.saturating_add(handled);
                    r.quick_time += elapsed;
                } else {
                    r.quick = 0;
                    r.quick_time = Duration::ZERO;
                }
                RoundEnd::Stay
            }
        }
    }

    /// The first attempt at each event of a healthy plugin's round: one
    /// `handle-batch` call, or one call per event while they succeed. The
    /// events handled (from the front), and, when one failed, the failure
    /// (`Some(report)` when it belongs to the first unhandled event: its
    /// first attempt; `Some(None)` for a failure of the whole batch).
    fn first_attempts(
        &self,
        r: &mut Runner,
        spec: &PluginSpec,
        batch: &[Event],
    ) -> (usize, Option<Option<CallReport>>) {
        if batch.len() > 1 && spec.batch_max > 1 {
            let BatchReport {
                handled,
                failure,
                attributed,
                ..
            } = self.call_batch(r, spec, batch);
            if let Some(f) = &failure
                && !attributed
                && f.outcome == Outcome::error
            {
                // An error that names no event of the batch: the calls one
                // by one may well succeed, so nothing else would count it.
                // It is set against the batch's first event.
                self.record(&batch[0], f);
            }
            // Which event failed a batch as a whole is unknown: what is
            // left is called one by one, and a trapping one traps again
            // there.
            (handled, failure.map(|f| attributed.then_some(f)))
        } else {
            let (handled, failure) = self.call_each(r, spec, batch);
            (handled, failure.map(Some))
        }
    }

    /// One `handle-batch` call; the events it handled are recorded, each
    /// with an equal share of its time (the caller completes them).
    fn call_batch(&self, r: &mut Runner, spec: &PluginSpec, batch: &[Event]) -> BatchReport {
        let report = r.sandbox.call_batch(&spec.loaded, batch);
        let each = report.elapsed.as_secs_f64() / batch.len() as f64;
        for _ in 0..report.handled {
            self.handles.seconds.observe(each);
        }
        self.succeeded(&batch[..report.handled]);
        self.count_ok(report.handled);
        report
    }

    /// One call per event while they succeed (and the plugin is neither
    /// stopped nor parked): the number that did, and the report of the call
    /// that did not (not recorded: it is the first attempt of that event's
    /// retries).
    fn call_each(
        &self,
        r: &mut Runner,
        spec: &PluginSpec,
        batch: &[Event],
    ) -> (usize, Option<CallReport>) {
        // Each call is timed from the end of the one before (so with this
        // loop's own bookkeeping): one clock read per call.
        let mut start = CallClock::now();
        let mut failure = None;
        let mut done = 0;
        for e in batch {
            if self.interrupted() {
                // The rest stays pending.
                break;
            }
            let report = r.sandbox.call_since(&spec.loaded, e, start);
            start += report.elapsed;
            if report.outcome != Outcome::ok {
                failure = Some(report);
                break;
            }
            self.handles.seconds.observe(report.elapsed.as_secs_f64());
            done += 1;
        }
        self.succeeded(&batch[..done]);
        self.count_ok(done);
        (done, failure)
    }

    /// Count `n` successful calls (their times are observed one by one) in
    /// one step each for the metric and the stats, rather than per call.
    fn count_ok(&self, n: usize) {
        const { assert!(matches!(OUTCOMES[0], Outcome::ok)) };
        if n > 0 {
            self.handles.calls[0].inc_by(n as u64);
            self.stats.calls[0].fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Put the plugin on the pool's run queue if it is pooled, has events
    /// waiting, and is not there already.
    fn kick(self: &Arc<Self>) {
        if self.state() == WorkerState::Pooled
            && !self.queue.is_empty()
            && !self.scheduled.swap(true, Ordering::SeqCst)
        {
            self.pool.submit(self.clone());
        }
    }

    /// Wake the worker's own thread (it has the plugin back, or stops).
    pub(super) fn unpark(&self) {
        if let Some(t) = self.thread.lock().as_ref() {
            t.unpark();
        }
    }

    /// Tell the observer (benchmarks) each event's queueing latency.
    fn observe(&self, batch: &[Event]) {
        if let Some(observe) = self.observer.load().as_ref() {
            let now = crate::event::Stamp::now();
            for e in batch {
                if let Some(at) = e.delivered_at {
                    observe(&self.name, at.until(now));
                }
            }
        }
    }

    /// Whether the index changes of `batch` are committed already (sources
    /// without history; see the index's `committed`).
    fn committed(&self, batch: &[Event]) -> bool {
        // No source without history: nothing to look up (the hot path of
        // an etcd-only gateway).
        self.durable.is_empty()
            || batch.iter().filter(|e| e.seq > 0).all(|e| {
                self.durable
                    .get(&*e.source)
                    .is_none_or(|m| m.value().load(Ordering::SeqCst) >= e.seq)
            })
    }

    /// Wait until the index changes of `batch` are committed. False when
    /// stopped or parked meanwhile (the events stay pending).
    fn wait_durable(&self, batch: &[Event]) -> bool {
        while !self.committed(batch) {
            if self.interrupted() {
                return false;
            }
            std::thread::sleep(Duration::from_micros(250));
        }
        true
    }

    /// Events waiting: queued, plus taken into the round in progress.
    pub(super) fn depth(&self) -> usize {
        self.queue.len() + self.in_batch.load(Ordering::SeqCst)
    }

    /// Queue the matching events of one delivery of `source` up to `upto`.
    pub(super) fn enqueue(&self, source: &Arc<str>, upto: u64, events: Vec<Event>) {
        let stats = self.queue.push_batch(source, upto, events);
        self.count(stats);
    }

    /// Count what a push did to the queue.
    pub(super) fn count(&self, stats: PushStats) {
        if stats.queued + stats.coalesced == 0 {
            return;
        }
        let depth = stats.len + self.in_batch.load(Ordering::Relaxed);
        if stats.coalesced > 0 {
            self.handles.coalesced.inc_by(stats.coalesced as u64);
        }
        if stats.overflow > 0 {
            self.handles.overflow.inc_by(stats.overflow as u64);
        }
        self.handles.depth.set(depth as i64);
    }
}

impl pool::Task for Worker {
    fn run_round(self: Arc<Self>) {
        // Held only by the worker's own thread when not here: a plugin
        // taken back from the pool (a stale submission), or one just
        // pooled, whose own thread schedules it again as it lets go.
        if let Some(mut r) = self.runner.try_lock()
            && self.state() == WorkerState::Pooled
            && self.round(&mut r, Place::Pool) == RoundEnd::ToOwn
        {
            self.shift(WorkerState::Pooled, WorkerState::Own);
            r.quick = 0;
            r.quick_time = Duration::ZERO;
            r.to_pool = (r.to_pool * 2).min(TO_POOL_MOST);
        }
        // Read-modify-write, so a producer's `kick` that found it still
        // scheduled is seen below (its events, queued before).
        self.scheduled.swap(false, Ordering::SeqCst);
        if self.state() == WorkerState::Pooled {
            self.kick();
        } else {
            self.unpark();
        }
    }

    fn abandon(&self) {
        self.shift(WorkerState::Pooled, WorkerState::Own);
        self.scheduled.store(false, Ordering::SeqCst);
        self.unpark();
    }
}

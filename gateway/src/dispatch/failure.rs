//! What a failed call leads to: retries, dead letters, quarantine.
//!
//! A failed call is retried with a jittered [`Backoff`] up to the plugin's
//! retry attempts; an event that failed on every attempt becomes a dead
//! letter, so it completes and cannot hold the queue back. A plugin that
//! traps on `quarantine_after` calls in a row is quarantined: its events
//! stay queued and one at a time is tried as a probe, with a growing wait
//! between probes; a probe that does not trap ends the quarantine. A
//! plugin's dead letters are kept within its caps (count and bytes): the
//! oldest are dropped to make room, counted and logged. This is the one
//! place that retries, dead-letters or quarantines. It runs only
//! on the worker's own thread (a pooled round hands a failed plugin back
//! first), but for trimming the dead letters to the caps of a version being
//! installed, and must not route events.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;

use super::Dispatcher;
use super::policy::RetryPolicy;
use super::report::{LastFailure, QuarantineReport, unix_seconds};
use super::route::PluginSpec;
use super::worker::{Runner, Worker, WorkerState};
use crate::backoff::Backoff;
use crate::event::Event;
use crate::runtime::instance::CallReport;
use crate::store::{AddedLetter, DeadLetter, DeadLetterCap, LetterPage, LetterTally};
use crate::telemetry::PanicSite;
use crate::telemetry::{OUTCOMES, Outcome, PluginCounter};

/// A plugin set aside after `quarantine_after` traps in a row. An event
/// that traps on as many probes as the plugin's retry attempts becomes a
/// dead letter, so one poisonous event cannot hold the rest back forever.
#[derive(Debug)]
pub(super) struct Quarantine {
    since: SystemTime,
    probes: u32,
    next_probe: Instant,
    backoff: Backoff,
    /// The event probed last, and how often it trapped.
    head: Option<(std::sync::Arc<str>, u64, String)>,
    head_attempts: u32,
}

/// Failure lines of one worker, rate limited: at most one a second; the
/// rest are counted in the outcome metric and summarized in the next line.
pub(super) struct FailureLog {
    limiter: DefaultDirectRateLimiter,
    unlogged: u64,
}

impl Default for FailureLog {
    fn default() -> Self {
        FailureLog {
            limiter: RateLimiter::direct(Quota::per_second(std::num::NonZeroU32::MIN)),
            unlogged: 0,
        }
    }
}

/// Outcomes that mean the plugin itself broke (as opposed to a handler
/// returning an error): these count towards quarantine.
pub(super) fn is_trap(outcome: Outcome) -> bool {
    matches!(
        outcome,
        Outcome::trap | Outcome::timeout | Outcome::out_of_fuel | Outcome::memory
    )
}

/// How [`Worker::handle_one`] ended.
pub(super) enum Handled {
    /// Complete (handled or dead-lettered); whether the first attempt
    /// succeeded.
    Done(bool),
    /// A stop or park interrupted it; the event stays pending.
    Interrupted,
    /// The plugin was quarantined; the event was not completed.
    Quarantined,
}

/// The retry delays of one event.
fn retry_backoff(policy: &RetryPolicy) -> Backoff {
    Backoff::new(policy.backoff, policy.max_backoff)
}

impl Worker {
    /// The gateway panicked in a round: the worker is failed, with the
    /// panic as its last failure, logged and counted. What the round had
    /// taken stays pending below the cursor (its calls may or may not have
    /// run), as do the queued events.
    pub(super) fn fail(&self, panic: &str) {
        self.set_state(WorkerState::Failed);
        self.in_batch.store(0, Ordering::SeqCst);
        self.end_quarantine();
        *self.stats.last_failure.lock() = Some(LastFailure {
            outcome: Outcome::trap,
            key: String::new(),
            message: format!(
                "the gateway panicked in this plugin's worker (a gateway bug): {panic}; \
                 it takes no events until it is loaded again (a new version, or unloaded and loaded)"
            ),
            at: unix_seconds(SystemTime::now()),
        });
        self.metrics.host_panic(&self.name, PanicSite::Round, panic);
    }

    /// One event with retries, then a dead letter. `prior` is a first
    /// attempt already made (in a batch, or as a probe). Traps in a row are
    /// counted in the runner; reaching the plugin's `quarantine_after`
    /// quarantines it and leaves the event to the caller.
    pub(super) fn handle_one(
        &self,
        r: &mut Runner,
        event: &Event,
        prior: Option<CallReport>,
    ) -> Handled {
        let mut attempt = 1;
        let mut report = prior.unwrap_or_else(|| {
            let spec = self.spec.load_full();
            r.sandbox.call(&spec.loaded, event)
        });
        self.record(event, &report);
        let first_ok = report.outcome == Outcome::ok;
        let mut backoff = retry_backoff(&self.spec.load().retry);
        loop {
            r.traps = if is_trap(report.outcome) {
                r.traps + 1
            } else {
                0
            };
            let spec = self.spec.load_full();
            let k = spec.retry.quarantine_after;
            if k > 0 && r.traps >= k {
                if attempt > 1 {
                    self.set_retrying(None);
                }
                self.enter_quarantine(r.traps, &report);
                return Handled::Quarantined;
            }
            if report.outcome == Outcome::ok || attempt >= spec.retry.attempts {
                break;
            }
            self.set_retrying(Some((event, attempt)));
            if !self.pause(backoff.next_delay()) {
                // Stopped or parked while waiting to retry: the event stays
                // pending and is delivered again after a restart (or by the
                // next owner).
                self.set_retrying(None);
                return Handled::Interrupted;
            }
            self.metrics.count_plugin(PluginCounter::Retry, &self.name);
            attempt += 1;
            report = r.sandbox.call(&spec.loaded, event);
            self.record(event, &report);
        }
        if attempt > 1 {
            self.set_retrying(None);
        }
        // The caller completes the event in the queue (with the others of
        // its round).
        if report.outcome == Outcome::ok {
            self.succeeded(std::slice::from_ref(event));
        } else {
            let letter = self.dead_letter(event, &report, attempt).letter.id;
            let log = &mut r.failures;
            if log.limiter.check().is_ok() {
                tracing::warn!(
                    plugin = %self.name,
                    source = %event.source,
                    key = %event.key,
                    revision = event.revision,
                    outcome = report.outcome.as_str(),
                    attempts = attempt,
                    dead_letter = letter,
                    suppressed = log.unlogged,
                    error = report.message.as_deref().unwrap_or(""),
                    "Plugin call failed on every attempt; the event was kept as a dead letter."
                );
                log.unlogged = 0;
            } else {
                log.unlogged += 1;
                self.metrics.suppressed(&format!("plugin/{}", self.name));
            }
        }
        Handled::Done(first_ok)
    }

    /// When the next probe of a quarantined plugin is due.
    pub(super) fn next_probe(&self) -> Option<Instant> {
        self.quarantine.lock().as_ref().map(|q| q.next_probe)
    }

    fn set_quarantined_metric(&self, on: bool) {
        self.metrics.set_quarantined(&self.name, on);
    }

    fn enter_quarantine(&self, traps: u32, report: &CallReport) {
        let mut backoff = Backoff::new(
            self.spec.load().retry.probe_backoff,
            RetryPolicy::MAX_PROBE_BACKOFF,
        );
        let delay = backoff.next_delay();
        *self.quarantine.lock() = Some(Quarantine {
            since: SystemTime::now(),
            probes: 0,
            next_probe: Instant::now() + delay,
            backoff,
            head: None,
            head_attempts: 0,
        });
        self.shift(WorkerState::Own, WorkerState::Quarantined);
        self.set_quarantined_metric(true);
        tracing::warn!(
            plugin = %self.name,
            traps,
            outcome = report.outcome.as_str(),
            error = report.message.as_deref().unwrap_or(""),
            probe_in_ms = delay.as_millis() as u64,
            "Plugin quarantined after trapping on every recent call; its events are kept and it will be probed again."
        );
    }

    pub(super) fn leave_quarantine(&self) {
        let probes = self.quarantine.lock().take().map_or(0, |q| q.probes);
        self.shift(WorkerState::Quarantined, WorkerState::Own);
        self.set_quarantined_metric(false);
        tracing::info!(plugin = %self.name, probes, "Plugin left quarantine: a probe call did not trap.");
    }

    /// Forget the quarantine when the plugin stops.
    pub(super) fn end_quarantine(&self) {
        if self.quarantine.lock().take().is_some() {
            self.set_quarantined_metric(false);
        }
    }

    /// A probe trapped: wait longer for the next one; the event is probed
    /// again, or dead-lettered once it trapped on as many probes as the
    /// plugin's retry attempts.
    ///
    /// A probe of a version replaced during the call says nothing about
    /// the new one: the event goes back, uncounted, and the new version is
    /// probed at once. The check is made under the quarantine lock, which
    /// [`Worker::probe_now`] takes after the new version is stored, so a
    /// replacement is either seen here or resets the wait after it.
    pub(super) fn probe_failed(&self, event: &Event, report: &CallReport, spec: &Arc<PluginSpec>) {
        let id = (event.source.clone(), event.seq, event.key.to_string());
        let counted = {
            let mut q = self.quarantine.lock();
            let Some(q) = q.as_mut() else {
                return;
            };
            if Arc::ptr_eq(spec, &self.spec.load()) {
                q.probes += 1;
                q.next_probe = Instant::now() + q.backoff.next_delay();
                if q.head.as_ref() == Some(&id) {
                    q.head_attempts += 1;
                } else {
                    q.head = Some(id);
                    q.head_attempts = 1;
                }
                Some((q.head_attempts, q.probes))
            } else {
                None
            }
        };
        let Some((attempts, probes)) = counted else {
            self.queue.requeue_front(vec![event.clone()]);
            return;
        };
        if attempts >= spec.retry.attempts {
            let letter = self.dead_letter(event, report, attempts).letter.id;
            tracing::warn!(
                plugin = %self.name,
                source = %event.source,
                key = %event.key,
                dead_letter = letter,
                probes,
                "Quarantined plugin trapped on this event at every probe; it was kept as a dead letter."
            );
            self.queue.complete(event);
        } else {
            self.queue.requeue_front(vec![event.clone()]);
        }
    }

    /// A new version arrived: probe it at once.
    pub(super) fn probe_now(&self) {
        if let Some(q) = self.quarantine.lock().as_mut() {
            q.next_probe = Instant::now();
        }
    }

    /// The quarantine as `/v1/plugins` shows it.
    pub(super) fn quarantine_report(&self) -> Option<QuarantineReport> {
        self.quarantine.lock().as_ref().map(|q| QuarantineReport {
            since: unix_seconds(q.since),
            probes: q.probes,
            next_probe_in_ms: q
                .next_probe
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
        })
    }

    /// `events` were handled: replayed dead letters among them are
    /// forgotten, and a trace can tell when they were handled. Called once
    /// per round with what it handled (one clock read and one lock; the
    /// time is the round's end, a few calls after each event's own).
    pub(super) fn succeeded(&self, events: &[Event]) {
        for id in events.iter().filter_map(|e| e.dead_letter) {
            self.store.remove_dead_letter(&self.name, id.get());
        }
        if events.iter().any(|e| e.seq > 0) {
            let ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            self.stats.recent.lock().add(events, ms);
        }
    }

    /// Say (for a trace) that `event` is being retried after `attempts`
    /// attempts; `None` once it is done with.
    fn set_retrying(&self, event: Option<(&Event, u32)>) {
        *self.stats.retrying.lock() = event.map(|(e, attempts)| super::report::Retrying {
            source: e.source.clone(),
            key: e.key.clone(),
            seq: e.seq,
            attempts,
        });
    }

    /// Wait `delay` unless stopped or parked meanwhile; false then.
    fn pause(&self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        while !self.interrupted() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
        false
    }

    /// Keep `event` as a dead letter (replacing the one it replayed),
    /// within the plugin's caps.
    fn dead_letter(&self, event: &Event, report: &CallReport, attempts: u32) -> AddedLetter {
        if let Some(old) = event.dead_letter {
            self.store.remove_dead_letter(&self.name, old.get());
        }
        self.metrics
            .count_plugin(PluginCounter::DeadLetter, &self.name);
        let cap = self.spec.load().dead_letters;
        let added = self.store.add_dead_letter(
            &self.name,
            DeadLetter {
                id: 0,
                event: event.to_line(),
                seq: event.seq,
                outcome: report.outcome.as_str().to_owned(),
                error: report.message.clone().unwrap_or_default(),
                attempts,
                at: 0,
            },
            cap,
        );
        if added.dropped.count > 0 {
            self.letters_dropped(added.dropped, cap, added.kept);
        }
        added
    }

    /// Count dead letters dropped by the caps, and log it (at most once a
    /// second; the next line says how many drops went unlogged).
    fn letters_dropped(&self, dropped: LetterTally, cap: DeadLetterCap, kept: bool) {
        self.metrics.dead_letters_dropped(&self.name, dropped.count);
        let mut log = self.drop_log.lock();
        if log.limiter.check().is_err() {
            log.unlogged += dropped.count;
            return;
        }
        let kept_now = self.store.dead_letter_tally(&self.name);
        tracing::warn!(
            plugin = %self.name,
            dropped = dropped.count,
            dropped_bytes = dropped.bytes,
            unlogged_drops = log.unlogged,
            max_dead_letters = cap.count,
            max_dead_letter_bytes = cap.bytes,
            dead_letters = kept_now.count,
            dead_letter_bytes = kept_now.bytes,
            "{}",
            if kept {
                "Dead letters over the plugin's caps: the oldest were dropped to keep the new one."
            } else {
                "A dead letter larger than the plugin's max_dead_letter_bytes was dropped instead of kept."
            }
        );
        log.unlogged = 0;
    }

    /// Drop the oldest dead letters until the plugin's caps hold (a new
    /// version with lower caps, or letters kept before the caps).
    pub(super) fn trim_dead_letters(&self) {
        let cap = self.spec.load().dead_letters;
        let dropped = self.store.trim_dead_letters(&self.name, cap);
        if dropped.count > 0 {
            self.metrics.dead_letters_dropped(&self.name, dropped.count);
            tracing::warn!(
                plugin = %self.name,
                dropped = dropped.count,
                dropped_bytes = dropped.bytes,
                max_dead_letters = cap.count,
                max_dead_letter_bytes = cap.bytes,
                "The plugin's dead letters were over its caps: the oldest were dropped."
            );
        }
    }

    /// Count one call of `event` by its outcome, and keep a failure as the
    /// plugin's last.
    pub(super) fn record(&self, event: &Event, report: &CallReport) {
        let outcome = report.outcome;
        self.handles.seconds.observe(report.elapsed.as_secs_f64());
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.handles.calls[i].inc();
            self.stats.calls[i].fetch_add(1, Ordering::Relaxed);
        }
        if outcome != Outcome::ok {
            *self.stats.last_failure.lock() = Some(LastFailure {
                outcome,
                key: event.key.to_string(),
                message: report.message.clone().unwrap_or_default(),
                at: unix_seconds(SystemTime::now()),
            });
        }
    }
}

/// The lines about a worker's dead letters dropped by its caps, rate
/// limited like its failure lines; kept in the worker, not its runner,
/// because a probe's dead letter is made without the runner at hand.
pub(super) type DropLog = Mutex<FailureLog>;

impl Dispatcher {
    /// The dead letters of `plugin` (running or not) with ids above
    /// `after`, oldest first: at most `limit` and `max_bytes` as stored
    /// (one at least).
    pub fn dead_letters(
        &self,
        plugin: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> LetterPage {
        self.store.dead_letter_page(plugin, after, limit, max_bytes)
    }

    /// How many dead letters `plugin` has, and their stored bytes.
    pub fn dead_letter_tally(&self, plugin: &str) -> LetterTally {
        self.store.dead_letter_tally(plugin)
    }

    /// Queue every dead letter of a running `plugin` again, behind what is
    /// queued. A replayed letter is removed once a call succeeds, and kept
    /// (with its new failure) otherwise. `None` when the plugin does not run.
    pub fn replay_dead_letters(&self, plugin: &str) -> Option<usize> {
        let w = self.workers.get(plugin)?.clone();
        let events: Vec<Event> = self
            .store
            .dead_letters(plugin)
            .into_iter()
            .filter_map(|d| {
                let mut e = Event::try_from(d.event).ok()?;
                e.dead_letter = std::num::NonZeroU64::new(d.id);
                Some(e)
            })
            .collect();
        let n = events.len();
        let stats = w.queue.push(events);
        w.count(stats);
        Some(n)
    }

    /// Forget every dead letter of `plugin`; returns how many.
    pub fn delete_dead_letters(&self, plugin: &str) -> u64 {
        self.store.clear_dead_letters(plugin)
    }
}

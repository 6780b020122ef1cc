//! NATS JetStream key-value source: a snapshot of one bucket (or one key
//! prefix of it), then its changes, resumed by revision.
//!
//! A bucket is a JetStream stream (`KV_<bucket>`) with one subject per key;
//! an entry's revision is its stream sequence, and a delete or a purge is a
//! marker message on the key's subject. The source reads the bucket through
//! one ordered consumer per session: "last message per subject" for a
//! snapshot, which goes on with every later message (no gap between the
//! two), or "from sequence N" to resume after the last revision delivered.
//! It owns the connection (one server URL at a time, the next after a
//! failure) and decides when a resume is not safe and a relist is needed
//! (the rules J1–J5 in docs/RELIABILITY.md). It must not know about plugins
//! or queues; the dispatcher diffs a relist against its key index and fills
//! in previous values.

mod config;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::push::{Ordered, OrderedConfig};
use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy};
use bytes::Bytes;
use futures_util::StreamExt;

pub use self::config::{NatsSourceConfig, NatsTlsConfig, Urls};
use super::{Source, SourceContext, SourceFuture};
use crate::backoff::Backoff;
use crate::event::Event;
use crate::telemetry::RepeatLog;

/// Events handed over in one delivery while a backlog is being read.
const MAX_BATCH: usize = 512;

/// The NATS key-value source.
pub struct NatsSource {
    config: NatsSourceConfig,
}

impl NatsSource {
    /// A source for `config` (already validated).
    pub fn new(config: NatsSourceConfig) -> Self {
        NatsSource { config }
    }
}

impl Source for NatsSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> SourceFuture {
        Box::pin(async move {
            // An unreadable credentials file cannot heal by retrying.
            self.config.options().await?;
            let resume = ctx.resume;
            let mut watcher = Watcher {
                config: self.config,
                ctx,
                next_rev: resume.map(|r| r + 1),
                created: None,
                relist: false,
                url: 0,
                errors: RepeatLog::new(Duration::from_secs(60)),
            };
            watcher.run().await;
            Ok(())
        })
    }
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// No connection, or it was lost.
    Disconnected(String),
    /// The server refused what the source asked (a missing bucket, a
    /// permission); retried after a backoff all the same.
    Failed(String),
}

/// What one message of the consumer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Put,
    /// A delete or purge marker, or a server marker for a removed key.
    Delete,
}

/// The operation a KV message carries (in its headers; none means a put).
fn operation(headers: Option<&async_nats::HeaderMap>) -> Operation {
    let Some(h) = headers else {
        return Operation::Put;
    };
    match h.get("KV-Operation").map(|v| v.as_str()) {
        Some("DEL" | "PURGE") => Operation::Delete,
        Some(_) => Operation::Put,
        // Newer servers mark keys they removed themselves (TTL) this way.
        None if h.get("Nats-Marker-Reason").is_some() => Operation::Delete,
        None => Operation::Put,
    }
}

struct Watcher {
    config: NatsSourceConfig,
    ctx: SourceContext,
    /// The next revision to deliver; `None` before the first snapshot.
    next_rev: Option<u64>,
    /// When the bucket's stream was created, as first seen: a different
    /// time later means the bucket was deleted and made again.
    created: Option<i128>,
    /// The next session must snapshot and diff rather than resume.
    relist: bool,
    url: usize,
    errors: RepeatLog,
}

/// A consumer being read: the messages, and the snapshot being collected
/// (key → (revision, value)) when it is one.
struct Reading {
    messages: Ordered,
    listing: Option<BTreeMap<String, (u64, Bytes)>>,
    /// The snapshot's revision so far: every message up to it is in it.
    top: u64,
    batch: Vec<Event>,
    batch_rev: u64,
}

impl Watcher {
    async fn run(&mut self) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.config.reconnect_initial_ms),
            Duration::from_millis(self.config.reconnect_max_ms),
        );
        let urls = self.config.url.list();
        loop {
            let url = urls[self.url % urls.len()].clone();
            let started = Instant::now();
            let end = self.session(&url).await;
            self.ctx.status.set_connected(false);
            let reason = match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Disconnected(e) => format!("connection to {url} failed: {e}"),
                SessionEnd::Failed(e) => format!("{url}: {e}"),
            };
            self.ctx.status.set_error(reason.clone());
            // A healthy session earns a fresh backoff; a flapping one does not.
            if started.elapsed() >= Duration::from_secs(10) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            if let Some(repeated) = self.errors.should_log(&reason) {
                tracing::warn!(
                    source = %self.ctx.name,
                    error = %reason,
                    retry_in_ms = delay.as_millis() as u64,
                    repeated,
                    "NATS watch interrupted; reconnecting."
                );
            } else {
                self.ctx.status.log_suppressed();
            }
            self.url += 1;
            self.ctx.status.reconnecting();
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection: check where to start, open the consumer, read it
    /// until something ends it.
    async fn session(&mut self, url: &str) -> SessionEnd {
        let dial = Duration::from_secs(self.config.dial_timeout_s);
        let shutdown = self.ctx.shutdown.clone();
        let options = match self.config.options().await {
            Ok(o) => o,
            Err(e) => return SessionEnd::Failed(format!("{e:#}")),
        };
        // The client reports a lost connection as an event, not as an end
        // of the consumer (which would wait for the client to reconnect).
        let (lost_tx, mut lost) = tokio::sync::mpsc::channel::<async_nats::Event>(16);
        let options = options.event_callback(move |event| {
            let tx = lost_tx.clone();
            async move {
                let _ = tx.try_send(event);
            }
        });
        let client = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            c = tokio::time::timeout(dial * 2, options.connect(url)) => match c {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return SessionEnd::Disconnected(e.to_string()),
                Err(_) => return SessionEnd::Disconnected(format!("no connection within {:?}", dial * 2)),
            },
        };
        let reading = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            r = self.open(&client, dial) => r,
        };
        let mut reading = match reading {
            Ok(r) => r,
            Err(end) => return end,
        };
        self.ctx.status.set_connected(true);
        let end = loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break SessionEnd::Shutdown,
                event = lost.recv() => match event {
                    Some(async_nats::Event::Disconnected | async_nats::Event::Closed) | None => {
                        break SessionEnd::Disconnected("connection lost".into());
                    }
                    Some(async_nats::Event::ServerError(e)) => {
                        break SessionEnd::Failed(format!("server error: {e}"));
                    }
                    Some(_) => continue,
                },
                m = reading.messages.next() => m,
            };
            match msg {
                Some(Ok(m)) => self.take(&mut reading, m),
                Some(Err(e)) => break SessionEnd::Disconnected(format!("watch failed: {e}")),
                None => break SessionEnd::Disconnected("watch ended".into()),
            }
        };
        // What arrived in full is delivered; the next session resumes after it.
        self.flush(&mut reading);
        end
    }

    /// Look at the bucket, decide between resuming and relisting, and open
    /// the consumer.
    async fn open(
        &mut self,
        client: &async_nats::Client,
        dial: Duration,
    ) -> Result<Reading, SessionEnd> {
        let js = async_nats::jetstream::new(client.clone());
        let stream_name = format!("KV_{}", self.config.bucket);
        let stream = match tokio::time::timeout(dial, js.get_stream(&stream_name)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(SessionEnd::Failed(format!(
                    "bucket {:?} is not available: {e}",
                    self.config.bucket
                )));
            }
            Err(_) => {
                return Err(SessionEnd::Disconnected(format!(
                    "no stream info within {dial:?}"
                )));
            }
        };
        let info = stream.cached_info();
        let created = info.created.unix_timestamp_nanos();
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        // J3: a bucket made again starts its revisions over.
        if self.created.is_some_and(|c| c != created) {
            tracing::warn!(source = %self.ctx.name, bucket = %self.config.bucket, "The bucket was recreated; relisting.");
            self.relist = true;
        }
        self.created = Some(created);
        if let Some(next) = self.next_rev
            && !self.relist
        {
            if last + 1 < next {
                // J3: behind what was delivered (recreated, or restored).
                tracing::warn!(source = %self.ctx.name, last, delivered = next - 1, "The bucket's last revision is below what was delivered; relisting.");
                self.relist = true;
            } else if first > next {
                // J2: messages after the last delivered revision are gone;
                // a delete among them would never be seen.
                tracing::info!(source = %self.ctx.name, first, next, "The bucket no longer holds every revision after the last delivered one; relisting.");
                self.relist = true;
            }
        }
        let listing = self.next_rev.is_none() || self.relist;
        let deliver_policy = match self.next_rev {
            Some(next) if !listing => DeliverPolicy::ByStartSequence {
                start_sequence: next,
            },
            _ => DeliverPolicy::LastPerSubject,
        };
        let (filter_subject, _) = self.config.filter();
        let consumer = stream.create_consumer(OrderedConfig {
            deliver_subject: client.new_inbox(),
            description: Some(format!("watchgate source {}", self.ctx.name)),
            filter_subject,
            replay_policy: ReplayPolicy::Instant,
            deliver_policy,
            ..Default::default()
        });
        let consumer = match tokio::time::timeout(dial, consumer).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(SessionEnd::Failed(format!("cannot watch: {e}"))),
            Err(_) => {
                return Err(SessionEnd::Disconnected(format!(
                    "no consumer within {dial:?}"
                )));
            }
        };
        let pending = consumer.cached_info().num_pending;
        let messages = match tokio::time::timeout(dial, consumer.messages()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(SessionEnd::Disconnected(format!("cannot watch: {e}"))),
            Err(_) => {
                return Err(SessionEnd::Disconnected(format!(
                    "no watch within {dial:?}"
                )));
            }
        };
        let mut reading = Reading {
            messages,
            listing: listing.then(BTreeMap::new),
            top: last,
            batch: Vec::new(),
            batch_rev: 0,
        };
        if pending == 0 {
            // Nothing to read first: the snapshot (or the catch-up) is done.
            self.caught_up(&mut reading);
        }
        Ok(reading)
    }

    /// One message of the consumer.
    fn take(&mut self, reading: &mut Reading, m: async_nats::jetstream::Message) {
        let Ok(info) = m.info() else {
            return;
        };
        let (seq, pending) = (info.stream_sequence, info.pending);
        let prefix = format!("$KV.{}.", self.config.bucket);
        let key = m.subject.strip_prefix(prefix.as_str()).map(str::to_owned);
        let (_, own_prefix) = self.config.filter();
        let key = key.filter(|k| k.starts_with(own_prefix));
        let op = operation(m.headers.as_ref());
        if let Some(listing) = &mut reading.listing {
            reading.top = reading.top.max(seq);
            if let Some(key) = key {
                match op {
                    Operation::Put => {
                        listing.insert(key, (seq, m.payload.clone()));
                    }
                    Operation::Delete => {
                        listing.remove(&key);
                    }
                }
            }
        } else if seq >= self.next_rev.unwrap_or(0) {
            // J1: below the next revision is a replay; skip it.
            let name = self.ctx.name.clone();
            if let Some(key) = key {
                reading.batch.push(match op {
                    Operation::Put => Event::put(&name, key, m.payload.clone(), seq),
                    Operation::Delete => Event::delete(&name, key, seq),
                });
            }
            reading.batch_rev = seq;
            if reading.batch.len() >= MAX_BATCH {
                self.flush(reading);
            }
        }
        if pending == 0 {
            self.caught_up(reading);
        }
    }

    /// The consumer has sent everything the bucket held: hand over the
    /// snapshot (or the batch), and the source is synced.
    fn caught_up(&mut self, reading: &mut Reading) {
        if let Some(listing) = reading.listing.take() {
            let name = self.ctx.name.clone();
            let batch: Vec<Event> = listing
                .into_iter()
                .map(|(key, (rev, value))| Event::put(&name, key, value, rev))
                .collect();
            if self.next_rev.is_some() {
                self.ctx.status.resynced();
                tracing::info!(source = %name, revision = reading.top, keys = batch.len(), "NATS source relisted; the dispatcher diffs it.");
            }
            self.ctx.emit_snapshot_at(reading.top, batch);
            self.next_rev = Some(reading.top + 1);
            self.relist = false;
        } else {
            self.flush(reading);
        }
        self.ctx.status.set_synced();
    }

    /// Hand over the events read so far; the next revision moves past them.
    fn flush(&mut self, reading: &mut Reading) {
        if reading.listing.is_some() || reading.batch_rev == 0 {
            return;
        }
        self.ctx.emit(std::mem::take(&mut reading.batch));
        self.next_rev = Some(reading.batch_rev + 1);
        reading.batch_rev = 0;
    }
}

#[cfg(test)]
mod tests;

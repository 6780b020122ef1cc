//! Plugin log output: the `log` import and the guest's stdout/stderr.
//!
//! Owns turning plugin output into log lines tagged with the plugin name,
//! under a per-plugin line budget whose drops are counted, each line cut to
//! [`MAX_TEXT`] bytes (the cut counted too). It must not block
//! the calling guest on anything but an in-memory line buffer and the
//! budget's lock.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::telemetry::{Metrics, PluginCounter};
use crate::text::{MAX_TEXT, clip};

/// Severity of a plugin log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The `log` import.
    Log,
    /// The guest's stdout.
    Stdout,
    /// The guest's stderr.
    Stderr,
}

/// Receives plugin log lines that passed the rate limit.
pub trait LogSink: Send + Sync + 'static {
    /// One line of one plugin.
    fn line(&self, plugin: &str, level: Level, stream: Stream, message: &str);
}

/// The gateway's sink: `tracing`, with the plugin name as a field.
pub struct TracingSink;

impl LogSink for TracingSink {
    fn line(&self, plugin: &str, level: Level, stream: Stream, message: &str) {
        let stream = match stream {
            Stream::Log => "log",
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        match level {
            Level::Trace => tracing::trace!(plugin, stream, "{message}"),
            Level::Debug => tracing::debug!(plugin, stream, "{message}"),
            Level::Info => tracing::info!(plugin, stream, "{message}"),
            Level::Warn => tracing::warn!(plugin, stream, "{message}"),
            Level::Error => tracing::error!(plugin, stream, "{message}"),
        }
    }
}

/// The window the line budget is counted over.
const WINDOW: Duration = Duration::from_secs(1);

/// What the budget allows for one offered line.
struct Admit {
    /// Emit a summary of this many dropped lines first.
    summary: Option<u64>,
    /// Emit the line itself.
    line: bool,
}

/// At most `limit` lines in any window of [`WINDOW`], drop summaries
/// included: a summary is a line in the gateway's log like any other, so a
/// flooding plugin must not get more lines through by causing summaries.
struct Budget {
    limit: usize,
    /// When each line still inside the window went out, oldest first; never
    /// longer than `limit`.
    sent: VecDeque<Instant>,
    /// Lines dropped since the last summary.
    dropped: u64,
    /// When the last summary went out: at most one per window, so that
    /// under a steady flood the summaries do not take every freed slot.
    last_summary: Option<Instant>,
}

impl Budget {
    fn new(limit: u32) -> Self {
        Budget {
            limit: usize::try_from(limit.max(1)).unwrap_or(usize::MAX),
            sent: VecDeque::new(),
            dropped: 0,
            last_summary: None,
        }
    }

    /// Offer one line at `now`. A due summary takes its slot before the
    /// line, so when only one slot is free the line is the one dropped (and
    /// reported by the next summary).
    fn admit(&mut self, now: Instant) -> Admit {
        while self
            .sent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
        {
            self.sent.pop_front();
        }
        let summary_due = self.dropped > 0
            && self
                .last_summary
                .is_none_or(|t| now.saturating_duration_since(t) >= WINDOW);
        let summary = if summary_due && self.sent.len() < self.limit {
            self.sent.push_back(now);
            self.last_summary = Some(now);
            Some(std::mem::take(&mut self.dropped))
        } else {
            None
        };
        let line = self.sent.len() < self.limit;
        if line {
            self.sent.push_back(now);
        } else {
            self.dropped += 1;
        }
        Admit { summary, line }
    }
}

/// One plugin's log output, shared by all its instances.
pub struct PluginLog {
    plugin: String,
    budget: Mutex<Budget>,
    sink: Arc<dyn LogSink>,
    metrics: Arc<Metrics>,
}

impl PluginLog {
    /// A log for `plugin` allowing `per_second` lines per second, the
    /// summaries of dropped lines among them.
    pub fn new(
        plugin: &str,
        per_second: u32,
        sink: Arc<dyn LogSink>,
        metrics: Arc<Metrics>,
    ) -> Self {
        PluginLog {
            plugin: plugin.to_owned(),
            budget: Mutex::new(Budget::new(per_second)),
            sink,
            metrics,
        }
    }

    /// The plugin's name.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// Emit one line if the budget allows; otherwise count it. Once per
    /// second at most, a line that finds drops not yet reported is preceded
    /// by a summary of how many, which takes a place in the budget.
    pub fn line(&self, level: Level, stream: Stream, message: &str) {
        self.line_at(Instant::now(), level, stream, message);
    }

    fn line_at(&self, now: Instant, level: Level, stream: Stream, message: &str) {
        let Admit { summary, line } = self.budget.lock().admit(now);
        if let Some(dropped) = summary {
            self.sink.line(
                &self.plugin,
                Level::Warn,
                Stream::Log,
                &format!("{dropped} log lines of this plugin were dropped by the rate limit"),
            );
        }
        if !line {
            self.metrics
                .count_plugin(PluginCounter::LogLineDropped, &self.plugin);
            return;
        }
        let message = clip(message);
        if matches!(message, std::borrow::Cow::Owned(_)) {
            self.metrics
                .count_plugin(PluginCounter::TextTruncated, &self.plugin);
        }
        self.sink.line(&self.plugin, level, stream, &message);
    }
}

/// A guest output stream (stdout or stderr) that turns bytes into lines of
/// the plugin's log.
#[derive(Clone)]
pub struct LineStream {
    log: Arc<PluginLog>,
    stream: Stream,
    buf: Arc<Mutex<Vec<u8>>>,
    /// `buf` holds a partial line: the flush after every call reads this
    /// flag instead of taking the lock, which would otherwise be paid on
    /// every call, output or not.
    partial: Arc<AtomicBool>,
}

impl LineStream {
    /// A stream writing into `log` as `stream`.
    pub fn new(log: Arc<PluginLog>, stream: Stream) -> Self {
        LineStream {
            log,
            stream,
            buf: Arc::default(),
            partial: Arc::default(),
        }
    }

    fn level(&self) -> Level {
        match self.stream {
            Stream::Stderr => Level::Warn,
            _ => Level::Info,
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut buf = self.buf.lock();
        buf.extend_from_slice(bytes);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            self.log
                .line(self.level(), self.stream, text.trim_end_matches('\r'));
        }
        // A line longer than the bound is cut anyway: emit what is buffered
        // instead of holding a guest's endless line.
        if buf.len() > MAX_TEXT {
            let line: Vec<u8> = std::mem::take(&mut *buf);
            self.log
                .line(self.level(), self.stream, &String::from_utf8_lossy(&line));
        }
        self.partial.store(!buf.is_empty(), Ordering::Release);
    }

    /// Emit a trailing partial line, if any (called after each plugin call).
    pub fn flush_partial(&self) {
        // Most calls write no partial line: a plain load first spares them
        // the atomic swap.
        if !self.partial.load(Ordering::Acquire) || !self.partial.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut buf = self.buf.lock();
        if buf.is_empty() {
            return;
        }
        let line: Vec<u8> = std::mem::take(&mut *buf);
        drop(buf);
        self.log
            .line(self.level(), self.stream, &String::from_utf8_lossy(&line));
    }
}

impl IsTerminal for LineStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LineStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineStream {
    async fn ready(&mut self) {}
}

impl OutputStream for LineStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LineStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A sink that keeps every line, for tests.
    #[derive(Default)]
    pub struct MemorySink(pub Mutex<Vec<(String, Level, Stream, String)>>);

    impl LogSink for MemorySink {
        fn line(&self, plugin: &str, level: Level, stream: Stream, message: &str) {
            self.0
                .lock()
                .push((plugin.to_owned(), level, stream, message.to_owned()));
        }
    }

    #[test]
    fn lines_are_split_rate_limited_and_counted() {
        let sink = Arc::new(MemorySink::default());
        let metrics = Metrics::shared();
        let log = Arc::new(PluginLog::new("p", 3, sink.clone(), metrics.clone()));
        let out = LineStream::new(log.clone(), Stream::Stdout);
        out.push(b"hello\nwor");
        out.push(b"ld\n");
        out.push(b"partial");
        out.flush_partial();
        for _ in 0..10 {
            log.line(Level::Info, Stream::Log, "flood");
        }
        let lines = sink.0.lock().clone();
        let texts: Vec<&str> = lines.iter().map(|l| l.3.as_str()).collect();
        assert_eq!(texts, vec!["hello", "world", "partial"]);
        assert!(
            metrics
                .encode()
                .contains("watchgate_plugin_log_dropped_total{plugin=\"p\"} 10")
        );
    }

    /// The value of `watchgate_plugin_log_dropped_total` for `plugin`.
    fn dropped_total(metrics: &Metrics, plugin: &str) -> u64 {
        let prefix = format!("watchgate_plugin_log_dropped_total{{plugin=\"{plugin}\"}} ");
        metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str())?.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn a_flood_stays_within_the_budget_summaries_included() {
        const LIMIT: u32 = 10;
        let sink = Arc::new(MemorySink::default());
        let metrics = Metrics::shared();
        let log = PluginLog::new("p", LIMIT, sink.clone(), metrics.clone());
        // A line every millisecond for 5.5 seconds of a clock the test
        // drives, so the windows below are exact.
        let start = Instant::now();
        let offered = 5_500;
        let mut emitted: Vec<(Duration, Stream, String)> = Vec::new();
        for i in 0..offered {
            let at = Duration::from_millis(i);
            log.line_at(
                start + at,
                Level::Info,
                Stream::Stdout,
                &format!("flood {i}"),
            );
            emitted.extend(
                sink.0
                    .lock()
                    .drain(..)
                    .map(|(_, _, stream, message)| (at, stream, message)),
            );
        }
        // Every one-second window, starting at any emitted line, holds at
        // most LIMIT lines, summaries counted.
        for (i, (from, _, _)) in emitted.iter().enumerate() {
            let within = emitted[i..]
                .iter()
                .take_while(|(at, _, _)| *at - *from < WINDOW)
                .count();
            assert!(
                within <= LIMIT as usize,
                "{within} lines in the second from {from:?}: {emitted:#?}"
            );
        }
        let summaries: Vec<(Duration, u64)> = emitted
            .iter()
            .filter(|(_, stream, _)| *stream == Stream::Log)
            .map(|(at, _, message)| {
                let count = message
                    .strip_suffix(" log lines of this plugin were dropped by the rate limit")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("not a drop summary: {message:?}"));
                (*at, count)
            })
            .collect();
        let flood_lines = emitted.len() - summaries.len();
        // One summary per second after the first: at 1s, 2s, … 5s.
        assert_eq!(
            summaries
                .iter()
                .map(|(at, _)| at.as_secs())
                .collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5],
            "{summaries:?}"
        );
        // The counter counts every dropped line; the summaries report all of
        // them but those dropped since the last one.
        let dropped = offered as usize - flood_lines;
        assert_eq!(dropped_total(&metrics, "p"), dropped as u64);
        let reported: u64 = summaries.iter().map(|(_, n)| n).sum();
        let last = summaries.last().unwrap().0;
        let offered_since = offered - last.as_millis() as u64;
        let emitted_since = emitted
            .iter()
            .filter(|(at, stream, _)| *at >= last && *stream != Stream::Log)
            .count();
        let since_last = offered_since as usize - emitted_since;
        assert_eq!(reported as usize + since_last, dropped, "{summaries:?}");
    }

    #[test]
    fn a_long_line_is_cut_to_the_bound_and_counted() {
        let sink = Arc::new(MemorySink::default());
        let metrics = Metrics::shared();
        let log = Arc::new(PluginLog::new("p", 50, sink.clone(), metrics.clone()));
        log.line(Level::Error, Stream::Log, &"e".repeat(20 << 20));
        // Through stdout, in chunks, without a newline.
        let out = LineStream::new(log, Stream::Stdout);
        for _ in 0..4 {
            out.push(&[b'o'; 3000]);
        }
        out.flush_partial();
        let lines = sink.0.lock().clone();
        let texts: Vec<&str> = lines.iter().map(|l| l.3.as_str()).collect();
        assert_eq!(
            texts.len(),
            3,
            "{:?}",
            texts.iter().map(|t| t.len()).collect::<Vec<_>>()
        );
        assert!(texts[0].ends_with(&format!("… [truncated: {} bytes, limit 4096]", 20 << 20)));
        assert!(texts[0].len() < MAX_TEXT + 64);
        // Each time the buffer passed the bound (at 6000 bytes), what it
        // held went out as one line, cut.
        for t in &texts[1..] {
            assert!(t.ends_with("… [truncated: 6000 bytes, limit 4096]"), "{t}");
        }
        assert!(
            metrics
                .encode()
                .contains("watchgate_plugin_text_truncated_total{plugin=\"p\"} 3"),
            "{}",
            metrics.encode()
        );
    }

    #[test]
    fn a_plugin_within_its_budget_loses_nothing() {
        let sink = Arc::new(MemorySink::default());
        let metrics = Metrics::shared();
        let log = PluginLog::new("p", 5, sink.clone(), metrics.clone());
        let start = Instant::now();
        // Five lines a second, in bursts, for four seconds.
        for second in 0..4 {
            for i in 0..5 {
                let at = start + Duration::from_secs(second) + Duration::from_millis(i);
                log.line_at(at, Level::Info, Stream::Log, "quiet");
            }
        }
        assert_eq!(sink.0.lock().len(), 20);
        assert_eq!(dropped_total(&metrics, "p"), 0);
    }
}

//! Plugin log output: the `log` import and the guest's stdout/stderr.
//!
//! Owns turning plugin output into log lines tagged with the plugin name,
//! under a per-plugin rate limit whose drops are counted. It must not block
//! the calling guest on anything but an in-memory line buffer.

use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::telemetry::{Metrics, PluginCounter};

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

/// Longest line kept; the rest is cut with a marker.
const MAX_LINE: usize = 4096;

/// One plugin's log output, shared by all its instances.
pub struct PluginLog {
    plugin: String,
    limiter: DefaultDirectRateLimiter,
    dropped: AtomicU64,
    sink: Arc<dyn LogSink>,
    metrics: Arc<Metrics>,
}

impl PluginLog {
    /// A log for `plugin` allowing `per_second` lines per second.
    pub fn new(
        plugin: &str,
        per_second: u32,
        sink: Arc<dyn LogSink>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let quota =
            Quota::per_second(NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN));
        PluginLog {
            plugin: plugin.to_owned(),
            limiter: RateLimiter::direct(quota),
            dropped: AtomicU64::new(0),
            sink,
            metrics,
        }
    }

    /// Emit one line if the rate limit allows; otherwise count it. The first
    /// line after a run of drops says how many were dropped.
    pub fn line(&self, level: Level, stream: Stream, message: &str) {
        if self.limiter.check().is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .count_plugin(PluginCounter::LogLineDropped, &self.plugin);
            return;
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            self.sink.line(
                &self.plugin,
                Level::Warn,
                Stream::Log,
                &format!("{dropped} log lines of this plugin were dropped by the rate limit"),
            );
        }
        let message = if message.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}… [{} bytes cut]", &message[..cut], message.len() - cut)
        } else {
            message.to_owned()
        };
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
        if buf.len() > MAX_LINE {
            let line: Vec<u8> = std::mem::take(&mut *buf);
            self.log
                .line(self.level(), self.stream, &String::from_utf8_lossy(&line));
        }
        self.partial.store(!buf.is_empty(), Ordering::Release);
    }

    /// Emit a trailing partial line, if any (called after each plugin call).
    pub fn flush_partial(&self) {
        if !self.partial.swap(false, Ordering::AcqRel) {
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
}

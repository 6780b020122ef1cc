//! `GET /v1/events/stream`: the live tail as server-sent events.
//!
//! Owns the stream's body. Each delivered change is one `change` event
//! (source, kind, key, revision, the plugins it was queued for, the time;
//! the value only with `[admin] reveal_values`). A reader that falls
//! behind the dispatcher's bounded channel misses changes rather than
//! slowing delivery, and is sent a `dropped` event with how many it has
//! missed so far. At most [`MAX_STREAMS`] streams are open at a time; a
//! comment every [`KEEPALIVE`] finds readers that went away.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::ReusableBoxFuture;

use super::{AdminState, ErrorBody, json};
use crate::dispatch::tail::TailEvent;
use crate::event::EventKind;

/// Most streams open at once.
pub const MAX_STREAMS: usize = 8;
/// How often an idle stream sends a comment.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// A `change` event's data.
#[derive(Serialize)]
struct Change<'a> {
    source: &'a str,
    kind: &'static str,
    key: &'a str,
    revision: u64,
    plugins: &'a [String],
    at_ms: u64,
    /// Present only with `reveal_values`: the value as text (lossy for
    /// bytes that are not UTF-8), `null` for a delete.
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Option<String>>,
}

type Recv = (
    Result<Arc<TailEvent>, RecvError>,
    broadcast::Receiver<Arc<TailEvent>>,
);

async fn next(mut rx: broadcast::Receiver<Arc<TailEvent>>) -> Recv {
    (rx.recv().await, rx)
}

/// The body of one stream; frees its slot when dropped (the reader left
/// or the server closed).
struct TailBody {
    recv: ReusableBoxFuture<'static, Recv>,
    keepalive: tokio::time::Interval,
    reveal: bool,
    dropped: u64,
    open: Arc<AtomicUsize>,
    done: bool,
}

impl Drop for TailBody {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TailBody {
    fn change(&self, e: &TailEvent) -> Bytes {
        let data = Change {
            source: &e.source,
            kind: match e.kind {
                EventKind::Put => "put",
                EventKind::Delete => "delete",
            },
            key: &e.key,
            revision: e.revision,
            plugins: &e.plugins,
            at_ms: e.at_ms,
            value: self.reveal.then(|| {
                e.value
                    .as_ref()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            }),
        };
        let text = serde_json::to_string(&data).unwrap_or_default();
        Bytes::from(format!("event: change\ndata: {text}\n\n"))
    }
}

impl Body for TailBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready((result, rx)) = self.recv.poll(cx) {
            self.recv.set(next(rx));
            let bytes = match result {
                Ok(e) => self.change(&e),
                Err(RecvError::Lagged(n)) => {
                    self.dropped += n;
                    Bytes::from(format!(
                        "event: dropped\ndata: {{\"dropped\":{}}}\n\n",
                        self.dropped
                    ))
                }
                Err(RecvError::Closed) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
            };
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        if self.keepalive.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b": keepalive\n\n",
            )))));
        }
        Poll::Pending
    }
}

/// Answer `GET /v1/events/stream`.
pub(super) fn stream(state: &AdminState) -> Response<BoxBody<Bytes, Infallible>> {
    let open = state.streams.clone();
    if open.fetch_add(1, Ordering::SeqCst) >= MAX_STREAMS {
        open.fetch_sub(1, Ordering::SeqCst);
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            &ErrorBody {
                error: "too many live streams are open; close one and retry",
            },
        )
        .map(BodyExt::boxed);
    }
    let rx = state.dispatcher.tail();
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let body = TailBody {
        recv: ReusableBoxFuture::new(next(rx)),
        keepalive,
        reveal: state.settings.read().reveal_values,
        dropped: 0,
        open,
        done: false,
    };
    let mut r = Response::new(BoxBody::new(body));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

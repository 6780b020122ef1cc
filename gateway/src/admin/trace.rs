//! `GET /v1/trace?source=S&key=K[&revision=R]`: where one change stands
//! for every plugin, with the owning replica in cluster mode.
//!
//! Owns the query parsing and the cluster annotation; the trace itself is
//! the dispatcher's ([`Dispatcher::trace`](crate::dispatch::Dispatcher::trace)),
//! bounded there. It must not change anything.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use super::{AdminState, ErrorBody, bad_request, json};
use crate::dispatch::trace::TraceError;

/// What a trace request asks.
#[derive(Debug, PartialEq, Eq)]
struct TraceQuery {
    source: String,
    key: String,
    revision: Option<u64>,
}

fn parse(query: Option<&str>) -> Result<TraceQuery, String> {
    let (mut source, mut key, mut revision) = (None, None, None);
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*name {
            "source" => source = Some(value.into_owned()),
            "key" => key = Some(value.into_owned()),
            "revision" => {
                revision = Some(value.parse::<u64>().map_err(|_| {
                    format!("revision {value:?}: give the source's revision as a whole number")
                })?);
            }
            other => {
                return Err(format!(
                    "unknown query parameter {other:?}; a trace takes source, key and revision"
                ));
            }
        }
    }
    match (source, key) {
        (Some(source), Some(key)) if !source.is_empty() => Ok(TraceQuery {
            source,
            key,
            revision,
        }),
        _ => Err("give source and key: /v1/trace?source=S&key=K (and &revision=R)".to_owned()),
    }
}

/// Answer `GET /v1/trace`.
pub(super) fn trace(state: &AdminState, query: Option<&str>) -> Response<Full<Bytes>> {
    let q = match parse(query) {
        Ok(q) => q,
        Err(e) => return bad_request(&e),
    };
    match state.dispatcher.trace(&q.source, &q.key, q.revision) {
        Ok(mut t) => {
            if let Some(cluster) = &state.cluster {
                let c = cluster.read();
                for p in &mut t.plugins {
                    p.owner = c
                        .replicas
                        .iter()
                        .find(|r| r.owns.contains(&p.plugin))
                        .map(|r| r.name.clone());
                }
            }
            json(StatusCode::OK, &t)
        }
        Err(e @ TraceError::Revision(_)) => bad_request(&e.to_string()),
        Err(e) => json(
            StatusCode::NOT_FOUND,
            &ErrorBody {
                error: &e.to_string(),
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_query_needs_source_and_key() {
        let q = parse(Some("source=cfg&key=app%2Fa&revision=7")).unwrap();
        assert_eq!(
            q,
            TraceQuery {
                source: "cfg".into(),
                key: "app/a".into(),
                revision: Some(7)
            }
        );
        assert!(
            parse(Some("source=cfg"))
                .unwrap_err()
                .contains("give source and key")
        );
        assert!(
            parse(Some("source=cfg&key=a&revision=x"))
                .unwrap_err()
                .contains("revision")
        );
        assert!(
            parse(Some("source=cfg&key=a&rev=1"))
                .unwrap_err()
                .contains("\"rev\"")
        );
    }
}

//! The `http` capability: outbound requests to granted `host:port` pairs
//! only, sent by the host in the background.
//!
//! Owns the allowlist check (on the request and on every redirect), the
//! bounds on what one request may hold, the bound on requests in flight
//! per plugin, and the send loop with timeout and retries. A plugin's call
//! returns as soon as the request is checked and queued, so no plugin call
//! ever waits on the network. Every part of a request is measured against
//! its bound before any of it reaches the `http` or `url` crates, which
//! panic or allocate without limit on some inputs (a `HeaderMap` panics past
//! 32,768 distinct names). What it logs of a request (its URL, the error) is
//! the plugin's text and cut to [`MAX_TEXT`](crate::text::MAX_TEXT). It must
//! not hand responses back to plugins or follow a redirect off the
//! allowlist.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::telemetry::{Metrics, PluginCounter};
use crate::text::clip;

/// Most requests of one plugin queued or in flight at once.
pub const MAX_IN_FLIGHT: usize = 16;
/// Deadline of one attempt.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per request, the first included.
const ATTEMPTS: u32 = 3;
/// Wait before the second attempt; doubled after each further one.
const BACKOFF: Duration = Duration::from_millis(200);
/// Largest request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 64;
/// Largest header, name plus value.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Largest sum of every header's name plus value.
pub const MAX_HEADERS_TOTAL: usize = 16 * 1024;
/// Longest URL.
pub const MAX_URL_BYTES: usize = 8 * 1024;
/// The methods a plugin may use.
const METHODS: [&str; 6] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];
/// Most characters of a refused string repeated in an error message.
const SHOWN: usize = 64;
/// Most redirects followed (each must stay on the allowlist).
const MAX_REDIRECTS: usize = 5;

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    host: String,
    port: u16,
}

impl HostPort {
    /// Parse `host:port` (`[v6]:port` for IPv6). The port is required: a
    /// grant names exactly where requests may go.
    ///
    /// # Errors
    /// A message saying what is wrong with the entry.
    pub fn parse(entry: &str) -> Result<HostPort, String> {
        let (host, port) = entry
            .rsplit_once(':')
            .ok_or_else(|| format!("{entry:?} is not HOST:PORT (the port is required)"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{entry:?}: {port:?} is not a port"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(['/', '@', ' ', '[', ']']) || port == 0 {
            return Err(format!("{entry:?} is not HOST:PORT"));
        }
        Ok(HostPort {
            host: normalize(host),
            port,
        })
    }

    fn allows(&self, url: &reqwest::Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        Some(self.port) == url.port_or_known_default() && normalize(host) == self.host
    }
}

/// A host as compared: lowercase, no brackets or trailing dot, IP
/// addresses in their canonical form.
fn normalize(host: &str) -> String {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .trim_end_matches('.');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.to_ascii_lowercase(),
    }
}

/// An allowlist.
#[derive(Debug, Clone, Default)]
pub struct Allowlist(Arc<Vec<HostPort>>);

impl Allowlist {
    /// The allowlist of a `[grants] http` list.
    ///
    /// # Errors
    /// The first entry that is not `HOST:PORT`.
    pub fn new(entries: &[String]) -> Result<Allowlist, String> {
        entries
            .iter()
            .map(|e| HostPort::parse(e))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| Allowlist(Arc::new(v)))
    }

    /// Whether `url` is on the allowlist (scheme http or https, host and
    /// port granted).
    pub fn allows(&self, url: &reqwest::Url) -> bool {
        matches!(url.scheme(), "http" | "https") && self.0.iter().any(|h| h.allows(url))
    }
}

/// A request as a plugin asked for it.
#[derive(Debug, Clone)]
pub struct Request {
    /// HTTP method.
    pub method: String,
    /// Absolute URL.
    pub url: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Option<Vec<u8>>,
}

/// A request that passed every check.
#[derive(Debug, Clone)]
pub struct Checked {
    method: reqwest::Method,
    url: reqwest::Url,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Checked {
    /// The request as JSON, for `plugin test` and logs.
    pub fn describe(&self) -> serde_json::Value {
        let headers: Vec<(String, String)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect();
        serde_json::json!({
            "method": self.method.as_str(),
            "url": self.url.as_str(),
            "headers": headers,
            "body": String::from_utf8_lossy(&self.body),
        })
    }
}

/// The grant of one plugin: its allowlist, client and in-flight bound.
pub struct HttpGrant {
    allow: Allowlist,
    client: reqwest::Client,
    in_flight: Arc<Semaphore>,
    next_id: AtomicU64,
    runtime: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for HttpGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpGrant")
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

impl HttpGrant {
    /// A grant for `entries` (`HOST:PORT`). Requests are sent on `runtime`;
    /// without one (a dry run) nothing can be sent.
    ///
    /// # Errors
    /// A bad entry, or a client that cannot be built.
    pub fn new(
        entries: &[String],
        runtime: Option<tokio::runtime::Handle>,
    ) -> Result<HttpGrant, String> {
        let allow = Allowlist::new(entries)?;
        let redirect_allow = allow.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if redirect_allow.allows(attempt.url()) {
                attempt.follow()
            } else {
                let to = attempt.url().to_string();
                attempt.error(format!("redirect to {to} leaves the granted hosts"))
            }
        });
        let client = reqwest::Client::builder()
            .redirect(policy)
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .no_proxy()
            .user_agent(concat!("watchgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(HttpGrant {
            allow,
            client,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            next_id: AtomicU64::new(1),
            runtime,
        })
    }

    /// Check `req` against the grant: its size first, then its form, then
    /// the allowlist.
    ///
    /// # Errors
    /// `(outcome, message)`: `too_large` for a request past one of the
    /// size bounds (the message names the bound), `denied` for a host off
    /// the allowlist, `invalid` for a malformed request.
    pub fn check(&self, req: Request) -> Result<Checked, (&'static str, String)> {
        let invalid = |m: String| ("invalid", m);
        bounded(&req)?;
        let method = METHODS
            .iter()
            .find(|m| m.eq_ignore_ascii_case(&req.method))
            .ok_or_else(|| invalid(format!("method {} is not allowed", shown(&req.method))))?;
        let method =
            reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| invalid(e.to_string()))?;
        let url = reqwest::Url::parse(&req.url)
            .map_err(|e| invalid(format!("url {}: {e}", shown(&req.url))))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                "credentials in the URL are not allowed; use a header".into(),
            ));
        }
        if !self.allow.allows(&url) {
            return Err((
                "denied",
                format!(
                    "{}://{}:{} is not granted to this plugin",
                    url.scheme(),
                    url.host_str().unwrap_or(""),
                    url.port_or_known_default().unwrap_or(0)
                ),
            ));
        }
        let mut headers = reqwest::header::HeaderMap::with_capacity(req.headers.len());
        for (name, value) in req.headers {
            let n = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| invalid(format!("header {}: {e}", shown(&name))))?;
            if n == reqwest::header::HOST {
                return Err(invalid("the Host header is set by the gateway".into()));
            }
            let v = reqwest::header::HeaderValue::from_str(&value)
                .map_err(|e| invalid(format!("header {}: {e}", shown(&name))))?;
            // Cannot fail under MAX_HEADERS; checked all the same, so no
            // count reaches the map's panic.
            headers
                .try_append(n, v)
                .map_err(|e| invalid(format!("header {}: {e}", shown(&name))))?;
        }
        Ok(Checked {
            method,
            url,
            headers,
            body: req.body.unwrap_or_default(),
        })
    }

    /// The next request id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queue `req` for sending; returns at once.
    ///
    /// # Errors
    /// `(outcome, message)`: `busy` when the plugin has its maximum of
    /// requests in flight, `error` when there is nothing to send on.
    pub fn send(
        &self,
        id: u64,
        req: Checked,
        plugin: &str,
        metrics: &Arc<Metrics>,
    ) -> Result<(), (&'static str, String)> {
        let Some(runtime) = &self.runtime else {
            return Err(("error", "no runtime to send requests on".into()));
        };
        let permit = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            (
                "busy",
                format!("{MAX_IN_FLIGHT} requests already in flight; try again later"),
            )
        })?;
        let (client, plugin, metrics) = (self.client.clone(), plugin.to_owned(), metrics.clone());
        runtime.spawn(async move {
            let outcome = deliver(&client, &req).await;
            drop(permit);
            let url = clip(req.url.as_str());
            let mut truncated = matches!(url, std::borrow::Cow::Owned(_));
            match outcome {
                Ok(status) => {
                    metrics.capability(&plugin, "http", "delivered");
                    tracing::debug!(plugin = %plugin, id, url = %url, status, "HTTP request delivered.");
                }
                Err(e) => {
                    metrics.capability(&plugin, "http", "failed");
                    // A transport error names the URL again.
                    let (error, cut) = crate::text::clip_owned(e);
                    truncated |= cut;
                    tracing::warn!(plugin = %plugin, id, url = %url, error = %error, "HTTP request failed after retries.");
                }
            }
            if truncated {
                metrics.count_plugin(PluginCounter::TextTruncated, &plugin);
            }
        });
        Ok(())
    }
}

/// `req` against the size bounds, measured without parsing any of it.
fn bounded(req: &Request) -> Result<(), (&'static str, String)> {
    let too_large = |m: String| Err(("too_large", m));
    if req.url.len() > MAX_URL_BYTES {
        return too_large(format!(
            "url of {} bytes is over the limit of {MAX_URL_BYTES} bytes",
            req.url.len()
        ));
    }
    if req.headers.len() > MAX_HEADERS {
        return too_large(format!(
            "{} headers are over the limit of {MAX_HEADERS} headers per request",
            req.headers.len()
        ));
    }
    let mut total = 0;
    for (name, value) in &req.headers {
        let size = name.len() + value.len();
        if size > MAX_HEADER_BYTES {
            return too_large(format!(
                "header {} of {size} bytes (name and value) is over the limit of \
                 {MAX_HEADER_BYTES} bytes per header",
                shown(name)
            ));
        }
        total += size;
    }
    if total > MAX_HEADERS_TOTAL {
        return too_large(format!(
            "headers of {total} bytes in all are over the limit of {MAX_HEADERS_TOTAL} bytes \
             per request"
        ));
    }
    let body = req.body.as_ref().map_or(0, Vec::len);
    if body > MAX_BODY {
        return too_large(format!(
            "body of {body} bytes is over the limit of {MAX_BODY} bytes"
        ));
    }
    Ok(())
}

/// A guest's string as an error message quotes it: its first [`SHOWN`]
/// characters, so a refusal never copies back what it refused.
fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
        None => format!("{s:?}"),
    }
}

/// Send with retries: a connection error, a timeout, 429 or a 5xx is
/// retried with backoff; anything else is final.
async fn deliver(client: &reqwest::Client, req: &Checked) -> Result<u16, String> {
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(BACKOFF * (1 << (attempt - 2))).await;
        }
        let sent = client
            .request(req.method.clone(), req.url.clone())
            .headers(req.headers.clone())
            .body(req.body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() || r.status().is_redirection() => {
                return Ok(r.status().as_u16());
            }
            Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                last = format!("HTTP {}", r.status());
            }
            Ok(r) => return Err(format!("HTTP {}", r.status())),
            Err(e) if e.is_redirect() => return Err(format!("{e:#}")),
            Err(e) => last = format!("{e:#}"),
        }
    }
    Err(format!("{last} (after {ATTEMPTS} attempts)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).unwrap()
    }

    #[test]
    fn host_and_port_must_both_match() {
        let a = Allowlist::new(&["hooks.example.com:443".into(), "127.0.0.1:8080".into()]).unwrap();
        assert!(a.allows(&url("https://hooks.example.com/x")));
        assert!(a.allows(&url("https://HOOKS.example.com./x")));
        assert!(a.allows(&url("http://127.0.0.1:8080/")));
        assert!(!a.allows(&url("http://hooks.example.com/x")), "port 80");
        assert!(!a.allows(&url("https://evil.example.com/")));
        assert!(!a.allows(&url("https://hooks.example.com.evil.com/")));
        assert!(!a.allows(&url("http://127.0.0.1:8081/")));
        assert!(!a.allows(&url("ftp://127.0.0.1:8080/")));
    }

    #[test]
    fn ipv6_entries_and_bad_entries() {
        let a = Allowlist::new(&["[0:0::1]:9000".into()]).unwrap();
        assert!(a.allows(&url("http://[::1]:9000/")));
        for bad in ["hooks.example.com", "a:b", ":80", "x/y:80", "h:0"] {
            assert!(HostPort::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checks_refuse_what_is_not_granted_or_malformed() {
        let g = HttpGrant::new(&["127.0.0.1:8080".into()], None).unwrap();
        let req = |method: &str, url: &str| Request {
            method: method.into(),
            url: url.into(),
            headers: vec![],
            body: None,
        };
        assert!(g.check(req("POST", "http://127.0.0.1:8080/hook")).is_ok());
        assert_eq!(
            g.check(req("POST", "http://127.0.0.1:9/")).unwrap_err().0,
            "denied"
        );
        assert_eq!(
            g.check(req("CONNECT", "http://127.0.0.1:8080/"))
                .unwrap_err()
                .0,
            "invalid"
        );
        assert_eq!(
            g.check(req("GET", "http://u:p@127.0.0.1:8080/"))
                .unwrap_err()
                .0,
            "invalid"
        );
        let mut host = req("GET", "http://127.0.0.1:8080/");
        host.headers.push(("Host".into(), "evil".into()));
        assert_eq!(g.check(host).unwrap_err().0, "invalid");
    }

    fn request(headers: Vec<(String, String)>, url: &str, body: usize) -> Request {
        Request {
            method: "POST".into(),
            url: url.into(),
            headers,
            body: Some(vec![b'b'; body]),
        }
    }

    const HOOK: &str = "http://127.0.0.1:8080/hook";

    /// The request that panicked the `http` crate inside the host: more
    /// distinct header names than a `HeaderMap` can hold.
    #[test]
    fn forty_thousand_header_names_are_refused_before_a_header_map() {
        let g = HttpGrant::new(&["127.0.0.1:8080".into()], None).unwrap();
        let headers = (0..40_000)
            .map(|i| (format!("x-h{i}"), "v".to_owned()))
            .collect();
        let (outcome, message) = g.check(request(headers, HOOK, 0)).unwrap_err();
        assert_eq!(outcome, "too_large");
        assert_eq!(
            message,
            "40000 headers are over the limit of 64 headers per request"
        );
    }

    #[test]
    fn each_size_bound_allows_its_limit_and_refuses_one_more() {
        let g = HttpGrant::new(&["127.0.0.1:8080".into()], None).unwrap();
        let many = |n: usize| (0..n).map(|i| (format!("x-{i}"), "v".into())).collect();
        // One header of `size` bytes, name and value.
        let sized = |name: &str, size: usize| (name.to_owned(), "v".repeat(size - name.len()));
        let long_url = |n: usize| format!("{HOOK}?{}", "q".repeat(n - HOOK.len() - 1));
        let cases: Vec<(Request, Request, &str)> = vec![
            (
                request(many(MAX_HEADERS), HOOK, 0),
                request(many(MAX_HEADERS + 1), HOOK, 0),
                "65 headers are over the limit of 64 headers per request",
            ),
            (
                request(vec![sized("x-big", MAX_HEADER_BYTES)], HOOK, 0),
                request(vec![sized("x-big", MAX_HEADER_BYTES + 1)], HOOK, 0),
                "header \"x-big\" of 8193 bytes (name and value) is over the limit of 8192 bytes per header",
            ),
            (
                request(vec![sized("x-a", 8192), sized("x-b", 8192)], HOOK, 0),
                request(
                    vec![sized("x-a", 8192), sized("x-b", 8192), sized("x-c", 4)],
                    HOOK,
                    0,
                ),
                "headers of 16388 bytes in all are over the limit of 16384 bytes per request",
            ),
            (
                request(vec![], &long_url(MAX_URL_BYTES), 0),
                request(vec![], &long_url(MAX_URL_BYTES + 1), 0),
                "url of 8193 bytes is over the limit of 8192 bytes",
            ),
            (
                request(vec![], HOOK, MAX_BODY),
                request(vec![], HOOK, MAX_BODY + 1),
                "body of 1048577 bytes is over the limit of 1048576 bytes",
            ),
        ];
        for (at, past, expected) in cases {
            assert!(g.check(at).is_ok(), "refused at the limit: {expected}");
            assert_eq!(
                g.check(past).unwrap_err(),
                ("too_large", expected.to_owned())
            );
        }
    }

    #[test]
    fn a_refusal_quotes_only_the_start_of_what_it_refused() {
        let g = HttpGrant::new(&["127.0.0.1:8080".into()], None).unwrap();
        let mut req = request(vec![], HOOK, 0);
        req.method = "GET".repeat(1 << 20);
        let (outcome, message) = g.check(req).unwrap_err();
        assert_eq!(outcome, "invalid");
        assert!(
            message.starts_with("method \"GETGET")
                && message.ends_with("… (3145728 bytes) is not allowed"),
            "{message}"
        );
        assert!(message.len() < 200, "{} bytes", message.len());
        // Methods are matched whatever their case.
        let mut lower = request(vec![], HOOK, 0);
        lower.method = "patch".into();
        assert_eq!(g.check(lower).unwrap().method, reqwest::Method::PATCH);
    }
}

//! The operator console at `/ui`: one HTML page, a stylesheet, a script
//! and an icon, compiled into the binary so the console works with no
//! network beyond the admin listener.
//!
//! Owns the assets and the headers they are served with. Every answer
//! carries a Content-Security-Policy that lets the page load and fetch
//! only from the gateway itself (see docs/CONSOLE.md), so a stray outside
//! reference would be refused by the browser rather than followed. The
//! page reads the same admin endpoints as any other client; it adds no
//! access of its own.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue, LOCATION};
use hyper::{Method, Response, StatusCode};

/// The policy of every console answer: this origin only, no inline code,
/// no framing, no form posts elsewhere.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const INDEX: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");
const ICON: &str = include_str!("ui/icon.svg");

/// Answer a console path (`/ui`, `/ui/…`), or `None` for any other path.
pub(super) fn route(method: &Method, path: &str) -> Option<Response<Full<Bytes>>> {
    if path != "/ui" && !path.starts_with("/ui/") {
        return None;
    }
    if method != Method::GET && method != Method::HEAD {
        return Some(answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "the console is read with GET\n",
        ));
    }
    let asset = match path {
        "/ui" => {
            // Relative asset paths resolve under /ui/.
            let mut r = answer(StatusCode::PERMANENT_REDIRECT, "text/plain", "");
            r.headers_mut()
                .insert(LOCATION, HeaderValue::from_static("/ui/"));
            return Some(r);
        }
        "/ui/" | "/ui/index.html" => Some(("text/html; charset=utf-8", INDEX)),
        "/ui/app.js" => Some(("text/javascript; charset=utf-8", APP_JS)),
        "/ui/app.css" => Some(("text/css; charset=utf-8", APP_CSS)),
        "/ui/icon.svg" => Some(("image/svg+xml", ICON)),
        _ => None,
    };
    Some(match asset {
        Some((content_type, body)) => answer(StatusCode::OK, content_type, body),
        None => answer(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "no such console file; the console is at /ui/\n",
        ),
    })
}

fn answer(
    status: StatusCode,
    content_type: &'static str,
    body: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CSP),
    );
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    // The assets change with the binary; an operator who upgrades should
    // not see an old script against a new API.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_assets_are_served_with_the_policy() {
        for path in ["/ui/", "/ui/app.js", "/ui/app.css", "/ui/icon.svg"] {
            let r = route(&Method::GET, path).unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(r.headers()["content-security-policy"], CSP);
        }
        assert_eq!(
            route(&Method::GET, "/ui").unwrap().status(),
            StatusCode::PERMANENT_REDIRECT
        );
        assert_eq!(
            route(&Method::GET, "/ui/nope").unwrap().status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&Method::POST, "/ui/").unwrap().status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert!(route(&Method::GET, "/uix").is_none());
    }

    #[test]
    fn the_page_names_no_outside_address() {
        for asset in [INDEX, APP_JS, APP_CSS, ICON] {
            for line in asset.lines() {
                let outside = ["http://", "https://", "//cdn", "@import"]
                    .iter()
                    .any(|p| line.contains(p))
                    && !line.contains("http://www.w3.org/2000/svg");
                assert!(!outside, "outside reference: {line}");
            }
        }
    }
}

//! A real browser for the console tests: Debian's headless `chromium`
//! driven through `chromedriver` on a free loopback port.
//!
//! A missing browser fails the test that asked for it, naming the Debian
//! packages (`scripts/test` installs them); it never skips. Chromium runs
//! with its background services off so the only requests it makes are the
//! page's own, which the tests check.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::support::free_port;

/// How long a condition in the page may take.
pub const PAGE_DEADLINE: Duration = Duration::from_secs(30);

/// A program on PATH, or a panic that says what to install.
fn required(program: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{program} is not on PATH: the console tests need a real browser. \
             Install Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; \
             scripts/test does this)"
        )
    })
}

/// The browser binary itself: Debian's `chromium` is a launcher script
/// around it.
fn chromium_binary() -> PathBuf {
    let launcher = required("chromium");
    let real = PathBuf::from("/usr/lib/chromium/chromium");
    if real.is_file() { real } else { launcher }
}

/// A chromedriver process and one headless browser session.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start chromedriver and a headless chromium with a fresh profile.
    pub async fn start() -> Browser {
        let driver_path = required("chromedriver");
        let binary = chromium_binary();
        let port = free_port();
        let driver = Command::new(driver_path)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().expect("profile dir");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--metrics-recording-only",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--window-size=1360,900",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": binary, "args": args }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        let client = loop {
            let attempt =
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps.clone())
                    .connect(&url)
                    .await;
            match attempt {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        start.elapsed() < PAGE_DEADLINE,
                        "chromedriver at {url} did not start a session: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Run `script` in the page and return its value.
    pub async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Wait until `script` returns something truthy (other than `false`,
    /// `null` or an empty string) and return it.
    pub async fn wait_js(&self, what: &str, script: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.js(script).await;
            let truthy = !(v.is_null() || v == false || v == "" || v == 0);
            if truthy {
                return v;
            }
            if start.elapsed() > PAGE_DEADLINE {
                let page = self
                    .js("return document.body ? document.body.innerText : ''")
                    .await;
                panic!(
                    "timed out after {PAGE_DEADLINE:?} waiting for {what}; the page reads:\n{page}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Show another page of the console, as its links do (by the URL's
    /// fragment).
    pub async fn show(&self, fragment: &str) {
        self.js(&format!("location.hash = {fragment:?}; return true;"))
            .await;
    }

    /// Wait for the element `css` to exist and click it.
    pub async fn click(&self, css: &str) {
        self.wait_js(
            &format!("{css} to be enabled"),
            &format!("const e = document.querySelector({css:?}); return !!e && !e.disabled;"),
        )
        .await;
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Every URL the page loaded or fetched: the document and each
    /// resource the browser recorded.
    pub async fn requested_urls(&self) -> Vec<String> {
        let v = self
            .js(
                "return [document.URL].concat(performance.getEntriesByType('resource').map(e => e.name));",
            )
            .await;
        v.as_array()
            .expect("a list")
            .iter()
            .map(|u| u.as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Save a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &std::path::Path) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(path, png).expect("write screenshot");
    }

    /// End the session and chromedriver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A failed test never reaches `close`: chromedriver still goes.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

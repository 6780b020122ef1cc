//! `kind = "nats"`: the settings of a NATS JetStream key-value source, their
//! checks, and the client options they turn into.
//!
//! Owns the file format of one `[[source]]` of this kind and nothing that
//! runs: relative paths are made absolute by the config loader, and the
//! connection is opened by the source.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{ConnectOptions, ReconnectToServer, ServerAddr};
use serde::Deserialize;

/// `kind = "nats"`: one bucket (optionally one key prefix of it) of a NATS
/// JetStream key-value store.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSourceConfig {
    /// Unique source name.
    pub name: String,
    /// Always `"nats"`.
    #[serde(default)]
    kind: Option<String>,
    /// Server URLs: one string (several may be separated by commas) or a
    /// list, for example `"nats://127.0.0.1:4222"`. `tls://` asks for TLS.
    pub url: Urls,
    /// The key-value bucket to snapshot and watch.
    pub bucket: String,
    /// Only keys starting with this prefix; empty (the default) means every
    /// key. Event keys are the full bucket keys. A prefix ending in `.` is
    /// filtered by the server, any other by the gateway.
    #[serde(default)]
    pub prefix: String,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password for `user`.
    pub password: Option<String>,
    /// Authentication token.
    pub token: Option<String>,
    /// A NATS credentials file (user JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// TLS settings; omit for plain `nats://` servers.
    pub tls: Option<NatsTlsConfig>,
    /// Seconds between client pings. Two unanswered pings in a row end the
    /// connection, so a silent dead server is noticed within about three
    /// intervals. Default 10.
    #[serde(default = "default_ping_interval_s")]
    pub ping_interval_s: u64,
    /// Seconds to wait for a connection and for each JetStream request.
    /// Default 5.
    #[serde(default = "default_dial_timeout_s")]
    pub dial_timeout_s: u64,
    /// First reconnect delay in milliseconds; doubles up to
    /// `reconnect_max_ms`, with jitter. Default 200.
    #[serde(default = "crate::source::default_reconnect_initial_ms")]
    pub reconnect_initial_ms: u64,
    /// Longest reconnect delay in milliseconds. Default 10 000.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

/// `[source.tls]` for NATS.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTlsConfig {
    /// CA certificate (PEM) to verify the server with.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `key_file`, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM).
    pub key_file: Option<PathBuf>,
}

/// One URL, a comma-separated list in one string, or a list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Urls {
    /// `url = "nats://a:4222"` or `url = "nats://a:4222,nats://b:4222"`.
    One(String),
    /// `url = ["nats://a:4222", "nats://b:4222"]`.
    Many(Vec<String>),
}

impl Urls {
    /// Every URL, trimmed, empty entries dropped.
    pub fn list(&self) -> Vec<String> {
        let all: Vec<&str> = match self {
            Urls::One(s) => s.split(',').collect(),
            Urls::Many(v) => v.iter().flat_map(|s| s.split(',')).collect(),
        };
        all.into_iter()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

fn default_ping_interval_s() -> u64 {
    10
}
fn default_dial_timeout_s() -> u64 {
    5
}
fn default_reconnect_max_ms() -> u64 {
    10_000
}

/// Characters NATS allows in a bucket name.
fn valid_bucket(b: &str) -> bool {
    !b.is_empty()
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// Characters NATS allows in a key; a prefix is the start of one.
fn valid_prefix(p: &str) -> bool {
    !p.starts_with('.')
        && !p.contains("..")
        && p.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-/_=.".contains(&c))
}

impl NatsSourceConfig {
    /// A config with defaults, for tests and examples.
    pub fn new(name: impl Into<String>, url: &str, bucket: &str) -> Self {
        NatsSourceConfig {
            name: name.into(),
            kind: None,
            url: Urls::One(url.to_owned()),
            bucket: bucket.to_owned(),
            prefix: String::new(),
            user: None,
            password: None,
            token: None,
            credentials_file: None,
            tls: None,
            ping_interval_s: default_ping_interval_s(),
            dial_timeout_s: default_dial_timeout_s(),
            reconnect_initial_ms: crate::source::default_reconnect_initial_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
        }
    }

    /// The file paths it names, for the config loader to make absolute.
    pub fn files_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        let tls = self.tls.as_mut().map(|t| {
            [&mut t.ca_file, &mut t.cert_file, &mut t.key_file]
                .into_iter()
                .flatten()
        });
        self.credentials_file
            .iter_mut()
            .chain(tls.into_iter().flatten())
    }

    /// The subject filter the server applies, and the key prefix the
    /// source must still check itself (empty when the server did it all).
    /// NATS wildcards match whole tokens only, so a prefix that does not
    /// end in `.` cannot be a subject filter.
    pub(super) fn filter(&self) -> (String, &str) {
        let base = format!("$KV.{}.", self.bucket);
        if self.prefix.is_empty() {
            (format!("{base}>"), "")
        } else if self.prefix.ends_with('.') {
            (format!("{base}{}>", self.prefix), "")
        } else {
            (format!("{base}>"), &self.prefix)
        }
    }

    /// Check values serde cannot. Relative paths are left for the config
    /// loader, which knows what they are relative to.
    ///
    /// # Errors
    /// A message naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        let urls = self.url.list();
        if urls.is_empty() {
            return Err("`url` must name at least one server".into());
        }
        for u in &urls {
            let scheme_ok = ["nats://", "tls://"].iter().any(|s| u.starts_with(s));
            if !scheme_ok || u.parse::<ServerAddr>().is_err() {
                return Err(format!(
                    "url: {u:?} must be a server URL such as \"nats://127.0.0.1:4222\""
                ));
            }
        }
        if !valid_bucket(&self.bucket) {
            return Err(format!(
                "bucket: {:?} must be non-empty and use only letters, digits, '_' and '-'",
                self.bucket
            ));
        }
        if !valid_prefix(&self.prefix) {
            return Err(format!(
                "prefix: {:?} is not the start of a NATS key (letters, digits, '-', '/', '_', '=', '.'; no leading or doubled '.')",
                self.prefix
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err("`user` and `password` go together".into());
        }
        let methods = [
            self.user.is_some(),
            self.token.is_some(),
            self.credentials_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(
                "give one of `user`/`password`, `token` or `credentials_file`, not several".into(),
            );
        }
        if self.ping_interval_s == 0 || self.dial_timeout_s == 0 {
            return Err("ping_interval_s and dial_timeout_s must be at least 1".into());
        }
        crate::source::check_reconnect(self.reconnect_initial_ms, self.reconnect_max_ms)?;
        if let Some(tls) = &self.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            return Err("tls: `cert_file` and `key_file` go together".into());
        }
        Ok(())
    }

    /// The client options: authentication, TLS, timeouts. The client gets
    /// one server per session and may try it once more after a loss; then
    /// it gives up, silently. The source ends the session on a disconnect
    /// and reconnects on its own backoff (moving to the next URL), so a
    /// client left retrying in the background would only outlive it.
    ///
    /// # Errors
    /// An unreadable credentials file.
    pub(super) async fn options(&self) -> anyhow::Result<ConnectOptions> {
        let mut o = match &self.credentials_file {
            Some(path) => ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| anyhow::anyhow!("credentials_file {}: {e}", path.display()))?,
            None => ConnectOptions::new(),
        };
        if let (Some(u), Some(p)) = (&self.user, &self.password) {
            o = o.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &self.token {
            o = o.token(t.clone());
        }
        if let Some(tls) = &self.tls {
            o = o.require_tls(true);
            if let Some(ca) = &tls.ca_file {
                o = o.add_root_certificates(ca.clone());
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                o = o.add_client_certificate(cert.clone(), key.clone());
            }
        }
        let dial = Duration::from_secs(self.dial_timeout_s);
        // Choosing the server here keeps the client's give-up quiet (its
        // own selection logs an error each time it gives up).
        Ok(o.connection_timeout(dial)
            .request_timeout(Some(dial))
            .ping_interval(Duration::from_secs(self.ping_interval_s))
            .ignore_discovered_servers()
            .max_reconnects(1)
            .reconnect_to_server_callback(|servers, _| async move {
                servers.first().map(|s| ReconnectToServer {
                    addr: s.addr.clone(),
                    delay: Some(Duration::ZERO),
                })
            })
            .name("watchgate"))
    }
}

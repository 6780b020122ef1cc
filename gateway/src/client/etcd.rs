//! etcd v3 connections: endpoints, credentials, TLS and keepalive.
//!
//! Owns [`EtcdClientConfig`] and turns it into a connected client or into
//! the options a caller connects with itself (the source connects to one
//! endpoint at a time). Every connection asks for a leader and pings idle
//! HTTP/2 connections, so a dead server or a partitioned member is noticed
//! instead of hanging. It must not know who reads or writes through the
//! connection.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::Deserialize;

/// How to reach one etcd cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdClientConfig {
    /// Client URLs of the members, for example `["http://127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    /// User name for etcd authentication (with `password`).
    pub username: Option<String>,
    /// Password for etcd authentication.
    pub password: Option<String>,
    /// TLS settings; `None` for plain `http://` endpoints.
    pub tls: Option<EtcdTlsConfig>,
    /// HTTP/2 keepalive ping interval (etcd refuses pings more often than
    /// every 5 s).
    pub keepalive_interval: Duration,
    /// How long a keepalive answer may take before the connection counts as
    /// dead.
    pub keepalive_timeout: Duration,
    /// How long connecting may take.
    pub dial_timeout: Duration,
}

impl EtcdClientConfig {
    /// Plain, unauthenticated connections to `endpoints`, pinging every
    /// 10 s, giving up on a ping after 5 s and on connecting after 5 s.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdClientConfig {
            endpoints,
            username: None,
            password: None,
            tls: None,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            dial_timeout: Duration::from_secs(5),
        }
    }
}

/// `[source.tls]` for etcd.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsConfig {
    /// CA certificate (PEM) to verify the server with.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `key_file`, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM).
    pub key_file: Option<PathBuf>,
    /// Server name to verify, when it differs from the endpoint host.
    pub domain: Option<String>,
}

impl EtcdTlsConfig {
    /// The file paths it names, for the config loader to make absolute.
    pub fn files_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        [&mut self.ca_file, &mut self.cert_file, &mut self.key_file]
            .into_iter()
            .flatten()
    }
}

/// A client for `c`'s endpoints with its authentication, TLS and
/// keepalive settings.
///
/// # Errors
/// Unreadable TLS files, or no connection.
pub async fn connect_client(c: &EtcdClientConfig) -> anyhow::Result<Client> {
    let options = connect_options(c).await?;
    Ok(Client::connect(&c.endpoints, Some(options)).await?)
}

/// The options to connect with `c`'s authentication, TLS and keepalive
/// settings, for a caller that picks the endpoints itself.
///
/// # Errors
/// Unreadable TLS files.
pub async fn connect_options(c: &EtcdClientConfig) -> anyhow::Result<ConnectOptions> {
    let mut o = ConnectOptions::new()
        .with_keep_alive(c.keepalive_interval, c.keepalive_timeout)
        .with_keep_alive_while_idle(true)
        .with_connect_timeout(c.dial_timeout)
        .with_require_leader(true);
    if let (Some(u), Some(p)) = (&c.username, &c.password) {
        o = o.with_user(u.clone(), p.clone());
    }
    if let Some(tls) = &c.tls {
        let mut t = TlsOptions::new();
        if let Some(ca) = &tls.ca_file {
            let pem = tokio::fs::read(ca)
                .await
                .map_err(|e| anyhow::anyhow!("tls.ca_file {}: {e}", ca.display()))?;
            t = t.ca_certificate(Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            let cert_pem = tokio::fs::read(cert)
                .await
                .map_err(|e| anyhow::anyhow!("tls.cert_file {}: {e}", cert.display()))?;
            let key_pem = tokio::fs::read(key)
                .await
                .map_err(|e| anyhow::anyhow!("tls.key_file {}: {e}", key.display()))?;
            t = t.identity(Identity::from_pem(cert_pem, key_pem));
        }
        if let Some(d) = &tls.domain {
            t = t.domain_name(d.clone());
        }
        o = o.with_tls(t);
    }
    Ok(o)
}

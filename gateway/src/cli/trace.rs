//! `watchgate trace`: asks a running gateway's `/v1/trace` where a change
//! of one key stands for every plugin, and prints it as a table (or the
//! JSON itself with `--json`).
//!
//! Owns only the request and the printing; the answer is the gateway's.

use std::path::PathBuf;

use crate::config::Config;

/// Arguments of `watchgate trace`.
#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// The source, as named in the gateway config.
    #[arg(long, short)]
    pub source: String,
    /// The key, relative to the source.
    #[arg(long, short)]
    pub key: String,
    /// Follow the change at this revision rather than the key's latest.
    #[arg(long, short)]
    pub revision: Option<u64>,
    /// The gateway configuration file (TOML): gives the admin address and
    /// token.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The admin server's base URL; without it, `[admin] listen` of
    /// `--config`, else `http://127.0.0.1:9464`.
    #[arg(long)]
    pub admin: Option<String>,
    /// Print the gateway's JSON answer as it is.
    #[arg(long)]
    pub json: bool,
}

/// `watchgate trace`: returns the exit code (0 traced, 1 the gateway
/// refused or did not answer, 2 an unusable config).
pub fn trace(args: &TraceArgs) -> i32 {
    let config = match args.config.as_deref().map(Config::load).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let base = args.admin.clone().unwrap_or_else(|| {
        let mut addr = config.as_ref().map_or_else(
            || std::net::SocketAddr::from(([127, 0, 0, 1], 9464)),
            |c| c.admin.listen,
        );
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    });
    let mut query = form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("source", &args.source)
        .append_pair("key", &args.key);
    if let Some(r) = args.revision {
        query.append_pair("revision", &r.to_string());
    }
    let url = format!("{}/v1/trace?{}", base.trim_end_matches('/'), query.finish());
    let token = config.as_ref().and_then(|c| c.admin.effective_token());
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let mut req = reqwest::Client::new()
                    .get(&url)
                    .timeout(std::time::Duration::from_secs(10));
                if let Some(t) = &token {
                    req = req.bearer_auth(t);
                }
                let resp = req.send().await?;
                let status = resp.status();
                Ok::<_, anyhow::Error>((status, resp.text().await?))
            })
        });
    let (status, body) = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: no gateway answered at {url}: {e}");
            return 1;
        }
    };
    if !status.is_success() {
        let reason = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(body);
        eprintln!("error: the gateway answered {status}: {reason}");
        return 1;
    }
    if args.json {
        print!("{body}");
        return 0;
    }
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(v) => {
            print!("{}", table(&v));
            0
        }
        Err(e) => {
            eprintln!("error: the gateway's answer is not JSON ({e}): {body}");
            1
        }
    }
}

/// The trace as lines: the change, then one line per plugin.
fn table(v: &serde_json::Value) -> String {
    let change = &v["change"];
    let mut out = format!(
        "{} {:?}: {} at revision {} (position {}{})\n",
        v["source"].as_str().unwrap_or(""),
        v["key"].as_str().unwrap_or(""),
        change["kind"].as_str().unwrap_or("?"),
        change["revision"],
        change["position"],
        if change["latest"].as_bool() == Some(true) {
            ", its latest change"
        } else {
            ""
        }
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let plugins = v["plugins"].as_array().cloned().unwrap_or_default();
    let width = plugins
        .iter()
        .filter_map(|p| p["plugin"].as_str().map(str::len))
        .max()
        .unwrap_or(6)
        .max(6);
    out.push_str(&format!("{:width$}  {:14}  DETAIL\n", "PLUGIN", "STATUS"));
    for p in &plugins {
        let status = p["status"].as_str().unwrap_or("?");
        let mut detail = Vec::new();
        if let Some(ms) = p["handled_at_ms"].as_u64() {
            detail.push(format!(
                "handled {:.1}s ago",
                now_ms.saturating_sub(ms) as f64 / 1000.0
            ));
        }
        if let Some(n) = p["attempts"].as_u64() {
            detail.push(format!("{n} attempt(s)"));
        }
        if let Some(n) = p["queue_position"].as_u64() {
            detail.push(format!("{n} ahead in its queue"));
        }
        if let Some(id) = p["dead_letter"].as_u64() {
            detail.push(format!("dead letter {id}"));
        }
        if let Some(e) = p["error"].as_str() {
            detail.push(format!("error: {e}"));
        }
        if let Some(o) = p["owner"].as_str() {
            detail.push(format!("owned by {o}"));
        }
        out.push_str(&format!(
            "{:width$}  {:14}  {}\n",
            p["plugin"].as_str().unwrap_or("?"),
            status,
            detail.join("; ")
        ));
    }
    out
}

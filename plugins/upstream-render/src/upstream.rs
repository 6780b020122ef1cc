//! Service-instance keys and values, and the nginx upstream file.
//!
//! Pure Rust with no host calls, so it is unit-tested natively. It owns the
//! key shape, the value formats of the discovery sources, what counts as an
//! instance that is up, name sanitizing and the rendered text; it must not
//! know where instances are kept or write files.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;

/// Instances of one service: source name → instance id → `host:port` of
/// an instance that is up.
pub type Instances = BTreeMap<String, BTreeMap<String, String>>;

/// Splits `services/<service>/<instance>` (an optional leading `/` is
/// ignored) into the service and the instance id. The instance id may
/// contain further `/`. `None` for any other key.
pub fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key
        .strip_prefix('/')
        .unwrap_or(key)
        .strip_prefix("services/")?;
    let (service, instance) = rest.split_once('/')?;
    (!service.is_empty() && !instance.is_empty()).then_some((service, instance))
}

/// A name usable both as an nginx upstream identifier and as a file name:
/// ASCII letters, digits, `-`, `_` and `.` are kept, anything else becomes
/// `_`.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What an instance's value says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instance {
    /// Up, serving at this `host:port` (IPv6 addresses in brackets).
    Up(String),
    /// Known but not taking traffic, and why.
    Down(String),
}

/// Reads an instance value in the Consul, Nacos or etcd shape.
///
/// The address is `address`, `ip` or `host` (the first present); `port` is
/// a number or a string of digits in `1..=65535`. The instance is down when
/// `status` is present and not `passing` or `warning`, when `healthy` is
/// `false`, or when `enabled` is `false`.
///
/// # Errors
///
/// The value is not a JSON object, or has no usable address or port. An
/// address may only hold letters, digits and `.-_:%[]`, so a value cannot
/// inject nginx syntax.
pub fn parse_instance(value: &[u8]) -> Result<Instance, String> {
    let json: Value =
        serde_json::from_slice(value).map_err(|e| format!("value is not JSON: {e}"))?;
    let obj = json.as_object().ok_or("value is not a JSON object")?;

    let address = ["address", "ip", "host"]
        .iter()
        .find_map(|f| obj.get(*f).and_then(Value::as_str))
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .ok_or("no address (expected \"address\", \"ip\" or \"host\")")?;
    if !address
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%' | '[' | ']'))
    {
        return Err(format!(
            "address {address:?} has characters nginx cannot take"
        ));
    }
    let port = match obj.get("port") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
    .and_then(|p| u16::try_from(p).ok())
    .filter(|p| *p != 0)
    .ok_or("no valid \"port\" (1..=65535)")?;

    if let Some(status) = obj.get("status") {
        let status = status.as_str().unwrap_or_default();
        if !matches!(status, "passing" | "warning") {
            return Ok(Instance::Down(format!("status {status:?}")));
        }
    }
    for flag in ["healthy", "enabled"] {
        if obj.get(flag).is_some_and(|v| v != &Value::Bool(true)) {
            return Ok(Instance::Down(format!("{flag} is not true")));
        }
    }
    Ok(Instance::Up(server(address, port)))
}

/// `host:port`, bracketing a bare IPv6 address.
fn server(address: &str, port: u16) -> String {
    if address.contains(':') && !address.starts_with('[') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// Sort key for a `host:port` server: IP addresses in numeric order
/// before names, then by port.
fn order(server: &str) -> (Option<IpAddr>, &str, u16) {
    let (host, port) = server.rsplit_once(':').unwrap_or((server, ""));
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    (
        bare.parse::<IpAddr>().ok(),
        host,
        port.parse().unwrap_or_default(),
    )
}

/// The upstream file for `service` (already sanitized): every server that
/// is up in any source, sorted and deduplicated. With none up the block
/// holds one `down` placeholder, since nginx rejects an empty upstream.
pub fn render(service: &str, instances: &Instances) -> String {
    let mut servers: Vec<&str> = instances
        .values()
        .flat_map(BTreeMap::values)
        .map(String::as_str)
        .collect();
    servers.sort_by(|a, b| order(a).cmp(&order(b)));
    servers.dedup();

    let sources: Vec<&str> = instances.keys().map(String::as_str).collect();
    let from = match sources.as_slice() {
        [] => "no source".to_owned(),
        [one] => format!("source {one}"),
        many => format!("sources {}", many.join(", ")),
    };
    let mut out = format!(
        "# Generated by watchgate upstream-render from {from}; do not edit.\nupstream {service} {{\n"
    );
    if servers.is_empty() {
        out.push_str("    # No instance is up.\n    server 127.0.0.1:1 down;\n");
    }
    for s in servers {
        out.push_str("    server ");
        out.push_str(s);
        out.push_str(";\n");
    }
    out.push_str("}\n");
    out
}

/// 64-bit FNV-1a of `data`, as 16 hex digits.
pub fn fingerprint(data: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(parse_key("services/web/web-1"), Some(("web", "web-1")));
        assert_eq!(
            parse_key("/services/web/10.0.0.1:80"),
            Some(("web", "10.0.0.1:80"))
        );
        assert_eq!(parse_key("services/web/a/b"), Some(("web", "a/b")));
        assert_eq!(parse_key("services/web/"), None);
        assert_eq!(parse_key("services//x"), None);
        assert_eq!(parse_key("services/web"), None);
        assert_eq!(parse_key("config/web/x"), None);
        assert_eq!(parse_key("//services/web/x"), None);
    }

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize("web-api_v1.2"), "web-api_v1.2");
        assert_eq!(
            sanitize("DEFAULT_GROUP@@pay svc/ü"),
            "DEFAULT_GROUP__pay_svc__"
        );
    }

    #[test]
    fn consul_values() {
        let v = br#"{"id":"web-1","service":"web","address":"10.0.0.1","port":8080,
            "tags":[],"meta":{},"node":"n1","status":"passing"}"#;
        assert_eq!(parse_instance(v), Ok(Instance::Up("10.0.0.1:8080".into())));
        let warn = br#"{"address":"10.0.0.1","port":8080,"status":"warning"}"#;
        assert_eq!(
            parse_instance(warn),
            Ok(Instance::Up("10.0.0.1:8080".into()))
        );
        let crit = br#"{"address":"10.0.0.1","port":8080,"status":"critical"}"#;
        assert_eq!(
            parse_instance(crit),
            Ok(Instance::Down("status \"critical\"".into()))
        );
    }

    #[test]
    fn nacos_values() {
        let v = br#"{"service":"pay","ip":"10.0.0.2","port":9000,"healthy":true,
            "weight":1.0,"cluster":"DEFAULT","instance_id":"x","metadata":{}}"#;
        assert_eq!(parse_instance(v), Ok(Instance::Up("10.0.0.2:9000".into())));
        let sick = br#"{"ip":"10.0.0.2","port":9000,"healthy":false}"#;
        assert!(matches!(parse_instance(sick), Ok(Instance::Down(_))));
        let off = br#"{"ip":"10.0.0.2","port":9000,"enabled":false}"#;
        assert!(matches!(parse_instance(off), Ok(Instance::Down(_))));
    }

    #[test]
    fn etcd_values() {
        let v = br#"{"host":"backend.internal","port":"8443"}"#;
        assert_eq!(
            parse_instance(v),
            Ok(Instance::Up("backend.internal:8443".into()))
        );
        let v6 = br#"{"address":"fd00::1","port":80}"#;
        assert_eq!(parse_instance(v6), Ok(Instance::Up("[fd00::1]:80".into())));
    }

    #[test]
    fn bad_values() {
        for bad in [
            &b"not json"[..],
            b"[1]",
            br#"{"port":80}"#,
            br#"{"address":"","port":80}"#,
            br#"{"address":"h"}"#,
            br#"{"address":"h","port":0}"#,
            br#"{"address":"h","port":70000}"#,
            br#"{"address":"h","port":"eighty"}"#,
            br#"{"address":"1.2.3.4; include /etc/passwd","port":80}"#,
            br#"{"address":"h}","port":80}"#,
        ] {
            assert!(
                parse_instance(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn instances(list: &[(&str, &str, &str)]) -> Instances {
        let mut out = Instances::new();
        for (source, id, server) in list {
            out.entry((*source).to_owned())
                .or_default()
                .insert((*id).to_owned(), (*server).to_owned());
        }
        out
    }

    #[test]
    fn renders_sorted_unique_servers() {
        let i = instances(&[
            ("consul", "c", "10.0.0.10:8080"),
            ("consul", "b", "10.0.0.2:8080"),
            ("consul", "a", "10.0.0.2:8080"),
            ("consul", "d", "10.0.0.2:80"),
        ]);
        assert_eq!(
            render("web", &i),
            "# Generated by watchgate upstream-render from source consul; do not edit.\n\
             upstream web {\n\
             \x20   server 10.0.0.2:80;\n\
             \x20   server 10.0.0.2:8080;\n\
             \x20   server 10.0.0.10:8080;\n\
             }\n"
        );
    }

    #[test]
    fn renders_a_placeholder_when_nothing_is_up() {
        let mut i = Instances::new();
        i.insert("nacos".to_owned(), BTreeMap::new());
        assert_eq!(
            render("pay", &i),
            "# Generated by watchgate upstream-render from source nacos; do not edit.\n\
             upstream pay {\n\
             \x20   # No instance is up.\n\
             \x20   server 127.0.0.1:1 down;\n\
             }\n"
        );
    }

    #[test]
    fn names_every_source() {
        let i = instances(&[("b", "1", "h:1"), ("a", "2", "h:1")]);
        assert!(
            render("s", &i)
                .starts_with("# Generated by watchgate upstream-render from sources a, b;")
        );
    }

    #[test]
    fn fingerprints_differ() {
        assert_eq!(fingerprint(b""), "cbf29ce484222325");
        assert_ne!(fingerprint(b"a"), fingerprint(b"b"));
    }
}

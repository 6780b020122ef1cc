//! Tests of the NATS source that need no server: config parsing and
//! validation, the subject filter of a prefix, and KV operations.

use super::*;

fn parse(extra: &str) -> Result<NatsSourceConfig, String> {
    let text = format!("name = \"kv\"\nkind = \"nats\"\n{extra}");
    let c: NatsSourceConfig = toml::from_str(&text).map_err(|e| e.message().to_owned())?;
    c.validate()?;
    Ok(c)
}

#[test]
fn the_issue_example_parses_with_defaults() {
    let c = parse("url = \"nats://127.0.0.1:4222\"\nbucket = \"config\"\n").unwrap();
    assert_eq!(c.url.list(), vec!["nats://127.0.0.1:4222".to_owned()]);
    assert_eq!(c.bucket, "config");
    assert_eq!(c.prefix, "");
    assert_eq!(c.ping_interval_s, 10);
    assert_eq!(c.reconnect_max_ms, 10_000);
}

#[test]
fn several_urls_as_a_list_or_separated_by_commas() {
    let a = parse("url = \"nats://a:4222, nats://b:4222\"\nbucket = \"b\"\n").unwrap();
    let b = parse("url = [\"nats://a:4222\", \"tls://b:4222\"]\nbucket = \"b\"\n").unwrap();
    assert_eq!(a.url.list(), vec!["nats://a:4222", "nats://b:4222"]);
    assert_eq!(b.url.list(), vec!["nats://a:4222", "tls://b:4222"]);
}

#[test]
fn validation_names_the_problem() {
    let cases = [
        ("url = []\nbucket = \"b\"\n", "at least one server"),
        (
            "url = \"http://a:4222\"\nbucket = \"b\"\n",
            "url: \"http://a:4222\"",
        ),
        ("url = \"nats://a:4222\"\nbucket = \"\"\n", "bucket"),
        (
            "url = \"nats://a:4222\"\nbucket = \"a.b\"\n",
            "bucket: \"a.b\"",
        ),
        (
            "url = \"nats://a:4222\"\nbucket = \"b\"\nprefix = \".app\"\n",
            "prefix",
        ),
        (
            "url = \"nats://a:4222\"\nbucket = \"b\"\nprefix = \"a b\"\n",
            "prefix",
        ),
        (
            "url = \"nats://a:4222\"\nbucket = \"b\"\nuser = \"u\"\n",
            "`user` and `password` go together",
        ),
        (
            "url = \"nats://a:4222\"\nbucket = \"b\"\ntoken = \"t\"\ncredentials_file = \"c.creds\"\n",
            "not several",
        ),
        (
            "url = \"nats://a:4222\"\nbucket = \"b\"\nping_interval_s = 0\n",
            "ping_interval_s",
        ),
        (
            "url = \"nats://a:4222\"\nbucket = \"b\"\nreconnect_initial_ms = 0\n",
            "reconnect_initial_ms",
        ),
        (
            "url = \"nats://a:4222\"\nbucket = \"b\"\n[tls]\ncert_file = \"c.pem\"\n",
            "`cert_file` and `key_file`",
        ),
        (
            "url = \"nats://a:4222\"\nbucket = \"b\"\nbukket = 1\n",
            "bukket",
        ),
    ];
    for (text, wanted) in cases {
        let e = parse(text).expect_err(text);
        assert!(e.contains(wanted), "{text:?}: {e:?} lacks {wanted:?}");
    }
}

#[test]
fn a_prefix_ending_in_a_dot_is_filtered_by_the_server() {
    let mut c = NatsSourceConfig::new("kv", "nats://a:4222", "config");
    assert_eq!(c.filter(), ("$KV.config.>".to_owned(), ""));
    c.prefix = "app.".into();
    assert_eq!(c.filter(), ("$KV.config.app.>".to_owned(), ""));
    c.prefix = "app".into();
    assert_eq!(c.filter(), ("$KV.config.>".to_owned(), "app"));
}

#[test]
fn delete_and_purge_markers_are_deletes() {
    let mut h = async_nats::HeaderMap::new();
    assert_eq!(operation(None), Operation::Put);
    assert_eq!(operation(Some(&h)), Operation::Put);
    h.insert("KV-Operation", "DEL");
    assert_eq!(operation(Some(&h)), Operation::Delete);
    h.insert("KV-Operation", "PURGE");
    assert_eq!(operation(Some(&h)), Operation::Delete);
    let mut ttl = async_nats::HeaderMap::new();
    ttl.insert("Nats-Marker-Reason", "MaxAge");
    assert_eq!(operation(Some(&ttl)), Operation::Delete);
}

#[test]
fn the_config_file_resolves_paths_and_names_the_line_of_a_bad_value() {
    use crate::config::{Config, SourceConfig};
    let path = std::path::Path::new("/etc/watchgate/watchgate.toml");
    let text = "[[source]]\nname = \"kv\"\nkind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\n\
                bucket = \"config\"\ncredentials_file = \"app.creds\"\n\
                tls = { ca_file = \"ca.pem\" }\n";
    let config = Config::parse(path, text).unwrap();
    let SourceConfig::Nats(c) = &config.sources[0].spec else {
        panic!("not a NATS source: {:?}", config.sources[0].spec);
    };
    assert_eq!(
        c.credentials_file.as_deref(),
        Some(std::path::Path::new("/etc/watchgate/app.creds"))
    );
    let ca = c.tls.as_ref().and_then(|t| t.ca_file.as_deref());
    assert_eq!(ca, Some(std::path::Path::new("/etc/watchgate/ca.pem")));
    assert!(config.sources[0].spec.history_identity().is_some());

    // A bad value names the source's table and the key; an unknown key
    // names its own line.
    let bad = text.replace("bucket = \"config\"", "bucket = \"con fig\"");
    let e = Config::parse(path, &bad).unwrap_err().to_string();
    assert!(e.starts_with("/etc/watchgate/watchgate.toml:1:"), "{e}");
    assert!(e.contains("source[0]: bucket: \"con fig\""), "{e}");
    let unknown = text.replace("bucket = \"config\"", "bucket = \"config\"\nbukket = 1");
    let e = Config::parse(path, &unknown).unwrap_err().to_string();
    assert!(e.starts_with("/etc/watchgate/watchgate.toml:6:"), "{e}");
}

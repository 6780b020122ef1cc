use std::collections::BTreeMap;

use bytes::Bytes;

use super::tree::{Fetched, Node, child_path, parent};
use super::*;
use crate::config::{Config, SourceConfig};
use crate::event::EventKind;

fn parse(source: &str) -> Result<ZookeeperSourceConfig, String> {
    let text = format!("[[source]]\nname = \"zk\"\nkind = \"zookeeper\"\n{source}");
    match Config::parse(std::path::Path::new("/etc/wg/watchgate.toml"), &text) {
        Ok(c) => match &c.sources[0].spec {
            SourceConfig::Zookeeper(z) => Ok(z.clone()),
            other => panic!("not a zookeeper source: {other:?}"),
        },
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn parses_servers_root_and_a_duration_session_timeout() {
    let c = parse(
        "servers = [\"127.0.0.1:2181\", \"zk2:2181\"]\nroot = \"/config\"\nsession_timeout = \"4s\"\n",
    )
    .unwrap();
    assert_eq!(c.servers, ["127.0.0.1:2181", "zk2:2181"]);
    assert_eq!(c.root, "/config");
    assert_eq!(c.session_timeout, Duration::from_secs(4));
    assert_eq!(c.connect_string(), "127.0.0.1:2181,zk2:2181");
    let d = parse("servers = [\"[::1]:2181\"]\nroot = \"/\"\n").unwrap();
    assert_eq!(d.session_timeout, Duration::from_secs(10));
    assert_eq!(d.reconnect_max_ms, 10_000);
}

#[test]
fn validation_names_the_problem() {
    let cases = [
        ("servers = []\nroot = \"/a\"\n", "`servers` must list"),
        (
            "servers = [\"http://h:2181\"]\nroot = \"/a\"\n",
            "must be \"host:port\"",
        ),
        (
            "servers = [\"h\"]\nroot = \"/a\"\n",
            "must be \"host:port\"",
        ),
        (
            "servers = [\"h:0\"]\nroot = \"/a\"\n",
            "must be \"host:port\"",
        ),
        (
            "servers = [\"h:1,g:2\"]\nroot = \"/a\"\n",
            "must be \"host:port\"",
        ),
        ("servers = [\"h:1\"]\nroot = \"a\"\n", "absolute znode path"),
        (
            "servers = [\"h:1\"]\nroot = \"/a/\"\n",
            "absolute znode path",
        ),
        (
            "servers = [\"h:1\"]\nroot = \"/a//b\"\n",
            "absolute znode path",
        ),
        (
            "servers = [\"h:1\"]\nroot = \"/a/..\"\n",
            "absolute znode path",
        ),
        (
            "servers = [\"h:1\"]\nroot = \"/a\"\nsession_timeout = \"10ms\"\n",
            "session_timeout",
        ),
        (
            "servers = [\"h:1\"]\nroot = \"/a\"\nsession_timeout = 5\n",
            "expected a duration",
        ),
        (
            "servers = [\"h:1\"]\nroot = \"/a\"\nusername = \"u\"\n",
            "go together",
        ),
        (
            "servers = [\"h:1\"]\nroot = \"/a\"\nusername = \"u:x\"\npassword = \"p\"\n",
            "must not contain ':'",
        ),
        (
            "servers = [\"h:1\"]\nroot = \"/a\"\nreconnect_initial_ms = 0\n",
            "reconnect_initial_ms",
        ),
        (
            "servers = [\"h:1\"]\nroot = \"/a\"\nchroot = \"/x\"\n",
            "chroot",
        ),
        ("root = \"/a\"\n", "servers"),
    ];
    for (text, want) in cases {
        let err = parse(text).expect_err(text);
        assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
        assert!(
            err.contains("watchgate.toml:"),
            "{err:?} names no file and line"
        );
    }
}

#[test]
fn paths_join_and_split() {
    assert_eq!(child_path("/", "a"), "/a");
    assert_eq!(child_path("/a", "b"), "/a/b");
    assert_eq!(parent("/a"), "/");
    assert_eq!(parent("/a/b"), "/a");
    assert_eq!(parent("/"), "/");
}

fn watcher() -> Watcher {
    let (ctx, _rx) = SourceContext::for_test("zk");
    Watcher {
        config: parse("servers = [\"h:1\"]\nroot = \"/a\"\n").unwrap(),
        ctx,
        nodes: BTreeMap::new(),
        backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(2)),
        errors: RepeatLog::new(Duration::from_secs(60)),
    }
}

fn present(value: &str, mzxid: u64) -> Fetched {
    Fetched::Present(Node {
        value: Bytes::from(value.to_owned()),
        mzxid,
    })
}

#[test]
fn only_newer_values_are_delivered_in_zxid_order_and_removals_become_deletes() {
    let mut w = watcher();
    let first = w.changes(BTreeMap::from([
        ("/a/y".to_owned(), present("y1", 7)),
        ("/a/x".to_owned(), present("x1", 5)),
        ("/a/gone".to_owned(), Fetched::Absent(6)),
    ]));
    let got: Vec<_> = first
        .iter()
        .map(|e| (e.key.to_string(), e.revision))
        .collect();
    assert_eq!(got, [("/a/x".to_owned(), 5), ("/a/y".to_owned(), 7)]);

    // A fetch no newer than what was delivered is dropped; a newer one
    // carries the old value as prev; a removal gets its zxid.
    let second = w.changes(BTreeMap::from([
        ("/a/x".to_owned(), present("x1", 5)),
        ("/a/y".to_owned(), present("y2", 9)),
        ("/a/x2".to_owned(), Fetched::Absent(3)),
    ]));
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].value.as_deref(), Some(&b"y2"[..]));
    assert_eq!(second[0].prev_value.as_deref(), Some(&b"y1"[..]));

    let third = w.changes(BTreeMap::from([("/a/x".to_owned(), Fetched::Absent(11))]));
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].kind, EventKind::Delete);
    assert_eq!(third[0].revision, 11);
    assert_eq!(third[0].prev_value.as_deref(), Some(&b"x1"[..]));
    assert!(
        w.changes(BTreeMap::from([("/a/x".to_owned(), Fetched::Absent(12))]))
            .is_empty()
    );
}

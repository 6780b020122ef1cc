//! Tests of the etcd source that need no cluster: the key range of a
//! prefix, and the messages of config validation.

use super::*;

#[test]
fn prefix_ranges() {
    assert_eq!(prefix_range(""), (vec![0], vec![0]));
    assert_eq!(prefix_range("/a"), (b"/a".to_vec(), b"/b".to_vec()));
    assert_eq!(
        prefix_range("a\u{7f}"),
        (b"a\x7f".to_vec(), b"a\x80".to_vec())
    );
}

#[test]
fn validation_names_the_problem() {
    let c = EtcdSourceConfig::new("e", vec![]);
    assert!(c.validate().unwrap_err().contains("endpoints"));
    let c = EtcdSourceConfig::new("e", vec!["127.0.0.1:2379".into()]);
    assert!(c.validate().unwrap_err().contains("URL"));
    let mut c = EtcdSourceConfig::new("e", vec!["http://127.0.0.1:2379".into()]);
    c.keepalive_interval_s = 1;
    assert!(c.validate().unwrap_err().contains("too many pings"));
    let mut c = EtcdSourceConfig::new("e", vec!["http://127.0.0.1:2379".into()]);
    c.username = Some("u".into());
    assert!(c.validate().unwrap_err().contains("password"));
}

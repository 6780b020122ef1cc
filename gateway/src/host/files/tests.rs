//! Tests of the `files` grant.

use super::*;

const ROOMY: FilesQuota = FilesQuota {
    bytes: 1 << 20,
    entries: 100,
};

#[test]
fn writes_inside_and_refuses_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let g = FilesGrant::new(&dir.path().join("grant"), ROOMY).unwrap();
    g.append("a/log.txt", b"one\n").unwrap();
    g.append("a/log.txt", b"two\n").unwrap();
    g.replace("out.conf", b"v1").unwrap();
    g.replace("./out.conf", b"v2").unwrap();
    assert_eq!(
        std::fs::read_to_string(g.root().join("a/log.txt")).unwrap(),
        "one\ntwo\n"
    );
    assert_eq!(
        std::fs::read_to_string(g.root().join("out.conf")).unwrap(),
        "v2"
    );
    for bad in ["", "../x", "a/../../x", "/etc/passwd", ".", "a/\0b"] {
        assert!(
            matches!(g.append(bad, b"x"), Err(FilesError::BadPath { .. })),
            "{bad:?} was accepted"
        );
    }
    std::os::unix::fs::symlink(outside.path(), g.root().join("escape")).unwrap();
    assert!(matches!(
        g.replace("escape/x", b"x"),
        Err(FilesError::BadPath { .. })
    ));
    std::os::unix::fs::symlink(outside.path().join("f"), g.root().join("link")).unwrap();
    assert!(matches!(
        g.append("link", b"x"),
        Err(FilesError::BadPath { .. })
    ));
    // Through a file, as if it were a directory.
    assert!(matches!(
        g.append("out.conf/x", b"x"),
        Err(FilesError::BadPath { .. })
    ));
    assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    // No temporary files are left behind by replace.
    assert_no_temporary_files(g.root());
}

/// A grant of at most 1000 bytes and 5 entries.
/// `replace` left none of its temporary files in `dir`.
fn assert_no_temporary_files(dir: &Path) {
    let names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".watchgate-")),
        "{names:?}"
    );
}

fn small(root: &Path) -> FilesGrant {
    FilesGrant::new(
        root,
        FilesQuota {
            bytes: 1000,
            entries: 5,
        },
    )
    .unwrap()
}

fn quota_message(r: Result<(), FilesError>) -> String {
    match r {
        Err(e @ FilesError::Quota { .. }) => e.to_string(),
        other => panic!("expected a quota refusal, got {other:?}"),
    }
}

#[test]
fn append_stops_at_the_byte_quota_and_writes_nothing_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let g = small(dir.path());
    for _ in 0..9 {
        g.append("log", &[b'x'; 100]).unwrap();
    }
    g.append("log", &[b'x'; 100]).unwrap();
    let message = quota_message(g.append("log", b"y"));
    assert!(
        message.contains("1000 bytes are in use of the 1000 allowed (limits.files_mb")
            && message.contains("needs 1 more")
            && message.starts_with("append \"log\" refused"),
        "{message}"
    );
    assert_eq!(
        std::fs::metadata(dir.path().join("log")).unwrap().len(),
        1000
    );
    assert_eq!(
        g.usage(),
        FilesUsage {
            bytes: 1000,
            entries: 1
        }
    );
    // Writing nothing needs no room.
    g.append("log", b"").unwrap();
}

#[test]
fn files_and_the_directories_made_for_them_count_as_entries() {
    let dir = tempfile::tempdir().unwrap();
    let g = small(dir.path());
    // a, a/b, a/b/c, a/b/c/f: four entries.
    g.append("a/b/c/f", b"1").unwrap();
    assert_eq!(g.usage().entries, 4);
    // Two more directories and a file would make seven.
    let message = quota_message(g.append("a/x/y/f", b"1"));
    assert!(
        message.contains(
            "4 files and directories are in use of the 5 allowed (limits.files_count); this write needs 3 more"
        ),
        "{message}"
    );
    assert!(
        !dir.path().join("a/x").exists(),
        "a refused write made a directory"
    );
    g.append("a/g", b"1").unwrap();
    // Full: appending to a file that exists still works.
    g.append("a/b/c/f", b"2").unwrap();
    quota_message(g.append("a/h", b"1"));
    assert_eq!(g.usage(), measure(dir.path()));
}

#[test]
fn replace_counts_the_new_size_less_the_old_and_its_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let g = small(dir.path());
    g.replace("conf", &[b'a'; 600]).unwrap();
    assert_eq!(
        g.usage(),
        FilesUsage {
            bytes: 600,
            entries: 1
        }
    );
    // 600 more beside the old 600 do not fit while both exist.
    let message = quota_message(g.replace("conf", &[b'b'; 600]));
    assert!(
        message.contains("600 bytes are in use") && message.contains("beside the old ones"),
        "{message}"
    );
    assert_eq!(std::fs::read(dir.path().join("conf")).unwrap(), [b'a'; 600]);
    // Smaller contents fit, and the count drops to them.
    g.replace("conf", &[b'c'; 300]).unwrap();
    assert_eq!(g.usage().bytes, 300);
    g.replace("conf", &[b'd'; 700]).unwrap();
    assert_eq!(g.usage().bytes, 700);
    assert_eq!(g.usage(), measure(dir.path()));
    // Four entries in use: a replace of an existing file needs one more
    // for its temporary file, a new file in a new directory three.
    for f in ["x", "y", "z"] {
        g.append(f, b"").unwrap();
    }
    g.replace("conf", &[b'e'; 10]).unwrap();
    quota_message(g.replace("d/new", b"1"));
    assert_no_temporary_files(dir.path());
}

#[test]
fn what_is_on_disk_counts_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("old")).unwrap();
    std::fs::write(dir.path().join("old/data"), [0; 900]).unwrap();
    // A leftover temporary file of an interrupted replace.
    std::fs::write(dir.path().join(".watchgate-abc"), [0; 50]).unwrap();
    let g = small(dir.path());
    assert_eq!(
        g.usage(),
        FilesUsage {
            bytes: 950,
            entries: 3
        }
    );
    quota_message(g.append("new", &[0; 51]));
    g.append("new", &[0; 50]).unwrap();
    // A new grant on the same directory (a restart) starts from the
    // disk, not from zero.
    let again = small(dir.path());
    assert_eq!(again.usage(), g.usage());
    quota_message(again.append("new", b"1"));
}

#[test]
fn room_the_operator_makes_is_found_by_the_next_refused_write() {
    let dir = tempfile::tempdir().unwrap();
    let g = small(dir.path());
    g.append("events.log", &[b'x'; 1000]).unwrap();
    quota_message(g.append("events.log", b"y"));
    // The operator rotates the log away.
    std::fs::remove_file(dir.path().join("events.log")).unwrap();
    // Within REMEASURE of the last look, the count stands.
    quota_message(g.append("events.log", b"y"));
    g.counted.lock().measured = Some(Instant::now() - REMEASURE);
    g.append("events.log", b"y").unwrap();
    assert_eq!(
        g.usage(),
        FilesUsage {
            bytes: 1,
            entries: 1
        }
    );
}

#[test]
fn read_rename_and_remove_stay_inside_and_keep_the_count() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"s").unwrap();
    let g = small(dir.path());
    assert_eq!(g.read("missing").unwrap(), None);
    assert_eq!(g.read("no/such/dir").unwrap(), None);
    g.replace("a.new", &[b'n'; 300]).unwrap();
    g.replace("a", &[b'o'; 200]).unwrap();
    assert_eq!(g.read("a").unwrap().unwrap(), [b'o'; 200]);
    // Rename over: the old `a` stops counting.
    g.rename("a.new", "a").unwrap();
    assert_eq!(g.read("a").unwrap().unwrap(), [b'n'; 300]);
    assert_eq!(g.read("a.new").unwrap(), None);
    assert_eq!(
        g.usage(),
        FilesUsage {
            bytes: 300,
            entries: 1
        }
    );
    // Into a new directory: the directory counts.
    g.rename("a", "d/a").unwrap();
    assert_eq!(g.usage(), measure(dir.path()));
    assert!(matches!(g.rename("gone", "x"), Err(FilesError::Io { .. })));
    g.remove("d/a").unwrap();
    g.remove("d/a").unwrap();
    g.remove("never").unwrap();
    assert_eq!(g.usage(), measure(dir.path()));
    for bad in ["../x", "/etc/passwd", "a/../../x", ""] {
        assert!(matches!(g.read(bad), Err(FilesError::BadPath { .. })));
        assert!(matches!(g.remove(bad), Err(FilesError::BadPath { .. })));
        assert!(matches!(
            g.rename("nope", bad),
            Err(FilesError::BadPath { .. })
        ));
        assert!(matches!(g.resolve(bad), Err(FilesError::BadPath { .. })));
    }
    std::os::unix::fs::symlink(outside.path(), g.root().join("out")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), g.root().join("s")).unwrap();
    for bad in ["out/secret", "s"] {
        assert!(
            matches!(g.read(bad), Err(FilesError::BadPath { .. })),
            "{bad}"
        );
        assert!(matches!(g.remove(bad), Err(FilesError::BadPath { .. })));
    }
    assert!(matches!(
        g.rename("nope", "out/x"),
        Err(FilesError::BadPath { .. })
    ));
    assert!(outside.path().join("secret").exists());
    assert_eq!(
        g.resolve("d/conf").unwrap(),
        dir.path().canonicalize().unwrap().join("d/conf")
    );
}

#[test]
fn a_read_past_the_bound_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let g = small(dir.path());
    // Put there by the operator: past the 1000-byte quota.
    std::fs::write(dir.path().join("big"), [0; 1001]).unwrap();
    match g.read("big") {
        Err(e @ FilesError::TooLarge { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains("at most 1000 bytes") && m.contains("files_mb"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(g.read_bound(), 1000);
    assert_eq!(
        FilesGrant::new(dir.path(), ROOMY).unwrap().read_bound(),
        1 << 20
    );
}

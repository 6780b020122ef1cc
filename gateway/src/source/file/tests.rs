//! Tests of the file source against real directories: the snapshot, the
//! changes it reports, renames and symlink swaps, skipped paths, a vanished
//! or replaced directory, and shutdown.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;

use notify::EventKind;
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
use tokio::task::JoinHandle;

use super::scan::{covers, key_of};
use super::watch::changes_tree;
use super::*;
use crate::event::EventKind as Kind;

/// How long any expected condition may take.
const DEADLINE: Duration = Duration::from_secs(10);

fn config(root: &Path) -> FileSourceConfig {
    let mut config = FileSourceConfig::new("files", root);
    config.rescan_interval_s = 0;
    config
}

/// A running source and what it emitted.
struct Running {
    ctx: SourceContext,
    rx: tokio::sync::mpsc::UnboundedReceiver<Vec<Event>>,
    task: JoinHandle<anyhow::Result<()>>,
    revision: u64,
    sentinels: u32,
}

impl Running {
    fn start(config: FileSourceConfig) -> Running {
        let (ctx, rx) = SourceContext::for_test("files");
        let task = tokio::spawn(Box::new(FileSource::new(config)).run(ctx.clone()));
        Running {
            ctx,
            rx,
            task,
            revision: 0,
            sentinels: 0,
        }
    }

    /// The next batch, checked: non-empty, sorted, one revision which
    /// is the previous batch's plus one.
    async fn batch(&mut self) -> Vec<Event> {
        let batch = tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .expect("no batch within the deadline")
            .expect("the source stopped");
        assert!(!batch.is_empty());
        assert!(
            batch.windows(2).all(|w| w[0].key < w[1].key),
            "unsorted: {batch:?}"
        );
        assert!(
            batch.iter().all(|e| e.revision == self.revision + 1),
            "after revision {}: {batch:?}",
            self.revision
        );
        self.revision += 1;
        batch
    }

    /// Write a sentinel file into `dir` and return every event up to
    /// and including the batch that reports it, without the sentinel's
    /// own: exactly what changed before it, however the rescans split.
    async fn changes_before_sentinel(&mut self, dir: &Path) -> Vec<Event> {
        self.sentinels += 1;
        let name = format!("zz-sentinel-{}", self.sentinels);
        fs::write(dir.join(&name), "sentinel").unwrap();
        let mut events = Vec::new();
        loop {
            let batch = self.batch().await;
            let seen = batch.iter().any(|e| *e.key == *name);
            events.extend(batch.into_iter().filter(|e| *e.key != *name));
            if seen {
                return events;
            }
        }
    }

    async fn wait_for(&self, what: &str, condition: impl Fn(&SourceContext) -> bool) {
        tokio::time::timeout(DEADLINE, async {
            while !condition(&self.ctx) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("not {what} within the deadline"));
    }

    async fn stop(self) {
        self.ctx.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the source did not stop")
            .expect("the source panicked")
            .expect("the source failed");
    }
}

/// A source started on a new temporary directory holding `files` (name,
/// contents); the directory lives as long as the returned guard.
fn start_in_new_dir(files: &[(&str, &str)]) -> (tempfile::TempDir, Running) {
    let dir = tempfile::tempdir().unwrap();
    for (name, contents) in files {
        fs::write(dir.path().join(name), contents).unwrap();
    }
    let source = Running::start(config(dir.path()));
    (dir, source)
}

/// One line per event, for readable assertions.
fn brief(events: &[Event]) -> Vec<String> {
    let text = |b: &Option<Bytes>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
    events
        .iter()
        .map(|e| match e.kind {
            Kind::Put => format!(
                "put {}={:?} prev={:?}",
                e.key,
                text(&e.value).unwrap(),
                text(&e.prev_value)
            ),
            Kind::Delete => format!("delete {} prev={:?}", e.key, text(&e.prev_value)),
        })
        .collect()
}

/// The events folded per key (later value, earliest previous value).
fn folded(events: Vec<Event>) -> Vec<Event> {
    let mut by_key: BTreeMap<String, Event> = BTreeMap::new();
    for event in events {
        match by_key.get_mut(&*event.key) {
            Some(first) => first.absorb(event),
            None => {
                by_key.insert(event.key.to_string(), event);
            }
        }
    }
    by_key.into_values().collect()
}

#[cfg(unix)]
fn symlink(target: impl AsRef<Path>, link: impl AsRef<Path>) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

#[tokio::test]
async fn initial_snapshot_is_one_batch_of_puts_at_revision_1() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::create_dir_all(root.join(".hidden-dir")).unwrap();
    fs::write(root.join("a.txt"), "a").unwrap();
    fs::write(root.join("dir/b.txt"), "b").unwrap();
    fs::write(root.join("dir/sub/c.txt"), "c").unwrap();
    fs::write(root.join(".hidden"), "h").unwrap();
    fs::write(root.join("dir/.hidden"), "h").unwrap();
    fs::write(root.join(".hidden-dir/x"), "x").unwrap();
    #[cfg(unix)]
    symlink("..", root.join("dir/loop"));

    let mut source = Running::start(config(root));
    let batch = source.batch().await;
    assert_eq!(
        brief(&batch),
        [
            r#"put a.txt="a" prev=None"#,
            r#"put dir/b.txt="b" prev=None"#,
            r#"put dir/sub/c.txt="c" prev=None"#,
        ]
    );
    assert!(
        batch
            .iter()
            .all(|e| e.revision == 1 && !e.resync && &*e.source == "files")
    );
    assert!(source.ctx.status.is_synced());
    assert!(source.ctx.status.is_connected());
    source.stop().await;
}

#[tokio::test]
async fn an_empty_directory_syncs_with_an_empty_snapshot_at_revision_1() {
    let (dir, mut source) = start_in_new_dir(&[]);
    source
        .wait_for("synced", |ctx| ctx.status.is_synced())
        .await;
    // The empty snapshot is still delivered (a restarted source's sink
    // must learn that every key is gone), as revision 1.
    let first = tokio::time::timeout(DEADLINE, source.rx.recv())
        .await
        .expect("the snapshot within the deadline")
        .expect("the source stopped");
    assert!(first.is_empty(), "{first:?}");
    source.revision = 1;
    let events = source.changes_before_sentinel(dir.path()).await;
    assert_eq!(brief(&events), Vec::<String>::new());
    assert_eq!(source.revision, 2);
    source.stop().await;
}

#[tokio::test]
async fn create_modify_and_delete_carry_previous_values() {
    let (dir, mut source) = start_in_new_dir(&[("a", "1")]);
    let root = dir.path();
    assert_eq!(brief(&source.batch().await), [r#"put a="1" prev=None"#]);

    // Create, in place (a rescan may see it half-written: fold).
    fs::create_dir(root.join("new")).unwrap();
    fs::write(root.join("new/b"), "x").unwrap();
    let events = source.changes_before_sentinel(root).await;
    assert!(events.iter().all(|e| e.kind == Kind::Put), "{events:?}");
    assert_eq!(brief(&folded(events)), [r#"put new/b="x" prev=None"#]);

    // Modify in place.
    fs::write(root.join("a"), "2").unwrap();
    let events = source.changes_before_sentinel(root).await;
    assert!(events.iter().all(|e| e.kind == Kind::Put), "{events:?}");
    assert_eq!(brief(&folded(events)), [r#"put a="2" prev=Some("1")"#]);

    // Delete.
    fs::remove_file(root.join("new/b")).unwrap();
    let events = source.changes_before_sentinel(root).await;
    assert_eq!(brief(&events), [r#"delete new/b prev=Some("x")"#]);
    source.stop().await;
}

#[tokio::test]
async fn an_atomic_rename_is_one_put_of_the_target() {
    let (dir, mut source) = start_in_new_dir(&[("app.conf", "v1")]);
    let root = dir.path();
    source.batch().await;

    fs::write(root.join(".app.conf.tmp"), "v2").unwrap();
    fs::rename(root.join(".app.conf.tmp"), root.join("app.conf")).unwrap();
    let events = source.changes_before_sentinel(root).await;
    assert_eq!(brief(&events), [r#"put app.conf="v2" prev=Some("v1")"#]);
    assert!(!events[0].resync);
    source.stop().await;
}

/// What kubelet's atomic writer does to a ConfigMap volume.
#[cfg(unix)]
#[tokio::test]
async fn a_configmap_symlink_swap_reports_only_real_changes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let version = |name: &str, files: &[(&str, &str)]| {
        fs::create_dir(root.join(name)).unwrap();
        for (key, value) in files {
            fs::write(root.join(name).join(key), value).unwrap();
        }
    };
    version(
        "..2024_01_01_00_00_00.1",
        &[("changed", "old"), ("same", "same"), ("removed", "bye")],
    );
    symlink("..2024_01_01_00_00_00.1", root.join("..data"));
    for key in ["changed", "same", "removed"] {
        symlink(format!("..data/{key}"), root.join(key));
    }
    let mut source = Running::start(config(root));
    assert_eq!(
        brief(&source.batch().await),
        [
            r#"put changed="old" prev=None"#,
            r#"put removed="bye" prev=None"#,
            r#"put same="same" prev=None"#,
        ]
    );

    version(
        "..2024_01_02_00_00_00.2",
        &[("changed", "new"), ("same", "same")],
    );
    symlink("..2024_01_02_00_00_00.2", root.join("..data_tmp"));
    fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    fs::remove_file(root.join("removed")).unwrap();
    fs::remove_dir_all(root.join("..2024_01_01_00_00_00.1")).unwrap();

    let events = source.changes_before_sentinel(root).await;
    assert_eq!(
        brief(&events),
        [
            r#"put changed="new" prev=Some("old")"#,
            r#"delete removed prev=Some("bye")"#
        ]
    );
    source.stop().await;
}

#[tokio::test]
async fn binary_values_pass_oversized_files_and_odd_paths_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::write(root.join("bin"), [0xff, 0x00, 0xfe]).unwrap();
    fs::write(root.join("big"), "0123456789abcdef").unwrap();
    fs::write(root.join("small"), "tiny").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt as _;
        fs::write(root.join(OsStr::from_bytes(b"not-utf8-\xff")), "x").unwrap();
    }
    let mut cfg = config(root);
    cfg.max_value_bytes = 8;
    let mut source = Running::start(cfg);
    let batch = source.batch().await;
    let keys: Vec<&str> = batch.iter().map(|e| &*e.key).collect();
    assert_eq!(keys, ["bin", "small"]);
    assert_eq!(batch[0].value.as_deref(), Some(&[0xff, 0x00, 0xfe][..]));

    // Shrunk under the limit: it appears.
    fs::write(root.join(".big.tmp"), "fits").unwrap();
    fs::rename(root.join(".big.tmp"), root.join("big")).unwrap();
    let events = source.changes_before_sentinel(root).await;
    assert_eq!(brief(&events), [r#"put big="fits" prev=None"#]);

    // Grown over it again: it is gone.
    fs::write(root.join(".big.tmp"), "far too large").unwrap();
    fs::rename(root.join(".big.tmp"), root.join("big")).unwrap();
    let events = source.changes_before_sentinel(root).await;
    assert_eq!(brief(&events), [r#"delete big prev=Some("fits")"#]);
    source.stop().await;
}

#[tokio::test]
async fn a_missing_directory_at_start_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let (ctx, _rx) = SourceContext::for_test("files");
    let err = Box::new(FileSource::new(config(&missing)))
        .run(ctx.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(!ctx.status.is_synced());

    let file = dir.path().join("file");
    fs::write(&file, "x").unwrap();
    let err = Box::new(FileSource::new(config(&file)))
        .run(ctx)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("not a directory"), "{err}");
}

#[tokio::test]
async fn shutdown_returns_promptly_even_while_debouncing() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a"), "1").unwrap();
    let mut cfg = config(dir.path());
    cfg.debounce_ms = 60_000;
    cfg.rescan_interval_s = 3600;
    let mut source = Running::start(cfg);
    source.batch().await;
    // Let a change start a (very long) debounce, then stop.
    fs::write(dir.path().join("a"), "2").unwrap();
    let started = std::time::Instant::now();
    source.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_millis(500), "shutdown took {took:?}");
}

#[tokio::test]
async fn a_vanished_directory_is_deleted_then_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("conf");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("a"), "1").unwrap();
    fs::write(root.join("b"), "2").unwrap();
    let mut source = Running::start(config(&root));
    source.batch().await;

    fs::rename(&root, dir.path().join("conf.gone")).unwrap();
    let batch = source.batch().await;
    assert_eq!(
        brief(&batch),
        [r#"delete a prev=Some("1")"#, r#"delete b prev=Some("2")"#]
    );
    let report = source.ctx.status.report();
    assert!(!report.connected);
    assert!(report.last_error.unwrap().contains("does not exist"));

    let back = dir.path().join("conf.new");
    fs::create_dir(&back).unwrap();
    fs::write(back.join("a"), "1").unwrap();
    fs::write(back.join("c"), "3").unwrap();
    fs::rename(&back, &root).unwrap();
    let batch = source.batch().await;
    assert_eq!(
        brief(&batch),
        [r#"put a="1" prev=None"#, r#"put c="3" prev=None"#]
    );
    assert!(batch.iter().all(|e| e.resync));
    let report = source.ctx.status.report();
    assert!(report.connected);
    assert!(report.reconnects >= 1);
    assert_eq!(report.last_error, None);

    // And the new directory is watched.
    let events = source.changes_before_sentinel(&root).await;
    assert!(events.is_empty(), "{events:?}");
    source.stop().await;
}

#[tokio::test]
async fn a_replaced_directory_is_diffed_and_watched_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("conf");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("same"), "s").unwrap();
    fs::write(root.join("changed"), "old").unwrap();
    fs::write(root.join("removed"), "r").unwrap();
    let mut source = Running::start(config(&root));
    source.batch().await;

    let new = dir.path().join("conf.new");
    fs::create_dir(&new).unwrap();
    fs::write(new.join("same"), "s").unwrap();
    fs::write(new.join("changed"), "new").unwrap();
    fs::rename(&root, dir.path().join("conf.old")).unwrap();
    fs::rename(&new, &root).unwrap();

    // Usually one diff; if a rescan fell between the two renames, the
    // keys were deleted and put back. Either way the net change is:
    let events = source.changes_before_sentinel(&root).await;
    let net: Vec<Event> = folded(events)
        .into_iter()
        .filter(|e| e.value != e.prev_value)
        .collect();
    assert_eq!(
        brief(&net),
        [
            r#"put changed="new" prev=Some("old")"#,
            r#"delete removed prev=Some("r")"#
        ]
    );
    assert!(source.ctx.status.is_connected());
    source.stop().await;
}

#[cfg(unix)]
#[tokio::test]
async fn the_periodic_rescan_catches_what_no_notification_reports() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("conf");
    let outside = dir.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("target"), "1").unwrap();
    symlink(outside.join("target"), root.join("link"));
    let mut cfg = config(&root);
    cfg.rescan_interval_s = 1;
    let mut source = Running::start(cfg);
    assert_eq!(brief(&source.batch().await), [r#"put link="1" prev=None"#]);

    // The target's directory is not watched: only the rescan sees this.
    fs::write(outside.join(".tmp"), "2").unwrap();
    fs::rename(outside.join(".tmp"), outside.join("target")).unwrap();
    let batch = source.batch().await;
    assert_eq!(brief(&batch), [r#"put link="2" prev=Some("1")"#]);
    assert!(batch[0].resync);
    source.stop().await;
}

#[test]
fn only_notifications_that_can_change_the_tree_count() {
    assert!(!changes_tree(&EventKind::Access(AccessKind::Open(
        AccessMode::Any
    ))));
    assert!(!changes_tree(&EventKind::Access(AccessKind::Close(
        AccessMode::Read
    ))));
    assert!(changes_tree(&EventKind::Access(AccessKind::Close(
        AccessMode::Write
    ))));
    assert!(changes_tree(&EventKind::Create(CreateKind::File)));
    assert!(changes_tree(&EventKind::Modify(ModifyKind::Any)));
    assert!(changes_tree(&EventKind::Other));
}

#[test]
fn keys_use_slashes_and_unreadable_paths_cover_their_children() {
    let root = Path::new("/srv/conf");
    assert_eq!(
        key_of(root, &root.join("a").join("b.txt")).as_deref(),
        Some("a/b.txt")
    );
    assert!(covers("a", "a"));
    assert!(covers("a", "a/b"));
    assert!(!covers("a", "ab"));
}

#[test]
fn diff_is_sorted_and_carries_previous_values() {
    let src: Arc<str> = Arc::from("files");
    let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, Bytes> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Bytes::copy_from_slice(v.as_bytes())))
            .collect()
    };
    let old = map(&[("b", "1"), ("c", "same"), ("d", "gone")]);
    let new = map(&[("a", "new"), ("b", "2"), ("c", "same")]);
    let events = diff(&src, &old, &new, 7, false);
    assert_eq!(
        brief(&events),
        [
            r#"put a="new" prev=None"#,
            r#"put b="2" prev=Some("1")"#,
            r#"delete d prev=Some("gone")"#,
        ]
    );
    assert!(events.iter().all(|e| e.revision == 7));
    assert!(diff(&src, &new, &new, 8, false).is_empty());
}

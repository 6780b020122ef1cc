//! Tests of the store: what survives a reopen, how an unusable file is
//! reported, and that the writer's pacing never delays a flush or a change.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;

struct Fixed(Vec<(Arc<str>, u64)>);
impl CursorProbe for Fixed {
    fn cursors(&self) -> Vec<(Arc<str>, u64)> {
        self.0.clone()
    }
}

type Changes = IndexChanges;

/// Changes handed over once.
struct Index(Arc<str>, Mutex<Option<Changes>>);
impl IndexProbe for Index {
    fn source(&self) -> Arc<str> {
        self.0.clone()
    }
    fn take_changes(&self) -> Option<Changes> {
        self.1.lock().take()
    }
    fn written(&self, _: u64) {}
    fn unwritten(&self, _: Vec<Arc<str>>) {}
}

fn entry(v: &str, seq: u64) -> KeyEntry {
    KeyEntry {
        value: Some(Bytes::from(v.to_owned())),
        revision: seq,
        seq,
        metadata: vec![],
    }
}

/// An index whose first change set takes `slow` to hand over, busy
/// (`spin`: as a large commit would) or asleep (as a commit waiting
/// for a slow disk or for a core would), and that counts its commits.
struct SlowFirst {
    slow: Duration,
    spin: bool,
    changed: std::sync::atomic::AtomicBool,
    first: std::sync::atomic::AtomicBool,
    written: std::sync::atomic::AtomicUsize,
}
impl SlowFirst {
    fn new(slow: Duration, spin: bool) -> Arc<Self> {
        Arc::new(SlowFirst {
            slow,
            spin,
            changed: true.into(),
            first: true.into(),
            written: 0.into(),
        })
    }
    fn written(&self) -> usize {
        self.written.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Wait for `n` commits; how long it took.
    fn wait_written(&self, n: usize) -> Duration {
        let asked = Instant::now();
        while self.written() < n {
            assert!(
                asked.elapsed() < Duration::from_secs(30),
                "commit {n} never came"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        asked.elapsed()
    }
}
impl IndexProbe for SlowFirst {
    fn source(&self) -> Arc<str> {
        Arc::from("slow")
    }
    fn take_changes(&self) -> Option<Changes> {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.changed.swap(false, SeqCst) {
            return None;
        }
        if self.first.swap(false, SeqCst) {
            let until = Instant::now() + self.slow;
            if self.spin {
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::sleep(self.slow);
            }
        }
        Some((
            vec![(Arc::from("k"), Some(entry("v", 1)))],
            SourceMeta::default(),
        ))
    }
    fn written(&self, _: u64) {
        self.written
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn unwritten(&self, _: Vec<Arc<str>>) {}
}

/// A store whose [`SlowFirst`] index has made its slow first commit and
/// has just changed again, with the writer woken for it.
fn changed_after_a_slow_commit(slow: Duration, spin: bool) -> (Store, Arc<SlowFirst>) {
    let store = Store::in_memory();
    let probe = SlowFirst::new(slow, spin);
    store.register_index(probe.clone());
    store.wake();
    probe.wait_written(1);
    probe
        .changed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    store.wake();
    (store, probe)
}

#[test]
fn a_flush_does_not_wait_out_the_pause_after_a_slow_commit() {
    let slow = Duration::from_millis(300);
    // After the slow commit the writer gathers for 7 × 300 ms of CPU
    // before its next one; a flush must not wait for that.
    let (store, probe) = changed_after_a_slow_commit(slow, true);
    let asked = Instant::now();
    store.flush();
    let waited = asked.elapsed();
    assert!(
        waited < slow * 3,
        "the flush waited {waited:?}, the pause after the slow commit"
    );
    assert_eq!(probe.written(), 2);
    assert_eq!(store.load_keys("slow").len(), 1);
}

#[test]
fn a_commit_slow_only_in_waiting_does_not_delay_the_next() {
    // 500 ms asleep: a sync on a loaded disk, or a core taken by
    // others. Paced by wall time, the next change would wait 3.5 s.
    let slow = Duration::from_millis(500);
    let (_store, probe) = changed_after_a_slow_commit(slow, false);
    let waited = probe.wait_written(2);
    assert!(
        waited < slow * 2,
        "the next change waited {waited:?} after a commit that only waited"
    );
}

#[test]
fn everything_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<str> = Arc::from("etcd");
    {
        let store = Store::open(dir.path()).unwrap();
        store.register_index(Arc::new(Index(
            s.clone(),
            Mutex::new(Some((
                vec![
                    ("a".into(), Some(entry("1", 3))),
                    ("b".into(), Some(entry("2", 4))),
                    ("gone".into(), None),
                ],
                SourceMeta {
                    last_seq: 4,
                    ..SourceMeta::default()
                },
            ))),
        )));
        store.register_index(Arc::new(Index(
            Arc::from("other"),
            Mutex::new(Some((
                vec![("a".into(), Some(entry("x", 1)))],
                SourceMeta::default(),
            ))),
        )));
        store.register("p", Arc::new(Fixed(vec![(s.clone(), 3)])));
        store
            .set_plugin_state("p", "k", Some(b"v"), Instant::now())
            .unwrap();
        let line = crate::event::Event::put(&s, "a", Bytes::from_static(b"1"), 3).to_line();
        let d = store
            .add_dead_letter(
                "p",
                DeadLetter {
                    id: 0,
                    event: line,
                    seq: 3,
                    outcome: "trap".into(),
                    error: "boom".into(),
                    attempts: 3,
                    at: 0,
                },
                DeadLetterCap::default(),
            )
            .letter;
        assert_eq!(d.id, 1);
        store.flush();
        store.close();
    }
    let store = Store::open(dir.path()).unwrap();
    let keys = store.load_keys("etcd");
    assert_eq!(keys.len(), 2);
    assert_eq!(keys["b"], entry("2", 4));
    assert_eq!(store.source_meta("etcd").last_seq, 4);
    assert_eq!(store.cursor("p", "etcd"), Some(3));
    assert_eq!(store.plugin_state("p"), vec![("k".into(), b"v".to_vec())]);
    let dl = store.dead_letters("p");
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].error, "boom");
    // New ids never reuse old ones.
    let line = dl[0].event.clone();
    let d = store
        .add_dead_letter(
            "p",
            DeadLetter {
                id: 0,
                ..dl[0].clone()
            },
            DeadLetterCap::default(),
        )
        .letter;
    assert_eq!(d.id, 2);
    assert_eq!(d.event, line);
}

#[test]
fn a_second_open_is_refused_and_garbage_is_reported_not_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::InUse { .. })
    ));
    assert!(
        Store::reset(dir.path()).is_err(),
        "reset refuses a store in use"
    );
    store.close();
    drop(store);

    let bad = tempfile::tempdir().unwrap();
    std::fs::write(bad.path().join(FILE_NAME), vec![7u8; 8192]).unwrap();
    let Err(err) = Store::open(bad.path()) else {
        panic!("garbage must not open")
    };
    assert!(matches!(err, StoreError::Unreadable { .. }), "{err}");
    assert!(err.to_string().contains("watchgate state reset"), "{err}");
    assert_eq!(
        std::fs::read(bad.path().join(FILE_NAME)).unwrap(),
        vec![7u8; 8192]
    );
    let moved = Store::reset(bad.path()).unwrap().unwrap();
    assert_eq!(std::fs::read(&moved).unwrap(), vec![7u8; 8192]);
    Store::open(bad.path()).expect("starts empty after a reset");
}

#[test]
fn cursors_in_reads_each_plugins_cursor_of_one_source_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (s, t): (Arc<str>, Arc<str>) = (Arc::from("s"), Arc::from("t"));
    store.set_cursor("a", &s, 7);
    store.set_cursor("b", &s, 3);
    store.set_cursor("b", &t, 9);
    store.flush();
    assert_eq!(
        store.cursors_in("s", &["b", "none", "a"]),
        [Some(3), None, Some(7)]
    );
}

/// A dead letter of `plugin` whose event value is `value_bytes` long.
fn letter(key: &str, value_bytes: usize) -> DeadLetter {
    let s: Arc<str> = Arc::from("s");
    DeadLetter {
        id: 0,
        event: crate::event::Event::put(&s, key, Bytes::from("v".repeat(value_bytes)), 1).to_line(),
        seq: 1,
        outcome: "error".into(),
        error: "no".into(),
        attempts: 1,
        at: 0,
    }
}

fn keys(letters: &[DeadLetter]) -> Vec<String> {
    letters.iter().map(|d| d.event.key.clone()).collect()
}

#[test]
fn dead_letters_past_the_count_cap_drop_the_oldest() {
    let store = Store::in_memory();
    let cap = DeadLetterCap {
        count: 3,
        bytes: u64::MAX,
    };
    for i in 0..3 {
        let added = store.add_dead_letter("p", letter(&format!("k{i}"), 10), cap);
        assert!(added.kept);
        assert_eq!(added.dropped, LetterTally::default());
    }
    let added = store.add_dead_letter("p", letter("k3", 10), cap);
    assert!(added.kept);
    assert_eq!(added.dropped.count, 1);
    // Another plugin's letters are its own.
    store.add_dead_letter("q", letter("q0", 10), cap);
    store.flush();
    assert_eq!(keys(&store.dead_letters("p")), ["k1", "k2", "k3"]);
    assert_eq!(store.dead_letter_tally("p").count, 3);
    assert_eq!(keys(&store.dead_letters("q")), ["q0"]);
}

#[test]
fn dead_letters_past_the_byte_cap_drop_the_oldest_and_an_oversized_one_is_not_kept() {
    let store = Store::in_memory();
    let size = |d: &DeadLetter| schema::encode_dead_letter(d).len() as u64;
    let one = size(&letter("k0", 1000));
    // Room for two letters of this size, not three.
    let cap = DeadLetterCap {
        count: 100,
        bytes: one * 2 + one / 2,
    };
    for i in 0..2 {
        assert!(
            store
                .add_dead_letter("p", letter(&format!("k{i}"), 1000), cap)
                .dropped
                .count
                == 0
        );
    }
    let added = store.add_dead_letter("p", letter("k2", 1000), cap);
    assert!(added.kept);
    assert_eq!(added.dropped.count, 1);
    assert!(added.dropped.bytes >= one - 2, "{:?}", added.dropped);
    // Larger than the whole cap: dropped itself, the others stay.
    let huge = store.add_dead_letter("p", letter("huge", 10_000), cap);
    assert!(!huge.kept);
    assert_eq!(huge.dropped.count, 1);
    store.flush();
    assert_eq!(keys(&store.dead_letters("p")), ["k1", "k2"]);
    let tally = store.dead_letter_tally("p");
    assert!(tally.count == 2 && tally.bytes <= cap.bytes, "{tally:?}");
}

#[test]
fn the_letter_index_survives_a_reopen_and_a_lower_cap_trims_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        for i in 0..5 {
            store.add_dead_letter("p", letter(&format!("k{i}"), 100), DeadLetterCap::default());
        }
        store.flush();
    }
    let store = Store::open(dir.path()).unwrap();
    let tally = store.dead_letter_tally("p");
    assert_eq!(tally.count, 5);
    let stored: u64 = store
        .dead_letters("p")
        .iter()
        .map(|d| schema::encode_dead_letter(d).len() as u64)
        .sum();
    assert_eq!(tally.bytes, stored);
    let dropped = store.trim_dead_letters(
        "p",
        DeadLetterCap {
            count: 2,
            bytes: u64::MAX,
        },
    );
    assert_eq!(dropped.count, 3);
    store.flush();
    assert_eq!(keys(&store.dead_letters("p")), ["k3", "k4"]);
    // Removing one already gone changes nothing; clearing forgets the rest.
    let first = store.dead_letters("p")[0].id;
    store.remove_dead_letter("p", first);
    store.remove_dead_letter("p", first);
    assert_eq!(store.dead_letter_tally("p").count, 1);
    assert_eq!(store.clear_dead_letters("p"), 1);
    store.flush();
    assert!(store.dead_letters("p").is_empty());
    assert_eq!(store.dead_letter_tally("p"), LetterTally::default());
}

#[test]
fn dead_letters_are_read_a_page_at_a_time_by_count_and_bytes() {
    let store = Store::in_memory();
    for i in 0..7 {
        store.add_dead_letter("p", letter(&format!("k{i}"), 100), DeadLetterCap::default());
    }
    store.add_dead_letter("other", letter("o", 100), DeadLetterCap::default());
    store.flush();
    // By count: pages of three, each naming where the next begins.
    let mut seen = Vec::new();
    let mut after = 0;
    let mut pages = 0;
    loop {
        let page = store.dead_letter_page("p", after, 3, usize::MAX);
        pages += 1;
        seen.extend(keys(&page.letters));
        match page.next_after {
            Some(last) => {
                assert_eq!(page.letters.len(), 3);
                assert_eq!(last, page.letters.last().unwrap().id);
                after = last;
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["k0", "k1", "k2", "k3", "k4", "k5", "k6"]);
    // By bytes: a bound below one letter still gives one per page.
    let page = store.dead_letter_page("p", 0, 100, 1);
    assert_eq!(keys(&page.letters), ["k0"]);
    assert!(page.next_after.is_some());
    let one = schema::encode_dead_letter(&page.letters[0]).len();
    let page = store.dead_letter_page("p", 0, 100, one * 2 + 1);
    assert_eq!(keys(&page.letters), ["k0", "k1"]);
    // Past the last id: nothing.
    assert!(
        store
            .dead_letter_page("p", u64::MAX, 3, usize::MAX)
            .letters
            .is_empty()
    );
}

#[test]
fn a_state_flood_is_bounded_and_does_not_delay_other_commits() {
    const KEYS: usize = 64;
    const VALUE: usize = 64 << 10;
    let store = Arc::new(Store::in_memory());
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flooder = {
        let (store, flooding) = (store.clone(), flooding.clone());
        std::thread::spawn(move || {
            // The last value of each key, and how many sets waited.
            let mut last = vec![0u8; KEYS];
            let (mut sets, mut waits) = (0u64, 0u64);
            while flooding.load(Ordering::SeqCst) {
                let key = (sets as usize) % KEYS;
                let byte = (sets % 251) as u8;
                let queued = store
                    .set_plugin_state(
                        "flood",
                        &format!("k{key}"),
                        Some(&[byte; VALUE]),
                        Instant::now() + Duration::from_secs(10),
                    )
                    .unwrap();
                last[key] = byte;
                sets += 1;
                waits += u64::from(queued.waited);
            }
            (last, sets, waits)
        })
    };
    // Another plugin's writes, each committed by a flush, while it floods
    // for a quarter of a second at least.
    let mut slowest = Duration::ZERO;
    let flood_started = Instant::now();
    let mut i = 0;
    while i < 20 || flood_started.elapsed() < Duration::from_millis(250) {
        i += 1;
        let started = Instant::now();
        store
            .set_plugin_state("calm", &format!("c{i}"), Some(b"v"), Instant::now())
            .unwrap();
        store.flush();
        slowest = slowest.max(started.elapsed());
        let (writes, bytes) = store.pending.waiting("flood");
        assert!(
            writes <= MAX_PENDING_WRITES && bytes <= MAX_PENDING_BYTES,
            "{writes} writes of {bytes} bytes waiting"
        );
    }
    flooding.store(false, Ordering::SeqCst);
    let (last, sets, waits) = flooder.join().unwrap();
    store.flush();
    eprintln!("{sets} flood sets, {waits} waited; slowest calm commit {slowest:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "a commit of another plugin took {slowest:?} beside the flood"
    );
    assert!(
        sets > MAX_PENDING_BYTES as u64 / VALUE as u64,
        "only {sets} sets"
    );
    assert!(
        waits >= 1,
        "{sets} sets of 64 KiB never waited for the writer"
    );
    let calm = store.plugin_state("calm");
    assert_eq!(calm.len(), i);
    // Every key of the flood holds its latest value.
    let flood: BTreeMap<String, Vec<u8>> = store.plugin_state("flood").into_iter().collect();
    let written = KEYS.min(sets as usize);
    assert_eq!(flood.len(), written);
    for (key, byte) in last.iter().enumerate().take(written) {
        assert_eq!(flood[&format!("k{key}")], vec![*byte; VALUE], "k{key}");
    }
}

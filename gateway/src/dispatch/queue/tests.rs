//! Tests of the queue: order, folding, overflow, the cursors it reports,
//! and waking its consumer.

use std::sync::Arc;

use bytes::Bytes;

use super::*;

fn put(k: &str, v: &str, rev: u64) -> Event {
    Event::put(&Arc::from("s"), k, Bytes::from(v.to_owned()), rev)
}
fn del(k: &str, rev: u64) -> Event {
    Event::delete(&Arc::from("s"), k, rev)
}
#[test]
fn retired_events_are_dropped_by_the_next_push_or_an_idle_consumer() {
    let src: Arc<str> = Arc::from("s");
    let key: Arc<str> = Arc::from("k");
    let q = EventQueue::new(100);
    let at = |seq| {
        let mut e = Event::put(&src, key.clone(), Bytes::from_static(b"v"), seq);
        e.seq = seq;
        e
    };
    q.push_batch(&src, 2, [at(1), at(2)]);
    let taken = q.take_many(1);
    assert_eq!(Arc::strong_count(&key), 3);
    q.complete_and_retire(taken);
    // Completed (the cursor moves) but not dropped yet.
    assert_eq!(q.cursor_positions(), vec![(src.clone(), 1)]);
    assert_eq!(Arc::strong_count(&key), 3);
    // The next push drops it.
    q.push_batch(&src, 3, [at(3)]);
    assert_eq!(Arc::strong_count(&key), 3);
    // Retired with more still queued: kept; retired with nothing left
    // queued, dropped at once with what was kept.
    let taken = q.take_many(1);
    q.complete_and_retire(taken);
    assert_eq!(Arc::strong_count(&key), 3);
    let taken = q.take_many(1);
    assert_eq!(Arc::strong_count(&key), 3);
    q.complete_and_retire(taken);
    assert_eq!(Arc::strong_count(&key), 1);
    // Kept events are also dropped by a consumer that finds the queue
    // empty (the producer pushed nothing more).
    q.push_batch(&src, 5, [at(4), at(5)]);
    let taken = q.take_many(1);
    q.complete_and_retire(taken);
    assert_eq!(Arc::strong_count(&key), 3);
    q.clear_entries();
    assert!(q.take_many(1).is_empty());
    assert_eq!(Arc::strong_count(&key), 1);
    // Past the bound, the consumer drops them at once.
    q.push_batch(&src, 6, [at(6)]);
    let many: Vec<Event> = (1..=SPENT_MAX as u64 + 1).map(|i| at(10 + i)).collect();
    q.complete_and_retire(many);
    assert_eq!(Arc::strong_count(&key), 2);
}

fn drain(q: &EventQueue) -> Vec<(String, EventKind, Option<String>, u64, u32)> {
    std::iter::from_fn(|| q.try_pop())
        .map(|e| {
            (
                e.key.to_string(),
                e.kind,
                e.value.map(|v| String::from_utf8(v.to_vec()).unwrap()),
                e.revision,
                e.coalesced,
            )
        })
        .collect()
}

#[test]
fn below_capacity_everything_is_queued_in_order() {
    let q = EventQueue::new(10);
    let s = q.push([put("a", "1", 1), put("a", "2", 2), del("a", 3)]);
    assert_eq!(
        s,
        PushStats {
            queued: 3,
            coalesced: 0,
            overflow: 0,
            len: 3,
        }
    );
    let got = drain(&q);
    assert_eq!(got.len(), 3);
    assert_eq!(got[2].1, EventKind::Delete);
}

#[test]
fn full_queue_folds_latest_value_and_counts() {
    let q = EventQueue::new(2);
    q.push([put("a", "1", 1), put("b", "1", 2)]);
    let s = q.push([put("a", "2", 3), put("a", "3", 4), put("b", "2", 5)]);
    assert_eq!(s.coalesced, 3);
    assert_eq!(
        drain(&q),
        vec![
            ("a".into(), EventKind::Put, Some("3".into()), 4, 2),
            ("b".into(), EventKind::Put, Some("2".into()), 5, 1),
        ]
    );
}

#[test]
fn a_delete_is_never_lost() {
    let q = EventQueue::new(1);
    q.push([put("a", "1", 1)]);
    // put then delete folds into the delete
    q.push([del("a", 2)]);
    // a put after a queued delete is queued behind it, not folded in
    let s = q.push([put("a", "2", 3), put("a", "3", 4)]);
    assert_eq!(
        s,
        PushStats {
            queued: 1,
            coalesced: 1,
            overflow: 1,
            len: 2,
        }
    );
    assert_eq!(
        drain(&q),
        vec![
            ("a".into(), EventKind::Delete, None, 2, 1),
            ("a".into(), EventKind::Put, Some("3".into()), 4, 1),
        ]
    );
}

#[test]
fn distinct_keys_overflow_instead_of_dropping() {
    let q = EventQueue::new(2);
    let s = q.push((0..5).map(|i| put(&format!("k{i}"), "v", i)));
    assert_eq!(
        s,
        PushStats {
            queued: 5,
            coalesced: 0,
            overflow: 3,
            len: 5,
        }
    );
    assert_eq!(drain(&q).len(), 5);
}

#[test]
fn folding_targets_the_keys_last_entry_after_pops() {
    let q = EventQueue::new(2);
    q.push([put("a", "1", 1), put("b", "1", 2)]);
    assert_eq!(&*q.try_pop().unwrap().key, "a");
    q.push([put("a", "2", 3)]); // room: queued
    q.push([put("a", "3", 4)]); // full: folds into a@3
    assert_eq!(
        drain(&q),
        vec![
            ("b".into(), EventKind::Put, Some("1".into()), 2, 0),
            ("a".into(), EventKind::Put, Some("3".into()), 4, 1),
        ]
    );
}

fn seq(mut e: Event, seq: u64) -> Event {
    e.seq = seq;
    e
}

#[test]
fn the_cursor_stays_below_every_event_not_completed() {
    let q = EventQueue::new(2);
    let s: Arc<str> = Arc::from("s");
    q.reset_source(&s, 4);
    assert_eq!(q.cursor_positions(), vec![(s.clone(), 4)]);
    q.push_batch(&s, 5, [seq(put("a", "1", 5), 5)]);
    q.push_batch(&s, 6, [seq(put("b", "1", 6), 6)]);
    // Full: a@7 folds into a@5, which moves to position 7; b@6 is now
    // the lowest pending position.
    q.push_batch(&s, 7, [seq(put("a", "2", 7), 7)]);
    assert_eq!(q.cursor_positions(), vec![(s.clone(), 5)]);
    let a = q.try_pop().unwrap();
    assert_eq!((&*a.key, a.seq), ("a", 7));
    q.complete(&a);
    assert_eq!(
        q.cursor_positions(),
        vec![(s.clone(), 5)],
        "b@6 is still queued"
    );
    let b = q.try_pop().unwrap();
    assert_eq!(
        q.cursor_positions(),
        vec![(s.clone(), 5)],
        "b@6 is in flight"
    );
    q.complete(&b);
    assert_eq!(q.cursor_positions(), vec![(s.clone(), 7)]);
    // A batch that matched nothing still moves the cursor.
    q.push_batch(&s, 9, []);
    assert_eq!(q.cursor_positions(), vec![(s.clone(), 9)]);
    // Closing keeps undelivered events pending.
    q.push_batch(&s, 10, [seq(put("c", "1", 10), 10)]);
    assert_eq!(q.close(), 1);
    assert_eq!(q.cursor_positions(), vec![(s, 9)]);
}

#[test]
fn the_same_key_of_two_sources_is_never_folded() {
    let q = EventQueue::new(1);
    q.push([put("a", "1", 1)]);
    let mut other = put("a", "2", 2);
    other.source = Arc::from("t");
    let s = q.push([other]);
    assert_eq!(s.coalesced, 0);
    assert_eq!(drain(&q).len(), 2);
}

#[test]
fn requeued_events_come_first_and_still_fold_into_the_right_entry() {
    let q = EventQueue::new(3);
    q.push([put("a", "1", 1), put("b", "1", 2), put("c", "1", 3)]);
    let taken = q.pop_many(2, Duration::ZERO);
    assert_eq!(taken.len(), 2);
    q.requeue_front(taken);
    // Full: a later change of b folds into the requeued b.
    let s = q.push([put("b", "2", 4)]);
    assert_eq!(s.coalesced, 1);
    assert_eq!(
        drain(&q),
        vec![
            ("a".into(), EventKind::Put, Some("1".into()), 1, 0),
            ("b".into(), EventKind::Put, Some("2".into()), 4, 1),
            ("c".into(), EventKind::Put, Some("1".into()), 3, 0),
        ]
    );
}

#[test]
fn close_wakes_a_waiting_consumer() {
    let q = Arc::new(EventQueue::new(4));
    let q2 = q.clone();
    let t = std::thread::spawn(move || q2.pop(Duration::from_secs(30)));
    while q.inner.lock().entries.is_empty() && !t.is_finished() {
        q.close();
        std::thread::yield_now();
    }
    assert!(t.join().unwrap().is_none());
}

#[test]
fn len_follows_every_change_without_the_lock() {
    let q = EventQueue::new(8);
    q.push([put("a", "1", 1), put("b", "1", 2), put("c", "1", 3)]);
    assert_eq!(q.len(), 3);
    let taken = q.pop_many(2, Duration::ZERO);
    assert_eq!(q.len(), 1);
    q.requeue_front(taken);
    assert_eq!(q.len(), 3);
    assert!(q.try_pop().is_some());
    assert_eq!(q.len(), 2);
    q.clear_entries();
    assert!(q.is_empty());
    q.push([put("d", "1", 4)]);
    assert_eq!(q.close(), 1);
    assert!(q.is_empty());
}

#[test]
fn completing_a_batch_at_once_moves_the_cursor_like_one_by_one() {
    let s: Arc<str> = Arc::from("s");
    let events = |q: &EventQueue| {
        q.reset_source(&s, 0);
        q.push_batch(
            &s,
            4,
            (1..=4).map(|i| seq(put(&format!("k{i}"), "v", i), i)),
        );
        q.pop_many(4, Duration::ZERO)
    };
    let (one, all) = (EventQueue::new(8), EventQueue::new(8));
    let (a, b) = (events(&one), events(&all));
    for e in &a[..3] {
        one.complete(e);
    }
    all.complete_all(&b[..3]);
    assert_eq!(one.cursor_positions(), vec![(s.clone(), 3)]);
    assert_eq!(all.cursor_positions(), one.cursor_positions());
    all.complete_all(&b[3..]);
    assert_eq!(all.cursor_positions(), vec![(s, 4)]);
}

#[test]
fn a_hot_consumer_still_gets_an_event_pushed_while_it_spins_or_sleeps() {
    let q = Arc::new(EventQueue::new(8));
    // Work found without waiting: the consumer is hot and spins first.
    q.push([put("a", "1", 1)]);
    assert_eq!(q.pop_many(8, Duration::ZERO).len(), 1);
    assert!(q.hot.load(Ordering::Relaxed));
    for round in 0..50u64 {
        let q2 = q.clone();
        let producer = std::thread::spawn(move || {
            q2.push([put("b", "1", round + 2)]);
        });
        let got = q.pop_many(8, Duration::from_secs(30));
        producer.join().unwrap();
        let got = if got.is_empty() {
            q.pop_many(8, Duration::from_secs(30))
        } else {
            got
        };
        assert_eq!(got.len(), 1, "round {round}: the pushed event arrives");
    }
}

#[test]
fn folding_still_works_after_the_queue_drained_and_filled_again() {
    let q = EventQueue::new(3);
    for round in 0..3u64 {
        let r = round * 10;
        q.push([
            put("a", "1", r + 1),
            put("b", "1", r + 2),
            put("c", "1", r + 3),
        ]);
        // Full: these fold.
        let s = q.push([put("a", "2", r + 4), put("c", "2", r + 5)]);
        assert_eq!(s.coalesced, 2, "round {round}");
        // Taken and put back (a batch that failed part way): still
        // folded into the right entries.
        let taken = q.pop_many(2, Duration::ZERO);
        q.requeue_front(taken);
        let s = q.push([put("b", "3", r + 6)]);
        assert_eq!(s.coalesced, 1, "round {round}");
        assert_eq!(
            drain(&q),
            vec![
                ("a".into(), EventKind::Put, Some("2".into()), r + 4, 1),
                ("b".into(), EventKind::Put, Some("3".into()), r + 6, 1),
                ("c".into(), EventKind::Put, Some("2".into()), r + 5, 1),
            ],
            "round {round}"
        );
    }
}

#[test]
fn find_gives_a_keys_place_within_the_cap() {
    let src: Arc<str> = Arc::from("s");
    let q = EventQueue::new(100);
    let at = |k: &str, seq| {
        let mut e = put(k, "v", seq);
        e.seq = seq;
        e
    };
    q.push_batch(&src, 3, [at("a", 1), at("b", 2), at("a", 3)]);
    assert_eq!(q.find("s", "b", 2, 10), Some(1));
    // The change at or after position 3 of `a`, not its older one.
    assert_eq!(q.find("s", "a", 3, 10), Some(2));
    assert_eq!(q.find("s", "a", 3, 2), None, "beyond the cap");
    assert_eq!(q.find("t", "a", 1, 10), None, "another source");
}

#[test]
fn a_queue_gives_back_the_room_of_a_backlog_only_after_staying_idle() {
    let src: Arc<str> = Arc::from("s");
    let q = EventQueue::new(100_000);
    let backlog = |q: &EventQueue, from: u64| {
        let events: Vec<Event> = (from..from + 20_000)
            .map(|i| seq(put(&format!("k{i}"), "v", i), i))
            .collect();
        q.push_batch(&src, from + 19_999, events);
        while !q.take_many(5_000).is_empty() {}
    };
    let room = |q: &EventQueue| q.inner.lock().entries.capacity();
    let idle = |q: &EventQueue| EventQueue::idle_wait(&mut q.inner.lock());
    backlog(&q, 1);
    assert!(room(&q) >= 20_000);
    // Idle, but not for long: the room stays for the next burst.
    for _ in 0..SHRINK_AFTER_IDLE_WAITS - 1 {
        assert!(!idle(&q));
    }
    assert!(room(&q) >= 20_000);
    // A take in between starts the count again.
    backlog(&q, 20_001);
    for _ in 0..SHRINK_AFTER_IDLE_WAITS - 1 {
        assert!(!idle(&q));
    }
    assert!(room(&q) >= 20_000);
    assert!(idle(&q), "the room is given back after staying idle");
    assert!(room(&q) <= SHRINK_KEEP, "{} entries of room kept", room(&q));
    // Once only, until another backlog.
    for _ in 0..2 * SHRINK_AFTER_IDLE_WAITS {
        assert!(!idle(&q));
    }
    // Still a working queue.
    q.push_batch(&src, 40_001, [seq(put("after", "v", 40_001), 40_001)]);
    assert_eq!(q.take_many(10).len(), 1);
}

//! The state writer: one background thread that commits everything the
//! store records, in small batches.
//!
//! Each commit takes, in this order, the cursors the running plugins report,
//! the writes queued through the store, every plugin's waiting `state`
//! writes, and the key-index changes of every source, and writes them in
//! one transaction. Cursors are read *before* the pending writes are
//! drained, so a committed cursor never covers an event whose key-index
//! change, or a `state` write made while handling it, is not committed.
//! Each plugin has at most a bounded amount of `state` waiting, so one
//! plugin's writes make a commit only that much larger and never wait
//! behind another's. The thread runs at a lower
//! priority than the rest of the gateway and paces its commits to about an
//! eighth of a core, so a flood of changes cannot starve event delivery.
//!
//! It must not run on a tokio worker (it blocks on its channel and on the
//! disk), and must not decide what a cursor or a key change means: it writes
//! what the store queued and the probes report.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redb::Database;

use super::pending::{Pending, Write};
use super::schema::{CURSORS, DEAD_LETTERS, KEYS, PLUGIN_STATE, SOURCES, encode_into};
use super::{CursorProbe, IndexProbe, KeyEntry, SourceMeta};

/// How long the writer gathers changes before it commits.
const COMMIT_INTERVAL: Duration = Duration::from_millis(20);
/// How long a woken writer waits for more changes before it commits.
const GATHER: Duration = Duration::from_millis(2);
/// Most queued writes one transaction takes.
const MAX_BATCH: usize = 20_000;

/// A write the store queues for the writer.
pub(super) enum Op {
    Wake,
    Cursor(String, Arc<str>, u64),
    DeadLetter(String, u64, Option<Vec<u8>>),
    Flush(mpsc::SyncSender<()>),
}

/// The running plugins' cursor probes, by plugin.
pub(super) type Probes = Arc<Mutex<HashMap<String, Arc<dyn CursorProbe>>>>;
/// The sources' key indexes.
pub(super) type Indexes = Arc<Mutex<Vec<Arc<dyn IndexProbe>>>>;

/// Start the writer thread; it commits what is pending and ends once every
/// sender of `rx` is dropped.
pub(super) fn spawn(
    db: Arc<Database>,
    rx: mpsc::Receiver<Op>,
    probes: Probes,
    indexes: Indexes,
    pending: Arc<Pending>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("state-writer".into())
        .spawn(move || {
            crate::background::lower_this_thread(WRITER_NICE, "state-writer");
            write_loop(&db, &rx, &probes, &indexes, &pending);
        })
        .expect("spawning the state writer")
}

/// How much nicer than the rest of the gateway the state writer runs: it
/// is background work, and under a flood of changes it must not take a
/// core from the threads that deliver events and call plugins. Its own
/// pacing still keeps its commits to about an eighth of a core.
const WRITER_NICE: i32 = 10;

/// Receive more ops into `ops` until `until`, [`MAX_BATCH`] ops, or a
/// flush (someone waits for it). True when the channel closed.
fn gather(rx: &mpsc::Receiver<Op>, ops: &mut Vec<Op>, until: Instant) -> bool {
    while ops.len() < MAX_BATCH && !matches!(ops.last(), Some(Op::Flush(_))) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match rx.recv_timeout(left) {
            Ok(op) => ops.push(op),
            Err(mpsc::RecvTimeoutError::Timeout) => return false,
            Err(mpsc::RecvTimeoutError::Disconnected) => return true,
        }
    }
    false
}

/// CPU time this thread has used: the writer's pacing counts the work of
/// a commit, not its waits for the disk or for a core. A commit that took
/// long only because the disk was slow to sync, or because the writer's
/// nice value let others run first, leaves little to make room for, and
/// pausing for it would only delay the next change (sources without
/// history deliver an event once its change is committed).
///
/// Read from the scheduler's own account (the first field of
/// `schedstat`, in nanoseconds) rather than through the vDSO: it is read
/// twice per commit, so a file read costs nothing that matters, and it
/// keeps the gateway runnable under valgrind, whose guests cannot enter
/// the host's vDSO. Without the file, wall time stands in.
fn cpu_time() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or_else(
            || START.get_or_init(Instant::now).elapsed(),
            Duration::from_nanos,
        )
}

/// The writer thread: gather, then commit cursors and changes together.
fn write_loop(
    db: &Database,
    rx: &mpsc::Receiver<Op>,
    probes: &Probes,
    indexes: &Indexes,
    pending: &Pending,
) {
    let mut written: HashMap<(String, Arc<str>), u64> = HashMap::new();
    let mut failures = 0u64;
    // When the last commit ended, and the CPU time it took.
    let mut ended = Instant::now();
    let mut took = Duration::ZERO;
    loop {
        let mut ops: Vec<Op> = Vec::new();
        let closed = match rx.recv_timeout(COMMIT_INTERVAL) {
            Err(mpsc::RecvTimeoutError::Disconnected) => true,
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            Ok(op) => {
                ops.push(op);
                // Give concurrent writers a moment to join this transaction,
                // and under a flood of changes keep the writer's share of a
                // core near an eighth: a commit that used `t` of CPU is
                // followed by at least `7t` of gathering. Fewer, larger
                // commits fold more changes of the same key. A flush ends
                // the gathering at once.
                let until = (Instant::now() + GATHER).max(ended + took * 7);
                gather(rx, &mut ops, until)
            }
        };
        let started = cpu_time();
        // Cursors first: every event they cover was recorded before now.
        let mut cursors: Vec<(String, Arc<str>, u64)> = Vec::new();
        for (plugin, probe) in probes.lock().iter() {
            for (source, seq) in probe.cursors() {
                cursors.push((plugin.clone(), source, seq));
            }
        }
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let states = pending.take();
        cursors.retain(|(p, s, seq)| written.get(&(p.clone(), s.clone())) != Some(seq));
        // Key changes last: they include everything the cursors cover, and
        // everything recorded before a flush request.
        let probes_now: Vec<Arc<dyn IndexProbe>> = indexes.lock().clone();
        let mut taken: Vec<(Arc<dyn IndexProbe>, u64)> = Vec::new();
        let changes: Vec<SourceChanges> = probes_now
            .iter()
            .filter_map(|p| {
                let (keys, meta) = p.take_changes()?;
                taken.push((p.clone(), meta.last_seq));
                Some((p.source(), keys, meta))
            })
            .collect();
        if !ops.is_empty() || !cursors.is_empty() || !changes.is_empty() || !states.is_empty() {
            let mut acks = Vec::new();
            match commit(db, ops, &states, &cursors, &changes, &mut acks) {
                Ok(explicit) => {
                    pending.committed();
                    for (p, s, seq) in cursors.into_iter().chain(explicit) {
                        written.insert((p, s), seq);
                    }
                    for (p, last) in &taken {
                        p.written(*last);
                    }
                }
                Err(e) => {
                    pending.unwritten(states);
                    for ((p, _), (_, keys, _)) in taken.iter().zip(changes) {
                        p.unwritten(keys.into_iter().map(|(k, _)| k).collect());
                    }
                    failures += 1;
                    if failures.is_power_of_two() {
                        tracing::error!(error = %e, failures, "Writing the state store failed; cursors stay where they were.");
                    }
                }
            }
            for a in acks {
                let _ = a.send(());
            }
            took = cpu_time().saturating_sub(started);
            ended = Instant::now();
        }
        if closed {
            return;
        }
    }
}

type Written = Vec<(String, Arc<str>, u64)>;
type SourceChanges = (Arc<str>, Vec<(Arc<str>, Option<KeyEntry>)>, SourceMeta);

fn commit(
    db: &Database,
    ops: Vec<Op>,
    states: &[(String, Vec<Write>)],
    cursors: &[(String, Arc<str>, u64)],
    changes: &[SourceChanges],
    acks: &mut Vec<mpsc::SyncSender<()>>,
) -> Result<Written, redb::Error> {
    let w = db.begin_write()?;
    let mut explicit = Vec::new();
    let mut buf = Vec::new();
    {
        let mut keys = w.open_table(KEYS)?;
        let mut sources = w.open_table(SOURCES)?;
        let mut cur = w.open_table(CURSORS)?;
        let mut state = w.open_table(PLUGIN_STATE)?;
        let mut dead = w.open_table(DEAD_LETTERS)?;
        for (source, changed, meta) in changes {
            for (k, entry) in changed {
                match entry {
                    Some(e) => {
                        keys.insert((&**source, &**k), encode_into(e, &mut buf))?;
                    }
                    None => {
                        keys.remove((&**source, &**k))?;
                    }
                }
            }
            sources.insert(&**source, encode_into(meta, &mut buf))?;
        }
        for op in ops {
            match op {
                Op::Cursor(p, s, seq) => {
                    cur.insert((p.as_str(), &*s), seq)?;
                    explicit.push((p, s, seq));
                }
                Op::DeadLetter(p, id, Some(v)) => {
                    dead.insert((p.as_str(), id), v.as_slice())?;
                }
                Op::DeadLetter(p, id, None) => {
                    dead.remove((p.as_str(), id))?;
                }
                Op::Flush(a) => acks.push(a),
                Op::Wake => {}
            }
        }
        for (p, writes) in states {
            for (k, v) in writes {
                match v {
                    Some(v) => state.insert((p.as_str(), k.as_str()), v.as_slice())?,
                    None => state.remove((p.as_str(), k.as_str()))?,
                };
            }
        }
        for (p, s, seq) in cursors {
            cur.insert((p.as_str(), &**s), *seq)?;
        }
    }
    w.commit()?;
    Ok(explicit)
}

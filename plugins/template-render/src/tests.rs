//! The event flow against an in-memory host.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Duration;

use watchgate_sdk::EventKind;

use super::*;
use crate::host::RunResult;

/// Keys with their values.
type Keys = BTreeMap<String, Vec<u8>>;

/// In-memory host: state, settings, files, commands, a snapshot that moves
/// on a virtual clock, and log lines.
#[derive(Default)]
struct Fake {
    state: RefCell<BTreeMap<String, Vec<u8>>>,
    settings: RefCell<BTreeMap<String, String>>,
    files: RefCell<BTreeMap<String, String>>,
    writes: Cell<usize>,
    /// Paths the check ran on, with the content it saw.
    checks: RefCell<Vec<(String, String)>>,
    triggers: RefCell<Vec<String>>,
    logs: RefCell<Vec<String>>,
    /// Virtual time.
    clock: Cell<Duration>,
    /// The snapshot: (from this time on, keys) steps, in time order.
    snapshot: RefCell<Vec<(Duration, Keys)>>,
    scans: Cell<usize>,
}

impl Host for Fake {
    fn state_get(&self, key: &str) -> Option<Vec<u8>> {
        self.state.borrow().get(key).cloned()
    }
    fn state_set(&self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        let mut state = self.state.borrow_mut();
        match value {
            Some(v) => state.insert(key.to_owned(), v.to_vec()),
            None => state.remove(key),
        };
        Ok(())
    }
    fn setting(&self, name: &str) -> Option<String> {
        self.settings.borrow().get(name).cloned()
    }
    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(self
            .files
            .borrow()
            .get(path)
            .map(|s| s.clone().into_bytes()))
    }
    fn replace_file(&self, path: &str, data: &[u8]) -> Result<(), String> {
        self.writes.set(self.writes.get() + 1);
        let text = String::from_utf8(data.to_vec()).map_err(|e| e.to_string())?;
        self.files.borrow_mut().insert(path.to_owned(), text);
        Ok(())
    }
    fn rename_file(&self, from: &str, to: &str) -> Result<(), String> {
        let mut files = self.files.borrow_mut();
        let text = files.remove(from).ok_or("no such file")?;
        files.insert(to.to_owned(), text);
        Ok(())
    }
    fn remove_file(&self, path: &str) -> Result<(), String> {
        self.files.borrow_mut().remove(path);
        Ok(())
    }
    fn run(&self, name: &str, file: Option<&str>) -> Result<RunResult, String> {
        if name != "check" {
            return Err(format!("command {name:?} is not granted"));
        }
        let file = file.ok_or("no file")?;
        let text = self
            .files
            .borrow()
            .get(file)
            .cloned()
            .ok_or("no candidate")?;
        self.checks
            .borrow_mut()
            .push((file.to_owned(), text.clone()));
        let bad = text.contains("BAD");
        Ok(RunResult {
            exit_code: Some(i32::from(bad)),
            stderr_tail: if bad {
                "BAD found".to_owned()
            } else {
                String::new()
            },
            ..RunResult::default()
        })
    }
    fn trigger(&self, name: &str, _: Option<&str>) -> Result<(), String> {
        self.triggers.borrow_mut().push(name.to_owned());
        Ok(())
    }
    fn scan(&self, source: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        assert_eq!(source, "consul");
        self.scans.set(self.scans.get() + 1);
        let now = self.clock.get();
        let snapshot = self.snapshot.borrow();
        let keys = snapshot
            .iter()
            .rev()
            .find(|(at, _)| *at <= now)
            .map(|(_, k)| k.clone())
            .unwrap_or_default();
        Ok(keys.into_iter().collect())
    }
    fn now(&self) -> Duration {
        self.clock.get()
    }
    fn sleep(&self, d: Duration) {
        self.clock.set(self.clock.get() + d);
    }
    fn info(&self, message: &str) {
        self.logs.borrow_mut().push(message.to_owned());
    }
    fn warn(&self, message: &str) {
        self.logs.borrow_mut().push(message.to_owned());
    }
}

impl Fake {
    fn with(settings: &[(&str, &str)]) -> Self {
        let f = Self::default();
        for (k, v) in settings {
            f.settings
                .borrow_mut()
                .insert((*k).to_owned(), (*v).to_owned());
        }
        f
    }
    fn put(&self, key: &str, value: &str) -> Result<(), String> {
        apply(self, &[event(key, EventKind::Put, Some(value))]).map_err(|f| f.message)
    }
    fn delete(&self, key: &str) -> Result<(), String> {
        apply(self, &[event(key, EventKind::Delete, None)]).map_err(|f| f.message)
    }
    fn file(&self, path: &str) -> Option<String> {
        self.files.borrow().get(path).cloned()
    }
    /// The snapshot holds `keys` from `at` on.
    fn snapshot_at(&self, at: Duration, keys: &[(&str, &str)]) {
        let keys = keys
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect();
        self.snapshot.borrow_mut().push((at, keys));
    }
}

fn event(key: &str, kind: EventKind, value: Option<&str>) -> Event {
    Event {
        source: "consul".to_owned(),
        kind,
        key: key.to_owned(),
        value: value.map(|v| v.as_bytes().to_vec()),
        prev_value: None,
        revision: 1,
        resync: false,
        coalesced: 0,
        metadata: Vec::new(),
    }
}

const APP: &str = "templates/app/app.conf.tmpl";

#[test]
fn renders_template_and_follows_data_changes() {
    let h = Fake::default();
    h.put("app/port", "8080").unwrap();
    h.put(APP, "port={{ key(\"app/port\") }}\n").unwrap();
    assert_eq!(h.file("app/app.conf").as_deref(), Some("port=8080\n"));

    h.put("app/port", "9090").unwrap();
    assert_eq!(h.file("app/app.conf").as_deref(), Some("port=9090\n"));
}

#[test]
fn unrelated_data_does_not_rerender() {
    let h = Fake::default();
    h.put(APP, "static {{ key_or_default('app/x', 'd') }}")
        .unwrap();
    assert_eq!(h.writes.get(), 1);
    h.put("other/key", "v").unwrap();
    assert_eq!(h.writes.get(), 1);
    h.put("app/x", "set").unwrap();
    assert_eq!(h.writes.get(), 2);
    assert_eq!(h.file("app/app.conf").as_deref(), Some("static set"));
}

#[test]
fn unchanged_output_writes_and_runs_nothing() {
    let h = Fake::with(&[("check", "check"), ("on_change", "reload")]);
    h.put(APP, "x={{ key_or_default('app/x', 'd') }}").unwrap();
    assert_eq!((h.writes.get(), h.checks.borrow().len()), (1, 1));
    assert_eq!(*h.triggers.borrow(), ["reload"]);
    // A change that renders the same bytes: no write, no check, no reload.
    h.put("app/x", "d").unwrap();
    assert_eq!((h.writes.get(), h.checks.borrow().len()), (1, 1));
    assert_eq!(h.triggers.borrow().len(), 1);
}

#[test]
fn check_gates_the_output_and_cleans_up() {
    let h = Fake::with(&[("check", "check"), ("on_change", "reload")]);
    h.put("v", "good").unwrap();
    h.put("templates/conf/site.conf.tmpl", "{{ key('v') }}\n")
        .unwrap();
    assert_eq!(h.file("conf/site.conf").as_deref(), Some("good\n"));
    assert_eq!(
        h.checks.borrow()[0],
        ("conf/.site.conf.candidate".to_owned(), "good\n".to_owned())
    );
    assert_eq!(h.triggers.borrow().len(), 1);

    let err = h.put("v", "BAD").unwrap_err();
    assert!(
        err.contains("check \"check\" refused the new conf/site.conf (exited with 1)"),
        "{err}"
    );
    assert!(err.contains("stderr: BAD found"), "{err}");
    assert_eq!(h.file("conf/site.conf").as_deref(), Some("good\n"));
    assert_eq!(h.triggers.borrow().len(), 1, "no reload after a refusal");
    // A retry checks again and is refused again.
    assert!(h.put("v", "BAD").is_err());
    assert_eq!(h.checks.borrow().len(), 3);

    h.put("v", "better").unwrap();
    assert_eq!(h.file("conf/site.conf").as_deref(), Some("better\n"));
    assert_eq!(h.triggers.borrow().len(), 2);
    let files: Vec<String> = h.files.borrow().keys().cloned().collect();
    assert_eq!(files, ["conf/site.conf"], "no candidate left");
}

#[test]
fn ungranted_check_keeps_the_old_file() {
    let h = Fake::with(&[("check", "nope")]);
    let err = h.put(APP, "x").unwrap_err();
    assert!(
        err.contains("could not run: command \"nope\" is not granted"),
        "{err}"
    );
    assert!(h.files.borrow().is_empty(), "{:?}", h.files.borrow());
}

#[test]
fn bad_settings_fail_clearly() {
    let h = Fake::with(&[("wait", "soon")]);
    let err = h.put(APP, "x").unwrap_err();
    assert!(
        err.contains("\"wait\" = \"soon\" is not a duration"),
        "{err}"
    );
    let h = Fake::with(&[("check", " ")]);
    assert!(h.put(APP, "x").unwrap_err().contains("\"check\" is empty"));
}

#[test]
fn a_batch_renders_once_and_names_the_failing_event() {
    let h = Fake::with(&[("on_change", "reload")]);
    h.put(
        APP,
        "{{ key_or_default('a', '') }}{{ key_or_default('b', '') }}",
    )
    .unwrap();
    let batch: Vec<Event> = (0..20)
        .map(|i| {
            event(
                if i % 2 == 0 { "a" } else { "b" },
                EventKind::Put,
                Some(&i.to_string()),
            )
        })
        .collect();
    let writes = h.writes.get();
    apply(&h, &batch).unwrap();
    assert_eq!(h.writes.get(), writes + 1);
    assert_eq!(h.file("app/app.conf").as_deref(), Some("1819"));
    assert_eq!(h.triggers.borrow().len(), 2);

    h.put("templates/k.tmpl", "{{ key('k') }}").unwrap_err();
    let batch = [
        event("other", EventKind::Put, Some("1")),
        event("k", EventKind::Delete, None),
    ];
    let failure = apply(&h, &batch).unwrap_err();
    assert_eq!(failure.index, 1);
    assert!(
        failure.message.contains("missing key \"k\""),
        "{}",
        failure.message
    );
}

#[test]
fn missing_key_fails_without_writing_until_it_arrives() {
    let h = Fake::default();
    let err = h.put(APP, "{{ key('app/port') }}").unwrap_err();
    assert!(err.contains("missing key \"app/port\""), "{err}");
    assert!(err.contains(APP), "{err}");
    assert_eq!(h.file("app/app.conf"), None);

    h.put("app/port", "1").unwrap();
    assert_eq!(h.file("app/app.conf").as_deref(), Some("1"));

    let err = h.delete("app/port").unwrap_err();
    assert!(err.contains("missing key \"app/port\""), "{err}");
    // The last good output stays.
    assert_eq!(h.file("app/app.conf").as_deref(), Some("1"));
}

#[test]
fn keys_lists_the_prefix_and_tracks_deletes() {
    let h = Fake::default();
    h.put("db/b", "2").unwrap();
    h.put("db/a", "1").unwrap();
    h.put(
        "templates/db.ini.tmpl",
        "[db]\n{% for k, v in keys('db/') | items %}\n{{ k }}={{ v }}\n{% endfor %}\n",
    )
    .unwrap();
    assert_eq!(h.file("db.ini").as_deref(), Some("[db]\na=1\nb=2\n"));
    h.delete("db/a").unwrap();
    assert_eq!(h.file("db.ini").as_deref(), Some("[db]\nb=2\n"));
    h.put("db/c", "3").unwrap();
    assert_eq!(h.file("db.ini").as_deref(), Some("[db]\nb=2\nc=3\n"));
}

#[test]
fn deleted_template_stops_rendering_and_is_logged() {
    let h = Fake::default();
    h.put(APP, "{{ key_or_default('app/port', '80') }}")
        .unwrap();
    h.delete(APP).unwrap();
    assert!(
        h.logs
            .borrow()
            .iter()
            .any(|l| l.contains("app/app.conf is left on disk")),
        "{:?}",
        h.logs.borrow()
    );
    let writes = h.writes.get();
    h.put("app/port", "1").unwrap();
    assert_eq!(h.writes.get(), writes);
    assert_eq!(h.file("app/app.conf").as_deref(), Some("80"));
}

#[test]
fn templates_are_not_data() {
    let h = Fake::default();
    h.put("templates/a.tmpl", "A").unwrap();
    let err = h
        .put("templates/b.tmpl", "{{ key('templates/a.tmpl') }}")
        .unwrap_err();
    assert!(err.contains("missing key"), "{err}");
    h.put(
        "templates/c.tmpl",
        "{{ keys('templates/') | list | join(',') }}",
    )
    .unwrap();
    assert_eq!(h.file("c").as_deref(), Some(""));
    // A non-template key under templates/ is data.
    h.put("templates/notes.txt", "n").unwrap();
    assert_eq!(h.file("c").as_deref(), Some("notes.txt"));
}

#[test]
fn syntax_error_is_reported_with_line() {
    let h = Fake::default();
    let err = h.put(APP, "ok\n{% if %}").unwrap_err();
    assert!(err.contains("line 2:"), "{err}");
    // Data changes skip the broken template without failing.
    h.put("x", "1").unwrap();
}

#[test]
fn state_survives_a_new_instance() {
    let h = Fake::default();
    h.put("app/port", "1").unwrap();
    h.put(APP, "{{ key('app/port') }}").unwrap();
    // Everything lives in host state: a fresh store sees it all.
    let store = Store::load(&h).unwrap();
    assert_eq!(store.templates().collect::<Vec<_>>(), [APP]);
    assert_eq!(store.data().get("app/port").map(String::as_str), Some("1"));
    assert!(store.deps(APP).unwrap().depends_on("app/port"));
}

#[test]
fn wait_renders_a_burst_once_after_it_settles() {
    let h = Fake::with(&[("wait", "500ms"), ("on_change", "reload")]);
    let tmpl = "{{ key('n') }}";
    // The burst: n goes 0..20 over 200 ms; the first event arrives at 0.
    for i in 0..20u64 {
        h.snapshot_at(
            Duration::from_millis(i * 10),
            &[(APP, tmpl), ("n", &i.to_string())],
        );
    }
    h.put("n", "0").unwrap();
    assert_eq!(h.file("app/app.conf").as_deref(), Some("19"));
    assert_eq!(h.writes.get(), 1);
    assert_eq!(h.triggers.borrow().len(), 1);
    // It rendered once the keys had been quiet for the window.
    assert!(
        h.clock.get() >= Duration::from_millis(190 + 500),
        "{:?}",
        h.clock.get()
    );
    assert!(
        h.clock.get() < Duration::from_millis(190 + 700),
        "{:?}",
        h.clock.get()
    );
    // The queued events of the burst find everything done: no wait, no write.
    let before = h.clock.get();
    for i in 1..20 {
        h.put("n", &i.to_string()).unwrap();
    }
    assert_eq!(h.clock.get(), before);
    assert_eq!(h.writes.get(), 1);
    assert_eq!(h.triggers.borrow().len(), 1);
}

#[test]
fn wait_renders_a_constant_stream_after_max_wait() {
    let h = Fake::with(&[("wait", "100ms"), ("max_wait", "1s")]);
    for i in 0..1000u64 {
        h.snapshot_at(
            Duration::from_millis(i * 20),
            &[(APP, "{{ key('n') }}"), ("n", &i.to_string())],
        );
    }
    h.put("n", "0").unwrap();
    assert_eq!(h.clock.get(), Duration::from_secs(1));
    assert_eq!(h.file("app/app.conf").as_deref(), Some("50"));
}

#[test]
fn wait_needs_the_snapshot_grant() {
    struct NoSnapshot(Fake);
    // Reuse the fake but fail scans.
    impl Host for NoSnapshot {
        fn state_get(&self, key: &str) -> Option<Vec<u8>> {
            self.0.state_get(key)
        }
        fn state_set(&self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
            self.0.state_set(key, value)
        }
        fn setting(&self, name: &str) -> Option<String> {
            self.0.setting(name)
        }
        fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
            self.0.read_file(path)
        }
        fn replace_file(&self, path: &str, data: &[u8]) -> Result<(), String> {
            self.0.replace_file(path, data)
        }
        fn rename_file(&self, from: &str, to: &str) -> Result<(), String> {
            self.0.rename_file(from, to)
        }
        fn remove_file(&self, path: &str) -> Result<(), String> {
            self.0.remove_file(path)
        }
        fn run(&self, name: &str, file: Option<&str>) -> Result<RunResult, String> {
            self.0.run(name, file)
        }
        fn trigger(&self, name: &str, file: Option<&str>) -> Result<(), String> {
            self.0.trigger(name, file)
        }
        fn scan(&self, _: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
            Err("snapshot is not granted".to_owned())
        }
        fn now(&self) -> Duration {
            self.0.now()
        }
        fn sleep(&self, d: Duration) {
            self.0.sleep(d);
        }
        fn info(&self, message: &str) {
            self.0.info(message);
        }
        fn warn(&self, message: &str) {
            self.0.warn(message);
        }
    }
    let h = NoSnapshot(Fake::with(&[("wait", "1s")]));
    let failure = apply(&h, &[event("n", EventKind::Put, Some("1"))]).unwrap_err();
    assert!(
        failure.message.contains("needs `[grants] snapshot = true`"),
        "{}",
        failure.message
    );
}

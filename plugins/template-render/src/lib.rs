//! Renders consul-template-style templates kept in the watched store.
//!
//! Keys under `templates/` ending in `.tmpl` are templates; every other key
//! is data. Each template renders to a file in the plugin's files grant,
//! named by its key without `templates/` and `.tmpl`
//! (`templates/app/app.conf.tmpl` → `app/app.conf`). After every event the
//! plugin re-renders each template the event can affect: the template
//! itself when it was put, or every template that reads the changed data
//! key. See [`template`] for the syntax.
//!
//! Everything seen is kept in the host state ([`store`]), so a recycled
//! instance carries on where the last one stopped. A template that fails to
//! render (a missing key, a syntax error) is not written; the event returns
//! an error naming the template and the reason, and the previous output
//! stays on disk. Deleting a template stops rendering it but leaves its
//! output in place: the plugin has no delete capability.

mod host;
mod store;
mod template;

use watchgate_sdk::{Event, Plugin, export};

use crate::host::{Host, Sdk};
use crate::store::Store;
use crate::template::Template;

/// The plugin: renders templates from the store.
struct TemplateRender;

impl Plugin for TemplateRender {
    fn handle(event: Event) -> Result<(), String> {
        apply(&Sdk, &event).map_err(|e| format!("template-render: {e}"))
    }
}

export!(TemplateRender);

watchgate_sdk::manifest!(concat!(
    "name = \"template-render\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Renders consul-template-style templates from the store into files.\"\n",
    "capabilities = [\"files\"]\n",
));

/// Records `event` in the store and re-renders the templates it affects.
///
/// # Errors
///
/// A state write failed, or one or more templates failed to render or be
/// written; all failures are reported, `; `-separated. Templates that
/// rendered are written even when others failed.
fn apply(host: &impl Host, event: &Event) -> Result<(), String> {
    let mut store = Store::load(host)?;
    let key = event.key.as_str();

    if template::is_template(key) {
        if event.is_delete() {
            if store.remove(key)? {
                let path = template::output_path(key).unwrap_or_default();
                host.info(&format!(
                    "template {key} deleted; no longer rendering it, {path} is left on disk"
                ));
            }
            return Ok(());
        }
        store.put(key, event.value_bytes().unwrap_or_default())?;
        return render(host, &store, key);
    }

    if event.is_delete() {
        store.remove(key)?;
    } else {
        store.put(key, event.value_bytes().unwrap_or_default())?;
    }
    let mut failures = Vec::new();
    for tmpl in store.templates() {
        // A template that does not parse was reported when it was put.
        let affected = parse(&store, tmpl).is_ok_and(|t| t.depends_on(key));
        if affected && let Err(e) = render(host, &store, tmpl) {
            failures.push(e);
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// Parses the stored template `tmpl`.
fn parse<H: Host>(store: &Store<'_, H>, tmpl: &str) -> Result<Template, String> {
    let bytes = store.raw(tmpl).unwrap_or_default();
    let src = std::str::from_utf8(&bytes).map_err(|_| format!("{tmpl}: not UTF-8 text"))?;
    Template::parse(src).map_err(|e| format!("{tmpl}: {e}"))
}

/// Renders the stored template `tmpl` and writes its output file.
fn render<H: Host>(host: &H, store: &Store<'_, H>, tmpl: &str) -> Result<(), String> {
    let path = template::output_path(tmpl).unwrap_or_default();
    let output = parse(store, tmpl)?
        .render(store)
        .map_err(|e| format!("{tmpl}: {e}; {path} not written"))?;
    host.replace_file(path, output.as_bytes())
        .map_err(|e| format!("{tmpl}: writing {path} failed: {e}"))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use watchgate_sdk::EventKind;

    use super::*;

    /// In-memory host: state, written files and log lines.
    #[derive(Default)]
    struct Fake {
        state: RefCell<BTreeMap<String, Vec<u8>>>,
        files: RefCell<BTreeMap<String, String>>,
        writes: RefCell<usize>,
        logs: RefCell<Vec<String>>,
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
        fn replace_file(&self, path: &str, data: &[u8]) -> Result<(), String> {
            *self.writes.borrow_mut() += 1;
            let text = String::from_utf8(data.to_vec()).map_err(|e| e.to_string())?;
            self.files.borrow_mut().insert(path.to_owned(), text);
            Ok(())
        }
        fn info(&self, message: &str) {
            self.logs.borrow_mut().push(message.to_owned());
        }
    }

    impl Fake {
        fn put(&self, key: &str, value: &str) -> Result<(), String> {
            apply(self, &event(key, EventKind::Put, Some(value)))
        }
        fn delete(&self, key: &str) -> Result<(), String> {
            apply(self, &event(key, EventKind::Delete, None))
        }
        fn file(&self, path: &str) -> Option<String> {
            self.files.borrow().get(path).cloned()
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
        h.put(APP, "port={{ key \"app/port\" }}\n").unwrap();
        assert_eq!(h.file("app/app.conf").as_deref(), Some("port=8080\n"));

        h.put("app/port", "9090").unwrap();
        assert_eq!(h.file("app/app.conf").as_deref(), Some("port=9090\n"));
    }

    #[test]
    fn unrelated_data_does_not_rerender() {
        let h = Fake::default();
        h.put(APP, "static {{ key_or_default \"app/x\" \"d\" }}")
            .unwrap();
        assert_eq!(*h.writes.borrow(), 1);
        h.put("other/key", "v").unwrap();
        assert_eq!(*h.writes.borrow(), 1);
        h.put("app/x", "set").unwrap();
        assert_eq!(*h.writes.borrow(), 2);
        assert_eq!(h.file("app/app.conf").as_deref(), Some("static set"));
    }

    #[test]
    fn missing_key_fails_without_writing_until_it_arrives() {
        let h = Fake::default();
        let err = h.put(APP, "{{ key \"app/port\" }}").unwrap_err();
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
        h.put("templates/db.ini.tmpl", "[db]\n{{ keys \"db/\" }}")
            .unwrap();
        assert_eq!(h.file("db.ini").as_deref(), Some("[db]\na=1\nb=2\n"));
        h.delete("db/a").unwrap();
        assert_eq!(h.file("db.ini").as_deref(), Some("[db]\nb=2\n"));
    }

    #[test]
    fn deleted_template_stops_rendering_and_is_logged() {
        let h = Fake::default();
        h.put(APP, "{{ key_or_default \"app/port\" \"80\" }}")
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
        let writes = *h.writes.borrow();
        h.put("app/port", "1").unwrap();
        assert_eq!(*h.writes.borrow(), writes);
        assert_eq!(h.file("app/app.conf").as_deref(), Some("80"));
    }

    #[test]
    fn templates_are_not_data() {
        let h = Fake::default();
        h.put("templates/a.tmpl", "A").unwrap();
        let err = h
            .put("templates/b.tmpl", "{{ key \"templates/a.tmpl\" }}")
            .unwrap_err();
        assert!(err.contains("missing key"), "{err}");
        h.put("templates/c.tmpl", "{{ keys \"templates/\" }}")
            .unwrap();
        assert_eq!(h.file("c").as_deref(), Some(""));
        // A non-template key under templates/ is data.
        h.put("templates/notes.txt", "n").unwrap();
        assert_eq!(h.file("c").as_deref(), Some("notes.txt=n\n"));
    }

    #[test]
    fn syntax_error_is_reported_with_line() {
        let h = Fake::default();
        let err = h.put(APP, "ok\n{{ bogus }}").unwrap_err();
        assert!(err.contains("line 2: unknown function \"bogus\""), "{err}");
        // Data changes skip the broken template without failing.
        h.put("x", "1").unwrap();
    }

    #[test]
    fn state_survives_a_new_instance() {
        let h = Fake::default();
        h.put("app/port", "1").unwrap();
        h.put(APP, "{{ key \"app/port\" }}").unwrap();
        // Everything lives in host state: a fresh store sees it all.
        let store = Store::load(&h).unwrap();
        assert_eq!(store.templates().collect::<Vec<_>>(), [APP]);
        assert_eq!(
            template::Data::get(&store, "app/port").as_deref(),
            Some("1")
        );
    }
}

//! Renders Jinja templates kept in the watched store into files.
//!
//! Keys under `templates/` ending in `.tmpl` are templates; every other key
//! is data. Each template renders to a file in the plugin's files grant,
//! named by its key without `templates/` and `.tmpl`
//! (`templates/app/app.conf.tmpl` → `app/app.conf`). After every call the
//! plugin re-renders each template the call's changes can affect: the
//! template itself when it was put, or every template whose last render
//! read a changed key (or listed a prefix it is under). See [`template`]
//! for the language.
//!
//! An output is written only when its bytes change. With `check` set, the
//! new text is written to a hidden candidate beside the output, the
//! granted command checks it, and only on success does it replace the
//! output ([`output`]). With `on_change` set, that command is triggered
//! once per call after any output changed. With `wait` set (and the
//! `snapshot` grant), a call first waits until the subscribed keys have
//! been quiet for `wait` (at most `max_wait`), then renders from the
//! gateway's current view, so a burst of changes renders once.
//!
//! Everything seen is kept in the host state ([`store`]), so a recycled
//! instance carries on where the last one stopped. A template that fails
//! to render (a missing key, a syntax error, a refused check) is not
//! written; the call returns an error naming the template and the reason,
//! and the previous output stays on disk. Deleting a template stops
//! rendering it but leaves its output in place.

mod config;
mod host;
mod output;
mod store;
mod template;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use watchgate_sdk::{BatchError, Event, Plugin, export};

use crate::config::Config;
use crate::host::{Host, Sdk};
use crate::store::Store;
use crate::template::Deps;

/// State key of the JSON array of sources seen (for `wait`).
const SOURCES_KEY: &str = "sources";

/// The plugin: renders templates from the store.
struct TemplateRender;

impl Plugin for TemplateRender {
    fn handle(event: Event) -> Result<(), String> {
        apply(&Sdk, std::slice::from_ref(&event))
            .map_err(|f| format!("template-render: {}", f.message))
    }

    fn handle_batch(events: Vec<Event>) -> Result<(), BatchError> {
        apply(&Sdk, &events).map_err(|f| BatchError {
            index: f.index,
            message: format!("template-render: {}", f.message),
        })
    }
}

export!(TemplateRender);

watchgate_sdk::manifest!(concat!(
    "name = \"template-render\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Renders Jinja templates from the store into files, checked and reloaded by granted commands (wait needs the snapshot grant).\"\n",
    "capabilities = [\"files\", \"commands\"]\n",
));

/// Why a call failed, and the first of its events not handled.
#[derive(Debug)]
struct Failure {
    index: u32,
    message: String,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self { index: 0, message }
    }
}

/// Records `events` in the store and re-renders the templates they affect,
/// once for the lot.
///
/// # Errors
///
/// A setting is wrong, a state write failed, or one or more templates
/// failed to render, pass their check or be written (all reported,
/// `; `-separated; the others are written), or `on_change` could not be
/// triggered. The index names the first event that affects a failed
/// template.
fn apply(host: &impl Host, events: &[Event]) -> Result<(), Failure> {
    let config = Config::load(host)?;
    let mut store = Store::load(host)?;
    let mut touched: BTreeSet<String> = events.iter().map(|e| e.key.clone()).collect();
    match config.wait {
        None => {
            for event in events {
                record(host, &mut store, event)?;
            }
        }
        Some(wait) => {
            let sources = remember_sources(host, events)?;
            let stored = store.all();
            let mut view = scan_all(host, &sources)?;
            if view != stored {
                view = settle(host, &sources, view, wait, config.max_wait)?;
                touched.extend(sync(host, &mut store, &stored, &view)?);
            }
        }
    }

    let affected: Vec<String> = store
        .templates()
        .filter(|t| {
            touched.contains(*t)
                || store
                    .deps(t)
                    .is_none_or(|d| touched.iter().any(|k| d.depends_on(k)))
        })
        .map(str::to_owned)
        .collect();
    if affected.is_empty() {
        return Ok(());
    }

    let data = Arc::new(store.data());
    let mut failures: Vec<(String, Deps, String)> = Vec::new();
    let mut changed = Vec::new();
    for tmpl in &affected {
        let path = template::output_path(tmpl).unwrap_or_default();
        let src = store.raw(tmpl).unwrap_or_default();
        let Ok(src) = std::str::from_utf8(&src) else {
            failures.push((
                tmpl.clone(),
                Deps::default(),
                format!("{tmpl}: not UTF-8 text"),
            ));
            store.set_deps(tmpl, Some(&Deps::default()))?;
            continue;
        };
        let rendered = template::render(tmpl, src, &data);
        store.set_deps(tmpl, Some(&rendered.deps))?;
        let written = rendered
            .output
            .map_err(|e| format!("{tmpl}: {e}; {path} not written"))
            .and_then(|text| {
                output::write(host, config.check.as_deref(), path, text.as_bytes())
                    .map_err(|e| format!("{tmpl}: {e}"))
            });
        match written {
            Ok(true) => changed.push(path),
            Ok(false) => {}
            Err(e) => failures.push((tmpl.clone(), rendered.deps, e)),
        }
    }
    if !changed.is_empty() {
        host.info(&format!("template-render: wrote {}", changed.join(", ")));
        if let Some(cmd) = &config.on_change
            && let Err(e) = host.trigger(cmd, None)
        {
            failures.push((
                String::new(),
                Deps::default(),
                format!("triggering {cmd:?} failed: {e}"),
            ));
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    let index = events
        .iter()
        .position(|e| {
            failures
                .iter()
                .any(|(t, deps, _)| e.key == *t || deps.depends_on(&e.key))
        })
        .unwrap_or(0);
    Err(Failure {
        index: u32::try_from(index).unwrap_or(0),
        message: failures
            .into_iter()
            .map(|(_, _, e)| e)
            .collect::<Vec<_>>()
            .join("; "),
    })
}

/// Applies one event's put or delete to the store.
fn record<H: Host>(host: &H, store: &mut Store<'_, H>, event: &Event) -> Result<(), String> {
    if event.is_delete() {
        forget(host, store, &event.key)
    } else {
        store.put(&event.key, event.value_bytes().unwrap_or_default())
    }
}

/// Removes `key` from the store; a template is logged as no longer rendered.
fn forget<H: Host>(host: &H, store: &mut Store<'_, H>, key: &str) -> Result<(), String> {
    if store.remove(key)? && template::is_template(key) {
        store.set_deps(key, None)?;
        let path = template::output_path(key).unwrap_or_default();
        host.info(&format!(
            "template {key} deleted; no longer rendering it, {path} is left on disk"
        ));
    }
    Ok(())
}

/// The sources seen so far, this call's included (kept in state).
fn remember_sources(host: &impl Host, events: &[Event]) -> Result<BTreeSet<String>, String> {
    let mut sources: BTreeSet<String> = host
        .state_get(SOURCES_KEY)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let before = sources.len();
    sources.extend(events.iter().map(|e| e.source.clone()));
    if sources.len() != before {
        let json = serde_json::to_vec(&sources).map_err(|e| e.to_string())?;
        host.state_set(SOURCES_KEY, Some(&json))?;
    }
    Ok(sources)
}

/// The gateway's current view of every subscribed key of `sources`; a key
/// in several sources takes the value of the first source by name.
fn scan_all(
    host: &impl Host,
    sources: &BTreeSet<String>,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut view = BTreeMap::new();
    for source in sources {
        let entries = host.scan(source).map_err(|e| {
            format!("`wait` reads the gateway's current keys and needs `[grants] snapshot = true`: scanning {source:?} failed: {e}")
        })?;
        for (k, v) in entries {
            view.entry(k).or_insert(v);
        }
    }
    Ok(view)
}

/// Waits until the view has not changed for `wait`, or `max_wait` passed
/// since the call began; returns the last view.
fn settle(
    host: &impl Host,
    sources: &BTreeSet<String>,
    mut view: BTreeMap<String, Vec<u8>>,
    wait: Duration,
    max_wait: Duration,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let start = host.now();
    let mut quiet_since = start;
    let step = (wait / 5).clamp(Duration::from_millis(5), Duration::from_millis(100));
    loop {
        let now = host.now();
        let quiet_left = wait.saturating_sub(now - quiet_since);
        let max_left = max_wait.saturating_sub(now - start);
        if quiet_left.is_zero() || max_left.is_zero() {
            return Ok(view);
        }
        host.sleep(step.min(quiet_left).min(max_left));
        let next = scan_all(host, sources)?;
        if next != view {
            view = next;
            quiet_since = host.now();
        }
    }
}

/// Makes the store hold `view`; returns the keys that changed.
fn sync<H: Host>(
    host: &H,
    store: &mut Store<'_, H>,
    stored: &BTreeMap<String, Vec<u8>>,
    view: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<String>, String> {
    let mut changed = Vec::new();
    for (k, v) in view {
        if stored.get(k) != Some(v) {
            store.put(k, v)?;
            changed.push(k.clone());
        }
    }
    for k in stored.keys() {
        if !view.contains_key(k) {
            forget(host, store, k)?;
            changed.push(k.clone());
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests;

//! template-render in a real gateway with real processes: Jinja templates
//! rendered from the watched store, a check command that can refuse a
//! candidate, a reload command triggered after a change, and a quiet
//! window that renders a burst of changes once.

use std::path::Path;
use std::time::Duration;

use crate::support::{Gateway, wait_for, write_atomic};

const DEADLINE: Duration = Duration::from_secs(60);

/// Writes the check and reload scripts into `dir/bin`; returns the
/// `[grants]` lines naming them. The check refuses a candidate holding
/// `REFUSE` (and appends each path it saw to `checks.log`); the reload
/// appends a line to `reloads.log`. Shell builtins only: granted commands
/// run with an empty environment.
fn scripts(dir: &Path) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = |name: &str| dir.join(name).display().to_string();
    std::fs::write(
        bin.join("check.sh"),
        format!(
            "echo \"$1\" >> '{}'\n\
             while IFS= read -r line; do\n\
             \x20 case \"$line\" in *REFUSE*) echo \"refused: $line\" >&2; exit 1;; esac\n\
             done < \"$1\"\n\
             echo checked\n",
            log("checks.log")
        ),
    )
    .unwrap();
    std::fs::write(
        bin.join("reload.sh"),
        format!("echo reload >> '{}'\n", log("reloads.log")),
    )
    .unwrap();
    format!(
        "commands = {{ check = [\"/bin/sh\", \"{}\", \"{{file}}\"], reload = [\"/bin/sh\", \"{}\"] }}\n",
        bin.join("check.sh").display(),
        bin.join("reload.sh").display()
    )
}

/// Lines in `path`, 0 when it does not exist.
fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn outcome(g: &Gateway, outcome: &str) -> f64 {
    g.metric(&format!(
        "watchgate_plugin_invocations_total{{plugin=\"render\",outcome=\"{outcome}\"}}"
    ))
}

const UPSTREAM: &str = "\
# {{ key(\"app/name\") | upper }}
{% set cfg = key(\"app/settings.yaml\") | yaml %}
upstream {{ key(\"app/name\") }} {
{% for i in services(\"web\") | selectattr(\"healthy\") %}
    server {{ i.address }}:{{ i.port }} weight={{ i.meta.weight | default(1) }};
{% endfor %}
    keepalive {{ cfg.keepalive }};
{% for name, value in keys(\"limits/\") | items %}
    # {{ name }} = {{ value }}
{% endfor %}
    # {{ key_or_default(\"app/comment\", \"no comment\") }}
}
";

fn instance(id: &str, address: &str, status: &str, weight: &str) -> String {
    format!(
        "{{\"id\":\"{id}\",\"service\":\"web\",\"address\":\"{address}\",\"port\":8080,\
         \"tags\":[],\"meta\":{{\"weight\":\"{weight}\"}},\"node\":\"n\",\"status\":\"{status}\"}}"
    )
}

#[test]
fn render_check_reload_refuse_and_recover() {
    let mut g = Gateway::new();
    let grants = scripts(g.dir.path());
    let watched = g.path("watched");
    let w = |rel: &str, v: &str| write_atomic(&watched.join(rel), v.as_bytes());
    w("app/name", "web");
    w("app/settings.yaml", "keepalive: 16\nother: [1, 2]\n");
    w("limits/b", "2");
    w("limits/a", "1");
    w(
        "services/web/web-1",
        &instance("web-1", "10.0.0.1", "passing", "5"),
    );
    w(
        "services/web/web-2",
        &instance("web-2", "10.0.0.2", "critical", "1"),
    );
    w("templates/nginx/upstream.conf.tmpl", UPSTREAM);
    g.install(
        "render",
        "template-render",
        &format!(
            "retry_attempts = 2\nretry_backoff = \"10ms\"\n\n\
             [[subscribe]]\nsource = \"local\"\nprefix = \"\"\n\n\
             [grants]\nfiles = \"../out/render\"\n{grants}\n\
             [settings]\ncheck = \"check\"\non_change = \"reload\"\n"
        ),
    );
    g.start();

    let out = g.path("out/render/nginx/upstream.conf");
    let reloads = g.path("reloads.log");
    let checks = g.path("checks.log");
    let first = "# WEB\nupstream web {\n    server 10.0.0.1:8080 weight=5;\n    keepalive 16;\n    # a = 1\n    # b = 2\n    # no comment\n}\n";
    wait_for("the first render", DEADLINE, || {
        (std::fs::read_to_string(&out).ok()? == first).then_some(())
    });
    wait_for("the first reload", DEADLINE, || {
        (lines(&reloads) == 1).then_some(())
    });
    let checked = std::fs::read_to_string(&checks).unwrap();
    assert!(
        checked
            .lines()
            .all(|l| l.ends_with("/nginx/.upstream.conf.candidate")),
        "{checked}"
    );

    // A change that renders the same bytes: no check, no write, no reload.
    let (checks_before, ok_before) = (lines(&checks), outcome(&g, "ok"));
    w("app/comment", "no comment");
    wait_for("the unchanged render", DEADLINE, || {
        (outcome(&g, "ok") > ok_before).then_some(())
    });
    assert_eq!(
        lines(&checks),
        checks_before,
        "an unchanged render ran the check"
    );
    assert_eq!(lines(&reloads), 1, "an unchanged render reloaded");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), first);

    // The check refuses: the old file stays, no reload, the event fails
    // (both attempts) and is dead-lettered.
    let errors_before = outcome(&g, "error");
    w("app/comment", "REFUSE me");
    wait_for("the refused event's dead letter", DEADLINE, || {
        (g.metric("watchgate_dead_letters_total{plugin=\"render\"}") >= 1.0).then_some(())
    });
    assert!(outcome(&g, "error") >= errors_before + 2.0);
    assert!(
        lines(&checks) >= checks_before + 2,
        "each attempt is checked"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        first,
        "old file kept"
    );
    assert_eq!(lines(&reloads), 1, "no reload after a refusal");
    let text = wait_for("the dead letter in the listing", DEADLINE, || {
        let letters = g.json("/v1/plugins/render/dead-letters");
        (!letters["dead_letters"].as_array()?.is_empty()).then(|| letters.to_string())
    });
    assert!(
        text.contains("refused the new nginx/upstream.conf"),
        "{text}"
    );
    assert!(
        g.log().contains("refused: "),
        "the check's stderr is logged"
    );

    // Recovery: a good value, a new instance; rendered, checked, reloaded.
    w("app/comment", "fine");
    w(
        "services/web/web-3",
        &instance("web-3", "10.0.0.3", "passing", "2"),
    );
    let second = "# WEB\nupstream web {\n    server 10.0.0.1:8080 weight=5;\n    server 10.0.0.3:8080 weight=2;\n    keepalive 16;\n    # a = 1\n    # b = 2\n    # fine\n}\n";
    wait_for("the recovered render", DEADLINE, || {
        (std::fs::read_to_string(&out).ok()? == second).then_some(())
    });
    wait_for("a reload after recovery", DEADLINE, || {
        (lines(&reloads) >= 2).then_some(())
    });
    assert_eq!(
        files_under(&g.path("out/render")),
        ["nginx/upstream.conf"],
        "no candidate left"
    );
    g.assert_running();
}

#[test]
fn a_burst_renders_once_after_the_quiet_window() {
    let mut g = Gateway::new();
    let grants = scripts(g.dir.path());
    let watched = g.path("watched");
    let w = |rel: &str, v: &str| write_atomic(&watched.join(rel), v.as_bytes());
    w("n", "start");
    w("templates/n.conf.tmpl", "n = {{ key(\"n\") }}\n");
    g.install(
        "render",
        "template-render",
        &format!(
            "[[subscribe]]\nsource = \"local\"\nprefix = \"\"\n\n\
             [limits]\ntimeout_ms = 10000\n\n\
             [grants]\nfiles = \"../out/render\"\nsnapshot = true\n{grants}\n\
             [settings]\ncheck = \"check\"\non_change = \"reload\"\nwait = \"500ms\"\nmax_wait = \"5s\"\n"
        ),
    );
    g.start();
    let out = g.path("out/render/n.conf");
    let reloads = g.path("reloads.log");
    let checks = g.path("checks.log");
    wait_for("the first render", DEADLINE, || {
        (std::fs::read_to_string(&out).ok()? == "n = start\n").then_some(())
    });
    wait_for("the first reload", DEADLINE, || {
        (lines(&reloads) == 1).then_some(())
    });
    let checks_before = lines(&checks);

    // 20 changes within 200 ms.
    let start = std::time::Instant::now();
    for i in 0..20 {
        w("n", &i.to_string());
        std::thread::sleep(Duration::from_millis(9));
    }
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
    wait_for("the burst's render", DEADLINE, || {
        (std::fs::read_to_string(&out).ok()? == "n = 19\n").then_some(())
    });
    wait_for("the burst's reload", DEADLINE, || {
        (lines(&reloads) >= 2).then_some(())
    });
    // A sentinel queued behind the burst: once it is rendered, every event
    // of the burst has been handled.
    w(
        "templates/sentinel.tmpl",
        "{{ key_or_default(\"sentinel\", \"-\") }}",
    );
    w("sentinel", "done");
    wait_for("the sentinel's render", DEADLINE, || {
        (std::fs::read_to_string(g.path("out/render/sentinel")).ok()? == "done").then_some(())
    });
    let n_checks = |from: usize| {
        std::fs::read_to_string(&checks)
            .unwrap()
            .lines()
            .skip(from)
            .filter(|l| l.ends_with("/.n.conf.candidate"))
            .count()
    };
    assert_eq!(
        n_checks(checks_before),
        1,
        "one render (one check) for the burst"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "n = 19\n");
    wait_for("the sentinel's reload", DEADLINE, || {
        (lines(&reloads) >= 3).then_some(())
    });
    // First render, the burst, the sentinel (one or two for the sentinel's
    // template and its value, which may land in separate quiet windows).
    let reloaded = lines(&reloads);
    assert!((3..=4).contains(&reloaded), "{reloaded} reloads");
    assert_eq!(
        files_under(&g.path("out/render")),
        ["n.conf", "sentinel"],
        "no candidate left"
    );
    g.assert_running();
}

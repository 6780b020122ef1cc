// The watchgate console: reads the admin API of the gateway that serves
// it (same origin, nothing else) and renders four pages from the URL hash:
// overview, plugin detail, live tail and trace. Every value from the
// gateway is put into the page as text, never as markup.
"use strict";

const REFRESH_MS = 2000;
const TAIL_ROWS = 200;

const ui = {
  data: null,        // the last successful poll
  previous: null,    // the one before, for rates
  failedSince: null, // when polls started failing
  tail: null,        // the live tail's EventSource
  tailRows: [],
  traceQuery: null,
  note: "",          // the result of the last replay or delete
};

// ---- small helpers -------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function token() {
  return sessionStorage.getItem("watchgate-token") || "";
}

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  if (opts.method && opts.method !== "GET" && token()) {
    opts.headers.Authorization = "Bearer " + token();
  }
  const r = await fetch(path, opts);
  const type = r.headers.get("content-type") || "";
  const body = type.includes("json") ? await r.json() : await r.text();
  return { status: r.status, ok: r.ok, body };
}

function count(n) {
  if (n === undefined || n === null) return "–";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + " k";
  return String(n);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  if (seconds < 1e-3) return (seconds * 1e6).toFixed(0) + " µs";
  if (seconds < 1) return (seconds * 1e3).toFixed(1) + " ms";
  return seconds.toFixed(2) + " s";
}

function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1 << 20) return (n / 1024).toFixed(1) + " KiB";
  return (n / (1 << 20)).toFixed(1) + " MiB";
}

// A long message (a trap with its backtrace) as its first and last lines,
// where the cause is, at most 200 characters; the plugin page shows it
// whole.
function firstLine(text) {
  const lines = String(text).split("\n").map((l) => l.trim()).filter(Boolean);
  const line = lines.length > 1 ? lines[0] + " … " + lines[lines.length - 1] : lines[0] || "";
  return line.length > 200 ? "…" + line.slice(line.length - 199) : line;
}

function ago(unixSeconds) {
  if (!unixSeconds) return "–";
  const s = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (s < 90) return s.toFixed(0) + " s ago";
  if (s < 5400) return (s / 60).toFixed(0) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}

const TONE = {
  running: "s-ok", pooled: "s-ok", handled: "s-ok", ready: "s-ok", connected: "s-ok", yes: "s-ok",
  queued: "s-warn", retrying: "s-warn", syncing: "s-warn", degraded: "s-warn", "not owned here": "s-idle",
  quarantined: "s-bad", failed: "s-bad", dead_letter: "s-bad", disconnected: "s-bad", no: "s-bad",
  parked: "s-idle", not_subscribed: "s-idle", standalone: "s-idle",
};

function pill(state, label) {
  return h("span", { class: "pill " + (TONE[state] || "s-idle"), "data-state": state }, label || state);
}

// ---- data ------------------------------------------------------------------

// p99 call time per plugin from the call-time histogram in /metrics.
function p99s(metrics) {
  const buckets = {};
  const re = /^watchgate_plugin_call_seconds_bucket\{(.*)\} ([0-9.eE+-]+|\+Inf)/;
  for (const line of metrics.split("\n")) {
    const m = re.exec(line);
    if (!m) continue;
    const labels = {};
    for (const p of m[1].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[p[1]] = p[2];
    if (!labels.plugin || labels.le === undefined) continue;
    const le = labels.le === "+Inf" ? Infinity : Number(labels.le);
    const per = (buckets[labels.plugin] = buckets[labels.plugin] || {});
    per[le] = (per[le] || 0) + Number(m[2]);
  }
  const out = {};
  for (const [plugin, per] of Object.entries(buckets)) {
    const les = Object.keys(per).map(Number).sort((a, b) => a - b);
    const total = per[Infinity] || 0;
    if (!total) continue;
    const le = les.find((l) => per[l] >= 0.99 * total);
    out[plugin] = le === Infinity ? les[les.length - 2] : le;
  }
  return out;
}

async function poll() {
  try {
    const [ready, sources, plugins, cluster, metrics] = await Promise.all([
      api("/readyz"),
      api("/v1/sources?limit=1000"),
      api("/v1/plugins?limit=1000"),
      api("/v1/cluster"),
      api("/metrics"),
    ]);
    if (!sources.ok || !plugins.ok) throw new Error("the admin API answered " + plugins.status);
    ui.previous = ui.data;
    ui.data = {
      at: Date.now(),
      ready: ready.body,
      sources: sources.body.sources,
      plugins: plugins.body.plugins,
      rejected: plugins.body.rejected,
      cluster: cluster.ok ? cluster.body : null,
      p99: typeof metrics.body === "string" ? p99s(metrics.body) : {},
    };
    ui.failedSince = null;
  } catch (e) {
    ui.failedSince = ui.failedSince || new Date();
    ui.error = String(e && e.message ? e.message : e);
  }
  banner();
  render();
}

function banner() {
  const b = document.getElementById("banner");
  if (ui.failedSince) {
    b.className = "banner down";
    b.textContent =
      "The gateway at " + location.origin + " is not answering (since " +
      ui.failedSince.toLocaleTimeString() + "): " + ui.error +
      ". Retrying every " + REFRESH_MS / 1000 + " s; what is shown below is from before.";
    document.body.classList.add("stale");
  } else {
    b.className = "banner hidden";
    b.textContent = "";
    document.body.classList.remove("stale");
  }
  const u = document.getElementById("updated");
  u.textContent = ui.data
    ? "Updated " + new Date(ui.data.at).toLocaleTimeString() + " · refreshes every " + REFRESH_MS / 1000 + " s"
    : "";
}

function pluginState(p) {
  if (p.state === "parked" && ui.data && ui.data.cluster) return "not owned here";
  if (p.state === "running" && p.pooled) return "pooled";
  return p.state;
}

function calls(p) {
  return Object.values(p.invocations || {}).reduce((a, b) => a + b, 0);
}

function rate(p) {
  if (!ui.previous) return null;
  const before = ui.previous.plugins.find((q) => q.name === p.name);
  if (!before) return null;
  const dt = (ui.data.at - ui.previous.at) / 1000;
  return dt > 0 ? Math.max(0, calls(p) - calls(before)) / dt : null;
}

function owner(name) {
  const c = ui.data && ui.data.cluster;
  if (!c) return null;
  const r = c.replicas.find((r) => r.owns.includes(name));
  return r ? r.name : "nobody";
}

// ---- pages -------------------------------------------------------------------

function overview() {
  const d = ui.data;
  const sourceRows = d.sources.map((s) =>
    h("tr", { "data-source": s.name },
      h("td", {}, h("strong", {}, s.name)),
      h("td", {}, s.kind || "–"),
      h("td", {}, pill(s.connected ? "connected" : "disconnected")),
      h("td", {}, pill(s.synced ? "yes" : "syncing", s.synced ? "synced" : "syncing")),
      h("td", { class: "num" }, count(s.revision)),
      h("td", { class: "num" }, s.lag ? count(s.lag) + " changes" : "0"),
      h("td", { class: "num" }, count(s.reconnects)),
      h("td", {}, s.last_error ? h("span", { class: "err" }, s.last_error) : h("span", { class: "muted" }, "none"))));
  const pluginRows = d.plugins.map((p) => {
    const state = pluginState(p);
    const inv = p.invocations || {};
    const failed = calls(p) - (inv.ok || 0);
    const r = rate(p);
    return h("tr", { "data-plugin": p.name, "data-state": state },
      h("td", {}, h("a", { href: "#/plugin/" + encodeURIComponent(p.name) }, p.name)),
      h("td", {}, p.language || "unknown"),
      h("td", { class: "num" }, "v" + p.version),
      h("td", {}, pill(state)),
      h("td", { class: "num" }, count(p.queue_depth) + " / " + count(p.queue_capacity)),
      h("td", { class: "num" }, count(inv.ok || 0) + " ok · " + count(failed) + " failed"),
      h("td", { class: "num" }, r === null ? "–" : r.toFixed(1) + " /s"),
      h("td", { class: "num" }, duration(d.p99[p.name])),
      h("td", { class: "num", "data-dead-letters": p.dead_letters },
        p.dead_letters ? pill("dead_letter", count(p.dead_letters)) : "0"),
      d.cluster ? h("td", {}, owner(p.name)) : null);
  });
  const rejected = (d.rejected || []).map((r) =>
    h("tr", {}, h("td", {}, r.name), h("td", { class: "err" }, r.error || r.reason || JSON.stringify(r))));
  const ready = d.ready && d.ready.ready;
  const totalLetters = d.plugins.reduce((a, p) => a + (p.dead_letters || 0), 0);
  return [
    h("div", { class: "cards" },
      h("div", { class: "card" }, h("div", { class: "muted" }, "Readiness"), h("div", { class: "big" }, pill(ready ? "ready" : "syncing", ready ? "ready" : "not ready"))),
      h("div", { class: "card" }, h("div", { class: "muted" }, "Sources"), h("div", { class: "big" }, d.sources.filter((s) => s.connected).length + " / " + d.sources.length + " connected")),
      h("div", { class: "card" }, h("div", { class: "muted" }, "Plugins"), h("div", { class: "big" }, d.plugins.filter((p) => p.state === "running").length + " / " + d.plugins.length + " running")),
      h("div", { class: "card" }, h("div", { class: "muted" }, "Dead letters"), h("div", { class: "big" }, count(totalLetters)))),
    h("h2", {}, "Sources"),
    h("table", { id: "sources" },
      h("thead", {}, h("tr", {}, ["Source", "Kind", "Connection", "Sync", "Revision", "Lag", "Reconnects", "Last error"].map((t, i) => h("th", { class: i >= 4 && i <= 6 ? "num" : null }, t)))),
      h("tbody", {}, sourceRows.length ? sourceRows : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No sources configured.")))),
    h("h2", {}, "Plugins"),
    h("table", { id: "plugins" },
      h("thead", {}, h("tr", {}, ["Plugin", "Language", "Version", "State", "Queue", "Calls", "Rate", "p99 call", "Dead letters", d.cluster ? "Owner" : null].filter(Boolean).map((t, i) => h("th", { class: i >= 4 && i <= 8 ? "num" : null }, t)))),
      h("tbody", {}, pluginRows.length ? pluginRows : h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No plugins running.")))),
    rejected.length ? [h("h2", {}, "Rejected plugin files"), h("table", {}, h("tbody", {}, rejected))] : null,
    h("h2", {}, "Cluster"),
    d.cluster ? clusterView(d.cluster) : h("p", { class: "muted", id: "cluster" }, "Standalone: this gateway runs alone (no [cluster] in its config)."),
  ];
}

function clusterView(c) {
  return h("div", { id: "cluster" },
    h("p", {}, "This replica: ", h("strong", {}, c.name), " · lease ", c.lease ? String(c.lease) : "none", " ",
      pill(c.lease_valid ? "ready" : "degraded", c.lease_valid ? "valid" : "not valid")),
    h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Replica"), h("th", {}, "Owns"))),
      h("tbody", {}, c.replicas.map((r) => h("tr", {}, h("td", {}, r.name + (r.name === c.name ? " (this one)" : "")), h("td", {}, r.owns.join(", ") || "–"))))));
}

function keyValues(rows) {
  return h("table", {}, h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))));
}

function pluginDetail(name) {
  const p = ui.data.plugins.find((q) => q.name === name);
  if (!p) return [h("h2", {}, name), h("p", { class: "muted" }, "No plugin of this name is running here.")];
  const l = p.limits;
  const caps = p.capabilities || { requested: [], granted: [], ungranted: [] };
  const allCaps = [...new Set([...caps.requested, ...caps.granted])].sort();
  const detail = h("div", { id: "plugin-detail", "data-plugin": p.name },
    h("h2", {}, p.name, " ", pill(pluginState(p))),
    h("p", { class: "muted" }, (p.language || "unknown") + " · v" + p.version + " · " + bytes(p.size) + " · sha256 " + p.digest.slice(0, 12) +
      (p.pooled ? " · runs on the shared pool" : "")),
    h("div", { class: "grid" },
      h("div", {},
        h("h3", {}, "Limits per call"),
        keyValues([
          ["Fuel", count(l.fuel)],
          ["Deadline", l.timeout_ms + " ms"],
          ["Memory", l.memory_mb + " MiB"],
          ["Files", p.files_grant ? l.files_mb + " MiB, " + l.files_count + " entries under " + p.files_grant : "no files grant"],
          ["Queue", count(p.queue_depth) + " of " + count(p.queue_capacity)],
          ["Retries", p.retry_attempts + " attempts per event"],
          ["Dead letters kept", "at most " + count(p.max_dead_letters) + " and " + bytes(p.max_dead_letter_bytes)],
        ])),
      h("div", {},
        h("h3", {}, "Capabilities: requested vs granted"),
        h("table", { id: "capabilities" },
          h("thead", {}, h("tr", {}, h("th", {}, "Capability"), h("th", {}, "Requested"), h("th", {}, "Granted"))),
          h("tbody", {}, allCaps.length ? allCaps.map((c) => h("tr", {},
            h("td", {}, c),
            h("td", {}, caps.requested.includes(c) ? "yes" : "–"),
            h("td", {}, caps.granted.includes(c) ? pill("yes") : pill("no", caps.ungranted.includes(c) ? "not granted" : "no"))))
            : h("tr", {}, h("td", { colspan: 3, class: "muted" }, "None requested or granted.")))),
        h("h3", {}, "Subscriptions"),
        h("p", {}, p.subscriptions.length ? p.subscriptions.map((s) => s.source + ":" + (s.prefix || "*")).join(", ") : "every source, every key"),
        h("h3", {}, "Cursors"),
        h("p", { class: "mono" }, Object.entries(p.cursors).map(([s, c]) => s + " @ " + c).join(", ") || "–"))),
    h("h3", {}, "Recent failures"),
    p.last_failure
      ? keyValues([
        ["Outcome", pill("failed", p.last_failure.outcome)],
        ["Key", h("code", {}, p.last_failure.key)],
        ["Message", h("span", { class: "err", id: "last-failure" }, p.last_failure.message)],
        ["When", ago(p.last_failure.at)],
      ])
      : h("p", { class: "muted" }, "No failed call."),
    p.quarantine ? h("p", {}, pill("quarantined"), " since " + ago(p.quarantine.since) + ", " + p.quarantine.probes + " probes, next in " + p.quarantine.next_probe_in_ms + " ms") : null,
    h("h3", {}, "Dead letters (" + count(p.dead_letters) + ", " + bytes(p.dead_letter_bytes) + ")"),
    h("div", { class: "row" },
      h("button", { id: "replay", class: "primary", disabled: !token() || !p.dead_letters, onclick: () => mutate(p.name, "POST", "/replay") }, "Replay all"),
      h("button", { id: "delete", class: "danger", disabled: !token() || !p.dead_letters, onclick: () => mutate(p.name, "DELETE", "") }, "Delete all"),
      h("span", { id: "mutate-result", class: "muted" }, ui.note || (token() ? "" : "Read-only: enter the admin token above to replay or delete."))),
    h("div", { id: "letters" }, h("p", { class: "muted" }, "Loading…")));
  loadLetters(p.name);
  return [detail];
}

async function loadLetters(name) {
  let r;
  try {
    r = await api("/v1/plugins/" + encodeURIComponent(name) + "/dead-letters?limit=50");
  } catch (e) {
    return;
  }
  const box = document.getElementById("letters");
  if (!box || !r.ok) return;
  const rows = r.body.dead_letters.map((l) =>
    h("tr", { "data-letter": l.id },
      h("td", { class: "num" }, l.id),
      h("td", {}, l.event.source),
      h("td", {}, h("code", {}, l.event.key)),
      h("td", { class: "num" }, l.event.revision),
      h("td", {}, l.outcome),
      h("td", { class: "num" }, l.attempts),
      h("td", { class: "err" }, l.error),
      h("td", {}, ago(l.at))));
  box.replaceChildren(rows.length
    ? h("table", {},
      h("thead", {}, h("tr", {}, ["Id", "Source", "Key", "Revision", "Outcome", "Attempts", "Error", "When"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows),
      r.body.next ? h("tfoot", {}, h("tr", {}, h("td", { colspan: 8, class: "muted" }, "Showing the oldest 50."))) : null)
    : h("p", { class: "muted", id: "no-letters" }, "No dead letters."));
}

async function mutate(name, method, suffix) {
  const path = "/v1/plugins/" + encodeURIComponent(name) + "/dead-letters" + suffix;
  try {
    const r = await api(path, { method });
    ui.note = r.ok
      ? (method === "POST" ? "Replayed " + r.body.replayed + " dead letter(s)." : "Deleted " + r.body.deleted + " dead letter(s).")
      : "Refused (" + r.status + "): " + (r.body.error || r.body);
  } catch (e) {
    ui.note = "The gateway did not answer: " + e;
  }
  await poll();
}

function tailPage() {
  if (!ui.tail) startTail();
  const rows = ui.tailRows.map((e) =>
    h("tr", { "data-key": e.key },
      h("td", { class: "mono" }, new Date(e.at_ms).toLocaleTimeString()),
      h("td", {}, e.source),
      h("td", {}, pill(e.kind === "delete" ? "degraded" : "ready", e.kind)),
      h("td", {}, h("code", {}, e.key)),
      h("td", { class: "num" }, e.revision),
      h("td", {}, e.plugins.length ? e.plugins.join(", ") : h("span", { class: "muted" }, "none")),
      h("td", { class: "mono" }, e.value === undefined ? h("span", { class: "muted" }, "hidden") : e.value === null ? "–" : e.value),
      h("td", {}, h("a", { href: "#/trace?source=" + encodeURIComponent(e.source) + "&key=" + encodeURIComponent(e.key) }, "trace"))));
  return [
    h("h2", {}, "Live tail"),
    h("p", { class: "muted", id: "tail-state" }, ui.tailState || "Connecting…"),
    h("div", { class: "tail" }, h("table", { id: "tail" },
      h("thead", {}, h("tr", {}, ["Time", "Source", "Kind", "Key", "Revision", "Plugins", "Value", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "Waiting for changes…"))))),
  ];
}

function startTail() {
  ui.tail = new EventSource("/v1/events/stream");
  ui.tail.onopen = () => { ui.tailState = "Connected: newest first, the last " + TAIL_ROWS + " changes."; render(); };
  ui.tail.onerror = () => { ui.tailState = "Disconnected from the stream; reconnecting…"; render(); };
  ui.tail.addEventListener("change", (m) => {
    ui.tailRows.unshift(JSON.parse(m.data));
    ui.tailRows.length = Math.min(ui.tailRows.length, TAIL_ROWS);
    render();
  });
  ui.tail.addEventListener("dropped", (m) => {
    ui.tailState = "This view fell behind: " + JSON.parse(m.data).dropped + " change(s) were skipped.";
  });
}

function stopTail() {
  if (ui.tail) ui.tail.close();
  ui.tail = null;
}

function tracePage(params) {
  const sources = ui.data.sources.map((s) => s.name);
  const source = params.get("source") || sources[0] || "";
  const key = params.get("key") || "";
  const revision = params.get("revision") || "";
  const form = h("form", { id: "trace-form", class: "row", onsubmit: (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    q.set("source", form.elements.source.value);
    q.set("key", form.elements.key.value);
    if (form.elements.revision.value) q.set("revision", form.elements.revision.value);
    location.hash = "#/trace?" + q.toString();
  } },
  h("label", {}, "Source ", h("select", { name: "source" }, sources.map((s) => h("option", { value: s, selected: s === source }, s)))),
  h("label", {}, "Key ", h("input", { name: "key", value: key, placeholder: "app/config.json", required: true })),
  h("label", {}, "Revision ", h("input", { name: "revision", value: revision, placeholder: "latest", size: 8 })),
  h("button", { class: "primary", type: "submit" }, "Trace"));
  const out = h("div", { id: "trace-result" });
  if (key) loadTrace(out, source, key, revision);
  return [h("h2", {}, "Trace a change"), h("p", { class: "muted" }, "Where a key's latest change (or its change at a revision) stands for every plugin."), form, out];
}

async function loadTrace(out, source, key, revision) {
  const q = new URLSearchParams({ source, key });
  if (revision) q.set("revision", revision);
  let r;
  try {
    r = await api("/v1/trace?" + q.toString());
  } catch (e) {
    out.replaceChildren(h("p", { class: "err" }, "The gateway did not answer."));
    return;
  }
  if (!r.ok) {
    out.replaceChildren(h("p", { class: "err" }, r.body.error || String(r.body)));
    return;
  }
  const t = r.body;
  out.replaceChildren(
    h("p", {}, h("strong", {}, t.source + " / " + t.key), ": ", t.change.kind, " at revision ", String(t.change.revision),
      t.change.latest ? " (its latest change)" : ""),
    h("table", { id: "trace" },
      h("thead", {}, h("tr", {}, ["Plugin", "Status", "Detail", ui.data.cluster ? "Owner" : null].filter(Boolean).map((x) => h("th", {}, x)))),
      h("tbody", {}, t.plugins.map((p) => h("tr", { "data-plugin": p.plugin, "data-status": p.status },
        h("td", {}, p.plugin),
        h("td", {}, pill(p.status, p.status.replace("_", " "))),
        h("td", {}, [
          p.handled_at_ms ? "handled " + ago(p.handled_at_ms / 1000) : null,
          p.attempts ? p.attempts + " attempt(s)" : null,
          p.queue_position !== null && p.queue_position !== undefined ? p.queue_position + " ahead in its queue" : null,
          p.dead_letter ? "dead letter " + p.dead_letter : null,
          p.error ? "error: " + firstLine(p.error) : null,
        ].filter(Boolean).join(" · ")),
        ui.data.cluster ? h("td", {}, p.owner || "–") : null)))));
}

// ---- routing -------------------------------------------------------------------

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  return { path, params: new URLSearchParams(query || "") };
}

function render() {
  const { path, params } = route();
  const hash = location.hash;
  for (const a of document.querySelectorAll("nav a")) {
    const page = a.getAttribute("data-page");
    a.classList.toggle("active", (page === "overview" && (path === "/" || path.startsWith("/plugin/"))) || path === "/" + page);
  }
  if (path !== "/tail") stopTail();
  const main = document.getElementById("main");
  if (!ui.data) {
    main.replaceChildren(h("p", { class: "muted" }, ui.failedSince ? "No answer from the gateway yet." : "Loading…"));
    return;
  }
  // Keep what the operator is typing: a trace page is only rebuilt when
  // its query changes.
  if (path === "/trace" && ui.traceQuery === hash && main.querySelector("#trace-form")) return;
  ui.traceQuery = path === "/trace" ? hash : null;
  let content;
  if (path.startsWith("/plugin/")) content = pluginDetail(decodeURIComponent(path.slice("/plugin/".length)));
  else if (path === "/tail") content = tailPage();
  else if (path === "/trace") content = tracePage(params);
  else content = overview();
  main.replaceChildren(...content.flat().filter(Boolean));
}

function showTokenState() {
  document.getElementById("token-state").textContent = token() ? "token set" : "read-only";
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = document.getElementById("token");
  if (input.value) sessionStorage.setItem("watchgate-token", input.value);
  else sessionStorage.removeItem("watchgate-token");
  input.value = "";
  showTokenState();
  render();
});
window.addEventListener("hashchange", () => { ui.note = ""; render(); });
showTokenState();
poll();
setInterval(poll, REFRESH_MS);

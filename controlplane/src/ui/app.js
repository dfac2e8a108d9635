// The gateway dashboard: plain JavaScript, no build step, nothing fetched from elsewhere.
// The token lives in sessionStorage (this tab only) and travels in the Authorization header of
// every data request, the live stream included (a streamed fetch; EventSource cannot send it).
// One tab at a time holds the live stream (a Web Lock) and passes its ticks to the others
// (a BroadcastChannel): a stream per tab held one of the browser's six connections to the
// admin API each, and six tabs stopped every tab's refresh.
"use strict";

const HISTORY = 300;            // seconds kept for the plots: bounded, however long the page stays open
const REFRESH_MS = 5000;        // resources, revisions and the access log
const state = { token: null, timer: null, streamAbort: null, signingIn: false, rps: [], p99: [], live: new Map(), configEtag: null };
// Only where tabs can agree which one holds the stream: without Web Locks (not a secure
// context) every tab streams, and passing ticks on too gave each tab every tab's.
const ticks = "BroadcastChannel" in window && navigator.locks
  ? new BroadcastChannel("gateway-dashboard-live") : null;

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + state.token }, options.headers || {});
  const res = await fetch(path, Object.assign({}, options, { headers }));
  if (res.status === 401) {
    signOut("401 Unauthorized: the token was refused");
    throw new Error("unauthorized");
  }
  return res;
}

async function getJson(path) {
  const res = await api(path);
  if (!res.ok) throw new Error(path + ": " + res.status);
  return res.json();
}

// ---- sign in / out -------------------------------------------------------------------------

// One sign-in at a time: a double click started two refresh timers and two streams, of
// which a sign-out stopped one (the other polled on with no token).
async function signIn(token) {
  if (state.signingIn) return;
  state.signingIn = true;
  try {
    await trySignIn(token);
  } finally {
    state.signingIn = false;
  }
}

async function trySignIn(token) {
  // What the API reads from `Authorization`: visible ASCII, spaces and tabs (every token the
  // gateway takes, those of its admin-token file with spaces too); fetch throws beyond
  // Latin-1, and the API would refuse the rest.
  if (/[^\x20-\x7e\t]/.test(token)) {
    $("login-error").textContent = "this token cannot be sent: a header carries visible ASCII, spaces and tabs only";
    return;
  }
  let res;
  const giveUp = new AbortController();
  const timer = setTimeout(() => giveUp.abort(), 10000);
  try {
    res = await fetch("/v1/status", { headers: { Authorization: "Bearer " + token }, signal: giveUp.signal });
  } catch (e) {
    $("login-error").textContent = "cannot reach the admin API: " +
      (giveUp.signal.aborted ? "no answer within 10 s" : e.message);
    return;
  } finally {
    clearTimeout(timer);
  }
  if (res.status === 401) {
    $("login-error").textContent = "401 Unauthorized: the token was refused";
    return;
  }
  if (!res.ok) {
    $("login-error").textContent = "the admin API answered " + res.status;
    return;
  }
  stopActivity();
  state.token = token;
  sessionStorage.setItem("gw-token", token);
  $("login-error").textContent = "";
  $("login").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  refresh();
  state.timer = setInterval(refresh, REFRESH_MS);
  startStream();
}

function stopActivity() {
  clearInterval(state.timer);
  state.timer = null;
  if (state.streamAbort) state.streamAbort.abort();
  state.streamAbort = null;
}

function signOut(message) {
  sessionStorage.removeItem("gw-token");
  state.token = null;
  stopActivity();
  $("app").hidden = true;
  $("signout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

// ---- live stream ---------------------------------------------------------------------------

// Takes the stream when no other tab of this browser holds it (at once without Web Locks,
// which need a secure context: each tab its own then), and holds it until signed out.
function startStream() {
  const abort = new AbortController();
  state.streamAbort = abort;
  if (!navigator.locks || !ticks) {
    leadStream(abort);
    return;
  }
  $("stream-state").textContent = "live (from another tab)";
  navigator.locks
    .request("gateway-dashboard-stream", { signal: abort.signal }, () => leadStream(abort))
    .catch(() => { /* aborted while waiting: signed out */ });
}

// Reads the stream, again a second after it ends or fails, until `abort`.
async function leadStream(abort) {
  while (state.token && !abort.signal.aborted) {
    await readStream(abort);
    if (abort.signal.aborted) return;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function readStream(abort) {
  try {
    const res = await api("/v1/stream", { signal: abort.signal });
    if (!res.ok) throw new Error("stream: " + res.status);
    streamState("live");
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        if (!line.trim()) continue;
        const tick = JSON.parse(line);
        onTick(tick);
        if (ticks) ticks.postMessage(tick);
      }
    }
  } catch (e) {
    if (abort.signal.aborted) return;
    streamState("stream interrupted (" + e.message + "); reconnecting");
  }
}

// The stream's state, here and in the tabs it feeds.
function streamState(text) {
  $("stream-state").textContent = text;
  if (ticks) ticks.postMessage({ state: text });
}

function fmtMs(v) { return v === null || v === undefined ? "–" : (v < 10 ? v.toFixed(2) : v.toFixed(0)) + " ms"; }
function fmtPct(v) { return (v * 100).toFixed(v > 0 && v < 0.01 ? 2 : 1) + "%"; }

function onTick(t) {
  $("live-rps").textContent = t.total.rps.toFixed(1);
  $("live-errors").textContent = fmtPct(t.total.error_rate);
  $("live-p50").textContent = fmtMs(t.total.p50_ms);
  $("live-p99").textContent = fmtMs(t.total.p99_ms);
  push(state.rps, t.total.rps);
  push(state.p99, t.total.p99_ms === null ? 0 : t.total.p99_ms);
  plot($("plot-rps"), state.rps, "#2563eb");
  plot($("plot-p99"), state.p99, "#c2410c");
  state.live = new Map(t.routes.map((r) => [r.route, r]));
  for (const row of document.querySelectorAll("#routes tbody tr")) fillLive(row);
}

function push(series, v) {
  series.push(v);
  if (series.length > HISTORY) series.splice(0, series.length - HISTORY);
}

function plot(canvas, series, color) {
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 4;
  g.clearRect(0, 0, w, h);
  const max = Math.max(1, ...series) * 1.1;
  g.fillStyle = "#69707d";
  g.font = "11px system-ui, sans-serif";
  g.fillText(max.toFixed(max < 10 ? 1 : 0), pad, 12);
  g.strokeStyle = color;
  g.lineWidth = 1.5;
  g.beginPath();
  series.forEach((v, i) => {
    const x = pad + (w - 2 * pad) * (i + HISTORY - series.length) / (HISTORY - 1);
    const y = h - pad - (h - 2 * pad) * v / max;
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
}

// ---- resources -----------------------------------------------------------------------------

async function refresh() {
  try {
    const status = await getJson("/v1/status");
    const store = status.store && status.store.kind === "etcd"
      ? ", etcd " + (status.store.reachable ? "reachable" : "UNREACHABLE") : "";
    $("summary").textContent = "revision " + status.revision + ", " + status.workers + " workers (" +
      status.io_driver + "), up " + status.uptime_seconds + " s, pid " + status.pid + store;
    await Promise.all([loadRoutes(), loadUpstreams(), loadRevisions(), loadLog()]);
  } catch (e) {
    if (state.token) $("summary").textContent = "cannot reach the admin API: " + e.message;
  }
}

function matchText(r) {
  const parts = [];
  if (r.methods) parts.push(r.methods.join(","));
  if (r.hosts) parts.push(r.hosts.join(" "));
  parts.push(r.path || (r.path_prefix ? r.path_prefix + "*" : ""));
  return parts.join(" ");
}

function actionText(r) {
  if (r.upstream) return "→ " + r.upstream + (r.rewrite ? " as " + r.rewrite : "");
  if (r.aggregate) return "aggregate " + r.aggregate;
  if (r.respond) return "respond " + (r.respond.status || 200);
  if (r.redirect) {
    const d = r.redirect;
    const to = [d.scheme && d.scheme + "://", d.host, d.port && ":" + d.port, d.path]
      .filter(Boolean).join("");
    return "redirect " + (d.status || 301) + " " + to;
  }
  return "";
}

function fillLive(row) {
  const live = state.live.get(row.dataset.route);
  const cells = row.querySelectorAll("td.num");
  cells[0].textContent = live ? live.rps.toFixed(1) : "–";
  cells[1].textContent = live ? fmtPct(live.error_rate) : "–";
  cells[2].textContent = live ? fmtMs(live.p50_ms) : "–";
  cells[3].textContent = live ? fmtMs(live.p99_ms) : "–";
}

async function loadRoutes() {
  const list = await getJson("/v1/routes");
  const body = $("routes").querySelector("tbody");
  body.replaceChildren(...list.items.map((r) => {
    const tr = el("tr");
    tr.dataset.route = r.id;
    tr.append(el("td", r.id), el("td", matchText(r)), el("td", actionText(r)),
      el("td", (r.policies || []).join(", ")),
      el("td", (r.variants || []).map((v) => v.profile || v.id || "").join(", ")));
    for (let i = 0; i < 4; i++) tr.append(el("td", "–", "num"));
    fillLive(tr);
    return tr;
  }));
}

async function loadUpstreams() {
  const list = await getJson("/v1/upstreams");
  const rows = await Promise.all(list.items.map(async (u) => {
    let health = null;
    try { health = await getJson("/v1/upstreams/" + encodeURIComponent(u.id) + "/health"); } catch (e) { /* shown as unknown */ }
    const tr = el("tr");
    const targets = el("td");
    const shown = health ? health.targets : (u.targets || []).map((t) => ({ address: t.address, state: "unknown" }));
    for (const t of shown) {
      const line = el("div");
      line.append(el("span", t.address + " "), el("span", t.state, "health-" + t.state));
      if (t.backup) line.append(el("span", " backup", "backup"));
      targets.append(line);
    }
    tr.append(el("td", u.id), el("td", u.protocol || "http1"), el("td", u.balance || "round_robin"), targets);
    return tr;
  }));
  $("upstreams").querySelector("tbody").replaceChildren(...rows);
}

async function loadRevisions() {
  // Its ETag, for a rollback's If-Match: the head alone, not the whole config.
  const res = await api("/v1/config", { method: "HEAD" });
  state.configEtag = res.headers.get("etag");
  const list = await getJson("/v1/revisions");
  const revs = list.revisions.slice().reverse();
  const body = $("revisions").querySelector("tbody");
  body.replaceChildren(...revs.map((r) => {
    const tr = el("tr");
    tr.dataset.revision = r.revision;
    const act = el("td");
    if (r.revision !== list.current) {
      const b = el("button", "Roll back to " + r.revision);
      b.className = "rollback";
      b.addEventListener("click", () => rollback(r.revision));
      act.append(b);
    } else {
      act.append(el("span", "current", "muted"));
    }
    tr.append(el("td", r.revision), el("td", new Date(r.created_ms).toLocaleString()), el("td", r.source), act);
    return tr;
  }));
  // The diff compares the previous revision with the current one until someone picks others.
  for (const [id, fallback] of [["diff-a", revs[Math.min(1, revs.length - 1)]], ["diff-b", revs[0]]]) {
    const sel = $(id);
    const keep = sel.value;
    sel.replaceChildren(...revs.map((r) => { const o = el("option", r.revision); o.value = r.revision; return o; }));
    if (sel.dataset.touched && revs.some((r) => String(r.revision) === keep)) sel.value = keep;
    else if (fallback) sel.value = fallback.revision;
  }
}

async function rollback(n) {
  if (!window.confirm("Roll back to revision " + n + "? Every node serves it at once.")) return;
  const res = await api("/v1/revisions/" + n + ":rollback", { method: "POST", headers: { "If-Match": state.configEtag || "*" } });
  const out = $("rollback-result");
  if (res.ok) {
    const body = await res.json();
    out.textContent = "rolled back to " + n + ": now revision " + body.revision;
    out.className = "";
  } else {
    const p = await res.json().catch(() => ({}));
    out.textContent = res.status + " " + (p.title || "") + ": " + (p.detail || "") +
      (res.status === 412 ? " (the config changed meanwhile; look again)" : "");
    out.className = "error";
  }
  refresh();
}

const KINDS = ["routes", "upstreams", "policies", "consumers", "credentials", "aggregates", "client_profiles", "certificates", "transcoders"];

async function showDiff() {
  const a = $("diff-a").value, b = $("diff-b").value;
  const [ra, rb] = await Promise.all([getJson("/v1/revisions/" + a), getJson("/v1/revisions/" + b)]);
  const lines = [];
  for (const kind of KINDS) {
    const before = new Map((ra.config[kind] || []).map((x) => [x.id, x]));
    const after = new Map((rb.config[kind] || []).map((x) => [x.id, x]));
    for (const [id, x] of after) {
      if (!before.has(id)) lines.push("+ " + kind + "/" + id + " " + JSON.stringify(x));
      else if (JSON.stringify(before.get(id)) !== JSON.stringify(x)) {
        lines.push("- " + kind + "/" + id + " " + JSON.stringify(before.get(id)));
        lines.push("+ " + kind + "/" + id + " " + JSON.stringify(x));
      }
    }
    for (const [id, x] of before) if (!after.has(id)) lines.push("- " + kind + "/" + id + " " + JSON.stringify(x));
  }
  for (const key of Object.keys(Object.assign({}, ra.config, rb.config))) {
    if (KINDS.includes(key)) continue;
    if (JSON.stringify(ra.config[key]) !== JSON.stringify(rb.config[key])) lines.push("~ " + key + ": " + JSON.stringify(ra.config[key]) + " → " + JSON.stringify(rb.config[key]));
  }
  $("diff").textContent = "revision " + a + " → " + b + "\n" + (lines.length ? lines.join("\n") : "(no difference)");
}

async function loadLog() {
  const res = await api("/v1/access_log?lines=20");
  if (res.status === 404) { $("log-section").hidden = true; await res.body.cancel(); return; }
  if (!res.ok) return;
  const body = await res.json();
  $("log-section").hidden = false;
  $("log-path").textContent = body.path;
  $("log").textContent = body.lines.join("\n");
}

// ---- start ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("token").value); });
  $("signout").addEventListener("click", () => signOut(""));
  if (ticks) {
    ticks.onmessage = (e) => {
      if (!state.token) return;
      if (e.data.state) $("stream-state").textContent = e.data.state + " (another tab's stream)";
      else onTick(e.data);
    };
  }
  $("diff-show").addEventListener("click", showDiff);
  for (const id of ["diff-a", "diff-b"]) $(id).addEventListener("change", (e) => { e.target.dataset.touched = "1"; });
  const saved = sessionStorage.getItem("gw-token");
  if (saved) signIn(saved);
});

// The adamserve status page: the sessions table and one session's charts, drawn as inline
// SVG from GET /v2/status and GET /v2/sessions/{id}/history. Served by the server itself;
// no third-party code, no network beyond this server.
"use strict";

const KEY = "adamserve.key"; // sessionStorage: this tab only, gone when it closes
const query = new URLSearchParams(location.search);
const REFRESH_MS = Math.max(100, Number(query.get("refresh")) || 2000);
const FUTURE = Math.min(10000, Math.max(0, Number(query.get("future") ?? 200) || 0));
const SVG = "http://www.w3.org/2000/svg";
const W = 480, H = 180, M = {l: 58, r: 12, t: 12, b: 22};
const MAX_LR_GROUPS = 6, MAX_ROUNDS = 50;
let timer = null;
let updates = 0;

class Unauthorized extends Error {}

const $ = (id) => document.getElementById(id);

async function api(path) {
  const key = sessionStorage.getItem(KEY);
  const r = await fetch(path, {headers: key ? {Authorization: "Bearer " + key} : {},
                               cache: "no-store"});
  if (r.status === 401) throw new Unauthorized(await reason(r));
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await reason(r)}`);
  return r.json();
}

async function reason(r) {
  try { return (await r.json()).error || ""; } catch { return ""; }
}

// -- formatting -------------------------------------------------------------------------

function num(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1e5 || a < 1e-3 ? v.toExponential(1) : String(+v.toPrecision(3));
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function ago(t, now) {
  const s = Math.max(0, (Date.parse(now) - Date.parse(t)) / 1000);
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s ago";
  if (s < 3600) return (s / 60).toFixed(0) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}

// -- SVG charts -------------------------------------------------------------------------

function el(name, attrs, parent) {
  const n = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
  if (parent) parent.append(n);
  return n;
}

function extent(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
  return [lo, hi];
}

const finite = (p) => Number.isFinite(p[0]) && Number.isFinite(p[1]);

// series: [{name, cls, points: [[x, y], ...], markers?: [[x, y], ...], legend?: bool}];
// lines: horizontal lines [{name, cls, value}]; zero: the y axis includes 0; log: a
// log10 y axis (values <= 0 left out); fmt: the y labels. Each series is one polyline
// whose data-points attribute says how many points it has.
function chart(svg, series, {lines = [], zero = false, log = false, fmt = num} = {}) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  if (log) {
    const lg = (p) => [p[0], p[1] > 0 ? Math.log10(p[1]) : NaN];
    series = series.map((s) => ({...s, points: s.points.map(lg), markers: (s.markers || []).map(lg)}));
    lines = lines.filter((l) => l.value > 0).map((l) => ({...l, value: Math.log10(l.value)}));
  }
  const label = log ? (v) => fmt(10 ** v) : fmt;
  const all = series.flatMap((s) => s.points).filter(finite);
  svg.dataset.points = String(all.length);
  if (!all.length) {
    el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"}, svg)
      .textContent = "no data yet";
    svg.dataset.empty = "true";
    return;
  }
  delete svg.dataset.empty;
  let [x0, x1] = extent(all.map((p) => p[0]));
  let [y0, y1] = extent([...all.map((p) => p[1]), ...lines.map((l) => l.value)]);
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (zero) { y0 = Math.min(y0, 0); y1 = Math.max(y1, 0); }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y1 += d; if (!zero) y0 -= d; }
  if (!log && y0 > 0 && y0 < (y1 - y0)) y0 = 0; // from zero when zero is near
  const X = (x) => (M.l + (x - x0) / (x1 - x0) * (W - M.l - M.r)).toFixed(1);
  const Y = (y) => (H - M.b - (y - y0) / (y1 - y0) * (H - M.t - M.b)).toFixed(1);
  for (let i = 0; i <= 3; i++) {
    const v = y0 + (y1 - y0) * i / 3, y = Y(v);
    el("line", {x1: M.l, x2: W - M.r, y1: y, y2: y, class: "grid"}, svg);
    el("text", {x: M.l - 4, y: +y + 3, "text-anchor": "end"}, svg).textContent = label(v);
  }
  el("line", {x1: M.l, x2: M.l, y1: M.t, y2: H - M.b, class: "axis"}, svg);
  el("line", {x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b, class: "axis"}, svg);
  el("text", {x: M.l, y: H - 6}, svg).textContent = "step " + Math.round(x0);
  el("text", {x: W - M.r, y: H - 6, "text-anchor": "end"}, svg).textContent =
    "step " + Math.round(x1);
  for (const l of lines) {
    el("line", {x1: M.l, x2: W - M.r, y1: Y(l.value), y2: Y(l.value), class: "pct " + l.cls},
       svg);
    el("text", {x: W - M.r - 2, y: +Y(l.value) - 2, "text-anchor": "end",
                class: "legend " + l.cls}, svg).textContent = l.name;
  }
  let legend = 0;
  for (const s of series) {
    const p = s.points.filter(finite);
    if (s.legend !== false && series.length > 1) {
      el("text", {x: M.l + 6 + 90 * legend++, y: M.t + 8, class: "legend " + s.cls}, svg)
        .textContent = s.name;
    }
    if (!p.length) continue;
    const line = el("polyline", {class: "series " + s.cls, "data-series": s.name,
                                 "data-points": p.length,
                                 points: p.map((q) => X(q[0]) + "," + Y(q[1])).join(" ")}, svg);
    el("title", {}, line).textContent = s.name;
    const dots = p.length === 1 ? p : (s.markers || []);
    for (const m of dots) el("circle", {cx: X(m[0]), cy: Y(m[1]), r: 3, class: "marker " + s.cls}, svg);
  }
}

// -- the page ---------------------------------------------------------------------------

function cell(tr, text, cls, title) {
  const td = tr.insertCell();
  td.textContent = String(text);
  if (cls) td.className = cls;
  if (title) td.title = title;
  return td;
}

function roundText(r) {
  if (!r) return "—";
  const waiting = r.missing.length ? `, waiting for ${r.missing.join(", ")}` : "";
  return `step ${r.step}: ${r.arrived} pushed, ${r.state}${waiting}`;
}

function chosen(sessions) {
  const want = decodeURIComponent(location.hash.slice(1));
  return sessions.find((s) => s.session_id === want) || sessions[0] || null;
}

function renderTable(status, pick) {
  const body = $("sessions").tBodies[0];
  body.replaceChildren();
  for (const s of status.sessions) {
    const tr = body.insertRow();
    tr.dataset.session = s.session_id;
    if (pick && s.session_id === pick.session_id) tr.className = "selected";
    const a = document.createElement("a");
    a.href = "#" + encodeURIComponent(s.session_id);
    a.textContent = s.session_id;
    tr.insertCell().append(a);
    cell(tr, s.tenant || "(default)");
    cell(tr, s.algorithm);
    cell(tr, s.step, "num step");
    cell(tr, bytes(s.state_bytes), "num");
    cell(tr, s.bytes_per_parameter.toFixed(1), "num");
    cell(tr, `${s.workers} ${s.mode}`);
    cell(tr, roundText(s.round));
    cell(tr, s.last_step_time ? ago(s.last_step_time, status.server_time) : "never", "",
         s.last_step_time);
    cell(tr, s.checkpointed_step >= 0
      ? `step ${s.checkpointed_step}, ${ago(s.checkpoint_time, status.server_time)}` : "none");
  }
  $("no-sessions").hidden = status.sessions.length > 0;
}

function renderDetail(s, h) {
  $("detail").hidden = false;
  $("detail-title").textContent = `${s.session_id} (${s.algorithm})`;
  const steps = h.entries.filter((e) => !e.failed); // a failed round ran no step
  $("detail-summary").textContent = `At step ${h.step}; the history keeps the last ` +
    `${h.capacity} entries and has ${h.entries.length} (${h.recorded} recorded).`;
  const lr = [];
  for (let g = 0; g < Math.min(h.groups, MAX_LR_GROUPS); g++) {
    lr.push({name: `group ${g}`, cls: `c${g}`,
             points: steps.filter((e) => e.lr.length > g).map((e) => [e.step, e.lr[g]])});
    const next = h.schedule.lr[g] || [];
    lr.push({name: `group ${g} next`, cls: `c${g} future`, legend: false,
             points: next.map((v, k) => [h.schedule.from_step + k, v])});
  }
  chart($("chart-lr"), lr);
  chart($("chart-grad-norm"), [{name: "grad norm", cls: "c0", points: steps
    .filter((e) => e.grad_norm !== undefined).map((e) => [e.step, e.grad_norm])}], {zero: true});
  let skipped = 0;
  const cumulative = steps.map((e) => [e.step, skipped += e.skipped ? 1 : 0]);
  chart($("chart-skipped"), [{name: "skipped", cls: "c1", points: cumulative,
    markers: cumulative.filter((_, i) => steps[i].skipped)}], {zero: true});
  const pct = h.latency_seconds;
  const lines = pct.count ? [["p50", pct.p50, "c2"], ["p90", pct.p90, "c4"], ["p99", pct.p99, "c1"]]
    .map(([name, v, cls]) => ({name, cls, value: v * 1000})) : [];
  $("latency-pct").textContent = pct.count
    ? `(p50 ${num(pct.p50 * 1000)}, p90 ${num(pct.p90 * 1000)}, p99 ${num(pct.p99 * 1000)})` : "";
  chart($("chart-latency"), [{name: "latency", cls: "c0", points: h.entries
    .filter((e) => e.latency_seconds !== undefined)
    .map((e) => [e.step, e.latency_seconds * 1000])}], {lines, log: true});
  chart($("chart-bytes"), [
    {name: "in", cls: "c0", points: steps.map((e) => [e.step, e.bytes_in])},
    {name: "out", cls: "c1 future", points: steps.map((e) => [e.step, e.bytes_out])}],
  {zero: true, fmt: (v) => bytes(Math.round(v))});
  renderRounds(h.entries.filter((e) => e.contributors > 0 || e.failed));
}

function renderRounds(rounds) {
  const body = $("rounds").tBodies[0];
  body.replaceChildren();
  for (const e of rounds.slice(-MAX_ROUNDS).reverse()) {
    const tr = body.insertRow();
    cell(tr, e.step, "num");
    cell(tr, e.failed ? "failed" : e.skipped ? "skipped" : "applied", "", e.failed);
    cell(tr, e.contributors, "num");
    const more = e.missing_count > e.missing.length ? ` (+${e.missing_count - e.missing.length})` : "";
    cell(tr, e.missing_count ? e.missing.join(", ") + more : "—");
    cell(tr, e.latency_seconds === undefined ? "" : num(e.latency_seconds * 1000) + " ms", "num");
  }
  $("rounds").hidden = !rounds.length;
  $("no-rounds").hidden = rounds.length > 0;
}

function showLogin(why) {
  clearTimeout(timer);
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = why;
  $("key").focus();
}

async function refresh() {
  clearTimeout(timer);
  try {
    const status = await api("/v2/status");
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = !sessionStorage.getItem(KEY);
    const pick = chosen(status.sessions);
    renderTable(status, pick);
    if (pick) {
      renderDetail(pick, await api(`/v2/sessions/${encodeURIComponent(pick.session_id)}` +
                                   `/history?future_steps=${FUTURE}`));
    } else {
      $("detail").hidden = true;
    }
    $("error").hidden = true;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.updates = String(++updates);
  } catch (e) {
    if (e instanceof Unauthorized) {
      showLogin(sessionStorage.getItem(KEY) ? "That key was refused: " + e.message : "");
      return; // no refresh until a key is given
    }
    $("error").textContent = String(e.message || e);
    $("error").hidden = false;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  refresh();
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  showLogin("");
});
window.addEventListener("hashchange", refresh);
refresh();

// SLED status page: polls /status.json once a second and draws plain SVG plots. No build step.
"use strict";

const MAX_WINDOW_S = 300;    // plots show up to the last five minutes
const MIN_WINDOW_S = 60;
const ACCEPT_WINDOW_S = 10;  // acceptance is smoothed over ten seconds
const COLORS = ["#59a5f5", "#4cc38a", "#e5b84c", "#c678dd", "#e5534b", "#56b6c2"];
const history = [];
let lastT = 0, polls = 0, lastOk = 0, interval = 1;

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 1) => (v === null || v === undefined || Number.isNaN(v)) ? "–" : Number(v).toFixed(digits);
const esc = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);  // names come from config
const pct = (v) => (v === null || v === undefined) ? "–" : (100 * v).toFixed(0) + "%";
const colorOf = (() => { const seen = {}; return (name) => seen[name] ??= COLORS[Object.keys(seen).length % COLORS.length]; })();

function el(tag, attrs = {}, text) {  // an SVG element
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function bar(fraction) {
  const f = Math.max(0, Math.min(1, fraction || 0));
  return `<span class="bar"><i style="width:${(100 * f).toFixed(0)}%"></i></span>${pct(fraction)}`;
}

// the plots span what the page has seen, between one and five minutes
function plotWindow() {
  const seen = history.length ? Date.now() / 1000 - history[0].t : 0;
  return Math.min(MAX_WINDOW_S, Math.max(MIN_WINDOW_S, Math.ceil(seen / 30) * 30));
}

// series: [{name, points: [[t, v], ...]}]; values of null leave a gap
function lineChart(svgId, series, opts = {}) {
  const svg = $(svgId);
  const w = svg.clientWidth || 360, h = svg.clientHeight || 110, left = 34, bottom = 14, top = 6;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.replaceChildren();
  const now = Date.now() / 1000, span = plotWindow(), t0 = now - span;
  let max = opts.max ?? 0;
  if (opts.max === undefined) for (const s of series) for (const [t, v] of s.points) if (t >= t0 && v !== null) max = Math.max(max, v);
  max = max > 0 ? max * (opts.max === undefined ? 1.15 : 1) : 1;
  const x = (t) => left + (w - left - 4) * (t - t0) / span;
  const y = (v) => top + (h - top - bottom) * (1 - v / max);
  for (const frac of [0, 0.5, 1]) {
    svg.append(el("line", {class: "grid", x1: left, x2: w - 4, y1: y(max * frac), y2: y(max * frac)}));
    svg.append(el("text", {x: 2, y: y(max * frac) + 3}, (opts.fmt || ((v) => fmt(v, v < 10 ? 1 : 0)))(max * frac)));
  }
  svg.append(el("text", {x: left, y: h - 2}, span >= 120 ? `-${(span / 60).toFixed(0)} min` : `-${span.toFixed(0)} s`));
  svg.append(el("text", {x: w - 28, y: h - 2}, "now"));
  for (const s of series) {
    let d = "", pen = false;
    for (const [t, v] of s.points) {
      if (t < t0 || v === null || v === undefined) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(Math.min(v, max)).toFixed(1)}`;
      pen = true;
    }
    if (d) svg.append(el("path", {class: "series", d, stroke: s.color || colorOf(s.name)}));
  }
}

function legend(id, names) {
  $(id).innerHTML = names.map((n) => `<span><i style="background:${colorOf(n)}"></i>${esc(n)}</span>`).join("");
}

function acceptanceSeries() {
  const kinds = new Set();
  for (const p of history) for (const k of Object.keys(p.kinds || {})) kinds.add(k);
  return [...kinds].sort().map((kind) => {
    const points = [];
    let lo = 0, prop = 0, acc = 0;
    for (let i = 0; i < history.length; i++) {  // a sliding window over the history
      const k = (history[i].kinds || {})[kind] || [0, 0];
      prop += k[0]; acc += k[1];
      while (history[lo].t <= history[i].t - ACCEPT_WINDOW_S) {
        const old = (history[lo].kinds || {})[kind] || [0, 0];
        prop -= old[0]; acc -= old[1]; lo++;
      }
      points.push([history[i].t, prop > 0 ? acc / prop : null]);
    }
    return {name: kind, points};
  }).filter((s) => s.points.some(([, v]) => v !== null));
}

function render(s) {
  $("target").textContent = s.target;
  $("interval").textContent = s.interval_s;
  $("tokens-per-s").textContent = fmt(s.rates.tokens_per_s);
  $("proposals-per-s").textContent = fmt(s.rates.proposals_per_s);
  $("verdicts-per-s").textContent = fmt(s.rates.verdicts_per_s);
  $("active-sessions").textContent = String(s.broker.sessions);
  const last = history.length ? history[history.length - 1] : {};
  $("batch-size").textContent = fmt(last.batch_sessions ?? s.broker.mean_batch_sessions, 2);
  $("queue-wait").textContent = fmt(last.queue_wait_ms ?? s.broker.mean_queue_wait_ms, 2) + " ms";
  $("broker-state").textContent = s.broker.up ? `up · ${s.verifiers.length} verifier${s.verifiers.length === 1 ? "" : "s"}` : "down";

  const vb = document.querySelector("#verifiers tbody");
  vb.innerHTML = s.verifiers.map((v) => `<tr data-verifier="${esc(v.name)}"><td><span class="dot ${v.busy ? "busy" : "idle"}" title="${v.busy ? "computing" : "idle"}"></span>${esc(v.name)}</td>`
    + `<td data-field="sessions">${v.sessions}</td><td data-field="queued">${v.queued}</td><td data-field="load">${bar(v.utilization)}</td>`
    + `<td data-field="batches">${v.batches}</td><td>${fmt(v.cache_mb)} MB</td><td data-field="acceptance">${pct(v.acceptance_rate)}</td></tr>`).join("")
    || `<tr><td colspan="7">no verifier registered</td></tr>`;
  const db = document.querySelector("#drafters tbody");
  db.innerHTML = s.drafters.map((d) => `<tr data-drafter="${esc(d.name)}"><td><span class="dot ${d.up ? "up" : "down"}"></span>${esc(d.name)}${d.default ? " ★" : ""}</td>`
    + `<td>${esc(d.kind)}</td><td>${d.gamma}</td><td data-field="active">${d.active}</td><td data-field="requests">${d.requests}</td>`
    + `<td data-field="generated">${d.generated}</td><td data-field="acceptance">${d.acceptance_rate === null ? "–" : bar(d.acceptance_rate)}</td>`
    + `<td data-field="mean_gamma">${d.mean_gamma === null ? "–" : fmt(d.mean_gamma)}</td><td data-field="tokens_per_round">${d.tokens_per_round === null ? "–" : fmt(d.tokens_per_round)}</td>`
    + `<td data-field="proactive">${d.proactive_hits} / ${d.proactive_wasted}</td><td data-field="plain_rounds">${d.plain_rounds}</td>`
    + `<td data-field="sent_ahead">${d.sent_ahead_confirmed}</td></tr>`).join("");

  const pts = (key) => history.map((p) => [p.t, p[key]]);
  lineChart("chart-tokens", [{name: "tokens/s", points: pts("tokens_per_s")}]);
  const acc = acceptanceSeries();
  lineChart("chart-acceptance", acc, {max: 1, fmt: pct});
  legend("legend-acceptance", acc.map((a) => a.name));
  lineChart("chart-batch", [{name: "batch", points: pts("batch_sessions"), color: COLORS[2]}]);
  lineChart("chart-wait", [{name: "wait", points: pts("queue_wait_ms"), color: COLORS[3]}]);
  lineChart("chart-active", [{name: "active", points: pts("active"), color: COLORS[1]}], {fmt: (v) => fmt(v, 0)});
  const names = s.verifiers.map((v) => v.name);
  lineChart("chart-load", names.map((n) => ({name: n, points: history.map((p) => [p.t, ((p.verifiers || {})[n] || {}).utilization ?? null])})), {max: 1, fmt: pct});
  legend("legend-load", names);
}

async function poll() {
  try {
    const r = await fetch(`/status.json?since=${lastT}`, {cache: "no-store"});
    if (!r.ok) throw new Error(r.statusText);
    const s = await r.json();
    for (const p of s.history) { history.push(p); lastT = Math.max(lastT, p.t); }
    while (history.length && history[0].t < Date.now() / 1000 - 2 * MAX_WINDOW_S) history.shift();
    interval = s.interval_s || 1;
    render(s);
    polls += 1; lastOk = Date.now();
    $("polls").textContent = String(polls);
    $("conn").textContent = "live"; $("conn").className = "pill up";
    document.body.dataset.polls = String(polls);
  } catch (err) {
    $("conn").textContent = "gateway unreachable"; $("conn").className = "pill down";
  }
  setTimeout(poll, 1000 * Math.max(0.5, Math.min(interval, 5)));
}

setInterval(() => { if (lastOk) $("age").textContent = `${((Date.now() - lastOk) / 1000).toFixed(0)} s ago`; }, 1000);
poll();

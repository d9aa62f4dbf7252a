// The operator page of `edgetl serve`: what the service answered, the items that most need a
// person first, confirm / correct with one click or a key, adapt through the gate, roll back.
// Plain DOM, no framework, nothing loaded from elsewhere. Strings from the service (labels a
// person typed, texts) are only ever set as textContent, never as HTML.
"use strict";

let csrf = null;
let state = null;
let selected = 0;
let busy = false;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "on") for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn);
    else if (k === "text") e.textContent = v;
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function say(text, bad) {
  const m = document.getElementById("message");
  m.textContent = text;
  m.className = "message" + (bad ? " bad" : " good");
  m.hidden = !text;
}

async function call(path, body) {
  const headers = { "content-type": "application/json" };
  if (csrf) headers["x-csrf-token"] = csrf;
  const r = await fetch(path, { method: "POST", headers, body: JSON.stringify(body || {}), credentials: "same-origin" });
  let out = {};
  try { out = await r.json(); } catch (e) { out = { error: `HTTP ${r.status}` }; }
  return { ok: r.ok, status: r.status, body: out };
}

function pct(x) { return x === undefined || x === null ? "" : `${(100 * x).toFixed(1)}%`; }

function describe(row) {
  if (state.task === "anomaly") return `${row.verdict} · score ${row.normalised.toFixed(2)}× threshold`;
  let s = `${row.label} · ${pct(row.confidence)}`;
  if (row.ood) s += " · drifted";
  return s;
}

// Thumbnails are kept between renders (the page re-renders every few seconds): an image is
// fetched and decoded once, and never flickers.
const pictures = new Map();

function picture(row, big) {
  if (row.text !== undefined) return el("blockquote", { class: big ? "text big" : "text", text: row.text });
  const key = `${row.id}:${big ? 1 : 0}`;
  if (!pictures.has(key)) {
    const img = el("img", { src: `/thumb/${row.id}`, alt: row.label, width: big ? 192 : 96, height: big ? 192 : 96 });
    // a defect's heat map at the frame's own resolution (a tiled frame's small defect is a few
    // pixels of a thumbnail) opens in a tab of its own
    pictures.set(key, state.task === "anomaly" && big ?
      el("a", { href: `/heatmap/${row.id}`, target: "_blank", rel: "noopener", title: "heat map, full size" }, img) : img);
  }
  return pictures.get(key);
}

function forgetPictures() {
  const shown = new Set([...state.queue, ...state.recent].map((r) => r.id));
  for (const key of pictures.keys()) if (!shown.has(key.split(":")[0])) pictures.delete(key);
}

function choices() {
  return state.task === "anomaly" ? ["good", "defect"] : state.labels;
}

async function feedback(row, label) {
  if (busy) return;
  const body = label === null ? { id: row.id, confirm: true } :
    state.task === "anomaly" ? { id: row.id, verdict: label } : { id: row.id, label };
  const r = await call("/feedback", body);
  if (!r.ok) return say(r.body.error || `HTTP ${r.status}`, true);
  say(`${r.body.confirmed ? "confirmed" : "corrected to"} ${r.body.label}` +
      (r.body.new_class ? " (a new class: the next adapt adds it)" : ""));
  await refresh();
}

function card(row, index) {
  const buttons = [el("button", { type: "button", class: "confirm", "data-id": row.id, text: "Confirm ✓",
    disabled: !state.write || row.label === "unknown", on: { click: () => feedback(row, null) } })];
  choices().forEach((label, i) => {
    if (label === row.label) return;
    buttons.push(el("button", { type: "button", class: "correct", "data-label": label, disabled: !state.write,
      title: i < 9 ? `key ${i + 1}` : null, text: (i < 9 ? `${i + 1} ` : "") + label,
      on: { click: () => feedback(row, label) } }));
  });
  if (state.task !== "anomaly") {
    const other = el("input", { type: "text", placeholder: "other label", "aria-label": "other label",
      disabled: !state.write, maxlength: 64 });
    other.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && other.value.trim()) { ev.stopPropagation(); feedback(row, other.value.trim()); }
    });
    buttons.push(other);
  }
  const c = el("div", { class: "card" + (index === selected ? " selected" : ""), "data-id": row.id,
    on: { click: () => { selected = index; mark(); } } },
  picture(row, true), el("div", { class: "what", text: describe(row) }),
  el("div", { class: "small", text: `v${row.version} · need ${row.need.toFixed(2)}` }),
  el("div", { class: "buttons" }, ...buttons));
  return c;
}

function mark() {
  document.querySelectorAll("#queue .card").forEach((c, i) => c.classList.toggle("selected", i === selected));
}

function renderQueue() {
  const q = document.getElementById("queue");
  q.replaceChildren(...state.queue.map(card));
  if (!state.queue.length) q.append(el("p", { class: "hint", text: "Nothing waiting: every recent answer is reviewed." }));
  document.getElementById("queue-count").textContent = `${state.queue.length} waiting`;
  selected = Math.min(selected, Math.max(0, state.queue.length - 1));
  mark();
  document.getElementById("keys").textContent = state.write
    ? "Keys: ↑/↓ choose · Enter or c confirm · 1–9 correct to that class" +
      (state.task === "anomaly" ? " · g good · d defect" : "")
    : "Log in to confirm or correct.";
}

function renderRecent() {
  const r = document.getElementById("recent");
  r.replaceChildren(...state.recent.map((row) => el("figure", { class: row.reviewed ? "done" : "", "data-id": row.id },
    picture(row, false), el("figcaption", { text: describe(row) + (row.reviewed ? ` → ${row.reviewed}` : "") }))));
  document.getElementById("recent-count").textContent = `${state.answers} held`;
}

function renderReview() {
  const box = document.getElementById("review");
  const adapt = document.getElementById("adapt");
  if (!state.review) {
    box.replaceChildren(el("p", { class: "hint", text: "No review store: start edgetl serve with --review DIR." }));
    adapt.disabled = true;
    return;
  }
  const rv = state.review;
  const pending = Object.entries(rv.pending).map(([l, n]) => `${l}: ${n}`).join(", ") || "none";
  box.replaceChildren(
    el("p", { id: "pending", text: `waiting for an update: ${rv.pending_total} (${pending})` }),
    el("p", { class: "small", text: `${rv.items} items, ${(rv.bytes / 1e6).toFixed(1)} of ` +
      `${(rv.max_bytes / 1e6).toFixed(0)} MB, ${rv.used} already learned` }));
  adapt.disabled = !state.write || busy || rv.pending_total === 0;
}

function renderHistory() {
  const body = document.querySelector("#history tbody");
  body.replaceChildren(...state.history.versions.slice().reverse().map((v) => el("tr",
    { class: v.current ? "current" : "", "data-version": v.version },
    el("td", { text: `v${v.version}` }), el("td", { text: (v.created || "").slice(0, 16).replace("T", " ") }),
    el("td", { text: v.source || "" }), el("td", { text: String((v.labels || []).length) }),
    el("td", {}, v.current ? el("b", { text: "live" }) : el("button", { type: "button", class: "rollback",
      disabled: !state.write || busy, text: "Roll back to this", on: { click: () => rollback(v.version) } })))));
}

function renderHeader() {
  document.getElementById("model").textContent = state.model;
  document.title = `${state.model} · edgetl serve`;
  document.getElementById("facts").textContent = `${state.task} · head v${state.version} · edgetl ${state.edgetl}`;
  const who = document.getElementById("who");
  if (state.write) {
    who.replaceChildren(el("form", { method: "post", action: "/logout" }, el("button", { type: "submit", text: "Log out" })));
  } else {
    who.replaceChildren(el("a", { href: "/login", id: "login-link", text: "Log in" }));
  }
}

function render() {
  forgetPictures();
  renderHeader();
  renderQueue();
  renderRecent();
  renderReview();
  renderHistory();
  document.getElementById("upload").accept = state.task === "text" ? "text/plain" : "image/*";
}

function gateLines(out) {
  const lines = [];
  const gate = out.summary && out.summary.gate;
  if (gate) {
    for (const [k, v] of Object.entries(gate)) {
      if (typeof v === "number" || typeof v === "boolean") lines.push(`${k}: ${typeof v === "number" ? +v.toFixed(4) : v}`);
    }
    (gate.reasons || []).forEach((r) => lines.push(`reason: ${r}`));
  }
  return lines;
}

async function adapt() {
  busy = true;
  render();
  const result = document.getElementById("adapt-result");
  result.replaceChildren(el("p", { class: "hint", text: "Running the update and its gate…" }));
  const r = await call("/adapt", { dry_run: document.getElementById("dry-run").checked });
  busy = false;
  const out = r.body;
  if (r.status !== 200 && r.status !== 409 || out.error) {
    result.replaceChildren(el("p", { class: "bad", text: out.error || `HTTP ${r.status}` }));
  } else {
    const verdict = out.dry_run ? "dry run: nothing written" : out.accepted ?
      `accepted: head v${out.version} is live (was v${out.previous})` : `refused: v${out.previous} stays live`;
    result.replaceChildren(el("p", { id: "gate-verdict", class: out.accepted || out.dry_run ? "good" : "bad", text: verdict }),
      out.reason ? el("p", { class: "small", text: out.reason }) : null,
      el("pre", { id: "gate-text", text: [out.text || "", ...gateLines(out)].join("\n") }));
  }
  await refresh();
}

async function rollback(version) {
  if (busy) return;
  busy = true;
  const r = await call("/rollback", { to: version });
  busy = false;
  say(r.ok ? r.body.text : r.body.error || `HTTP ${r.status}`, !r.ok);
  await refresh();
}

async function upload(ev) {
  const f = ev.target.files[0];
  if (!f) return;
  const r = await fetch("/predict", { method: "POST", body: f, credentials: "same-origin",
    headers: { "content-type": state.task === "text" ? "text/plain" : "application/octet-stream" } });
  const out = await r.json();
  say(r.ok ? `answered: ${describe({ ...out, need: 0 })}` : out.error, !r.ok);
  ev.target.value = "";
  await refresh();
}

function onKey(ev) {
  if (!state || !state.write || ev.target.tagName === "INPUT" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const row = state.queue[selected];
  if (ev.key === "ArrowDown" || ev.key === "j") { selected = Math.min(selected + 1, state.queue.length - 1); mark(); }
  else if (ev.key === "ArrowUp" || ev.key === "k") { selected = Math.max(selected - 1, 0); mark(); }
  else if (!row) return;
  else if (ev.key === "Enter" || ev.key === "c") feedback(row, null);
  else if (state.task === "anomaly" && (ev.key === "g" || ev.key === "d")) feedback(row, ev.key === "g" ? "good" : "defect");
  else if (/^[1-9]$/.test(ev.key) && choices()[+ev.key - 1] !== undefined) feedback(row, choices()[+ev.key - 1]);
  else return;
  ev.preventDefault();
}

async function refresh() {
  const r = await fetch("/api/state", { credentials: "same-origin" });
  if (r.status === 401) { window.location = "/login"; return; }
  if (!r.ok) return say(`the service answered HTTP ${r.status}`, true);
  state = await r.json();
  render();
}

async function start() {
  const s = await (await fetch("/api/session", { credentials: "same-origin" })).json();
  csrf = s.csrf;
  document.getElementById("adapt").addEventListener("click", adapt);
  document.getElementById("upload").addEventListener("change", upload);
  document.addEventListener("keydown", onKey);
  await refresh();
  document.body.dataset.ready = "1";
  setInterval(() => { if (!busy) refresh(); }, 3000);
}

start();

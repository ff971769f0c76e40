// leukoscope's local page: no framework, no build step, nothing from the network but this device.
"use strict";
const csrf = (document.querySelector('meta[name="csrf"]') || {}).content || "";
const $ = (id) => document.getElementById(id);
const text = (id, value) => { const el = $(id); if (el) el.textContent = value; };

async function getJSON(path) {
  const response = await fetch(path, {credentials: "same-origin", cache: "no-store"});
  if (response.status === 401) { location.href = "/login"; throw new Error("log in"); }
  return response.json();
}

async function post(path, body) {
  const response = await fetch(path, {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf}, body: JSON.stringify(body || {})});
  const data = await response.json().catch(() => ({ok: false, error: response.statusText}));
  if (!response.ok || !data.ok) throw new Error(data.error || response.statusText);
  return data;
}

function say(message, error) {
  const el = $("message");
  if (!el) return;
  el.textContent = message;
  el.className = "message" + (error ? " error" : "");
}

function every(ms, fn) { fn(); setInterval(fn, ms); }

// -- live -------------------------------------------------------------------------------------
// The picture (MJPEG) and the numbers (JSON) are fetched apart; the page's random viewer id ties them, so the
// server answers with the numbers of the frame it last streamed to this page. The frame number is also drawn
// in the picture's corner, and the panel says when its numbers are not the picture's.
function live() {
  const viewer = Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
  $("frame").src = `/stream.mjpg?viewer=${viewer}`;
  every(1000, async () => {
    const s = await getJSON(`/api/live?viewer=${viewer}`);
    text("fps", s.fps === null ? "–" : s.fps.toFixed(1));
    text("frame-no", s.sequence === null ? "–" : `#${s.sequence} ${s.source || ""}` +
      (s.picture ? " (the picture)" : " (newest analysed; not the picture)"));
    text("sample", s.sample_id || "none started");
    if (s.counts) {
      text("cells", s.counts.cells); text("blasts", s.counts.blasts); text("unclassified", s.counts.unclassified);
    }
    text("focus", s.focus === null ? "–" : String(s.focus));
    text("timings", s.timings_ms ? Object.entries(s.timings_ms).map(([k, v]) => `${k} ${v.toFixed(0)}`).join(" · ") : "–");
    const warnings = $("warnings");
    warnings.replaceChildren(...s.warnings.map((w) => { const d = document.createElement("div"); d.textContent = w; return d; }));
    $("cell-list").replaceChildren(...s.cells.map((c) => {
      const li = document.createElement("li");
      li.textContent = c.label === "not classified" ? `not classified: ${c.reason}` : `${c.label} (P(ALL) ${c.p_all.toFixed(2)})`;
      li.className = c.label === "ALL blast" ? "flag" : c.label === "normal" ? "norm" : "grey";
      return li;
    }));
  });
}

// -- sample -----------------------------------------------------------------------------------
function sample() {
  const refresh = async () => {
    const s = await getJSON("/api/sample");
    const m = s.summary || {sample_id: null, frames: "–", cells: "–", blasts: "–", blast_fraction: null,
      unclassified: "–", unclassified_reasons: {}, out_of_focus_frames: "–"};
    text("s-id", m.sample_id || "no sample open");
    text("s-frames", m.frames); text("s-cells", m.cells); text("s-blasts", m.blasts);
    text("s-fraction", m.blast_fraction === null ? "–" :
      `${(100 * m.blast_fraction).toFixed(1)}% (${(100 * m.blast_fraction_ci95[0]).toFixed(1)}–${(100 * m.blast_fraction_ci95[1]).toFixed(1)}%)`);
    const reasons = Object.entries(m.unclassified_reasons).map(([k, v]) => `${k} ${v}`).join(", ");
    text("s-unclassified", m.unclassified + (reasons ? ` (${reasons})` : ""));
    text("s-focus", m.out_of_focus_frames);
    text("s-delivery", s.outbox.delivery);
    text("s-reviews", `${s.reviews.reviewed} reviewed, ${s.reviews.pending} waiting`);
  };
  every(1000, refresh);
  $("start-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const r = await post("/api/sample/start", {sample_id: $("sample-id").value.trim()});
      say(`sample ${r.sample_id} started`); refresh();
    } catch (e) { say(e.message, true); }
  });
  $("stop").addEventListener("click", async () => {
    try {
      const r = await post("/api/sample/stop", {});
      say(`sample ${r.summary.sample_id} stopped: ${r.summary.cells} cells, ${r.summary.blasts} flagged`); refresh();
    } catch (e) { say(e.message, true); }
  });
}

// -- review -----------------------------------------------------------------------------------
function review() {
  const reviewer = $("reviewer");
  reviewer.value = localStorage.getItem("reviewer") || "";
  reviewer.addEventListener("change", () => localStorage.setItem("reviewer", reviewer.value.trim()));
  let queue = [], current = null;
  const show = () => {
    current = queue.shift() || null;
    const img = $("crop");
    if (current) { img.src = `/crop/${current.id}.jpg`; img.dataset.id = current.id;
      text("crop-info", `cell ${current.id} · ${current.source} · sample ${current.sample_id || "–"} · ${current.time}`); }
    else { img.removeAttribute("src"); img.dataset.id = ""; text("crop-info", "nothing waiting for review"); }
  };
  const load = async () => {
    const s = await getJSON("/api/review");
    text("counts", `${s.counts.pending} waiting · ${s.counts.reviewed} reviewed · ${s.counts.unpublished} not yet sent`);
    const table = $("reviewed");
    table.replaceChildren(table.rows[0], ...s.reviewed.map((r) => {
      const tr = document.createElement("tr");
      for (const v of [r.id, r.label, `${r.model_label} ${r.p_all.toFixed(2)} (${r.selected})`, r.reviewer, r.published ? "yes" : "no"]) {
        const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
      }
      tr.dataset.id = r.id;
      return tr;
    }));
    const known = new Set(queue.map((c) => c.id).concat(current ? [current.id] : []));
    queue = queue.concat(s.pending.filter((c) => !known.has(c.id)));
    if (!current) show();
  };
  const label = async (value) => {
    if (!current) return;
    const name = reviewer.value.trim();
    if (!name) { say("type your name or initials in Reviewer first", true); reviewer.focus(); return; }
    localStorage.setItem("reviewer", name);
    try {
      await post(`/api/review/${current.id}`, {label: value, reviewer: name});
      say(`cell ${current.id}: ${value.replace(/_/g, " ")}`); show(); load();
    } catch (e) { say(e.message, true); }
  };
  document.querySelectorAll("button[data-label]").forEach((b) => b.addEventListener("click", () => label(b.dataset.label)));
  document.addEventListener("keydown", (event) => {
    if (event.target === reviewer || event.ctrlKey || event.metaKey || event.altKey) return;
    const keys = {b: "blast", n: "normal", x: "not_a_cell", u: "unsure"};
    if (keys[event.key]) { event.preventDefault(); label(keys[event.key]); }
    else if (event.key === "ArrowRight") { event.preventDefault(); show(); }
  });
  every(3000, load);
}

({live, sample, review}[document.body.dataset.page] || (() => {}))();

// Constellation playground: plain JavaScript, no build step, nothing fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { domains: [], modes: [], model: "constellation" };

// ---- API key: asked once, kept in this tab's sessionStorage only ---------------------------------
const KEY = "constellation.apiKey";
function headers() {
  const h = { "Content-Type": "application/json" };
  const k = sessionStorage.getItem(KEY);
  if (k) h["Authorization"] = "Bearer " + k;
  return h;
}
function askKey() {
  $("key-box").hidden = false;
  $("api-key").focus();
}
// the button and Enter in the box do the same: keep the key, then reload what the visible tab shows
function saveKey() {
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  $("key-box").hidden = true;
  hideError();
  if (!$("view-index").hidden) { loadIndex(); $("tab-index").focus(); } else $("run").focus();
}
$("save-key").addEventListener("click", saveKey);
$("api-key").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.isComposing) { e.preventDefault(); saveKey(); }
});

// ---- errors shown as readable messages -----------------------------------------------------------
const EXPLAIN = {
  401: "The server needs a valid API key.",
  429: "The server is busy (queue full). Try again in a moment.",
  400: "The server refused the request.",
  422: "The server refused the request.",
  503: "The server is shutting down or not ready.",
};
function showError(status, message) {
  const el = $("error");
  el.textContent = `${EXPLAIN[status] || "Request failed."} (${status}) ${message || ""}`.trim();
  el.dataset.status = status;
  el.hidden = false;
  if (status === 401) askKey();
}
function hideError() { $("error").hidden = true; }

async function failure(resp) {
  let msg = "";
  try { msg = (await resp.json()).error.message; } catch (_) { /* not JSON */ }
  const retry = resp.headers.get("Retry-After");
  showError(resp.status, msg + (retry ? ` Retry after ${retry} s.` : ""));
}

// ---- start-up: domains and modes from /ready (open) ------------------------------------------------
async function init() {
  const r = await fetch("/ready");
  const doc = await r.json();
  state.domains = doc.domains || [];
  state.modes = doc.modes || ["constellation", "generalist"];
  state.model = doc.model || state.model;
  for (const [sel, dflt] of [[$("mode"), "constellation"], [$("compare"), "generalist"]]) {
    for (const m of state.modes) {
      const o = document.createElement("option");
      o.value = m; o.textContent = m; if (m === dflt) o.selected = true;
      sel.appendChild(o);
    }
  }
  for (const d of state.domains) {
    const wrap = document.createElement("div");
    wrap.innerHTML = `<label for="w-${d}">${d}</label><input id="w-${d}" type="number" min="0" max="1" step="0.1" value="${d === state.domains[0] ? 1 : 0}">`;
    $("weights").appendChild(wrap);
  }
  $("mode").addEventListener("change", toggleWeights);
  $("compare").addEventListener("change", toggleWeights);
  toggleWeights();
}
function toggleWeights() {
  $("weights-box").hidden = !($("mode").value === "weights" || $("compare").value === "weights");
}
function composition(mode) {
  const c = { mode };
  if (mode === "weights") {
    c.weights = {};
    for (const d of state.domains) {
      const v = parseFloat($("w-" + d).value);
      if (v > 0) c.weights[d] = v;
    }
  }
  return c;
}

// ---- the request body for either endpoint ----------------------------------------------------------
function body(mode, stream) {
  const kind = document.querySelector("input[name=kind]:checked").value;
  const b = {
    model: state.model, stream, max_tokens: parseInt($("max-tokens").value, 10),
    temperature: parseFloat($("temperature").value), composition: composition(mode),
  };
  if (stream) b.stream_options = { include_usage: true };
  if (kind === "chat") b.messages = [{ role: "user", content: $("prompt").value }];
  else b.prompt = $("prompt").value;
  const schema = $("schema").value.trim();  // structured output: the reply constrained to this schema
  if (schema) {
    let parsed;
    try { parsed = JSON.parse(schema); } catch (e) { throw new Error("JSON schema: " + e.message); }
    b.response_format = { type: "json_schema", json_schema: { name: "playground", schema: parsed } };
  }
  return { kind, b };
}

// ---- streaming one answer into a pane ------------------------------------------------------------
async function stream(pane, mode) {
  let kind, b;
  try { ({ kind, b } = body(mode, true)); } catch (e) {
    showError(400, e.message); pane.dataset.done = "error"; return;
  }
  const out = pane.querySelector(".answer");
  const stats = pane.querySelector(".stats");
  pane.querySelector(".pane-mode").textContent = mode;
  out.textContent = ""; stats.textContent = "";
  pane.dataset.done = "false";
  const t0 = performance.now();
  const resp = await fetch(kind === "chat" ? "/v1/chat/completions" : "/v1/completions",
    { method: "POST", headers: headers(), body: JSON.stringify(b) });
  if (!resp.ok) { await failure(resp); pane.dataset.done = "error"; return; }
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "", first = null, tokens = 0, last = t0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const ev = buf.slice(0, i); buf = buf.slice(i + 2);
      if (!ev.startsWith("data: ")) continue;  // keep-alive comments
      const data = ev.slice(6);
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) { showError(500, chunk.error.message); continue; }
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const ch of chunk.choices || []) {
        const text = kind === "chat" ? (ch.delta && ch.delta.content) || "" : ch.text || "";
        if (text) {
          if (first === null) first = performance.now();
          last = performance.now();
          out.textContent += text;
        }
      }
      if (first !== null) {
        const rate = tokens && last > first ? ` · ${(tokens / ((last - t0) / 1000)).toFixed(1)} tok/s` : "";
        stats.textContent = `TTFT ${Math.round(first - t0)} ms${rate}`;
      }
    }
  }
  pane.dataset.done = "true";
}

// ---- the composition panels from /explain: one per mode shown ------------------------------------------
async function explain(mode, panel) {
  const kind = document.querySelector("input[name=kind]:checked").value;
  const req = { composition: composition(mode), include_node_weights: true };
  if (kind === "chat") req.messages = [{ role: "user", content: $("prompt").value }];
  else req.prompt = $("prompt").value;
  panel.querySelector(".comp-mode").textContent = mode;
  panel.dataset.mode = mode;
  panel.dataset.done = "false";
  const resp = await fetch("/explain", { method: "POST", headers: headers(), body: JSON.stringify(req) });
  if (!resp.ok) {
    await failure(resp);
    panel.querySelector(".comp-body").innerHTML = `<p class="muted">Composition unavailable (${resp.status}).</p>`;
    panel.dataset.done = "error";
    return null;
  }
  const doc = await resp.json();
  renderComposition(panel, doc, req.composition);
  $("comp-intro").hidden = true;
  panel.dataset.done = "true";
  return doc;
}

const num = (v, digits) => (typeof v === "number" && isFinite(v) ? v.toFixed(digits) : "—");
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

// The weight each domain's specialist got in the composed model, per /explain: its node weights'
// mean (``mean_node_weight``; logit mode: its beta). Alpha is only the prompt's projection on the
// domain; in "weights" mode it is not what was used. null: this document does not say.
function weightsUsed(doc) {
  const mnw = doc.mean_node_weight || {};
  if (Object.keys(mnw).length) return Object.fromEntries(doc.domains.map((d) => [d, mnw[d] ?? 0]));
  if (doc.mode === "task_arithmetic" && typeof doc.lambda === "number")
    return Object.fromEntries(doc.domains.map((d) => [d, doc.lambda]));
  if (!(doc.selected || []).length) return Object.fromEntries(doc.domains.map((d) => [d, 0]));
  return null;
}

// the heat strips' colour ramp: node weight 0 = white .. 1 = the accent blue
function ramp(v) {
  const t = Math.max(0, Math.min(1, v));
  return [255 - Math.round(t * 219), 255 - Math.round(t * 169), 255 - Math.round(t * 56)];
}
function paint(cv, values) {
  const ctx = cv.getContext("2d");
  const img = ctx.createImageData(values.length, 1);
  values.forEach((v, i) => {
    const [r, g, b] = ramp(v);
    img.data[4 * i] = r; img.data[4 * i + 1] = g; img.data[4 * i + 2] = b; img.data[4 * i + 3] = 255;
  });
  ctx.putImageData(img, 0, 0);
}

function renderComposition(panel, doc, asked) {
  const out = panel.querySelector(".comp-body");
  out.innerHTML = "";
  const used = weightsUsed(doc);
  const sel = doc.selected || [];
  const requested = asked && asked.weights && Object.keys(asked.weights).length
    ? ` · requested ${Object.entries(asked.weights).map(([d, v]) => `${d} ${v}`).join(", ")}` : "";
  const summary = document.createElement("p");
  summary.className = "comp-summary";
  summary.textContent =
    `mode ${doc.mode} · selected ${sel.join(", ") || "none"}${requested} · entropy ${num(doc.entropy_bits, 3)} bits` +
    ` · fallback ${num(doc.fallback * 100, 1)}% of nodes · layers ${layersText(doc.composed_layers)}`;
  out.appendChild(summary);

  const key = document.createElement("p");
  key.className = "bars-key";
  key.innerHTML = `<span class="swatch w" aria-hidden="true"></span> weight used (mean node weight, 0–1)` +
    ` <span class="swatch a" aria-hidden="true"></span> alpha (projection on the domain, scaled to the largest)`;
  out.appendChild(key);

  const bars = document.createElement("div");
  bars.className = "bars";
  bars.setAttribute("role", "list");
  bars.setAttribute("aria-label", `weight used and alpha per domain, mode ${doc.mode}`);
  const amax = Math.max(1e-9, ...Object.values(doc.alpha).map(Math.abs));
  const wmax = Math.max(1, ...Object.values(used || {}).map(Math.abs));
  for (const d of doc.domains) {
    const a = doc.alpha[d];
    const w = used ? used[d] : null;
    const on = sel.includes(d);
    const row = document.createElement("div");
    row.className = "bar" + (on ? " selected" : "");
    row.setAttribute("role", "listitem");
    row.dataset.domain = d;
    row.dataset.alpha = String(a);
    row.dataset.weight = w === null ? "" : String(w);
    row.innerHTML = `<span class="name">${esc(d)}${on ? " ✓" : ""}</span>
      <span class="tracks" aria-hidden="true">
        <span class="track w"><span class="fill" style="width:${w === null ? 0 : Math.max(0, w) / wmax * 100}%"></span></span>
        <span class="track a"><span class="fill" style="width:${Math.max(0, a) / amax * 100}%"></span></span>
      </span>
      <span class="val"><span class="wv">${w === null ? "—" : num(w, 3)}</span><span class="av">α ${num(a, 4)}</span></span>`;
    row.setAttribute("aria-label",
      `${d}${on ? ", selected" : ""}: weight used ${w === null ? "not reported" : num(w, 3)}, alpha ${num(a, 4)}`);
    bars.appendChild(row);
  }
  out.appendChild(bars);

  const strips = Object.entries(doc.node_weights || {});
  if (!strips.length) {
    const p = document.createElement("p");
    p.className = "muted heat-none";
    p.textContent = `No per-node weights in mode ${doc.mode}: every hidden dimension gets the same mix.`;
    out.appendChild(p);
    return;
  }
  let lo = Infinity, hi = -Infinity;
  for (const [, ws] of strips) for (const v of ws) { if (v < lo) lo = v; if (v > hi) hi = v; }
  out.appendChild(heatScale(lo, hi, strips.length, strips[0][1].length));
  const heat = document.createElement("div");
  heat.className = "heat";
  heat.setAttribute("aria-label", "node weights across hidden dimensions");
  for (const [d, ws] of strips) {
    const mean = ws.reduce((s, v) => s + v, 0) / ws.length;
    const lbl = document.createElement("div");
    lbl.className = "lbl";
    lbl.textContent = `${d}: node weight over ${ws.length} hidden dimensions · min ${num(Math.min(...ws), 3)}` +
      ` · mean ${num(mean, 3)} · max ${num(Math.max(...ws), 3)}`;
    const cv = document.createElement("canvas");
    cv.width = ws.length; cv.height = 1;
    cv.dataset.domain = d;
    cv.setAttribute("role", "img");
    cv.setAttribute("aria-label", `${d} node weights, mean ${num(mean, 3)}`);
    paint(cv, ws);
    heat.appendChild(lbl); heat.appendChild(cv);
  }
  out.appendChild(heat);
}

// The legend of the heat strips: the colour ramp over the fixed 0..1 scale, with this prompt's
// smallest and largest node weight marked on it.
function heatScale(lo, hi, k, d) {
  const box = document.createElement("div");
  box.className = "heat-scale";
  box.dataset.min = String(lo);
  box.dataset.max = String(hi);
  box.setAttribute("role", "img");
  box.setAttribute("aria-label", `heat strip scale: node weight from 0 (white) to 1 (blue); ` +
    `this prompt ranges from ${num(lo, 3)} to ${num(hi, 3)}`);
  const STEPS = 101;
  const cv = document.createElement("canvas");
  cv.className = "ramp";
  cv.width = STEPS; cv.height = 1;
  paint(cv, Array.from({ length: STEPS }, (_, i) => i / (STEPS - 1)));
  const pos = (v) => `${Math.max(0, Math.min(1, v)) * 100}%`;
  box.innerHTML = `<span class="end">0</span><span class="ramp-wrap"></span><span class="end">1</span>
    <span class="range">node weight: the share of a hidden dimension's mix given to a specialist (unitless;
    the selected specialists' shares of a dimension add up to 1) · this prompt: min <b class="min">${num(lo, 3)}</b>,
    max <b class="max">${num(hi, 3)}</b> (${k} specialist${k === 1 ? "" : "s"} × ${d} dimensions)</span>`;
  const wrap = box.querySelector(".ramp-wrap");
  wrap.appendChild(cv);
  for (const [cls, v] of [["mark lo", lo], ["mark hi", hi]]) {
    const m = document.createElement("i");
    m.className = cls;
    m.style.left = pos(v);
    wrap.appendChild(m);
  }
  return box;
}

// ---- buttons ------------------------------------------------------------------------------------------
async function run(side) {
  hideError();
  if (!$("prompt").value.trim()) { showError(400, "Type a prompt first."); return; }
  $("run").disabled = $("side").disabled = true;
  $("pane-b").hidden = $("comp-b").hidden = !side;
  $("comp-a").hidden = $("comp-intro").hidden = false;
  $("outputs").classList.toggle("single", !side);
  $("comps").classList.toggle("single", !side);
  try {
    const a = $("mode").value;
    const jobs = [explain(a, $("comp-a")), stream($("pane-a"), a)];
    if (side) {
      const b = $("compare").value;
      jobs.push(explain(b, $("comp-b")), stream($("pane-b"), b));
    }
    await Promise.all(jobs);
  } catch (e) {
    showError(0, String(e));
  } finally {
    $("run").disabled = $("side").disabled = false;
  }
}
$("form").addEventListener("submit", (e) => { e.preventDefault(); run(false); });
$("side").addEventListener("click", () => run(true));

// ---- tabs (arrow keys move between them) ---------------------------------------------------------------
const tabs = [$("tab-play"), $("tab-index")];
function select(tab) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  tab.focus();
  if (tab.id === "tab-index") loadIndex();
}
tabs.forEach((t, i) => {
  t.addEventListener("click", () => select(t));
  t.addEventListener("keydown", (e) => {
    if (e.key === "ArrowRight" || e.key === "ArrowLeft") select(tabs[(i + (e.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length]);
  });
});

async function loadIndex() {
  const el = $("index-doc");
  const resp = await fetch("/index", { headers: headers() });
  if (!resp.ok) { await failure(resp); el.textContent = "Unavailable."; return; }
  const doc = await resp.json();
  const ds = doc.domains;
  const esc = (t) => String(t).replace(/[&<>"]/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[ch]);
  const mib = (b) => (b / 1048576).toFixed(1);
  let html = `<p>Catalog version <b id="catalog-version">${doc.catalog_version ?? 0}</b> — the specialists composed now</p>` +
    `<div class="scroll"><table id="specialists"><tr><th>specialist</th><th>kind</th><th>rank</th><th>probes</th><th>resident MiB</th><th>path</th></tr>` +
    (doc.specialists || []).map((r) => `<tr><td>${esc(r.name)}</td><td>${esc(r.kind)}</td><td>${r.rank ?? "—"}</td>` +
      `<td>${r.probes}</td><td>${mib(r.resident_bytes || 0)}</td><td class="path">${esc(r.path)}</td></tr>`).join("") + "</table></div>";
  html += `<p>Raw centroid cosine (paper Table 1 layout) — basis <b>${doc.basis}</b>, d = ${doc.d}</p><table id="collinearity"><tr><th></th>` +
    ds.map((d) => `<th scope="col">${d}</th>`).join("") + "</tr>";
  doc.raw_cosine.forEach((row, i) => {
    html += `<tr><th scope="row">${ds[i]}</th>` + row.map((v) => `<td>${v.toFixed(4)}</td>`).join("") + "</tr>";
  });
  html += `</table><p>Mean collinearity <b>${doc.mean_collinearity.toFixed(4)}</b>; max |cos| after orthogonalisation ${doc.post_gs_max_abs_cos.toExponential(1)}</p>`;
  html += `<table id="residuals"><tr><th>domain</th><th>Gram-Schmidt residual ratio</th></tr>` +
    ds.map((d) => `<tr><td>${d}</td><td>${doc.residual_ratios[d].toFixed(4)}</td></tr>`).join("") + "</table>" +
    `<p class="muted" id="residual-note">${esc(doc.residual_note)}</p>`;
  html += `<p>Default mode in force: <b id="default-mode">${esc(doc.default_mode)}</b> ` +
    `([composition].mode; a request's composition.mode overrides it)</p>`;
  html += `<p id="recommendation">Recommendation: ${esc(doc.recommendation_note)}</p>`;
  el.innerHTML = html;
  el.classList.remove("muted");
}

init().catch((e) => showError(0, String(e)));

// [0, 1, 2, 5] -> "0–2, 5": the composed decoder layers, compactly (a string or {layers: [...]} as given)
function layersText(v) {
  if (Array.isArray(v)) return layerRanges(v);
  if (v && Array.isArray(v.layers)) return layerRanges(v.layers);
  return v === undefined || v === null ? "—" : String(v);
}
function layerRanges(layers) {
  const out = [];
  for (let k = 0; k < layers.length; k++) {
    let j = k;
    while (j + 1 < layers.length && layers[j + 1] === layers[j] + 1) j++;
    out.push(j === k ? `${layers[k]}` : `${layers[k]}–${layers[j]}`);
    k = j;
  }
  return out.join(", ");
}

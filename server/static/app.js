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
$("save-key").addEventListener("click", () => {
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  $("key-box").hidden = true;
  hideError();
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
  return { kind, b };
}

// ---- streaming one answer into a pane ------------------------------------------------------------
async function stream(pane, mode) {
  const { kind, b } = body(mode, true);
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

// ---- the composition panel from /explain --------------------------------------------------------------
async function explain(mode) {
  const { kind } = body(mode, false);
  const req = { composition: composition(mode), include_node_weights: true };
  if (kind === "chat") req.messages = [{ role: "user", content: $("prompt").value }];
  else req.prompt = $("prompt").value;
  const resp = await fetch("/explain", { method: "POST", headers: headers(), body: JSON.stringify(req) });
  if (!resp.ok) { await failure(resp); return null; }
  const doc = await resp.json();
  renderComposition(doc);
  return doc;
}

function renderComposition(doc) {
  const bars = $("bars");
  bars.innerHTML = "";
  const max = Math.max(1e-9, ...Object.values(doc.alpha).map(Math.abs));
  for (const d of doc.domains) {
    const a = doc.alpha[d];
    const sel = doc.selected.includes(d);
    const row = document.createElement("div");
    row.className = "bar" + (sel ? " selected" : "");
    row.setAttribute("role", "listitem");
    row.dataset.domain = d;
    row.dataset.alpha = String(a);
    const w = doc.mean_node_weight[d];
    row.innerHTML = `<span>${d}${sel ? " ✓" : ""}</span>
      <span class="track" aria-hidden="true"><span class="fill" style="display:block;width:${Math.max(0, a) / max * 100}%"></span></span>
      <span class="val" title="${w !== undefined ? "mean node weight " + w.toFixed(3) : "not selected"}">${a.toFixed(4)}</span>`;
    row.setAttribute("aria-label", `${d}: alpha ${a.toFixed(4)}${sel ? ", selected, mean node weight " + (w || 0).toFixed(3) : ""}`);
    bars.appendChild(row);
  }
  $("comp-summary").textContent =
    `mode ${doc.mode} · selected ${doc.selected.join(", ") || "none"} · mean node entropy ${doc.entropy_bits.toFixed(3)} bits` +
    ` · fallback ${(doc.fallback * 100).toFixed(1)}% of nodes · layers ${layerRanges(doc.composed_layers)}`;
  const heat = $("heat");
  heat.innerHTML = "";
  for (const [d, ws] of Object.entries(doc.node_weights || {})) {
    const lbl = document.createElement("div");
    lbl.className = "lbl";
    lbl.textContent = `${d}: node weights over ${ws.length} hidden dimensions (dark = high)`;
    const cv = document.createElement("canvas");
    cv.width = ws.length; cv.height = 1;
    cv.dataset.domain = d;
    cv.setAttribute("role", "img");
    cv.setAttribute("aria-label", `${d} node weights, mean ${(ws.reduce((s, v) => s + v, 0) / ws.length).toFixed(3)}`);
    const ctx = cv.getContext("2d");
    const img = ctx.createImageData(ws.length, 1);
    ws.forEach((v, i) => {
      const t = Math.max(0, Math.min(1, v));
      img.data[4 * i] = 255 - Math.round(t * 219); img.data[4 * i + 1] = 255 - Math.round(t * 169);
      img.data[4 * i + 2] = 255 - Math.round(t * 56); img.data[4 * i + 3] = 255;
    });
    ctx.putImageData(img, 0, 0);
    heat.appendChild(lbl); heat.appendChild(cv);
  }
}

// ---- buttons ------------------------------------------------------------------------------------------
async function run(side) {
  hideError();
  if (!$("prompt").value.trim()) { showError(400, "Type a prompt first."); return; }
  $("run").disabled = $("side").disabled = true;
  $("pane-b").hidden = !side;
  $("outputs").classList.toggle("single", !side);
  try {
    const a = $("mode").value;
    const jobs = [explain(a), stream($("pane-a"), a)];
    if (side) jobs.push(stream($("pane-b"), $("compare").value));
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
  let html = `<p>Raw centroid cosine (paper Table 1 layout) — basis <b>${doc.basis}</b>, d = ${doc.d}</p><table id="collinearity"><tr><th></th>` +
    ds.map((d) => `<th scope="col">${d}</th>`).join("") + "</tr>";
  doc.raw_cosine.forEach((row, i) => {
    html += `<tr><th scope="row">${ds[i]}</th>` + row.map((v) => `<td>${v.toFixed(4)}</td>`).join("") + "</tr>";
  });
  html += `</table><p>Mean collinearity <b>${doc.mean_collinearity.toFixed(4)}</b>; max |cos| after orthogonalisation ${doc.post_gs_max_abs_cos.toExponential(1)}</p>`;
  html += `<table id="residuals"><tr><th>domain</th><th>Gram-Schmidt residual ratio</th></tr>` +
    ds.map((d) => `<tr><td>${d}</td><td>${doc.residual_ratios[d].toFixed(4)}</td></tr>`).join("") + "</table>";
  html += `<p>Recommendation: <b>${doc.recommendation}</b> — ${doc.recommendation_text}</p>`;
  el.innerHTML = html;
  el.classList.remove("muted");
}

init().catch((e) => showError(0, String(e)));

// [0, 1, 2, 5] -> "0–2, 5": the composed decoder layers, compactly
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

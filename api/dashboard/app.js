// ldmq dashboard: vanilla JS against the /v1 API of the same origin. The API key is kept in
// localStorage and sent as a bearer token; everything shown is built with DOM calls (textContent),
// never parsed as HTML.
"use strict";

const KEY_STORAGE = "ldmq_api_key";
const REFRESH_MS = 3000;
const FINAL = new Set(["succeeded", "failed", "canceled"]);

const $ = (id) => document.getElementById(id);
const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  jobs: [],
  selected: null,        // job id
  shownOutputs: null,    // "<job id>:<outputs_count>" of the thumbnails on screen
  loss: {},              // job id -> {points: {stage: [[step, loss], ...]}} from its stream's progress events
  detailJob: null,       // the selected job as its stream has brought it up to date
  checkpointsShown: null,
  gridFor: null,         // model id whose grid is on screen
  timer: null,
  busy: false,
};

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || "http_error";
    this.details = err.details || [];
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${state.key}` }, options.headers || {});
  const res = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  try { body = await res.json(); } catch (_) { body = null; }
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function setStatus(text, bad = false) {
  const s = $("conn-status");
  s.textContent = text;
  s.classList.toggle("bad", bad);
}

function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function showError(target, err) {
  target.replaceChildren();
  const box = el("div", { class: "error" }, err.message);
  if (err.details && err.details.length) {
    const ul = el("ul");
    for (const d of err.details) {
      const where = ["row", "column", "field"].filter((k) => d[k] !== undefined).map((k) => `${k} ${d[k]}`).join(", ");
      ul.append(el("li", {}, (where ? where + ": " : "") + (d.message || JSON.stringify(d))));
    }
    box.append(ul);
  }
  target.append(box);
}

// ---- jobs table ---------------------------------------------------------------------------------

function badge(status) {
  return el("span", { class: `badge status-${status}` }, status);
}

function progressCell(job) {
  const bar = el("span", { class: "bar" }, el("span"));
  bar.firstChild.style.width = `${Math.round((job.progress || 0) * 100)}%`;
  return el("td", {}, bar, el("span", { class: "pct" }, `${Math.round((job.progress || 0) * 100)}%`));
}

function renderJobs() {
  const tbody = document.querySelector("#jobs-table tbody");
  tbody.replaceChildren();
  for (const job of state.jobs) {
    const outputs = job.type === "sample" ? `${job.outputs_count}/${job.total_items}` : (job.model_id ? "model" : "");
    const tr = el("tr", { dataset: { jobId: job.id, status: job.status } },
      el("td", { class: "id", title: job.id }, job.id.slice(0, 12)),
      el("td", {}, job.type),
      el("td", { class: "status" }, badge(job.status)),
      progressCell(job),
      el("td", {}, outputs),
      el("td", {}, fmtTime(job.created_at)));
    if (job.id === state.selected) tr.classList.add("selected");
    tr.addEventListener("click", () => select(job.id));
    tbody.append(tr);
  }
  $("jobs-empty").hidden = state.jobs.length > 0;
}

async function refreshJobs() {
  if (!state.key || state.busy) return;   // one refresh at a time
  state.busy = true;
  try {
    const page = await api("/v1/jobs?limit=50");
    state.jobs = page.items;
    renderJobs();
    setStatus(`connected · ${page.items.length} job(s)`);
    $("refresh-note").textContent = `refreshed ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    setStatus(err.status === 401 ? "invalid or revoked API key" : `error: ${err.message}`, true);
  } finally {
    state.busy = false;
  }
}

// ---- job detail: live from the job's event stream (GET /v1/jobs/{id}/stream) ----------------------
//
// The selected job's stream is read with fetch (EventSource cannot send the Authorization header):
// `job` (the job now), then every event of the job in order (`id:` its id), then `end`. A stream that
// closes without `end` (API restart, the stream's time limit) is opened again with Last-Event-ID,
// so no event is missed or repeated. Progress moves the bar and the loss chart; a checkpoint event
// reloads the checkpoints (grids, loss curves, metrics); a final event reads the job's last record.

const live = { ctl: null, jobId: null, lastId: null, drawQueued: false, thumbsTimer: null };

function select(jobId) {
  state.selected = jobId;
  state.shownOutputs = null;
  state.gridFor = null;
  state.checkpointsShown = null;
  renderJobs();
  openStream(jobId);
}

function parseBlock(block) {
  const msg = {};
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const name = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? "" : line.slice(i + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    msg[name] = name === "data" && msg.data !== undefined ? `${msg.data}\n${value}` : value;
  }
  return msg.data === undefined ? null : msg;
}

async function readStream(jobId, ctl) {
  const headers = { Authorization: `Bearer ${state.key}` };
  if (live.lastId !== null) headers["Last-Event-ID"] = String(live.lastId);
  const res = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/stream`, { headers, signal: ctl.signal });
  if (!res.ok) {
    let body = null;
    try { body = await res.json(); } catch (_) { body = null; }
    throw new ApiError(res.status, body);
  }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const msg = parseBlock(buf.slice(0, cut));
      buf = buf.slice(cut + 2);
      if (!msg) continue;
      if (msg.id !== undefined) live.lastId = Number(msg.id);
      if (jobId !== state.selected) return true;
      await onStreamMessage(jobId, msg.event || "message", JSON.parse(msg.data));
      if (msg.event === "end") return true;
    }
  }
}

async function openStream(jobId) {
  if (live.ctl) live.ctl.abort();
  const ctl = new AbortController();
  Object.assign(live, { ctl, jobId, lastId: null });
  state.loss[jobId] = { points: {} };   // the stream replays the job's events from its first
  for (let failures = 0; ; ) {
    try {
      if (await readStream(jobId, ctl)) return;   // ended (or another job was selected)
      failures = 0;
    } catch (err) {
      if (ctl.signal.aborted) return;
      if (err instanceof ApiError && err.status !== 503) {
        $("detail").hidden = false;
        showError($("detail-error"), err);
        $("detail-error").hidden = false;
        return;
      }
      failures += 1;
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(5000, 1000 * 2 ** failures)));
    if (ctl.signal.aborted || jobId !== state.selected) return;
  }
}

async function onStreamMessage(jobId, type, data) {
  if (type === "job") {
    await showJob(data);
    return;
  }
  if (type === "end" || !state.detailJob) return;
  const job = state.detailJob;
  const d = data.data || {};
  if (type === "started") Object.assign(job, { status: "running", attempts: d.attempt || job.attempts });
  else if (type === "requeued") job.status = "queued";
  else if (type === "progress") {
    if (!FINAL.has(job.status)) {
      job.progress = d.progress;
      job.progress_detail = d;
      if (d.images_done !== undefined) job.outputs_count = d.images_done;
    }
    if (typeof d.loss === "number" && typeof d.step === "number") {
      const pts = state.loss[jobId].points;
      (pts[d.stage || "loss"] = pts[d.stage || "loss"] || []).push([d.step, d.loss]);
      scheduleDraw(jobId);
    }
  } else if (type === "row_done") scheduleThumbs(job);
  else if (type === "checkpoint") await showCheckpoints(job, true);
  if (FINAL.has(type)) {   // the job has ended: its final record (error, model, outputs)
    const final = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
    if (jobId === state.selected) await showJob(final);
    refreshJobs();
    return;
  }
  renderHead(job);
  updateRow(job);
}

function scheduleDraw(jobId) {
  if (live.drawQueued) return;
  live.drawQueued = true;
  requestAnimationFrame(() => {
    live.drawQueued = false;
    if (jobId === state.selected) drawLoss(state.loss[jobId].points);
  });
}

function scheduleThumbs(job) {
  clearTimeout(live.thumbsTimer);
  live.thumbsTimer = setTimeout(() => { if (job.id === state.selected) showThumbs(job); }, 300);
}

function updateRow(job) {
  const tr = document.querySelector(`tr[data-job-id="${CSS.escape(job.id)}"]`);
  if (!tr) return;
  tr.children[3].replaceWith(progressCell(job));
  tr.children[2].replaceChildren(badge(job.status));
}

function facts(job) {
  const dl = $("detail-facts");
  dl.replaceChildren();
  const rows = [["id", job.id], ["status", job.status], ["progress", `${Math.round(job.progress * 100)}%`],
    ["attempts", job.attempts], ["created", fmtTime(job.created_at)], ["finished", fmtTime(job.finished_at)]];
  if (job.model_id) rows.push(["model", job.model_id]);
  const p = job.params || {};
  if (job.type === "sample") rows.push(["sampling", `${p.scheduler}, ${p.steps} steps, guidance ${p.guidance_scale}`]);
  if (job.type === "train") rows.push(["training", `${p.dataset}, ${p.steps} steps, batch ${p.batch_size}`]);
  const d = job.progress_detail || {};
  if (typeof d.step === "number" && !FINAL.has(job.status)) {
    rows.push(["step", `${d.step}/${d.total_steps}` + (typeof d.loss === "number" ? ` · loss ${d.loss.toPrecision(4)}` : "")]);
  }
  if (d.eta_s !== undefined && !FINAL.has(job.status)) rows.push(["eta", `${Math.round(d.eta_s)} s`]);
  if (job.webhook) rows.push(["webhook", `${job.webhook.url} (${job.webhook.events.join(", ")})`]);
  for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", {}, v === null || v === undefined ? "" : v));
}

function renderHead(job) {
  $("detail").hidden = false;
  $("detail").dataset.jobId = job.id;
  $("detail").dataset.status = job.status;
  $("detail-title").textContent = `${job.type} job ${job.id.slice(0, 12)}`;
  $("detail-title").append(" ", badge(job.status));
  $("cancel-btn").hidden = FINAL.has(job.status);
  facts(job);
}

async function showJob(job) {
  if (job.id !== state.selected) return;
  state.detailJob = job;
  renderHead(job);
  const errBox = $("detail-error");
  errBox.hidden = !job.error;
  errBox.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("thumbs-block").hidden = job.type !== "sample";
  $("loss-block").hidden = job.type !== "train";
  $("ckpt-block").hidden = job.type !== "train";
  $("grid-block").hidden = true;
  if (job.type === "sample") await showThumbs(job);
  else await showTraining(job);
}

async function showThumbs(job) {
  const token = `${job.id}:${job.outputs_count}:${job.status}`;
  if (state.shownOutputs === token) return;   // nothing new: keep the images (no flicker)
  const outs = await api(`/v1/jobs/${encodeURIComponent(job.id)}/outputs`);
  if (state.selected !== job.id) return;
  const box = $("thumbs");
  box.replaceChildren();
  if (outs.output_format === "webdataset") {   // tar shards: links, not images
    for (const s of outs.shards || []) {
      box.append(el("p", {}, el("a", { href: s.url }, `shard ${s.shard}`), ` ${s.images} images, ${s.bytes} bytes`));
    }
    if (!(outs.shards || []).length) box.append(el("p", { class: "muted" }, "No shards yet."));
    state.shownOutputs = token;
    return;
  }
  for (const o of outs.items) {
    const img = el("img", { src: o.url, alt: o.prompt, title: `${o.prompt} (seed ${o.seed})`, loading: "lazy",
      width: o.width, height: o.height });
    box.append(el("figure", {}, img, el("figcaption", {}, `#${o.row}.${o.index} ${o.prompt}`)));
  }
  if (!outs.items.length) box.append(el("p", { class: "muted" }, "No outputs yet."));
  state.shownOutputs = token;
}

function metricsList(metrics) {
  const dl = el("dl");
  for (const [k, v] of Object.entries(metrics || {})) {
    if (typeof v === "number" && k !== "step") dl.append(el("dt", {}, k), el("dd", {}, Number.isInteger(v) ? v : v.toPrecision(4)));
  }
  return dl;
}

async function showCheckpoints(job, force = false) {
  if (!force && state.checkpointsShown === job.id) return;
  const list = await api(`/v1/jobs/${encodeURIComponent(job.id)}/checkpoints`);
  if (state.selected !== job.id) return;
  const box = $("checkpoints");
  box.replaceChildren();
  for (const c of list.items.slice().reverse()) {   // newest first
    const fig = el("figure", { class: "checkpoint", dataset: { step: c.step, attempt: c.attempt } });
    if (c.grid_url) fig.append(el("img", { class: "ckpt-grid", src: c.grid_url, alt: `samples at step ${c.step}` }));
    if (c.loss_curve_url) fig.append(el("img", { class: "ckpt-loss", src: c.loss_curve_url, alt: `loss curve at step ${c.step}` }));
    fig.append(el("figcaption", {}, `step ${c.step}` + (c.latest ? " · latest" : "")), metricsList(c.metrics));
    box.append(fig);
  }
  if (!list.items.length) box.append(el("p", { class: "muted" }, "No checkpoint stored yet."));
  state.checkpointsShown = job.id;
}

async function showTraining(job) {
  drawLoss(state.loss[job.id] ? state.loss[job.id].points : {});
  await showCheckpoints(job, true);
  if (job.model_id && state.gridFor !== job.model_id) {
    const model = await api(`/v1/models/${encodeURIComponent(job.model_id)}`);
    if (state.selected !== job.id) return;
    const urls = model.artifact_urls || {};
    const grid = urls["samples.png"];
    if (grid) {
      $("grid-img").src = grid;
      $("grid-block").hidden = false;
    }
    const dl = $("model-metrics");
    dl.replaceChildren(...metricsList(model.metrics).childNodes);
    state.gridFor = job.model_id;
  } else if (state.gridFor) {
    $("grid-block").hidden = false;
  }
}

function drawLoss(points) {
  const box = $("loss-chart");
  box.replaceChildren();
  const series = Object.entries(points).filter(([, pts]) => pts.length);
  if (!series.length) {
    box.append(el("p", { class: "muted" }, "No loss reported yet."));
    return;
  }
  const W = 480, H = 220, L = 46, R = 10, T = 12, B = 28;
  const all = series.flatMap(([, pts]) => pts);
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const y0 = Math.min(...ys, 0), y1 = Math.max(...ys, y0 + 1e-9);
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "training loss by step" });
  root.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  root.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  const label = (x, y, text, anchor) => {
    const t = svg("text", { x, y, "text-anchor": anchor });
    t.textContent = text;
    root.append(t);
  };
  label(L - 4, T + 8, y1.toPrecision(3), "end");
  label(L - 4, H - B, y0.toPrecision(3), "end");
  label(L, H - B + 14, String(x0), "start");
  label(W - R, H - B + 14, String(x1), "end");
  label((L + W - R) / 2, H - 4, "step", "middle");
  let legendX = W - R;
  for (const [stage, pts] of series.slice().reverse()) {
    const line = svg("polyline", { class: `series series-${stage}`, "data-stage": stage,
      points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ") });
    root.append(line);
    const t = svg("text", { x: legendX, y: T + 8, "text-anchor": "end", class: `legend series-${stage}` });
    t.textContent = `${stage} (${pts.length})`;
    root.append(t);
    legendX -= 110;
  }
  box.append(root);
}

// ---- upload ---------------------------------------------------------------------------------------

async function loadModels() {
  const select = $("model-select");
  try {
    const models = await api("/v1/models");
    const current = select.value;
    select.replaceChildren();
    for (const m of models.items) select.append(el("option", { value: m.id }, `${m.name} · ${m.id.slice(0, 8)}`));
    if (!models.items.length) select.append(el("option", { value: "" }, "no models yet"));
    if (current) select.value = current;
  } catch (_) { /* the status line says why */ }
}

async function loadSchedulers() {
  // The names and their one-line descriptions come from the API (shared/catalog.py), not this file.
  const select = $("scheduler");
  try {
    const schedulers = await api("/v1/schedulers");
    const current = select.value;
    select.replaceChildren(el("option", { value: "" }, "default"));
    for (const s of schedulers.items) select.append(el("option", { value: s.name, title: s.description }, s.name));
    if (current) select.value = current;
  } catch (_) { /* the status line says why */ }
}

function uploadForm(dryRun) {
  const file = $("csv-file").files[0];
  if (!file) throw new ApiError(422, { error: { message: "choose a CSV file first" } });
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model", $("model-select").value);
  if ($("scheduler").value) form.append("scheduler", $("scheduler").value);
  if ($("steps").value) form.append("steps", $("steps").value);
  return { method: "POST", body: form, path: `/v1/jobs/sample/csv${dryRun ? "?dry_run=true" : ""}` };
}

async function submitUpload(dryRun) {
  const out = $("upload-result");
  out.replaceChildren();
  const buttons = [$("submit-btn"), $("estimate-btn")];
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const req = uploadForm(dryRun);
    const body = await api(req.path, { method: req.method, body: req.body });
    if (dryRun) {
      out.append(el("div", { class: "ok" },
        `Valid: ${body.rows} row(s), ${body.images} image(s), ${body.denoising_steps} steps` +
        (body.network_evaluations !== body.denoising_steps ? ` (${body.network_evaluations} network evaluations)` : "") + "; " +
        `about ${body.estimated_gpu_seconds.toFixed(1)} GPU-seconds (rough estimate).`));
    } else {
      out.dataset.jobId = body.id;
      out.append(el("div", { class: "ok" }, `Submitted job ${body.id.slice(0, 12)} (${body.total_items} images).`));
      await refreshJobs();
      select(body.id);
    }
  } catch (err) {
    showError(out, err);
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

// ---- usage and quotas (GET /v1/usage) ----------------------------------------------------------------

const USAGE_REFRESH_MS = 10000;   // usage moves slowly; every request counts against the tenant's rate

function limitText(value, unit = "") {
  return value === null || value === undefined ? "unlimited" : `${value}${unit}`;
}

async function refreshUsage() {
  if (!state.key) return;
  let u;
  try {
    u = await api("/v1/usage");
  } catch (_) {
    return;   // the jobs refresh reports a bad key or an unreachable API on the status line
  }
  const q = u.quotas;
  const rows = [
    ["tenant", u.tenant, "tenant"],
    ["weight", u.weight, "weight"],
    ["running", `${u.jobs_running} job(s) · max ${limitText(q.max_running)}`, "running"],
    ["queued", `${u.jobs_queued} job(s), ${u.images_queued} image(s) · max ${limitText(q.max_queued_images)} images`, "queued"],
    ["request rate", q.rate_per_s === null ? "unlimited" : `${q.rate_per_s}/s, burst ${q.rate_burst}`, "rate"],
    ["GPU-seconds (24 h)", u.gpu_seconds_24h.toFixed(1), "gpu"],
  ];
  const dl = $("usage-facts");
  dl.replaceChildren();
  for (const [k, v, field] of rows) dl.append(el("dt", {}, k), el("dd", { dataset: { field } }, v));
  $("usage-panel").hidden = false;
}

function startUsage() {
  clearInterval(state.usageTimer);
  $("usage-panel").hidden = true;
  if (!state.key) return;
  refreshUsage();
  state.usageTimer = setInterval(refreshUsage, USAGE_REFRESH_MS);
}

// ---- wiring ---------------------------------------------------------------------------------------

function start() {
  clearInterval(state.timer);
  startUsage();
  if (!state.key) {
    setStatus("enter an API key to start");
    return;
  }
  setStatus("connecting…");
  loadModels();
  loadSchedulers();
  refreshJobs();
  state.timer = setInterval(refreshJobs, REFRESH_MS);
}

$("api-key").value = state.key;
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("api-key").value.trim();
  localStorage.setItem(KEY_STORAGE, state.key);
  state.selected = null;
  if (live.ctl) live.ctl.abort();
  $("detail").hidden = true;
  start();
});
$("forget-key").addEventListener("click", () => {
  localStorage.removeItem(KEY_STORAGE);
  state.key = "";
  state.jobs = [];
  state.selected = null;
  if (live.ctl) live.ctl.abort();
  $("api-key").value = "";
  renderJobs();
  $("detail").hidden = true;
  start();
});
$("upload-form").addEventListener("submit", (e) => { e.preventDefault(); submitUpload(false); });
$("estimate-btn").addEventListener("click", () => submitUpload(true));
$("cancel-btn").addEventListener("click", async () => {
  if (!state.selected) return;
  try {
    await api(`/v1/jobs/${encodeURIComponent(state.selected)}/cancel`, { method: "POST" });
  } catch (err) {
    showError($("detail-error"), err);
    $("detail-error").hidden = false;
  }
  refreshJobs();
});
start();

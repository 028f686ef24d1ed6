// medseg web page: sign in with an API key, upload, follow the job, view and download results.
// The key is kept in sessionStorage and only ever sent as the Authorization header; results and
// volumes are fetched with it and handed over as blobs / ArrayBuffers (never a URL with the key).
import { Niivue, NVImage, SHOW_RENDER, MULTIPLANAR_TYPE } from "./vendor/niivue/niivue.js";

const KEY_STORE = "medseg.apiKey";
const POLL_MS = 700;
const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  models: [],
  files: [],          // [{file, name}]
  jobs: [],
  currentJob: null,   // id shown in the viewer
  watching: null,     // id being polled
  nv: null,
  labelVolume: null,
  jobsTimer: null,
};

// --- HTTP ----------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, title, detail, body) {
    super(detail ? `${title}: ${detail}` : title);
    this.status = status; this.title = title; this.detail = detail; this.body = body;
  }
}

function problemFrom(status, statusText, text) {
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  if (body && typeof body === "object" && (body.title || body.detail)) {
    return new ApiError(status, body.title || `HTTP ${status}`, body.detail || "", body);
  }
  return new ApiError(status, `HTTP ${status}${statusText ? " " + statusText : ""}`,
                      (text || "").slice(0, 300), null);
}

async function api(path, { method = "GET", as = "json", key = state.key } = {}) {
  let response;
  try {
    response = await fetch(path, { method, headers: { Authorization: `Bearer ${key}` },
                                   cache: "no-store", credentials: "omit" });
  } catch (error) {
    throw new ApiError(0, "Network error", "the service could not be reached");
  }
  if (!response.ok) {
    throw problemFrom(response.status, response.statusText, await response.text());
  }
  if (as === "json") return response.status === 204 ? null : response.json();
  if (as === "blob") return { blob: await response.blob(), disposition: response.headers.get("Content-Disposition") };
  if (as === "buffer") return response.arrayBuffer();
  return response;
}

function showError(element, error, prefix = "") {
  element.replaceChildren();
  const title = document.createElement("strong");
  const status = error.status ? ` (${error.status})` : "";
  title.textContent = (prefix ? prefix + " — " : "") + (error.title || "Error") + status;
  element.append(title);
  if (error.detail || !error.title) {
    element.append(document.createTextNode(error.detail || String(error.message || error)));
  }
  element.hidden = false;
}

function hideError(element) { element.hidden = true; element.replaceChildren(); }

// --- sign in -------------------------------------------------------------------------------------
function keyId(key) {
  const match = /^msk_([0-9a-f]{12})_/.exec(key);
  return match ? match[1] : "…";
}

async function signIn(key) {
  const models = await api("/v1/models", { key });
  state.key = key;
  sessionStorage.setItem(KEY_STORE, key);
  state.models = models;
  $("key-id").textContent = keyId(key);
  $("signin").hidden = true;
  $("session").hidden = false;
  $("app").hidden = false;
  fillModels();
  initViewer();
  await refreshJobs();
}

function signOut() {
  sessionStorage.removeItem(KEY_STORE);
  state.key = "";
  state.watching = null;
  clearInterval(state.jobsTimer);
  location.replace("/");
}

function showSignIn(error) {
  $("app").hidden = true;
  $("session").hidden = true;
  $("signin").hidden = false;
  if (error) {
    const message = error.status === 401
      ? { ...error, title: "This API key was not accepted", detail: error.detail || "unknown or revoked key" }
      : error;
    showError($("signin-error"), message);
  }
  $("api-key").focus();
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  hideError($("signin-error"));
  $("signin-button").disabled = true;
  try {
    await signIn(key);
    $("api-key").value = "";
  } catch (error) {
    sessionStorage.removeItem(KEY_STORE);
    showSignIn(error);
  } finally {
    $("signin-button").disabled = false;
  }
});
$("sign-out").addEventListener("click", signOut);

// --- models --------------------------------------------------------------------------------------
function rgb(color) { return `rgb(${color[0]}, ${color[1]}, ${color[2]})`; }

function swatch(color) {
  const span = document.createElement("span");
  span.className = "swatch";
  span.style.backgroundColor = rgb(color);  // CSSOM, allowed by style-src 'self'
  return span;
}

function fillModels() {
  const select = $("model");
  select.replaceChildren();
  for (const model of state.models) {
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = `${model.name} (${model.version})${model.default ? " — default" : ""}`;
    option.selected = model.default;
    select.append(option);
  }
  showModel();
  updateSubmit();
}

function modelNamed(name) { return state.models.find((m) => m.name === name); }

function showModel() {
  const model = modelNamed($("model").value);
  $("model-desc").textContent = model
    ? `${model.description || ""} ${model.modality.length ? "· " + model.modality.join(", ") : ""}`.trim() : "";
  const list = $("model-labels");
  list.replaceChildren();
  for (const label of model ? model.labels : []) {
    const item = document.createElement("li");
    item.append(swatch(label.color), document.createTextNode(label.name));
    list.append(item);
  }
}
$("model").addEventListener("change", showModel);

// --- choosing files ------------------------------------------------------------------------------
const SKIP = /(^|\/)(\.[^/]*|Thumbs\.db|desktop\.ini)$/i;

function setFiles(entries) {
  state.files = entries.filter((e) => e.file.size > 0 && !SKIP.test(e.name));
  const text = $("selection-text");
  if (!state.files.length) {
    $("selection").hidden = true;
  } else {
    const bytes = state.files.reduce((sum, e) => sum + e.file.size, 0);
    const folder = state.files[0].name.includes("/") ? state.files[0].name.split("/")[0] + "/ · " : "";
    text.textContent = state.files.length === 1
      ? `${state.files[0].name} · ${formatBytes(bytes)}`
      : `${folder}${state.files.length} files · ${formatBytes(bytes)}`;
    $("selection").hidden = false;
  }
  hideError($("upload-error"));
  updateSubmit();
}

function updateSubmit() {
  $("submit").disabled = !state.files.length || !$("model").value || state.uploading;
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MB`;
  return `${(n / 1024 ** 3).toFixed(2)} GB`;
}

function fromInput(input) {
  return [...input.files].map((file) => ({ file, name: file.webkitRelativePath || file.name }));
}

$("pick-files").addEventListener("click", (e) => { e.stopPropagation(); $("file-input").click(); });
$("pick-folder").addEventListener("click", (e) => { e.stopPropagation(); $("folder-input").click(); });
$("file-input").addEventListener("change", () => { setFiles(fromInput($("file-input"))); $("file-input").value = ""; });
$("folder-input").addEventListener("change", () => { setFiles(fromInput($("folder-input"))); $("folder-input").value = ""; });
$("clear-selection").addEventListener("click", () => setFiles([]));

const zone = $("dropzone");
zone.addEventListener("keydown", (e) => {
  if (e.target === zone && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); $("file-input").click(); }
});
for (const type of ["dragenter", "dragover"]) {
  zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
}
zone.addEventListener("dragleave", (e) => { if (!zone.contains(e.relatedTarget)) zone.classList.remove("over"); });
zone.addEventListener("drop", async (e) => {
  e.preventDefault();
  zone.classList.remove("over");
  const items = [...(e.dataTransfer.items || [])];
  const entries = items.map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
  if (entries.length) {
    const files = [];
    for (const entry of entries) await walk(entry, "", files);
    setFiles(files);
  } else {
    setFiles([...e.dataTransfer.files].map((file) => ({ file, name: file.name })));
  }
});
// keep the browser from opening files dropped elsewhere on the page
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

async function walk(entry, prefix, out) {
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    out.push({ file, name: prefix + entry.name });
  } else if (entry.isDirectory) {
    const reader = entry.createReader();
    for (;;) {  // readEntries returns the children in batches
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      for (const child of batch) await walk(child, `${prefix}${entry.name}/`, out);
    }
  }
}

// --- upload and job progress ---------------------------------------------------------------------
function setProgress(text, fraction, done = false) {
  $("progress").hidden = false;
  $("progress-text").textContent = text;
  $("progress-pct").textContent = fraction == null ? "" : `${Math.round(fraction * 100)}%`;
  const bar = $("progress-bar");
  if (fraction == null) bar.removeAttribute("value"); else bar.value = fraction;
  bar.classList.toggle("done", done);
}

function upload() {
  const form = new FormData();
  for (const { file, name } of state.files) form.append("file", file, name.split("/").pop());
  form.append("model", $("model").value);
  if ($("tta").checked) form.append("tta", "true");
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/jobs");
    xhr.setRequestHeader("Authorization", `Bearer ${state.key}`);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) setProgress(`Uploading ${formatBytes(e.loaded)} of ${formatBytes(e.total)}`, e.loaded / e.total);
    });
    xhr.upload.addEventListener("load", () => setProgress("Upload complete · validating…", null));
    xhr.addEventListener("load", () => {
      if (xhr.status === 202 || xhr.status === 200) {
        try { resolve(JSON.parse(xhr.responseText)); } catch { reject(new ApiError(xhr.status, "Bad response", "not JSON")); }
      } else {
        reject(problemFrom(xhr.status, xhr.statusText, xhr.responseText));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "Network error", "the upload was interrupted")));
    xhr.addEventListener("abort", () => reject(new ApiError(0, "Upload cancelled", "")));
    xhr.send(form);
  });
}

$("submit").addEventListener("click", async () => {
  hideError($("upload-error"));
  state.uploading = true;
  updateSubmit();
  setProgress("Uploading…", 0);
  try {
    const job = await upload();
    setProgress(describeState(job), 0);
    setFiles([]);
    await refreshJobs();
    await watch(job.id);
  } catch (error) {
    $("progress").hidden = true;
    showError($("upload-error"), error, "Upload refused");
  } finally {
    state.uploading = false;
    updateSubmit();
  }
});

function describeState(job) {
  if (job.state === "queued") {
    return job.queue_position ? `Queued · position ${job.queue_position} in the queue` : "Queued";
  }
  if (job.state === "running") return "Segmenting";
  if (job.state === "succeeded") {
    const total = job.timings && (job.timings.total_s ?? job.timings["total_s"]);
    return `Done${total ? ` in ${total.toFixed(1)} s` : ""}`;
  }
  return job.state[0].toUpperCase() + job.state.slice(1);
}

async function watch(jobId) {
  state.watching = jobId;
  for (;;) {
    if (state.watching !== jobId) return;
    let job;
    try {
      job = await api(`/v1/jobs/${jobId}`);
    } catch (error) {
      showError($("upload-error"), error, "Could not follow the job");
      return;
    }
    const fraction = job.state === "succeeded" ? 1 : job.state === "running" ? job.progress : job.state === "queued" ? 0 : null;
    setProgress(describeState(job), fraction, job.state === "succeeded");
    updateJob(job);
    if (job.state === "succeeded") {
      state.watching = null;
      await showJob(job);
      return;
    }
    if (job.state === "failed" || job.state === "expired") {
      state.watching = null;
      const problem = job.error || {};
      showError($("upload-error"), new ApiError(problem.status || 0, problem.title || "The job failed",
                                                 problem.detail || ""), "Segmentation failed");
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

// --- jobs list -----------------------------------------------------------------------------------
async function refreshJobs() {
  try {
    const page = await api("/v1/jobs?limit=50");
    state.jobs = page.items;
    hideError($("jobs-error"));
  } catch (error) {
    if (error.status === 401) return showSignIn(error);
    showError($("jobs-error"), error, "Could not list jobs");
    return;
  }
  renderJobs();
  clearInterval(state.jobsTimer);
  if (state.jobs.some((j) => j.state === "queued" || j.state === "running")) {
    state.jobsTimer = setInterval(refreshJobs, 3000);
  }
}

function updateJob(job) {
  const index = state.jobs.findIndex((j) => j.id === job.id);
  if (index >= 0) state.jobs[index] = job; else state.jobs.unshift(job);
  renderJobs();
}

const RESULTS = [["seg", "SEG"], ["nifti", "NIfTI"], ["report", "Report"], ["preview", "Preview"]];

function button(text, className, onClick, title = "") {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `small ${className}`.trim();
  b.textContent = text;
  if (title) b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function renderJobs() {
  const list = $("jobs");
  list.replaceChildren();
  $("jobs-empty").hidden = state.jobs.length > 0;
  for (const job of state.jobs) {
    const item = document.createElement("li");
    item.className = "job" + (job.id === state.currentJob ? " current" : "");
    item.dataset.jobId = job.id;
    item.dataset.state = job.state;

    const top = document.createElement("div");
    top.className = "job-top";
    const title = document.createElement("span");
    title.className = "job-title";
    const input = job.input || {};
    title.textContent = job.model;
    const badge = document.createElement("span");
    badge.className = `badge ${job.state}`;
    badge.textContent = job.state === "running" ? `running ${Math.round((job.progress || 0) * 100)}%`
      : job.state === "queued" && job.queue_position ? `queued #${job.queue_position}` : job.state;
    top.append(title, badge);

    const meta = document.createElement("div");
    meta.className = "job-meta";
    const created = new Date(job.created_at);
    const what = [input.modality, input.instances ? `${input.instances} images` : input.kind].filter(Boolean);
    meta.textContent = [...what, created.toLocaleString(), job.id.slice(0, 8)].join(" · ");
    item.append(top, meta);

    if (job.state === "failed" && job.error) {
      const err = document.createElement("div");
      err.className = "job-error";
      err.textContent = `${job.error.title || "failed"}: ${job.error.detail || ""}`;
      item.append(err);
    }

    const actions = document.createElement("div");
    actions.className = "job-actions";
    if (job.state === "succeeded") {
      actions.append(button("View", "primary", () => showJob(job)));
      for (const [name, text] of RESULTS) {
        if (job.results && job.results[name]) {
          actions.append(button(text, "download", () => download(job, name), `download the ${text}`));
        }
      }
    }
    const del = button("", "danger", () => confirmDelete(del, job), "delete the job and its files");
    del.setAttribute("aria-label", "Delete");
    del.append(trashIcon());
    actions.append(del);
    item.append(actions);
    list.append(item);
  }
}

function trashIcon() {
  const img = document.createElement("img");
  img.src = "/static/trash.svg";
  img.alt = "";
  img.width = img.height = 15;
  return img;
}

// a first click arms the button ("Delete?"), a second within 4 s deletes
function confirmDelete(b, job) {
  if (!b.classList.contains("armed")) {
    b.classList.add("armed");
    b.textContent = "Delete?";
    setTimeout(() => { b.classList.remove("armed"); b.replaceChildren(trashIcon()); }, 4000);
    return;
  }
  deleteJob(job);
}

async function deleteJob(job) {
  try {
    await api(`/v1/jobs/${job.id}`, { method: "DELETE" });
  } catch (error) {
    showError($("jobs-error"), error, "Could not delete the job");
    return;
  }
  if (state.watching === job.id) state.watching = null;
  if (state.currentJob === job.id) clearViewer();
  state.jobs = state.jobs.filter((j) => j.id !== job.id);
  renderJobs();
}

async function download(job, name) {
  try {
    const { blob, disposition } = await api(`/v1/jobs/${job.id}/result/${name}`, { as: "blob" });
    const match = /filename="?([^";]+)"?/.exec(disposition || "");
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = match ? match[1] : `${job.id}-${name}`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) {
    showError($("jobs-error"), error, `Could not download the ${name}`);
  }
}

// --- viewer --------------------------------------------------------------------------------------
const SLICES = [["slice-sagittal", 0], ["slice-coronal", 1], ["slice-axial", 2]];

function initViewer() {
  if (state.nv) return;
  const nv = new Niivue({
    backColor: [0.043, 0.059, 0.09, 1],
    crosshairColor: [1, 0.82, 0.25, 0.7],
    crosshairWidth: 0.25,  // in voxels: the volumes are small and drawn large
    isRadiologicalConvention: true,
    multiplanarShowRender: SHOW_RENDER.NEVER,
    multiplanarLayout: MULTIPLANAR_TYPE.ROW,
    multiplanarPadPixels: 8,
    dragAndDropEnabled: false,
    showLegend: false,
    isColorbar: false,
    logLevel: "warn",
    loadingText: "",
  });
  nv.attachTo("gl");
  nv.onLocationChange = (location) => { syncSliders(); showLocation(location); };
  state.nv = nv;
}

function clearViewer() {
  const nv = state.nv;
  if (nv) { while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]); nv.drawScene(); }
  state.currentJob = null;
  state.labelVolume = null;
  $("viewer-empty").hidden = false;
  $("viewer-subtitle").textContent = "";
  fillVolumes(null, null);
  $("location").textContent = "";
  for (const [id] of SLICES) { $(id).disabled = true; $(`${id}-value`).textContent = "–"; }
  document.body.dataset.viewer = "empty";
  renderJobs();
}

// the model card's label colours; for a model no longer listed, distinct hues per label value
function labelColormap(model, maxLabel) {
  let labels = [...model.labels].sort((a, b) => a.id - b.id);
  if (!labels.length) {
    labels = Array.from({ length: Math.max(1, Math.min(255, maxLabel)) }, (_, i) => {
      const h = (i * 137.5) % 360, f = (n) => {
        const k = (n + h / 30) % 12;
        return Math.round(255 * (0.55 - 0.45 * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
      };
      return { id: i + 1, name: `label ${i + 1}`, color: [f(0), f(8), f(4)] };
    });
  }
  return {
    R: [0, ...labels.map((l) => l.color[0])],
    G: [0, ...labels.map((l) => l.color[1])],
    B: [0, ...labels.map((l) => l.color[2])],
    A: [0, ...labels.map(() => 255)],
    I: [0, ...labels.map((l) => l.id)],
    labels: ["", ...labels.map((l) => l.name)],
  };
}

async function showJob(job) {
  initViewer();
  const nv = state.nv;
  document.body.dataset.viewer = "loading";
  hideError($("viewer-error"));
  $("viewer-loading").hidden = false;
  state.currentJob = job.id;
  renderJobs();
  try {
    const [input, labels, report] = await Promise.all([
      api(`/v1/jobs/${job.id}/input.nii.gz`, { as: "buffer" }),
      api(`/v1/jobs/${job.id}/result/nifti`, { as: "buffer" }),
      job.results.report ? api(`/v1/jobs/${job.id}/result/report`).catch(() => null) : null,
    ]);
    if (state.currentJob !== job.id) return;
    while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
    const background = await NVImage.loadFromUrl({ url: input, name: "input.nii.gz", colormap: "gray" });
    const overlay = await NVImage.loadFromUrl({ url: labels, name: "labels.nii.gz", colormap: "gray",
                                                 opacity: Number($("opacity").value) });
    const model = modelNamed(job.model) || { labels: [] };
    const colormap = labelColormap(model, Math.round(overlay.global_max || 1));
    overlay.setColormapLabel(colormap);
    state.labelNames = Object.fromEntries(colormap.I.map((id, i) => [id, colormap.labels[i]]));
    nv.addVolume(background);
    nv.addVolume(overlay);
    state.labelVolume = overlay;
    nv.setOpacity(1, Number($("opacity").value));
    focusOnLabels(overlay);
    $("viewer-empty").hidden = true;
    const input0 = job.input || {};
    $("viewer-subtitle").textContent = `${job.model} · ${input0.modality || ""} · ${(input0.shape || []).join(" × ")}`;
    fillVolumes(report, model);
    setupSliders();
    updateLocation();
    document.body.dataset.viewer = "ready";
    document.body.dataset.viewerJob = job.id;
  } catch (error) {
    document.body.dataset.viewer = "error";
    showError($("viewer-error"), error, "Could not show the result");
  } finally {
    $("viewer-loading").hidden = true;
  }
}

// put the crosshair at the centre of the labelled voxels, so all three views show the result
function focusOnLabels(volume) {
  const img = volume.img;
  const dims = volume.dimsRAS;  // [n, x, y, z] in RAS order
  const perm = volume.permRAS;  // RAS axis -> +-(native axis + 1)
  const native = volume.hdr.dims;
  if (!img || !dims || !perm || !native) return;
  const [nx, ny] = [native[1], native[2]];
  let count = 0; const sum = [0, 0, 0];
  for (let i = 0; i < img.length; i++) {
    if (img[i] > 0) {
      const x = i % nx, y = Math.floor(i / nx) % ny, z = Math.floor(i / (nx * ny));
      sum[0] += x; sum[1] += y; sum[2] += z; count++;
    }
  }
  if (!count) return;
  const centre = sum.map((s) => s / count);
  const frac = [0, 0, 0];
  for (let r = 0; r < 3; r++) {
    const axis = Math.abs(perm[r]) - 1;
    const size = native[axis + 1];
    const f = (centre[axis] + 0.5) / size;
    frac[r] = perm[r] < 0 ? 1 - f : f;
  }
  state.nv.scene.crosshairPos = frac;
  state.nv.drawScene();
}

// the crosshair's position, intensity and label (name from the model card)
function showLocation(location) {
  const values = (location && location.values) || [];
  if (!values.length) { $("location").textContent = ""; return; }
  const mm = Array.from(location.mm || []).slice(0, 3).map((v) => Number(v).toFixed(1)).join(", ");
  const parts = [`${mm} mm`, `intensity ${Number(values[0].value).toFixed(0)}`];
  if (values.length > 1) {
    const id = Math.round(values[1].value);
    const label = state.labelNames && state.labelNames[id];
    parts.push(id > 0 ? `label ${label || id}` : "background");
  }
  $("location").textContent = parts.join(" · ");
}

function updateLocation() {
  if (state.nv && typeof state.nv.createOnLocationChange === "function") state.nv.createOnLocationChange();
}

function setupSliders() {
  const volume = state.nv.volumes[0];
  if (!volume) return;
  for (const [id, axis] of SLICES) {
    const slider = $(id);
    slider.max = String(volume.dimsRAS[axis + 1] - 1);
    slider.disabled = false;
  }
  syncSliders();
}

function syncSliders() {
  const nv = state.nv;
  const volume = nv && nv.volumes[0];
  if (!volume) return;
  for (const [id, axis] of SLICES) {
    const size = volume.dimsRAS[axis + 1];
    const index = Math.min(size - 1, Math.max(0, Math.round(nv.scene.crosshairPos[axis] * size - 0.5)));
    $(id).value = String(index);
    $(`${id}-value`).textContent = `${index + 1} / ${size}`;
  }
}

for (const [id, axis] of SLICES) {
  $(id).addEventListener("input", () => {
    const nv = state.nv;
    const volume = nv && nv.volumes[0];
    if (!volume) return;
    const size = volume.dimsRAS[axis + 1];
    const pos = [...nv.scene.crosshairPos];
    pos[axis] = (Number($(id).value) + 0.5) / size;
    nv.scene.crosshairPos = pos;
    nv.drawScene();
    updateLocation();
  });
}

$("opacity").addEventListener("input", () => {
  const value = Number($("opacity").value);
  $("opacity-value").textContent = `${Math.round(value * 100)}%`;
  if (state.nv && state.nv.volumes.length > 1) state.nv.setOpacity(1, value);
});

for (const b of document.querySelectorAll(".segmented button")) {
  b.addEventListener("click", () => {
    for (const other of document.querySelectorAll(".segmented button")) other.classList.toggle("active", other === b);
    if (state.nv) state.nv.setSliceType(Number(b.dataset.view));
  });
}

function fillVolumes(report, model) {
  const body = $("volumes").tBodies[0];
  body.replaceChildren();
  const foot = $("volumes").tFoot;
  if (foot) foot.remove();
  const rows = report && Array.isArray(report.labels) ? report.labels : null;
  if (!rows) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = document.createElement("td");
    td.colSpan = 3;
    td.textContent = report === null && model ? "No report for this job." : "No result shown.";
    tr.append(td);
    body.append(tr);
    return;
  }
  let total = 0;
  for (const row of rows) {
    const label = model && model.labels.find((l) => l.id === row.id);
    const tr = document.createElement("tr");
    tr.dataset.labelId = row.id;
    const name = document.createElement("td");
    const inner = document.createElement("span");
    inner.className = "label";
    if (label) inner.append(swatch(label.color));
    inner.append(document.createTextNode(row.name || (label && label.name) || `label ${row.id}`));
    name.append(inner);
    const voxels = document.createElement("td");
    voxels.className = "num";
    voxels.textContent = row.voxels != null ? Number(row.voxels).toLocaleString() : "–";
    const ml = document.createElement("td");
    ml.className = "num volume-ml";
    ml.textContent = row.volume_ml != null ? Number(row.volume_ml).toFixed(3) : "–";
    total += Number(row.volume_ml) || 0;
    tr.append(name, voxels, ml);
    body.append(tr);
  }
  const tfoot = $("volumes").createTFoot();
  const tr = tfoot.insertRow();
  const a = tr.insertCell(); a.textContent = "Total";
  tr.insertCell();
  const b = tr.insertCell(); b.className = "num"; b.textContent = total.toFixed(3);
}

// --- start ---------------------------------------------------------------------------------------
(async () => {
  document.body.dataset.viewer = "empty";
  if (!state.key) return showSignIn();
  try {
    await signIn(state.key);
  } catch (error) {
    sessionStorage.removeItem(KEY_STORE);
    showSignIn(error);
  }
})();

// The feature-map inspector. Plain browser JavaScript, no build step, no
// external fetch: everything comes from the service's public endpoints
// (/model, /samples, /classify, /feature_maps, /kernels, /atlas, /explain), so it
// doubles as an example of calling them.
"use strict";

const state = { model: null, image: null, imageUrl: null, apiKey: sessionStorage.getItem("apiKey") || "" };
const $ = (id) => document.getElementById(id);

// ----- talking to the API -------------------------------------------------------

class ApiError extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.apiKey) headers["Authorization"] = `Bearer ${state.apiKey}`;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("api-key-box").hidden = false;
    throw new ApiError("This service needs an API key: enter it above.");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      const detail = Array.isArray(body) ? body[0] : body;
      if (detail && (detail.detail || detail.error)) {
        message = typeof detail.detail === "string" ? detail.detail : `${detail.error}: ${JSON.stringify(detail.detail)}`;
      }
    } catch (_) { /* not JSON: keep the status line */ }
    if (response.status === 503) message += " (the service is busy; try again in a moment)";
    throw new ApiError(message);
  }
  return response;
}

function imageForm(fields) {
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) {
    if (value instanceof Blob) form.append(name, value, "input.png");
    else form.append(name, typeof value === "string" ? value : JSON.stringify(value));
  }
  return form;
}

// ----- float16 (the /feature_maps `array` format) --------------------------------

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
  if (exponent === 0) return sign * Math.pow(2, -14) * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * Math.pow(2, exponent - 15) * (1 + fraction / 1024);
}

function decodeArray(payload) {
  const bytes = Uint8Array.from(atob(payload.data), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const values = new Float32Array(bytes.length / 2);
  for (let i = 0; i < values.length; i++) values[i] = halfToFloat(view.getUint16(2 * i, true));
  return values;
}

// ----- rendering ----------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function renderPredictions(result) {
  const list = $("predictions");
  list.replaceChildren();
  const prediction = result.predictions[0];
  for (const entry of prediction.top_k) {
    const item = document.createElement("li");
    item.className = prediction.low_confidence ? "prediction unsure" : "prediction";
    const label = document.createElement("span");
    label.textContent = entry.label;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(100 * entry.probability).toFixed(1)}%`;
    const value = document.createElement("span");
    value.textContent = `${(100 * entry.probability).toFixed(1)}%`;
    item.append(label, bar, value);
    list.append(item);
  }
  $("model-line").textContent = `model ${result.model}`;
  const card = state.model && state.model.card;
  $("low-confidence").hidden = !prediction.low_confidence;
  $("low-confidence").textContent = prediction.low_confidence
    ? `Low confidence: the top answer is below ${Math.round(100 * (card ? card.low_confidence_below : 0.5))}%. ` +
      "The model is unsure, often because the image is unlike what it was trained on" +
      (card ? ` (${card.dataset}).` : ".")
    : "";
}

// The model card (GET /model's `card`): what the served model knows, before any answer is read.
function renderCard(model) {
  const card = model.card;
  $("card-purpose").textContent = card.purpose;
  const facts = [
    ["dataset", card.dataset],
    ["classes", card.num_classes.toLocaleString("en")],
    ["preset", card.preset],
    ["top-1 accuracy", card.test_top1 == null ? "not recorded"
      : `${(100 * card.test_top1).toFixed(1)}%` + (card.test_split ? ` on ${card.test_split}` : "")],
    ["version", card.version],
  ];
  $("card-facts").replaceChildren(...facts.map(([name, value]) => {
    const row = document.createElement("div");
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = value;
    row.dataset.fact = name;
    row.append(term, detail);
    return row;
  }));
  $("card-atlas").textContent = card.atlas
    ? "This model has a channel atlas: click a feature map to see what that channel responds to across the data."
    : "This model has no channel atlas (it is built offline from a folder of images), so clicking a feature map " +
      "shows only the map.";
  $("card-class-count").textContent = card.num_classes.toLocaleString("en");
  renderClasses(model.classes, "");
  $("card-panel").hidden = false;
}

function renderClasses(classes, query) {
  const wanted = query.trim().toLowerCase();
  const shown = classes.map((name, index) => [name, index])
    .filter(([name]) => !wanted || name.toLowerCase().includes(wanted)).slice(0, 200);
  $("class-list").replaceChildren(...shown.map(([name, index]) => {
    const item = document.createElement("li");
    item.textContent = `${name} (${index})`;
    return item;
  }));
}

function describe(layer) {
  const rows = [
    ["output", layer.shape.join(" × ")],
    ["kernel", layer.kernel === null ? "—" : `${layer.kernel}×${layer.kernel}`],
    ["stride", layer.stride === null ? "—" : layer.stride],
    ["padding", layer.padding === null ? "—" : layer.padding],
    ["receptive field", `${layer.receptive_field}×${layer.receptive_field} px`],
    ["jump", `${layer.jump} px`],
    ["showing", `${layer.channels.length} of ${layer.shape[0]} channels`],
  ];
  const list = document.createElement("dl");
  for (const [name, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }
  return list;
}

function renderLayers(result) {
  const container = $("layers");
  container.replaceChildren();
  for (const layer of result.layers) {
    const section = document.createElement("div");
    section.className = "layer";
    section.dataset.layer = layer.layer;
    const info = document.createElement("div");
    const title = document.createElement("h3");
    title.textContent = `${layer.layer} (${layer.type})`;
    info.append(title, describe(layer));
    const grid = document.createElement("img");
    grid.className = "grid";
    grid.dataset.layer = layer.layer;
    grid.alt = `feature maps of ${layer.layer}`;
    grid.src = `data:image/png;base64,${layer.png}`;
    grid.title = "click a map to lay it over the input";
    grid.addEventListener("click", (event) => overlayChannel(layer, grid, event).catch((e) => showError(e.message)));
    section.append(info, grid);
    container.append(section);
  }
  $("layers-panel").hidden = false;
}

// The grid is ceil(sqrt(n)) tiles wide with a 1-pixel gap (model/visualize.py).
function channelAt(layer, grid, event) {
  const n = layer.channels.length;
  const columns = Math.ceil(Math.sqrt(n));
  const rows = Math.ceil(n / columns);
  const rect = grid.getBoundingClientRect();
  const column = Math.min(columns - 1, Math.floor(((event.clientX - rect.left) / rect.width) * columns));
  const row = Math.min(rows - 1, Math.floor(((event.clientY - rect.top) / rect.height) * rows));
  return layer.channels[Math.min(n - 1, row * columns + column)];
}

async function overlayChannel(layer, grid, event) {
  if (layer.shape.length !== 3) {
    $("overlay-caption").textContent = `${layer.layer} is a vector, not a map: nothing to lay over the image.`;
    return;
  }
  const channel = channelAt(layer, grid, event);
  const response = await api("/feature_maps", {
    method: "POST",
    body: imageForm({ image: state.image, layers: [layer.layer], channels: [channel], format: "array",
                      stage: $("stage-select").value }),
  });
  const payload = (await response.json()).layers[0].array;
  const [, height, width] = payload.shape;
  const values = decodeArray(payload);
  let low = Infinity, high = -Infinity;
  for (const v of values) { low = Math.min(low, v); high = Math.max(high, v); }
  const canvas = $("overlay");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  for (let i = 0; i < values.length; i++) {
    const t = high > low ? (values[i] - low) / (high - low) : 0;
    pixels.data.set([255 * t, 64 * t, 255 * (1 - t) * 0.6, 230 * t], 4 * i);  // strong = bright red
  }
  context.putImageData(pixels, 0, 0);
  canvas.hidden = false;
  $("cam").hidden = true;
  $("overlay-caption").textContent =
    `${layer.layer}, channel ${channel}: where it responds (red = strongest; each of its ${width}×${height} values sees ${layer.receptive_field}×${layer.receptive_field} input pixels).`;
  await showAtlas(layer, channel);
}

// The channel atlas: the dataset patches where this channel fires most, each
// cropped to the receptive field of the unit that fired (GET /atlas).
async function showAtlas(layer, channel) {
  const view = $("atlas-view");
  if (layer.type !== "conv") { view.hidden = true; return; }
  const response = await fetch(`/atlas?layer=${layer.layer}&channel=${channel}`,
                               { headers: state.apiKey ? { Authorization: `Bearer ${state.apiKey}` } : {} });
  const body = await response.json();
  view.hidden = false;
  if (!response.ok) {
    $("atlas-grid").hidden = true;
    $("atlas-caption").textContent = body.detail || `${response.status}: no atlas`;
    return;
  }
  $("atlas-grid").hidden = false;
  $("atlas-grid").dataset.layer = layer.layer;
  $("atlas-grid").dataset.channel = channel;
  $("atlas-grid").src = `data:image/png;base64,${body.grid_png}`;
  $("atlas-caption").textContent =
    `${layer.layer}, channel ${channel}: its ${body.patches.length} strongest patches in ${body.dataset} ` +
    `(best first, activation ${body.patches[0].activation.toFixed(2)} to ` +
    `${body.patches[body.patches.length - 1].activation.toFixed(2)}; mean ${body.mean_activation.toFixed(3)}). ` +
    `Each is the ${body.receptive_field}×${body.receptive_field} px field one unit sees.`;
}

// Attributions: where the evidence for the top class lies, by the chosen method
// (POST /explain); the map arrives as an RGBA PNG at the network's input size,
// to lay over the (cropped) input.
const METHOD_NOTES = {
  gradcam: (r) => `${r.layer}'s maps weighted by their gradient`,
  guided_backprop: () => "input gradient through ReLUs that pass only positive gradients back",
  deconvolution: () => "activations projected back to pixels through the transposed network",
  occlusion: (r) => `drop in the class score when a ${r.window}×${r.window} px gray square covers each place`,
  integrated_gradients: (r) => `gradients along ${r.steps} steps from a gray image`,
};

async function explain() {
  const method = $("method-select").value;
  const response = await api("/explain", { method: "POST", body: imageForm({ image: state.image, method }) });
  const result = await response.json();
  $("cam").src = `data:image/png;base64,${result.overlay_png}`;
  $("cam").dataset.method = method;
  $("cam").hidden = false;
  $("overlay").hidden = true;
  $("overlay-caption").textContent =
    `${method} for "${result.label}" (${(100 * result.probability).toFixed(1)}%): ` +
    `${METHOD_NOTES[method](result)}; red = the evidence (${result.forward_passes} forward passes).`;
}

async function loadKernels() {
  const response = await api("/kernels?layer=conv1");
  $("kernels").src = URL.createObjectURL(await response.blob());
}

// ----- the flow ------------------------------------------------------------------

async function loadModel() {
  if (!state.model) state.model = await (await api("/model")).json();
  return state.model;
}

async function analyse(blob) {
  showError("");
  state.image = blob;
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = URL.createObjectURL(blob);
  $("input-image").src = state.imageUrl;
  $("overlay").hidden = true;
  $("cam").hidden = true;
  $("atlas-view").hidden = true;
  $("explain-button").disabled = false;
  $("result-panel").hidden = false;
  try {
    const model = await loadModel();
    const layers = model.layers.filter((row) => row.name !== "input").map((row) => row.name);
    const choice = $("channels-select").value;
    const mapFields = { image: blob, layers, stage: $("stage-select").value, format: "png" };
    if (choice !== "all") mapFields.top_channels = choice;
    const [classified, maps] = await Promise.all([
      api("/classify", { method: "POST", body: imageForm({ images: blob, top_k: "5" }) }),
      api("/feature_maps", { method: "POST", body: imageForm(mapFields) }),
      loadKernels(),
    ]);
    renderPredictions(await classified.json());
    renderLayers(await maps.json());
  } catch (error) {
    showError(error instanceof ApiError ? error.message : `Something went wrong: ${error.message}`);
  }
}

// Samples that fit the served model (GET /samples): its own kinds of shape for the
// default model, photos for a photo model.
async function loadSamples() {
  const body = await (await api("/samples")).json();
  $("samples").replaceChildren(...body.samples.map((sample) => {
    const button = document.createElement("button");
    button.className = "button";
    button.dataset.sample = sample.name;
    button.textContent = sample.name.replaceAll("_", " ");
    button.addEventListener("click", async () => {
      try {
        analyse(await (await api(sample.url)).blob());
      } catch (error) {
        showError(error.message);
      }
    });
    return button;
  }));
}

// The card and the samples, once the service lets us read them (after an API key, where one is needed).
async function loadIntroduction() {
  try {
    renderCard(await loadModel());
    await loadSamples();
  } catch (error) {
    showError(error instanceof ApiError ? error.message : `Something went wrong: ${error.message}`);
  }
}

function setUp() {
  $("class-search").addEventListener("input", (event) => {
    if (state.model) renderClasses(state.model.classes, event.target.value);
  });
  $("file-input").addEventListener("change", (event) => {
    if (event.target.files.length) analyse(event.target.files[0]);
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer.files.length) analyse(event.dataTransfer.files[0]);
  });
  for (const id of ["stage-select", "channels-select"]) {
    $(id).addEventListener("change", () => { if (state.image) analyse(state.image); });
  }
  $("explain-button").addEventListener("click", () => explain().catch((e) => showError(e.message)));
  $("api-key-save").addEventListener("click", () => {
    state.apiKey = $("api-key-input").value.trim();
    sessionStorage.setItem("apiKey", state.apiKey);
    $("api-key-box").hidden = true;
    state.model = null;
    showError("");
    loadIntroduction();
    if (state.image) analyse(state.image);
  });
  loadIntroduction();
}

setUp();

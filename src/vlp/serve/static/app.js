// The vlp serve page: plain JavaScript against the /v1 API, no build step.
"use strict";

const state = { image: null, tasks: [], search: false };
const $ = (id) => document.getElementById(id);

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function call(path, fields) {
  const form = new FormData();
  form.append("image", state.image, state.image.name || "image");
  for (const [name, value] of Object.entries(fields || {})) {
    if (Array.isArray(value)) value.forEach((v) => form.append(name, v));
    else form.append(name, value);
  }
  const response = await fetch(path, { method: "POST", body: form, headers: headers() });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function caption() {
  const box = $("caption");
  box.dataset.done = "false";
  box.textContent = "…";
  const body = await call("/v1/caption");
  box.textContent = body.caption;
  box.dataset.done = "true";
}

function labels() {
  return $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
}

async function zeroshot() {
  const names = labels();
  if (!names.length) return;
  const body = await call("/v1/zeroshot", { labels: JSON.stringify(names) });
  const bars = $("bars");
  bars.dataset.done = "false";
  bars.replaceChildren();
  Object.entries(body.scores).sort((a, b) => b[1] - a[1]).forEach(([label, p]) => {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = (100 * p).toFixed(1) + "%";
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = (100 * p).toFixed(1) + "%";
    item.append(name, bar, value);
    bars.append(item);
  });
  bars.dataset.done = "true";
}

async function vqa() {
  const question = $("question").value.trim();
  if (!question) return;
  const box = $("answer");
  box.dataset.done = "false";
  box.textContent = "…";
  const body = await call("/v1/vqa", { question });
  box.textContent = body.answer;
  box.dataset.done = "true";
}

async function thumbnail(img, path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw new Error("thumbnail: " + response.statusText);
  img.src = URL.createObjectURL(await response.blob());
  await img.decode();
}

async function search(query) {
  const list = $("results");
  list.dataset.done = "false";
  const response = await fetch("/v1/search", {
    method: "POST", body: JSON.stringify({ ...query, k: 8 }),
    headers: { "Content-Type": "application/json", ...headers() },
  });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  list.replaceChildren();
  const loads = body.results.map((result) => {
    const item = document.createElement("li");
    item.dataset.id = result.id;
    const img = document.createElement("img");
    img.alt = result.caption || result.id;
    const text = document.createElement("span");
    text.className = "label";
    text.textContent = `${result.score.toFixed(3)} ${result.caption || result.id}`;
    item.append(img, text);
    list.append(item);
    return thumbnail(img, result.thumbnail);
  });
  await Promise.all(loads);
  list.dataset.done = "true";
}

async function searchText() {
  const text = $("query").value.trim();
  if (text) await search({ text });
}

async function searchImage() {
  const bytes = new Uint8Array(await state.image.arrayBuffer());
  let binary = "";
  bytes.forEach((b) => { binary += String.fromCharCode(b); });
  await search({ image: btoa(binary) });
}

async function run(task, always) {
  if (!state.image && !always) return;
  try {
    showError("");
    await task();
  } catch (error) {
    showError(error.message);
  }
}

function useImage(file) {
  if (!file) return;
  state.image = file;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  if (state.tasks.includes("caption")) run(caption);
  if (state.tasks.includes("embed")) run(zeroshot);
  if (state.tasks.includes("vqa")) run(vqa);
  if (state.search) run(searchImage);
}

async function init() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    const model = body.models[0];
    state.tasks = model.tasks;
    $("model").textContent = `${model.name}: ${model.family} (${model.tasks.join(", ")})`;
    $("caption-box").hidden = !state.tasks.includes("caption");
    $("zeroshot-box").hidden = !state.tasks.includes("embed");
    $("vqa-box").hidden = !state.tasks.includes("vqa");
    state.search = Boolean(model.index);
    $("search-box").hidden = !state.search;
    if (model.index) $("index-name").textContent = `${model.index.name} (${model.index.count})`;
    document.body.dataset.ready = "true";
  } catch (error) {
    showError("cannot reach the model: " + error.message);
  }
}

$("file").addEventListener("change", (event) => useImage(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  useImage(event.dataTransfer.files[0]);
});
$("zeroshot-form").addEventListener("submit", (event) => { event.preventDefault(); run(zeroshot); });
$("vqa-form").addEventListener("submit", (event) => { event.preventDefault(); run(vqa); });
$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  run(searchText, true);
});
$("api-key").addEventListener("change", init);
init();

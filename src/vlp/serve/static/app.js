// The vlp serve page: plain JavaScript against the /v1 API, no build step.
"use strict";

const state = { image: null, tasks: [] };
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

async function run(task) {
  if (!state.image) return;
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
$("api-key").addEventListener("change", init);
init();

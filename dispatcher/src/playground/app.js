// The playground's script (issue 13), served by the dispatcher beside index.html; no build step.
//
// The form is built from the dispatcher's /openapi.json: the submit operations `submit_base` and
// `submit_sprint` name their path and input schema, and every property of that schema becomes a field
// (its type, enum, default, minimum and maximum decide the control), in the order fal's schemas give in
// `x-fal-order-properties`. A property marked `x-fleet-ignored` (Sprint's negative prompt) is not shown.
// Nothing is validated here (the form is `novalidate`): the dispatcher's 422 is the one source of truth,
// and its `detail[]` is shown next to the fields it names.
// A submitted request is followed on its status stream (`…/status/stream?logs=1`, read with fetch so the
// API key header can be sent): queue position while IN_QUEUE, the worker's `step i/n` log lines while
// IN_PROGRESS (the last step done = encoding and uploading), then the result body from `response_url`.
"use strict";

const $ = (id) => document.getElementById(id);
const page = { doc: null, kind: "sprint", run: 0 };

function authHeaders(json) {
  const headers = {};
  const key = $("api-key").value.trim();
  if (key) headers["Authorization"] = "Key " + key;
  if (json) headers["Content-Type"] = "application/json";
  return headers;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children) node.append(child);
  return node;
}

// ---- the schema ----------------------------------------------------------------------------------

async function loadSchema() {
  const resp = await fetch("/openapi.json", { headers: authHeaders(false) });
  if (resp.status === 401) throw new Error("the dispatcher wants an API key: enter it below");
  if (!resp.ok) throw new Error(`GET /openapi.json answered ${resp.status}`);
  page.doc = await resp.json();
  $("app-title").textContent = page.doc.info && page.doc.info.title ? page.doc.info.title : "";
}

function resolve(ref) {
  // "#/components/schemas/Name" -> the object it points at
  return ref.slice(2).split("/").reduce((node, key) => node[key], page.doc);
}

function submitOperation(kind) {
  for (const [path, item] of Object.entries(page.doc.paths)) {
    if (item.post && item.post.operationId === "submit_" + kind) {
      const ref = item.post.requestBody.content["application/json"].schema.$ref;
      return { path, schema: resolve(ref) };
    }
  }
  throw new Error(`/openapi.json has no submit_${kind} operation`);
}

// The schema's properties in form order: fal's `x-fal-order-properties` first, then the rest.
function orderedProperties(schema) {
  const order = schema["x-fal-order-properties"] || [];
  const rank = (name) => (order.includes(name) ? order.indexOf(name) : order.length);
  return Object.entries(schema.properties).sort(([a], [b]) => rank(a) - rank(b));
}

function labelOf(name, prop) {
  if (prop.title) return prop.title;
  const words = name.replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function rangeHint(prop) {
  const parts = [];
  if (prop.minimum !== undefined && prop.maximum !== undefined) parts.push(`${prop.minimum}–${prop.maximum}`);
  else if (prop.maximum !== undefined) parts.push(`at most ${prop.maximum}`);
  if (prop.default !== undefined && typeof prop.default !== "object") parts.push(`default ${prop.default}`);
  return parts.join(", ");
}

// ---- the form --------------------------------------------------------------------------------------

function numberInput(name, prop, value) {
  return el("input", {
    type: "number", name, id: "f-" + name, min: prop.minimum, max: prop.maximum,
    step: prop.type === "integer" ? 1 : "any", value: value === undefined ? prop.default : value,
  });
}

// One field per schema property; `keep` holds values of fields whose schema did not change.
function fieldFor(name, prop, required, keep) {
  const box = el("div", { class: "field", dataset: { field: name } });
  const hints = [];
  let control;
  const variants = prop.anyOf || [];
  const preset = variants.find((v) => v.type === "string" && v.enum);
  const custom = variants.find((v) => v.$ref);
  const nullableInt = variants.find((v) => v.type === "integer") && variants.find((v) => v.type === "null");
  if (preset && custom) {
    // A preset name or a custom {width, height}.
    const size = resolve(custom.$ref);
    const select = el("select", { name, id: "f-" + name });
    for (const p of preset.enum) select.append(el("option", { value: p }, p));
    select.append(el("option", { value: "custom" }, "custom…"));
    const def = prop.default || {};
    const width = numberInput("width", size.properties.width, def.width);
    const height = numberInput("height", size.properties.height, def.height);
    width.id = "f-width";
    height.id = "f-height";
    const dims = el("div", { class: "row", id: "custom-size" }, width, "×", height);
    select.value = typeof prop.default === "string" ? prop.default : "custom";
    const sync = () => { dims.hidden = select.value !== "custom"; };
    select.addEventListener("change", sync);
    control = el("div", {}, select, dims);
    if (keep) {
      select.value = keep.select;
      width.value = keep.width;
      height.value = keep.height;
    }
    sync();
    hints.push(`custom sides at most ${size.properties.width.maximum} px`);
  } else if (nullableInt) {
    const int = variants.find((v) => v.type === "integer");
    control = el("input", { type: "number", name, id: "f-" + name, min: int.minimum, step: 1, placeholder: "random" });
  } else if (prop.enum) {
    control = el("select", { name, id: "f-" + name });
    for (const v of prop.enum) control.append(el("option", { value: v }, v));
    control.value = prop.default;
  } else if (prop.type === "boolean") {
    control = el("input", { type: "checkbox", name, id: "f-" + name });
    control.checked = prop.default !== false;
  } else if (prop.type === "integer" || prop.type === "number") {
    control = numberInput(name, prop);
    hints.push(rangeHint(prop));
  } else {
    control = el("textarea", { name, id: "f-" + name, required, rows: name === "prompt" ? 3 : 1 });
  }
  if (keep !== undefined && !(preset && custom)) {
    if (control.type === "checkbox") control.checked = keep;
    else control.value = keep;
  }
  if (prop.description) hints.unshift(prop.description);
  if (control.tagName === "TEXTAREA" || (preset && custom)) box.classList.add("wide");
  box.append(el("label", { for: control.id || "f-" + name }, labelOf(name, prop) + (required ? " *" : "")), control);
  const hint = hints.filter(Boolean).join(" · ");
  if (hint) box.append(el("small", {}, hint));
  box.append(el("div", { class: "error" }));
  return box;
}

function currentValues() {
  const kept = {};
  for (const box of document.querySelectorAll("#fields .field")) {
    const name = box.dataset.field;
    const control = box.querySelector(`[name="${name}"]`);
    if (name === "image_size") {
      kept[name] = { select: control.value, width: $("f-width").value, height: $("f-height").value };
    } else {
      kept[name] = control.type === "checkbox" ? control.checked : control.value;
    }
  }
  return kept;
}

// Rebuilds the fields for the chosen kind, keeping what was typed into fields whose schema is the same.
function buildForm(previousSchema) {
  const { schema } = submitOperation(page.kind);
  const kept = currentValues();
  const fields = $("fields");
  fields.replaceChildren();
  const required = new Set(schema.required || []);
  for (const [name, prop] of orderedProperties(schema)) {
    if (prop["x-fleet-ignored"]) continue;
    const before = previousSchema && previousSchema.properties[name];
    const same = before && JSON.stringify(before) === JSON.stringify(prop);
    fields.append(fieldFor(name, prop, required.has(name), same ? kept[name] : undefined));
  }
  page.schema = schema;
  $("submit").disabled = false;
}

function readInput(schema) {
  const input = {};
  for (const [name, prop] of Object.entries(schema.properties)) {
    const box = document.querySelector(`#fields [data-field="${name}"]`);
    if (!box) continue;
    const control = box.querySelector(`[name="${name}"]`);
    if (name === "image_size") {
      if (control.value !== "custom") input[name] = control.value;
      else input[name] = { width: numberOrText($("f-width").value), height: numberOrText($("f-height").value) };
    } else if (control.type === "checkbox") {
      input[name] = control.checked;
    } else if (control.type === "number") {
      if (control.value !== "") input[name] = numberOrText(control.value);
      else if (control.validity && control.validity.badInput) input[name] = "not a number";
    } else if (control.value !== "" || isRequired(schema, name)) {
      input[name] = control.value;
    }
  }
  return input;
}

function isRequired(schema, name) {
  return (schema.required || []).includes(name);
}

function numberOrText(text) {
  const n = Number(text);
  return text.trim() !== "" && Number.isFinite(n) ? n : text;
}

// ---- the output ------------------------------------------------------------------------------------

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

function note(text) {
  $("timeline").append(el("li", {}, text));
  $("timeline").scrollTop = $("timeline").scrollHeight;
}

function clearOutput() {
  for (const box of document.querySelectorAll(".field.invalid")) box.classList.remove("invalid");
  for (const e of document.querySelectorAll(".field .error")) e.textContent = "";
  $("form-error").textContent = "";
  $("timeline").replaceChildren();
  $("images").replaceChildren();
  $("meta").replaceChildren();
  $("progress").hidden = true;
}

function showValidation(body) {
  const lines = [];
  for (const d of (body && body.detail) || []) {
    const loc = Array.isArray(d.loc) ? d.loc : [];
    const field = loc[0] === "body" && typeof loc[1] === "string" ? loc[1] : null;
    const where = loc.filter((p) => p !== "body").join(".");
    lines.push(`${where || "request"}: ${d.msg}`);
    const box = field && document.querySelector(`#fields [data-field="${field}"]`);
    if (box) {
      box.classList.add("invalid");
      box.querySelector(".error").textContent = d.msg;
    }
  }
  $("form-error").textContent = lines.join("\n") || "The request was refused.";
  setStatus("invalid", "Invalid input (422): nothing was queued");
}

function addMeta(term, value) {
  $("meta").append(el("dt", {}, term), el("dd", {}, String(value)));
}

// The status stream as status bodies, parsed from server-sent events.
async function* statusStream(url) {
  const resp = await fetch(url, { headers: authHeaders(false) });
  if (!resp.ok) throw new Error(`status stream answered ${resp.status}`);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data) yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

const STEP = /^step (\d+)\/(\d+)$/;

async function follow(run, submitted, t0) {
  addMeta("request id", submitted.request_id);
  let shownLogs = 0;
  let lastPosition = null;
  let startedAt = null;
  let final = null;
  for await (const status of statusStream(submitted.status_url + "/stream?logs=1")) {
    if (run !== page.run) return;
    if (status.status === "IN_QUEUE") {
      if (status.queue_position !== lastPosition) {
        lastPosition = status.queue_position;
        const ahead = lastPosition === 0 ? "next up" : `${lastPosition} ahead`;
        setStatus("queued", `In queue: position ${lastPosition} (${ahead})`);
        note(`queued, position ${lastPosition}`);
      }
      continue;
    }
    startedAt = startedAt || performance.now();
    const logs = status.logs || [];
    let step = null;
    for (const line of logs.slice(shownLogs)) note(line.message);
    shownLogs = logs.length;
    for (const line of logs) {
      const m = STEP.exec(line.message);
      if (m) step = [Number(m[1]), Number(m[2])];
    }
    if (status.status === "COMPLETED") {
      final = status;
      break;
    }
    const bar = $("progress");
    if (step) {
      bar.hidden = false;
      bar.max = step[1];
      bar.value = step[0];
      if (step[0] >= step[1]) setStatus("uploading", `Step ${step[0]} of ${step[1]} done: checking, encoding and uploading`);
      else setStatus("running", `Step ${step[0]} of ${step[1]}`);
    } else {
      setStatus("running", "Started");
    }
  }
  if (run !== page.run) return;
  if (!final) throw new Error("the status stream ended before the request completed; reload to try again");
  await showResult(submitted, final, t0, startedAt);
}

async function showResult(submitted, status, t0, startedAt) {
  const resp = await fetch(submitted.response_url, { headers: authHeaders(false) });
  const body = await resp.json().catch(() => ({}));
  const total = (performance.now() - t0) / 1000;
  if (status.error || !resp.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    setStatus("failed", `Failed (${status.error_type || resp.status}): ${status.error || detail}`);
    return;
  }
  $("progress").hidden = false;
  $("progress").value = $("progress").max;
  for (const image of body.images || []) {
    const img = el("img", { src: image.url, alt: body.prompt || "generated image" });
    const caption = `${image.width}×${image.height} · ${image.content_type} · ${Math.round((image.file_size || 0) / 1024)} KiB`;
    $("images").append(el("figure", {}, el("a", { href: image.url, target: "_blank", rel: "noopener" }, img), el("figcaption", {}, caption)));
  }
  addMeta("seed", body.seed);
  const timings = body.timings || {};
  for (const [name, secs] of Object.entries(timings)) addMeta(`${name} time`, `${Number(secs).toFixed(3)} s`);
  if (startedAt) addMeta("time in queue", `${((startedAt - t0) / 1000).toFixed(3)} s`);
  addMeta("total time", `${total.toFixed(3)} s`);
  addMeta("billable units", resp.headers.get("x-fal-billable-units") || "0");
  if (Array.isArray(body.has_nsfw_concepts)) addMeta("nsfw", body.has_nsfw_concepts.join(", "));
  const n = (body.images || []).length;
  setStatus("done", `Done: ${n} image${n === 1 ? "" : "s"}, seed ${body.seed}`);
}

async function submit(event) {
  event.preventDefault();
  const run = ++page.run;
  clearOutput();
  const { path } = submitOperation(page.kind);
  const input = readInput(page.schema);
  setStatus("submitting", "Submitting…");
  $("submit").disabled = true;
  const t0 = performance.now();
  try {
    const resp = await fetch(path, { method: "POST", headers: authHeaders(true), body: JSON.stringify(input) });
    const body = await resp.json().catch(() => null);
    if (resp.status === 422) return showValidation(body);
    if (!resp.ok) {
      const detail = body && body.detail ? JSON.stringify(body.detail) : "";
      setStatus("failed", `Submit answered ${resp.status} ${detail}`);
      return;
    }
    $("submit").disabled = false;
    await follow(run, body, t0);
  } catch (e) {
    if (run === page.run) setStatus("failed", String(e.message || e));
  } finally {
    if (run === page.run) $("submit").disabled = false;
  }
}

async function start() {
  try {
    await loadSchema();
    buildForm(null);
  } catch (e) {
    $("fields").textContent = String(e.message || e);
  }
}

for (const radio of document.querySelectorAll('input[name="endpoint"]')) {
  radio.addEventListener("change", () => {
    if (!radio.checked || !page.doc) return;
    const previous = page.schema;
    page.kind = radio.value;
    buildForm(previous);
  });
}
$("api-key").addEventListener("change", () => { if (!page.doc) start(); });
$("form").addEventListener("submit", submit);
start();

// The mmsearch gallery: plain JS, no build step. It talks to the JSON API of the same server
// (/api/info, /api/search) and keeps the query in the address (/?q=...) so searches can be
// bookmarked and shared. Everything from the server is put on the page as text, never as HTML.
"use strict";

const PAGE = 30; // results per "page" (Show more asks for PAGE more)
const KINDS = { image: "image", audio: "audio" }; // upload field for a dropped file's kind

// Filters shown when the server accepts the parameter (see /api/info "params").
const FILTERS = [
  { param: "path", label: "Path", type: "text", placeholder: "~/Pictures/2024/*" },
  { param: "after", label: "Taken after", type: "date" },
  { param: "before", label: "before", type: "date" },
  { param: "group", label: "One per file", type: "checkbox" },
  { param: "min_relevance", label: "Min. relevance", type: "number", min: 0, max: 1, step: 0.05 },
];

const state = { info: null, hits: [], k: PAGE, example: null, params: null, focus: -1 };
const $ = (id) => document.getElementById(id);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function basename(path) {
  const parts = path.split("/");
  return parts[parts.length - 1] || path;
}

function clock(seconds) {
  const m = Math.floor(seconds / 60);
  const s = seconds - 60 * m;
  return Number.isInteger(s) ? `${m}:${String(s).padStart(2, "0")}` : `${m}:${s.toFixed(1).padStart(4, "0")}`;
}

// Where in the file a hit is: lines of a note, seconds of a recording.
function span(hit) {
  if (hit.start === undefined || hit.start === null) return "";
  if (hit.modality === "text") {
    return hit.start === hit.end ? `line ${hit.start}` : `lines ${hit.start}–${hit.end}`;
  }
  return `${clock(hit.start)}–${clock(hit.end)}`;
}

function percent(relevance) {
  return Math.round(relevance <= 1 ? 100 * relevance : relevance);
}

function scoreText(hit) {
  if (typeof hit.relevance === "number") return `${percent(hit.relevance)}%`;
  return hit.score.toFixed(3);
}

function mediaUrl(hit) {
  // a media fragment: the player starts at the moment that matched and stops at its end
  return hit.start === undefined || hit.start === null ? hit.url : `${hit.url}#t=${hit.start},${hit.end}`;
}

// --- talking to the server ----------------------------------------------------------------------
async function api(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = { error: `${response.status} ${response.statusText}` };
  }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function formParams() {
  const params = new URLSearchParams();
  const q = $("q").value.trim();
  if (q) params.set("q", q);
  if ($("type").value !== "any") params.set("type", $("type").value);
  if (!$("index").hidden && $("index").value !== state.info.indexes[0]) {
    params.set("index", $("index").value);
  }
  for (const f of FILTERS) {
    const input = $(`filter-${f.param}`);
    if (!input) continue;
    if (f.type === "checkbox") {
      if (input.checked) params.set(f.param, "1");
    } else if (input.value.trim()) {
      params.set(f.param, input.value.trim());
    }
  }
  return params;
}

function fillForm(params) {
  $("q").value = params.get("q") || "";
  $("type").value = params.get("type") || "any";
  if (params.get("index")) $("index").value = params.get("index");
  for (const f of FILTERS) {
    const input = $(`filter-${f.param}`);
    if (!input) continue;
    if (f.type === "checkbox") input.checked = params.get(f.param) === "1";
    else input.value = params.get(f.param) || "";
  }
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function run(params, { push = false } = {}) {
  const searching = params.has("q") || params.has("like") || state.example;
  $("intro").hidden = Boolean(searching);
  if (push) history.pushState(null, "", params.toString() ? `/?${params}` : "/");
  if (!searching) {
    render([]);
    setStatus("");
    return;
  }
  state.params = params;
  const query = new URLSearchParams(params);
  query.set("k", String(state.k));
  setStatus("Searching…");
  const started = performance.now();
  try {
    let data;
    if (state.example) {
      const body = new FormData();
      body.append(state.example.kind, state.example.file);
      data = await api(`/api/search?${query}`, { method: "POST", body });
    } else {
      data = await api(`/api/search?${query}`);
    }
    const ms = Math.round(performance.now() - started);
    render(data.hits);
    const what = state.example ? `like ${state.example.file.name}` : params.has("like") ? "like the chosen file" : `for “${params.get("q")}”`;
    const n = data.hits.length;
    setStatus(n ? `${n} result${n === 1 ? "" : "s"} ${what} · ${ms} ms` : `Nothing found ${what}`);
    $("more").hidden = n < state.k || state.k >= state.info.max_k;
  } catch (e) {
    render([]);
    setStatus(e.message, true);
  }
}

function search({ push = true } = {}) {
  state.k = PAGE;
  return run(formParams(), { push });
}

// "More like this": the stored vectors of that file (or of its matching part) are the query.
function moreLike(hit) {
  if (!hit.id) return;
  clearExample(false);
  const params = new URLSearchParams();
  params.set("like", hit.id);
  if (hit.modality !== "image" && hit.start !== undefined && hit.start !== null) {
    params.set("at", String(hit.start));
  }
  const index = formParams().get("index");
  if (index) params.set("index", index);
  $("q").value = "";
  closeViewer();
  state.k = PAGE;
  run(params, { push: true });
}

// --- results ------------------------------------------------------------------------------------
function render(hits) {
  state.hits = hits;
  state.focus = -1;
  const grid = $("results");
  grid.replaceChildren(...hits.map(card));
  $("more").hidden = true;
}

function card(hit, i) {
  const name = basename(hit.path);
  const media = el("div", { class: "media" });
  if (hit.thumb) {
    const img = el("img", { src: hit.thumb, alt: name, loading: "lazy", decoding: "async" });
    img.addEventListener("error", () => media.classList.add("broken"), { once: true });
    media.append(img);
    if (hit.modality === "video") media.append(el("span", { class: "badge", text: `▶ ${span(hit)}` }));
  } else if (hit.modality === "audio" && hit.url) {
    media.append(
      el("div", { class: "glyph", "aria-hidden": "true", text: "♪" }),
      el("div", { class: "range", text: span(hit) }),
      el("audio", { controls: true, preload: "none", src: mediaUrl(hit) }),
    );
  } else if (hit.modality === "video" && hit.url) {
    media.append(el("video", { controls: true, preload: "none", src: mediaUrl(hit), poster: hit.thumb }));
  } else if (hit.modality === "text") {
    media.append(snippetBox(hit));
  } else {
    media.append(el("div", { class: "glyph", "aria-hidden": "true", text: "?" }));
  }
  const where = span(hit);
  const caption = el("div", { class: "caption" }, [
    el("span", { class: "name", text: name, title: hit.path }),
    el("span", { class: "meta" }, [
      el("span", { class: "kind", text: hit.modality === "text" ? "note" : hit.modality }),
      where && hit.modality === "text" ? el("span", { class: "where", text: where }) : "",
      hit.more ? el("span", { class: "where", text: `+${hit.more}`, title: `${hit.more} more matches in this file` }) : "",
      el("span", { class: "score", text: scoreText(hit), title: `rank ${hit.rank}, score ${hit.score}` }),
    ]),
  ]);
  const like = el("button", { type: "button", class: "like", text: "More like this", title: "Find results like this one (m)" });
  like.addEventListener("click", (event) => {
    event.stopPropagation();
    moreLike(hit);
  });
  const item = el("li", { class: `card ${hit.modality}`, tabIndex: 0, dataset: { i: String(i) } }, [media, caption, like]);
  item.addEventListener("click", (event) => {
    if (event.target.closest("audio, video, button, a")) return;
    openViewer(i);
  });
  item.addEventListener("focus", () => { state.focus = i; });
  return item;
}

// A note's matching lines, which the hit carries.
function snippetBox(hit) {
  const lines = Array.isArray(hit.snippet) ? hit.snippet.join("\n") : "(no text)";
  return el("pre", { class: "snippet", text: lines });
}

// --- the viewer ---------------------------------------------------------------------------------
function openViewer(i) {
  const hit = state.hits[i];
  if (!hit) return;
  state.focus = i;
  const media = $("viewer-media");
  media.replaceChildren();
  if (hit.modality === "image" && hit.url) {
    media.append(el("img", { src: hit.url, alt: basename(hit.path) }));
  } else if (hit.modality === "audio" && hit.url) {
    media.append(el("div", { class: "glyph", text: "♪" }), el("audio", { controls: true, autoplay: true, src: mediaUrl(hit) }));
  } else if (hit.modality === "video" && hit.url) {
    media.append(el("video", { controls: true, autoplay: true, src: mediaUrl(hit) }));
  } else {
    media.append(snippetBox(hit));
  }
  $("viewer-name").textContent = basename(hit.path);
  $("viewer-path").textContent = hit.path;
  const where = span(hit);
  $("viewer-meta").textContent = [`#${hit.rank}`, hit.modality, where, `score ${hit.score.toFixed(3)}`,
    typeof hit.relevance === "number" ? `relevance ${percent(hit.relevance)}%` : ""].filter(Boolean).join(" · ");
  $("viewer-open").href = hit.url || "#";
  $("viewer-like").onclick = () => moreLike(hit);
  const viewer = $("viewer");
  if (!viewer.open) viewer.showModal();
}

function closeViewer() {
  const viewer = $("viewer");
  if (!viewer.open) return;
  viewer.close();
}

function step(delta) {
  if (!state.hits.length) return;
  const i = Math.min(state.hits.length - 1, Math.max(0, state.focus + delta));
  if ($("viewer").open) openViewer(i);
  else focusCard(i);
}

function focusCard(i) {
  const cards = $("results").children;
  if (!cards.length) return;
  const target = cards[Math.min(cards.length - 1, Math.max(0, i))];
  target.focus();
  target.scrollIntoView({ block: "nearest" });
}

function columns() {
  const cards = [...$("results").children];
  if (!cards.length) return 1;
  const top = cards[0].offsetTop;
  return Math.max(1, cards.filter((c) => c.offsetTop === top).length);
}

function onKey(event) {
  const typing = event.target.closest("input, select, textarea");
  if (event.key === "/" && !typing) {
    event.preventDefault();
    $("q").focus();
    $("q").select();
    return;
  }
  if (typing || event.altKey || event.ctrlKey || event.metaKey) return;
  const viewing = $("viewer").open;
  const moves = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: viewing ? 1 : columns(), ArrowUp: viewing ? -1 : -columns() };
  if (event.key in moves) {
    event.preventDefault();
    if (state.focus < 0) focusCard(0);
    else step(moves[event.key]);
  } else if (event.key === "Enter" && !viewing && state.focus >= 0 && event.target.classList.contains("card")) {
    event.preventDefault();
    openViewer(state.focus);
  } else if (event.key === "m" && state.focus >= 0) {
    moreLike(state.hits[state.focus]);
  }
}

// --- search by example --------------------------------------------------------------------------
function kindOf(file) {
  const type = (file.type || "").split("/")[0];
  if (type in KINDS) return KINDS[type];
  const ext = file.name.toLowerCase().split(".").pop();
  if (["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"].includes(ext)) return "image";
  if (["wav", "flac", "ogg", "oga", "opus", "mp3", "m4a", "aiff", "aif"].includes(ext)) return "audio";
  return null;
}

function useExample(file) {
  const kind = kindOf(file);
  if (!kind) {
    setStatus(`${file.name} is neither an image nor a recording`, true);
    return;
  }
  clearExample(false);
  state.example = { file, kind, url: kind === "image" ? URL.createObjectURL(file) : null };
  const thumb = $("example-thumb");
  thumb.hidden = !state.example.url;
  if (state.example.url) thumb.src = state.example.url;
  $("example-name").textContent = file.name;
  $("example").hidden = false;
  state.k = PAGE;
  run(formParams());
}

function clearExample(rerun = true) {
  if (state.example && state.example.url) URL.revokeObjectURL(state.example.url);
  state.example = null;
  $("example").hidden = true;
  $("file").value = "";
  if (rerun) search();
}

function setupDrop() {
  const overlay = $("drop");
  let depth = 0;
  const hasFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    overlay.hidden = false;
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  window.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  window.addEventListener("drop", (event) => {
    depth = 0;
    overlay.hidden = true;
    const file = event.dataTransfer?.files?.[0];
    if (!file) return;
    event.preventDefault();
    useExample(file);
  });
  window.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files || [])][0];
    if (file) useExample(file);
  });
}

// --- setup --------------------------------------------------------------------------------------
function setupForm(info) {
  const type = $("type");
  for (const t of info.types.filter((t) => t !== "any")) {
    type.append(el("option", { value: t, text: { image: "Images", text: "Notes", audio: "Sounds", video: "Videos" }[t] || t }));
  }
  const index = $("index");
  index.replaceChildren(...info.indexes.map((name) => el("option", { value: name, text: name })));
  index.hidden = info.indexes.length < 2;
  const filters = $("filters");
  for (const f of FILTERS.filter((f) => info.params.includes(f.param))) {
    const input = el("input", { id: `filter-${f.param}`, type: f.type, placeholder: f.placeholder, min: f.min, max: f.max, step: f.step });
    input.addEventListener("change", () => search());
    filters.append(el("label", {}, [el("span", { text: f.label }), input]));
  }
  filters.hidden = !filters.children.length;
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    search();
  });
  for (const select of [type, index]) select.addEventListener("change", () => search());
  $("file").addEventListener("change", () => {
    if ($("file").files[0]) useExample($("file").files[0]);
  });
  $("example-clear").addEventListener("click", () => clearExample());
  $("more").addEventListener("click", () => {
    state.k = Math.min(state.info.max_k, state.k + PAGE);
    run(state.params || formParams());
  });
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer-prev").addEventListener("click", () => step(-1));
  $("viewer-next").addEventListener("click", () => step(1));
  $("viewer").addEventListener("click", (event) => {
    if (event.target === $("viewer")) closeViewer(); // the backdrop
  });
  $("viewer").addEventListener("close", () => {
    $("viewer-media").replaceChildren(); // stops a playing recording
    focusCard(state.focus);
  });
  document.addEventListener("keydown", onKey);
  window.addEventListener("popstate", fromAddress);
}

async function showServed() {
  try {
    const { indexes } = await api("/api/indexes");
    $("served").textContent = indexes
      .map((ix) => `Index “${ix.name}”: ${ix.files} files, ${ix.vectors} vectors (${ix.model})`)
      .join(" · ");
  } catch (e) {
    $("served").textContent = "";
  }
}

function fromAddress() {
  const params = new URLSearchParams(location.search);
  fillForm(params);
  state.k = PAGE;
  if (state.example) clearExample(false);
  const keep = new URLSearchParams();
  for (const [key, value] of params) if (key !== "k") keep.append(key, value);
  return run(keep);
}

async function main() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  setupForm(state.info);
  setupDrop();
  showServed();
  await fromAddress();
  if (!state.params) $("q").focus();
}

main();

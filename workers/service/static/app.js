// fusionrank search page: plain JavaScript, no build step, no external resources.
// Every API call carries the key from the key field (kept in localStorage) as X-API-Key.
"use strict";

(function () {
  const KEY_STORE = "fusionrank.apiKey";
  const CLIENT_STORE = "fusionrank.clientId"; // this browser's UBI client id
  const APPLICATION = "fusionrank-search-page";
  const $ = (id) => document.getElementById(id);
  const els = {
    keyForm: $("key-form"), key: $("api-key"), form: $("search-form"), query: $("query"), shopper: $("shopper"),
    size: $("size"), diversity: $("diversity"), diversityNote: $("diversity-note"), image: $("image"), preview: $("image-preview"), thumb: $("image-thumb"), clearImage: $("clear-image"),
    status: $("status"), degraded: $("degraded"), summary: $("summary"), results: $("results"), template: $("result-template"),
  };
  let queryImage = null; // base64 (no data: prefix) of the photo to search with
  let blobUrls = []; // object URLs of the shown photos, revoked on the next render
  let searchSeq = 0; // answers of superseded searches are dropped
  let titles = new Map(); // product id -> title, of the shown results (names history items in "why")

  function apiKey() { return els.key.value.trim(); }

  function clientId() {
    let id = localStorage.getItem(CLIENT_STORE);
    if (!id) {
      id = "page-" + (window.crypto && crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now());
      localStorage.setItem(CLIENT_STORE, id);
    }
    return id;
  }

  // ------------------------------------------------------------------ UBI events (as a shop's page sends them)
  // impressions of the shown results when they are rendered, a click when a product is opened; each names the
  // search's query_id (from the /search answer) and the product's position, so the service joins them to what it served.
  function ubiEvent(action, queryId, userId, productId, position) {
    const ev = { action_name: action, query_id: queryId, client_id: clientId(), application: APPLICATION, message_type: "INTERACTION",
      timestamp: new Date().toISOString(),
      event_attributes: { object: { object_id: productId, object_id_field: "product_id" }, position: { ordinal: position } } };
    if (userId) ev.user_id = userId;
    return ev;
  }

  async function sendUbi(events) {
    if (!events.length) return;
    try {
      const resp = await api("/events", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ events }) });
      const out = await resp.json();
      els.results.dataset.ubiSent = String((Number(els.results.dataset.ubiSent) || 0) + (out.stored || 0) + (out.duplicates || 0));
    } catch (e) {
      els.results.dataset.ubiError = e.message; // behaviour logging never gets in the shopper's way
    }
  }

  function setStatus(text, isError) {
    els.status.textContent = text || "";
    els.status.classList.toggle("error", Boolean(isError));
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = Object.assign({ "X-API-Key": apiKey() }, opts.headers || {});
    const resp = await fetch(path, opts);
    if (!resp.ok) {
      let detail = resp.statusText;
      try {
        const body = await resp.json();
        if (body && body.detail !== undefined) detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      } catch (_) { /* not JSON */ }
      const err = new Error(resp.status === 401 ? `API key missing or wrong (${detail})` : `${resp.status}: ${detail}`);
      err.status = resp.status;
      throw err;
    }
    return resp;
  }

  // ------------------------------------------------------------------ shoppers
  async function loadShoppers() {
    if (!apiKey()) { setStatus("Enter the API key to search."); return; }
    try {
      const data = await (await api("/v1/users?limit=50")).json();
      const keep = els.shopper.value;
      els.shopper.replaceChildren(new Option("anonymous", ""));
      for (const u of data.users || []) {
        const opt = new Option(`${u.user_id} (${u.events} event${u.events === 1 ? "" : "s"})`, u.user_id);
        opt.dataset.events = String(u.events);
        els.shopper.add(opt);
      }
      els.shopper.value = [...els.shopper.options].some((o) => o.value === keep) ? keep : "";
      els.shopper.dataset.loaded = String((data.users || []).length);
      setStatus(`${(data.users || []).length} shoppers with history loaded.`);
    } catch (e) {
      setStatus(`Could not load shoppers: ${e.message}`, true);
    }
  }

  // ------------------------------------------------------------------ photo query
  function readImage(file) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(String(r.result));
      r.onerror = () => reject(r.error || new Error("cannot read the file"));
      r.readAsDataURL(file);
    });
  }

  els.image.addEventListener("change", async () => {
    const file = els.image.files && els.image.files[0];
    if (!file) { clearImage(); return; }
    try {
      const dataUrl = await readImage(file);
      queryImage = dataUrl.slice(dataUrl.indexOf(",") + 1);
      els.thumb.src = dataUrl;
      els.preview.hidden = false;
      setStatus(`Searching with photo ${file.name} (${Math.round(file.size / 1024)} KiB).`);
    } catch (e) {
      clearImage();
      setStatus(`Could not read ${file.name}: ${e.message}`, true);
    }
  });

  function clearImage() {
    queryImage = null;
    els.image.value = "";
    els.thumb.removeAttribute("src");
    els.preview.hidden = true;
  }
  els.clearImage.addEventListener("click", () => { clearImage(); els.query.focus(); });

  // ------------------------------------------------------------------ search
  async function search() {
    const query = els.query.value.trim();
    if (!apiKey()) { setStatus("Enter the API key first.", true); els.key.focus(); return; }
    if (!query && !queryImage) { setStatus("Type a query or choose a photo.", true); return; }
    const body = { query, size: Number(els.size.value) || 20, client_id: clientId() };
    if (els.shopper.value) body.user_id = els.shopper.value;
    if (els.diversity.value) body.diversity = els.diversity.value === "auto" ? "auto" : Number(els.diversity.value);
    if (queryImage) body.image = queryImage;
    const seq = ++searchSeq;
    els.results.setAttribute("aria-busy", "true");
    els.results.dataset.state = "loading";
    setStatus("Searching…");
    try {
      const resp = await api("/search", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      const data = await resp.json();
      if (seq !== searchSeq) return;
      render(data, body);
    } catch (e) {
      if (seq !== searchSeq) return;
      setStatus(`Search failed: ${e.message}`, true);
      els.results.dataset.state = "error";
    } finally {
      if (seq === searchSeq) els.results.removeAttribute("aria-busy");
    }
  }

  function fmt(x, digits) {
    return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits === undefined ? 3 : digits) : "–";
  }

  function render(data, request) {
    for (const u of blobUrls) URL.revokeObjectURL(u);
    blobUrls = [];
    const hits = data.hits || [];
    titles = new Map(hits.map((h) => [String(h.id), (h.source && h.source.title) || ""]));
    const fr = data.fusionrank || {};
    els.degraded.hidden = !fr.degraded;
    els.degraded.textContent = fr.degraded ? `Degraded: ${fr.degraded} — showing the first-stage order.` : "";
    const who = request.user_id ? `shopper ${request.user_id}` : "anonymous";
    const total = fr.timings_ms && typeof fr.timings_ms.total === "number" ? ` in ${fmt(fr.timings_ms.total, 1)} ms` : "";
    els.summary.textContent = `${hits.length} results for ${who}${total}` + (fr.model_version ? ` · model ${fr.model_version}` : "");
    const div = fr.diversity || {};
    els.diversityNote.textContent = typeof div.lambda === "number" ? `diversity λ ${fmt(div.lambda, 3)} — ${div.reason || ""}` : "";
    els.results.dataset.diversity = typeof div.lambda === "number" ? String(div.lambda) : "";
    els.results.dataset.userId = request.user_id || "";
    els.results.dataset.query = request.query;
    els.results.dataset.queryId = data.query_id || "";
    els.results.replaceChildren(...hits.map((h) => renderHit(h, data.query_id, request.user_id)));
    if (data.query_id) sendUbi(hits.map((h) => ubiEvent("impression", data.query_id, request.user_id, String(h.id), h.rank)));
    setStatus(hits.length ? `${hits.length} results.` : "No results.");
    els.results.dataset.state = "done";
  }

  function renderHit(hit, queryId, userId) {
    const node = els.template.content.firstElementChild.cloneNode(true);
    const src = hit.source || {};
    const id = String(hit.id);
    const title = src.title || id;
    node.dataset.productId = id;
    node.dataset.rank = String(hit.rank);
    node.dataset.previousRank = String(hit.previous_rank);
    const link = node.querySelector(".product-link");
    link.textContent = title;
    link.addEventListener("click", (ev) => {
      ev.preventDefault(); // a shop would open the product page here
      node.dataset.clicked = "1";
      if (queryId) sendUbi([ubiEvent("click", queryId, userId, id, hit.rank)]);
    });
    node.querySelector(".meta").textContent = [src.brand, typeof src.price === "number" ? `${src.price.toFixed(2)}` : null]
      .filter(Boolean).concat([`#${id}`]).join(" · ");
    node.querySelector(".attributes").replaceChildren(...attributeChips(src));
    node.querySelector(".prev").textContent = `#${hit.previous_rank}`;
    node.querySelector(".new").textContent = `#${hit.rank}`;
    const delta = hit.previous_rank - hit.rank;
    const d = node.querySelector(".delta");
    d.textContent = delta > 0 ? `▲${delta}` : delta < 0 ? `▼${-delta}` : "=";
    d.classList.add(delta > 0 ? "up" : delta < 0 ? "down" : "same");
    node.querySelector(".rank").setAttribute("aria-label", `first-stage position ${hit.previous_rank}, reranked position ${hit.rank}`);
    node.querySelector(".score").textContent = `score ${fmt(hit.score)} (first stage ${fmt(hit.previous_score)})`;

    const img = node.querySelector(".photo");
    img.alt = title;
    loadPhoto(img, node.querySelector(".no-photo"), id, src);

    const btn = node.querySelector(".why-button");
    const panel = node.querySelector(".why");
    panel.id = `why-${cssId(id)}`;
    btn.setAttribute("aria-controls", panel.id);
    btn.setAttribute("aria-label", `Why is ${title} at position ${hit.rank}?`);
    btn.addEventListener("click", () => {
      const open = btn.getAttribute("aria-expanded") !== "true";
      if (open && !panel.dataset.filled) { fillWhy(panel, hit.explanation || {}); panel.dataset.filled = "1"; }
      btn.setAttribute("aria-expanded", String(open));
      panel.hidden = !open;
    });
    return node;
  }

  // the attributes shoppers filter on: the catalog's value, else the one indexing read off the photo (products-v4:
  // listed in completed_attributes, with the head's confidence), marked as such
  const ATTRIBUTES = [["article_type", "type"], ["colour", "colour"], ["gender", "gender"], ["usage", "usage"]];

  function attributeChips(src) {
    const completed = new Set(Array.isArray(src.completed_attributes) ? src.completed_attributes : []);
    const out = [];
    for (const [field, label] of ATTRIBUTES) {
      const own = typeof src[field] === "string" ? src[field].trim() : "";
      const photo = typeof src[`photo_${field}`] === "string" ? src[`photo_${field}`].trim() : "";
      const fromPhoto = !own && completed.has(field) && photo;
      if (!own && !fromPhoto) continue;
      const chip = document.createElement("span");
      chip.className = fromPhoto ? "attr from-photo" : "attr";
      chip.dataset.attribute = field;
      chip.dataset.source = fromPhoto ? "photo" : "catalog";
      chip.textContent = fromPhoto ? photo : own;
      if (fromPhoto) {
        const conf = Number(src[`photo_${field}_confidence`]);
        const mark = document.createElement("span");
        mark.className = "photo-mark";
        mark.textContent = Number.isFinite(conf) ? ` from photo ${Math.round(conf * 100)}%` : " from photo";
        chip.append(mark);
        chip.title = `${label} read from the photo` + (Number.isFinite(conf) ? ` (confidence ${fmt(conf, 2)})` : "") + `: the catalog has no ${label}`;
        chip.setAttribute("aria-label", `${label} ${photo}, read from the photo`);
      } else {
        chip.title = `${label} from the catalog`;
      }
      out.push(chip);
    }
    return out;
  }

  function cssId(id) { return id.replace(/[^A-Za-z0-9_-]/g, "_"); }

  async function loadPhoto(img, noPhoto, id, src) {
    const ref = typeof src.image === "string" ? src.image : "";
    if (/^https?:\/\//i.test(ref)) { img.src = ref; return; }
    if (!ref && src.has_image === false) { showNoPhoto(img, noPhoto); return; }
    try {
      const resp = await api(`/v1/products/${encodeURIComponent(id)}/image`);
      const url = URL.createObjectURL(await resp.blob());
      blobUrls.push(url);
      img.src = url;
    } catch (e) {
      showNoPhoto(img, noPhoto, e.status === 404 ? "" : e.message);
    }
  }

  function showNoPhoto(img, noPhoto, why) {
    img.hidden = true;
    noPhoto.hidden = false;
    if (why) noPhoto.title = why;
  }

  function li(text, cls) {
    const e = document.createElement("li");
    e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function fillWhy(panel, ex) {
    const gates = panel.querySelector(".gates");
    const g = ex.gates || {};
    if (!Object.keys(g).length) gates.append(li("no model scores (first-stage order)", "empty"));
    for (const [name, w] of Object.entries(g)) {
      const row = document.createElement("li");
      row.dataset.modality = name;
      const label = document.createElement("span");
      label.textContent = name;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("role", "meter");
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", "1");
      bar.setAttribute("aria-valuenow", String(w));
      bar.setAttribute("aria-label", `${name} gate`);
      const fill = document.createElement("span");
      fill.style.width = `${Math.max(0, Math.min(1, Number(w) || 0)) * 100}%`;
      bar.append(fill);
      const val = document.createElement("span");
      val.textContent = fmt(w, 2);
      row.append(label, bar, val);
      gates.append(row);
    }
    const hist = panel.querySelector(".history");
    const top = ex.history_top || [];
    if (!top.length) hist.append(li("no history used (anonymous shopper or no events)", "empty"));
    for (const t of top) {
      const name = titles.get(String(t.product_id));
      const e = li(`${name ? `${name} (${t.product_id})` : t.product_id} — weight ${fmt(t.weight, 2)}`);
      e.dataset.productId = String(t.product_id);
      hist.append(e);
    }
    const dv = ex.diversity || {};
    panel.querySelector(".diversity").textContent = typeof dv.lambda === "number" && dv.lambda > 0
      ? `λ ${fmt(dv.lambda, 3)}: #${dv.relevance_rank} by relevance` + (typeof dv.max_similarity === "number" ? `, similarity to the results above ${fmt(dv.max_similarity, 2)}` : "")
      : "off: the model's order";
    const body = panel.querySelector(".first-stage tbody");
    const fs = ex.first_stage || {};
    for (const [name, s] of Object.entries(fs)) {
      const tr = document.createElement("tr");
      tr.dataset.list = name;
      for (const v of [name, s.rank ?? "–", fmt(s.score), fmt(s.normalized)]) {
        const td = document.createElement("td");
        td.textContent = String(v);
        tr.append(td);
      }
      body.append(tr);
    }
    if (!Object.keys(fs).length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 4; td.className = "empty"; td.textContent = "in no first-stage list";
      tr.append(td); body.append(tr);
    }
  }

  // ------------------------------------------------------------------ wiring
  els.form.addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
  els.keyForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    try { localStorage.setItem(KEY_STORE, apiKey()); } catch (_) { /* storage disabled */ }
    loadShoppers();
  });
  els.key.addEventListener("change", () => {
    try { localStorage.setItem(KEY_STORE, apiKey()); } catch (_) { /* storage disabled */ }
    loadShoppers();
  });
  els.shopper.addEventListener("change", () => { if (els.query.value.trim() || queryImage) search(); });
  els.size.addEventListener("change", () => { if (els.query.value.trim() || queryImage) search(); });
  els.diversity.addEventListener("change", () => { if (els.query.value.trim() || queryImage) search(); });

  try { els.key.value = localStorage.getItem(KEY_STORE) || ""; } catch (_) { /* storage disabled */ }
  loadShoppers();
  document.body.dataset.ready = "1";
})();

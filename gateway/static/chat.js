// The fedsea chat page: talks to this gateway's own API only (relative URLs), keeps
// conversations in localStorage, renders answers as sanitized Markdown.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const STORE = "fedsea.chat.v1";
  const KEY = "fedsea.apiKey";
  const DEFAULTS = { model: "", system: "", temperature: 0.7, top_p: 0.95, max_tokens: 512 };
  // Model output and pasted text are untrusted: Markdown becomes HTML only through DOMPurify,
  // without the tags that could load anything or pose as page controls.
  const PURIFY = {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "iframe",
      "video", "audio", "source", "picture", "object", "embed", "link", "meta"],
    FORBID_ATTR: ["style", "srcset", "id", "name"],
  };

  let state = load();
  let models = [];
  let adapters = [];
  let streaming = null; // {controller, convId} while an answer streams
  const seenCache = new Map(); // message object -> last inspect report (memory only)

  // ---- storage ------------------------------------------------------------------------

  function load() {
    try {
      const s = JSON.parse(localStorage.getItem(STORE) || "null");
      if (s && Array.isArray(s.conversations)) {
        s.settings = Object.assign({}, DEFAULTS, s.settings || {});
        return s;
      }
    } catch (e) { /* a corrupt store starts afresh */ }
    return { conversations: [], current: null, settings: Object.assign({}, DEFAULTS) };
  }

  function save() {
    try {
      localStorage.setItem(STORE, JSON.stringify(state));
    } catch (e) {
      toast("Could not save the conversation in this browser: " + e.message);
    }
  }

  const apiKey = () => localStorage.getItem(KEY) || "";

  function current() {
    return state.conversations.find((c) => c.id === state.current) || null;
  }

  function newConversation() {
    const conv = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", updated: Date.now(), messages: [] };
    state.conversations.unshift(conv);
    state.current = conv.id;
    save();
    return conv;
  }

  // ---- API ----------------------------------------------------------------------------

  function url(path) {
    return new URL(path, document.baseURI).toString();
  }

  async function api(path, options = {}, retried = false) {
    const headers = Object.assign({ "Content-Type": "application/json" }, options.headers || {});
    const key = apiKey();
    if (key) headers.Authorization = "Bearer " + key;
    const response = await fetch(url(path), Object.assign({}, options, { headers }));
    if (response.status === 401 && !retried) {
      if (await askKey(key ? "That key was refused." : "")) return api(path, options, true);
    }
    return response;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      return (body.error && body.error.message) || JSON.stringify(body);
    } catch (e) {
      return response.status + " " + response.statusText;
    }
  }

  async function* events(response) {
    // Server-sent events: "data: {json}" blocks separated by a blank line, ending with [DONE].
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  // ---- the key dialog -----------------------------------------------------------------

  let keyWaiter = null;

  function askKey(why) {
    const dialog = $("key-dialog");
    $("key-error").hidden = !why;
    $("key-error").textContent = why || "";
    $("key-input").value = "";
    if (!dialog.open) dialog.showModal();
    $("key-input").focus();
    return new Promise((resolve) => {
      if (keyWaiter) keyWaiter(false);
      keyWaiter = resolve;
    });
  }

  function closeKey(ok) {
    const dialog = $("key-dialog");
    if (ok) {
      const key = $("key-input").value.trim();
      if (!key) {
        $("key-error").hidden = false;
        $("key-error").textContent = "Enter a key, or Cancel.";
        return;
      }
      localStorage.setItem(KEY, key);
    }
    if (dialog.open) dialog.close();
    showKeyState();
    if (keyWaiter) keyWaiter(ok);
    keyWaiter = null;
    if (ok) refreshStatus();
  }

  function showKeyState() {
    $("key-state").textContent = apiKey() ? "A key is stored in this browser." : "No key stored.";
    $("forget-key").hidden = !apiKey();
  }

  // ---- rendering ----------------------------------------------------------------------

  function markdown(text) {
    const html = window.marked ? window.marked.parse(text, { gfm: true, breaks: false }) : "";
    return window.DOMPurify ? window.DOMPurify.sanitize(html, PURIFY) : "";
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (v !== false && v != null) node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  }

  function renderList() {
    const list = $("conversations");
    list.replaceChildren();
    for (const conv of state.conversations) {
      const active = conv.id === state.current;
      list.append(el("li", { class: active ? "active" : "" },
        el("button", { type: "button", class: "conv", "aria-current": active ? "true" : false, text: conv.title,
          onclick: () => { state.current = conv.id; save(); render(); closePanels(); } }),
        el("button", { type: "button", class: "icon small", "aria-label": "Delete conversation: " + conv.title, text: "✕",
          onclick: () => deleteConversation(conv) })));
    }
  }

  function deleteConversation(conv) {
    if (streaming && streaming.convId === conv.id) streaming.controller.abort();
    state.conversations = state.conversations.filter((c) => c !== conv);
    if (state.current === conv.id) state.current = state.conversations.length ? state.conversations[0].id : null;
    save();
    render();
  }

  function render() {
    renderList();
    const conv = current();
    const box = $("messages");
    box.replaceChildren();
    const messages = conv ? conv.messages : [];
    $("empty").hidden = messages.length > 0;
    messages.forEach((m, i) => box.append(messageView(conv, m, i)));
    box.scrollTop = box.scrollHeight;
  }

  function stats(m) {
    const s = m.stats;
    if (!s) return "";
    const parts = [];
    if (s.ttft != null) parts.push("first token " + s.ttft.toFixed(2) + " s");
    if (s.tps != null) parts.push(s.tps.toFixed(1) + " tokens/s");
    if (s.tokens != null) parts.push(s.tokens + " tokens");
    if (s.finish && s.finish !== "stop") parts.push(s.finish);
    return parts.join(" · ");
  }

  function messageView(conv, m, i) {
    const mine = m.role === "user";
    const body = el("div", { class: mine ? "body plain" : "body markdown" });
    if (mine) body.textContent = m.content;
    else body.innerHTML = markdown(m.content);
    if (m.error) body.append(el("p", { class: "error", text: m.error }));
    const last = i === conv.messages.length - 1;
    const busy = streaming && streaming.convId === conv.id;
    const actions = el("div", { class: "actions" },
      el("button", { type: "button", text: "Copy", onclick: (e) => copy(m.content, e.currentTarget) }),
      mine && !busy ? el("button", { type: "button", text: "Edit", onclick: () => edit(conv, i, node) }) : null,
      !mine && last && !busy ? el("button", { type: "button", text: "Regenerate", onclick: () => regenerate(conv) }) : null,
      mine && last && !busy ? el("button", { type: "button", text: "Retry", onclick: () => generate(conv) }) : null,
      m.content ? el("button", { type: "button", class: "seen-toggle", "aria-expanded": "false",
        text: "What the server saw", onclick: (e) => toggleSeen(conv, i, node, e.currentTarget) }) : null);
    const node = el("article", { class: "msg " + (mine ? "user" : "assistant"), "aria-label": mine ? "You" : "Assistant" },
      el("header", {}, el("span", { class: "role", text: mine ? "You" : "Assistant" }),
        el("span", { class: "meta", text: stats(m) })),
      body, actions);
    node.message = m;
    return node;
  }

  async function copy(text, button) {
    try {
      if (navigator.clipboard && window.isSecureContext) await navigator.clipboard.writeText(text);
      else {
        // Plain http to another host is not a secure context: no clipboard API there.
        const area = el("textarea", { class: "offscreen", "aria-hidden": "true" });
        area.value = text;
        document.body.append(area);
        area.select();
        document.execCommand("copy");
        area.remove();
      }
      flash(button, "Copied");
    } catch (e) {
      flash(button, "Copy failed");
    }
  }

  function flash(button, text) {
    const before = button.textContent;
    button.textContent = text;
    setTimeout(() => { button.textContent = before; }, 1200);
  }

  function toast(text) {
    const t = el("div", { class: "toast", role: "alert", text });
    document.body.append(t);
    setTimeout(() => t.remove(), 5000);
  }

  // ---- editing, sending ---------------------------------------------------------------

  function edit(conv, i, node) {
    const m = conv.messages[i];
    const area = el("textarea", { class: "edit", rows: "4", "aria-label": "Edit message" });
    area.value = m.content;
    const resend = () => {
      const text = area.value.trim();
      if (!text) return;
      conv.messages = conv.messages.slice(0, i).concat([{ role: "user", content: text }]);
      save();
      generate(conv);
    };
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); resend(); }
      if (e.key === "Escape") render();
    });
    const box = el("div", { class: "editing" }, area,
      el("div", { class: "actions" },
        el("button", { type: "button", class: "primary", text: "Send", onclick: resend }),
        el("button", { type: "button", text: "Cancel", onclick: render })));
    const actions = node.querySelector(".actions");
    node.querySelector(".body").replaceWith(box);
    actions.remove();
    area.focus();
  }

  function send() {
    const input = $("prompt");
    const text = input.value.trim();
    if (!text || streaming) return;
    const conv = current() || newConversation();
    conv.messages.push({ role: "user", content: text });
    if (conv.title === "New chat") conv.title = text.slice(0, 60);
    input.value = "";
    save();
    generate(conv);
  }

  function regenerate(conv) {
    if (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
    save();
    generate(conv);
  }

  function requestBody(conv, messages, extra) {
    const s = state.settings;
    const body = {
      model: s.model || models[0] || "",
      messages: (s.system.trim() ? [{ role: "system", content: s.system }] : []).concat(
        messages.map((m) => ({ role: m.role, content: m.content }))),
    };
    return JSON.stringify(Object.assign(body, extra));
  }

  async function generate(conv) {
    if (streaming) return;
    const s = state.settings;
    const answer = { role: "assistant", content: "", stats: null };
    const history = conv.messages.slice();
    conv.messages.push(answer);
    conv.updated = Date.now();
    const controller = new AbortController();
    streaming = { controller, convId: conv.id };
    setBusy(true);
    render();
    const node = $("messages").lastElementChild;
    const body = node.querySelector(".body");
    const meta = node.querySelector(".meta");
    let pending = false;
    const paint = () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        body.innerHTML = markdown(answer.content);
        const box = $("messages");
        if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
      });
    };
    const started = performance.now();
    let first = null;
    let chunks = 0;
    let usage = null;
    let finish = null;
    try {
      const response = await api("v1/chat/completions", {
        method: "POST",
        signal: controller.signal,
        body: requestBody(conv, history, {
          stream: true, stream_options: { include_usage: true },
          temperature: Number(s.temperature), top_p: Number(s.top_p), max_tokens: Number(s.max_tokens) || undefined,
        }),
      });
      if (!response.ok) throw new Error(await errorText(response));
      for await (const chunk of events(response)) {
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const delta = (choice.delta && choice.delta.content) || "";
        if (choice.finish_reason) finish = choice.finish_reason;
        if (delta) {
          if (first === null) first = performance.now();
          chunks += 1;
          answer.content += delta;
          paint();
        }
      }
    } catch (e) {
      if (e.name === "AbortError") finish = "stopped";
      else answer.error = "Error: " + e.message;
    } finally {
      const end = performance.now();
      const tokens = usage ? usage.completion_tokens : chunks;
      answer.stats = {
        ttft: first === null ? null : (first - started) / 1000,
        tps: first !== null && tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : null,
        tokens, finish,
      };
      state.lastStats = answer.stats;
      if (!answer.content && !answer.error && finish === "stopped") answer.error = "Stopped before the first token.";
      streaming = null;
      setBusy(false);
      // The message list is redrawn whole: a live region of its own would read it all again.
      $("announce").textContent = answer.error ? answer.error : "Answer" + (finish === "stopped" ? " (stopped): " : ": ") + answer.content.slice(0, 400);
      save();
      render();
      showLastStats();
      $("prompt").focus();
    }
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("messages").setAttribute("aria-busy", busy ? "true" : "false");
  }

  function stop() {
    if (streaming) streaming.controller.abort();
  }

  // ---- what the server saw ------------------------------------------------------------

  async function toggleSeen(conv, i, node, button) {
    const open = node.querySelector(".seen");
    if (open) {
      open.remove();
      button.setAttribute("aria-expanded", "false");
      return;
    }
    button.setAttribute("aria-expanded", "true");
    const panel = el("section", { class: "seen", "aria-label": "What the server saw", tabindex: "-1" },
      el("p", { class: "note", text: "Asking the gateway…" }));
    node.append(panel);
    const m = conv.messages[i];
    const upto = conv.messages.slice(0, i + 1);
    const report = seenCache.get(m) || await inspect(conv, upto, false, panel);
    if (!report) return;
    seenCache.set(m, report);
    showSeen(conv, upto, m, report, panel);
    panel.focus();
  }

  async function inspect(conv, messages, reconstruct, panel) {
    try {
      const response = await api("fedsea/v1/inspect", { method: "POST", body: requestBody(conv, messages, { reconstruct }) });
      if (!response.ok) throw new Error(await errorText(response));
      return await response.json();
    } catch (e) {
      panel.replaceChildren(el("p", { class: "error", text: "Could not inspect: " + e.message }));
      return null;
    }
  }

  function highlighted(text, spans, from, to) {
    // Text nodes and <mark>s only: nothing here is parsed as HTML.
    const out = el("span");
    let at = from;
    for (const s of spans) {
      if (s.end <= from || s.start >= to) continue;
      out.append(text.slice(at, s.start));
      out.append(el("mark", { title: "you wrote “" + s.text + "” (" + s.kind + ")", text: s.surrogate }));
      at = s.end;
    }
    out.append(text.slice(at, to));
    return out;
  }

  function size(bytes) {
    return bytes >= 1048576 ? (bytes / 1048576).toFixed(2) + " MB" : (bytes / 1024).toFixed(1) + " KB";
  }

  function showSeen(conv, messages, m, r, panel) {
    const inMessage = r.spans.filter((s) => s.start >= r.message.start && s.end <= r.message.end);
    const replaced = inMessage.length
      ? inMessage.map((s) => "“" + s.text + "” → “" + s.surrogate + "”").join(", ")
      : (r.pseudonymize ? "nothing detected in this message" : "pseudonymization is off");
    const reconstructButton = el("button", { type: "button", class: "primary", text: "Reconstruct from the noised states",
      onclick: async () => {
        reconstructButton.disabled = true;
        reconstructButton.textContent = "Reconstructing… (the first run builds a probe table: up to ~30 s)";
        const full = await inspect(conv, messages, true, panel);
        if (!full) return;
        seenCache.set(m, full);
        showSeen(conv, messages, m, full, panel);
      } });
    panel.replaceChildren(
      el("h3", { text: "What left this device" }),
      el("p", { class: "sent" }, highlighted(r.sent_text, r.spans, r.message.start, r.message.end)),
      el("p", { class: "note", text: "Replaced before encoding: " + replaced + "." }),
      el("dl", { class: "facts" },
        el("dt", { text: "Hidden states sent" }),
        el("dd", { text: r.states + " for the conversation up to here (" + r.message.states + " for this message; "
          + r.public_states + " of the template's public prefix without noise)" }),
        el("dt", { text: "Bytes on the wire" }),
        el("dd", { text: size(r.bytes) + " (" + r.states + " × " + r.hidden_size + " × " + r.wire_dtype + ")" }),
        el("dt", { text: "Noise" }),
        el("dd", { text: r.noise + " × each state's RMS" })),
      el("details", {}, el("summary", { text: "The whole prompt as encoded" }),
        el("pre", { class: "prompt" }, highlighted(r.sent_text, r.spans, 0, r.sent_text.length))));
    const rec = r.reconstruction;
    if (!rec) {
      panel.append(el("p", { class: "note", text: "What could a server holding the public weights read back from these noised states?" }),
        reconstructButton);
      return;
    }
    const read = el("p", { class: "read" });
    for (const t of rec.tokens) read.append(t.ok ? t.read : el("del", { title: "was “" + t.sent + "”", text: t.read }));
    const share = Math.round(rec.recovered * 1000) / 10;
    panel.append(
      el("h3", { text: "What a server with the public weights reads back" }),
      el("p", { class: "share " + (share >= 50 ? "bad" : "ok") }, el("strong", { text: share + "%" }),
        " of this message's " + rec.positions + " tokens recovered" + (rec.truncated ? " (first " + rec.positions + " only)" : "")),
      read,
      el("p", { class: "note", text: "Attack: " + rec.method + ", given the conversation before this message; " + rec.seconds + " s"
        + (rec.probe_table_seconds ? " after building the probe table in " + rec.probe_table_seconds + " s" : "")
        + ". Struck-through tokens were read wrong. " + (share >= 50
          ? "Noise at this level hides little: what keeps names, numbers and e-mail addresses from the server is their replacement before encoding (above)."
          : "At this noise the attack reads back less than half of the message.") }));
  }

  // ---- status strip -------------------------------------------------------------------

  let status = null;

  async function refreshStatus() {
    try {
      const response = await api("fedsea/v1/status", {}, !apiKey()); // no key yet: wait for a real call to ask
      if (response.status === 401) return showStatus(null, "API key needed");
      if (!response.ok) return showStatus(null, await errorText(response));
      status = await response.json();
      showStatus(status);
      if (!models.length) loadModels();
    } catch (e) {
      showStatus(null, "gateway unreachable");
    }
  }

  function item(label, value, cls) {
    return el("li", { class: cls || "" }, el("span", { class: "k", text: label + " " }), el("span", { class: "v", text: value }));
  }

  function showStatus(s, problem) {
    const list = $("status");
    if (!s) {
      list.replaceChildren(item("Gateway", problem, "warn"));
      return;
    }
    const live = s.servers.find((x) => x.connected);
    const server = live || s.servers[0];
    const host = server ? server.url.replace(/^wss?:\/\//, "") : "none";
    const replicas = s.servers.length > 1 ? " +" + (s.servers.length - 1) + " replica" + (s.servers.length > 2 ? "s" : "") : "";
    list.replaceChildren(
      item("Server", (s.ready ? host : "not connected: " + host) + replicas, s.ready ? "" : "warn"),
      item("TLS", "server " + (server && server.tls ? "on" : "off") + ", page " + (s.api_tls || location.protocol === "https:" ? "on" : "off")),
      item("Noise", String(s.noise)),
      item("Pseudonyms", s.pseudonymize ? "on" : "off", s.pseudonymize ? "" : "warn"),
      el("li", { id: "st-speed" }));
    list.title = s.servers.map((x) => x.url + (x.connected ? " (serving)" : "")).join("\n");
    showLastStats();
  }

  function showLastStats() {
    const li = $("st-speed");
    if (!li) return;
    const s = state.lastStats;
    li.replaceChildren(el("span", { class: "k", text: "Last answer " }),
      el("span", { class: "v", text: s && s.ttft != null
        ? "first token " + s.ttft.toFixed(2) + " s · " + (s.tps != null ? s.tps.toFixed(1) + " tok/s" : "–")
        : "–" }));
  }

  async function loadModels() {
    try {
      const response = await api("v1/models");
      if (!response.ok) return;
      models = (await response.json()).data.map((m) => m.id);
    } catch (e) {
      return;
    }
    adapters = status ? status.adapters : [];
    const select = $("model");
    select.replaceChildren(...models.map((id) =>
      el("option", { value: id, text: adapters.includes(id) ? id + " (adapter)" : adapters.length ? id + " (base)" : id })));
    if (!models.includes(state.settings.model)) state.settings.model = models[0] || "";
    select.value = state.settings.model;
  }

  // ---- panels and wiring --------------------------------------------------------------

  function togglePanel(id, button) {
    const open = !$(id).classList.contains("open");
    closePanels();
    $(id).classList.toggle("open", open);
    button.setAttribute("aria-expanded", String(open));
    if (open) $(id).querySelector("button, select, textarea, input").focus();
  }

  function closePanels() {
    for (const [id, b] of [["sidebar", "toggle-sidebar"], ["settings", "toggle-settings"]]) {
      $(id).classList.remove("open");
      $(b).setAttribute("aria-expanded", "false");
    }
  }

  function bindSetting(id, parse) {
    const input = $(id);
    input.value = state.settings[id];
    input.addEventListener("change", () => {
      const value = parse(input.value);
      if (value === null) { input.value = state.settings[id]; return; }
      state.settings[id] = value;
      save();
    });
  }

  function number(lo, hi) {
    return (v) => {
      const x = Number(v);
      return v !== "" && Number.isFinite(x) && x >= lo && x <= hi ? x : null;
    };
  }

  function start() {
    bindSetting("system", (v) => v);
    bindSetting("temperature", number(0, 2));
    bindSetting("top_p", number(0.01, 1));
    bindSetting("max_tokens", (v) => { const x = number(1, 1e6)(v); return x === null ? null : Math.floor(x); });
    $("model").addEventListener("change", () => { state.settings.model = $("model").value; save(); });
    $("send").addEventListener("click", send);
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", () => { newConversation(); render(); closePanels(); $("prompt").focus(); });
    $("toggle-sidebar").addEventListener("click", (e) => togglePanel("sidebar", e.currentTarget));
    $("toggle-settings").addEventListener("click", (e) => togglePanel("settings", e.currentTarget));
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        send();
      }
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && streaming) stop();
      else if (e.key === "Escape") closePanels();
    });
    $("key-save").addEventListener("click", () => closeKey(true));
    $("key-cancel").addEventListener("click", () => closeKey(false));
    $("key-input").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); closeKey(true); } });
    $("key-dialog").addEventListener("cancel", (e) => { e.preventDefault(); closeKey(false); });
    $("change-key").addEventListener("click", () => askKey(""));
    $("forget-key").addEventListener("click", () => { localStorage.removeItem(KEY); showKeyState(); refreshStatus(); });
    window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A") {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    });
    showKeyState();
    render();
    refreshStatus().then(() => { if (!models.length) loadModels(); });
    setInterval(refreshStatus, 15000);
    $("prompt").focus();
  }

  document.addEventListener("DOMContentLoaded", start);
})();

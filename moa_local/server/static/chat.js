/* moa-local chat page. Talks to this server's own OpenAI-compatible API (relative URLs, so a path prefix works):
   GET v1/models for the picker, POST v1/chat/completions with "stream": true and "moa_events": true. The SSE stream
   is the OpenAI one (the aggregator's text in choices[0].delta.content) interleaved with "object": "moa.event"
   lines: plan, role.start, role.delta (proposers' text), role.done. See docs/server.md, "The chat page".
   Model text is only ever put into text nodes, never parsed as HTML. No build step, nothing fetched elsewhere. */
"use strict";
(function () {
  const KEY_STORE = "moa-local.api-key";
  const $ = (id) => document.getElementById(id);
  const state = {
    key: sessionStorage.getItem(KEY_STORE),
    history: [],          // the messages of finished turns: what the next request carries
    recipe: null,         // the first model GET v1/models lists is the recipe
    running: null,        // {controller, turn} while an answer streams
  };
  const turns = [];       // every Turn on the page (for "fold layers")

  function el(tag, cls, text) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined && text !== null) n.textContent = String(text);
    return n;
  }
  const num = (n) => Number(n || 0).toLocaleString("en-US");
  const setStatus = (text) => { $("status").textContent = text || ""; };

  // -- scrolling: follow the stream only while the reader is at the bottom ---------------------------------------
  let follow = true, scrollQueued = false;
  window.addEventListener("scroll", () => {
    follow = window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 80;
  }, { passive: true });
  function keepBottom() {
    if (!follow || scrollQueued) return;
    scrollQueued = true;
    requestAnimationFrame(() => { scrollQueued = false; window.scrollTo(0, document.documentElement.scrollHeight); });
  }

  // -- the API key: asked on a 401, kept for the tab ---------------------------------------------------------------
  function askKey(message) {
    const dialog = $("key-dialog"), input = $("key-input");
    $("key-message").textContent = message;
    input.value = "";
    return new Promise((resolve) => {
      const done = (key) => {
        $("key-form").onsubmit = null;
        $("key-cancel").onclick = null;
        dialog.oncancel = null;
        dialog.close();
        resolve(key);
      };
      $("key-form").onsubmit = (e) => { e.preventDefault(); done(input.value.trim() || null); };
      $("key-cancel").onclick = () => done(null);
      dialog.oncancel = (e) => { e.preventDefault(); done(null); };
      dialog.showModal();
      input.focus();
    });
  }

  async function errorMessage(response) {
    if (response.moaMessage) return response.moaMessage;   // already read (a 401 whose key prompt was cancelled)
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) { /* not JSON: fall through */ }
    return `HTTP ${response.status} ${response.statusText}`;
  }

  /** fetch with the key; on a 401 ask for a key (saying why) and try again, until it works or the user cancels. */
  async function call(path, init) {
    for (;;) {
      const headers = { "Content-Type": "application/json" };
      if (state.key) headers.Authorization = "Bearer " + state.key;
      const response = await fetch(path, { ...init, headers });
      if (response.status !== 401) return response;
      const why = await errorMessage(response);
      const key = await askKey(state.key ? `The key was refused (${why}). Enter the right key.`
        : `This server needs an API key (${why}).`);
      if (!key) { response.moaMessage = why; return response; }
      state.key = key;
      sessionStorage.setItem(KEY_STORE, key);
    }
  }

  // -- the model picker ---------------------------------------------------------------------------------------------
  async function loadModels() {
    const select = $("model");
    let response;
    try {
      response = await call("v1/models", { method: "GET" });
    } catch (err) {
      setStatus(`Cannot reach the server: ${err.message}`);
      return;
    }
    if (!response.ok) {
      setStatus(`Cannot list the models: ${await errorMessage(response)}`);
      select.replaceChildren(el("option", null, "no models"));
      return;
    }
    const ids = (await response.json()).data.map((m) => m.id);
    state.recipe = ids[0] || null;
    select.replaceChildren();
    ids.forEach((id, i) => {
      const option = el("option", null, i === 0 ? `${id} (MoA recipe)` : `${id} (one model)`);
      option.value = id;
      select.append(option);
    });
    select.disabled = false;
    $("send").disabled = false;
    setStatus("");
  }

  // -- one answer: cards per role, layers as columns, the aggregator below ---------------------------------------
  function makeCard(role, model, cls) {
    const card = el("article", "card " + (cls || ""));
    card.dataset.state = "waiting";
    card.dataset.role = role;
    const head = el("header");
    head.append(el("strong", "role", role), el("span", "model muted", model || ""));
    const meta = el("div", "meta", "waiting");
    const err = el("div", "err");
    err.hidden = true;
    const text = el("div", "text");
    text.append(document.createTextNode(""));
    card.append(head, meta, err, text);
    return card;
  }
  const cardText = (card) => card.querySelector(".text").firstChild;

  function startCard(card, ev) {
    card.dataset.state = "running";
    if (ev.model) card.querySelector(".model").textContent = ev.model;
    // A proposer's retry starts its text over. The aggregator's text is the OpenAI content stream, which a client
    // never takes back, so a retry of the aggregator continues it.
    if (ev.attempt > 1 && !card.classList.contains("agg")) cardText(card).data = "";
    card.querySelector(".err").hidden = true;
    card.querySelector(".meta").textContent = ev.attempt > 1 ? `writing… (attempt ${ev.attempt})` : "writing…";
  }

  function finishCard(card, ev) {
    const u = ev.usage || {};
    card.dataset.state = ev.error ? "failed" : "done";
    const meta = card.querySelector(".meta");
    meta.replaceChildren(el("span", "tok", `${num(u.prompt_tokens)} → ${num(u.completion_tokens)} tok`),
      el("span", "sec", `${(ev.seconds || 0).toFixed(2)} s`));
    if (ev.attempts > 1) meta.append(el("span", "badge warn", `${ev.attempts} attempts`));
    if (ev.error) {
      const err = card.querySelector(".err");
      err.textContent = ev.error;
      err.hidden = false;
    }
  }

  class Turn {
    constructor(prompt, model) {
      this.root = el("section", "turn");
      this.root.dataset.state = "streaming";
      this.root.append(el("div", "msg user", prompt));
      this.answer = el("div", "answer");
      this.bar = el("div", "layers-bar");
      this.bar.hidden = true;
      this.fold = el("button", "fold", "▾ layers");
      this.fold.type = "button";
      this.fold.setAttribute("aria-expanded", "true");
      this.fold.addEventListener("click", () => this.setFolded(!this.folded));
      this.progress = el("span", "progress muted");
      this.bar.append(this.fold, this.progress);
      this.layers = el("div", "layers");
      this.layers.hidden = true;
      this.agg = makeCard(model, "", "agg");
      this.agg.querySelector(".text").classList.add("answer-text");
      this.note = el("div", "banner");
      this.note.hidden = true;
      this.answer.append(this.bar, this.layers, this.agg, this.note);
      this.root.append(this.answer);
      this.cards = new Map();   // "layer|role" -> card
      this.plan = null;
      this.done = 0;
      this.folded = false;
      this.setFolded($("fold-all").checked);
    }

    setFolded(folded) {
      this.folded = folded;
      this.layers.classList.toggle("folded", folded);
      this.fold.textContent = (folded ? "▸ layers" : "▾ layers") + (this.plan ? ` (${this.plan.layers} × ${this.plan.proposers.length} proposers)` : "");
      this.fold.setAttribute("aria-expanded", String(!folded));
    }

    column(layer) {
      let col = this.layers.querySelector(`.layer[data-layer="${layer}"]`);
      if (!col) {
        col = el("div", "layer");
        col.dataset.layer = layer;
        col.append(el("h4", null, `Layer ${layer}`));
        this.layers.append(col);
      }
      return col;
    }

    card(ev) {
      if (ev.aggregator || (this.plan && ev.layer > this.plan.layers)) return this.agg;
      const key = `${ev.layer}|${ev.role}`;
      if (!this.cards.has(key)) {          // a role the plan did not announce: show it anyway
        const card = makeCard(ev.role, ev.model, "");
        card.dataset.layer = ev.layer;
        this.column(ev.layer).append(card);
        this.cards.set(key, card);
        this.layers.hidden = this.bar.hidden = false;
      }
      return this.cards.get(key);
    }

    onPlan(ev) {
      this.plan = ev;
      for (let layer = 1; layer <= ev.layers; layer++) {
        for (const p of ev.proposers) this.card({ layer, role: p.role, model: p.model });
      }
      if (ev.aggregator) {
        const role = ev.aggregator.role;
        this.agg.querySelector(".role").textContent = role === "aggregator" ? role : `aggregator · ${role}`;
        this.agg.querySelector(".model").textContent = ev.aggregator.model;
      }
      this.layers.hidden = this.bar.hidden = false;
      this.setFolded(this.folded);
      this.showProgress();
    }

    showProgress() {
      if (!this.plan) return;
      const total = this.plan.layers * this.plan.proposers.length;
      const text = this.done < total
        ? `layer ${Math.min(this.plan.layers, 1 + Math.floor(this.done / this.plan.proposers.length))}/${this.plan.layers}: ${this.done}/${total} proposer answers done`
        : `all ${total} proposer answers done`;
      this.progress.textContent = text;
      setStatus(text);
    }

    onEvent(ev) {
      if (ev.type === "plan") return this.onPlan(ev);
      const card = this.card(ev);
      if (ev.type === "role.start") startCard(card, ev);
      else if (ev.type === "role.delta") { cardText(card).appendData(ev.delta || ""); keepBottom(); }
      else if (ev.type === "role.done") {
        finishCard(card, ev);
        if (card !== this.agg) { this.done += 1; this.showProgress(); }
      }
    }

    onContent(text) {
      if (this.agg.dataset.state === "waiting") {
        this.agg.dataset.state = "running";
        this.agg.querySelector(".meta").textContent = "writing…";
      }
      cardText(this.agg).appendData(text);
      keepBottom();
    }

    text() { return cardText(this.agg).data; }

    finish(stateName, message, cls) {
      this.root.dataset.state = stateName;
      if (this.agg.dataset.state === "running" || this.agg.dataset.state === "waiting") {
        this.agg.dataset.state = stateName === "done" ? "done" : "failed";
        if (stateName === "done" && this.agg.querySelector(".meta").textContent === "writing…") {
          this.agg.querySelector(".meta").textContent = "done";
        }
      }
      if (message) {
        this.note.textContent = message;
        this.note.className = "banner " + (cls || "bad");
        this.note.hidden = false;
      }
    }
  }

  // -- the stream ---------------------------------------------------------------------------------------------------
  /** Read an SSE body, calling onData with each event's data (a string). Resolves true after [DONE]. */
  async function readSSE(body, onData) {
    const reader = body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return true;
        onData(data);
      }
    }
  }

  async function send(prompt) {
    const model = $("model").value;
    const turn = new Turn(prompt, model);
    turns.push(turn);
    $("empty").hidden = true;
    $("log").append(turn.root);
    follow = true;
    keepBottom();
    const messages = [...state.history, { role: "user", content: prompt }];
    const controller = new AbortController();
    state.running = { controller, turn };
    setBusy(true);
    let failure = null, finish = null;
    try {
      const response = await call("v1/chat/completions", {
        method: "POST", signal: controller.signal,
        body: JSON.stringify({ model, messages, stream: true, moa_events: true }),
      });
      if (!response.ok) {
        const why = await errorMessage(response);
        const prefix = { 401: "API key refused", 404: "Unknown model", 429: "The server is busy; try again in a moment",
          400: "Bad request", 503: "An engine is down" }[response.status] || `Error ${response.status}`;
        failure = `${prefix}: ${why}`;
      } else {
        const complete = await readSSE(response.body, (data) => {
          let obj;
          try { obj = JSON.parse(data); } catch (_) { return; }
          if (obj.object === "moa.event") turn.onEvent(obj);
          else if (obj.error) failure = `The answer failed: ${obj.error.message || JSON.stringify(obj.error)}`;
          else if (obj.choices && obj.choices.length) {
            const choice = obj.choices[0];
            if (choice.delta && choice.delta.content) turn.onContent(choice.delta.content);
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        });
        if (!complete && !failure) failure = "The connection closed before the answer was complete.";
      }
    } catch (err) {
      failure = err.name === "AbortError" ? "stopped" : `Cannot reach the server: ${err.message}`;
    }
    state.running = null;
    setBusy(false);
    if (failure === "stopped") {
      turn.finish("stopped", "Stopped. This turn is left out of the conversation.", "warn");
      setStatus("stopped");
    } else if (failure) {
      turn.finish("failed", failure + " This turn is left out of the conversation.");
      setStatus("failed");
    } else {
      turn.finish("done", finish === "length" ? "The answer reached its token limit (finish_reason: length)." : null, "warn");
      state.history.push({ role: "user", content: prompt }, { role: "assistant", content: turn.text() });
      setStatus("");
    }
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("model").disabled = busy;
  }

  // -- wiring -------------------------------------------------------------------------------------------------------
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || state.running || $("send").disabled) return;
    $("prompt").value = "";
    send(prompt);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (state.running) state.running.controller.abort(); });
  $("new-chat").addEventListener("click", () => {
    if (state.running) state.running.controller.abort();
    state.history = [];
    for (const t of turns.splice(0)) t.root.remove();
    $("empty").hidden = false;
    setStatus("new conversation");
  });
  $("fold-all").addEventListener("change", (e) => {
    for (const t of turns) t.setFolded(e.target.checked);
  });
  loadModels();
})();

/* moa-local view: the report page's script. Reads the JSON in #moa-data (its shape is documented in
   moa_local/view/payload.py), shows the conversations as a virtual list (only the visible rows exist, so 10,000
   cost what 30 do), with search and filters, and one conversation's layers side by side.
   Every node is built with textContent: a model's text is never parsed as HTML. Fetches nothing. */
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("moa-data").textContent);
  const NAMES = D.names, CONVS = D.convs, EV = D.eval;
  const ROW_H = 54;           // px; fixed, so the list can place rows without measuring them
  const $ = (id) => document.getElementById(id);
  // A response: [role, model, text, error, prompt tokens, completion tokens, seconds, attempts, sim,
  //              (only when its references were trimmed) [characters before, after, trimmed tries]]
  const ROLE = 0, MODEL = 1, TEXT = 2, ERR = 3, PT = 4, CT = 5, SEC = 6, ATT = 7, SIM = 8, TRIM = 9;
  // A trace: [label, output (true: the aggregator's text), error, layers, aggregator]
  const LABEL = 0, OUT = 1, TERR = 2, LAYERS = 3, AGG = 4;

  const state = { query: "", terms: [], filter: "all", view: [], sel: -1 };

  // -- small helpers --------------------------------------------------------------------------------------------
  function el(tag, cls, text) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined && text !== null) n.textContent = String(text);
    return n;
  }
  const num = (n) => Number(n || 0).toLocaleString("en-US");
  const secs = (s) => (s == null ? "—" : (s < 10 ? s.toFixed(2) : s.toFixed(1)) + " s");
  const sim = (x) => (x == null ? "—" : x.toFixed(2));
  const score = (x) => (x == null ? "—" : EV && EV.percent ? (100 * x).toFixed(1) + "%" : x.toFixed(2));
  const diff = (x) => (x >= 0 ? "+" : "") + (EV && EV.percent ? (100 * x).toFixed(1) + " pp" : x.toFixed(2));
  const outputOf = (t) => (t[OUT] === true ? t[AGG][TEXT] : t[OUT]);

  function answer(c) {
    if (c.t && c.t.length) return outputOf(c.t[0]);
    if (c.o != null) return c.o;
    if (c.a) for (const a of c.a) if (a && a.length && a[0]) return a[0];
    return null;
  }

  /** Put ``text`` into ``node``, wrapping the search terms in <mark> (text nodes only, never HTML). */
  function fill(node, text, terms) {
    text = text == null ? "" : String(text);
    if (!terms.length || !text) { node.textContent = text; return node; }
    const re = new RegExp(terms.map((t) => t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("|"), "gi");
    let at = 0;
    for (const m of text.matchAll(re)) {
      if (m.index > at) node.append(text.slice(at, m.index));
      node.append(el("mark", null, m[0]));
      at = m.index + m[0].length;
    }
    if (at < text.length) node.append(text.slice(at));
    return node;
  }

  // -- search and filters ---------------------------------------------------------------------------------------
  let hay = null;  // lower-cased text of each conversation, built on the first search
  function haystacks() {
    if (hay) return hay;
    hay = CONVS.map((c) => {
      const parts = [c.i, c.p, c.o, c.e];
      for (const t of c.t || []) {
        parts.push(t[OUT] === true ? null : t[OUT], t[TERR]);
        for (const layer of t[LAYERS]) for (const r of layer) parts.push(r[TEXT], r[ERR]);
        if (t[AGG]) parts.push(t[AGG][TEXT], t[AGG][ERR]);
      }
      for (const a of c.a || []) if (a) parts.push(...a);
      return parts.filter((p) => p != null).join("\n").toLowerCase();
    });
    return hay;
  }

  const hasMoa = EV && EV.systems.some((s) => s.name === "moa") && EV.best != null;
  const FILTERS = [
    ["all", "All", () => true],
    ["failed", "Failed", (c) => c.f === 2],
    ["partial", "A role failed", (c) => c.f === 1],
  ].concat(hasMoa ? [
    ["won", "MoA won", (c) => c.w === 1],
    ["lost", "MoA lost", (c) => c.w === -1],
    ["tie", "Tie", (c) => c.w === 0],
  ] : []);

  function applyView() {
    const test = FILTERS.find((f) => f[0] === state.filter)[2];
    const terms = state.terms;
    const h = terms.length ? haystacks() : null;
    const view = [];
    let exact = -1;
    for (let i = 0; i < CONVS.length; i++) {
      const c = CONVS[i];
      if (!test(c)) continue;
      if (h && !terms.every((t) => h[i].includes(t))) continue;
      if (state.query && c.i.toLowerCase() === state.query) exact = i; else view.push(i);
    }
    if (exact >= 0) view.unshift(exact);   // an id typed in full comes first
    state.view = view;
    $("count").textContent = `${num(view.length)} of ${num(CONVS.length)}`;
    $("count").dataset.query = state.query;   // which search the count belongs to (the search box is debounced)
    $("spacer").style.height = view.length * ROW_H + "px";
    $("list").scrollTop = 0;
    renderRows();
  }

  function renderFilters() {
    const box = $("filters");
    box.replaceChildren();
    for (const [key, label, test] of FILTERS) {
      const n = key === "all" ? CONVS.length : CONVS.reduce((k, c) => k + (test(c) ? 1 : 0), 0);
      const b = el("button", "chip" + (key === state.filter ? " on" : ""), `${label} ${num(n)}`);
      b.dataset.filter = key;
      b.addEventListener("click", () => { state.filter = key; renderFilters(); applyView(); });
      box.append(b);
    }
  }

  // -- the virtual list -----------------------------------------------------------------------------------------
  function badge(text, cls, title) {
    const b = el("span", "badge " + cls, text);
    if (title) b.title = title;
    return b;
  }

  function statusBadges(c) {
    const out = [];
    if (c.f === 2) out.push(badge("failed", "bad"));
    else if (c.f === 1) out.push(badge("role failed", "warn"));
    if (c.w === 1) out.push(badge("MoA won", "good"));
    else if (c.w === -1) out.push(badge("MoA lost", "bad"));
    return out;
  }

  function renderRows() {
    const list = $("list"), rows = $("rows");
    const first = Math.max(0, Math.floor(list.scrollTop / ROW_H) - 8);
    const last = Math.min(state.view.length, Math.ceil((list.scrollTop + list.clientHeight) / ROW_H) + 8);
    const frag = document.createDocumentFragment();
    for (let k = first; k < last; k++) {
      const idx = state.view[k], c = CONVS[idx];
      const row = el("div", "row" + (idx === state.sel ? " sel" : "") + (c.f === 2 ? " failed" : ""));
      row.dataset.idx = idx;
      const head = el("div", "row-head");
      head.append(el("span", "row-id", c.i), ...statusBadges(c));
      const snippet = (c.p || answer(c) || c.e || "").slice(0, 160).replace(/\s+/g, " ");
      row.append(head, el("div", "row-text", snippet));
      frag.append(row);
    }
    rows.style.transform = `translateY(${first * ROW_H}px)`;
    rows.replaceChildren(frag);
  }

  function select(idx, scroll) {
    state.sel = idx;
    if (scroll) {
      const k = state.view.indexOf(idx), list = $("list");
      if (k >= 0 && (k * ROW_H < list.scrollTop || (k + 1) * ROW_H > list.scrollTop + list.clientHeight)) {
        list.scrollTop = Math.max(0, k * ROW_H - list.clientHeight / 2);
      }
    }
    renderRows();
    renderDetail(idx);
    history.replaceState(null, "", idx >= 0 ? "#" + encodeURIComponent(CONVS[idx].i) : "#");
  }

  // -- one conversation -----------------------------------------------------------------------------------------
  function card(r, opts) {
    const c = el("article", "card" + (r[ERR] != null ? " failed" : "") + (opts.closest ? " closest" : "")
      + (opts.aggregator ? " agg" : ""));
    const head = el("header");
    head.append(el("strong", "role", NAMES[r[ROLE]]), el("span", "muted model", NAMES[r[MODEL]]));
    c.append(head);
    const meta = el("div", "meta");
    meta.append(el("span", "tok", `${num(r[PT])} → ${num(r[CT])} tok`), el("span", "sec", secs(r[SEC])));
    if (r[ATT] > 1) meta.append(badge(`${r[ATT]} attempts`, "warn"));
    if (r[TRIM]) meta.append(badge(`references trimmed ${num(r[TRIM][0])} → ${num(r[TRIM][1])} chars`, "warn",
      `too long for the engine's context: the longest references cut, heads kept (${r[TRIM][2]} trimmed tries)`));
    if (!opts.aggregator && r[SIM] != null) {
      const a = el("span", "agree", `agreement ${sim(r[SIM])}`);
      a.title = "mean word similarity to the other proposers of this layer";
      meta.append(a);
    }
    if (opts.closest) meta.append(badge("closest to the answer", "good", "the aggregator's answer is most similar to this reference"));
    c.append(meta);
    if (opts.aggregator && Array.isArray(r[SIM]) && opts.refs) {
      const sims = el("div", "sims");
      r[SIM].forEach((s, j) => {
        const ref = opts.refs[j];
        const item = el("span", j === opts.closestIdx ? "ref best" : "ref", `${NAMES[ref[ROLE]]} ${sim(s)}`);
        sims.append(item);
      });
      const lead = el("span", "muted", "similarity to each reference: ");
      sims.prepend(lead);
      c.append(sims);
    }
    if (r[ERR] != null) c.append(fill(el("div", "err"), r[ERR], state.terms));
    c.append(fill(el("div", "text"), r[TEXT] ?? "", state.terms));
    return c;
  }

  function renderTrace(t) {
    const sec = el("section", "trace");
    sec.append(el("h3", null, t[LABEL]));
    if (t[TERR] != null) sec.append(fill(el("div", "banner bad"), "Failed: " + t[TERR], state.terms));
    const layers = t[LAYERS], agg = t[AGG];
    const lastRefs = layers.length ? layers[layers.length - 1] : [];
    let closestIdx = -1;
    if (agg && Array.isArray(agg[SIM])) {
      agg[SIM].forEach((s, j) => { if (s != null && (closestIdx < 0 || s > agg[SIM][closestIdx])) closestIdx = j; });
    }
    const grid = el("div", "layers");
    layers.forEach((layer, k) => {
      const col = el("div", "layer");
      col.append(el("h4", null, `Layer ${k + 1}`));
      layer.forEach((r, j) => col.append(card(r, { closest: k === layers.length - 1 && j === closestIdx })));
      grid.append(col);
    });
    sec.append(grid);
    if (agg) {
      const box = el("div", "agg-box");
      box.append(el("h4", null, "Aggregator"));
      if (closestIdx >= 0) {
        box.append(el("p", "muted closest-line",
          `Closest reference: ${NAMES[lastRefs[closestIdx][ROLE]]} (similarity ${sim(agg[SIM][closestIdx])})`));
      }
      box.append(card(agg, { aggregator: true, refs: lastRefs, closestIdx }));
      sec.append(box);
    }
    if (t[OUT] !== true && t[OUT] != null) {
      sec.append(el("h4", null, "Final output"), fill(el("div", "text output"), t[OUT], state.terms));
    }
    return sec;
  }

  function renderEvalItem(c, box) {
    const best = EV.best != null ? EV.systems[EV.best] : null;
    if (c.w != null && best) {
      const moa = c.sc[EV.systems.findIndex((s) => s.name === "moa")];
      const words = c.w === 1 ? "MoA won" : c.w === -1 ? "MoA lost" : "Tie";
      box.append(el("div", "banner " + (c.w === 1 ? "good" : c.w === -1 ? "bad" : ""),
        `${words} against the best single system (${best.name}): ${score(moa)} vs ${score(c.sc[EV.best])}`));
    }
    const table = el("table", "scores");
    const head = el("tr");
    for (const h of ["system", "score", "answer"]) head.append(el("th", null, h));
    table.append(head);
    EV.systems.forEach((s, j) => {
      const tr = el("tr", j === EV.best ? "best" : s.name === "moa" ? "moa" : "");
      tr.append(el("td", null, s.name + (j === EV.best ? " (best single)" : "")), el("td", "num", score(c.sc[j])));
      const td = el("td");
      const answers = (c.a[j] || []).filter((a) => a != null);
      if (answers.length) {
        const det = el("details");
        det.append(el("summary", null, answers.join(" ⏎ ").slice(0, 120).replace(/\s+/g, " ")),
          fill(el("div", "text"), answers.join("\n\n— next turn —\n\n"), state.terms));
        td.append(det);
      } else td.append(el("span", "muted", "no answer"));
      tr.append(td);
      table.append(tr);
    });
    box.append(table);
  }

  function renderDetail(idx) {
    const box = $("detail");
    box.replaceChildren();
    box.scrollTop = 0;
    if (idx < 0) { renderOverview(box); return; }
    const c = CONVS[idx];
    const back = el("button", "link", "← overview");
    back.addEventListener("click", () => select(-1));
    const title = el("h2");
    title.append(el("span", null, c.i), ...statusBadges(c));
    box.append(back, title);
    box.append(el("p", "muted", `${num(c.u[0])} prompt · ${num(c.u[1])} completion tokens`
      + (c.s != null ? ` · ${secs(c.s)}` : "")));
    if (c.e != null) box.append(fill(el("div", "banner bad"), "Failed: " + c.e, state.terms));
    if (c.p != null) {
      const det = el("details", "prompt");
      det.open = true;
      det.append(el("summary", null, "Prompt"), fill(el("div", "text"), c.p, state.terms));
      box.append(det);
    }
    if (EV) renderEvalItem(c, box);
    if (c.o != null) box.append(el("h4", null, "Output"), fill(el("div", "text output"), c.o, state.terms));
    for (const t of c.t || []) box.append(renderTrace(t));
    if (c.t && c.t.length) box.append(el("p", "muted foot", D.similarity));
  }

  function table(headers, rows, cls) {
    const t = el("table", cls);
    const tr = el("tr");
    for (const h of headers) tr.append(el("th", null, h));
    t.append(tr);
    for (const r of rows) {
      const row = el("tr", r.cls || "");
      for (const v of r.cells) row.append(el("td", /^([-+]?[\d.,]+(%| s| pp)?|—)$/.test(v) ? "num" : null, v));
      t.append(row);
    }
    return t;
  }

  function renderOverview(box) {
    box.append(el("h2", null, "Overview"));
    const kinds = { batch: "batch output", trace: "trace file", eval: "eval folder" };
    const failed = CONVS.reduce((k, c) => k + (c.f === 2 ? 1 : 0), 0);
    const partial = CONVS.reduce((k, c) => k + (c.f === 1 ? 1 : 0), 0);
    box.append(el("p", null, `${kinds[D.kind]} ${D.path}: ${num(CONVS.length)} conversations, `
      + `${num(failed)} failed, ${num(partial)} with a failed role.`));
    if (D.notes.length) {
      const ul = el("ul", "notes");
      for (const n of D.notes) ul.append(el("li", null, n));
      box.append(ul);
    }
    if (EV) {
      box.append(el("h3", null, `${EV.suite}: ${EV.metric}`));
      box.append(table(["system", "model", "score", "95% CI", "scored / items", "failed"], EV.systems.map((s, j) => ({
        cls: j === EV.best ? "best" : s.name === "moa" ? "moa" : "",
        cells: [s.name + (j === EV.best ? " (best single)" : ""), s.model, score(s.mean),
          s.mean == null ? "—" : `[${score(s.low)}, ${score(s.high)}]`, `${s.n || 0} / ${s.items}`, num(s.failed)],
      })), "scores"));
      if (EV.comparisons.length) {
        box.append(table(["paired comparison", "difference", "95% CI", "items", "P(≤ 0)"], EV.comparisons.map((c) => ({
          cells: [c.label, c.mean == null ? "—" : diff(c.mean), c.mean == null ? "—" : `[${diff(c.low)}, ${diff(c.high)}]`,
            num(c.n), c.p_not_better == null ? "—" : c.p_not_better.toFixed(3)],
        })), "scores"));
      }
      if (hasMoa) box.append(el("p", "muted", "Use the filters “MoA won” / “MoA lost” for the items where MoA scored above or below the best single system, with their traces."));
    }
    if (D.roles.length) {
      box.append(el("h3", null, "Per role"));
      box.append(table(["trace", "role", "model", "calls", "failed", "retried", "prompt tok", "completion tok",
        "tok / call", "seconds", "s / call", "agreement", "closest to the answer"], D.roles.map((r) => ({
        cls: r.failed ? "warnrow" : "",
        cells: [r.label, r.agg ? r.role + " (aggregator)" : r.role, r.model, num(r.calls), num(r.failed), num(r.retried),
          num(r.pt), num(r.ct), num(Math.round(r.ct / Math.max(1, r.calls))), secs(r.s), secs(r.s / Math.max(1, r.calls)),
          r.agg ? "—" : sim(r.agree), r.agg ? "—" : num(r.closest)],
      })), "roles"));
      box.append(el("p", "muted", "Agreement: the role's mean similarity to the other proposers of its layer. "
        + "Closest to the answer: how often the aggregator's answer was most similar to this role's last-layer answer."));
    }
    box.append(el("p", "muted foot", D.similarity));
  }

  // -- wiring ---------------------------------------------------------------------------------------------------
  let timer = 0;
  $("search").addEventListener("input", (e) => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      state.query = e.target.value.trim().toLowerCase();
      state.terms = state.query.split(/\s+/).filter(Boolean);
      applyView();
      if (state.sel >= 0) renderDetail(state.sel);
    }, 120);
  });
  $("rows").addEventListener("click", (e) => {
    const row = e.target.closest(".row");
    if (row) select(Number(row.dataset.idx));
  });
  let ticking = false;
  $("list").addEventListener("scroll", () => {
    if (ticking) return;
    ticking = true;
    requestAnimationFrame(() => { ticking = false; renderRows(); });
  });
  $("list").addEventListener("keydown", (e) => {
    if (e.key !== "ArrowDown" && e.key !== "ArrowUp") return;
    e.preventDefault();
    const k = state.view.indexOf(state.sel) + (e.key === "ArrowDown" ? 1 : -1);
    if (k >= 0 && k < state.view.length) select(state.view[k], true);
  });
  window.addEventListener("resize", renderRows);

  $("source").textContent = `${D.path} · ${num(CONVS.length)} conversations`;
  renderFilters();
  applyView();
  const wanted = decodeURIComponent(location.hash.slice(1));
  const start = wanted ? CONVS.findIndex((c) => c.i === wanted) : -1;
  select(start, true);
  $("search").disabled = false;
  document.documentElement.dataset.ready = "1";
  window.moaViewReadyAt = performance.now();
})();

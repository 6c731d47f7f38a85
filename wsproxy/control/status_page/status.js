// The wsproxy status page: polls the admin API and keeps the page in step with it.
//
// Every second: GET /status (JSON: listeners, routes, pools, backends, reloads,
// the process totals and, with workers > 1, each worker; the page does not read /metrics). Rates are the
// difference of two successive counter values over the time between them;
// sparklines are the last HISTORY values of a backend's open sessions.
//
// The DOM is built once per pool and backend and then only updated, so that a
// focused button keeps its focus while the numbers change under it. Changes of
// state (a backend going from up to draining, the API becoming unreachable)
// are written to the "Recent events" list and to an aria-live region.
//
// The admin token, when the listener asks for one (401), is kept in the
// variable `token` below and nowhere else: not in storage, not in a cookie.
// It is sent as "Authorization: Bearer ..." and forgotten when the tab goes.
"use strict";

(() => {
  const POLL_MS = 1000;
  const HISTORY = 60; // polls kept per sparkline
  const REQUEST_TIMEOUT_MS = 4000;
  const MAX_EVENTS = 30;
  const SVG = "http://www.w3.org/2000/svg";

  let token = null; // the admin token, in this tab's memory only
  let waitingForToken = false; // polling pauses while the token form is up
  let connected = null; // null before the first answer, then true/false
  let lastOk = null; // Date of the last good poll
  let previous = null; // {at, totals, backends: Map key → counters}: the last sample, for rates
  let pending = null; // the poll in flight, shared by whoever asks for one
  const history = new Map(); // backend key → [open sessions, oldest first]
  const totalHistory = [];
  const displayed = new Map(); // backend key → the state last shown, for change events
  const pools = new Map(); // pool name → {section, tbody, table, rows: Map address → row}
  let listenersJson = "";
  let routesJson = "";

  const $ = (id) => document.getElementById(id);

  // -- formatting ------------------------------------------------------------------------

  function fmtInt(n) {
    return typeof n === "number" && Number.isFinite(n) ? Math.round(n).toLocaleString("en-US") : "–";
  }

  function fmtBytes(n) {
    if (typeof n !== "number" || !Number.isFinite(n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return i === 0 ? `${Math.round(n)} B` : `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
  }

  function fmtRate(n) {
    if (typeof n !== "number" || !Number.isFinite(n)) return "–";
    return n < 10 ? n.toFixed(1) : fmtInt(n);
  }

  function fmtTime(date) {
    const pad = (v) => String(v).padStart(2, "0");
    return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
  }

  function fmtWhen(unix) {
    const date = new Date(unix * 1000);
    const ago = Math.max(0, Date.now() / 1000 - unix);
    let rel;
    if (ago < 60) rel = `${Math.round(ago)} s ago`;
    else if (ago < 3600) rel = `${Math.round(ago / 60)} min ago`;
    else if (ago < 86400) rel = `${(ago / 3600).toFixed(1)} h ago`;
    else rel = `${(ago / 86400).toFixed(1)} days ago`;
    const day = date.toDateString() === new Date().toDateString() ? "" : `${date.toISOString().slice(0, 10)} `;
    return `${day}${fmtTime(date)} (${rel})`;
  }

  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  function el(tag, attrs = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  // -- events and announcements ----------------------------------------------------------

  let announcing = [];

  // Messages of one poll are read together; the region is emptied first, so that
  // the same message twice in a row is read twice.
  function announce(message) {
    announcing.push(message);
    if (announcing.length > 1) return;
    const region = $("announcer");
    region.textContent = "";
    window.setTimeout(() => {
      region.textContent = announcing.join(" ");
      announcing = [];
    }, 50);
  }

  function event(message, kind = "info") {
    const list = $("events");
    const placeholder = list.querySelector(".empty");
    if (placeholder) placeholder.remove();
    const item = el("li", { class: `event event-${kind}` }, [
      el("time", { text: fmtTime(new Date()) }),
      document.createTextNode(" " + message),
    ]);
    list.prepend(item);
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
    announce(message);
  }

  // -- talking to the admin API ----------------------------------------------------------

  class NeedToken extends Error {}

  async function api(path, init = {}) {
    const headers = new Headers(init.headers || {});
    if (token !== null) headers.set("Authorization", `Bearer ${token}`);
    const sent = token;
    const response = await fetch(path, {
      ...init,
      headers,
      cache: "no-store",
      credentials: "omit",
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
    if (response.status === 401) throw new NeedToken(sent === null ? "required" : "refused");
    return response;
  }

  function refresh() {
    if (pending === null) {
      pending = poll().finally(() => {
        pending = null;
      });
    }
    return pending;
  }

  async function poll() {
    if (waitingForToken) return;
    let status;
    try {
      const response = await api("/status");
      if (!response.ok) throw new Error(`/status answered ${response.status} ${response.statusText}`.trim());
      status = await response.json();
    } catch (err) {
      if (err instanceof NeedToken) askForToken(err.message);
      else disconnected(err);
      return;
    }
    if (connected !== true) reconnected();
    tokenAccepted();
    render(status);
  }

  async function loop() {
    const started = performance.now();
    await refresh();
    const wait = Math.max(200, POLL_MS - (performance.now() - started));
    window.setTimeout(loop, wait);
  }

  // -- connection state ------------------------------------------------------------------

  function setConn(state, text) {
    const conn = $("conn");
    conn.dataset.conn = state;
    setText($("conn-text"), text);
  }

  function disconnected(err) {
    const why = err && err.name === "TimeoutError" ? `no answer within ${REQUEST_TIMEOUT_MS / 1000} s` : (err && err.message) || String(err);
    const since = lastOk ? ` Last update at ${fmtTime(lastOk)}.` : "";
    setText($("banner-text"), `The admin API cannot be reached (${why}); retrying every second.${since}`);
    $("banner").hidden = false;
    document.body.classList.add("stale");
    setConn("down", "disconnected");
    if (connected !== false) {
      if (connected === true) event("Disconnected from the admin API.", "error");
      connected = false;
    }
  }

  function reconnected() {
    $("banner").hidden = true;
    document.body.classList.remove("stale");
    setConn("up", "live");
    if (connected === false) event("Connected to the admin API again.");
    connected = true;
  }

  // -- the token -------------------------------------------------------------------------

  function askForToken(reason) {
    const form = $("token-form");
    const error = $("token-error");
    const wasHidden = form.hidden;
    waitingForToken = true;
    token = null;
    form.hidden = false;
    setConn("auth", "token needed");
    if (reason === "refused") {
      error.textContent = "That token was refused (401 from the admin API). Check it and try again.";
      error.hidden = false;
      announce(error.textContent);
    } else if (reason === "action") {
      error.textContent = "This action needs the admin token. Enter it, then press the button again.";
      error.hidden = false;
      announce(error.textContent);
    } else {
      error.hidden = true;
      announce("The admin API asks for a token. Enter it in the form.");
    }
    if (wasHidden || reason !== "required") $("token-input").focus();
  }

  function tokenAccepted() {
    const form = $("token-form");
    if (form.hidden) return;
    const hadFocus = form.contains(document.activeElement);
    form.hidden = true;
    $("token-error").hidden = true;
    event("Token accepted.");
    if (hadFocus) $("pools-title").focus();
  }

  function submitToken(ev) {
    ev.preventDefault();
    const input = $("token-input");
    const value = input.value.trim();
    if (!value) {
      const error = $("token-error");
      error.textContent = "Enter the token first.";
      error.hidden = false;
      input.focus();
      return;
    }
    token = value;
    input.value = ""; // the variable is the only copy
    waitingForToken = false;
    refresh();
  }

  // -- rendering -------------------------------------------------------------------------

  function displayState(backend) {
    if (backend.draining) return "draining";
    if (backend.ejected) return "ejected";
    return backend.health || "unknown";
  }

  function render(status) {
    const now = new Date();
    lastOk = now;
    setText($("updated"), fmtTime(now));
    renderHeader(status);
    const sample = { at: performance.now(), totals: totalsOf(status), backends: new Map() };
    const dt = previous ? (sample.at - previous.at) / 1000 : null;
    renderTotals(status, sample, dt);
    renderWorkers(status.workers);
    renderPools(status, sample, dt);
    renderListeners(status.listeners || []);
    renderRoutes(status.routes || []);
    previous = sample;
  }

  function renderHeader(status) {
    setText($("generation"), fmtInt(status.generation));
    let reload = "never";
    if (typeof status.last_reload_unix === "number") reload = fmtWhen(status.last_reload_unix);
    else if (typeof status.started_unix === "number") reload = `never; started ${fmtWhen(status.started_unix)}`;
    setText($("last-reload"), reload);
    // "reloads" counts attempts, failed ones included: "3 (1 failed)" is two applied, one refused.
    const failures = status.reload_failures || 0;
    setText($("reloads"), `${fmtInt(status.reloads || 0)}${failures ? ` (${fmtInt(failures)} failed)` : ""}`);
    // After an upgrade (workers > 1): the old generation, until its last session ends or upgrade.timeout closes it.
    const retiring = status.retiring;
    $("retiring-fact").hidden = !retiring;
    if (retiring) {
      const until = new Date(retiring.deadline_unix * 1000);
      setText($("retiring"), `pid ${retiring.pid}: ${fmtInt(retiring.sessions)} session${retiring.sessions === 1 ? "" : "s"} until ${fmtTime(until)} at most`);
    }
    const box = $("reload-error");
    if (status.last_reload_error) {
      setText($("reload-error-text"), status.last_reload_error);
      if (box.hidden) event("The last reload failed: " + status.last_reload_error, "error");
      box.hidden = false;
    } else {
      box.hidden = true;
    }
  }

  // Live counters: what ended sessions relayed plus what open ones have relayed so far.
  function totalsOf(status) {
    const pick = (key) => (typeof status[key] === "number" ? status[key] : null);
    return {
      bytesUp: pick("bytes_up"),
      bytesDown: pick("bytes_down"),
      msgsUp: pick("messages_up"),
      msgsDown: pick("messages_down"),
    };
  }

  function rate(now, before, dt) {
    if (dt === null || dt <= 0 || typeof now !== "number" || typeof before !== "number" || now < before) return null;
    return (now - before) / dt;
  }

  function renderTotals(status, sample, dt) {
    const t = sample.totals;
    const p = previous ? previous.totals : {};
    setText($("t-sessions"), fmtInt(status.sessions));
    setText($("t-draining"), fmtInt(status.draining_sessions));
    setText($("t-connections"), fmtInt(status.connections));
    setText($("t-ended"), typeof status.sessions_closed === "number" ? fmtInt(status.sessions_closed) : "–");
    setText($("t-refused"), typeof status.refused === "number" ? fmtInt(status.refused) : "–");
    $("t-refused").title = Object.entries(status.refused_by_reason || {})
      .map(([reason, n]) => `${reason}: ${n}`)
      .join("\n");
    setText($("t-msg-rate"), `${fmtRate(rate(t.msgsUp, p.msgsUp, dt))} · ${fmtRate(rate(t.msgsDown, p.msgsDown, dt))}`);
    setText(
      $("t-byte-rate"),
      `${fmtBytes(rate(t.bytesUp, p.bytesUp, dt))} · ${fmtBytes(rate(t.bytesDown, p.bytesDown, dt))}`,
    );
    setText($("t-bytes"), `${fmtBytes(t.bytesUp)} · ${fmtBytes(t.bytesDown)}`);
    totalHistory.push(status.sessions || 0);
    if (totalHistory.length > HISTORY) totalHistory.shift();
    drawSparkline($("t-spark"), totalHistory, "Open sessions");
  }

  const COLUMNS = [
    ["addr", "Backend"],
    ["state", "State"],
    ["check", "Last check"],
    ["rtt", "Check RTT"],
    ["active", "Open"],
    ["spark", "Open sessions, last 60 s"],
    ["rate msgs", "Msg/s up · down"],
    ["rate bytes", "Bytes/s up · down"],
    ["total", "Sessions"],
    ["actions", "Actions"],
  ];

  function poolView(name, balance) {
    let view = pools.get(name);
    if (view) {
      setText(view.balance, balance || "");
      return view;
    }
    const headId = `pool-${pools.size}-title`;
    const balanceEl = el("span", { class: "balance", text: balance || "" });
    const title = el("h3", { id: headId }, [el("span", { class: "pool-name", text: name }), " ", balanceEl]);
    const headRow = el(
      "tr",
      { role: "row" },
      COLUMNS.map(([cls, label]) => el("th", { scope: "col", role: "columnheader", class: cls, text: label })),
    );
    const tbody = el("tbody", { role: "rowgroup" });
    const table = el("table", { class: "backends no-rates", role: "table", "aria-labelledby": headId }, [
      el("thead", { role: "rowgroup" }, [headRow]),
      tbody,
    ]);
    // Shown while no backend of the pool can take a session: its clients get 503.
    const warning = el("p", { class: "pool-warning", role: "status", hidden: "" });
    const section = el("section", { class: "pool", "data-pool": name, "aria-labelledby": headId }, [title, warning, table]);
    view = { section, table, tbody, warning, balance: balanceEl, rows: new Map() };
    pools.set(name, view);
    return view;
  }

  function backendRow(pool, address, name) {
    const cells = {};
    const tds = COLUMNS.map(([cls, label]) => {
      const td = el("td", { class: cls, role: "cell", "data-label": label });
      cells[cls.split(" ").pop()] = td;
      return td;
    });
    const addr = el("code", { class: "address", text: address });
    const weight = el("span", { class: "sub" });
    if (name) cells.addr.append(el("span", { class: "backend-name", text: name }), " ");
    cells.addr.append(addr, " ", weight);
    const label = name ? `${name} (${address})` : address;
    const badge = el("span", { class: "badge state-badge" });
    const health = el("span", { class: "sub" });
    cells.state.append(badge, " ", health);
    const drain = el("button", {
      type: "button",
      class: "drain",
      "aria-label": `Drain ${label} in pool ${pool}`,
      text: "Drain",
    });
    const undrain = el("button", {
      type: "button",
      class: "undrain",
      "aria-label": `Undrain ${label} in pool ${pool}`,
      text: "Undrain",
    });
    drain.addEventListener("click", () => act(pool, address, "drain", drain, undrain));
    undrain.addEventListener("click", () => act(pool, address, "undrain", undrain, drain));
    cells.actions.append(el("div", { class: "buttons" }, [drain, undrain]));
    const tr = el("tr", { role: "row", "data-backend": address, "data-state": "unknown" }, tds);
    return { tr, cells, badge, health, weight, drain, undrain, name: name || "" };
  }

  function renderPools(status, sample, dt) {
    const container = $("pools");
    const names = Object.keys(status.pools || {});
    const placeholder = container.querySelector(".empty");
    if (placeholder && names.length) placeholder.remove();
    let anyRates = false;
    const seen = new Set();
    names.forEach((name, index) => {
      const pool = status.pools[name];
      const view = poolView(name, pool.balance);
      seen.add(name);
      if (container.children[index] !== view.section) container.insertBefore(view.section, container.children[index] || null);
      const addresses = new Set();
      (pool.backends || []).concat(pool.removed || []).forEach((backend, i) => {
        addresses.add(backend.address);
        let row = view.rows.get(backend.address);
        if (row && row.name !== (backend.name || "")) {  // renamed by a reload: build the row anew
          row.tr.remove();
          row = undefined;
        }
        if (!row) {
          row = backendRow(name, backend.address, backend.name);
          view.rows.set(backend.address, row);
        }
        if (view.tbody.children[i] !== row.tr) view.tbody.insertBefore(row.tr, view.tbody.children[i] || null);
        if (updateRow(name, backend, row, sample, dt)) anyRates = true;
      });
      const none = (pool.backends || []).length > 0 && pool.available === 0;
      view.section.classList.toggle("unavailable", none);
      if (none !== !view.warning.hidden) {
        view.warning.hidden = !none;
        setText(view.warning, none ? `No backend of pool ${name} is available: its clients get 503 until one is up and not draining.` : "");
        if (none) event(`Pool ${name}: no backend available (clients get 503).`, "error");
      }
      for (const [address, row] of view.rows) {
        if (!addresses.has(address)) {
          row.tr.remove();
          view.rows.delete(address);
          history.delete(`${name}\u0000${address}`);
          displayed.delete(`${name}\u0000${address}`);
          event(`${name} ${address}: left the pool.`);
        }
      }
    });
    for (const [name, view] of pools) {
      if (!seen.has(name)) {
        view.section.remove();
        pools.delete(name);
        event(`Pool ${name} is gone (reload).`);
      }
    }
    for (const view of pools.values()) view.table.classList.toggle("no-rates", !anyRates);
  }

  // Update one backend's row; true if /status gave it live byte and message counters.
  function updateRow(pool, b, row, sample, dt) {
    const key = `${pool}\u0000${b.address}`;
    const state = displayState(b);
    const before = displayed.get(key);
    if (before !== undefined && before !== state) event(`${pool} ${b.address}: ${before} → ${state}.`, state === "up" ? "info" : "warn");
    displayed.set(key, state);
    row.tr.dataset.state = state;
    row.tr.dataset.health = b.health || "unknown";
    row.badge.className = `badge state-badge state-${state}`;
    setText(row.badge, state);
    setText(row.health, state === b.health ? "" : `health ${b.health}`);
    const notes = [];
    if (typeof b.weight === "number" && b.weight !== 1) notes.push(`weight ${b.weight}`);
    if (b.source === "dns") notes.push(b.priority ? `dns, priority ${b.priority}` : "dns");
    if (b.removed) notes.push("left the pool");
    setText(row.weight, notes.join(" · "));

    const check = b.last_check ? b.last_check : "none yet";
    setText(row.cells.check, check);
    row.cells.check.classList.toggle("bad", Boolean(b.last_check) && b.last_check !== "ok");
    setText(row.cells.rtt, typeof b.rtt_s === "number" ? `${(b.rtt_s * 1000).toFixed(b.rtt_s < 0.01 ? 2 : 1)} ms` : "–");
    setText(row.cells.active, fmtInt(b.active));
    setText(row.cells.total, fmtInt(b.total));

    const series = history.get(key) || [];
    series.push(typeof b.active === "number" ? b.active : 0);
    if (series.length > HISTORY) series.shift();
    history.set(key, series);
    drawSparkline(row.cells.spark, series, `Open sessions on ${b.address}`);

    const live = ["bytes_up", "bytes_down", "messages_up", "messages_down"].every((k) => typeof b[k] === "number");
    const counters = live ? { bu: b.bytes_up, bd: b.bytes_down, mu: b.messages_up, md: b.messages_down } : null;
    sample.backends.set(key, counters);
    const old = previous && previous.backends.get(key);
    if (live) {
      const r = (k) => (old ? rate(counters[k], old[k], dt) : null);
      setText(row.cells.msgs, `${fmtRate(r("mu"))} · ${fmtRate(r("md"))}`);
      setText(row.cells.bytes, `${fmtBytes(r("bu"))} · ${fmtBytes(r("bd"))}`);
    }
    // Only the action that changes something is enabled. Focus on a button about to be
    // disabled moves to its counterpart, so a keyboard user stays in the row.
    const draining = b.draining === true;
    const [off, on] = draining ? [row.drain, row.undrain] : [row.undrain, row.drain];
    on.disabled = false;
    if (!off.disabled) {
      const hadFocus = document.activeElement === off;
      off.disabled = true;
      if (hadFocus) on.focus();
    }
    row.drain.hidden = row.undrain.hidden = b.removed === true; // not in the pool: nothing to drain or undrain
    return live;
  }

  function drawSparkline(host, values, label) {
    const width = 120;
    const height = 28;
    let svg = host.querySelector("svg");
    if (!svg) {
      svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
      svg.setAttribute("preserveAspectRatio", "none");
      svg.setAttribute("class", "spark");
      svg.setAttribute("role", "img");
      const base = document.createElementNS(SVG, "line"); // the whole window, so a short history reads as recent
      base.setAttribute("class", "spark-base");
      base.setAttribute("x1", "0");
      base.setAttribute("x2", String(width));
      base.setAttribute("y1", String(height - 1));
      base.setAttribute("y2", String(height - 1));
      const area = document.createElementNS(SVG, "polygon");
      area.setAttribute("class", "spark-area");
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", "spark-line");
      svg.append(base, area, line);
      host.append(svg);
    }
    const max = Math.max(1, ...values);
    const step = width / (HISTORY - 1);
    const offset = HISTORY - values.length;
    const points = values.map((v, i) => {
      const x = (offset + i) * step;
      const y = height - 2 - (v / max) * (height - 4);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    if (points.length === 1) points.unshift(`${(offset - 1) * step},${points[0].split(",")[1]}`);
    const first = points[0].split(",")[0];
    svg.querySelector(".spark-line").setAttribute("points", points.join(" "));
    svg.querySelector(".spark-area").setAttribute("points", `${first},${height} ${points.join(" ")} ${width},${height}`);
    const now = values[values.length - 1] || 0;
    svg.setAttribute(
      "aria-label",
      `${label}: now ${now}, highest ${Math.max(0, ...values)} over the last ${values.length} s`,
    );
  }

  // -- workers (workers > 1: the supervisor's /status lists them; one process's has none) ----

  const WORKER_BADGES = { ready: "state-up", starting: "state-unknown", retiring: "state-draining", down: "state-down" };
  const workerStates = new Map(); // slot → {state, pid, restarts} last shown, for change events
  let workersJson = "";

  function renderWorkers(workers) {
    const section = $("workers-section");
    const many = Array.isArray(workers) && workers.length > 0;
    section.hidden = !many;
    setText($("totals-title"), many ? `Proxy (${workers.length} workers)` : "Process");
    if (!many) return;
    const json = JSON.stringify(workers);
    if (json === workersJson) return;
    workersJson = json;
    for (const w of workers) {
      const before = workerStates.get(w.slot);
      if (before !== undefined) {
        // A restart can fall between two polls (a crash, then ready again within the backoff):
        // the restart count and the pid say so even when the state looks unchanged.
        if ((w.restarts || 0) > (before.restarts || 0)) {
          event(`Worker ${w.slot}: restarted (pid ${before.pid || "–"} → ${w.pid || "–"}), now ${w.state}`, "warn");
        } else if (before.state !== w.state) {
          event(`Worker ${w.slot}: ${before.state} → ${w.state}`, w.state === "down" ? "error" : "info");
        }
      }
      workerStates.set(w.slot, { state: w.state, pid: w.pid, restarts: w.restarts });
    }
    $("workers").replaceChildren(
      ...workers.map((w) => {
        const state = el("td", { class: "state", "data-label": "State" }, [
          el("span", { class: `badge ${WORKER_BADGES[w.state] || "state-unknown"}`, text: w.state || "unknown" }),
        ]);
        if (typeof w.adopted_by === "number") state.append(" ", el("span", { class: "sub", text: `its clients go to worker ${w.adopted_by}` }));
        const lag = typeof w.loop_lag_s === "number" ? `${(w.loop_lag_s * 1000).toFixed(1)} ms` : "–";
        return el("tr", { "data-worker": String(w.slot), "data-state": w.state || "unknown" }, [
          el("th", { scope: "row", "data-label": "Worker", text: String(w.slot) }),
          el("td", { class: "pid", "data-label": "PID", text: w.pid ? String(w.pid) : "–" }),
          state,
          el("td", { class: "num sessions", "data-label": "Sessions", text: fmtInt(w.sessions) }),
          el("td", { class: "num connections", "data-label": "Connections", text: fmtInt(w.connections) }),
          el("td", { class: "num restarts", "data-label": "Restarts", text: fmtInt(w.restarts) }),
          el("td", { class: "num rss", "data-label": "Memory", text: fmtBytes(w.rss_bytes) }),
          el("td", { class: "num lag", "data-label": "Loop lag", text: lag }),
          el("td", { class: "generation", "data-label": "Config", text: typeof w.generation === "number" ? `generation ${w.generation}` : "–" }),
          el("td", { class: "since", "data-label": "Up since", text: typeof w.started_unix === "number" && w.pid ? fmtWhen(w.started_unix) : "–" }),
        ]);
      }),
    );
  }

  function renderListeners(listeners) {
    const json = JSON.stringify(listeners);
    if (json === listenersJson) return;
    listenersJson = json;
    $("listeners").replaceChildren(
      ...listeners.map((l) =>
        el("tr", {}, [
          el("td", { "data-label": "Name", text: l.name }),
          el("td", { "data-label": "Addresses" }, (l.addresses || []).map((a) => el("code", { class: "address", text: a }))),
          el("td", { "data-label": "TLS", text: l.tls ? "yes" : "no" }),
        ]),
      ),
    );
  }

  function renderRoutes(routes) {
    const json = JSON.stringify(routes);
    if (json === routesJson) return;
    routesJson = json;
    $("routes").replaceChildren(
      ...routes.map((r) =>
        el("tr", {}, [
          el("td", { "data-label": "Host", text: r.host || "*" }),
          el("td", { "data-label": "Path" }, [el("code", { text: r.path || "/" })]),
          el("td", { "data-label": "Pool", text: r.pool }),
          el("td", { "data-label": "Auth", text: r.auth || "none" }),
        ]),
      ),
    );
  }

  // -- actions ---------------------------------------------------------------------------

  async function act(pool, address, action, button, counterpart) {
    const verb = action === "drain" ? "Drain" : "Undrain";
    const path = `/pools/${encodeURIComponent(pool)}/backends/${encodeURIComponent(address)}/${action}`;
    button.setAttribute("aria-busy", "true");
    try {
      const response = await api(path, { method: "POST" });
      if (!response.ok) {
        let detail = `${response.status} ${response.statusText}`.trim();
        try {
          const body = await response.json();
          if (body && body.error) detail = `${detail}: ${body.error}`;
        } catch (err) {
          // not JSON: the status says enough
        }
        event(`${verb} ${address} (pool ${pool}) failed: ${detail}.`, "error");
        return;
      }
      const result = await response.json();
      const what = action === "drain" ? "draining" : "back in rotation";
      event(
        result.changed
          ? `${verb}: ${address} (pool ${pool}) is ${what}.`
          : `${verb}: ${address} (pool ${pool}) was ${what} already.`,
      );
      if (pending !== null) await pending; // it may have asked before the change
      await refresh();
      if (document.activeElement === document.body && counterpart && !counterpart.disabled) counterpart.focus();
    } catch (err) {
      if (err instanceof NeedToken) {
        askForToken(err.message === "refused" ? "refused" : "action");
      } else {
        event(`${verb} ${address} (pool ${pool}) failed: ${err.message || err}.`, "error");
      }
    } finally {
      button.removeAttribute("aria-busy");
    }
  }

  // -- start -----------------------------------------------------------------------------

  function start() {
    $("token-form").addEventListener("submit", submitToken);
    loop();
  }

  // What sessions.js (the sessions view) shares: requests with the token, the events list,
  // and whether the API answers with the token we hold (it polls only then: no 401 noise).
  const live = () => connected === true && !waitingForToken;
  window.wsproxyStatus = Object.freeze({ api, NeedToken, askForToken, event, announce, live });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

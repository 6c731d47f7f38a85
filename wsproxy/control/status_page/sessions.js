// The status page's sessions view: the established sessions, searchable, each with a Close button.
//
// Every two seconds: GET /sessions?limit=1000 (the oldest 1000; the admin API's
// page size at most). The search box filters what was fetched, in the browser,
// by identity, client address or route (case-insensitive substring); the line
// under it says how many match, when there are more sessions than one page, and
// (workers > 1) which workers did not answer the supervisor in time.
// Close asks POST /sessions/ID/close with no body: the client gets close 1008
// "closed by the operator" at a frame boundary, its backend 1001.
//
// Requests go through status.js (window.wsproxyStatus.api), which holds the
// admin token in its own closure; a 401 there puts up its token form. Rows are
// built once per session and then updated, so a focused button keeps its focus.
"use strict";

(() => {
  const POLL_MS = 2000;
  const PAGE = 1000;
  const shared = window.wsproxyStatus;
  const rows = new Map(); // session id → {tr, cells, close, text}
  let latest = { sessions: [], next: null };
  let pending = null;

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function fmtAge(seconds) {
    const s = Math.floor(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
    return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
  }

  function fmtBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
  }

  const COLUMNS = [
    ["id", "Session"],
    ["identity", "Identity"],
    ["peer", "Client"],
    ["route", "Route"],
    ["backend", "Backend"],
    ["age num", "Age"],
    ["up num", "Up"],
    ["down num", "Down"],
    ["actions", "Actions"],
  ];

  function sessionRow(s) {
    const cells = {};
    const tds = COLUMNS.map(([cls, label]) => {
      const td = el("td", { class: cls, "data-label": label });
      cells[cls.split(" ")[0]] = td;
      return td;
    });
    cells.id.append(el("code", { text: s.id }));
    const who = s.identity === null ? "no identity" : `identity ${s.identity}`;
    const close = el("button", {
      type: "button",
      class: "close-session",
      "aria-label": `Close session ${s.id} (${who}, client ${s.peer})`,
      text: "Close",
    });
    close.addEventListener("click", () => closeSession(s, close));
    cells.actions.append(close);
    const tr = el("tr", { "data-session": s.id }, tds);
    return { tr, cells, close, text: "" };
  }

  function updateRow(row, s) {
    setText(row.cells.identity, s.identity === null ? "–" : s.identity);
    row.cells.identity.classList.toggle("none", s.identity === null);
    setText(row.cells.peer, s.peer);
    setText(row.cells.route, s.route);
    setText(row.cells.backend, `${s.pool} ${s.backend}`);
    setText(row.cells.age, fmtAge(s.age_s));
    setText(row.cells.up, `${fmtBytes(s.up_bytes)} · ${s.up_msgs} msg`);
    setText(row.cells.down, `${fmtBytes(s.down_bytes)} · ${s.down_msgs} msg`);
    row.text = [s.identity || "", s.peer, s.route].join("\n").toLowerCase();
  }

  function render() {
    const body = $("sessions");
    const seen = new Set();
    latest.sessions.forEach((s, i) => {
      seen.add(s.id);
      let row = rows.get(s.id);
      if (!row) {
        row = sessionRow(s);
        rows.set(s.id, row);
      }
      updateRow(row, s);
      if (body.children[i] !== row.tr) body.insertBefore(row.tr, body.children[i] || null);
    });
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        if (row.tr.contains(document.activeElement)) $("sessions-search").focus(); // keep the focus on the page
        row.tr.remove();
        rows.delete(id);
      }
    }
    applySearch();
  }

  function applySearch() {
    const wanted = $("sessions-search").value.trim().toLowerCase();
    let shown = 0;
    for (const row of rows.values()) {
      const match = !wanted || row.text.includes(wanted);
      row.tr.hidden = !match;
      if (match) shown += 1;
    }
    const total = latest.sessions.length;
    let text;
    if (!total) text = "No open sessions.";
    else if (wanted) text = `${shown} of ${total} session${total === 1 ? "" : "s"} match.`;
    else text = `${total} session${total === 1 ? "" : "s"}.`;
    if (latest.next !== null) text += ` Only the oldest ${PAGE} are listed and searched (wsproxy sessions lists all).`;
    // workers > 1: the supervisor asks every worker; those that did not answer in time are missing here
    const unanswered = latest.unanswered || [];
    if (unanswered.length) text += ` Worker${unanswered.length === 1 ? "" : "s"} ${unanswered.join(", ")} did not answer: ${unanswered.length === 1 ? "its" : "their"} sessions are not listed.`;
    setText($("sessions-count"), text);
  }

  async function poll() {
    if (!shared.live()) return; // until status.js has an answer (and the token, if one is needed)
    try {
      const response = await shared.api(`/sessions?limit=${PAGE}`);
      if (!response.ok) return; // the status poll reports an unreachable or failing API
      latest = await response.json();
      render();
    } catch (err) {
      // NeedToken: status.js asks for it; network errors: status.js shows the banner
    }
  }

  function refresh() {
    if (pending === null) {
      pending = poll().finally(() => {
        pending = null;
      });
    }
    return pending;
  }

  async function loop() {
    await refresh();
    window.setTimeout(loop, POLL_MS);
  }

  async function closeSession(s, button) {
    const who = s.identity === null ? s.peer : `${s.identity}, ${s.peer}`;
    button.setAttribute("aria-busy", "true");
    try {
      const response = await shared.api(`/sessions/${encodeURIComponent(s.id)}/close`, { method: "POST" });
      if (response.status === 404) {
        shared.event(`Session ${s.id} (${who}) had already ended.`);
      } else if (!response.ok) {
        shared.event(`Closing session ${s.id} (${who}) failed: ${response.status} ${response.statusText}.`, "error");
        return;
      } else {
        const result = await response.json();
        shared.event(
          result.closed ? `Session ${s.id} (${who}) closed.` : `Session ${s.id} (${who}) was closing already.`,
        );
      }
      if (pending !== null) await pending;
      await refresh();
    } catch (err) {
      if (err instanceof shared.NeedToken) shared.askForToken(err.message === "refused" ? "refused" : "action");
      else shared.event(`Closing session ${s.id} (${who}) failed: ${err.message || err}.`, "error");
    } finally {
      button.removeAttribute("aria-busy");
    }
  }

  function start() {
    $("sessions-search").addEventListener("input", applySearch);
    loop();
  }

  if (!shared) return; // status.js did not load: nothing to talk through
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

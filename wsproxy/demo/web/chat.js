// The wsproxy demo chat (see wsproxy/demo/chat.py for the protocol).
//
// Theory of operation: one WebSocket at a time, to ws://<this page's host>:<proxyPort>/chat.
//   connecting ──open──▶ open ──close──▶ waiting ──timer──▶ connecting …
//        └──────────close (never opened)──────▲
// After every close the page reconnects. The wait is exponential backoff with
// jitter: half of min(15 s, 0.5 s × 2^failures) plus a random share of the
// other half, where `failures` counts attempts since the last session that
// got its hello (so a long-lived session that ends is retried within 0.5 s).
// 1012 (service restart: the proxy drains the backend) and 1013 (try again
// later) additionally wait 1–3 s, uniformly jittered, so that a pool's worth
// of tabs does not come back in the same instant.
// Room events carry increasing ids: events already shown (the hello of a new
// backend replays the room's history) are skipped, so a reconnect loses
// nothing and duplicates nothing.
"use strict";

(() => {
  const config = Object.assign({ proxyPort: 8080, chatPath: "/chat", adminPort: 9090 }, window.WSPROXY_DEMO || {});
  const params = new URLSearchParams(location.search);
  const endpoint = params.get("ws") || `ws://${location.hostname}:${config.proxyPort}${config.chatPath}`;

  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 15000;
  const RESTART_CODES = new Set([1012, 1013]);
  const RESTART_WAIT_MS = [1000, 3000];
  const CLOSE_NAMES = {
    1000: "normal closure", 1001: "going away", 1006: "abnormal closure", 1008: "policy violation",
    1009: "message too big", 1011: "internal error", 1012: "service restart", 1013: "try again later",
    1014: "bad gateway",
  };

  const $ = (id) => document.getElementById(id);
  const stateEl = $("state"), backendEl = $("backend"), logEl = $("log"), membersEl = $("members");
  const nickEl = $("nick"), textEl = $("text"), sendEl = $("send");

  let nick = sessionStorage.getItem("wsproxy-demo-nick") || `guest-${Math.floor(1000 + Math.random() * 9000)}`;
  let socket = null;
  let failures = 0;
  let countdown = null;
  let failing = null;  // the log line of the current run of failed attempts
  const seen = new Set();

  nickEl.value = nick;
  $("endpoint").textContent = `via ${endpoint}`;
  $("status-link").href = `http://127.0.0.1:${config.adminPort}/`;

  function backoffMs(n) {
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** n);
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  function setState(state, text) {
    stateEl.dataset.state = state;
    stateEl.textContent = text;
    const open = state === "open";
    textEl.disabled = sendEl.disabled = !open;
  }

  function setBackend(name, address, current) {
    backendEl.dataset.backend = name || "";
    backendEl.dataset.address = address || "";
    backendEl.classList.toggle("stale", !current);
    backendEl.textContent = name ? `${current ? "connected to" : "was connected to"} ${name} (${address})` : "not connected";
  }

  function note(text, kind = "local") {
    const item = document.createElement("li");
    item.className = kind;
    const time = document.createElement("time");
    const now = new Date();
    time.dateTime = now.toISOString();
    time.textContent = now.toLocaleTimeString();
    item.append(time, " ", text);
    append(item);
    return item;
  }

  function append(item) {
    const atBottom = logEl.scrollHeight - logEl.scrollTop - logEl.clientHeight < 40;
    logEl.append(item);
    if (atBottom) logEl.scrollTop = logEl.scrollHeight;
  }

  function span(className, text) {
    const el = document.createElement("span");
    el.className = className;
    el.textContent = text;
    return el;
  }

  function showEvent(event) {
    if (seen.has(event.id)) return;
    seen.add(event.id);
    const item = document.createElement("li");
    item.className = event.type;
    item.dataset.id = event.id;
    const who = span("nick", event.nick);
    const via = span("via", event.backend);
    if (event.type === "message") {
      if (event.nick === nick) item.classList.add("mine");
      item.append(who, via, span("text", event.text));
    } else {
      item.append(who, ` ${event.type === "join" ? "joined via" : "left"} `, via);
    }
    append(item);
  }

  function showMembers(members) {
    membersEl.replaceChildren(...members.map((m) => {
      const item = document.createElement("li");
      item.append(span("nick", m.nick), " ", span("via", m.backend));
      return item;
    }));
  }

  function describe(code, reason) {
    const name = CLOSE_NAMES[code] ? ` ${CLOSE_NAMES[code]}` : "";
    return `${code}${name}${reason ? ` “${reason}”` : ""}`;
  }

  function connect() {
    clearInterval(countdown);
    setState("connecting", `connecting to ${endpoint} …`);
    const ws = socket = new WebSocket(`${endpoint}?nick=${encodeURIComponent(nick)}`);
    let opened = false, greeted = false;

    ws.onopen = () => {
      opened = true;
      setState("open", "connected");
    };

    ws.onmessage = (message) => {
      let doc;
      try { doc = JSON.parse(message.data); } catch { return; }
      if (doc.type === "hello") {
        greeted = true;
        failing = null;
        failures = 0;
        setBackend(doc.backend, doc.address, true);
        note(`${doc.text} (${doc.address})`, "hello");
        for (const event of doc.history || []) showEvent(event);
      } else if (doc.type === "presence") {
        showMembers(doc.members);
      } else if (doc.id !== undefined) {
        showEvent(doc);
      }
    };

    ws.onclose = (close) => {
      if (ws !== socket) return;
      socket = null;
      failures = greeted ? 0 : failures + 1;
      let delay = backoffMs(failures);
      if (RESTART_CODES.has(close.code)) {
        const [low, high] = RESTART_WAIT_MS;
        delay = Math.max(delay, low + Math.random() * (high - low));
      }
      const seconds = (delay / 1000).toFixed(1);
      if (opened) {
        setBackend(backendEl.dataset.backend, backendEl.dataset.address, false);
        note(`closed: ${describe(close.code, close.reason)}; reconnecting in ${seconds} s`, "closed");
      } else {
        // One line for a run of failed attempts, not one per attempt. A browser does not
        // tell the page why a handshake failed: a 403 (an Origin not on the route's list)
        // and a proxy that is down look the same from here.
        const text = `cannot connect to ${endpoint} (attempt ${failures}): the proxy refused the handshake ` +
          `(403 if ${location.origin} is not an allowed origin) or is down; retrying in ${seconds} s`;
        if (failing && failing === logEl.lastElementChild) {
          failing.firstChild.textContent = new Date().toLocaleTimeString();
          failing.lastChild.textContent = text;
        }
        else failing = note(text, "error");
      }
      wait(delay, opened ? `closed ${describe(close.code, "")}` : "cannot connect");
    };
  }

  function wait(delay, why) {
    const until = Date.now() + delay;
    const tick = () => {
      const left = Math.max(0, until - Date.now()) / 1000;
      setState(why === "cannot connect" ? "error" : "waiting", `${why} · reconnecting in ${left.toFixed(1)} s`);
    };
    tick();
    countdown = setInterval(tick, 100);
    setTimeout(connect, delay);
  }

  $("form").addEventListener("submit", (submit) => {
    submit.preventDefault();
    const text = textEl.value.trim();
    if (!text || !socket || socket.readyState !== WebSocket.OPEN) return;
    socket.send(JSON.stringify({ type: "say", nick, text }));
    textEl.value = "";
    textEl.focus();
  });

  nickEl.addEventListener("change", () => {
    nick = nickEl.value.trim().slice(0, 24) || nick;
    nickEl.value = nick;
    sessionStorage.setItem("wsproxy-demo-nick", nick);
  });

  sessionStorage.setItem("wsproxy-demo-nick", nick);
  connect();
})();

// Vessel's dashboard: plain JavaScript, no build step. It talks to the daemon's JSON API
// with the token the user logs in with (kept in this tab's sessionStorage only), follows
// events by long polling, samples /v1/stats every 2 s while the tab is visible, and
// attaches xterm.js to a domain's console over a WebSocket.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") e.onclick = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
};

const HISTORY = 60;          // points per graph (2 minutes)
const STATS_EVERY_MS = 2000;
const UPLOAD_CHUNK = 8 << 20;

// Everything the page knows; exposed as window.vessel for tests and the curious.
const S = {
  token: sessionStorage.getItem("vessel-token") || "",
  domains: [],
  accel: {},
  selected: null,
  prev: null,
  series: { host: {}, dom: {} },
  graphs: {},
  term: null,
  fit: null,
  ws: null,
  writer: false,
  retry: 0,
  eventsSince: 0,
  running: false,
  reconnecting: false,
};
window.vessel = S;
S.errors = [];
window.addEventListener("error", (e) => S.errors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => S.errors.push(String((e.reason && e.reason.stack) || e.reason)));

class Unauthorized extends Error {}

async function api(method, path, body, contentType = "application/json") {
  const headers = {};
  if (S.token) headers["Authorization"] = "Bearer " + S.token;
  let data;
  if (body !== undefined) {
    headers["Content-Type"] = contentType;
    data = contentType === "application/json" && typeof body !== "string" ? JSON.stringify(body) : body;
  }
  const r = await fetch(path, { method, headers, body: data });
  if (r.status === 401) throw new Unauthorized("the daemon refused the token");
  const text = r.status === 204 ? "" : await r.text();
  let v = null;
  try { v = text ? JSON.parse(text) : null; } catch (_) { v = text; }
  if (!r.ok) throw new Error((v && v.error && v.error.message) || `${method} ${path}: ${r.status}`);
  return v;
}

function showError(e) {
  if (e instanceof Unauthorized) return showLogin(e.message);
  $("#action-error").textContent = String(e.message || e);
}

// ---- login -------------------------------------------------------------------------

function showLogin(msg) {
  S.running = false;
  closeConsole();
  $("#main-view").hidden = true;
  $("#logout").hidden = true;
  $("#login-view").hidden = false;
  $("#login-error").textContent = msg || "";
  $("#token").focus();
}

async function tryStart() {
  try {
    await api("GET", "/v1/");
  } catch (e) {
    return showLogin(S.token ? String(e.message) : "");
  }
  $("#login-view").hidden = true;
  $("#main-view").hidden = false;
  $("#logout").hidden = !S.token;
  if (S.running) return;
  S.running = true;
  refreshAll();
  followEvents();
  statsLoop();
}

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  S.token = $("#token").value.trim();
  sessionStorage.setItem("vessel-token", S.token);
  tryStart();
});

$("#logout").onclick = () => {
  S.token = "";
  sessionStorage.removeItem("vessel-token");
  showLogin("");
};

// ---- domains -----------------------------------------------------------------------

const ACTIONS = {
  "shut off": ["start"],
  crashed: ["start"],
  running: ["shutdown", "reboot", "suspend", "destroy"],
  paused: ["resume", "destroy"],
  "in shutdown": ["destroy"],
};

async function act(name, action) {
  $("#action-error").textContent = "";
  try {
    await api("POST", `/v1/domains/${encodeURIComponent(name)}/${action}`);
  } catch (e) {
    showError(e);
  }
  refreshDomains();
}

// The latest CPU figure of a domain (guest + VMM threads, % of one core), if sampled.
function cpuNow(name) {
  const ser = (S.series.dom[name] || {}).cpu;
  if (!ser || !ser[0].length) return null;
  return ser.reduce((sum, pts) => sum + pts[pts.length - 1], 0);
}

function mib(bytes) { return (bytes / (1 << 20)).toFixed(0) + " MiB"; }

async function refreshDomains() {
  try {
    S.domains = await api("GET", "/v1/domains");
  } catch (e) {
    return showError(e);
  }
  const tb = $("#domains tbody");
  tb.replaceChildren();
  for (const d of S.domains) {
    const buttons = (ACTIONS[d.state_text] || []).map((a) =>
      el("button", { "data-action": a, "data-domain": d.name, text: a, onclick: () => act(d.name, a) }));
    const cpu = cpuNow(d.name);
    const tr = el("tr", { "data-domain": d.name },
      el("td", { class: "name", text: d.name, onclick: () => select(d.name) }),
      el("td", { class: "state-" + d.state_text.replace(" ", "-"), text: d.state_text }),
      el("td", { text: d.cpus }),
      el("td", { text: d.memory_mib + " MiB" }),
      el("td", { class: "accel", text: S.accel[d.name] || "" }),
      el("td", { text: d.driver }),
      el("td", { class: "cpu", text: cpu == null ? "" : cpu.toFixed(1) + " %" }),
      el("td", {}, ...buttons, el("button", { text: "open", onclick: () => select(d.name) })));
    if (d.name === S.selected) tr.className = "selected";
    tb.append(tr);
  }
  if (S.selected) {
    const d = S.domains.find((x) => x.name === S.selected);
    if (!d) return deselect();
    $("#domain-state").textContent = d.state_text;
    if (ACTIVE.includes(d.state_text) && !S.ws && !S.reconnecting) openConsole(d.name);
  }
}

$("#define-btn").onclick = async () => {
  const text = $("#define-text").value;
  const xml = text.trim().startsWith("<");
  try {
    const d = await api("POST", "/v1/domains", text, xml ? "application/xml" : "application/json");
    $("#define-result").textContent = `defined ${d.name}`;
    refreshDomains();
  } catch (e) {
    $("#define-result").textContent = "";
    showError(e);
  }
};

function select(name) {
  if (S.selected !== name) closeConsole();
  S.selected = name;
  $("#domain-panel").hidden = false;
  $("#domain-name").textContent = name;
  buildGraphs("#domain-graphs", "dom", [
    ["cpu", "CPU % of a core (guest, VMM)", 100],
    ["mem", "Resident memory MiB", 0],
    ["disk", "Disk KiB/s (read, write)", 0],
    ["net", "Network KiB/s (rx, tx)", 0],
  ]);
  drawAll();
  refreshDomains();
}

function deselect() {
  closeConsole();
  S.selected = null;
  $("#domain-panel").hidden = true;
}

// ---- console -----------------------------------------------------------------------

function b64url(s) {
  const bytes = new TextEncoder().encode(s);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function setConsoleStatus(text) { $("#console-status").textContent = "console: " + text; }

function ensureTerminal() {
  if (S.term) return;
  S.term = new Terminal({ fontSize: 13, scrollback: 5000, cursorBlink: true });
  S.fit = new FitAddon.FitAddon();
  S.term.loadAddon(S.fit);
  S.term.open($("#terminal"));
  S.fit.fit();
  S.term.onData((d) => {
    if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(new TextEncoder().encode(d));
  });
  S.term.onResize(({ cols, rows }) => {
    if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(JSON.stringify({ type: "resize", cols, rows }));
  });
  window.addEventListener("resize", () => S.fit && S.fit.fit());
}

function openConsole(name, takeover = false) {
  ensureTerminal();
  if (S.ws) S.ws.onclose = null, S.ws.close();
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${proto}//${location.host}/v1/domains/${encodeURIComponent(name)}/console/ws?write=1` +
    (takeover ? "&takeover=1" : "");
  const protocols = ["vessel-console"];
  if (S.token) protocols.push("vessel.token." + b64url(S.token));
  const ws = new WebSocket(url, protocols);
  ws.binaryType = "arraybuffer";
  S.ws = ws;
  setConsoleStatus("connecting");
  ws.onopen = () => {
    S.retry = 0;
    S.connects = (S.connects || 0) + 1;
    S.term.reset();  // the daemon sends the recent output again
    setConsoleStatus("connected");
    S.term.focus();
  };
  ws.onmessage = (m) => {
    if (typeof m.data === "string") {
      const v = JSON.parse(m.data);
      if (v.type === "writer") {
        S.writer = v.writer;
        setConsoleStatus(v.writer ? "connected, typing goes to the guest" : "connected, read-only (another viewer types)");
        $("#takeover").hidden = v.writer;
      }
      return;
    }
    S.term.write(new Uint8Array(m.data));
  };
  ws.onclose = () => {
    if (S.ws !== ws) return;
    S.ws = null;
    if (S.selected === name) scheduleReconnect(name);
  };
}

const ACTIVE = ["running", "paused", "in shutdown"];

// Reconnects with a growing pause while the domain still runs (a daemon restart, a
// network blip); once it has stopped, its next start reopens the console.
function scheduleReconnect(name) {
  const wait = Math.min(10000, 500 * 2 ** S.retry++);
  setConsoleStatus(`closed, reconnecting in ${(wait / 1000).toFixed(1)} s`);
  S.reconnecting = true;
  setTimeout(async () => {
    S.reconnecting = false;
    if (S.selected !== name || S.ws) return;
    try {
      S.domains = await api("GET", "/v1/domains");
    } catch (e) {
      if (e instanceof Unauthorized) return showError(e);
      return scheduleReconnect(name);
    }
    const d = S.domains.find((x) => x.name === name);
    if (d && ACTIVE.includes(d.state_text)) openConsole(name);
    else setConsoleStatus("closed");
    refreshDomains();
  }, wait);
}

$("#takeover").onclick = () => {
  if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(JSON.stringify({ type: "takeover" }));
};

function closeConsole() {
  if (S.ws) {
    const ws = S.ws;
    S.ws = null;
    ws.onclose = null;
    ws.close();
  }
  setConsoleStatus("closed");
}

// ---- graphs ------------------------------------------------------------------------

const COLORS = ["#1a73e8", "#e37400"];

function buildGraphs(sel, kind, specs) {
  const box = $(sel);
  box.replaceChildren();
  for (const [key, label, max] of specs) {
    const canvas = el("canvas", { width: 260, height: 70, "data-graph": key });
    const value = el("span", { class: "value" });
    box.append(el("div", { class: "graph" }, el("div", { class: "label" }, label + " ", value), canvas));
    S.graphs[kind + ":" + key] = { canvas, value, max };
  }
}

function push(obj, key, ...vals) {
  const s = (obj[key] = obj[key] || vals.map(() => []));
  vals.forEach((v, i) => {
    s[i] = s[i] || [];
    s[i].push(v);
    if (s[i].length > HISTORY) s[i].shift();
  });
}

function draw(g, lines) {
  const c = g.canvas, ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  ctx.strokeStyle = "#eee";
  ctx.strokeRect(0.5, 0.5, c.width - 1, c.height - 1);
  if (!lines || !lines.length) return;
  const all = lines.flat().filter((v) => Number.isFinite(v));
  const top = g.max || Math.max(1, ...all) * 1.1;
  lines.forEach((pts, i) => {
    ctx.strokeStyle = COLORS[i % COLORS.length];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    pts.forEach((v, x) => {
      const px = (x / (HISTORY - 1)) * (c.width - 2) + 1;
      const py = c.height - 2 - (Math.min(v, top) / top) * (c.height - 4);
      x ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
    });
    ctx.stroke();
  });
  g.value.textContent = lines.map((l) => (l.length ? l[l.length - 1].toFixed(1) : "")).join(" / ");
}

function drawAll() {
  for (const [k, g] of Object.entries(S.graphs)) {
    const [kind, key] = k.split(":");
    const src = kind === "host" ? S.series.host : S.series.dom[S.selected] || {};
    draw(g, src[key]);
  }
}

const rate = (a, b, dt) => (a == null || b == null ? 0 : Math.max(0, a - b) / dt / 1024);

function takeSample(s) {
  const p = S.prev;
  S.prev = s;
  for (const d of s.domains) S.accel[d.name] = d.accel;
  for (const td of document.querySelectorAll("#domains td.accel")) {
    td.textContent = S.accel[td.parentElement.dataset.domain] || "";
  }
  const h = s.host;
  $("#host-summary").textContent =
    `${h.hostname} · ${h.cpus} CPUs · ${mib(h.memory_total_bytes - h.memory_available_bytes)} of ${mib(h.memory_total_bytes)} used`;
  if (!p) return;
  const dt = Math.max(0.001, s.time - p.time);
  const ph = p.host;
  const dtot = h.cpu_total_s - ph.cpu_total_s;
  push(S.series.host, "cpu", dtot > 0 ? (100 * (h.cpu_busy_s - ph.cpu_busy_s)) / dtot : 0);
  push(S.series.host, "mem", (h.memory_total_bytes - h.memory_available_bytes) / (1 << 20));
  push(S.series.host, "disk", rate(h.disk_read_bytes, ph.disk_read_bytes, dt), rate(h.disk_write_bytes, ph.disk_write_bytes, dt));
  push(S.series.host, "net", rate(h.net_rx_bytes, ph.net_rx_bytes, dt), rate(h.net_tx_bytes, ph.net_tx_bytes, dt));
  for (const d of s.domains) {
    const o = p.domains.find((x) => x.name === d.name);
    const ser = (S.series.dom[d.name] = S.series.dom[d.name] || {});
    const cpu = (a, b) => (a != null && b != null ? (100 * Math.max(0, a - b)) / dt : 0);
    push(ser, "cpu", cpu(d.cpu_guest_s, o && o.cpu_guest_s), cpu(d.cpu_vmm_s, o && o.cpu_vmm_s));
    push(ser, "mem", (d.rss_bytes || 0) / (1 << 20));
    push(ser, "disk", rate(d.disk_read_bytes, o && o.disk_read_bytes, dt), rate(d.disk_write_bytes, o && o.disk_write_bytes, dt));
    push(ser, "net", rate(d.net_rx_bytes, o && o.net_rx_bytes, dt), rate(d.net_tx_bytes, o && o.net_tx_bytes, dt));
  }
  drawAll();
  for (const tr of document.querySelectorAll("#domains tbody tr")) {
    tr.querySelector("td.accel").textContent = S.accel[tr.dataset.domain] || "";
    const cpu = cpuNow(tr.dataset.domain);
    if (cpu != null) tr.querySelector("td.cpu").textContent = cpu.toFixed(1) + " %";
  }
}

async function statsLoop() {
  while (S.running) {
    if (!document.hidden) {
      try {
        takeSample(await api("GET", "/v1/stats"));
      } catch (e) {
        showError(e);
      }
    }
    await new Promise((r) => setTimeout(r, STATS_EVERY_MS));
  }
}

// ---- events ------------------------------------------------------------------------

async function followEvents() {
  try {
    S.eventsSince = (await api("GET", "/v1/events?timeout=0")).last;
  } catch (e) {
    return showError(e);
  }
  while (S.running) {
    try {
      const r = await api("GET", `/v1/events?since=${S.eventsSince}&timeout=25`);
      S.eventsSince = r.last;
      for (const ev of r.events) {
        const t = new Date(ev.time * 1000).toLocaleTimeString();
        $("#events").prepend(el("li", { text: `${t} ${ev.domain}: ${ev.event} → ${ev.state}${ev.detail ? " (" + ev.detail + ")" : ""}` }));
      }
      if (r.events.length) refreshDomains();
    } catch (e) {
      if (e instanceof Unauthorized) return showError(e);
      await new Promise((r) => setTimeout(r, 3000));
    }
  }
}

// ---- storage and networks ----------------------------------------------------------

async function uploadInto(pool, vol, file, bar) {
  bar.max = file.size || 1;
  for (let off = 0; off < file.size; off += UPLOAD_CHUNK) {
    const chunk = await file.slice(off, off + UPLOAD_CHUNK).arrayBuffer();
    await api("PUT", `/v1/pools/${encodeURIComponent(pool)}/volumes/${encodeURIComponent(vol)}/data?offset=${off}`,
      chunk, "application/octet-stream");
    bar.value = Math.min(file.size, off + UPLOAD_CHUNK);
  }
  bar.value = bar.max;
}

async function refreshPools() {
  const box = $("#pools");
  let pools;
  try {
    pools = await api("GET", "/v1/pools");
  } catch (e) {
    return showError(e);
  }
  box.replaceChildren();
  for (const p of pools) {
    const pool = encodeURIComponent(p.name);
    const vols = await api("GET", `/v1/pools/${pool}/volumes`).catch(() => []);
    const tb = el("tbody");
    for (const v of vols) {
      const vol = encodeURIComponent(v.name);
      const bar = el("progress", { value: 0, max: 1, hidden: "" });
      const file = el("input", { type: "file", class: "upload" });
      file.onchange = async () => {
        if (!file.files[0]) return;
        bar.hidden = false;
        try {
          await uploadInto(p.name, v.name, file.files[0], bar);
          bar.dataset.done = "1";
        } catch (e) {
          showError(e);
        }
      };
      const cloneName = el("input", { class: "clone-name", placeholder: "clone name", size: 10 });
      const clone = el("button", { class: "clone", text: "clone", onclick: async () => {
        if (!cloneName.value) return;
        try {
          await api("POST", `/v1/pools/${pool}/volumes/${vol}/clone`, { name: cloneName.value });
        } catch (e) { showError(e); }
        refreshPools();
      } });
      tb.append(el("tr", { "data-volume": v.name }, el("td", { text: v.name }), el("td", { text: v.format }),
        el("td", { text: mib(v.capacity) }), el("td", { text: mib(v.allocation) }),
        el("td", { text: (v.used_by || []).join(", ") }),
        el("td", {}, cloneName, clone, " upload: ", file, bar)));
    }
    const name = el("input", { class: "new-name", placeholder: "new volume", size: 12 });
    const size = el("input", { class: "new-size", placeholder: "MiB", size: 6, type: "number", min: 1 });
    const fmt = el("select", { class: "new-format" }, el("option", { text: "qcow2" }), el("option", { text: "raw" }));
    const create = el("button", { class: "create", text: "create", onclick: async () => {
      try {
        await api("POST", `/v1/pools/${pool}/volumes`,
          { name: name.value, capacity: Number(size.value) * (1 << 20), format: fmt.value });
      } catch (e) { showError(e); }
      refreshPools();
    } });
    box.append(el("div", { "data-pool": p.name },
      el("h3", { text: `${p.name} (${p.path}) · ${mib(p.available)} free` }),
      el("table", {}, el("thead", {}, el("tr", {}, ...["Volume", "Format", "Capacity", "Allocated", "Used by", ""].map((t) => el("th", { text: t })))), tb),
      el("p", {}, name, size, fmt, create)));
  }
  if (!pools.length) box.textContent = "no pools defined (vessel pool-define)";
}

async function refreshNetworks() {
  const box = $("#networks");
  let nets;
  try {
    nets = await api("GET", "/v1/networks");
  } catch (e) {
    return showError(e);
  }
  box.replaceChildren();
  for (const n of nets) {
    const def = n.definition || {};
    const leases = (n.leases || []).map((l) => `${l.ip} ${l.mac}${l.hostname ? " " + l.hostname : ""}`).join("; ");
    box.append(el("p", { text: `${def.name} · ${def.address} on ${n.bridge} · ${n.active ? "active" : "inactive"}${leases ? " · leases: " + leases : ""}` }));
  }
  if (!nets.length) box.textContent = "no networks defined (vessel net-define)";
}

function refreshAll() {
  buildGraphs("#host-graphs", "host", [
    ["cpu", "CPU % busy", 100],
    ["mem", "Memory used MiB", 0],
    ["disk", "Disk KiB/s (read, write)", 0],
    ["net", "Network KiB/s (rx, tx)", 0],
  ]);
  refreshDomains();
  refreshPools();
  refreshNetworks();
}

// A link may carry the token and a domain to open in its fragment (never sent to the
// server): http://HOST:PORT/#token=TOKEN&domain=NAME. The token moves to sessionStorage
// and the fragment is cleared from the address bar.
(() => {
  const f = new URLSearchParams(location.hash.slice(1));
  if (f.get("token")) {
    S.token = f.get("token");
    sessionStorage.setItem("vessel-token", S.token);
  }
  if (f.get("domain")) S.selected = f.get("domain");
  if (location.hash) history.replaceState(null, "", location.pathname);
})();
tryStart().then(() => { if (S.running && S.selected) select(S.selected); });

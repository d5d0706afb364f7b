// p2pfl dashboard (`p2pfl monitor --web`) and simulator report (`p2pfl sim --html`).
// Plain script, no build step: uPlot draws the curves, Cytoscape the topology. Every text that
// comes from the network is set with textContent, never parsed as HTML.
"use strict";

const PALETTE = ["#2b6cb0", "#c05621", "#2f855a", "#9b2c2c", "#6b46c1", "#b7791f", "#2c7a7b",
  "#97266d", "#4a5568", "#276749"];
const LEVELS = ["debug", "info", "warning", "error", "critical"];

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function num(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}
// red (0) to green (1); grey when unknown
function accColor(acc) {
  return acc === null || acc === undefined ? "#a0a7b2" : "hsl(" + Math.round(120 * acc) + ",65%,42%)";
}

// ---- charts and graph, shared by both pages -------------------------------------------------

// A series labelled in `own` gets its own scale, drawn on the right (divergence is not in [0, 1]).
function lineChart(box, title, labels, time, yRange, own) {
  const series = [{}].concat(labels.map((label, i) => ({
    label: label, stroke: PALETTE[i % PALETTE.length], width: 2, spanGaps: true,
    scale: own === label ? "own" : "y",
  })));
  const axes = [{}, { scale: "y" }].concat(own ? [{ scale: "own", side: 1, grid: { show: false } }] : []);
  const opts = {
    title: title, width: Math.max(300, box.clientWidth - 10), height: 240, series: series, axes: axes,
    scales: { x: { time: time }, y: yRange ? { range: yRange } : {}, own: {} },
  };
  return new uPlot(opts, [[]].concat(labels.map(() => [])), box);
}

class Chart {
  constructor(box, title, time, yRange, own) { Object.assign(this, { box, title, time, yRange, own }); }
  set(labels, data) {
    const key = labels.join("\u0000");
    if (!this.plot || this.key !== key) {
      if (this.plot) this.plot.destroy();
      this.plot = lineChart(this.box, this.title, labels, this.time, this.yRange, this.own);
      this.key = key;
    }
    this.plot.setData(data);
  }
}

class Topology {
  constructor(box) {
    this.box = box;
    this.cy = cytoscape({
      container: box, userZoomingEnabled: false, boxSelectionEnabled: false,
      style: [
        { selector: "node", style: { "background-color": "data(color)", label: "data(id)",
          "font-size": 11, "text-valign": "bottom", "text-margin-y": 3 } },
        { selector: "edge", style: { width: 1.5, "line-color": "#8a94a6",
          "target-arrow-color": "#8a94a6", "target-arrow-shape": "triangle",
          "curve-style": "bezier" } },
      ],
    });
  }
  set(nodes, edges) {  // nodes: [{id, acc}], edges: [[src, dst]]
    const ids = new Set(nodes.map((n) => n.id));
    edges = edges.filter(([a, b]) => ids.has(a) && ids.has(b));
    const key = JSON.stringify([nodes.map((n) => n.id), edges]);
    if (key !== this.key) {
      this.key = key;
      this.cy.elements().remove();
      this.cy.add(nodes.map((n) => ({ data: { id: n.id, color: accColor(n.acc) } })));
      this.cy.add(edges.map(([a, b]) => ({ data: { id: a + "\u2192" + b, source: a, target: b } })));
      this.cy.layout({ name: "circle", padding: 20 }).run();
    }
    for (const n of nodes) this.cy.getElementById(n.id).data("color", accColor(n.acc));
    this.box.dataset.nodes = String(nodes.length);
    this.box.dataset.edges = String(edges.length);
  }
}

// ---- the live dashboard ---------------------------------------------------------------------

function dashboard() {
  const token = new URLSearchParams(location.search).get("token");
  const query = token ? "?token=" + encodeURIComponent(token) : "";
  const $ = (id) => document.getElementById(id);
  const globalChart = new Chart($("chart-global"), "", true, [0, 1], "divergence");
  const nodeChart = new Chart($("chart-nodes"), "", true, [0, 1]);
  const topology = new Topology($("topology"));
  let last = null;

  function renderRun(run, network) {
    $("network").textContent = network;
    $("run-name").textContent = run.name || "–";
    const tags = $("run-tags");
    tags.replaceChildren(...Object.entries(run.tags).map(([k, v]) => el("span", v ? k + "=" + v : k, "tag")));
    const conf = $("run-config");
    const entries = Object.entries(run.config);
    conf.replaceChildren(...(entries.length ? entries.flatMap(([k, v]) =>
      [el("dt", k), el("dd", typeof v === "object" ? JSON.stringify(v) : String(v))])
      : [el("dt", "–"), el("dd", "no node reports its configuration")]));
  }

  function renderNodes(nodes) {
    const rows = nodes.map((n) => {
      const tr = el("tr", null, n.status);
      tr.dataset.node = n.id;
      // A paused node says why (`--when` window, charging, ..., or `p2pfl pause`: manual).
      const status = n.status === "paused" && n.paused ? "paused: " + n.paused : n.status;
      const cells = [n.id, status, n.round ?? "–", num(n.accuracy, 4), num(n.loss, 4),
        num(n.epsilon, 2), n.cpu === null ? "–" : num(n.cpu, 0) + " %", bytes(n.rss),
        bytes(n.bytes_in), bytes(n.bytes_out), n.peers ?? "–"];
      cells.forEach((c, i) => tr.appendChild(el("td", String(c), i === 1 ? "status " + n.status : "")));
      return tr;
    });
    document.querySelector("#nodes tbody").replaceChildren(...rows);
  }

  function renderLogs(logs) {
    const min = LEVELS.indexOf($("log-level").value);
    const box = $("logs");
    const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    box.replaceChildren(...logs.filter((l) => LEVELS.indexOf(l.level) >= min).map((l) =>
      el("div", new Date(l.time * 1000).toISOString().slice(11, 19) + " " + l.node + " " +
        l.level.toUpperCase() + " " + l.logger + ": " + l.msg, l.level)));
    if (atEnd) box.scrollTop = box.scrollHeight;
  }

  function render(d) {
    if (!d.nodes) return;  // the monitor has not taken its first snapshot yet
    last = d;
    renderRun(d.run, d.network);
    for (const k of ["accuracy", "macro_f1", "divergence"]) $("g-" + k).textContent = num(d.global[k], 4);
    $("g-nodes").textContent = d.global.nodes;
    $("g-stale").textContent = d.global.stale;
    renderNodes(d.nodes);
    const h = d.history;
    globalChart.set(["accuracy", "macro-F1", "divergence"], [h.t, h.accuracy, h.macro_f1, h.divergence]);
    const ids = Object.keys(h.nodes);
    nodeChart.set(ids, [h.t].concat(ids.map((id) => h.nodes[id])));
    topology.set(d.nodes.filter((n) => !n.stale).map((n) => ({ id: n.id, acc: n.accuracy })), d.overlay);
    renderLogs(d.logs);
  }

  $("log-level").addEventListener("change", () => last && renderLogs(last.logs));
  fetch("api/snapshot" + query).then((r) => r.json()).then(render);
  const events = new EventSource("api/events" + query);
  events.onmessage = (e) => { $("live").textContent = "live"; $("live").className = "up"; render(JSON.parse(e.data)); };
  events.onerror = () => { $("live").textContent = "reconnecting…"; $("live").className = "down"; };
}

// ---- the simulator's report (p2pfl sim --html): data inlined in the page ------------------

function report(data) {
  for (const [i, s] of data.schedules.entries()) {
    new Chart(document.getElementById("curve-" + i), s.name + ": mean accuracy per round (min, max)", false, [0, 1])
      .set(["mean", "min", "max"], [s.round, s.mean, s.min, s.max]);
    const ids = Object.keys(s.nodes);
    new Chart(document.getElementById("nodes-" + i), s.name + ": accuracy per node", false, [0, 1])
      .set(ids, [s.round].concat(ids.map((id) => s.nodes[id])));
    new Topology(document.getElementById("topo-" + i))
      .set(s.ids.map((id) => ({ id: id, acc: s.final[id] })), s.edges);
  }
}

const reportData = document.getElementById("report-data");
if (reportData) report(JSON.parse(reportData.textContent));
else dashboard();

// The telemetry dashboard: /events sends the device table once a second
// (server-sent events; the browser reconnects by itself) and this
// instance's ingest state. The table shows every device's latest state; the
// chart plots the last minute of the devices reporting now.
//
// The chart's time axis is a recent window, by the devices' clocks, ending
// at the newest reading: drawn from every device's history instead, one
// device that went offline hours ago stretched the axis over those hours
// and squashed the live lines against its right edge.
"use strict";

const WINDOW_MS = 60_000;     // the chart shows this much time
const SHOWN = 8;              // devices drawn at most: reporting now, then by id
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const series = new Map();     // device id -> [{seq, ts (ms), t}], by seq
const backfilled = new Set(); // devices whose last minute was fetched

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function row(d) {
  const r = d.last_reading;
  const tr = document.createElement("tr");
  tr.dataset.device = d.id;
  const id = cell(d.id, "device");
  id.title = d.id;
  tr.append(
    id,
    // `offline`: it said goodbye; `lost`: its last will (it vanished).
    cell(d.status, d.online ? "online" : "offline"),
    cell(r ? r.temperature_c.toFixed(2) : "–", "num temperature"),
    cell(r ? r.humidity_pct.toFixed(1) : "–", "num"),
    cell(r ? r.battery_pct.toFixed(1) : "–", "num"),
    cell(r ? String(r.seq) : "–", "num seq"),
    cell(d.last_seen ? new Date(d.last_seen).toLocaleTimeString() : "–"),
  );
  return tr;
}

// Adds readings to a device's series, each once, in seq order, and forgets
// what fell out of the window.
function remember(id, readings) {
  const bySeq = new Map((series.get(id) || []).map((p) => [p.seq, p]));
  for (const r of readings) {
    if (!bySeq.has(r.seq)) bySeq.set(r.seq, { seq: r.seq, ts: Date.parse(r.ts), t: r.temperature_c });
  }
  const points = [...bySeq.values()].sort((a, b) => a.seq - b.seq);
  const newest = Math.max(...points.map((p) => p.ts));
  series.set(id, points.filter((p) => p.ts >= newest - WINDOW_MS));
}

// The last minute of a device newly on the chart, so that its line does
// not start from the moment the page was opened.
async function backfill(id, since) {
  backfilled.add(id);
  const query = `since=${encodeURIComponent(new Date(since).toISOString())}&limit=1000`;
  const response = await fetch(`/devices/${encodeURIComponent(id)}/readings?${query}`);
  if (response.ok) remember(id, await response.json());
}

// The devices to plot: those with a reading inside the window (ending at the
// newest reading of all), online first, then by id.
function chosen(devices) {
  const ts = (d) => (d.last_reading ? Date.parse(d.last_reading.ts) : -Infinity);
  const newest = Math.max(...devices.map(ts));
  return devices
    .filter((d) => ts(d) >= newest - WINDOW_MS)
    .sort((a, b) => Number(b.online) - Number(a.online) || a.id.localeCompare(b.id))
    .slice(0, SHOWN);
}

function render(devices) {
  document.getElementById("devices").replaceChildren(...devices.map(row));
  for (const d of devices) if (d.last_reading) remember(d.id, [d.last_reading]);
  const shown = chosen(devices);
  for (const d of shown) {
    if (!backfilled.has(d.id)) {
      backfill(d.id, Date.parse(d.last_reading.ts) - WINDOW_MS).then(() => draw(shown.map((s) => s.id)));
    }
  }
  draw(shown.map((d) => d.id));
}

// Sizes the canvas's pixels to its box, so that text and lines stay sharp.
function fit(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.round(canvas.clientWidth * ratio);
  const height = Math.round(canvas.clientHeight * ratio);
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return { ctx, width: canvas.clientWidth, height: canvas.clientHeight };
}

function draw(ids) {
  const canvas = document.getElementById("chart");
  const { ctx, width, height } = fit(canvas);
  ctx.clearRect(0, 0, width, height);
  const all = ids.flatMap((id) => series.get(id) || []);
  const right = Math.max(...all.map((p) => p.ts));
  const inWindow = (p) => p.ts >= right - WINDOW_MS;
  const visible = all.filter(inWindow);
  canvas.dataset.points = String(visible.length);
  const legend = [];
  if (visible.length) {
    // From the oldest reading shown (at most a window back) to the newest.
    const left = Math.min(...visible.map((p) => p.ts));
    const span = Math.max(right - left, 1000);
    const lo = Math.min(...visible.map((p) => p.t)) - 0.5;
    const hi = Math.max(...visible.map((p) => p.t)) + 0.5;
    const pad = { left: 48, right: 12, top: 14, bottom: 24 };
    const x = (ts) => pad.left + ((ts - (right - span)) * (width - pad.left - pad.right)) / span;
    const y = (t) => height - pad.bottom - ((t - lo) * (height - pad.top - pad.bottom)) / (hi - lo);
    axes(ctx, { width, height, pad, lo, hi, from: right - span, to: right });
    ids.forEach((id, n) => {
      const colour = COLOURS[n % COLOURS.length];
      const points = (series.get(id) || []).filter(inWindow);
      ctx.strokeStyle = colour;
      ctx.lineWidth = 2;
      ctx.beginPath();
      points.forEach((p, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(p.ts), y(p.t)));
      ctx.stroke();
      const entry = document.createElement("span");
      entry.style.color = colour;
      entry.dataset.device = id;
      entry.textContent = `■ ${id}`;
      legend.push(entry);
    });
  }
  document.getElementById("legend").replaceChildren(...legend);
}

function axes(ctx, { width, height, pad, lo, hi, from, to }) {
  ctx.fillStyle = "#666";
  ctx.font = "12px system-ui";
  ctx.textAlign = "left";
  ctx.fillText(`${hi.toFixed(1)} °C`, 2, pad.top);
  ctx.fillText(`${lo.toFixed(1)} °C`, 2, height - pad.bottom);
  ctx.fillText(new Date(from).toLocaleTimeString(), pad.left, height - 6);
  ctx.textAlign = "right";
  ctx.fillText(new Date(to).toLocaleTimeString(), width - pad.right, height - 6);
}

function showIngest(ingest) {
  const line = document.getElementById("ingest");
  line.textContent = `ingest ${ingest.client_id} · QoS ${ingest.qos} · received ${ingest.received} · stored ${ingest.stored} · inbox ${ingest.inbox} · shed ${ingest.shed}`;
  line.title = "received: this instance's share of the readings (each ingest of the group shows its own); shed: QoS 0 readings dropped because the inbox was full (Postgres slow or down)";
  line.className = ingest.shed > 0 ? "shedding" : "";
}

const status = document.getElementById("status");
const events = new EventSource("/events");
events.addEventListener("devices", (event) => {
  const devices = JSON.parse(event.data);
  status.textContent = `live: ${devices.length} device(s), ${devices.filter((d) => d.online).length} online`;
  status.className = "up";
  render(devices);
});
events.addEventListener("ingest", (event) => showIngest(JSON.parse(event.data)));
events.addEventListener("error", () => {
  status.textContent = "disconnected; reconnecting…";
  status.className = "";
});

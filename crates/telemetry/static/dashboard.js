// The telemetry dashboard: /events sends the device table once a second
// (server-sent events; the browser reconnects by itself). The table shows
// the latest state; the chart keeps each device's recent temperatures.
"use strict";

const HISTORY = 120;          // points per device on the chart
const SHOWN = 8;              // devices drawn, the first by id
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const series = new Map();     // device id -> [{seq, t}]

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function render(devices) {
  const rows = devices.map((d) => {
    const r = d.last_reading;
    const tr = document.createElement("tr");
    tr.dataset.device = d.id;
    tr.append(
      cell(d.id),
      cell(d.online ? "online" : "offline", d.online ? "online" : "offline"),
      cell(r ? r.temperature_c.toFixed(2) : "–", "num temperature"),
      cell(r ? r.humidity_pct.toFixed(1) : "–", "num"),
      cell(r ? r.battery_pct.toFixed(1) : "–", "num"),
      cell(r ? String(r.seq) : "–", "num seq"),
      cell(d.last_seen ? new Date(d.last_seen).toLocaleTimeString() : "–"),
    );
    if (r) {
      const points = series.get(d.id) || [];
      if (!points.length || points[points.length - 1].seq !== r.seq) {
        points.push({ seq: r.seq, t: r.temperature_c });
        if (points.length > HISTORY) points.shift();
      }
      series.set(d.id, points);
    }
    return tr;
  });
  document.getElementById("devices").replaceChildren(...rows);
  draw(devices.slice(0, SHOWN).map((d) => d.id));
}

function draw(ids) {
  const canvas = document.getElementById("chart");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const all = ids.flatMap((id) => (series.get(id) || []).map((p) => p.t));
  canvas.dataset.points = String(all.length);
  if (!all.length) return;
  let lo = Math.min(...all) - 0.5;
  let hi = Math.max(...all) + 0.5;
  const pad = 30;
  const x = (i) => pad + (i * (canvas.width - 2 * pad)) / (HISTORY - 1);
  const y = (t) => canvas.height - pad - ((t - lo) * (canvas.height - 2 * pad)) / (hi - lo);
  ctx.fillStyle = "#666";
  ctx.font = "12px system-ui";
  ctx.fillText(`${hi.toFixed(1)} °C`, 2, pad - 8);
  ctx.fillText(`${lo.toFixed(1)} °C`, 2, canvas.height - 8);
  const legend = [];
  ids.forEach((id, n) => {
    const points = series.get(id) || [];
    const colour = COLOURS[n % COLOURS.length];
    ctx.strokeStyle = colour;
    ctx.lineWidth = 2;
    ctx.beginPath();
    const offset = HISTORY - points.length;
    points.forEach((p, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(offset + i), y(p.t)));
    ctx.stroke();
    const span = document.createElement("span");
    span.style.color = colour;
    span.textContent = `■ ${id}`;
    legend.push(span);
  });
  document.getElementById("legend").replaceChildren(...legend);
}

const status = document.getElementById("status");
const events = new EventSource("/events");
events.addEventListener("devices", (event) => {
  const devices = JSON.parse(event.data);
  status.textContent = `live: ${devices.length} device(s), ${devices.filter((d) => d.online).length} online`;
  status.className = "up";
  render(devices);
});
events.addEventListener("error", () => {
  status.textContent = "disconnected; reconnecting…";
  status.className = "";
});

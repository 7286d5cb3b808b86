// Charts: time series with uPlot, distributions as bars, positions as an
// SVG map. Every chart has a text equivalent for screen readers.
import uPlot from "../vendor/uplot-1.6.32/uPlot.esm.js";
import { el } from "./dom.js";

const palette = ["#1f6feb", "#d4471f", "#1a7f37", "#8250df", "#bf8700", "#0a7f88", "#cf222e", "#57606a"];

// timeChart draws series over time into box. times are Date or ms;
// series: [{label, values}]. Returns the uPlot instance (or null without
// data).
export function timeChart(box, { title, times, series, unit = "", height = 180 }) {
  box.replaceChildren();
  box.setAttribute("role", "img");
  const last = series.map((s) => `${s.label} ${fmt(s.values[s.values.length - 1])}${unit}`).join(", ");
  box.setAttribute("aria-label", `${title}: ${times.length} points${times.length ? "; latest " + last : ""}`);
  if (!times.length) {
    box.append(el("p", { class: "muted" }, "No data in this range yet."));
    return null;
  }
  const width = Math.max(280, box.clientWidth || 600);
  const data = [times.map((t) => (t instanceof Date ? t.getTime() : t) / 1000), ...series.map((s) => s.values)];
  const opts = {
    width, height, title,
    series: [{}, ...series.map((s, i) => ({ label: s.label, stroke: palette[i % palette.length], width: 2, spanGaps: true,
      value: (u, v) => (v == null ? "–" : fmt(v) + unit) }))],
    axes: [{}, { size: 64, values: (u, vals) => vals.map((v) => fmt(v) + unit) }],
    legend: { live: true },
  };
  const u = new uPlot(opts, data, box);
  box.dataset.points = String(times.length);
  return u;
}

function fmt(v) {
  if (v == null || Number.isNaN(v)) return "–";
  return Math.abs(v) >= 100 || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(1);
}

// bars draws labelled counts as horizontal bars (a list: readable as is).
export function bars(box, entries, { unit = "" } = {}) {
  box.replaceChildren();
  const ul = el("ul", { class: "bars" });
  const max = Math.max(1, ...entries.map((e) => e[1]));
  for (const [label, n] of entries) {
    const bar = el("span", { class: "bar", "aria-hidden": "true" });
    bar.style.width = (n / max) * 100 + "%";
    ul.append(el("li", {}, el("span", { class: "bar-label" }, label + unit), el("span", { class: "bar-track" }, bar), el("span", { class: "bar-n" }, String(n))));
  }
  if (!entries.length) ul.append(el("li", { class: "muted" }, "none"));
  box.append(ul);
}

// progress is a labelled progress bar.
export function progress(value, max, label) {
  const p = el("progress", { value: String(value), max: String(Math.max(1, max)), "aria-label": label });
  p.textContent = `${value} of ${max}`;
  return p;
}

// positionMap draws devices at their latitude and longitude, grouped by
// their base label, on an equirectangular projection fitted to them.
export function positionMap(box, devices, { group = "base" } = {}) {
  box.replaceChildren();
  const pts = devices.filter((d) => d.latest && d.latest.latitude != null && d.latest.longitude != null);
  if (!pts.length) {
    box.append(el("p", { class: "muted" }, "No positions reported yet."));
    return;
  }
  const lats = pts.map((d) => d.latest.latitude), lons = pts.map((d) => d.latest.longitude);
  let [minLat, maxLat, minLon, maxLon] = [Math.min(...lats), Math.max(...lats), Math.min(...lons), Math.max(...lons)];
  const padLat = Math.max(0.005, (maxLat - minLat) * 0.08), padLon = Math.max(0.005, (maxLon - minLon) * 0.08);
  minLat -= padLat; maxLat += padLat; minLon -= padLon; maxLon += padLon;
  const W = 600, H = 320;
  const kx = Math.cos(((minLat + maxLat) / 2) * Math.PI / 180);
  const sx = W / ((maxLon - minLon) * kx || 1), sy = H / (maxLat - minLat || 1), s = Math.min(sx, sy);
  const x = (lon) => (lon - minLon) * kx * s, y = (lat) => H - (lat - minLat) * s;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  const groups = new Map();
  for (const d of pts) {
    const g = (d.labels && d.labels[group]) || "no " + group;
    if (!groups.has(g)) groups.set(g, []);
    groups.get(g).push(d);
  }
  const summary = [];
  let i = 0;
  for (const [g, ds] of groups) {
    const color = palette[i++ % palette.length];
    const cx = ds.reduce((a, d) => a + x(d.latest.longitude), 0) / ds.length, cy = ds.reduce((a, d) => a + y(d.latest.latitude), 0) / ds.length;
    for (const d of ds) {
      const c = document.createElementNS(ns, "circle");
      c.setAttribute("cx", x(d.latest.longitude).toFixed(1));
      c.setAttribute("cy", y(d.latest.latitude).toFixed(1));
      c.setAttribute("r", "3");
      c.setAttribute("fill", d.online ? color : "none");
      c.setAttribute("stroke", color);
      const t = document.createElementNS(ns, "title");
      t.textContent = `${d.id} (${d.online ? "online" : "offline"})`;
      c.append(t);
      svg.append(c);
    }
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", cx.toFixed(1));
    label.setAttribute("y", (cy - 8).toFixed(1));
    label.setAttribute("class", "map-label");
    label.textContent = `${g} (${ds.length})`;
    svg.append(label);
    summary.push(`${g}: ${ds.length} drones, ${ds.filter((d) => d.online).length} online`);
  }
  svg.setAttribute("aria-label", "Drone positions by base. " + summary.join("; "));
  box.append(svg, el("p", { class: "muted small" }, "Filled: online; ring: offline. " + summary.join(" · ")));
}

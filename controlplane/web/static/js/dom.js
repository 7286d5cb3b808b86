// Small DOM helpers: elements are built with textContent, never innerHTML,
// so that what devices report (ids, versions, messages) cannot inject
// markup.

export const $ = (s, root = document) => root.querySelector(s);
export const $$ = (s, root = document) => [...root.querySelectorAll(s)];

// el(tag, attrs, ...children): children are nodes or strings.
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

export function ago(t) {
  if (!t) return "never";
  const s = Math.round((Date.now() - new Date(t).getTime()) / 1000);
  const a = Math.abs(s);
  const txt = a < 60 ? a + " s" : a < 3600 ? Math.round(a / 60) + " min" : a < 86400 ? Math.round(a / 3600) + " h" : Math.round(a / 86400) + " d";
  return s >= 0 ? txt + " ago" : "in " + txt;
}

export function when(t) {
  if (!t) return "–";
  const d = new Date(t);
  return el("time", { datetime: d.toISOString(), title: d.toLocaleString() }, ago(t));
}

export function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + u[i];
}

export function duration(sec) {
  if (sec == null) return "–";
  const s = Math.round(sec);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}

export function labels(m) {
  return Object.entries(m || {}).sort().map(([k, v]) => k + "=" + v).join(", ");
}

// table builds a table with a caption, headers and rows of cells.
export function table(caption, headers, rows, attrs = {}) {
  const t = el("table", attrs);
  if (caption) t.append(el("caption", {}, caption));
  t.append(el("thead", {}, el("tr", {}, headers.map((h) => (h instanceof Node ? h : el("th", { scope: "col" }, h))))));
  const tb = el("tbody");
  for (const r of rows) tb.append(r instanceof Node ? r : el("tr", {}, r.map((c) => el("td", {}, c))));
  t.append(tb);
  return t;
}

// announce tells screen readers about a change.
export function announce(msg) {
  const box = $("#announce");
  if (box) { box.textContent = ""; setTimeout(() => { box.textContent = msg; }, 50); }
}

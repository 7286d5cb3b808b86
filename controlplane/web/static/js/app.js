// hangar console: a single page over the REST API. Views are built from
// the API's JSON and refreshed only when the live stream says their data
// changed; no view polls.
import * as api from "./api.js";
import { $, $$, el, ago, when, bytes, duration, labels, table, announce } from "./dom.js";
import { timeChart, bars, progress, positionMap } from "./charts.js";

const RANK = { viewer: 1, operator: 2, admin: 3 };
let me = null; // {name, role}
const can = (role) => me && RANK[me.role] >= RANK[role];

// ---- sign in and out ----

function showLogin(msg) {
  me = null;
  api.stopLive();
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = msg || "";
  $("#token").focus();
}

api.whenUnauthorized((msg) => { api.signOut(); showLogin(msg); });

async function signIn() {
  try {
    me = await api.get("/api/v1/whoami");
  } catch (e) {
    if (!(e instanceof api.APIError) || e.status !== 401) showLogin(String(e.message || e));
    return;
  }
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#me").textContent = `${me.name} (${me.role})`;
  document.body.dataset.role = me.role;
  for (const a of $$("[data-needs]")) a.hidden = !can(a.dataset.needs);
  api.startLive();
  route();
}

$("#login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = $("#token").value.trim();
  if (!t) return;
  api.setToken(t, $("#remember").checked);
  $("#token").value = "";
  signIn();
});
$("#signout").addEventListener("click", () => { api.signOut(); showLogin("Signed out."); });
api.onLiveStatus((s) => { const b = $("#live"); b.textContent = s === "live" ? "● live" : "○ reconnecting"; b.className = s; });

// ---- routing ----

let view = null; // {name, refresh(topics, change), stop()}
let unlisten = null;

const views = { overview, devices, device, releases, rollouts, rollout, events, audit, delivery, tokens };

function parseHash() {
  const h = location.hash.replace(/^#\/?/, "") || "overview";
  const [path, query] = h.split("?");
  const [name, ...rest] = path.split("/");
  return { name, arg: rest.map(decodeURIComponent).join("/"), q: new URLSearchParams(query || "") };
}

export function go(hash) { location.hash = hash; }

async function route() {
  if (!me) return;
  const { name, arg, q } = parseHash();
  const fn = views[name] || overview;
  if (view && view.stop) view.stop();
  if (unlisten) unlisten();
  for (const a of $$("nav a")) a.setAttribute("aria-current", a.dataset.view === name ? "page" : "false");
  const main = $("#view");
  main.replaceChildren(el("p", { class: "muted" }, "Loading…"));
  main.dataset.view = name;
  try {
    view = (await fn(main, arg, q)) || {};
  } catch (e) {
    main.replaceChildren(el("p", { class: "error", role: "alert" }, "Could not load: " + e.message));
    main.dataset.ready = "error";
    return;
  }
  main.dataset.ready = "true";
  let pending = null, timer = null;
  // Changes are coalesced per view: at most one refresh a second.
  unlisten = api.onChange((ch) => {
    if (!view.topics || !ch.topics.some((t) => view.topics.includes(t))) return;
    pending = pending ? { topics: [...new Set([...pending.topics, ...ch.topics])], events: [...pending.events, ...(ch.events || [])], truncated: pending.truncated || !!ch.truncated }
      : { topics: ch.topics, events: ch.events || [], truncated: !!ch.truncated };
    if (timer) return;
    timer = setTimeout(async () => {
      const p = pending; pending = null; timer = null;
      try { await view.refresh(p); main.dataset.refreshed = String(Number(main.dataset.refreshed || 0) + 1); } catch (e) { console.error(e); }
    }, 300);
  });
  const h1 = main.querySelector("h2");
  if (h1) { h1.tabIndex = -1; h1.focus({ preventScroll: true }); }
}

window.addEventListener("hashchange", route);

// ---- dialogs ----

// confirmAction asks for confirmation and a reason; resolves to the reason
// ("" allowed when not required) or null when cancelled.
function confirmAction(title, detail, { reasonRequired = false, danger = false } = {}) {
  return new Promise((resolve) => {
    const dlg = $("#confirm");
    $("#confirm-title").textContent = title;
    $("#confirm-detail").textContent = detail || "";
    const reason = $("#confirm-reason");
    reason.value = "";
    reason.required = reasonRequired;
    const ok = $("#confirm-ok");
    ok.className = danger ? "danger" : "primary";
    const done = (v) => { dlg.close(); resolve(v); };
    $("#confirm-form").onsubmit = (ev) => { ev.preventDefault(); if (reasonRequired && !reason.value.trim()) { reason.focus(); return; } done(reason.value.trim()); };
    $("#confirm-cancel").onclick = () => done(null);
    dlg.oncancel = () => resolve(null);
    dlg.showModal();
    reason.focus();
  });
}

function flash(box, msg, ok = true) {
  box.replaceChildren(el("p", { class: ok ? "ok" : "error", role: ok ? "status" : "alert" }, msg));
  announce(msg);
}

// ---- overview ----

const RANGES = [["1h", 3600], ["6h", 6 * 3600], ["24h", 86400], ["7d", 7 * 86400]];

async function overview(main) {
  main.replaceChildren(
    el("h2", {}, "Fleet overview"),
    el("div", { class: "cards", id: "cards" }),
    el("div", { class: "grid2" },
      el("section", { class: "panel" }, el("h3", {}, "Online over time"), el("div", { id: "chart-online", class: "chart" })),
      el("section", { class: "panel" }, el("h3", {}, "Version adoption"), el("div", { id: "chart-versions", class: "chart" }))),
    el("div", { class: "grid3" },
      el("section", { class: "panel" }, el("h3", {}, "Battery (online)"), el("div", { id: "battery" })),
      el("section", { class: "panel" }, el("h3", {}, "Error counters (online)"), el("div", { id: "errors" })),
      el("section", { class: "panel" }, el("h3", {}, "Versions now"), el("div", { id: "versions" }))),
    el("div", { class: "grid2" },
      el("section", { class: "panel" }, el("h3", {}, "Active rollouts"), el("div", { id: "active" })),
      el("section", { class: "panel" }, el("h3", {}, "Alerts"), el("div", { id: "alerts" }))),
    el("section", { class: "panel" }, el("h3", {}, "Positions around the bases"), el("div", { id: "map" })));
  const health = async () => {
    const h = await api.get("/api/v1/fleet/health");
    const card = (id, n, what) => el("div", { class: "card", id }, el("div", { class: "big" }, String(n)), el("div", {}, what));
    $("#cards").replaceChildren(card("c-online", h.online, `online of ${h.devices - h.revoked}`), card("c-flying", h.flying, "flying"),
      card("c-lowbatt", h.low_battery, "battery under 20%"), card("c-revoked", h.revoked, "revoked"));
    bars($("#battery"), h.battery.map((b) => [b.label, b.count]), { unit: "%" });
    bars($("#errors"), h.errors.map((b) => [b.label, b.count]));
    bars($("#versions"), Object.entries(h.versions).sort((a, b) => b[1] - a[1]));
  };
  const history = async () => {
    const hs = await api.get("/api/v1/fleet/history?from=-24h&points=300");
    const times = hs.map((h) => new Date(h.time));
    timeChart($("#chart-online"), { title: "Online devices, last 24 h", times, series: [
      { label: "online", values: hs.map((h) => h.online) }, { label: "enrolled", values: hs.map((h) => h.devices - h.revoked) }] });
    const top = new Map();
    for (const h of hs) for (const [v, n] of Object.entries(h.versions || {})) top.set(v, Math.max(top.get(v) || 0, n));
    const vs = [...top.entries()].sort((a, b) => b[1] - a[1]).slice(0, 6).map((e) => e[0]);
    timeChart($("#chart-versions"), { title: "Devices per version, last 24 h", times, series: vs.map((v) => ({ label: v, values: hs.map((h) => (h.versions || {})[v] || 0) })) });
  };
  const active = async () => {
    const rs = (await api.get("/api/v1/rollouts")) || [];
    const live = rs.filter((r) => !["completed", "aborted"].includes(r.state.status) || r.state.reverting);
    const box = $("#active");
    if (!live.length) { box.replaceChildren(el("p", { class: "muted" }, "No rollout in progress.")); return; }
    const ul = el("ul", { class: "plain" });
    for (const r of live.slice(0, 8)) {
      ul.append(el("li", {}, el("a", { href: "#rollout/" + encodeURIComponent(r.spec.id) }, r.spec.id), ` ${r.spec.release.target}@${r.spec.release.version} `,
        el("span", { class: "status s-" + cls(r.state.status) }, r.state.status), ` stage ${r.state.stage + 1} of ${r.spec.stages.length} `,
        progress(r.state.stage + (r.state.status === "completed" ? 1 : 0), r.spec.stages.length, `stage of ${r.spec.id}`)));
    }
    box.replaceChildren(ul);
  };
  const alerts = async () => {
    const evs = await api.get("/api/v1/events?severity=warning&limit=8");
    $("#alerts").replaceChildren(evs.length ? eventTable(evs, "") : el("p", { class: "muted" }, "No warnings."));
  };
  const map = async () => {
    const ds = await api.get("/api/v1/devices?limit=2000");
    positionMap($("#map"), ds);
  };
  await Promise.all([health(), history(), active(), alerts(), map()]);
  return {
    topics: ["fleet", "rollouts", "events", "telemetry"],
    async refresh({ topics }) {
      const jobs = [];
      if (topics.includes("fleet") || topics.includes("telemetry")) jobs.push(health());
      if (topics.includes("fleet")) jobs.push(history());
      if (topics.includes("rollouts")) jobs.push(active());
      if (topics.includes("events")) jobs.push(alerts());
      if (topics.includes("telemetry")) jobs.push(map());
      await Promise.all(jobs);
    },
  };
}

// ---- devices ----

const PAGE = 50;

async function devices(main, _arg, q) {
  const st = { q: q.get("q") || "", selector: q.get("selector") || "", version: q.get("version") || "", online: q.get("online") || "",
    sort: q.get("sort") || "id", offset: Number(q.get("offset") || 0) };
  const form = el("form", { class: "filters", id: "device-filters", role: "search" },
    field("Search id", el("input", { id: "f-q", type: "search", value: st.q, placeholder: "sim-0001" })),
    field("Labels", el("input", { id: "f-selector", value: st.selector, placeholder: "hw=rev-b,base=zurich" })),
    field("Version", el("input", { id: "f-version", value: st.version, size: "10" })),
    field("Status", el("select", { id: "f-online" }, opt("", "any", st.online), opt("true", "online", st.online), opt("false", "offline", st.online))),
    el("button", { type: "submit" }, "Apply"));
  const out = el("div", { id: "device-list" });
  main.replaceChildren(el("h2", {}, "Devices"), form, out);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    st.q = $("#f-q").value.trim(); st.selector = $("#f-selector").value.trim(); st.version = $("#f-version").value.trim(); st.online = $("#f-online").value; st.offset = 0;
    sync();
  });
  const sync = () => {
    const p = new URLSearchParams();
    for (const [k, v] of Object.entries(st)) if (v !== "" && !(k === "offset" && v === 0) && !(k === "sort" && v === "id")) p.set(k, v);
    history.replaceState(null, "", "#devices" + (p.toString() ? "?" + p : ""));
    load();
  };
  const load = async () => {
    const p = new URLSearchParams({ limit: PAGE, offset: st.offset, sort: st.sort });
    for (const k of ["q", "selector", "version", "online"]) if (st[k]) p.set(k, st[k]);
    const ds = await api.get("/api/v1/devices?" + p);
    const total = ds.total ?? ds.length;
    const sortable = [["id", "ID"], ["version", "Version"], ["hardware", "Hardware"], ["last_seen", "Last seen"]];
    const th = (key, label) => {
      const active = st.sort === key || st.sort === "-" + key;
      const desc = st.sort === "-" + key;
      return el("th", { scope: "col", "aria-sort": active ? (desc ? "descending" : "ascending") : "none" },
        el("button", { class: "sort", type: "button", "data-sort": key, onclick: () => { st.sort = st.sort === key ? "-" + key : key; st.offset = 0; sync(); } },
          label, active ? (desc ? " ▼" : " ▲") : ""));
    };
    const rows = ds.map((d) => {
      const l = d.latest || {};
      return el("tr", {}, el("td", {}, el("a", { href: "#device/" + encodeURIComponent(d.id) }, d.id)),
        el("td", {}, el("span", { class: d.online ? "on" : "off" }, d.revoked ? "revoked" : d.awaiting_enrollment ? "not enrolled" : d.online ? "online" : "offline")),
        el("td", {}, d.version || "–"), el("td", {}, d.hardware || "–"), el("td", {}, labels(d.labels)),
        el("td", {}, l.battery_pct != null ? Math.round(l.battery_pct) + "%" : "–"), el("td", {}, l.flight_state || "–"), el("td", {}, when(d.last_seen)));
    });
    const headers = [th("id", "ID"), el("th", { scope: "col" }, "Status"), th("version", "Version"), th("hardware", "Hardware"), el("th", { scope: "col" }, "Labels"),
      el("th", { scope: "col" }, "Battery"), el("th", { scope: "col" }, "Flight"), th("last_seen", "Last seen")];
    void sortable;
    const from = total ? st.offset + 1 : 0, to = st.offset + ds.length;
    const pager = el("nav", { class: "pager", "aria-label": "pages" },
      el("button", { id: "pager-prev", type: "button", disabled: st.offset === 0, onclick: () => { st.offset = Math.max(0, st.offset - PAGE); sync(); } }, "← Previous"),
      el("span", { id: "page-info", "aria-live": "polite" }, `${from}–${to} of ${total}`),
      el("button", { id: "pager-next", type: "button", disabled: to >= total, onclick: () => { st.offset += PAGE; sync(); } }, "Next →"));
    out.replaceChildren(table(`Devices ${from}–${to} of ${total}`, headers, rows, { id: "devices-table" }), pager);
    out.dataset.total = String(total);
    out.dataset.offset = String(st.offset);
  };
  await load();
  return { topics: ["fleet", "telemetry"], refresh: load };
}

function field(label, input) {
  const id = input.id || "f-" + Math.random().toString(36).slice(2);
  input.id = id;
  return el("span", { class: "field" }, el("label", { for: id }, label), input);
}

function opt(value, label, current) { return el("option", { value, selected: value === current }, label); }

// ---- device page ----

async function device(main, id) {
  const d = await api.get("/api/v1/devices/" + encodeURIComponent(id));
  const range = { s: 3600 };
  const head = el("div", { id: "device-head" });
  const charts = el("div", { class: "grid2", id: "device-charts" });
  const rangeSel = el("select", { id: "range" }, RANGES.map(([l, s]) => el("option", { value: String(s), selected: s === range.s }, l)));
  const actions = el("div", { id: "device-actions" });
  const msg = el("div", { id: "device-msg", "aria-live": "polite" });
  const ups = el("div", { id: "device-updates" });
  const evs = el("div", { id: "device-events" });
  main.replaceChildren(el("h2", {}, "Device ", el("span", { class: "mono" }, id)), head, actions, msg,
    el("section", { class: "panel" }, el("h3", {}, "Telemetry ", field("Range", rangeSel)), charts),
    el("div", { class: "grid2" }, el("section", { class: "panel" }, el("h3", {}, "Update history"), ups), el("section", { class: "panel" }, el("h3", {}, "Events"), evs)));
  const showHead = (d) => {
    const l = d.latest || {};
    const dl = el("dl", { class: "facts" });
    const fact = (k, v) => dl.append(el("dt", {}, k), el("dd", {}, v));
    fact("Status", d.revoked ? "revoked" : d.online ? "online" : "offline");
    fact("Version", d.version || "–");
    fact("Hardware", d.hardware || "–");
    fact("Last seen", when(d.last_seen));
    fact("Battery", l.battery_pct != null ? Math.round(l.battery_pct) + "%" : "–");
    fact("Flight", l.flight_state || "–");
    fact("Position", l.latitude != null ? `${l.latitude.toFixed(5)}, ${l.longitude.toFixed(5)}` : "–");
    fact("Authentication", d.auth || "–");
    fact("Payloads", labels(d.payloads) || "–");
    fact("Delta updates", d.delta_max ? `patches builds up to ${bytes(d.delta_max)}` : "full artifacts only");
    fact("Labels", labels(d.labels) || "none");
    if (d.hardware_mismatch) fact("Attention", "hw label and reported hardware differ");
    head.replaceChildren(dl);
  };
  showHead(d);
  // Actions by role.
  if (can("operator")) {
    const set = el("input", { id: "label-set", placeholder: "k=v,k2=v2" });
    const rm = el("input", { id: "label-remove", placeholder: "k,k2" });
    const lform = el("form", { class: "inline", id: "label-form" }, field("Set labels", set), field("Remove labels", rm), el("button", { type: "submit" }, "Save labels"));
    lform.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = { set: {}, remove: rm.value.split(",").map((s) => s.trim()).filter(Boolean) };
      for (const kv of set.value.split(",").map((s) => s.trim()).filter(Boolean)) {
        const i = kv.indexOf("=");
        if (i < 1) { flash(msg, `"${kv}" is not k=v`, false); return; }
        body.set[kv.slice(0, i)] = kv.slice(i + 1);
      }
      try {
        await api.call("PATCH", "/api/v1/devices/" + encodeURIComponent(id) + "/labels", body);
        showHead(await api.get("/api/v1/devices/" + encodeURIComponent(id)));
        set.value = ""; rm.value = "";
        flash(msg, "Labels saved.");
      } catch (e) { flash(msg, e.message, false); }
    });
    const rels = (await api.get("/api/v1/releases").catch(() => [])) || [];
    const relSel = el("select", { id: "update-release" }, rels.map((r) => el("option", { value: r.target + "@" + r.version }, `${r.target}@${r.version}`)));
    const fullBox = el("input", { id: "update-full", type: "checkbox" });
    const uform = el("form", { class: "inline", id: "update-form" }, field("Release", relSel), field("Full artifact only", fullBox), el("button", { type: "submit", disabled: !rels.length }, "Update this device"));
    uform.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const reason = await confirmAction(`Update ${id} to ${relSel.value}?`, "The device installs it when it is on the ground and healthy.");
      if (reason === null) return;
      try {
        const r = await api.call("POST", "/api/v1/devices/" + encodeURIComponent(id) + "/update", { release: relSel.value, reason, full: fullBox.checked || undefined });
        flash(msg, `Update to ${relSel.value} offered: ` + (r.delta ? `a delta from ${deltaBase(r.delta)}, ${bytes(r.size)} (the full artifact is its fallback).` : `the full artifact, ${bytes(r.size)}.`));
        loadUpdates();
      } catch (e) { flash(msg, e.message, false); }
    });
    actions.append(lform, uform);
  }
  if (can("admin") && !d.revoked) {
    actions.append(el("button", { class: "danger", type: "button", id: "revoke", onclick: async () => {
      const reason = await confirmAction(`Revoke ${id}?`, "Its credential stops working at once; it must enroll again (hangar device rekey).", { reasonRequired: true, danger: true });
      if (reason === null) return;
      try { await api.call("DELETE", "/api/v1/devices/" + encodeURIComponent(id) + "?reason=" + encodeURIComponent(reason)); flash(msg, `${id} revoked.`); showHead(await api.get("/api/v1/devices/" + encodeURIComponent(id))); } catch (e) { flash(msg, e.message, false); }
    } }, "Revoke device"));
  }
  const loadTelemetry = async () => {
    const to = new Date(), from = new Date(to.getTime() - range.s * 1000);
    const t = await api.get(`/api/v1/devices/${encodeURIComponent(id)}/telemetry?from=${from.toISOString()}&to=${to.toISOString()}&points=600`);
    const ss = t.samples || [];
    const times = ss.map((s) => new Date(s.time));
    charts.replaceChildren(...["battery", "temperature", "link", "errors"].map((k) => el("div", { class: "chart", id: "chart-" + k })));
    timeChart($("#chart-battery"), { title: "Battery", times, unit: "%", series: [{ label: "battery", values: ss.map((s) => s.battery_pct) }] });
    timeChart($("#chart-temperature"), { title: "Temperature", times, unit: " °C", series: [{ label: "temperature", values: ss.map((s) => s.temperature_c) }] });
    timeChart($("#chart-link"), { title: "Link quality", times, unit: "%", series: [{ label: "link", values: ss.map((s) => s.link_quality_pct) }] });
    timeChart($("#chart-errors"), { title: "Errors and reboots (counters)", times, series: [{ label: "errors", values: ss.map((s) => s.errors) }, { label: "reboots", values: ss.map((s) => s.reboots) }] });
  };
  const loadUpdates = async () => {
    const us = await api.get(`/api/v1/devices/${encodeURIComponent(id)}/updates`);
    ups.replaceChildren(us.length ? table("", ["Release", "State", "Via", "Why", "Rollout", "When"], us.map((u) => [`${u.target}@${u.version}`,
      el("span", { class: "state st-" + cls(u.state) }, u.state), via(u), u.reason || u.check || "", u.rollout ? el("a", { href: "#rollout/" + encodeURIComponent(u.rollout) }, u.rollout) : "–", when(u.updated)])) :
      el("p", { class: "muted" }, "No updates yet."));
  };
  const loadEvents = async () => {
    const es = await api.get(`/api/v1/devices/${encodeURIComponent(id)}/events?limit=50`);
    evs.replaceChildren(es.length ? eventTable(es, id) : el("p", { class: "muted" }, "No events."));
  };
  rangeSel.addEventListener("change", () => { range.s = Number(rangeSel.value); loadTelemetry(); });
  await Promise.all([loadTelemetry(), loadUpdates(), loadEvents()]);
  return {
    topics: ["telemetry", "events", "fleet"],
    async refresh({ topics, events }) {
      const jobs = [];
      if (topics.includes("telemetry")) jobs.push(loadTelemetry());
      if (topics.includes("fleet") || topics.includes("telemetry")) jobs.push(api.get("/api/v1/devices/" + encodeURIComponent(id)).then(showHead));
      if (topics.includes("events") && events.some((e) => e.device === id)) jobs.push(loadEvents(), loadUpdates());
      await Promise.all(jobs);
    },
  };
}

// via says how a device fetched a release, from its report: the full
// artifact, a delta, or a delta given up for the full artifact (and why).
function via(u) {
  if (u.fallback) return el("span", { class: "via via-fallback", title: u.fallback }, `delta→full (${u.fallback})`);
  if (u.patch) return el("span", { class: "via via-delta" }, `delta ${bytes(u.patch)}`);
  return "full";
}

// deltaBase names a delta's base build: its version, else its digest.
const deltaBase = (d) => d.base_version || d.base_sha256.slice(0, 12);

// transferText says what offers send: deltas, full artifacts, and the
// bytes saved.
function transferText(t) {
  if (!t) return "";
  const saved = t.saved_bytes >= 0 ? `${bytes(t.saved_bytes)} saved` : `${bytes(-t.saved_bytes)} more than full artifacts`;
  return `delta to ${t.delta} (${bytes(t.delta_bytes)}), full to ${t.full} (${bytes(t.full_bytes)})` +
    (t.fallback ? `, ${t.fallback} fell back to the full artifact` : "") + `, ${saved}`;
}

// cls makes a CSS class word of a value a device reported.
const cls = (v) => String(v || "").replace(/[^a-z_-]/g, "");

function eventWhat(e) {
  if (e.update) return `${e.update.target} ${e.update.version}: ${e.update.state}${e.update.reason ? " (" + e.update.reason + ")" : ""}`;
  return e.message || e.code || "";
}

function eventRow(e, device) {
  const cells = [when(e.time)];
  if (!device) cells.push(el("a", { href: "#device/" + encodeURIComponent(e.device) }, e.device));
  cells.push(e.kind, el("span", { class: "sev sev-" + cls(e.severity) }, e.severity), eventWhat(e));
  return el("tr", { "data-id": String(e.id) }, cells.map((c) => el("td", {}, c)));
}

function eventTable(evs, device, attrs = {}) {
  const h = device ? ["When", "Kind", "Severity", "What"] : ["When", "Device", "Kind", "Severity", "What"];
  return table("", h, evs.map((e) => eventRow(e, device)), attrs);
}

// ---- releases ----

async function releases(main) {
  const box = el("div", { id: "release-list" });
  main.replaceChildren(el("h2", {}, "Releases"), box);
  const load = async () => {
    const [rs, h] = await Promise.all([api.get("/api/v1/releases"), api.get("/api/v1/fleet/health")]);
    box.replaceChildren((rs || []).length ? table("Signed releases pushed to this control plane", ["Release", "Counter", "Hardware", "Architecture", "Key", "Expires", "Size", "Deltas", "Running it", "Pushed"],
      rs.map((r) => [`${r.target}@${r.version}`, String(r.counter), (r.hardware || []).join(", ") || "any", (r.arch || []).join(", ") || "any", el("span", { class: "mono" }, r.key_id),
        when(r.expires), bytes(r.size), (r.deltas || []).map((d) => `from ${deltaBase(d)}: ${bytes(d.patch_size)}`).join(", ") || "–", String((r.target === "agent" && h.versions[r.version]) || 0), el("span", {}, when(r.pushed_at), " by ", r.pushed_by)]), { id: "releases-table" }) :
      el("p", { class: "muted" }, "No release pushed yet: hangar release sign, then hangar release push."));
  };
  await load();
  return { topics: ["releases", "fleet"], refresh: load };
}

// ---- rollouts ----

async function rollouts(main) {
  const list = el("div", { id: "rollout-list" });
  const create = el("section", { class: "panel", id: "rollout-create" });
  main.replaceChildren(el("h2", {}, "Rollouts"), list, can("operator") ? create : "");
  const load = async () => {
    const rs = (await api.get("/api/v1/rollouts")) || [];
    list.replaceChildren(rs.length ? table("", ["Rollout", "Release", "Status", "Stage", "Created", "Why"], rs.map((r) => [
      el("a", { href: "#rollout/" + encodeURIComponent(r.spec.id) }, r.spec.id), `${r.spec.release.target}@${r.spec.release.version}`,
      el("span", { class: "status s-" + cls(r.state.status) }, r.state.status + (r.state.reverting ? " (reverting)" : "")),
      `${Math.min(r.state.stage + 1, r.spec.stages.length)} of ${r.spec.stages.length}`, el("span", {}, when(r.created), " by ", r.created_by), r.state.reason || ""]), { id: "rollouts-table" }) :
      el("p", { class: "muted" }, "No rollouts yet."));
  };
  if (can("operator")) await createForm(create);
  await load();
  return { topics: ["rollouts", "releases"], refresh: load };
}

async function createForm(box) {
  const rels = (await api.get("/api/v1/releases")) || [];
  const f = {
    release: el("select", { id: "c-release", required: true }, rels.map((r) => el("option", { value: r.target + "@" + r.version }, `${r.target}@${r.version}`))),
    selector: el("input", { id: "c-selector", placeholder: "base=zurich (empty: every device)" }),
    stages: el("input", { id: "c-stages", value: "1%,10%,50%,100%" }),
    minCanary: el("input", { id: "c-min-canary", type: "number", min: "0", value: "3", size: "4" }),
    strata: el("input", { id: "c-strata", value: "hw", placeholder: "hw" }),
    onFailure: el("select", { id: "c-on-failure" }, opt("pause", "pause", "pause"), opt("abort", "abort", "pause")),
    soak: el("input", { id: "c-soak", placeholder: "10m", size: "6" }),
    minCommitted: el("input", { id: "c-min-committed", type: "number", min: "0", max: "100", step: "1", placeholder: "90", size: "4" }),
    maxFailed: el("input", { id: "c-max-failed", type: "number", min: "0", max: "100", step: "0.5", placeholder: "5", size: "4" }),
    margin: el("input", { id: "c-health-margin", type: "number", min: "0", step: "0.1", placeholder: "0.5", size: "4" }),
    inFlight: el("input", { id: "c-max-in-flight", type: "number", min: "0", placeholder: "default", size: "6" }),
    revert: el("select", { id: "c-revert-release" }, opt("", "none", ""), rels.map((r) => opt(r.target + "@" + r.version, `${r.target}@${r.version}`, ""))),
    autoRevert: el("input", { id: "c-auto-revert", type: "checkbox" }),
    full: el("input", { id: "c-full", type: "checkbox" }),
    reason: el("input", { id: "c-reason", placeholder: "why (for the audit log)" }),
  };
  const preview = el("div", { id: "preview", "aria-live": "polite" });
  // Empty fields take the server's defaults (the same as hangar rollout create's).
  const spec = () => {
    const gates = {};
    if (f.soak.value.trim()) gates.soak = f.soak.value.trim();
    if (f.minCommitted.value) gates.min_committed = Number(f.minCommitted.value) / 100;
    if (f.maxFailed.value) gates.max_failed = Number(f.maxFailed.value) / 100;
    if (f.margin.value) gates.health_margin = Number(f.margin.value);
    const s = { release: f.release.value, selector: f.selector.value.trim(), stages: f.stages.value.trim(), min_canary: Number(f.minCanary.value || 0),
      strata: f.strata.value.split(",").map((s) => s.trim()).filter(Boolean), on_failure: f.onFailure.value, reason: f.reason.value.trim(), gates };
    if (f.inFlight.value) s.max_in_flight = Number(f.inFlight.value);
    if (f.revert.value) s.revert_release = f.revert.value;
    if (f.autoRevert.checked) s.auto_revert = true;
    if (f.full.checked) s.full = true;
    return s;
  };
  const dry = el("button", { type: "button", id: "c-dry-run", onclick: async () => {
    try {
      const p = await api.call("POST", "/api/v1/rollouts", { ...spec(), dry_run: true });
      showPreview(preview, p);
    } catch (e) { flash(preview, e.message, false); }
  } }, "Dry run");
  const go_ = el("button", { type: "submit", class: "primary", id: "c-start" }, "Create and start");
  const form = el("form", { id: "create-form" }, el("h3", {}, "New rollout"),
    el("div", { class: "filters" }, field("Release", f.release), field("Devices (selector)", f.selector), field("Stages", f.stages), field("Minimum canary", f.minCanary),
      field("Strata (labels)", f.strata), field("On a failing gate", f.onFailure)),
    el("div", { class: "filters" }, field("Soak per stage", f.soak), field("Min committed %", f.minCommitted), field("Max failed %", f.maxFailed),
      field("Health margin", f.margin), field("Max in flight", f.inFlight), field("Revert release", f.revert), field("Revert on failure", f.autoRevert),
      field("Full artifacts only", f.full), field("Reason", f.reason)), el("div", {}, dry, " ", go_), preview);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const s = spec();
    const r = await confirmAction(`Start rolling out ${s.release}?`, `Stages ${s.stages}${s.selector ? ", devices " + s.selector : ", every matching device"}.`);
    if (r === null) return;
    try {
      const out = await api.call("POST", "/api/v1/rollouts", { ...s, reason: r || s.reason, start: true });
      go("#rollout/" + encodeURIComponent(out.rollout.spec.id));
    } catch (e) { flash(preview, e.message, false); }
  });
  box.replaceChildren(rels.length ? form : el("p", { class: "muted" }, "Push a release to roll it out."));
}

function showPreview(box, p) {
  const parts = [el("p", {}, `${p.targeted} devices targeted.`, p.canary ? " " + p.canary : "")];
  const t = p.transfer || { delta: 0, full: 0 };
  parts.push(el("p", { id: "preview-transfer" }, t.delta ? "Over the air: " + transferText(t) + "." :
    `Over the air: full artifacts to ${t.full} devices (${bytes(t.full_bytes)}); no delta from the builds they report.`));
  parts.push(table("Who each stage takes", ["Stage", "Devices", "Offline now", "Delta / full", "Bytes", "First devices"], (p.stages || []).map((s) => [s.stage, String(s.devices.length), String((s.offline || []).length),
    `${(s.transfer || {}).delta || 0} / ${(s.transfer || {}).full || 0}`, s.transfer ? bytes(s.transfer.delta_bytes + s.transfer.full_bytes) : "–",
    s.devices.slice(0, 6).join(", ") + (s.devices.length > 6 ? ", …" : "")]), { id: "preview-stages" }));
  const ex = new Map();
  for (const e of p.excluded || []) ex.set(e.reason, (ex.get(e.reason) || 0) + 1);
  parts.push(ex.size ? table("Excluded, and why", ["Reason", "Devices"], [...ex.entries()].map(([r, n]) => [r, String(n)]), { id: "preview-excluded" }) : el("p", {}, "No device excluded."));
  box.replaceChildren(...parts);
}

// ---- rollout page ----

async function rollout(main, id) {
  const enc = encodeURIComponent(id);
  const head = el("div", { id: "rollout-head" }), stages = el("div", { id: "rollout-stages" }), gates = el("div", { id: "rollout-gates" });
  const strata = el("div", { id: "rollout-strata" }), members = el("div", { id: "rollout-members" }), timeline = el("div", { id: "rollout-timeline" });
  const actions = el("div", { id: "rollout-actions", class: "actions" }), msg = el("div", { id: "rollout-msg", "aria-live": "polite" });
  const stateSel = el("select", { id: "member-state" }, opt("", "all states", ""), ["pending", "waiting", "in_progress", "deferred", "deferred_past_deadline", "committed", "failed", "timed_out", "canceled", "excluded", "gone"].map((s) => opt(s, s, "")));
  main.replaceChildren(el("h2", {}, "Rollout ", el("span", { class: "mono" }, id)), head, actions, msg,
    el("section", { class: "panel" }, el("h3", {}, "Stages"), stages),
    el("section", { class: "panel" }, el("h3", {}, "Gates"), gates),
    el("section", { class: "panel" }, el("h3", {}, "Strata"), strata),
    el("section", { class: "panel" }, el("h3", {}, "Members ", field("State", stateSel)), members),
    el("section", { class: "panel" }, el("h3", {}, "Timeline"), timeline));
  const load = async () => {
    const r = await api.get("/api/v1/rollouts/" + enc);
    const st = r.state;
    head.replaceChildren(el("p", {}, `${r.spec.release.target}@${r.spec.release.version} · `, el("span", { class: "status s-" + cls(st.status), id: "rollout-status" }, st.status + (st.reverting ? " (reverting)" : "")),
      ` · stage ${Math.min(st.stage + 1, r.spec.stages.length)} of ${r.spec.stages.length} · ${r.targeted} targeted · created `, when(r.created), ` by ${r.created_by}`),
      st.reason ? el("p", { class: "why" }, st.reason) : "", st.canary ? el("p", { class: "muted" }, st.canary) : "",
      r.transfer && r.transfer.delta ? el("p", { id: "rollout-transfer" }, "Fetched over the air: " + transferText(r.transfer) + ".") :
        r.spec.full ? el("p", { id: "rollout-transfer", class: "muted" }, "Full artifacts only.") : "");
    stages.replaceChildren(el("ol", { class: "stages" }, (r.stages || []).map((s, i) => {
      const done = (s.states.committed || 0), bad = (s.states.failed || 0) + (s.states.timed_out || 0);
      return el("li", { class: i === st.stage ? "current" : "" }, el("span", { class: "stage-name" }, s.stage), progress(done, s.devices, `stage ${s.stage}: ${done} of ${s.devices} committed`),
        ` ${done}/${s.devices} committed`, bad ? el("span", { class: "bad" }, ` · ${bad} failed`) : "",
        ((rest) => rest ? ` · ${rest}` : "")(Object.entries(s.states).filter(([k]) => k !== "committed").map(([k, n]) => k + " " + n).join(", ")),
        s.transfer && s.transfer.delta ? el("span", { class: "muted" }, ` · ${s.transfer.delta} by delta, ${bytes(Math.max(s.transfer.saved_bytes, 0))} saved`) : "");
    })));
    const verdict = (g) => el("span", { class: "verdict v-" + cls(g.verdict.replace(/\s/g, "-")) }, g.verdict);
    gates.replaceChildren((r.gates || []).length ? table("", ["Gate", "Stratum", "Measured", "Threshold", "Verdict", "Why"], r.gates.map((g) => [g.name, g.stratum || "all",
      g.judged ? fmtNum(g.value) : "–", fmtNum(g.threshold), verdict(g), g.why]), { id: "gates-table" }) : el("p", { class: "muted" }, "Not judged yet."));
    strata.replaceChildren((r.strata || []).length ? table("", ["Stratum", "Members", "Canary", "Reachable", "Committed", "Failed", "Gates"], r.strata.map((s) => [`${s.label}=${s.value}`,
      String(s.members), String(s.canary), String(s.reachable), String(s.committed), String(s.failed), el("span", {}, (s.gates || []).map((g) => el("span", { class: "chip" }, `${g.name}: `, verdict(g))))])) :
      el("p", { class: "muted" }, "No strata."));
    actions.replaceChildren(...(can("operator") ? actionButtons(r) : []));
  };
  const actionButtons = (r) => {
    const st = r.state, final = ["completed", "aborted"].includes(st.status);
    const allowed = {
      start: st.status === "created", pause: st.status === "running", resume: st.status === "paused",
      promote: st.status === "running" || st.status === "paused", abort: !final, revert: !!r.spec.revert && !st.reverting,
    };
    const words = { start: "Start", pause: "Pause", resume: "Resume", promote: "Promote (skip the soak)", abort: "Abort", revert: "Revert" };
    return Object.keys(words).filter((a) => allowed[a]).map((a) => el("button", { type: "button", "data-action": a, class: a === "abort" || a === "revert" ? "danger" : "",
      onclick: async () => {
        const reason = await confirmAction(`${words[a]} ${id}?`, a === "revert" ? "Devices that committed the release are offered the revert release." : "", { reasonRequired: a !== "resume" && a !== "start", danger: a === "abort" || a === "revert" });
        if (reason === null) return;
        try { await api.call("POST", `/api/v1/rollouts/${enc}/${a}`, { reason }); flash(msg, `${words[a]}: done.`); await load(); } catch (e) { flash(msg, e.message, false); }
      } }, words[a]));
  };
  const loadMembers = async () => {
    const ms = await api.get(`/api/v1/rollouts/${enc}/devices` + (stateSel.value ? "?state=" + stateSel.value : ""));
    const shown = ms.slice(0, 200);
    members.replaceChildren(table(`${ms.length} members${ms.length > shown.length ? ", first 200 shown" : ""}`, ["Device", "Stage", "State", "Version", "Online", "Report", "Via", "Why"], shown.map((m) => [
      el("a", { href: "#device/" + encodeURIComponent(m.device) }, m.device), String(m.stage), el("span", { class: "state st-" + cls(m.state) }, m.state), m.version || "–", m.online ? "yes" : "no",
      m.update ? m.update.state : "–", m.update ? via(m.update) : "–", (m.update && m.update.reason) || (m.revert && m.revert.reason) || ""]), { id: "members-table" }));
  };
  const loadTimeline = async () => {
    const es = await api.get(`/api/v1/rollouts/${enc}/events`);
    timeline.replaceChildren(el("ol", { class: "timeline", id: "timeline" }, es.map((e) => el("li", {}, when(e.time), ` ${e.action.replace("rollout.", "")}`, e.attrs && e.attrs.to ? ` ${e.attrs.from || ""} → ${e.attrs.to}` : "",
      ` by ${e.actor}`, e.reason ? el("span", { class: "why" }, ": " + e.reason) : ""))));
  };
  stateSel.addEventListener("change", loadMembers);
  await Promise.all([load(), loadMembers(), loadTimeline()]);
  return { topics: ["rollouts", "events"], refresh: () => Promise.all([load(), loadMembers(), loadTimeline()]) };
}

function fmtNum(v) { return v == null ? "–" : Math.abs(v) < 1 && v !== 0 ? (v * 100).toFixed(1) + "%" : String(Math.round(v * 100) / 100); }

// ---- events ----

async function events(main, _arg, q) {
  const f = { device: el("input", { id: "e-device", value: q.get("device") || "", placeholder: "sim-00007" }),
    kind: el("select", { id: "e-kind" }, ["", "alert", "update", "ack", "message"].map((k) => opt(k, k || "any", q.get("kind") || ""))),
    severity: el("select", { id: "e-severity" }, [["", "any"], ["warning", "warning or worse"], ["critical", "critical"]].map(([v, l]) => opt(v, l, q.get("severity") || ""))),
    since: el("select", { id: "e-since" }, [["", "any time"], ["1h", "last hour"], ["24h", "last day"], ["168h", "last week"]].map(([v, l]) => opt(v, l, q.get("since") || ""))) };
  const form = el("form", { class: "filters", role: "search" }, field("Device", f.device), field("Kind", f.kind), field("Severity", f.severity), field("Since", f.since), el("button", { type: "submit" }, "Apply"));
  const box = el("div", { id: "event-list" });
  main.replaceChildren(el("h2", {}, "Events"), form, box);
  const params = () => { const p = new URLSearchParams({ limit: 200 }); for (const k of ["kind", "severity", "since"]) if (f[k].value) p.set(k, f[k].value); return p; };
  const path = () => (f.device.value.trim() ? `/api/v1/devices/${encodeURIComponent(f.device.value.trim())}/events?` : "/api/v1/events?") + params();
  const load = async () => {
    const es = await api.get(path());
    box.replaceChildren(es.length ? eventTable(es, "", { id: "events-table" }) : el("p", { class: "muted" }, "No events match."));
  };
  form.addEventListener("submit", (ev) => { ev.preventDefault(); load(); });
  await load();
  const sevRank = { info: 0, warning: 1, critical: 2 };
  return {
    topics: ["events"],
    async refresh({ events, truncated }) {
      if (truncated) { await load(); return; }
      // New events come in the message: prepend those that match.
      const dev = f.device.value.trim(), kind = f.kind.value, sev = f.severity.value;
      const match = events.filter((e) => (!dev || e.device === dev) && (!kind || e.kind === kind) && (!sev || sevRank[e.severity] >= sevRank[sev]));
      const tb = $("#events-table tbody");
      if (!tb) { if (match.length) await load(); return; }
      for (const e of match.sort((a, b) => a.id - b.id)) if (!tb.querySelector(`tr[data-id="${e.id}"]`)) tb.prepend(eventRow(e, ""));
      while (tb.rows.length > 200) tb.deleteRow(-1);
      if (match.length) announce(`${match.length} new event${match.length > 1 ? "s" : ""}`);
    },
  };
}

// ---- audit ----

async function audit(main) {
  const box = el("div", { id: "audit-list" }), res = el("div", { id: "audit-verify", "aria-live": "polite" });
  main.replaceChildren(el("h2", {}, "Audit log"), el("p", {}, el("button", { type: "button", id: "verify", onclick: async () => {
    try {
      const v = await api.get("/api/v1/audit/verify");
      flash(res, v.broken ? `Broken at entry ${v.broken.id}: ${v.broken.why || v.broken.reason || "hash mismatch"}` : `Intact: ${v.entries} entries, head ${v.head_id}.`, !v.broken);
    } catch (e) { flash(res, e.message, false); }
  } }, "Verify the hash chain")), res, box);
  const load = async () => {
    const es = await api.get("/api/v1/audit?limit=200");
    box.replaceChildren(table("Newest first", ["When", "Who", "Action", "Target", "Why"], es.map((a) => [when(a.time), a.actor, a.action, a.target || "", a.reason || ""]), { id: "audit-table" }));
  };
  await load();
  return { topics: ["audit"], refresh: load };
}

// ---- delivery ----

async function delivery(main) {
  const box = el("div", { id: "delivery" }), chart = el("div", { class: "chart", id: "chart-health" });
  const win = el("select", { id: "d-window" }, [["168h", "last week"], ["672h", "last 4 weeks"], ["2160h", "last 90 days"]].map(([v, l]) => opt(v, l, "672h")));
  main.replaceChildren(el("h2", {}, "Delivery"), el("p", {}, field("Window", win)), box, el("section", { class: "panel" }, el("h3", {}, "Fleet health over the window"), chart));
  const load = async () => {
    const r = await api.get("/api/v1/metrics/delivery?from=" + win.value);
    const row = (name, m) => [name, m.deployment_frequency.per_week.toFixed(2) + ` (${m.deployment_frequency.completed})`,
      `${duration(m.lead_time.median_seconds)} / ${duration(m.lead_time.p90_seconds)}${m.lead_time.pending ? ` (${m.lead_time.pending} pending)` : ""}`,
      duration(m.lead_time.build_to_fleet_median_seconds),
      m.change_failure_rate.rate == null ? "–" : `${Math.round(m.change_failure_rate.rate * 100)}% (${m.change_failure_rate.failed} of ${m.change_failure_rate.finished})`,
      duration(m.time_to_restore.median_seconds) + (m.time_to_restore.unrestored ? ` (${m.time_to_restore.unrestored} open)` : "")];
    const rows = [row("whole fleet", r.overall), ...Object.keys(r.by_hardware).sort().map((hw) => row(hw, r.by_hardware[hw]))];
    box.replaceChildren(table("The four keys, from this control plane's records", ["Hardware", "Deployments a week", "Lead time p50 / p90", "Build to fleet", "Change failure rate", "Time to restore"], rows, { id: "delivery-table" }));
    const hs = r.health || [];
    timeChart(chart, { title: "Online share and versions in the field", times: hs.map((h) => new Date(h.time)), series: [
      { label: "online %", values: hs.map((h) => (h.devices ? (100 * h.online) / h.devices : null)) }, { label: "versions", values: hs.map((h) => h.versions) }] });
  };
  win.addEventListener("change", load);
  await load();
  // Computed from the whole history: reloaded when the window changes or
  // the page opens, not on every rollout step.
  return {};
}

// ---- tokens (admins) ----

async function tokens(main) {
  const box = el("div", { id: "token-list" }), msg = el("div", { id: "token-msg", "aria-live": "polite" });
  if (!can("admin")) { main.replaceChildren(el("h2", {}, "Tokens"), el("p", {}, "Only admins manage tokens.")); return {}; }
  const name = el("input", { id: "t-name", required: true, pattern: "[a-z0-9][a-z0-9._@-]{0,63}" });
  const role = el("select", { id: "t-role" }, ["viewer", "operator", "admin"].map((r) => opt(r, r, "viewer")));
  const exp = el("select", { id: "t-expires" }, [["", "never"], ["24h", "1 day"], ["720h", "30 days"], ["2160h", "90 days"]].map(([v, l]) => opt(v, l, "720h")));
  const form = el("form", { class: "filters", id: "token-form" }, field("Name", name), field("Role", role), field("Expires", exp), el("button", { type: "submit" }, "Create token"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const t = await api.call("POST", "/api/v1/tokens", { name: name.value.trim(), role: role.value, expires_in: exp.value || undefined });
      msg.replaceChildren(el("p", { class: "ok", role: "status" }, `Token ${t.name} (${t.role}). Copy it now, it is shown once: `, el("code", { id: "new-token" }, t.token)));
      name.value = "";
      load();
    } catch (e) { flash(msg, e.message, false); }
  });
  main.replaceChildren(el("h2", {}, "Tokens"), form, msg, box);
  const load = async () => {
    const ts = await api.get("/api/v1/tokens");
    box.replaceChildren(table("", ["Name", "Role", "State", "Created", "Expires", "Last used", ""], ts.map((t) => [t.name, t.role,
      t.revoked ? "revoked" : t.expires && new Date(t.expires) < new Date() ? "expired" : "active", el("span", {}, when(t.created), t.created_by ? " by " + t.created_by : ""),
      t.expires ? when(t.expires) : "never", when(t.last_used),
      t.revoked ? "" : el("button", { type: "button", class: "danger", onclick: async () => {
        const r = await confirmAction(`Revoke token ${t.name}?`, "Requests with it are refused at once.", { danger: true });
        if (r === null) return;
        try { await api.call("DELETE", "/api/v1/tokens/" + encodeURIComponent(t.name) + "?reason=" + encodeURIComponent(r)); load(); } catch (e) { flash(msg, e.message, false); }
      } }, "Revoke")]), { id: "tokens-table" }));
  };
  await load();
  return { topics: ["audit"], refresh: load };
}

// ---- start ----
if (api.token()) signIn(); else showLogin("");

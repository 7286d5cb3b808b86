"use strict";
// The dashboard reads the REST API with the admin token kept in local storage.
const $ = (s) => document.querySelector(s);
let token = localStorage.getItem("hangar-token") || "";

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: "Bearer " + token } });
  if (r.status === 401) { showLogin("The token was refused."); throw new Error("unauthorized"); }
  if (!r.ok) { throw new Error((await r.json().catch(() => ({}))).error || r.statusText); }
  return r.json();
}

function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }

function bars(target, entries) {
  const box = $(target); box.replaceChildren();
  const max = Math.max(1, ...entries.map((e) => e[1]));
  for (const [label, n] of entries) {
    const row = el("div"); row.append(el("span", label, "l"));
    const b = el("span", "", "b"); b.style.width = (n / max) * 60 + "%"; row.append(b, el("span", String(n)));
    box.append(row);
  }
}

function ago(t) {
  if (!t) return "never";
  const s = Math.round((Date.now() - new Date(t)) / 1000);
  if (s < 60) return s + " s ago"; if (s < 3600) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

async function refreshFleet() {
  const h = await api("/api/v1/fleet/health");
  $("#c-online").textContent = h.online; $("#c-devices").textContent = h.devices;
  $("#c-flying").textContent = h.flying; $("#c-lowbatt").textContent = h.low_battery; $("#c-revoked").textContent = h.revoked;
  bars("#versions", Object.entries(h.versions).sort((a, b) => b[1] - a[1]));
  bars("#battery", h.battery.map((b) => [b.label + "%", b.count]));
  bars("#errors", h.errors.map((b) => [b.label, b.count]));
  const sel = $("#filter").value.trim();
  const devs = await api("/api/v1/devices?limit=500" + (sel ? "&selector=" + encodeURIComponent(sel) : ""));
  const body = $("#devices tbody"); body.replaceChildren();
  for (const d of devs) {
    const tr = el("tr");
    const lat = d.latest || {};
    tr.append(el("td", d.id), el("td", d.revoked ? "revoked" : d.online ? "online" : "offline", d.online ? "on" : "off"),
      el("td", d.version || "–"), el("td", d.hardware || "–"),
      el("td", Object.entries(d.labels || {}).map(([k, v]) => k + "=" + v).join(" ")),
      el("td", lat.battery_pct != null ? lat.battery_pct + "%" : "–"), el("td", lat.flight_state || "–"),
      el("td", lat.errors != null ? String(lat.errors) : "–"), el("td", ago(d.last_seen)));
    body.append(tr);
  }
}

async function refreshEvents() {
  const evs = await api("/api/v1/events?limit=200&after=0");
  const body = $("#event-table tbody"); body.replaceChildren();
  for (const e of evs.reverse()) {
    const what = e.update ? `${e.update.target} ${e.update.version}: ${e.update.state}${e.update.reason ? " (" + e.update.reason + ")" : ""}` : (e.message || e.code);
    const tr = el("tr");
    tr.append(el("td", new Date(e.time).toLocaleString()), el("td", e.device), el("td", e.kind), el("td", e.severity, "sev-" + e.severity), el("td", what));
    body.append(tr);
  }
}

let selectedRollout = "";

async function refreshRollouts() {
  const rs = await api("/api/v1/rollouts");
  rs.sort((a, b) => new Date(b.created) - new Date(a.created));
  if (!selectedRollout && rs.length) selectedRollout = rs[0].spec.id;
  const body = $("#rollout-table tbody"); body.replaceChildren();
  for (const r of rs) {
    const tr = el("tr", undefined, r.spec.id === selectedRollout ? "sel" : "");
    const rel = r.spec.release.target + "@" + r.spec.release.version;
    tr.append(el("td", r.spec.id), el("td", rel), el("td", r.state.status, "st-" + r.state.status),
      el("td", (r.state.stage + 1) + " of " + r.spec.stages.length), el("td", new Date(r.created).toLocaleString()), el("td", r.state.reason || ""));
    tr.addEventListener("click", () => { selectedRollout = r.spec.id; refresh(); });
    body.append(tr);
  }
  const box = $("#rollout-detail"); box.replaceChildren();
  if (!selectedRollout) return;
  const rep = await api("/api/v1/rollouts/" + encodeURIComponent(selectedRollout));
  box.append(el("h3", rep.spec.id + ": " + rep.spec.release.target + "@" + rep.spec.release.version + " (" + rep.state.status + ")"));
  const stages = el("div", undefined, "panel");
  stages.append(el("h3", "Stages"));
  rep.stages.forEach((s, i) => {
    const row = el("div", undefined, "stage" + (i === rep.state.stage ? " cur" : ""));
    const done = s.states.committed || 0, failed = (s.states.failed || 0) + (s.states.timed_out || 0);
    row.append(el("span", (i + 1) + " (" + s.stage + ")", "l"));
    const bar = el("span", undefined, "progress");
    for (const [n, cls] of [[done, "ok"], [failed, "bad"]]) {
      const seg = el("span", undefined, cls); seg.style.width = (s.devices ? (n / s.devices) * 100 : 0) + "%"; bar.append(seg);
    }
    row.append(bar, el("span", s.devices + " devices: " + Object.entries(s.states).map(([k, v]) => k + "=" + v).join(" ")));
    stages.append(row);
  });
  const gates = el("div", undefined, "panel");
  gates.append(el("h3", "Gates of the current stage"));
  const gt = el("table");
  gt.append(el("tr")); gt.lastChild.append(el("th", "gate"), el("th", "value"), el("th", "threshold"), el("th", ""), el("th", "why"));
  for (const g of rep.gates || []) {
    const tr = el("tr");
    const verdict = g.verdict || (!g.judged ? "not judged" : g.ok ? "holds" : "fails");
    tr.append(el("td", g.name), el("td", g.value != null ? (+g.value).toFixed(3) : ""), el("td", g.threshold != null ? (+g.threshold).toFixed(3) : ""),
      el("td", verdict, verdict === "fails" ? "error" : verdict === "holds" ? "on" : "off"), el("td", g.why || ""));
    gt.append(tr);
  }
  gates.append(gt);
  const row = el("div", undefined, "row"); row.append(stages, gates); box.append(row);
  if (rep.unreached) box.append(el("p", rep.unreached + " members waiting: their devices are off (not failures; offered when they come back)"));
  if (rep.state.canary) box.append(el("p", "Canary: " + rep.state.canary));
  if (rep.strata && rep.strata.length > 1) {
    const st = el("table");
    st.append(el("tr")); st.lastChild.append(el("th", rep.strata[0].label), el("th", "members"), el("th", "canary"), el("th", "reachable"),
      el("th", "committed"), el("th", "failed"), el("th", "gates"));
    for (const x of rep.strata) {
      const tr = el("tr");
      const verdicts = (x.gates || []).filter(g => g.judged).map(g => g.name + " " + g.verdict).join(", ") || "not judged";
      tr.append(el("td", x.value || "-"), el("td", String(x.members)), el("td", String(x.canary)), el("td", String(x.reachable)),
        el("td", String(x.committed)), el("td", String(x.failed)),
        el("td", verdicts + (x.held ? " (held: waiting for a canary device of its kind)" : ""), (x.gates || []).some(g => g.verdict === "fails") ? "error" : ""));
      st.append(tr);
    }
    box.append(el("h3", "By " + rep.strata[0].label + " (judged within each)"), st);
  }
  const evs = await api("/api/v1/rollouts/" + encodeURIComponent(selectedRollout) + "/events");
  const et = el("table");
  et.append(el("tr")); et.lastChild.append(el("th", "time"), el("th", "who"), el("th", "what"), el("th", "to"), el("th", "why"));
  for (const e of evs) {
    const tr = el("tr");
    tr.append(el("td", new Date(e.time).toLocaleString()), el("td", e.actor), el("td", e.action), el("td", (e.attrs || {}).to || ""), el("td", e.reason || ""));
    et.append(tr);
  }
  box.append(el("h3", "Transitions and operator actions"), et);
}

function currentTab() { return (location.hash || "#fleet").slice(1); }

async function refresh() {
  if (!token) return showLogin("");
  const tab = currentTab();
  for (const s of ["fleet", "rollouts", "events"]) $("#" + s).hidden = s !== tab;
  for (const a of document.querySelectorAll(".tab")) a.classList.toggle("active", a.dataset.tab === tab);
  $("#login").hidden = true;
  try {
    if (tab === "events") await refreshEvents(); else if (tab === "rollouts") await refreshRollouts(); else await refreshFleet();
    $("#status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) { $("#status").textContent = "error: " + e.message; }
}

function showLogin(msg) {
  for (const s of ["fleet", "rollouts", "events"]) $("#" + s).hidden = true;
  $("#login").hidden = false; $("#login-error").textContent = msg;
}

$("#login-form").addEventListener("submit", (ev) => {
  ev.preventDefault(); token = $("#token").value.trim(); localStorage.setItem("hangar-token", token); refresh();
});
window.addEventListener("hashchange", refresh);
$("#filter").addEventListener("change", refresh);
refresh();
setInterval(refresh, 5000);

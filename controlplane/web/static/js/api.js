// The console's link to the REST API: the bearer token, JSON calls, and
// the live stream of changes (server-sent events read with fetch, so that
// the token travels in a header and never in a URL).

const KEY = "hangar-token";

export function token() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
}

export function setToken(t, remember) {
  signOut();
  (remember ? localStorage : sessionStorage).setItem(KEY, t);
}

export function signOut() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
  stopLive();
}

export class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let onUnauthorized = () => {};
export function whenUnauthorized(f) { onUnauthorized = f; }

// call sends a request; the reply's JSON is returned (with the total count
// of a paged list as .total when the server sends it).
export async function call(method, path, body) {
  const opts = { method, headers: { Authorization: "Bearer " + token() } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (r.status === 401) {
    onUnauthorized((data && data.error) || "the token was refused");
    throw new APIError(401, (data && data.error) || "unauthorized");
  }
  if (!r.ok) throw new APIError(r.status, (data && data.error) || r.statusText);
  const total = r.headers.get("X-Total-Count");
  if (total !== null && data) data.total = Number(total);
  return data;
}

export const get = (path) => call("GET", path);

// The live stream.
let live = null;
const listeners = new Set();
export function onChange(f) { listeners.add(f); return () => listeners.delete(f); }
let statusCb = () => {};
export function onLiveStatus(f) { statusCb = f; }

export function stopLive() {
  if (live) { live.abort(); live = null; }
}

export function startLive() {
  stopLive();
  const ctl = new AbortController();
  live = ctl;
  let backoff = 1000;
  (async () => {
    while (!ctl.signal.aborted) {
      try {
        const r = await fetch("/api/v1/events/stream", { headers: { Authorization: "Bearer " + token() }, signal: ctl.signal });
        if (r.status === 401) { onUnauthorized("the token was refused"); return; }
        if (!r.ok) throw new Error(r.statusText);
        statusCb("live");
        backoff = 1000;
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            const msg = buf.slice(0, i);
            buf = buf.slice(i + 2);
            let event = "message", data = "";
            for (const line of msg.split("\n")) {
              if (line.startsWith("event: ")) event = line.slice(7);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (event === "change" && data) {
              const ch = JSON.parse(data);
              for (const f of listeners) { try { f(ch); } catch (e) { console.error(e); } }
            }
          }
        }
      } catch (e) {
        if (ctl.signal.aborted) return;
      }
      statusCb("reconnecting");
      await new Promise((res) => setTimeout(res, backoff));
      backoff = Math.min(backoff * 2, 30000);
    }
  })();
}

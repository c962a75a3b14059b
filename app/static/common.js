// Shared by the job list and the job page: the REST client (with the pasted API key), safe DOM building,
// number and time formats. No data ever reaches the DOM as HTML: h() and svg() set text with text nodes and
// attributes with setAttribute, and refuse event-handler attributes.

const KEY_STORAGE = "secateurs.apiKey";

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATES = ["queued", "running", "succeeded", "failed", "cancelled"];

export class AuthError extends Error {}

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message ?? `the server answered ${status}`);
    this.status = status;
    this.hint = error?.hint ?? null;
  }
}

export function apiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || null;
  } catch {
    return null; // storage disabled: the page still works on a server without keys
  }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled */
  }
}

export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** GET (or POST) a JSON route of the REST API; throws AuthError on 401 and ApiError on any other failure. */
export async function api(path, { method = "GET" } = {}) {
  const response = await fetch(path, {
    method,
    headers: { Accept: "application/json", ...authHeaders() },
    cache: "no-store",
  });
  let body = null;
  try {
    body = await response.json();
  } catch {
    /* not JSON: keep null */
  }
  if (response.status === 401) throw new AuthError(body?.error?.message ?? "this server needs an API key");
  if (!response.ok) throw new ApiError(response.status, body?.error);
  return body;
}

export function jobPath(id) {
  return `/v1/jobs/${encodeURIComponent(id)}`;
}

// --- DOM --------------------------------------------------------------------------------------------------

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (/^on/i.test(name)) throw new Error(`h(): event handler attributes are not allowed (${name})`);
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element: h("a", {href: "/x", class: "c"}, "text", otherNode). Text is always text. */
export function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element, same contract as h(). */
export function svg(tag, attrs = {}, ...children) {
  return build(document.createElementNS("http://www.w3.org/2000/svg", tag), attrs, children);
}

export function badge(state) {
  const known = STATES.includes(state) ? state : "unknown";
  return h("span", { class: `badge badge-${known}` }, state ?? "unknown");
}

/** A progress bar with its ARIA values: block i of N. */
export function progressBar(value, max, label) {
  const fraction = max > 0 ? Math.min(1, Math.max(0, value / max)) : 0;
  const fill = h("span", { class: "meter-fill" });
  fill.style.width = `${(fraction * 100).toFixed(1)}%`; // CSSOM, allowed by the page's CSP
  return h(
    "span",
    {
      class: "meter",
      role: "progressbar",
      "aria-label": label,
      "aria-valuemin": 0,
      "aria-valuemax": max,
      "aria-valuenow": value,
      "aria-valuetext": `${value} of ${max}`,
    },
    fill,
  );
}

export function showNotice(element, message, hint = null) {
  element.replaceChildren(h("strong", {}, message), hint ? h("span", { class: "hint" }, ` ${hint}`) : null);
  element.hidden = false;
}

export function hideNotice(element) {
  element.hidden = true;
  element.replaceChildren();
}

// --- formats ----------------------------------------------------------------------------------------------

export function fmtPerplexity(value) {
  if (value === null || value === undefined) return "–";
  return value >= 1000 ? value.toFixed(0) : value.toFixed(2);
}

export function fmtRatio(value, digits = 3) {
  return value === null || value === undefined ? "–" : `${value.toFixed(digits)}×`;
}

export function fmtPercent(value, digits = 1) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(digits)}%`;
}

export function fmtScientific(value, digits = 2) {
  if (value === null || value === undefined) return "–";
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  return magnitude >= 0.01 && magnitude < 1000 ? value.toPrecision(digits + 1) : value.toExponential(digits);
}

export function fmtInt(value) {
  return value === null || value === undefined ? "–" : Math.round(value).toLocaleString("en-US");
}

export function fmtMs(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? `${value.toFixed(0)} ms` : value >= 1 ? `${value.toFixed(2)} ms` : `${value.toPrecision(3)} ms`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  if (seconds < 1) return `${seconds.toFixed(2)} s`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const s = Math.round(seconds);
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

export function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value >= 100 ? 0 : 1)} ${units[unit]}`;
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

export function timeElement(iso) {
  return iso ? h("time", { datetime: iso }, fmtTime(iso)) : "–";
}

// --- the API-key form (both pages) -------------------------------------------------------------------------

/**
 * Wires the header's "API key" button and form. `onChange` runs after the key is saved or forgotten.
 * Returns show(message): opens the form with a reason (e.g. after a 401).
 */
export function setupKeyForm(onChange) {
  const button = document.getElementById("key-button");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  const forget = document.getElementById("key-forget");
  const message = document.getElementById("key-message");
  const refresh = () => {
    button.textContent = apiKey() ? "API key ✓" : "API key";
    forget.hidden = !apiKey();
  };
  const show = (text) => {
    message.textContent = text ?? "";
    if (!form.hidden) return; // already open: do not steal the focus again at every refresh
    form.hidden = false;
    button.setAttribute("aria-expanded", "true");
    input.focus();
  };
  button.addEventListener("click", () => {
    if (form.hidden) show(apiKey() ? "A key is saved in this browser; paste another to replace it." : "");
    else {
      form.hidden = true;
      button.setAttribute("aria-expanded", "false");
    }
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      message.textContent = "Paste a key first.";
      return;
    }
    storeKey(key);
    input.value = "";
    form.hidden = true;
    button.setAttribute("aria-expanded", "false");
    refresh();
    onChange();
  });
  forget.addEventListener("click", () => {
    storeKey(null);
    message.textContent = "The key was removed from this browser.";
    refresh();
    onChange();
  });
  refresh();
  return show;
}

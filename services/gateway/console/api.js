// The gateway's HTTP/JSON API, as the console calls it: the operator's bearer token on every call,
// google.rpc.Status errors turned into ApiError (code, reason, field violations).

const TOKEN_KEY = "loyalty.console.token";
const PAGES_MAX = 5; // a list the console sums is read for at most this many pages

export class ApiError extends Error {
  constructor(httpStatus, status) {
    super(status.message || `HTTP ${httpStatus}`);
    this.httpStatus = httpStatus;
    this.code = status.code ?? 0;
    const details = Array.isArray(status.details) ? status.details : [];
    const info = details.find((d) => String(d["@type"] || "").endsWith("google.rpc.ErrorInfo"));
    this.reason = info ? info.reason : "";
    this.violations = details
      .filter((d) => String(d["@type"] || "").endsWith("google.rpc.BadRequest"))
      .flatMap((d) => d.fieldViolations || [])
      .map((v) => ({ field: v.field || "", description: v.description || "" }));
  }

  get notFound() {
    return this.httpStatus === 404;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

export async function call(method, path, { query, body } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== undefined && item !== null && item !== "") url.searchParams.append(name, String(item));
    }
  }
  const headers = { accept: "application/json", authorization: `Bearer ${token()}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  let reply;
  try {
    reply = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    throw new ApiError(0, { code: 14, message: `the gateway is unreachable (${error.message})` });
  }
  const text = await reply.text();
  let data = {};
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    data = { message: `HTTP ${reply.status}: not JSON` };
  }
  if (!reply.ok) throw new ApiError(reply.status, data);
  return data;
}

export const get = (path, query) => call("GET", path, { query });
export const post = (path, body = {}) => call("POST", path, { body });

// Every item of a paginated list, up to PAGES_MAX pages; `truncated` says whether more were left.
export async function listAll(path, query, itemsKey, pageSize = 1000) {
  const items = [];
  let pageToken = "";
  for (let page = 0; page < PAGES_MAX; page += 1) {
    const reply = await get(path, { ...query, pageSize, pageToken });
    items.push(...(reply[itemsKey] || []));
    pageToken = reply.nextPageToken || "";
    if (!pageToken) return { items, truncated: false };
  }
  return { items, truncated: true };
}

// A fresh id for a mutation (AIP-155); crypto.getRandomValues works on plain http too.
export function requestId(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return `${prefix}-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

// A stable id for the same content: resubmitting an unchanged policy returns the version it made.
export function contentId(prefix, text) {
  let h1 = 0x811c9dc5;
  let h2 = 0x01000193;
  for (let i = 0; i < text.length; i += 1) {
    const c = text.charCodeAt(i);
    h1 = Math.imul(h1 ^ c, 0x01000193) >>> 0;
    h2 = Math.imul(h2 ^ c, 0x5bd1e995) >>> 0;
  }
  return `${prefix}-${h1.toString(16).padStart(8, "0")}${h2.toString(16).padStart(8, "0")}`;
}

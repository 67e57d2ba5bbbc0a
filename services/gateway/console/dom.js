// Small DOM helpers: elements built with text nodes only (never innerHTML with data), panels that
// load on their own, and the formats the pages share.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(element, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (name === "text") element.textContent = String(value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function table(headers, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map((title) => h("th", { scope: "col" }, title)))),
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((cell) => h("td", {}, cell))))));
}

export function tiles(items) {
  return h("dl", { class: "tiles" }, items.map(([label, value, note]) =>
    h("div", { class: "tile" }, h("dt", {}, label), h("dd", {}, value), note ? h("small", {}, note) : null)));
}

export function errorBox(error) {
  const violations = error.violations || [];
  return h("div", { class: "error", role: "alert" },
    h("p", {}, error.message || String(error)),
    error.reason ? h("p", { class: "muted" }, `reason ${error.reason}`) : null,
    violations.length ? h("ul", {}, violations.map((v) => h("li", {}, h("code", {}, v.field), " ", v.description)))
      : null);
}

// A titled section that shows "Loading…" until `load` gives its content (or its own error).
export function panel(title, load, attrs = {}) {
  const body = h("div", { class: "panel-body" }, h("p", { class: "muted" }, "Loading…"));
  const section = h("section", { class: "panel", ...attrs }, h("h2", {}, title), body);
  Promise.resolve().then(load).then(
    (content) => body.replaceChildren(...[content].flat().filter((c) => c !== null && c !== undefined)),
    (error) => body.replaceChildren(errorBox(error)));
  return section;
}

const integer = new Intl.NumberFormat("en-US");

// int64 fields arrive as strings: BigInt keeps them exact.
export function int(value) {
  if (value === undefined || value === null || value === "") return "0";
  try {
    return integer.format(BigInt(value));
  } catch {
    return String(value);
  }
}

export function money(value) {
  if (!value || value.amountMinor === undefined) return "–";
  const minor = BigInt(value.amountMinor);
  const sign = minor < 0n ? "-" : "";
  const abs = minor < 0n ? -minor : minor;
  return `${sign}${integer.format(abs / 100n)}.${String(abs % 100n).padStart(2, "0")} ${value.currency || ""}`.trim();
}

export function number(value, digits = 2) {
  return Number(value || 0).toFixed(digits);
}

export function percent(share) {
  return `${(Number(share || 0) * 100).toFixed(1)}%`;
}

export function time(value) {
  if (!value) return "–";
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toISOString().replace("T", " ").slice(0, 16) + " UTC";
}

export function seconds(duration) {
  // proto3 JSON Durations: "3600s", "0.25s"
  return Number(String(duration || "0s").replace(/s$/, "")) || 0;
}

export function age(totalSeconds) {
  const value = Math.max(0, Math.floor(totalSeconds));
  if (value < 60) return `${value} s`;
  if (value < 3600) return `${Math.floor(value / 60)} min`;
  const [big, bigUnit, small, smallUnit] = value < 86400
    ? [Math.floor(value / 3600), "h", Math.floor((value % 3600) / 60), "min"]
    : [Math.floor(value / 86400), "d", Math.floor((value % 86400) / 3600), "h"];
  return small ? `${big} ${bigUnit} ${small} ${smallUnit}` : `${big} ${bigUnit}`;
}

// "CASE_STATUS_OPEN" → "open"
export function label(enumName, prefix) {
  if (!enumName) return "–";
  return String(enumName).replace(prefix, "").toLowerCase().replaceAll("_", " ");
}

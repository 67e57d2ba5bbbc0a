// Charts as inline SVG: lines over time, horizontal bars, a heatmap, a histogram with threshold
// markers and ratio bars against a threshold line. Each has role="img", an aria-label and <title>s on its marks.

import { s } from "./dom.js";

const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"];

export function color(index) {
  return PALETTE[index % PALETTE.length];
}

function niceMax(value) {
  if (value <= 0) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  const step = [1, 2, 2.5, 5, 10].find((m) => m * magnitude >= value);
  return step * magnitude;
}

function chart(width, height, label, ...children) {
  return s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": label, class: "chart" },
    ...children);
}

function yAxis(left, top, plotHeight, plotWidth, max) {
  // Counts get whole-number ticks: one per unit up to 5, else quarters or fifths of a nice maximum.
  const ticks = max <= 5 && Number.isInteger(max) ? max : (max % 4 === 0 ? 4 : 5);
  const marks = [];
  for (let i = 0; i <= ticks; i += 1) {
    const value = (max * i) / ticks;
    const y = top + plotHeight - (plotHeight * i) / ticks;
    marks.push(s("line", { x1: left, x2: left + plotWidth, y1: y, y2: y, class: "grid" }));
    marks.push(s("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "tick" },
      Number.isInteger(value) ? value : value.toFixed(1)));
  }
  return marks;
}

// series: [{name, points: [{x: Date, y: number}]}]
export function lineChart(series, label, { width = 640, height = 240 } = {}) {
  const left = 48, right = 120, top = 12, bottom = 28;
  const plotWidth = width - left - right, plotHeight = height - top - bottom;
  const xs = series.flatMap((line) => line.points.map((p) => p.x.getTime()));
  const ys = series.flatMap((line) => line.points.map((p) => p.y));
  const xMin = Math.min(...xs), xMax = Math.max(...xs);
  const yMax = niceMax(Math.max(0, ...ys));
  const x = (t) => left + (xMax === xMin ? plotWidth / 2 : ((t - xMin) / (xMax - xMin)) * plotWidth);
  const y = (v) => top + plotHeight - (v / yMax) * plotHeight;
  const dates = [...new Set(xs)].sort((a, b) => a - b);
  const shown = dates.length <= 6 ? dates : [dates[0], dates[Math.floor(dates.length / 2)], dates[dates.length - 1]];
  return chart(width, height, label,
    yAxis(left, top, plotHeight, plotWidth, yMax),
    shown.map((t) => s("text", { x: x(t), y: height - 8, "text-anchor": "middle", class: "tick" },
      new Date(t).toISOString().slice(0, 10))),
    series.map((line, i) => {
      const points = [...line.points].sort((a, b) => a.x - b.x);
      return s("g", { class: "series" },
        s("polyline", { points: points.map((p) => `${x(p.x.getTime())},${y(p.y)}`).join(" "), fill: "none",
          stroke: color(i), "stroke-width": 2 }),
        points.map((p) => s("circle", { cx: x(p.x.getTime()), cy: y(p.y), r: 3.5, fill: color(i) },
          s("title", {}, `${line.name}: ${p.y} on ${p.x.toISOString().slice(0, 10)}`))),
        s("rect", { x: width - right + 12, y: top + i * 18, width: 10, height: 10, fill: color(i) }),
        s("text", { x: width - right + 28, y: top + i * 18 + 9, class: "legend" }, line.name));
    }));
}

// items: [{label, value, color?}]
export function barChart(items, label, { width = 460 } = {}) {
  // Room for the longest label (about 7 px a character at 11 px), within a third of the width.
  const left = Math.min(width / 3, 12 + 7 * Math.max(4, ...items.map((item) => String(item.label).length)));
  const right = 60, rowHeight = 26;
  const height = items.length * rowHeight + 8;
  const max = Math.max(1, ...items.map((item) => item.value));
  const plotWidth = width - left - right;
  return chart(width, height, label, items.map((item, i) => {
    const y = 4 + i * rowHeight;
    const barWidth = (item.value / max) * plotWidth;
    return s("g", {},
      s("text", { x: left - 8, y: y + 16, "text-anchor": "end", class: "tick" }, item.label),
      s("rect", { x: left, y: y + 3, width: Math.max(barWidth, item.value > 0 ? 2 : 0), height: rowHeight - 8,
        fill: item.color || color(i) }, s("title", {}, `${item.label}: ${item.text ?? item.value}`)),
      s("text", { x: left + barWidth + 6, y: y + 16, class: "value" }, item.text ?? String(item.value)));
  }));
}

// rows/cols: [{id, name}]; count(rowId, colId) → number
export function heatmap(rows, cols, count, label) {
  const cell = 64, left = 110, top = 44;
  const width = left + cols.length * cell + 8, height = top + rows.length * cell + 8;
  const max = Math.max(1, ...rows.flatMap((r) => cols.map((c) => count(r.id, c.id))));
  return chart(width, height, label,
    s("text", { x: left + (cols.length * cell) / 2, y: 12, "text-anchor": "middle", class: "axis-title" }, "to →"),
    s("text", { x: 4, y: top - 8, class: "axis-title" }, "from ↓"),
    cols.map((c, j) => s("text", { x: left + j * cell + cell / 2, y: top - 8, "text-anchor": "middle", class: "tick" },
      c.name)),
    rows.map((r, i) => s("g", { class: "heat-row" },
      s("text", { x: left - 8, y: top + i * cell + cell / 2 + 4, "text-anchor": "end", class: "tick" }, r.name),
      cols.map((c, j) => {
        const value = count(r.id, c.id);
        const intensity = value / max;
        return s("g", { class: "heat-cell", "data-from": r.id, "data-to": c.id },
          s("rect", { x: left + j * cell, y: top + i * cell, width: cell - 2, height: cell - 2,
            fill: value ? `rgba(78, 121, 167, ${0.15 + 0.85 * intensity})` : "#f3f4f6" },
          s("title", {}, `${r.name} → ${c.name}: ${value}`)),
          s("text", { x: left + j * cell + cell / 2 - 1, y: top + i * cell + cell / 2 + 4, "text-anchor": "middle",
            class: intensity > 0.55 ? "cell-value light" : "cell-value" }, String(value)));
      }))));
}

// values: numbers; markers: [{label, value}] drawn as vertical lines
export function histogram(values, markers, label, { width = 640, height = 220, bins = 20 } = {}) {
  const left = 40, right = 16, top = 28, bottom = 28;
  const plotWidth = width - left - right, plotHeight = height - top - bottom;
  const all = [...values, ...markers.map((m) => m.value)];
  let lo = Math.min(...all), hi = Math.max(...all);
  if (!Number.isFinite(lo)) { lo = 0; hi = 1; }
  if (hi === lo) { hi = lo + 1; }
  const span = hi - lo;
  const counts = new Array(bins).fill(0);
  for (const value of values) counts[Math.min(bins - 1, Math.floor(((value - lo) / span) * bins))] += 1;
  const yMax = niceMax(Math.max(...counts));
  const x = (v) => left + ((v - lo) / span) * plotWidth;
  const barWidth = plotWidth / bins;
  return chart(width, height, label,
    yAxis(left, top, plotHeight, plotWidth, yMax),
    counts.map((n, i) => s("rect", { x: left + i * barWidth + 1, y: top + plotHeight - (n / yMax) * plotHeight,
      width: Math.max(1, barWidth - 2), height: (n / yMax) * plotHeight, class: "bin" },
    s("title", {}, `${(lo + (i * span) / bins).toFixed(2)} – ${(lo + ((i + 1) * span) / bins).toFixed(2)}: ${n}`))),
    [lo, lo + span / 2, hi].map((v) => s("text", { x: x(v), y: height - 8, "text-anchor": "middle", class: "tick" },
      v.toFixed(2))),
    markers.map((m, i) => s("g", { class: "threshold" },
      s("line", { x1: x(m.value), x2: x(m.value), y1: top - 4, y2: top + plotHeight, stroke: color(i + 1),
        "stroke-width": 2, "stroke-dasharray": "4 3" }),
      s("text", { x: x(m.value) + 3, y: top - 8 - (i % 2) * 10, class: "legend" }, `${m.label} ≥ ${m.value.toFixed(2)}`))));
}

// items: [{label, value (0..1), state: "ok" | "flagged" | "insufficient", text?}]; a dashed line at
// `threshold`. Flagged bars are red (a sliver even at 0), groups too small to judge grey.
const RATIO_FILLS = { ok: "#4e79a7", flagged: "#e15759", insufficient: "#bab0ac" };

export function ratioBars(items, threshold, label, { width = 460 } = {}) {
  const left = Math.min(width / 3, 12 + 7 * Math.max(4, ...items.map((item) => String(item.label).length)));
  const right = 60, top = 18, rowHeight = 24;
  const height = top + items.length * rowHeight + 6;
  const plotWidth = width - left - right;
  const x = (v) => left + Math.max(0, Math.min(1, v)) * plotWidth;
  return chart(width, height, label,
    [0, 0.5, 1].map((v) => s("text", { x: x(v), y: 11, "text-anchor": "middle", class: "tick" }, v.toFixed(1))),
    items.map((item, i) => {
      const y = top + i * rowHeight;
      const text = item.text ?? item.value.toFixed(2);
      return s("g", { class: `ratio-bar ${item.state}`, "data-group": item.key ?? item.label },
        s("text", { x: left - 8, y: y + 15, "text-anchor": "end", class: "tick" }, item.label),
        s("rect", { x: left, y: y + 3, width: Math.max(x(item.value) - left, item.value > 0 || item.state === "flagged" ? 3 : 0),
          height: rowHeight - 8, fill: RATIO_FILLS[item.state] || RATIO_FILLS.ok },
        s("title", {}, `${item.label}: ${text}${item.state === "flagged" ? " (flagged)" : ""}`
          + `${item.state === "insufficient" ? " (too few members to judge)" : ""}`)),
        s("text", { x: x(item.value) + 6, y: y + 15, class: "value" }, text));
    }),
    s("g", { class: "threshold" },
      s("line", { x1: x(threshold), x2: x(threshold), y1: top - 2, y2: height - 4, stroke: "#e15759",
        "stroke-width": 1.5, "stroke-dasharray": "4 3" }),
      s("title", {}, `threshold ${threshold}`)));
}

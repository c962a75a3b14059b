// Small inline-SVG bar charts for the report: one bar per layer, in layer order, banded by decoder block and
// coloured by the layer's role (q_proj, down_proj, ...). No library; every label is a text node.

import { fmtScientific, h, svg } from "./common.js";

const WIDTH = 960;
const HEIGHT = 300;
const MARGIN = { top: 14, right: 12, bottom: 42, left: 64 };
const PALETTE = ["#2f6fb3", "#e07b24", "#2a9d8f", "#c2417a", "#7b61c9", "#8a9a2b", "#9c6644", "#5a6b7d", "#d4a72c"];

/** The decoder block of a layer name: its first all-digit component ("model.layers.7.mlp.up_proj" -> 7). */
export function blockOf(name) {
  const match = /(?:^|\.)(\d+)(?:\.|$)/.exec(name);
  return match ? Number(match[1]) : null;
}

/** The layer's role: its last name component, without a trailing ".weight" ("...mlp.up_proj.weight" -> up_proj). */
export function roleOf(name) {
  const parts = name.replace(/\.weight$/, "").split(".");
  return parts[parts.length - 1] || name;
}

function niceStep(span, ticks) {
  const raw = span / Math.max(1, ticks);
  const power = 10 ** Math.floor(Math.log10(raw));
  const unit = raw / power;
  return (unit <= 1 ? 1 : unit <= 2 ? 2 : unit <= 5 ? 5 : 10) * power;
}

function yScale(values, log) {
  const positive = values.filter((v) => v > 0);
  if (log && positive.length) {
    const lo = Math.floor(Math.log10(Math.min(...positive)));
    let hi = Math.ceil(Math.log10(Math.max(...positive)));
    if (hi === lo) hi = lo + 1;
    const ticks = [];
    for (let e = lo; e <= hi; e += 1) ticks.push(10 ** e);
    const map = (v) => (Math.log10(Math.max(v, 10 ** lo)) - lo) / (hi - lo);
    return { map, ticks, base: 10 ** lo };
  }
  const max = Math.max(...values, 0) || 1;
  const step = niceStep(max, 5);
  const top = Math.ceil(max / step - 1e-9) * step;
  const ticks = [];
  for (let t = 0; t <= top + step / 2; t += step) ticks.push(Number(t.toPrecision(12)));
  return { map: (v) => v / top, ticks, base: 0 };
}

/**
 * bars: [{name, value, behind?}] in layer order; `behind` draws a lighter bar under the value (e.g. dense
 * bytes under packed bytes). Returns {figure, roles}: an <svg> and the roles in colour order for a legend.
 */
/** Axis labels: 0.06, 0.00002, 1e-7 (no trailing zeros). */
function compact(value) {
  if (value === 0) return "0";
  const text = String(Number(value.toPrecision(3)));
  return text.length > 8 ? value.toExponential(0) : text;
}

export function layerBarChart({ bars, title, yLabel, log = false, format = fmtScientific, tickFormat = compact, describe }) {
  const plotW = WIDTH - MARGIN.left - MARGIN.right;
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
  const values = bars.flatMap((b) => (b.behind !== undefined ? [b.value, b.behind] : [b.value]));
  const scale = yScale(values, log);
  const step = plotW / Math.max(1, bars.length);
  const gap = step > 4 ? Math.min(2, step * 0.2) : 0;
  const roles = [];
  const colour = (role) => {
    if (!roles.includes(role)) roles.push(role);
    return PALETTE[roles.indexOf(role) % PALETTE.length];
  };
  const y = (v) => MARGIN.top + plotH * (1 - scale.map(v));
  const titleId = `plot-${Math.random().toString(36).slice(2)}`;
  const root = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    class: "plot",
    role: "img",
    "aria-labelledby": titleId,
    preserveAspectRatio: "xMidYMid meet",
  });
  root.append(svg("title", { id: titleId }, title));

  // Bands: every other decoder block shaded, block numbers under the axis (thinned when there are many).
  const groups = [];
  bars.forEach((bar, index) => {
    const block = blockOf(bar.name);
    const last = groups[groups.length - 1];
    if (last && last.block === block) last.end = index + 1;
    else groups.push({ block, start: index, end: index + 1 });
  });
  const labelEvery = Math.max(1, Math.ceil(groups.length / 32));
  const bands = svg("g", { class: "bands" });
  const blockLabels = svg("g", { class: "axis-labels" });
  groups.forEach((group, i) => {
    const x0 = MARGIN.left + group.start * step;
    const x1 = MARGIN.left + group.end * step;
    if (i % 2 === 1) bands.append(svg("rect", { x: x0, y: MARGIN.top, width: x1 - x0, height: plotH, class: "band" }));
    if (group.block !== null && i % labelEvery === 0) {
      blockLabels.append(
        svg("text", { x: (x0 + x1) / 2, y: MARGIN.top + plotH + 16, "text-anchor": "middle" }, String(group.block)),
      );
    }
  });
  root.append(bands);

  // Grid and y axis.
  const grid = svg("g", { class: "grid" });
  for (const tick of scale.ticks) {
    const ty = y(tick);
    grid.append(
      svg("line", { x1: MARGIN.left, x2: MARGIN.left + plotW, y1: ty, y2: ty }),
      svg("text", { x: MARGIN.left - 8, y: ty + 4, "text-anchor": "end" }, tickFormat(tick)),
    );
  }
  root.append(grid);

  const marks = svg("g", { class: "bars" });
  const bottom = y(scale.base);
  bars.forEach((bar, index) => {
    const x = MARGIN.left + index * step + gap / 2;
    const width = Math.max(0.5, step - gap);
    const role = roleOf(bar.name);
    if (bar.behind !== undefined) {
      const top = y(bar.behind);
      marks.append(svg("rect", { x, y: top, width, height: Math.max(0, bottom - top), class: "bar-behind" }));
    }
    const top = y(bar.value);
    const block = blockOf(bar.name);
    const label = describe ? describe(bar) : `${bar.name}: ${format(bar.value)}`;
    marks.append(
      svg(
        "rect",
        {
          x,
          y: top,
          width,
          height: Math.max(0.5, bottom - top),
          fill: colour(role),
          class: "bar",
          "data-layer": bar.name,
          "data-block": block ?? "",
        },
        svg("title", {}, label),
      ),
    );
  });
  root.append(marks);

  root.append(
    svg("line", { class: "axis", x1: MARGIN.left, x2: MARGIN.left + plotW, y1: bottom, y2: bottom }),
    blockLabels,
    svg(
      "text",
      { class: "axis-title", x: MARGIN.left + plotW / 2, y: HEIGHT - 6, "text-anchor": "middle" },
      groups.some((g) => g.block !== null) ? "decoder block (layers in model order)" : "layers in model order",
    ),
    svg(
      "text",
      {
        class: "axis-title",
        x: 14,
        y: MARGIN.top + plotH / 2,
        "text-anchor": "middle",
        transform: `rotate(-90 14 ${MARGIN.top + plotH / 2})`,
      },
      yLabel,
    ),
  );
  return { figure: root, roles: roles.map((role, i) => ({ role, colour: PALETTE[i % PALETTE.length] })) };
}

/** A legend: one swatch per role, in the chart's colours. */
export function legend(roles, extra = []) {
  const items = roles.map(({ role, colour }) => {
    const swatch = h("span", { class: "swatch", "aria-hidden": "true" });
    swatch.style.background = colour;
    return h("li", {}, swatch, role);
  });
  for (const { label, className } of extra) {
    items.push(h("li", {}, h("span", { class: `swatch ${className}`, "aria-hidden": "true" }), label));
  }
  return h("ul", { class: "legend" }, items);
}

// A line chart of queue depth and active items over time, drawn as SVG elements (no library, no
// markup strings). Its summary is in the accessible name, so the figure is not only visual.

import { s } from './dom.js';
import { clockTime } from './format.js';

const H = 160;
const PAD = { left: 34, right: 8, top: 10, bottom: 22 };

/** The series drawn, with their CSS class (colours live in style.css). */
const SERIES = [
  { key: 'depth', label: 'queue depth', cls: 'line-depth' },
  { key: 'active', label: 'active items', cls: 'line-active' },
];

/** `width`: the width the chart is drawn at, in CSS pixels, so that its text is not stretched. */
export function queueChart(samples, label, width = 600) {
  const W = Math.max(240, Math.round(width));
  const latest = samples[samples.length - 1];
  const summary = latest
    ? `${label}: queue depth and active items over the last hour, ${samples.length} samples; ` +
      `latest depth ${latest.depth}, active ${latest.active}`
    : `${label}: no samples yet`;
  const svg = s('svg', {
    viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-label': summary,
    preserveAspectRatio: 'none',
  }, s('title', {}, summary));
  const x0 = PAD.left;
  const x1 = W - PAD.right;
  const y0 = H - PAD.bottom;
  const y1 = PAD.top;
  svg.append(s('line', { x1: x0, y1: y0, x2: x1, y2: y0, class: 'axis' }));
  if (!samples.length) {
    svg.append(s('text', { x: (x0 + x1) / 2, y: (y0 + y1) / 2, class: 'chart-note', 'text-anchor': 'middle' },
      'no samples yet'));
    return svg;
  }
  const times = samples.map((p) => Date.parse(p.at));
  const end = times[times.length - 1];
  const start = Math.min(times[0], end - 60_000);
  const top = Math.max(1, ...samples.flatMap((p) => SERIES.map((k) => p[k.key])));
  const x = (t) => x0 + ((t - start) / Math.max(1, end - start)) * (x1 - x0);
  const y = (v) => y0 - (v / top) * (y0 - y1);
  svg.append(
    s('text', { x: x0 - 4, y: y1 + 8, class: 'tick', 'text-anchor': 'end' }, String(top)),
    s('text', { x: x0 - 4, y: y0, class: 'tick', 'text-anchor': 'end' }, '0'),
    s('text', { x: x0, y: H - 6, class: 'tick' }, clockTime(new Date(start))),
    s('text', { x: x1, y: H - 6, class: 'tick', 'text-anchor': 'end' }, clockTime(new Date(end))),
  );
  for (const series of SERIES) {
    const points = samples.map((p, i) => `${x(times[i]).toFixed(1)},${y(p[series.key]).toFixed(1)}`);
    svg.append(s('polyline', { points: points.join(' '), class: series.cls }));
  }
  return svg;
}

/** The legend that goes with the chart. */
export function legend() {
  return SERIES.map((series) => [
    s('svg', { viewBox: '0 0 20 4', class: 'swatch', 'aria-hidden': 'true' },
      s('line', { x1: 0, y1: 2, x2: 20, y2: 2, class: series.cls })),
    ` ${series.label} `,
  ]);
}

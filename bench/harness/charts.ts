/**
 * Grouped bar charts as SVG files: drawn by vega-lite + vega when both can be imported (pure JS,
 * no canvas needed for SVG), else by the small built-in drawer below, so a report always has its
 * charts.
 */
import { optionalImport } from './progress.js';

export interface BarChart {
  readonly title: string;
  /** Y axis title. */
  readonly unit: string;
  /** X axis categories, in order, and the bars within each. */
  readonly groups: readonly string[];
  readonly series: readonly string[];
  /** values[g][s]; undefined or NaN draws no bar. */
  readonly values: readonly (readonly (number | undefined)[])[];
  readonly xTitle?: string;
  /** d3-format of the value labels (vega-lite), when `format` is not given. */
  readonly valueFormat?: string;
  /** How a bar's value label reads: give the formatter of the table beside the chart (default: `shortNumber`). */
  readonly format?: (v: number) => string;
}

export type ChartRenderer = 'vega-lite' | 'built-in';

const PALETTE = ['#4c78a8', '#f58518', '#54a24b', '#e45756', '#72b7b2', '#eeca3b', '#b279a2', '#ff9da6', '#9d755d', '#bab0ac'];

interface VegaLiteModule { compile(spec: unknown): { spec: unknown } }
interface VegaView { toSVG(): Promise<string>; finalize?(): void }
interface VegaModule {
  parse(spec: unknown): unknown;
  View: new (runtime: unknown, opts: { renderer: string }) => VegaView;
}

let vegaLoad: Promise<{ vl: VegaLiteModule; vega: VegaModule } | undefined> | undefined;

function loadVega() {
  vegaLoad ??= (async () => {
    const vl = await optionalImport<VegaLiteModule>('vega-lite');
    const vega = await optionalImport<VegaModule>('vega');
    if (typeof vl?.compile !== 'function' || typeof vega?.parse !== 'function' || typeof vega.View !== 'function') return undefined;
    return { vl, vega };
  })();
  return vegaLoad;
}

/** Renders with vega-lite if importable, else with the built-in drawer; never throws for lack of it. */
export async function renderChart(c: BarChart): Promise<{ svg: string; renderer: ChartRenderer }> {
  const v = await loadVega();
  if (v !== undefined) {
    try {
      return { svg: await vegaSvg(v.vl, v.vega, c), renderer: 'vega-lite' };
    } catch {
      // fall through to the built-in drawer
    }
  }
  return { svg: builtInSvg(c), renderer: 'built-in' };
}

async function vegaSvg(vl: VegaLiteModule, vega: VegaModule, c: BarChart): Promise<string> {
  const values: { group: string; series: string; value: number; label: string }[] = [];
  c.groups.forEach((g, gi) => c.series.forEach((s, si) => {
    const v = c.values[gi]?.[si];
    if (v !== undefined && Number.isFinite(v)) values.push({ group: g, series: s, value: v, label: c.format !== undefined ? c.format(v) : shortNumber(v) });
  }));
  const spec = {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: c.title,
    // Each group at least as wide as its name (about 6.5 px a character at 11 px), so names are never cut.
    width: { step: Math.max(12 * c.series.length, 48, Math.ceil(Math.max(0, ...c.groups.map((g) => g.length)) * 6.5 + 8)), for: 'position' },
    height: 280,
    data: { values },
    encoding: {
      x: { field: 'group', type: 'nominal', sort: [...c.groups], title: c.xTitle ?? null, axis: { labelAngle: 0, labelLimit: 0 } },
      xOffset: { field: 'series', type: 'nominal', sort: [...c.series] },
      y: { field: 'value', type: 'quantitative', title: c.unit, axis: { format: labelFormat(values.map((v) => v.value)) } },
      color: { field: 'series', type: 'nominal', sort: [...c.series], title: null, scale: { range: PALETTE }, legend: { labelLimit: 0 } },
    },
    layer: [
      { mark: 'bar' },
      c.format === undefined && c.valueFormat !== undefined
        ? { mark: { type: 'text', dy: -4, fontSize: 9 }, encoding: { text: { field: 'value', type: 'quantitative', format: c.valueFormat } } }
        // Labels made here, by the tables' rules: vega's one format per chart cannot write 1,194 and 29.4 side by side.
        : { mark: { type: 'text', dy: -4, fontSize: 9 }, encoding: { text: { field: 'label', type: 'nominal' } } },
    ],
  };
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize?.();
  }
}

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

/** 1, 2, 5 x 10^k at or above `v`. */
function niceCeil(v: number): number {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

/**
 * Labels read like the report's tables: whole numbers with thousands separators (1,194 MiB/s,
 * not 1.19k) from 100 up, else up to two decimals (0.52x). `labelFormat` is the same rule as a
 * d3-format for vega-lite, chosen from a chart's values.
 */
export function shortNumber(v: number): string {
  if (Math.abs(v) >= 100) return Math.round(v).toLocaleString('en-US');
  return String(+v.toFixed(2));
}

export function labelFormat(values: readonly number[]): string {
  return values.some((v) => Math.abs(v) >= 100) ? ',.0f' : '.2~f';
}

/** A plain grouped bar chart: y axis with 5 ticks, value labels, legend on top. No dependency. */
export function builtInSvg(c: BarChart): string {
  const finite = c.values.flat().filter((v): v is number => v !== undefined && Number.isFinite(v));
  const max = niceCeil(Math.max(0, ...finite));
  const left = 64, right = 16, top = 56, bottom = 44;
  const groupW = Math.max(60, c.series.length * 22 + 20, ...c.groups.map((g) => g.length * 6.4 + 14));
  const plotW = groupW * Math.max(1, c.groups.length);
  const plotH = 260;
  const legendW = c.series.reduce((w, s) => w + 24 + s.length * 6.2, 0);
  const W = Math.round(Math.max(left + plotW + right, left + legendW + right, c.title.length * 8 + 24, 480)), H = top + plotH + bottom;
  const y = (v: number) => top + plotH - (v / max) * plotH;
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">${esc(c.title)}</text>`,
  ];
  // Legend.
  let lx = left;
  c.series.forEach((s, i) => {
    out.push(`<rect x="${lx.toFixed(1)}" y="28" width="10" height="10" fill="${PALETTE[i % PALETTE.length]}"/>`, `<text x="${(lx + 14).toFixed(1)}" y="37">${esc(s)}</text>`);
    lx += 24 + s.length * 6.2;
  });
  // Axes and grid.
  for (let t = 0; t <= 5; t++) {
    const v = (max * t) / 5;
    out.push(`<line x1="${left}" x2="${left + plotW}" y1="${y(v)}" y2="${y(v)}" stroke="#ddd"/>`,
      `<text x="${left - 6}" y="${y(v) + 4}" text-anchor="end">${shortNumber(v)}</text>`);
  }
  out.push(`<line x1="${left}" x2="${left}" y1="${top}" y2="${top + plotH}" stroke="#333"/>`,
    `<line x1="${left}" x2="${left + plotW}" y1="${top + plotH}" y2="${top + plotH}" stroke="#333"/>`,
    `<text transform="translate(14 ${top + plotH / 2}) rotate(-90)" text-anchor="middle">${esc(c.unit)}</text>`);
  // Bars.
  const barW = (groupW - 20) / Math.max(1, c.series.length);
  c.groups.forEach((g, gi) => {
    const gx = left + gi * groupW + 10;
    out.push(`<text x="${gx + (groupW - 20) / 2}" y="${top + plotH + 16}" text-anchor="middle">${esc(g)}</text>`);
    c.series.forEach((_, si) => {
      const v = c.values[gi]?.[si];
      if (v === undefined || !Number.isFinite(v)) return;
      const x = gx + si * barW;
      const label = c.format !== undefined ? c.format(v) : shortNumber(v);
      out.push(`<rect x="${x.toFixed(1)}" y="${y(v).toFixed(1)}" width="${(barW - 2).toFixed(1)}" height="${(top + plotH - y(v)).toFixed(1)}" fill="${PALETTE[si % PALETTE.length]}"><title>${esc(`${c.series[si]}: ${label}`)}</title></rect>`,
        `<text x="${(x + (barW - 2) / 2).toFixed(1)}" y="${(y(v) - 3).toFixed(1)}" text-anchor="middle" font-size="9">${esc(label)}</text>`);
    });
  });
  if (c.xTitle !== undefined) out.push(`<text x="${left + plotW / 2}" y="${H - 6}" text-anchor="middle">${esc(c.xTitle)}</text>`);
  out.push('</svg>');
  return out.join('\n') + '\n';
}

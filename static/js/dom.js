// Small DOM and formatting helpers shared by every module. No state lives here.

export const $ = (id) => document.getElementById(id);

/** Builds an element: `attrs` may hold class, text, dataset, on<event> handlers and attributes. */
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k === 'dataset') Object.assign(node.dataset, v);
      else if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** Bytes in binary units (KiB, MiB, GiB) — the one unit system of the whole page. */
export function fmtBytes(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return '—';
  if (n >= GiB) return `${(n / GiB).toFixed(n >= 10 * GiB ? 1 : 2)} GiB`;
  if (n >= MiB) return `${Math.round(n / MiB)} MiB`;
  if (n >= KiB) return `${Math.round(n / KiB)} KiB`;
  return `${Math.round(n)} B`;
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return '—';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  const m = Math.floor(ms / 60000);
  const s = Math.round((ms % 60000) / 1000);
  return `${m} m ${String(s).padStart(2, '0')} s`;
}

export function fmtCfg(v) {
  return Number.isFinite(v) ? (Math.round(v * 100) / 100).toFixed(1) : '—';
}

export function shortId(id) {
  return String(id).slice(0, 8);
}

export function clamp(v, lo, hi) {
  return Math.min(hi, Math.max(lo, v));
}

export const isMac = /Mac|iPhone|iPad/.test(navigator.platform || navigator.userAgent || '');

/** A touch-first device: no hover, coarse pointer (keyboard shortcuts are not advertised there). */
export function isTouch() {
  return window.matchMedia('(hover: none) and (pointer: coarse)').matches;
}

export function parseData(ev) {
  try { return ev.data ? JSON.parse(ev.data) : {}; } catch { return {}; }
}

/** localStorage that never throws (private mode, disabled storage). */
export const stored = {
  get(key, fallback = null) {
    try { const v = localStorage.getItem(key); return v === null ? fallback : v; } catch { return fallback; }
  },
  set(key, value) {
    try { localStorage.setItem(key, String(value)); } catch { /* not kept */ }
  },
  json(key, fallback) {
    try { const v = localStorage.getItem(key); return v === null ? fallback : JSON.parse(v); } catch { return fallback; }
  },
  setJson(key, value) {
    try { localStorage.setItem(key, JSON.stringify(value)); } catch { /* not kept */ }
  },
};

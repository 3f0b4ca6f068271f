// The loaded model's facts as /api/info gives them: defaults, limits and the family profile
// (step presets, CFG presets, bands with their texts). Nothing here names a family or holds a
// family's numbers: a model without a profile gets neutral hints built from its defaults.

import { state } from './store.js';
import { fill, localized } from './i18n.js';
import { fmtCfg } from './dom.js';

const NEUTRAL_LIMITS = { width: [64, 2048], height: [64, 2048], steps: [1, 100], cfg: [1, 10], batch: [1, 1], prompt_chars: 4000 };

export function model() {
  return (state.info && state.info.model) || {};
}

export function limits() {
  return { ...NEUTRAL_LIMITS, ...(model().limits || {}) };
}

export function defaults() {
  return model().defaults || {};
}

export function sizeMultiple() {
  return model().size_multiple || 8;
}

export function safeCfgMax() {
  const s = model().safe_cfg_max;
  return Number.isFinite(s) ? s : null;
}

/** The family profile (`model.profile`), or null when the server sends none. */
export function profile() {
  const p = model().profile;
  return p && typeof p === 'object' ? p : null;
}

/** The first band whose `max` ≥ value (null = unbounded), as the profile contract defines it. */
export function bandFor(bands, value) {
  if (!Array.isArray(bands) || !Number.isFinite(value)) return null;
  for (const b of bands) {
    if (b && (b.max === null || b.max === undefined || value <= b.max + 1e-9)) return b;
  }
  return null;
}

/** A band's text with {value}, {default} and {safe} filled in. */
export function bandText(text, vars) {
  return text ? fill(text, vars) : '';
}

/** [hint, level, advice] of a band in the page's language (its `i18n`, else the English). */
function bandParts(band, vars) {
  return [bandText(localized(band, 'hint'), vars), band.level || '', bandText(localized(band, 'advice'), vars)];
}

export function stepPresets() {
  const p = profile();
  const list = p && p.steps && Array.isArray(p.steps.presets) ? p.steps.presets : [];
  if (list.length) return list.filter(Number.isFinite);
  const d = defaults().steps;
  return Number.isFinite(d) ? [d] : [];
}

export function cfgPresets() {
  const p = profile();
  const list = p && p.cfg && Array.isArray(p.cfg.presets) ? p.cfg.presets : [];
  return list.filter(Number.isFinite);
}

/** CFG at or above which the engine clamps to the safe maximum (from the profile). */
export function cfgInterceptAt() {
  const p = profile();
  const v = p && p.cfg ? p.cfg.intercept_at : null;
  return Number.isFinite(v) ? v : null;
}

/** The CFG slider's range: up to the interception point when known, else twice the safe max. */
export function cfgRange() {
  const [lo, hi] = limits().cfg;
  const min = Math.max(1, lo);
  const cut = cfgInterceptAt();
  const safe = safeCfgMax();
  let max = hi;
  if (cut !== null) max = Math.min(hi, cut);
  else if (safe !== null) max = Math.min(hi, Math.max(safe * 2, defaults().cfg || min));
  return [min, Math.max(min, max)];
}

/** [text, level, advice] for a step count: the profile's band, or neutral words from defaults. */
export function stepsBand(n, neutral) {
  if (!Number.isFinite(n)) return ['', '', ''];
  const p = profile();
  const vars = { value: n, default: defaults().steps, safe: '' };
  const band = bandFor(p && p.steps && p.steps.bands, n);
  if (band) return bandParts(band, vars);
  return neutral(n, vars);
}

/** [text, level, advice] for a CFG value, as [stepsBand]. */
export function cfgBand(v, neutral) {
  if (!Number.isFinite(v)) return ['', '', ''];
  const p = profile();
  const safe = safeCfgMax();
  const vars = { value: fmtCfg(v), default: fmtCfg(defaults().cfg), safe: safe === null ? '' : fmtCfg(safe) };
  const band = bandFor(p && p.cfg && p.cfg.bands, v);
  if (band) return bandParts(band, vars);
  return neutral(v, vars);
}

/** Features the server announces (`/api/info` `features`), e.g. img2img, controlnet. */
export function hasFeature(name) {
  const f = state.info && state.info.features;
  if (Array.isArray(f)) return f.includes(name);
  return !!(f && typeof f === 'object' && f[name]);
}

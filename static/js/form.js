// The generation form: hints drawn from the model's profile, validation, reading the request
// body, and putting a job's parameters back (restore).

import { $, el, fmtCfg, clamp } from './dom.js';
import { state, emit } from './store.js';
import { t, promptLength } from './i18n.js';
import {
  limits, defaults, sizeMultiple, safeCfgMax, stepPresets, cfgPresets, cfgRange, stepsBand, cfgBand,
} from './profile.js';
import { toast } from './toast.js';
import { img2imgFields, restoreImg2Img, IMG2IMG_FIELD_IDS } from './img2img.js';

export const F = {
  form: $('gen-form'),
  prompt: $('prompt'),
  negative: $('negative-prompt'),
  width: $('width'),
  height: $('height'),
  steps: $('steps'),
  cfg: $('cfg'),
  cfgValue: $('cfg-value'),
  seedRandom: $('seed-random'),
  seedFixed: $('seed-fixed'),
  seed: $('seed'),
  batch: $('batch'),
  enhance: $('enhance'),
  memoryMode: $('memory-mode'),
  generate: $('generate'),
  cancel: $('cancel'),
};

// API field name -> input element id
const FIELD_IDS = {
  prompt: 'prompt',
  negative_prompt: 'negative-prompt',
  width: 'width',
  height: 'height',
  steps: 'steps',
  cfg: 'cfg',
  seed: 'seed',
  batch: 'batch',
  enhance: 'enhance',
  memory_mode: 'memory-mode',
  ...IMG2IMG_FIELD_IDS,
};

export function clearFieldErrors() {
  for (const id of Object.values(FIELD_IDS)) {
    const input = $(id);
    if (input) input.removeAttribute('aria-invalid');
    const err = $(`${id}-error`);
    if (err) { err.hidden = true; err.textContent = ''; }
  }
  const fe = $('form-error');
  fe.hidden = true;
  fe.textContent = '';
  fe.classList.remove('warn');
}

export function showFieldError(field, message) {
  const id = field && FIELD_IDS[field];
  const input = id && $(id);
  if (!input) {
    showFormError(field ? `${field}: ${message}` : message);
    return null;
  }
  input.setAttribute('aria-invalid', 'true');
  const err = $(`${id}-error`);
  if (err) { err.textContent = message; err.hidden = false; }
  return input;
}

export function showFormError(message, kind) {
  const fe = $('form-error');
  fe.textContent = message;
  fe.classList.toggle('warn', kind === 'warn');
  fe.hidden = false;
}

export function clearFormWarning() {
  const fe = $('form-error');
  if (fe.classList.contains('warn')) { fe.hidden = true; fe.classList.remove('warn'); }
}

export function clearOneError(input) {
  if (input.getAttribute('aria-invalid') !== 'true') return;
  input.removeAttribute('aria-invalid');
  const err = $(`${input.id}-error`);
  if (err) { err.hidden = true; err.textContent = ''; }
}

function setHint(node, text, level) {
  node.textContent = text;
  node.className = `hint${level ? ` ${level}` : ''}`;
}

/** Prompt length: words for alphabetic scripts, characters for CJK, each with its own guidance. */
export function updateWordCount() {
  const text = F.prompt.value;
  const { words, cjk } = promptLength(text);
  const counter = $('word-count');
  const hint = $('prompt-hint');
  const maxChars = limits().prompt_chars;
  counter.className = 'counter';
  let label;
  let msg;
  let level = '';
  if (cjk > 0 && cjk >= words) {
    label = t('prompt.count.chars', { n: cjk });
    if (cjk < 15) msg = t('prompt.hint.cjk.short');
    else if (cjk <= 30) { msg = t('prompt.hint.cjk.good'); level = 'ok'; }
    else if (cjk <= 40) msg = t('prompt.hint.cjk.long');
    else { msg = t('prompt.hint.cjk.tooLong'); level = 'warn'; }
  } else {
    label = words === 1 ? t('prompt.count.word') : t('prompt.count.words', { n: words });
    if (words === 0) msg = t('prompt.hint.empty');
    else if (words < 8) msg = t('prompt.hint.short');
    else if (words <= 12) { msg = t('prompt.hint.good'); level = 'ok'; }
    else if (words <= 15) msg = t('prompt.hint.long');
    else { msg = t('prompt.hint.tooLong'); level = 'warn'; }
  }
  if (text.length > maxChars * 0.9) label += ` · ${text.length}/${maxChars}`;
  counter.textContent = words || cjk ? label : '';
  if (level) counter.classList.add(level);
  if (text.length > maxChars) counter.classList.add('bad');
  setHint(hint, msg, level);
}

function neutralSteps(n, vars) {
  if (n === vars.default) return [t('steps.neutral.default', vars), 'ok', ''];
  return [t('steps.neutral.other', vars), '', ''];
}

function neutralCfg(v, vars) {
  const safe = safeCfgMax();
  if (safe !== null && v > safe + 1e-9) return [t('cfg.neutral.aboveSafe', vars), 'warn', ''];
  if (Math.abs(v - (defaults().cfg ?? NaN)) < 1e-6) return [t('cfg.neutral.default', vars), 'ok', ''];
  return ['', '', ''];
}

/** The steps hint for `n`, as the form shows it (also read by the enhancement preview). */
export function stepsHint(n) {
  return stepsBand(n, neutralSteps);
}

export function cfgHint(v) {
  return cfgBand(v, neutralCfg);
}

export function updateStepsUi() {
  const n = Number(F.steps.value);
  for (const b of $('steps-presets').querySelectorAll('button')) {
    b.setAttribute('aria-pressed', String(Number(b.dataset.steps) === n));
  }
  const [text, level] = stepsHint(n);
  setHint($('steps-hint'), text, level);
}

export function updateCfgUi() {
  const v = Number(F.cfg.value);
  F.cfgValue.textContent = fmtCfg(v);
  const [text, level] = cfgHint(v);
  F.cfgValue.className = level === 'warn' || level === 'bad' ? level : '';
  setHint($('cfg-hint'), text, level);
}

export function updateSizeUi() {
  const w = Number(F.width.value);
  const h = Number(F.height.value);
  for (const b of $('size-presets').querySelectorAll('button')) {
    b.setAttribute('aria-pressed', String(Number(b.dataset.w) === w && Number(b.dataset.h) === h));
  }
  const m = sizeMultiple();
  const hint = $('size-hint');
  if (Number.isFinite(w) && Number.isFinite(h) && w > 0 && h > 0) {
    hint.textContent = t('size.hint', { mp: ((w * h) / 1e6).toFixed(2), m });
  } else {
    hint.textContent = t('size.multiple', { m });
  }
}

export function updateSeedUi() {
  const fixed = F.seedFixed.checked;
  F.seed.disabled = !fixed;
  F.seed.placeholder = fixed ? t('seed.placeholder.fixed') : t('seed.placeholder.random');
  if (!fixed) clearOneError(F.seed);
}

export function updateMemoryModeUi() {
  const key = `memory.hint.${F.memoryMode.value}`;
  $('memory-mode-hint').textContent = t(key);
}

export function updateAllHints() {
  updateWordCount();
  updateStepsUi();
  updateCfgUi();
  updateSizeUi();
  updateSeedUi();
  updateMemoryModeUi();
}

export function randomSeed() {
  const a = new Uint32Array(2);
  crypto.getRandomValues(a);
  // 2^53 - 1 is the largest integer JSON/JS round-trips exactly; stay well inside it.
  return (a[0] % 0x1fffff) * 0x100000000 + a[1];
}

function intOrNaN(v) {
  const s = String(v).trim();
  return /^-?\d+$/.test(s) ? Number(s) : NaN;
}

export function maxBatchAllowed() {
  const info = state.info || {};
  const lim = limits().batch;
  return Math.max(1, Math.min(info.max_batch || lim[1], lim[1]));
}

/** Validates the form; returns {body, errors:[[field, message]]}. */
export function readForm() {
  const lim = limits();
  const errors = [];
  const prompt = F.prompt.value.trim();
  const negative = F.negative.value.trim();
  const maxChars = lim.prompt_chars;
  if (!prompt) errors.push(['prompt', t('err.prompt.empty')]);
  else if (prompt.length > maxChars) errors.push(['prompt', t('err.chars', { n: maxChars })]);
  if (negative.length > maxChars) errors.push(['negative_prompt', t('err.chars', { n: maxChars })]);

  const m = sizeMultiple();
  const dims = {};
  for (const key of ['width', 'height']) {
    const v = intOrNaN(F[key].value);
    const [lo, hi] = lim[key];
    const name = t(key === 'width' ? 'field.width' : 'field.height');
    dims[key] = v;
    if (!Number.isFinite(v)) errors.push([key, t('err.whole', { name })]);
    else if (v < lo || v > hi) errors.push([key, t('err.range', { name, lo, hi })]);
    else if (v % m !== 0) {
      const down = Math.max(lo, Math.floor(v / m) * m);
      const up = Math.min(hi, Math.ceil(v / m) * m);
      errors.push([key, t('err.multiple', { name, m, down, up })]);
    }
  }

  const steps = intOrNaN(F.steps.value);
  const [slo, shi] = lim.steps;
  if (!Number.isFinite(steps) || steps < slo || steps > shi) errors.push(['steps', t('err.steps', { lo: slo, hi: shi })]);

  const cfg = Number(F.cfg.value);
  const [clo, chi] = lim.cfg;
  if (!Number.isFinite(cfg) || cfg < clo || cfg > chi) errors.push(['cfg', t('err.cfg', { lo: clo, hi: chi })]);

  let seed;
  if (F.seedFixed.checked) {
    seed = intOrNaN(F.seed.value);
    if (!Number.isFinite(seed) || seed < 0) errors.push(['seed', t('err.seed')]);
    else if (!Number.isSafeInteger(seed)) errors.push(['seed', t('err.seed.big')]);
  }

  const batch = intOrNaN(F.batch.value);
  const maxBatch = maxBatchAllowed();
  if (!Number.isFinite(batch) || batch < 1 || batch > maxBatch) errors.push(['batch', t('err.batch', { n: maxBatch })]);

  const body = {
    prompt,
    width: dims.width,
    height: dims.height,
    steps,
    cfg: Math.round(cfg * 100) / 100,
    batch,
    enhance: F.enhance.checked,
    memory_mode: F.memoryMode.value,
  };
  if (negative) body.negative_prompt = negative;
  if (seed !== undefined) body.seed = seed;
  img2imgFields(body, errors);
  emit('form:read', body);
  return { body, errors };
}

function setSelectValue(select, value) {
  const v = String(value);
  if ([...select.options].some((o) => o.value === v)) select.value = v;
}

/**
 * Puts a job's parameters back into the form.
 * `p` uses JobRecord.params keys; `enh` is JobRecord.enhancement (or null).
 * opts: `seed` (one image's own seed: restores batch 1 with it), `memoryMode` (the mode the
 * user chose, not the one it resolved to), `from` (a file name for the toast), `keepEnhance`.
 * When the original (pre-enhancement) prompt is known it is restored with enhancement on; when
 * only an enhanced final prompt is known, with enhancement off, so the same text reaches the model.
 */
export function restoreParams(p, enh, opts = {}) {
  if (!p) return;
  clearFieldErrors();
  let enhanceNote = false;
  if (enh && typeof enh.original_prompt === 'string') {
    F.prompt.value = enh.original_prompt;
    F.negative.value = enh.original_negative_prompt || '';
    F.enhance.checked = true;
  } else {
    if (typeof p.prompt === 'string') F.prompt.value = p.prompt;
    if (typeof p.negative_prompt === 'string') F.negative.value = p.negative_prompt;
    if (p.enhance === true && !opts.keepEnhance) {
      F.enhance.checked = false;
      enhanceNote = true;
    } else if (p.enhance === false) {
      F.enhance.checked = false;
    }
  }
  if (Number.isFinite(Number(p.width)) && p.width) F.width.value = String(p.width);
  if (Number.isFinite(Number(p.height)) && p.height) F.height.value = String(p.height);
  if (Number.isFinite(Number(p.steps)) && p.steps) F.steps.value = String(p.steps);
  const cfg = Number(p.cfg ?? p.cfg_requested);
  if (Number.isFinite(cfg)) F.cfg.value = String(clamp(cfg, Number(F.cfg.min), Number(F.cfg.max)));
  const seed = opts.seed ?? p.seed;
  if (seed !== undefined && seed !== null && /^\d+$/.test(String(seed))) {
    F.seedFixed.checked = true;
    F.seed.value = String(seed);
  }
  if (opts.seed !== undefined && opts.seed !== null) setSelectValue(F.batch, 1);
  else if (p.batch) setSelectValue(F.batch, p.batch);
  const mode = opts.memoryMode || p.memory_mode;
  if (mode) setSelectValue(F.memoryMode, mode);
  restoreImg2Img(p);
  updateAllHints();
  emit('form:changed', { restored: true });
  F.form.classList.remove('flash');
  void F.form.offsetWidth;
  F.form.classList.add('flash');
  if (window.matchMedia('(max-width: 900px)').matches) F.form.scrollIntoView({ behavior: 'smooth', block: 'start' });
  const where = opts.from ? t('restore.from', { name: opts.from }) : '';
  toast(enhanceNote ? t('restore.doneEnhanceOff', { from: where }) : t('restore.done', { from: where }), 'ok');
}

/** Fixes the seed to `seed` (a result's own seed). */
export function useSeed(seed) {
  F.seedFixed.checked = true;
  F.seed.value = String(seed);
  updateSeedUi();
  clearOneError(F.seed);
  toast(t('seed.fixedToast', { seed }), 'ok', 2500);
}

/** Sets the form up for the loaded model: ranges, presets, defaults. */
export function applyInfoToForm(info, { keepValues = false } = {}) {
  const lim = limits();
  const d = defaults();
  const mult = sizeMultiple();
  for (const key of ['width', 'height']) {
    const [lo, hi] = lim[key];
    F[key].min = String(lo);
    F[key].max = String(hi);
    F[key].step = String(mult);
  }
  const [wl, wh] = lim.width;
  const [hl, hh] = lim.height;
  for (const b of $('size-presets').querySelectorAll('button')) {
    const w = Number(b.dataset.w);
    const h = Number(b.dataset.h);
    b.hidden = w < wl || w > wh || h < hl || h > hh || w % mult !== 0 || h % mult !== 0;
  }
  const [slo, shi] = lim.steps;
  F.steps.min = String(slo);
  F.steps.max = String(shi);
  const presets = stepPresets().filter((s) => s >= slo && s <= shi);
  $('steps-presets').replaceChildren(...presets.map((s) => el('button', { type: 'button', dataset: { steps: String(s) }, text: String(s) })));
  $('steps-presets').hidden = presets.length === 0;

  const [cmin, cmax] = cfgRange();
  F.cfg.min = String(cmin);
  F.cfg.max = String(cmax);
  const marks = [...new Set([cmin, ...cfgPresets().filter((v) => v > cmin && v < cmax), cmax])].sort((a, b) => a - b);
  $('cfg-marks').replaceChildren(...marks.map((v) => el('option', { value: String(v) })));
  $('cfg-scale').replaceChildren(...marks.map((v) => el('span', { text: fmtCfg(v) })));
  F.prompt.maxLength = lim.prompt_chars;
  F.negative.maxLength = lim.prompt_chars;

  const maxB = maxBatchAllowed();
  const batch = F.batch.value;
  F.batch.replaceChildren(...Array.from({ length: maxB }, (_, i) => el('option', { value: i + 1, text: String(i + 1) })));
  const modes = info.memory_modes && info.memory_modes.length ? info.memory_modes : ['auto'];
  const mode = F.memoryMode.value;
  F.memoryMode.replaceChildren(...modes.map((mm) => el('option', { value: mm, text: t(`memory.mode.${mm}`) })));

  if (keepValues) {
    setSelectValue(F.batch, batch);
    setSelectValue(F.memoryMode, mode || 'auto');
  } else {
    setSelectValue(F.memoryMode, 'auto');
    F.width.value = String(d.width ?? 512);
    F.height.value = String(d.height ?? 512);
    F.steps.value = String(d.steps ?? slo);
    F.cfg.value = String(d.cfg ?? cmin);
    F.batch.value = '1';
  }
  updateAllHints();
}

/** The memory mode option labels follow the language. */
function relabelModes() {
  for (const o of F.memoryMode.options) o.textContent = t(`memory.mode.${o.value}`);
}

export function wireForm() {
  F.prompt.addEventListener('input', () => {
    clearOneError(F.prompt);
    updateWordCount();
    emit('form:changed', { field: 'prompt' });
  });
  F.negative.addEventListener('input', () => {
    clearOneError(F.negative);
    emit('form:changed', { field: 'negative_prompt' });
  });
  F.enhance.addEventListener('change', () => emit('form:changed', { field: 'enhance', immediate: true }));

  $('size-presets').addEventListener('click', (e) => {
    const b = e.target.closest('button[data-w]');
    if (!b) return;
    F.width.value = b.dataset.w;
    F.height.value = b.dataset.h;
    clearOneError(F.width);
    clearOneError(F.height);
    updateSizeUi();
    emit('form:changed', { field: 'size' });
  });
  for (const inp of [F.width, F.height]) {
    inp.addEventListener('input', () => { clearOneError(inp); updateSizeUi(); emit('form:changed', { field: 'size' }); });
    inp.addEventListener('change', () => {
      // nudge to the nearest multiple when the user leaves the field
      const v = intOrNaN(inp.value);
      const m = sizeMultiple();
      if (Number.isFinite(v) && v > 0 && v % m !== 0) {
        const lo = Number(inp.min) || m;
        const hi = Number(inp.max) || 2048;
        inp.value = String(clamp(Math.round(v / m) * m, lo, hi));
        toast(t('size.rounded', { name: t(inp.id === 'width' ? 'field.width' : 'field.height'), v: inp.value, m }), 'info', 2500);
      }
      updateSizeUi();
    });
  }

  $('steps-presets').addEventListener('click', (e) => {
    const b = e.target.closest('button[data-steps]');
    if (!b) return;
    F.steps.value = b.dataset.steps;
    clearOneError(F.steps);
    updateStepsUi();
    emit('form:changed', { field: 'steps' });
  });
  F.steps.addEventListener('input', () => { clearOneError(F.steps); updateStepsUi(); emit('form:changed', { field: 'steps' }); });

  F.cfg.addEventListener('input', () => { clearOneError(F.cfg); updateCfgUi(); emit('form:changed', { field: 'cfg' }); });

  F.seedRandom.addEventListener('change', updateSeedUi);
  F.seedFixed.addEventListener('change', () => {
    updateSeedUi();
    if (!F.seed.value) F.seed.value = String(randomSeed());
    F.seed.focus();
  });
  F.seed.addEventListener('input', () => clearOneError(F.seed));
  $('seed-dice').addEventListener('click', () => {
    F.seedFixed.checked = true;
    F.seed.value = String(randomSeed());
    updateSeedUi();
    clearOneError(F.seed);
  });

  F.batch.addEventListener('change', () => clearOneError(F.batch));
  F.memoryMode.addEventListener('change', () => { clearOneError(F.memoryMode); updateMemoryModeUi(); });
}

export function relabelForm() {
  relabelModes();
  updateAllHints();
}

/**
 * The form field another feature provides for an image — `input` (img2img) or `control`
 * (ControlNet): any element with `data-image-slot="input"` / `"control"`. The viewer's "use as
 * input" / "use as control" set its `value` to the image URL (for inputs) and dispatch a bubbling
 * `zturbo:use-image` event with `{src, jobId, index, seed, width, height}`; both buttons stay
 * hidden while no such element exists or /api/info does not list the feature.
 */
export function imageSlot(slot) {
  return document.querySelector(`[data-image-slot="${slot}"]`);
}

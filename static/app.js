// zturbo web UI — plain ES2020 module, no dependencies, talks only to the same-origin API.
'use strict';

import {
  mountImg2Img, img2imgInfo, img2imgFields, restoreImg2Img, useAsInputButton, IMG2IMG_FIELD_IDS,
} from './js/img2img.js';

/* ------------------------------------------------------------------ *
 * small helpers
 * ------------------------------------------------------------------ */

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
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

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

function fmtBytes(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return '—';
  if (n >= GiB) return `${(n / GiB).toFixed(n >= 10 * GiB ? 1 : 2)} GiB`;
  if (n >= MiB) return `${Math.round(n / MiB)} MiB`;
  if (n >= KiB) return `${Math.round(n / KiB)} KiB`;
  return `${Math.round(n)} B`;
}

function fmtMs(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return '—';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  const m = Math.floor(ms / 60000);
  const s = Math.round((ms % 60000) / 1000);
  return `${m} m ${String(s).padStart(2, '0')} s`;
}

function fmtCfg(v) {
  return Number.isFinite(v) ? (Math.round(v * 100) / 100).toFixed(1) : '—';
}

function countWords(text) {
  const m = text.trim().match(/[\p{L}\p{N}]+(?:['’-][\p{L}\p{N}]+)*/gu);
  return m ? m.length : 0;
}

function shortId(id) {
  return String(id).slice(0, 8);
}

const isMac = /Mac|iPhone|iPad/.test(navigator.platform || navigator.userAgent || '');

/* ------------------------------------------------------------------ *
 * API
 * ------------------------------------------------------------------ */

class ApiError extends Error {
  constructor(status, field, message, headers) {
    super(message);
    this.status = status;
    this.field = field;
    this.headers = headers;
  }
}

async function api(path, opts = {}) {
  const init = { method: opts.method || 'GET', headers: { Accept: 'application/json' } };
  if (opts.body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(opts.body);
  }
  if (opts.signal) init.signal = opts.signal;
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    throw new ApiError(0, null, 'Cannot reach the server.', null);
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (res.status === 401 && !opts.noAuthPrompt) askForKey();
  if (!res.ok) {
    const err = data && data.error ? data.error : null;
    const message = err && err.message ? err.message : `${res.status} ${res.statusText || 'error'}`;
    throw new ApiError(res.status, err ? err.field ?? null : null, message, res.headers);
  }
  return { status: res.status, data, headers: res.headers };
}

/* ------------------------------------------------------------------ *
 * app state
 * ------------------------------------------------------------------ */

const FALLBACK_INFO = {
  model: {
    defaults: { width: 1024, height: 1024, steps: 8, cfg: 1.8 },
    limits: { width: [64, 2048], height: [64, 2048], steps: [1, 100], cfg: [1.0, 10.0], batch: [1, 8], prompt_chars: 4000 },
    safe_cfg_max: 2.4,
    size_multiple: 16,
  },
  max_batch: 4,
  memory_modes: ['auto', 'performance', 'balanced', 'low'],
};

const state = {
  info: null,
  submitting: false,
  retryUntil: 0,
};

const MAX_JOB_STREAMS = 2;     // keep browser connection slots free (HTTP/1.1 allows 6 per origin)
const MAX_GALLERY = 120;       // results kept in the DOM
const POLL_MS = 2000;

/* ------------------------------------------------------------------ *
 * toasts
 * ------------------------------------------------------------------ */

function toast(message, kind = 'info', ms = 4200) {
  const box = $('toasts');
  while (box.children.length >= 4) box.firstElementChild.remove();
  const t = el('div', { class: `toast ${kind}`, text: message });
  box.append(t);
  requestAnimationFrame(() => requestAnimationFrame(() => t.classList.add('show')));
  setTimeout(() => {
    t.classList.remove('show');
    setTimeout(() => t.remove(), 450);
  }, ms);
}

/* ------------------------------------------------------------------ *
 * form: hints, validation, read / restore
 * ------------------------------------------------------------------ */

const F = {
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

function model() {
  return (state.info && state.info.model) || FALLBACK_INFO.model;
}

function limits() {
  return model().limits || FALLBACK_INFO.model.limits;
}

function sizeMultiple() {
  return model().size_multiple || 16;
}

function safeCfgMax() {
  return model().safe_cfg_max ?? 2.4;
}

function clearFieldErrors() {
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

function showFieldError(field, message) {
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

function showFormError(message, kind) {
  const fe = $('form-error');
  fe.textContent = message;
  fe.classList.toggle('warn', kind === 'warn');
  fe.hidden = false;
}

function clearOneError(input) {
  if (input.getAttribute('aria-invalid') !== 'true') return;
  input.removeAttribute('aria-invalid');
  const err = $(`${input.id}-error`);
  if (err) { err.hidden = true; err.textContent = ''; }
}

function updateWordCount() {
  const text = F.prompt.value;
  const n = countWords(text);
  const counter = $('word-count');
  const hint = $('prompt-hint');
  const maxChars = limits().prompt_chars || 4000;
  counter.className = 'counter';
  hint.className = 'hint';
  let label = n === 1 ? '1 word' : `${n} words`;
  if (text.length > maxChars * 0.9) label += ` · ${text.length}/${maxChars} chars`;
  counter.textContent = n ? label : '';
  if (n === 0) {
    hint.textContent = '8–12 words compose best; above 15 words accuracy drops.';
  } else if (n < 8) {
    hint.textContent = 'Short prompts work; 8–12 words compose best.';
  } else if (n <= 12) {
    counter.classList.add('ok');
    hint.classList.add('ok');
    hint.textContent = 'Good length: 8–12 words compose best.';
  } else if (n <= 15) {
    hint.textContent = 'A little long: 8–12 words compose best.';
  } else {
    counter.classList.add('warn');
    hint.classList.add('warn');
    hint.textContent = `Above 15 words composition accuracy drops (about 76 % vs 92 % at 8–12). Consider trimming.`;
  }
  if (text.length > maxChars) counter.classList.add('bad');
}

/** UNet Turbo families (SD-Turbo, SDXL-Turbo): distilled for 1–4 steps without guidance. */
function isUnetTurbo() {
  const f = model().family || '';
  return f === 'sd-turbo' || f === 'sdxl-turbo';
}

/** Step presets per family: the Z-Image ladder, or 1–8 for the UNet Turbo models. */
function stepPresets() {
  return isUnetTurbo() ? [1, 2, 4, 8] : [4, 6, 8, 12];
}

function stepsHint(n) {
  if (!Number.isFinite(n)) return ['', ''];
  if (isUnetTurbo()) {
    const d = (model().defaults || {}).steps ?? 1;
    if (n === d) return [`${n} — default: the model is distilled for one step.`, 'ok'];
    if (n <= 4) return [`${n} steps: a little more detail, ${n}× slower.`, ''];
    return ['More than 4: no gain for this distilled model, just slower.', 'warn'];
  }
  if (n < 4) return ['Very few steps: a rough layout only.', 'warn'];
  if (n === 4) return ['4 — composition only.', ''];
  if (n === 5) return ['Between composition and basic texture.', ''];
  if (n === 6) return ['6 — basic texture.', ''];
  if (n === 7) return ['Just under the detail threshold.', ''];
  if (n === 8) return ['8 — default: the detail threshold the model is distilled for.', 'ok'];
  if (n < 12) return ['Past the default: little visible gain, slower.', ''];
  if (n === 12) return ['12 — no gain; starts to over-sharpen.', 'warn'];
  return ['More than 12: no gain and over-sharpening; just slower.', 'warn'];
}

function updateStepsUi() {
  const n = Number(F.steps.value);
  for (const b of $('steps-presets').querySelectorAll('button')) {
    b.setAttribute('aria-pressed', String(Number(b.dataset.steps) === n));
  }
  const [text, cls] = stepsHint(n);
  const hint = $('steps-hint');
  hint.textContent = text;
  hint.className = `hint ${cls}`;
}

function cfgHint(v) {
  const safe = safeCfgMax();
  if (v >= 3.0) return [`≥ 3.0 is intercepted: the engine clamps it to the safe max ${fmtCfg(safe)}.`, 'bad'];
  if (v > safe + 1e-9) return [`Above the safe max ${fmtCfg(safe)}: the engine lowers it if a step goes black.`, 'warn'];
  if (isUnetTurbo()) {
    if (v <= 1.0 + 1e-9) return ['1.0 — default: guidance off, as the model was distilled; the negative prompt is unused.', 'ok'];
    return ['Guidance on: the negative prompt takes effect, two UNet passes per step; colours may oversaturate.', ''];
  }
  if (v >= 2.2 - 1e-9) return ['Sharp, may overexpose.', 'warn'];
  if (v > 1.85) return ['Slightly crisper than the default.', ''];
  if (v >= 1.75) return ['1.8 — default, best usable rate.', 'ok'];
  if (v >= 1.45) return ['Soft.', ''];
  return ['Very soft; may drift from the prompt.', ''];
}

function updateCfgUi() {
  const v = Number(F.cfg.value);
  F.cfgValue.textContent = fmtCfg(v);
  const [text, cls] = cfgHint(v);
  F.cfgValue.className = cls === 'warn' || cls === 'bad' ? cls : '';
  const hint = $('cfg-hint');
  hint.textContent = text;
  hint.className = `hint ${cls}`;
}

function updateSizeUi() {
  const w = Number(F.width.value);
  const h = Number(F.height.value);
  for (const b of $('size-presets').querySelectorAll('button')) {
    b.setAttribute('aria-pressed', String(Number(b.dataset.w) === w && Number(b.dataset.h) === h));
  }
  const hint = $('size-hint');
  const m = sizeMultiple();
  if (Number.isFinite(w) && Number.isFinite(h) && w > 0 && h > 0) {
    const mp = (w * h) / 1e6;
    hint.textContent = `${mp.toFixed(2)} MP · multiples of ${m}`;
  } else {
    hint.textContent = `multiples of ${m}`;
  }
}

function updateSeedUi() {
  const fixed = F.seedFixed.checked;
  F.seed.disabled = !fixed;
  F.seed.placeholder = fixed ? 'seed' : 'random';
  if (!fixed) clearOneError(F.seed);
}

const MEMORY_MODE_HINTS = {
  auto: 'auto: chosen from free device memory when the job starts.',
  performance: 'performance: everything stays on the device — fastest, highest peak.',
  balanced: 'balanced: offloads parts that are idle — a lower peak for a little time.',
  low: 'low: maximum offload and tiled decode — lowest peak, slowest.',
};

function updateMemoryModeUi() {
  $('memory-mode-hint').textContent = MEMORY_MODE_HINTS[F.memoryMode.value] || '';
}

function updateAllHints() {
  updateWordCount();
  updateStepsUi();
  updateCfgUi();
  updateSizeUi();
  updateSeedUi();
  updateMemoryModeUi();
}

function randomSeed() {
  const a = new Uint32Array(2);
  crypto.getRandomValues(a);
  // 2^53 - 1 is the largest integer JSON/JS round-trips exactly; stay well inside it.
  return (a[0] % 0x1fffff) * 0x100000000 + a[1];
}

function intOrNaN(v) {
  const s = String(v).trim();
  return /^-?\d+$/.test(s) ? Number(s) : NaN;
}

/** Validates the form; returns {body, errors:[[field, message]]}. */
function readForm() {
  const lim = limits();
  const errors = [];
  const prompt = F.prompt.value.trim();
  const negative = F.negative.value.trim();
  if (!prompt) errors.push(['prompt', 'Write a prompt first.']);
  else if (prompt.length > (lim.prompt_chars || 4000)) errors.push(['prompt', `At most ${lim.prompt_chars} characters.`]);
  if (negative.length > (lim.prompt_chars || 4000)) errors.push(['negative_prompt', `At most ${lim.prompt_chars} characters.`]);

  const m = sizeMultiple();
  const dims = {};
  for (const key of ['width', 'height']) {
    const v = intOrNaN(F[key].value);
    const [lo, hi] = lim[key] || [64, 2048];
    dims[key] = v;
    if (!Number.isFinite(v)) errors.push([key, `${key === 'width' ? 'Width' : 'Height'} must be a whole number.`]);
    else if (v < lo || v > hi) errors.push([key, `${key === 'width' ? 'Width' : 'Height'} must be between ${lo} and ${hi}.`]);
    else if (v % m !== 0) {
      const down = Math.max(lo, Math.floor(v / m) * m);
      const up = Math.min(hi, Math.ceil(v / m) * m);
      errors.push([key, `${key === 'width' ? 'Width' : 'Height'} must be a multiple of ${m} (try ${down} or ${up}).`]);
    }
  }

  const steps = intOrNaN(F.steps.value);
  const [slo, shi] = lim.steps || [1, 100];
  if (!Number.isFinite(steps) || steps < slo || steps > shi) errors.push(['steps', `Steps must be a whole number from ${slo} to ${shi}.`]);

  const cfg = Number(F.cfg.value);
  const [clo, chi] = lim.cfg || [1, 10];
  if (!Number.isFinite(cfg) || cfg < clo || cfg > chi) errors.push(['cfg', `CFG must be between ${clo} and ${chi}.`]);

  let seed;
  if (F.seedFixed.checked) {
    seed = intOrNaN(F.seed.value);
    if (!Number.isFinite(seed) || seed < 0) errors.push(['seed', 'Seed must be a whole number ≥ 0.']);
    else if (!Number.isSafeInteger(seed)) errors.push(['seed', 'Seed is too large for the browser to send exactly.']);
  }

  const batch = intOrNaN(F.batch.value);
  const maxBatch = maxBatchAllowed();
  if (!Number.isFinite(batch) || batch < 1 || batch > maxBatch) errors.push(['batch', `Batch must be 1 to ${maxBatch}.`]);

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
  return { body, errors };
}

function maxBatchAllowed() {
  const info = state.info || FALLBACK_INFO;
  const lim = limits().batch || [1, 8];
  return Math.max(1, Math.min(info.max_batch || lim[1], lim[1]));
}

function setSelectValue(select, value) {
  const v = String(value);
  if ([...select.options].some((o) => o.value === v)) select.value = v;
}

/**
 * Puts a job's parameters back into the form.
 * `p` uses JobRecord.params keys; `enh` is JobRecord.enhancement (or null).
 * When the original (pre-enhancement) prompt is known we restore it with enhancement on;
 * when only the final prompt is known and it was enhanced, we restore it with enhancement off,
 * so the same text reaches the model either way.
 */
function restoreParams(p, enh, opts = {}) {
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
  if (Number.isFinite(cfg)) F.cfg.value = String(Math.min(Number(F.cfg.max), Math.max(Number(F.cfg.min), cfg)));
  if (p.seed !== undefined && p.seed !== null && /^\d+$/.test(String(p.seed))) {
    F.seedFixed.checked = true;
    F.seed.value = String(p.seed);
  }
  if (p.batch) setSelectValue(F.batch, p.batch);
  if (p.memory_mode) setSelectValue(F.memoryMode, p.memory_mode);
  restoreImg2Img(p);
  updateAllHints();
  scheduleEnhancePreview(true);
  F.form.classList.remove('flash');
  void F.form.offsetWidth;
  F.form.classList.add('flash');
  if (window.matchMedia('(max-width: 900px)').matches) F.form.scrollIntoView({ behavior: 'smooth', block: 'start' });
  const from = opts.from ? ` from ${opts.from}` : '';
  toast(enhanceNote
    ? `Settings restored${from}. Enhancement switched off: the prompt already contains its additions.`
    : `Settings restored${from}.`, 'ok');
}

/* ------------------------------------------------------------------ *
 * enhancement preview (debounced POST /api/enhance)
 * ------------------------------------------------------------------ */

const enhanceState = { timer: 0, ctrl: null, seq: 0 };

function scheduleEnhancePreview(immediate = false) {
  clearTimeout(enhanceState.timer);
  const box = $('enhance-preview');
  const prompt = F.prompt.value.trim();
  if (!F.enhance.checked || !prompt || !state.info) {
    if (enhanceState.ctrl) enhanceState.ctrl.abort();
    box.hidden = true;
    return;
  }
  box.classList.add('stale');
  enhanceState.timer = setTimeout(runEnhancePreview, immediate ? 0 : 400);
}

async function runEnhancePreview() {
  if (enhanceState.ctrl) enhanceState.ctrl.abort();
  const ctrl = new AbortController();
  enhanceState.ctrl = ctrl;
  const seq = ++enhanceState.seq;
  const body = { prompt: F.prompt.value.trim() };
  const neg = F.negative.value.trim();
  if (neg) body.negative_prompt = neg;
  try {
    const { data } = await api('/api/enhance', { method: 'POST', body, signal: ctrl.signal });
    if (seq !== enhanceState.seq || !F.enhance.checked) return;
    renderEnhancePreview(data || {});
  } catch (e) {
    if (e && e.name === 'AbortError') return;
    if (seq === enhanceState.seq) $('enhance-preview').hidden = true;
  }
}

function phraseChips(list, neg) {
  return (list || []).map((p) => el('span', { class: neg ? 'chip chip-neg' : 'chip', title: p, text: `${neg ? '−' : '+'} ${p}` }));
}

function renderEnhancePreview(data) {
  const box = $('enhance-preview');
  const added = data.added || {};
  const pos = added.prompt || [];
  const neg = added.negative_prompt || [];
  const chips = $('enhance-chips');
  const negChips = $('enhance-neg-chips');
  chips.replaceChildren(...(pos.length ? [el('span', { class: 'chip-label', text: 'adds' }), ...phraseChips(pos, false)] : []));
  negChips.replaceChildren(...(neg.length ? [el('span', { class: 'chip-label', text: 'negative' }), ...phraseChips(neg, true)] : []));
  const advice = $('enhance-advice');
  const items = (data.advice || []).map((a) => el('li', { class: a.level === 'warn' ? 'warn' : 'info', text: a.message }));
  if (!pos.length && !neg.length && !items.length) {
    items.push(el('li', { class: 'info', text: 'Nothing to add — the prompt is already specific.' }));
  }
  advice.replaceChildren(...items);
  box.classList.remove('stale');
  box.hidden = false;
}

/* ------------------------------------------------------------------ *
 * jobs: submit, queue panel, SSE, cancel
 * ------------------------------------------------------------------ */

const jobs = new Map(); // id -> job
let pollTimer = 0;

function isTerminal(s) {
  return s === 'done' || s === 'failed' || s === 'cancelled';
}

async function submit() {
  if (state.submitting || !state.info) return;
  const wait = Math.ceil((state.retryUntil - Date.now()) / 1000);
  if (wait > 0) {
    showFormError(`Queue full, retry in ${wait} s.`, 'warn');
    return;
  }
  clearFieldErrors();
  const { body, errors } = readForm();
  if (errors.length) {
    let first = null;
    for (const [field, msg] of errors) {
      const input = showFieldError(field, msg);
      first = first || input;
    }
    if (first) first.focus();
    return;
  }
  state.submitting = true;
  updateButtons();
  try {
    const { data } = await api('/api/jobs', { method: 'POST', body });
    if (!data || !data.id) throw new ApiError(0, null, 'The server accepted the job but sent no id.', null);
    trackJob({
      id: data.id,
      state: 'queued',
      position: data.position ?? null,
      step: 0,
      total_steps: body.steps,
      params: { ...body },
      created_at: Date.now(),
    });
  } catch (e) {
    if (e.status === 422) {
      const input = showFieldError(e.field, e.message);
      if (input) input.focus();
    } else if (e.status === 429) {
      const ra = e.headers && e.headers.get('Retry-After');
      let secs = Number(ra);
      if (!Number.isFinite(secs)) {
        const when = Date.parse(ra || '');
        secs = Number.isFinite(when) ? Math.max(1, Math.round((when - Date.now()) / 1000)) : 5;
      }
      secs = Math.max(1, Math.ceil(secs));
      startRetryCountdown(secs);
    } else {
      showFormError(e.message || 'Could not submit the job.');
    }
  } finally {
    state.submitting = false;
    updateButtons();
  }
}

let retryTimer = 0;
function startRetryCountdown(secs) {
  state.retryUntil = Date.now() + secs * 1000;
  clearInterval(retryTimer);
  const tick = () => {
    const left = Math.ceil((state.retryUntil - Date.now()) / 1000);
    if (left <= 0) {
      clearInterval(retryTimer);
      const fe = $('form-error');
      if (fe.classList.contains('warn')) { fe.hidden = true; fe.classList.remove('warn'); }
      updateButtons();
      return;
    }
    showFormError(`Queue full, retry in ${left} s.`, 'warn');
    updateButtons();
  };
  tick();
  retryTimer = setInterval(tick, 500);
}

function updateButtons() {
  const waiting = state.retryUntil > Date.now();
  F.generate.disabled = !state.info || state.submitting || waiting;
  const active = [...jobs.values()].some((j) => !j.terminal);
  F.cancel.disabled = !active;
  const running = [...jobs.values()].find((j) => !j.terminal && j.state === 'running');
  document.title = running && running.total ? `[${running.step}/${running.total}] zturbo` : 'zturbo';
}

function trackJob(rec) {
  if (jobs.has(rec.id)) return jobs.get(rec.id);
  const job = {
    id: rec.id,
    state: rec.state || 'queued',
    position: rec.position ?? null,
    step: rec.step || 0,
    total: rec.total_steps || (rec.params && rec.params.steps) || 0,
    elapsed: null,
    phase: null,
    params: rec.params || {},
    created: rec.created_at || Date.now(),
    notices: [],
    es: null,
    streamFailures: 0,
    terminal: false,
    finalizing: false,
    li: null,
  };
  jobs.set(job.id, job);
  buildQueueItem(job);
  renderJob(job);
  pumpStreams();
  ensurePolling();
  updateButtons();
  return job;
}

function buildQueueItem(job) {
  const prompt = job.params.prompt || '(no prompt)';
  const stateBadge = el('span', { class: 'state' });
  const cancelBtn = el('button', {
    type: 'button', class: 'small-btn', 'aria-label': `Cancel job: ${prompt.slice(0, 60)}`, text: 'Cancel',
  });
  cancelBtn.addEventListener('click', () => cancelJob(job));
  const status = el('div', { class: 'job-status' });
  const bar = el('div', { class: 'bar', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-label': 'progress' }, el('span'));
  const li = el('li', { class: 'job', dataset: { jobId: job.id } },
    el('div', { class: 'job-title', title: prompt, text: prompt }),
    el('div', { class: 'job-side' }, stateBadge, cancelBtn),
    status,
    bar);
  job.li = li;
  job.ui = { stateBadge, cancelBtn, status, bar };
  $('queue').prepend(li);
  $('queue-empty').hidden = true;
}

function renderJob(job) {
  if (!job.ui) return;
  const { stateBadge, cancelBtn, status, bar } = job.ui;
  stateBadge.className = `state state-${job.state}`;
  stateBadge.textContent = job.cancelling && !job.terminal ? 'cancelling' : job.state;
  cancelBtn.hidden = job.terminal;
  cancelBtn.disabled = !!job.cancelling;
  const parts = [];
  const p = job.params;
  if (p.width && p.height) parts.push(`${p.width}×${p.height}`);
  bar.className = 'bar';
  const fill = bar.firstElementChild;
  if (job.state === 'queued') {
    parts.unshift(job.position === null || job.position === undefined
      ? 'waiting'
      : job.position === 0 ? 'next up' : `${job.position} ahead`);
    bar.classList.add('indeterminate');
    fill.style.width = '';
    bar.removeAttribute('aria-valuenow');
  } else if (job.state === 'running') {
    const total = job.total || p.steps || 0;
    if (job.step > 0 && total) parts.unshift(`step ${job.step}/${total}`);
    else if (!job.phase) parts.unshift('starting');
    if (job.phase) parts.push(job.phase);
    if (job.elapsed !== null) parts.push(fmtMs(job.elapsed));
    const pct = total ? Math.min(100, (job.step / total) * 100) : 0;
    fill.style.width = `${pct}%`;
    bar.setAttribute('aria-valuenow', String(Math.round(pct)));
  } else if (job.state === 'done') {
    bar.classList.add('done');
    fill.style.width = '';
    if (job.totalMs) parts.push(fmtMs(job.totalMs));
  } else if (job.state === 'failed') {
    bar.classList.add('failed');
    fill.style.width = '';
  } else if (job.state === 'cancelled') {
    fill.style.width = '0%';
  }
  const children = parts.map((t) => el('span', { text: t }));
  if (job.state === 'failed' && job.error) children.unshift(el('span', { class: 'job-error', text: job.error }));
  status.replaceChildren(...children);
}

function activeJobsInOrder() {
  return [...jobs.values()].filter((j) => !j.terminal).sort((a, b) => a.created - b.created);
}

/** Opens SSE streams for the oldest active jobs, at most MAX_JOB_STREAMS at a time. */
function pumpStreams() {
  const active = activeJobsInOrder();
  let open = active.filter((j) => j.es).length;
  for (const job of active) {
    if (open >= MAX_JOB_STREAMS) break;
    if (!job.es && !job.reopenTimer) {
      openStream(job);
      open++;
    }
  }
}

/** The SSE `failed` event carries the API's error shape {field, message}; records carry text. */
function errorText(e) {
  if (e && typeof e === 'object') return e.message || (e.field ? `${e.field}: invalid` : 'failed');
  return e ? String(e) : '';
}

function parseData(ev) {
  try { return ev.data ? JSON.parse(ev.data) : {}; } catch { return {}; }
}

function openStream(job) {
  const es = new EventSource(`/api/jobs/${encodeURIComponent(job.id)}/events`);
  job.es = es;
  const on = (name, fn) => es.addEventListener(name, (ev) => { if (job.es === es) fn(parseData(ev)); });
  on('queued', (d) => {
    job.state = 'queued';
    if (d.position !== undefined) job.position = d.position;
    renderJob(job);
  });
  on('started', () => {
    job.state = 'running';
    job.position = null;
    renderJob(job);
    updateButtons();
  });
  on('progress', (d) => {
    job.state = 'running';
    if (Number.isFinite(d.step)) job.step = d.step;
    if (Number.isFinite(d.total)) job.total = d.total;
    if (Number.isFinite(d.elapsed_ms)) job.elapsed = d.elapsed_ms;
    job.streamFailures = 0;
    renderJob(job);
    updateButtons();
  });
  on('notice', (d) => {
    job.notices.push(d);
    if (d.message) toast(d.message, d.kind === 'black_retry' || d.kind === 'cfg_clamped' ? 'warn' : 'info');
  });
  on('done', (d) => finalize(job, 'done', d));
  on('failed', (d) => finalize(job, 'failed', d));
  on('cancelled', (d) => finalize(job, 'cancelled', d));
  es.addEventListener('error', () => {
    if (job.es !== es) return;
    es.close();
    job.es = null;
    if (job.terminal) return;
    job.streamFailures++;
    recoverJob(job);
  });
}

/** After a broken job stream: ask for the record; finish it or reopen the stream later. */
async function recoverJob(job) {
  try {
    const { data } = await api(`/api/jobs/${encodeURIComponent(job.id)}`);
    if (data && isTerminal(data.state)) {
      finalize(job, data.state, null, data);
      return;
    }
    if (data) mergeRecord(job, data);
  } catch (e) {
    if (e.status === 404) {
      dropJob(job, 'This job is no longer known to the server.');
      return;
    }
  }
  if (job.terminal) return;
  const delay = Math.min(15000, 500 * 2 ** Math.min(job.streamFailures, 5));
  job.reopenTimer = setTimeout(() => {
    job.reopenTimer = 0;
    if (!job.terminal) pumpStreams();
  }, delay);
}

function mergeRecord(job, rec) {
  job.state = rec.state || job.state;
  job.position = rec.position ?? null;
  if (Number.isFinite(rec.step)) job.step = rec.step;
  if (Number.isFinite(rec.total_steps) && rec.total_steps) job.total = rec.total_steps;
  if (rec.params) job.params = { ...job.params, ...rec.params };
  renderJob(job);
  updateButtons();
}

async function finalize(job, finalState, eventData, record) {
  if (job.terminal) return;
  job.terminal = true;
  if (job.es) { job.es.close(); job.es = null; }
  clearTimeout(job.reopenTimer);
  job.state = finalState;
  if (finalState === 'failed' && eventData && eventData.error) job.error = errorText(eventData.error);
  renderJob(job);
  updateButtons();
  pumpStreams();

  let rec = record || null;
  if (!rec) {
    for (let attempt = 0; attempt < 3 && !rec; attempt++) {
      try {
        rec = (await api(`/api/jobs/${encodeURIComponent(job.id)}`)).data;
      } catch {
        await new Promise((r) => setTimeout(r, 400 * (attempt + 1)));
      }
    }
  }
  if (!rec) {
    // Build what we know; the gallery can still show the images.
    rec = {
      id: job.id, state: finalState, params: job.params, images: (eventData && eventData.images) || [],
      notices: job.notices, timings: null, peak_memory_bytes: null, error: job.error || null,
      enhancement: null, created_at: job.created,
    };
  }
  if (rec.state && isTerminal(rec.state)) job.state = rec.state;
  if (rec.error) job.error = rec.error;
  if (rec.timings) job.totalMs = rec.timings.total_ms;
  renderJob(job);

  if (job.state === 'done') {
    addResult(rec, { fresh: true });
  } else if (job.state === 'failed') {
    addResult(rec, { fresh: true });
    toast(`Job failed: ${rec.error || job.error || 'unknown error'}`, 'bad', 7000);
  } else if (job.state === 'cancelled') {
    toast('Job cancelled.', 'info', 2500);
  }
  const linger = job.state === 'failed' ? 8000 : 2500;
  setTimeout(() => removeQueueItem(job), linger);
}

function dropJob(job, message) {
  job.terminal = true;
  job.state = 'failed';
  job.error = message;
  if (job.es) { job.es.close(); job.es = null; }
  renderJob(job);
  updateButtons();
  setTimeout(() => removeQueueItem(job), 6000);
  pumpStreams();
}

function removeQueueItem(job) {
  if (!job.li) return;
  job.li.classList.add('leaving');
  setTimeout(() => {
    if (job.li) job.li.remove();
    job.li = null;
    job.ui = null;
    jobs.delete(job.id);
    $('queue-empty').hidden = $('queue').children.length > 0;
  }, 600);
}

async function cancelJob(job) {
  if (!job || job.terminal || job.cancelling) return;
  job.cancelling = true;
  renderJob(job);
  try {
    await api(`/api/jobs/${encodeURIComponent(job.id)}`, { method: 'DELETE' });
    // The job stream (or the poller) reports the 'cancelled' state.
    if (!job.es) pollOnce();
  } catch (e) {
    job.cancelling = false;
    renderJob(job);
    if (e.status === 404 || e.status === 409) pollOnce();
    else toast(`Could not cancel: ${e.message}`, 'bad');
  }
}

function cancelCurrent() {
  const active = activeJobsInOrder();
  const target = active.find((j) => j.state === 'running') || active[0];
  if (target) cancelJob(target);
}

/** Jobs without an open stream are refreshed from GET /api/jobs every couple of seconds. */
function ensurePolling() {
  if (pollTimer) return;
  pollTimer = setInterval(() => {
    const unstreamed = activeJobsInOrder().filter((j) => !j.es);
    if (!unstreamed.length) {
      if (!activeJobsInOrder().length) { clearInterval(pollTimer); pollTimer = 0; }
      return;
    }
    pollOnce();
  }, POLL_MS);
}

let polling = false;
async function pollOnce() {
  if (polling) return;
  polling = true;
  try {
    const { data } = await api('/api/jobs');
    const byId = new Map(((data && data.jobs) || []).map((r) => [r.id, r]));
    for (const job of activeJobsInOrder()) {
      const rec = byId.get(job.id);
      if (!rec) continue;
      if (isTerminal(rec.state)) finalize(job, rec.state, null, rec);
      else if (!job.es) mergeRecord(job, rec);
    }
  } catch {
    /* next tick */
  } finally {
    polling = false;
  }
}

/* ------------------------------------------------------------------ *
 * gallery
 * ------------------------------------------------------------------ */

function addResult(rec, opts = {}) {
  const gallery = $('gallery');
  const existing = gallery.querySelector(`figure[data-job-id="${CSS.escape(rec.id)}"]`);
  const fig = buildResult(rec, opts);
  if (existing) {
    existing.replaceWith(fig);
  } else {
    const created = rec.created_at || 0;
    let before = null;
    for (const child of gallery.children) {
      if (Number(child.dataset.created || 0) < created) { before = child; break; }
    }
    gallery.insertBefore(fig, before);
  }
  while (gallery.children.length > MAX_GALLERY) gallery.lastElementChild.remove();
  updateGalleryCount();
}

function updateGalleryCount() {
  const gallery = $('gallery');
  const n = gallery.querySelectorAll('img').length;
  $('gallery-empty').hidden = gallery.children.length > 0;
  $('gallery-count').textContent = n ? (n === 1 ? '1 image' : `${n} images`) : '';
}

function buildResult(rec, opts) {
  const p = rec.params || {};
  const images = rec.images || [];
  const failed = rec.state === 'failed';
  const prompt = (rec.enhancement && rec.enhancement.original_prompt) || p.prompt || '';
  const fig = el('figure', {
    class: `result${failed ? ' failed' : ''}${opts.fresh ? ' fresh' : ''}`,
    dataset: { jobId: rec.id, created: String(rec.created_at || 0) },
  });

  const restore = () => restoreParams(p, rec.enhancement);
  const thumbs = el('div', { class: `thumbs n${Math.max(1, images.length)}` });
  if (images.length) {
    images.forEach((src, i) => {
      const img = el('img', {
        src,
        alt: prompt ? `Result ${i + 1}: ${prompt}` : `Result ${i + 1}`,
        width: p.width || undefined,
        height: p.height || undefined,
        loading: opts.fresh ? 'eager' : 'lazy',
        decoding: 'async',
      });
      img.addEventListener('error', () => img.classList.add('broken'), { once: true });
      const btn = el('button', { type: 'button', class: 'thumb', title: 'Restore these settings into the form', 'aria-label': `Restore settings of result ${i + 1}` }, img);
      btn.addEventListener('click', restore);
      thumbs.append(btn);
    });
  } else {
    thumbs.append(el('div', { class: 'thumb-fail' },
      el('div', null, el('strong', { text: failed ? 'Failed' : 'No image' }),
        failed ? 'see the error below' : '')));
  }
  fig.append(thumbs);

  const meta = el('div', { class: 'r-meta' });
  if (p.width && p.height) meta.append(el('span', { text: `${p.width}×${p.height}` }));
  if (p.steps) meta.append(el('span', { text: `${p.steps} steps` }));
  if (p.cfg !== undefined) {
    const changed = p.cfg_requested !== undefined && p.cfg_requested !== null && Math.abs(p.cfg_requested - p.cfg) > 1e-6;
    meta.append(el('span', {
      class: changed ? 'changed' : undefined,
      title: changed ? `requested ${fmtCfg(p.cfg_requested)}` : undefined,
      text: changed ? `CFG ${fmtCfg(p.cfg_requested)} → ${fmtCfg(p.cfg)}` : `CFG ${fmtCfg(p.cfg)}`,
    }));
  }
  if (p.seed !== undefined && p.seed !== null) meta.append(el('span', { text: `seed ${p.seed}` }));
  if (p.batch > 1) meta.append(el('span', { text: `batch ${p.batch}` }));
  const t = rec.timings;
  if (t && Number.isFinite(t.total_ms)) {
    const detail = ['queue_ms', 'encode_ms', 'denoise_ms', 'decode_ms']
      .filter((k) => Number.isFinite(t[k])).map((k) => `${k.replace('_ms', '')} ${fmtMs(t[k])}`).join(' · ');
    meta.append(el('span', { title: detail, text: `in ${fmtMs(t.total_ms)}` }));
  }
  if (Number.isFinite(rec.peak_memory_bytes)) meta.append(el('span', { title: 'peak device memory', text: `peak ${fmtBytes(rec.peak_memory_bytes)}` }));
  if (p.memory_mode) meta.append(el('span', { text: p.memory_mode }));

  const caption = el('figcaption', null,
    el('p', { class: 'r-prompt', title: p.prompt || prompt, text: prompt || '(no prompt)' }),
    meta);

  const notices = rec.notices || [];
  if (notices.length) {
    caption.append(el('div', { class: 'r-notices' },
      notices.slice(0, 4).map((n) => el('span', { class: 'r-notice', title: n.kind || '', text: n.message || n.kind }))));
  }

  const enh = rec.enhancement;
  if (enh && enh.added && ((enh.added.prompt || []).length || (enh.added.negative_prompt || []).length)) {
    caption.append(el('details', { class: 'r-enh' },
      el('summary', { text: 'enhancement' }),
      el('div', { class: 'chips' }, phraseChips(enh.added.prompt, false), phraseChips(enh.added.negative_prompt, true))));
  }

  if (failed) caption.append(el('p', { class: 'r-error', text: rec.error || 'failed' }));

  const actions = el('div', { class: 'r-actions' });
  const useBtn = el('button', { type: 'button', class: 'small-btn', text: 'Use settings' });
  useBtn.addEventListener('click', restore);
  actions.append(useBtn);
  if (p.seed !== undefined && p.seed !== null) {
    const seedBtn = el('button', { type: 'button', class: 'small-btn', title: `Use seed ${p.seed}`, text: 'Reuse seed' });
    seedBtn.addEventListener('click', () => {
      F.seedFixed.checked = true;
      F.seed.value = String(p.seed);
      updateSeedUi();
      clearOneError(F.seed);
      toast(`Seed ${p.seed} fixed.`, 'ok', 2500);
    });
    actions.append(seedBtn);
  }
  images.forEach((src, i) => {
    const name = src.split('/').pop() || `zturbo-${shortId(rec.id)}-${i + 1}.png`;
    actions.append(el('a', {
      class: 'small-btn', href: src, download: name,
      'aria-label': `Download image ${i + 1}`,
      text: images.length > 1 ? `↓ ${i + 1}` : 'Download',
    }));
    actions.append(useAsInputButton(src, images.length > 1 ? `Use ${i + 1} as input` : 'Use as input'));
  });
  caption.append(actions);
  fig.append(caption);
  return fig;
}

/* ------------------------------------------------------------------ *
 * memory chart (canvas, ring buffer, rAF redraw)
 * ------------------------------------------------------------------ */

const PHASES = ['', 'encode', 'denoise', 'decode'];

class MemoryChart {
  constructor(canvas, readout) {
    this.canvas = canvas;
    this.readout = readout;
    this.ctx = canvas.getContext('2d');
    this.cap = 4096;                      // fixed: ~6.8 min at 10 Hz, far more than the window
    this.windowMs = 120000;
    this.t = new Float64Array(this.cap);
    this.used = new Float64Array(this.cap);
    this.total = new Float64Array(this.cap);
    this.phase = new Uint8Array(this.cap);
    this.step = new Int32Array(this.cap);
    this.job = new Array(this.cap).fill(null); // references overwritten in place
    this.head = 0;                         // next write slot
    this.len = 0;
    this.received = 0;
    this.peaks = new Map();                // job id -> peak bytes (bounded)
    this.lastJob = null;
    this.pending = false;
    this.colors = null;
    this.readColors();
    new ResizeObserver(() => this.requestDraw()).observe(canvas);
    window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => {
      this.readColors();
      this.requestDraw();
    });
    this.requestDraw();
  }

  readColors() {
    const cs = getComputedStyle(document.documentElement);
    const v = (name) => cs.getPropertyValue(name).trim();
    this.colors = {
      used: v('--chart-used'), usedFill: v('--chart-used-fill'), total: v('--chart-total'),
      grid: v('--chart-grid'), text: v('--chart-text'), step: v('--chart-step'), peak: v('--chart-peak'),
      phase: [null, v('--chart-encode'), v('--chart-denoise'), v('--chart-decode')],
    };
  }

  push(s) {
    const t = Number(s.t_ms);
    const used = Number(s.used_bytes);
    if (!Number.isFinite(t) || !Number.isFinite(used)) return;
    // A server restart resets t_ms: start a fresh window.
    if (this.len && t < this.t[(this.head - 1 + this.cap) % this.cap] - 1000) this.len = 0;
    const i = this.head;
    this.t[i] = t;
    this.used[i] = used;
    this.total[i] = Number(s.total_bytes) || 0;
    this.phase[i] = Math.max(0, PHASES.indexOf(s.phase || ''));
    this.step[i] = Number.isFinite(s.step) ? s.step : -1;
    this.job[i] = s.job_id || null;
    this.head = (i + 1) % this.cap;
    if (this.len < this.cap) this.len++;
    this.received++;
    this.canvas.dataset.samples = String(this.received);
    if (s.job_id) {
      this.lastJob = s.job_id;
      const prev = this.peaks.get(s.job_id);
      if (prev === undefined) {
        this.peaks.set(s.job_id, used);
        while (this.peaks.size > 32) this.peaks.delete(this.peaks.keys().next().value);
      } else if (used > prev) {
        this.peaks.set(s.job_id, used);
      }
      const job = jobs.get(s.job_id);
      if (job && !job.terminal && s.phase && job.phase !== s.phase) {
        job.phase = s.phase;
        if (job.state === 'queued') job.state = 'running';
        renderJob(job);
      }
    }
    this.requestDraw();
  }

  requestDraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  idx(k) { // k-th oldest sample
    return (this.head - this.len + k + this.cap) % this.cap;
  }

  draw() {
    const canvas = this.canvas;
    const cssW = canvas.clientWidth;
    const cssH = canvas.clientHeight;
    if (!cssW || !cssH) return;
    const dpr = window.devicePixelRatio || 1;
    const pxW = Math.round(cssW * dpr);
    const pxH = Math.round(cssH * dpr);
    if (canvas.width !== pxW || canvas.height !== pxH) {
      canvas.width = pxW;
      canvas.height = pxH;
    }
    const ctx = this.ctx;
    const c = this.colors;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    ctx.font = '11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';
    ctx.textBaseline = 'middle';

    const L = 54, R = 10, T = 10, B = 20;
    const W = cssW - L - R;
    const H = cssH - T - B;
    if (W < 20 || H < 20) return;

    if (!this.len) {
      ctx.fillStyle = c.text;
      ctx.textAlign = 'center';
      ctx.fillText('waiting for memory samples…', L + W / 2, T + H / 2);
      this.readout.textContent = '—';
      return;
    }

    const newest = this.idx(this.len - 1);
    const tNow = this.t[newest];
    // Until two minutes of data exist, stretch what we have (at least 30 s) across the plot.
    const span = Math.min(this.windowMs, Math.max(30000, tNow - this.t[this.idx(0)]));
    const t0 = tNow - span;
    let first = this.len - 1;
    while (first > 0 && this.t[this.idx(first - 1)] >= t0) first--;
    // keep one sample left of the window so the line enters from the edge
    if (first > 0) first--;

    let maxUsed = 0;
    let total = 0;
    for (let k = first; k < this.len; k++) {
      const i = this.idx(k);
      if (this.used[i] > maxUsed) maxUsed = this.used[i];
      if (this.total[i] > total) total = this.total[i];
    }
    // On a CPU the total is the host's RAM and a job may use a sliver of it: zoom to the curve
    // (the readout still shows the total) instead of drawing a flat line along the bottom.
    const zoomed = total > 0 && maxUsed < total * 0.25;
    const yMax = zoomed ? Math.max(maxUsed * 1.3, 16 * MiB) : Math.max(total, maxUsed, 64 * MiB) * 1.06;
    const x = (t) => L + ((t - t0) / span) * W;
    const y = (b) => T + H - (b / yMax) * H;

    // grid + y labels
    const step = niceByteStep(yMax / 4);
    ctx.strokeStyle = c.grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = c.text;
    ctx.textAlign = 'right';
    for (let b = 0; b <= yMax; b += step) {
      const yy = Math.round(y(b)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(L, yy);
      ctx.lineTo(L + W, yy);
      ctx.stroke();
      ctx.fillText(fmtBytesAxis(b, step), L - 6, yy);
    }
    // x labels
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    const spanS = span / 1000;
    const tick = spanS > 90 ? 30 : spanS > 45 ? 15 : 10;
    for (let s = 0; s <= spanS + 1e-6; s += tick) {
      const xx = x(tNow - s * 1000);
      if (xx < L + 14 && s !== 0) continue;
      ctx.fillText(s === 0 ? 'now' : `−${s} s`, Math.min(L + W - 12, xx), T + H + 5);
    }
    ctx.textBaseline = 'middle';

    ctx.save();
    ctx.beginPath();
    ctx.rect(L, T, W, H);
    ctx.clip();

    // phase shading (contiguous runs of the same phase of the same job)
    let runStart = -1;
    for (let k = first; k <= this.len; k++) {
      const i = k < this.len ? this.idx(k) : -1;
      const prev = runStart >= 0 ? this.idx(runStart) : -1;
      const same = i >= 0 && prev >= 0 && this.phase[i] === this.phase[prev] && this.job[i] === this.job[prev];
      if (runStart >= 0 && !same) {
        const code = this.phase[prev];
        if (code) {
          const xa = x(this.t[prev]);
          const xb = i >= 0 ? x(this.t[i]) : x(tNow);
          ctx.fillStyle = c.phase[code];
          ctx.fillRect(xa, T, Math.max(1, xb - xa), H);
          if (xb - xa > 44) {
            ctx.fillStyle = c.text;
            ctx.textAlign = 'left';
            ctx.fillText(PHASES[code], Math.max(xa, L) + 4, T + 8);
          }
        }
        runStart = -1;
      }
      if (runStart < 0 && i >= 0) runStart = k;
    }

    // step markers
    ctx.strokeStyle = c.step;
    ctx.fillStyle = c.text;
    ctx.textAlign = 'center';
    let lastLabelX = -Infinity;
    for (let k = first + 1; k < this.len; k++) {
      const i = this.idx(k);
      const j = this.idx(k - 1);
      const st = this.step[i];
      if (st < 0 || !this.job[i]) continue;
      if (st === this.step[j] && this.job[i] === this.job[j]) continue;
      const xx = Math.round(x(this.t[i])) + 0.5;
      ctx.beginPath();
      ctx.moveTo(xx, T + H);
      ctx.lineTo(xx, T + H - 10);
      ctx.stroke();
      if (xx - lastLabelX >= 14) {
        ctx.fillText(String(st), xx, T + H - 17);
        lastLabelX = xx;
      }
    }

    // total (dashed)
    if (total > 0 && total <= yMax) {
      ctx.strokeStyle = c.total;
      ctx.setLineDash([5, 4]);
      ctx.beginPath();
      ctx.moveTo(L, Math.round(y(total)) + 0.5);
      ctx.lineTo(L + W, Math.round(y(total)) + 0.5);
      ctx.stroke();
      ctx.setLineDash([]);
    }

    // used: area + line
    ctx.beginPath();
    for (let k = first; k < this.len; k++) {
      const i = this.idx(k);
      const xx = x(this.t[i]);
      const yy = y(this.used[i]);
      if (k === first) ctx.moveTo(xx, yy);
      else ctx.lineTo(xx, yy);
    }
    ctx.strokeStyle = c.used;
    ctx.lineWidth = 1.6;
    ctx.lineJoin = 'round';
    ctx.stroke();
    ctx.lineTo(x(tNow), T + H);
    ctx.lineTo(x(this.t[this.idx(first)]), T + H);
    ctx.closePath();
    ctx.fillStyle = c.usedFill;
    ctx.fill();

    // the latest job's peak
    let peakJob = null;
    for (let k = this.len - 1; k >= first; k--) {
      const jid = this.job[this.idx(k)];
      if (jid) { peakJob = jid; break; }
    }
    let peak = peakJob ? this.peaks.get(peakJob) : undefined;
    if (peakJob && peak !== undefined) {
      let xa = Infinity;
      let xb = -Infinity;
      for (let k = first; k < this.len; k++) {
        const i = this.idx(k);
        if (this.job[i] === peakJob) {
          xa = Math.min(xa, x(this.t[i]));
          xb = Math.max(xb, x(this.t[i]));
        }
      }
      const yy = Math.round(y(peak)) + 0.5;
      ctx.strokeStyle = c.peak;
      ctx.lineWidth = 1.2;
      ctx.setLineDash([2, 3]);
      ctx.beginPath();
      ctx.moveTo(Math.max(L, xa - 6), yy);
      ctx.lineTo(L + W, yy);
      ctx.stroke();
      ctx.setLineDash([]);
      const label = `peak ${fmtBytes(peak)}`;
      ctx.fillStyle = c.peak;
      ctx.textAlign = 'right';
      ctx.font = '600 11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';
      // keep the label clear of the step numbers along the bottom and of the top edge
      let ly = yy - 8;
      if (ly > T + H - 30) ly = T + H - 30;
      if (ly < T + 6) ly = yy + 9;
      ctx.fillText(label, L + W - 4, ly);
    }
    ctx.restore();

    // text readout (once per frame at most)
    const nowUsed = this.used[newest];
    const nowTotal = this.total[newest];
    const parts = [`<b>${fmtBytes(nowUsed)}</b> / ${fmtBytes(nowTotal)}`];
    const ph = this.phase[newest];
    if (ph && this.job[newest]) {
      const st = this.step[newest];
      parts.push(`${PHASES[ph]}${st >= 0 && PHASES[ph] === 'denoise' ? ` step ${st}` : ''}`);
    }
    if (peak !== undefined) parts.push(`job peak <b>${fmtBytes(peak)}</b>`);
    const html = parts.join(' · ');
    if (this._lastReadout !== html) {
      // only our own formatted numbers go in here, never server strings
      this.readout.innerHTML = html;
      this._lastReadout = html;
    }
  }
}

function niceByteStep(raw) {
  const unit = raw >= GiB / 2 ? GiB : MiB;
  const r = raw / unit;
  const mag = 10 ** Math.floor(Math.log10(r));
  const f = r / mag;
  const nice = f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10;
  return Math.max(nice * mag * unit, MiB);
}

function fmtBytesAxis(b, step) {
  if (b === 0) return '0';
  if (step >= GiB / 2 || b >= GiB) {
    const g = b / GiB;
    return `${Number.isInteger(Math.round(g * 100) / 100) ? g.toFixed(0) : g.toFixed(step < GiB ? 2 : 1)} GiB`;
  }
  return `${Math.round(b / MiB)} MiB`;
}

/* memory stream with reconnect */

const mem = { es: null, chart: null, failures: 0, timer: 0 };

function connectMemory() {
  clearTimeout(mem.timer);
  const live = $('memory-live');
  const es = new EventSource('/api/memory/stream');
  mem.es = es;
  const onSample = (ev) => {
    if (mem.es !== es) return;
    mem.failures = 0;
    if (!live.classList.contains('on')) { live.className = 'live-dot on'; live.textContent = 'live'; }
    const d = parseData(ev);
    mem.chart.push(d);
  };
  es.addEventListener('sample', onSample);
  es.addEventListener('message', onSample);
  es.addEventListener('open', () => {
    if (mem.es !== es) return;
    live.className = 'live-dot on';
    live.textContent = 'live';
  });
  es.addEventListener('error', () => {
    if (mem.es !== es) return;
    es.close();
    mem.es = null;
    mem.failures++;
    live.className = 'live-dot retry';
    live.textContent = 'reconnecting';
    const delay = Math.min(15000, 500 * 2 ** Math.min(mem.failures, 5));
    mem.timer = setTimeout(connectMemory, delay);
  });
}

/* ------------------------------------------------------------------ *
 * PNG metadata (tEXt / iTXt / zTXt) → form
 * ------------------------------------------------------------------ */

const PNG_SIG = [137, 80, 78, 71, 13, 10, 26, 10];

async function inflate(bytes) {
  if (typeof DecompressionStream === 'undefined') throw new Error('no DecompressionStream');
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** Returns a Map keyword -> text of every textual chunk in a PNG. */
async function readPngText(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 8 || PNG_SIG.some((b, i) => bytes[i] !== b)) throw new Error('not a PNG file');
  const view = new DataView(buffer);
  const latin1 = new TextDecoder('latin1');
  const utf8 = new TextDecoder('utf-8');
  const out = new Map();
  let off = 8;
  while (off + 12 <= bytes.length) {
    const len = view.getUint32(off);
    const type = String.fromCharCode(bytes[off + 4], bytes[off + 5], bytes[off + 6], bytes[off + 7]);
    const start = off + 8;
    const end = start + len;
    if (end + 4 > bytes.length) break; // truncated
    const data = bytes.subarray(start, end);
    try {
      if (type === 'tEXt') {
        const z = data.indexOf(0);
        if (z > 0) out.set(latin1.decode(data.subarray(0, z)), latin1.decode(data.subarray(z + 1)));
      } else if (type === 'zTXt') {
        const z = data.indexOf(0);
        if (z > 0 && data[z + 1] === 0) {
          out.set(latin1.decode(data.subarray(0, z)), latin1.decode(await inflate(data.subarray(z + 2))));
        }
      } else if (type === 'iTXt') {
        const z = data.indexOf(0);
        if (z > 0) {
          const key = latin1.decode(data.subarray(0, z));
          const compressed = data[z + 1] === 1;
          const method = data[z + 2];
          let p = z + 3;
          const langEnd = data.indexOf(0, p);           // language tag
          if (langEnd < 0) throw new Error('bad iTXt');
          p = langEnd + 1;
          const trEnd = data.indexOf(0, p);             // translated keyword
          if (trEnd < 0) throw new Error('bad iTXt');
          p = trEnd + 1;
          let text = data.subarray(p);
          if (compressed) {
            if (method !== 0) throw new Error('unknown iTXt compression');
            text = await inflate(text);
          }
          out.set(key, utf8.decode(text));
        }
      } else if (type === 'IEND') {
        break;
      }
    } catch {
      /* skip a chunk we cannot read */
    }
    off = end + 4; // skip CRC
  }
  return out;
}

/** Parses A1111 "parameters" text into JobRecord.params-like keys. */
function parseA1111(text) {
  const lines = text.replace(/\r\n?/g, '\n').split('\n');
  let paramIdx = -1;
  for (let i = lines.length - 1; i >= 0; i--) {
    if (/(^|,\s*)Steps:\s*\d+/.test(lines[i])) { paramIdx = i; break; }
  }
  const head = paramIdx >= 0 ? lines.slice(0, paramIdx) : lines;
  const negIdx = head.findIndex((l) => l.startsWith('Negative prompt:'));
  const p = {};
  p.prompt = (negIdx >= 0 ? head.slice(0, negIdx) : head).join('\n').trim();
  if (negIdx >= 0) p.negative_prompt = head.slice(negIdx).join('\n').replace(/^Negative prompt:\s*/, '').trim();
  if (paramIdx >= 0) {
    const kv = {};
    const re = /\s*([^:,]+?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)/g;
    let m;
    while ((m = re.exec(lines[paramIdx])) !== null) {
      if (!m[0]) { re.lastIndex++; continue; }
      let v = m[2].trim();
      if (v.startsWith('"')) { try { v = JSON.parse(v); } catch { /* keep raw */ } }
      kv[m[1].trim().toLowerCase()] = v;
    }
    if (kv.steps) p.steps = Number(kv.steps);
    if (kv['cfg scale']) p.cfg = Number(kv['cfg scale']);
    if (kv.seed && /^\d+$/.test(kv.seed)) p.seed = kv.seed;
    const size = /^(\d+)\s*x\s*(\d+)$/i.exec(kv.size || '');
    if (size) { p.width = Number(size[1]); p.height = Number(size[2]); }
    if (kv.model) p.model = kv.model;
  }
  return p;
}

async function loadPngFile(file, name) {
  try {
    const map = await readPngText(await file.arrayBuffer());
    if (map.has('zturbo')) {
      let obj = null;
      try { obj = JSON.parse(map.get('zturbo')); } catch { obj = null; }
      if (obj && typeof obj === 'object') {
        const params = obj.params && typeof obj.params === 'object' ? obj.params : obj;
        const enh = obj.enhancement && typeof obj.enhancement === 'object' ? obj.enhancement : null;
        restoreParams(params, enh, { from: name });
        return;
      }
    }
    if (map.has('parameters')) {
      restoreParams(parseA1111(map.get('parameters')), null, { from: name, keepEnhance: true });
      return;
    }
    toast(`${name} has no generation parameters.`, 'warn');
  } catch (e) {
    toast(`Could not read ${name}: ${e.message}`, 'bad');
  }
}

function setupDragDrop() {
  const overlay = $('drop-overlay');
  let depth = 0;
  const hasPayload = (e) => {
    const types = e.dataTransfer ? [...e.dataTransfer.types] : [];
    return types.includes('Files') || types.includes('text/uri-list');
  };
  document.addEventListener('dragenter', (e) => {
    if (!hasPayload(e)) return;
    depth++;
    overlay.hidden = false;
  });
  document.addEventListener('dragleave', () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  document.addEventListener('dragover', (e) => {
    if (!hasPayload(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = 'copy';
  });
  document.addEventListener('drop', async (e) => {
    depth = 0;
    overlay.hidden = true;
    if (!e.dataTransfer) return;
    const file = [...(e.dataTransfer.files || [])][0];
    if (file) {
      e.preventDefault();
      await loadPngFile(file, file.name || 'image');
      return;
    }
    // An image dragged from this page's own gallery arrives as a URL.
    const uri = (e.dataTransfer.getData('text/uri-list') || '').split('\n').find((l) => l && !l.startsWith('#'));
    if (!uri) return;
    e.preventDefault();
    try {
      const url = new URL(uri.trim(), location.href);
      if (url.origin !== location.origin) {
        toast('Drop a PNG file, or an image from this page.', 'warn');
        return;
      }
      const res = await fetch(url);
      if (!res.ok) throw new Error(`${res.status}`);
      await loadPngFile(await res.blob(), url.pathname.split('/').pop() || 'image');
    } catch (err) {
      toast(`Could not load the dropped image: ${err.message}`, 'bad');
    }
  });
  $('png-file').addEventListener('change', async (e) => {
    const file = e.target.files && e.target.files[0];
    if (file) await loadPngFile(file, file.name);
    e.target.value = '';
  });
}

/* ------------------------------------------------------------------ *
 * info, models, history
 * ------------------------------------------------------------------ */

function renderDemoHelp(text) {
  // `code` spans in backticks become <code>; everything else stays text.
  const box = $('demo-help');
  const parts = String(text || '').split('`');
  box.replaceChildren(...parts.map((s, i) => (i % 2 ? el('code', { text: s }) : document.createTextNode(s))));
}

function applyInfo(info) {
  state.info = info;
  const m = info.model || FALLBACK_INFO.model;
  const lim = m.limits || FALLBACK_INFO.model.limits;
  const d = m.defaults || FALLBACK_INFO.model.defaults;

  $('version').textContent = info.version ? `v${info.version}` : '';
  const pill = $('model-pill');
  pill.textContent = `${m.name || 'model'}${m.family ? ` · ${m.family}` : ''}`;
  pill.title = m.description || '';
  pill.classList.toggle('pill-demo', !!m.demo);
  if (m.demo && !/demo/i.test(m.name || '')) pill.textContent += ' · demo';
  if (info.device) {
    const dp = $('device-pill');
    dp.textContent = `${info.device.name || info.device.kind}${info.device.total_bytes ? ` · ${fmtBytes(info.device.total_bytes)}` : ''}`;
    dp.hidden = false;
  }

  $('demo-banner').hidden = !m.demo;
  if (m.demo) renderDemoHelp(info.demo_help || 'Get real weights with `zturbo pull z-image-turbo`, or start the server with `--model /path`.');

  const mult = m.size_multiple || 16;
  for (const key of ['width', 'height']) {
    const [lo, hi] = lim[key] || [64, 2048];
    F[key].min = String(lo);
    F[key].max = String(hi);
    F[key].step = String(mult);
  }
  // hide presets the model cannot do
  for (const b of $('size-presets').querySelectorAll('button')) {
    const w = Number(b.dataset.w);
    const h = Number(b.dataset.h);
    const [wl, wh] = lim.width || [64, 2048];
    const [hl, hh] = lim.height || [64, 2048];
    b.hidden = w < wl || w > wh || h < hl || h > hh;
  }
  const [slo, shi] = lim.steps || [1, 100];
  F.steps.min = String(slo);
  F.steps.max = String(shi);
  const presets = stepPresets();
  $('steps-presets').querySelectorAll('button').forEach((b, i) => {
    if (i < presets.length) {
      b.dataset.steps = String(presets[i]);
      b.textContent = String(presets[i]);
    }
  });
  for (const b of $('steps-presets').querySelectorAll('button')) {
    const s = Number(b.dataset.steps);
    b.hidden = s < slo || s > shi;
  }
  const [clo, chi] = lim.cfg || [1, 10];
  F.cfg.min = String(Math.max(1.0, clo));
  F.cfg.max = String(Math.min(3.0, chi));
  F.prompt.maxLength = lim.prompt_chars || 4000;
  F.negative.maxLength = lim.prompt_chars || 4000;

  const maxB = maxBatchAllowed();
  F.batch.replaceChildren(...Array.from({ length: maxB }, (_, i) => el('option', { value: i + 1, text: String(i + 1) })));
  const modes = info.memory_modes && info.memory_modes.length ? info.memory_modes : FALLBACK_INFO.memory_modes;
  F.memoryMode.replaceChildren(...modes.map((mm) => el('option', { value: mm, text: mm })));
  setSelectValue(F.memoryMode, 'auto');

  F.width.value = String(d.width ?? 1024);
  F.height.value = String(d.height ?? 1024);
  F.steps.value = String(d.steps ?? 8);
  F.cfg.value = String(d.cfg ?? 1.8);
  F.batch.value = '1';

  updateAllHints();
  updateButtons();
  scheduleEnhancePreview(true);
  img2imgInfo(info);
  document.documentElement.dataset.info = 'ready';
}

async function loadInfo(attempt = 0) {
  try {
    const { data } = await api('/api/info');
    $('offline-banner').hidden = true;
    applyInfo(data || {});
    return true;
  } catch (e) {
    $('offline-banner').hidden = false;
    $('offline-text').textContent = `${e.message} Retrying…`;
    $('model-pill').textContent = 'offline';
    const delay = Math.min(10000, 1000 * (attempt + 1));
    await new Promise((r) => setTimeout(r, delay));
    return loadInfo(attempt + 1);
  }
}

async function loadModels() {
  const list = $('models');
  try {
    const { data } = await api('/api/models');
    const models = (data && data.models) || [];
    if (!models.length) {
      list.replaceChildren(el('li', { class: 'muted', text: 'No models known.' }));
      return;
    }
    const stateText = { loaded: 'loaded', on_disk: 'on disk', not_downloaded: 'not downloaded' };
    list.replaceChildren(...models.map((mdl) => {
      const canPull = mdl.state === 'not_downloaded' && !!mdl.repo;
      const li = el('li', { dataset: { model: mdl.name } },
        el('span', { class: 'model-name', text: mdl.name }),
        el('span', { class: `state state-${mdl.state}`, text: stateText[mdl.state] || mdl.state }),
        mdl.demo ? el('span', { class: 'state state-demo', text: 'random weights' }) : null,
        canPull ? el('button', {
          type: 'button', class: 'small-btn pull-btn', text: 'Download',
          'aria-label': `Download ${mdl.name}${mdl.size_bytes ? ` (${fmtBytes(mdl.size_bytes)})` : ''}`,
          onclick: () => startPull(mdl.name),
        }) : null,
        el('span', {
          class: 'model-meta',
          title: mdl.repo || '',
          text: [mdl.family, mdl.size_bytes ? fmtBytes(mdl.size_bytes) : null, mdl.repo].filter(Boolean).join(' · '),
        }));
      return li;
    }));
    // A download started earlier (or from another tab) is still running: follow it.
    if (data && data.pull && data.pull.name) followPull(data.pull.name);
  } catch (e) {
    list.replaceChildren(el('li', { class: 'muted', text: `Could not list models (${e.message}).` }));
  }
}

/* model downloads: POST starts one, SSE reports it */

const pulls = new Map();

function pullRow(name) {
  const li = document.querySelector(`#models li[data-model="${CSS.escape(name)}"]`);
  if (!li) return null;
  let box = li.querySelector('.pull-progress');
  if (!box) {
    box = el('div', { class: 'pull-progress' },
      el('div', { class: 'bar', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-label': `Downloading ${name}` }, el('span')),
      el('div', { class: 'pull-text muted', 'aria-live': 'polite' }));
    li.append(box);
  }
  const btn = li.querySelector('.pull-btn');
  if (btn) btn.disabled = true;
  return { li, bar: box.querySelector('.bar'), fill: box.querySelector('.bar > span'), text: box.querySelector('.pull-text'), btn };
}

async function startPull(name) {
  try {
    await api(`/api/models/${encodeURIComponent(name)}/pull`, { method: 'POST' });
    followPull(name);
  } catch (e) {
    toast(`Download of ${name} not started: ${e.message}`, 'bad', 7000);
  }
}

function followPull(name) {
  if (pulls.has(name)) return;
  const row = pullRow(name);
  if (!row) return;
  row.bar.classList.add('indeterminate');
  row.text.textContent = 'Starting…';
  const es = new EventSource(`/api/models/${encodeURIComponent(name)}/pull/events`);
  pulls.set(name, es);
  const end = () => { es.close(); pulls.delete(name); };
  es.addEventListener('progress', (ev) => {
    const d = JSON.parse(ev.data);
    const file = `${d.index + 1}/${d.count} ${d.file}`;
    if (d.total_bytes) {
      const pct = Math.min(100, Math.round((d.bytes / d.total_bytes) * 100));
      row.bar.classList.remove('indeterminate');
      row.fill.style.width = `${pct}%`;
      row.bar.setAttribute('aria-valuenow', String(pct));
      row.text.textContent = `${file}: ${fmtBytes(d.bytes)} of ${fmtBytes(d.total_bytes)}`;
    } else {
      row.bar.classList.add('indeterminate');
      row.text.textContent = `${file}: ${fmtBytes(d.bytes)}`;
    }
  });
  es.addEventListener('done', () => {
    end();
    row.bar.classList.remove('indeterminate');
    row.bar.classList.add('done');
    row.text.textContent = 'Downloaded. Restart the server with --model to use it.';
    toast(`${name} is downloaded. Start zturbo serve --model ${name} to use it.`, 'info', 8000);
    setTimeout(loadModels, 1500);
  });
  es.addEventListener('failed', (ev) => {
    end();
    let msg = 'the download failed';
    try { msg = JSON.parse(ev.data).error || msg; } catch { /* keep */ }
    row.bar.classList.remove('indeterminate');
    row.bar.classList.add('failed');
    row.text.textContent = msg;
    if (row.btn) { row.btn.disabled = false; row.btn.textContent = 'Retry'; }
    toast(`Download of ${name} failed.`, 'bad', 6000);
  });
  es.onerror = () => {
    // The server closes the stream after the last event; anything else is a lost connection.
    if (es.readyState === EventSource.CLOSED && pulls.has(name)) {
      end();
      row.text.textContent = 'Lost the connection to the download; reload to see where it stands.';
      if (row.btn) row.btn.disabled = false;
    }
  };
}

async function loadHistory() {
  try {
    const { data } = await api('/api/jobs');
    const recs = (data && data.jobs) || [];
    let shown = 0;
    for (const rec of recs) {
      if (rec.state === 'done' || rec.state === 'failed') {
        if (shown < MAX_GALLERY) { addResult(rec, { fresh: false }); shown++; }
      }
    }
    // active jobs (e.g. after a reload) go to the queue, oldest first
    for (const rec of recs.filter((r) => !isTerminal(r.state)).reverse()) trackJob(rec);
    updateGalleryCount();
  } catch {
    /* history is optional */
  }
}

/* ------------------------------------------------------------------ *
 * wiring
 * ------------------------------------------------------------------ */

function wire() {
  F.form.addEventListener('submit', (e) => {
    e.preventDefault();
    submit();
  });
  document.addEventListener('keydown', (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === 'Enter') {
      e.preventDefault();
      submit();
    }
  });
  F.cancel.addEventListener('click', cancelCurrent);
  $('shortcut-hint').textContent = isMac ? '⌘ Enter' : 'Ctrl+Enter';

  F.prompt.addEventListener('input', () => {
    clearOneError(F.prompt);
    updateWordCount();
    scheduleEnhancePreview();
  });
  F.negative.addEventListener('input', () => {
    clearOneError(F.negative);
    scheduleEnhancePreview();
  });
  F.enhance.addEventListener('change', () => scheduleEnhancePreview(true));

  $('size-presets').addEventListener('click', (e) => {
    const b = e.target.closest('button[data-w]');
    if (!b) return;
    F.width.value = b.dataset.w;
    F.height.value = b.dataset.h;
    clearOneError(F.width);
    clearOneError(F.height);
    updateSizeUi();
  });
  for (const inp of [F.width, F.height]) {
    inp.addEventListener('input', () => { clearOneError(inp); updateSizeUi(); });
    inp.addEventListener('change', () => {
      // nudge to the nearest multiple when the user leaves the field
      const v = intOrNaN(inp.value);
      const m = sizeMultiple();
      if (Number.isFinite(v) && v > 0 && v % m !== 0) {
        const lo = Number(inp.min) || m;
        const hi = Number(inp.max) || 2048;
        inp.value = String(Math.min(hi, Math.max(lo, Math.round(v / m) * m)));
        toast(`${inp.id === 'width' ? 'Width' : 'Height'} rounded to ${inp.value} (a multiple of ${m}).`, 'info', 2500);
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
  });
  F.steps.addEventListener('input', () => { clearOneError(F.steps); updateStepsUi(); });

  F.cfg.addEventListener('input', () => { clearOneError(F.cfg); updateCfgUi(); });

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

  setupDragDrop();
}

/* API key: a server started with --api-key asks for it once; POST /api/auth sets an HttpOnly
 * cookie that every later request (fetch, EventSource, <img>) carries. A `?key=` in the page's
 * address is used the same way and then removed from the address bar. */

let keyPrompt = null;

async function sendKey(key) {
  await api('/api/auth', { method: 'POST', body: { key }, noAuthPrompt: true });
}

function askForKey() {
  if (keyPrompt) return keyPrompt;
  const dlg = $('key-dialog');
  const input = $('key-input');
  const err = $('key-error');
  keyPrompt = new Promise(() => {
    dlg.addEventListener('submit', async (e) => {
      e.preventDefault();
      err.textContent = '';
      try {
        await sendKey(input.value.trim());
        location.reload();
      } catch (x) {
        err.textContent = x.status === 401 ? 'That key is not right.' : x.message;
        input.select();
      }
    });
    if (typeof dlg.showModal === 'function') dlg.showModal(); else dlg.setAttribute('open', '');
    input.focus();
  });
  return keyPrompt;
}

async function checkAuth() {
  const url = new URL(location.href);
  const key = url.searchParams.get('key');
  if (key !== null) {
    url.searchParams.delete('key');
    history.replaceState(null, '', url.pathname + url.search + url.hash);
    try { await sendKey(key); } catch { /* asked below */ }
  }
  try {
    const { data } = await api('/api/auth', { noAuthPrompt: true });
    if (data && data.required && !data.authorized) await askForKey();
  } catch { /* an old or unreachable server: carry on, api() reports */ }
}

/** The input image sets the job's size (and, the first time, the model's image-to-image steps). */
function onInputSize(w, h, opts = {}) {
  F.width.value = String(w);
  F.height.value = String(h);
  clearOneError(F.width);
  clearOneError(F.height);
  if (opts.steps) {
    F.steps.value = String(opts.steps);
    clearOneError(F.steps);
  }
  updateAllHints();
}

async function main() {
  await checkAuth();
  mountImg2Img({ api, toast, onSize: onInputSize });
  wire();
  updateAllHints();
  mem.chart = new MemoryChart($('memory-chart'), $('memory-readout'));
  connectMemory();
  await loadInfo();
  loadModels();
  loadHistory();
}

main();

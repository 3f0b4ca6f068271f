// zturbo web UI — image to image, inpainting and LoRAs (issue 19), one self-contained module.
//
// The form gains an "Input image" section: choose, drop or paste an image (or press "Use as
// input" on a result), a strength slider, a mask painted over the image (brush size, eraser,
// clear, invert; the keyboard paints too), the mask blur, and a LoRA picker with a weight per
// LoRA. The entry module calls:
//   mountImg2Img(ctx)           once, after the form exists; ctx = { api, toast, info, onSize }
//   img2imgInfo(info)           whenever /api/info is (re)applied
//   img2imgFields(body, errors) while reading the form: adds image/mask/strength/mask_blur/loras
//   restoreImg2Img(params)      when a result's settings are restored (strength, LoRAs)
//   useAsInput(url)             a result's "Use as input" (the viewer's button fills the
//                               `data-image-slot="input"` field and fires zturbo:use-image)
// and merges IMG2IMG_FIELD_IDS into its field→input map so 422 answers land next to the input.
//
// The input is redrawn on a canvas at the size the job will run at (the image's own size scaled
// to fit the largest side and rounded down to the model's size multiple, as the server does for
// an image without a size), so the mask is painted at exactly that size and the request stays
// well under the body limit. The mask is sent as a black/white PNG, white = repaint.

import { t } from './i18n.js';
import { on } from './store.js';

const $ = (id) => document.getElementById(id);

/** Attributes for a static text: set now, and again by applyStatic() on a language switch. */
const tx = (key) => ({ text: t(key), 'data-i18n': key });

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/** API field name → input id (the error paragraph is `<id>-error`). */
export const IMG2IMG_FIELD_IDS = {
  image: 'init-image-file',
  mask: 'mask-canvas',
  strength: 'strength',
  mask_blur: 'mask-blur',
  loras: 'lora-add',
};

const ACCEPT = ['image/png', 'image/jpeg', 'image/webp'];
const PAINT = 'rgba(255, 46, 120, 1)';

const st = {
  ctx: null,
  info: null,
  image: null,        // canvas holding the input at the job's size
  name: '',
  strengthTouched: false,
  stepsSet: false,
  painting: false,
  last: null,         // last painted point (image pixels)
  cursor: null,       // keyboard brush position (image pixels)
  loras: [],          // [{name, weight}]
  available: [],      // names in <models-dir>/loras/
};

function limits() {
  return (st.info && st.info.model && st.info.model.limits) || {};
}
function img2imgProfile() {
  const p = st.info && st.info.model && st.info.model.profile;
  return (p && p.img2img) || { steps: 2, strength: 0.6, noise: 'flow' };
}
function sizeMultiple() {
  return (st.info && st.info.model && st.info.model.size_multiple) || 16;
}

/** The size a job runs an image at: scaled to fit the largest side, rounded down to the size
 * multiple (the server's `image_size`). */
export function fittedSize(w, h, multiple, maxSide = 2048, minSide = 64) {
  const m = Math.max(1, multiple);
  const scale = Math.min(1, maxSide / Math.max(w, h, 1));
  const fit = (v) => Math.max(Math.floor(Math.floor(v * scale) / m) * m, Math.ceil(minSide / m) * m);
  return [fit(w), fit(h)];
}

/* ------------------------------------------------------------------ *
 * DOM
 * ------------------------------------------------------------------ */

function build() {
  const fileInput = el('input', {
    type: 'file', id: 'init-image-file', accept: ACCEPT.join(','), class: 'visually-hidden',
    'aria-describedby': 'init-image-error',
  });
  const drop = el('div', {
    // Its accessible name is its visible text (axe: label-content-name-mismatch).
    class: 'i2i-drop', id: 'init-drop', tabindex: '0', role: 'button',
  },
  el('strong', tx('i2i.input')),
  el('span', { class: 'hint', ...tx('i2i.drop.hint') }));

  const preview = el('img', { id: 'init-preview', alt: t('i2i.input'), 'data-i18n-attr': 'alt:i2i.input' });
  const mask = el('canvas', {
    id: 'mask-canvas', class: 'i2i-mask', tabindex: '0', role: 'img',
    'aria-label': t('i2i.mask.label'), 'data-i18n-attr': 'aria-label:i2i.mask.label',
    'aria-describedby': 'mask-info mask-canvas-error',
  });
  const cursor = el('div', { class: 'i2i-cursor', id: 'mask-cursor', hidden: true });
  const stage = el('div', { class: 'i2i-stage', id: 'init-stage' }, preview, mask, cursor);

  const brush = el('input', { type: 'range', id: 'brush-size', min: '2', max: '256', step: '1', value: '32' });
  const brushOut = el('output', { id: 'brush-size-value', for: 'brush-size', text: '32' });
  const tool = (id, key, extra = {}) => el('button', {
    type: 'button', class: 'small-btn', id, title: t(`${key}.title`), 'data-i18n-attr': `title:${key}.title`, ...tx(key), ...extra,
  });
  const tools = el('div', { class: 'i2i-tools', role: 'group', 'aria-label': t('i2i.tools'), 'data-i18n-attr': 'aria-label:i2i.tools' },
    el('label', { for: 'brush-size', ...tx('i2i.brush') }), brush, brushOut,
    tool('mask-eraser', 'i2i.eraser', { 'aria-pressed': 'false' }),
    tool('mask-clear', 'i2i.clear'),
    tool('mask-invert', 'i2i.invert'),
    tool('init-remove', 'i2i.remove'));

  const strength = el('input', {
    type: 'range', id: 'strength', name: 'strength', min: '0', max: '1', step: '0.01', value: '0.6',
    'aria-describedby': 'strength-hint strength-error',
  });
  const blur = el('input', {
    type: 'number', id: 'mask-blur', name: 'mask_blur', min: '0', max: '64', step: '1', value: '4',
    inputmode: 'numeric', 'aria-describedby': 'mask-blur-error',
  });

  const loraSelect = el('select', { id: 'lora-add', 'aria-describedby': 'lora-hint lora-add-error' });
  const section = el('fieldset', { class: 'field i2i', id: 'img2img' },
    el('legend', tx('i2i.legend')),
    fileInput,
    // The viewer's "Use as input" fills this slot (the image's URL) and fires zturbo:use-image.
    el('input', { type: 'hidden', id: 'init-image-src', 'data-image-slot': 'input' }),
    el('div', { class: 'i2i-empty', id: 'init-empty' },
      drop,
      el('label', { class: 'link-btn', for: 'init-image-file', ...tx('i2i.choose') })),
    el('div', { class: 'i2i-loaded', id: 'init-loaded', hidden: true },
      stage,
      el('p', { class: 'hint', id: 'init-meta' }),
      tools,
      el('p', { class: 'hint', id: 'mask-info', 'aria-live': 'polite' }),
      el('p', { class: 'field-error', id: 'mask-canvas-error', hidden: true }),
      el('div', { class: 'field' },
        el('div', { class: 'label-row' },
          el('label', { for: 'strength', ...tx('i2i.strength') }),
          el('output', { id: 'strength-value', for: 'strength' })),
        strength,
        el('p', { class: 'hint', id: 'strength-hint' }),
        el('p', { class: 'field-error', id: 'strength-error', hidden: true })),
      el('div', { class: 'field i2i-blur', id: 'mask-blur-field' },
        el('label', { for: 'mask-blur', ...tx('i2i.maskBlur') }), blur,
        el('p', { class: 'field-error', id: 'mask-blur-error', hidden: true }))),
    el('p', { class: 'field-error', id: 'init-image-file-error', hidden: true }),
    el('div', { class: 'i2i-loras' },
      el('div', { class: 'label-row' },
        el('label', { for: 'lora-add', text: 'LoRA' }),
        el('button', { type: 'button', class: 'link-btn', id: 'lora-refresh', ...tx('i2i.refresh') })),
      el('div', { class: 'i2i-lora-add' }, loraSelect,
        el('button', { type: 'button', class: 'small-btn', id: 'lora-add-btn', ...tx('i2i.add') })),
      el('ul', { class: 'i2i-lora-list', id: 'lora-list', 'aria-label': t('i2i.loraList'), 'data-i18n-attr': 'aria-label:i2i.loraList' }),
      el('p', { class: 'hint', id: 'lora-hint' }),
      el('p', { class: 'field-error', id: 'lora-add-error', hidden: true })));
  return section;
}

/* ------------------------------------------------------------------ *
 * the input image
 * ------------------------------------------------------------------ */

function showError(id, message) {
  const p = $(`${id}-error`);
  if (!p) return;
  p.textContent = message || '';
  p.hidden = !message;
}

async function loadImageFromBlob(blob, name) {
  if (!blob || (blob.type && !ACCEPT.includes(blob.type))) {
    showError('init-image-file', t('i2i.notImage', { name: name || t('i2i.thatFile') }));
    return false;
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch {
    showError('init-image-file', t('i2i.notDecoded', { name: name || t('i2i.thatFile') }));
    return false;
  }
  const lim = limits();
  const [lo, hi] = lim.width || [64, 2048];
  const [w, h] = fittedSize(bitmap.width, bitmap.height, sizeMultiple(), hi, lo);
  const canvas = document.createElement('canvas');
  canvas.width = w;
  canvas.height = h;
  canvas.getContext('2d').drawImage(bitmap, 0, 0, w, h);
  const original = `${bitmap.width}×${bitmap.height}`;
  if (bitmap.close) bitmap.close();
  setImage(canvas, name || 'image', original);
  return true;
}

function setImage(canvas, name, original) {
  st.image = canvas;
  st.name = name;
  showError('init-image-file', '');
  const w = canvas.width;
  const h = canvas.height;
  const preview = $('init-preview');
  preview.src = canvas.toDataURL('image/png');
  preview.width = w;
  preview.height = h;
  const mask = $('mask-canvas');
  mask.width = w;
  mask.height = h;
  mask.getContext('2d').clearRect(0, 0, w, h);
  $('init-stage').style.aspectRatio = `${w} / ${h}`;
  st.cursor = { x: w / 2, y: h / 2 };
  st.meta = { name, original, size: `${w}×${h}` };
  renderMeta();
  $('init-empty').hidden = true;
  $('init-loaded').hidden = false;
  const brush = $('brush-size');
  brush.value = String(Math.max(4, Math.round(Math.max(w, h) / 16)));
  $('brush-size-value').textContent = brush.value;
  if (!st.strengthTouched) $('strength').value = String(img2imgProfile().strength);
  if (st.ctx && st.ctx.onSize) st.ctx.onSize(w, h, { steps: st.stepsSet ? null : img2imgProfile().steps });
  st.stepsSet = true;
  updateMaskInfo();
  updateStrength();
  document.documentElement.dataset.initImage = `${w}x${h}`;
}

function renderMeta() {
  if (st.meta) $('init-meta').textContent = t('i2i.meta', st.meta);
}

function removeImage() {
  st.image = null;
  $('init-loaded').hidden = true;
  $('init-empty').hidden = false;
  $('init-preview').removeAttribute('src');
  $('init-image-file').value = '';
  delete document.documentElement.dataset.initImage;
  $('init-drop').focus();
}

/** A result's image (same origin) becomes the input. */
export async function useAsInput(url) {
  try {
    const res = await fetch(url);
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const blob = await res.blob();
    const name = new URL(url, location.href).pathname.split('/').pop() || 'result.png';
    if (await loadImageFromBlob(blob, name)) {
      if (st.ctx && st.ctx.toast) st.ctx.toast(t('i2i.isInput', { name }), 'ok', 2500);
      $('img2img').scrollIntoView({ block: 'nearest', behavior: 'smooth' });
      $('mask-canvas').focus({ preventScroll: true });
    }
  } catch (e) {
    if (st.ctx && st.ctx.toast) st.ctx.toast(t('i2i.useFailed', { error: e.message }), 'bad');
  }
}

/** A "Use as input" button for a result image. */
export function useAsInputButton(src, label) {
  return el('button', {
    type: 'button', class: 'small-btn use-input', title: t('i2i.useInput.title'),
    text: label || t('viewer.input'), onclick: () => useAsInput(src),
  });
}

/* ------------------------------------------------------------------ *
 * the mask
 * ------------------------------------------------------------------ */

function maskCtx() {
  return $('mask-canvas').getContext('2d', { willReadFrequently: true });
}

function eraser() {
  return $('mask-eraser').getAttribute('aria-pressed') === 'true';
}

function stamp(from, to) {
  const ctx = maskCtx();
  const r = Number($('brush-size').value) / 2;
  ctx.save();
  ctx.globalCompositeOperation = eraser() ? 'destination-out' : 'source-over';
  ctx.strokeStyle = PAINT;
  ctx.fillStyle = PAINT;
  ctx.lineCap = 'round';
  ctx.lineWidth = r * 2;
  ctx.beginPath();
  if (from && (from.x !== to.x || from.y !== to.y)) {
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  } else {
    ctx.arc(to.x, to.y, r, 0, Math.PI * 2);
    ctx.fill();
  }
  ctx.restore();
}

function toImage(e) {
  const c = $('mask-canvas');
  const r = c.getBoundingClientRect();
  return {
    x: ((e.clientX - r.left) / r.width) * c.width,
    y: ((e.clientY - r.top) / r.height) * c.height,
  };
}

/** Fraction of the image painted (alpha ≥ 128). */
function coverage() {
  const c = $('mask-canvas');
  if (!c.width || !c.height) return 0;
  const d = maskCtx().getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] >= 128) n++;
  return n / (c.width * c.height);
}

function updateMaskInfo() {
  const f = coverage();
  const info = $('mask-info');
  info.dataset.coverage = f.toFixed(4);
  info.textContent = f > 0
    ? t('i2i.mask.info', { pct: (f * 100).toFixed(f < 0.01 ? 2 : 0) })
    : t('i2i.mask.none');
  $('mask-blur-field').hidden = f === 0;
  showError('mask-canvas', '');
}

function invertMask() {
  const c = $('mask-canvas');
  const ctx = maskCtx();
  const img = ctx.getImageData(0, 0, c.width, c.height);
  const d = img.data;
  for (let i = 0; i < d.length; i += 4) {
    const on = d[i + 3] >= 128;
    d[i] = 255; d[i + 1] = 46; d[i + 2] = 120;
    d[i + 3] = on ? 0 : 255;
  }
  ctx.putImageData(img, 0, 0);
  updateMaskInfo();
}

/** The mask as a black/white PNG data URL (white = repaint), or null when nothing is painted. */
function maskDataUrl() {
  const c = $('mask-canvas');
  const src = maskCtx().getImageData(0, 0, c.width, c.height);
  const out = new ImageData(c.width, c.height);
  let any = false;
  for (let i = 0; i < src.data.length; i += 4) {
    const v = src.data[i + 3] >= 128 ? 255 : 0;
    if (v) any = true;
    out.data[i] = v; out.data[i + 1] = v; out.data[i + 2] = v; out.data[i + 3] = 255;
  }
  if (!any) return null;
  const tmp = document.createElement('canvas');
  tmp.width = c.width;
  tmp.height = c.height;
  tmp.getContext('2d').putImageData(out, 0, 0);
  return tmp.toDataURL('image/png');
}

function moveCursor() {
  const c = $('mask-canvas');
  const cur = $('mask-cursor');
  if (!st.cursor || !c.width) return;
  const r = Number($('brush-size').value);
  cur.style.left = `${(st.cursor.x / c.width) * 100}%`;
  cur.style.top = `${(st.cursor.y / c.height) * 100}%`;
  cur.style.width = `${(r / c.width) * 100}%`;
  cur.style.height = `${(r / c.height) * 100}%`;
}

function wireMask() {
  const c = $('mask-canvas');
  c.addEventListener('pointerdown', (e) => {
    if (e.button !== 0) return;
    e.preventDefault();
    c.setPointerCapture(e.pointerId);
    st.painting = true;
    st.last = toImage(e);
    stamp(null, st.last);
  });
  c.addEventListener('pointermove', (e) => {
    if (!st.painting) return;
    const p = toImage(e);
    stamp(st.last, p);
    st.last = p;
  });
  const end = () => {
    if (!st.painting) return;
    st.painting = false;
    st.last = null;
    onMaskChanged();
  };
  c.addEventListener('pointerup', end);
  c.addEventListener('pointercancel', end);

  // Keyboard painting: a visible brush ring moved with the arrows, Space/Enter stamps.
  c.addEventListener('focus', () => { $('mask-cursor').hidden = false; moveCursor(); });
  c.addEventListener('blur', () => { $('mask-cursor').hidden = true; });
  c.addEventListener('keydown', (e) => {
    if (!st.cursor) return;
    const step = (e.shiftKey ? 4 : 1) * Math.max(2, Number($('brush-size').value) / 4);
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (moves[e.key]) {
      e.preventDefault();
      const from = { ...st.cursor };
      st.cursor.x = Math.min(c.width, Math.max(0, st.cursor.x + moves[e.key][0] * step));
      st.cursor.y = Math.min(c.height, Math.max(0, st.cursor.y + moves[e.key][1] * step));
      if (st.keyPainting) { stamp(from, st.cursor); onMaskChanged(); }
      moveCursor();
    } else if (e.key === ' ' || e.key === 'Enter') {
      e.preventDefault();
      // Space held down paints while the arrows move; a tap stamps once.
      if (!e.repeat) { st.keyPainting = e.key === ' '; stamp(null, st.cursor); onMaskChanged(); }
    } else if (e.key === 'e' || e.key === 'E') {
      e.preventDefault();
      toggleEraser();
    } else if (e.key === '[' || e.key === ']') {
      e.preventDefault();
      const b = $('brush-size');
      b.value = String(Math.max(Number(b.min), Math.min(Number(b.max), Number(b.value) * (e.key === ']' ? 1.25 : 0.8))));
      $('brush-size-value').textContent = b.value;
      moveCursor();
    }
  });
  c.addEventListener('keyup', (e) => { if (e.key === ' ') st.keyPainting = false; });

  $('brush-size').addEventListener('input', () => {
    $('brush-size-value').textContent = $('brush-size').value;
    moveCursor();
  });
  $('mask-eraser').addEventListener('click', toggleEraser);
  $('mask-clear').addEventListener('click', () => {
    maskCtx().clearRect(0, 0, c.width, c.height);
    onMaskChanged();
  });
  $('mask-invert').addEventListener('click', invertMask);
}

function toggleEraser() {
  const b = $('mask-eraser');
  const on = b.getAttribute('aria-pressed') !== 'true';
  b.setAttribute('aria-pressed', String(on));
  $('mask-canvas').classList.toggle('erasing', on);
}

function onMaskChanged() {
  const hadMask = $('mask-info').dataset.coverage > 0;
  updateMaskInfo();
  // Inpainting repaints the masked region from scratch by default (diffusers' strength 1).
  if (!hadMask && coverage() > 0 && !st.strengthTouched) {
    $('strength').value = '1';
    updateStrength();
  }
}

/* ------------------------------------------------------------------ *
 * strength
 * ------------------------------------------------------------------ */

function steps() {
  const s = Number(($('steps') || {}).value);
  return Number.isFinite(s) ? s : 0;
}

/** Steps that run at `strength`, in the family's pipeline arithmetic. */
function stepsRun(n, strength) {
  if (img2imgProfile().noise === 'variance_exploding') return Math.min(Math.floor(n * strength), n);
  return n - Math.floor(n - Math.min(n * strength, n));
}

function updateStrength() {
  const s = Number($('strength').value);
  $('strength-value').textContent = s.toFixed(2);
  const n = steps();
  const run = stepsRun(n, s);
  const hint = $('strength-hint');
  hint.textContent = n === 1 ? t('i2i.strength.hint.one', { run, n }) : t('i2i.strength.hint.many', { run, n });
  hint.classList.toggle('warn', run < 1);
}

/* ------------------------------------------------------------------ *
 * LoRAs
 * ------------------------------------------------------------------ */

async function loadLoras() {
  try {
    const { data } = await st.ctx.api('/sdapi/v1/loras');
    st.available = (Array.isArray(data) ? data : []).map((l) => l.name).filter(Boolean).sort();
  } catch {
    st.available = [];
  }
  renderLoraSelect();
}

function renderLoraSelect() {
  const sel = $('lora-add');
  const free = st.available.filter((n) => !st.loras.some((l) => l.name === n));
  sel.replaceChildren(...(free.length
    ? free.map((n) => el('option', { value: n, text: n }))
    : [el('option', { value: '', text: t(st.available.length ? 'i2i.lora.allAdded' : 'i2i.lora.noneFound') })]));
  sel.disabled = !free.length;
  $('lora-add-btn').disabled = !free.length;
  $('lora-hint').textContent = t(st.available.length ? 'i2i.lora.hint' : 'i2i.lora.empty');
}

function addLora(name, weight = 1) {
  if (!name || st.loras.some((l) => l.name === name)) return;
  st.loras.push({ name, weight });
  renderLoras();
}

function renderLoras() {
  const list = $('lora-list');
  list.replaceChildren(...st.loras.map((l, i) => {
    const id = `lora-weight-${i}`;
    const w = el('input', {
      type: 'number', id, class: 'lora-weight', min: '-10', max: '10', step: '0.05', value: String(l.weight),
      inputmode: 'decimal', 'aria-label': t('i2i.lora.weight', { name: l.name }),
    });
    w.addEventListener('input', () => { l.weight = Number(w.value); });
    const remove = el('button', {
      type: 'button', class: 'icon-btn', 'aria-label': t('i2i.lora.remove', { name: l.name }), title: t('i2i.lora.remove', { name: l.name }), text: '×',
      onclick: () => {
        st.loras.splice(st.loras.indexOf(l), 1);
        renderLoras();
        $('lora-add').focus();
      },
    });
    return el('li', { class: 'i2i-lora' }, el('label', { for: id, class: 'lora-name', text: l.name }), w, remove);
  }));
  renderLoraSelect();
  showError('lora-add', '');
}

/* ------------------------------------------------------------------ *
 * wiring and the hooks app.js calls
 * ------------------------------------------------------------------ */

export function mountImg2Img(ctx) {
  st.ctx = ctx;
  st.info = ctx.info || null;
  const section = build();
  const slot = $('img2img-slot');
  slot.replaceWith(section);

  const fileInput = $('init-image-file');
  fileInput.addEventListener('change', async () => {
    const f = fileInput.files && fileInput.files[0];
    if (f) await loadImageFromBlob(f, f.name);
  });
  const drop = $('init-drop');
  drop.addEventListener('click', () => fileInput.click());
  drop.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); fileInput.click(); }
  });
  // Dropping here makes the file the input (elsewhere a PNG's settings are loaded).
  for (const target of [drop, $('init-stage')]) {
    target.addEventListener('dragover', (e) => {
      e.preventDefault();
      e.stopPropagation();
      target.classList.add('over');
      const overlay = $('drop-overlay');
      if (overlay) overlay.hidden = true;
      if (e.dataTransfer) e.dataTransfer.dropEffect = 'copy';
    });
    target.addEventListener('dragleave', () => target.classList.remove('over'));
    target.addEventListener('drop', async (e) => {
      e.preventDefault();
      e.stopPropagation();
      target.classList.remove('over');
      const overlay = $('drop-overlay');
      if (overlay) overlay.hidden = true;
      const file = e.dataTransfer && [...(e.dataTransfer.files || [])][0];
      if (file) { await loadImageFromBlob(file, file.name); return; }
      const uri = e.dataTransfer && (e.dataTransfer.getData('text/uri-list') || '').split('\n').find((l) => l && !l.startsWith('#'));
      if (uri) await useAsInput(uri.trim());
    });
  }
  // Pasting an image anywhere on the page makes it the input.
  document.addEventListener('paste', async (e) => {
    const items = e.clipboardData ? [...e.clipboardData.items] : [];
    const item = items.find((i) => i.kind === 'file' && ACCEPT.includes(i.type));
    if (!item) return;
    e.preventDefault();
    await loadImageFromBlob(item.getAsFile(), t('i2i.pasted'));
  });
  $('init-image-src').addEventListener('zturbo:use-image', (e) => {
    const src = (e.detail && e.detail.src) || e.target.value;
    if (src) useAsInput(src);
  });
  $('init-remove').addEventListener('click', removeImage);
  $('strength').addEventListener('input', () => { st.strengthTouched = true; updateStrength(); showError('strength', ''); });
  const stepsInput = $('steps');
  if (stepsInput) stepsInput.addEventListener('input', updateStrength);
  const presets = $('steps-presets');
  if (presets) presets.addEventListener('click', () => setTimeout(updateStrength));
  wireMask();
  $('lora-add-btn').addEventListener('click', () => addLora($('lora-add').value));
  $('lora-refresh').addEventListener('click', loadLoras);
  renderLoras();
  loadLoras();
  // Static texts follow applyStatic(); these are drawn from state.
  on('lang', () => {
    renderMeta();
    if (st.image) updateMaskInfo();
    updateStrength();
    renderLoras();
  });
}

export function img2imgInfo(info) {
  st.info = info;
  if (!st.strengthTouched && !st.image) $('strength').value = String(img2imgProfile().strength);
  updateStrength();
  if (st.ctx) loadLoras();
}

/** Adds the image-to-image fields to a job body; pushes [field, message] errors. */
export function img2imgFields(body, errors) {
  if (st.loras.length) {
    const bad = st.loras.find((l) => !Number.isFinite(l.weight) || Math.abs(l.weight) > 10);
    if (bad) errors.push(['loras', t('i2i.err.loraWeight', { name: bad.name })]);
    else body.loras = st.loras.map((l) => ({ name: l.name, weight: l.weight }));
  }
  if (!st.image) return;
  body.image = st.image.toDataURL('image/png');
  const strength = Number($('strength').value);
  body.strength = Math.round(strength * 100) / 100;
  if (stepsRun(body.steps, body.strength) < 1) {
    errors.push(['strength', img2imgProfile().noise === 'variance_exploding'
      ? t('i2i.err.noStepVE', { steps: body.steps, min: (1 / body.steps).toFixed(2) })
      : t('i2i.err.noStep')]);
  }
  const mask = maskDataUrl();
  if (mask) {
    body.mask = mask;
    const blur = Number($('mask-blur').value);
    if (!Number.isInteger(blur) || blur < 0 || blur > 64) errors.push(['mask_blur', t('i2i.err.maskBlur')]);
    else body.mask_blur = blur;
  }
}

/** Restores a result's strength and LoRAs (the input image itself is not in the record). */
export function restoreImg2Img(p) {
  if (!p) return;
  if (Array.isArray(p.loras)) {
    st.loras = p.loras.filter((l) => l && l.name).map((l) => ({ name: l.name, weight: Number(l.weight) || 1 }));
    renderLoras();
  }
  if (Number.isFinite(p.strength)) {
    $('strength').value = String(p.strength);
    st.strengthTouched = true;
    updateStrength();
  }
}

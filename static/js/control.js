// zturbo web UI — ControlNet (issue 20), one self-contained module.
//
// A "Control" section in the form, shown while /api/info lists `controlnet` in `features`: pick
// the ControlNet (GET /controlnet/model_list), choose or drop a control image (or press "Use as
// control" on a result: the viewer fills this module's `data-image-slot="control"` field and
// fires zturbo:use-image), choose a preprocessor and see its map (POST /controlnet/detect), set
// the scale and the step range. The entry module calls:
//   mountControl(ctx)   once, after the form exists; ctx = { api }
//   controlInfo(info)   whenever /api/info is (re)applied
// and the form's `form:read` event adds `control` to the job body.

import { t } from './i18n.js';
import { on } from './store.js';

const $ = (id) => document.getElementById(id);
const ACCEPT = ['image/png', 'image/jpeg', 'image/webp'];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) if (c !== undefined && c !== null && c !== false) node.append(c);
  return node;
}

const st = { ctx: null, image: null, models: [], shown: false, seq: 0 };

function build() {
  const field = (id, label, input, extra) => el('div', { class: 'field ctl-field' },
    el('div', { class: 'label-row' }, el('label', { for: id, text: label }), extra || null), input);
  const pre = el('select', { id: 'control-preprocess' },
    el('option', { value: 'none', text: t('control.pre.none') }),
    el('option', { value: 'canny', text: t('control.pre.canny') }));
  return el('fieldset', { class: 'field ctl', id: 'control', hidden: true },
    el('legend', { text: t('control.legend') }),
    el('input', { type: 'hidden', id: 'control-src', 'data-image-slot': 'control' }),
    field('control-model', t('control.model'), el('select', { id: 'control-model', 'aria-describedby': 'control-error' })),
    el('div', { class: 'ctl-image' },
      el('input', { type: 'file', id: 'control-file', accept: ACCEPT.join(','), class: 'visually-hidden' }),
      el('label', { class: 'link-btn', for: 'control-file', text: t('control.choose') }),
      el('button', { type: 'button', class: 'small-btn', id: 'control-remove', hidden: true, text: t('control.remove') })),
    el('div', { class: 'ctl-maps' },
      el('img', { id: 'control-image', alt: t('control.imageAlt'), hidden: true }),
      el('img', { id: 'control-map', alt: t('control.mapAlt'), hidden: true })),
    field('control-preprocess', t('control.preprocess'), pre),
    field('control-scale', t('control.scale'),
      el('input', { type: 'range', id: 'control-scale', min: '0', max: '2', step: '0.05', value: '0.75' }),
      el('output', { id: 'control-scale-value', for: 'control-scale', text: '0.75' })),
    el('div', { class: 'ctl-range' },
      field('control-start', t('control.start'), el('input', { type: 'number', id: 'control-start', min: '0', max: '1', step: '0.05', value: '0' })),
      field('control-end', t('control.end'), el('input', { type: 'number', id: 'control-end', min: '0', max: '1', step: '0.05', value: '1' }))),
    el('p', { class: 'hint', id: 'control-hint', text: t('control.hint') }),
    el('p', { class: 'field-error', id: 'control-error', hidden: true, 'aria-live': 'polite' }));
}

function showError(message) {
  const p = $('control-error');
  p.textContent = message || '';
  p.hidden = !message;
}

async function blobToDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result));
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}

async function setImage(blob) {
  if (!blob || (blob.type && !ACCEPT.includes(blob.type))) {
    showError(t('control.notImage'));
    return;
  }
  showError('');
  st.image = await blobToDataUrl(blob);
  $('control-image').src = st.image;
  $('control-image').hidden = false;
  $('control-remove').hidden = false;
  await preview();
}

/** The preprocessor's map of the image, as the server makes it. */
async function preview() {
  const map = $('control-map');
  const module = $('control-preprocess').value;
  if (!st.image || module === 'none') {
    map.hidden = true;
    return;
  }
  const seq = ++st.seq;
  try {
    const { data } = await st.ctx.api('/controlnet/detect', {
      method: 'POST',
      body: { controlnet_module: module, controlnet_input_images: [st.image] },
    });
    if (seq !== st.seq) return;
    map.src = `data:image/png;base64,${data.images[0]}`;
    map.hidden = false;
  } catch (e) {
    if (seq === st.seq) showError(e.message);
  }
}

async function loadModels() {
  const select = $('control-model');
  try {
    const { data } = await st.ctx.api('/controlnet/model_list');
    st.models = (data && data.model_list) || [];
  } catch {
    st.models = [];
  }
  const keep = select.value;
  select.replaceChildren(...st.models.map((m) => el('option', { value: m, text: m })));
  if (st.models.includes(keep)) select.value = keep;
}

export function mountControl(ctx) {
  st.ctx = ctx;
  const section = build();
  const after = $('img2img') || $('gen-form').lastElementChild;
  after.after(section);
  $('control-file').addEventListener('change', () => {
    const f = $('control-file').files && $('control-file').files[0];
    if (f) setImage(f);
  });
  section.addEventListener('dragover', (e) => { e.preventDefault(); e.stopPropagation(); });
  section.addEventListener('drop', (e) => {
    e.preventDefault();
    e.stopPropagation();
    const f = e.dataTransfer && [...(e.dataTransfer.files || [])][0];
    if (f) setImage(f);
  });
  $('control-src').addEventListener('zturbo:use-image', async () => {
    try {
      const res = await fetch($('control-src').value);
      await setImage(await res.blob());
    } catch (e) {
      showError(e.message);
    }
  });
  $('control-remove').addEventListener('click', () => {
    st.image = null;
    for (const id of ['control-image', 'control-map']) $(id).hidden = true;
    $('control-remove').hidden = true;
    $('control-file').value = '';
  });
  $('control-preprocess').addEventListener('change', preview);
  $('control-scale').addEventListener('input', () => {
    $('control-scale-value').textContent = $('control-scale').value;
  });
  on('form:read', (body) => {
    if (!st.shown || !st.image || !$('control-model').value) return;
    body.control = {
      model: $('control-model').value,
      image: st.image,
      scale: Number($('control-scale').value),
      preprocess: $('control-preprocess').value,
      start: Number($('control-start').value),
      end: Number($('control-end').value),
    };
  });
}

export function controlInfo(info) {
  const f = info && info.features;
  st.shown = Array.isArray(f) && f.includes('controlnet');
  const section = $('control');
  if (!section) return;
  section.hidden = !st.shown;
  if (st.shown && st.ctx) loadModels();
}

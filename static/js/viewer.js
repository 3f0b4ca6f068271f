// The viewer: a <dialog> lightbox with the full-size image, ←/→ through the history, Esc to
// close, the image's own parameters and seed, download (a readable file name from the server's
// Content-Disposition), copy parameters, reuse seed, use settings, "use as input" / "use as
// control" (only when the server announces img2img / ControlNet), delete, and a side-by-side
// compare of two images.

import { $, el, fmtMs, fmtBytes, fmtCfg } from './dom.js';
import { emit, on } from './store.js';
import { t } from './i18n.js';
import { flatImages, promptOf, imageSeed, requestedMode, restoreFrom, deleteRecord } from './gallery.js';
import { phraseChips } from './enhance.js';
import { useSeed, imageSlot } from './form.js';
import { hasFeature } from './profile.js';
import { toast } from './toast.js';

const v = { list: [], pos: 0, pinned: null, opener: null };

function current() {
  return v.list[v.pos] || null;
}

function open({ id, index }) {
  v.list = flatImages();
  const at = v.list.findIndex((e) => e.rec.id === id && e.index === (index || 0));
  if (at < 0) return;
  v.pos = at;
  v.opener = document.activeElement;
  const dlg = $('viewer');
  render();
  if (!dlg.open) dlg.showModal();
  $('viewer-close').focus();
}

function close() {
  const dlg = $('viewer');
  if (dlg.open) dlg.close();
}

function step(delta) {
  if (!v.list.length) return;
  v.pos = Math.min(v.list.length - 1, Math.max(0, v.pos + delta));
  render();
}

/** The download URL: the server names the file from the prompt, the seed and the index. */
export function downloadUrl(src) {
  return `${src}${src.includes('?') ? '&' : '?'}download=1`;
}

/** A readable file name (the server's Content-Disposition gives the same one). */
export function fileName(rec, index) {
  const words = promptOf(rec).toLowerCase().normalize('NFKC')
    .replace(/[^\p{L}\p{N}]+/gu, '-').replace(/^-+|-+$/g, '').split('-').filter(Boolean).slice(0, 6).join('-');
  const seed = imageSeed(rec, index);
  return `${words || 'zturbo'}${seed !== null ? `-${seed}` : ''}-${index + 1}.png`;
}

/** A1111-style infotext of one image (what "copy parameters" puts on the clipboard). */
export function infotext(rec, index) {
  const p = rec.params || {};
  const lines = [p.prompt || promptOf(rec)];
  if (p.negative_prompt) lines.push(`Negative prompt: ${p.negative_prompt}`);
  const kv = [];
  if (p.steps) kv.push(`Steps: ${p.steps}`);
  if (p.sampler) kv.push(`Sampler: ${p.sampler}`);
  if (p.cfg !== undefined) kv.push(`CFG scale: ${fmtCfg(p.cfg)}`);
  const seed = imageSeed(rec, index);
  if (seed !== null) kv.push(`Seed: ${seed}`);
  if (p.width && p.height) kv.push(`Size: ${p.width}x${p.height}`);
  if (p.model) kv.push(`Model: ${p.model}`);
  lines.push(kv.join(', '));
  return lines.join('\n');
}

function paramRows(rec, index) {
  const p = rec.params || {};
  const rows = [];
  const add = (k, val) => { if (val !== undefined && val !== null && val !== '') rows.push(el('dt', { text: t(k) }), el('dd', { text: String(val) })); };
  add('viewer.seed', imageSeed(rec, index));
  add('viewer.size', p.width && p.height ? `${p.width}×${p.height}` : null);
  add('viewer.steps', p.steps);
  const changed = p.cfg_requested !== undefined && p.cfg_requested !== null && Math.abs(p.cfg_requested - p.cfg) > 1e-6;
  add('viewer.cfg', p.cfg === undefined ? null : changed ? `${fmtCfg(p.cfg_requested)} → ${fmtCfg(p.cfg)}` : fmtCfg(p.cfg));
  add('viewer.model', p.model);
  add('viewer.sampler', p.sampler);
  add('viewer.memoryMode', requestedMode(rec) && p.memory_mode && requestedMode(rec) !== p.memory_mode ? `${requestedMode(rec)} → ${p.memory_mode}` : p.memory_mode);
  add('viewer.time', rec.timings && Number.isFinite(rec.timings.total_ms) ? fmtMs(rec.timings.total_ms) : null);
  add('viewer.peak', Number.isFinite(rec.peak_memory_bytes) ? fmtBytes(rec.peak_memory_bytes) : null);
  add('viewer.negative', p.negative_prompt);
  return rows;
}

function imageFigure(entry, label) {
  const prompt = promptOf(entry.rec);
  const img = el('img', {
    src: entry.src,
    alt: prompt ? t('gallery.alt', { prompt, n: entry.index + 1 }) : t('gallery.altNoPrompt', { n: entry.index + 1 }),
    width: entry.rec.params && entry.rec.params.width, height: entry.rec.params && entry.rec.params.height,
  });
  return el('figure', { class: 'viewer-figure' }, img, label ? el('figcaption', { text: label }) : null);
}

function render() {
  const e = current();
  if (!e) return;
  const { rec, index } = e;
  $('viewer-count').textContent = t('viewer.count', { i: v.pos + 1, n: v.list.length });
  $('viewer-prev').disabled = v.pos === 0;
  $('viewer-next').disabled = v.pos >= v.list.length - 1;
  const stage = $('viewer-stage');
  if (v.pinned) {
    stage.classList.add('compare');
    stage.replaceChildren(
      imageFigure(v.pinned, t('viewer.compareA', { seed: v.pinned.seed ?? '—' })),
      imageFigure(e, t('viewer.compareB', { seed: e.seed ?? '—' })));
  } else {
    stage.classList.remove('compare');
    stage.replaceChildren(imageFigure(e));
  }
  $('viewer-prompt').textContent = promptOf(rec);
  $('viewer-params').replaceChildren(...paramRows(rec, index));
  const enh = rec.enhancement;
  const added = enh && enh.added ? [...phraseChips(enh.added.prompt, false), ...phraseChips(enh.added.negative_prompt, true)] : [];
  $('viewer-enh').replaceChildren(...added);
  $('viewer-enh').hidden = !added.length;
  const dl = $('viewer-download');
  dl.href = downloadUrl(e.src);
  dl.setAttribute('download', fileName(rec, index));
  $('viewer-compare').textContent = v.pinned ? t('viewer.compareStop') : t('viewer.compare');
  $('viewer-compare').setAttribute('aria-pressed', String(!!v.pinned));
  $('viewer-input').hidden = !(hasFeature('img2img') && imageSlot('input'));
  $('viewer-control').hidden = !(hasFeature('controlnet') && imageSlot('control'));
  $('viewer').dataset.jobId = rec.id;
  $('viewer').dataset.index = String(index);
}

async function copyParams() {
  const e = current();
  if (!e) return;
  const text = infotext(e.rec, e.index);
  try {
    await navigator.clipboard.writeText(text);
    toast(t('viewer.copied'), 'ok', 2000);
  } catch {
    // No clipboard permission (plain http on another host): show it to copy by hand.
    $('viewer-copy-text').hidden = false;
    $('viewer-copy-text').value = text;
    $('viewer-copy-text').select();
  }
}

function useImage(slot) {
  const e = current();
  if (!e) return;
  const node = imageSlot(slot);
  if (!node) return;
  const detail = { src: e.src, jobId: e.rec.id, index: e.index, seed: e.seed, width: e.rec.params.width, height: e.rec.params.height };
  if ('value' in node && node.tagName !== 'DIV') node.value = e.src;
  node.dispatchEvent(new CustomEvent('zturbo:use-image', { bubbles: true, detail }));
  close();
  toast(t(slot === 'input' ? 'viewer.usedInput' : 'viewer.usedControl'), 'ok', 2500);
}

function download(rec, index) {
  const a = el('a', { href: downloadUrl(rec.images[index]), download: fileName(rec, index) });
  document.body.append(a);
  a.click();
  a.remove();
}

export function wireViewer() {
  const dlg = $('viewer');
  on('viewer:open', open);
  on('viewer:download', ({ rec, index }) => download(rec, index));
  on('history:deleted', () => {
    if (!dlg.open) return;
    v.list = flatImages();
    v.pos = Math.min(v.pos, v.list.length - 1);
    if (v.pos < 0) close(); else render();
  });
  $('viewer-close').addEventListener('click', close);
  $('viewer-prev').addEventListener('click', () => step(-1));
  $('viewer-next').addEventListener('click', () => step(1));
  dlg.addEventListener('keydown', (ev) => {
    if (ev.target.closest && ev.target.closest('textarea, input')) return;
    if (ev.key === 'ArrowLeft') { ev.preventDefault(); step(-1); }
    if (ev.key === 'ArrowRight') { ev.preventDefault(); step(1); }
  });
  // A click on the backdrop closes.
  dlg.addEventListener('click', (ev) => { if (ev.target === dlg) close(); });
  dlg.addEventListener('close', () => {
    v.pinned = null;
    $('viewer-copy-text').hidden = true;
    if (v.opener && v.opener.focus) v.opener.focus();
  });
  $('viewer-copy').addEventListener('click', copyParams);
  $('viewer-seed').addEventListener('click', () => { const e = current(); if (e && e.seed !== null) useSeed(e.seed); });
  $('viewer-use').addEventListener('click', () => { const e = current(); if (e) { restoreFrom(e.rec, e.index); close(); } });
  $('viewer-input').addEventListener('click', () => useImage('input'));
  $('viewer-control').addEventListener('click', () => useImage('control'));
  $('viewer-delete').addEventListener('click', () => { const e = current(); if (e) deleteRecord(e.rec.id); });
  $('viewer-compare').addEventListener('click', () => {
    if (v.pinned) {
      // Back to the image the comparison started from.
      const at = v.list.indexOf(v.pinned);
      v.pinned = null;
      if (at >= 0) v.pos = at;
    } else {
      // The current image stays on the left; ←/→ choose the one beside it (its neighbour first).
      v.pinned = current();
      if (v.pos < v.list.length - 1) v.pos++;
      else if (v.pos > 0) v.pos--;
    }
    render();
  });
  on('lang', () => { if (dlg.open) render(); });
  emit('viewer:ready');
}

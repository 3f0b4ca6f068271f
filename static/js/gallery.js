// Results: the hero (the running job's live preview and progress, else the newest image — the
// largest thing on screen) and the history gallery below it (newest first, infinite scroll,
// search by prompt, delete). Clicking any image opens the viewer.

import { $, el, fmtMs, fmtBytes, fmtCfg, isTouch } from './dom.js';
import { emit, on } from './store.js';
import { t, tn } from './i18n.js';
import { api } from './api.js';
import { restoreParams } from './form.js';
import { toast } from './toast.js';

const PAGE = 24;
/** Finished records shown, newest first (what the viewer browses). */
export const history = [];
const view = { query: '', next: null, loading: false, done: false, gen: 0 };

/** The seed of image `i` of a record: its own (records list them), else base seed + i. */
export function imageSeed(rec, i) {
  const seeds = rec.image_seeds;
  if (Array.isArray(seeds) && seeds[i] !== undefined && seeds[i] !== null) return seeds[i];
  const s = rec.params && rec.params.seed;
  if (s === undefined || s === null || !/^\d+$/.test(String(s))) return null;
  return Number(s) + i;
}

/** The memory mode the user asked for (not the one `auto` resolved to). */
export function requestedMode(rec) {
  return (rec.plan && rec.plan.requested_mode) || (rec.params && rec.params.memory_mode) || null;
}

export function promptOf(rec) {
  return (rec.enhancement && rec.enhancement.original_prompt) || (rec.params && rec.params.prompt) || '';
}

/** Every image of the shown history, newest first: what ←/→ walk through. */
export function flatImages() {
  const out = [];
  for (const rec of history) {
    (rec.images || []).forEach((src, index) => out.push({ rec, index, src, seed: imageSeed(rec, index) }));
  }
  return out;
}

export function restoreFrom(rec, index) {
  const opts = { memoryMode: requestedMode(rec) };
  if (index !== undefined && index !== null && (rec.images || []).length > 1) opts.seed = imageSeed(rec, index);
  restoreParams(rec.params, rec.enhancement, opts);
}

function insertRecord(rec) {
  const at = history.findIndex((r) => r.id === rec.id);
  if (at >= 0) history.splice(at, 1);
  const created = rec.created_at || 0;
  let pos = history.findIndex((r) => (r.created_at || 0) < created);
  if (pos < 0) pos = history.length;
  history.splice(pos, 0, rec);
  return pos;
}

function matchesQuery(rec) {
  if (!view.query) return true;
  const q = view.query.toLowerCase();
  return promptOf(rec).toLowerCase().includes(q) || String((rec.params && rec.params.prompt) || '').toLowerCase().includes(q);
}

/** Adds (or replaces) a finished job in the gallery. */
export function addResult(rec, opts = {}) {
  if (!matchesQuery(rec)) return;
  const gallery = $('gallery');
  const pos = insertRecord(rec);
  const fig = buildResult(rec, opts);
  const existing = gallery.querySelector(`figure[data-job-id="${CSS.escape(rec.id)}"]`);
  if (existing) existing.replaceWith(fig);
  else gallery.insertBefore(fig, gallery.children[pos] || null);
  updateCount();
  if (opts.fresh && rec.state === 'done') showInHero(rec, 0);
}

function updateCount() {
  const n = history.reduce((acc, r) => acc + (r.images || []).length, 0);
  $('gallery-empty').hidden = history.length > 0;
  $('gallery-empty').textContent = view.query ? t('gallery.noMatch') : t('gallery.empty');
  $('gallery-count').textContent = n ? t(n === 1 ? 'gallery.count.one' : 'gallery.count', { n }) : '';
}

function buildResult(rec, opts) {
  const p = rec.params || {};
  const images = rec.images || [];
  const failed = rec.state === 'failed';
  const prompt = promptOf(rec);
  const fig = el('figure', {
    class: `result${failed ? ' failed' : ''}${opts.fresh ? ' fresh' : ''}`,
    dataset: { jobId: rec.id, created: String(rec.created_at || 0) },
  });
  const thumbs = el('div', { class: `thumbs n${Math.max(1, images.length)}` });
  if (images.length) {
    images.forEach((src, i) => {
      const seed = imageSeed(rec, i);
      const alt = prompt ? t('gallery.alt', { prompt, n: i + 1 }) : t('gallery.altNoPrompt', { n: i + 1 });
      const img = el('img', {
        src, alt, width: p.width || undefined, height: p.height || undefined,
        loading: opts.fresh ? 'eager' : 'lazy', decoding: 'async',
      });
      img.addEventListener('error', () => img.classList.add('broken'), { once: true });
      const btn = el('button', {
        type: 'button', class: 'thumb',
        'aria-label': seed !== null && images.length > 1
          ? t('gallery.openSeed', { n: i + 1, seed, prompt: prompt.slice(0, 80) })
          : t('gallery.open', { n: i + 1, prompt: prompt.slice(0, 80) }),
        dataset: { index: String(i) },
      }, img, seed !== null && images.length > 1 ? el('span', { class: 'thumb-seed', text: String(seed) }) : null);
      btn.addEventListener('click', () => emit('viewer:open', { id: rec.id, index: i }));
      thumbs.append(btn);
    });
  } else {
    thumbs.append(el('div', { class: 'thumb-fail' },
      el('div', null, el('strong', { text: failed ? t('gallery.failed') : t('gallery.noImage') }))));
  }
  fig.append(thumbs);

  const meta = el('div', { class: 'r-meta' });
  if (p.width && p.height) meta.append(el('span', { text: `${p.width}×${p.height}` }));
  if (p.steps) meta.append(el('span', { text: tn('meta.step', 'meta.steps', p.steps) }));
  if (p.cfg !== undefined) {
    const changed = p.cfg_requested !== undefined && p.cfg_requested !== null && Math.abs(p.cfg_requested - p.cfg) > 1e-6;
    meta.append(el('span', {
      class: changed ? 'changed' : undefined,
      title: changed ? t('meta.cfgRequested', { cfg: fmtCfg(p.cfg_requested) }) : undefined,
      text: changed ? `CFG ${fmtCfg(p.cfg_requested)} → ${fmtCfg(p.cfg)}` : `CFG ${fmtCfg(p.cfg)}`,
    }));
  }
  const seeds = images.map((_, i) => imageSeed(rec, i)).filter((s) => s !== null);
  if (seeds.length === 1) meta.append(el('span', { class: 'seed', text: t('meta.seed', { seed: seeds[0] }) }));
  else if (seeds.length > 1) meta.append(el('span', { class: 'seed', text: t('meta.seeds', { seeds: seeds.join(', ') }) }));
  else if (p.seed !== undefined && p.seed !== null) meta.append(el('span', { class: 'seed', text: t('meta.seed', { seed: p.seed }) }));
  const tm = rec.timings;
  if (tm && Number.isFinite(tm.total_ms)) meta.append(el('span', { text: t('meta.in', { t: fmtMs(tm.total_ms) }) }));
  if (Number.isFinite(rec.peak_memory_bytes)) meta.append(el('span', { title: t('meta.peakTitle'), text: t('meta.peak', { bytes: fmtBytes(rec.peak_memory_bytes) }) }));

  const caption = el('figcaption', null,
    el('p', { class: 'r-prompt', title: p.prompt || prompt, text: prompt || t('queue.noPrompt') }),
    meta);
  if (failed) caption.append(el('p', { class: 'r-error', text: rec.error || t('gallery.failed') }));
  const del = el('button', {
    type: 'button', class: 'icon-btn r-delete', 'aria-label': t('gallery.delete', { prompt: prompt.slice(0, 60) }), title: t('gallery.deleteTitle'),
  }, '🗑');
  del.addEventListener('click', () => deleteRecord(rec.id));
  caption.append(del);
  fig.append(caption);
  return fig;
}

export async function deleteRecord(id) {
  try {
    await api(`/api/history/${encodeURIComponent(id)}`, { method: 'DELETE' });
  } catch (e) {
    if (e.status !== 404) { toast(t('gallery.deleteFailed', { error: e.message }), 'bad'); return; }
  }
  const at = history.findIndex((r) => r.id === id);
  if (at >= 0) history.splice(at, 1);
  const fig = $('gallery').querySelector(`figure[data-job-id="${CSS.escape(id)}"]`);
  if (fig) fig.remove();
  updateCount();
  if (hero.rec && hero.rec.id === id) showNewestInHero();
  emit('history:deleted', id);
  toast(t('gallery.deleted'), 'info', 2000);
}

/** Loads the next page of finished jobs (GET /api/history?before=…&q=…). */
async function loadMore() {
  if (view.loading || view.done) return;
  view.loading = true;
  const gen = view.gen;
  const qs = new URLSearchParams({ limit: String(PAGE) });
  if (view.next !== null) qs.set('before', String(view.next));
  if (view.query) qs.set('q', view.query);
  try {
    const { data } = await api(`/api/history?${qs}`);
    if (gen !== view.gen) return;
    for (const rec of (data && data.jobs) || []) addResult(rec, { fresh: false });
    view.next = data && data.next_before !== undefined ? data.next_before : null;
    view.done = view.next === null;
    if (!hero.rec && !hero.job) showNewestInHero();
  } catch {
    /* retried when the sentinel shows again */
  } finally {
    view.loading = false;
    updateCount();
    $('gallery-more').hidden = view.done;
    // Still room on screen: keep filling.
    if (!view.done && gen === view.gen && sentinelVisible()) setTimeout(loadMore, 50);
  }
}

function sentinelVisible() {
  const r = $('gallery-more').getBoundingClientRect();
  return r.top < window.innerHeight + 400 && r.bottom > -400;
}

export function resetHistory(query) {
  view.gen++;
  view.query = query;
  view.next = null;
  view.done = false;
  view.loading = false;
  history.length = 0;
  $('gallery').replaceChildren();
  updateCount();
  loadMore();
}

/* ---------------- hero ---------------- */

const hero = { rec: null, index: 0, job: null };

function heroPrompt(text) {
  $('hero-prompt').textContent = text || '';
  $('hero-prompt').title = text || '';
}

/** Shows a finished image in the hero. */
export function showInHero(rec, index = 0) {
  hero.rec = rec;
  hero.index = index;
  if (hero.job && !hero.job.terminal) return; // a running job keeps the hero
  hero.job = null;
  renderHeroImage();
}

function showNewestInHero() {
  const first = history.find((r) => r.state === 'done' && (r.images || []).length);
  hero.rec = first || null;
  hero.index = 0;
  if (!hero.job) renderHeroImage();
}

function renderHeroImage() {
  const img = $('hero-image');
  const rec = hero.rec;
  $('hero-progress').hidden = true;
  $('hero').classList.remove('running');
  if (!rec || !(rec.images || []).length) {
    img.hidden = true;
    img.removeAttribute('src');
    $('hero-empty').hidden = false;
    $('hero-actions').hidden = true;
    heroPrompt('');
    $('hero-meta').textContent = '';
    return;
  }
  const p = rec.params || {};
  const prompt = promptOf(rec);
  img.hidden = false;
  img.src = rec.images[hero.index];
  img.alt = prompt ? t('gallery.alt', { prompt, n: hero.index + 1 }) : t('gallery.altNoPrompt', { n: hero.index + 1 });
  if (p.width && p.height) { img.width = p.width; img.height = p.height; }
  img.dataset.jobId = rec.id;
  delete img.dataset.preview;
  $('hero-empty').hidden = true;
  $('hero-actions').hidden = false;
  heroPrompt(prompt);
  const seed = imageSeed(rec, hero.index);
  const bits = [];
  if (p.width && p.height) bits.push(`${p.width}×${p.height}`);
  if (p.steps) bits.push(tn('meta.step', 'meta.steps', p.steps));
  if (p.cfg !== undefined) bits.push(`CFG ${fmtCfg(p.cfg)}`);
  if (seed !== null) bits.push(t('meta.seed', { seed }));
  if (rec.timings && Number.isFinite(rec.timings.total_ms)) bits.push(t('meta.in', { t: fmtMs(rec.timings.total_ms) }));
  $('hero-meta').textContent = bits.join(' · ');
}

function renderHeroJob(job) {
  hero.job = job;
  const p = job.params || {};
  $('hero').classList.add('running');
  $('hero-progress').hidden = false;
  $('hero-empty').hidden = true;
  $('hero-actions').hidden = true;
  heroPrompt(p.prompt || '');
  const total = job.total || p.steps || 0;
  const pct = job.state === 'running' && total ? Math.min(100, (job.step / total) * 100) : 0;
  $('hero-progress-fill').style.width = `${pct}%`;
  const bar = $('hero-progress-bar');
  bar.setAttribute('aria-valuenow', String(Math.round(pct)));
  bar.setAttribute('aria-label', t('queue.progressOf', { prompt: (p.prompt || '').slice(0, 60) }));
  let text;
  if (job.state === 'queued') text = job.position ? t('queue.ahead', { n: job.position }) : t('queue.next');
  else if (job.loadingModel) text = t('queue.loadingModel', { name: job.loadingModel });
  else if (job.step > 0 && total) text = t('queue.step', { step: job.step, total });
  else text = t('queue.starting');
  if (job.stale) text = `${t('queue.stale')} · ${text}`;
  $('hero-progress-text').textContent = text;
  const img = $('hero-image');
  if (job.preview && job.preview.image) {
    img.hidden = false;
    if (img.getAttribute('src') !== job.preview.image) img.src = job.preview.image;
    img.alt = t('hero.previewAlt', { step: job.preview.step, prompt: (p.prompt || '').slice(0, 80) });
    img.dataset.preview = String(job.preview.step);
    img.dataset.jobId = job.id;
    if (p.width && p.height) { img.width = p.width; img.height = p.height; }
  } else if (!hero.rec) {
    img.hidden = true;
  }
  const bits = [];
  if (p.width && p.height) bits.push(`${p.width}×${p.height}`);
  if (p.steps) bits.push(tn('meta.step', 'meta.steps', p.steps));
  if (p.seed !== undefined && p.seed !== null) bits.push(t('meta.seed', { seed: p.seed }));
  $('hero-meta').textContent = bits.join(' · ');
}

function onJobUpdate(job) {
  if (job.terminal) {
    if (hero.job === job) {
      hero.job = null;
      if (job.state !== 'done') renderHeroImage();
    }
    return;
  }
  // The hero follows the running job, or the oldest queued one of this page.
  if (hero.job && hero.job !== job && !hero.job.terminal && hero.job.state === 'running') return;
  if (job.state === 'running' || !hero.job || hero.job.terminal) renderHeroJob(job);
}

function heroOpen() {
  if (hero.job || !hero.rec) return;
  emit('viewer:open', { id: hero.rec.id, index: hero.index });
}

export function wireGallery() {
  on('job:update', onJobUpdate);
  on('job:preview', (job) => { if (!hero.job || hero.job === job) renderHeroJob(job); });
  on('job:finished', ({ rec }) => {
    if (rec.state === 'done' || rec.state === 'failed') addResult(rec, { fresh: true });
  });
  on('job:submitted', () => {
    // On a phone the form fills the screen: bring the progress into view.
    if (window.matchMedia('(max-width: 900px)').matches) $('hero').scrollIntoView({ behavior: isTouch() ? 'auto' : 'smooth', block: 'start' });
  });
  on('lang', () => {
    const recs = [...history];
    $('gallery').replaceChildren(...recs.map((r) => buildResult(r, {})));
    updateCount();
    if (hero.job) renderHeroJob(hero.job); else renderHeroImage();
  });
  $('hero-image').addEventListener('click', heroOpen);
  $('hero-open').addEventListener('click', heroOpen);
  $('hero-use').addEventListener('click', () => hero.rec && restoreFrom(hero.rec, hero.index));
  $('hero-download').addEventListener('click', () => hero.rec && emit('viewer:download', { rec: hero.rec, index: hero.index }));
  let timer = 0;
  $('gallery-search').addEventListener('input', (e) => {
    clearTimeout(timer);
    timer = setTimeout(() => resetHistory(e.target.value.trim()), 250);
  });
  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadMore();
  }, { rootMargin: '400px' }).observe($('gallery-more'));
  $('gallery-more').addEventListener('click', loadMore);
  on('online', () => { if (!history.length) resetHistory(view.query); });
}

export function heroState() {
  return hero;
}


// zturbo web UI — the entry module. Plain ES modules served as they are (no build step, no
// dependencies), talking only to the same-origin API:
//   js/store.js    shared state + event bus      js/api.js      fetch wrapper, online/offline
//   js/i18n.js     languages (i18n.<lang>.js)    js/profile.js  the model's facts from /api/info
//   js/form.js     the form, hints, validation   js/enhance.js  the enhancement preview
//   js/jobs.js     submit, queue, job streams    js/gallery.js  hero + history gallery
//   js/viewer.js   the lightbox                  js/chart.js    the memory chart
//   js/models.js   picker, Models panel          js/pngmeta.js  PNG settings in / drag & drop
//   js/auth.js     the API key prompt            js/toast.js    toasts and the announcer
//   js/workers.js  a front door's remote workers (--broker)

import { $, el, fmtBytes, isMac, isTouch, stored } from './js/dom.js';
import { state, set, emit, on } from './js/store.js';
import { t, initLang, setLang, lang, LANGS } from './js/i18n.js';
import { api, setOnline } from './js/api.js';
import { applyInfoToForm, wireForm, updateAllHints, relabelForm, clearOneError, F } from './js/form.js';
import { mountImg2Img, img2imgInfo } from './js/img2img.js';
import { mountControl, controlInfo } from './js/control.js';
import { toast } from './js/toast.js';
import { wireEnhance } from './js/enhance.js';
import { wireJobs, trackJob, updateButtons, isTerminal } from './js/jobs.js';
import { wireGallery, resetHistory } from './js/gallery.js';
import { wireViewer } from './js/viewer.js';
import { wireChart } from './js/chart.js';
import { wireModels, loadModels, connectEvents } from './js/models.js';
import { wireDragDrop } from './js/pngmeta.js';
import { checkAuth } from './js/auth.js';
import { wireWorkers } from './js/workers.js';

function renderDemoHelp(text) {
  // `code` spans in backticks become <code>; everything else stays text.
  const parts = String(text || '').split('`');
  $('demo-help').replaceChildren(...parts.map((s, i) => (i % 2 ? el('code', { text: s }) : document.createTextNode(s))));
}

const DEMO_DISMISSED = 'zturbo.demo.dismissed';

function applyInfo(info, opts = {}) {
  const previous = state.info;
  set({ info });
  const m = info.model || {};
  $('version').textContent = info.version ? `v${info.version}` : '';
  const pill = $('model-pill');
  pill.textContent = `${m.name || '?'}${m.family ? ` · ${m.family}` : ''}`;
  pill.title = m.description || '';
  pill.classList.toggle('pill-demo', !!m.demo);
  if (info.device) {
    const dp = $('device-pill');
    dp.textContent = `${info.device.name || info.device.kind}${info.device.total_bytes ? ` · ${fmtBytes(info.device.total_bytes)}` : ''}`;
    dp.hidden = false;
  }
  $('demo-banner').hidden = !m.demo || stored.get(DEMO_DISMISSED) === m.name;
  if (m.demo) {
    renderDemoHelp(Number.isFinite(info.demo_download_bytes)
      ? t('demo.help', { size: fmtBytes(info.demo_download_bytes) })
      : info.demo_help || '');
  }
  const sameModel = previous && previous.model && previous.model.name === m.name;
  applyInfoToForm(info, { keepValues: opts.keepValues && sameModel });
  updateButtons();
  emit('info', info);
  document.documentElement.dataset.info = 'ready';
}

async function loadInfo(opts = {}) {
  for (let attempt = 0; ; attempt++) {
    try {
      const { data } = await api('/api/info');
      applyInfo(data || {}, opts);
      return;
    } catch {
      $('model-pill').textContent = t('offline.pill');
      await new Promise((r) => setTimeout(r, Math.min(5000, 1000 * (attempt + 1))));
    }
  }
}

/* ---------------- outages ---------------- */

let healthTimer = 0;

/** While offline: ask /api/health until the server answers (api() flips `online` back). */
function watchHealth() {
  clearTimeout(healthTimer);
  const tick = async () => {
    if (state.online) return;
    try {
      const res = await fetch('/api/health', { cache: 'no-store' });
      if (res.ok || res.status === 401) { setOnline(true); return; }
    } catch { /* still down */ }
    healthTimer = setTimeout(tick, 1000);
  };
  healthTimer = setTimeout(tick, 500);
}

function showOffline(reason) {
  const banner = $('offline-banner');
  banner.hidden = false;
  $('offline-text').textContent = reason || t('offline.unreachable');
  $('model-pill').textContent = t('offline.pill');
  document.documentElement.dataset.online = 'no';
  watchHealth();
}

async function backOnline() {
  $('offline-banner').hidden = true;
  document.documentElement.dataset.online = 'yes';
  // The server may have restarted with another model: read its facts again.
  await loadInfo({ keepValues: true });
}

/** A stream dropped: check whether the server is still there. */
async function checkServer() {
  try {
    const res = await fetch('/api/health', { cache: 'no-store' });
    if (!res.ok && res.status !== 401) throw new Error(String(res.status));
  } catch {
    setOnline(false, t('offline.unreachable'));
  }
}

/* ---------------- language ---------------- */

function wireLang() {
  const pick = $('lang-picker');
  pick.replaceChildren(...Object.entries(LANGS).map(([code, l]) => el('option', { value: code, text: l.name, lang: code })));
  pick.value = lang();
  pick.addEventListener('change', () => setLang(pick.value));
  on('lang', () => {
    pick.value = lang();
    relabelForm();
    updateButtons();
    $('shortcut-hint').textContent = isMac ? t('shortcut.mac') : t('shortcut.other');
    if (state.info) applyInfo(state.info, { keepValues: true });
  });
}

/* ---------------- history ---------------- */

async function loadActiveJobs() {
  try {
    const { data } = await api('/api/jobs?limit=200');
    const recs = (data && data.jobs) || [];
    // active jobs (e.g. after a reload) go to the queue, oldest first
    for (const rec of recs.filter((r) => !isTerminal(r.state)).reverse()) trackJob(rec);
  } catch {
    /* the poller and the outage path retry */
  }
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
  emit('form:changed', { field: 'size' });
}

async function main() {
  initLang();
  await checkAuth();
  wireForm();
  // Image to image, inpainting and LoRAs: their own module, mounted into the form.
  mountImg2Img({ api, toast, onSize: onInputSize });
  on('info', img2imgInfo);
  // ControlNet: its own module too, after the image-to-image section.
  mountControl({ api });
  on('info', controlInfo);
  wireEnhance();
  wireJobs();
  wireGallery();
  wireViewer();
  wireChart();
  wireModels();
  wireDragDrop();
  wireLang();
  // No keyboard-shortcut text on touch devices.
  $('shortcut-hint').textContent = isMac ? t('shortcut.mac') : t('shortcut.other');
  $('shortcut-hint').hidden = isTouch();
  $('demo-dismiss').addEventListener('click', () => {
    $('demo-banner').hidden = true;
    if (state.info && state.info.model) stored.set(DEMO_DISMISSED, state.info.model.name);
  });
  on('offline', showOffline);
  on('online', backOnline);
  on('stream:lost', checkServer);
  on('model:switched', () => loadInfo({ keepValues: true }));
  updateAllHints();
  await loadInfo();
  connectEvents();
  loadModels();
  wireWorkers();
  resetHistory('');
  loadActiveJobs();
}

main();

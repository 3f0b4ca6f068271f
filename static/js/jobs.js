// Jobs: submit, the queue panel (running job pinned on top, then the queued ones in order),
// one SSE stream per active job (progress, live previews, notices, the outcome), cancel one,
// cancel all queued, Esc, and the outage path (stale rows, resync on reconnect).

import { $, el, fmtMs, fmtBytes, stored } from './dom.js';
import { state, set, emit, on } from './store.js';
import { t, tn, localized } from './i18n.js';
import { api, ApiError, setOnline } from './api.js';
import { F, readForm, clearFieldErrors, showFieldError, showFormError, clearFormWarning } from './form.js';
import { excludedPhrases } from './enhance.js';
import { toast, announce } from './toast.js';

export const jobs = new Map(); // id -> job
const MAX_JOB_STREAMS = 2;     // keep browser connection slots free (HTTP/1.1 allows 6 per origin)
const POLL_MS = 2000;
let pollTimer = 0;
let retryTimer = 0;
let polling = false;

export function isTerminal(s) {
  return s === 'done' || s === 'failed' || s === 'cancelled';
}

function promptOf(job) {
  return job.params.prompt || t('queue.noPrompt');
}

function shortPrompt(job) {
  const p = promptOf(job);
  return p.length > 60 ? `${p.slice(0, 57)}…` : p;
}

export async function submit() {
  if (state.submitting || !state.info || !state.online) return;
  const wait = Math.ceil((state.retryUntil - Date.now()) / 1000);
  if (wait > 0) {
    showFormError(t('queue.full', { s: wait }), 'warn');
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
  if (body.enhance) {
    const ex = excludedPhrases();
    if (ex.length) body.enhance_exclude = ex;
  }
  if (state.model) body.model = state.model;
  set({ submitting: true });
  updateButtons();
  try {
    const { data } = await api('/api/jobs', { method: 'POST', body });
    if (!data || !data.id) throw new ApiError(0, null, t('queue.noId'), null);
    const job = trackJob({
      id: data.id,
      state: 'queued',
      position: data.position ?? null,
      step: 0,
      total_steps: body.steps,
      params: { ...body },
      created_at: Date.now(),
    });
    emit('job:submitted', job);
    // The record has what the server resolved (a random seed): the row shows it.
    api(`/api/jobs/${encodeURIComponent(job.id)}`).then(({ data: rec }) => {
      if (rec && !job.terminal && !isTerminal(rec.state)) mergeRecord(job, rec);
    }).catch(() => { /* the stream and the poller carry on */ });
  } catch (e) {
    if (e.status === 422) {
      const input = showFieldError(e.field, localized(e));
      if (input) input.focus();
    } else if (e.status === 429) {
      const ra = e.headers && e.headers.get('Retry-After');
      let secs = Number(ra);
      if (!Number.isFinite(secs)) {
        const when = Date.parse(ra || '');
        secs = Number.isFinite(when) ? Math.max(1, Math.round((when - Date.now()) / 1000)) : 5;
      }
      startRetryCountdown(Math.max(1, Math.ceil(secs)));
    } else {
      showFormError(localized(e) || t('queue.submitFailed'));
    }
  } finally {
    set({ submitting: false });
    updateButtons();
  }
}

function startRetryCountdown(secs) {
  set({ retryUntil: Date.now() + secs * 1000 });
  clearInterval(retryTimer);
  const tick = () => {
    const left = Math.ceil((state.retryUntil - Date.now()) / 1000);
    if (left <= 0) {
      clearInterval(retryTimer);
      clearFormWarning();
      updateButtons();
      return;
    }
    showFormError(t('queue.full', { s: left }), 'warn');
    updateButtons();
  };
  tick();
  retryTimer = setInterval(tick, 500);
}

export function activeJobs() {
  return [...jobs.values()].filter((j) => !j.terminal).sort((a, b) => a.created - b.created);
}

export function runningJob() {
  return activeJobs().find((j) => j.state === 'running') || null;
}

export function updateButtons() {
  const waiting = state.retryUntil > Date.now();
  F.generate.disabled = !state.info || state.submitting || waiting || !state.online;
  const active = activeJobs();
  F.cancel.disabled = !active.length || !state.online;
  const queued = active.filter((j) => j.state === 'queued').length;
  const all = $('cancel-all');
  all.hidden = queued < 1;
  all.disabled = !state.online;
  all.textContent = t('queue.cancelAll', { n: queued });
  const running = active.find((j) => j.state === 'running');
  document.title = running && running.total ? `[${running.step}/${running.total}] zturbo` : 'zturbo';
  updateMiniProgress(running || active[0] || null);
}

/** Adds a job to the panel (no-op when known) and starts following it. */
export function trackJob(rec) {
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
    notices: [...(rec.notices || [])],
    es: null,
    streamFailures: 0,
    terminal: false,
    stale: false,
    li: null,
    preview: null,
  };
  jobs.set(job.id, job);
  buildQueueItem(job);
  renderJob(job);
  pumpStreams();
  ensurePolling();
  updateButtons();
  announce(t('announce.queued', { prompt: shortPrompt(job) }));
  return job;
}

function buildQueueItem(job) {
  const prompt = promptOf(job);
  const stateBadge = el('span', { class: 'state' });
  const cancelBtn = el('button', {
    type: 'button', class: 'small-btn', 'aria-label': t('queue.cancelJob', { prompt: shortPrompt(job) }), text: t('queue.cancel'),
  });
  cancelBtn.addEventListener('click', () => cancelJob(job));
  const meta = el('div', { class: 'job-meta' });
  const status = el('div', { class: 'job-status' });
  const bar = el('div', {
    class: 'bar', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100',
    'aria-label': t('queue.progressOf', { prompt: shortPrompt(job) }),
  }, el('span'));
  const li = el('li', { class: 'job', dataset: { jobId: job.id } },
    el('div', { class: 'job-title', title: prompt, text: prompt }),
    el('div', { class: 'job-side' }, stateBadge, cancelBtn),
    meta,
    status,
    bar);
  job.li = li;
  job.ui = { stateBadge, cancelBtn, meta, status, bar };
  $('queue').append(li);
  $('queue-empty').hidden = true;
}

/** Running first, then queued by position (or age), then the finished ones lingering. */
function orderQueue() {
  const list = $('queue');
  const rank = (j) => (j.state === 'running' ? 0 : j.terminal ? 2 : 1);
  const sorted = [...jobs.values()].filter((j) => j.li).sort((a, b) => rank(a) - rank(b)
    || (a.state === 'queued' && b.state === 'queued' ? (a.position ?? 1e9) - (b.position ?? 1e9) : 0)
    || a.created - b.created);
  sorted.forEach((j, i) => {
    if (list.children[i] !== j.li) list.insertBefore(j.li, list.children[i] || null);
  });
}

function stateLabel(job) {
  if (job.cancelling && !job.terminal) return t('state.cancelling');
  return t(`state.${job.state}`);
}

export function renderJob(job) {
  if (!job.ui) return;
  const { stateBadge, cancelBtn, meta, status, bar } = job.ui;
  stateBadge.className = `state state-${job.state}`;
  stateBadge.textContent = stateLabel(job);
  cancelBtn.hidden = job.terminal;
  cancelBtn.disabled = !!job.cancelling || !state.online;
  job.li.classList.toggle('stale', job.stale && !job.terminal);
  job.li.classList.toggle('running', job.state === 'running');

  const p = job.params;
  const m = [];
  if (p.seed !== undefined && p.seed !== null) m.push(t('meta.seed', { seed: p.seed }));
  if (p.width && p.height) m.push(`${p.width}×${p.height}`);
  if (p.steps) m.push(tn('meta.step', 'meta.steps', p.steps));
  if (p.batch > 1) m.push(t('meta.batch', { n: p.batch }));
  if (p.model) m.push(p.model);
  meta.replaceChildren(...m.map((x) => el('span', { text: x })));

  const parts = [];
  bar.className = 'bar';
  const fill = bar.firstElementChild;
  if (job.state === 'queued') {
    parts.push(job.position === null || job.position === undefined
      ? t('queue.waiting')
      : job.position === 0 ? t('queue.next') : t('queue.ahead', { n: job.position }));
    bar.classList.add('indeterminate');
    fill.style.width = '';
    bar.removeAttribute('aria-valuenow');
  } else if (job.state === 'running') {
    const total = job.total || p.steps || 0;
    if (job.loadingModel) parts.push(t('queue.loadingModel', { name: job.loadingModel }));
    else if (job.step > 0 && total) parts.push(t('queue.step', { step: job.step, total }));
    else if (!job.phase) parts.push(t('queue.starting'));
    if (job.phase) parts.push(t(`phase.${job.phase}`));
    if (job.elapsed !== null) parts.push(fmtMs(job.elapsed));
    const pct = total ? Math.min(100, (job.step / total) * 100) : 0;
    fill.style.width = `${pct}%`;
    bar.setAttribute('aria-valuenow', String(Math.round(pct)));
  } else if (job.state === 'done') {
    bar.classList.add('done');
    fill.style.width = '';
    if (job.totalMs) parts.push(fmtMs(job.totalMs));
    if (Number.isFinite(job.peak)) parts.push(t('meta.peak', { bytes: fmtBytes(job.peak) }));
  } else if (job.state === 'failed') {
    bar.classList.add('failed');
    fill.style.width = '';
  } else if (job.state === 'cancelled') {
    fill.style.width = '0%';
  }
  const children = parts.map((x) => el('span', { text: x }));
  if (job.stale && !job.terminal) children.unshift(el('span', { class: 'job-stale', text: t('queue.stale') }));
  if (job.notices.some((n) => n.kind === 'resumed') && !job.terminal) {
    children.push(el('span', { class: 'job-resumed', text: t('queue.resumed') }));
  }
  if (job.state === 'failed' && job.error) children.unshift(el('span', { class: 'job-error', text: job.error }));
  status.replaceChildren(...children);
  orderQueue();
  emit('job:update', job);
}

/** Opens SSE streams for the oldest active jobs, at most MAX_JOB_STREAMS at a time. */
function pumpStreams() {
  if (!state.online) return;
  const active = activeJobs();
  let open = active.filter((j) => j.es).length;
  for (const job of active) {
    if (open >= MAX_JOB_STREAMS) break;
    if (!job.es && !job.reopenTimer) {
      openStream(job);
      open++;
    }
  }
}

/** The SSE `failed` event carries the API's error shape {field, message, i18n?}; records carry text. */
function errorText(e) {
  if (e && typeof e === 'object') return localized(e) || (e.field ? `${e.field}: invalid` : 'failed');
  return e ? String(e) : '';
}

function parse(ev) {
  try { return ev.data ? JSON.parse(ev.data) : {}; } catch { return {}; }
}

const PREVIEW_KEY = 'zturbo.preview';

/** This page's choice: live previews on the job streams (kept in localStorage). */
export function previewsWanted() {
  return stored.get(PREVIEW_KEY, '1') === '1' && !(state.info && state.info.preview === false);
}

function openStream(job) {
  const q = previewsWanted() ? '' : '?preview=0';
  const es = new EventSource(`/api/jobs/${encodeURIComponent(job.id)}/events${q}`);
  job.es = es;
  const listen = (name, fn) => es.addEventListener(name, (ev) => {
    if (job.es !== es) return;
    if (job.stale) { job.stale = false; }
    setOnline(true);
    fn(parse(ev));
  });
  listen('queued', (d) => {
    job.state = 'queued';
    if (d.position !== undefined) job.position = d.position;
    renderJob(job);
    updateButtons();
  });
  listen('started', () => {
    if (job.state !== 'running') announce(t('announce.started', { prompt: shortPrompt(job) }));
    job.state = 'running';
    job.position = null;
    renderJob(job);
    updateButtons();
  });
  listen('model', (d) => {
    job.loadingModel = d.state === 'loading' ? d.name : null;
    if (d.state === 'loaded') emit('model:switched', d);
    if (d.state === 'failed') toast(d.error || t('model.switchFailed', { name: d.name }), 'bad', 8000);
    renderJob(job);
  });
  listen('progress', (d) => {
    job.state = 'running';
    job.loadingModel = null;
    if (Number.isFinite(d.step)) job.step = d.step;
    if (Number.isFinite(d.total)) job.total = d.total;
    if (Number.isFinite(d.elapsed_ms)) job.elapsed = d.elapsed_ms;
    job.streamFailures = 0;
    renderJob(job);
    updateButtons();
  });
  listen('preview', (d) => {
    if (typeof d.image !== 'string' || !d.image.startsWith('data:image/')) return;
    job.preview = { step: d.step, image: d.image };
    emit('job:preview', job);
  });
  listen('notice', (d) => {
    if (!job.notices.some((n) => n.kind === d.kind && n.message === d.message)) job.notices.push(d);
    const text = localized(d);
    if (text) toast(text, d.kind === 'black_retry' || d.kind === 'cfg_clamped' ? 'warn' : 'info');
    renderJob(job);
  });
  listen('done', (d) => finalize(job, 'done', d));
  listen('failed', (d) => finalize(job, 'failed', d));
  listen('cancelled', (d) => finalize(job, 'cancelled', d));
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
      dropJob(job, t('queue.unknownJob'));
      return;
    }
    if (e.status === 0) {
      // The server is gone: the outage path reopens everything when it is back.
      markStale();
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
  if (Array.isArray(rec.notices)) {
    for (const n of rec.notices) {
      if (!job.notices.some((m) => m.kind === n.kind && m.message === n.message)) job.notices.push(n);
    }
  }
  job.stale = false;
  renderJob(job);
  updateButtons();
}

async function finalize(job, finalState, eventData, record) {
  if (job.terminal) return;
  job.terminal = true;
  job.stale = false;
  if (job.es) { job.es.close(); job.es = null; }
  clearTimeout(job.reopenTimer);
  job.state = finalState;
  if (finalState === 'failed' && eventData && eventData.error) job.error = errorText(eventData.error);
  if (eventData && Number.isFinite(eventData.peak_memory_bytes)) job.peak = eventData.peak_memory_bytes;
  renderJob(job);
  updateButtons();
  pumpStreams();

  let rec = record || null;
  for (let attempt = 0; attempt < 3 && !rec; attempt++) {
    try {
      rec = (await api(`/api/jobs/${encodeURIComponent(job.id)}`)).data;
    } catch {
      await new Promise((r) => setTimeout(r, 400 * (attempt + 1)));
    }
  }
  if (!rec) {
    // Build what we know; the gallery can still show the images.
    rec = {
      id: job.id, state: finalState, params: job.params, images: (eventData && eventData.images) || [],
      notices: job.notices, timings: null, peak_memory_bytes: job.peak ?? null, error: job.error || null,
      enhancement: null, created_at: job.created,
    };
  }
  if (rec.state && isTerminal(rec.state)) job.state = rec.state;
  if (rec.error) job.error = rec.error;
  if (rec.timings) job.totalMs = rec.timings.total_ms;
  if (Number.isFinite(rec.peak_memory_bytes)) job.peak = rec.peak_memory_bytes;
  renderJob(job);
  emit('job:finished', { job, rec });

  if (job.state === 'done') {
    announce(t('announce.done', { prompt: shortPrompt(job) }));
  } else if (job.state === 'failed') {
    announce(t('announce.failed', { prompt: shortPrompt(job) }));
    toast(t('queue.failedToast', { error: rec.error || job.error || '?' }), 'bad', 7000);
  } else if (job.state === 'cancelled') {
    announce(t('announce.cancelled', { prompt: shortPrompt(job) }));
    toast(t('queue.cancelledToast'), 'info', 2500);
  }
  // Finished jobs leave the queue for the gallery (failures stay a little longer to be read).
  setTimeout(() => removeQueueItem(job), job.state === 'failed' ? 8000 : 1500);
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
    updateButtons();
  }, 500);
}

export async function cancelJob(job) {
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
    else toast(t('queue.cancelFailed', { error: e.message }), 'bad');
  }
}

/** Cancels the running job (Esc, the Cancel button), or the next queued one when none runs. */
export function cancelCurrent() {
  const active = activeJobs();
  const target = active.find((j) => j.state === 'running') || active[0];
  if (target) cancelJob(target);
  return !!target;
}

/** One call cancels every queued job (DELETE /api/jobs?state=queued); the running one goes on. */
export async function cancelAllQueued() {
  try {
    const { data } = await api('/api/jobs?state=queued', { method: 'DELETE' });
    const ids = (data && data.cancelled) || [];
    for (const id of ids) {
      const job = jobs.get(id);
      if (job && !job.terminal) finalize(job, 'cancelled', null);
    }
    toast(t('queue.cancelledAll', { n: ids.length }), 'info', 3000);
  } catch (e) {
    toast(t('queue.cancelFailed', { error: e.message }), 'bad');
  }
}

/** Jobs without an open stream are refreshed from GET /api/jobs every couple of seconds. */
function ensurePolling() {
  if (pollTimer) return;
  pollTimer = setInterval(() => {
    if (!state.online) return;
    const unstreamed = activeJobs().filter((j) => !j.es);
    if (!unstreamed.length) {
      if (!activeJobs().length) { clearInterval(pollTimer); pollTimer = 0; }
      return;
    }
    pollOnce();
  }, POLL_MS);
}

export async function pollOnce() {
  if (polling) return;
  polling = true;
  try {
    const { data } = await api('/api/jobs?limit=200');
    const recs = (data && data.jobs) || [];
    const byId = new Map(recs.map((r) => [r.id, r]));
    for (const job of activeJobs()) {
      const rec = byId.get(job.id);
      if (!rec) continue;
      if (isTerminal(rec.state)) finalize(job, rec.state, null, rec);
      else if (!job.es) mergeRecord(job, rec);
    }
    // Jobs queued elsewhere (another tab, the API) join the panel.
    for (const rec of recs.filter((r) => !isTerminal(r.state)).reverse()) trackJob(rec);
  } catch {
    /* next tick */
  } finally {
    polling = false;
  }
}

function markStale() {
  for (const job of activeJobs()) {
    job.stale = true;
    if (job.es) { job.es.close(); job.es = null; }
    clearTimeout(job.reopenTimer);
    job.reopenTimer = 0;
    renderJob(job);
  }
  updateButtons();
}

/** After an outage: read every job's record again, then reopen the streams. */
async function resync() {
  for (const job of activeJobs()) job.streamFailures = 0;
  await pollOnce();
  pumpStreams();
  updateButtons();
}

/* The sticky mini progress bar (phones): visible while a job is active and the hero is not. */
let heroInView = false;
let lastMiniJob = null;

function updateMiniProgress(job) {
  lastMiniJob = job;
  const box = $('mini-progress');
  if (!job || heroInView) { box.hidden = true; return; }
  box.hidden = false;
  const total = job.total || job.params.steps || 0;
  const pct = job.state === 'running' && total ? Math.min(100, (job.step / total) * 100) : 0;
  $('mini-progress-fill').style.width = `${pct}%`;
  $('mini-progress-bar').setAttribute('aria-valuenow', String(Math.round(pct)));
  $('mini-progress-bar').setAttribute('aria-label', t('queue.progressOf', { prompt: shortPrompt(job) }));
  $('mini-progress-text').textContent = job.state === 'running'
    ? (job.step > 0 && total ? t('queue.step', { step: job.step, total }) : t('queue.starting'))
    : t('state.queued');
}

export function wireJobs() {
  F.form.addEventListener('submit', (e) => {
    e.preventDefault();
    submit();
  });
  document.addEventListener('keydown', (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === 'Enter') {
      e.preventDefault();
      submit();
    } else if (e.key === 'Escape' && !document.querySelector('dialog[open]') && !e.defaultPrevented) {
      const running = runningJob();
      if (running) {
        e.preventDefault();
        cancelJob(running);
        toast(t('queue.escCancel'), 'info', 2000);
      }
    }
  });
  F.cancel.addEventListener('click', cancelCurrent);
  $('cancel-all').addEventListener('click', cancelAllQueued);
  const toggle = $('preview-toggle');
  toggle.checked = stored.get(PREVIEW_KEY, '1') === '1';
  toggle.addEventListener('change', () => {
    stored.set(PREVIEW_KEY, toggle.checked ? '1' : '0');
    // Streams opened from now on follow the choice; open ones are reopened.
    for (const job of activeJobs()) {
      if (job.es) { job.es.close(); job.es = null; }
      if (!toggle.checked) { job.preview = null; emit('job:update', job); }
    }
    pumpStreams();
  });
  on('info', (info) => { $('preview-toggle-row').hidden = info.preview === false; });
  $('mini-progress').addEventListener('click', () => $('hero').scrollIntoView({ behavior: 'smooth', block: 'start' }));
  // The sticky bar only stands in for the hero's own progress while that is off screen.
  new IntersectionObserver((entries) => {
    heroInView = entries.some((e) => e.isIntersecting);
    updateMiniProgress(lastMiniJob);
  }, { threshold: 0.3 }).observe($('hero-progress').parentElement);
  on('offline', markStale);
  on('online', resync);
  on('lang', () => {
    for (const job of jobs.values()) {
      if (!job.ui) continue;
      job.ui.cancelBtn.textContent = t('queue.cancel');
      job.ui.cancelBtn.setAttribute('aria-label', t('queue.cancelJob', { prompt: shortPrompt(job) }));
      job.ui.bar.setAttribute('aria-label', t('queue.progressOf', { prompt: shortPrompt(job) }));
      renderJob(job);
    }
    updateButtons();
  });
  on('state', (changed) => { if ('online' in changed) { for (const j of jobs.values()) renderJob(j); updateButtons(); } });
  // A phase change seen on the memory stream shows in the job's row.
  on('job:phase', ({ id, phase }) => {
    const job = jobs.get(id);
    if (job && !job.terminal && job.phase !== phase) {
      job.phase = phase;
      if (job.state === 'queued') job.state = 'running';
      renderJob(job);
    }
  });
}

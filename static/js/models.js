// Models: the checkpoint picker (local models; a switch happens in the worker between jobs and
// reports over /api/events), and the Models panel (catalog, local folders, downloads with a
// confirmation above 1 GB, offline errors as one sentence plus details).

import { $, el, fmtBytes, parseData } from './dom.js';
import { state, emit, on } from './store.js';
import { t } from './i18n.js';
import { api } from './api.js';
import { toast } from './toast.js';

const CONFIRM_ABOVE_BYTES = 1e9;
let listing = [];
const pulls = new Map();

function stateText(s) {
  return t(`models.state.${s}`);
}

export async function loadModels() {
  const list = $('models');
  try {
    const { data } = await api('/api/models');
    listing = (data && data.models) || [];
    renderPicker();
    if (!listing.length) {
      list.replaceChildren(el('li', { class: 'muted', text: t('models.none') }));
      return;
    }
    list.replaceChildren(...listing.map((mdl) => {
      const canPull = mdl.state === 'not_downloaded' && !!mdl.repo;
      return el('li', { dataset: { model: mdl.name } },
        el('span', { class: 'model-name', text: mdl.name }),
        el('span', { class: `state state-${mdl.state}`, text: stateText(mdl.state) }),
        mdl.demo ? el('span', { class: 'state state-demo', text: t('models.randomWeights') }) : null,
        canPull ? el('button', {
          type: 'button', class: 'small-btn pull-btn', text: t('models.download'),
          'aria-label': t('models.downloadLabel', { name: mdl.name, size: mdl.size_bytes ? fmtBytes(mdl.size_bytes) : '?' }),
          onclick: () => askPull(mdl),
        }) : null,
        el('span', {
          class: 'model-meta',
          title: mdl.repo || '',
          text: [mdl.family, mdl.size_bytes ? fmtBytes(mdl.size_bytes) : null, mdl.repo].filter(Boolean).join(' · '),
        }));
    }));
    // A download started earlier (or from another tab) is still running: follow it.
    if (data && data.pull && data.pull.name) followPull(data.pull.name);
  } catch (e) {
    list.replaceChildren(el('li', { class: 'muted', text: t('models.listFailed', { error: e.message }) }));
  }
}

/* ---------------- checkpoint picker ---------------- */

function renderPicker() {
  const pick = $('model-picker');
  const local = listing.filter((m) => m.state === 'loaded' || m.state === 'on_disk');
  const loaded = state.info && state.info.model ? state.info.model.name : null;
  if (!local.length && loaded) local.push({ name: loaded, state: 'loaded' });
  pick.replaceChildren(...local.map((m) => el('option', {
    value: m.name,
    text: `${m.name}${m.family ? ` · ${m.family}` : ''}${m.demo ? ` · ${t('models.demoShort')}` : ''}`,
  })));
  const selected = state.info && state.info.model && (state.info.model.selected || state.info.model.name);
  if (selected) pick.value = selected;
  pick.disabled = local.length < 2 || !state.online;
  pick.dataset.loaded = loaded || '';
}

async function switchModel(name) {
  const pick = $('model-picker');
  pick.disabled = true;
  $('model-status').textContent = t('models.switching', { name });
  try {
    const { data } = await api('/api/model', { method: 'POST', body: { name } });
    // /api/events reports the switch; should that stream be reconnecting, the facts are polled.
    if (data && data.state !== 'after_queued') watchSwitch(name);
  } catch (e) {
    $('model-status').textContent = '';
    toast(t('models.switchFailed', { name, error: e.message }), 'bad', 8000);
    renderPicker();
  }
}

function watchSwitch(name) {
  const until = Date.now() + 120_000;
  const tick = async () => {
    const shown = state.info && state.info.model ? state.info.model.name : null;
    if (shown === name || Date.now() > until) return;
    try {
      const { data } = await api('/api/info');
      if (data && data.model && data.model.name === name) {
        emit('model:switched', { state: 'loaded', name });
        return;
      }
    } catch { /* the outage path takes over */ }
    setTimeout(tick, 1000);
  };
  setTimeout(tick, 1000);
}

/** Server-wide events: model switches (from this page, another tab or the A1111 API). */
let events = null;
export function connectEvents() {
  if (events) events.close();
  const es = new EventSource('/api/events');
  events = es;
  let switching = false;
  es.addEventListener('model', (ev) => {
    const d = parseData(ev);
    const status = $('model-status');
    const shown = state.info && state.info.model ? state.info.model.name : null;
    if (d.state === 'loading') {
      switching = true;
      status.textContent = t('models.switching', { name: d.name });
      $('model-picker').disabled = true;
    } else if (d.state === 'loaded') {
      status.textContent = '';
      // The first event says what is loaded now; a toast only for a switch seen happening.
      if (switching) toast(t('models.switched', { name: d.name }), 'ok', 3000);
      switching = false;
      if (d.name !== shown) emit('model:switched', d);
      else renderPicker();
    } else if (d.state === 'failed') {
      switching = false;
      status.textContent = '';
      // One sentence; the file at fault is in the error.
      toast(t('models.switchFailed', { name: d.name, error: d.error || '' }), 'bad', 12000);
      renderPicker();
    }
  });
  es.addEventListener('error', () => {
    if (events !== es) return;
    es.close();
    events = null;
    emit('stream:lost', 'events');
    setTimeout(() => { if (!events && state.online) connectEvents(); }, 2000);
  });
}

/* ---------------- downloads ---------------- */

function askPull(mdl) {
  if (!mdl.size_bytes || mdl.size_bytes <= CONFIRM_ABOVE_BYTES) {
    startPull(mdl.name);
    return;
  }
  const dlg = $('confirm-dialog');
  $('confirm-title').textContent = t('models.confirmTitle', { name: mdl.name });
  $('confirm-text').textContent = t('models.confirmText', { name: mdl.name, size: fmtBytes(mdl.size_bytes) });
  $('confirm-ok').textContent = t('models.confirmOk', { size: fmtBytes(mdl.size_bytes) });
  dlg.returnValue = '';
  dlg.onclose = () => {
    if (dlg.returnValue === 'ok') startPull(mdl.name);
  };
  dlg.showModal();
  $('confirm-cancel').focus();
}

function pullRow(name) {
  const li = document.querySelector(`#models li[data-model="${CSS.escape(name)}"]`);
  if (!li) return null;
  let box = li.querySelector('.pull-progress');
  if (!box) {
    box = el('div', { class: 'pull-progress' },
      el('div', { class: 'bar', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-label': t('models.downloading', { name }) }, el('span')),
      el('div', { class: 'pull-text muted' }),
      el('details', { class: 'pull-detail', hidden: true }, el('summary', { text: t('models.details') }), el('pre')));
    li.append(box);
  }
  const btn = li.querySelector('.pull-btn');
  if (btn) btn.disabled = true;
  return {
    li, bar: box.querySelector('.bar'), fill: box.querySelector('.bar > span'), text: box.querySelector('.pull-text'),
    detail: box.querySelector('.pull-detail'), btn,
  };
}

async function startPull(name) {
  try {
    await api(`/api/models/${encodeURIComponent(name)}/pull`, { method: 'POST' });
    followPull(name);
  } catch (e) {
    toast(t('models.pullNotStarted', { name, error: e.message }), 'bad', 7000);
  }
}

const OFFLINE = /dns|resolve|lookup|connect|offline|network|unreachable|timed? ?out|no route/i;

function followPull(name) {
  if (pulls.has(name)) return;
  const row = pullRow(name);
  if (!row) return;
  row.bar.classList.add('indeterminate');
  row.text.textContent = t('models.starting');
  const es = new EventSource(`/api/models/${encodeURIComponent(name)}/pull/events`);
  pulls.set(name, es);
  const end = () => { es.close(); pulls.delete(name); };
  es.addEventListener('progress', (ev) => {
    const d = parseData(ev);
    const file = `${d.index + 1}/${d.count} ${d.file}`;
    if (d.total_bytes) {
      const pct = Math.min(100, Math.round((d.bytes / d.total_bytes) * 100));
      row.bar.classList.remove('indeterminate');
      row.fill.style.width = `${pct}%`;
      row.bar.setAttribute('aria-valuenow', String(pct));
      row.text.textContent = t('models.progress', { file, done: fmtBytes(d.bytes), total: fmtBytes(d.total_bytes) });
    } else {
      row.bar.classList.add('indeterminate');
      row.text.textContent = t('models.progressUnknown', { file, done: fmtBytes(d.bytes) });
    }
  });
  es.addEventListener('done', () => {
    end();
    row.bar.classList.remove('indeterminate');
    row.bar.classList.add('done');
    row.text.textContent = t('models.downloaded');
    toast(t('models.downloadedToast', { name }), 'info', 6000);
    setTimeout(loadModels, 1200);
  });
  es.addEventListener('failed', (ev) => {
    end();
    const raw = String(parseData(ev).error || '');
    row.bar.classList.remove('indeterminate');
    row.bar.classList.add('failed');
    // One sentence; the raw error (DNS, TLS, HTTP) behind "details".
    row.text.textContent = OFFLINE.test(raw) ? t('models.offline') : t('models.pullFailed');
    row.detail.hidden = !raw;
    row.detail.querySelector('pre').textContent = raw;
    if (row.btn) { row.btn.disabled = false; row.btn.textContent = t('models.retry'); }
  });
  es.onerror = () => {
    // The server closes the stream after the last event; anything else is a lost connection.
    if (es.readyState === EventSource.CLOSED && pulls.has(name)) {
      end();
      row.text.textContent = t('models.lost');
      if (row.btn) row.btn.disabled = false;
    }
  };
}

export function wireModels() {
  $('model-picker').addEventListener('change', (e) => {
    const name = e.target.value;
    if (name && name !== e.target.dataset.loaded) switchModel(name);
  });
  on('model:switched', () => loadModels());
  on('lang', () => loadModels());
  on('state', (c) => { if ('online' in c) renderPicker(); });
  on('online', () => { loadModels(); if (!events) connectEvents(); });
}

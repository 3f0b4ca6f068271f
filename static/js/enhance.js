// The enhancement preview: what the server's prompt rules would add to this prompt with the
// form's own CFG and steps (debounced POST /api/enhance), and the phrases the user removed.
// The box keeps its height whether enhancement is on or off, so toggling never moves the form.

import { $, el } from './dom.js';
import { state, on } from './store.js';
import { t, localized } from './i18n.js';
import { api } from './api.js';
import { F } from './form.js';

const preview = { timer: 0, ctrl: null, seq: 0, last: null };

/** Removed phrases per prompt (kept for the session and across reloads). */
const REMOVED_KEY = 'zturbo.enhance.removed';
const removed = new Map(loadRemoved());

function loadRemoved() {
  try {
    const raw = JSON.parse(sessionStorage.getItem(REMOVED_KEY) || '[]');
    return Array.isArray(raw) ? raw.filter((e) => Array.isArray(e) && Array.isArray(e[1])).map(([k, v]) => [k, new Set(v)]) : [];
  } catch { return []; }
}

function saveRemoved() {
  try {
    const entries = [...removed.entries()].slice(-50).map(([k, v]) => [k, [...v]]);
    sessionStorage.setItem(REMOVED_KEY, JSON.stringify(entries));
  } catch { /* not kept */ }
}

function promptKey() {
  return F.prompt.value.trim();
}

/** The phrases the user removed for the current prompt (sent with the job). */
export function excludedPhrases() {
  const set = removed.get(promptKey());
  return set ? [...set] : [];
}

function removePhrase(phrase) {
  const key = promptKey();
  if (!removed.has(key)) removed.set(key, new Set());
  removed.get(key).add(phrase);
  saveRemoved();
  schedule(true);
}

function restorePhrase(phrase) {
  const set = removed.get(promptKey());
  if (set) set.delete(phrase);
  saveRemoved();
  schedule(true);
}

export function schedule(immediate = false) {
  clearTimeout(preview.timer);
  const box = $('enhance-preview');
  if (!promptKey() || !state.info) {
    if (preview.ctrl) preview.ctrl.abort();
    renderEmpty();
    return;
  }
  box.classList.add('stale');
  preview.timer = setTimeout(run, immediate ? 0 : 400);
}

function renderEmpty() {
  const box = $('enhance-preview');
  box.classList.remove('stale');
  $('enhance-chips').replaceChildren();
  $('enhance-neg-chips').replaceChildren();
  $('enhance-removed').replaceChildren();
  $('enhance-advice').replaceChildren(el('li', { class: 'info', text: t('enhance.empty') }));
  $('enhance-title').textContent = t(F.enhance.checked ? 'enhance.title' : 'enhance.title.off');
}

async function run() {
  if (preview.ctrl) preview.ctrl.abort();
  const ctrl = new AbortController();
  preview.ctrl = ctrl;
  const seq = ++preview.seq;
  const body = { prompt: promptKey() };
  const neg = F.negative.value.trim();
  if (neg) body.negative_prompt = neg;
  // Every parameter the advice depends on, so it says what the form's own hints say.
  const cfg = Number(F.cfg.value);
  const steps = Number(F.steps.value);
  if (Number.isFinite(cfg)) body.cfg = Math.round(cfg * 100) / 100;
  if (Number.isInteger(steps) && steps > 0) body.steps = steps;
  const ex = excludedPhrases();
  if (ex.length) body.exclude = ex;
  try {
    const { data } = await api('/api/enhance', { method: 'POST', body, signal: ctrl.signal });
    if (seq !== preview.seq) return;
    preview.last = data || {};
    render(preview.last);
  } catch (e) {
    if (e && e.name === 'AbortError') return;
    if (seq === preview.seq) {
      $('enhance-preview').classList.remove('stale');
      $('enhance-advice').replaceChildren(el('li', { class: 'warn', text: localized(e) }));
    }
  }
}

function chip(phrase, neg) {
  return el('span', { class: neg ? 'chip chip-neg' : 'chip', title: phrase },
    el('span', { text: `${neg ? '−' : '+'} ${phrase}` }),
    el('button', {
      type: 'button', class: 'chip-x', 'aria-label': t('enhance.remove', { phrase }),
      onclick: () => removePhrase(phrase),
    }, '×'));
}

/** Read-only chips (gallery, viewer). */
export function phraseChips(list, neg) {
  return (list || []).map((p) => el('span', { class: neg ? 'chip chip-neg' : 'chip', title: p, text: `${neg ? '−' : '+'} ${p}` }));
}

function render(data) {
  const box = $('enhance-preview');
  const on = F.enhance.checked;
  $('enhance-title').textContent = t(on ? 'enhance.title' : 'enhance.title.off');
  const added = (on && data.added) || {};
  const pos = added.prompt || [];
  const neg = added.negative_prompt || [];
  $('enhance-chips').replaceChildren(...(pos.length ? [el('span', { class: 'chip-label', text: t('enhance.adds') }), ...pos.map((p) => chip(p, false))] : []));
  $('enhance-neg-chips').replaceChildren(...(neg.length ? [el('span', { class: 'chip-label', text: t('enhance.negative') }), ...neg.map((p) => chip(p, true))] : []));
  const gone = on ? excludedPhrases() : [];
  $('enhance-removed').replaceChildren(...(gone.length ? [
    el('span', { class: 'chip-label', text: t('enhance.removed') }),
    ...gone.map((p) => el('button', { type: 'button', class: 'chip chip-removed', title: t('enhance.restore', { phrase: p }), onclick: () => restorePhrase(p) }, `↺ ${p}`)),
  ] : []));
  const items = (data.advice || []).map((a) => el('li', { class: a.level === 'warn' ? 'warn' : 'info' },
    localized(a), a.source ? el('span', { class: 'source', text: ` (${a.source})` }) : null));
  if (on && !pos.length && !neg.length && !items.length) items.push(el('li', { class: 'info', text: t('enhance.nothing') }));
  $('enhance-advice').replaceChildren(...items);
  box.classList.remove('stale');
}

export function wireEnhance() {
  on('form:changed', (d) => schedule(!!(d && (d.immediate || d.restored))));
  on('info', () => schedule(true));
  on('lang', () => (preview.last ? render(preview.last) : renderEmpty()));
  renderEmpty();
}

// Languages: every UI string lives in one message file per language (i18n.<lang>.js, a flat
// object of key → text with {placeholders}). The language comes from localStorage, else from
// the browser, and can be switched at any time; static markup names its strings with
// data-i18n="key" (text) and data-i18n-attr="attr:key;attr:key" (attributes).

import en from './i18n.en.js';
import zhCN from './i18n.zh-CN.js';
import { emit } from './store.js';
import { stored } from './dom.js';

export const LANGS = {
  en: { name: 'English', messages: en },
  'zh-CN': { name: '简体中文', messages: zhCN },
};

const KEY = 'zturbo.lang';

function pick() {
  const saved = stored.get(KEY);
  if (saved && LANGS[saved]) return saved;
  for (const l of navigator.languages || [navigator.language || 'en']) {
    const low = String(l).toLowerCase();
    if (low.startsWith('zh')) return 'zh-CN';
    if (low.startsWith('en')) return 'en';
  }
  return 'en';
}

let current = pick();

export function lang() {
  return current;
}

/** Replaces {name} with vars.name (numbers and strings; unknown names stay as written). */
export function fill(text, vars) {
  if (!vars) return text;
  return String(text).replace(/\{(\w+)\}/g, (m, k) => (vars[k] === undefined || vars[k] === null ? m : String(vars[k])));
}

/** The message `key` in the current language (English when missing), with `vars` filled in. */
export function t(key, vars) {
  const msg = LANGS[current].messages[key] ?? en[key];
  if (msg === undefined) {
    console.error(`missing message: ${key}`);
    return key;
  }
  return fill(msg, vars);
}

/**
 * A text the server made, in the page's language. The server keeps English where it always was
 * (`message`, or a band's `hint` / `advice`) and sends its other languages beside it as
 * `i18n: {"zh-CN": "…"}` (or, for a band, `i18n: {"zh-CN": {hint, advice}}`); anything without a
 * translation — an old record, a text only in English — shows as sent.
 */
export function localized(obj, field = 'message') {
  if (!obj || typeof obj !== 'object') return obj ? String(obj) : '';
  const tr = obj.i18n && typeof obj.i18n === 'object' ? obj.i18n[current] : undefined;
  if (typeof tr === 'string' && tr && field === 'message') return tr;
  if (tr && typeof tr === 'object' && typeof tr[field] === 'string' && tr[field]) return tr[field];
  const en = obj[field];
  return en === undefined || en === null ? '' : String(en);
}

/** Fills every [data-i18n] and [data-i18n-attr] under `root`. */
export function applyStatic(root = document) {
  for (const node of root.querySelectorAll('[data-i18n]')) node.textContent = t(node.dataset.i18n);
  for (const node of root.querySelectorAll('[data-i18n-attr]')) {
    for (const pair of node.dataset.i18nAttr.split(';')) {
      const [attr, key] = pair.split(':').map((s) => s.trim());
      if (attr && key) node.setAttribute(attr, t(key));
    }
  }
}

export function setLang(l) {
  if (!LANGS[l]) return;
  current = l;
  stored.set(KEY, l);
  document.documentElement.lang = l;
  applyStatic();
  emit('lang', l);
}

/** Sets the document's language once at start (before the first render). */
export function initLang() {
  document.documentElement.lang = current;
  applyStatic();
}

const CJK = /[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]/gu;

/**
 * Prompt length as people count it: CJK characters one by one (a 20-character Chinese prompt
 * is 20 characters, not "1 word"), other scripts in words.
 */
export function promptLength(text) {
  const cjk = (text.match(CJK) || []).length;
  const rest = text.replace(CJK, ' ');
  const m = rest.trim().match(/[\p{L}\p{N}]+(?:['’-][\p{L}\p{N}]+)*/gu);
  return { words: m ? m.length : 0, cjk };
}

/** `one` when n is 1, else `many` with {n} filled (languages without plurals use the same text). */
export function tn(one, many, n) {
  return n === 1 ? t(one, { n }) : t(many, { n });
}

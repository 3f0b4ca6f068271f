// Toasts (transient, visual) and the announcer: one polite live region that screen readers hear
// for job state changes only (queued, started, done, failed) — never for every step.

import { $, el } from './dom.js';

export function toast(message, kind = 'info', ms = 4200) {
  const box = $('toasts');
  while (box.children.length >= 4) box.firstElementChild.remove();
  const node = el('div', { class: `toast ${kind}`, text: message });
  box.append(node);
  requestAnimationFrame(() => requestAnimationFrame(() => node.classList.add('show')));
  setTimeout(() => {
    node.classList.remove('show');
    setTimeout(() => node.remove(), 450);
  }, ms);
}

let lastAnnounced = '';

/** Says `message` once through the polite live region. */
export function announce(message) {
  const box = $('announcer');
  if (!box) return;
  // The same text twice would not be re-read: nudge it.
  const text = message === lastAnnounced ? `${message}\u00a0` : message;
  lastAnnounced = text;
  box.textContent = text;
}

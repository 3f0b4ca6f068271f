// API key: a server started with --api-key asks for it once; POST /api/auth sets an HttpOnly
// cookie that every later request (fetch, EventSource, <img>) carries. A `?key=` in the page's
// address is used the same way and then removed from the address bar.

import { $ } from './dom.js';
import { on } from './store.js';
import { t } from './i18n.js';
import { api } from './api.js';

let keyPrompt = null;

async function sendKey(key) {
  await api('/api/auth', { method: 'POST', body: { key }, noAuthPrompt: true });
}

export function askForKey() {
  if (keyPrompt) return keyPrompt;
  const dlg = $('key-dialog');
  const input = $('key-input');
  const err = $('key-error');
  keyPrompt = new Promise(() => {
    dlg.addEventListener('submit', async (e) => {
      e.preventDefault();
      err.textContent = '';
      try {
        await sendKey(input.value.trim());
        location.reload();
      } catch (x) {
        err.textContent = x.status === 401 ? t('key.wrong') : x.message;
        input.select();
      }
    });
    // The key is required: Esc must not leave a page that cannot work.
    dlg.addEventListener('cancel', (e) => e.preventDefault());
    if (typeof dlg.showModal === 'function') dlg.showModal(); else dlg.setAttribute('open', '');
    input.focus();
  });
  return keyPrompt;
}

export async function checkAuth() {
  on('unauthorized', askForKey);
  const url = new URL(location.href);
  const key = url.searchParams.get('key');
  if (key !== null) {
    url.searchParams.delete('key');
    history.replaceState(null, '', url.pathname + url.search + url.hash);
    try { await sendKey(key); } catch { /* asked below */ }
  }
  try {
    const { data } = await api('/api/auth', { noAuthPrompt: true });
    if (data && data.required && !data.authorized) await askForKey();
  } catch { /* an old or unreachable server: carry on, api() reports */ }
}

// The same-origin JSON API. Every call reports whether the server answered (the outage banner
// listens), and a 401 asks for the API key (auth.js listens).

import { emit, set, state } from './store.js';
import { t } from './i18n.js';

export class ApiError extends Error {
  /** `i18n`: the server's translations of `message` (`{"zh-CN": …}`), shown through localized(). */
  constructor(status, field, message, headers, i18n) {
    super(message);
    this.status = status;
    this.field = field;
    this.headers = headers;
    this.i18n = i18n && typeof i18n === 'object' ? i18n : null;
  }
}

/** Marks the server reachable or not; `online`/`offline` events fire on changes only. */
export function setOnline(online, reason) {
  if (state.online === online) return;
  set({ online });
  emit(online ? 'online' : 'offline', reason);
}

export async function api(path, opts = {}) {
  const init = { method: opts.method || 'GET', headers: { Accept: 'application/json' } };
  if (opts.body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(opts.body);
  }
  if (opts.signal) init.signal = opts.signal;
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    setOnline(false, t('offline.unreachable'));
    throw new ApiError(0, null, t('offline.unreachable'), null);
  }
  setOnline(true);
  const text = await res.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (res.status === 401 && !opts.noAuthPrompt) emit('unauthorized');
  if (!res.ok) {
    const err = data && data.error ? data.error : null;
    const message = err && err.message ? err.message : `${res.status} ${res.statusText || 'error'}`;
    throw new ApiError(res.status, err ? err.field ?? null : null, message, res.headers, err && err.i18n);
  }
  return { status: res.status, data, headers: res.headers };
}

// The Workers card: the remote workers of a front door (`zturbo serve --broker URL`), listed every
// 2 s from /api/workers; the memory chart can follow any one of them. Hidden on a server that
// runs its jobs itself.

import { $, el, fmtBytes } from './dom.js';
import { on } from './store.js';
import { t } from './i18n.js';
import { api } from './api.js';
import { followWorker, chartedWorker } from './chart.js';

const cluster = { timer: 0, list: [] };

async function loadWorkers() {
  clearTimeout(cluster.timer);
  try {
    const { data } = await api('/api/workers');
    if (!data || !data.broker) { $('workers-card').hidden = true; return; }
    $('workers-card').hidden = false;
    cluster.list = data.workers || [];
    renderWorkers();
  } catch (e) {
    $('workers').replaceChildren(el('li', { class: 'muted', text: t('workers.listFailed', { error: e.message }) }));
  }
  cluster.timer = setTimeout(loadWorkers, 2000);
}

function renderWorkers() {
  const list = cluster.list;
  const charted = chartedWorker();
  if (charted && !list.some((w) => w.name === charted)) followWorker(null);
  const ul = $('workers');
  if (!list.length) {
    ul.replaceChildren(el('li', { class: 'muted', text: t('workers.none') }));
    return;
  }
  ul.replaceChildren(...list.map((w) => {
    const following = chartedWorker() === w.name;
    return el('li', { dataset: { worker: w.name } },
      el('span', { class: 'model-name', text: w.name }),
      el('span', {
        class: `state state-${w.state}`,
        text: w.state === 'busy' ? t('workers.busy', { step: w.step, total: w.total_steps }) : t('workers.idle'),
      }),
      el('button', {
        type: 'button', class: 'small-btn', text: following ? t('workers.charted') : t('workers.chart'),
        'aria-pressed': String(following),
        'aria-label': t('workers.chartLabel', { name: w.name }),
        onclick: () => followWorker(following ? null : w.name),
      }),
      el('span', {
        class: 'model-meta',
        text: [w.model, w.device, w.device_name, w.total_bytes ? fmtBytes(w.total_bytes) : null].filter(Boolean).join(' · '),
      }));
  }));
}

export function wireWorkers() {
  on('chart:worker', renderWorkers);
  on('lang', () => { if (!$('workers-card').hidden) renderWorkers(); });
  loadWorkers();
}

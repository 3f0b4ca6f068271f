// The memory chart: a canvas fed by /api/memory/stream (ring buffer, redrawn once per frame).
// Phases are shaded, step ticks mark where each denoising step ended (the number the queue row
// shows), and the job peak is the exact high-water mark of the job's record once the job is done
// (the samples only see 10 a second; until then the line says "so far").

import { $, fmtBytes, MiB, GiB, parseData, stored } from './dom.js';
import { emit, on } from './store.js';
import { t } from './i18n.js';

const PHASES = ['', 'encode', 'denoise', 'decode'];

export class MemoryChart {
  constructor(canvas, readout) {
    this.canvas = canvas;
    this.readout = readout;
    this.ctx = canvas.getContext('2d');
    this.cap = 4096;                      // fixed: ~6.8 min at 10 Hz, far more than the window
    this.windowMs = 120000;
    this.t = new Float64Array(this.cap);
    this.used = new Float64Array(this.cap);
    this.total = new Float64Array(this.cap);
    this.phase = new Uint8Array(this.cap);
    this.step = new Int32Array(this.cap);
    this.job = new Array(this.cap).fill(null); // references overwritten in place
    this.head = 0;                         // next write slot
    this.len = 0;
    this.received = 0;
    this.samplePeaks = new Map();          // job id -> highest sample (bounded)
    this.exactPeaks = new Map();           // job id -> the record's peak_memory_bytes
    this.totals = new Map();               // job id -> total steps
    this.lastJob = null;                   // the job whose peak the chart shows
    this.pending = false;
    this.colors = null;
    this.drawn = new Set();
    this.readColors();
    new ResizeObserver(() => this.requestDraw()).observe(canvas);
    window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => {
      this.readColors();
      this.requestDraw();
    });
    this.requestDraw();
  }

  readColors() {
    const cs = getComputedStyle(document.documentElement);
    const v = (name) => cs.getPropertyValue(name).trim();
    this.colors = {
      used: v('--chart-used'), usedFill: v('--chart-used-fill'), total: v('--chart-total'),
      grid: v('--chart-grid'), text: v('--chart-text'), step: v('--chart-step'), peak: v('--chart-peak'),
      phase: [null, v('--chart-encode'), v('--chart-denoise'), v('--chart-decode')],
    };
  }

  /** The record's exact peak for a finished job (replaces the sampled one). */
  setExactPeak(jobId, bytes) {
    if (!jobId || !Number.isFinite(bytes)) return;
    this.exactPeaks.set(jobId, bytes);
    // A short job may finish between two samples: its record still names the peak.
    this.lastJob = jobId;
    while (this.exactPeaks.size > 32) this.exactPeaks.delete(this.exactPeaks.keys().next().value);
    this.canvas.dataset.peakJob = jobId;
    this.canvas.dataset.peakBytes = String(bytes);
    this.requestDraw();
  }

  setTotalSteps(jobId, total) {
    if (jobId && Number.isFinite(total) && total > 0) this.totals.set(jobId, total);
  }

  push(s) {
    const tms = Number(s.t_ms);
    const used = Number(s.used_bytes);
    if (!Number.isFinite(tms) || !Number.isFinite(used)) return;
    // A server restart resets t_ms: start a fresh window.
    if (this.len && tms < this.t[(this.head - 1 + this.cap) % this.cap] - 1000) this.len = 0;
    const i = this.head;
    this.t[i] = tms;
    this.used[i] = used;
    this.total[i] = Number(s.total_bytes) || 0;
    this.phase[i] = Math.max(0, PHASES.indexOf(s.phase || ''));
    this.step[i] = Number.isFinite(s.step) ? s.step : -1;
    this.job[i] = s.job_id || null;
    this.head = (i + 1) % this.cap;
    if (this.len < this.cap) this.len++;
    this.received++;
    this.canvas.dataset.samples = String(this.received);
    if (s.job_id) {
      this.lastJob = s.job_id;
      const prev = this.samplePeaks.get(s.job_id);
      if (prev === undefined) {
        this.samplePeaks.set(s.job_id, used);
        while (this.samplePeaks.size > 32) this.samplePeaks.delete(this.samplePeaks.keys().next().value);
      } else if (used > prev) {
        this.samplePeaks.set(s.job_id, used);
      }
      if (s.phase) emit('job:phase', { id: s.job_id, phase: s.phase });
    }
    this.requestDraw();
  }

  requestDraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  idx(k) { // k-th oldest sample
    return (this.head - this.len + k + this.cap) % this.cap;
  }

  /** Which legend entries the last frame drew (the legend lists only those). */
  setDrawn(items) {
    const key = [...items].sort().join(',');
    if (this.canvas.dataset.drawn === key) return;
    this.canvas.dataset.drawn = key;
    for (const li of document.querySelectorAll('#memory-legend [data-item]')) li.hidden = !items.has(li.dataset.item);
  }

  draw() {
    const canvas = this.canvas;
    const cssW = canvas.clientWidth;
    const cssH = canvas.clientHeight;
    this.updateReadout();
    if (!cssW || !cssH) return;
    const dpr = window.devicePixelRatio || 1;
    const pxW = Math.round(cssW * dpr);
    const pxH = Math.round(cssH * dpr);
    if (canvas.width !== pxW || canvas.height !== pxH) {
      canvas.width = pxW;
      canvas.height = pxH;
    }
    const ctx = this.ctx;
    const c = this.colors;
    const drawn = new Set();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    const font = '11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';
    ctx.font = font;
    ctx.textBaseline = 'middle';

    const L = 54, R = 10, T = 10, B = 20;
    const W = cssW - L - R;
    const H = cssH - T - B;
    if (W < 20 || H < 20) return;

    if (!this.len) {
      ctx.fillStyle = c.text;
      ctx.textAlign = 'center';
      ctx.fillText(t('chart.waiting'), L + W / 2, T + H / 2);
      this.setDrawn(drawn);
      return;
    }

    const newest = this.idx(this.len - 1);
    const tNow = this.t[newest];
    // Until two minutes of data exist, stretch what we have (at least 30 s) across the plot.
    const span = Math.min(this.windowMs, Math.max(30000, tNow - this.t[this.idx(0)]));
    const t0 = tNow - span;
    let first = this.len - 1;
    while (first > 0 && this.t[this.idx(first - 1)] >= t0) first--;
    // keep one sample left of the window so the line enters from the edge
    if (first > 0) first--;

    // the latest job's peak: the record's exact value once known, else the highest sample so far
    const peakJob = this.lastJob;
    const exact = peakJob ? this.exactPeaks.get(peakJob) : undefined;
    const peak = exact !== undefined ? exact : peakJob ? this.samplePeaks.get(peakJob) : undefined;

    let maxUsed = peak || 0;
    let total = 0;
    for (let k = first; k < this.len; k++) {
      const i = this.idx(k);
      if (this.used[i] > maxUsed) maxUsed = this.used[i];
      if (this.total[i] > total) total = this.total[i];
    }
    // On a CPU the total is the host's RAM and a job may use a sliver of it: zoom to the curve
    // (the readout still shows the total) instead of drawing a flat line along the bottom.
    const zoomed = total > 0 && maxUsed < total * 0.25;
    const yMax = zoomed ? Math.max(maxUsed * 1.3, 16 * MiB) : Math.max(total, maxUsed, 64 * MiB) * 1.06;
    const x = (tt) => L + ((tt - t0) / span) * W;
    const y = (b) => T + H - (b / yMax) * H;

    // grid + y labels
    const stepB = niceByteStep(yMax / 4);
    ctx.strokeStyle = c.grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = c.text;
    ctx.textAlign = 'right';
    for (let b = 0; b <= yMax; b += stepB) {
      const yy = Math.round(y(b)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(L, yy);
      ctx.lineTo(L + W, yy);
      ctx.stroke();
      ctx.fillText(fmtBytesAxis(b, stepB), L - 6, yy);
    }
    // x labels
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    const spanS = span / 1000;
    const tick = spanS > 90 ? 30 : spanS > 45 ? 15 : 10;
    for (let s = 0; s <= spanS + 1e-6; s += tick) {
      const xx = x(tNow - s * 1000);
      if (xx < L + 14 && s !== 0) continue;
      ctx.fillText(s === 0 ? t('chart.now') : t('chart.ago', { s }), Math.min(L + W - 12, xx), T + H + 5);
    }
    ctx.textBaseline = 'middle';

    ctx.save();
    ctx.beginPath();
    ctx.rect(L, T, W, H);
    ctx.clip();

    // phase shading (contiguous runs of the same phase of the same job)
    let runStart = -1;
    for (let k = first; k <= this.len; k++) {
      const i = k < this.len ? this.idx(k) : -1;
      const prev = runStart >= 0 ? this.idx(runStart) : -1;
      const same = i >= 0 && prev >= 0 && this.phase[i] === this.phase[prev] && this.job[i] === this.job[prev];
      if (runStart >= 0 && !same) {
        const code = this.phase[prev];
        if (code) {
          const xa = x(this.t[prev]);
          const xb = i >= 0 ? x(this.t[i]) : x(tNow);
          ctx.fillStyle = c.phase[code];
          ctx.fillRect(xa, T, Math.max(1, xb - xa), H);
          drawn.add(PHASES[code]);
          const label = t(`phase.${PHASES[code]}`);
          if (xb - xa > ctx.measureText(label).width + 8) {
            ctx.fillStyle = c.text;
            ctx.textAlign = 'left';
            ctx.fillText(label, Math.max(xa, L) + 4, T + 8);
          }
        }
        runStart = -1;
      }
      if (runStart < 0 && i >= 0) runStart = k;
    }

    // Step ticks where a denoising step ended: the sample tags name the step in progress, so
    // a change from step s to s+1 (or out of denoise) marks "s done" — the queue row's number.
    ctx.strokeStyle = c.step;
    ctx.fillStyle = c.text;
    ctx.textAlign = 'center';
    let lastLabelRight = -Infinity;
    for (let k = first + 1; k < this.len; k++) {
      const i = this.idx(k);
      const j = this.idx(k - 1);
      const prevStep = this.step[j];
      if (prevStep < 0 || !this.job[j] || PHASES[this.phase[j]] !== 'denoise') continue;
      const sameJob = this.job[i] === this.job[j];
      if (sameJob && this.step[i] === prevStep && this.phase[i] === this.phase[j]) continue;
      const xx = Math.round(x(this.t[i])) + 0.5;
      ctx.beginPath();
      ctx.moveTo(xx, T + H);
      ctx.lineTo(xx, T + H - 10);
      ctx.stroke();
      drawn.add('step');
      const label = String(prevStep);
      const w = ctx.measureText(label).width;
      // never overlap: a label is drawn only when it clears the previous one by 4 px
      if (xx - w / 2 >= lastLabelRight + 4 && xx + w / 2 <= L + W) {
        ctx.fillText(label, xx, T + H - 17);
        lastLabelRight = xx + w / 2;
      }
    }

    // total (dashed), only when it fits the zoomed scale
    if (total > 0 && total <= yMax) {
      ctx.strokeStyle = c.total;
      ctx.setLineDash([5, 4]);
      ctx.beginPath();
      ctx.moveTo(L, Math.round(y(total)) + 0.5);
      ctx.lineTo(L + W, Math.round(y(total)) + 0.5);
      ctx.stroke();
      ctx.setLineDash([]);
      drawn.add('total');
    }

    // used: area + line
    ctx.beginPath();
    for (let k = first; k < this.len; k++) {
      const i = this.idx(k);
      const xx = x(this.t[i]);
      const yy = y(this.used[i]);
      if (k === first) ctx.moveTo(xx, yy);
      else ctx.lineTo(xx, yy);
    }
    ctx.strokeStyle = c.used;
    ctx.lineWidth = 1.6;
    ctx.lineJoin = 'round';
    ctx.stroke();
    ctx.lineTo(x(tNow), T + H);
    ctx.lineTo(x(this.t[this.idx(first)]), T + H);
    ctx.closePath();
    ctx.fillStyle = c.usedFill;
    ctx.fill();
    drawn.add('used');

    if (peakJob && peak !== undefined) {
      let xa = L;
      for (let k = first; k < this.len; k++) {
        const i = this.idx(k);
        if (this.job[i] === peakJob) { xa = x(this.t[i]); break; }
      }
      const yy = Math.round(y(peak)) + 0.5;
      ctx.strokeStyle = c.peak;
      ctx.lineWidth = 1.2;
      ctx.setLineDash([2, 3]);
      ctx.beginPath();
      ctx.moveTo(Math.max(L, xa - 6), yy);
      ctx.lineTo(L + W, yy);
      ctx.stroke();
      ctx.setLineDash([]);
      drawn.add('peak');
      const label = exact !== undefined ? t('chart.peak', { bytes: fmtBytes(peak) }) : t('chart.peakSoFar', { bytes: fmtBytes(peak) });
      ctx.fillStyle = c.peak;
      ctx.textAlign = 'right';
      ctx.font = `600 ${font}`;
      // keep the label clear of the step numbers along the bottom and of the top edge
      let ly = yy - 8;
      if (ly > T + H - 30) ly = T + H - 30;
      if (ly < T + 6) ly = yy + 9;
      ctx.fillText(label, L + W - 4, ly);
      ctx.font = font;
    }
    ctx.restore();
    this.setDrawn(drawn);
  }

  /** The text readout (also while the panel is collapsed): now, phase, step, job peak. */
  updateReadout() {
    if (!this.len) {
      if (this._lastReadout !== '—') { this.readout.textContent = '—'; this._lastReadout = '—'; }
      return;
    }
    const newest = this.idx(this.len - 1);
    const parts = [`<b>${fmtBytes(this.used[newest])}</b> / ${fmtBytes(this.total[newest])}`];
    const ph = this.phase[newest];
    const jid = this.job[newest];
    if (ph && jid) {
      const name = PHASES[ph];
      let text = t(`phase.${name}`);
      const st = this.step[newest];
      const total = this.totals.get(jid);
      if (name === 'denoise' && st >= 1) {
        // the step in progress is st: st − 1 are done, as the queue row counts them
        text += ` · ${t('queue.step', { step: st - 1, total: total || '?' })}`;
      }
      parts.push(text);
    }
    const peakJob = this.lastJob;
    if (peakJob) {
      const exact = this.exactPeaks.get(peakJob);
      const sampled = this.samplePeaks.get(peakJob);
      if (exact !== undefined) parts.push(`${t('chart.jobPeak')} <b>${fmtBytes(exact)}</b>`);
      else if (sampled !== undefined) parts.push(`${t('chart.jobPeakSoFar')} <b>${fmtBytes(sampled)}</b>`);
    }
    const html = parts.join(' · ');
    if (this._lastReadout !== html) {
      // only our own formatted numbers and message texts go in here, never server strings
      this.readout.innerHTML = html;
      this._lastReadout = html;
    }
  }
}

function niceByteStep(raw) {
  const unit = raw >= GiB / 2 ? GiB : MiB;
  const r = raw / unit;
  const mag = 10 ** Math.floor(Math.log10(r));
  const f = r / mag;
  const nice = f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10;
  return Math.max(nice * mag * unit, MiB);
}

function fmtBytesAxis(b, step) {
  if (b === 0) return '0';
  if (step >= GiB / 2 || b >= GiB) {
    const g = b / GiB;
    return `${Number.isInteger(Math.round(g * 100) / 100) ? g.toFixed(0) : g.toFixed(step < GiB ? 2 : 1)} GiB`;
  }
  return `${Math.round(b / MiB)} MiB`;
}

/* memory stream with reconnect */

const mem = { es: null, chart: null, failures: 0, timer: 0 };

function setLive(cls, key) {
  const live = $('memory-live');
  live.className = `live-dot ${cls}`;
  live.textContent = t(key);
  live.dataset.key = key;
}

export function connectMemory() {
  clearTimeout(mem.timer);
  if (mem.es) { mem.es.close(); mem.es = null; }
  const es = new EventSource('/api/memory/stream');
  mem.es = es;
  const onSample = (ev) => {
    if (mem.es !== es) return;
    mem.failures = 0;
    if (!$('memory-live').classList.contains('on')) setLive('on', 'chart.live');
    mem.chart.push(parseData(ev));
  };
  es.addEventListener('sample', onSample);
  es.addEventListener('message', onSample);
  es.addEventListener('open', () => {
    if (mem.es !== es) return;
    setLive('on', 'chart.live');
    emit('stream:open', 'memory');
  });
  es.addEventListener('error', () => {
    if (mem.es !== es) return;
    es.close();
    mem.es = null;
    mem.failures++;
    setLive('retry', 'chart.reconnecting');
    emit('stream:lost', 'memory');
    const delay = Math.min(5000, 500 * 2 ** Math.min(mem.failures, 4));
    mem.timer = setTimeout(connectMemory, delay);
  });
}

const OPEN_KEY = 'zturbo.memory.open';

export function wireChart() {
  mem.chart = new MemoryChart($('memory-chart'), $('memory-readout'));
  const panel = $('memory-panel');
  panel.open = stored.get(OPEN_KEY, '1') === '1';
  panel.addEventListener('toggle', () => {
    stored.set(OPEN_KEY, panel.open ? '1' : '0');
    mem.chart.requestDraw();
  });
  on('job:finished', ({ job, rec }) => {
    mem.chart.setExactPeak(job.id, rec.peak_memory_bytes ?? job.peak);
  });
  on('job:update', (job) => mem.chart.setTotalSteps(job.id, job.total));
  on('lang', () => {
    const live = $('memory-live');
    if (live.dataset.key) live.textContent = t(live.dataset.key);
    mem.chart._lastReadout = null;
    mem.chart.requestDraw();
  });
  on('online', () => { if (!mem.es) connectMemory(); });
  connectMemory();
  return mem.chart;
}

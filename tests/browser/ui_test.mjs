// Browser test of the zturbo web UI, in real headless Chromium (Debian's, $CHROMIUM or
// /usr/bin/chromium) through playwright-core; accessibility by axe-core. Both are pinned in
// package-lock.json: `npm ci --prefix tests/browser`.
//
//   node tests/browser/ui_test.mjs <base_url> <screenshot_dir>
//
// tests/browser.rs starts the servers and passes what the sections need in the environment:
//   ZTURBO_BIN     the zturbo binary: the outage section starts (and kills, and restarts) its own
//                  slow server (ZTURBO_TEST_WORKER_DELAY_MS) under the page
//   SCRATCH_DIR    a folder for that server's outputs
//   PULL_MODEL     a catalog model the Models panel downloads (from a fake hub)
//   KEYED_URL, KEYED_KEY   a server started with --api-key
//   SWITCH_URL, SWITCH_MODELS   a server whose models folder holds two tiny local models
// Sections: messages (zh-CN complete against English), the desktop page (modules, profile,
// generate, hero, exact chart peak, per-image seeds, lightbox, download name, search, delete,
// enhancement chips, image to image + inpainting + a LoRA, Models panel), the profile contract with injected numbers, the phone
// viewport, queue control (cancel-all, Esc), the outage banner, model switching, the key prompt,
// and axe in both themes and both languages. Screenshots land in <screenshot_dir>:
// browser-desktop.png, browser-phone.png, browser-zh-CN.png, browser-zh-CN-form.png (and browser-dark.png).
// Exits 0 on success, 1 on the first failed check (saying which).

import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { readFileSync, readdirSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const staticDir = join(here, '..', '..', 'static');
const [baseArg, shotDir] = process.argv.slice(2);
if (!baseArg || !shotDir) {
  console.error('usage: node tests/browser/ui_test.mjs <base_url> <screenshot_dir>');
  process.exit(2);
}
mkdirSync(shotDir, { recursive: true });
const base = baseArg.endsWith('/') ? baseArg : `${baseArg}/`;
const GEN_TIMEOUT_MS = 120_000;
const HARD_TIMEOUT_MS = 420_000;
const AXE_SOURCE = readFileSync(join(here, 'node_modules', 'axe-core', 'axe.min.js'), 'utf8');

let passed = 0;
let failed = 0;
const started = Date.now();

function ok(name, detail = '') {
  passed++;
  console.log(`ok   ${name}${detail ? ` — ${detail}` : ''} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
}

class CheckFailed extends Error {}
function fail(name, detail) {
  failed++;
  const line = `FAIL ${name}: ${detail}`;
  console.error(line);
  throw new CheckFailed(line);
}
function check(cond, name, detail) {
  if (!cond) fail(name, typeof detail === 'function' ? detail() : detail);
}

const hardTimer = setTimeout(() => {
  console.error(`FAIL overall: test exceeded ${HARD_TIMEOUT_MS / 1000} s`);
  console.log(`browser: ${passed} passed, ${failed + 1} failed`);
  process.exit(1);
}, HARD_TIMEOUT_MS);
hardTimer.unref();

/** The page's own byte formatting (js/dom.js), to compare what it shows. */
function fmtBytes(n) {
  const KiB = 1024; const MiB = KiB * 1024; const GiB = MiB * 1024;
  if (n >= GiB) return `${(n / GiB).toFixed(n >= 10 * GiB ? 1 : 2)} GiB`;
  if (n >= MiB) return `${Math.round(n / MiB)} MiB`;
  if (n >= KiB) return `${Math.round(n / KiB)} KiB`;
  return `${Math.round(n)} B`;
}

const LAUNCH_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

/** Collects console errors, uncaught exceptions and failed requests of a page. */
function watchErrors(page, errors, { allowFailedRequests = false } = {}) {
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const text = msg.text();
    // Chromium logs every refused connection while the server is down on purpose.
    if (allowFailedRequests && /ERR_CONNECTION_REFUSED|Failed to load resource|EventSource/.test(text)) return;
    errors.push(`console.error: ${text}`);
  });
  page.on('pageerror', (err) => errors.push(`uncaught: ${err.message}`));
  page.on('requestfailed', (req) => {
    const f = req.failure();
    // EventSource streams that we close ourselves show up as aborted; they are not errors.
    if (f && /ERR_ABORTED/.test(f.errorText)) return;
    if (allowFailedRequests) return;
    errors.push(`request failed: ${req.method()} ${req.url()} (${f ? f.errorText : '?'})`);
  });
}

async function waitReady(page, what) {
  await page.waitForFunction(() => document.documentElement.dataset.info === 'ready', null, { timeout: 20_000 })
    .catch(() => fail(what, 'the page did not mark itself ready within 20 s'));
}

/** Fills the form for a small, fast job. */
async function fillSmall(page, prompt, { steps = 2, size = 128 } = {}) {
  await page.fill('#width', String(size));
  await page.fill('#height', String(size));
  await page.fill('#steps', String(steps));
  await page.fill('#prompt', prompt);
}

/** Clicks Generate and returns the accepted job's id and the request body sent. */
async function generate(page, what) {
  const postResp = page.waitForResponse((r) => new URL(r.url()).pathname === '/api/jobs' && r.request().method() === 'POST', { timeout: 15_000 });
  await page.click('#generate', { timeout: 10_000 }).catch((e) => fail(what, `click #generate: ${e.message.split('\n')[0]}`));
  const post = await postResp.catch(() => fail(what, 'no POST /api/jobs within 15 s of clicking Generate'));
  if (post.status() !== 202) fail(what, `POST /api/jobs: ${post.status()} ${(await post.text()).slice(0, 300)}`);
  return { id: (await post.json()).id, sent: post.request().postDataJSON() };
}

/** Waits for job `id`'s figure in #gallery with every image loaded. */
async function waitResult(page, id, what, timeout = GEN_TIMEOUT_MS) {
  const outcome = await page.waitForFunction((jobId) => {
    const fig = document.querySelector(`#gallery figure.result[data-job-id="${jobId}"]`);
    if (!fig) return null;
    if (fig.classList.contains('failed')) return { failed: fig.innerText.slice(0, 300) };
    const imgs = [...fig.querySelectorAll('img')];
    if (!imgs.length) return null;
    if (imgs.some((i) => i.complete && i.naturalWidth === 0 && i.classList.contains('broken'))) return { broken: true };
    if (imgs.every((i) => i.complete && i.naturalWidth > 0)) {
      return { ok: true, n: imgs.length, w: imgs[0].naturalWidth, h: imgs[0].naturalHeight, src: imgs[0].getAttribute('src') };
    }
    fig.scrollIntoView({ block: 'nearest' });
    return null;
  }, id, { timeout, polling: 200 }).then((h) => h.jsonValue()).catch(async () => {
    const q = await page.$eval('#queue', (e) => e.innerText).catch(() => '');
    fail(what, `no loaded image for job ${id} within ${timeout / 1000} s; queue shows: ${q.replace(/\s+/g, ' ').slice(0, 200)}`);
  });
  if (outcome.failed) fail(what, `the job failed: ${outcome.failed.replace(/\s+/g, ' ')}`);
  if (outcome.broken) fail(what, 'an image did not load');
  return outcome;
}

/** A request from the test itself (the page's cookies, not the page's console). */
async function api(page, path, init = {}) {
  const url = new URL(path, page.url()).toString();
  const r = await page.request.fetch(url, { method: init.method || 'GET', headers: init.headers, data: init.body });
  const text = await r.text();
  let body = null;
  try { body = JSON.parse(text); } catch { body = text; }
  return { status: r.status(), body, headers: r.headers() };
}

/** axe-core on the page as it is; fails on any serious or critical violation. */
async function axeScan(page, label) {
  await page.evaluate(AXE_SOURCE);
  const res = await page.evaluate(async () => {
    // eslint-disable-next-line no-undef
    const r = await axe.run(document, { resultTypes: ['violations'] });
    return r.violations.map((v) => ({
      id: v.id, impact: v.impact, help: v.help,
      nodes: v.nodes.slice(0, 3).map((n) => `${n.target.join(' ')}: ${(n.failureSummary || '').split('\n').slice(1, 2).join(' ')}`),
    }));
  });
  const bad = res.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  check(!bad.length, `axe (${label})`, () => bad.map((v) => `${v.impact} ${v.id} (${v.help}): ${v.nodes.join(' | ')}`).join('\n  '));
  ok(`axe: no serious or critical violations (${label})`, `${res.length} minor`);
}

/** A small JPEG of the viewport for the README (`cp target/ui-*.jpg docs/` refreshes docs/). */
async function docShot(page, name) {
  await page.screenshot({ path: join(shotDir, name), type: 'jpeg', quality: 70 });
}

async function fullPageShot(page, width, path, height = 800) {
  await page.setViewportSize({ width, height });
  await page.waitForTimeout(150);
  await page.waitForFunction(() => [...document.images].every((i) => i.complete), null, { timeout: 5000 }).catch(() => {});
  await page.screenshot({ path, fullPage: false });
}

/* ------------------------------------------------------------------ *
 * 1. messages: zh-CN complete against English, every key used exists
 * ------------------------------------------------------------------ */

async function messages() {
  const en = (await import(pathToFileURL(join(staticDir, 'js', 'i18n.en.js')))).default;
  const zh = (await import(pathToFileURL(join(staticDir, 'js', 'i18n.zh-CN.js')))).default;
  const missing = Object.keys(en).filter((k) => !(k in zh));
  const extra = Object.keys(zh).filter((k) => !(k in en));
  check(!missing.length && !extra.length, 'zh-CN strings complete', `missing in zh-CN: ${missing.join(', ') || '-'}; not in English: ${extra.join(', ') || '-'}`);
  const empty = Object.entries(zh).filter(([, v]) => typeof v !== 'string' || !v.trim()).map(([k]) => k);
  check(!empty.length, 'zh-CN strings non-empty', empty.join(', '));
  // Every placeholder of the English text is in the Chinese one too.
  const holes = (s) => [...String(s).matchAll(/\{(\w+)\}/g)].map((m) => m[1]).sort().join(',');
  const mismatched = Object.keys(en).filter((k) => holes(en[k]) !== holes(zh[k]));
  check(!mismatched.length, 'zh-CN placeholders', mismatched.join(', '));
  const used = new Set();
  const files = ['app.js', ...readdirSync(join(staticDir, 'js')).map((f) => join('js', f))];
  for (const f of files) {
    for (const m of readFileSync(join(staticDir, f), 'utf8').matchAll(/\bt\('([^']+)'/g)) used.add(m[1]);
  }
  const html = readFileSync(join(staticDir, 'index.html'), 'utf8');
  for (const m of html.matchAll(/data-i18n="([^"]+)"/g)) used.add(m[1]);
  for (const m of html.matchAll(/data-i18n-attr="([^"]+)"/g)) for (const p of m[1].split(';')) used.add(p.split(':')[1].trim());
  const unknown = [...used].filter((k) => !(k in en));
  check(!unknown.length, 'every message key used exists', unknown.join(', '));
  ok('zh-CN strings complete against English', `${Object.keys(en).length} keys, ${used.size} used literally`);
}

/* ------------------------------------------------------------------ *
 * 2. the desktop page
 * ------------------------------------------------------------------ */

async function desktop(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, deviceScaleFactor: 1, locale: 'en-US' });
  const page = await context.newPage();
  const errors = [];
  watchErrors(page, errors);
  const errs = () => (errors.length ? `; page errors: ${errors.slice(0, 5).join(' | ')}` : '');
  const scripts = new Map();
  page.on('response', (r) => {
    const u = new URL(r.url());
    if (u.pathname.endsWith('.js')) scripts.set(u.pathname, { status: r.status(), type: r.headers()['content-type'] || '' });
  });

  const infoResp = page.waitForResponse((r) => r.url().endsWith('/api/info'), { timeout: 20_000 }).catch(() => null);
  const resp = await page.goto(base, { waitUntil: 'domcontentloaded', timeout: 30_000 })
    .catch((e) => fail('open page', e.message.split('\n')[0]));
  check(resp && resp.ok(), 'open page', `HTTP ${resp ? resp.status() : 'no response'} for ${base}`);
  const infoR = await infoResp;
  const info = infoR ? await infoR.json().catch(() => null) : null;
  check(info, 'GET /api/info', `the page never fetched /api/info${errs()}`);
  await waitReady(page, 'apply /api/info');
  for (const id of ['prompt', 'generate', 'cancel', 'gallery', 'memory-chart', 'queue', 'hero', 'viewer']) {
    check(await page.$(`#${id}`), 'stable hooks', `#${id} is missing`);
  }
  // ES modules, served as written.
  const mods = [...scripts.entries()];
  check(mods.length >= 10, 'ES modules loaded', `only ${mods.length} scripts: ${mods.map(([p]) => p).join(', ')}`);
  const wrong = mods.filter(([, r]) => r.status !== 200 || !r.type.startsWith('text/javascript'));
  check(!wrong.length, 'module content type', wrong.map(([p, r]) => `${p} ${r.status} ${r.type}`).join(', '));
  const defaults = await page.evaluate(() => ({
    width: document.getElementById('width').value,
    steps: document.getElementById('steps').value,
    cfg: document.getElementById('cfg').value,
  }));
  const d = info.model.defaults;
  check(Number(defaults.width) === d.width && Number(defaults.steps) === d.steps && Math.abs(Number(defaults.cfg) - d.cfg) < 1e-9,
    'defaults from /api/info', `form shows ${JSON.stringify(defaults)}, server says ${JSON.stringify(d)}`);
  ok('page loaded and /api/info applied', `model ${info.model.name}, ${mods.length} modules as text/javascript`);

  // The family profile (when the server sends one) drives the presets and hints.
  const prof = info.model.profile;
  if (prof) {
    const presets = await page.$$eval('#steps-presets button', (bs) => bs.map((b) => Number(b.dataset.steps)));
    check(JSON.stringify(presets) === JSON.stringify(prof.steps.presets), 'step presets from the profile', `page ${presets}, profile ${prof.steps.presets}`);
    // Each preset's hint is the profile's band text, with its placeholders filled in.
    const fill = (text, vars) => String(text).replace(/\{(\w+)\}/g, (m, k) => (vars[k] === undefined ? m : String(vars[k])));
    const band = (bands, v) => bands.find((b) => b.max === null || v <= b.max + 1e-9);
    const shownHints = [];
    for (const n of prof.steps.presets) {
      await page.click(`#steps-presets button[data-steps="${n}"]`);
      const hint = await page.$eval('#steps-hint', (e) => ({ text: e.textContent, cls: e.className }));
      const b = band(prof.steps.bands, n);
      const want = fill(b.hint, { value: n, default: info.model.defaults.steps });
      check(hint.text === want && (b.level === 'info' || hint.cls.includes(b.level)), 'step hint from the profile', `${n} steps: page "${hint.text}" (${hint.cls}), profile "${want}" (${b.level})`);
      shownHints.push(hint.text);
    }
    ok('step presets and hints from /api/info profile', `${presets.join(', ')}: ${shownHints.join(' | ')}`);
  }

  if (info.model.demo) {
    const banner = await page.$('#demo-banner');
    const text = (await banner.isVisible()) ? await banner.innerText() : '';
    check(/random weights/i.test(text), 'demo notice', 'model.demo is true but the random-weights notice is not shown');
    ok('demo notice shown');
  }

  // a first image: the hero shows it, the gallery lists it, the chart shows its exact peak
  await fillSmall(page, 'a serene mountain lake at dawn, mist rising, pine trees', { steps: 4 });
  const first = await generate(page, 'first job');
  check(first.sent.width === 128 && first.sent.steps === 4, 'request body', `sent ${JSON.stringify(first.sent)}`);
  const r1 = await waitResult(page, first.id, 'first image');
  check(r1.w === 128 && r1.h === 128, 'image size', `expected 128×128, got ${r1.w}×${r1.h}`);
  ok('image loaded in #gallery', `${r1.src}`);
  await page.waitForFunction((src) => {
    const img = document.getElementById('hero-image');
    return !img.hidden && img.getAttribute('src') === src && img.complete && img.naturalWidth > 0;
  }, r1.src, { timeout: 10_000 }).catch(() => fail('hero', 'the finished image is not the hero'));
  const heroBox = await page.$eval('#hero-image', (e) => { const r = e.getBoundingClientRect(); return { top: r.top, w: r.width, h: r.height }; });
  const thumbBox = await page.$eval('#gallery img', (e) => { const r = e.getBoundingClientRect(); return { w: r.width }; });
  check(heroBox.top < 800 && heroBox.w > 2 * thumbBox.w, 'hero is the largest thing', `hero ${JSON.stringify(heroBox)}, thumbnail ${JSON.stringify(thumbBox)}`);
  ok('the newest image is the hero, above the fold', `${Math.round(heroBox.w)} px wide at y=${Math.round(heroBox.top)}`);

  const rec1 = (await api(page, `/api/jobs/${first.id}`)).body;
  check(Number.isFinite(rec1.peak_memory_bytes), 'record peak', JSON.stringify(rec1).slice(0, 200));
  const chartPeak = await page.waitForFunction((id) => {
    const c = document.getElementById('memory-chart');
    return c.dataset.peakJob === id ? Number(c.dataset.peakBytes) : null;
  }, first.id, { timeout: 10_000 }).then((h) => h.jsonValue()).catch(() => fail('chart peak', 'the chart never took the record\'s peak'));
  check(chartPeak === rec1.peak_memory_bytes, 'chart peak = record peak', `chart ${chartPeak}, record ${rec1.peak_memory_bytes}`);
  await page.waitForFunction((txt) => document.getElementById('memory-readout').innerText.includes(txt), `job peak ${fmtBytes(rec1.peak_memory_bytes)}`, { timeout: 5000 })
    .catch(async () => fail('chart readout', `readout "${await page.$eval('#memory-readout', (e) => e.innerText)}" lacks job peak ${fmtBytes(rec1.peak_memory_bytes)}`));
  const samples = Number(await page.$eval('#memory-chart', (e) => e.dataset.samples));
  check(samples > 0, 'memory chart', 'no samples');
  const legend = await page.$$eval('#memory-legend li', (ls) => ls.filter((l) => !l.hidden).map((l) => l.dataset.item));
  const drawn = (await page.$eval('#memory-chart', (e) => e.dataset.drawn || '')).split(',').filter(Boolean);
  check(JSON.stringify([...legend].sort()) === JSON.stringify([...drawn].sort()), 'legend lists only what is drawn', `legend ${legend}, drawn ${drawn}`);
  ok('chart shows the record\'s exact peak', `${fmtBytes(rec1.peak_memory_bytes)} (${rec1.peak_memory_bytes} B), ${samples} samples, legend ${legend.join('/')}`);

  // a batch of two with a fixed seed: every image shows its own seed
  await page.click('label.seg-radio:has(#seed-fixed)');
  await page.fill('#seed', '4242');
  await page.selectOption('#batch', '2');
  await fillSmall(page, 'a red fox in the snow at night', { steps: 2 });
  const second = await generate(page, 'batch job');
  const r2 = await waitResult(page, second.id, 'batch images');
  check(r2.n === 2, 'batch', `expected 2 images, got ${r2.n}`);
  const seeds = await page.$$eval(`#gallery figure[data-job-id="${second.id}"] .thumb-seed`, (s) => s.map((x) => x.textContent));
  check(JSON.stringify(seeds) === '["4242","4243"]', 'per-image seeds', `shown ${JSON.stringify(seeds)}`);
  ok('each batch image shows its own seed', seeds.join(', '));
  await page.selectOption('#batch', '1');
  await page.click('label.seg-radio:has(#seed-random)');

  // the lightbox: open, arrows, compare, Esc
  await page.click(`#gallery figure[data-job-id="${second.id}"] .thumb >> nth=1`);
  await page.waitForSelector('#viewer[open]', { timeout: 5000 }).catch(() => fail('lightbox', 'clicking a thumbnail did not open the viewer'));
  const shown = () => page.$eval('#viewer-stage img', (i) => i.getAttribute('src'));
  const a = await shown();
  check(a.endsWith(`${second.id}-2.png`), 'lightbox image', `opened ${a}`);
  const seedRow = await page.$eval('#viewer-params', (e) => e.innerText);
  check(/4243/.test(seedRow), 'lightbox seed', `params show ${seedRow.replace(/\s+/g, ' ')}`);
  await page.keyboard.press('ArrowRight');
  const b = await shown();
  check(b.endsWith(`${first.id}-1.png`), 'ArrowRight', `→ went to ${b}`);
  await page.keyboard.press('ArrowLeft');
  check((await shown()) === a, 'ArrowLeft', 'did not come back');
  await page.click('#viewer-compare');
  const pair = await page.$$eval('#viewer-stage img', (is) => is.map((i) => i.getAttribute('src')));
  check(pair.length === 2 && pair[0] !== pair[1], 'compare', `stage shows ${JSON.stringify(pair)}`);
  await page.click('#viewer-compare');
  const dl = await page.$eval('#viewer-download', (e) => e.getAttribute('href'));
  const dlRes = await api(page, dl);
  const cd = dlRes.headers['content-disposition'] || '';
  check(/attachment; filename="a-red-fox-in-the-snow-4243-2\.png"/.test(cd), 'download name', `Content-Disposition: ${cd} for ${dl}`);
  const hooks = await page.evaluate(() => ['viewer-input', 'viewer-control'].map((id) => document.getElementById(id).hidden));
  // The server announces img2img (and the form has its input slot), not ControlNet.
  check(!hooks[0] && hooks[1], 'use as input shown / use as control hidden', `the server announces img2img only, yet hidden = ${JSON.stringify(hooks)}`);
  await page.keyboard.press('Escape');
  await page.waitForFunction(() => !document.getElementById('viewer').open, null, { timeout: 3000 }).catch(() => fail('lightbox', 'Esc did not close it'));
  ok('lightbox: open, ←/→, compare, Esc; download named by the server', cd.replace('attachment; ', ''));

  // use settings of image 2 → batch 1 with its own seed, the memory mode the user chose
  await page.click(`#gallery figure[data-job-id="${second.id}"] .thumb >> nth=1`);
  await page.waitForSelector('#viewer[open]');
  await page.click('#viewer-use');
  const restored = await page.evaluate(() => ({ seed: document.getElementById('seed').value, batch: document.getElementById('batch').value, mode: document.getElementById('memory-mode').value }));
  check(restored.seed === '4243' && restored.batch === '1' && restored.mode === 'auto', 'use settings of image 2', JSON.stringify(restored));
  ok('use settings: image 2 restores batch 1 with seed 4243, memory mode auto');

  // search and delete
  await page.fill('#gallery-search', 'fox');
  await page.waitForFunction((id) => {
    const figs = [...document.querySelectorAll('#gallery figure')];
    return figs.length === 1 && figs[0].dataset.jobId === id;
  }, second.id, { timeout: 5000 }).catch(async () => fail('search', `gallery shows ${await page.$$eval('#gallery figure', (f) => f.map((x) => x.dataset.jobId))}`));
  await page.fill('#gallery-search', 'no such words here');
  await page.waitForFunction(() => !document.querySelector('#gallery figure') && !document.getElementById('gallery-empty').hidden, null, { timeout: 5000 })
    .catch(() => fail('search', 'a search without matches does not say so'));
  await page.fill('#gallery-search', '');
  await page.waitForFunction(() => document.querySelectorAll('#gallery figure').length === 2, null, { timeout: 5000 }).catch(() => fail('search', 'clearing the search does not bring both jobs back'));
  await page.click(`#gallery figure[data-job-id="${first.id}"] .r-delete`);
  await page.waitForFunction((id) => !document.querySelector(`#gallery figure[data-job-id="${id}"]`), first.id, { timeout: 5000 }).catch(() => fail('delete', 'the figure stayed'));
  const gone = await api(page, `/api/jobs/${first.id}`);
  const img = await api(page, rec1.images[0]);
  check(gone.status === 404 && img.status === 404, 'delete', `after delete: job ${gone.status}, image ${img.status}`);
  ok('history: search by prompt, delete (record and files gone)');

  // enhancement preview: every parameter, removable chips, no layout jump
  await page.fill('#prompt', 'a serene mountain lake at dawn');
  await page.waitForSelector('#enhance-chips .chip-x', { timeout: 10_000 }).catch(() => fail('enhancement chips', 'no removable chip for a lake at dawn'));
  const before = await page.$$eval('#enhance-chips .chip', (cs) => cs.map((c) => c.title));
  const removedPhrase = before[0];
  await page.click('#enhance-chips .chip-x >> nth=0');
  await page.waitForFunction((p) => ![...document.querySelectorAll('#enhance-chips .chip')].some((c) => c.title === p)
    && [...document.querySelectorAll('#enhance-removed .chip')].some((c) => c.textContent.includes(p)), removedPhrase, { timeout: 10_000 })
    .catch(() => fail('remove a chip', `"${removedPhrase}" did not move to removed`));
  await page.$eval('#cfg', (e) => { e.value = '3'; e.dispatchEvent(new Event('input', { bubbles: true })); });
  await page.waitForFunction(() => [...document.querySelectorAll('#enhance-advice li')].some((l) => /CFG 3/.test(l.textContent)), null, { timeout: 10_000 })
    .catch(async () => fail('advice reads the form', `advice: ${await page.$eval('#enhance-advice', (e) => e.innerText)}`));
  const y0 = await page.$eval('#generate', (e) => e.getBoundingClientRect().top + window.scrollY);
  await page.click('label[for="enhance"]');
  await page.waitForTimeout(600);
  const y1 = await page.$eval('#generate', (e) => e.getBoundingClientRect().top + window.scrollY);
  await page.click('label[for="enhance"]');
  check(Math.abs(y1 - y0) < 1, 'no layout jump', `Generate moved ${y1 - y0} px when toggling enhancement`);
  await page.$eval('#cfg', (e) => { e.value = e.min; e.dispatchEvent(new Event('input', { bubbles: true })); });
  await fillSmall(page, 'a serene mountain lake at dawn', { steps: 1 });
  await page.waitForTimeout(500);
  const third = await generate(page, 'job without a removed phrase');
  check(Array.isArray(third.sent.enhance_exclude) && third.sent.enhance_exclude.includes(removedPhrase), 'enhance_exclude sent', JSON.stringify(third.sent));
  await waitResult(page, third.id, 'job without a removed phrase');
  const rec3 = (await api(page, `/api/jobs/${third.id}`)).body;
  check(!rec3.enhancement.added.prompt.includes(removedPhrase) && !rec3.params.prompt.includes(removedPhrase), 'removed phrase stays removed', JSON.stringify(rec3.enhancement.added));
  ok('enhancement: advice follows CFG, a removed chip stays out of the job, no layout jump', removedPhrase);

  // image to image with a painted mask and a LoRA: "Use as input" in the lightbox, the strength
  // slider, a stroke painted with the mouse and one with the keyboard, invert twice, Generate.
  await page.click(`#gallery figure[data-job-id="${third.id}"] .thumb >> nth=0`);
  await page.waitForSelector('#viewer[open]');
  check(await page.$eval('#viewer-input', (b) => !b.hidden), 'use as input shown', '/api/info lists img2img and the form has its input slot, yet the button is hidden');
  await page.click('#viewer-input');
  await page.waitForFunction(() => document.documentElement.dataset.initImage === '128x128', null, { timeout: 10_000 })
    .catch(() => fail('use as input', 'the result did not become a 128×128 input image'));
  check(await page.isVisible('#init-preview') && await page.isVisible('#mask-canvas'), 'use as input', 'the input image or the mask canvas is not shown');
  ok('result used as input image (lightbox → img2img slot)');

  await page.$eval('#strength', (e) => { e.value = '0.75'; e.dispatchEvent(new Event('input', { bubbles: true })); });
  check((await page.$eval('#strength-value', (e) => e.textContent)) === '0.75', 'strength slider', 'the value readout did not follow the slider');
  const coverage = () => page.$eval('#mask-info', (e) => Number(e.dataset.coverage));
  check((await coverage()) === 0, 'mask', 'a fresh input image already has a mask');
  // "Use as input" scrolls the section into view smoothly: wait until the canvas stops moving.
  let box = null;
  for (let i = 0; i < 40; i++) {
    const b = await page.locator('#mask-canvas').boundingBox();
    if (box && b && b.x === box.x && b.y === box.y && b.width === box.width) break;
    box = b;
    await page.waitForTimeout(100);
  }
  check(box && box.width >= 20, 'mask', `the mask canvas is not laid out (${JSON.stringify(box)})`);
  await page.mouse.move(box.x + box.width * 0.15, box.y + box.height * 0.2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width * 0.35, box.y + box.height * 0.6, { steps: 10 });
  await page.mouse.up();
  const painted = await coverage();
  check(painted > 0.01 && painted < 0.9, 'mask painted with the mouse', `coverage ${painted}`);
  await page.focus('#mask-canvas');
  await page.keyboard.down(' ');
  for (let i = 0; i < 4; i++) await page.keyboard.press('ArrowRight');
  await page.keyboard.up(' ');
  const painted2 = await coverage();
  check(painted2 > painted, 'mask painted with the keyboard', `coverage ${painted} → ${painted2}`);
  await page.click('#mask-invert');
  const inverted = await coverage();
  check(Math.abs(inverted - (1 - painted2)) <= 0.01, 'mask invert', `coverage ${painted2} inverted to ${inverted}`);
  await page.click('#mask-invert');
  ok('mask painted', `mouse ${(painted * 100).toFixed(1)}%, keyboard → ${(painted2 * 100).toFixed(1)}%, invert ok`);

  // The LoRA picker: the folder's one LoRA, added with weight 0.6.
  await page.waitForSelector('#lora-add option[value="style"]', { state: 'attached', timeout: 10_000 })
    .catch(() => fail('LoRA picker', 'the LoRA folder\'s `style` is not offered'));
  await page.selectOption('#lora-add', 'style');
  await page.click('#lora-add-btn');
  await page.fill('#lora-weight-0', '0.6');
  ok('LoRA picked', 'style at 0.6');

  const i2i = await generate(page, 'inpainting job');
  const i2iSent = i2i.sent;
  check(/^data:image\/png;base64,/.test(i2iSent.image || ''), 'inpaint: request body', 'no PNG `image` sent');
  check(/^data:image\/png;base64,/.test(i2iSent.mask || ''), 'inpaint: request body', 'no PNG `mask` sent');
  check(JSON.stringify(i2iSent.loras) === JSON.stringify([{ name: 'style', weight: 0.6 }]), 'inpaint: request body', `loras ${JSON.stringify(i2iSent.loras)}`);
  check(i2iSent.strength === 0.75 && i2iSent.mask_blur === 4, 'inpaint: request body', `strength ${i2iSent.strength}, mask_blur ${i2iSent.mask_blur}`);
  // The mask sent is black and white: white where the stroke went, black in the far corner.
  const px = await page.evaluate(async (src) => {
    const img = new Image();
    img.src = src;
    await img.decode();
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d');
    g.drawImage(img, 0, 0);
    const at = (fx, fy) => [...g.getImageData(Math.floor(fx * c.width), Math.floor(fy * c.height), 1, 1).data];
    return { w: c.width, h: c.height, stroke: at(0.25, 0.4), corner: at(0.95, 0.95) };
  }, i2iSent.mask);
  check(px.w === 128 && px.h === 128, 'inpaint: mask', `mask is ${px.w}×${px.h}, the image 128×128`);
  check(!px.stroke.slice(0, 3).some((v) => v !== 255) && !px.corner.slice(0, 3).some((v) => v !== 0), 'inpaint: mask',
    `expected white under the stroke and black in the corner, got ${px.stroke} / ${px.corner}`);
  const i2iOut = await waitResult(page, i2i.id, 'inpainted image in #gallery');
  check(i2iOut.w === 128 && i2iOut.h === 128, 'inpainted image size', `expected 128×128, got ${i2iOut.w}×${i2iOut.h}`);
  const rp = ((await api(page, `/api/jobs/${i2i.id}`)).body || {}).params || {};
  check(rp.strength === 0.75 && rp.init_image && rp.mask_image && JSON.stringify(rp.loras) === JSON.stringify([{ name: 'style', weight: 0.6 }]),
    'inpaint: job record', `params ${JSON.stringify(rp).slice(0, 300)}`);
  ok('inpainting job done', `${i2iOut.src}, strength ${rp.strength}, mask ${String(rp.mask_image).slice(0, 12)}…`);
  await page.click('#init-remove');

  // Models panel: a big download asks first, then runs
  const pullModel = process.env.PULL_MODEL;
  if (pullModel) {
    const btn = `#models li[data-model="${pullModel}"] button.pull-btn`;
    await page.waitForSelector(btn, { timeout: 10_000 }).catch(() => fail('download button', `no Download button for ${pullModel}`));
    await page.click(btn);
    await page.waitForSelector('#confirm-dialog[open]', { timeout: 5000 }).catch(() => fail('download confirmation', 'no question before a download over 1 GB'));
    const q = await page.$eval('#confirm-text', (e) => e.textContent);
    check(/GiB/.test(q), 'download size in GiB', q);
    const pullResp = page.waitForResponse((r) => r.url().endsWith(`/api/models/${pullModel}/pull`), { timeout: 10_000 });
    await page.click('#confirm-ok');
    const pr = await pullResp.catch(() => fail('POST pull', 'no request within 10 s of confirming'));
    check(pr.status() === 202, 'POST pull', `status ${pr.status()}`);
    await page.waitForFunction((name) => {
      const li = document.querySelector(`#models li[data-model="${name}"]`);
      return li && li.querySelector('.state-on_disk');
    }, pullModel, { timeout: 30_000, polling: 200 }).catch(async () => {
      fail('download finished', `${pullModel} never showed as on disk: ${(await page.$eval('#models', (e) => e.innerText)).replace(/\s+/g, ' ').slice(0, 300)}`);
    });
    ok('model downloaded from the UI after a confirmation', q);
  }

  await page.waitForTimeout(500);
  check(!errors.length, 'console clean', () => `${errors.length} error(s):\n  ${errors.slice(0, 10).join('\n  ')}`);
  ok('no console errors (desktop)');

  // screenshots and axe: light/dark × English/Chinese (once finished rows have left the queue)
  await page.waitForFunction(() => !document.querySelector('#queue .job'), null, { timeout: 15_000 }).catch(() => {});
  await page.evaluate(() => window.scrollTo(0, 0));
  await fullPageShot(page, 1280, join(shotDir, 'browser-desktop.png'));
  await docShot(page, 'ui-desktop.jpg');
  await axeScan(page, 'light, en');
  await page.emulateMedia({ colorScheme: 'dark' });
  await page.waitForTimeout(200);
  await axeScan(page, 'dark, en');
  await page.screenshot({ path: join(shotDir, 'browser-dark.png') });
  await page.selectOption('#lang-picker', 'zh-CN');
  await page.waitForFunction(() => document.documentElement.lang === 'zh-CN' && document.getElementById('generate').innerText.includes('生成'), null, { timeout: 5000 })
    .catch(() => fail('language switch', 'the page did not switch to Chinese'));
  await axeScan(page, 'dark, zh-CN');
  await page.emulateMedia({ colorScheme: 'light' });
  await page.waitForTimeout(200);
  await axeScan(page, 'light, zh-CN');
  // a Chinese prompt counts characters
  await page.fill('#prompt', '黎明时分宁静的高山湖泊，薄雾升起，岸边松林');
  const counter = await page.$eval('#word-count', (e) => e.textContent);
  check(/19 个字/.test(counter), 'CJK prompt length', `counter says "${counter}"`);
  await page.waitForTimeout(600);
  const zhShown = await serverTextsInChinese(page);
  await docShot(page, 'ui-zh-CN.jpg');
  await fieldErrorInChinese(page, zhShown);
  await page.screenshot({ path: join(shotDir, 'browser-zh-CN.png') });
  // The form's lower half: the advice list and the image-to-image section, in Chinese.
  await page.$eval('#enhance-advice', (e) => e.scrollIntoView({ block: 'end' }));
  await page.waitForTimeout(150);
  await page.screenshot({ path: join(shotDir, 'browser-zh-CN-form.png') });
  await noticeInChinese(page);
  // kept across a reload
  await page.reload({ waitUntil: 'domcontentloaded' });
  await waitReady(page, 'reload in Chinese');
  check(await page.$eval('html', (e) => e.lang) === 'zh-CN', 'language kept', 'the choice did not survive a reload');
  await page.selectOption('#lang-picker', 'en');
  ok('languages: switchable, kept in localStorage, CJK prompts counted in characters', counter);
  await context.close();
}

/** English words a Chinese server text may not hold (names and units like CFG, UNet, VAE pass). */
function englishWords(text) {
  return (text.match(/\b[a-z]{3,}\b/g) || []);
}

function chineseServerText(text, name) {
  check(/[\u4e00-\u9fff]/.test(text), name, `no Chinese in "${text}"`);
  const en = englishWords(text);
  check(!en.length, name, `English words ${en.join(', ')} in "${text}"`);
}

/**
 * zh-CN: what the server writes shows in Chinese — the step and CFG hints (the family profile's
 * bands), the enhancement preview's advice, and the image-to-image section's own texts.
 */
async function serverTextsInChinese(page) {
  await page.fill('#steps', '4');
  await page.waitForTimeout(100);
  const stepsHint = await page.$eval('#steps-hint', (e) => e.textContent);
  chineseServerText(stepsHint, 'zh-CN step hint');
  const cfgHint = await page.$eval('#cfg-hint', (e) => e.textContent);
  chineseServerText(cfgHint, 'zh-CN CFG hint');
  await page.waitForFunction(() => {
    const box = document.getElementById('enhance-preview');
    return !box.classList.contains('stale') && document.querySelectorAll('#enhance-advice li').length >= 3;
  }, null, { timeout: 10_000 }).catch(() => fail('zh-CN advice', 'the enhancement preview did not update'));
  const advice = await page.$$eval('#enhance-advice li', (lis) => lis.map((li) => li.textContent));
  for (const a of advice) chineseServerText(a, 'zh-CN advice');
  // The image-to-image section's own texts switch too (file names, syntax and units excepted).
  const i2i = await page.$eval('#img2img', (e) => e.innerText);
  const syntax = new Set(['lora', 'name', 'loras', 'models', 'dir', 'safetensors', 'style', 'png']);
  const i2iEnglish = englishWords(i2i).filter((w) => !syntax.has(w.toLowerCase()));
  check(/[\u4e00-\u9fff]/.test(i2i) && !i2iEnglish.length, 'zh-CN image to image', `English words ${i2iEnglish.join(', ')} in "${i2i.replace(/\s+/g, ' ').slice(0, 300)}"`);
  return `${stepsHint} | ${advice.length} advice`;
}

/**
 * zh-CN: a field error of POST /api/jobs in Chinese (an out-of-range width slipped past the form's
 * own checks, so the server answers 422 naming the field), shown next to the field.
 */
async function fieldErrorInChinese(page, shown) {
  const jobsUrl = (u) => new URL(u).pathname === '/api/jobs';
  const widen = async (route) => {
    if (route.request().method() !== 'POST') return route.continue();
    const body = JSON.parse(route.request().postData() || '{}');
    await route.continue({ postData: JSON.stringify({ ...body, width: 1 }) });
  };
  await page.route(jobsUrl, widen);
  const resp = page.waitForResponse((r) => jobsUrl(r.url()) && r.request().method() === 'POST', { timeout: 15_000 });
  await page.click('#generate');
  const r = await resp.catch(() => fail('zh-CN field error', 'no POST /api/jobs'));
  await page.unroute(jobsUrl, widen);
  check(r.status() === 422, 'zh-CN field error', `status ${r.status()}`);
  const body = await r.json();
  check(body.error.field === 'width' && body.error.i18n && body.error.i18n['zh-CN'], 'zh-CN field error', JSON.stringify(body));
  await page.waitForFunction(() => !document.getElementById('width-error').hidden, null, { timeout: 5000 })
    .catch(() => fail('zh-CN field error', 'no error next to the width field'));
  const widthError = await page.$eval('#width-error', (e) => e.textContent);
  chineseServerText(widthError, 'zh-CN field error');
  check(widthError.includes('（当前为 1）'), 'zh-CN field error', `"${widthError}" does not name the value`);
  ok('zh-CN: the server\'s texts in Chinese', `${shown} | ${widthError}`);
}

/** zh-CN: a notice the engine makes (CFG intercepted and clamped) shows as a Chinese toast. */
async function noticeInChinese(page) {
  await fillSmall(page, '黎明时分宁静的高山湖泊', { steps: 1 });
  const jobsUrl = (u) => new URL(u).pathname === '/api/jobs';
  const hot = async (route) => {
    if (route.request().method() !== 'POST') return route.continue();
    const body = JSON.parse(route.request().postData() || '{}');
    await route.continue({ postData: JSON.stringify({ ...body, cfg: 3.2 }) });
  };
  await page.route(jobsUrl, hot);
  const { id } = await generate(page, 'zh-CN notice');
  await page.unroute(jobsUrl, hot);
  const toast = await page.waitForFunction(() => {
    const t = [...document.querySelectorAll('.toast')].map((e) => e.textContent).find((x) => x.includes('3.2'));
    return t || null;
  }, null, { timeout: GEN_TIMEOUT_MS, polling: 100 }).then((h) => h.jsonValue())
    .catch(() => fail('zh-CN notice', 'no toast for the clamped CFG'));
  chineseServerText(toast, 'zh-CN notice');
  await waitResult(page, id, 'zh-CN notice');
  ok('zh-CN: notices in Chinese', toast);
}

/* ------------------------------------------------------------------ *
 * 3. the profile contract: presets, bands and texts come from /api/info
 * ------------------------------------------------------------------ */

async function profileContract(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const errors = [];
  watchErrors(page, errors);
  // Numbers no family has: the page can only show them by reading them.
  const injected = {
    family: 'z-image',
    steps: { presets: [3, 5, 9], bands: [
      { max: 4, level: 'warn', hint: 'few: {value} below {default}', advice: 'a' },
      { max: 5, level: 'ok', hint: 'five is right ({value})', advice: 'b' },
      { max: null, level: 'bad', hint: 'too many: {value}', advice: 'c' },
    ] },
    cfg: { presets: [1.3, 1.9], intercept_at: 2.5, bands: [
      { max: 1.0, level: 'info', hint: 'off at {value}', advice: '' },
      { max: 2.0, level: 'ok', hint: 'fine {value}, default {default}', advice: '' },
      { max: null, level: 'bad', hint: 'above the safe {safe}', advice: '' },
    ] },
  };
  await page.route('**/api/info', async (route) => {
    const res = await route.fetch();
    const body = await res.json();
    body.model.profile = injected;
    await route.fulfill({ response: res, json: body });
  });
  await page.goto(base, { waitUntil: 'domcontentloaded' });
  await waitReady(page, 'profile page');
  const presets = await page.$$eval('#steps-presets button', (bs) => bs.map((b) => b.textContent));
  check(JSON.stringify(presets) === '["3","5","9"]', 'step presets from the profile', `buttons ${JSON.stringify(presets)}`);
  await page.click('#steps-presets button >> nth=0');
  const hint = await page.$eval('#steps-hint', (e) => ({ text: e.textContent, cls: e.className }));
  const d = await page.evaluate(async () => (await (await fetch('/api/info')).json()).model.defaults);
  check(hint.text === `few: 3 below ${d.steps}` && /warn/.test(hint.cls), 'steps band', JSON.stringify(hint));
  await page.fill('#steps', '12');
  await page.dispatchEvent('#steps', 'input');
  const hint2 = await page.$eval('#steps-hint', (e) => ({ text: e.textContent, cls: e.className }));
  check(hint2.text === 'too many: 12' && /bad/.test(hint2.cls), 'unbounded band', JSON.stringify(hint2));
  const max = await page.$eval('#cfg', (e) => e.max);
  check(Number(max) === 2.5, 'CFG slider ends at intercept_at', `max ${max}`);
  const marks = await page.$$eval('#cfg-marks option', (os) => os.map((o) => Number(o.value)));
  check(marks.includes(1.3) && marks.includes(1.9), 'CFG presets', JSON.stringify(marks));
  await page.$eval('#cfg', (e) => { e.value = '2.2'; e.dispatchEvent(new Event('input', { bubbles: true })); });
  const cfgHint = await page.$eval('#cfg-hint', (e) => e.textContent);
  check(/^above the safe \d/.test(cfgHint), 'CFG band with {safe}', cfgHint);
  check(!errors.length, 'console clean (profile)', errors.join(' | '));
  ok('presets, bands and limits come from /api/info (injected profile)', `${hint.text}; ${hint2.text}; ${cfgHint}`);
  await context.close();
}

/* ------------------------------------------------------------------ *
 * 3b. the img2img / ControlNet hooks: with the features announced and their fields present,
 *     "use as input" / "use as control" fill the field and tell it which image
 * ------------------------------------------------------------------ */

async function imageHooks(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const errors = [];
  watchErrors(page, errors);
  await page.route('**/api/info', async (route) => {
    const res = await route.fetch();
    const body = await res.json();
    body.features = ['img2img', 'controlnet'];
    await route.fulfill({ response: res, json: body });
  });
  // The fields those features' own modules add to the form (js/img2img.js, js/control.js).
  // Every use-image event is recorded on its field.
  await page.addInitScript(() => {
    document.addEventListener('zturbo:use-image', (e) => { e.target.dataset.job = e.detail.jobId; e.target.dataset.index = String(e.detail.index); }, true);
  });
  await page.goto(base, { waitUntil: 'domcontentloaded' });
  await waitReady(page, 'hooks page');
  await page.waitForSelector('#gallery figure .thumb', { timeout: 10_000 }).catch(() => fail('hooks', 'no image in the gallery'));
  for (const slot of ['input', 'control']) {
    await page.click('#gallery figure .thumb >> nth=0');
    await page.waitForSelector('#viewer[open]');
    const button = `#viewer-${slot}`;
    check(await page.$eval(button, (b) => !b.hidden), `use as ${slot} shown`, 'hidden although /api/info announces the feature and the field exists');
    const src = await page.$eval('#viewer-stage img', (i) => i.getAttribute('src'));
    await page.click(button);
    const got = await page.$eval(`[data-image-slot="${slot}"]`, (f) => ({ value: f.value, job: f.dataset.job, index: f.dataset.index }));
    check(got.value === src && got.job && got.index === '0', `use as ${slot}`, `${JSON.stringify(got)} for ${src}`);
    check(!(await page.$('#viewer[open]')), `use as ${slot} closes the viewer`, 'still open');
  }
  // The Control section is shown with the feature, and the result became its control image.
  check(await page.$eval('#control', (f) => !f.hidden), 'control section shown', 'hidden although /api/info lists controlnet');
  await page.waitForSelector('#control-image:not([hidden])', { timeout: 5_000 }).catch(() => fail('use as control', 'the control image is not shown'));
  check(!errors.length, 'console clean (hooks)', errors.join(' | '));
  ok('use as input / use as control fill the fields img2img and ControlNet add (hidden without the feature)');
  await context.close();
}

/* ------------------------------------------------------------------ *
 * 4. a slow server of our own: phone, queue control, outage
 * ------------------------------------------------------------------ */

class OwnServer {
  constructor(bin, outputs, env) {
    this.bin = bin;
    this.outputs = outputs;
    this.env = env;
    this.child = null;
    this.url = null;
    this.port = 0;
    this.log = [];
  }

  async start(port = 0) {
    const child = spawn(this.bin, ['serve', '--model', 'demo', '--port', String(port), '--outputs', this.outputs,
      '--models-dir', join(this.outputs, '..', 'no-models')], {
      env: { ...process.env, ZTURBO_LOG: 'info,tower_http=warn', ...this.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = child;
    child.stderr.on('data', (d) => { this.log.push(String(d)); if (this.log.length > 400) this.log.shift(); });
    const line = await new Promise((resolve, reject) => {
      const rl = createInterface({ input: child.stdout });
      const timer = setTimeout(() => reject(new Error('no `listening on` line within 60 s')), 60_000);
      rl.once('line', (l) => { clearTimeout(timer); resolve(l); });
      child.once('exit', (code) => reject(new Error(`exited with ${code}: ${this.log.join('').slice(-800)}`)));
    });
    this.url = line.replace('listening on ', '').trim();
    this.port = Number(new URL(this.url).port);
    return this.url;
  }

  async kill() {
    if (!this.child) return;
    const c = this.child;
    this.child = null;
    const exited = new Promise((r) => c.once('exit', r));
    c.kill('SIGKILL');
    await exited;
  }
}

async function slowServerSections(browser) {
  const bin = process.env.ZTURBO_BIN;
  const scratch = process.env.SCRATCH_DIR;
  if (!bin || !scratch) {
    console.log('skip phone/queue/outage sections: ZTURBO_BIN or SCRATCH_DIR not set');
    return;
  }
  const server = new OwnServer(bin, join(scratch, 'slow-outputs'), { ZTURBO_TEST_WORKER_DELAY_MS: '250' });
  try {
    const url = await server.start(0).catch((e) => fail('start the slow server', e.message));
    await phone(browser, url);
    await queueControl(browser, url);
    await outage(browser, server);
  } finally {
    await server.kill();
  }
}

async function phone(browser, url) {
  const context = await browser.newContext({
    viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true, locale: 'en-US',
  });
  const page = await context.newPage();
  const errors = [];
  watchErrors(page, errors);
  await page.goto(url, { waitUntil: 'domcontentloaded' });
  await waitReady(page, 'phone page');
  // The demo banner can be dismissed.
  if (await page.isVisible('#demo-banner')) {
    await page.tap('#demo-dismiss');
    check(!(await page.isVisible('#demo-banner')), 'dismiss the banner', 'still visible');
  }
  check(!(await page.isVisible('#shortcut-hint')), 'no shortcut text on touch', 'the Generate button shows a keyboard shortcut');
  const small = await page.$$eval('button, select, input, .link-btn, summary', (els) => els
    .filter((e) => { const r = e.getBoundingClientRect(); const s = getComputedStyle(e); return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && !e.closest('dialog') && !e.classList.contains('visually-hidden') && e.type !== 'radio' && e.type !== 'checkbox' && e.type !== 'range' && e.type !== 'file'; })
    .map((e) => { const r = e.getBoundingClientRect(); return { id: e.id || e.className || e.tagName, w: Math.round(r.width), h: Math.round(r.height) }; })
    .filter((b) => b.h < 44 || b.w < 44));
  check(!small.length, 'tap targets ≥ 44 px', JSON.stringify(small.slice(0, 8)));
  await fillSmall(page, 'a lighthouse on a cliff at sunset, long exposure', { steps: 8 });
  await page.tap('#generate');
  // After Generate the progress is on screen (the hero scrolled into view, or the sticky bar).
  const where = await page.waitForFunction(() => {
    const vis = (el) => { if (!el || el.hidden) return false; const r = el.getBoundingClientRect(); return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight; };
    const hero = document.getElementById('hero-progress');
    const mini = document.getElementById('mini-progress');
    if (vis(hero)) return 'hero';
    if (vis(mini)) return 'mini';
    return null;
  }, null, { timeout: 5000, polling: 100 }).then((h) => h.jsonValue()).catch(() => fail('phone progress', 'after Generate no progress is within the 390×844 viewport'));
  // The job's live previews reach the hero while it runs (one pixel per latent cell).
  const preview = await page.waitForFunction(() => {
    const img = document.getElementById('hero-image');
    return img.dataset.preview && img.src.startsWith('data:image/png') && img.complete && img.naturalWidth > 0
      ? { step: Number(img.dataset.preview), w: img.naturalWidth, h: img.naturalHeight } : null;
  }, null, { timeout: 10_000, polling: 100 }).then((h) => h.jsonValue()).catch(() => fail('live preview', 'no preview image in the hero while the job runs'));
  check(preview.w === 16 && preview.h === 16 && preview.step >= 1, 'live preview', JSON.stringify(preview));
  const seedOverflow = await page.$$eval('.job-meta, .hero-meta', (els) => els.some((e) => e.scrollWidth > e.clientWidth + 1));
  check(!seedOverflow, 'seeds wrap', 'a seed overflows its card');
  await page.waitForTimeout(800);
  await page.screenshot({ path: join(shotDir, 'browser-phone.png') });
  await docShot(page, 'ui-phone.jpg');
  await page.waitForFunction(() => !document.querySelector('#queue .job:not(.leaving)') || [...document.querySelectorAll('#queue .job')].every((j) => /done/.test(j.innerText)), null, { timeout: 60_000 }).catch(() => {});
  check(!errors.length, 'console clean (phone)', errors.join(' | '));
  ok('phone 390×844: progress in view after Generate, live preview in the hero, 44 px targets, banner dismissed, no shortcut text', `shown by the ${where} progress; preview at step ${preview.step}, ${preview.w}×${preview.h} px`);
  await context.close();
}

async function queueControl(browser, url) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const errors = [];
  watchErrors(page, errors);
  await page.goto(url, { waitUntil: 'domcontentloaded' });
  await waitReady(page, 'queue page');
  const ids = [];
  for (let i = 0; i < 4; i++) {
    await fillSmall(page, `a small boat on a lake number ${i + 1}`, { steps: 30 });
    ids.push((await generate(page, `queue job ${i + 1}`)).id);
  }
  // Each row takes the server's resolved seed from the job's record, fetched after the submit
  // answers: wait for those too (on a loaded machine the last one can lag the running state).
  await page.waitForFunction(() => {
    const first = document.querySelector('#queue .job');
    const rows = [...document.querySelectorAll('#queue .job .job-meta')];
    return first && first.classList.contains('running') && rows.every((m) => /seed \d+/.test(m.innerText));
  }, null, { timeout: 10_000 }).catch(async () => fail('running pinned on top', (await page.$eval('#queue', (e) => e.innerText)).replace(/\s+/g, ' ')));
  const rows = await page.$$eval('#queue .job', (ls) => ls.map((l) => ({ id: l.dataset.jobId, meta: l.querySelector('.job-meta').innerText, label: l.querySelector('.bar').getAttribute('aria-label') })));
  check(rows[0].id === ids[0], 'running on top', JSON.stringify(rows));
  check(rows.every((r) => /seed \d+/.test(r.meta) && /128×128/.test(r.meta) && /30 steps/.test(r.meta)), 'rows show seed, size, steps', JSON.stringify(rows));
  check(rows.every((r) => /small boat/.test(r.label)), 'progress bars named after their job', JSON.stringify(rows));
  check(await page.$eval('#queue', (e) => !e.hasAttribute('aria-live')), 'queue not aria-live', 'the whole queue is a live region');
  await page.waitForSelector('#cancel-all:not([hidden])', { timeout: 5000 }).catch(() => fail('cancel all', 'no Cancel-all button with 3 queued jobs'));
  await page.click('#cancel-all');
  for (const id of ids.slice(1)) {
    await page.waitForFunction(async (jid) => (await (await fetch(`/api/jobs/${jid}`)).json()).state === 'cancelled', id, { timeout: 10_000, polling: 200 })
      .catch(() => fail('cancel all', `job ${id} was not cancelled`));
  }
  const runningState = (await api(page, `/api/jobs/${ids[0]}`)).body.state;
  check(runningState === 'running', 'cancel all leaves the running job', runningState);
  const announced = await page.$eval('#announcer', (e) => e.textContent);
  await page.keyboard.press('Escape');
  await page.waitForFunction(async (jid) => (await (await fetch(`/api/jobs/${jid}`)).json()).state === 'cancelled', ids[0], { timeout: 15_000, polling: 200 })
    .catch(() => fail('Esc', 'Esc did not cancel the running job'));
  await page.waitForFunction(() => !document.querySelector('#queue .job:not(.leaving)'), null, { timeout: 10_000 })
    .catch(() => fail('finished jobs leave the queue', 'rows stayed'));
  check(!errors.length, 'console clean (queue)', errors.join(' | '));
  ok('queue: running pinned on top, rows show seed/size/steps, cancel-all, Esc cancels the running job', `announcer said "${announced}"`);
  await context.close();
}

async function outage(browser, server) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const errors = [];
  watchErrors(page, errors, { allowFailedRequests: true });
  await page.goto(server.url, { waitUntil: 'domcontentloaded' });
  await waitReady(page, 'outage page');
  await fillSmall(page, 'a castle in the fog at dawn', { steps: 12 });
  const { id } = await generate(page, 'outage job');
  await page.waitForFunction((jid) => /step [2-9]/.test(document.querySelector(`#queue .job[data-job-id="${jid}"]`)?.innerText || ''), id, { timeout: 20_000 })
    .catch(() => fail('outage', 'the job never reached step 2'));
  await server.kill();
  await page.waitForSelector('#offline-banner:not([hidden])', { timeout: 10_000 }).catch(() => fail('outage banner', 'no banner within 10 s of killing the server'));
  await page.waitForFunction(() => document.getElementById('generate').disabled, null, { timeout: 5000 }).catch(() => fail('outage', 'Generate stays enabled'));
  await page.waitForFunction((jid) => document.querySelector(`#queue .job[data-job-id="${jid}"]`)?.classList.contains('stale'), id, { timeout: 5000 })
    .catch(() => fail('outage', 'the running row is not marked stale'));
  await page.screenshot({ path: join(shotDir, 'browser-outage.png') });
  ok('outage: banner, Generate disabled, stale row');
  await server.start(server.port).catch((e) => fail('restart the server', e.message));
  await page.waitForSelector('#offline-banner[hidden]', { state: 'attached', timeout: 20_000 }).catch(() => fail('reconnect', 'the banner stayed after the restart'));
  await page.waitForFunction(() => !document.getElementById('generate').disabled, null, { timeout: 10_000 }).catch(() => fail('reconnect', 'Generate stayed disabled'));
  await page.waitForFunction((jid) => /restarted after the server restarted/.test(document.querySelector(`#queue .job[data-job-id="${jid}"]`)?.innerText || ''), id, { timeout: 20_000 })
    .catch(async () => fail('resumed notice', `row: ${await page.$eval('#queue', (e) => e.innerText)}`));
  await waitResult(page, id, 'the resumed job', 60_000);
  const rec = (await api(page, `/api/jobs/${id}`)).body;
  check(rec.notices.some((n) => n.kind === 'resumed'), 'resumed notice in the record', JSON.stringify(rec.notices));
  check(!(await page.isVisible('#offline-banner')), 'error cleared', 'the outage banner is back');
  const real = errors.filter((e) => !/ERR_CONNECTION_REFUSED|Failed to load|EventSource|net::/.test(e));
  check(!real.length, 'console clean (outage)', real.join(' | '));
  ok('reconnect: banner cleared, state resynced, the resumed job says so and finishes');
  await context.close();
}

/* ------------------------------------------------------------------ *
 * 5. model switching between two local tiny models
 * ------------------------------------------------------------------ */

async function modelSwitch(browser) {
  const url = process.env.SWITCH_URL;
  const names = (process.env.SWITCH_MODELS || '').split(',').filter(Boolean);
  if (!url || names.length < 2) {
    console.log('skip model switching: SWITCH_URL / SWITCH_MODELS not set');
    return;
  }
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const errors = [];
  watchErrors(page, errors);
  await page.goto(url, { waitUntil: 'domcontentloaded' });
  await waitReady(page, 'switch page');
  const loaded = await page.evaluate(async () => (await (await fetch('/api/info')).json()).model.name);
  const other = names.find((n) => n !== loaded);
  await page.waitForFunction((n) => [...document.querySelectorAll('#model-picker option')].some((o) => o.value === n) && !document.getElementById('model-picker').disabled, other, { timeout: 10_000 })
    .catch(async () => fail('checkpoint picker', `no ${other} in ${await page.$$eval('#model-picker option', (os) => os.map((o) => o.value))}`));
  await page.selectOption('#model-picker', other);
  await page.waitForFunction(async (n) => (await (await fetch('/api/info')).json()).model.name === n, other, { timeout: 60_000, polling: 300 })
    .catch(() => fail('switch from the page', `/api/info never named ${other}`));
  await page.waitForFunction((n) => document.getElementById('model-pill').textContent.startsWith(n), other, { timeout: 10_000 })
    .catch(() => fail('switch from the page', 'the page did not show the new model'));
  const health = (await api(page, '/api/health')).body;
  check(health.model === other, '/api/health names the model', JSON.stringify(health));
  // a job on the new model records it
  const d = await page.evaluate(async () => (await (await fetch('/api/info')).json()).model);
  await fillSmall(page, 'a quiet harbour at dusk', { steps: 1, size: d.size_multiple * 8 });
  const { id } = await generate(page, 'job on the switched model');
  await waitResult(page, id, 'job on the switched model');
  const rec = (await api(page, `/api/jobs/${id}`)).body;
  check(rec.params.model === other, 'the job records its model', JSON.stringify(rec.params));
  ok('model switch from the page', `${loaded} → ${other}; job ran on ${rec.params.model}`);
  // and back through the A1111 options call
  const post = await api(page, '/sdapi/v1/options', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ sd_model_checkpoint: loaded }) });
  check(post.status === 200, 'POST /sdapi/v1/options', `${post.status} ${JSON.stringify(post.body)}`);
  const opts = (await api(page, '/sdapi/v1/options')).body;
  check(opts.sd_model_checkpoint === loaded, 'GET /sdapi/v1/options reports the switch', JSON.stringify(opts));
  await page.waitForFunction((n) => document.getElementById('model-pill').textContent.startsWith(n), loaded, { timeout: 20_000 })
    .catch(() => fail('switch through the A1111 API', 'the page did not follow the switch'));
  check(!errors.length, 'console clean (switch)', errors.join(' | '));
  ok('model switch through POST /sdapi/v1/options, reported by GET and followed by the page', `${other} → ${loaded}`);
  await context.close();
}

/* ------------------------------------------------------------------ *
 * 6. a server with --api-key: the page asks for the key once, then works
 * ------------------------------------------------------------------ */

async function keyed(browser) {
  const keyedUrl = process.env.KEYED_URL;
  if (!keyedUrl) return;
  const key = process.env.KEYED_KEY || '';
  const kctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const kpage = await kctx.newPage();
  await kpage.goto(keyedUrl, { waitUntil: 'domcontentloaded', timeout: 30_000 })
    .catch((e) => fail('open keyed page', e.message.split('\n')[0]));
  await kpage.waitForSelector('#key-dialog[open]', { timeout: 10_000 })
    .catch(() => fail('key prompt', 'the page did not ask for the API key'));
  await kpage.fill('#key-input', 'not-the-key');
  await kpage.click('#key-dialog button[type=submit]');
  await kpage.waitForFunction(() => document.getElementById('key-error').textContent.length > 0, null, { timeout: 10_000 })
    .catch(() => fail('wrong key', 'no error shown for a wrong key'));
  await kpage.fill('#key-input', key);
  await Promise.all([
    kpage.waitForNavigation({ timeout: 15_000 }).catch(() => null),
    kpage.click('#key-dialog button[type=submit]'),
  ]);
  await waitReady(kpage, 'keyed page');
  check(!(await kpage.$('#key-dialog[open]')), 'keyed page', 'the key prompt is still open');
  ok('API key prompt', 'wrong key refused, right key lets the page load');
  await kctx.close();
}

let browser;
let exitCode = 0;
try {
  await messages();
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: LAUNCH_ARGS })
    .catch((e) => fail('launch chromium', e.message.split('\n')[0]));
  await desktop(browser);
  await profileContract(browser);
  await imageHooks(browser);
  await slowServerSections(browser);
  await modelSwitch(browser);
  await keyed(browser);
} catch (e) {
  exitCode = 1;
  if (!(e instanceof CheckFailed)) {
    failed++;
    console.error(`FAIL unexpected: ${e && e.stack ? e.stack : e}`);
  }
} finally {
  if (browser) await browser.close().catch(() => {});
}

console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(exitCode || (failed ? 1 : 0));

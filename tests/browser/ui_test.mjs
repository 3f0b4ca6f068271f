// Browser smoke test of the zturbo web UI.
//
//   npm ci --prefix tests/browser
//   node tests/browser/ui_test.mjs <base_url> <screenshot_path> [narrow_screenshot_path]
//
// Drives the page in headless Chromium (system binary, $CHROMIUM or /usr/bin/chromium):
// waits for /api/info to be applied, sets 128×128 / 8 steps, types a prompt, clicks Generate,
// waits for the job's image to load in #gallery, checks the memory chart received samples and
// that the console stayed free of errors, then saves a full-page screenshot. Before the
// screenshot it presses "Use as input" on that result, sets the strength slider, paints a mask
// with the mouse and the keyboard (and inverts it twice), adds a LoRA with a weight from the
// picker, generates, and checks the request's image, black/white mask and LoRA and the finished
// inpainting job. With PULL_MODEL set,
// it also clicks that model's Download button (the server talks to a fake hub) and waits for the
// progress bar to finish and the model to show as on disk. With KEYED_URL and KEYED_KEY, it opens
// a server started with --api-key, answers the key prompt (a wrong key first) and checks the page
// comes up.
// Exits 0 on success, 1 on any failure (with a message saying which check failed).

import { chromium } from 'playwright-core';

const [baseArg, shotPath, narrowShotPath] = process.argv.slice(2);
if (!baseArg || !shotPath) {
  console.error('usage: node tests/browser/ui_test.mjs <base_url> <screenshot_path> [narrow_screenshot_path]');
  process.exit(2);
}
const base = baseArg.endsWith('/') ? baseArg : `${baseArg}/`;
const GEN_TIMEOUT_MS = 120_000;
const HARD_TIMEOUT_MS = 240_000;

const results = [];
let passed = 0;
let failed = 0;

function ok(name, detail = '') {
  passed++;
  results.push(`ok   ${name}${detail ? ` — ${detail}` : ''}`);
  console.log(`ok   ${name}${detail ? ` — ${detail}` : ''}`);
}

class CheckFailed extends Error {}
function fail(name, detail) {
  failed++;
  const line = `FAIL ${name}: ${detail}`;
  results.push(line);
  console.error(line);
  throw new CheckFailed(line);
}

const hardTimer = setTimeout(() => {
  console.error(`FAIL overall: test exceeded ${HARD_TIMEOUT_MS / 1000} s`);
  console.log(`browser: ${passed} passed, ${failed + 1} failed`);
  process.exit(1);
}, HARD_TIMEOUT_MS);
hardTimer.unref();

// A full-page capture keeps the layout viewport, so position:sticky parts would be drawn
// mid-page; grow the viewport to the document's height first (also loads lazy images).
async function fullPageShot(page, width, path) {
  await page.setViewportSize({ width, height: 800 });
  await page.waitForTimeout(150);
  const h = await page.evaluate(() => Math.ceil(document.documentElement.scrollHeight));
  await page.setViewportSize({ width, height: Math.min(Math.max(h, 800), 12000) });
  await page.waitForFunction(() => [...document.images].every((i) => i.complete), null, { timeout: 5000 }).catch(() => {});
  await page.waitForTimeout(300);
  await page.screenshot({ path, fullPage: true });
}

const consoleErrors = [];
let browser;
let exitCode = 0;

try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  }).catch((e) => fail('launch chromium', e.message.split('\n')[0]));

  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() === 'error') consoleErrors.push(`console.error: ${msg.text()}`);
  });
  page.on('pageerror', (err) => consoleErrors.push(`uncaught: ${err.message}`));
  page.on('requestfailed', (req) => {
    // EventSource streams that we close ourselves show up as aborted; they are not errors.
    const f = req.failure();
    if (f && /ERR_ABORTED/.test(f.errorText)) return;
    consoleErrors.push(`request failed: ${req.method()} ${req.url()} (${f ? f.errorText : '?'})`);
  });

  // 1. page loads and applies /api/info
  const infoResp = page.waitForResponse((r) => r.url().endsWith('/api/info'), { timeout: 20_000 }).catch(() => null);
  const resp = await page.goto(base, { waitUntil: 'domcontentloaded', timeout: 30_000 })
    .catch((e) => fail('open page', e.message.split('\n')[0]));
  if (!resp || !resp.ok()) fail('open page', `HTTP ${resp ? resp.status() : 'no response'} for ${base}`);
  const infoR = await infoResp;
  const info = infoR ? await infoR.json().catch(() => null) : null;
  const errs = () => (consoleErrors.length ? `; page errors: ${consoleErrors.slice(0, 5).join(' | ')}` : '');
  if (!info) fail('GET /api/info', `the page never fetched /api/info (or it was not JSON)${errs()}`);
  await page.waitForFunction(() => document.documentElement.dataset.info === 'ready', null, { timeout: 20_000 })
    .catch(() => fail('apply /api/info', `the page did not mark itself ready within 20 s${errs()}`));
  for (const id of ['prompt', 'generate', 'cancel', 'gallery', 'memory-chart', 'queue']) {
    if (!(await page.$(`#${id}`))) fail('stable hooks', `#${id} is missing`);
  }
  const defaults = await page.evaluate(() => ({
    width: document.getElementById('width').value,
    steps: document.getElementById('steps').value,
    cfg: document.getElementById('cfg').value,
  }));
  const d = info.model && info.model.defaults;
  if (d && (Number(defaults.width) !== d.width || Number(defaults.steps) !== d.steps || Math.abs(Number(defaults.cfg) - d.cfg) > 1e-9)) {
    fail('defaults from /api/info', `form shows ${JSON.stringify(defaults)}, server says ${JSON.stringify(d)}`);
  }
  ok('page loaded and /api/info applied', `model ${info.model && info.model.name}`);

  if (info.model && info.model.demo) {
    const banner = await page.$('#demo-banner');
    const visible = banner && (await banner.isVisible());
    const text = visible ? await banner.innerText() : '';
    if (!visible || !/random weights/i.test(text)) fail('demo notice', 'model.demo is true but the random-weights notice is not shown');
    ok('demo notice shown');
  }

  // 2. fill the form: 128×128, 8 steps, a prompt
  await page.fill('#width', '128');
  await page.fill('#height', '128');
  await page.fill('#steps', '8');
  await page.fill('#prompt', 'a serene mountain lake at dawn, mist rising, pine trees');
  await page.click('body', { position: { x: 2, y: 2 } }).catch(() => {}); // blur: fires change events
  const form = await page.evaluate(() => ({
    w: document.getElementById('width').value, h: document.getElementById('height').value,
    s: document.getElementById('steps').value,
  }));
  if (form.w !== '128' || form.h !== '128' || form.s !== '8') fail('fill form', `got ${JSON.stringify(form)}`);

  // 3. Generate
  const postResp = page.waitForResponse((r) => r.url().endsWith('/api/jobs') && r.request().method() === 'POST', { timeout: 15_000 });
  await page.click('#generate', { timeout: 10_000 }).catch((e) => fail('click #generate', e.message.split('\n')[0]));
  const post = await postResp.catch(() => fail('POST /api/jobs', 'no request was sent within 15 s of clicking Generate'));
  if (post.status() !== 202) {
    const body = await post.text().catch(() => '');
    fail('POST /api/jobs', `status ${post.status()}: ${body.slice(0, 300)}`);
  }
  const { id } = await post.json();
  const sent = post.request().postDataJSON();
  if (sent.width !== 128 || sent.height !== 128 || sent.steps !== 8) {
    fail('request body', `expected 128×128, 8 steps; sent ${JSON.stringify(sent)}`);
  }
  ok('job submitted', `id ${id}`);

  // 4. wait for that job's image to load in the gallery (or its failure card)
  let started = Date.now();
  const waitForImage = async (jobId, what) => {
    const outcome = await page.waitForFunction((j) => {
      const fig = [...document.querySelectorAll('#gallery figure.result')].find((f) => f.dataset.jobId === j);
      if (!fig) return null;
      if (fig.classList.contains('failed')) return { failed: fig.innerText.slice(0, 300) };
      const img = fig.querySelector('img');
      if (!img) return null;
      if (img.complete && img.naturalWidth > 0) return { ok: true, w: img.naturalWidth, h: img.naturalHeight, src: img.getAttribute('src') };
      if (img.complete && img.naturalWidth === 0 && img.classList.contains('broken')) return { broken: img.getAttribute('src') };
      fig.scrollIntoView({ block: 'nearest' });
      return null;
    }, jobId, { timeout: GEN_TIMEOUT_MS, polling: 250 }).then((h) => h.jsonValue()).catch(async () => {
      const q = await page.$eval('#queue', (e) => e.innerText).catch(() => '');
      fail(what, `no loaded image for job ${jobId} within ${GEN_TIMEOUT_MS / 1000} s; queue shows: ${q.replace(/\s+/g, ' ').slice(0, 200)}`);
    });
    if (outcome.failed) fail(what, `the job failed: ${outcome.failed.replace(/\s+/g, ' ')}`);
    if (outcome.broken) fail(what, `image ${outcome.broken} did not load`);
    return outcome;
  };
  const outcome = await waitForImage(id, 'image in #gallery');
  if (outcome.w !== 128 || outcome.h !== 128) fail('image size', `expected 128×128, got ${outcome.w}×${outcome.h}`);
  ok('image loaded in #gallery', `${outcome.src} ${outcome.w}×${outcome.h} after ${((Date.now() - started) / 1000).toFixed(1)} s`);

  // 5. memory chart received samples (stream is ≥1 Hz even when idle)
  const samples = await page.waitForFunction(() => {
    const n = Number(document.getElementById('memory-chart').getAttribute('data-samples'));
    return n > 0 ? n : null;
  }, null, { timeout: 10_000, polling: 200 }).then((h) => h.jsonValue())
    .catch(() => fail('memory chart', '#memory-chart[data-samples] stayed 0 for 10 s after the image loaded'));
  ok('memory chart fed', `${samples} samples`);

  // 5b. image to image with a painted mask: "Use as input" on the result, the strength slider,
  // a stroke painted with the mouse and one with the keyboard, invert twice, Generate.
  await page.click(`#gallery figure.result[data-job-id="${id}"] button.use-input`, { timeout: 10_000 })
    .catch((e) => fail('use as input', e.message.split('\n')[0]));
  await page.waitForFunction(() => document.documentElement.dataset.initImage === '128x128', null, { timeout: 10_000 })
    .catch(() => fail('use as input', `the result did not become a 128×128 input image${errs()}`));
  if (!(await page.isVisible('#init-preview')) || !(await page.isVisible('#mask-canvas'))) fail('use as input', 'the input image or the mask canvas is not shown');
  ok('result used as input image');

  await page.$eval('#strength', (e) => { e.value = '0.75'; e.dispatchEvent(new Event('input', { bubbles: true })); });
  if ((await page.$eval('#strength-value', (e) => e.textContent)) !== '0.75') fail('strength slider', 'the value readout did not follow the slider');
  const coverage = () => page.$eval('#mask-info', (e) => Number(e.dataset.coverage));
  if ((await coverage()) !== 0) fail('mask', 'a fresh input image already has a mask');
  // "Use as input" scrolls the section into view smoothly: wait until the canvas stops moving.
  let box = null;
  for (let i = 0; i < 40; i++) {
    const b = await page.locator('#mask-canvas').boundingBox();
    if (box && b && b.x === box.x && b.y === box.y && b.width === box.width) break;
    box = b;
    await page.waitForTimeout(100);
  }
  if (!box || box.width < 20) fail('mask', `the mask canvas is not laid out (${JSON.stringify(box)})`);
  await page.mouse.move(box.x + box.width * 0.15, box.y + box.height * 0.2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width * 0.35, box.y + box.height * 0.6, { steps: 10 });
  await page.mouse.up();
  const painted = await coverage();
  if (!(painted > 0.01 && painted < 0.9)) fail('mask painted with the mouse', `coverage ${painted}`);
  await page.focus('#mask-canvas');
  await page.keyboard.down(' ');
  for (let i = 0; i < 4; i++) await page.keyboard.press('ArrowRight');
  await page.keyboard.up(' ');
  const painted2 = await coverage();
  if (!(painted2 > painted)) fail('mask painted with the keyboard', `coverage ${painted} → ${painted2}`);
  await page.click('#mask-invert');
  const inverted = await coverage();
  if (Math.abs(inverted - (1 - painted2)) > 0.01) fail('mask invert', `coverage ${painted2} inverted to ${inverted}`);
  await page.click('#mask-invert');
  ok('mask painted', `mouse ${(painted * 100).toFixed(1)}%, keyboard → ${(painted2 * 100).toFixed(1)}%, invert ok`);

  // The LoRA picker: the folder's one LoRA, added with weight 0.6.
  await page.waitForSelector('#lora-add option[value="style"]', { state: 'attached', timeout: 10_000 })
    .catch(() => fail('LoRA picker', `the LoRA folder's \`style\` is not offered${errs()}`));
  await page.selectOption('#lora-add', 'style');
  await page.click('#lora-add-btn');
  await page.fill('#lora-weight-0', '0.6');
  ok('LoRA picked', 'style at 0.6');

  const i2iResp = page.waitForResponse((r) => r.url().endsWith('/api/jobs') && r.request().method() === 'POST', { timeout: 15_000 });
  await page.click('#generate', { timeout: 10_000 }).catch((e) => fail('inpaint: click #generate', e.message.split('\n')[0]));
  const i2iPost = await i2iResp.catch(() => fail('inpaint: POST /api/jobs', 'no request within 15 s'));
  if (i2iPost.status() !== 202) fail('inpaint: POST /api/jobs', `status ${i2iPost.status()}: ${(await i2iPost.text().catch(() => '')).slice(0, 300)}`);
  const i2iSent = i2iPost.request().postDataJSON();
  if (!/^data:image\/png;base64,/.test(i2iSent.image || '')) fail('inpaint: request body', 'no PNG `image` sent');
  if (!/^data:image\/png;base64,/.test(i2iSent.mask || '')) fail('inpaint: request body', 'no PNG `mask` sent');
  if (JSON.stringify(i2iSent.loras) !== JSON.stringify([{ name: 'style', weight: 0.6 }])) fail('inpaint: request body', `loras ${JSON.stringify(i2iSent.loras)}`);
  if (i2iSent.strength !== 0.75 || i2iSent.mask_blur !== 4) fail('inpaint: request body', `strength ${i2iSent.strength}, mask_blur ${i2iSent.mask_blur}`);
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
  if (px.w !== 128 || px.h !== 128) fail('inpaint: mask', `mask is ${px.w}×${px.h}, the image 128×128`);
  if (px.stroke.slice(0, 3).some((v) => v !== 255) || px.corner.slice(0, 3).some((v) => v !== 0)) {
    fail('inpaint: mask', `expected white under the stroke and black in the corner, got ${px.stroke} / ${px.corner}`);
  }
  const { id: i2iId } = await i2iPost.json();
  const i2iOut = await waitForImage(i2iId, 'inpainted image in #gallery');
  if (i2iOut.w !== 128 || i2iOut.h !== 128) fail('inpainted image size', `expected 128×128, got ${i2iOut.w}×${i2iOut.h}`);
  const rec = await page.evaluate(async (j) => (await fetch(`/api/jobs/${j}`)).json(), i2iId);
  const rp = (rec && rec.params) || {};
  if (rp.strength !== 0.75 || !rp.init_image || !rp.mask_image || JSON.stringify(rp.loras) !== JSON.stringify([{ name: 'style', weight: 0.6 }])) fail('inpaint: job record', `params ${JSON.stringify(rp).slice(0, 300)}`);
  ok('inpainting job done', `${i2iOut.src}, strength ${rp.strength}, mask ${String(rp.mask_image).slice(0, 12)}…`);

  // 6. models panel: Download buttons for catalog models not on disk; one download end to end
  const pullModel = process.env.PULL_MODEL;
  if (pullModel) {
    const btn = `#models li[data-model="${pullModel}"] button.pull-btn`;
    await page.waitForSelector(btn, { timeout: 10_000 })
      .catch(() => fail('download button', `no Download button for ${pullModel} in #models`));
    const pullResp = page.waitForResponse((r) => r.url().endsWith(`/api/models/${pullModel}/pull`), { timeout: 10_000 });
    await page.click(btn);
    const pr = await pullResp.catch(() => fail('POST pull', 'no request within 10 s of the click'));
    if (pr.status() !== 202) fail('POST pull', `status ${pr.status()}`);
    const progressSeen = await page.waitForFunction((name) => {
      const bar = document.querySelector(`#models li[data-model="${name}"] .pull-progress .bar`);
      const fill = bar && bar.querySelector('span');
      return fill && fill.style.width && fill.style.width !== '100%' ? fill.style.width : null;
    }, pullModel, { timeout: 20_000, polling: 20 }).then((h) => h.jsonValue()).catch(() => null);
    await page.waitForFunction((name) => {
      const li = document.querySelector(`#models li[data-model="${name}"]`);
      return li && li.querySelector('.state-on_disk');
    }, pullModel, { timeout: 30_000, polling: 200 }).catch(async () => {
      const t = await page.$eval('#models', (e) => e.innerText).catch(() => '');
      fail('download finished', `${pullModel} never showed as on disk; models panel: ${t.replace(/\s+/g, ' ').slice(0, 300)}`);
    });
    if (await page.$(`#models li[data-model="${pullModel}"] button.pull-btn`)) fail('download finished', 'the Download button is still there');
    ok('model downloaded from the UI', `${pullModel}${progressSeen ? `, progress bar seen at ${progressSeen}` : ''}`);
  }

  // let the fade-in finish, then check the console and take the screenshot
  await page.waitForTimeout(700);
  if (consoleErrors.length) fail('console clean', `${consoleErrors.length} error(s):\n  ${consoleErrors.slice(0, 10).join('\n  ')}`);
  ok('no console errors');

  await fullPageShot(page, 1280, shotPath).catch((e) => fail('screenshot', e.message.split('\n')[0]));
  ok('screenshot saved', shotPath);

  if (narrowShotPath) {
    await fullPageShot(page, 420, narrowShotPath).catch((e) => fail('narrow screenshot', e.message.split('\n')[0]));
    ok('narrow screenshot saved', narrowShotPath);
  }

  // 7. a server with --api-key: the page asks for the key once, then works
  const keyedUrl = process.env.KEYED_URL;
  if (keyedUrl) {
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
    await kpage.waitForFunction(() => document.documentElement.dataset.info === 'ready', null, { timeout: 20_000 })
      .catch(() => fail('keyed page', 'the page did not come up after the key was given'));
    if (await kpage.$('#key-dialog[open]')) fail('keyed page', 'the key prompt is still open');
    ok('API key prompt', 'wrong key refused, right key lets the page load');
    await kctx.close();
  }
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

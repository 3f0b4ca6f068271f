// PNG metadata → form: reads the tEXt / zTXt / iTXt chunks of a dropped or chosen PNG — the
// `zturbo` JSON record, or A1111's `parameters` infotext — and restores that image's settings
// (its own seed, batch 1).

import { $ } from './dom.js';
import { t } from './i18n.js';
import { restoreParams } from './form.js';
import { toast } from './toast.js';

const PNG_SIG = [137, 80, 78, 71, 13, 10, 26, 10];

async function inflate(bytes) {
  if (typeof DecompressionStream === 'undefined') throw new Error('no DecompressionStream');
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** Returns a Map keyword -> text of every textual chunk in a PNG. */
export async function readPngText(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 8 || PNG_SIG.some((b, i) => bytes[i] !== b)) throw new Error(t('png.notPng'));
  const view = new DataView(buffer);
  const latin1 = new TextDecoder('latin1');
  const utf8 = new TextDecoder('utf-8');
  const out = new Map();
  let off = 8;
  while (off + 12 <= bytes.length) {
    const len = view.getUint32(off);
    const type = String.fromCharCode(bytes[off + 4], bytes[off + 5], bytes[off + 6], bytes[off + 7]);
    const start = off + 8;
    const end = start + len;
    if (end + 4 > bytes.length) break; // truncated
    const data = bytes.subarray(start, end);
    try {
      if (type === 'tEXt') {
        const z = data.indexOf(0);
        if (z > 0) out.set(latin1.decode(data.subarray(0, z)), latin1.decode(data.subarray(z + 1)));
      } else if (type === 'zTXt') {
        const z = data.indexOf(0);
        if (z > 0 && data[z + 1] === 0) {
          out.set(latin1.decode(data.subarray(0, z)), latin1.decode(await inflate(data.subarray(z + 2))));
        }
      } else if (type === 'iTXt') {
        const z = data.indexOf(0);
        if (z > 0) {
          const key = latin1.decode(data.subarray(0, z));
          const compressed = data[z + 1] === 1;
          const method = data[z + 2];
          let p = z + 3;
          const langEnd = data.indexOf(0, p);           // language tag
          if (langEnd < 0) throw new Error('bad iTXt');
          p = langEnd + 1;
          const trEnd = data.indexOf(0, p);             // translated keyword
          if (trEnd < 0) throw new Error('bad iTXt');
          p = trEnd + 1;
          let text = data.subarray(p);
          if (compressed) {
            if (method !== 0) throw new Error('unknown iTXt compression');
            text = await inflate(text);
          }
          out.set(key, utf8.decode(text));
        }
      } else if (type === 'IEND') {
        break;
      }
    } catch {
      /* skip a chunk we cannot read */
    }
    off = end + 4; // skip CRC
  }
  return out;
}

/** Parses A1111 "parameters" text into JobRecord.params-like keys. */
export function parseA1111(text) {
  const lines = text.replace(/\r\n?/g, '\n').split('\n');
  let paramIdx = -1;
  for (let i = lines.length - 1; i >= 0; i--) {
    if (/(^|,\s*)Steps:\s*\d+/.test(lines[i])) { paramIdx = i; break; }
  }
  const head = paramIdx >= 0 ? lines.slice(0, paramIdx) : lines;
  const negIdx = head.findIndex((l) => l.startsWith('Negative prompt:'));
  const p = {};
  p.prompt = (negIdx >= 0 ? head.slice(0, negIdx) : head).join('\n').trim();
  if (negIdx >= 0) p.negative_prompt = head.slice(negIdx).join('\n').replace(/^Negative prompt:\s*/, '').trim();
  if (paramIdx >= 0) {
    const kv = {};
    const re = /\s*([^:,]+?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)/g;
    let m;
    while ((m = re.exec(lines[paramIdx])) !== null) {
      if (!m[0]) { re.lastIndex++; continue; }
      let v = m[2].trim();
      if (v.startsWith('"')) { try { v = JSON.parse(v); } catch { /* keep raw */ } }
      kv[m[1].trim().toLowerCase()] = v;
    }
    if (kv.steps) p.steps = Number(kv.steps);
    if (kv['cfg scale']) p.cfg = Number(kv['cfg scale']);
    if (kv.seed && /^\d+$/.test(kv.seed)) p.seed = kv.seed;
    const size = /^(\d+)\s*x\s*(\d+)$/i.exec(kv.size || '');
    if (size) { p.width = Number(size[1]); p.height = Number(size[2]); }
    if (kv.model) p.model = kv.model;
  }
  return p;
}

export async function loadPngFile(file, name) {
  try {
    const map = await readPngText(await file.arrayBuffer());
    if (map.has('zturbo')) {
      let obj = null;
      try { obj = JSON.parse(map.get('zturbo')); } catch { obj = null; }
      if (obj && typeof obj === 'object') {
        const params = obj.params && typeof obj.params === 'object' ? obj.params : obj;
        const enh = obj.enhancement && typeof obj.enhancement === 'object' ? obj.enhancement : null;
        // One PNG is one image: its own seed, batch 1, and the memory mode the user chose.
        const mode = obj.plan && obj.plan.requested_mode;
        restoreParams(params, enh, { from: name, seed: params.seed, memoryMode: mode });
        return;
      }
    }
    if (map.has('parameters')) {
      const p = parseA1111(map.get('parameters'));
      restoreParams(p, null, { from: name, keepEnhance: true, seed: p.seed });
      return;
    }
    toast(t('png.noParams', { name }), 'warn');
  } catch (e) {
    toast(t('png.readFailed', { name, error: e.message }), 'bad');
  }
}

export function wireDragDrop() {
  const overlay = $('drop-overlay');
  let depth = 0;
  const hasPayload = (e) => {
    const types = e.dataTransfer ? [...e.dataTransfer.types] : [];
    return types.includes('Files') || types.includes('text/uri-list');
  };
  document.addEventListener('dragenter', (e) => {
    if (!hasPayload(e)) return;
    depth++;
    overlay.hidden = false;
  });
  document.addEventListener('dragleave', () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  document.addEventListener('dragover', (e) => {
    if (!hasPayload(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = 'copy';
  });
  document.addEventListener('drop', async (e) => {
    depth = 0;
    overlay.hidden = true;
    if (!e.dataTransfer) return;
    const file = [...(e.dataTransfer.files || [])][0];
    if (file) {
      e.preventDefault();
      await loadPngFile(file, file.name || 'image');
      return;
    }
    // An image dragged from this page's own gallery arrives as a URL.
    const uri = (e.dataTransfer.getData('text/uri-list') || '').split('\n').find((l) => l && !l.startsWith('#'));
    if (!uri) return;
    e.preventDefault();
    try {
      const url = new URL(uri.trim(), location.href);
      if (url.origin !== location.origin) {
        toast(t('png.foreign'), 'warn');
        return;
      }
      const res = await fetch(url);
      if (!res.ok) throw new Error(`${res.status}`);
      await loadPngFile(await res.blob(), url.pathname.split('/').pop() || 'image');
    } catch (err) {
      toast(t('png.dropFailed', { error: err.message }), 'bad');
    }
  });
  $('png-file').addEventListener('change', async (e) => {
    const file = e.target.files && e.target.files[0];
    if (file) await loadPngFile(file, file.name);
    e.target.value = '';
  });
}

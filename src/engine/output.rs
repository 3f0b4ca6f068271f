//! Images out: PNG with the parameters embedded (an A1111-style `parameters` text chunk that other
//! tools read, and a `zturbo` chunk with the full JSON record), written atomically; and the way back
//! from a PNG's `parameters` text to a request.

use std::io::Write;
use std::path::Path;

use super::{GeneratedImage, Generation, Notice, ResolvedParams};
use crate::request::ValidRequest;

/// The `zturbo` text chunk of image `seed` of a run: the full JSON record (params with that
/// image's seed, enhancement, notices, timings, peak memory, plan). Serialised from the typed
/// values, not through `serde_json::Value`, which would widen f32 fields (a CFG of 1.8 would
/// read 1.7999999523162842 when a page or `--from-png` restores it).
pub fn record_text(job_id: Option<&str>, gen: &Generation, seed: u64) -> String {
    #[derive(serde::Serialize)]
    struct Record<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        job_id: Option<&'a str>,
        params: ResolvedParams,
        enhancement: &'a super::prompt::Enhanced,
        notices: &'a [Notice],
        timings: &'a super::Timings,
        peak_memory_bytes: u64,
        plan: &'a crate::memory::planner::Plan,
    }
    let record = Record {
        job_id,
        params: ResolvedParams {
            run: ValidRequest {
                seed,
                ..gen.params.run.clone()
            },
            ..gen.params.clone()
        },
        enhancement: &gen.enhancement,
        notices: &gen.notices,
        timings: &gen.timings,
        peak_memory_bytes: gen.peak_memory_bytes,
        plan: &gen.plan,
    };
    serde_json::to_string(&record).unwrap_or_else(|_| "{}".into())
}

/// A1111's infotext: prompt, `Negative prompt:` line, then `Key: value` pairs. Our notices ride
/// along as `Notices: "…"` so other tools show them too.
pub fn a1111_parameters(params: &ResolvedParams, seed: u64, notices: &[Notice]) -> String {
    let p = &params.run;
    let mut s = p.prompt.clone();
    // LoRAs as A1111 writes them, in the prompt: `--from-png` and A1111 read them back.
    for l in &params.loras {
        s.push_str(&format!(" <lora:{}:{}>", l.name, fmt_cfg(l.weight)));
    }
    if let Some(n) = p.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
        s.push_str("\nNegative prompt: ");
        s.push_str(n);
    }
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {}",
        p.steps,
        params.sampler,
        fmt_cfg(p.cfg),
        p.width,
        p.height,
        params.model
    ));
    if let Some(st) = params.strength {
        s.push_str(&format!(", Denoising strength: {st}"));
    }
    if let Some(b) = params.mask_blur {
        s.push_str(&format!(", Mask blur: {b}"));
    }
    if (params.cfg_requested - p.cfg).abs() > f32::EPSILON {
        s.push_str(&format!(
            ", CFG requested: {}",
            fmt_cfg(params.cfg_requested)
        ));
    }
    if let Some(c) = &p.control {
        // The A1111 ControlNet extension's infotext for its unit 0.
        s.push_str(&format!(
            ", ControlNet 0: \"Module: {}, Model: {}, Weight: {}, Guidance Start: {}, Guidance End: {}\"",
            c.preprocess.as_str(),
            c.model,
            c.scale,
            c.start,
            c.end
        ));
    }
    s.push_str(&format!(", Memory mode: {}", p.memory_mode));
    if !notices.is_empty() {
        let joined = notices
            .iter()
            .map(|n| n.message.replace('"', "'"))
            .collect::<Vec<_>>()
            .join("; ");
        s.push_str(&format!(", Notices: \"{joined}\""));
    }
    s.push_str(", Version: zturbo ");
    s.push_str(env!("CARGO_PKG_VERSION"));
    s
}

fn fmt_cfg(c: f32) -> String {
    let r = (c * 100.0).round() / 100.0;
    format!("{r}")
}

/// Encodes an RGB8 image as PNG with text chunks (`tEXt` when Latin-1 fits, else `iTXt`).
pub fn encode_png(
    img: &GeneratedImage,
    chunks: &[(&str, &str)],
) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width, img.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in chunks {
            if v.chars().all(|c| (c as u32) < 256 && c != '\0') {
                enc.add_text_chunk(k.to_string(), v.to_string())?;
            } else {
                enc.add_itxt_chunk(k.to_string(), v.to_string())?;
            }
        }
        let mut w = enc.write_header()?;
        w.write_image_data(&img.rgb)?;
        w.finish()?;
    }
    Ok(out)
}

/// Text chunks of a PNG (`tEXt`, `zTXt`, `iTXt`), keyword → text.
pub fn png_text_chunks(bytes: &[u8]) -> Result<Vec<(String, String)>, png::DecodingError> {
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = dec.read_info()?;
    let info = reader.info();
    let mut out = Vec::new();
    for c in &info.uncompressed_latin1_text {
        out.push((c.keyword.clone(), c.text.clone()));
    }
    for c in &info.compressed_latin1_text {
        out.push((c.keyword.clone(), c.get_text()?));
    }
    for c in &info.utf8_text {
        out.push((c.keyword.clone(), c.get_text()?));
    }
    Ok(out)
}

/// Writes `bytes` to `path` via a temporary file in the same folder and a rename, so a reader (or a
/// crash) never sees a half-written file; the folder is fsync'd after the rename, so the new name
/// survives a power cut too.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir)
}

/// Makes a folder's entries (a rename, a new or removed file) durable. File systems that cannot
/// sync a folder (some network ones) are taken as they are.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP)) => {}
            other => return other,
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Parameters read back from an A1111-style `parameters` text.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ParsedParameters {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: Option<u32>,
    pub cfg: Option<f32>,
    pub seed: Option<u64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub model: Option<String>,
}

/// Parses A1111 infotext: everything before `Negative prompt:` is the prompt; the last line that
/// starts with `Steps:` holds the comma-separated settings (quoted values may contain commas).
pub fn parse_parameters(text: &str) -> ParsedParameters {
    let lines: Vec<&str> = text.lines().collect();
    let settings_at = lines
        .iter()
        .rposition(|l| l.trim_start().starts_with("Steps:"));
    let body_end = settings_at.unwrap_or(lines.len());
    let body = lines[..body_end].join("\n");
    let (prompt, negative) = match body.find("Negative prompt:") {
        Some(i) => (
            body[..i].trim_end().to_string(),
            Some(body[i + "Negative prompt:".len()..].trim().to_string()),
        ),
        None => (body.trim_end().to_string(), None),
    };
    let mut p = ParsedParameters {
        prompt,
        negative_prompt: negative,
        ..Default::default()
    };
    if let Some(i) = settings_at {
        for (k, v) in split_settings(lines[i]) {
            match k.as_str() {
                "Steps" => p.steps = v.parse().ok(),
                "CFG scale" => p.cfg = v.parse().ok(),
                "Seed" => p.seed = v.parse().ok(),
                "Model" => p.model = Some(v),
                "Size" => {
                    if let Some((w, h)) = v.split_once('x') {
                        p.width = w.trim().parse().ok();
                        p.height = h.trim().parse().ok();
                    }
                }
                _ => {}
            }
        }
    }
    p
}

fn split_settings(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
            }
            _ => cur.push(ch),
        }
    }
    out.push(cur);
    out.into_iter()
        .filter_map(|kv| {
            let (k, v) = kv.split_once(':')?;
            Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::NoticeKind;
    use crate::memory::planner::MemoryMode;

    fn params() -> ResolvedParams {
        ResolvedParams {
            model: "demo".into(),
            run: ValidRequest {
                prompt: "a lake, at dawn".into(),
                negative_prompt: Some("blurry, dark".into()),
                width: 128,
                height: 96,
                steps: 8,
                cfg: 2.4,
                seed: 42,
                batch: 1,
                enhance: true,
                memory_mode: MemoryMode::Performance,
                init: None,
                control: None,
                loras: Vec::new(),
                enhance_exclude: Vec::new(),
            },
            cfg_requested: 3.2,
            precision: "f32".into(),
            sampler: "Euler (flow)".into(),
            strength: None,
            mask_blur: None,
            init_image: None,
            mask_image: None,
            loras: Vec::new(),
        }
    }

    #[test]
    fn parameters_round_trip_through_a_png() {
        let notices = vec![Notice::new(
            NoticeKind::CfgClamped,
            "CFG 3.2 → 2.4, with \"quotes\"".into(),
            "CFG 3.2 → 2.4，带“引号”".into(),
        )];
        let text = a1111_parameters(&params(), 42, &notices);
        let img = GeneratedImage {
            width: 4,
            height: 2,
            seed: 42,
            rgb: vec![7; 24],
        };
        let png = encode_png(&img, &[("parameters", &text), ("zturbo", "{\"a\":1}")]).unwrap();
        let chunks = png_text_chunks(&png).unwrap();
        let got = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
        assert_eq!(got, &text);
        let p = parse_parameters(got);
        assert_eq!(p.prompt, "a lake, at dawn");
        assert_eq!(p.negative_prompt.as_deref(), Some("blurry, dark"));
        assert_eq!(
            (p.steps, p.seed, p.width, p.height),
            (Some(8), Some(42), Some(128), Some(96))
        );
        assert_eq!(p.cfg, Some(2.4));
        assert_eq!(p.model.as_deref(), Some("demo"));
        let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(decoded.as_raw(), &img.rgb);
    }

    #[test]
    fn loras_and_strength_ride_in_the_parameters() {
        let mut p = params();
        p.loras = vec![crate::engine::LoraUse {
            name: "style".into(),
            weight: 0.8,
        }];
        p.strength = Some(0.6);
        p.mask_blur = Some(4);
        let text = a1111_parameters(&p, 42, &[]);
        assert!(
            text.starts_with("a lake, at dawn <lora:style:0.8>\n"),
            "{text}"
        );
        assert!(
            text.contains("Denoising strength: 0.6, Mask blur: 4"),
            "{text}"
        );
        // The tag comes back in the prompt, where requests take it (A1111's syntax).
        let back = parse_parameters(&text);
        let (clean, tags) = crate::request::extract_lora_tags(&back.prompt).unwrap();
        assert_eq!(clean, "a lake, at dawn");
        assert_eq!((tags[0].name.as_str(), tags[0].weight), ("style", 0.8));
    }

    #[test]
    fn parses_real_a1111_text_with_multiline_prompt() {
        let t = "masterpiece,\nred fox\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 123, Size: 512x768, Model hash: abc, Model: sd15";
        let p = parse_parameters(t);
        assert_eq!(p.prompt, "masterpiece,\nred fox");
        assert_eq!(p.negative_prompt.as_deref(), Some("ugly"));
        assert_eq!((p.width, p.height), (Some(512), Some(768)));
        assert_eq!(p.cfg, Some(7.0));
    }

    #[test]
    fn atomic_write_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("zturbo-out-{}", std::process::id()));
        let path = dir.join("x.png");
        write_atomic(&path, b"abc").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! `GET /images/{id}-{n}.png`: the images the server wrote, and nothing else. The name must have
//! the exact shape the worker gives its files (so `..`, slashes and absolute paths never reach
//! the file system) and must be a regular file in the outputs folder (no symlinks). With
//! `?download=1` the answer is an attachment named after the prompt, the seed and the index.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::queue::job::{is_image_name, JobRecord};

pub async fn get(
    State(s): State<AppState>,
    Path(file): Path<String>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let missing = || ApiError::not_found(format!("no image `{file}`"));
    if !is_image_name(&file) {
        return Err(missing());
    }
    let path = s.info().outputs.join(&file);
    match tokio::fs::symlink_metadata(&path).await {
        Ok(m) if m.is_file() => {}
        _ => return Err(missing()),
    }
    let bytes = tokio::fs::read(&path).await.map_err(|_| missing())?;
    let download = uri.query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "download=1" || kv == "download")
    });
    let disposition = if download {
        let (id, n) = split_name(&file);
        let record = s.queue.get(id).await.map(|snap| snap.record);
        Some(content_disposition(&download_name(record.as_ref(), n)))
    } else {
        None
    };
    let mut res = (
        [
            (header::CONTENT_TYPE, "image/png"),
            // An image name is never reused: a job id is random and its files are final.
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        bytes,
    )
        .into_response();
    if let Some(d) = disposition.and_then(|d| header::HeaderValue::from_str(&d).ok()) {
        res.headers_mut().insert(header::CONTENT_DISPOSITION, d);
    }
    Ok(res)
}

/// URL path of an image file name.
pub fn url(file: &str) -> String {
    format!("/images/{file}")
}

/// `<id>-<n>.png` → (id, n); the name has been checked by [`is_image_name`].
fn split_name(file: &str) -> (&str, usize) {
    let stem = file.strip_suffix(".png").unwrap_or(file);
    let (id, n) = stem.split_once('-').unwrap_or((stem, "1"));
    (id, n.parse().unwrap_or(1))
}

/// How many prompt words a download's file name keeps.
const NAME_WORDS: usize = 6;

/// A readable file name for image `n` (1-based): the prompt's first words, the image's own seed
/// and its index — `serene-mountain-lake-at-dawn-mist-42-1.png`. Letters of any script are kept
/// (a Chinese prompt names its file in Chinese); everything else becomes a dash.
pub fn download_name(record: Option<&JobRecord>, n: usize) -> String {
    let Some(r) = record else {
        return format!("zturbo-{n}.png");
    };
    let prompt = r
        .enhancement
        .as_ref()
        .map(|e| e.original_prompt.as_str())
        .unwrap_or(r.request.prompt.as_str());
    let lower = prompt.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(NAME_WORDS)
        .collect();
    let mut slug: String = words.join("-").chars().take(60).collect();
    while slug.ends_with('-') {
        slug.pop();
    }
    if slug.is_empty() {
        slug = "zturbo".into();
    }
    let seed = r
        .image_seeds
        .get(n.saturating_sub(1))
        .copied()
        .unwrap_or_else(|| r.request.seed.wrapping_add(n.saturating_sub(1) as u64));
    format!("{slug}-{seed}-{n}.png")
}

/// `attachment; filename="…"` with an ASCII fallback, plus RFC 5987's `filename*` when the name
/// has other characters (browsers use the UTF-8 one).
pub fn content_disposition(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if ascii == name {
        return format!("attachment; filename=\"{name}\"");
    }
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    // The fallback keeps the seed and index readable even when the prompt's letters are lost.
    let fallback = ascii.trim_start_matches('_');
    let fallback = if fallback.starts_with('-') {
        format!("zturbo{fallback}")
    } else {
        fallback.to_string()
    };
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_names_are_readable_and_safe() {
        assert_eq!(
            content_disposition("serene-mountain-lake-42-1.png"),
            "attachment; filename=\"serene-mountain-lake-42-1.png\""
        );
        // RFC 5987: UTF-8 percent-encoded, with an ASCII fallback that keeps seed and index.
        let d = content_disposition("黎明-湖-7-2.png");
        assert!(
            d.contains("filename*=UTF-8''%E9%BB%8E%E6%98%8E-%E6%B9%96-7-2.png"),
            "{d}"
        );
        assert!(d.contains("filename=\"zturbo-"), "{d}");
        assert!(!d.contains('"') || d.matches('"').count() == 2, "{d}");
        // Quotes, slashes and control characters never reach the header.
        let d = content_disposition("a\"b/c\r\n.png");
        assert!(
            !d.contains('/') && !d.contains('\r') && !d.contains("a\"b"),
            "{d}"
        );
        assert!(header::HeaderValue::from_str(&d).is_ok());
    }
}

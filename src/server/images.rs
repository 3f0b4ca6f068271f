//! `GET /images/{id}-{n}.png`: the images the server wrote, and nothing else. The name must have
//! the exact shape the worker gives its files (so `..`, slashes and absolute paths never reach
//! the file system) and must be a regular file in the outputs folder (no symlinks).

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::queue::job::is_image_name;

pub async fn get(
    State(s): State<AppState>,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    let missing = || ApiError::not_found(format!("no image `{file}`"));
    if !is_image_name(&file) {
        return Err(missing());
    }
    let path = s.info.outputs.join(&file);
    match tokio::fs::symlink_metadata(&path).await {
        Ok(m) if m.is_file() => {}
        _ => return Err(missing()),
    }
    let bytes = tokio::fs::read(&path).await.map_err(|_| missing())?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            // An image name is never reused: a job id is random and its files are final.
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        bytes,
    )
        .into_response())
}

/// URL path of an image file name.
pub fn url(file: &str) -> String {
    format!("/images/{file}")
}

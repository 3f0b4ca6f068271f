//! `GET /api/memory/stream`: the memory monitor's samples as SSE `sample` events — the recent
//! history first (so a fresh chart is not empty), then live samples (10 Hz while a job runs,
//! 2 Hz idle). A slow client that lags the broadcast just skips samples.

use axum::extract::{Query, State};
use axum::response::Response;
use futures::{stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;

use super::{json_event, sse, AppState};

/// Samples replayed to a new subscriber.
pub const REPLAY: usize = 100;

#[derive(Debug, serde::Deserialize)]
pub struct MemoryQuery {
    /// A remote worker's name (front door only).
    pub worker: Option<String>,
}

pub async fn stream(
    State(s): State<AppState>,
    Query(q): Query<MemoryQuery>,
) -> Result<Response, super::error::ApiError> {
    if let Some(name) = q.worker {
        return remote(&s, &name);
    }
    Ok(local(s))
}

/// A remote worker's samples as it sent them (JSON relayed untouched).
fn remote(s: &AppState, name: &str) -> Result<Response, super::error::ApiError> {
    let not_found = || {
        super::error::ApiError::not_found(format!(
            "no live worker `{name}` has sent memory samples (see /api/workers)"
        ))
    };
    let cluster = s.cluster.as_ref().ok_or_else(not_found)?;
    let (recent, rx) = cluster.memory(name).ok_or_else(not_found)?;
    let event = |data: &str| {
        Ok::<_, std::convert::Infallible>(
            axum::response::sse::Event::default()
                .event("sample")
                .data(data),
        )
    };
    let replay: Vec<_> = recent.iter().map(|d| event(d)).collect();
    let live = BroadcastStream::new(rx)
        .filter_map(move |r| std::future::ready(r.ok().map(|d: std::sync::Arc<str>| event(&d))));
    Ok(sse(stream::iter(replay)
        .chain(live)
        .take_until(s.shutdown_signal())))
}

fn local(s: AppState) -> Response {
    // Subscribe before reading the history so no sample falls between the two.
    let live = BroadcastStream::new(s.monitor.subscribe());
    let recent = s.monitor.recent(REPLAY);
    let last_t = recent.last().map(|r| r.t_ms);
    let replay = stream::iter(recent).map(|sample| Ok(json_event("sample", &sample)));
    let live = live.filter_map(move |r| {
        std::future::ready(match r {
            Ok(sample) if last_t.is_none_or(|t| sample.t_ms > t) => {
                Some(Ok(json_event("sample", &sample)))
            }
            // Already replayed, or lagged: skip.
            _ => None,
        })
    });
    sse(replay.chain(live).take_until(s.shutdown_signal()))
}

//! `GET /api/memory/stream`: the memory monitor's samples as SSE `sample` events — the recent
//! history first (so a fresh chart is not empty), then live samples (10 Hz while a job runs,
//! 2 Hz idle). A slow client that lags the broadcast just skips samples.

use axum::extract::State;
use axum::response::Response;
use futures::{stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;

use super::{json_event, sse, AppState};

/// Samples replayed to a new subscriber.
pub const REPLAY: usize = 100;

pub async fn stream(State(s): State<AppState>) -> Response {
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

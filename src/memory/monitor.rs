//! The memory monitor: a sampler thread reads the device probe (5 Hz while a job runs, 1 Hz
//! idle) and broadcasts samples tagged with the job, phase and step the engine reports.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::broadcast;

use super::probe::{DeviceKind, MemoryProbe};

pub const BUSY_INTERVAL: Duration = Duration::from_millis(100);
pub const IDLE_INTERVAL: Duration = Duration::from_millis(500);
/// Samples kept for late subscribers (about two minutes at the busy rate).
pub const HISTORY: usize = 1200;

/// One reading, as the UI's chart gets it.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_ms: u64,
    pub device: DeviceKind,
    pub used_bytes: u64,
    pub total_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
}

#[derive(Debug, Default, Clone)]
struct TagState {
    job_id: Option<String>,
    phase: Option<&'static str>,
    step: Option<usize>,
}

/// What the engine is doing right now; the sampler stamps it on every sample.
#[derive(Debug, Default)]
pub struct Tags {
    state: Mutex<TagState>,
}

impl Tags {
    pub fn set_job(&self, job_id: Option<String>) {
        if let Ok(mut s) = self.state.lock() {
            *s = TagState {
                job_id,
                phase: None,
                step: None,
            };
        }
    }

    pub fn set_phase(&self, phase: Option<&'static str>, step: Option<usize>) {
        if let Ok(mut s) = self.state.lock() {
            s.phase = phase;
            s.step = step;
        }
    }

    fn snapshot(&self) -> TagState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Owns the sampler thread; dropping it stops the thread.
pub struct Monitor {
    tags: Arc<Tags>,
    tx: broadcast::Sender<Sample>,
    history: Arc<Mutex<VecDeque<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    pub fn start(probe: Arc<dyn MemoryProbe>, tags: Arc<Tags>) -> Self {
        let (tx, _) = broadcast::channel(256);
        let history = Arc::new(Mutex::new(VecDeque::with_capacity(HISTORY)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (tx, tags, history, stop) =
                (tx.clone(), tags.clone(), history.clone(), stop.clone());
            std::thread::Builder::new()
                .name("zturbo-memory".into())
                .spawn(move || {
                    let t0 = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        let r = probe.read();
                        let tag = tags.snapshot();
                        let busy = tag.job_id.is_some();
                        let sample = Sample {
                            t_ms: t0.elapsed().as_millis() as u64,
                            device: r.device,
                            used_bytes: r.used_bytes,
                            total_bytes: r.total_bytes,
                            rss_bytes: r.rss_bytes,
                            job_id: tag.job_id,
                            phase: tag.phase,
                            step: tag.step,
                        };
                        if let Ok(mut h) = history.lock() {
                            if h.len() == HISTORY {
                                h.pop_front();
                            }
                            h.push_back(sample.clone());
                        }
                        // No subscribers is fine: the chart may simply not be open.
                        let _ = tx.send(sample);
                        let wait = if busy { BUSY_INTERVAL } else { IDLE_INTERVAL };
                        std::thread::sleep(wait);
                    }
                })
                .ok()
        };
        Self {
            tags,
            tx,
            history,
            stop,
            thread,
        }
    }

    pub fn tags(&self) -> Arc<Tags> {
        self.tags.clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Sample> {
        self.tx.subscribe()
    }

    /// The most recent samples, oldest first.
    pub fn recent(&self, n: usize) -> Vec<Sample> {
        self.history
            .lock()
            .map(|h| h.iter().rev().take(n).rev().cloned().collect())
            .unwrap_or_default()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

//! Jobs run by remote workers (`--broker`) and model switches between jobs.

use super::*;

impl Actor {
    /// A remote worker took a job: it leaves the waiting line (or, taken over from a worker that
    /// died, starts again under its new worker).
    pub(super) async fn started_remotely(&mut self, id: &str, worker: String) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        match job.record.state {
            JobState::Queued => {}
            JobState::Running if job.record.worker.as_deref() != Some(worker.as_str()) => {}
            _ => return,
        }
        let now = job::now_ms();
        if job.record.state == JobState::Queued {
            job.record.started_at = Some(now);
            job.started = Some(Instant::now());
            job.cancel = Some(CancelToken::new());
        }
        job.record.state = JobState::Running;
        job.record.worker = Some(worker);
        job.step = 0;
        job.emit(JobEvent::Started);
        let record = job.record.clone();
        self.pending.retain(|p| p != id);
        if !self.running.iter().any(|r| r == id) {
            self.running.push(id.to_string());
        }
        self.announce_positions();
        if let Err(e) = self.write_journal(&record).await {
            tracing::warn!(job_id = %id, "could not journal the job's start: {e}");
        }
    }

    /// Removes what a remote result for an ended job brought, and settles it in the broker.
    pub(super) async fn drop_remote_result(
        &mut self,
        id: &str,
        outcome: Result<Box<RunOutput>, RunError>,
    ) {
        if let Ok(out) = outcome {
            let keep = self
                .jobs
                .get(id)
                .is_some_and(|j| j.record.state == JobState::Done);
            if !keep {
                let (dir, files) = (self.config.outputs.clone(), out.images);
                let _ = tokio::task::spawn_blocking(move || {
                    for f in files {
                        let _ = std::fs::remove_file(dir.join(f));
                    }
                })
                .await;
            }
        }
        if let Backend::Broker(front) = &self.backend {
            front.settle(id);
        }
    }

    /// A switch's progress: the job that asked for it hears it on its stream; `/api/events` and
    /// the server's model info follow every switch.
    pub(super) async fn model_event(&mut self, ev: ModelEvent) {
        let (job, event) = match &ev {
            ModelEvent::Loading { name, job } => (
                job.clone(),
                JobEvent::Model {
                    state: "loading",
                    name: name.clone(),
                    error: None,
                    elapsed_ms: None,
                },
            ),
            ModelEvent::Loaded {
                loaded,
                job,
                elapsed_ms,
            } => {
                for hook in &self.on_loaded {
                    hook(loaded);
                }
                self.loaded = loaded.model.clone();
                if self.switching.as_deref() == Some(loaded.model.as_str()) {
                    self.switching = None;
                }
                (
                    job.clone(),
                    JobEvent::Model {
                        state: "loaded",
                        name: loaded.model.clone(),
                        error: None,
                        elapsed_ms: Some(*elapsed_ms),
                    },
                )
            }
            ModelEvent::Failed { name, error, job } => {
                if self.switching.as_deref() == Some(name.as_str()) {
                    self.switching = None;
                }
                // Do not retry a model that does not load: new jobs go back to what runs.
                if self.selected == *name {
                    self.selected = self.loaded.clone();
                }
                (
                    job.clone(),
                    JobEvent::Model {
                        state: "failed",
                        name: name.clone(),
                        error: Some(error.clone()),
                        elapsed_ms: None,
                    },
                )
            }
        };
        if let Some(job) = job.and_then(|id| self.jobs.get_mut(&id)) {
            job.emit(event);
            // The record says which model the worker switched to for it.
            if let ModelEvent::Loaded {
                loaded, elapsed_ms, ..
            } = &ev
            {
                let notice =
                    crate::engine::Notice::model_switch(&loaded.model, *elapsed_ms as f64 / 1000.0);
                job.record.notices.push(notice.clone());
                job.emit(JobEvent::Notice(notice));
            }
        }
        let _ = self.model_events.send(ev);
        self.dispatch().await;
    }
}

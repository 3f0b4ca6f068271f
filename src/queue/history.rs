//! Deleting finished jobs and paging the history.

use super::*;

impl Actor {
    pub(super) async fn delete(&mut self, id: &str) -> Result<(), DeleteError> {
        let job = self
            .jobs
            .get(id)
            .ok_or_else(|| DeleteError::NotFound(id.to_string()))?;
        let state = job.record.state;
        if !state.is_terminal() {
            return Err(DeleteError::NotFinished(id.to_string(), state));
        }
        let mut files: Vec<PathBuf> = job
            .record
            .images
            .iter()
            .map(|f| self.config.outputs.join(f))
            .collect();
        files.push(self.config.outputs.join(format!("{id}.json")));
        let journal = self.journal.clone();
        let owned = id.to_string();
        // The journal entry goes first: a crash half-way leaves orphan images, never a record
        // pointing at missing files.
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            journal.remove(&owned)?;
            for f in files {
                match std::fs::remove_file(&f) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|e| DeleteError::Io(id.to_string(), e.to_string()))?;
        self.jobs.remove(id);
        self.history.retain(|h| h != id);
        tracing::info!(job_id = %id, "deleted from the history");
        Ok(())
    }

    pub(super) fn history_page(&self, q: &HistoryQuery) -> HistoryPage {
        let needle = q
            .text
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_lowercase);
        let matches = |r: &JobRecord| {
            let Some(n) = &needle else { return true };
            let texts = [
                Some(r.request.prompt.as_str()),
                r.params.as_ref().map(|p| p.run.prompt.as_str()),
                r.enhancement.as_ref().map(|e| e.original_prompt.as_str()),
            ];
            texts
                .into_iter()
                .flatten()
                .any(|t| t.to_lowercase().contains(n))
        };
        let limit = q.limit.max(1);
        let mut jobs = Vec::new();
        let mut more = false;
        for id in self.history.iter().rev() {
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            let r = &job.record;
            if !matches!(r.state, JobState::Done | JobState::Failed)
                || q.before.is_some_and(|b| r.seq >= b)
                || !matches(r)
            {
                continue;
            }
            if jobs.len() == limit {
                more = true;
                break;
            }
            if let Some(s) = self.snapshot(id) {
                jobs.push(s);
            }
        }
        let next_before = if more {
            jobs.last().map(|s| s.record.seq)
        } else {
            None
        };
        HistoryPage { jobs, next_before }
    }
}

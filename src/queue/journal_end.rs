//! Writing a job's end to the journal, and retrying when that fails.

use super::*;

impl Actor {
    /// Journals a job's end (see [`Journal::write_end`]); an end that only got its marker is
    /// written in full later, after any journal write that succeeds.
    pub(super) async fn write_journal_end(&mut self, record: JobRecord) {
        let journal = self.journal.clone();
        let rec = record.clone();
        let outcome = tokio::task::spawn_blocking(move || journal.write_end(&rec))
            .await
            .unwrap_or_else(|e| EndWrite::Failed(std::io::Error::other(e)));
        let id = record.id.clone();
        if let (Backend::Broker(front), EndWrite::Written | EndWrite::Tombstoned(_)) =
            (&self.backend, &outcome)
        {
            // The end is on disk: the broker may forget the job (a result it still holds
            // would otherwise be delivered again after a restart).
            front.settle(&id);
        }
        match outcome {
            EndWrite::Written => {
                self.health.note("the job journal", &Ok(()));
                self.unjournaled.retain(|r| r.id != id);
                self.retry_unjournaled().await;
            }
            EndWrite::Tombstoned(e) => {
                tracing::warn!(
                    job_id = %id,
                    "could not journal the job's end ({e}); marked it {} so it does not run again",
                    record.state
                );
                self.health.note("the job journal", &Err(e));
                self.remember_unjournaled(record);
            }
            EndWrite::Failed(e) => {
                tracing::error!(job_id = %id, "could not journal the job's end: {e}");
                self.health.note("the job journal", &Err(e));
                self.remember_unjournaled(record);
            }
        }
    }

    pub(super) fn remember_unjournaled(&mut self, record: JobRecord) {
        self.unjournaled.retain(|r| r.id != record.id);
        self.unjournaled.push(record);
    }

    /// Tries again to journal the ends that could not be written.
    pub(super) async fn retry_unjournaled(&mut self) {
        if self.unjournaled.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.unjournaled);
        let journal = self.journal.clone();
        let left = tokio::task::spawn_blocking(move || {
            pending
                .into_iter()
                .filter(|r| !matches!(journal.write_end(r), EndWrite::Written))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        self.unjournaled = left;
    }
}

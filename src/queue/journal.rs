//! The job journal: accepted jobs survive a restart (kill -9 included).
//!
//! One JSON file per job, `<outputs>/.jobs/<id>.json`, replaced atomically (temporary file +
//! rename, `engine::output::write_atomic`) on every state change. Chosen over an append-only
//! JSONL log because a crash can then never leave a torn line to repair, a state change never
//! needs compaction, and a damaged entry costs only that one job (it is skipped with a warning).
//! The price — one small fsync'd file per state change — is nothing next to an image.

//!
//! A job's end is the one write that must not be lost: an entry left at `running` would run the
//! job again after a restart. When the final record cannot be written (a full disk), the entry
//! is renamed to `<id>.<state>.json` instead — a rename needs no free space — and the full
//! record replaces that tombstone as soon as a write succeeds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::job::{is_job_id, FailureKind, JobError, JobRecord, JobState};
use crate::engine::output::{sync_dir, write_atomic};

pub const JOURNAL_DIR: &str = ".jobs";

#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal under `outputs`; the folder is created on the first write.
    pub fn new(outputs: &Path) -> Self {
        Self {
            dir: outputs.join(JOURNAL_DIR),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn tombstone(&self, id: &str, state: JobState) -> PathBuf {
        self.dir.join(format!("{id}.{state}.json"))
    }

    /// Writes (or replaces) a job's entry; a reader never sees a half-written file.
    pub fn write(&self, record: &JobRecord) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        write_atomic(&self.path(&record.id), &bytes)
    }

    /// Writes a finished job's final record; if that fails, marks the entry with the job's end
    /// state by a rename (see the module docs).
    pub fn write_end(&self, record: &JobRecord) -> EndWrite {
        let tomb = self.tombstone(&record.id, record.state);
        match self.write(record) {
            Ok(()) => {
                if std::fs::remove_file(&tomb).is_ok() {
                    let _ = sync_dir(&self.dir);
                }
                EndWrite::Written
            }
            Err(e) => {
                let renamed =
                    std::fs::rename(self.path(&record.id), &tomb).and_then(|_| sync_dir(&self.dir));
                match renamed {
                    Ok(()) => EndWrite::Tombstoned(e),
                    Err(_) if tomb.exists() => EndWrite::Tombstoned(e),
                    Err(_) => EndWrite::Failed(e),
                }
            }
        }
    }

    /// Removes a job's entry and any end-state tombstone (a deleted history item); a missing
    /// entry is not an error.
    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        let mut paths = vec![self.path(id)];
        for state in [JobState::Done, JobState::Failed, JobState::Cancelled] {
            paths.push(self.tombstone(id, state));
        }
        for path in paths {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let _ = sync_dir(&self.dir);
        Ok(())
    }

    /// Every readable entry, in acceptance order. Unreadable or foreign files are skipped with a
    /// warning: one damaged entry must not keep the server from starting.
    pub fn load(&self) -> Vec<JobRecord> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), "cannot read the job journal: {e}");
                return Vec::new();
            }
        };
        let mut records: HashMap<String, JobRecord> = HashMap::new();
        let mut tombstones: Vec<(String, JobState, PathBuf)> = Vec::new();
        for entry in rd.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // Leftover temporaries of an interrupted write start with a dot: the entry they
            // were replacing is still intact next to them.
            if name.starts_with('.') {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            if let Some((id, state)) = stem.split_once('.') {
                match end_state(state) {
                    Some(state) if is_job_id(id) => tombstones.push((id.to_string(), state, path)),
                    _ => {
                        tracing::warn!(file = %path.display(), "foreign file in the journal; skipped")
                    }
                }
                continue;
            }
            let id = stem;
            match read_record(&path) {
                Ok(r) if r.id == id && is_job_id(id) => {
                    records.insert(r.id.clone(), r);
                }
                Ok(r) => tracing::warn!(
                    file = %path.display(),
                    "journal entry names job `{}`; skipped", r.id
                ),
                Err(e) => {
                    tracing::warn!(file = %path.display(), "corrupt journal entry skipped: {e}")
                }
            }
        }
        for (id, state, path) in tombstones {
            if let Some(r) = records.get(&id).filter(|r| r.state.is_terminal()) {
                // The final record was written after all; the marker is stale.
                tracing::debug!(job_id = %r.id, "stale end marker removed");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match read_record(&path) {
                Ok(r) if r.id == id => {
                    let ended = self.ended(r, state);
                    records.insert(id, ended);
                }
                _ => tracing::warn!(file = %path.display(), "unreadable end marker skipped"),
            }
        }
        let mut out: Vec<JobRecord> = records.into_values().collect();
        out.sort_by_key(|r| r.seq);
        out
    }

    /// A record whose end was marked by a tombstone: the last full record it replaced, with the
    /// end state, and what can be recovered of the rest (a done job's sidecar, or its images).
    fn ended(&self, mut r: JobRecord, state: JobState) -> JobRecord {
        let outputs = self.dir.parent().unwrap_or(Path::new("."));
        if state == JobState::Done {
            if let Ok(side) = read_record(&outputs.join(format!("{}.json", r.id))) {
                if side.id == r.id && side.state == JobState::Done {
                    return side;
                }
            }
            r.images = (1..=r.request.batch as usize)
                .map(|n| super::job::image_name(&r.id, n))
                .filter(|f| outputs.join(f).is_file())
                .collect();
        } else if state == JobState::Failed && r.error.is_none() {
            r.error = Some(JobError::new(
                FailureKind::StorageUnwritable,
                "the job failed, and its final record could not be written (the outputs folder \
                 was full or not writable)",
            ));
        }
        r.state = state;
        r
    }
}

/// What became of a job's final record.
#[derive(Debug)]
pub enum EndWrite {
    Written,
    /// Not written, but the entry is marked ended: a restart will not run the job again.
    Tombstoned(std::io::Error),
    /// Neither: the entry still says what it said before.
    Failed(std::io::Error),
}

fn end_state(s: &str) -> Option<JobState> {
    match s {
        "done" => Some(JobState::Done),
        "failed" => Some(JobState::Failed),
        "cancelled" => Some(JobState::Cancelled),
        _ => None,
    }
}

fn read_record(path: &Path) -> Result<JobRecord, String> {
    std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<JobRecord>(&b).map_err(|e| e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::job::{new_job_id, JobState};

    fn record(seq: u64) -> JobRecord {
        crate::queue::job::test_record(seq, JobState::Queued, 1)
    }

    /// A failed job's error is journaled typed; one journaled before the error was typed (a plain
    /// message) still loads, as an internal failure with its message.
    #[test]
    fn failures_round_trip_and_old_messages_still_load() {
        let mut r = record(3);
        r.state = JobState::Failed;
        r.error = Some(JobError::new(
            FailureKind::DoesNotFit,
            "not enough memory: 9 GiB",
        ));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["error"]["kind"], "does_not_fit");
        let back: JobRecord = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, r);
        let mut old = json;
        old["error"] = serde_json::json!("the worker thread has stopped");
        let back: JobRecord = serde_json::from_value(old.clone()).unwrap();
        let e = back.error.unwrap();
        assert_eq!(e.kind, FailureKind::Internal);
        assert_eq!(e.message, "the worker thread has stopped");
        old["error"] = serde_json::Value::Null;
        assert!(serde_json::from_value::<JobRecord>(old)
            .unwrap()
            .error
            .is_none());
    }

    #[test]
    fn round_trips_in_order_and_skips_damage() {
        let dir = std::env::temp_dir().join(format!("zturbo-journal-{}", new_job_id()));
        let j = Journal::new(&dir);
        assert!(j.load().is_empty(), "a missing journal is empty");
        let (a, b) = (record(2), record(1));
        j.write(&a).unwrap();
        j.write(&b).unwrap();
        std::fs::write(j.dir().join("0123456789abcdef.json"), b"{\"id\": \"01").unwrap();
        std::fs::write(j.dir().join(".x.json.1.tmp"), b"partial").unwrap();
        std::fs::write(j.dir().join("notes.txt"), b"hello").unwrap();
        let loaded = j.load();
        assert_eq!(loaded, vec![b.clone(), a.clone()]);
        assert!(!j.dir().join(".x.json.1.tmp").exists());
        let mut a2 = a.clone();
        a2.state = JobState::Done;
        j.write(&a2).unwrap();
        assert_eq!(j.load()[1].state, JobState::Done);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_end_that_cannot_be_written_is_still_an_end() {
        let dir = std::env::temp_dir().join(format!("zturbo-journal-end-{}", new_job_id()));
        let j = Journal::new(&dir);
        let mut r = record(1);
        r.state = JobState::Running;
        j.write(&r).unwrap();
        // Writing the entry fails (its temporary's name is taken by a folder): the entry is
        // renamed to its end state instead.
        let tmp = j
            .dir()
            .join(format!(".{}.json.{}.tmp", r.id, std::process::id()));
        std::fs::create_dir(&tmp).unwrap();
        let mut end = r.clone();
        end.state = JobState::Failed;
        end.error = Some(JobError::new(
            FailureKind::StorageFull,
            "could not write the images: No space left on device",
        ));
        assert!(matches!(j.write_end(&end), EndWrite::Tombstoned(_)));
        assert!(j.dir().join(format!("{}.failed.json", r.id)).exists());
        let loaded = j.load();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].state, JobState::Failed, "not `running`: no rerun");
        assert!(loaded[0]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("could not be written"));
        // Once a write succeeds the full record replaces the marker.
        std::fs::remove_dir(&tmp).unwrap();
        assert!(matches!(j.write_end(&end), EndWrite::Written));
        assert!(!j.dir().join(format!("{}.failed.json", r.id)).exists());
        assert_eq!(j.load(), vec![end]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

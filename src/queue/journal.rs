//! The job journal: accepted jobs survive a restart (kill -9 included).
//!
//! One JSON file per job, `<outputs>/.jobs/<id>.json`, replaced atomically (temporary file +
//! rename, `engine::output::write_atomic`) on every state change. Chosen over an append-only
//! JSONL log because a crash can then never leave a torn line to repair, a state change never
//! needs compaction, and a damaged entry costs only that one job (it is skipped with a warning).
//! The price — one small fsync'd file per state change — is nothing next to an image.

use std::path::{Path, PathBuf};

use super::job::{is_job_id, JobRecord};
use crate::engine::output::write_atomic;

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

    /// Writes (or replaces) a job's entry; a reader never sees a half-written file.
    pub fn write(&self, record: &JobRecord) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        write_atomic(&self.path(&record.id), &bytes)
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
        let mut out = Vec::new();
        for entry in rd.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // Leftover temporaries of an interrupted write start with a dot: the entry they
            // were replacing is still intact next to them.
            if name.starts_with('.') {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<JobRecord>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(r) if r.id == id && is_job_id(id) => out.push(r),
                Ok(r) => tracing::warn!(
                    file = %path.display(),
                    "journal entry names job `{}`; skipped", r.id
                ),
                Err(e) => {
                    tracing::warn!(file = %path.display(), "corrupt journal entry skipped: {e}")
                }
            }
        }
        out.sort_by_key(|r| r.seq);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::planner::MemoryMode;
    use crate::queue::job::{new_job_id, JobState};
    use crate::request::ValidRequest;

    fn record(seq: u64) -> JobRecord {
        JobRecord {
            id: new_job_id(),
            seq,
            state: JobState::Queued,
            model: "demo".into(),
            created_at: 1,
            started_at: None,
            finished_at: None,
            request: ValidRequest {
                prompt: "a lake".into(),
                negative_prompt: None,
                width: 64,
                height: 64,
                steps: 2,
                cfg: 1.0,
                seed: 7,
                batch: 1,
                enhance: false,
                memory_mode: MemoryMode::Auto,
                init: None,
                loras: Vec::new(),
            },
            params: None,
            enhancement: None,
            images: vec![],
            notices: vec![],
            timings: None,
            peak_memory_bytes: None,
            plan: None,
            error: None,
        }
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
}

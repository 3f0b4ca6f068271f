//! The outputs folder as a resource shared with the file system: one server at a time (an
//! exclusive lock that names its holder's pid), cleanup of what interrupted writes left behind,
//! and whether the folder can be written right now (for `/api/health` and for turning disk
//! errors into 507/503 rather than 500).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::journal::JOURNAL_DIR;

/// The lock file in the outputs folder; it holds the pid of the server that has the lock.
pub const LOCK_FILE: &str = ".zturbo.lock";
/// Below this much free space the folder is reported as degraded (a few large images).
pub const MIN_FREE_BYTES: u64 = 64 << 20;
/// How long a health probe's answer is reused.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Why a write to the outputs folder failed, as far as the client needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageProblem {
    /// No space (or quota) left: 507 Insufficient Storage.
    Full,
    /// Read-only, permissions, a broken disk: 503 Service Unavailable.
    Unwritable,
}

impl StorageProblem {
    pub fn of(e: &io::Error) -> Self {
        if e.kind() == io::ErrorKind::StorageFull {
            return StorageProblem::Full;
        }
        #[cfg(unix)]
        if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
            return StorageProblem::Full;
        }
        StorageProblem::Unwritable
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another zturbo server (pid {pid}) is already using the outputs folder {dir}; stop it, or \
         start this one with a different --outputs"
    )]
    Held { pid: String, dir: String },
    #[error("cannot lock the outputs folder {dir}: {source}")]
    Io { dir: String, source: io::Error },
}

/// Held for as long as the server runs; the lock goes with the process (kill -9 included).
#[derive(Debug)]
pub struct OutputsLock {
    _file: File,
}

/// Takes the outputs folder for this process, or says which process has it.
pub fn lock(outputs: &Path) -> Result<OutputsLock, LockError> {
    let dir = outputs.display().to_string();
    let path = outputs.join(LOCK_FILE);
    // A read-only folder can still be locked: through an existing lock file opened for reading,
    // or the folder itself (then the holder's pid cannot be written down).
    let (mut file, writable) = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
    {
        Ok(f) => (f, true),
        Err(e) => match File::open(&path).or_else(|_| File::open(outputs)) {
            Ok(f) => {
                tracing::warn!(file = %path.display(), "cannot write the lock file ({e}); locking read-only");
                (f, false)
            }
            Err(_) => return Err(LockError::Io { dir, source: e }),
        },
    };
    if let Err(e) = try_lock(&file) {
        if e.kind() == io::ErrorKind::WouldBlock {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let pid = match text.trim() {
                p if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.to_string(),
                _ => "unknown".to_string(),
            };
            return Err(LockError::Held { pid, dir });
        }
        return Err(LockError::Io { dir, source: e });
    }
    if writable {
        let pid = format!("{}\n", std::process::id());
        let written = file
            .set_len(0)
            .and_then(|_| file.write_all(pid.as_bytes()))
            .and_then(|_| file.sync_all());
        if let Err(e) = written {
            tracing::warn!(file = %path.display(), "could not record this server's pid: {e}");
        }
    }
    Ok(OutputsLock { _file: file })
}

#[cfg(unix)]
fn try_lock(file: &File) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a descriptor this function's caller owns for the lock's lifetime.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(io::Error::new(io::ErrorKind::WouldBlock, e));
    }
    Err(e)
}

#[cfg(not(unix))]
fn try_lock(_file: &File) -> io::Result<()> {
    tracing::warn!("outputs folder locking is not implemented on this platform");
    Ok(())
}

/// Whether `name` is a temporary that `write_atomic` makes (`.<file>.<pid>.tmp`).
pub fn is_temp_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
        return false;
    };
    match rest.rsplit_once('.') {
        Some((file, pid)) => {
            !file.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// Removes the temporaries a killed write left in the outputs folder (the journal cleans its
/// own). Only with the lock held: another server's writes in progress look the same.
pub fn clean_stale_temps(outputs: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(outputs) else {
        return 0;
    };
    let mut removed = 0;
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && is_temp_name(&name) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(
            files = removed,
            "removed temporary files of interrupted writes"
        );
    }
    removed
}

/// Removes images `<id>-1.png` … `<id>-<count>.png` (those that exist); returns how many.
pub fn remove_images(outputs: &Path, id: &str, count: usize) -> usize {
    (1..=count)
        .filter(|n| std::fs::remove_file(outputs.join(super::job::image_name(id, *n))).is_ok())
        .count()
}

/// Whether the outputs folder can be written: a real probe (create, write, fsync, remove a
/// small file in the journal's folder), the free space, and the last write the server made.
#[derive(Debug)]
pub struct OutputsHealth {
    dir: PathBuf,
    last_failure: Mutex<Option<String>>,
    probed: Mutex<Option<(Instant, Option<String>)>>,
}

impl OutputsHealth {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            last_failure: Mutex::new(None),
            probed: Mutex::new(None),
        }
    }

    /// Records how a write the server made went (a failure is reported until a write succeeds).
    pub fn note(&self, what: &str, result: &io::Result<()>) {
        let mut last = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
        *last = result
            .as_ref()
            .err()
            .map(|e| format!("writing {what} failed: {e}"));
    }

    /// `None` when the folder can be written; otherwise why not, in one sentence. Blocking I/O
    /// (at most one probe every 2 s).
    pub fn problem(&self) -> Option<String> {
        let mut probed = self.probed.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = probed
            .as_ref()
            .filter(|(at, _)| at.elapsed() < PROBE_EVERY)
            .map(|(_, p)| p.clone());
        let found = match fresh {
            Some(p) => p,
            None => {
                let p = self.probe();
                *probed = Some((Instant::now(), p.clone()));
                p
            }
        };
        drop(probed);
        found.or_else(|| {
            self.last_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .map(|f| format!("the outputs folder {}: {f}", self.dir.display()))
        })
    }

    fn probe(&self) -> Option<String> {
        let journal = self.dir.join(JOURNAL_DIR);
        let path = journal.join(format!(".health-probe.{}.tmp", std::process::id()));
        let written = std::fs::create_dir_all(&journal).and_then(|_| {
            let mut f = File::create(&path)?;
            f.write_all(b"ok")?;
            f.sync_all()
        });
        let _ = std::fs::remove_file(&path);
        if let Err(e) = written {
            return Some(format!(
                "the outputs folder {} cannot be written: {e}",
                self.dir.display()
            ));
        }
        match free_bytes(&self.dir) {
            Some(free) if free < MIN_FREE_BYTES => Some(format!(
                "the disk of the outputs folder {} is almost full ({} MiB free)",
                self.dir.display(),
                free >> 20
            )),
            _ => None,
        }
    }
}

/// Bytes an unprivileged process may still write on the file system of `dir`.
#[cfg(unix)]
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs with a NUL-terminated path and a pointer to a local struct.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

#[cfg(not(unix))]
fn free_bytes(_dir: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::job::new_job_id;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("zturbo-outputs-{name}-{}", new_job_id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn one_server_per_folder_and_the_refusal_names_the_holder() {
        let dir = temp("lock");
        let held = lock(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap().trim(),
            std::process::id().to_string()
        );
        // flock is per open file: a second open in this process is refused just like another
        // process would be.
        let err = lock(&dir).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())) && err.contains("--outputs"),
            "{err}"
        );
        assert_eq!(err.matches(". ").count(), 0, "one sentence: {err}");
        drop(held);
        let again = lock(&dir);
        assert!(again.is_ok(), "released with its holder");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn stale_temporaries_are_removed_and_nothing_else() {
        let dir = temp("temps");
        for f in [
            ".0123456789abcdef-1.png.4242.tmp",
            ".0123456789abcdef.json.17.tmp",
        ] {
            std::fs::write(dir.join(f), b"partial").unwrap();
        }
        for f in [
            "0123456789abcdef-1.png",
            ".zturbo.lock",
            ".notes.tmp",
            "x.png.12.tmp",
        ] {
            std::fs::write(dir.join(f), b"keep").unwrap();
        }
        assert_eq!(clean_stale_temps(&dir), 2);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                ".notes.tmp",
                ".zturbo.lock",
                "0123456789abcdef-1.png",
                "x.png.12.tmp"
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn disk_errors_are_told_apart() {
        assert_eq!(
            StorageProblem::of(&io::Error::from_raw_os_error(libc::ENOSPC)),
            StorageProblem::Full
        );
        assert_eq!(
            StorageProblem::of(&io::Error::from_raw_os_error(libc::EDQUOT)),
            StorageProblem::Full
        );
        assert_eq!(
            StorageProblem::of(&io::Error::from_raw_os_error(libc::EROFS)),
            StorageProblem::Unwritable
        );
    }

    #[test]
    fn health_reports_an_unwritable_folder_and_failed_writes() {
        let dir = temp("health");
        let h = OutputsHealth::new(&dir);
        assert_eq!(h.problem(), None);
        h.note("an image", &Err(io::Error::from_raw_os_error(libc::ENOSPC)));
        let p = h.problem().unwrap();
        assert!(p.contains("an image") && p.contains("No space left"), "{p}");
        h.note("the journal", &Ok(()));
        assert_eq!(h.problem(), None);
        // The journal's folder cannot be made: every write would fail.
        let blocked = temp("health-blocked");
        std::fs::write(blocked.join(JOURNAL_DIR), b"a file where the folder goes").unwrap();
        let p = OutputsHealth::new(&blocked).problem().unwrap();
        assert!(p.contains("cannot be written"), "{p}");
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(blocked).unwrap();
    }
}

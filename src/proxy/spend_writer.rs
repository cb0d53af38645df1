//! The spend-log writer: one task owns the live file; requests hand it records through a
//! bounded queue and wait for the write before their response finishes.
//!
//! - One `write(2)` per line on an `O_APPEND` file, so a concurrent reader (the shipper) never sees
//!   half a record from a well-behaved filesystem, and lines never interleave.
//! - Bounded queue: when the disk is slow the queue fills and requests wait for room — records are
//!   never dropped, and memory stays bounded.
//! - No `fsync` per line (it would cap throughput at the disk's flush rate): a line is in the page
//!   cache when the request completes, so it survives a proxy crash; the file is synced on
//!   rotation and at shutdown.
//! - Rotation by size: the live file is renamed to `<name>.<UTC YYYYMMDDTHHMMSS.mmmZ>` in the same
//!   directory and a fresh live file is opened. The shipper follows rotated files by that naming
//!   and by inode.
//!
//! The writer is a task on the runtime rather than a thread of its own: an append to the page
//! cache takes microseconds, while waking a dedicated thread and being woken back by it cost two
//! context switches per record — the larger part of a proxied request's CPU time. The writer takes
//! everything queued at once and writes it line by line, so under load one wake-up serves many
//! records. The price is that a stalled disk blocks one runtime worker during the write; requests
//! wait for their records then anyway.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::spend::SpendRecord;

/// Records that may wait for the disk before requests start waiting for room.
const QUEUE_CAPACITY: usize = 4096;
/// Records taken off the queue per wake-up of the writer.
const BATCH: usize = 256;
/// Permissions of the spend log: the owner writes, the shipper's group reads.
const FILE_MODE: u32 = 0o640;
/// Permissions of directories the proxy creates.
pub const DIR_MODE: u32 = 0o750;

#[derive(Debug, thiserror::Error)]
pub enum SpendLogError {
    #[error(
        "cannot open spend log {path}: {source}; check the directory exists and is writable (tally_settings.spend_log / TALLY_SPEND_LOG)"
    )]
    Open { path: String, source: io::Error },
    #[error("cannot write spend log {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error("the spend log writer has stopped")]
    Closed,
}

enum Job {
    Append {
        line: Vec<u8>,
        done: oneshot::Sender<Result<(), SpendLogError>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// A handle to the writer task; cheap to clone.
#[derive(Clone)]
pub struct SpendWriter {
    jobs: mpsc::Sender<Job>,
    healthy: Arc<AtomicBool>,
    path: Arc<PathBuf>,
}

impl SpendWriter {
    /// Opens (or creates) the live spend log and starts the writer task on the current Tokio
    /// runtime (so it must be called from within one).
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, SpendLogError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(parent)
                .map_err(|source| SpendLogError::Open {
                    path: path.display().to_string(),
                    source,
                })?;
        }
        let file = LiveFile::open(path.to_path_buf(), max_bytes)?;
        let (jobs, rx) = mpsc::channel(QUEUE_CAPACITY);
        let healthy = Arc::new(AtomicBool::new(true));
        let writer_healthy = healthy.clone();
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| SpendLogError::Open {
            path: path.display().to_string(),
            source: io::Error::other(format!("no async runtime to run the writer on: {e}")),
        })?;
        runtime.spawn(writer_loop(file, rx, writer_healthy));
        Ok(Self {
            jobs,
            healthy,
            path: Arc::new(path.to_path_buf()),
        })
    }

    /// Appends one record and returns once it is written (or failed to be).
    pub async fn append(&self, record: &SpendRecord) -> Result<(), SpendLogError> {
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(Job::Append {
                line: record.to_line(),
                done,
            })
            .await
            .map_err(|_| SpendLogError::Closed)?;
        wait.await.map_err(|_| SpendLogError::Closed)?
    }

    /// True while the last write succeeded and the writer runs.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.jobs.is_closed()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes everything queued so far, syncs the file and stops the writer.
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.jobs.send(Job::Close { done }).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn writer_loop(mut file: LiveFile, mut rx: mpsc::Receiver<Job>, healthy: Arc<AtomicBool>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut jobs = batch.drain(..);
        while let Some(job) = jobs.next() {
            match job {
                Job::Append { line, done } => {
                    let result = file.append(&line);
                    healthy.store(result.is_ok(), Ordering::Relaxed);
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "spend log write failed; requests are refused until it recovers");
                    }
                    let _ = done.send(result);
                }
                Job::Close { done } => {
                    rx.close();
                    // Anything queued before the close is still written: the rest of this batch,
                    // then what is left in the queue.
                    let queued = std::iter::from_fn(|| rx.try_recv().ok());
                    for job in jobs.by_ref().chain(queued) {
                        if let Job::Append { line, done } = job {
                            let _ = done.send(file.append(&line));
                        }
                    }
                    if let Err(e) = file.sync() {
                        tracing::warn!(error = %e, "could not sync the spend log at shutdown");
                    }
                    let _ = done.send(());
                    return;
                }
            }
        }
    }
    let _ = file.sync();
}

/// The live file and its size, for rotation.
struct LiveFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
}

impl LiveFile {
    fn open(path: PathBuf, max_bytes: u64) -> Result<Self, SpendLogError> {
        let file = open_append(&path).map_err(|source| SpendLogError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut live = Self {
            path,
            file,
            size,
            max_bytes,
        };
        live.end_torn_line().map_err(|source| SpendLogError::Open {
            path: live.path.display().to_string(),
            source,
        })?;
        Ok(live)
    }

    /// A previous writer that died mid-line (or hit a full disk) left a last line without its
    /// `\n`. Appending straight after it would glue the next record onto the fragment and the
    /// shipper would reject both; ending the fragment first keeps the new record whole (the
    /// fragment alone is rejected, with its reason, by the shipper).
    fn end_torn_line(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.size == 0 {
            return Ok(());
        }
        let mut last = [0u8; 1];
        File::open(&self.path)?.read_exact_at(&mut last, self.size - 1)?;
        if last[0] != b'\n' {
            self.file.write_all(b"\n")?;
            self.size += 1;
            tracing::warn!(
                path = %self.path.display(),
                "the spend log ended in a partial line (a writer stopped mid-record); it was ended so new records stay whole"
            );
        }
        Ok(())
    }

    fn append(&mut self, line: &[u8]) -> Result<(), SpendLogError> {
        let write_error = |path: &Path, source| SpendLogError::Write {
            path: path.display().to_string(),
            source,
        };
        if self.max_bytes > 0 && self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate().map_err(|e| write_error(&self.path, e))?;
        }
        // A regular file takes the whole buffer in one write(2); write_all only loops on the
        // exotic partial write, which would still append the rest in order.
        self.file
            .write_all(line)
            .map_err(|e| write_error(&self.path, e))?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.sync_all()?;
        let rotated = rotated_name(&self.path);
        std::fs::rename(&self.path, &rotated)?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        tracing::info!(rotated = %rotated.display(), "rotated the spend log");
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
}

/// `<dir>/<live name>.<UTC YYYYMMDDTHHMMSS.mmmZ>`, bumped by a millisecond while taken so two
/// rotations in the same millisecond never overwrite each other.
fn rotated_name(live: &Path) -> PathBuf {
    let name = live
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "spend.jsonl".into());
    let mut at = chrono::Utc::now();
    loop {
        let candidate = live.with_file_name(format!("{name}.{}", at.format("%Y%m%dT%H%M%S%.3fZ")));
        if !candidate.exists() {
            return candidate;
        }
        at += chrono::Duration::milliseconds(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn record(n: u32) -> SpendRecord {
        SpendRecord {
            schema: 1,
            transaction_id: format!("tx-{n}"),
            start_time: None,
            end_time: chrono::Utc::now(),
            call_type: "chat_completion".into(),
            model: "m".into(),
            upstream_model: None,
            input_tokens: 1,
            output_tokens: 2,
            total_tokens: Some(3),
            usage_estimated: false,
            response_cost: None,
            end_user_id: None,
            user_id: None,
            team_id: None,
            key_alias: None,
            key_hash: None,
            stream: false,
            status: "success".into(),
            duration_ms: Some(1),
        }
    }

    /// Regression (issue #6): a proxy killed mid-line (or stopped by a full disk) leaves a torn
    /// last line; the next proxy's first record used to be appended onto it, so both were one
    /// malformed line and that request was never billed.
    #[tokio::test]
    async fn a_torn_last_line_is_ended_before_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("spend.jsonl");
        let whole = record(1).to_line();
        let mut text = whole.clone();
        text.extend_from_slice(&record(2).to_line()[..40]);
        std::fs::write(&live, &text).unwrap();
        let writer = SpendWriter::open(&live, 0).unwrap();
        writer.append(&record(3)).await.unwrap();
        writer.close().await;
        let after = std::fs::read(&live).unwrap();
        let lines: Vec<&[u8]> = after
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 3, "{}", String::from_utf8_lossy(&after));
        assert!(SpendRecord::parse_line(lines[0]).is_ok());
        assert!(
            SpendRecord::parse_line(lines[1]).is_err(),
            "the fragment stays alone"
        );
        assert_eq!(
            SpendRecord::parse_line(lines[2]).unwrap().transaction_id,
            "tx-3",
            "the new record is whole"
        );
        // A file that ends cleanly gets nothing extra.
        let writer = SpendWriter::open(&live, 0).unwrap();
        writer.close().await;
        assert_eq!(std::fs::read(&live).unwrap(), after);
    }

    #[tokio::test]
    async fn appends_lines_with_mode_0640_and_rotates_to_timestamped_siblings() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("logs/spend.jsonl");
        let line_len = record(0).to_line().len() as u64;
        // Room for two lines per file.
        let writer = SpendWriter::open(&live, line_len * 2 + 1).unwrap();
        for n in 0..5 {
            writer.append(&record(n)).await.unwrap();
        }
        writer.close().await;
        assert!(writer.append(&record(9)).await.is_err());

        let mode = std::fs::metadata(&live).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let mut rotated: Vec<_> = std::fs::read_dir(live.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "spend.jsonl")
            .collect();
        rotated.sort();
        assert_eq!(rotated.len(), 2, "{rotated:?}");
        for name in &rotated {
            let stamp = name.strip_prefix("spend.jsonl.").unwrap();
            assert!(
                chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S%.3fZ").is_ok(),
                "{name}"
            );
        }
        // Every record once, in order, across rotated + live files.
        let mut ids = Vec::new();
        for name in rotated
            .iter()
            .chain(std::iter::once(&"spend.jsonl".to_owned()))
        {
            let text = std::fs::read(live.with_file_name(name)).unwrap();
            for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                ids.push(SpendRecord::parse_line(line).unwrap().transaction_id);
            }
        }
        assert_eq!(ids, (0..5).map(|n| format!("tx-{n}")).collect::<Vec<_>>());
    }
}

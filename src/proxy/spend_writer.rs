//! The spend-log writer: each request appends its record to the live file, one at a time, and
//! waits for the write before its response finishes.
//!
//! - One `write(2)` per line on an `O_APPEND` file, so a concurrent reader (the shipper) never sees
//!   half a record from a well-behaved filesystem, and lines never interleave.
//! - When the disk is slow, requests wait for their turn at the file — records are never dropped,
//!   and memory stays bounded by the requests in flight.
//! - A write that fails (disk full, read-only, I/O error) is retried with a capped backoff until
//!   it succeeds: the request waits for its record, and a full disk slows requests down instead of
//!   answering them without a record or dropping one (docs/reliability.md, "Findings"). A
//!   partial write is cut off first so the retry appends a whole line. Readiness reports `not
//!   writable` meanwhile; the writer stays healthy (a restart would lose the records waiting in
//!   memory). At shutdown the retries stop [`CLOSE_GRACE`] after `close` was called.
//! - No `fsync` per line (it would cap throughput at the disk's flush rate): a line is in the page
//!   cache when the request completes, so it survives a proxy crash; a rotated file is synced (in
//!   the background) and the live file at shutdown.
//! - Rotation by size: the live file is renamed to `<name>.<UTC YYYYMMDDTHHMMSS.mmmZ>` in the same
//!   directory and a fresh live file is opened. The shipper follows rotated files by that naming
//!   and by inode.
//!
//! Each request appends its own line, under an async mutex over the live file: an append to the
//! page cache takes microseconds, so handing the record to a writer task (first an OS thread, then
//! a runtime task) and being woken back cost more than the write — two cross-thread wake-ups per
//! record, the larger part of a proxied request's wait at low load. The mutex keeps the single
//! writer's guarantees (lines never interleave, one `write(2)` each, in lock order) and bounds the
//! waiting: a request that finds the file busy parks its task (its worker serves others) until
//! its turn. Rotation renames and reopens under the lock, and leaves the `fsync` of the rotated
//! file to a blocking thread, so no runtime worker stalls for the disk's flush.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::logging::Repeated;
use crate::spend::SpendRecord;

/// Permissions of the spend log: the owner writes, the shipper's group reads.
const FILE_MODE: u32 = 0o640;
/// Permissions of directories the proxy creates.
pub const DIR_MODE: u32 = 0o750;
/// First wait before writing again after a failed write.
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two tries.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// At shutdown, how long records still waiting for the disk keep being retried.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SpendLogError {
    #[error(
        "cannot open spend log {path}: {source}; check the directory exists and is writable (tally_settings.spend_log / TALLY_SPEND_LOG)"
    )]
    Open { path: String, source: io::Error },
    #[error(
        "spend log {path} is a symbolic link; tally does not follow it (the records would go \
         wherever it points, with that file's owner and mode): set tally_settings.spend_log / \
         TALLY_SPEND_LOG to the real file's path, or replace the link with a regular file"
    )]
    Symlink { path: String },
    #[error("cannot write spend log {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error("the spend log writer has stopped")]
    Closed,
}

/// A handle to the spend log; cheap to clone.
#[derive(Clone)]
pub struct SpendWriter {
    /// The live file (`None` once closed) and what the writer knows of the disk's trouble.
    file: Arc<Mutex<Writer>>,
    /// The last write succeeded (false while appends wait for the disk).
    writable: Arc<AtomicBool>,
    /// When `close` was called: retries end [`CLOSE_GRACE`] after it, for every waiting append.
    closing: Arc<OnceLock<Instant>>,
    path: Arc<PathBuf>,
}

/// What the lock guards.
struct Writer {
    live: Option<LiveFile>,
    trouble_since: Option<Instant>,
    logged: Repeated,
}

impl SpendWriter {
    /// Opens (or creates) the live spend log.
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
        Ok(Self {
            file: Arc::new(Mutex::new(Writer {
                live: Some(file),
                trouble_since: None,
                logged: Repeated::default(),
            })),
            writable: Arc::new(AtomicBool::new(true)),
            closing: Arc::new(OnceLock::new()),
            path: Arc::new(path.to_path_buf()),
        })
    }

    /// Appends one record and returns once it is written. A failed write is retried (the lock
    /// held: the next records wait behind this one, in order) until it succeeds, or until
    /// [`CLOSE_GRACE`] after `close`.
    pub async fn append(&self, record: &SpendRecord) -> Result<(), SpendLogError> {
        // Serialised before taking the lock, so the lock is held for the write alone.
        let line = record.to_line();
        let mut writer = self.file.lock().await;
        let mut wait = RETRY_MIN;
        loop {
            let live = writer.live.as_mut().ok_or(SpendLogError::Closed)?;
            let error = match live.append(&line) {
                Ok(()) => {
                    writer.succeeded(&self.writable);
                    return Ok(());
                }
                Err(e) => e,
            };
            if self
                .closing
                .get()
                .is_some_and(|at| at.elapsed() >= CLOSE_GRACE)
            {
                return Err(error);
            }
            writer.failed(&error, wait, &self.writable);
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    /// True until the log is closed, even while appends wait for the disk: restarting the
    /// process would not help, and would lose the records waiting (the watchdog uses this).
    pub fn is_healthy(&self) -> bool {
        self.closing.get().is_none()
    }

    /// True while the log is open and its last write succeeded (readiness uses this).
    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed) && self.is_healthy()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the file and closes the log: appends after this fail with
    /// [`SpendLogError::Closed`]. Appends that got the lock first are written before (on a
    /// failing disk, given up [`CLOSE_GRACE`] from now).
    pub async fn close(&self) {
        let _ = self.closing.set(Instant::now());
        let mut writer = self.file.lock().await;
        // Shutdown: blocking this worker for the flush is what the caller waits for anyway.
        if let Some(live) = writer.live.take()
            && let Err(e) = live.sync()
        {
            tracing::warn!(error = %e, "could not sync the spend log at shutdown");
        }
    }
}

impl Writer {
    fn failed(&mut self, error: &SpendLogError, retry_in: Duration, writable: &AtomicBool) {
        writable.store(false, Ordering::Relaxed);
        self.trouble_since.get_or_insert_with(Instant::now);
        if self.logged.due() {
            tracing::error!(
                error = %error,
                ?retry_in,
                "{error}; requests wait for their records and the write is retried until it succeeds \
                 (nothing is dropped). Free space in, or make writable, the spend log's directory"
            );
        }
    }

    fn succeeded(&mut self, writable: &AtomicBool) {
        writable.store(true, Ordering::Relaxed);
        if let Some(since) = self.trouble_since.take() {
            self.logged.reset();
            tracing::info!(
                blocked_for = ?since.elapsed(),
                "the spend log can be written again; waiting requests go on"
            );
        }
    }
}

/// The live file and its size, for rotation.
struct LiveFile {
    path: PathBuf,
    file: File,
    /// Bytes of whole lines in the live file.
    size: u64,
    max_bytes: u64,
    /// A write failed part-way: the file may end in a fragment to cut off before the next line.
    torn: bool,
}

impl LiveFile {
    fn open(path: PathBuf, max_bytes: u64) -> Result<Self, SpendLogError> {
        let file = open_append(&path).map_err(|source| {
            let path = path.display().to_string();
            if super::files::is_symlink_refusal(&source) {
                SpendLogError::Symlink { path }
            } else {
                SpendLogError::Open { path, source }
            }
        })?;
        super::files::tighten(&file, &path, FILE_MODE);
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut live = Self {
            path,
            file,
            size,
            max_bytes,
            torn: false,
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
        if self.torn {
            self.cut_fragment()
                .map_err(|e| write_error(&self.path, e))?;
        }
        if self.max_bytes > 0 && self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate().map_err(|e| write_error(&self.path, e))?;
        }
        // A regular file takes the whole buffer in one write(2); write_all only loops on a partial
        // write (a disk filling up mid-line), which leaves a fragment if the rest fails.
        if let Err(e) = self.file.write_all(line) {
            self.torn = true;
            let _ = self.cut_fragment();
            return Err(write_error(&self.path, e));
        }
        self.size += line.len() as u64;
        Ok(())
    }

    /// Cuts off what a failed write left after the last whole line, so the retry appends a whole
    /// line and no fragment glues onto it.
    fn cut_fragment(&mut self) -> io::Result<()> {
        if self.file.metadata()?.len() > self.size {
            self.file.set_len(self.size)?;
        }
        self.torn = false;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let rotated = rotated_name(&self.path);
        // A rotation that renamed the file but could not open the next one (disk trouble) is
        // finished by the retry: only the open is left to do.
        if self.path.exists() {
            std::fs::rename(&self.path, &rotated)?;
        }
        let full = std::mem::replace(&mut self.file, open_append(&self.path)?);
        self.size = 0;
        tracing::info!(rotated = %rotated.display(), "rotated the spend log");
        // The flush of a full file can take the disk a long while; it must not hold the lock or
        // a runtime worker. (Lines are in the page cache either way: a proxy crash loses none.)
        let flush = move || {
            if let Err(e) = full.sync_all() {
                tracing::warn!(error = %e, rotated = %rotated.display(), "could not sync the rotated spend log");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(flush)),
            Err(_) => flush(),
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

/// Opens the live file, never through a symbolic link (`O_NOFOLLOW`: a link is refused).
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
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
    use crate::spend::Status;
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
            cache_read_input_tokens: 0,
            cache_creation_input_tokens: 0,
            reasoning_tokens: 0,
            usage_estimated: false,
            response_cost: None,
            end_user_id: None,
            user_id: None,
            team_id: None,
            key_alias: None,
            key_hash: None,
            stream: false,
            status: Status::Success,
            duration_ms: Some(1),
        }
    }

    /// Regression (docs/reliability.md, "Findings"): a proxy killed mid-line (or stopped by a full
    /// disk) leaves a torn last line; the next proxy's first record used to be appended onto it, so
    /// both were one malformed line and that request was never billed.
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

    /// A small tmpfs at `dir`, unmounted on drop; `None` where mounting is not permitted.
    struct Tmpfs(std::path::PathBuf);

    impl Tmpfs {
        fn mount(dir: &Path) -> Option<Self> {
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
                .arg(dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| Self(dir.to_path_buf()))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    /// Takes every free byte of the filesystem holding `path`.
    fn fill(path: &Path) {
        let mut f = File::create(path).unwrap();
        for size in [16 << 10, 512, 1] {
            let block = vec![b'x'; size];
            while f.write_all(&block).is_ok() {}
        }
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A full spend-log disk makes requests wait for their records; none is answered
    /// without its record, none is dropped or torn, and they all complete once there is room.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_makes_appends_wait_and_loses_or_tears_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let Some(_fs) = Tmpfs::mount(dir.path()) else {
            eprintln!("SKIPPED: mounting a tmpfs is not permitted here");
            return;
        };
        let live = dir.path().join("spend.jsonl");
        let writer = SpendWriter::open(&live, 0).unwrap();
        for n in 0..5 {
            writer.append(&record(n)).await.unwrap();
        }
        let filler = dir.path().join("filler");
        fill(&filler);
        let waiting: Vec<_> = (5..45)
            .map(|n| {
                let w = writer.clone();
                tokio::spawn(async move { w.append(&record(n)).await })
            })
            .collect();
        wait_for("the writer to notice the full disk", || {
            !writer.is_writable()
        })
        .await;
        assert!(
            writer.is_healthy(),
            "the writer keeps running while it waits"
        );
        // Still full: the records that fitted in the file's last page are written; every append
        // that has returned has its record in the file, and the rest wait.
        let now = String::from_utf8(std::fs::read(&live).unwrap()).unwrap();
        let mut done = 0;
        for (i, t) in waiting.iter().enumerate() {
            if t.is_finished() {
                done += 1;
                assert!(
                    now.contains(&format!("\"tx-{}\"", i + 5)),
                    "an append returned without its record"
                );
            }
        }
        assert!(done < waiting.len(), "every append returned on a full disk");
        std::fs::remove_file(&filler).unwrap();
        for t in waiting {
            t.await.unwrap().unwrap();
        }
        assert!(writer.is_writable());

        // Full again, then a shutdown: records still waiting get an error after the grace (the
        // request is refused, never answered 200 without its record), and close returns.
        fill(&filler);
        let more: Vec<_> = (45..85)
            .map(|n| {
                let w = writer.clone();
                tokio::spawn(async move { w.append(&record(n)).await.is_ok().then_some(n) })
            })
            .collect();
        wait_for("the writer to notice the full disk again", || {
            !writer.is_writable()
        })
        .await;
        writer.close().await;
        let mut written: Vec<u32> = (0..45).collect();
        for t in more {
            written.extend(t.await.unwrap());
        }
        written.sort();
        assert!(
            written.len() < 85,
            "nothing was refused at shutdown on a full disk"
        );
        std::fs::remove_file(&filler).unwrap();

        let text = std::fs::read(&live).unwrap();
        let ids: Vec<String> = text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                SpendRecord::parse_line(l)
                    .unwrap_or_else(|e| panic!("a torn line ({e}): {}", String::from_utf8_lossy(l)))
                    .transaction_id
            })
            .collect();
        let mut sorted = ids.clone();
        sorted.sort_by_key(|id| id[3..].parse::<u32>().unwrap());
        assert_eq!(
            sorted,
            written
                .iter()
                .map(|n| format!("tx-{n}"))
                .collect::<Vec<_>>(),
            "every record answered Ok is written once, and no refused one"
        );
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

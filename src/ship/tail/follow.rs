//! The [`Tailer`]: decides which file to read next and what rotation, truncation, replacement and
//! deletion mean for the files it has open.

use std::collections::VecDeque;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::identity::{self, Sibling};
use super::reader::{OpenFile, ReadEnd};
use super::watch::DirWatch;
use super::{Chunk, FileId, FilePosition, TailError, TailNotice, TailOptions};

/// Never poll more often than this, whatever the options say: an idle tailer must not spin.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Lines longer than this are always reported too long, whatever `max_line_bytes` says: a partial
/// line is buffered up to the limit, and this bounds that buffer.
pub const MAX_LINE_BYTES_CAP: usize = 16 * 1024 * 1024;

/// How many identities of finished files are remembered (rotated siblings rarely number more).
const MAX_DONE: usize = 1024;

/// Follows the live spend log.
pub struct Tailer {
    options: TailOptions,
    live_path: Arc<Path>,
    /// Files no longer at the live path, read to their end before the live file, oldest first.
    rotated: VecDeque<OpenFile>,
    /// The file last seen at the live path (it may have been renamed since, with no successor yet).
    live: Option<OpenFile>,
    /// Files read to their end: never read again.
    done: VecDeque<FileId>,
    /// Modification time of the file that last left the live path (rotated, replaced or
    /// deleted): rotated siblings at least this new were written after it and must be read
    /// before the next live file. `None` until a live file has left (first-start history rule).
    left_live: Option<SystemTime>,
    /// Positions of files closed since the last chunk.
    closed: Vec<FilePosition>,
    notices: Vec<TailNotice>,
    wake: Arc<Notify>,
    _watch: Option<DirWatch>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TailError + '_ {
    move |source| TailError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `stat` that treats a missing file as `None`.
fn stat_opt(path: &Path) -> Result<Option<Metadata>, TailError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(Some(m)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Opens `path` if it is still the file `meta` describes; `None` if it vanished or changed.
fn open_same(path: &Path, meta: &Metadata) -> Result<Option<(File, Metadata)>, TailError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let now = file.metadata().map_err(io_err(path))?;
    Ok((now.dev() == meta.dev() && now.ino() == meta.ino()).then_some((file, now)))
}

/// An open file of `path` at `offset`, its fingerprint read.
fn open_file(path: &Path, file: File, meta: &Metadata, offset: u64) -> Result<OpenFile, TailError> {
    let fp = identity::fingerprint(&file).map_err(io_err(path))?;
    let id = identity::file_id(meta, fp);
    Ok(OpenFile::new(file, Arc::from(path), id, fp, offset))
}

fn mtime(meta: &Metadata) -> SystemTime {
    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
}

impl Tailer {
    /// Starts from the positions the outbox committed (empty on first start: read the live file
    /// from its beginning). Unfinished rotated files are found again by identity and read first.
    pub fn new(options: TailOptions, known: Vec<FilePosition>) -> Result<Self, TailError> {
        Self::start(options, known, true)
    }

    /// Like [`Tailer::new`], but never watches the directory: only the periodic poll notices
    /// changes. For file systems whose change events are missing or unreliable (NFS, some FUSE
    /// mounts), and for tests of the poll path.
    pub fn new_polling_only(
        options: TailOptions,
        known: Vec<FilePosition>,
    ) -> Result<Self, TailError> {
        Self::start(options, known, false)
    }

    fn start(
        options: TailOptions,
        known: Vec<FilePosition>,
        watch: bool,
    ) -> Result<Self, TailError> {
        let live_path: Arc<Path> = Arc::from(options.live_path.as_path());
        let dir = identity::parent_dir(&live_path)
            .ok_or_else(|| TailError::Watch {
                path: live_path.to_path_buf(),
                reason: "the spend log path names no file".to_owned(),
            })?
            .to_path_buf();
        if !dir.is_dir() {
            return Err(TailError::Watch {
                path: dir,
                reason: "the directory does not exist; create it or point TALLY_SPEND_LOG \
                         at a file in an existing directory"
                    .to_owned(),
            });
        }
        let wake = Arc::new(Notify::new());
        let watch = match watch.then(|| DirWatch::start(&live_path, Arc::clone(&wake))) {
            None => None,
            Some(Ok(w)) => Some(w),
            Some(Err(reason)) => {
                // Still correct, only slower to notice: the periodic poll finds everything.
                tracing::warn!(
                    dir = %dir.display(),
                    %reason,
                    poll_interval = ?options.poll_interval,
                    "cannot watch the spend log directory; falling back to polling"
                );
                None
            }
        };
        let mut tailer = Self {
            options,
            live_path,
            rotated: VecDeque::new(),
            live: None,
            done: VecDeque::new(),
            left_live: None,
            closed: Vec::new(),
            notices: Vec::new(),
            wake,
            _watch: watch,
        };
        tailer.resume(known)?;
        Ok(tailer)
    }

    /// Waits until lines (or position changes) are available and returns them; `Ok(None)` once
    /// `cancel` fires.
    pub async fn next_chunk(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<Option<Chunk>, TailError> {
        let interval = self.options.poll_interval.max(MIN_POLL_INTERVAL);
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            if let Some(chunk) = self.poll_chunk()? {
                return Ok(Some(chunk));
            }
            // A directory event that arrived since the last look left a permit: no wake-up lost.
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(None),
                () = self.wake.notified() => {}
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Returns what can be read right now without waiting; `Ok(None)` when nothing is.
    pub fn poll_chunk(&mut self) -> Result<Option<Chunk>, TailError> {
        let limit = self.options.max_chunk_lines.max(1);
        let max_line = self.options.max_line_bytes.clamp(1, MAX_LINE_BYTES_CAP);
        // Look at the live path first: a rotated file's final read must come after we saw its
        // successor, so lines written to it before the successor appeared are all read.
        self.check_live()?;
        let mut lines = Vec::new();
        while let Some(file) = self.rotated.front_mut() {
            if let Some(old) = check_truncation(file, &mut self.notices)? {
                self.after_truncation(old)?;
                continue;
            }
            let Some(file) = self.rotated.front_mut() else {
                break;
            };
            let end = file
                .read_lines(max_line, limit, &mut lines)
                .map_err(io_err(&file.path))?;
            file.refresh_fingerprint().map_err(io_err(&file.path))?;
            if end == ReadEnd::Budget || lines.len() >= limit {
                break;
            }
            file.take_final_fragment(&mut lines);
            file.finished = true;
            if let Some(file) = self.rotated.pop_front() {
                self.finish(file);
            }
        }
        if self.rotated.is_empty()
            && lines.len() < limit
            && let Some(file) = self.live.as_mut()
        {
            file.read_lines(max_line, limit, &mut lines)
                .map_err(io_err(&file.path))?;
            file.refresh_fingerprint().map_err(io_err(&file.path))?;
        }
        let mut positions = std::mem::take(&mut self.closed);
        for file in self.rotated.iter_mut().chain(self.live.as_mut()) {
            if file.dirty {
                file.dirty = false;
                positions.push(file.position());
            }
        }
        let notices = std::mem::take(&mut self.notices);
        for notice in &notices {
            log_notice(notice);
        }
        if lines.is_empty() && positions.is_empty() && notices.is_empty() {
            return Ok(None);
        }
        Ok(Some(Chunk {
            lines,
            positions,
            notices,
        }))
    }

    /// Marks a file read to its end.
    fn finish(&mut self, mut file: OpenFile) {
        file.finished = true;
        self.closed.push(file.position());
        self.remember_done(file.id);
    }

    fn remember_done(&mut self, id: FileId) {
        if self.done.len() >= MAX_DONE {
            self.done.pop_front();
        }
        self.done.push_back(id);
    }

    /// Whether `meta` (with fingerprint `fp`) is a file already open or already finished.
    fn is_tracked(&self, meta: &Metadata, fp: u64) -> bool {
        let open = self
            .rotated
            .iter()
            .chain(self.live.as_ref())
            .any(|f| identity::same_inode(meta, &f.id));
        open || self
            .done
            .iter()
            .any(|d| identity::same_inode(meta, d) && (d.fingerprint == fp || d.fingerprint == 0))
    }

    fn is_open_inode(&self, meta: &Metadata) -> bool {
        self.rotated
            .iter()
            .chain(self.live.as_ref())
            .any(|f| identity::same_inode(meta, &f.id))
    }

    /// Notices what happened at the live path since the last look.
    fn check_live(&mut self) -> Result<(), TailError> {
        let live_meta = stat_opt(&self.live_path)?;
        let Some(current) = self.live.as_mut() else {
            if live_meta.is_some() {
                self.open_live_and_discover()?;
            }
            return Ok(());
        };
        // Truncation first, whether or not it is still the live file: a copy left by
        // copytruncate must be adopted before rotation discovery could mistake it for news.
        if let Some(old) = check_truncation(current, &mut self.notices)? {
            self.after_truncation(old)?;
        }
        let Some(current) = self.live.as_ref() else {
            return Ok(());
        };
        if let Some(meta) = &live_meta
            && identity::same_inode(meta, &current.id)
        {
            return Ok(());
        }
        let cur_meta = current.file.metadata().map_err(io_err(&current.path))?;
        let deleted = cur_meta.nlink() == 0;
        if !deleted && live_meta.is_none() {
            // Renamed away and no successor yet (the writer is between rename and create): keep
            // reading it where it is. Files that were live after it and were rotated away too
            // before we looked wait, unread, until a live file exists again: until then the
            // newest of them may still receive the writer's late lines, and finishing it early
            // would lose them. A delay, never a loss (see the module doc).
            return Ok(());
        }
        let Some(mut old) = self.live.take() else {
            return Ok(());
        };
        if deleted {
            self.notices.push(TailNotice::Deleted {
                path: old.path.to_path_buf(),
            });
        } else {
            let siblings = identity::rotated_siblings(&self.live_path);
            match siblings
                .iter()
                .find(|s| identity::same_inode(&s.meta, &old.id))
            {
                Some(s) => {
                    self.notices.push(TailNotice::Rotated {
                        old: old.path.to_path_buf(),
                        new: s.path.clone(),
                    });
                    old.path = Arc::from(s.path.as_path());
                    old.dirty = true;
                }
                None => self.notices.push(TailNotice::Replaced {
                    path: old.path.to_path_buf(),
                }),
            }
        }
        self.left_live = Some(mtime(&cur_meta));
        self.rotated.push_back(old);
        if live_meta.is_some() {
            self.open_live_and_discover()?;
        }
        Ok(())
    }

    /// Opens whatever is at the live path *now*, then queues the rotated siblings written since
    /// the last live file left.
    ///
    /// Why in this order, from the opened handle: the writer may rotate again between our `stat`
    /// of the live path and our `open` of it. The file we `stat`ed is then already a rotated
    /// sibling that was never opened. Excluding it from discovery as "the new live file" (by
    /// the `stat`), and then failing to open it (another inode is there), lost it: the next look
    /// opened the newer live file with no discovery at all, and the lines of the file in
    /// between were never read (seed 9 of the racy ship model: rotate, write 55, rotate). Taking
    /// the identity from the handle we actually hold, and discovering after the open, every
    /// file that was live in between is a sibling newer than `left_live`, so it is queued.
    fn open_live_and_discover(&mut self) -> Result<(), TailError> {
        let path = Arc::clone(&self.live_path);
        let file = match File::open(&path) {
            Ok(f) => f,
            // Rotated away again before the open: the next look opens its successor, and
            // discovers it as a sibling then.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let meta = file.metadata().map_err(io_err(&path))?;
        if !meta.is_file() {
            return Ok(());
        }
        self.live = Some(open_file(&path, file, &meta, 0)?);
        if let Some(reference) = self.left_live {
            // The live file just opened is excluded as an open inode.
            self.discover_rotations(reference)?;
        }
        Ok(())
    }

    /// Queues rotated siblings nobody has read that were modified no earlier than `reference`
    /// (the file just finished): files rotated away between two looks. Oldest first.
    fn discover_rotations(&mut self, reference: SystemTime) -> Result<(), TailError> {
        let mut siblings = identity::rotated_siblings(&self.live_path);
        siblings.retain(|s| s.mtime() >= reference && !self.is_open_inode(&s.meta));
        siblings.sort_by(|a, b| a.mtime().cmp(&b.mtime()).then(a.path.cmp(&b.path)));
        for Sibling { path, meta } in siblings {
            let Some((file, meta)) = open_same(&path, &meta)? else {
                continue;
            };
            let opened = open_file(&path, file, &meta, 0)?;
            if self.is_tracked(&meta, opened.id.fingerprint) {
                continue;
            }
            tracing::info!(path = %path.display(), "reading a rotated spend log found beside the live one");
            self.rotated.push_back(opened);
        }
        Ok(())
    }

    /// Reopens the files of the committed positions.
    fn resume(&mut self, known: Vec<FilePosition>) -> Result<(), TailError> {
        if known.is_empty() {
            // First start: the live file from its beginning; earlier rotations are history.
            // (`left_live` is `None`: nothing is discovered.)
            return self.open_live_and_discover();
        }
        let (finished, unfinished): (Vec<_>, Vec<_>) = known.into_iter().partition(|p| p.finished);
        for p in &finished {
            self.remember_done(p.id);
        }
        let live_meta = stat_opt(&self.live_path)?;
        let siblings = identity::rotated_siblings(&self.live_path);
        let mut candidates: Vec<(PathBuf, Metadata)> = Vec::new();
        candidates.extend(
            live_meta
                .iter()
                .map(|m| (self.live_path.to_path_buf(), m.clone())),
        );
        candidates.extend(siblings.into_iter().map(|s| (s.path, s.meta)));

        let mut found: Vec<(OpenFile, SystemTime)> = Vec::new();
        let mut reference: Option<SystemTime> = None;
        for (path, meta) in &candidates[usize::from(live_meta.is_some())..] {
            // Rotated files already finished date the newest thing already read.
            if self.done.iter().any(|d| identity::same_inode(meta, d))
                && let Some((file, meta)) = open_same(path, meta)?
            {
                let fp = identity::fingerprint(&file).map_err(io_err(path))?;
                if self.is_tracked(&meta, fp.map_or(0, |f| f.hash)) {
                    reference = reference.max(Some(mtime(&meta)));
                }
            }
        }
        // Exact matches first, so a stale position for a reused inode cannot take the file from
        // the position that really describes it.
        let mut moved = Vec::new();
        for p in prefer_exact(unfinished) {
            match self.find_exact(&p, &candidates, &found)? {
                Some(file) => found.push(file),
                None => moved.push(p),
            }
        }
        for p in moved {
            let files = self.find_moved(&p, &candidates, &found)?;
            found.extend(files);
            // Its bytes are gone (deleted, compressed, overwritten) or continue in the files above.
            self.closed.push(FilePosition {
                finished: true,
                ..p
            });
        }
        for (_, t) in &found {
            reference = reference.max(Some(*t));
        }
        found.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.path.cmp(&b.0.path)));
        for (file, _) in found {
            let is_live = live_meta
                .as_ref()
                .is_some_and(|m| identity::same_inode(m, &file.id));
            if is_live && self.live.is_none() {
                self.live = Some(file);
            } else {
                self.rotated.push_back(file);
            }
        }
        self.left_live = reference;
        if self.live.is_none()
            && let Some(meta) = &live_meta
        {
            if self.done.iter().any(|d| identity::same_inode(meta, d)) {
                // Inode reuse or rewrite of a finished file: it is a new file.
                self.notices.push(TailNotice::Replaced {
                    path: self.live_path.to_path_buf(),
                });
            }
            // Discovers after opening, for the reason given there.
            self.open_live_and_discover()?;
        } else if let Some(reference) = reference {
            self.discover_rotations(reference)?;
        }
        Ok(())
    }

    /// Finds the file a committed position belongs to by device, inode and fingerprint, at its
    /// last path or among the siblings, and opens it at the position.
    fn find_exact(
        &mut self,
        p: &FilePosition,
        candidates: &[(PathBuf, Metadata)],
        found: &[(OpenFile, SystemTime)],
    ) -> Result<Option<(OpenFile, SystemTime)>, TailError> {
        let at_last_path = candidates.iter().filter(|(path, _)| path == &p.path);
        let elsewhere = candidates.iter().filter(|(path, _)| path != &p.path);
        for (path, meta) in at_last_path.chain(elsewhere) {
            if !identity::same_inode(meta, &p.id) || claimed(found, meta) {
                continue;
            }
            let Some((file, meta)) = open_same(path, meta)? else {
                continue;
            };
            let opened = open_file(path, file, &meta, 0)?;
            if p.id.fingerprint != 0 && opened.id.fingerprint != p.id.fingerprint {
                return Ok(None);
            }
            if meta.len() < p.offset {
                self.notices.push(TailNotice::Truncated {
                    path: path.clone(),
                    size: meta.len(),
                    offset: p.offset,
                });
                return Ok(Some((opened, mtime(&meta))));
            }
            let resumed = OpenFile::new(opened.file, opened.path, opened.id, opened.fp, p.offset);
            return Ok(Some((resumed, mtime(&meta))));
        }
        Ok(None)
    }

    /// For a committed position whose file is not there as it was: the copy copytruncate left
    /// (same fingerprint, another inode), opened at the position; and the inode itself when it
    /// now holds other contents (truncated and rewritten, or reused), opened at 0.
    fn find_moved(
        &mut self,
        p: &FilePosition,
        candidates: &[(PathBuf, Metadata)],
        found: &[(OpenFile, SystemTime)],
    ) -> Result<Vec<(OpenFile, SystemTime)>, TailError> {
        let mut files = Vec::new();
        let copy = self.find_copy(
            p,
            candidates.iter().map(|(p, m)| (p, m)),
            &|m: &Metadata| claimed(found, m),
        )?;
        if let Some(copy) = copy {
            let m = copy.file.metadata().map_err(io_err(&copy.path))?;
            files.push((copy, mtime(&m)));
        }
        let mut rewritten = false;
        for (path, meta) in candidates {
            if !identity::same_inode(meta, &p.id) || claimed(found, meta) {
                continue;
            }
            let Some((file, meta)) = open_same(path, meta)? else {
                continue;
            };
            let opened = open_file(path, file, &meta, 0)?;
            if !self.is_tracked(&meta, opened.id.fingerprint) {
                rewritten = true;
                files.push((opened, mtime(&meta)));
            }
            break;
        }
        let notice = match (rewritten, files.is_empty()) {
            (true, _) if files.len() == 2 => TailNotice::Truncated {
                path: p.path.clone(),
                size: 0,
                offset: p.offset,
            },
            (true, _) => TailNotice::Replaced {
                path: p.path.clone(),
            },
            (false, true) => TailNotice::Deleted {
                path: p.path.clone(),
            },
            (false, false) => TailNotice::Rotated {
                old: p.path.clone(),
                new: files[0].0.path.to_path_buf(),
            },
        };
        self.notices.push(notice);
        Ok(files)
    }

    /// A copy of the file `p` describes, made by copytruncate: another inode with the same
    /// first-line fingerprint, at least `p.offset` long, not already read. Opened at `p.offset`.
    fn find_copy<'a>(
        &self,
        p: &FilePosition,
        candidates: impl Iterator<Item = (&'a PathBuf, &'a Metadata)>,
        claimed: &dyn Fn(&Metadata) -> bool,
    ) -> Result<Option<OpenFile>, TailError> {
        if p.id.fingerprint == 0 {
            return Ok(None);
        }
        for (path, meta) in candidates {
            if identity::same_inode(meta, &p.id)
                || claimed(meta)
                || meta.len() < p.offset
                || self.is_open_inode(meta)
            {
                continue;
            }
            let Some((file, meta)) = open_same(path, meta)? else {
                continue;
            };
            let opened = open_file(path, file, &meta, p.offset)?;
            if opened.id.fingerprint == p.id.fingerprint
                && !self.is_tracked(&meta, opened.id.fingerprint)
            {
                tracing::info!(
                    copy = %path.display(),
                    "continuing a truncated spend log from its copy"
                );
                return Ok(Some(opened));
            }
        }
        Ok(None)
    }

    /// After `file` restarted at 0: retires its old identity and, when copytruncate left a copy
    /// beside it, reads the rest of the old contents from the copy.
    fn after_truncation(&mut self, old: FilePosition) -> Result<(), TailError> {
        if old.id.fingerprint == 0 {
            return Ok(());
        }
        self.closed.push(FilePosition {
            finished: true,
            ..old.clone()
        });
        let siblings = identity::rotated_siblings(&self.live_path);
        let copy = self.find_copy(&old, siblings.iter().map(|s| (&s.path, &s.meta)), &|_| {
            false
        })?;
        if let Some(copy) = copy {
            self.rotated.push_back(copy);
        }
        Ok(())
    }
}

/// Whether one of the files already found is `meta`.
fn claimed(found: &[(OpenFile, SystemTime)], meta: &Metadata) -> bool {
    found.iter().any(|(f, _)| identity::same_inode(meta, &f.id))
}

/// Of several unfinished positions for one inode (an outbox keyed by the full identity keeps the
/// fingerprint-0 row of a file's first moments), drops the fingerprint-0 ones: they are at offset
/// 0 and superseded.
fn prefer_exact(mut unfinished: Vec<FilePosition>) -> Vec<FilePosition> {
    unfinished.sort_by_key(|p| (p.id.dev, p.id.ino, p.id.fingerprint == 0));
    let mut out: Vec<FilePosition> = Vec::new();
    for p in unfinished {
        if let Some(prev) = out.last()
            && prev.id.dev == p.id.dev
            && prev.id.ino == p.id.ino
            && p.id.fingerprint == 0
        {
            continue;
        }
        out.push(p);
    }
    out
}

/// Restarts `file` at 0 when it shrank below what was read or its first line changed
/// (copytruncate, or rewritten in place).
/// Returns the position it had, to retire.
fn check_truncation(
    file: &mut OpenFile,
    notices: &mut Vec<TailNotice>,
) -> Result<Option<FilePosition>, TailError> {
    let meta = file.file.metadata().map_err(io_err(&file.path))?;
    let size = meta.len();
    let rewritten = file.head_changed().map_err(io_err(&file.path))?;
    if size >= file.read_pos() && !rewritten {
        return Ok(None);
    }
    notices.push(TailNotice::Truncated {
        path: file.path.to_path_buf(),
        size,
        offset: file.pos,
    });
    let old = file.position();
    file.restart();
    file.refresh_fingerprint().map_err(io_err(&file.path))?;
    Ok(Some(old))
}

fn log_notice(notice: &TailNotice) {
    match notice {
        TailNotice::Rotated { old, new } => {
            tracing::info!(old = %old.display(), new = %new.display(), "spend log rotated");
        }
        TailNotice::Truncated { path, size, offset } => tracing::warn!(
            path = %path.display(),
            size,
            offset,
            "spend log truncated (copytruncate?): reading again from its start"
        ),
        TailNotice::Replaced { path } => {
            tracing::warn!(path = %path.display(), "spend log replaced by another file");
        }
        TailNotice::Deleted { path } => {
            tracing::warn!(path = %path.display(), "spend log deleted; waiting for it to reappear");
        }
    }
}

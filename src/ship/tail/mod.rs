//! Follows the live spend log across rotation, truncation and replacement, yielding complete
//! lines with their file positions.
//!
//! - `identity`: what makes a file the same file (device, inode, first-line fingerprint) and
//!   where rotated siblings are found.
//! - `reader`: complete lines from one open file, in large reads, oversized lines skipped.
//! - `watch`: directory events that wake the tailer.
//! - `follow`: the [`Tailer`] itself: which file to read next, and what rotation, truncation,
//!   replacement and deletion mean for it.
//!
//! How it reads:
//! - First start (no committed positions): the live file from offset 0. Rotated files already
//!   beside it are history and are not read (use `tally replay` for them).
//! - Files no longer at the live path (rotated by rename, replaced, deleted) are read to their end
//!   through the handle already open, then marked `finished`; only then is the new live file read.
//!   A rotated or deleted file that ends without `\n` has its last fragment handed out as a line,
//!   since nothing can complete it any more. The live file's incomplete last line waits.
//! - Rotation assumes the writer stops writing the old file once the new live file exists (tally's
//!   proxy renames and reopens under one lock). A writer that keeps writing the old file after the
//!   new one appears (logrotate `create` without prompt reopen) can lose those late lines; use
//!   tally's own rotation or `copytruncate` for such writers.
//! - Several rotations between two looks (or while the shipper was down) are followed: rotated
//!   siblings nobody has read, modified no earlier than the file just finished, are read oldest
//!   first before the live file. (A sibling last modified in the same timestamp tick counts as
//!   newer: reading an old file again is harmless downstream, missing a new one is not.) The new
//!   live file is opened *before* its siblings are listed, and known by the handle opened (not
//!   by an earlier `stat`), so a file that was live only between the `stat` and the `open` is
//!   listed as a sibling and read. The same search runs when a live file appears after the
//!   tailer had none (the last one deleted, or rotated away again before it could be opened).
//! - While the live file is renamed away with no successor yet, files that were live after it
//!   and were rotated away too wait, unread, until a live file exists again: the newest of them
//!   may still receive the writer's late lines. A delay, not a loss; tally's proxy creates the
//!   successor at once, so the wait is only for writers that create it on their next write.
//! - Copytruncate (size below the position, or the first line changed): reading restarts at 0. If
//!   the copy is still beside it (same first-line fingerprint, another inode), the lines between
//!   the position and the copy's end are read from the copy, so nothing copied is lost. Lines
//!   written between the copy and the truncation are lost: that is inherent to copytruncate.
//! - Blocking I/O: [`Tailer::next_chunk`] calls the synchronous reads directly. Each call reads at
//!   most `max_chunk_lines` lines in 256 KiB `pread`s from the page cache, which is short; run it
//!   on the multi-threaded runtime (it is one task among a few) rather than paying a
//!   `spawn_blocking` hand-off per chunk.
//!
//! Positions: the outbox should keep one row per (`dev`, `ino`) and apply a chunk's positions in
//! order (a file whose fingerprint changes first reports its old identity `finished`). It should
//! pass back finished positions whose files may still exist: they keep rotated files that were
//! already read from being read again after a restart. A chunk may carry positions and notices
//! without lines (a file opened, finished or retired); commit those too.

mod follow;
mod identity;
mod reader;
mod watch;

pub use follow::{MAX_LINE_BYTES_CAP, Tailer};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Identity of a spend-log file: device and inode, plus a fingerprint of its first line so that a
/// reused inode is not mistaken for the file it once was. `fingerprint` is 0 until the file has a
/// complete first line (it can then only be known by device and inode, and its offset is 0).
///
/// The fingerprint is a 64-bit FNV-1a hash of the first line including its `\n`, or of the first
/// 4096 bytes when the first line is longer than that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub fingerprint: u64,
}

/// How far one file has been read. The outbox stores these in the same transaction as the lines
/// read up to `offset`, so after a crash reading resumes exactly after the last committed line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePosition {
    pub id: FileId,
    /// Where the file was last seen (it may since have been renamed by rotation).
    pub path: PathBuf,
    /// Byte offset just after the last complete line handed out.
    pub offset: u64,
    /// The file was rotated away (or deleted) and read to its end: nothing more will come from it.
    pub finished: bool,
}

/// What one line holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineContent {
    /// The line's bytes, without the trailing `\n`.
    Complete(Vec<u8>),
    /// The line was longer than `max_line_bytes`; its bytes were skipped, not buffered.
    TooLong { len: u64 },
}

/// One line of a spend-log file, with where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLine {
    pub path: Arc<Path>,
    /// Byte offset of the line's first byte in its file.
    pub offset: u64,
    pub content: LineContent,
}

/// Something the tailer noticed that an operator should know about (logged, and counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailNotice {
    Rotated {
        old: PathBuf,
        new: PathBuf,
    },
    Truncated {
        path: PathBuf,
        size: u64,
        offset: u64,
    },
    Replaced {
        path: PathBuf,
    },
    Deleted {
        path: PathBuf,
    },
}

/// Lines read since the last chunk, and the positions to commit together with them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    pub lines: Vec<RawLine>,
    /// Every file position that changed; commit these in the same transaction as `lines`.
    pub positions: Vec<FilePosition>,
    pub notices: Vec<TailNotice>,
}

#[derive(Debug, Clone)]
pub struct TailOptions {
    /// The live spend log (`TALLY_SPEND_LOG`). Its directory is watched, and rotated siblings
    /// (same file name plus a suffix) are where rotated files are found again.
    pub live_path: PathBuf,
    /// How often to look even without a directory event (at least every 10 ms).
    pub poll_interval: Duration,
    /// Longer lines are returned as [`LineContent::TooLong`] (capped at [`MAX_LINE_BYTES_CAP`]).
    pub max_line_bytes: usize,
    /// At most this many lines per chunk.
    pub max_chunk_lines: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("cannot read spend log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch directory {path}: {reason}")]
    Watch { path: PathBuf, reason: String },
}

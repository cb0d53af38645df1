//! Follows the live spend log across rotation, truncation and replacement, yielding complete
//! lines with their file positions. (Contract stub: the types and signatures below are what the
//! rest of the shipper builds on; the implementation fills them in.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Identity of a spend-log file: device and inode, plus a fingerprint of its first line so that a
/// reused inode is not mistaken for the file it once was. `fingerprint` is 0 until the file has a
/// complete first line (it can then only be known by device and inode, and its offset is 0).
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
    pub poll_interval: Duration,
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

/// Follows the live spend log.
pub struct Tailer {
    _options: TailOptions,
}

impl Tailer {
    /// Starts from the positions the outbox committed (empty on first start: read the live file
    /// from its beginning). Unfinished rotated files are found again by identity and read first.
    pub fn new(options: TailOptions, _known: Vec<FilePosition>) -> Result<Self, TailError> {
        Ok(Self { _options: options })
    }

    /// Waits until lines (or position changes) are available and returns them; `Ok(None)` once
    /// `cancel` fires.
    pub async fn next_chunk(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<Option<Chunk>, TailError> {
        cancel.cancelled().await;
        Ok(None)
    }

    /// Returns what can be read right now without waiting; `Ok(None)` when nothing is.
    pub fn poll_chunk(&mut self) -> Result<Option<Chunk>, TailError> {
        Ok(None)
    }
}

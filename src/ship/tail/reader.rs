//! Reads complete lines from one open file, in large `pread`s, without buffering oversized lines.
//!
//! The buffer holds at most one partial line plus what the last read brought in, so memory per
//! open file is `max(256 KiB, max_line_bytes + 1)` whatever the file size. `pos` is always just
//! after the last line handed out: it is the offset the outbox commits.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::identity::{self, Fingerprint};
use super::{FileId, FilePosition, LineContent, RawLine};

/// Bytes asked for per `pread`.
const READ_SIZE: usize = 256 * 1024;

/// One file being read.
pub struct OpenFile {
    pub file: File,
    pub path: Arc<Path>,
    pub id: FileId,
    pub fp: Option<Fingerprint>,
    /// Offset just after the last line handed out.
    pub pos: u64,
    /// Offset of the next byte to read from the file.
    read_pos: u64,
    /// Bytes `buf[lo..hi]` are file bytes `[pos, read_pos)` (unless skipping).
    buf: Vec<u8>,
    lo: usize,
    hi: usize,
    /// Inside a line longer than the limit: how many of its bytes were skipped so far.
    skipping: Option<u64>,
    /// Where in `buf[lo..hi]` the search for `\n` resumes (bytes before it hold none).
    scan: usize,
    /// A position change not yet reported in a chunk.
    pub dirty: bool,
    pub finished: bool,
}

/// What a read pass ended on.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    /// Reached the end of the file's current contents.
    Eof,
    /// The chunk is full; more may be readable.
    Budget,
}

impl OpenFile {
    pub fn new(file: File, path: Arc<Path>, id: FileId, fp: Option<Fingerprint>, pos: u64) -> Self {
        Self {
            file,
            path,
            id,
            fp,
            pos,
            read_pos: pos,
            buf: Vec::new(),
            lo: 0,
            hi: 0,
            skipping: None,
            scan: 0,
            dirty: true,
            finished: false,
        }
    }

    pub fn position(&self) -> FilePosition {
        FilePosition {
            id: self.id,
            path: self.path.to_path_buf(),
            offset: self.pos,
            finished: self.finished,
        }
    }

    /// How far the file has been read from disk (buffered bytes included).
    pub fn read_pos(&self) -> u64 {
        self.read_pos
    }

    /// Starts over at offset 0 (after a truncation); the fingerprint is recomputed.
    pub fn restart(&mut self) {
        self.pos = 0;
        self.read_pos = 0;
        self.lo = 0;
        self.hi = 0;
        self.scan = 0;
        self.skipping = None;
        self.fp = None;
        self.id.fingerprint = 0;
        self.dirty = true;
    }

    /// Learns the fingerprint once the first line is complete; the id changes with it.
    pub fn refresh_fingerprint(&mut self) -> io::Result<()> {
        if self.fp.is_none() {
            self.fp = identity::fingerprint(&self.file)?;
            if let Some(fp) = self.fp {
                self.id.fingerprint = fp.hash;
                self.dirty = true;
            }
        }
        Ok(())
    }

    /// Whether the start of the file is no longer what was read from it: the first line's
    /// fingerprint changed, or (before the first line is complete) the buffered first bytes did.
    /// Either means the file was truncated and rewritten in place.
    pub fn head_changed(&self) -> io::Result<bool> {
        if let Some(fp) = self.fp {
            return Ok(!identity::still_matches(&self.file, fp)?);
        }
        if self.pos != 0 || self.skipping.is_some() || self.hi == self.lo {
            return Ok(false);
        }
        let n = (self.hi - self.lo).min(identity::FINGERPRINT_MAX);
        let mut head = [0u8; identity::FINGERPRINT_MAX];
        let got = identity::read_full_at(&self.file, &mut head[..n], 0)?;
        Ok(got < n || head[..n] != self.buf[self.lo..self.lo + n])
    }

    /// Appends complete lines to `out` until end of file or `out.len() == limit`.
    pub fn read_lines(
        &mut self,
        max_line_bytes: usize,
        limit: usize,
        out: &mut Vec<RawLine>,
    ) -> io::Result<ReadEnd> {
        let cap = READ_SIZE.max(max_line_bytes.saturating_add(1));
        loop {
            if out.len() >= limit {
                return Ok(ReadEnd::Budget);
            }
            if let Some(skipped) = self.skipping {
                // Discard bytes of an oversized line until its `\n`.
                if let Some(i) = memchr::memchr(b'\n', &self.buf[self.lo..self.hi]) {
                    let len = skipped + i as u64;
                    self.emit(out, LineContent::TooLong { len }, len + 1);
                    self.lo += i + 1;
                    self.scan = self.lo;
                    self.skipping = None;
                    continue;
                }
                self.skipping = Some(skipped + (self.hi - self.lo) as u64);
                self.lo = 0;
                self.hi = 0;
                if self.fill(cap)? == 0 {
                    return Ok(ReadEnd::Eof);
                }
                continue;
            }
            if let Some(i) = memchr::memchr(b'\n', &self.buf[self.scan..self.hi]) {
                let end = self.scan + i;
                let len = end - self.lo;
                let content = if len > max_line_bytes {
                    LineContent::TooLong { len: len as u64 }
                } else {
                    LineContent::Complete(self.buf[self.lo..end].to_vec())
                };
                self.emit(out, content, len as u64 + 1);
                self.lo = end + 1;
                self.scan = self.lo;
                continue;
            }
            self.scan = self.hi;
            if self.hi - self.lo > max_line_bytes {
                // Too long already: stop buffering it and skip to its end.
                self.skipping = Some((self.hi - self.lo) as u64);
                self.lo = 0;
                self.hi = 0;
                self.scan = 0;
                continue;
            }
            if self.fill(cap)? == 0 {
                return Ok(ReadEnd::Eof);
            }
        }
    }

    /// At the end of a file nothing more will be written to: hands out a final line that lacks
    /// its `\n` (nothing can complete it), so no bytes are silently dropped.
    pub fn take_final_fragment(&mut self, out: &mut Vec<RawLine>) {
        if let Some(skipped) = self.skipping.take() {
            let len = skipped + (self.hi - self.lo) as u64;
            self.emit(out, LineContent::TooLong { len }, len);
        } else if self.hi > self.lo {
            let bytes = self.buf[self.lo..self.hi].to_vec();
            let len = bytes.len() as u64;
            self.emit(out, LineContent::Complete(bytes), len);
        }
        self.lo = 0;
        self.hi = 0;
        self.scan = 0;
        self.buf = Vec::new();
    }

    fn emit(&mut self, out: &mut Vec<RawLine>, content: LineContent, consumed: u64) {
        out.push(RawLine {
            path: Arc::clone(&self.path),
            offset: self.pos,
            content,
        });
        self.pos += consumed;
        self.dirty = true;
    }

    /// Reads more bytes after `buf[lo..hi]`, compacting first; returns how many came in.
    fn fill(&mut self, cap: usize) -> io::Result<usize> {
        if self.lo > 0 {
            self.buf.copy_within(self.lo..self.hi, 0);
            self.scan -= self.lo;
            self.hi -= self.lo;
            self.lo = 0;
        }
        if self.buf.len() < cap {
            self.buf.resize(cap, 0);
        }
        let n = loop {
            match self.file.read_at(&mut self.buf[self.hi..], self.read_pos) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        self.hi += n;
        self.read_pos += n as u64;
        Ok(n)
    }
}

//! The transaction ids of the events a `tally replay --ship` recorded, which it then waits for:
//! spooled to an unlinked file beside the outbox, not kept in memory. A year of history is tens
//! of millions of ids, gigabytes as strings in memory; on disk they cost their bytes, and the
//! file goes away with the process, however it ends.
//!
//! Each id is its length (u32, little endian) and its UTF-8 bytes, so any id round-trips,
//! newlines included.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Where the spool is and what went wrong with it, for the error the operator reads.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot {action} the ids of this replay's new events in a temporary file in {}: {source} \
     (`--ship` keeps them there to wait for their delivery; free space there, or replay \
     without --ship and let `tally ship` deliver them)",
    dir.display()
)]
pub struct SpoolError {
    action: &'static str,
    dir: PathBuf,
    #[source]
    source: io::Error,
}

/// Makes an I/O error of the spool in `dir` a [`SpoolError`].
fn failed<'a>(action: &'static str, dir: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError {
        action,
        dir: dir.to_owned(),
        source,
    }
}

/// Ids being written.
pub struct NewIds {
    dir: PathBuf,
    out: BufWriter<File>,
    count: u64,
}

impl NewIds {
    /// An empty spool in `dir` (the state directory: on disk, where the outbox is, unlike a
    /// temp directory that may be memory).
    pub fn in_dir(dir: &Path) -> Result<Self, SpoolError> {
        let file = tempfile::tempfile_in(dir).map_err(failed("create", dir))?;
        Ok(Self {
            dir: dir.to_owned(),
            out: BufWriter::with_capacity(64 << 10, file),
            count: 0,
        })
    }

    pub fn push(&mut self, id: &str) -> Result<(), SpoolError> {
        let len = u32::try_from(id.len()).map_err(|_| io::Error::other("an id over 4 GiB"));
        len.and_then(|len| {
            self.out.write_all(&len.to_le_bytes())?;
            self.out.write_all(id.as_bytes())
        })
        .map_err(failed("write", &self.dir))?;
        self.count += 1;
        Ok(())
    }

    /// The ids written, ready to be read from the first.
    pub fn finish(self) -> Result<SpooledIds, SpoolError> {
        let Self { dir, out, count } = self;
        let mut file = out
            .into_inner()
            .map_err(|e| failed("write", &dir)(e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .map_err(failed("read", &dir))?;
        Ok(SpooledIds { dir, file, count })
    }
}

/// Where a walk over the ids stopped: the byte offset of the id it stopped at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor(u64);

/// The ids of a finished spool.
pub struct SpooledIds {
    dir: PathBuf,
    file: File,
    count: u64,
}

impl SpooledIds {
    /// How many ids there are.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Calls `visit` with each id from `from` on, in the order written, until it returns false.
    /// Returns the cursor of the id it returned false for (a later walk can start there), or
    /// `None` if it saw them all.
    pub fn walk<E: From<SpoolError>>(
        &mut self,
        from: Cursor,
        mut visit: impl FnMut(&str) -> Result<bool, E>,
    ) -> Result<Option<Cursor>, E> {
        let fail = |e| failed("read", &self.dir)(e);
        self.file.seek(SeekFrom::Start(from.0)).map_err(fail)?;
        let mut input = BufReader::with_capacity(64 << 10, &self.file);
        let mut at = from.0;
        let mut id = Vec::new();
        loop {
            let mut len = [0u8; 4];
            match input.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(fail(e).into()),
            }
            let n = u32::from_le_bytes(len) as usize;
            id.resize(n, 0);
            input.read_exact(&mut id).map_err(fail)?;
            let text = std::str::from_utf8(&id)
                .map_err(|e| fail(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            if !visit(text)? {
                return Ok(Some(Cursor(at)));
            }
            at += 4 + n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(ids: &mut SpooledIds, from: Cursor) -> Vec<String> {
        let mut seen = Vec::new();
        let end = ids
            .walk::<SpoolError>(from, |id| {
                seen.push(id.to_owned());
                Ok(true)
            })
            .unwrap();
        assert_eq!(end, None);
        seen
    }

    #[test]
    fn ids_come_back_in_order_and_a_walk_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let written = ["a", "", "multi\nline \"id\"", "ünï-çødé", "z"];
        let mut spool = NewIds::in_dir(dir.path()).unwrap();
        for id in written {
            spool.push(id).unwrap();
        }
        let mut ids = spool.finish().unwrap();
        assert_eq!(ids.len(), 5);
        // The file is unlinked: nothing is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(all(&mut ids, Cursor::default()), written);

        // Stop at the fourth id; a second walk from there starts with it.
        let mut n = 0;
        let stopped = ids
            .walk::<SpoolError>(Cursor::default(), |_| {
                n += 1;
                Ok(n < 4)
            })
            .unwrap()
            .unwrap();
        assert_eq!(all(&mut ids, stopped), ["ünï-çødé", "z"]);
        // And the whole walk is still there from the start.
        assert_eq!(all(&mut ids, Cursor::default()).len(), 5);
    }

    #[test]
    fn an_empty_spool_has_nothing_to_walk() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = NewIds::in_dir(dir.path()).unwrap().finish().unwrap();
        assert!(ids.is_empty());
        assert!(all(&mut ids, Cursor::default()).is_empty());
    }

    #[test]
    fn a_spool_that_cannot_be_created_says_where_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir");
        let e = NewIds::in_dir(&missing).err().unwrap().to_string();
        assert!(e.contains("cannot create"), "{e}");
        assert!(e.contains(&missing.display().to_string()), "{e}");
        assert!(e.contains("without --ship"), "{e}");
    }
}

//! Who a file is: device and inode, plus a fingerprint of its first line, and where its rotated
//! siblings live.
//!
//! The fingerprint is a 64-bit FNV-1a hash of the file's first line *including* its `\n`, or of
//! its first [`FINGERPRINT_MAX`] bytes when the first line is longer than that. Until either is
//! available the fingerprint is 0 (unknown) and the file can only be told apart by device and
//! inode; nothing has been handed out from it yet then, so that is harmless. Spend-log lines carry
//! a unique `transaction_id`, so two different files practically never share a first line: a
//! reused inode, or a file truncated and rewritten in place, gets a different fingerprint.

use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::FileId;

/// The fingerprint covers at most this many bytes from the start of the file.
pub const FINGERPRINT_MAX: usize = 4096;

/// Suffixes of compressed rotations: their bytes are not the lines we read, so they are skipped.
const COMPRESSED_SUFFIXES: &[&str] = &[".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip", ".Z"];

/// A known fingerprint and how many bytes from the start of the file it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub hash: u64,
    pub len: u32,
}

/// FNV-1a, 64-bit. Never returns 0, which means "unknown".
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    if hash == 0 { 1 } else { hash }
}

/// Reads the file's fingerprint, or `None` while its first line is incomplete and shorter than
/// [`FINGERPRINT_MAX`].
pub fn fingerprint(file: &File) -> io::Result<Option<Fingerprint>> {
    let mut buf = [0u8; FINGERPRINT_MAX];
    let n = read_full_at(file, &mut buf, 0)?;
    let head = &buf[..n];
    let len = match memchr::memchr(b'\n', head) {
        Some(i) => i + 1,
        None if n == FINGERPRINT_MAX => n,
        None => return Ok(None),
    };
    Ok(Some(Fingerprint {
        hash: fnv1a(&head[..len]),
        // Bounded by FINGERPRINT_MAX, so it fits.
        len: len as u32,
    }))
}

/// Whether the file still starts with the bytes `fp` was computed from. A file shorter than the
/// fingerprint does not.
pub fn still_matches(file: &File, fp: Fingerprint) -> io::Result<bool> {
    let mut buf = [0u8; FINGERPRINT_MAX];
    let want = fp.len as usize;
    let n = read_full_at(file, &mut buf[..want], 0)?;
    Ok(n == want && fnv1a(&buf[..want]) == fp.hash)
}

/// `pread` until `buf` is full or end of file; returns the bytes read.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The identity of an open file (fingerprint 0 when not yet known).
pub fn file_id(meta: &Metadata, fp: Option<Fingerprint>) -> FileId {
    FileId {
        dev: meta.dev(),
        ino: meta.ino(),
        fingerprint: fp.map_or(0, |f| f.hash),
    }
}

/// Same device and inode.
pub fn same_inode(a: &Metadata, b: &FileId) -> bool {
    a.dev() == b.dev && a.ino() == b.ino
}

/// A file in the live file's directory whose name is the live name plus a rotation suffix.
#[derive(Debug)]
pub struct Sibling {
    pub path: PathBuf,
    pub meta: Metadata,
}

impl Sibling {
    pub fn mtime(&self) -> SystemTime {
        self.meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// Whether `name` is a rotation of `live_name`: `<live>.<suffix>` (tally's own
/// `<live>.<UTC timestamp>`, logrotate's `<live>.1`), `<live>-<suffix>` (logrotate `dateext`) or
/// `<live>_<suffix>`, and not compressed.
pub fn is_rotated_name(name: &OsStr, live_name: &OsStr) -> bool {
    let (Some(name), Some(live)) = (name.to_str(), live_name.to_str()) else {
        return false;
    };
    let Some(rest) = name.strip_prefix(live) else {
        return false;
    };
    let mut chars = rest.chars();
    matches!(chars.next(), Some('.' | '-' | '_'))
        && chars.next().is_some()
        && !COMPRESSED_SUFFIXES.iter().any(|s| rest.ends_with(s))
}

/// The rotated siblings of `live_path` that are regular files (the live file itself excluded).
/// A directory that cannot be listed yields no siblings: rotation is then followed only through
/// files already open.
pub fn rotated_siblings(live_path: &Path) -> Vec<Sibling> {
    let (Some(dir), Some(live_name)) = (parent_dir(live_path), live_path.file_name()) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| is_rotated_name(&e.file_name(), live_name))
        .filter_map(|e| {
            let path = e.path();
            let meta = std::fs::metadata(&path).ok()?;
            meta.is_file().then_some(Sibling { path, meta })
        })
        .collect()
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> Option<&Path> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Some(Path::new(".")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names() {
        let live = OsStr::new("spend.jsonl");
        for yes in [
            "spend.jsonl.20261127T101500.123Z",
            "spend.jsonl.1",
            "spend.jsonl-20261127",
        ] {
            assert!(is_rotated_name(OsStr::new(yes), live), "{yes}");
        }
        for no in [
            "spend.jsonl",
            "spend.jsonl.",
            "spend.jsonl.2.gz",
            "spend.jsonl-20261127.zst",
            "spend.jsonlx",
            "other.jsonl.1",
        ] {
            assert!(!is_rotated_name(OsStr::new(no), live), "{no}");
        }
    }

    #[test]
    fn fnv_is_never_zero_and_differs() {
        assert_ne!(fnv1a(b""), 0);
        assert_ne!(fnv1a(b"a\n"), fnv1a(b"b\n"));
    }
}

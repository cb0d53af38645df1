//! Replay input: expands file names and glob patterns, opens plain or gzip files, and streams
//! their lines with byte offsets, in bounded memory whatever the file size.
//!
//! Lines come out as the tailer's [`RawLine`], so a rejected replayed line is reported exactly like
//! a rejected live one (file, offset, reason). For a `.gz` file the offset is in the decompressed
//! text, which is where an operator looks after `zcat`.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::read::MultiGzDecoder;

use crate::ship::tail::{LineContent, RawLine};

/// Why the replay input could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("invalid glob pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("{pattern:?} matches no file; check the path (quote globs so the shell leaves them)")]
    NoMatch { pattern: String },
    #[error(
        "{} is a directory; replay takes files: name them, or give a quoted glob such as \
         '{}/spend.jsonl*' (a directory is not read whole: it may hold files that are not spend logs)",
        crate::text::printable(&path.display().to_string()),
        crate::text::printable(path.display().to_string().trim_end_matches('/'))
    )]
    IsDirectory { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Expands every argument into files: an existing path is taken as is, anything else is a glob
/// pattern whose matches are taken in sorted order. A file named twice is read once. An argument
/// that matches nothing is an error rather than silently replaying less than asked.
pub fn expand(patterns: &[String]) -> Result<Vec<PathBuf>, InputError> {
    let mut files: Vec<PathBuf> = Vec::new();
    for pattern in patterns {
        let direct = Path::new(pattern);
        let mut matched = Vec::new();
        if direct.is_dir() {
            return Err(InputError::IsDirectory {
                path: direct.to_path_buf(),
            });
        }
        if direct.is_file() {
            matched.push(direct.to_path_buf());
        } else {
            let paths = glob::glob(pattern).map_err(|e| InputError::BadPattern {
                pattern: pattern.clone(),
                reason: e.msg.to_owned(),
            })?;
            for entry in paths {
                let path = entry.map_err(|e| InputError::Io {
                    path: e.path().to_path_buf(),
                    source: io::Error::new(e.error().kind(), e.error().to_string()),
                })?;
                if path.is_file() {
                    matched.push(path);
                }
            }
            matched.sort();
        }
        if matched.is_empty() {
            return Err(InputError::NoMatch {
                pattern: pattern.clone(),
            });
        }
        for path in matched {
            if !files.contains(&path) {
                files.push(path);
            }
        }
    }
    Ok(files)
}

/// Total size on disk of the files (compressed size for `.gz`), for the progress bar.
pub fn total_size(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Counts bytes read from disk, so progress reflects the file size even through gzip.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Streams the lines of one file. Lines longer than `max_line_bytes` are skipped as they are read
/// (reported as [`LineContent::TooLong`]), so memory stays bounded by that limit.
pub struct LineReader {
    path: Arc<Path>,
    reader: Box<dyn BufRead + Send>,
    offset: u64,
    max_line_bytes: usize,
    disk_bytes: Arc<AtomicU64>,
    unterminated: bool,
}

/// The first two bytes of every gzip member.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

impl LineReader {
    /// Opens `path`, decompressing it when it starts with the gzip magic bytes (whatever its
    /// name: rotated logs are not always named `.gz`).
    pub fn open(path: &Path, max_line_bytes: usize) -> Result<Self, InputError> {
        let io_err = |source| InputError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let disk_bytes = Arc::new(AtomicU64::new(0));
        let mut raw = BufReader::with_capacity(
            64 * 1024,
            Counting {
                inner: file,
                read: disk_bytes.clone(),
            },
        );
        let is_gzip = raw.fill_buf().map_err(io_err)?.starts_with(&GZIP_MAGIC);
        let reader: Box<dyn BufRead + Send> = if is_gzip {
            Box::new(BufReader::with_capacity(
                64 * 1024,
                MultiGzDecoder::new(raw),
            ))
        } else {
            Box::new(raw)
        };
        Ok(Self {
            path: Arc::from(path),
            reader,
            offset: 0,
            max_line_bytes,
            disk_bytes,
            unterminated: false,
        })
    }

    pub fn path(&self) -> &Arc<Path> {
        &self.path
    }

    /// Bytes read from disk so far (compressed bytes for a gzip file).
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }

    /// Whether the line last returned ended at the end of the file without a newline.
    pub fn last_unterminated(&self) -> bool {
        self.unterminated
    }

    /// The next line, or `None` at the end of the file. A last line without its newline is still
    /// returned (see [`LineReader::last_unterminated`]): in an archived file it is a complete
    /// record whose writer stopped early; in a file still being written, it is not yet whole.
    pub fn next_line(&mut self) -> Result<Option<RawLine>, InputError> {
        let start = self.offset;
        self.unterminated = false;
        let mut buf: Vec<u8> = Vec::new();
        let mut len: u64 = 0;
        let mut too_long = false;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(InputError::Io {
                        path: self.path.to_path_buf(),
                        source,
                    });
                }
            };
            if available.is_empty() {
                if len == 0 {
                    return Ok(None);
                }
                self.unterminated = true;
                break;
            }
            let (chunk, consumed, done) = match memchr::memchr(b'\n', available) {
                Some(i) => (&available[..i], i + 1, true),
                None => (available, available.len(), false),
            };
            len += chunk.len() as u64;
            if !too_long {
                if len > self.max_line_bytes as u64 {
                    too_long = true;
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(chunk);
                }
            }
            self.reader.consume(consumed);
            self.offset += consumed as u64;
            if done {
                break;
            }
        }
        let content = if too_long {
            LineContent::TooLong { len }
        } else {
            LineContent::Complete(buf)
        };
        Ok(Some(RawLine {
            path: self.path.clone(),
            offset: start,
            content,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn read_all(path: &Path, max: usize) -> Vec<RawLine> {
        let mut r = LineReader::open(path, max).unwrap();
        let mut out = Vec::new();
        while let Some(line) = r.next_line().unwrap() {
            out.push(line);
        }
        out
    }

    fn complete(line: &RawLine) -> &[u8] {
        match &line.content {
            LineContent::Complete(b) => b,
            LineContent::TooLong { .. } => panic!("expected a complete line"),
        }
    }

    #[test]
    fn streams_lines_with_offsets_including_a_last_line_without_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, b"one\n\ntwo\nthree").unwrap();
        let lines = read_all(&path, 1024);
        let got: Vec<(u64, &[u8])> = lines.iter().map(|l| (l.offset, complete(l))).collect();
        assert_eq!(
            got,
            vec![
                (0, &b"one"[..]),
                (4, &b""[..]),
                (5, &b"two"[..]),
                (9, &b"three"[..])
            ]
        );
        let mut r = LineReader::open(&path, 1024).unwrap();
        let mut flags = Vec::new();
        while r.next_line().unwrap().is_some() {
            flags.push(r.last_unterminated());
        }
        assert_eq!(flags, [false, false, false, true]);
    }

    #[test]
    fn skips_overlong_lines_without_buffering_them_and_keeps_going() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let long = vec![b'x'; 200_000];
        let mut f = File::create(&path).unwrap();
        f.write_all(b"short\n").unwrap();
        f.write_all(&long).unwrap();
        f.write_all(b"\nafter\n").unwrap();
        drop(f);
        let lines = read_all(&path, 1000);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].offset, 6);
        assert_eq!(lines[1].content, LineContent::TooLong { len: 200_000 });
        assert_eq!(lines[2].offset, 200_007);
        assert_eq!(complete(&lines[2]), b"after");
    }

    #[test]
    fn reads_gzip_by_content_including_concatenated_members() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rotated.1");
        let mut bytes = Vec::new();
        for part in [&b"first\n"[..], &b"second\n"[..]] {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(part).unwrap();
            bytes.extend(enc.finish().unwrap());
        }
        std::fs::write(&path, &bytes).unwrap();
        let lines = read_all(&path, 1024);
        assert_eq!(lines.len(), 2);
        assert_eq!(complete(&lines[1]), b"second");
        assert_eq!(lines[1].offset, 6);
    }

    #[test]
    fn expands_globs_in_order_and_refuses_patterns_matching_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["spend.jsonl.2", "spend.jsonl.1", "other.txt"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let pattern = format!("{}/spend.jsonl.*", dir.path().display());
        let direct = dir.path().join("spend.jsonl.1").display().to_string();
        let files = expand(&[pattern, direct]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["spend.jsonl.1", "spend.jsonl.2"]);

        // Regression (docs/reliability.md, "Findings"): a directory said "matches no file".
        let err = expand(&[dir.path().display().to_string()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a directory"), "{err}");
        assert!(err.contains("spend.jsonl*"), "{err}");
        let missing = format!("{}/nothing-*.jsonl", dir.path().display());
        let err = expand(&[missing]).unwrap_err().to_string();
        assert!(err.contains("matches no file"), "{err}");
        assert!(matches!(
            expand(&["[".to_owned()]),
            Err(InputError::BadPattern { .. }) | Err(InputError::NoMatch { .. })
        ));
    }
}

//! Reads the replay's files one after another and turns every line into a record, a rejection
//! or "outside the time window", updating the progress bar on the way.

use std::collections::VecDeque;
use std::path::PathBuf;

use crate::cli::ReplayFormat;
use crate::ship::reader::too_long_reason;
use crate::ship::tail::{LineContent, RawLine};
use crate::spend::SpendRecord;

use super::input::{InputError, LineReader, total_size};
use super::litellm;
use super::progress::Progress;
use super::window::TimeWindow;

/// One input line, decoded.
#[derive(Debug)]
pub enum Decoded {
    /// A valid record inside the time window, with the line it came from.
    Record {
        source: RawLine,
        record: Box<SpendRecord>,
    },
    /// A line that is not a valid record.
    Rejected { source: RawLine, reason: String },
    /// The last line of a file, without its newline, that is not a valid record: the file may
    /// still be being written (the live log), so it is reported but not recorded as rejected.
    Incomplete { source: RawLine, reason: String },
    /// A valid record outside `--since` / `--until`.
    OutsideWindow,
    /// An empty line (or only whitespace): nothing to bill, counted and not stored (a `.gz` of
    /// a gigabyte of newlines must not grow the outbox by a row per line).
    Blank,
}

/// A line with nothing in it but whitespace.
pub fn is_blank(content: &LineContent) -> bool {
    matches!(content, LineContent::Complete(b) if b.iter().all(u8::is_ascii_whitespace))
}

/// Decodes one line in the given format. The reasons are the shipper's own words, so a line
/// rejected by a replay reads like one rejected by `tally ship`.
pub fn decode(
    format: ReplayFormat,
    content: &LineContent,
    max_line_bytes: usize,
) -> Result<SpendRecord, String> {
    let bytes = match content {
        LineContent::Complete(b) => b,
        LineContent::TooLong { len } => return Err(too_long_reason(*len, max_line_bytes)),
    };
    match format {
        ReplayFormat::Tally => SpendRecord::parse_line(bytes).map_err(|e| e.to_string()),
        ReplayFormat::Litellm => litellm::parse_line(bytes).map_err(|e| e.to_string()),
    }
}

/// Iterates over every line of every file, in order.
pub struct ReplayReader {
    pending: VecDeque<PathBuf>,
    current: Option<LineReader>,
    format: ReplayFormat,
    window: TimeWindow,
    max_line_bytes: usize,
    progress: Progress,
    finished_bytes: u64,
    lines_since_update: u32,
    pub lines_read: u64,
}

impl ReplayReader {
    pub fn new(
        files: Vec<PathBuf>,
        format: ReplayFormat,
        window: TimeWindow,
        max_line_bytes: usize,
    ) -> Self {
        let progress = Progress::new(total_size(&files));
        Self {
            pending: files.into(),
            current: None,
            format,
            window,
            max_line_bytes,
            progress,
            finished_bytes: 0,
            lines_since_update: 0,
            lines_read: 0,
        }
    }

    /// The next decoded line; `Ok(None)` after the last file.
    pub fn next_item(&mut self) -> Result<Option<Decoded>, InputError> {
        loop {
            if self.current.is_none() {
                let Some(path) = self.pending.pop_front() else {
                    self.progress.finish();
                    return Ok(None);
                };
                self.progress.set_file(&path.display().to_string());
                self.current = Some(LineReader::open(&path, self.max_line_bytes)?);
            }
            let Some(reader) = self.current.as_mut() else {
                continue;
            };
            match reader.next_line()? {
                Some(line) => {
                    self.lines_read += 1;
                    self.lines_since_update += 1;
                    if self.lines_since_update >= 4096 {
                        self.lines_since_update = 0;
                        self.progress
                            .set_position(self.finished_bytes + reader.disk_bytes());
                    }
                    let unterminated = reader.last_unterminated();
                    return Ok(Some(match self.classify(line) {
                        Decoded::Rejected { source, reason } if unterminated => {
                            Decoded::Incomplete {
                                source,
                                reason: format!(
                                    "last line has no newline and is not a valid record ({reason}); \
                                     not recorded: if the file is still being written, `tally ship` \
                                     or a later replay reads it once complete"
                                ),
                            }
                        }
                        other => other,
                    }));
                }
                None => {
                    self.finished_bytes += reader.disk_bytes();
                    self.progress.set_position(self.finished_bytes);
                    self.current = None;
                }
            }
        }
    }

    fn classify(&self, source: RawLine) -> Decoded {
        if is_blank(&source.content) {
            return Decoded::Blank;
        }
        match decode(self.format, &source.content, self.max_line_bytes) {
            Ok(record) if self.window.contains(&record.end_time) => Decoded::Record {
                source,
                record: Box::new(record),
            },
            Ok(_) => Decoded::OutsideWindow,
            Err(reason) => Decoded::Rejected { source, reason },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_records_rejections_and_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spend.jsonl");
        let rec = |id: &str, end: &str| {
            serde_json::json!({"schema":1,"transaction_id":id,"end_time":end,"model":"m",
                "input_tokens":1,"output_tokens":2,"status":"success"})
            .to_string()
        };
        let text = format!(
            "{}\nnot json\n\n  \r\n{}\n",
            rec("a", "2026-11-01T10:00:00.000Z"),
            rec("b", "2026-10-01T10:00:00.000Z")
        );
        std::fs::write(&path, text).unwrap();
        let window = TimeWindow::parse(Some("2026-11-01"), None).unwrap();
        let mut r = ReplayReader::new(vec![path], ReplayFormat::Tally, window, 4096);
        let mut kinds = Vec::new();
        while let Some(item) = r.next_item().unwrap() {
            kinds.push(match item {
                Decoded::Record { record, source } => {
                    format!("rec {} @{}", record.transaction_id, source.offset)
                }
                Decoded::Rejected { source, reason } => format!(
                    "rej @{} {}",
                    source.offset,
                    reason.contains("invalid record")
                ),
                Decoded::OutsideWindow => "outside".into(),
                Decoded::Blank => "blank".into(),
                Decoded::Incomplete { .. } => "incomplete".into(),
            });
        }
        let second = rec("a", "2026-11-01T10:00:00.000Z").len() + 1;
        assert_eq!(
            kinds,
            vec![
                "rec a @0".to_owned(),
                format!("rej @{second} true"),
                "blank".to_owned(),
                "blank".to_owned(),
                "outside".to_owned()
            ]
        );
        assert_eq!(r.lines_read, 5);
    }

    #[test]
    fn an_unfinished_last_line_is_incomplete_not_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let ok = serde_json::json!({"schema":1,"transaction_id":"a","end_time":"2026-11-01T10:00:00.000Z",
            "model":"m","input_tokens":1,"output_tokens":2,"status":"success"})
        .to_string();
        let live = dir.path().join("live.jsonl");
        std::fs::write(&live, format!("{ok}\n{{\"schema\":1,\"transac")).unwrap();
        let archived = dir.path().join("archived.jsonl");
        std::fs::write(&archived, &ok).unwrap();
        let mut r = ReplayReader::new(
            vec![live, archived],
            ReplayFormat::Tally,
            TimeWindow::default(),
            4096,
        );
        let mut kinds = Vec::new();
        while let Some(item) = r.next_item().unwrap() {
            kinds.push(match item {
                Decoded::Record { .. } => "record",
                Decoded::Incomplete { reason, .. } => {
                    assert!(reason.contains("no newline"), "{reason}");
                    "incomplete"
                }
                Decoded::Rejected { .. } => "rejected",
                Decoded::OutsideWindow => "outside",
                Decoded::Blank => "blank",
            });
        }
        assert_eq!(kinds, ["record", "incomplete", "record"]);
    }
}

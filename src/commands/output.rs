//! How operator commands print: data on stdout, as a table for people or as JSON with stable
//! field names for scripts (`--output-format json`); progress and logs go to stderr.

use std::io::{self, Write};

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, ContentArrangement, Table};
use serde::Serialize;

pub use crate::text::printable;

/// Exit code of a command that worked but found something that needs attention: `tally queue
/// stats --max-age` when the oldest pending event is older, `tally replay --ship` when some of its
/// events are still not acknowledged by Lago. (1 is an error, 2 bad usage.)
pub const EXIT_NEEDS_ATTENTION: u8 = 3;

/// Writes `value` as pretty JSON and a newline to stdout.
///
/// Rendered first, then written: an error while writing stays the `io::Error` it is (a closed
/// pipe is `BrokenPipe`, which `main` treats as success), where serde_json would have wrapped it
/// into an error of its own kind.
pub fn print_json<T: Serialize>(value: &T) -> io::Result<()> {
    let mut text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    text.push(b'\n');
    let mut out = io::stdout().lock();
    out.write_all(&text)?;
    out.flush()
}

/// Writes text to stdout (a closed pipe surfaces as `BrokenPipe`, which `main` treats as success).
pub fn print_text(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        writeln!(out)?;
    }
    out.flush()
}

/// A table in the house style; columns listed in `right` are right-aligned (numbers).
pub fn table(header: &[&str], right: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED.with_rounded_corners())
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    for &i in right {
        if let Some(col) = t.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// USD amounts with enough digits for per-token prices (`$0.000168`), without trailing noise.
pub fn usd(amount: f64) -> String {
    if amount == 0.0 {
        "$0".to_owned()
    } else if amount.abs() >= 1.0 {
        format!("${amount:.2}")
    } else {
        let s = format!("{amount:.6}");
        format!("${}", s.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// A duration in seconds as `3h 12m`, `45s`: for ages in `tally queue stats`.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Up to `max` leading bytes of a line, lossily decoded, for showing a rejected line safely.
pub fn first_bytes(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    let mut s = printable(&String::from_utf8_lossy(cut));
    if bytes.len() > max {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_money_and_ages() {
        assert_eq!(usd(0.0), "$0");
        assert_eq!(usd(0.0001675), "$0.000168");
        assert_eq!(usd(0.5), "$0.5");
        assert_eq!(usd(12.345), "$12.35");
        assert_eq!(age(5), "5s");
        assert_eq!(age(125), "2m 5s");
        assert_eq!(age(7300), "2h 1m");
        assert_eq!(age(90_000), "1d 1h");
    }

    #[test]
    fn first_bytes_is_bounded_and_printable() {
        assert_eq!(first_bytes(b"{\"a\":\n1}", 100), "{\"a\":\\n1}");
        assert_eq!(first_bytes(b"abcdef", 3), "abc…");
        assert_eq!(first_bytes(b"\xff\xfeok", 10), "\u{fffd}\u{fffd}ok");
    }

    #[test]
    fn tables_render_headers_and_rows() {
        let mut t = table(&["customer", "events"], &[1]);
        t.add_row(vec!["team-a", "3"]);
        let s = t.to_string();
        assert!(s.contains("customer") && s.contains("team-a") && s.contains('3'));
    }
}

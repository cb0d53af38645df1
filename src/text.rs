//! Text made safe to show: shared by the services (log fields quoting a peer's bytes) and the
//! commands (what they print), so neither depends on the other for it.

/// Text from a spend log, a record or a peer, made safe for a terminal: control characters
/// (ESC, CR, BEL, C1 codes…) and the invisible direction overrides that can disguise text are
/// written as escapes (`\u{1b}`, `\n`), so nothing tally prints can move the cursor, recolour
/// the screen or set a window title. Everything tally prints of record text goes through this.
pub fn printable(text: &str) -> String {
    if !text.chars().any(needs_escape) {
        return text.to_owned();
    }
    let mut s = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            s.extend(c.escape_default());
        } else {
            s.push(c);
        }
    }
    s
}

/// An error and its causes joined by ": ", as anyhow's `{:#}` does, leaving out a cause whose
/// text its parent already ends with: an error type that quotes its source in its own message
/// (so that a log line of it alone says why) would otherwise say the same thing twice.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut parent = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || parent.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        parent = text;
    }
    out
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// How many bytes from the start of `b` a JSON string holds as they are: up to the first quote,
/// backslash or control character, looked for eight bytes at a time (the spend-log scanner and
/// the event writer both ask this of every string).
pub fn json_plain_len(b: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    while let Some(chunk) = b.get(i..i + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let w = u64::from_le_bytes(w);
        // A byte is flagged (high bit set) when it is below 0x20, a quote or a backslash: the
        // usual "has a zero byte" test on w - 0x20, w ^ '"' and w ^ '\\', kept to ASCII bytes.
        let below = w.wrapping_sub(ONES * 0x20);
        let quote = (w ^ (ONES * u64::from(b'"'))).wrapping_sub(ONES);
        let slash = (w ^ (ONES * u64::from(b'\\'))).wrapping_sub(ONES);
        let flagged = (below | quote | slash) & !w & HIGHS;
        if flagged != 0 {
            return i + (flagged.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + b[i..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .unwrap_or(b.len() - i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_string_scan_stops_at_the_first_quote_backslash_or_control_character() {
        for len in 0..40 {
            for stop in ["\"", "\\", "\u{0}", "\u{1f}", "\n"] {
                let text = format!(
                    "{}{stop}tail\"",
                    "ab\u{e9}~\u{7f}x"
                        .repeat(8)
                        .chars()
                        .take(len)
                        .collect::<String>()
                );
                let expected = text.find(stop).unwrap();
                assert_eq!(json_plain_len(text.as_bytes()), expected, "{text:?}");
            }
            let plain = "y".repeat(len);
            assert_eq!(json_plain_len(plain.as_bytes()), len);
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot listen on {addr}: {source}")]
    struct Quoting {
        addr: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let err = anyhow::Error::new(Quoting {
            addr: "127.0.0.1:1",
            source: io(),
        })
        .context("the shipper failed");
        assert_eq!(
            error_chain(&err),
            "the shipper failed: cannot listen on 127.0.0.1:1: Address already in use"
        );
        // A cause its parent does not quote is kept, as `{:#}` keeps it.
        let err = anyhow::Error::new(io())
            .context("binding")
            .context("starting");
        assert_eq!(error_chain(&err), format!("{err:#}"));
        assert_eq!(
            error_chain(&err),
            "starting: binding: Address already in use"
        );
    }

    #[test]
    fn printable_escapes_terminal_controls_only() {
        assert_eq!(printable("cust-1 é ✓"), "cust-1 é ✓");
        assert_eq!(
            printable("a\u{1b}]0;pwned\u{7}b"),
            "a\\u{1b}]0;pwned\\u{7}b"
        );
        assert_eq!(printable("x\r\ny\u{9b}"), "x\\r\\ny\\u{9b}");
        assert_eq!(printable("\u{202e}gnp.exe"), "\\u{202e}gnp.exe");
        assert!(!printable("\u{1b}[2J").contains('\u{1b}'));
    }
}

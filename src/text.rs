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

#[cfg(test)]
mod tests {
    use super::*;

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

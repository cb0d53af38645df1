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

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

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

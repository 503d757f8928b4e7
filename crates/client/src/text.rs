//! Text from a server made fit for a terminal or a text log.

/// `text` with its control characters other than those `kept` shown escaped (`\u{1b}`), and so
/// are the invisible characters that reorder or break what a terminal shows (below). Much of
/// what an admin command shows or a worker logs was written by others than the one reading it:
/// work metadata and worker ids by any worker with the environment's key, event text by agents and
/// commands, a program's output. An escape sequence among them could otherwise rewrite the
/// reader's terminal, a line break or carriage return pass for a line of its own, and a
/// right-to-left override show a line's end before its start (an id read backwards).
pub fn printable(text: &str, kept: &[char]) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if (c.is_control() || reorders_or_breaks_lines(c)) && !kept.contains(&c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Unicode's bidirectional formatting characters (marks, embeddings, overrides, isolates) and its
/// line and paragraph separators: not control characters to Rust, yet they change the order in
/// which a terminal shows the text around them, or where it breaks a line.
fn reorders_or_breaks_lines(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
            | '\u{2028}' | '\u{2029}'
    )
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_are_escaped_unless_kept() {
        assert_eq!(
            printable("a\tb\u{1b}[2Jc\r\n", &['\t']),
            "a\tb\\u{1b}[2Jc\\r\\n"
        );
        assert_eq!(
            printable("plain, accentué, 日本語", &[]),
            "plain, accentué, 日本語"
        );
    }

    #[test]
    fn direction_overrides_and_line_separators_are_escaped() {
        // "sess_" followed by an override that would show "evil" as "live".
        assert_eq!(
            printable("sess_\u{202e}live\u{202c}", &[]),
            "sess_\\u{202e}live\\u{202c}"
        );
        for c in [
            '\u{061c}', '\u{200e}', '\u{200f}', '\u{2066}', '\u{2069}', '\u{2028}', '\u{2029}',
        ] {
            let shown = printable(&format!("a{c}b"), &[]);
            assert!(!shown.contains(c), "{c:?} passed unescaped: {shown}");
        }
        // Letters of right-to-left scripts are text, not formatting: they stay.
        assert_eq!(printable("שלום مرحبا", &[]), "שלום مرحبا");
    }
}

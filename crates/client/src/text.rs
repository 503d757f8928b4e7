//! Text from a server made fit for a terminal or a text log.

/// `text` with its control characters other than those `kept` shown escaped (`\u{1b}`). Much of
/// what an admin command shows or a worker logs was written by others than the one reading it:
/// work metadata and worker ids by any worker with the environment's key, event text by agents and
/// commands, a program's output. An escape sequence among them could otherwise rewrite the
/// reader's terminal, and a line break or carriage return pass for a line of its own.
pub fn printable(text: &str, kept: &[char]) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && !kept.contains(&c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

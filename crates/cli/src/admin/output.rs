//! How admin commands show results: aligned tables and field lists for people, JSON for scripts.

use serde::Serialize;

/// A table with a header row; columns are as wide as their widest cell.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.iter().map(|cell| printable(cell, &[])).collect());
    }

    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for cells in std::iter::once(&header).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = width.saturating_sub(cell.chars().count());
                line.push_str(&" ".repeat(pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `label: value` lines with the values aligned, each value on its line.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(label, _)| label.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (label, value) in pairs {
        let pad = width - label.chars().count();
        let value = printable(value, &[]);
        out.push_str(&format!("{label}:{}  {value}\n", " ".repeat(pad)));
    }
    out
}

pub use tether_client::text::printable;

/// Pretty JSON for `--json`.
pub fn json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("API values always serialize");
    text.push('\n');
    text
}

/// An optional value, or `-`.
pub fn or_dash(value: Option<&str>) -> String {
    match value {
        Some(v) if !v.is_empty() => v.to_owned(),
        _ => "-".to_owned(),
    }
}

/// An RFC 3339 instant shortened to whole seconds for tables (`2026-07-01 08:15:01Z`).
pub fn time(value: Option<&str>) -> String {
    let Some(value) = value else {
        return "-".to_owned();
    };
    let trimmed = match value.find('.') {
        Some(dot) if value.ends_with('Z') => format!("{}Z", &value[..dot]),
        _ => value.to_owned(),
    };
    trimmed.replacen('T', " ", 1)
}

/// A metadata map as `k=v, k=v`.
pub fn map(map: &std::collections::BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return "-".to_owned();
    }
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_trim_the_last() {
        let mut t = Table::new(&["ID", "NAME"]);
        t.row(vec!["env_1".into(), "a".into()]);
        t.row(vec!["e".into(), "longer name".into()]);
        assert_eq!(t.render(), "ID     NAME\nenv_1  a\ne      longer name\n");
    }

    #[test]
    fn what_others_wrote_cannot_rewrite_the_terminal() {
        let mut t = Table::new(&["ID", "WORKER"]);
        t.row(vec!["w".into(), "a\u{1b}[2Jb\nc".into()]);
        assert_eq!(t.render(), "ID  WORKER\nw   a\\u{1b}[2Jb\\nc\n");
        assert_eq!(
            fields(&[("metadata", "note=ok\u{1b}]0;owned\u{7}".into())]),
            "metadata:  note=ok\\u{1b}]0;owned\\u{7}\n"
        );
        assert_eq!(printable("a\tb\u{9b}c\n", &['\n', '\t']), "a\tb\\u{9b}c\n");
    }

    #[test]
    fn fields_align_values() {
        assert_eq!(
            fields(&[("id", "x".into()), ("status", "ready".into())]),
            "id:      x\nstatus:  ready\n"
        );
    }

    #[test]
    fn times_are_shortened() {
        assert_eq!(
            time(Some("2026-07-01T08:15:01.123456Z")),
            "2026-07-01 08:15:01Z"
        );
        assert_eq!(time(Some("2026-07-01T08:15:01Z")), "2026-07-01 08:15:01Z");
        assert_eq!(time(None), "-");
    }
}

//! Plain-text tables for the terminal.

/// Renders rows under a header, columns padded to their widest cell; columns
/// whose cells are all numbers are right-aligned.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    let mut numeric = vec![true; columns];
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
            numeric[i] &= cell.is_empty()
                || cell
                    .trim_end_matches('%')
                    .replace(',', "")
                    .parse::<f64>()
                    .is_ok();
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut String| {
        let mut parts = Vec::with_capacity(columns);
        for (i, cell) in cells.enumerate().take(columns) {
            let width = widths[i];
            parts.push(if numeric[i] {
                format!("{cell:>width$}")
            } else {
                format!("{cell:<width$}")
            });
        }
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    let mut out = String::new();
    line(&mut header.iter().copied(), &mut out);
    for row in rows {
        line(&mut row.iter().map(String::as_str), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_and_aligns() {
        let rows = vec![
            vec!["a".to_owned(), "1,000".to_owned(), "x".to_owned()],
            vec!["bbb".to_owned(), "7".to_owned(), "yy".to_owned()],
        ];
        assert_eq!(
            render(&["name", "n", "tag"], &rows),
            "name      n  tag\na     1,000  x\nbbb       7  yy\n"
        );
    }
}

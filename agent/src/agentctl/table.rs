//! Plain-text tables as kubectl prints them: upper-case headers, columns padded to their
//! widest cell and three spaces apart, and human units for bytes and CPU time.

/// Rows of cells under a header, printed with aligned columns.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as lines, each prefixed with `indent`; no trailing spaces.
    pub fn render(&self, indent: &str) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::from(indent);
            for (i, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if i + 1 < row.len() {
                    let pad = widths[i].saturating_sub(cell.chars().count()) + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `cell` or `<none>` when there is nothing to show, as kubectl does.
pub fn or_none(cell: Option<impl ToString>) -> String {
    cell.map_or_else(|| "<none>".to_string(), |c| c.to_string())
}

/// Bytes in binary units with one decimal: `512B`, `1.5Ki`, `64.0Mi`.
pub fn bytes(value: u64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    if value < 1024 {
        return format!("{value}B");
    }
    let mut scaled = value as f64 / 1024.0;
    let mut unit = 0;
    while scaled >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    format!("{scaled:.1}{}", UNITS[unit])
}

/// CPU time from microseconds: `850us`, `12ms`, `3.25s`, `2h05m`.
pub fn cpu_time(usec: u64) -> String {
    match usec {
        0..1_000 => format!("{usec}us"),
        1_000..1_000_000 => format!("{}ms", usec / 1_000),
        1_000_000..3_600_000_000 => format!("{:.2}s", usec as f64 / 1e6),
        _ => {
            let minutes = usec / 60_000_000;
            format!("{}h{:02}m", minutes / 60, minutes % 60)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_without_trailing_spaces() {
        let mut table = Table::new(&["NAME", "ID"]);
        table.row(vec!["a-long-name".into(), "1".into()]);
        table.row(vec!["b".into(), String::new()]);
        assert_eq!(
            table.render("  "),
            "  NAME          ID\n  a-long-name   1\n  b\n"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5Ki");
        assert_eq!(bytes(64 << 20), "64.0Mi");
        assert_eq!(bytes(3 << 30), "3.0Gi");
        assert_eq!(cpu_time(850), "850us");
        assert_eq!(cpu_time(12_345), "12ms");
        assert_eq!(cpu_time(3_250_000), "3.25s");
        assert_eq!(cpu_time(7_500_000_000), "2h05m");
        assert_eq!(or_none(None::<u32>), "<none>");
    }
}

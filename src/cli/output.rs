//! What the CLI prints for people: aligned tables and `field: value` lists of the API's JSON.

use serde_json::Value;

/// A column: its heading and how a cell is read from one JSON object.
pub struct Column {
    pub heading: &'static str,
    pub cell: fn(&Value) -> String,
}

pub const fn col(heading: &'static str, cell: fn(&Value) -> String) -> Column {
    Column { heading, cell }
}

/// The rows as a table: left-aligned columns two spaces apart, the last one
/// not padded (so no line ends in blanks).
pub fn table(columns: &[Column], rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| clean((c.cell)(r))).collect())
        .collect();
    let mut widths: Vec<usize> = columns.iter().map(|c| c.heading.chars().count()).collect();
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let headings: Vec<String> = columns.iter().map(|c| c.heading.to_string()).collect();
    for row in std::iter::once(&headings).chain(&cells) {
        let last = row.len() - 1;
        for (i, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    }
    out
}

/// One object as `field  value` lines (in serde_json's map order: by name).
pub fn fields(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        return format!("{v}\n");
    };
    let width = obj.keys().map(|k| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in obj {
        let value = match v {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        };
        // A multi-line value (user data, a description) is indented under its field.
        let value = value.replace('\n', &format!("\n{:width$}  ", "", width = width));
        out.push_str(&format!("{k:width$}  {value}\n"));
    }
    out
}

/// A string field, `-` when absent or null.
pub fn s(v: &Value, field: &str) -> String {
    match v.get(field) {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// Bytes for people: 1536 -> "1.5 KiB".
pub fn bytes(v: &Value, field: &str) -> String {
    let Some(n) = v.get(field).and_then(Value::as_f64) else {
        return "-".into();
    };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut n = n;
    let mut unit = 0;
    while n >= 1024.0 && unit < units.len() - 1 {
        n /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{n:.1} {}", units[unit])
    }
}

/// A table cell never breaks its row: control characters become spaces.
fn clean(s: String) -> String {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn columns_are_aligned_and_lines_have_no_trailing_blanks() {
        let cols = [col("ID", |v| s(v, "id")), col("NAME", |v| s(v, "name"))];
        let rows = [
            json!({"id": "vm_1", "name": "web"}),
            json!({"id": "vm_long", "name": null}),
        ];
        assert_eq!(
            table(&cols, &rows),
            "ID       NAME\nvm_1     web\nvm_long  -\n"
        );
    }

    #[test]
    fn sizes_and_fields_read_for_people() {
        assert_eq!(bytes(&json!({"n": 512}), "n"), "512 B");
        assert_eq!(bytes(&json!({"n": 1536}), "n"), "1.5 KiB");
        assert_eq!(bytes(&json!({}), "n"), "-");
        assert_eq!(
            fields(&json!({"guest_ip": null, "id": "vm_1", "vcpu_count": 2})),
            "guest_ip    -\nid          vm_1\nvcpu_count  2\n"
        );
        assert_eq!(
            table(&[col("A", |v| s(v, "a"))], &[json!({"a": "x\ny"})]),
            "A\nx y\n"
        );
    }
}

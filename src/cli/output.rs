//! What the CLI prints for people: aligned tables and `field: value` lists of the API's JSON.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;

/// A column: its heading, the field of each object it shows, and how a
/// cell is written from that field's value (`Null` when absent).
pub struct Column {
    pub heading: &'static str,
    pub field: &'static str,
    pub cell: fn(&Value) -> String,
}

pub const fn col(heading: &'static str, field: &'static str, cell: fn(&Value) -> String) -> Column {
    Column {
        heading,
        field,
        cell,
    }
}

/// The objects of a list answer (a JSON array), each reduced to its
/// columns' values in column order. Fields no column shows are skipped by
/// the parser, never built: 10,000 VMs are 4 MB of JSON, most of it fields
/// a table leaves out.
pub fn rows(text: &str, columns: &[Column]) -> Result<Vec<Vec<Value>>, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let rows = Rows(columns)
        .deserialize(&mut de)
        .and_then(|r| de.end().map(|()| r))
        .map_err(|e| format!("the answer is not a list of objects: {e}"))?;
    Ok(rows)
}

struct Rows<'c>(&'c [Column]);

impl<'de> DeserializeSeed<'de> for Rows<'_> {
    type Value = Vec<Vec<Value>>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Rows<'_> {
    type Value = Vec<Vec<Value>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(row) = seq.next_element_seed(Row(self.0))? {
            out.push(row);
        }
        Ok(out)
    }
}

struct Row<'c>(&'c [Column]);

impl<'de> DeserializeSeed<'de> for Row<'_> {
    type Value = Vec<Value>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Row<'_> {
    type Value = Vec<Value>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut cells = vec![Value::Null; self.0.len()];
        while let Some(field) = map.next_key_seed(Key(self.0))? {
            let Some(field) = field else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let value: Value = map.next_value()?;
            for (cell, c) in cells.iter_mut().zip(self.0) {
                if c.field == field {
                    *cell = value.clone();
                }
            }
        }
        Ok(cells)
    }
}

/// A key, as the column field it names (None: no column shows it), read
/// without allocating.
struct Key<'c>(&'c [Column]);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = Option<&'static str>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = Option<&'static str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, k: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().find(|c| c.field == k).map(|c| c.field))
    }
}

/// The rows (from [`rows`]) as a table: left-aligned columns two spaces
/// apart, the last one not padded (so no line ends in blanks).
pub fn table(columns: &[Column], rows: &[Vec<Value>]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .zip(r)
                .map(|(c, v)| clean((c.cell)(v)))
                .collect()
        })
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
    text(v.get(field).unwrap_or(&Value::Null))
}

/// A value as a cell: a string as it is, `-` for null.
pub fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A byte count for people: 1536 -> "1.5 KiB"; `-` when not a number.
pub fn size(v: &Value) -> String {
    let Some(n) = v.as_f64() else {
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
        let cols = [col("ID", "id", text), col("NAME", "name", text)];
        let listed = r#"[{"id": "vm_1", "name": "web"}, {"id": "vm_long", "name": null}]"#;
        assert_eq!(
            table(&cols, &rows(listed, &cols).unwrap()),
            "ID       NAME\nvm_1     web\nvm_long  -\n"
        );
    }

    #[test]
    fn rows_keep_only_their_columns_fields_whatever_else_an_object_holds() {
        let cols = [
            col("ID", "id", text),
            col("SIZE", "size_bytes", size),
            col("AGAIN", "id", text),
            col("GONE", "absent", text),
        ];
        let listed = r##"[
            {"user_data": "#!/bin/sh\n\"x\"", "id": "vm_\u0031", "env": {"A": [1, {"b": null}]},
             "size_bytes": 1536, "tags": [], "n": -1.5e3, "t": true},
            {"size_bytes": null, "id": "vm_2", "id": "vm_3"}
        ]"##;
        let got = rows(listed, &cols).unwrap();
        assert_eq!(
            got,
            [
                vec![json!("vm_1"), json!(1536), json!("vm_1"), Value::Null],
                vec![json!("vm_3"), Value::Null, json!("vm_3"), Value::Null],
            ]
        );
        assert_eq!(
            table(&cols, &got),
            "ID    SIZE     AGAIN  GONE\nvm_1  1.5 KiB  vm_1   -\nvm_3  -        vm_3   -\n"
        );
        assert_eq!(rows("[]", &cols).unwrap(), Vec::<Vec<Value>>::new());
        // Anything but an array of objects is an error, not an empty table.
        for bad in [
            r#"{"id": "vm_1"}"#,
            r#"["vm_1"]"#,
            "[{}] []",
            "[{\"id\": 1}",
            "null",
        ] {
            let err = rows(bad, &cols).unwrap_err();
            assert!(
                err.starts_with("the answer is not a list of objects"),
                "{bad}: {err}"
            );
        }
        // Deep nesting: skipped without recursion in a field no column shows,
        // refused past serde_json's depth limit in one a column shows; never
        // a stack overflow.
        let nest = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let skipped = format!(r#"[{{"id": "vm_1", "x": {}}}]"#, nest(100_000));
        assert_eq!(rows(&skipped, &cols).unwrap()[0][0], json!("vm_1"));
        let shown = format!(r#"[{{"id": {}}}]"#, nest(100_000));
        assert!(rows(&shown, &cols).is_err());
    }

    #[test]
    fn sizes_and_fields_read_for_people() {
        assert_eq!(size(&json!(512)), "512 B");
        assert_eq!(size(&json!(1536)), "1.5 KiB");
        assert_eq!(size(&Value::Null), "-");
        assert_eq!(s(&json!({"a": 2}), "a"), "2");
        assert_eq!(s(&json!({}), "a"), "-");
        assert_eq!(
            fields(&json!({"guest_ip": null, "id": "vm_1", "vcpu_count": 2})),
            "guest_ip    -\nid          vm_1\nvcpu_count  2\n"
        );
        let cols = [col("A", "a", text)];
        assert_eq!(
            table(&cols, &rows(r#"[{"a": "x\ny"}]"#, &cols).unwrap()),
            "A\nx y\n"
        );
    }
}

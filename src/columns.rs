//! Plain CSV tables with a header line, read by column name (the truth table and the detection
//! catalogue): columns in any order, unknown ones ignored, errors with the line and the column.
//! Fields never contain commas or quotes in these formats (their writers guarantee it), so a split
//! on commas is the whole grammar; a general CSV crate would only add a dependency.

use std::collections::HashMap;

/// An error at a 1-based line.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

/// One data row with access by column name.
pub struct Row<'a> {
    pub line: usize,
    cols: &'a HashMap<&'a str, usize>,
    values: Vec<&'a str>,
}

impl<'a> Row<'a> {
    /// The trimmed text of a column; "" when the column or the value is absent.
    pub fn get(&self, c: &str) -> &'a str {
        self.cols.get(c).and_then(|&i| self.values.get(i)).copied().unwrap_or("")
    }

    pub fn err(&self, message: String) -> LineError {
        LineError { line: self.line, message }
    }

    /// A required value parsed as `T`.
    pub fn parse<T: std::str::FromStr>(&self, c: &str) -> Result<T, LineError>
    where
        T::Err: std::fmt::Display,
    {
        self.get(c).parse::<T>().map_err(|e| self.err(format!("column {c} = {:?}: {e}", self.get(c))))
    }

    /// An optional value: empty is `None`.
    pub fn opt<T: std::str::FromStr>(&self, c: &str) -> Result<Option<T>, LineError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(c) {
            "" => Ok(None),
            _ => self.parse(c).map(Some),
        }
    }
}

/// Parse `text`, check that every `required` column is in the header (`what` names the table in
/// the error for an empty text), and map every non-blank data row with `f`.
pub fn parse<T>(
    text: &str,
    what: &str,
    required: &[&str],
    mut f: impl FnMut(&Row) -> Result<T, LineError>,
) -> Result<Vec<T>, LineError> {
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, l)| l).ok_or_else(|| LineError { line: 1, message: format!("empty {what}") })?;
    let cols: HashMap<&str, usize> = header.split(',').map(str::trim).enumerate().map(|(i, c)| (c, i)).collect();
    if let Some(c) = required.iter().find(|c| !cols.contains_key(*c)) {
        return Err(LineError { line: 1, message: format!("no column {c:?} (header: {header})") });
    }
    let mut out = Vec::new();
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let row = Row { line: n + 1, cols: &cols, values: line.split(',').map(str::trim).collect() };
        out.push(f(&row)?);
    }
    Ok(out)
}

//! JSON-lines export of records.
//!
//! One [`Record`] per line, in its serde form (`"kind": "flow"` or
//! `"change"`), so `jq`, log shippers and `grep` read the trail directly.
//! serde_json escapes control characters inside strings, so a record never spans
//! lines. [`read_lines`] reads such a file back; blank lines are skipped and an
//! error names the 1-based line it is on.

use std::io::{self, BufRead, Write};

use crate::record::Record;

/// Writes records as JSON lines to `W` (wrap a file in a `BufWriter`: each
/// record is one `write` call per serialized piece).
#[derive(Debug)]
pub struct JsonLinesWriter<W: Write> {
    inner: W,
}

impl<W: Write> JsonLinesWriter<W> {
    /// A writer appending to `w`.
    pub fn new(w: W) -> Self {
        JsonLinesWriter { inner: w }
    }

    /// Write `r` and its newline.
    pub fn write(&mut self, r: &Record) -> io::Result<()> {
        serde_json::to_writer(&mut self.inner, r).map_err(io::Error::from)?;
        self.inner.write_all(b"\n")
    }

    /// The underlying writer (not flushed).
    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Why a JSON-lines input could not be read; names the 1-based line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JsonlError {
    /// Reading the line failed.
    #[error("line {line}: {source}")]
    Io {
        /// 1-based line number.
        line: usize,
        /// The read error.
        source: io::Error,
    },
    /// The line is not a valid record.
    #[error("line {line}: {source}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// The parse error (its column is within the line).
        source: serde_json::Error,
    },
}

impl JsonlError {
    /// The 1-based line the error is on.
    pub fn line(&self) -> usize {
        match self {
            JsonlError::Io { line, .. } | JsonlError::Parse { line, .. } => *line,
        }
    }
}

/// The records of a JSON-lines input, in order. Blank lines are skipped; a bad
/// line yields an error and reading goes on with the next line, except after a
/// read error, which ends the iteration.
pub fn read_lines<R: BufRead>(r: R) -> impl Iterator<Item = Result<Record, JsonlError>> {
    let mut lines = r.lines().enumerate();
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        loop {
            let (i, line) = lines.next()?;
            let line_no = i + 1;
            match line {
                Err(source) => {
                    failed = true;
                    return Some(Err(JsonlError::Io { line: line_no, source }));
                }
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => {
                    return Some(
                        serde_json::from_str(&text).map_err(|source| JsonlError::Parse { line: line_no, source }),
                    );
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ChangeRecord, Endpoint, FlowRecord, Phase, Verdict};

    fn change(i: u64, diff: &str) -> Record {
        Record::Change(ChangeRecord {
            time_ns: i,
            actor: "alice".into(),
            action: "policy.apply".into(),
            resource: "policy".into(),
            diff: diff.into(),
            policy_version: Some(i),
        })
    }

    fn flow(i: u64) -> Record {
        Record::Flow(FlowRecord {
            appliance: None,
            time_ns: i,
            flow_id: i,
            host: "hv1".into(),
            phase: Phase::Start,
            src: Endpoint {
                addr: "2001:db8::1".parse().unwrap(),
                port: 1,
                vm: None,
            },
            dst: Endpoint {
                addr: "10.0.0.1".parse().unwrap(),
                port: 2,
                vm: None,
            },
            protocol: 17,
            icmp: None,
            verdict: Verdict::Deny,
            decided_by: vec![],
            packets_out: 1,
            bytes_out: u64::MAX,
            packets_in: 0,
            bytes_in: 0,
            start_ns: 0,
            last_ns: 0,
        })
    }

    #[test]
    fn round_trip_one_record_per_line() {
        let records = vec![
            flow(1),
            change(2, "line one\nline two\r\n\ttab \u{1}"),
            flow(3),
            change(4, ""),
        ];
        let mut w = JsonLinesWriter::new(Vec::new());
        for r in &records {
            w.write(r).unwrap();
        }
        let bytes = w.into_inner();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(text.lines().count(), records.len(), "{text}");
        let back: Vec<Record> = read_lines(&bytes[..]).collect::<Result<_, _>>().unwrap();
        assert_eq!(back, records);
    }

    #[test]
    fn errors_name_the_line_and_reading_goes_on() {
        let mut w = JsonLinesWriter::new(Vec::new());
        w.write(&flow(1)).unwrap();
        let mut input = w.into_inner();
        input.extend_from_slice(b"\n   \n{\"kind\":\"flow\"}\nnot json\n");
        input.extend_from_slice(serde_json::to_string(&change(9, "x")).unwrap().as_bytes());
        let out: Vec<_> = read_lines(&input[..]).collect();
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].as_ref().unwrap(), &flow(1));
        assert!(
            matches!(&out[1], Err(JsonlError::Parse { line: 4, .. })),
            "{:?}",
            out[1]
        );
        assert_eq!(out[2].as_ref().unwrap_err().line(), 5);
        assert!(out[2].as_ref().unwrap_err().to_string().starts_with("line 5: "));
        assert_eq!(out[3].as_ref().unwrap(), &change(9, "x"));
    }

    #[test]
    fn invalid_utf8_is_a_read_error_that_ends_reading() {
        let input = b"\xff\xfe\n{}\n";
        let out: Vec<_> = read_lines(&input[..]).collect();
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Err(JsonlError::Io { line: 1, .. })), "{:?}", out[0]);
    }
}

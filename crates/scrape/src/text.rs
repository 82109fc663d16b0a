//! A parser for the Prometheus text exposition format, version 0.0.4: the `/metrics` pages
//! that vLLM, SGLang, TensorRT-LLM, Triton and llama.cpp print.
//!
//! Why our own parser rather than a crate: the format is small (one sample per line), the
//! parser faces the network (any model server, or anything pretending to be one, feeds it
//! every 50 ms), and so it must be hardened and fuzzed as our own code. Keeping it to one
//! short file with no dependencies makes that practical: it never panics, borrows from the
//! page instead of allocating per sample where it can, caps the work one page may cost
//! ([`MAX_PAGE_BYTES`], [`MAX_SAMPLES`]), and reports what was wrong with the line number.
//!
//! What is accepted: `# HELP` and `# TYPE` lines (checked), other `#` comments (ignored),
//! blank lines, CRLF line ends, blanks and tabs around tokens, metric names with colons,
//! label values with the escapes `\\`, `\"` and `\n`, a trailing comma in a label set,
//! values such as `NaN`, `+Inf`, `-Inf` and `1.5e-3`, and an optional integer timestamp
//! in milliseconds. This module touches nothing but the string it is given.

use std::borrow::Cow;

/// Pages longer than this many bytes are refused whole, before any parsing.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// Pages with more samples than this are refused. A busy vLLM page has a few thousand.
pub const MAX_SAMPLES: usize = 100_000;

/// The metric types a `# TYPE` line may name (0.0.4, plus OpenMetrics' `unknown`).
const KNOWN_TYPES: [&str; 6] = [
    "counter",
    "gauge",
    "histogram",
    "summary",
    "untyped",
    "unknown",
];

/// One label of a sample, borrowed from the page unless its value had escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label<'a> {
    pub name: &'a str,
    pub value: Cow<'a, str>,
}

/// One sample line: `name{labels} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    /// In page order; names are unique within a sample.
    pub labels: Vec<Label<'a>>,
    pub value: f64,
    /// Milliseconds since the Unix epoch, when the line carries one.
    pub timestamp_ms: Option<i64>,
}

impl Sample<'_> {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.value.as_ref())
    }
}

/// Why a page was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("metrics page is {size} bytes, over the {limit}-byte limit")]
    PageTooLarge { size: usize, limit: usize },
    #[error("line {line}: metrics page has more than {limit} samples")]
    TooManySamples { line: usize, limit: usize },
    #[error("line {line}, column {column}: {what}")]
    Syntax {
        line: usize,
        /// 1-based byte offset within the line.
        column: usize,
        what: String,
    },
}

/// Parse a whole page. Fails on the first bad line; a page is either understood or not.
///
/// ```
/// let page = "# TYPE vllm:num_requests_waiting gauge\n\
///             vllm:num_requests_waiting{model_name=\"llama\"} 3.0\n";
/// let samples = infergate_scrape::text::parse(page).unwrap();
/// assert_eq!(samples[0].name, "vllm:num_requests_waiting");
/// assert_eq!(samples[0].label("model_name"), Some("llama"));
/// assert_eq!(samples[0].value, 3.0);
/// ```
pub fn parse(input: &str) -> Result<Vec<Sample<'_>>, ParseError> {
    parse_only(input, |_| true)
}

/// Like [`parse`], but keeps only samples whose metric name `keep` accepts; other lines
/// are checked up to their name and skipped, which makes large pages cheap when only a few
/// families matter.
pub fn parse_only<'a>(
    input: &'a str,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<Sample<'a>>, ParseError> {
    if input.len() > MAX_PAGE_BYTES {
        return Err(ParseError::PageTooLarge {
            size: input.len(),
            limit: MAX_PAGE_BYTES,
        });
    }
    let mut samples = Vec::new();
    for (index, raw) in input.split('\n').enumerate() {
        let line = index + 1;
        let text = raw.trim_end_matches(is_blank_or_cr);
        let mut cur = Cursor {
            s: text,
            pos: 0,
            line,
        };
        cur.skip_blanks();
        match cur.peek() {
            None => continue,
            Some(b'#') => cur.comment()?,
            Some(_) => {
                if samples.len() >= MAX_SAMPLES {
                    return Err(ParseError::TooManySamples {
                        line,
                        limit: MAX_SAMPLES,
                    });
                }
                let start = cur.pos;
                let name = cur.metric_name()?;
                if !keep(name) {
                    continue;
                }
                cur.pos = start;
                samples.push(cur.sample()?);
            }
        }
    }
    Ok(samples)
}

fn is_blank_or_cr(c: char) -> bool {
    c == ' ' || c == '\t' || c == '\r'
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_name_continue(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// At most 40 characters of `s`, for error messages about untrusted text.
fn excerpt(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// A position in one line. Only ever advances over ASCII bytes or to the end, so every
/// `pos` it slices at is a char boundary.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
    line: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn err(&self, what: impl Into<String>) -> ParseError {
        ParseError::Syntax {
            line: self.line,
            column: self.pos + 1,
            what: what.into(),
        }
    }

    /// Skips blanks and tabs; returns how many were skipped.
    fn skip_blanks(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        self.pos - start
    }

    /// Everything up to the next blank or the end of the line.
    fn token(&mut self) -> &'a str {
        let start = self.pos;
        while !matches!(self.peek(), None | Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        &self.s[start..self.pos]
    }

    fn describe_next(&self) -> String {
        match self.rest().chars().next() {
            Some(c) => format!("{c:?}"),
            None => "end of line".to_string(),
        }
    }

    fn metric_name(&mut self) -> Result<&'a str, ParseError> {
        let start = self.pos;
        match self.peek() {
            Some(b) if is_name_start(b) || b == b':' => self.pos += 1,
            _ => {
                return Err(self.err(format!(
                    "expected a metric name, found {}",
                    self.describe_next()
                )))
            }
        }
        while matches!(self.peek(), Some(b) if is_name_continue(b) || b == b':') {
            self.pos += 1;
        }
        Ok(&self.s[start..self.pos])
    }

    fn label_name(&mut self) -> Result<&'a str, ParseError> {
        let start = self.pos;
        match self.peek() {
            Some(b) if is_name_start(b) => self.pos += 1,
            _ => {
                return Err(self.err(format!(
                    "expected a label name, found {}",
                    self.describe_next()
                )))
            }
        }
        while matches!(self.peek(), Some(b) if is_name_continue(b)) {
            self.pos += 1;
        }
        Ok(&self.s[start..self.pos])
    }

    /// A quoted label value; borrowed unless it holds escapes.
    fn label_value(&mut self) -> Result<Cow<'a, str>, ParseError> {
        if self.peek() != Some(b'"') {
            return Err(self.err(format!(
                "expected '\"' to open a label value, found {}",
                self.describe_next()
            )));
        }
        self.pos += 1;
        let start = self.pos;
        let mut owned: Option<String> = None;
        let mut chunk = start;
        loop {
            match self.peek() {
                None => return Err(self.err("label value is not closed with '\"'")),
                Some(b'"') => {
                    let tail = &self.s[chunk..self.pos];
                    self.pos += 1;
                    return Ok(match owned {
                        None => Cow::Borrowed(tail),
                        Some(mut s) => {
                            s.push_str(tail);
                            Cow::Owned(s)
                        }
                    });
                }
                Some(b'\\') => {
                    let unescaped =
                        match self.s.as_bytes().get(self.pos + 1) {
                            Some(b'\\') => '\\',
                            Some(b'"') => '"',
                            Some(b'n') => '\n',
                            _ => return Err(self.err(
                                "bad escape in label value (only \\\\, \\\" and \\n are allowed)",
                            )),
                        };
                    let s = owned.get_or_insert_with(String::new);
                    s.push_str(&self.s[chunk..self.pos]);
                    s.push(unescaped);
                    self.pos += 2;
                    chunk = self.pos;
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    fn labels(&mut self) -> Result<Vec<Label<'a>>, ParseError> {
        // Caller has seen '{'.
        self.pos += 1;
        let mut labels: Vec<Label<'a>> = Vec::new();
        self.skip_blanks();
        loop {
            if self.peek() == Some(b'}') {
                self.pos += 1;
                return Ok(labels);
            }
            let name_pos = self.pos;
            let name = self.label_name()?;
            self.skip_blanks();
            if self.peek() != Some(b'=') {
                return Err(self.err(format!(
                    "expected '=' after label name {name:?}, found {}",
                    self.describe_next()
                )));
            }
            self.pos += 1;
            self.skip_blanks();
            let value = self.label_value()?;
            if labels.iter().any(|l| l.name == name) {
                self.pos = name_pos;
                return Err(self.err(format!("label {name:?} appears twice")));
            }
            labels.push(Label { name, value });
            self.skip_blanks();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_blanks();
                }
                Some(b'}') => {}
                None => return Err(self.err("label set is not closed with '}'")),
                Some(_) => {
                    return Err(self.err(format!(
                        "expected ',' or '}}' after a label value, found {}",
                        self.describe_next()
                    )))
                }
            }
        }
    }

    fn sample(&mut self) -> Result<Sample<'a>, ParseError> {
        let name = self.metric_name()?;
        let blanks = self.skip_blanks();
        let labels = if self.peek() == Some(b'{') {
            let labels = self.labels()?;
            self.skip_blanks();
            labels
        } else {
            if blanks == 0 && !self.at_end() {
                return Err(self.err(format!(
                    "unexpected {} in metric name {name:?}",
                    self.describe_next()
                )));
            }
            Vec::new()
        };
        let value_pos = self.pos;
        let value_text = self.token();
        if value_text.is_empty() {
            return Err(self.err(format!("sample {name:?} has no value")));
        }
        let value = parse_value(value_text).ok_or_else(|| {
            self.pos = value_pos;
            self.err(format!("value {} is not a number", excerpt(value_text)))
        })?;
        self.skip_blanks();
        let timestamp_ms = if self.at_end() {
            None
        } else {
            let ts_pos = self.pos;
            let ts_text = self.token();
            let ts = ts_text.parse::<i64>().map_err(|_| {
                self.pos = ts_pos;
                self.err(format!(
                    "timestamp {} is not an integer of milliseconds",
                    excerpt(ts_text)
                ))
            })?;
            self.skip_blanks();
            if !self.at_end() {
                return Err(self.err(format!(
                    "unexpected text after the timestamp: {}",
                    excerpt(self.rest())
                )));
            }
            Some(ts)
        };
        Ok(Sample {
            name,
            labels,
            value,
            timestamp_ms,
        })
    }

    /// `# HELP name text`, `# TYPE name type`, or any other comment (ignored).
    fn comment(&mut self) -> Result<(), ParseError> {
        // Caller has seen '#'.
        self.pos += 1;
        if self.skip_blanks() == 0 {
            return Ok(());
        }
        let keyword = self.token();
        if keyword != "HELP" && keyword != "TYPE" {
            return Ok(());
        }
        if self.skip_blanks() == 0 {
            return Err(self.err(format!("# {keyword} line has no metric name")));
        }
        let name = self.metric_name()?;
        if !matches!(self.peek(), None | Some(b' ' | b'\t')) {
            return Err(self.err(format!(
                "unexpected {} in metric name {name:?}",
                self.describe_next()
            )));
        }
        if keyword == "HELP" {
            // The docstring is free text; nothing downstream reads it.
            return Ok(());
        }
        self.skip_blanks();
        let type_pos = self.pos;
        let kind = self.token();
        if !KNOWN_TYPES.contains(&kind) {
            self.pos = type_pos;
            return Err(self.err(format!(
                "# TYPE for {name:?} names type {} (known: {})",
                excerpt(kind),
                KNOWN_TYPES.join(", ")
            )));
        }
        self.skip_blanks();
        if !self.at_end() {
            return Err(self.err(format!(
                "unexpected text after the type: {}",
                excerpt(self.rest())
            )));
        }
        Ok(())
    }
}

/// A sample value as the format spells it: Go float syntax, `NaN`, `+Inf`, `-Inf`.
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        // Rust's float syntax is close to Go's; refuse the spellings only Rust allows
        // ("infinity", lower-case "nan") so two parsers never disagree about a page.
        _ if s
            .bytes()
            .any(|b| b.is_ascii_alphabetic() && b != b'e' && b != b'E') =>
        {
            None
        }
        _ => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax_line(err: ParseError) -> (usize, String) {
        match err {
            ParseError::Syntax { line, what, .. } => (line, what),
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn parses_help_type_and_colon_names() {
        let page = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
                    # TYPE vllm:num_requests_waiting gauge\n\
                    vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 4.0\n";
        let s = parse(page).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "vllm:num_requests_waiting");
        assert_eq!(s[0].label("engine"), Some("0"));
        assert_eq!(s[0].label("model_name"), Some("m"));
        assert_eq!(s[0].label("missing"), None);
        assert_eq!(s[0].value, 4.0);
        assert_eq!(s[0].timestamp_ms, None);
    }

    #[test]
    fn unescapes_label_values() {
        let s = parse(r#"m{a="x\\y",b="say \"hi\"",c="l1\nl2",d=""} 1"#).unwrap();
        assert_eq!(s[0].label("a"), Some(r"x\y"));
        assert_eq!(s[0].label("b"), Some(r#"say "hi""#));
        assert_eq!(s[0].label("c"), Some("l1\nl2"));
        assert_eq!(s[0].label("d"), Some(""));
        assert!(matches!(s[0].labels[3].value, Cow::Borrowed(_)));
    }

    #[test]
    fn special_values_and_timestamps() {
        let s = parse("a NaN\nb +Inf\nc -Inf 1700000000000\nd 1.5e-3 -5\ne Inf\n").unwrap();
        assert!(s[0].value.is_nan());
        assert_eq!(s[1].value, f64::INFINITY);
        assert_eq!(s[2].value, f64::NEG_INFINITY);
        assert_eq!(s[2].timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(s[3].value, 0.0015);
        assert_eq!(s[3].timestamp_ms, Some(-5));
        assert_eq!(s[4].value, f64::INFINITY);
    }

    #[test]
    fn tolerates_crlf_blank_lines_whitespace_and_trailing_comma() {
        let page = "\r\n  \n# TYPE x counter\r\n\tx_total{a = \"1\" , b=\"2\",}   7  \r\n\n\
                    y{} 1\ny\t2\n# just a comment\n#\n";
        let s = parse(page).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "x_total");
        assert_eq!(s[0].value, 7.0);
        assert_eq!(s[0].labels.len(), 2);
        assert!(s[1].labels.is_empty());
        assert_eq!(s[2].value, 2.0);
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let cases: &[(&str, usize, &str)] = &[
            ("ok 1\nbad-name 1\n", 2, "unexpected '-'"),
            ("m{a=\"1\"\n", 1, "label set is not closed"),
            ("m{a=\"1} 2\n", 1, "not closed"),
            ("m{a=1} 2\n", 1, "expected '\"'"),
            ("m{a=\"\\t\"} 2\n", 1, "bad escape"),
            ("m{a=\"1\",a=\"2\"} 2\n", 1, "appears twice"),
            ("m{1a=\"1\"} 2\n", 1, "expected a label name"),
            ("\n\nm\n", 3, "has no value"),
            ("m abc\n", 1, "not a number"),
            ("m infinity\n", 1, "not a number"),
            ("m 1 12.5\n", 1, "timestamp"),
            ("m 1 2 3\n", 1, "after the timestamp"),
            ("# TYPE m gauges\n", 1, "names type"),
            ("# TYPE m gauge extra\n", 1, "after the type"),
            ("# HELP\n", 1, "no metric name"),
            ("# TYPE 9m gauge\n", 1, "expected a metric name"),
            ("{a=\"b\"} 1\n", 1, "expected a metric name"),
        ];
        for (page, line, needle) in cases {
            let (got_line, what) = syntax_line(parse(page).unwrap_err());
            assert_eq!(got_line, *line, "page {page:?}: {what}");
            assert!(
                what.contains(needle),
                "page {page:?}: {what:?} lacks {needle:?}"
            );
        }
    }

    #[test]
    fn error_message_shows_line_and_column() {
        let err = parse("good 1\nm{a=\"x\"} nope\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 2, column 10: value \"nope\" is not a number"
        );
    }

    #[test]
    fn refuses_oversized_pages() {
        let page = "#".repeat(MAX_PAGE_BYTES + 1);
        assert_eq!(
            parse(&page).unwrap_err(),
            ParseError::PageTooLarge {
                size: MAX_PAGE_BYTES + 1,
                limit: MAX_PAGE_BYTES
            }
        );
    }

    #[test]
    fn refuses_pages_with_too_many_samples() {
        let page = "a 1\n".repeat(MAX_SAMPLES + 1);
        assert_eq!(
            parse(&page).unwrap_err(),
            ParseError::TooManySamples {
                line: MAX_SAMPLES + 1,
                limit: MAX_SAMPLES
            }
        );
        assert_eq!(
            parse(&"a 1\n".repeat(MAX_SAMPLES)).unwrap().len(),
            MAX_SAMPLES
        );
    }

    #[test]
    fn long_garbage_is_excerpted_in_errors() {
        let page = format!("m {}\n", "x".repeat(10_000));
        let msg = parse(&page).unwrap_err().to_string();
        assert!(msg.len() < 200, "{msg}");
    }

    #[test]
    fn non_ascii_in_label_values_is_kept_and_elsewhere_rejected() {
        let s = parse("m{a=\"héllo ✓\"} 1\n").unwrap();
        assert_eq!(s[0].label("a"), Some("héllo ✓"));
        assert!(parse("mé 1\n").is_err());
        assert!(parse("m{é=\"1\"} 1\n").is_err());
        assert!(parse("m 1é\n").is_err());
    }
}

//! Token usage from model-server responses, for the picker's metrics.
//!
//! A non-streaming response carries `usage` in its JSON; a streaming one in the `data:` line
//! of an SSE event (vLLM sends it in the last chunk when `stream_options.include_usage` is
//! set). Both the Chat/Completions names (`prompt_tokens`, `completion_tokens`,
//! `prompt_tokens_details.cached_tokens`) and the Responses names (`input_tokens`,
//! `output_tokens`, `input_tokens_details.cached_tokens`) are read.

use serde::Deserialize;

/// Token counts of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
}

#[derive(Deserialize)]
struct Envelope {
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    #[serde(alias = "prompt_token_details", alias = "input_tokens_details")]
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

/// Usage from one JSON document, if it has a non-null `usage` object.
pub fn from_json(doc: &[u8]) -> Option<Usage> {
    let env: Envelope = serde_json::from_slice(doc).ok()?;
    let u = env.usage?;
    Some(Usage {
        prompt_tokens: u.prompt_tokens.or(u.input_tokens).unwrap_or(0),
        completion_tokens: u.completion_tokens.or(u.output_tokens).unwrap_or(0),
        cached_tokens: u
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0),
    })
}

/// Incremental reader of an SSE stream: feed chunks as they pass, read the last usage seen.
#[derive(Debug, Default)]
pub struct SseUsage {
    line: Vec<u8>,
    pub usage: Option<Usage>,
    /// Lines longer than this are skipped rather than buffered (usage lines are short).
    overflow: bool,
}

const MAX_LINE: usize = 1 << 20;

impl SseUsage {
    pub fn feed(&mut self, chunk: &[u8]) {
        for part in chunk.split_inclusive(|&b| b == b'\n') {
            let complete = part.ends_with(b"\n");
            if !self.overflow {
                if self.line.len() + part.len() > MAX_LINE {
                    self.overflow = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            if complete {
                if !self.overflow {
                    self.take_line();
                }
                self.line.clear();
                self.overflow = false;
            }
        }
    }

    /// Treat whatever is buffered as a final line (stream ended without a newline).
    pub fn finish(&mut self) {
        if !self.overflow && !self.line.is_empty() {
            self.take_line();
        }
        self.line.clear();
    }

    fn take_line(&mut self) {
        let line = self.line.trim_ascii();
        if let Some(data) = line.strip_prefix(b"data:") {
            let data = data.trim_ascii();
            // Cheap pre-check: only parse lines that mention usage.
            if data.starts_with(b"{") && memfind(data, b"\"usage\"") {
                if let Some(u) = from_json(data) {
                    self.usage = Some(u);
                }
            }
        }
    }
}

fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_with_cached_tokens() {
        let body = br#"{"id":"x","model":"m","usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":8}}}"#;
        assert_eq!(
            from_json(body),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 5,
                cached_tokens: 8
            })
        );
    }

    #[test]
    fn responses_api_names_are_read() {
        let body = br#"{"usage":{"input_tokens":3,"output_tokens":4,"input_tokens_details":{"cached_tokens":1}}}"#;
        assert_eq!(
            from_json(body),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                cached_tokens: 1
            })
        );
    }

    #[test]
    fn null_usage_or_garbage_gives_none() {
        assert_eq!(from_json(br#"{"usage":null}"#), None);
        assert_eq!(from_json(b"not json"), None);
    }

    #[test]
    fn sse_usage_split_across_chunks() {
        let stream = b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        for cut in [1, 10, 30, 60, 90, stream.len() - 1] {
            let mut s = SseUsage::default();
            s.feed(&stream[..cut]);
            s.feed(&stream[cut..]);
            s.finish();
            assert_eq!(
                s.usage,
                Some(Usage {
                    prompt_tokens: 7,
                    completion_tokens: 2,
                    cached_tokens: 0
                }),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn sse_crlf_lines_are_read() {
        let mut s = SseUsage::default();
        s.feed(b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\r\n\r\n");
        assert_eq!(s.usage.map(|u| u.prompt_tokens), Some(1));
    }
}

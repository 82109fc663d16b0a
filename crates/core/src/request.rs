//! What the scheduler knows about one request: the API it calls, the model it names, its
//! priority, the text used for prefix matching, and the gateway's hints.
//!
//! The OpenAI body is parsed once, borrowing from the bytes the gateway sent, so a large
//! prompt is never copied or re-encoded here. The model's byte span is kept so a rewrite can
//! splice the new name into the original bytes.

use std::net::SocketAddr;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The OpenAI-style API a request targets, from the suffix of its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    Completions,
    ChatCompletions,
    Responses,
    Conversations,
    Embeddings,
}

impl ApiKind {
    /// Classify by path suffix, ignoring any query string; unknown paths count as completions.
    pub fn from_path(path: &str) -> ApiKind {
        let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            ApiKind::ChatCompletions
        } else if path.ends_with("/responses") {
            ApiKind::Responses
        } else if path.ends_with("/conversations") {
            ApiKind::Conversations
        } else if path.ends_with("/embeddings") {
            ApiKind::Embeddings
        } else {
            ApiKind::Completions
        }
    }
}

/// Why a request body cannot be scheduled; every variant is a client error (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("request body is not valid JSON: {0}")]
    Json(String),
    #[error("request body must be a JSON object")]
    NotObject,
    #[error("request body has no \"model\" field; name the model to call")]
    MissingModel,
    #[error("\"model\" must be a non-empty string")]
    BadModel,
    #[error("request body has no \"{0}\" field, which this API requires")]
    MissingField(&'static str),
}

/// The parts of an OpenAI request body the picker uses, borrowed from the original bytes.
#[derive(Debug, Clone)]
pub struct ParsedBody<'a> {
    pub model: String,
    /// Byte range of the model's JSON string literal (quotes included) in the body.
    pub model_span: Range<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// The raw JSON of the fields that make up the prompt, in order, for prefix hashing.
    pub prompt_parts: Vec<&'a [u8]>,
    /// Total length of `prompt_parts`, a cheap proxy for prompt size.
    pub prompt_bytes: usize,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    instructions: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    items: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow)]
    stream_options: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Parse an OpenAI request body for `api`.
pub fn parse_body(api: ApiKind, body: &[u8]) -> Result<ParsedBody<'_>, BodyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Err(e) => Err(BodyError::Json(e.to_string())),
            Ok(_) => Err(BodyError::NotObject),
        };
    }
    let f: Fields<'_> = serde_json::from_slice(body).map_err(|e| BodyError::Json(e.to_string()))?;
    let raw_model = f.model.ok_or(BodyError::MissingModel)?;
    let model: String = serde_json::from_str(raw_model.get()).map_err(|_| BodyError::BadModel)?;
    if model.is_empty() {
        return Err(BodyError::BadModel);
    }
    let model_span = span_of(body, raw_model.get().as_bytes());

    let parts: Vec<Option<&RawValue>> = match api {
        ApiKind::ChatCompletions => {
            vec![Some(f.messages.ok_or(BodyError::MissingField("messages"))?)]
        }
        ApiKind::Completions => vec![Some(f.prompt.ok_or(BodyError::MissingField("prompt"))?)],
        ApiKind::Embeddings => vec![Some(f.input.ok_or(BodyError::MissingField("input"))?)],
        ApiKind::Responses => {
            if f.input.is_none() {
                return Err(BodyError::MissingField("input"));
            }
            vec![f.instructions, f.tools, f.input]
        }
        ApiKind::Conversations => vec![f.items],
    };
    let prompt_parts: Vec<&[u8]> = parts
        .into_iter()
        .flatten()
        .map(|r| r.get().as_bytes())
        .collect();
    let prompt_bytes = prompt_parts.iter().map(|p| p.len()).sum();
    let include_usage = f
        .stream_options
        .and_then(|r| serde_json::from_str::<StreamOptions>(r.get()).ok())
        .is_some_and(|o| o.include_usage);
    Ok(ParsedBody {
        model,
        model_span,
        stream: f.stream.unwrap_or(false),
        include_usage,
        prompt_parts,
        prompt_bytes,
    })
}

/// Byte range of `inner` within `outer`; `inner` must be a sub-slice of `outer`.
fn span_of(outer: &[u8], inner: &[u8]) -> Range<usize> {
    let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
    start..start + inner.len()
}

/// The body with the model name replaced, every other byte kept as sent.
pub fn splice_model(body: &[u8], span: Range<usize>, new_model: &str) -> Vec<u8> {
    let lit = serde_json::to_string(new_model).unwrap_or_else(|_| String::from("\"\""));
    let mut out = Vec::with_capacity(body.len() + lit.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(lit.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    out
}

/// A rough token count from a byte length: about four characters per token, the same
/// approximation the prefix index uses for block sizes.
pub fn approx_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

/// Everything the scheduler needs about a request, independent of how it arrived.
#[derive(Debug, Clone, Default)]
pub struct SchedulingRequest<'a> {
    /// Model after rewrite: the one the endpoint will serve (and the LoRA adapter, if any).
    pub target_model: String,
    pub priority: i32,
    /// Raw prompt pieces for prefix hashing; empty when there was no body.
    pub prompt_parts: Vec<&'a [u8]>,
    pub prompt_tokens: u64,
    /// Gateway subset hint: pick only among these, if present.
    pub subset: Option<Vec<SocketAddr>>,
    /// Conformance hook (`test-epp-endpoint-selection`), honoured only when its filter is
    /// configured.
    pub test_selection: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_body_yields_model_span_and_messages() {
        let body =
            br#"{"model": "llama", "messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        let p = parse_body(ApiKind::ChatCompletions, body).unwrap();
        assert_eq!(p.model, "llama");
        assert_eq!(&body[p.model_span.clone()], br#""llama""#);
        assert!(p.stream);
        assert_eq!(
            p.prompt_parts,
            vec![&br#"[{"role":"user","content":"hi"}]"#[..]]
        );
    }

    #[test]
    fn missing_model_is_a_clear_error() {
        let e = parse_body(ApiKind::Completions, br#"{"prompt":"x"}"#).unwrap_err();
        assert_eq!(e, BodyError::MissingModel);
        assert!(e.to_string().contains("no \"model\""));
    }

    #[test]
    fn malformed_json_reports_position() {
        let e = parse_body(ApiKind::Completions, br#"{"model": "m", "prompt": }"#).unwrap_err();
        assert!(
            matches!(e, BodyError::Json(ref m) if m.contains("column")),
            "{e}"
        );
    }

    #[test]
    fn non_object_body_is_rejected() {
        assert_eq!(
            parse_body(ApiKind::Completions, b"[1,2]").unwrap_err(),
            BodyError::NotObject
        );
        assert!(matches!(
            parse_body(ApiKind::Completions, b"").unwrap_err(),
            BodyError::Json(_)
        ));
    }

    #[test]
    fn completions_require_prompt_and_chat_requires_messages() {
        assert_eq!(
            parse_body(ApiKind::Completions, br#"{"model":"m"}"#).unwrap_err(),
            BodyError::MissingField("prompt")
        );
        assert_eq!(
            parse_body(ApiKind::ChatCompletions, br#"{"model":"m","prompt":"x"}"#).unwrap_err(),
            BodyError::MissingField("messages")
        );
    }

    #[test]
    fn splice_changes_only_the_model() {
        let body = br#"{"prompt":"a \"model\": b","model" : "old\u0041","max_tokens":3}"#;
        let p = parse_body(ApiKind::Completions, body).unwrap();
        assert_eq!(p.model, "oldA");
        let out = splice_model(body, p.model_span, "new-\"x\"");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"prompt":"a \"model\": b","model" : "new-\"x\"","max_tokens":3}"#
        );
    }

    #[test]
    fn include_usage_is_read() {
        let body =
            br#"{"model":"m","prompt":"x","stream":true,"stream_options":{"include_usage":true}}"#;
        assert!(
            parse_body(ApiKind::Completions, body)
                .unwrap()
                .include_usage
        );
    }

    #[test]
    fn api_kind_from_path() {
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions?x=1"),
            ApiKind::ChatCompletions
        );
        assert_eq!(ApiKind::from_path("/v1/completions"), ApiKind::Completions);
        assert_eq!(ApiKind::from_path("/v1/embeddings"), ApiKind::Embeddings);
        assert_eq!(ApiKind::from_path("/v1/responses"), ApiKind::Responses);
        assert_eq!(ApiKind::from_path("/other"), ApiKind::Completions);
    }
}

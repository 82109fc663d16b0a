//! The OpenAI API as vLLM serves it: `/v1/completions`, `/v1/chat/completions` (whole or
//! streamed as server-sent events), `/v1/models`, and vLLM's LoRA adapter endpoints.
//!
//! Prompts are counted with [`tokens::tokenize`](crate::tokens::tokenize) (token-id prompts
//! exactly); a chat message costs its content plus 4 tokens of template, and the prompt one
//! more for the assistant header. Generated text is filler: token `i` of a request is a word
//! of [`WORDS`] picked by a hash of the request's seed and `i`, so every token is one token.

use std::collections::VecDeque;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use rand::Rng as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use xxhash_rust::xxh64::xxh64;

use crate::engine::{Finished, Output, RequestId, SimRequest};
use crate::tokens::{tokenize_into, Prompt, WORDS};

use super::{json as json_response, read_body, text, Body, BoxError, Shared};

/// Which endpoint a generation request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
}

/// An error in vLLM's shape: `{"object":"error","message","type","param","code"}`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    let kind = match status.as_u16() {
        400 => "BadRequestError",
        404 => "NotFoundError",
        405 => "MethodNotAllowed",
        413 => "RequestEntityTooLarge",
        429 => "TooManyRequests",
        500 => "InternalServerError",
        503 => "ServiceUnavailableError",
        _ => "Error",
    };
    json_response(
        status,
        &json!({"object": "error", "message": message, "type": kind, "param": null, "code": status.as_u16()}),
    )
}

/// The fields of a completion or chat request the simulator acts on; the rest are ignored.
#[derive(Deserialize)]
struct GenerateBody {
    model: Option<String>,
    prompt: Option<Value>,
    messages: Option<Value>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    ignore_eos: Option<bool>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Token ids of a completions `prompt`: a string, one string in an array, or token ids.
fn prompt_ids(prompt: &Value) -> Result<Vec<u32>, String> {
    let ids = |items: &[Value]| -> Result<Vec<u32>, String> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        format!("prompt token ids must be non-negative integers, found {v}")
                    })
            })
            .collect()
    };
    match prompt {
        Value::String(s) => Ok(crate::tokens::tokenize(s)),
        Value::Array(items) => match items.first() {
            None => Err("prompt must not be an empty array.".into()),
            Some(Value::Number(_)) => ids(items),
            Some(_) if items.len() > 1 => Err(format!(
                "prompt holds {} prompts; the simulator serves one prompt per request.",
                items.len()
            )),
            Some(Value::String(s)) => Ok(crate::tokens::tokenize(s)),
            Some(Value::Array(inner)) => ids(inner),
            Some(other) => Err(format!(
                "prompt must be a string, an array of strings or token ids, found {other}"
            )),
        },
        other => Err(format!(
            "prompt must be a string, an array of strings or token ids, found {other}"
        )),
    }
}

/// Token ids of chat `messages`: each message's text plus 4 template tokens, plus 1.
fn chat_ids(messages: &Value) -> Result<Vec<u32>, String> {
    let Some(list) = messages.as_array().filter(|l| !l.is_empty()) else {
        return Err("messages must be a non-empty array.".into());
    };
    // Stand-ins for the chat template's special tokens; only their count and order matter.
    const START: u32 = 128_000;
    const END_HEADER: u32 = 128_001;
    const END_TURN: u32 = 128_002;
    let mut ids = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("messages[{i}].role must be a string."))?;
        ids.extend([START, xxh64(role.as_bytes(), 0) as u32, END_HEADER]);
        match m.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => tokenize_into(s, &mut ids),
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        tokenize_into(t, &mut ids);
                    }
                }
            }
            Some(other) => {
                return Err(format!(
                    "messages[{i}].content must be a string or an array of parts, found {other}"
                ))
            }
        }
        ids.push(END_TURN);
    }
    ids.push(START); // the assistant header the template appends
    Ok(ids)
}

/// The filler word for token `index` of the request seeded `seed`.
fn word(seed: u64, index: u32) -> &'static str {
    WORDS[(xxh64(&index.to_le_bytes(), seed) % WORDS.len() as u64) as usize]
}

/// A request the engine holds: aborts it when dropped unless it finished first, so a
/// client that goes away frees its batch slot and KV blocks at once.
struct InFlight {
    shared: Arc<Shared>,
    id: RequestId,
    finished: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut core = self.shared.core.lock();
        core.streams.remove(&self.id);
        core.engine.abort(self.id);
        drop(core);
        self.shared.wake.notify_one();
    }
}

/// What every chunk and the final body of one request share.
struct Meta {
    api: Api,
    id: String,
    created: u64,
    model: String,
    seed: u64,
}

fn usage(f: &Finished) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    })
}

pub(crate) async fn generate(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    api: Api,
) -> Response<Body> {
    let body = match read_body(req, shared.cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let body: GenerateBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("Invalid request body: {e}"),
            )
        }
    };

    let served = &shared.cfg.served_model_name;
    let model = body.model.clone().unwrap_or_else(|| served.clone());
    let lora: Option<Arc<str>> = if &model == served {
        None
    } else if shared.adapters.lock().iter().any(|(n, _)| *n == model) {
        Some(model.as_str().into())
    } else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist."),
        );
    };

    let ids = match api {
        Api::Completions => match &body.prompt {
            Some(p) => prompt_ids(p),
            None => Err("prompt is required.".into()),
        },
        Api::Chat => match &body.messages {
            Some(m) => chat_ids(m),
            None => Err("messages is required.".into()),
        },
    };
    let ids = match ids {
        Ok(ids) => ids,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let prompt_len = ids.len() as u32;
    let max_model_len = shared.cfg.engine.max_model_len;
    let max_tokens = body
        .max_completion_tokens
        .or(body.max_tokens)
        .unwrap_or_else(|| max_model_len.saturating_sub(prompt_len).max(1));
    if max_tokens == 0 {
        return error(
            StatusCode::BAD_REQUEST,
            "max_tokens must be at least 1, got 0.",
        );
    }
    if let Some(msg) = shared
        .core
        .lock()
        .engine
        .check_length(prompt_len, max_tokens)
    {
        return error(StatusCode::BAD_REQUEST, &msg);
    }

    let faults = shared.faults.lock().clone();
    if faults.error_rate > 0.0 && shared.fault_rng.lock().random::<f64>() < faults.error_rate {
        shared.count_fault("error");
        let status =
            StatusCode::from_u16(faults.error_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(
            status,
            &format!(
                "Injected fault: error_rate {} gives status {}.",
                faults.error_rate,
                status.as_u16()
            ),
        );
    }
    if faults.hang {
        shared.count_fault("hang");
        return std::future::pending().await;
    }
    if faults.added_latency_ms > 0 {
        shared.count_fault("latency");
        tokio::time::sleep(Duration::from_millis(faults.added_latency_ms)).await;
    }

    let request = SimRequest {
        prompt: Prompt::from_ids(&ids, shared.cfg.engine.block_size),
        max_tokens,
        ignore_eos: body.ignore_eos.unwrap_or(false),
        lora,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let id = {
        let mut core = shared.core.lock();
        // Checked again under the lock: an adapter may have been unloaded meanwhile, but the
        // length limits cannot change, so this only guards against a clamped request.
        if let Some(msg) = core.engine.check_length(prompt_len, max_tokens) {
            return error(StatusCode::BAD_REQUEST, &msg);
        }
        let id = core.engine.add(request, shared.now());
        core.streams.insert(id, tx);
        id
    };
    shared.wake.notify_one();
    let guard = InFlight {
        shared: shared.clone(),
        id,
        finished: false,
    };
    let meta = Meta {
        api,
        id: format!(
            "{}-{:016x}{:016x}",
            if api == Api::Chat { "chatcmpl" } else { "cmpl" },
            xxh64(&id.to_le_bytes(), shared.cfg.seed),
            shared.started_unix ^ id
        ),
        created: super::unix_now(),
        model,
        seed: xxh64(&id.to_le_bytes(), shared.cfg.seed ^ 0x5eed),
    };

    if body.stream.unwrap_or(false) {
        let include_usage = body
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let stream = TokenStream {
            rx,
            guard,
            meta,
            include_usage,
            drop_after: faults.drop_after_tokens,
            sent: 0,
            cut: None,
            started: false,
            tail: VecDeque::new(),
            done: false,
            head: String::new(),
        };
        let stream = stream.with_head();
        let mut resp = Response::new(stream.boxed());
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        return resp;
    }
    whole(rx, guard, meta).await
}

/// Waits for every token and answers with one JSON body.
async fn whole(
    mut rx: mpsc::UnboundedReceiver<Output>,
    mut guard: InFlight,
    meta: Meta,
) -> Response<Body> {
    let mut content = String::new();
    let finished = loop {
        let Some(out) = rx.recv().await else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "The simulator stopped before the request finished.",
            );
        };
        content.push_str(word(meta.seed, out.token_index));
        if let Some(f) = out.finished {
            guard.finished = true;
            break f;
        }
    };
    let reason = finished.reason.as_str();
    let choice = match meta.api {
        Api::Completions => json!({
            "index": 0, "text": content, "logprobs": null, "finish_reason": reason,
            "stop_reason": null, "prompt_logprobs": null,
        }),
        Api::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": content, "reasoning_content": null, "tool_calls": []},
            "logprobs": null, "finish_reason": reason, "stop_reason": null,
        }),
    };
    let object = match meta.api {
        Api::Completions => "text_completion",
        Api::Chat => "chat.completion",
    };
    json_response(
        StatusCode::OK,
        &json!({
            "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
            "choices": [choice], "usage": usage(&finished),
        }),
    )
}

/// A streamed answer: one SSE event per token, as vLLM sends them.
struct TokenStream {
    rx: mpsc::UnboundedReceiver<Output>,
    guard: InFlight,
    meta: Meta,
    include_usage: bool,
    /// The `drop_after_tokens` fault in force when the request arrived.
    drop_after: Option<u32>,
    sent: u32,
    /// The short pause before a `drop_after_tokens` cut.
    cut: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the chat stream's opening `role` chunk went out.
    started: bool,
    /// Events queued after the last token: usage and `[DONE]`.
    tail: VecDeque<Bytes>,
    done: bool,
    /// Every token event's bytes up to the choice's fields, serialised once per stream:
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[{"index":0,`.
    head: String,
}

impl TokenStream {
    fn event(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let object = match self.meta.api {
            Api::Completions => "text_completion",
            Api::Chat => "chat.completion.chunk",
        };
        let mut chunk = json!({
            "id": self.meta.id, "object": object, "created": self.meta.created,
            "model": self.meta.model, "choices": choices,
        });
        if let Some(u) = usage {
            chunk["usage"] = u;
        }
        Bytes::from(format!("data: {chunk}\n\n"))
    }

    fn with_head(mut self) -> Self {
        let object = match self.meta.api {
            Api::Completions => "text_completion",
            Api::Chat => "chat.completion.chunk",
        };
        let q = |s: &str| serde_json::to_string(s).expect("strings serialise");
        self.head = format!(
            "data: {{\"id\":{},\"object\":\"{object}\",\"created\":{},\"model\":{},\"choices\":[{{\"index\":0,",
            q(&self.meta.id),
            self.meta.created,
            q(&self.meta.model)
        );
        self
    }

    /// One token's event, written straight into bytes: this runs for every token of every
    /// stream, and building a `serde_json::Value` for it was the simulator's main cost.
    fn token_event(&self, out: &Output) -> Bytes {
        // The filler words are plain ASCII letters and spaces: no JSON escaping needed.
        let w = word(self.meta.seed, out.token_index);
        let reason = match out.finished {
            Some(f) => ["\"", f.reason.as_str(), "\""].concat(),
            None => "null".to_owned(),
        };
        let mut b = String::with_capacity(self.head.len() + 96);
        b.push_str(&self.head);
        match self.meta.api {
            Api::Completions => {
                b.push_str("\"text\":\"");
                b.push_str(w);
                b.push_str("\",\"logprobs\":null,\"finish_reason\":");
                b.push_str(&reason);
                b.push_str(",\"stop_reason\":null}]}\n\n");
            }
            Api::Chat => {
                b.push_str("\"delta\":{\"content\":\"");
                b.push_str(w);
                b.push_str("\"},\"logprobs\":null,\"finish_reason\":");
                b.push_str(&reason);
                b.push_str("}]}\n\n");
            }
        }
        Bytes::from(b)
    }
}

impl hyper::body::Body for TokenStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.drop_after.is_some_and(|n| this.sent >= n) && !(this.done && this.tail.is_empty()) {
            // Let hyper flush the tokens already written before the connection goes, so the
            // client sees exactly `n` tokens and then a broken stream.
            let cut = this
                .cut
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(20))));
            if cut.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.drop_after = None;
            this.guard.shared.count_fault("drop");
            let cut: BoxError = format!(
                "injected fault: connection dropped after {} tokens",
                this.sent
            )
            .into();
            return Poll::Ready(Some(Err(cut)));
        }
        if let Some(b) = this.tail.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        match this.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Some(Err(
                "the simulator stopped before the request finished".into(),
            ))),
            Poll::Ready(Some(out)) => {
                this.sent += 1;
                let event = this.token_event(&out);
                if let Some(f) = out.finished {
                    this.guard.finished = true;
                    this.done = true;
                    if this.include_usage {
                        let u = this.event(json!([]), Some(usage(&f)));
                        this.tail.push_back(u);
                    }
                    this.tail.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                }
                if this.meta.api == Api::Chat && !this.started {
                    // vLLM sends the assistant-role chunk when the first token is ready,
                    // not when the request arrives: a queued request sends nothing.
                    this.started = true;
                    this.tail.push_front(event);
                    let choice = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
                    return Poll::Ready(Some(Ok(Frame::data(this.event(choice, None)))));
                }
                Poll::Ready(Some(Ok(Frame::data(event))))
            }
        }
    }
}

pub(crate) fn models(shared: &Shared) -> Response<Body> {
    let cfg = &shared.cfg;
    let created = shared.started_unix;
    let permission = |id: &str| {
        json!([{
            "id": format!("modelperm-{:016x}", xxh64(id.as_bytes(), 0)), "object": "model_permission",
            "created": created, "allow_create_engine": false, "allow_sampling": true,
            "allow_logprobs": true, "allow_search_indices": false, "allow_view": true,
            "allow_fine_tuning": false, "organization": "*", "group": null, "is_blocking": false,
        }])
    };
    let mut data = vec![json!({
        "id": cfg.served_model_name, "object": "model", "created": created, "owned_by": "vllm",
        "root": cfg.model_root, "parent": null, "max_model_len": cfg.engine.max_model_len,
        "permission": permission(&cfg.served_model_name),
    })];
    for (name, path) in shared.adapters.lock().iter() {
        data.push(json!({
            "id": name, "object": "model", "created": created, "owned_by": "vllm",
            "root": path, "parent": cfg.served_model_name, "max_model_len": null,
            "permission": permission(name),
        }));
    }
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

#[derive(Deserialize)]
struct LoraBody {
    lora_name: Option<String>,
    lora_path: Option<String>,
}

async fn lora_body(req: Request<Incoming>) -> Result<LoraBody, Response<Body>> {
    let body = read_body(req, 1 << 20).await.map_err(|r| *r)?;
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("Invalid request body: {e}"),
        )
    })
}

pub(crate) async fn load_lora(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let body = match lora_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let (Some(name), Some(path)) = (
        body.lora_name.filter(|n| !n.is_empty()),
        body.lora_path.filter(|p| !p.is_empty()),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "Both 'lora_name' and 'lora_path' must be provided.",
        );
    };
    if name == shared.cfg.served_model_name {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("The lora adapter name '{name}' is the base model's name."),
        );
    }
    let mut adapters = shared.adapters.lock();
    if adapters.iter().any(|(n, _)| *n == name) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("The lora adapter '{name}' has already been loaded."),
        );
    }
    adapters.push((name.clone(), path));
    text(
        StatusCode::OK,
        format!("Success: LoRA adapter '{name}' added successfully."),
    )
}

pub(crate) async fn unload_lora(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let body = match lora_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let Some(name) = body.lora_name.filter(|n| !n.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "'lora_name' must be provided.");
    };
    let mut adapters = shared.adapters.lock();
    let Some(pos) = adapters.iter().position(|(n, _)| *n == name) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("The lora adapter '{name}' cannot be found."),
        );
    };
    adapters.remove(pos);
    text(
        StatusCode::OK,
        format!("Success: LoRA adapter '{name}' removed successfully."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_forms_count_as_vllm_would() {
        assert_eq!(prompt_ids(&json!("hello world")).unwrap().len(), 2);
        assert_eq!(prompt_ids(&json!(["hello world"])).unwrap().len(), 2);
        assert_eq!(prompt_ids(&json!([1, 2, 3])).unwrap(), vec![1, 2, 3]);
        assert_eq!(prompt_ids(&json!([[7, 8]])).unwrap(), vec![7, 8]);
        assert!(prompt_ids(&json!(["a", "b"]))
            .unwrap_err()
            .contains("one prompt per request"));
        assert!(prompt_ids(&json!([1, -2])).is_err());
        assert!(prompt_ids(&json!([])).is_err());
        assert!(prompt_ids(&json!(3)).is_err());
    }

    #[test]
    fn chat_counts_content_plus_template() {
        let m = json!([
            {"role": "system", "content": "hello world"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {}}]},
        ]);
        assert_eq!(chat_ids(&m).unwrap().len(), 2 + 1 + 2 * 4 + 1);
        assert!(chat_ids(&json!([{"content": "x"}]))
            .unwrap_err()
            .contains("role"));
        assert!(chat_ids(&json!([])).is_err());
    }
}

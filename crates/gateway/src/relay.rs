//! Response bodies: fixed ones the gateway writes, and the relay of a model server's body.
//!
//! [`Relay`] passes the upstream body on frame by frame as it arrives, never buffering,
//! counting bytes and usage on the way. It owns the request's in-flight guard and its
//! [`Ledger`] (the picker metrics), so whichever way the body ends (end of stream, upstream
//! failure, idle timeout, or the client going away and hyper dropping it) the slot is given
//! back at once, and dropping it drops the upstream body, which closes that connection so
//! the model server aborts the request.

use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use infergate_core::director::InflightGuard;
use infergate_core::usage::{self, SseUsage, Usage};
use infergate_metrics::{ErrorLabels, ModelLabels, RequestLabels, RunningLabels};
use tokio::time::{Instant, Sleep};

use crate::metrics::Reason;
use crate::rename::Rename;
use crate::{fmt_duration, Gateway};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// JSON response bodies larger than this are relayed without reading their usage.
const MAX_USAGE_COPY: usize = 4 << 20;

/// The body of every response the gateway sends.
pub enum ResponseBody {
    Full(Option<Bytes>),
    Relay(Box<Relay>),
}

impl ResponseBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        ResponseBody::Full(Some(b.into()))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Relay(r) => Pin::new(r.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(b) => b.is_none(),
            ResponseBody::Relay(r) => r.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Relay(r) => r.size_hint(),
        }
    }
}

/// One scheduled request's share of the picker metrics, from decision to end.
///
/// Counts the request (`request_total`, `request_sizes`, `running_requests`) when made, and
/// takes it off `running_requests` when dropped, whatever happened in between.
pub struct Ledger {
    gw: Arc<Gateway>,
    labels: ModelLabels,
    decided_at: Duration,
    pub span: tracing::Span,
    pub attempts: u32,
}

impl Ledger {
    pub fn open(
        gw: Arc<Gateway>,
        labels: ModelLabels,
        priority: i32,
        request_bytes: usize,
        decided_at: Duration,
        span: tracing::Span,
    ) -> Ledger {
        let m = &gw.metrics;
        m.request_total
            .get_or_create(&RequestLabels {
                model_name: labels.model_name.clone(),
                target_model_name: labels.target_model_name.clone(),
                priority: priority.to_string(),
            })
            .inc();
        m.request_sizes
            .get_or_create(&labels)
            .observe(request_bytes as f64);
        m.running_requests
            .get_or_create(&RunningLabels {
                model_name: labels.model_name.clone(),
            })
            .inc();
        Ledger {
            gw,
            labels,
            decided_at,
            span,
            attempts: 1,
        }
    }

    /// Count an error under `error_code` (the picker's `request_error_total`).
    pub fn error(&self, error_code: String) {
        self.gw
            .metrics
            .request_error_total
            .get_or_create(&ErrorLabels {
                model_name: self.labels.model_name.clone(),
                target_model_name: self.labels.target_model_name.clone(),
                error_code,
            })
            .inc();
    }

    /// The response ended: latency, size, time to first byte and usage, as the picker does.
    fn finish(&self, bytes: u64, first_byte_at: Option<Duration>, usage: Option<Usage>) -> f64 {
        let m = &self.gw.metrics;
        let e2e = (self.gw.clock)()
            .saturating_sub(self.decided_at)
            .as_secs_f64();
        m.request_duration_seconds
            .get_or_create(&self.labels)
            .observe(e2e);
        m.response_sizes
            .get_or_create(&self.labels)
            .observe(bytes as f64);
        if let Some(t) = first_byte_at {
            m.request_ttft_seconds
                .get_or_create(&self.labels)
                .observe(t.saturating_sub(self.decided_at).as_secs_f64());
        }
        if let Some(u) = usage {
            m.input_tokens
                .get_or_create(&self.labels)
                .observe(u.prompt_tokens as f64);
            m.output_tokens
                .get_or_create(&self.labels)
                .observe(u.completion_tokens as f64);
            m.prompt_cached_tokens
                .get_or_create(&self.labels)
                .observe(u.cached_tokens as f64);
            if u.completion_tokens > 0 {
                m.normalized_time_per_output_token_seconds
                    .get_or_create(&self.labels)
                    .observe(e2e / u.completion_tokens as f64);
            }
        }
        e2e
    }

    pub fn elapsed(&self) -> Duration {
        (self.gw.clock)().saturating_sub(self.decided_at)
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.gw
            .metrics
            .running_requests
            .get_or_create(&RunningLabels {
                model_name: self.labels.model_name.clone(),
            })
            .dec();
    }
}

enum UsageReader {
    Sse(SseUsage),
    /// A bounded copy of a JSON body; `None` once it outgrew the bound.
    Json(Option<Vec<u8>>),
}

/// How the relayed stream ended, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    UpstreamFailed,
    ClientGone,
}

/// The upstream body on its way to the client.
pub struct Relay {
    upstream: Option<Incoming>,
    /// The frame read before the response was committed (see `proxy`), sent first.
    first: Option<Frame<Bytes>>,
    endpoint: SocketAddr,
    status: u16,
    usage: UsageReader,
    bytes: u64,
    first_byte_at: Option<Duration>,
    /// Last two bytes sent, to start a clean SSE event after a cut mid-line.
    last2: [u8; 2],
    idle: Duration,
    idle_sleep: Option<Pin<Box<Sleep>>>,
    last_frame: Instant,
    /// Maps a rewritten model name back in what is sent (`None`: bytes pass unchanged).
    rename: Option<Rename>,
    ended: Option<End>,
    ledger: Option<Ledger>,
    inflight: Option<InflightGuard>,
    gw: Arc<Gateway>,
}

/// What was read of the upstream body before the response was committed.
pub enum Peeked {
    /// The first frame, to send first.
    Frame(Frame<Bytes>),
    /// The body was empty.
    EndOfBody,
    /// Nothing read yet.
    Unread,
}

pub struct RelayParts {
    pub upstream: Incoming,
    pub first: Peeked,
    pub endpoint: SocketAddr,
    pub status: u16,
    pub sse: bool,
    /// `(served, asked)` model names when the model was rewritten.
    pub rename: Option<(String, String)>,
    pub ledger: Option<Ledger>,
    pub inflight: Option<InflightGuard>,
}

impl Relay {
    pub fn new(gw: Arc<Gateway>, p: RelayParts) -> Relay {
        let mut r = Relay {
            upstream: Some(p.upstream),
            first: None,
            endpoint: p.endpoint,
            status: p.status,
            usage: if p.sse {
                UsageReader::Sse(SseUsage::default())
            } else {
                UsageReader::Json(Some(Vec::new()))
            },
            bytes: 0,
            first_byte_at: None,
            last2: [b'\n', b'\n'],
            idle: gw.cfg.idle_stream_timeout,
            idle_sleep: None,
            last_frame: Instant::now(),
            rename: p
                .rename
                .map(|(served, asked)| Rename::new(&served, &asked, p.sse)),
            ended: None,
            ledger: p.ledger,
            inflight: p.inflight,
            gw,
        };
        match p.first {
            Peeked::Frame(frame) => {
                if let Some(d) = frame.data_ref() {
                    r.observe(d);
                    if let Some(rn) = &mut r.rename {
                        let out = rn.push(d);
                        r.first = (!out.is_empty()).then(|| Frame::data(out));
                        return r;
                    }
                }
                r.first = Some(frame);
            }
            Peeked::EndOfBody => r.end(End::Complete),
            Peeked::Unread => {}
        }
        r
    }

    fn observe(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.bytes += data.len() as u64;
        if self.first_byte_at.is_none() {
            let now = (self.gw.clock)();
            self.first_byte_at = Some(now);
            // A stream's first bytes carry its first token: the prefill is done, and the
            // picker learns the endpoint's speed from it (see core::latency).
            if self.is_sse() {
                if let Some(g) = self.inflight.as_mut() {
                    g.first_token(now);
                }
            }
        }
        match data.len() {
            1 => self.last2 = [self.last2[1], data[0]],
            n => self.last2 = [data[n - 2], data[n - 1]],
        }
        match &mut self.usage {
            UsageReader::Sse(s) => s.feed(data),
            UsageReader::Json(copy) => {
                if let Some(buf) = copy {
                    if buf.len() + data.len() <= MAX_USAGE_COPY {
                        buf.extend_from_slice(data);
                    } else {
                        *copy = None;
                    }
                }
            }
        }
    }

    fn is_sse(&self) -> bool {
        matches!(self.usage, UsageReader::Sse(_))
    }

    /// Record the end once: metrics, breaker, log line; release the upstream and the slot.
    fn end(&mut self, how: End) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some(how);
        if how == End::Complete && (200..400).contains(&self.status) {
            self.gw.breakers.on_success(self.endpoint);
        }
        self.upstream = None;
        self.idle_sleep = None;
        self.inflight = None;
        let Some(ledger) = self.ledger.take() else {
            return;
        };
        let _enter = ledger.span.enter();
        let elapsed = ledger.elapsed();
        match how {
            End::Complete => {
                let usage = match &mut self.usage {
                    UsageReader::Sse(s) => {
                        s.finish();
                        s.usage
                    }
                    UsageReader::Json(Some(buf)) => usage::from_json(buf),
                    UsageReader::Json(None) => None,
                };
                ledger.finish(self.bytes, self.first_byte_at, usage);
                self.gw.log_outcome(
                    self.status,
                    Some(self.endpoint),
                    ledger.attempts,
                    elapsed,
                    "complete",
                );
            }
            End::UpstreamFailed => {
                ledger.error("ModelServerStreamError".to_string());
                tracing::warn!(
                    status = self.status,
                    endpoint = %self.endpoint,
                    attempts = ledger.attempts,
                    duration_ms = elapsed.as_millis() as u64,
                    "the model server's stream broke after the response started"
                );
            }
            End::ClientGone => {
                self.gw.log_outcome(
                    self.status,
                    Some(self.endpoint),
                    ledger.attempts,
                    elapsed,
                    "client went away",
                );
            }
        }
    }

    /// The upstream failed mid-body: a final SSE error event, or an error that makes hyper
    /// cut the client's connection (a truncated JSON body must not look complete).
    fn upstream_failed(
        &mut self,
        reason: Reason,
        message: String,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.gw.gw_metrics.failure(reason);
        if let crate::breaker::Verdict::Ejected(for_) = self
            .gw
            .breakers
            .on_failure(self.endpoint, (self.gw.clock)())
        {
            self.gw.ejected(self.endpoint, for_, &message);
        }
        self.end(End::UpstreamFailed);
        if self.is_sse() {
            let (kind, code) = match reason {
                Reason::IdleTimeout => ("upstream_timeout", 504),
                _ => ("upstream_error", 502),
            };
            let event = serde_json::json!({
                "error": {"message": message, "type": kind, "code": code}
            });
            let sep: &[u8] = match self.last2 {
                [b'\n', b'\n'] => b"",
                [_, b'\n'] => b"\n",
                _ => b"\n\n",
            };
            let mut out = Vec::with_capacity(160 + message.len());
            out.extend_from_slice(sep);
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(event.to_string().as_bytes());
            out.extend_from_slice(b"\n\n");
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
        } else {
            Poll::Ready(Some(Err(message.into())))
        }
    }

    /// Whether `idle` has passed since the last upstream frame.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        if self.idle.is_zero() {
            return false;
        }
        let sleep = self
            .idle_sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(self.last_frame + self.idle)));
        // Frames move `last_frame` without touching the timer; it is re-armed only when it
        // fires early, so a busy stream costs no timer updates.
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.last_frame + self.idle;
            if Instant::now() >= deadline {
                return true;
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(first) = this.first.take() {
            this.last_frame = Instant::now();
            return Poll::Ready(Some(Ok(first)));
        }
        loop {
            let Some(upstream) = this.upstream.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    this.last_frame = Instant::now();
                    let Some(d) = frame.data_ref() else {
                        return Poll::Ready(Some(Ok(frame))); // trailers
                    };
                    this.observe(d);
                    let Some(rn) = &mut this.rename else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let out = rn.push(d);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    // Held back (an incomplete SSE line, or a JSON body): read on.
                }
                Poll::Ready(None) => {
                    let rest = this.rename.as_mut().map(Rename::finish);
                    this.end(End::Complete);
                    let rest = rest.filter(|b| !b.is_empty());
                    return Poll::Ready(rest.map(|b| Ok(Frame::data(b))));
                }
                Poll::Ready(Some(Err(e))) => {
                    let msg = format!(
                        "the model server {} broke off the response after {} bytes: {}",
                        this.endpoint,
                        this.bytes,
                        crate::error_chain(&e)
                    );
                    return this.upstream_failed(Reason::MidStream, msg);
                }
                Poll::Pending => {
                    if this.poll_idle(cx) {
                        let msg = format!(
                            "the model server {} sent nothing for {} (--idle-stream-timeout)",
                            this.endpoint,
                            fmt_duration(this.idle)
                        );
                        return this.upstream_failed(Reason::IdleTimeout, msg);
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none()
            && match &self.upstream {
                None => true,
                // A renaming relay may still hold bytes: it ends when polled.
                Some(u) => self.rename.is_none() && u.is_end_stream(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.upstream {
            Some(_) if self.rename.is_some() => SizeHint::default(),
            Some(u) if self.first.is_none() => u.size_hint(),
            Some(u) => {
                // The first frame was taken out of the upstream body already.
                let first = self
                    .first
                    .as_ref()
                    .and_then(Frame::data_ref)
                    .map_or(0, |d| d.len() as u64);
                let h = u.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + first);
                if let Some(up) = h.upper() {
                    out.set_upper(up + first);
                }
                out
            }
            None => SizeHint::with_exact(0),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // hyper stops polling, without waiting for the final `None`, once a body whose
        // length it knows has been sent whole: that is a completed response.
        if self.rename.is_none() && self.is_end_stream() {
            self.end(End::Complete);
        }
        // Otherwise hyper dropped the body because the client went away; the upstream body
        // goes with it.
        self.end(End::ClientGone);
    }
}

//! Faults a replica can be told to have, at start (flags) or at run time
//! (`GET`/`POST /admin/faults` on the replica's own port). `POST` merges the fields given;
//! an unknown field or a bad value is refused with 400 and the list of known fields.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{json, openai, read_body, Body, Shared};

/// What `/metrics` does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsFault {
    #[default]
    Ok,
    /// 200 with random bytes that are not Prometheus text.
    Garbage,
    /// 404.
    Missing,
    /// Accept the request and never answer.
    Hang,
}

impl std::str::FromStr for MetricsFault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ok" => Ok(MetricsFault::Ok),
            "garbage" => Ok(MetricsFault::Garbage),
            "missing" => Ok(MetricsFault::Missing),
            "hang" => Ok(MetricsFault::Hang),
            _ => Err(format!(
                "metrics fault {s:?} is unknown (known: ok, garbage, missing, hang)"
            )),
        }
    }
}

/// The faults in force. The default is a healthy replica.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    /// Fraction (0..=1) of completion requests answered with `error_status` at once.
    pub error_rate: f64,
    pub error_status: u16,
    /// Real milliseconds added before a completion request is queued (before the first byte).
    pub added_latency_ms: u64,
    /// Completion requests are accepted and never answered.
    pub hang: bool,
    /// Streamed responses are cut (connection closed, no clean end) after this many tokens.
    pub drop_after_tokens: Option<u32>,
    pub metrics: MetricsFault,
    /// The replica stops: listener closed, open connections dropped.
    pub exit: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error_rate: 0.0,
            error_status: 500,
            added_latency_ms: 0,
            hang: false,
            drop_after_tokens: None,
            metrics: MetricsFault::Ok,
            exit: false,
        }
    }
}

const FIELDS: &str =
    "error_rate, error_status, added_latency_ms, hang, drop_after_tokens, metrics, exit";

impl Faults {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!(
                "error_rate must be in 0..=1, not {}",
                self.error_rate
            ));
        }
        if !(400..=599).contains(&self.error_status) {
            return Err(format!(
                "error_status must be an HTTP error status (400..=599), not {}",
                self.error_status
            ));
        }
        Ok(())
    }

    /// Applies the fields of a JSON object; `null` turns `drop_after_tokens` off.
    pub fn merge(&mut self, patch: &Value) -> Result<(), String> {
        let Some(obj) = patch.as_object() else {
            return Err(format!("expected a JSON object with some of: {FIELDS}"));
        };
        let mut next = self.clone();
        for (key, v) in obj {
            let bad = |want: &str| format!("{key}: expected {want}, got {v}");
            match key.as_str() {
                "error_rate" => {
                    next.error_rate = v.as_f64().ok_or_else(|| bad("a number in 0..=1"))?
                }
                "error_status" => {
                    next.error_status = v
                        .as_u64()
                        .and_then(|n| u16::try_from(n).ok())
                        .ok_or_else(|| bad("an HTTP status"))?
                }
                "added_latency_ms" => {
                    next.added_latency_ms = v.as_u64().ok_or_else(|| bad("whole milliseconds"))?
                }
                "hang" => next.hang = v.as_bool().ok_or_else(|| bad("true or false"))?,
                "drop_after_tokens" => {
                    next.drop_after_tokens = match v {
                        Value::Null => None,
                        _ => Some(
                            v.as_u64()
                                .and_then(|n| u32::try_from(n).ok())
                                .ok_or_else(|| bad("a token count or null"))?,
                        ),
                    }
                }
                "metrics" => {
                    next.metrics = v
                        .as_str()
                        .ok_or_else(|| bad("\"ok\", \"garbage\", \"missing\" or \"hang\""))?
                        .parse()?
                }
                "exit" => next.exit = v.as_bool().ok_or_else(|| bad("true or false"))?,
                _ => return Err(format!("unknown fault {key:?} (known: {FIELDS})")),
            }
        }
        next.validate()?;
        *self = next;
        Ok(())
    }
}

pub(crate) fn get(shared: &Shared) -> Response<Body> {
    let f = shared.faults.lock().clone();
    json(
        StatusCode::OK,
        &serde_json::to_value(f).unwrap_or(Value::Null),
    )
}

pub(crate) async fn post(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let body = match read_body(req, 1 << 20).await {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return openai::error(StatusCode::BAD_REQUEST, &format!("Invalid JSON: {e}")),
    };
    let now = {
        let mut faults = shared.faults.lock();
        if let Err(e) = faults.merge(&patch) {
            return openai::error(StatusCode::BAD_REQUEST, &e);
        }
        faults.clone()
    };
    if now.exit {
        tracing::warn!("exit fault: this replica stops now");
        let shared = shared.clone();
        // Let this answer reach the client before the connections go.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            shared.count_fault("exit");
            shared.stop();
        });
    }
    json(
        StatusCode::OK,
        &serde_json::to_value(now).unwrap_or(Value::Null),
    )
}

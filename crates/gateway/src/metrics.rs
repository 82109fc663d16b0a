//! The gateway's own Prometheus metrics, served on `/metrics` after the picker's.
//!
//! The picker's families (`inference_objective_*` ...) live in [`infergate_metrics::Metrics`]
//! and are updated by the request path exactly as the ext_proc picker updates them; these
//! are the ones only a data plane has: retries, upstream failures, ejections, status codes.

use infergate_metrics::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Why an attempt at a model server failed (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Connect,
    Reset,
    Timeout,
    Status(u16),
    MidStream,
    IdleTimeout,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Connect => "connect",
            Reason::Reset => "reset",
            Reason::Timeout => "timeout",
            Reason::Status(429) => "status_429",
            Reason::Status(_) => "status_5xx",
            Reason::MidStream => "mid_stream",
            Reason::IdleTimeout => "idle_timeout",
        }
    }
}

pub struct GatewayMetrics {
    registry: Registry,
    pub requests: Family<CodeLabels, Counter>,
    pub retries: Counter,
    pub upstream_failures: Family<ReasonLabels, Counter>,
    pub ejections: Counter,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayMetrics").finish_non_exhaustive()
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = GatewayMetrics {
            requests: Family::default(),
            retries: Counter::default(),
            upstream_failures: Family::default(),
            ejections: Counter::default(),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counters itself.
        registry.register(
            "infergate_gateway_requests",
            "Responses sent to clients, by HTTP status code",
            m.requests.clone(),
        );
        registry.register(
            "infergate_gateway_retries",
            "Attempts made on another model server after one failed before any byte reached the client",
            m.retries.clone(),
        );
        registry.register(
            "infergate_gateway_upstream_failures",
            "Failed attempts at model servers, by reason",
            m.upstream_failures.clone(),
        );
        registry.register(
            "infergate_gateway_ejections",
            "Model servers ejected by the circuit breaker",
            m.ejections.clone(),
        );
        GatewayMetrics { registry, ..m }
    }

    pub fn failure(&self, reason: Reason) {
        self.upstream_failures
            .get_or_create(&ReasonLabels {
                reason: reason.label(),
            })
            .inc();
    }

    pub fn response(&self, code: u16) {
        self.requests.get_or_create(&CodeLabels { code }).inc();
    }

    /// The picker's metrics followed by these, as one Prometheus text page.
    pub fn encode_with(&self, picker: &Metrics) -> String {
        picker.encode_with(Some(&self.registry))
    }
}

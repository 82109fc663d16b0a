//! Saturation detection: is an endpoint (and the pool) too busy to take sheddable work?
//!
//! The GIE's `utilization-detector`: an endpoint's score is `max(queue / queueDepthThreshold,
//! kv / kvCacheUtilThreshold)`, with metrics older than `metricsStalenessThreshold` counting
//! as saturated; the pool's score is the mean over its candidates, saturated at 1 or more.
//! Our queue figure includes the picker's own unseen in-flight requests.

use std::time::Duration;

use crate::scheduler::EndpointView;

/// Parameters of the utilization detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaturationConfig {
    pub queue_depth_threshold: f64,
    pub kv_cache_util_threshold: f64,
    pub staleness: Duration,
    /// Endpoints above `threshold x (1 + headroom)` are avoided when others are below.
    pub headroom: f64,
    /// The `concurrency-detector` instead: judge endpoints by what this picker has in
    /// flight there, not by their scraped queue and KV cache.
    pub concurrency: Option<ConcurrencyLimits>,
}

/// Per-endpoint limits of the `concurrency-detector`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConcurrencyLimits {
    pub max_requests: f64,
    pub max_tokens: f64,
}

impl Default for SaturationConfig {
    fn default() -> Self {
        SaturationConfig {
            queue_depth_threshold: 5.0,
            kv_cache_util_threshold: 0.8,
            staleness: Duration::from_millis(200),
            headroom: 0.0,
            concurrency: None,
        }
    }
}

impl SaturationConfig {
    /// Utilisation score of one endpoint at `now`; 1.0 or more is saturated.
    pub fn endpoint_score(&self, v: &EndpointView<'_>, now: Duration) -> f64 {
        if let Some(c) = self.concurrency {
            let e = v.endpoint;
            return (e.inflight_requests() as f64 / c.max_requests.max(1.0))
                .max(e.inflight_tokens() as f64 / c.max_tokens.max(1.0));
        }
        let age = v.updated_at.map(|t| now.saturating_sub(t));
        if age.is_none_or(|a| a > self.staleness) {
            return 1.0;
        }
        let q = v.waiting / self.queue_depth_threshold.max(f64::MIN_POSITIVE);
        let kv =
            v.kv_cache_usage.unwrap_or(0.0) / self.kv_cache_util_threshold.max(f64::MIN_POSITIVE);
        q.max(kv)
    }

    /// What one more request on one of `endpoints` endpoints adds to the pool's score.
    pub fn per_request(&self, endpoints: usize) -> f64 {
        let unit = match self.concurrency {
            Some(c) => c.max_requests,
            None => self.queue_depth_threshold,
        };
        1.0 / (unit.max(f64::MIN_POSITIVE) * endpoints.max(1) as f64)
    }

    /// Mean score over `cands`; an empty pool is saturated.
    pub fn pool_score(&self, views: &[EndpointView<'_>], cands: &[usize], now: Duration) -> f64 {
        if cands.is_empty() {
            return f64::INFINITY;
        }
        cands
            .iter()
            .map(|&i| self.endpoint_score(&views[i], now))
            .sum::<f64>()
            / cands.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Endpoint, EndpointMetrics, EndpointSpec, Engine};
    use std::sync::Arc;

    const NOW: Duration = Duration::from_secs(10);

    fn mk_endpoint(waiting: u32, kv: f64, age_ms: u64) -> Arc<Endpoint> {
        let e = Arc::new(Endpoint::new(
            0,
            EndpointSpec::new(([127, 0, 0, 1], 1).into(), Engine::Vllm),
        ));
        e.set_metrics(
            EndpointMetrics {
                waiting,
                kv_cache_usage: Some(kv),
                ..Default::default()
            },
            NOW - Duration::from_millis(age_ms),
        );
        e
    }

    /// Endpoint score of one endpoint with these metrics, scraped `age_ms` ago.
    fn score(waiting: u32, kv: f64, age_ms: u64) -> f64 {
        let e = mk_endpoint(waiting, kv, age_ms);
        SaturationConfig::default()
            .endpoint_score(&EndpointView::new(&e, NOW, Duration::from_secs(2)), NOW)
    }

    /// Pool score of fresh endpoints with these `(waiting, kv)`.
    fn pool(eps: &[(u32, f64)]) -> f64 {
        let eps: Vec<_> = eps.iter().map(|&(w, kv)| mk_endpoint(w, kv, 0)).collect();
        let views: Vec<_> = eps
            .iter()
            .map(|e| EndpointView::new(e, NOW, Duration::from_secs(2)))
            .collect();
        let all: Vec<usize> = (0..views.len()).collect();
        SaturationConfig::default().pool_score(&views, &all, NOW)
    }

    #[test]
    fn queue_or_kv_past_threshold_saturates() {
        assert!(score(2, 0.1, 0) < 1.0);
        assert!(score(5, 0.1, 0) >= 1.0);
        assert!(score(0, 0.85, 0) >= 1.0);
    }

    #[test]
    fn metrics_older_than_200ms_count_as_saturated() {
        assert_eq!(score(0, 0.0, 250), 1.0);
        assert!(score(0, 0.0, 150) < 1.0);
    }

    #[test]
    fn pool_is_saturated_when_the_mean_reaches_one() {
        assert!(pool(&[(10, 0.0), (0, 0.0)]) >= 1.0);
        assert!(pool(&[(6, 0.0), (0, 0.0), (0, 0.0)]) < 1.0);
    }
}

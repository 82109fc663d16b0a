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
}

impl Default for SaturationConfig {
    fn default() -> Self {
        SaturationConfig {
            queue_depth_threshold: 5.0,
            kv_cache_util_threshold: 0.8,
            staleness: Duration::from_millis(200),
            headroom: 0.0,
        }
    }
}

impl SaturationConfig {
    /// Utilisation score of one endpoint at `now`; 1.0 or more is saturated.
    pub fn endpoint_score(&self, v: &EndpointView<'_>, now: Duration) -> f64 {
        let age = v.updated_at.map(|t| now.saturating_sub(t));
        if age.is_none_or(|a| a > self.staleness) {
            return 1.0;
        }
        let q = v.waiting / self.queue_depth_threshold.max(f64::MIN_POSITIVE);
        let kv =
            v.kv_cache_usage.unwrap_or(0.0) / self.kv_cache_util_threshold.max(f64::MIN_POSITIVE);
        q.max(kv)
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

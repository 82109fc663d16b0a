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
    pub fn endpoint_score(&self, v: &EndpointView, now: Duration) -> f64 {
        let age = v.sample.updated_at.map(|t| now.saturating_sub(t));
        if age.is_none_or(|a| a > self.staleness) {
            return 1.0;
        }
        let q = v.waiting / self.queue_depth_threshold.max(f64::MIN_POSITIVE);
        let kv = v.sample.metrics.kv_cache_usage.unwrap_or(0.0)
            / self.kv_cache_util_threshold.max(f64::MIN_POSITIVE);
        q.max(kv)
    }

    /// Mean score over `cands`; an empty pool is saturated.
    pub fn pool_score(&self, views: &[EndpointView], cands: &[usize], now: Duration) -> f64 {
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

    fn mk_view(waiting: u32, kv: f64, age_ms: u64) -> EndpointView {
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
        EndpointView::new(&e, NOW, Duration::from_secs(2))
    }

    #[test]
    fn queue_or_kv_past_threshold_saturates() {
        let c = SaturationConfig::default();
        assert!(c.endpoint_score(&mk_view(2, 0.1, 0), NOW) < 1.0);
        assert!(c.endpoint_score(&mk_view(5, 0.1, 0), NOW) >= 1.0);
        assert!(c.endpoint_score(&mk_view(0, 0.85, 0), NOW) >= 1.0);
    }

    #[test]
    fn metrics_older_than_200ms_count_as_saturated() {
        let c = SaturationConfig::default();
        assert_eq!(c.endpoint_score(&mk_view(0, 0.0, 250), NOW), 1.0);
        assert!(c.endpoint_score(&mk_view(0, 0.0, 150), NOW) < 1.0);
    }

    #[test]
    fn pool_is_saturated_when_the_mean_reaches_one() {
        let c = SaturationConfig::default();
        let v = vec![mk_view(10, 0.0, 0), mk_view(0, 0.0, 0)];
        assert!(c.pool_score(&v, &[0, 1], NOW) >= 1.0);
        let v = vec![mk_view(6, 0.0, 0), mk_view(0, 0.0, 0), mk_view(0, 0.0, 0)];
        assert!(c.pool_score(&v, &[0, 1, 2], NOW) < 1.0);
    }
}

//! Turning the user's files (`infergate-api` types) into the scheduler's own types.
//!
//! Every source of configuration ends here: the EndpointPickerConfig becomes a
//! [`SchedulerConfig`], and pool files (later Kubernetes objects) become endpoint specs and a
//! [`Policy`]. Errors name the plugin or object at fault.

use std::time::Duration;

use infergate_api::config::{
    EndpointPickerConfig, PluginCategory, PluginKind, PredictedLatencyParams, PrefixCacheParams,
};
use infergate_api::pool_file::PoolFile;
use infergate_api::resources::{InferenceModel, InferenceModelRewrite, InferenceObjective};

use crate::datastore::Policy;
use crate::director::SchedulerConfig;
use crate::endpoint::EndpointSpec;
use crate::latency::{Line, PredictedLatencyScorer};
use crate::objective::{Objective, Rewrite, RewriteRule, RewriteTarget};
use crate::prefix::{PrefixConfig, CHARS_PER_TOKEN};
use crate::saturation::{ConcurrencyLimits, SaturationConfig};
use crate::scheduler::*;

/// A configuration that parsed but cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(pub String);

/// Build the scheduler from an EndpointPickerConfig. `staleness` is
/// `--metrics-staleness-threshold`; the profile used is the config's only profile.
pub fn scheduler_config(
    cfg: &EndpointPickerConfig,
    staleness: Duration,
) -> Result<SchedulerConfig, BuildError> {
    let profile = match cfg.scheduling_profiles.as_slice() {
        [p] => p,
        [] => return Err(BuildError("the config has no scheduling profile".into())),
        many => {
            return Err(BuildError(format!(
                "the config has {} scheduling profiles ({}); the single-profile-handler runs exactly one",
                many.len(),
                many.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
            )))
        }
    };
    let mut filters: Vec<Box<dyn Filter>> = Vec::new();
    let mut scorers: Vec<(Box<dyn Scorer>, f64)> = Vec::new();
    let mut picker: Option<Box<dyn Picker>> = None;
    let mut prefix = PrefixConfig::default();
    for pr in &profile.plugins {
        let spec = cfg.plugin(&pr.plugin_ref).ok_or_else(|| {
            BuildError(format!(
                "profile {:?} refers to undefined plugin {:?}",
                profile.name, pr.plugin_ref
            ))
        })?;
        match &spec.kind {
            PluginKind::QueueScorer => scorers.push((Box::new(QueueScorer), pr.weight())),
            PluginKind::KvCacheUtilizationScorer => scorers.push((Box::new(KvCacheScorer), pr.weight())),
            PluginKind::RunningRequestsSizeScorer => scorers.push((Box::new(RunningRequestsScorer), pr.weight())),
            PluginKind::LoraAffinityScorer => scorers.push((Box::new(LoraAffinityScorer), pr.weight())),
            PluginKind::TokenLoadScorer => scorers.push((Box::new(TokenLoadScorer), pr.weight())),
            PluginKind::InflightLoadScorer => scorers.push((Box::new(InflightLoadScorer), pr.weight())),
            PluginKind::PredictedLatencyScorer(p) => scorers.push((Box::new(predicted_latency(p)), pr.weight())),
            PluginKind::PrefixCacheScorer(p) => {
                prefix = prefix_config(p);
                scorers.push((Box::new(PrefixCacheScorer), pr.weight()));
            }
            PluginKind::MaxScorePicker(p) => {
                picker = Some(Box::new(MaxScorePicker { max_endpoints: p.max_num_of_endpoints.max(1) as usize }))
            }
            PluginKind::RandomPicker(p) => {
                picker = Some(Box::new(RandomPicker { max_endpoints: p.max_num_of_endpoints.max(1) as usize }))
            }
            PluginKind::WeightedRandomPicker(p) => {
                picker = Some(Box::new(WeightedRandomPicker { max_endpoints: p.max_num_of_endpoints.max(1) as usize }))
            }
            PluginKind::HeaderBasedTestingFilter => filters.push(Box::new(HeaderTestingFilter)),
            PluginKind::PrefixCacheAffinityFilter(p) => {
                filters.push(Box::new(PrefixAffinityFilter { threshold: p.threshold }))
            }
            PluginKind::LeastQueueFilter => filters.push(Box::new(LeastQueueFilter)),
            PluginKind::LeastKvCacheFilter => filters.push(Box::new(LeastKvCacheFilter)),
            PluginKind::LoraAffinityFilter(_) => filters.push(Box::new(LoraAffinityFilter)),
            PluginKind::LowQueueFilter(p) => filters.push(Box::new(LowQueueFilter { threshold: f64::from(p.threshold) })),
            other => {
                return Err(BuildError(format!(
                    "profile {:?} lists plugin {:?} of type {}, which is {:?}, not a filter, scorer or picker",
                    profile.name,
                    spec.name,
                    other.type_name(),
                    other.category()
                )))
            }
        }
    }
    // A prefix-cache-affinity-filter uses the index too; a prefix-cache-scorer defined
    // outside the profile still configures it.
    if !scorers
        .iter()
        .any(|(s, _)| s.type_name() == "prefix-cache-scorer")
    {
        if let Some(p) = cfg.plugins.iter().find_map(|p| match &p.kind {
            PluginKind::PrefixCacheScorer(p) => Some(p),
            _ => None,
        }) {
            prefix = prefix_config(p);
        }
    }
    let saturation = match cfg.plugin(&cfg.saturation_detector).map(|p| &p.kind) {
        Some(PluginKind::UtilizationDetector(p)) => SaturationConfig {
            queue_depth_threshold: f64::from(p.queue_depth_threshold.max(1)),
            kv_cache_util_threshold: p.kv_cache_util_threshold,
            staleness: p.metrics_staleness_threshold,
            headroom: p.headroom,
            concurrency: None,
        },
        Some(PluginKind::ConcurrencyDetector(p)) => SaturationConfig {
            headroom: p.headroom,
            concurrency: Some(ConcurrencyLimits {
                max_requests: f64::from(p.max_concurrency.max(1)),
                max_tokens: p.max_token_concurrency.max(1) as f64,
            }),
            ..SaturationConfig::default()
        },
        Some(other) if other.category() != PluginCategory::SaturationDetector => {
            return Err(BuildError(format!(
                "saturationDetector refers to {:?}, a {}, not a saturation detector",
                cfg.saturation_detector,
                other.type_name()
            )))
        }
        _ => SaturationConfig::default(),
    };
    Ok(SchedulerConfig {
        profile: Profile {
            name: profile.name.clone(),
            filters,
            scorers,
            picker: picker.unwrap_or_else(|| Box::new(MaxScorePicker { max_endpoints: 1 })),
        },
        prefix,
        saturation,
        staleness,
        inflight_accounting: true,
        strict_models: false,
        flow: cfg.flow_control.as_ref().map(Into::into),
    })
}

fn predicted_latency(p: &PredictedLatencyParams) -> PredictedLatencyScorer {
    PredictedLatencyScorer {
        prior: Line {
            intercept: p.prior_overhead.as_secs_f64(),
            slope: 1.0 / p.prior_tokens_per_second,
        },
        lora_load: p.lora_load_time,
        lora_wait: p.lora_wait_time,
        memory: p.memory,
        duplicate_cost: p.duplicate_cost,
    }
}

/// The prefix index's settings from a `prefix-cache-scorer`'s parameters.
fn prefix_config(p: &PrefixCacheParams) -> PrefixConfig {
    let block_size_tokens = match p.block_size {
        // Legacy `blockSize` is in characters.
        Some(chars) => (chars as usize).div_ceil(CHARS_PER_TOKEN).max(1),
        None => p.block_size_tokens.max(1) as usize,
    };
    PrefixConfig {
        block_size_tokens,
        max_blocks: p.max_prefix_blocks_to_match.max(1) as usize,
        lru_capacity_per_endpoint: p.lru_capacity_per_server.max(1) as usize,
        max_total_entries: p.max_index_entries.max(1) as usize,
        auto_tune: p.auto_tune,
    }
}

/// Endpoint specs of a pool file.
pub fn endpoints(file: &PoolFile) -> Vec<EndpointSpec> {
    file.endpoints
        .iter()
        .map(|e| EndpointSpec {
            name: e.display_name(),
            addr: e.socket_addr(),
            engine: e.engine,
            labels: e.labels.clone(),
        })
        .collect()
}

/// Objectives, rewrites and legacy model priorities of a pool file.
pub fn policy(file: &PoolFile) -> Policy {
    let mut p = Policy {
        objectives: file.objectives.iter().map(objective).collect(),
        rewrites: file.rewrites.iter().map(rewrite).collect(),
        ..Default::default()
    };
    for m in &file.models {
        p.model_priorities
            .insert(m.spec.model_name.clone(), m.priority());
        if let Some(r) = legacy_rewrite(m) {
            p.rewrites.push(r);
        }
    }
    p
}

pub fn objective(o: &InferenceObjective) -> Objective {
    Objective {
        name: o.metadata.name.clone(),
        priority: o.priority(),
    }
}

fn weight(w: Option<i32>) -> u32 {
    w.map_or(1, |w| w.max(0) as u32)
}

pub fn rewrite(r: &InferenceModelRewrite) -> Rewrite {
    Rewrite {
        source: format!("{}/{}", r.metadata.namespace, r.metadata.name),
        rules: r
            .spec
            .rules
            .iter()
            .map(|rule| RewriteRule {
                matches: rule.matches.iter().map(|m| m.model.value.clone()).collect(),
                targets: rule
                    .targets
                    .iter()
                    .map(|t| RewriteTarget {
                        model: t.model_rewrite.clone(),
                        weight: weight(t.weight),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// A legacy InferenceModel's traffic split, as an exact-match rewrite.
fn legacy_rewrite(m: &InferenceModel) -> Option<Rewrite> {
    if m.spec.target_models.is_empty() {
        return None;
    }
    Some(Rewrite {
        source: format!(
            "{}/{} (InferenceModel)",
            m.metadata.namespace, m.metadata.name
        ),
        rules: vec![RewriteRule {
            matches: vec![m.spec.model_name.clone()],
            targets: m
                .spec
                .target_models
                .iter()
                .map(|t| RewriteTarget {
                    model: t.name.clone(),
                    weight: weight(t.weight),
                })
                .collect(),
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_builds_the_reference_profile() {
        let s = scheduler_config(
            &EndpointPickerConfig::default_config(),
            Duration::from_secs(2),
        )
        .unwrap();
        let names: Vec<(&str, f64)> = s
            .profile
            .scorers
            .iter()
            .map(|(s, w)| (s.type_name(), *w))
            .collect();
        assert_eq!(
            names,
            vec![
                ("queue-scorer", 2.0),
                ("kv-cache-utilization-scorer", 2.0),
                ("prefix-cache-scorer", 3.0)
            ]
        );
        assert_eq!(s.profile.picker.type_name(), "max-score-picker");
        assert_eq!(s.prefix.block_size_tokens, 16);
    }

    #[test]
    fn configured_plugins_and_params_are_used() {
        let text = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: prefix-cache-scorer
  parameters: {blockSizeTokens: 32, maxPrefixBlocksToMatch: 10, lruCapacityPerServer: 500}
- type: queue-scorer
- name: pick3
  type: max-score-picker
  parameters: {maxNumOfEndpoints: 3}
- type: utilization-detector
  parameters: {queueDepthThreshold: 9, kvCacheUtilThreshold: 0.5}
saturationDetector: {pluginRef: utilization-detector}
schedulingProfiles:
- name: p
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: prefix-cache-scorer
    weight: 5
  - pluginRef: queue-scorer
  - pluginRef: pick3
"#;
        let cfg = EndpointPickerConfig::from_yaml_str(text, "epp.yaml").unwrap();
        let s = scheduler_config(&cfg, Duration::from_secs(2)).unwrap();
        assert_eq!(
            s.profile.filters[0].type_name(),
            "header-based-testing-filter"
        );
        assert_eq!(s.profile.scorers[0].1, 5.0);
        assert_eq!(s.prefix.block_size_tokens, 32);
        assert_eq!(s.prefix.max_blocks, 10);
        assert_eq!(s.prefix.lru_capacity_per_endpoint, 500);
        assert_eq!(s.saturation.queue_depth_threshold, 9.0);
        assert_eq!(s.saturation.kv_cache_util_threshold, 0.5);
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(1);
        assert_eq!(
            s.profile
                .picker
                .pick(&[0, 1, 2, 3], &[0.0, 1.0, 2.0, 3.0], &mut rng),
            vec![3, 2, 1]
        );
    }
}

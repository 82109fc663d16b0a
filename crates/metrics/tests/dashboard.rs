//! The Grafana dashboard in `deploy/grafana/` may only chart what the picker exports.
//!
//! Every metric name in every panel's PromQL is looked up in the Prometheus text that the
//! real [`Metrics`] renders after one observation in each family; quantile panels must read
//! the `_bucket` series of a histogram; the panels operators rely on must be there; and the
//! `pool` variable must read a label the pool gauges really carry.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use infergate_core::director::PrefixStats;
use infergate_core::{Datastore, EndpointMetrics, EndpointSpec, Engine};
use infergate_metrics::{ErrorLabels, Metrics, ModelLabels, RequestLabels, RunningLabels};
use serde_json::Value;

const POOL: &str = "dash-pool";

fn dashboard() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/grafana/infergate-epp-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The exposition of a `Metrics` with at least one sample in every family, built and fed
/// the way the picker does it (`refresh_pool` from a datastore, `observe_plugin` from the
/// director's observer).
fn exposition() -> String {
    let m = Metrics::new(POOL);
    let model = ModelLabels {
        model_name: "food-review".into(),
        target_model_name: "food-review-v1".into(),
    };
    m.request_total
        .get_or_create(&RequestLabels {
            model_name: model.model_name.clone(),
            target_model_name: model.target_model_name.clone(),
            priority: "0".into(),
        })
        .inc();
    m.request_error_total
        .get_or_create(&ErrorLabels {
            model_name: model.model_name.clone(),
            target_model_name: model.target_model_name.clone(),
            error_code: "ResourceExhausted".into(),
        })
        .inc();
    for h in [
        &m.request_duration_seconds,
        &m.request_sizes,
        &m.response_sizes,
        &m.input_tokens,
        &m.output_tokens,
        &m.prompt_cached_tokens,
        &m.normalized_time_per_output_token_seconds,
        &m.request_ttft_seconds,
    ] {
        h.get_or_create(&model).observe(0.25);
    }
    m.running_requests
        .get_or_create(&RunningLabels {
            model_name: model.model_name.clone(),
        })
        .inc();
    m.scheduler_e2e_duration_seconds.observe(2e-5);
    m.observe_plugin("scorer", "queue-scorer", Duration::from_micros(3));

    let ds = Datastore::new();
    ds.set_endpoints(vec![EndpointSpec::new(
        ([10, 0, 0, 7], 8000).into(),
        Engine::Vllm,
    )]);
    let now = Duration::from_secs(10);
    ds.snapshot().endpoints[0].set_metrics(
        EndpointMetrics {
            waiting: 3,
            kv_cache_usage: Some(0.4),
            ..Default::default()
        },
        now,
    );
    m.refresh_pool(
        &ds,
        now,
        Duration::from_secs(2),
        PrefixStats {
            entries: 10,
            max_entries: 100,
            hit_ratio: 0.5,
        },
    );
    m.encode()
}

/// Family name -> TYPE, from the `# TYPE` lines.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

/// The family a series name belongs to, and its type: the name itself, or without the
/// sample suffix its type adds (`_bucket`/`_sum`/`_count` of a histogram, `_total` of a
/// counter, `_info` of an info metric).
fn family_of<'a>(series: &str, fams: &'a BTreeMap<String, String>) -> Option<(String, &'a str)> {
    if let Some(t) = fams.get(series) {
        return Some((series.to_string(), t));
    }
    for (suffix, types) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
        ("_total", &["counter"][..]),
        ("_info", &["info"][..]),
    ] {
        if let Some(base) = series.strip_suffix(suffix) {
            if let Some(t) = fams.get(base) {
                if types.contains(&t.as_str()) {
                    return Some((base.to_string(), t));
                }
            }
        }
    }
    None
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels is a list") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// (panel title, expr) of every query target.
fn exprs(d: &Value) -> Vec<(String, String)> {
    panels(d)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("").to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| Some((title.clone(), t["expr"].as_str()?.to_string())))
        })
        .collect()
}

/// Identifiers in `expr` that name one of the picker's series (they all start with
/// `inference_`; no PromQL function, keyword or label of ours does).
fn series_names(expr: &str) -> Vec<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ':') {
        // Skip identifiers glued to a preceding identifier character (none, by construction)
        // and Grafana variables such as $__rate_interval.
        let before = &rest[..i];
        let end = rest[i..]
            .find(|c: char| !is_ident(c))
            .map_or(rest.len(), |e| i + e);
        let ident = &rest[i..end];
        if !before.ends_with('$') && ident.starts_with("inference_") {
            out.push(ident.to_string());
        }
        rest = &rest[end..];
    }
    out
}

/// The argument text of each `histogram_quantile(...)` call in `expr`.
fn quantile_calls(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = expr[from..].find("histogram_quantile(") {
        let start = from + i + "histogram_quantile(".len();
        let mut depth = 1;
        let mut end = start;
        for (j, c) in expr[start..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = start + j;
                break;
            }
        }
        assert!(depth == 0, "unbalanced histogram_quantile( in {expr}");
        out.push(&expr[start..end]);
        from = end;
    }
    out
}

#[test]
fn every_metric_the_dashboard_charts_is_exported() {
    let text = exposition();
    let fams = families(&text);
    assert!(
        fams.len() >= 20,
        "expected every family in the exposition, got {fams:?}"
    );
    let d = dashboard();
    let all = exprs(&d);
    assert!(!all.is_empty(), "the dashboard has no queries");
    let mut missing = BTreeSet::new();
    let mut used = BTreeSet::new();
    for (title, expr) in &all {
        let names = series_names(expr);
        assert!(
            !names.is_empty(),
            "panel {title:?}: no picker metric in {expr}"
        );
        for n in names {
            match family_of(&n, &fams) {
                Some((fam, _)) => {
                    used.insert(fam);
                }
                None => {
                    missing.insert(format!("{n} (panel {title:?})"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard uses series the picker does not export: {missing:?}\nexported: {:?}",
        fams.keys().collect::<Vec<_>>()
    );
    // The families the brief asks to chart are all charted.
    for fam in [
        "inference_objective_request",
        "inference_objective_request_error",
        "inference_objective_request_ttft_seconds",
        "inference_objective_request_duration_seconds",
        "inference_objective_normalized_time_per_output_token_seconds",
        "inference_objective_running_requests",
        "inference_objective_input_tokens",
        "inference_objective_output_tokens",
        "inference_pool_ready_pods",
        "inference_pool_average_kv_cache_utilization",
        "inference_pool_average_queue_size",
        "inference_pool_per_pod_queue_size",
        "inference_extension_scheduler_e2e_duration_seconds",
        "inference_extension_plugin_duration_seconds",
        "inference_extension_prefix_indexer_size",
        "inference_extension_prefix_indexer_max_entries",
        "inference_extension_prefix_indexer_hit_ratio",
    ] {
        assert!(used.contains(fam), "no panel charts {fam}");
    }
}

#[test]
fn quantiles_read_histogram_buckets() {
    let fams = families(&exposition());
    let d = dashboard();
    let mut calls = 0;
    for (title, expr) in exprs(&d) {
        for arg in quantile_calls(&expr) {
            calls += 1;
            let names = series_names(arg);
            assert!(
                !names.is_empty(),
                "panel {title:?}: histogram_quantile without a series: {expr}"
            );
            for n in names {
                assert!(
                    n.ends_with("_bucket"),
                    "panel {title:?}: histogram_quantile over {n}, not a _bucket series"
                );
                let base = n.trim_end_matches("_bucket");
                assert_eq!(
                    fams.get(base).map(String::as_str),
                    Some("histogram"),
                    "panel {title:?}: {base} is not a histogram family"
                );
            }
            assert!(
                arg.contains("by (le") || arg.contains("by(le"),
                "panel {title:?}: aggregate histogram buckets by le: {expr}"
            );
        }
    }
    assert!(calls >= 5, "expected quantile panels, found {calls} calls");
}

#[test]
fn the_expected_panels_are_there() {
    let d = dashboard();
    let titles: Vec<String> = panels(&d)
        .iter()
        .filter(|p| p["type"] != "row")
        .map(|p| p["title"].as_str().unwrap_or("").to_lowercase())
        .collect();
    let wanted: &[&[&str]] = &[
        &["request rate", "model", "priority"],
        &["error rate", "error code"],
        &["ttft", "p50", "p90", "p99"],
        &["end-to-end latency"],
        &["normalized time per output token"],
        &["running requests"],
        &["pool ready endpoints"],
        &["kv-cache", "queue size"],
        &["per-pod queue size"],
        &["scheduler e2e duration"],
        &["plugin duration"],
        &["prefix indexer size", "max entries"],
        &["prefix indexer hit ratio"],
        &["input and output tokens"],
    ];
    for words in wanted {
        assert!(
            titles.iter().any(|t| words.iter().all(|w| t.contains(w))),
            "no panel titled with {words:?}; titles: {titles:?}"
        );
    }
    // Panel ids are unique, and every panel has a place on the grid.
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "panel {id}: gridPos.{k}");
        }
    }
}

#[test]
fn datasource_and_pool_variables_are_wired() {
    let d = dashboard();
    assert_eq!(d["schemaVersion"], 39);
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");

    // Every panel and target reads the chosen data source.
    for p in panels(&d).into_iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {}",
            p["title"]
        );
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {}",
                p["title"]
            );
        }
    }

    // `pool` lists values of a label the pool gauges carry, and the pool panels filter on it.
    let pool = var("pool");
    let query = pool["definition"].as_str().expect("pool definition");
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("pool variable is not label_values(metric, label): {query}"));
    let (metric, label) = inner.split_once(',').expect("metric, label");
    let (metric, label) = (metric.trim(), label.trim());
    let text = exposition();
    let sample = text
        .lines()
        .find(|l| l.starts_with(&format!("{metric}{{")))
        .unwrap_or_else(|| panic!("no sample of {metric} in the exposition"));
    assert!(
        sample.contains(&format!("{label}=\"{POOL}\"")),
        "{metric} does not carry label {label}=\"{POOL}\": {sample}"
    );
    let pool_filter = format!("{label}=~\"$pool\"");
    for (title, expr) in exprs(&d) {
        if expr.contains("inference_pool_") {
            assert!(
                expr.contains(&pool_filter),
                "panel {title:?} reads pool gauges without {pool_filter}: {expr}"
            );
        }
    }
}

#[test]
fn series_names_finds_metrics_and_skips_the_rest() {
    let e = "histogram_quantile(0.9, sum by (le) (rate(inference_objective_request_ttft_seconds_bucket{model_name=~\"$model\"}[$__rate_interval]))) / inference_pool_ready_pods";
    assert_eq!(
        series_names(e),
        [
            "inference_objective_request_ttft_seconds_bucket",
            "inference_pool_ready_pods"
        ]
    );
    assert_eq!(quantile_calls(e).len(), 1);
}

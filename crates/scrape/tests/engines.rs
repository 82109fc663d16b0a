//! Engine mappings against realistic `/metrics` pages of each engine, and against the
//! broken pages a misconfigured or buggy server produces.

use infergate_core::{EndpointMetrics, Engine, LoraState};
use infergate_scrape::engines::{extract, ExtractError};
use infergate_scrape::text::parse;

const VLLM: &str = include_str!("fixtures/vllm.txt");
const VLLM_LEGACY: &str = include_str!("fixtures/vllm_legacy.txt");
const SGLANG: &str = include_str!("fixtures/sglang.txt");
const TRTLLM_SERVE: &str = include_str!("fixtures/trtllm_serve.txt");
const TRITON: &str = include_str!("fixtures/triton.txt");
const LLAMACPP: &str = include_str!("fixtures/llamacpp.txt");

fn extract_page(engine: Engine, page: &str) -> Result<EndpointMetrics, ExtractError> {
    let samples = parse(page).expect("page parses");
    extract(engine, &samples)
}

#[test]
fn vllm_data_parallel_page_sums_queues_and_takes_fullest_cache() {
    let m = extract_page(Engine::Vllm, VLLM).unwrap();
    assert_eq!(m.waiting, 3 + 1);
    assert_eq!(m.running, 12 + 9);
    assert_eq!(m.kv_cache_usage, Some(0.5871212121212122));
    assert_eq!(m.block_size, Some(16));
    assert_eq!(m.num_gpu_blocks, Some(27153));
}

#[test]
fn vllm_newest_lora_series_wins() {
    let m = extract_page(Engine::Vllm, VLLM).unwrap();
    assert_eq!(
        m.lora,
        Some(LoraState {
            running: vec!["sql-lora".into(), "chat-lora".into()],
            waiting: vec!["summarize-lora".into()],
            max_loras: 4,
        })
    );
}

#[test]
fn vllm_empty_lora_lists_give_no_adapters() {
    let page = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n\
                vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"\",waiting_lora_adapters=\" , \"} 1.7e9\n";
    let lora = extract_page(Engine::Vllm, page).unwrap().lora.unwrap();
    assert!(lora.running.is_empty() && lora.waiting.is_empty());
    assert_eq!(lora.max_loras, 2);
}

#[test]
fn vllm_without_lora_metric_reports_no_lora_state() {
    let m = extract_page(Engine::Vllm, VLLM_LEGACY).unwrap();
    assert_eq!(m.lora, None);
}

#[test]
fn older_vllm_falls_back_to_gpu_cache_usage() {
    let m = extract_page(Engine::Vllm, VLLM_LEGACY).unwrap();
    assert_eq!((m.waiting, m.running), (0, 6));
    assert_eq!(m.kv_cache_usage, Some(0.1277297074577668));
    assert_eq!((m.block_size, m.num_gpu_blocks), (Some(16), Some(7281)));
}

#[test]
fn vllm_prefers_new_kv_name_when_both_present() {
    let page = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n\
                vllm:gpu_cache_usage_perc 0.9\nvllm:kv_cache_usage_perc 0.2\n";
    assert_eq!(
        extract_page(Engine::Vllm, page).unwrap().kv_cache_usage,
        Some(0.2)
    );
}

#[test]
fn vllm_cache_config_none_means_unknown() {
    let page = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n\
                vllm:cache_config_info{block_size=\"32\",num_gpu_blocks=\"None\"} 1\n";
    let m = extract_page(Engine::Vllm, page).unwrap();
    assert_eq!((m.block_size, m.num_gpu_blocks), (Some(32), None));
}

#[test]
fn sglang_page() {
    let m = extract_page(Engine::Sglang, SGLANG).unwrap();
    assert_eq!((m.waiting, m.running), (7, 24));
    assert_eq!(m.kv_cache_usage, Some(0.62));
    assert_eq!((m.block_size, m.num_gpu_blocks), (Some(1), Some(190651)));
    assert_eq!(m.lora, None);
}

#[test]
fn sglang_cache_config_accepts_vllm_style_labels() {
    let page = "sglang:num_queue_reqs 0\nsglang:num_running_reqs 0\n\
                sglang:cache_config_info{block_size=\"64\",num_gpu_blocks=\"1000\"} 1\n";
    let m = extract_page(Engine::Sglang, page).unwrap();
    assert_eq!((m.block_size, m.num_gpu_blocks), (Some(64), Some(1000)));
}

#[test]
fn trtllm_serve_page() {
    let m = extract_page(Engine::TrtllmServe, TRTLLM_SERVE).unwrap();
    assert_eq!((m.waiting, m.running), (4, 31));
    assert_eq!(m.kv_cache_usage, Some(0.7734375));
}

#[test]
fn triton_page_selects_series_by_label() {
    let m = extract_page(Engine::Triton, TRITON).unwrap();
    assert_eq!((m.waiting, m.running), (5, 14));
    assert_eq!(m.kv_cache_usage, Some(0.3046875));
    assert_eq!((m.block_size, m.num_gpu_blocks), (Some(64), Some(3840)));
}

#[test]
fn llamacpp_page_has_unknown_kv_not_zero() {
    let m = extract_page(Engine::Llamacpp, LLAMACPP).unwrap();
    assert_eq!((m.waiting, m.running), (1, 2));
    assert_eq!(m.kv_cache_usage, None);
}

#[test]
fn wrong_engine_names_the_missing_metric_and_engine() {
    let err = extract_page(Engine::Sglang, VLLM).unwrap_err();
    assert_eq!(
        err,
        ExtractError::MissingMetric {
            engine: Engine::Sglang,
            metric: "sglang:num_queue_reqs"
        }
    );
    let msg = err.to_string();
    assert!(
        msg.contains("sglang:num_queue_reqs") && msg.contains("sglang server"),
        "{msg}"
    );
}

#[test]
fn every_engine_rejects_every_other_engines_page() {
    let pages = [
        (Engine::Vllm, VLLM),
        (Engine::Sglang, SGLANG),
        (Engine::TrtllmServe, TRTLLM_SERVE),
        (Engine::Triton, TRITON),
        (Engine::Llamacpp, LLAMACPP),
    ];
    for (engine, _) in pages {
        for (page_engine, page) in pages {
            let result = extract_page(engine, page);
            if engine == page_engine {
                assert!(result.is_ok(), "{engine} on its own page: {result:?}");
            } else {
                assert!(
                    matches!(result, Err(ExtractError::MissingMetric { engine: e, .. }) if e == engine),
                    "{engine} on a {page_engine} page: {result:?}"
                );
            }
        }
    }
}

#[test]
fn missing_running_metric_is_named() {
    let err = extract_page(
        Engine::Triton,
        "nv_trt_llm_request_metrics{request_type=\"waiting\"} 1\n",
    )
    .unwrap_err();
    assert_eq!(
        err,
        ExtractError::MissingMetric {
            engine: Engine::Triton,
            metric: "nv_trt_llm_request_metrics{request_type=\"scheduled\"}"
        }
    );
}

fn vllm_page(waiting: &str, running: &str, kv: &str) -> String {
    format!(
        "vllm:num_requests_waiting {waiting}\nvllm:num_requests_running {running}\n\
         vllm:kv_cache_usage_perc {kv}\n"
    )
}

fn bad_value_problem(page: &str) -> (&'static str, &'static str) {
    match extract_page(Engine::Vllm, page) {
        Err(ExtractError::BadValue {
            metric, problem, ..
        }) => (metric, problem),
        other => panic!("expected a bad value for {page:?}, got {other:?}"),
    }
}

#[test]
fn impossible_values_are_errors() {
    let cases = [
        (
            vllm_page("-1", "0", "0"),
            "vllm:num_requests_waiting",
            "negative",
        ),
        (
            vllm_page("NaN", "0", "0"),
            "vllm:num_requests_waiting",
            "not a number",
        ),
        (
            vllm_page("+Inf", "0", "0"),
            "vllm:num_requests_waiting",
            "10 million",
        ),
        (
            vllm_page("2e7", "0", "0"),
            "vllm:num_requests_waiting",
            "10 million",
        ),
        (
            vllm_page("0", "-0.5", "0"),
            "vllm:num_requests_running",
            "negative",
        ),
        (
            vllm_page("0", "0", "1.6"),
            "vllm:kv_cache_usage_perc",
            "outside",
        ),
        (
            vllm_page("0", "0", "-0.1"),
            "vllm:kv_cache_usage_perc",
            "outside",
        ),
        (
            vllm_page("0", "0", "NaN"),
            "vllm:kv_cache_usage_perc",
            "not a number",
        ),
    ];
    for (page, metric, problem) in cases {
        let (got_metric, got_problem) = bad_value_problem(&page);
        assert_eq!(got_metric, metric, "{page:?}");
        assert!(got_problem.contains(problem), "{page:?}: {got_problem}");
    }
}

#[test]
fn summed_queue_over_the_cap_is_an_error() {
    let page = "vllm:num_requests_waiting{engine=\"0\"} 6e6\nvllm:num_requests_waiting{engine=\"1\"} 6e6\n\
                vllm:num_requests_running 0\n";
    assert!(bad_value_problem(page).1.contains("10 million"));
}

#[test]
fn slightly_overfull_kv_is_clamped_to_one() {
    let m = extract_page(Engine::Vllm, &vllm_page("0", "0", "1.02")).unwrap();
    assert_eq!(m.kv_cache_usage, Some(1.0));
}

#[test]
fn fractional_gauges_round_to_whole_requests() {
    let m = extract_page(Engine::Vllm, &vllm_page("2.6", "0.4", "0")).unwrap();
    assert_eq!((m.waiting, m.running), (3, 0));
}

#[test]
fn unparsable_max_lora_is_an_error_naming_the_label() {
    let page = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n\
                vllm:lora_requests_info{max_lora=\"four\",running_lora_adapters=\"a\"} 1.7e9\n";
    let err = extract_page(Engine::Vllm, page).unwrap_err();
    assert!(
        matches!(&err, ExtractError::BadLabel { label: "max_lora", value, .. } if value == "four"),
        "{err:?}"
    );
}

#[test]
fn unparsable_block_size_is_an_error() {
    let page = "sglang:num_queue_reqs 0\nsglang:num_running_reqs 0\n\
                sglang:cache_config_info{page_size=\"big\",num_pages=\"10\"} 1\n";
    let err = extract_page(Engine::Sglang, page).unwrap_err();
    assert!(
        matches!(
            err,
            ExtractError::BadLabel {
                label: "page_size",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn parsing_only_the_families_an_engine_reads_gives_the_same_metrics() {
    for (engine, page) in [
        (Engine::Vllm, VLLM),
        (Engine::Vllm, VLLM_LEGACY),
        (Engine::Sglang, SGLANG),
        (Engine::TrtllmServe, TRTLLM_SERVE),
        (Engine::Triton, TRITON),
        (Engine::Llamacpp, LLAMACPP),
    ] {
        let all = infergate_scrape::text::parse(page).unwrap();
        let some = infergate_scrape::text::parse_only(page, |n| {
            infergate_scrape::engines::reads(engine, n)
        })
        .unwrap();
        assert!(
            some.len() < all.len(),
            "{engine}: the filter should skip something"
        );
        assert_eq!(
            extract(engine, &some).unwrap(),
            extract(engine, &all).unwrap(),
            "{engine}"
        );
    }
}

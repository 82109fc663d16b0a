use super::*;

const HEADER: &str =
    "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n";

fn load(text: &str) -> EndpointPickerConfig {
    match EndpointPickerConfig::from_yaml_str(text, "epp.yaml") {
        Ok(config) => config,
        Err(err) => panic!("expected the config to load, got:\n{err}"),
    }
}

fn fail(text: &str) -> LoadError {
    match EndpointPickerConfig::from_yaml_str(text, "epp.yaml") {
        Ok(config) => panic!("expected an error, loaded {config:?}"),
        Err(err) => err,
    }
}

/// The 1-based line of the only line of `text` containing `needle`.
fn line(text: &str, needle: &str) -> usize {
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(hits.len(), 1, "{needle:?} must occur once in the fixture");
    hits[0]
}

fn refs(profile: &SchedulingProfile) -> Vec<(&str, Option<f64>)> {
    profile
        .plugins
        .iter()
        .map(|p| (p.plugin_ref.as_str(), p.weight))
        .collect()
}

fn assert_problem(err: &LoadError, path: &str, line: usize) {
    assert_eq!(
        err.path().map(|p| p.to_string()).as_deref(),
        Some(path),
        "{err}"
    );
    assert_eq!(err.line(), Some(line), "{err}");
}

#[test]
fn no_file_gives_the_reference_default_profile() {
    let config = EndpointPickerConfig::default_config();
    assert_eq!(config.scheduling_profiles.len(), 1);
    let profile = &config.scheduling_profiles[0];
    assert_eq!(profile.name, "default");
    assert_eq!(
        refs(profile),
        [
            ("queue-scorer", Some(2.0)),
            ("kv-cache-utilization-scorer", Some(2.0)),
            ("prefix-cache-scorer", Some(3.0)),
            ("max-score-picker", None),
        ]
    );
    assert_eq!(
        config.plugin("max-score-picker").unwrap().kind,
        PluginKind::MaxScorePicker(PickerParams {
            max_num_of_endpoints: 1
        })
    );
    assert_eq!(
        config.plugin("prefix-cache-scorer").unwrap().kind,
        PluginKind::PrefixCacheScorer(PrefixCacheParams {
            block_size_tokens: 16,
            block_size: None,
            max_prefix_blocks_to_match: 256,
            lru_capacity_per_server: 31_250,
            auto_tune: true,
            max_index_entries: 4_000_000,
        })
    );
    assert!(config.plugin("single-profile-handler").is_some());
    assert!(config.plugin("approx-prefix-cache-producer").is_some());
    assert_eq!(config.saturation_detector, "utilization-detector");
    assert_eq!(
        config.plugin("utilization-detector").unwrap().kind,
        PluginKind::UtilizationDetector(UtilizationDetectorParams {
            queue_depth_threshold: 5,
            kv_cache_util_threshold: 0.8,
            metrics_staleness_threshold: Duration::from_millis(200),
            headroom: 0.0,
        })
    );
    // An empty file, or one with only a header, means the same.
    assert_eq!(load("# nothing yet\n"), config);
    assert_eq!(load(HEADER), config);
}

#[test]
fn plugins_without_profiles_form_the_default_profile_in_order() {
    let text = format!("{HEADER}plugins:\n- type: least-queue-filter\n- type: queue-scorer\n");
    let config = load(&text);
    assert_eq!(
        refs(&config.scheduling_profiles[0]),
        [
            ("least-queue-filter", None),
            ("queue-scorer", None),
            ("max-score-picker", None)
        ]
    );
    assert_eq!(config.scheduling_profiles[0].plugins[1].weight(), 1.0);
}

#[test]
fn profile_without_picker_gets_max_score_picker() {
    let text = format!(
        "{HEADER}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: main\n  plugins:\n  \
         - pluginRef: queue-scorer\n    weight: 4.5\n"
    );
    let config = load(&text);
    let profile = config.profile("main").unwrap();
    assert_eq!(
        refs(profile),
        [("queue-scorer", Some(4.5)), ("max-score-picker", None)]
    );
    assert_eq!(
        config.plugin("max-score-picker").unwrap().kind.category(),
        PluginCategory::Picker
    );
}

#[test]
fn typed_plugin_type_lists_the_known_types() {
    let text = format!(
        "{HEADER}plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n- type: qeue-scorer\n"
    );
    let err = fail(&text);
    assert_problem(&err, "plugins[2].type", line(&text, "qeue"));
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "epp.yaml:{}: plugins[2].type: \"qeue-scorer\" is unknown (known: queue-scorer, ",
            line(&text, "qeue")
        )),
        "{message}"
    );
    for known in KNOWN_PLUGIN_TYPES {
        assert!(message.contains(known), "{message} lacks {known}");
    }
}

#[test]
fn unknown_parameter_is_rejected_with_path_line_and_the_expected_keys() {
    let text = format!(
        "{HEADER}plugins:\n- type: queue-scorer\n- type: max-score-picker\n- type: prefix-cache-scorer\n  \
         parameters:\n    maxPrefixBlocksToMatch: 128\n    blockSizeTokenz: 32\n"
    );
    let err = fail(&text);
    assert_problem(
        &err,
        "plugins[2].parameters.blockSizeTokenz",
        line(&text, "Tokenz"),
    );
    let message = err.to_string();
    assert!(
        message.contains("unknown field (expected one of"),
        "{message}"
    );
    assert!(message.contains("blockSizeTokens"), "{message}");
}

#[test]
fn plugin_without_parameters_rejects_any() {
    let text = format!("{HEADER}plugins:\n- type: queue-scorer\n  parameters:\n    weight: 2\n");
    let err = fail(&text);
    assert_problem(&err, "plugins[0].parameters.weight", line(&text, "weight"));
    assert!(err.to_string().contains("takes no fields"), "{err}");
    // An empty or null parameters block is fine.
    load(&format!(
        "{HEADER}plugins:\n- type: queue-scorer\n  parameters: {{}}\n"
    ));
    load(&format!(
        "{HEADER}plugins:\n- type: queue-scorer\n  parameters:\n"
    ));
}

#[test]
fn unknown_keys_anywhere_are_rejected_with_path_and_line() {
    // `data:` is how the reference's docs spell `dataLayer`.
    let cases = [
        (format!("{HEADER}data:\n  sources: []\n"), "data", "data:"),
        (
            format!(
                "{HEADER}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  \
                 - pluginRef: queue-scorer\n    weigth: 2\n"
            ),
            "schedulingProfiles[0].plugins[0].weigth",
            "weigth",
        ),
        (
            format!("{HEADER}plugins:\n- type: queue-scorer\n  params: {{}}\n"),
            "plugins[0].params",
            "params",
        ),
        (
            format!("{HEADER}saturationDetector:\n  pluginRef: x\n  extra: 1\n"),
            "saturationDetector.extra",
            "extra",
        ),
    ];
    for (text, path, needle) in cases {
        let err = fail(&text);
        assert_problem(&err, path, line(&text, needle));
    }
}

#[test]
fn parameters_are_typed_with_defaults_for_missing_keys() {
    let text = format!(
        "{HEADER}plugins:\n- type: utilization-detector\n  parameters:\n    \
         metricsStalenessThreshold: 1m30s\n    headroom: 0.1\n- type: low-queue-filter\n\
         - type: prefix-cache-affinity-filter\n  parameters:\n    threshold: 0.75\n\
         - name: fallbacks\n  type: max-score-picker\n  parameters:\n    maxNumOfEndpoints: 3\n\
         - type: metrics-data-source\n  parameters:\n    scheme: https\n"
    );
    let config = load(&text);
    let PluginKind::UtilizationDetector(detector) =
        &config.plugin("utilization-detector").unwrap().kind
    else {
        panic!("wrong kind")
    };
    assert_eq!(
        detector.metrics_staleness_threshold,
        Duration::from_secs(90)
    );
    assert_eq!(detector.queue_depth_threshold, 5);
    assert_eq!(detector.headroom, 0.1);
    assert_eq!(
        config.plugin("low-queue-filter").unwrap().kind,
        PluginKind::LowQueueFilter(LowQueueParams { threshold: 128 })
    );
    assert_eq!(
        config.plugin("prefix-cache-affinity-filter").unwrap().kind,
        PluginKind::PrefixCacheAffinityFilter(PrefixCacheAffinityParams { threshold: 0.75 })
    );
    let fallbacks = config.plugin("fallbacks").unwrap();
    assert_eq!(fallbacks.kind.type_name(), "max-score-picker");
    assert_eq!(
        fallbacks.kind,
        PluginKind::MaxScorePicker(PickerParams {
            max_num_of_endpoints: 3
        })
    );
    assert_eq!(
        config.plugin("metrics-data-source").unwrap().kind,
        PluginKind::MetricsDataSource(MetricsDataSourceParams {
            scheme: Scheme::Https,
            path: "/metrics".into(),
            insecure_skip_verify: true,
        })
    );
    assert_eq!(config.saturation_detector, "utilization-detector");
}

#[test]
fn parameter_ranges_are_enforced_with_path_and_line() {
    let cases = [
        (
            "max-score-picker",
            "maxNumOfEndpoints: 0",
            "maxNumOfEndpoints",
        ),
        (
            "prefix-cache-affinity-filter",
            "threshold: 1.5",
            "threshold",
        ),
        (
            "prefix-cache-scorer",
            "blockSizeTokens: 0",
            "blockSizeTokens",
        ),
        (
            "utilization-detector",
            "kvCacheUtilThreshold: 0",
            "kvCacheUtilThreshold",
        ),
        (
            "utilization-detector",
            "metricsStalenessThreshold: 200",
            "metricsStalenessThreshold",
        ),
        (
            "utilization-detector",
            "metricsStalenessThreshold: 2 s",
            "metricsStalenessThreshold",
        ),
        (
            "utilization-detector",
            "queueDepthThreshold: -1",
            "queueDepthThreshold",
        ),
        ("metrics-data-source", "scheme: ftp", "scheme"),
    ];
    for (plugin, parameter, key) in cases {
        let text = format!(
            "{HEADER}plugins:\n- type: queue-scorer\n- type: {plugin}\n  parameters:\n    {parameter}\n"
        );
        let err = fail(&text);
        assert_problem(
            &err,
            &format!("plugins[1].parameters.{key}"),
            line(&text, parameter),
        );
    }
}

#[test]
fn go_durations_parse_like_go() {
    assert_eq!(parse_go_duration("200ms"), Ok(Duration::from_millis(200)));
    assert_eq!(parse_go_duration("2s"), Ok(Duration::from_secs(2)));
    assert_eq!(
        parse_go_duration("1h1m1.5s"),
        Ok(Duration::from_millis(3_661_500))
    );
    assert_eq!(parse_go_duration("250us"), Ok(Duration::from_micros(250)));
    assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
    assert!(parse_go_duration("5").is_err());
    assert!(parse_go_duration("-1s").is_err());
    assert!(parse_go_duration("1d").is_err());
    assert!(parse_go_duration("").is_err());
}

#[test]
fn profile_references_must_name_defined_plugins() {
    let text = format!(
        "{HEADER}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  \
         - pluginRef: kv-cache-utilization-scorer\n"
    );
    let err = fail(&text);
    assert_problem(
        &err,
        "schedulingProfiles[0].plugins[0].pluginRef",
        line(&text, "pluginRef: kv"),
    );
    assert!(err.to_string().contains("(defined: queue-scorer)"), "{err}");
}

#[test]
fn a_profile_has_at_most_one_picker() {
    let text = format!(
        "{HEADER}plugins:\n- type: max-score-picker\n- type: random-picker\nschedulingProfiles:\n\
         - name: p\n  plugins:\n  - pluginRef: max-score-picker\n  - pluginRef: random-picker\n"
    );
    let err = fail(&text);
    assert_problem(
        &err,
        "schedulingProfiles[0].plugins[1].pluginRef",
        line(&text, "pluginRef: random"),
    );
    // Without profiles, two pickers cannot both join the default profile.
    let text = format!("{HEADER}plugins:\n- type: max-score-picker\n- type: random-picker\n");
    let err = fail(&text);
    assert_problem(&err, "plugins[1]", line(&text, "random-picker"));
}

#[test]
fn weights_belong_to_scorers_and_are_not_negative() {
    let text = format!(
        "{HEADER}plugins:\n- type: least-queue-filter\nschedulingProfiles:\n- name: p\n  plugins:\n  \
         - pluginRef: least-queue-filter\n    weight: 2\n"
    );
    let err = fail(&text);
    assert_problem(
        &err,
        "schedulingProfiles[0].plugins[0].weight",
        line(&text, "weight"),
    );
    assert!(
        err.to_string().contains("only scorers take a weight"),
        "{err}"
    );

    let text = format!(
        "{HEADER}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  \
         - pluginRef: queue-scorer\n    weight: -1\n"
    );
    let err = fail(&text);
    assert_problem(
        &err,
        "schedulingProfiles[0].plugins[0].weight",
        line(&text, "weight"),
    );
}

#[test]
fn plugin_names_default_to_the_type_and_must_be_unique() {
    let text = format!("{HEADER}plugins:\n- type: queue-scorer\n- name: queue-scorer\n  type: kv-cache-utilization-scorer\n");
    let err = fail(&text);
    assert_problem(&err, "plugins[1].name", line(&text, "name: queue-scorer"));
    assert!(
        err.to_string().contains("already used by plugins[0]"),
        "{err}"
    );
}

#[test]
fn references_outside_profiles_are_checked() {
    let text = format!(
        "{HEADER}plugins:\n- type: queue-scorer\nsaturationDetector:\n  pluginRef: queue-scorer\n"
    );
    let err = fail(&text);
    assert_problem(
        &err,
        "saturationDetector.pluginRef",
        line(&text, "pluginRef"),
    );

    let text = format!(
        "{HEADER}plugins:\n- type: metrics-data-source\ndataLayer:\n  sources:\n  - pluginRef: metrics-data-source\n    \
         extractors:\n    - pluginRef: core-metrics-extractor\n"
    );
    let err = fail(&text);
    assert_problem(
        &err,
        "dataLayer.sources[0].extractors[0].pluginRef",
        line(&text, "pluginRef: core"),
    );
}

#[test]
fn feature_gates_api_version_and_flow_control_shape_are_checked() {
    let text = format!("{HEADER}featureGates:\n- flowControl\n- flowControll\n");
    let err = fail(&text);
    assert_problem(&err, "featureGates[1]", line(&text, "flowControll"));

    // The reference's flow-control guide uses this apiVersion by mistake.
    let text = HEADER.replace("inference.networking.x-k8s.io", "config.x-k8s.io");
    let err = fail(&text);
    assert_problem(&err, "apiVersion", 1);

    let err = fail(&format!("{HEADER}flowControl: [1]\n"));
    assert_problem(&err, "flowControl", 3);
    let config = load(&format!(
        "{HEADER}featureGates: [flowControl]\nflowControl:\n  maxRequests: 100\n  defaultRequestTTL: 1500ms\n"
    ));
    let fc = config.flow_control.unwrap();
    assert_eq!(fc.max_requests, 100);
    assert_eq!(fc.max_bytes, 1 << 30);
    assert_eq!(
        fc.default_request_ttl,
        std::time::Duration::from_millis(1500)
    );

    // The gate alone turns flow control on with the defaults; neither means off.
    let config = load(&format!("{HEADER}featureGates: [flowControl]\n"));
    assert_eq!(config.flow_control, Some(Default::default()));
    assert_eq!(load(HEADER).flow_control, None);

    // A section the gate would ignore, per-band settings and a zero TTL are refused.
    let text = format!("{HEADER}flowControl:\n  maxRequests: 100\n");
    assert_problem(&fail(&text), "flowControl", line(&text, "flowControl:"));
    let text = format!("{HEADER}featureGates: [flowControl]\nflowControl:\n  priorityBands: []\n");
    let err = fail(&text);
    assert!(err.to_string().contains("priorityBands"), "{err}");
    let text =
        format!("{HEADER}featureGates: [flowControl]\nflowControl:\n  defaultRequestTTL: 0s\n");
    assert_problem(
        &fail(&text),
        "flowControl.defaultRequestTTL",
        line(&text, "defaultRequestTTL"),
    );
}

#[test]
fn legacy_names_from_v1_samples_are_accepted() {
    let text = format!(
        "{HEADER}plugins:\n- type: kv-cache-scorer\n- type: prefix-cache-scorer\n  parameters:\n    \
         hashBlockSize: 64\n"
    );
    let config = load(&text);
    assert_eq!(
        config.plugin("kv-cache-scorer").unwrap().kind,
        PluginKind::KvCacheUtilizationScorer
    );
    let PluginKind::PrefixCacheScorer(params) = &config.plugin("prefix-cache-scorer").unwrap().kind
    else {
        panic!("wrong kind")
    };
    assert_eq!(params.block_size, Some(64));
}

#[test]
fn a_second_document_is_rejected() {
    let text = format!("{HEADER}---\n{HEADER}");
    let err = fail(&text);
    assert_eq!(err.line(), Some(4));
}

#[test]
fn example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/epp-config.yaml");
    let config = match EndpointPickerConfig::load(&path) {
        Ok(config) => config,
        Err(err) => panic!("{err}"),
    };
    let profile = config.profile("default").unwrap();
    let picker = profile
        .plugins
        .iter()
        .filter(|p| config.plugin(&p.plugin_ref).unwrap().kind.category() == PluginCategory::Picker)
        .count();
    assert_eq!(picker, 1);
    assert!(config.plugin("approx-prefix-cache-producer").is_some());
}

#[test]
fn builtin_profiles_parse_and_unknown_names_do_not() {
    for name in BUILTIN_PROFILES {
        let cfg = EndpointPickerConfig::builtin(name).expect(name);
        assert_eq!(cfg.scheduling_profiles.len(), 1, "{name}");
    }
    let ours = EndpointPickerConfig::builtin("infergate").unwrap();
    assert!(ours.plugins.iter().any(
        |p| matches!(&p.kind, PluginKind::PredictedLatencyScorer(q) if q.duplicate_cost == 3.0)
    ));
    assert_eq!(EndpointPickerConfig::builtin("fastest"), None);
}

#[test]
fn predicted_latency_params_are_checked() {
    let text = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: predicted-latency-scorer\n  parameters: {priorTokensPerSecond: 0, duplicateCost: -1, loraWaitTime: 3s}\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: predicted-latency-scorer\n";
    let err = EndpointPickerConfig::from_yaml_str(text, "epp.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("priorTokensPerSecond") && err.contains("duplicateCost"),
        "{err}"
    );
}

#[test]
fn concurrency_detector_has_the_reference_defaults_and_checks_its_limits() {
    let config = load(&format!("{HEADER}plugins:\n- type: concurrency-detector\n"));
    assert_eq!(config.saturation_detector, "concurrency-detector");
    assert_eq!(
        config.plugin("concurrency-detector").unwrap().kind,
        PluginKind::ConcurrencyDetector(ConcurrencyDetectorParams {
            max_concurrency: 100,
            max_token_concurrency: 1_000_000,
            headroom: 0.0,
        })
    );
    let text = format!(
        "{HEADER}plugins:\n- type: concurrency-detector\n  parameters:\n    maxConcurrency: 0\n"
    );
    assert_problem(
        &fail(&text),
        "plugins[0].parameters.maxConcurrency",
        line(&text, "maxConcurrency"),
    );
}

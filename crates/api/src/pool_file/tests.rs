use super::*;
use crate::resources::{AppProtocol, FailureMode, MatchType};

fn load(text: &str) -> PoolFile {
    match PoolFile::from_yaml_str(text, "pool.yaml") {
        Ok(file) => file,
        Err(err) => panic!("expected the pool file to load, got:\n{err}"),
    }
}

fn fail(text: &str) -> LoadError {
    match PoolFile::from_yaml_str(text, "pool.yaml") {
        Ok(file) => panic!("expected an error, loaded {file:?}"),
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

fn mk_objective(name: &str, pool: &str) -> String {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
         metadata:\n  name: {name}\nspec:\n  poolRef:\n    name: {pool}\n"
    )
}

fn mk_endpoints(name: &str, addresses: &[&str]) -> String {
    let mut text = format!(
        "apiVersion: infergate.dev/v1alpha1\nkind: StaticEndpoints\nmetadata:\n  name: {name}\n\
         spec:\n  endpoints:\n"
    );
    for address in addresses {
        let (ip, port) = address.rsplit_once(':').unwrap();
        text += &format!("  - address: \"{ip}\"\n    port: {port}\n");
    }
    text
}

const POOL: &str = "\
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata:
  name: llama
spec:
  selector:
    matchLabels:
      app: llama
  targetPorts:
  - number: 8000
  endpointPickerRef:
    name: llama-epp
    port:
      number: 9002
";

/// `kubectl get inferencemodelrewrite -o yaml` output, with server-side fields.
const KUBECTL_REWRITE: &str = r#"apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata:
  creationTimestamp: "2025-10-02T08:30:00Z"
  generation: 2
  managedFields:
  - apiVersion: inference.networking.x-k8s.io/v1alpha2
    fieldsType: FieldsV1
    fieldsV1:
      f:spec:
        .: {}
        f:rules: {}
    manager: kubectl
    operation: Update
    time: "2025-10-02T08:30:00Z"
  name: llama-canary
  namespace: default
  resourceVersion: "98765"
  uid: 5f1d2c3b-0a9e-4e7d-8c6b-1a2b3c4d5e6f
spec:
  poolRef:
    name: llama
  rules:
  - matches:
    - model:
        value: llama-3
    targets:
    - modelRewrite: llama-3.1-8b
      weight: 90
    - modelRewrite: llama-3.2-8b
      weight: 10
status:
  conditions:
  - type: Accepted
    status: "True"
"#;

#[test]
fn kubectl_shaped_objects_load_with_defaults_applied() {
    let text = format!(
        "{POOL}---\n{KUBECTL_REWRITE}---\n{}---\n{}",
        mk_objective("batch", "llama"),
        mk_endpoints("gpus", &["10.0.0.1:8000"])
    );
    let file = load(&text);
    let pool = file.pool.expect("pool");
    assert_eq!(pool.metadata.name, "llama");
    assert_eq!(pool.spec.app_protocol, AppProtocol::Http);
    let picker = pool.spec.endpoint_picker_ref.expect("picker ref");
    assert_eq!(picker.failure_mode, FailureMode::FailClose);
    assert_eq!(picker.kind, "Service");

    let rewrite = &file.rewrites[0];
    assert_eq!(rewrite.metadata.name, "llama-canary");
    let rule = &rewrite.spec.rules[0];
    assert_eq!(rule.matches[0].model.match_type, MatchType::Exact);
    assert_eq!(rule.targets[1].weight(), 10);

    assert_eq!(file.objectives[0].priority(), 0);
    assert_eq!(file.endpoints[0].engine, Engine::Vllm);
    assert_eq!(file.endpoints[0].display_name(), "10.0.0.1:8000");
}

#[test]
fn third_document_errors_report_lines_of_the_whole_file() {
    // serde_yaml_ng parses the stream with one parser, so its marks are already absolute;
    // this test keeps us honest if that ever changes.
    let third = "\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata:
  name: chat
spec:
  poolRef:
    name: llama
  priorty: 3
";
    let text = format!("{POOL}---\n{}---\n{third}", mk_objective("batch", "llama"));
    let err = fail(&text);
    assert_eq!(err.line(), Some(line(&text, "priorty")));
    assert_eq!(err.path().unwrap().to_string(), "spec.priorty");

    // The same for a rule serde does not check: the line is found by walking the document.
    let third = KUBECTL_REWRITE.replace("weight: 10", "weight: 0");
    let text = format!("{POOL}---\n{}---\n{third}", mk_objective("batch", "llama"));
    let err = fail(&text);
    assert_eq!(err.line(), Some(line(&text, "weight: 0")));
    assert_eq!(
        err.to_string(),
        format!(
            "pool.yaml:{}: spec.rules[0].targets[1].weight: 0 is out of range 1..=1000000 \
             (in InferenceModelRewrite \"llama-canary\")",
            line(&text, "weight: 0")
        )
    );
}

#[test]
fn unknown_spec_key_is_rejected_with_its_path_and_line() {
    let text = POOL.replace("  targetPorts:", "  targetPort: 8000\n  targetPorts:");
    let err = fail(&text);
    assert_eq!(err.path().unwrap().to_string(), "spec.targetPort");
    assert_eq!(err.line(), Some(line(&text, "targetPort:")));
    assert!(err.to_string().contains("expected one of"), "{err}");
}

#[test]
fn unknown_metadata_keys_are_ignored_but_unknown_top_level_keys_are_not() {
    let text = POOL.replace(
        "  name: llama\n",
        "  name: llama\n  uid: abc\n  generation: 3\n",
    );
    load(&text);
    let text = format!("{POOL}specs: {{}}\n");
    let err = fail(&text);
    assert_eq!(err.path().unwrap().to_string(), "specs");
    assert_eq!(err.line(), Some(line(&text, "specs")));
}

#[test]
fn pool_rules_are_enforced_with_paths() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "      app: llama\n",
            "      {}\n",
            "spec.selector.matchLabels",
        ),
        (
            "  - number: 8000\n",
            "  - number: 8000\n  - number: 8000\n",
            "spec.targetPorts[1].number",
        ),
        (
            "  - number: 8000\n",
            "  - number: 70000\n",
            "spec.targetPorts[0].number",
        ),
        (
            "  targetPorts:\n  - number: 8000\n",
            "  targetPorts: []\n",
            "spec.targetPorts",
        ),
        (
            "    port:\n      number: 9002\n",
            "",
            "spec.endpointPickerRef.port",
        ),
        (
            "      number: 9002\n",
            "      number: 0\n",
            "spec.endpointPickerRef.port.number",
        ),
    ];
    for (from, to, path) in cases {
        let text = POOL.replace(from, to);
        let err = fail(&text);
        assert_eq!(err.path().unwrap().to_string(), *path, "{err}");
        assert!(err.line().is_some(), "{err}");
    }
    let nine_ports: String = (1..=9)
        .map(|p| format!("  - number: {}\n", 8000 + p))
        .collect();
    let err = fail(&POOL.replace("  - number: 8000\n", &nine_ports));
    assert_eq!(err.path().unwrap().to_string(), "spec.targetPorts");
    assert!(err.to_string().contains("1 to 8"), "{err}");
}

#[test]
fn failure_mode_and_app_protocol_accept_only_their_values() {
    let text = POOL.replace(
        "    name: llama-epp\n",
        "    name: llama-epp\n    failureMode: FailOpen\n",
    );
    let file = load(&text);
    let picker = file.pool.unwrap().spec.endpoint_picker_ref.unwrap();
    assert_eq!(picker.failure_mode, FailureMode::FailOpen);

    let text = POOL.replace(
        "    name: llama-epp\n",
        "    name: llama-epp\n    failureMode: Open\n",
    );
    let err = fail(&text);
    assert_eq!(
        err.path().unwrap().to_string(),
        "spec.endpointPickerRef.failureMode"
    );
    assert_eq!(err.line(), Some(line(&text, "failureMode")));

    let text = POOL.replace(
        "  targetPorts:",
        "  appProtocol: kubernetes.io/h2c\n  targetPorts:",
    );
    assert_eq!(
        load(&text).pool.unwrap().spec.app_protocol,
        AppProtocol::H2c
    );
}

#[test]
fn rewrite_rules_are_enforced_with_paths_and_lines() {
    let cases: &[(&str, &str, &str, &str)] = &[
        ("value: llama-3", "value: \"\"", "spec.rules[0].matches[0].model.value", "value: \"\""),
        (
            "    - modelRewrite: llama-3.1-8b\n      weight: 90\n    - modelRewrite: llama-3.2-8b\n      weight: 10\n",
            "",
            "spec.rules[0].targets",
            "    targets:",
        ),
        ("weight: 90", "weight: 1000001", "spec.rules[0].targets[0].weight", "1000001"),
        ("modelRewrite: llama-3.1-8b", "modelRewrite: \"\"", "spec.rules[0].targets[0].modelRewrite", "modelRewrite: \"\""),
        ("        value: llama-3", "        type: Prefix\n        value: llama-3", "spec.rules[0].matches[0].model.type", "Prefix"),
    ];
    for (from, to, path, needle) in cases {
        let text = KUBECTL_REWRITE.replace(from, to);
        let err = fail(&text);
        assert_eq!(err.path().unwrap().to_string(), *path, "{err}");
        assert_eq!(err.line(), Some(line(&text, needle)), "{err}");
    }
}

#[test]
fn rewrite_target_without_weight_counts_as_one_and_empty_matches_match_all() {
    let text = KUBECTL_REWRITE
        .replace(
            "  - matches:\n    - model:\n        value: llama-3\n    targets:",
            "  - targets:",
        )
        .replace("      weight: 90\n", "");
    let file = load(&text);
    let rule = &file.rewrites[0].spec.rules[0];
    assert!(rule.matches.is_empty());
    assert_eq!(rule.targets[0].weight, None);
    assert_eq!(rule.targets[0].weight(), 1);
}

#[test]
fn rewrites_come_oldest_first_then_untimestamped_in_file_order() {
    let mk = |name: &str, created: Option<&str>| {
        let ts = created
            .map(|t| format!("  creationTimestamp: \"{t}\"\n"))
            .unwrap_or_default();
        format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\n\
             metadata:\n  name: {name}\n{ts}spec:\n  poolRef: {{name: llama}}\n  rules:\n  \
             - targets: [{{modelRewrite: m}}]\n"
        )
    };
    let text = [
        mk("untimed-a", None),
        mk("newer", Some("2025-10-02T00:00:00Z")),
        mk("untimed-b", None),
        mk("older", Some("2025-10-01T23:00:00-02:00")),
    ]
    .join("---\n");
    let names: Vec<String> = load(&text)
        .rewrites
        .into_iter()
        .map(|r| r.metadata.name)
        .collect();
    // 23:00 at -02:00 is 01:00 UTC on the 2nd, after midnight UTC.
    assert_eq!(names, ["newer", "older", "untimed-a", "untimed-b"]);
}

#[test]
fn legacy_inference_model_loads_and_maps_criticality() {
    let text = "\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata:
  name: chatbot
spec:
  modelName: chatbot
  criticality: Sheddable
  poolRef:
    name: llama
  targetModels:
  - name: chatbot-v1
    weight: 50
  - name: chatbot-v2
    weight: 50
";
    let file = load(text);
    assert_eq!(file.models[0].priority(), -1);
    let err = fail(&text.replace("Sheddable", "Low"));
    assert_eq!(err.path().unwrap().to_string(), "spec.criticality");
    assert_eq!(err.line(), Some(7));
}

#[test]
fn empty_documents_are_skipped_and_endpoint_lists_concatenated() {
    let text = format!(
        "---\n# nothing here\n---\n{}---\n---\n{}",
        mk_endpoints("a", &["10.0.0.1:8000", "10.0.0.2:8000"]),
        mk_endpoints("b", &["fd00::1:8000"]),
    );
    let file = load(&text);
    let addrs: Vec<String> = file
        .endpoints
        .iter()
        .map(|e| e.socket_addr().to_string())
        .collect();
    assert_eq!(addrs, ["10.0.0.1:8000", "10.0.0.2:8000", "[fd00::1]:8000"]);
    assert!(file.pool.is_none());
}

#[test]
fn endpoint_engine_labels_and_name_are_read() {
    let text = "\
apiVersion: infergate.dev/v1alpha1
kind: StaticEndpoints
metadata:
  name: gpus
spec:
  endpoints:
  - address: 10.0.0.7
    port: 30000
    engine: sglang
    name: sglang-0
    labels:
      zone: a
";
    let endpoint = &load(text).endpoints[0];
    assert_eq!(endpoint.engine, Engine::Sglang);
    assert_eq!(endpoint.engine.as_str(), "sglang");
    assert_eq!(endpoint.display_name(), "sglang-0");
    assert_eq!(endpoint.labels["zone"], "a");

    let err = fail(&text.replace("sglang\n", "tgi\n"));
    assert_eq!(err.path().unwrap().to_string(), "spec.endpoints[0].engine");
    assert!(err.to_string().contains("trtllm-serve"), "{err}");
    assert_eq!(err.line(), Some(9));
}

#[test]
fn bad_endpoint_address_and_port_are_rejected() {
    let err = fail(&mk_endpoints("a", &["10.0.0.300:8000"]));
    assert_eq!(err.path().unwrap().to_string(), "spec.endpoints[0].address");
    assert_eq!(err.line(), Some(7));
    let err = fail(&mk_endpoints("a", &["10.0.0.3:0"]));
    assert_eq!(err.path().unwrap().to_string(), "spec.endpoints[0].port");
    assert_eq!(err.line(), Some(8));
    let err = fail(&mk_endpoints("a", &["10.0.0.3:65536"]));
    assert_eq!(err.path().unwrap().to_string(), "spec.endpoints[0].port");
}

#[test]
fn duplicate_endpoints_are_rejected_even_across_documents() {
    let text = format!(
        "{}---\n{}",
        mk_endpoints("a", &["10.0.0.1:8000"]),
        mk_endpoints("b", &["10.0.0.2:8000", "10.0.0.1:8000"]),
    );
    let err = fail(&text);
    assert_eq!(err.problems().len(), 1);
    assert_eq!(err.path().unwrap().to_string(), "spec.endpoints[1].address");
    assert_eq!(err.line(), Some(18));
    let message = err.to_string();
    assert!(
        message.contains("10.0.0.1:8000 is listed twice (first at line 7)"),
        "{message}"
    );
    assert!(message.contains("StaticEndpoints \"b\""), "{message}");
    // Same address, different port: two endpoints.
    load(&mk_endpoints("a", &["10.0.0.1:8000", "10.0.0.1:8001"]));
}

#[test]
fn duplicate_objective_names_are_rejected() {
    let text = format!(
        "{}---\n{}",
        mk_objective("chat", "llama"),
        mk_objective("chat", "llama")
    );
    let err = fail(&text);
    assert_eq!(err.path().unwrap().to_string(), "metadata.name");
    assert_eq!(err.line(), Some(12));
    assert!(
        err.to_string().contains("listed twice (first at line 4)"),
        "{err}"
    );
}

#[test]
fn pool_refs_must_name_the_files_pool() {
    let text = format!("{POOL}---\n{}", mk_objective("chat", "mistral"));
    let err = fail(&text);
    assert_eq!(err.path().unwrap().to_string(), "spec.poolRef.name");
    assert_eq!(err.line(), Some(line(&text, "name: mistral")));
    assert!(err.to_string().contains("\"mistral\""), "{err}");

    // Without an InferencePool document, references must agree with each other.
    let text = format!(
        "{}---\n{}",
        mk_objective("a", "llama"),
        mk_objective("b", "mistral")
    );
    let err = fail(&text);
    assert_eq!(err.line(), Some(line(&text, "name: mistral")));
}

#[test]
fn second_inference_pool_is_rejected() {
    let text = format!(
        "{POOL}---\n{}",
        POOL.replace("name: llama\n", "name: other\n")
    );
    let err = fail(&text);
    assert_eq!(err.line(), Some(16));
    assert!(
        err.to_string().contains("at most one InferencePool"),
        "{err}"
    );
}

#[test]
fn unknown_kind_and_api_version_list_the_known_ones() {
    let text = format!("{POOL}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: x\n");
    let err = fail(&text);
    assert_eq!(err.line(), Some(17));
    assert_eq!(err.path().unwrap().to_string(), "kind");
    let message = err.to_string();
    for (kind, version) in KNOWN_KINDS {
        assert!(
            message.contains(kind) && message.contains(version),
            "{message}"
        );
    }

    let text = POOL.replace(
        "inference.networking.k8s.io/v1",
        "inference.networking.x-k8s.io/v1alpha2",
    );
    let err = fail(&text);
    assert_eq!(err.path().unwrap().to_string(), "apiVersion");
    assert_eq!(err.line(), Some(1));
    assert!(
        err.to_string()
            .contains("expected inference.networking.k8s.io/v1"),
        "{err}"
    );

    let err = fail("metadata:\n  name: x\n");
    assert_eq!(err.path().unwrap().to_string(), "kind");

    let err = fail("- a\n- b\n");
    assert_eq!(err.line(), Some(1));
    assert!(
        err.to_string()
            .contains("must be an object with apiVersion, kind"),
        "{err}"
    );
}

#[test]
fn yaml_syntax_errors_report_their_line() {
    // A broken flow sequence late in a document: the syntax error is reported, not the
    // type error that the events read before it would give.
    let text = format!("{POOL}---\nkind: [InferencePool\nmetadata: {{name: x}}\n");
    let err = fail(&text);
    assert!(err.to_string().contains("did not find expected"), "{err}");
    assert_eq!(err.path(), Some(&FieldPath::root()));
    assert_eq!(err.line(), Some(17));
    // A broken first token of a later document.
    let text = format!("{POOL}---\n: : x\n  - ]\n");
    let err = fail(&text);
    assert!(err.line().is_some_and(|l| l >= 16), "{err}");
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let text = format!(
        "{}---\n{}",
        KUBECTL_REWRITE.replace("weight: 90", "weight: 0"),
        mk_endpoints("a", &["10.0.0.1:0"])
    );
    let err = fail(&text);
    let paths: Vec<String> = err.problems().iter().map(|p| p.path.to_string()).collect();
    assert_eq!(
        paths,
        ["spec.rules[0].targets[0].weight", "spec.endpoints[0].port"]
    );
}

#[test]
fn load_reads_a_file_and_names_it_in_errors() {
    let dir = std::env::temp_dir().join(format!("infergate-api-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad-pool.yaml");
    std::fs::write(&path, mk_endpoints("a", &["10.0.0.1:0"])).unwrap();
    let err = PoolFile::load(&path).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}:8: ", path.display())),
        "{err}"
    );

    let missing = PoolFile::load(&dir.join("missing.yaml")).unwrap_err();
    assert!(matches!(missing, LoadError::Read { .. }));
    assert!(
        missing.to_string().contains("missing.yaml: cannot read"),
        "{missing}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn example_pool_file_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/pool.yaml");
    let file = match PoolFile::load(&path) {
        Ok(file) => file,
        Err(err) => panic!("{err}"),
    };
    assert_eq!(file.pool.as_ref().unwrap().metadata.name, "llama3-8b");
    assert!(file.endpoints.len() >= 2);
    assert!(!file.objectives.is_empty());
    assert!(!file.rewrites.is_empty());
}

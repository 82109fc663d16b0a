//! `infergate crds`: the CustomResourceDefinitions built from the api types.
//!
//! - They parse as CustomResourceDefinitions with the upstream group, version, kind, plural,
//!   short names and field names.
//! - Example objects (tests/data/examples.yaml) read into our types, survive a round trip,
//!   and pass the generated schema, including its CEL rules as an API server evaluates them
//!   (kube-cel). No API server runs here, so the structural part of the schema (types,
//!   required fields, ranges, lengths, enums) is checked by a small validator below.
//! - Broken objects are refused by both our `validate()` and the CRD, with the reason.

use infergate_api::resources::{
    InferenceModel, InferenceModelRewrite, InferenceObjective, InferencePool, Resource,
};
use infergate_k8s::crd::{crds, crds_yaml};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

fn docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The generated CRD for `kind`, as JSON.
fn schema_of(kind: &str) -> Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"));
    let props = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("schema");
    serde_json::to_value(props).unwrap()
}

/// The structural checks an API server applies before CEL: type, nullable, enum, ranges,
/// lengths, counts, required and unknown fields (as `kubectl --validate=strict` reports).
fn structural(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    if v.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            errs.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    let ty = schema["type"].as_str().unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !ok {
        errs.push(format!("{path}: expected {ty}, got {v}"));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(v) {
            errs.push(format!("{path}: {v} is not one of {allowed:?}"));
        }
    }
    let num = |k: &str| schema[k].as_f64();
    if let Some(n) = v.as_f64() {
        if num("minimum").is_some_and(|m| n < m) || num("maximum").is_some_and(|m| n > m) {
            errs.push(format!("{path}: {n} is out of range"));
        }
    }
    let count = match v {
        Value::String(s) => Some((s.chars().count(), "Length")),
        Value::Array(a) => Some((a.len(), "Items")),
        Value::Object(o) => Some((o.len(), "Properties")),
        _ => None,
    };
    if let Some((n, what)) = count {
        let lo = schema[format!("min{what}")].as_u64();
        let hi = schema[format!("max{what}")].as_u64();
        if lo.is_some_and(|m| (n as u64) < m) || hi.is_some_and(|m| (n as u64) > m) {
            errs.push(format!("{path}: has {n}, outside min{what}/max{what}"));
        }
    }
    if let Value::Array(items) = v {
        for (i, item) in items.iter().enumerate() {
            structural(&schema["items"], item, &format!("{path}[{i}]"), errs);
        }
    }
    if let Value::Object(o) = v {
        if schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true) {
            return;
        }
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap();
            if !o.contains_key(r) {
                errs.push(format!("{path}.{r}: required"));
            }
        }
        for (k, val) in o {
            let sub = &schema["properties"][k];
            if !sub.is_null() {
                structural(sub, val, &format!("{path}.{k}"), errs);
            } else if schema["additionalProperties"].is_object() {
                structural(
                    &schema["additionalProperties"],
                    val,
                    &format!("{path}.{k}"),
                    errs,
                );
            } else if path.is_empty() && k == "metadata" || schema["properties"].is_null() {
            } else {
                errs.push(format!("{path}.{k}: unknown field"));
            }
        }
    }
}

/// Every reason the CRD would refuse `obj` (structural and CEL); empty when it is accepted.
fn crd_errors(obj: &Value, old: Option<&Value>) -> Vec<String> {
    let kind = obj["kind"].as_str().expect("kind");
    let schema = schema_of(kind);
    let mut errs = Vec::new();
    structural(&schema, obj, "", &mut errs);
    if let Err(e) = kube_cel::Validator::new().validate(&schema, obj, old) {
        for e in e.into_vec() {
            errs.push(format!("{}: {} ({})", e.field_path, e.message, e.rule));
        }
    }
    errs
}

/// Reads `obj` into `T`, checks it, round-trips it; returns `validate()`'s errors.
fn ours<T: DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug + Resource>(
    obj: &Value,
) -> Result<(), String> {
    let t: T = serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
    let again: T = serde_json::from_value(serde_json::to_value(&t).unwrap()).unwrap();
    assert_eq!(t, again, "round trip changed {obj}");
    t.validate().map_err(|errs| {
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    })
}

fn ours_any(obj: &Value) -> Result<(), String> {
    match obj["kind"].as_str().unwrap() {
        "InferencePool" => ours::<InferencePool>(obj),
        "InferenceObjective" => ours::<InferenceObjective>(obj),
        "InferenceModelRewrite" => ours::<InferenceModelRewrite>(obj),
        "InferenceModel" => ours::<InferenceModel>(obj),
        k => panic!("unexpected kind {k}"),
    }
}

#[test]
fn the_crds_parse_and_carry_the_upstream_names_and_fields() {
    let out = crds_yaml();
    let parsed: Vec<CustomResourceDefinition> = docs(&out)
        .into_iter()
        .map(|d| serde_json::from_value(d).expect("a CustomResourceDefinition"))
        .collect();
    assert_eq!(parsed, crds(), "printing and parsing back changes nothing");
    let got: Vec<(String, String, String, String, Vec<String>)> = parsed
        .iter()
        .map(|c| {
            (
                c.metadata.name.clone().unwrap(),
                c.spec.group.clone(),
                c.spec.versions[0].name.clone(),
                c.spec.names.kind.clone(),
                c.spec.names.short_names.clone().unwrap_or_default(),
            )
        })
        .collect();
    let s = |v: &str| v.to_string();
    assert_eq!(
        got,
        [
            (
                s("inferencepools.inference.networking.k8s.io"),
                s("inference.networking.k8s.io"),
                s("v1"),
                s("InferencePool"),
                vec![s("infpool")]
            ),
            (
                s("inferenceobjectives.inference.networking.x-k8s.io"),
                s("inference.networking.x-k8s.io"),
                s("v1alpha2"),
                s("InferenceObjective"),
                vec![]
            ),
            (
                s("inferencemodelrewrites.inference.networking.x-k8s.io"),
                s("inference.networking.x-k8s.io"),
                s("v1alpha2"),
                s("InferenceModelRewrite"),
                vec![]
            ),
            (
                s("inferencemodels.inference.networking.x-k8s.io"),
                s("inference.networking.x-k8s.io"),
                s("v1alpha2"),
                s("InferenceModel"),
                vec![]
            ),
        ]
    );
    for c in &parsed {
        assert_eq!(c.spec.scope, "Namespaced");
        assert!(c.spec.versions[0].served && c.spec.versions[0].storage);
        assert!(c.spec.versions[0]
            .subresources
            .as_ref()
            .unwrap()
            .status
            .is_some());
    }

    // Field names, by path from spec.
    let field = |kind: &str, path: &[&str]| {
        let mut at = schema_of(kind)["properties"]["spec"].clone();
        for p in path {
            at = if *p == "[]" {
                at["items"].clone()
            } else {
                at["properties"][*p].clone()
            };
            assert!(!at.is_null(), "{kind}: no field spec.{}", path.join("."));
        }
        at
    };
    field("InferencePool", &["selector", "matchLabels"]);
    assert_eq!(
        field("InferencePool", &["targetPorts", "[]", "number"])["maximum"],
        65535.0
    );
    assert_eq!(field("InferencePool", &["appProtocol"])["default"], "http");
    assert_eq!(
        field("InferencePool", &["endpointPickerRef", "failureMode"])["default"],
        "FailClose"
    );
    assert_eq!(
        field("InferencePool", &["endpointPickerRef", "kind"])["default"],
        "Service"
    );
    field("InferencePool", &["endpointPickerRef", "port", "number"]);
    assert_eq!(
        field("InferenceObjective", &["poolRef", "group"])["default"],
        "inference.networking.k8s.io"
    );
    field("InferenceObjective", &["priority"]);
    field(
        "InferenceModelRewrite",
        &["rules", "[]", "matches", "[]", "model", "type"],
    );
    field(
        "InferenceModelRewrite",
        &["rules", "[]", "targets", "[]", "modelRewrite"],
    );
    assert_eq!(
        field(
            "InferenceModelRewrite",
            &["rules", "[]", "targets", "[]", "weight"]
        )["maximum"],
        1_000_000.0
    );
    assert_eq!(
        field("InferenceModel", &["criticality"])["enum"],
        serde_json::json!(["Critical", "Standard", "Sheddable"])
    );
    field("InferenceModel", &["targetModels", "[]", "weight"]);
}

#[test]
fn every_default_in_the_crds_is_valid_under_its_own_schema() {
    // An API server refuses a CRD whose defaults do not validate (an empty default map
    // under minProperties: 1, say).
    fn walk(schema: &Value, path: &str, bad: &mut Vec<String>) {
        if let Some(d) = schema.get("default") {
            structural(schema, d, path, bad);
        }
        if let Some(props) = schema["properties"].as_object() {
            for (k, s) in props {
                walk(s, &format!("{path}.{k}"), bad);
            }
        }
        if schema["items"].is_object() {
            walk(&schema["items"], &format!("{path}[]"), bad);
        }
    }
    for c in crds() {
        let mut bad = Vec::new();
        walk(&schema_of(&c.spec.names.kind), "", &mut bad);
        assert!(bad.is_empty(), "{}: {bad:?}", c.spec.names.kind);
    }
}

#[test]
fn the_examples_read_into_our_types_round_trip_and_pass_the_crds() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/examples.yaml"
    ))
    .unwrap();
    let objects = docs(&text);
    assert_eq!(objects.len(), 9);
    for obj in &objects {
        let name = &obj["metadata"]["name"];
        ours_any(obj).unwrap_or_else(|e| panic!("{name}: our types refuse it: {e}"));
        let errs = crd_errors(obj, None);
        assert!(errs.is_empty(), "{name}: the CRD refuses it: {errs:?}");
    }
}

/// Objects both sides must refuse, with a word of the reason each gives.
#[test]
fn broken_objects_are_refused_by_our_types_and_by_the_crds_alike() {
    let pool = |spec: &str| {
        format!(
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata:\n  name: p\n  namespace: llm\nspec:\n{spec}"
    )
    };
    let rewrite = |targets: &str| {
        format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\nmetadata:\n  name: r\n  namespace: llm\nspec:\n  poolRef:\n    name: p\n  rules:\n  - targets:\n{targets}"
    )
    };
    let model = |targets: &str| {
        format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\nmetadata:\n  name: m\n  namespace: llm\nspec:\n  modelName: m\n  poolRef:\n    name: p\n  targetModels:\n{targets}"
    )
    };
    let sel = "  selector:\n    matchLabels:\n      app: vllm\n";
    let cases: Vec<(String, &str, &str)> = vec![
        (pool(&format!("{sel}  targetPorts:\n  - number: 8000\n  - number: 8000\n")), "unique", "unique"),
        (pool(&format!("{sel}  targetPorts:\n  - number: 0\n")), "range", "range"),
        (pool(&format!("{sel}  targetPorts:\n{}", "  - number: 1\n  - number: 2\n  - number: 3\n  - number: 4\n  - number: 5\n  - number: 6\n  - number: 7\n  - number: 8\n  - number: 9\n")), "1 to 8", "maxItems"),
        (pool(&format!("{sel}  targetPorts: []\n")), "1 to 8", "minItems"),
        (pool("  selector:\n    matchLabels: {}\n  targetPorts:\n  - number: 8000\n"), "1 to 64", "minProperties"),
        (pool(&format!("{sel}  targetPorts:\n  - number: 8000\n  endpointPickerRef:\n    name: epp\n")), "required when kind is Service", "port is required"),
        (pool(&format!("{sel}  targetPorts:\n  - number: 8000\n  appProtocol: grpc\n")), "unknown variant", "not one of"),
        (rewrite("    - modelRewrite: a\n      weight: 0\n"), "range", "range"),
        (rewrite("      []\n"), "at least one target", "minItems"),
        (model("  - name: a\n    weight: 10\n  - name: b\n"), "every target or on none", "all models, or none"),
    ];
    for (yaml, ours_says, crd_says) in cases {
        let obj = &docs(&yaml)[0];
        let mine = ours_any(obj).expect_err(&format!("our types accept:\n{yaml}"));
        assert!(
            mine.contains(ours_says),
            "ours said {mine:?}, want {ours_says:?}\n{yaml}"
        );
        let theirs = crd_errors(obj, None).join("; ");
        assert!(
            theirs.contains(crd_says),
            "the CRD said {theirs:?}, want {crd_says:?}\n{yaml}"
        );
    }
}

#[test]
fn the_legacy_model_name_cannot_change() {
    let m = |name: &str| {
        docs(&format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\nmetadata:\n  name: m\n  namespace: llm\nspec:\n  modelName: {name}\n  poolRef:\n    name: p\n"
    )).remove(0)
    };
    assert!(crd_errors(&m("chat"), Some(&m("chat"))).is_empty());
    let errs = crd_errors(&m("chat-2"), Some(&m("chat"))).join("; ");
    assert!(errs.contains("immutable"), "{errs}");
}

#[test]
fn the_checked_in_crds_are_what_infergate_crds_prints() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/crds/crds.yaml");
    let file = std::fs::read_to_string(path).unwrap();
    assert!(
        file == crds_yaml(),
        "deploy/crds/crds.yaml is out of date with the api types; regenerate it with\n  cargo run -p infergate -- crds > deploy/crds/crds.yaml"
    );
}

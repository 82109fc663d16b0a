//! The CustomResourceDefinitions of the resources the picker reads, built from the api
//! crate's types (`infergate crds` prints them).
//!
//! Each spec type derives a JSON Schema; kube-core's transforms turn it into the
//! structural schema Kubernetes requires, with the ranges, lengths and CEL rules
//! (`x-kubernetes-validations`) the types carry. Group, version, kind, plural and short
//! names are the upstream ones (GIE v1.x), so these CRDs can stand in for upstream's and
//! objects written for either are read by both.

use infergate_api::resources::{
    InferenceModelRewriteSpec, InferenceModelSpec, InferenceObjectiveSpec, InferencePoolSpec,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionNames, CustomResourceDefinitionSpec,
    CustomResourceDefinitionVersion, CustomResourceSubresourceStatus, CustomResourceSubresources,
    CustomResourceValidation, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube_core::schema::{OptionalEnum, StructuralSchemaRewriter};
use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Value};

/// Where a resource lives in the API and what it is called.
struct Names {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    short: &'static [&'static str],
    description: &'static str,
}

/// The spec's JSON Schema as a Kubernetes structural schema (inlined, no `$ref`).
fn spec_schema<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(OptionalEnum)
        .with_transform(StructuralSchemaRewriter)
        .into_generator();
    let mut schema = generator.into_root_schema_for::<T>().to_value();
    // The root carries schemars' bookkeeping; an API server rejects unknown keys there.
    if let Some(o) = schema.as_object_mut() {
        o.remove("title");
        o.remove("$schema");
        o.remove("definitions");
        o.remove("components");
    }
    schema
}

fn crd(n: &Names, spec: Value, status: Value) -> CustomResourceDefinition {
    let schema = json!({
        "type": "object",
        "description": n.description,
        "properties": {
            "apiVersion": {"type": "string", "description": "The versioned schema of this object."},
            "kind": {"type": "string", "description": "The REST resource this object represents."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    });
    let schema: JSONSchemaProps =
        serde_json::from_value(schema).expect("a schemars schema is a JSONSchemaProps");
    let singular = n.kind.to_ascii_lowercase();
    CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(format!("{}.{}", n.plural, n.group)),
            annotations: Some(
                [(
                    "infergate.dev/generated-by".to_string(),
                    format!("infergate crds {}", env!("CARGO_PKG_VERSION")),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: CustomResourceDefinitionSpec {
            group: n.group.into(),
            names: CustomResourceDefinitionNames {
                kind: n.kind.into(),
                list_kind: Some(format!("{}List", n.kind)),
                plural: n.plural.into(),
                singular: Some(singular),
                short_names: (!n.short.is_empty())
                    .then(|| n.short.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            },
            scope: "Namespaced".into(),
            versions: vec![CustomResourceDefinitionVersion {
                name: n.version.into(),
                served: true,
                storage: true,
                schema: Some(CustomResourceValidation {
                    open_api_v3_schema: Some(schema),
                }),
                subresources: Some(CustomResourceSubresources {
                    status: Some(CustomResourceSubresourceStatus(json!({}))),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
        status: None,
    }
}

/// Status is written by gateways and controllers, not read by the picker: kept open.
fn open_status() -> Value {
    json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// InferencePool, InferenceObjective, InferenceModelRewrite and the legacy InferenceModel.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        crd(
            &Names {
                group: "inference.networking.k8s.io",
                version: "v1",
                kind: "InferencePool",
                plural: "inferencepools",
                short: &["infpool"],
                description: "A pool of model-server Pods and the endpoint picker that routes to them.",
            },
            spec_schema::<InferencePoolSpec>(),
            open_status(),
        ),
        crd(
            &Names {
                group: "inference.networking.x-k8s.io",
                version: "v1alpha2",
                kind: "InferenceObjective",
                plural: "inferenceobjectives",
                short: &[],
                description: "The priority of the requests that name this objective in the x-gateway-inference-objective header.",
            },
            spec_schema::<InferenceObjectiveSpec>(),
            open_status(),
        ),
        crd(
            &Names {
                group: "inference.networking.x-k8s.io",
                version: "v1alpha2",
                kind: "InferenceModelRewrite",
                plural: "inferencemodelrewrites",
                short: &[],
                description: "Rewrites of the requested model name to weighted targets.",
            },
            spec_schema::<InferenceModelRewriteSpec>(),
            open_status(),
        ),
        crd(
            &Names {
                group: "inference.networking.x-k8s.io",
                version: "v1alpha2",
                kind: "InferenceModel",
                plural: "inferencemodels",
                short: &[],
                description: "Legacy (GIE v0.5 and earlier): a model name, its criticality and weighted targets.",
            },
            spec_schema::<InferenceModelSpec>(),
            open_status(),
        ),
    ]
}

/// The CRDs as one multi-document YAML stream, ready for `kubectl apply -f -`.
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Generated by `infergate crds` from the types in crates/api/src/resources.rs.\n",
    );
    for c in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&c).expect("a CRD serializes"));
    }
    out
}

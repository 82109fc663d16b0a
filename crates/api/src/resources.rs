//! Kubernetes resources of the Gateway API Inference Extension, as serde types that accept
//! `kubectl get -o yaml` output unchanged: InferencePool, InferenceObjective,
//! InferenceModelRewrite and the legacy InferenceModel.
//!
//! Unknown keys under `spec` (and at the top level) are errors; unknown `metadata` keys
//! (uid, resourceVersion, managedFields, ...) and the whole `status` are accepted and ignored.
//! Rules that serde cannot express (ranges, counts, uniqueness) live in each `validate`.
//!
//! The spec types also derive [`JsonSchema`]: `infergate crds` builds the
//! CustomResourceDefinitions from them, so the schema an API server enforces and the
//! parser here describe the same fields. The `schemars` attributes carry the same limits
//! as `validate` (ranges, lengths, and the upstream CEL rules as
//! `x-kubernetes-validations`); a test checks the two agree on examples.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{FieldError, FieldPath};

/// apiVersion of InferencePool.
pub const POOL_API_VERSION: &str = "inference.networking.k8s.io/v1";
/// apiVersion of InferenceObjective, InferenceModelRewrite and InferenceModel.
pub const ALPHA_API_VERSION: &str = "inference.networking.x-k8s.io/v1alpha2";
/// The API group of InferencePool, the default group of a `poolRef`.
pub const POOL_GROUP: &str = "inference.networking.k8s.io";

/// A Kubernetes-style object of this crate: its type and its common checks.
pub trait Resource {
    /// The apiVersion this type is read from.
    const API_VERSION: &'static str;
    /// The kind this type is read from.
    const KIND: &'static str;
    /// The object's metadata.
    fn metadata(&self) -> &ObjectMeta;
    /// Checks the rules serde cannot; every broken rule is returned.
    fn validate(&self) -> Result<(), Vec<FieldError>>;
}

/// The parts of Kubernetes `metadata` that infergate uses; other keys are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// The object's name.
    pub name: String,
    /// The object's namespace; `default` when absent.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// RFC 3339 creation time, as the API server writes it (`2025-06-05T10:00:00Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".to_string()
}

impl Default for ObjectMeta {
    fn default() -> Self {
        ObjectMeta {
            name: String::new(),
            namespace: default_namespace(),
            creation_timestamp: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }
}

impl ObjectMeta {
    /// Metadata with just a name, in namespace `default`.
    pub fn named(name: impl Into<String>) -> Self {
        ObjectMeta {
            name: name.into(),
            ..ObjectMeta::default()
        }
    }

    /// The creation time as (seconds since the Unix epoch, nanoseconds), if set and valid.
    pub fn creation_time(&self) -> Option<(i64, u32)> {
        self.creation_timestamp.as_deref().and_then(parse_rfc3339)
    }

    fn check(&self, errors: &mut Vec<FieldError>) {
        if self.name.is_empty() {
            errors.push(FieldError::new("metadata.name", "must not be empty"));
        }
        if let Some(ts) = &self.creation_timestamp {
            if parse_rfc3339(ts).is_none() {
                errors.push(FieldError::new(
                    "metadata.creationTimestamp",
                    format!("{ts:?} is not an RFC 3339 time like 2025-06-05T10:00:00Z"),
                ));
            }
        }
    }
}

/// A value that is read and thrown away, for `status`, which the picker does not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ignored;

impl<'de> Deserialize<'de> for Ignored {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer)?;
        Ok(Ignored)
    }
}

impl Serialize for Ignored {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_unit()
    }
}

fn check_type_meta<R: Resource>(api_version: &str, kind: &str, errors: &mut Vec<FieldError>) {
    if api_version != R::API_VERSION {
        errors.push(FieldError::new(
            "apiVersion",
            format!("{api_version:?} is not {:?}", R::API_VERSION),
        ));
    }
    if kind != R::KIND {
        errors.push(FieldError::new(
            "kind",
            format!("{kind:?} is not {:?}", R::KIND),
        ));
    }
}

fn finish(errors: Vec<FieldError>) -> Result<(), Vec<FieldError>> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn check_range(path: FieldPath, value: i64, min: i64, max: i64, errors: &mut Vec<FieldError>) {
    if value < min || value > max {
        errors.push(FieldError::new(
            path,
            format!("{value} is out of range {min}..={max}"),
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// InferencePool

/// A pool of model-server pods that one endpoint picker serves (`inference.networking.k8s.io/v1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferencePool {
    /// Always [`POOL_API_VERSION`].
    pub api_version: String,
    /// Always `InferencePool`.
    pub kind: String,
    /// Name, namespace and the like.
    pub metadata: ObjectMeta,
    /// What the pool selects and who picks its endpoints.
    pub spec: InferencePoolSpec,
    /// Written by gateways; read and ignored.
    #[serde(default, skip_serializing)]
    pub status: Ignored,
}

/// The desired state of an [`InferencePool`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferencePoolSpec {
    /// Which pods, in the pool's namespace, belong to the pool.
    pub selector: LabelSelector,
    /// The ports the model servers listen on; each port of each pod is one endpoint.
    #[schemars(length(min = 1, max = 8), extend("x-kubernetes-validations" = [{
        "rule": "self.all(p1, self.exists_one(p2, p1.number == p2.number))",
        "message": "port number must be unique"
    }]))]
    pub target_ports: Vec<Port>,
    /// How the gateway talks to the model servers.
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// The endpoint picker service the gateway consults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_picker_ref: Option<EndpointPickerRef>,
}

/// Equality-based pod selector (1 to 64 labels).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels a pod must all carry (required, as upstream).
    #[schemars(extend("minProperties" = 1, "maxProperties" = 64))]
    pub match_labels: BTreeMap<String, String>,
}

/// A port number (1 to 65535).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// The number; kept as the API's 32-bit integer so out-of-range values get a clear error.
    #[schemars(range(min = 1, max = 65535))]
    pub number: i32,
}

/// Protocol between the gateway and the model servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum AppProtocol {
    /// HTTP/1.1 (the default).
    #[default]
    #[serde(rename = "http")]
    Http,
    /// HTTP/2 without TLS.
    #[serde(rename = "kubernetes.io/h2c")]
    H2c,
}

/// Reference to the endpoint picker's Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.kind != 'Service' || has(self.port)",
    "message": "port is required when kind is 'Service' or unspecified (defaults to 'Service')"
}]))]
pub struct EndpointPickerRef {
    /// API group of the referent; `""` (core) by default.
    #[serde(default)]
    pub group: String,
    /// Kind of the referent; `Service` by default.
    #[serde(default = "default_picker_kind")]
    pub kind: String,
    /// Name of the referent.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The Service port; required when `kind` is `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
    /// What the gateway does when the picker cannot be reached.
    #[serde(default)]
    pub failure_mode: FailureMode,
}

fn default_picker_kind() -> String {
    "Service".to_string()
}

/// What a gateway does when the endpoint picker fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum FailureMode {
    /// Send the request to some endpoint anyway.
    FailOpen,
    /// Fail the request (the default).
    #[default]
    FailClose,
}

impl Resource for InferencePool {
    const API_VERSION: &'static str = POOL_API_VERSION;
    const KIND: &'static str = "InferencePool";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        check_type_meta::<Self>(&self.api_version, &self.kind, &mut errors);
        self.metadata.check(&mut errors);

        let labels = FieldPath::parse("spec.selector.matchLabels");
        let count = self.spec.selector.match_labels.len();
        if !(1..=64).contains(&count) {
            errors.push(FieldError::new(
                labels.clone(),
                format!("has {count} labels; 1 to 64 are required"),
            ));
        }
        for (key, value) in &self.spec.selector.match_labels {
            if key.is_empty() || key.len() > 253 {
                errors.push(FieldError::new(
                    labels.key(key.clone()),
                    "a label key must be 1 to 253 characters",
                ));
            }
            if value.len() > 63 {
                errors.push(FieldError::new(
                    labels.key(key.clone()),
                    format!("label value is {} characters; at most 63", value.len()),
                ));
            }
        }

        let ports = FieldPath::parse("spec.targetPorts");
        let count = self.spec.target_ports.len();
        if !(1..=8).contains(&count) {
            errors.push(FieldError::new(
                ports.clone(),
                format!("has {count} ports; 1 to 8 are required"),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, port) in self.spec.target_ports.iter().enumerate() {
            let path = ports.index(i).key("number");
            check_range(path.clone(), port.number.into(), 1, 65535, &mut errors);
            if !seen.insert(port.number) {
                errors.push(FieldError::new(
                    path,
                    format!("port {} is listed twice; ports must be unique", port.number),
                ));
            }
        }

        if let Some(picker) = &self.spec.endpoint_picker_ref {
            let path = FieldPath::parse("spec.endpointPickerRef");
            if picker.name.is_empty() {
                errors.push(FieldError::new(path.key("name"), "must not be empty"));
            }
            match picker.port {
                Some(port) => check_range(
                    path.key("port").key("number"),
                    port.number.into(),
                    1,
                    65535,
                    &mut errors,
                ),
                None if picker.kind == "Service" => errors.push(FieldError::new(
                    path.key("port"),
                    "is required when kind is Service (the Service port of the picker)",
                )),
                None => {}
            }
        }
        finish(errors)
    }
}

// ---------------------------------------------------------------------------------------------
// poolRef

/// Reference from an alpha resource to the InferencePool it applies to (same namespace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolRef {
    /// API group; `inference.networking.k8s.io` by default.
    #[serde(default = "default_pool_group")]
    pub group: String,
    /// Kind; `InferencePool` by default.
    #[serde(default = "default_pool_kind")]
    pub kind: String,
    /// The pool's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn default_pool_group() -> String {
    POOL_GROUP.to_string()
}

fn default_pool_kind() -> String {
    "InferencePool".to_string()
}

impl PoolRef {
    /// A reference to the pool `name` with the default group and kind.
    pub fn named(name: impl Into<String>) -> Self {
        PoolRef {
            group: default_pool_group(),
            kind: default_pool_kind(),
            name: name.into(),
        }
    }

    fn check(&self, errors: &mut Vec<FieldError>) {
        if self.name.is_empty() {
            errors.push(FieldError::new("spec.poolRef.name", "must not be empty"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// InferenceObjective

/// The priority of a class of requests (`inference.networking.x-k8s.io/v1alpha2`).
/// A request names its objective in the `x-gateway-inference-objective` header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferenceObjective {
    /// Always [`ALPHA_API_VERSION`].
    pub api_version: String,
    /// Always `InferenceObjective`.
    pub kind: String,
    /// Name, namespace and the like.
    pub metadata: ObjectMeta,
    /// Priority and pool.
    pub spec: InferenceObjectiveSpec,
    /// Read and ignored.
    #[serde(default, skip_serializing)]
    pub status: Ignored,
}

/// The desired state of an [`InferenceObjective`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferenceObjectiveSpec {
    /// Higher is more important; negative values are allowed and mark sheddable traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// The pool this objective applies to.
    pub pool_ref: PoolRef,
}

impl InferenceObjective {
    /// The effective priority: unset counts as 0.
    pub fn priority(&self) -> i32 {
        self.spec.priority.unwrap_or(0)
    }
}

impl Resource for InferenceObjective {
    const API_VERSION: &'static str = ALPHA_API_VERSION;
    const KIND: &'static str = "InferenceObjective";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        check_type_meta::<Self>(&self.api_version, &self.kind, &mut errors);
        self.metadata.check(&mut errors);
        self.spec.pool_ref.check(&mut errors);
        finish(errors)
    }
}

// ---------------------------------------------------------------------------------------------
// InferenceModelRewrite

/// Rewrites of the requested model name to weighted targets
/// (`inference.networking.x-k8s.io/v1alpha2`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferenceModelRewrite {
    /// Always [`ALPHA_API_VERSION`].
    pub api_version: String,
    /// Always `InferenceModelRewrite`.
    pub kind: String,
    /// Name, namespace and the like; `creationTimestamp` orders rewrites.
    pub metadata: ObjectMeta,
    /// Pool and rules.
    pub spec: InferenceModelRewriteSpec,
    /// Read and ignored.
    #[serde(default, skip_serializing)]
    pub status: Ignored,
}

/// The desired state of an [`InferenceModelRewrite`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferenceModelRewriteSpec {
    /// The pool these rules apply to.
    pub pool_ref: PoolRef,
    /// Rules, first match wins among rules of equal precedence.
    #[serde(default)]
    pub rules: Vec<RewriteRule>,
}

/// One rewrite rule: if any match holds, rewrite to one of the targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteRule {
    /// Alternatives (OR); an empty list matches every model.
    #[serde(default)]
    pub matches: Vec<RewriteMatch>,
    /// Weighted targets; at least one.
    #[schemars(length(min = 1))]
    pub targets: Vec<RewriteTarget>,
}

/// One alternative of a rule's `matches`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteMatch {
    /// Condition on the requested model name.
    pub model: ModelMatch,
}

/// A condition on the requested model name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelMatch {
    /// How `value` is compared; only `Exact` exists.
    #[serde(default, rename = "type")]
    pub match_type: MatchType,
    /// The model name to match (at least 1 character).
    #[schemars(length(min = 1))]
    pub value: String,
}

/// How a model name is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum MatchType {
    /// The whole name, case-sensitive.
    #[default]
    Exact,
}

/// A target of a rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteTarget {
    /// The model name sent to the model server.
    #[schemars(length(min = 1))]
    pub model_rewrite: String,
    /// Relative weight, 1 to 1,000,000; unset counts as 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub weight: Option<i32>,
}

impl RewriteTarget {
    /// The effective weight: unset counts as 1. Validation keeps it in 1..=1,000,000.
    pub fn weight(&self) -> u32 {
        self.weight.map_or(1, |w| w.max(0).unsigned_abs())
    }
}

impl Resource for InferenceModelRewrite {
    const API_VERSION: &'static str = ALPHA_API_VERSION;
    const KIND: &'static str = "InferenceModelRewrite";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        check_type_meta::<Self>(&self.api_version, &self.kind, &mut errors);
        self.metadata.check(&mut errors);
        self.spec.pool_ref.check(&mut errors);
        let rules = FieldPath::parse("spec.rules");
        for (r, rule) in self.spec.rules.iter().enumerate() {
            let rule_path = rules.index(r);
            for (m, matched) in rule.matches.iter().enumerate() {
                if matched.model.value.is_empty() {
                    errors.push(FieldError::new(
                        rule_path.key("matches").index(m).key("model").key("value"),
                        "must not be empty",
                    ));
                }
            }
            if rule.targets.is_empty() {
                errors.push(FieldError::new(
                    rule_path.key("targets"),
                    "needs at least one target",
                ));
            }
            for (t, target) in rule.targets.iter().enumerate() {
                let path = rule_path.key("targets").index(t);
                if target.model_rewrite.is_empty() {
                    errors.push(FieldError::new(
                        path.key("modelRewrite"),
                        "must not be empty",
                    ));
                }
                if let Some(weight) = target.weight {
                    check_range(path.key("weight"), weight.into(), 1, 1_000_000, &mut errors);
                }
            }
        }
        finish(errors)
    }
}

// ---------------------------------------------------------------------------------------------
// InferenceModel (legacy)

/// The older per-model resource (v1alpha2, up to GIE v0.5), still found in clusters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferenceModel {
    /// Always [`ALPHA_API_VERSION`].
    pub api_version: String,
    /// Always `InferenceModel`.
    pub kind: String,
    /// Name, namespace and the like.
    pub metadata: ObjectMeta,
    /// Model name, criticality, targets and pool.
    pub spec: InferenceModelSpec,
    /// Read and ignored.
    #[serde(default, skip_serializing)]
    pub status: Ignored,
}

/// The desired state of an [`InferenceModel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferenceModelSpec {
    /// The model name clients request (at most 256 characters).
    #[schemars(length(min = 1, max = 256), extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf", "message": "modelName is immutable"
    }]))]
    pub model_name: String,
    /// How important the traffic is; unset means Standard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criticality: Option<Criticality>,
    /// Weighted models to send the traffic to instead (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), extend("x-kubernetes-validations" = [{
        "rule": "self.all(t, has(t.weight)) || self.all(t, !has(t.weight))",
        "message": "weights should be set for all models, or none of the models"
    }]))]
    pub target_models: Vec<TargetModel>,
    /// The pool this model is served by. (The legacy CRD defaulted its group to
    /// `inference.networking.x-k8s.io`; only the name is used, so one type serves both.)
    pub pool_ref: PoolRef,
}

/// Criticality of an [`InferenceModel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Criticality {
    /// Must not be shed.
    Critical,
    /// The default.
    Standard,
    /// First to be shed under saturation.
    Sheddable,
}

/// A weighted target of an [`InferenceModel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetModel {
    /// The model name sent to the model server.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Relative weight, 1 to 1,000,000; set on every target or on none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub weight: Option<i32>,
}

impl InferenceModel {
    /// The criticality mapped onto InferenceObjective priorities: Critical 1, Standard (and
    /// unset) 0, Sheddable -1. Negative priorities are shed under saturation, as Sheddable was.
    pub fn priority(&self) -> i32 {
        match self.spec.criticality {
            Some(Criticality::Critical) => 1,
            Some(Criticality::Standard) | None => 0,
            Some(Criticality::Sheddable) => -1,
        }
    }
}

impl Resource for InferenceModel {
    const API_VERSION: &'static str = ALPHA_API_VERSION;
    const KIND: &'static str = "InferenceModel";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        check_type_meta::<Self>(&self.api_version, &self.kind, &mut errors);
        self.metadata.check(&mut errors);
        self.spec.pool_ref.check(&mut errors);
        let name_len = self.spec.model_name.chars().count();
        if !(1..=256).contains(&name_len) {
            errors.push(FieldError::new(
                "spec.modelName",
                format!("is {name_len} characters; 1 to 256 are allowed"),
            ));
        }
        let targets = FieldPath::parse("spec.targetModels");
        if self.spec.target_models.len() > 10 {
            errors.push(FieldError::new(
                targets.clone(),
                format!(
                    "has {} targets; at most 10 are allowed",
                    self.spec.target_models.len()
                ),
            ));
        }
        let weighted = self
            .spec
            .target_models
            .iter()
            .filter(|t| t.weight.is_some())
            .count();
        if weighted != 0 && weighted != self.spec.target_models.len() {
            errors.push(FieldError::new(
                targets.clone(),
                "set weight on every target or on none",
            ));
        }
        for (i, target) in self.spec.target_models.iter().enumerate() {
            if target.name.is_empty() {
                errors.push(FieldError::new(
                    targets.index(i).key("name"),
                    "must not be empty",
                ));
            }
            if let Some(weight) = target.weight {
                check_range(
                    targets.index(i).key("weight"),
                    weight.into(),
                    1,
                    1_000_000,
                    &mut errors,
                );
            }
        }
        finish(errors)
    }
}

// ---------------------------------------------------------------------------------------------
// Time

/// Parses an RFC 3339 time (`2025-06-05T10:00:00Z`, `2025-06-05T12:00:00.5+02:00`) into
/// seconds since the Unix epoch and nanoseconds.
pub(crate) fn parse_rfc3339(text: &str) -> Option<(i64, u32)> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(range)?;
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, c) in frac[..digits].bytes().take(9).enumerate() {
            nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return None,
            };
            let tz = rest.get(1..)?;
            let (h, m) = tz.split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
            if h > 23 || m > 59 {
                return None;
            }
            sign * (h * 3600 + m * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    Some((
        days * 86_400 + hour * 3600 + minute * 60 + second - offset,
        nanos,
    ))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kubectl get inferencepool -o yaml` prints, status and server fields included.
    const KUBECTL_POOL: &str = r#"
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"inference.networking.k8s.io/v1","kind":"InferencePool"}
  creationTimestamp: "2025-09-01T12:00:00Z"
  generation: 1
  managedFields:
  - apiVersion: inference.networking.k8s.io/v1
    fieldsType: FieldsV1
    fieldsV1:
      f:spec:
        f:selector: {}
    manager: kubectl-client-side-apply
    operation: Update
    time: "2025-09-01T12:00:00Z"
  name: vllm-llama3-8b-instruct
  namespace: inference
  resourceVersion: "123456"
  uid: 0b8f1c1e-5d2a-4c1e-9a57-0c1b7c3f9d10
spec:
  endpointPickerRef:
    name: vllm-llama3-8b-instruct-epp
    port:
      number: 9002
  selector:
    matchLabels:
      app: vllm-llama3-8b-instruct
  targetPorts:
  - number: 8000
status:
  parents:
  - conditions:
    - lastTransitionTime: "2025-09-01T12:00:05Z"
      message: ""
      observedGeneration: 1
      reason: Accepted
      status: "True"
      type: Accepted
    parentRef:
      group: gateway.networking.k8s.io
      kind: Gateway
      name: inference-gateway
"#;

    #[test]
    fn kubectl_output_of_a_pool_loads_with_defaults_applied() {
        let pool: InferencePool = serde_yaml_ng::from_str(KUBECTL_POOL).unwrap();
        pool.validate().unwrap();
        assert_eq!(pool.metadata.name, "vllm-llama3-8b-instruct");
        assert_eq!(pool.metadata.namespace, "inference");
        assert_eq!(pool.spec.target_ports, vec![Port { number: 8000 }]);
        assert_eq!(pool.spec.app_protocol, AppProtocol::Http);
        let picker = pool.spec.endpoint_picker_ref.unwrap();
        assert_eq!(picker.group, "");
        assert_eq!(picker.kind, "Service");
        assert_eq!(picker.failure_mode, FailureMode::FailClose);
        assert_eq!(pool.metadata.creation_time(), Some((1_756_728_000, 0)));
    }

    #[test]
    fn objective_priority_defaults_to_zero_and_pool_ref_to_the_v1_group() {
        let objective: InferenceObjective = serde_yaml_ng::from_str(
            "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
             metadata: {name: batch}\nspec:\n  poolRef: {name: pool}\n",
        )
        .unwrap();
        objective.validate().unwrap();
        assert_eq!(objective.priority(), 0);
        assert_eq!(objective.metadata.namespace, "default");
        assert_eq!(objective.spec.pool_ref.group, POOL_GROUP);
        assert_eq!(objective.spec.pool_ref.kind, "InferencePool");
    }

    #[test]
    fn legacy_criticality_maps_to_priority() {
        let mk = |criticality: Option<Criticality>| InferenceModel {
            api_version: ALPHA_API_VERSION.into(),
            kind: "InferenceModel".into(),
            metadata: ObjectMeta::named("m"),
            spec: InferenceModelSpec {
                model_name: "llama".into(),
                criticality,
                target_models: vec![],
                pool_ref: PoolRef::named("pool"),
            },
            status: Ignored,
        };
        assert_eq!(mk(Some(Criticality::Critical)).priority(), 1);
        assert_eq!(mk(Some(Criticality::Standard)).priority(), 0);
        assert_eq!(mk(None).priority(), 0);
        assert_eq!(mk(Some(Criticality::Sheddable)).priority(), -1);
    }

    #[test]
    fn legacy_model_needs_weights_on_all_targets_or_none() {
        let mut model: InferenceModel = serde_yaml_ng::from_str(
            "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\n\
             metadata: {name: m}\nspec:\n  modelName: llama\n  poolRef: {name: p}\n  \
             targetModels:\n  - {name: a, weight: 10}\n  - {name: b}\n",
        )
        .unwrap();
        let errors = model.validate().unwrap_err();
        assert_eq!(errors[0].path.to_string(), "spec.targetModels");
        model.spec.target_models[1].weight = Some(0);
        let errors = model.validate().unwrap_err();
        assert_eq!(errors[0].path.to_string(), "spec.targetModels[1].weight");
        assert_eq!(errors[0].message, "0 is out of range 1..=1000000");
    }

    #[test]
    fn rfc3339_times_order_across_offsets_and_fractions() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(
            parse_rfc3339("2025-06-05T12:00:00.5+02:00"),
            parse_rfc3339("2025-06-05T10:00:00.500Z")
        );
        assert_eq!(parse_rfc3339("2025-06-05 10:00"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}

//! The Kubernetes manifests under `deploy/`: every kustomization is rendered with
//! `kubectl kustomize` and each object is read strictly into its type, then checked for the
//! mistakes a user would hit on `kubectl apply -k`.
//!
//! - Core objects (Deployment, Service, ServiceAccount, Role, RoleBinding, ConfigMap, ...)
//!   go through k8s-openapi's types. Those ignore unknown fields, so each is also serialized
//!   back and compared with the rendered JSON: a misspelt field shows up as a difference.
//! - InferencePool, InferenceObjective and InferenceModelRewrite go through infergate's own
//!   strict types and their `validate()`.
//! - Gateway and HTTPRoute go through the small strict structs below.
//! - Any other kind fails the test: add it here with a check.
//!
//! Then, per render: the picker's ports, probes, config mount, pool name, security context
//! and RBAC; every pool's picker Service and model-server Pods; every route's pool.
//!
//! `kubectl` (v1.32 has kustomize v5.5 built in) must be installed; `KUBECTL` overrides the
//! path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use infergate_api::config::parse_go_duration;
use infergate_api::resources::{
    FailureMode, InferenceModelRewrite, InferenceObjective, InferencePool, POOL_GROUP,
};
use infergate_api::{EndpointPickerConfig, Resource};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Finding and rendering kustomizations

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

const KUSTOMIZATION_FILES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// Every directory under `dir` holding a kustomization file, sorted.
fn kustomizations(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if KUSTOMIZATION_FILES.iter().any(|f| d.join(f).is_file()) {
            found.push(d.clone());
        }
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    found.sort();
    found
}

fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_string())
}

/// `kubectl kustomize <dir>`, as one JSON value per document.
fn render(dir: &Path) -> Vec<Value> {
    let out = match Command::new(kubectl()).arg("kustomize").arg(dir).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run `{} kustomize` ({e}). These tests render deploy/ with kubectl: install \
             kubectl v1.32 or later (https://kubernetes.io/docs/tasks/tools/, or the \
             `kubectl` package from pkgs.k8s.io), or set KUBECTL to its path",
            kubectl()
        ),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_documents(&String::from_utf8(out.stdout).expect("UTF-8 output"))
}

fn parse_documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .filter_map(|doc| {
            let value = Option::<Value>::deserialize(doc).expect("rendered YAML parses");
            value.filter(|v| !v.is_null())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Strict reading

/// Deserializes `doc` into `T`, then serializes it back and requires the same JSON: fields
/// `T` does not know (misspelt, misplaced) would otherwise be dropped silently.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut diffs = Vec::new();
    diff("", doc, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(typed)
    } else {
        Err(format!(
            "not read back unchanged (misspelt or misplaced field?): {}",
            diffs.join("; ")
        ))
    }
}

fn diff(path: &str, rendered: &Value, typed: &Value, out: &mut Vec<String>) {
    match (rendered, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(w) => diff(&p, v, w, out),
                    None => out.push(format!("{p}: unknown field, dropped by the typed object")),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{k}: added by the typed object"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), v, w, out);
            }
        }
        // 1 and 1.0 are the same number to the API server.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Strict reading for infergate's resource types, plus their own validation.
fn gie<T: DeserializeOwned + Resource>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    typed.validate().map_err(|errors| {
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(typed)
}

// ---------------------------------------------------------------------------------------------
// Gateway API: the fields these manifests use, strictly. Some fields are read only so that
// they are accepted (everything else is refused), hence `allow(dead_code)`.

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Gateway {
    api_version: String,
    kind: String,
    metadata: Meta,
    spec: GatewaySpec,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GatewaySpec {
    gateway_class_name: String,
    listeners: Vec<Listener>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Listener {
    name: String,
    port: u16,
    protocol: String,
    #[serde(default)]
    hostname: Option<String>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpRoute {
    api_version: String,
    kind: String,
    metadata: Meta,
    spec: HttpRouteSpec,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpRouteSpec {
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    hostnames: Vec<String>,
    rules: Vec<RouteRule>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ParentRef {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    section_name: Option<String>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteRule {
    #[serde(default)]
    matches: Vec<RouteMatch>,
    backend_refs: Vec<BackendRef>,
    #[serde(default)]
    timeouts: Option<RouteTimeouts>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteMatch {
    #[serde(default)]
    path: Option<PathMatch>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PathMatch {
    #[serde(rename = "type")]
    match_type: String,
    value: String,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BackendRef {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    weight: Option<i32>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteTimeouts {
    #[serde(default)]
    request: Option<String>,
    #[serde(default)]
    backend_request: Option<String>,
}

const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

// ---------------------------------------------------------------------------------------------
// One render, read

/// The objects of one render, by kind, each with its namespace ("" when unset).
#[derive(Default)]
struct Render {
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    pools: Vec<InferencePool>,
    objectives: Vec<InferenceObjective>,
    rewrites: Vec<InferenceModelRewrite>,
    gateways: Vec<Gateway>,
    routes: Vec<HttpRoute>,
}

fn str_at<'a>(doc: &'a Value, key: &str) -> &'a str {
    doc.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Reads every document into its type; problems go to `errors`.
fn read(docs: &[Value], errors: &mut Vec<String>) -> Render {
    let mut r = Render::default();
    for doc in docs {
        let api_version = str_at(doc, "apiVersion");
        let kind = str_at(doc, "kind");
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("<no name>");
        let what = format!("{kind} {name} ({api_version})");
        let result: Result<(), String> = match (api_version, kind) {
            ("apps/v1", "Deployment") => strict(doc).map(|o| r.deployments.push(o)),
            ("v1", "Service") => strict(doc).map(|o| r.services.push(o)),
            ("v1", "ServiceAccount") => strict(doc).map(|o| r.service_accounts.push(o)),
            ("v1", "ConfigMap") => strict(doc).map(|o| r.config_maps.push(o)),
            ("v1", "Namespace") => strict::<Namespace>(doc).map(drop),
            ("rbac.authorization.k8s.io/v1", "Role") => strict(doc).map(|o| r.roles.push(o)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                strict(doc).map(|o| r.role_bindings.push(o))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                strict(doc).map(|o| r.cluster_roles.push(o))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                strict(doc).map(|o| r.cluster_role_bindings.push(o))
            }
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                strict::<CustomResourceDefinition>(doc).map(drop)
            }
            (InferencePool::API_VERSION, InferencePool::KIND) => gie(doc).map(|o| r.pools.push(o)),
            (InferenceObjective::API_VERSION, InferenceObjective::KIND) => {
                gie(doc).map(|o| r.objectives.push(o))
            }
            (InferenceModelRewrite::API_VERSION, InferenceModelRewrite::KIND) => {
                gie(doc).map(|o| r.rewrites.push(o))
            }
            (GATEWAY_API_VERSION, "Gateway") => serde_json::from_value(doc.clone())
                .map(|o| r.gateways.push(o))
                .map_err(|e| e.to_string()),
            (GATEWAY_API_VERSION, "HTTPRoute") => serde_json::from_value(doc.clone())
                .map(|o| r.routes.push(o))
                .map_err(|e| e.to_string()),
            _ => Err(
                "unknown apiVersion/kind: add it to tests/deploy_manifests.rs with a \
                      strict type and checks"
                    .to_string(),
            ),
        };
        if let Err(e) = result {
            errors.push(format!("{what}: {e}"));
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Checks

fn ns(meta_namespace: &Option<String>) -> &str {
    meta_namespace.as_deref().unwrap_or("")
}

/// The picker's container: runs `infergate epp` (the word after `infergate` in command +
/// args is `epp`; with no command, the image's entrypoint is `infergate`).
fn picker_container(d: &Deployment) -> Option<&Container> {
    let spec = d.spec.as_ref()?.template.spec.as_ref()?;
    spec.containers.iter().find(|c| {
        let command = c.command.as_deref().unwrap_or_default();
        let args = c.args.as_deref().unwrap_or_default();
        if command.is_empty() {
            return args.first().map(String::as_str) == Some("epp");
        }
        let words: Vec<&str> = command.iter().chain(args).map(String::as_str).collect();
        words
            .iter()
            .position(|w| *w == "infergate" || w.ends_with("/infergate"))
            .and_then(|i| words.get(i + 1))
            == Some(&"epp")
    })
}

/// `--flag=value` and `--flag value` arguments, with `$(VAR)` expanded from literal env
/// values as the kubelet does.
fn flags(c: &Container) -> BTreeMap<String, String> {
    let env: BTreeMap<&str, &str> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
        .collect();
    let expand = |s: &str| {
        let mut s = s.to_string();
        for (k, v) in &env {
            s = s.replace(&format!("$({k})"), v);
        }
        s
    };
    let args = c.args.as_deref().unwrap_or_default();
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        if let Some(flag) = args[i].strip_prefix("--") {
            if let Some((k, v)) = flag.split_once('=') {
                out.insert(k.to_string(), expand(v));
            } else if args.get(i + 1).is_some_and(|v| !v.starts_with("--")) {
                out.insert(flag.to_string(), expand(&args[i + 1]));
                i += 1;
            } else {
                out.insert(flag.to_string(), "true".to_string());
            }
        }
        i += 1;
    }
    out
}

fn pod_labels(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn container_port(c: &Container, target: &IntOrString) -> Option<i32> {
    let ports = c.ports.as_deref().unwrap_or_default();
    match target {
        IntOrString::Int(n) => ports.iter().find(|p| p.container_port == *n),
        IntOrString::String(name) => ports.iter().find(|p| p.name.as_deref() == Some(name)),
    }
    .map(|p| p.container_port)
}

fn check_picker(r: &Render, d: &Deployment, c: &Container, errors: &mut Vec<String>) {
    let name = d.metadata.name.clone().unwrap_or_default();
    let namespace = ns(&d.metadata.namespace);
    let mut fail = |msg: String| errors.push(format!("picker Deployment {name}: {msg}"));
    let f = flags(c);
    let flag_port = |key: &str, default: i32| -> i32 {
        f.get(key).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("--{key}={v} is not a port"))
        })
    };
    let grpc = flag_port("grpc-port", 9002);
    let health = flag_port("grpc-health-port", 9003);
    let metrics = flag_port("metrics-port", 9090);
    let spec = d.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();

    if f.get("listen-address").map(String::as_str) != Some("0.0.0.0") {
        fail(
            "needs --listen-address=0.0.0.0 (the default 127.0.0.1 is unreachable in a Pod)".into(),
        );
    }
    // Ports the servers bind are declared on the container.
    let declared: BTreeSet<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    for (what, port) in [
        ("ext_proc", grpc),
        ("gRPC health", health),
        ("metrics", metrics),
    ] {
        if !declared.contains(&port) {
            fail(format!(
                "{what} port {port} is not a containerPort ({declared:?})"
            ));
        }
    }
    // gRPC probes on the health port, services as the picker registers them.
    for (probe, service) in [
        (&c.liveness_probe, "liveness"),
        (&c.readiness_probe, "readiness"),
    ] {
        match probe.as_ref().and_then(|p| p.grpc.as_ref()) {
            Some(g) if g.port == health && g.service.as_deref() == Some(service) => {}
            other => fail(format!(
                "the {service} probe must be grpc {{port: {health}, service: {service}}}, is {other:?}"
            )),
        }
    }
    // Kubernetes mode: pool name, namespace from the downward API, identity for the lease.
    let env = c.env.as_deref().unwrap_or_default();
    let field_ref = |var: &str| {
        env.iter()
            .find(|e| e.name == var)
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|r| r.field_path.clone())
    };
    if field_ref("POD_NAME").as_deref() != Some("metadata.name") {
        fail(
            "env POD_NAME must come from fieldRef metadata.name (leader-election identity)".into(),
        );
    }
    if field_ref("POD_NAMESPACE").as_deref() != Some("metadata.namespace") {
        fail("env POD_NAMESPACE must come from fieldRef metadata.namespace".into());
    }
    let raw_ns = c
        .args
        .iter()
        .flatten()
        .any(|a| a == "--pool-namespace=$(POD_NAMESPACE)");
    if !raw_ns {
        fail("needs --pool-namespace=$(POD_NAMESPACE)".into());
    }
    match f.get("pool-name") {
        None => fail("needs --pool-name".into()),
        Some(pool) if pool.contains("$(") => fail(format!("--pool-name {pool} is not set")),
        Some(pool) => {
            if !r.pools.is_empty() && !r.pools.iter().any(|p| &p.metadata.name == pool) {
                let names: Vec<_> = r.pools.iter().map(|p| &p.metadata.name).collect();
                fail(format!(
                    "--pool-name {pool} is none of the rendered pools {names:?}"
                ));
            }
        }
    }

    // The config file: mounted from a rendered ConfigMap, and a valid EndpointPickerConfig.
    match f.get("config-file") {
        None => fail("needs --config-file".into()),
        Some(path) => match config_text(r, pod, c, namespace, path) {
            Ok((source, text)) => {
                if let Err(e) = EndpointPickerConfig::from_yaml_str(&text, &source) {
                    fail(format!("{source} is not a valid EndpointPickerConfig: {e}"));
                }
            }
            Err(e) => fail(format!("--config-file {path}: {e}")),
        },
    }

    // Hardening.
    let psc = pod.security_context.as_ref();
    let csc = c.security_context.as_ref();
    let non_root = csc
        .and_then(|s| s.run_as_non_root)
        .or(psc.and_then(|s| s.run_as_non_root));
    if non_root != Some(true) {
        fail("runAsNonRoot must be true".into());
    }
    if csc.and_then(|s| s.read_only_root_filesystem) != Some(true) {
        fail("readOnlyRootFilesystem must be true".into());
    }
    if csc.and_then(|s| s.allow_privilege_escalation) != Some(false) {
        fail("allowPrivilegeEscalation must be false".into());
    }
    let drops = csc
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|caps| caps.drop.clone())
        .unwrap_or_default();
    if !drops.iter().any(|d| d == "ALL") {
        fail("capabilities must drop ALL".into());
    }
    let resources = c.resources.as_ref();
    for (what, list) in [
        ("requests", resources.and_then(|r| r.requests.as_ref())),
        ("limits", resources.and_then(|r| r.limits.as_ref())),
    ] {
        for key in ["cpu", "memory"] {
            if !list.is_some_and(|l| l.contains_key(key)) {
                fail(format!("resources.{what}.{key} is not set"));
            }
        }
    }

    // A Service in front of it whose every targetPort is one of its ports, with the ext_proc
    // port among them.
    let labels = pod_labels(d);
    let fronting: Vec<&Service> = r
        .services
        .iter()
        .filter(|s| ns(&s.metadata.namespace) == namespace)
        .filter(|s| {
            let sel = s
                .spec
                .as_ref()
                .and_then(|s| s.selector.clone())
                .unwrap_or_default();
            selects(&sel, &labels)
        })
        .collect();
    if fronting.is_empty() {
        fail("no Service selects its Pods".into());
    }
    for s in &fronting {
        let sname = s.metadata.name.as_deref().unwrap_or_default();
        let ports = s
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default();
        let mut targets = BTreeSet::new();
        for p in &ports {
            let target = p.target_port.clone().unwrap_or(IntOrString::Int(p.port));
            match container_port(c, &target) {
                Some(n) => {
                    targets.insert(n);
                }
                None => fail(format!(
                    "Service {sname} port {} targets {target:?}, which the container does not expose",
                    p.port
                )),
            }
        }
        if !targets.contains(&grpc) {
            fail(format!(
                "Service {sname} does not reach the ext_proc port {grpc}"
            ));
        }
    }

    // RBAC: its ServiceAccount exists and is bound to exactly the rights it needs.
    let sa = pod
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    if !r
        .service_accounts
        .iter()
        .any(|s| s.metadata.name.as_deref() == Some(&sa) && ns(&s.metadata.namespace) == namespace)
    {
        fail(format!("ServiceAccount {sa} is not in the render"));
    }
    let mut bound_roles = Vec::new();
    for b in &r.role_bindings {
        let bns = ns(&b.metadata.namespace);
        let binds_sa = b.subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == sa
                && s.namespace.as_deref().unwrap_or(bns) == namespace
        });
        if !binds_sa || bns != namespace {
            continue;
        }
        if b.role_ref.kind != "Role" {
            fail(format!(
                "RoleBinding {:?} refers to a {}; use a namespaced Role",
                b.metadata.name, b.role_ref.kind
            ));
        }
        match r.roles.iter().find(|role| {
            role.metadata.name.as_deref() == Some(&b.role_ref.name)
                && ns(&role.metadata.namespace) == namespace
        }) {
            Some(role) => bound_roles.push(role),
            None => fail(format!("Role {} is not in the render", b.role_ref.name)),
        }
    }
    let mut granted = BTreeSet::new();
    for role in &bound_roles {
        if !add_grants(role.rules.iter().flatten(), &mut granted) {
            fail("Role rules must not use resourceNames or nonResourceURLs".into());
        }
    }
    let want = expected_grants();
    if granted != want {
        let extra: Vec<_> = granted.difference(&want).collect();
        let missing: Vec<_> = want.difference(&granted).collect();
        fail(format!(
            "Role grants are not least privilege: extra {extra:?}, missing {missing:?}"
        ));
    }

    // Cluster-wide: only the two reviews that protect /metrics (TokenReview and
    // SubjectAccessReview are cluster-scoped). A ServiceAccount subject of a
    // ClusterRoleBinding names its namespace; "default" stands for an unset one.
    let sa_ns = if namespace.is_empty() {
        "default"
    } else {
        namespace
    };
    let mut cluster_granted = BTreeSet::new();
    for b in &r.cluster_role_bindings {
        let binds_sa = b.subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(sa_ns)
        });
        if !binds_sa {
            continue;
        }
        let Some(role) = r
            .cluster_roles
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(&b.role_ref.name))
        else {
            fail(format!(
                "ClusterRole {} is not in the render",
                b.role_ref.name
            ));
            continue;
        };
        if !add_grants(role.rules.iter().flatten(), &mut cluster_granted) {
            fail("the picker's ClusterRole must not use resourceNames or nonResourceURLs".into());
        }
    }
    let want: BTreeSet<(String, String, String)> = [
        ("authentication.k8s.io", "tokenreviews"),
        ("authorization.k8s.io", "subjectaccessreviews"),
    ]
    .iter()
    .map(|(g, res)| (g.to_string(), res.to_string(), "create".to_string()))
    .collect();
    if cluster_granted != want {
        fail(format!(
            "the picker's cluster-wide grants are {cluster_granted:?}; want exactly {want:?} (for /metrics token reviews)"
        ));
    }
    // The reader role for Prometheus grants `get /metrics` and nothing else.
    for c in &r.cluster_roles {
        if c.metadata.name.as_deref() != Some("infergate-metrics-reader") {
            continue;
        }
        let ok = c.rules.iter().flatten().all(|rule| {
            rule.non_resource_urls.as_deref() == Some(&["/metrics".to_string()][..])
                && rule.verbs == ["get"]
                && rule.resources.is_none()
        });
        if !ok {
            fail("ClusterRole infergate-metrics-reader must grant only get on /metrics".into());
        }
    }
}

/// Adds the (apiGroup, resource, verb) triples `rules` grant to `granted`; `false` when a
/// rule uses resourceNames or nonResourceURLs, which the picker's roles must not.
fn add_grants<'a>(
    rules: impl Iterator<Item = &'a k8s_openapi::api::rbac::v1::PolicyRule>,
    granted: &mut BTreeSet<(String, String, String)>,
) -> bool {
    let mut plain = true;
    for rule in rules {
        plain &= rule.resource_names.is_none() && rule.non_resource_urls.is_none();
        for g in rule.api_groups.iter().flatten() {
            for res in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    granted.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    plain
}

/// (apiGroup, resource, verb) the picker needs, and nothing else.
fn expected_grants() -> BTreeSet<(String, String, String)> {
    let mut want = BTreeSet::new();
    let mut add = |group: &str, resources: &[&str], verbs: &[&str]| {
        for r in resources {
            for v in verbs {
                want.insert((group.to_string(), r.to_string(), v.to_string()));
            }
        }
    };
    let read = ["get", "list", "watch"];
    add("", &["pods"], &read);
    add(POOL_GROUP, &["inferencepools"], &read);
    add(
        "inference.networking.x-k8s.io",
        &[
            "inferenceobjectives",
            "inferencemodelrewrites",
            "inferencemodels",
        ],
        &read,
    );
    add(
        "coordination.k8s.io",
        &["leases"],
        &["get", "create", "update"],
    );
    want
}

/// The text of the file at `path` as the container sees it: a ConfigMap volume mounted at
/// its directory (or at the path itself with subPath), from a ConfigMap in the render.
fn config_text(
    r: &Render,
    pod: &k8s_openapi::api::core::v1::PodSpec,
    c: &Container,
    namespace: &str,
    path: &str,
) -> Result<(String, String), String> {
    for m in c.volume_mounts.iter().flatten() {
        let key = match &m.sub_path {
            Some(sub) if m.mount_path == path => sub.clone(),
            Some(_) => continue,
            None => match path.strip_prefix(&format!("{}/", m.mount_path.trim_end_matches('/'))) {
                Some(rest) => rest.to_string(),
                None => continue,
            },
        };
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .ok_or_else(|| format!("volume {} is not declared", m.name))?;
        let source = volume
            .config_map
            .as_ref()
            .ok_or_else(|| format!("volume {} is not a ConfigMap", m.name))?;
        // `items` maps keys to other file names.
        let key = match &source.items {
            Some(items) => items
                .iter()
                .find(|i| i.path == key)
                .map(|i| i.key.clone())
                .ok_or_else(|| format!("no item of volume {} is {key}", m.name))?,
            None => key,
        };
        let cm = r
            .config_maps
            .iter()
            .find(|cm| {
                cm.metadata.name.as_deref() == Some(source.name.as_str())
                    && ns(&cm.metadata.namespace) == namespace
            })
            .ok_or_else(|| format!("ConfigMap {} is not in the render", source.name))?;
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get(&key))
            .ok_or_else(|| format!("ConfigMap {} has no key {key}", source.name))?;
        return Ok((format!("ConfigMap {} key {key}", source.name), text.clone()));
    }
    Err("no volumeMount provides this path".into())
}

fn check_pools(r: &Render, errors: &mut Vec<String>) {
    for pool in &r.pools {
        let pns = &pool.metadata.namespace;
        let mut fail =
            |msg: String| errors.push(format!("InferencePool {}: {msg}", pool.metadata.name));
        // Its picker: a Service in the render with that port, in front of a picker.
        match &pool.spec.endpoint_picker_ref {
            None => fail("has no endpointPickerRef".into()),
            Some(epp) => {
                if epp.kind != "Service" || !epp.group.is_empty() {
                    fail(format!(
                        "endpointPickerRef is a {}/{}, not a core Service",
                        epp.group, epp.kind
                    ));
                }
                if epp.failure_mode != FailureMode::FailClose {
                    fail("the examples use failureMode FailClose".into());
                }
                let port = epp.port.map(|p| p.number);
                match r.services.iter().find(|s| {
                    s.metadata.name.as_deref() == Some(epp.name.as_str())
                        && same_ns(&s.metadata.namespace, pns)
                }) {
                    None => fail(format!(
                        "endpointPickerRef names Service {}, not in the render",
                        epp.name
                    )),
                    Some(s) => {
                        let ports = s
                            .spec
                            .as_ref()
                            .and_then(|s| s.ports.clone())
                            .unwrap_or_default();
                        if !ports.iter().any(|p| Some(p.port) == port) {
                            fail(format!("Service {} has no port {port:?}", epp.name));
                        }
                        let sel = s
                            .spec
                            .as_ref()
                            .and_then(|s| s.selector.clone())
                            .unwrap_or_default();
                        let fronts_picker = r.deployments.iter().any(|d| {
                            picker_container(d).is_some() && selects(&sel, &pod_labels(d))
                        });
                        if !fronts_picker {
                            fail(format!(
                                "Service {} does not select an `infergate epp` Deployment",
                                epp.name
                            ));
                        }
                    }
                }
            }
        }
        // Its model servers: a Deployment whose Pod template it selects, exposing its ports.
        let servers: Vec<&Deployment> = r
            .deployments
            .iter()
            .filter(|d| same_ns(&d.metadata.namespace, pns))
            .filter(|d| selects(&pool.spec.selector.match_labels, &pod_labels(d)))
            .collect();
        if servers.is_empty() {
            fail(format!(
                "selector {:?} matches no Deployment's Pod template",
                pool.spec.selector.match_labels
            ));
        }
        for d in servers {
            let dname = d.metadata.name.clone().unwrap_or_default();
            if picker_container(d).is_some() {
                fail(format!("selects the picker Deployment {dname}"));
            }
            let containers = &d
                .spec
                .as_ref()
                .unwrap()
                .template
                .spec
                .as_ref()
                .unwrap()
                .containers;
            for port in &pool.spec.target_ports {
                let exposed = containers
                    .iter()
                    .any(|c| container_port(c, &IntOrString::Int(port.number)).is_some());
                if !exposed {
                    fail(format!(
                        "Deployment {dname} exposes no containerPort {}",
                        port.number
                    ));
                }
            }
            let labels = pod_labels(d);
            if let Some(engine) = labels.get("inference.networking.k8s.io/engine-type") {
                let known = ["vllm", "sglang", "trtllm-serve", "triton", "llamacpp"];
                if !known.contains(&engine.as_str()) {
                    fail(format!(
                        "Deployment {dname}: engine-type {engine} is none of {known:?}"
                    ));
                }
            }
        }
    }
    // Objectives and rewrites name a pool of the render.
    let pool_names: BTreeSet<(&str, &str)> = r
        .pools
        .iter()
        .map(|p| (p.metadata.namespace.as_str(), p.metadata.name.as_str()))
        .collect();
    let refs = r
        .objectives
        .iter()
        .map(|o| ("InferenceObjective", &o.metadata, &o.spec.pool_ref))
        .chain(
            r.rewrites
                .iter()
                .map(|w| ("InferenceModelRewrite", &w.metadata, &w.spec.pool_ref)),
        );
    for (kind, meta, pool_ref) in refs {
        if pool_ref.group != POOL_GROUP || pool_ref.kind != "InferencePool" {
            errors.push(format!(
                "{kind} {}: poolRef is not an InferencePool",
                meta.name
            ));
        }
        if !pool_names.contains(&(meta.namespace.as_str(), pool_ref.name.as_str())) {
            errors.push(format!(
                "{kind} {}: poolRef {} is not a pool of the render",
                meta.name, pool_ref.name
            ));
        }
    }
}

/// A namespace of a k8s-openapi object (None = unset) and of an infergate resource (unset
/// reads as "default") name the same namespace at apply time.
fn same_ns(k8s: &Option<String>, gie: &str) -> bool {
    k8s.as_deref().unwrap_or("default") == gie
}

fn check_routes(dir: &Path, r: &Render, errors: &mut Vec<String>) {
    // The gateway examples' class names, by directory.
    let expected_class = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| match n {
            "envoy-gateway" => Some("eg"),
            "kgateway" => Some("kgateway"),
            "istio" => Some("istio"),
            _ => None,
        });
    for g in &r.gateways {
        let mut fail = |msg: String| errors.push(format!("Gateway {}: {msg}", g.metadata.name));
        if g.api_version != GATEWAY_API_VERSION || g.kind != "Gateway" {
            fail(format!("{} {}", g.api_version, g.kind));
        }
        if let Some(class) = expected_class {
            if g.spec.gateway_class_name != class {
                fail(format!(
                    "gatewayClassName {} should be {class}",
                    g.spec.gateway_class_name
                ));
            }
        }
        if g.spec.listeners.is_empty() {
            fail("has no listeners".into());
        }
        for l in &g.spec.listeners {
            if !["HTTP", "HTTPS"].contains(&l.protocol.as_str()) || l.port == 0 || l.name.is_empty()
            {
                fail(format!("listener {l:?} is not an HTTP(S) listener"));
            }
        }
    }
    if expected_class.is_some() && (r.gateways.is_empty() || r.routes.is_empty()) {
        errors.push("a gateway example needs a Gateway and an HTTPRoute".into());
    }
    for route in &r.routes {
        let rns = ns(&route.metadata.namespace);
        let mut fail =
            |msg: String| errors.push(format!("HTTPRoute {}: {msg}", route.metadata.name));
        if route.api_version != GATEWAY_API_VERSION || route.kind != "HTTPRoute" {
            fail(format!("{} {}", route.api_version, route.kind));
        }
        for p in &route.spec.parent_refs {
            let is_gateway = p.group.as_deref().unwrap_or("gateway.networking.k8s.io")
                == "gateway.networking.k8s.io"
                && p.kind.as_deref().unwrap_or("Gateway") == "Gateway";
            let pns = p.namespace.as_deref().unwrap_or(rns);
            let found = r
                .gateways
                .iter()
                .any(|g| g.metadata.name == p.name && ns(&g.metadata.namespace) == pns);
            if !is_gateway || !found {
                fail(format!("parentRef {p:?} is not a Gateway of the render"));
            }
        }
        if route.spec.rules.is_empty() {
            fail("has no rules".into());
        }
        for rule in &route.spec.rules {
            for m in &rule.matches {
                if let Some(path) = &m.path {
                    let types = ["Exact", "PathPrefix", "RegularExpression"];
                    if !types.contains(&path.match_type.as_str()) || !path.value.starts_with('/') {
                        fail(format!("path match {path:?} is invalid"));
                    }
                }
            }
            if let Some(t) = &rule.timeouts {
                for d in [&t.request, &t.backend_request].into_iter().flatten() {
                    if let Err(e) = parse_go_duration(d) {
                        fail(format!("timeout {d}: {e}"));
                    }
                }
            }
            if rule.backend_refs.is_empty() {
                fail("a rule has no backendRefs".into());
            }
            for b in &rule.backend_refs {
                if b.group.as_deref() != Some(POOL_GROUP)
                    || b.kind.as_deref() != Some("InferencePool")
                {
                    fail(format!(
                        "backendRef {b:?} is not {{group: {POOL_GROUP}, kind: InferencePool}}"
                    ));
                    continue;
                }
                if b.port.is_some() {
                    fail(format!(
                        "backendRef {} sets a port; an InferencePool has its targetPorts",
                        b.name
                    ));
                }
                if b.weight.is_some_and(|w| w < 0) {
                    fail(format!("backendRef {} has a negative weight", b.name));
                }
                let bns = b
                    .namespace
                    .clone()
                    .or_else(|| route.metadata.namespace.clone());
                let found = r
                    .pools
                    .iter()
                    .any(|p| p.metadata.name == b.name && same_ns(&bns, &p.metadata.namespace));
                if !found {
                    fail(format!(
                        "backendRef InferencePool {} is not in the render",
                        b.name
                    ));
                }
            }
        }
    }
}

/// Everything about one render; the problems found.
fn check_render(dir: &Path, docs: &[Value]) -> Vec<String> {
    let mut errors = Vec::new();
    let r = read(docs, &mut errors);
    let pickers: Vec<(&Deployment, &Container)> = r
        .deployments
        .iter()
        .filter_map(|d| Some((d, picker_container(d)?)))
        .collect();
    if !r.pools.is_empty() && pickers.is_empty() {
        errors.push("pools but no `infergate epp` Deployment".into());
    }
    for (d, c) in pickers {
        check_picker(&r, d, c, &mut errors);
    }
    check_pools(&r, &mut errors);
    check_routes(dir, &r, &mut errors);
    errors
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_kustomization_under_deploy_renders_and_passes_the_checks() {
    let root = deploy_dir();
    let dirs = kustomizations(&root);
    let rel = |d: &Path| d.strip_prefix(&root).unwrap().display().to_string();
    let names: BTreeSet<String> = dirs.iter().map(|d| rel(d)).collect();
    for want in [
        "base",
        "examples/vllm",
        "examples/sim",
        "examples/gateways/envoy-gateway",
        "examples/gateways/kgateway",
        "examples/gateways/istio",
    ] {
        assert!(
            names.contains(want),
            "deploy/{want} has no kustomization (found {names:?})"
        );
    }
    let mut problems = Vec::new();
    for dir in &dirs {
        let docs = render(dir);
        assert!(!docs.is_empty(), "deploy/{} renders nothing", rel(dir));
        for e in check_render(dir, &docs) {
            problems.push(format!("deploy/{}: {e}", rel(dir)));
        }
    }
    assert!(
        problems.is_empty(),
        "problems:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_base_picker_is_what_the_docs_say() {
    let docs = render(&deploy_dir().join("base"));
    let mut errors = Vec::new();
    let r = read(&docs, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let d = r
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("infergate-epp"))
        .expect("Deployment infergate-epp");
    assert_eq!(
        d.spec.as_ref().unwrap().replicas,
        Some(2),
        "active-passive pair"
    );
    let c = picker_container(d).expect("an `infergate epp` container");
    let f = flags(c);
    assert_eq!(f["config-file"], "/etc/infergate/config.yaml");
    assert_eq!(f["grpc-port"], "9002");
    assert_eq!(f["grpc-health-port"], "9003");
    assert_eq!(f["metrics-port"], "9090");
    // The config is generated by kustomize (hashed name) from deploy/base/config.yaml.
    let cm = r
        .config_maps
        .iter()
        .find(|cm| {
            cm.metadata
                .name
                .as_deref()
                .unwrap_or("")
                .starts_with("infergate-epp-config-")
        })
        .expect("generated ConfigMap infergate-epp-config-<hash>");
    let on_disk = std::fs::read_to_string(deploy_dir().join("base/config.yaml")).unwrap();
    assert_eq!(cm.data.as_ref().unwrap()["config.yaml"], on_disk);
    let config = EndpointPickerConfig::from_yaml_str(&on_disk, "deploy/base/config.yaml").unwrap();
    assert_eq!(config, EndpointPickerConfig::builtin("infergate").unwrap());

    let s = r
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("infergate-epp"))
        .expect("Service infergate-epp");
    let ports: BTreeMap<String, (i32, Option<String>)> = s
        .spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap(), (p.port, p.app_protocol.clone())))
        .collect();
    // TLS by default: no h2c appProtocol that would make a gateway speak cleartext.
    assert_eq!(ports["grpc-ext-proc"], (9002, None));
    assert_eq!(ports["grpc-health"].0, 9003);
    assert_eq!(ports["http-metrics"].0, 9090);
}

/// The round trip is what catches a misspelt field in a k8s-openapi object; make sure it does.
#[test]
fn a_misspelt_field_fails_the_checks() {
    let dir = deploy_dir().join("base");
    let mut docs = render(&dir);
    assert!(check_render(&dir, &docs).is_empty());
    let deployment = docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
    let container = &mut deployment["spec"]["template"]["spec"]["containers"][0];
    let probe = container
        .as_object_mut()
        .unwrap()
        .remove("readinessProbe")
        .unwrap();
    container["readinesProbe"] = probe;
    let errors = check_render(&dir, &docs);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("readinesProbe: unknown field")),
        "{errors:?}"
    );

    // And an unknown kind is refused.
    let mut docs = render(&dir);
    docs.push(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}
    }));
    let errors = check_render(&dir, &docs);
    assert!(
        errors.iter().any(|e| e.contains("unknown apiVersion/kind")),
        "{errors:?}"
    );
}

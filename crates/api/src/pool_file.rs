//! The static pool file of `infergate epp --pool-file FILE`: a multi-document YAML stream of
//! Kubernetes-style objects describing one pool without a Kubernetes API server.
//!
//! Documents are chosen by `kind`:
//! - `InferencePool` (at most one; its name is the pool's name),
//! - `InferenceObjective`, `InferenceModelRewrite`, `InferenceModel` (legacy),
//! - `StaticEndpoints` (ours, `infergate.dev/v1alpha1`): the model-server addresses; several
//!   documents are concatenated.
//!
//! Empty documents are skipped. Every problem found is reported with the line in the whole
//! file, the field path and the object. This module only parses; `PoolFile::load` is the one
//! function that reads a file.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{FieldError, FieldPath, LoadError, Problem};
use crate::resources::{
    InferenceModel, InferenceModelRewrite, InferenceObjective, InferencePool, ObjectMeta, PoolRef,
    Resource, ALPHA_API_VERSION, POOL_API_VERSION,
};
use crate::yaml::{check_syntax, line_of, problem_from_yaml};

/// apiVersion of [`StaticEndpoints`].
pub const STATIC_ENDPOINTS_API_VERSION: &str = "infergate.dev/v1alpha1";

/// The kinds a pool file may hold, with their apiVersion.
pub const KNOWN_KINDS: &[(&str, &str)] = &[
    ("InferencePool", POOL_API_VERSION),
    ("InferenceObjective", ALPHA_API_VERSION),
    ("InferenceModelRewrite", ALPHA_API_VERSION),
    ("InferenceModel", ALPHA_API_VERSION),
    ("StaticEndpoints", STATIC_ENDPOINTS_API_VERSION),
];

/// A list of model-server endpoints given by hand (our own kind, `infergate.dev/v1alpha1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticEndpoints {
    /// Always [`STATIC_ENDPOINTS_API_VERSION`].
    pub api_version: String,
    /// Always `StaticEndpoints`.
    pub kind: String,
    /// Only the name is used, in error messages.
    pub metadata: ObjectMeta,
    /// The endpoints.
    pub spec: StaticEndpointsSpec,
}

/// The body of a [`StaticEndpoints`] document.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticEndpointsSpec {
    /// The endpoints, in file order.
    #[serde(default)]
    pub endpoints: Vec<StaticEndpoint>,
}

/// One model-server endpoint: an address, a port and what serves there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticEndpoint {
    /// IPv4 or IPv6 address.
    pub address: IpAddr,
    /// TCP port (1 to 65535).
    pub port: u16,
    /// The model server's engine, which decides how its metrics are read.
    #[serde(default)]
    pub engine: Engine,
    /// Labels, as a pod's would be.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// A name for logs and metrics; `address:port` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl StaticEndpoint {
    /// The endpoint's socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// The given name, or `address:port`.
    pub fn display_name(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => self.socket_addr().to_string(),
        }
    }
}

/// The model-server engine behind an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Engine {
    /// vLLM (the default).
    #[default]
    #[serde(rename = "vllm")]
    Vllm,
    /// SGLang.
    #[serde(rename = "sglang")]
    Sglang,
    /// TensorRT-LLM's `trtllm-serve`.
    #[serde(rename = "trtllm-serve")]
    TrtllmServe,
    /// Triton with the TensorRT-LLM backend.
    #[serde(rename = "triton")]
    Triton,
    /// llama.cpp's server.
    #[serde(rename = "llamacpp")]
    Llamacpp,
}

impl Engine {
    pub const ALL: [Engine; 5] = [
        Engine::Vllm,
        Engine::Sglang,
        Engine::TrtllmServe,
        Engine::Triton,
        Engine::Llamacpp,
    ];

    /// The name as written in YAML, flags and the `engine-type` pod label.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::TrtllmServe => "trtllm-serve",
            Engine::Triton => "triton",
            Engine::Llamacpp => "llamacpp",
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for an engine name that is not one of [`Engine::ALL`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown engine {0:?} (known: vllm, sglang, trtllm-serve, triton, llamacpp)")]
pub struct UnknownEngine(pub String);

impl std::str::FromStr for Engine {
    type Err = UnknownEngine;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Engine::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| UnknownEngine(s.to_string()))
    }
}

impl Resource for StaticEndpoints {
    const API_VERSION: &'static str = STATIC_ENDPOINTS_API_VERSION;
    const KIND: &'static str = "StaticEndpoints";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        if self.metadata.name.is_empty() {
            errors.push(FieldError::new("metadata.name", "must not be empty"));
        }
        let endpoints = FieldPath::parse("spec.endpoints");
        for (i, endpoint) in self.spec.endpoints.iter().enumerate() {
            if endpoint.port == 0 {
                errors.push(FieldError::new(
                    endpoints.index(i).key("port"),
                    "0 is out of range 1..=65535",
                ));
            }
            if endpoint.name.as_deref() == Some("") {
                errors.push(FieldError::new(
                    endpoints.index(i).key("name"),
                    "must not be empty (leave it out to use address:port)",
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// Everything a pool file describes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PoolFile {
    /// The InferencePool document, if the file has one.
    pub pool: Option<InferencePool>,
    /// Endpoints of every StaticEndpoints document, in file order.
    pub endpoints: Vec<StaticEndpoint>,
    /// InferenceObjectives, in file order.
    pub objectives: Vec<InferenceObjective>,
    /// InferenceModelRewrites in precedence order: those with a `creationTimestamp` oldest
    /// first, then those without one in file order (an object without a creation time is
    /// taken as created when the file is loaded, so after any timestamped one).
    pub rewrites: Vec<InferenceModelRewrite>,
    /// Legacy InferenceModels, in file order.
    pub models: Vec<InferenceModel>,
}

impl PoolFile {
    /// Reads and parses the pool file at `path`.
    pub fn load(path: &Path) -> Result<PoolFile, LoadError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            file: file.clone(),
            source,
        })?;
        PoolFile::from_yaml_str(&text, &file)
    }

    /// Parses a pool file; `source` names it in error messages (usually the file path).
    ///
    /// ```
    /// use infergate_api::PoolFile;
    ///
    /// let text = "\
    /// apiVersion: infergate.dev/v1alpha1
    /// kind: StaticEndpoints
    /// metadata: {name: local}
    /// spec:
    ///   endpoints:
    ///   - {address: 127.0.0.1, port: 8000}
    /// ";
    /// let file = PoolFile::from_yaml_str(text, "pool.yaml").unwrap();
    /// assert_eq!(file.endpoints[0].socket_addr().to_string(), "127.0.0.1:8000");
    ///
    /// let err = PoolFile::from_yaml_str(&text.replace("8000", "0"), "pool.yaml").unwrap_err();
    /// assert_eq!(err.line(), Some(6));
    /// ```
    pub fn from_yaml_str(text: &str, source: &str) -> Result<PoolFile, LoadError> {
        let mut loader = Loader {
            text,
            file: source,
            problems: Vec::new(),
        };
        let parsed = loader.documents();
        loader.cross_check(&parsed);
        if !loader.problems.is_empty() {
            return Err(LoadError::Invalid {
                problems: loader.problems,
            });
        }
        Ok(parsed.into_pool_file())
    }
}

/// An object with where it came from, for messages that point at it later.
struct Placed<T> {
    object: T,
    doc: usize,
    label: String,
}

#[derive(Default)]
struct Parsed {
    pools: Vec<Placed<InferencePool>>,
    endpoints: Vec<Placed<StaticEndpoints>>,
    objectives: Vec<Placed<InferenceObjective>>,
    rewrites: Vec<Placed<InferenceModelRewrite>>,
    models: Vec<Placed<InferenceModel>>,
}

impl Parsed {
    fn into_pool_file(self) -> PoolFile {
        let mut rewrites: Vec<InferenceModelRewrite> =
            self.rewrites.into_iter().map(|p| p.object).collect();
        // Stable: equal times (and all untimestamped ones) keep file order.
        rewrites.sort_by_key(|r| match r.metadata.creation_time() {
            Some(time) => (false, time),
            None => (true, (0, 0)),
        });
        PoolFile {
            pool: self.pools.into_iter().next().map(|p| p.object),
            endpoints: self
                .endpoints
                .into_iter()
                .flat_map(|p| p.object.spec.endpoints)
                .collect(),
            objectives: self.objectives.into_iter().map(|p| p.object).collect(),
            rewrites,
            models: self.models.into_iter().map(|p| p.object).collect(),
        }
    }
}

/// Just enough of a document to choose its type and name it in messages.
#[derive(Deserialize)]
struct TypeMeta {
    #[serde(default, rename = "apiVersion")]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: Option<NameOnly>,
}

#[derive(Deserialize)]
struct NameOnly {
    #[serde(default)]
    name: Option<String>,
}

struct Loader<'a> {
    text: &'a str,
    file: &'a str,
    problems: Vec<Problem>,
}

impl Loader<'_> {
    fn documents(&mut self) -> Parsed {
        let mut parsed = Parsed::default();
        if let Err(err) = check_syntax(self.text) {
            self.problems.push(problem_from_yaml(&err, self.file, None));
            return parsed;
        }
        // Two passes over the same stream: the first reads each document's kind, the second
        // deserializes it as that kind straight from the parser, so errors keep their lines.
        let peeks = serde_yaml_ng::Deserializer::from_str(self.text);
        let bodies = serde_yaml_ng::Deserializer::from_str(self.text);
        for (doc, (peek, body)) in peeks.zip(bodies).enumerate() {
            let meta = match Option::<TypeMeta>::deserialize(peek) {
                Ok(Some(meta)) => meta,
                Ok(None) => continue,
                Err(err) => {
                    // The document is not a mapping, or its kind is not a string.
                    let mut problem = problem_from_yaml(&err, self.file, None);
                    if problem.path.is_root() {
                        problem.message = format!(
                            "each document must be an object with apiVersion, kind, metadata \
                             and spec ({})",
                            problem.message
                        );
                    }
                    self.problems.push(problem);
                    continue;
                }
            };
            let name = meta.metadata.and_then(|m| m.name);
            let Some(kind) = meta.kind else {
                let label = format!("document {}", doc + 1);
                self.field_problem(
                    doc,
                    &label,
                    FieldPath::parse("kind"),
                    format!("required field is missing (known kinds: {})", known_kinds()),
                );
                continue;
            };
            let label = match &name {
                Some(name) => format!("{kind} {name:?}"),
                None => format!("{kind} (document {})", doc + 1),
            };
            let Some(&(_, expected)) = KNOWN_KINDS.iter().find(|(k, _)| *k == kind) else {
                self.field_problem(
                    doc,
                    &label,
                    FieldPath::parse("kind"),
                    format!("{kind:?} is unknown (known kinds: {})", known_kinds()),
                );
                continue;
            };
            match meta.api_version.as_deref() {
                Some(version) if version == expected => {}
                Some(version) => {
                    self.field_problem(
                        doc,
                        &label,
                        FieldPath::parse("apiVersion"),
                        format!(
                            "{version:?} is not supported for kind {kind} (expected {expected}; \
                             known kinds: {})",
                            known_kinds()
                        ),
                    );
                    continue;
                }
                None => {
                    self.field_problem(
                        doc,
                        &label,
                        FieldPath::parse("apiVersion"),
                        format!("required field is missing (expected {expected})"),
                    );
                    continue;
                }
            }
            match kind.as_str() {
                "InferencePool" => {
                    if let Some(object) = self.object::<InferencePool>(body, doc, &label) {
                        if let Some(first) = parsed.pools.first() {
                            let line = line_of(self.text, first.doc, &FieldPath::root());
                            self.field_problem(
                                doc,
                                &label,
                                FieldPath::root(),
                                format!(
                                    "a pool file holds at most one InferencePool; {} comes \
                                     first{}",
                                    first.label,
                                    at_line(line)
                                ),
                            );
                        } else {
                            parsed.pools.push(Placed { object, doc, label });
                        }
                    }
                }
                "InferenceObjective" => {
                    if let Some(object) = self.object(body, doc, &label) {
                        parsed.objectives.push(Placed { object, doc, label });
                    }
                }
                "InferenceModelRewrite" => {
                    if let Some(object) = self.object(body, doc, &label) {
                        parsed.rewrites.push(Placed { object, doc, label });
                    }
                }
                "InferenceModel" => {
                    if let Some(object) = self.object(body, doc, &label) {
                        parsed.models.push(Placed { object, doc, label });
                    }
                }
                _ => {
                    if let Some(object) = self.object(body, doc, &label) {
                        parsed.endpoints.push(Placed { object, doc, label });
                    }
                }
            }
        }
        parsed
    }

    /// Deserializes and validates one document as `T`; problems are recorded, not returned.
    fn object<T: Resource + DeserializeOwned>(
        &mut self,
        body: serde_yaml_ng::Deserializer<'_>,
        doc: usize,
        label: &str,
    ) -> Option<T> {
        let object = match T::deserialize(body) {
            Ok(object) => object,
            Err(err) => {
                self.problems
                    .push(problem_from_yaml(&err, self.file, Some(label.to_string())));
                return None;
            }
        };
        match object.validate() {
            Ok(()) => Some(object),
            Err(errors) => {
                for FieldError { path, message } in errors {
                    self.field_problem(doc, label, path, message);
                }
                None
            }
        }
    }

    fn field_problem(&mut self, doc: usize, label: &str, path: FieldPath, message: String) {
        self.problems.push(Problem {
            file: self.file.to_string(),
            line: line_of(self.text, doc, &path),
            object: Some(label.to_string()),
            path,
            message,
        });
    }

    /// Rules across documents: one pool, no duplicates.
    fn cross_check(&mut self, parsed: &Parsed) {
        self.check_pool_refs(parsed);

        let mut addresses = HashMap::new();
        let mut names = HashMap::new();
        for placed in &parsed.endpoints {
            let base = FieldPath::parse("spec.endpoints");
            for (i, endpoint) in placed.object.spec.endpoints.iter().enumerate() {
                let addr = endpoint.socket_addr();
                self.unique(
                    &mut addresses,
                    addr.to_string(),
                    placed,
                    base.index(i).key("address"),
                    &format!("endpoint {addr}"),
                );
                if let Some(name) = &endpoint.name {
                    self.unique(
                        &mut names,
                        name.clone(),
                        placed,
                        base.index(i).key("name"),
                        &format!("endpoint name {name:?}"),
                    );
                }
            }
        }

        let name_path = FieldPath::parse("metadata.name");
        let mut seen = HashMap::new();
        for placed in &parsed.objectives {
            let meta = &placed.object.metadata;
            let key = format!("{}/{}", meta.namespace, meta.name);
            let what = format!("InferenceObjective name {:?}", meta.name);
            self.unique(&mut seen, key, placed, name_path.clone(), &what);
        }
        let mut seen = HashMap::new();
        for placed in &parsed.rewrites {
            let meta = &placed.object.metadata;
            let key = format!("{}/{}", meta.namespace, meta.name);
            let what = format!("InferenceModelRewrite name {:?}", meta.name);
            self.unique(&mut seen, key, placed, name_path.clone(), &what);
        }
        let mut seen = HashMap::new();
        let mut model_names = HashMap::new();
        for placed in &parsed.models {
            let meta = &placed.object.metadata;
            let key = format!("{}/{}", meta.namespace, meta.name);
            let what = format!("InferenceModel name {:?}", meta.name);
            self.unique(&mut seen, key, placed, name_path.clone(), &what);
            let model = &placed.object.spec.model_name;
            self.unique(
                &mut model_names,
                model.clone(),
                placed,
                FieldPath::parse("spec.modelName"),
                &format!("modelName {model:?}"),
            );
        }
    }

    /// Records a problem when `key` was already seen; remembers where it was seen first.
    /// Lines are looked up only for duplicates, so large endpoint lists stay cheap.
    fn unique<T>(
        &mut self,
        seen: &mut HashMap<String, (usize, FieldPath)>,
        key: String,
        placed: &Placed<T>,
        path: FieldPath,
        what: &str,
    ) {
        if let Some((first_doc, first_path)) = seen.get(&key) {
            let first = line_of(self.text, *first_doc, first_path);
            let message = format!("{what} is listed twice{}", first_at(first));
            self.field_problem(placed.doc, &placed.label, path, message);
        } else {
            seen.insert(key, (placed.doc, path));
        }
    }

    /// Every poolRef names the file's InferencePool (or, without one, the same pool), in the
    /// pool's namespace.
    fn check_pool_refs(&mut self, parsed: &Parsed) {
        let mut refs: Vec<(&ObjectMeta, &PoolRef, usize, &str)> = Vec::new();
        for p in &parsed.objectives {
            refs.push((&p.object.metadata, &p.object.spec.pool_ref, p.doc, &p.label));
        }
        for p in &parsed.rewrites {
            refs.push((&p.object.metadata, &p.object.spec.pool_ref, p.doc, &p.label));
        }
        for p in &parsed.models {
            refs.push((&p.object.metadata, &p.object.spec.pool_ref, p.doc, &p.label));
        }
        refs.sort_by_key(|r| r.2);
        let ref_path = FieldPath::parse("spec.poolRef.name");

        if let Some(pool) = parsed.pools.first() {
            let pool_meta = &pool.object.metadata;
            for (meta, pool_ref, doc, label) in refs {
                if pool_ref.name != pool_meta.name {
                    self.field_problem(
                        doc,
                        label,
                        ref_path.clone(),
                        format!(
                            "names pool {:?}, but this file's InferencePool is {:?}",
                            pool_ref.name, pool_meta.name
                        ),
                    );
                } else if meta.namespace != pool_meta.namespace {
                    self.field_problem(
                        doc,
                        label,
                        FieldPath::parse("metadata.namespace"),
                        format!(
                            "is {:?}, but the InferencePool is in {:?}; a poolRef refers to \
                             a pool in its own namespace",
                            meta.namespace, pool_meta.namespace
                        ),
                    );
                }
            }
            return;
        }

        // Without an InferencePool document the pool is named on the command line; the file
        // still describes one pool, so all references must agree.
        let mut first: Option<(&str, &str, Option<usize>)> = None;
        for (_, pool_ref, doc, label) in refs {
            match first {
                None => first = Some((&pool_ref.name, label, line_of(self.text, doc, &ref_path))),
                Some((name, first_label, first_line)) if name != pool_ref.name => {
                    self.field_problem(
                        doc,
                        label,
                        ref_path.clone(),
                        format!(
                            "names pool {:?}, but {first_label} names pool {name:?}{}; one \
                             pool file describes one pool",
                            pool_ref.name,
                            at_line(first_line)
                        ),
                    );
                }
                Some(_) => {}
            }
        }
    }
}

fn known_kinds() -> String {
    KNOWN_KINDS
        .iter()
        .map(|(kind, version)| format!("{kind} ({version})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

fn first_at(line: Option<usize>) -> String {
    line.map(|l| format!(" (first at line {l})"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;

//! Objectives (priority per named objective) and model rewrites, in the engine-neutral form
//! the scheduler uses. Sources convert the Kubernetes objects of `infergate-api` into these.

/// An InferenceObjective: a name a request can carry in `x-gateway-inference-objective`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Objective {
    pub name: String,
    /// Higher is more important; negative is sheddable. Unset in the object means 0.
    pub priority: i32,
}

/// One InferenceModelRewrite (or legacy InferenceModel) in precedence order.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    /// `namespace/name` of the source object, for logs and errors.
    pub source: String,
    pub rules: Vec<RewriteRule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RewriteRule {
    /// Exact model names this rule matches; empty matches every model.
    pub matches: Vec<String>,
    pub targets: Vec<RewriteTarget>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RewriteTarget {
    pub model: String,
    pub weight: u32,
}

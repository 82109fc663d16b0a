//! Who may read the picker's `/metrics` in Kubernetes mode: a bearer token that the API
//! server authenticates (TokenReview) and authorises for `GET /metrics` (a
//! SubjectAccessReview on the non-resource URL), as Kubernetes components protect their
//! metrics. Prometheus then needs a ServiceAccount whose ClusterRole grants
//! `nonResourceURLs: ["/metrics"], verbs: ["get"]`.
//!
//! Answers are cached per token (allowed for a minute, refused for ten seconds) so a
//! scrape every few seconds costs the API server one review pair a minute. When the API
//! server cannot be asked, the answer is an error, never a silent "allowed".

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use kube::Client;
use parking_lot::Mutex;

const ALLOWED_FOR: Duration = Duration::from_secs(60);
const REFUSED_FOR: Duration = Duration::from_secs(10);
/// Cached tokens at most; a flood of made-up tokens cannot grow the cache without bound.
const MAX_CACHED: usize = 1024;

/// The answer for one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The token's user may `GET /metrics`.
    Allowed,
    /// The token is not valid (401).
    Unauthenticated(String),
    /// The token is valid, but its user may not read metrics (403).
    Forbidden(String),
}

/// Reviews bearer tokens against the API server, with a small cache.
pub struct TokenReviewer {
    client: Client,
    path: String,
    timeout: Duration,
    cache: Mutex<HashMap<String, (Instant, Verdict)>>,
}

impl TokenReviewer {
    /// A reviewer for requests to `path` (the metrics path, `/metrics`).
    pub fn new(client: Client, path: impl Into<String>) -> TokenReviewer {
        TokenReviewer {
            client,
            path: path.into(),
            timeout: Duration::from_secs(5),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// How long one review may take (5 s by default); kube-rs retries an unavailable API
    /// server on its own, and a scrape must not hang meanwhile.
    pub fn with_timeout(mut self, timeout: Duration) -> TokenReviewer {
        self.timeout = timeout;
        self
    }

    /// Whether `token` may read the metrics; `Err` when the API server cannot say.
    pub async fn review(&self, token: &str) -> Result<Verdict, String> {
        if let Some((at, v)) = self.cache.lock().get(token) {
            let ttl = if *v == Verdict::Allowed {
                ALLOWED_FOR
            } else {
                REFUSED_FOR
            };
            if at.elapsed() < ttl {
                return Ok(v.clone());
            }
        }
        let verdict = tokio::time::timeout(self.timeout, self.ask(token))
            .await
            .map_err(|_| {
                format!(
                    "the API server did not answer the token review within {:?}",
                    self.timeout
                )
            })??;
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (at, _)| at.elapsed() < REFUSED_FOR);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(token.to_owned(), (Instant::now(), verdict.clone()));
        Ok(verdict)
    }

    async fn ask(&self, token: &str) -> Result<Verdict, String> {
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        let status = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("TokenReview failed: {e}"))?
            .status
            .unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "token not valid".into());
            return Ok(Verdict::Unauthenticated(why));
        }
        let user = status.user.unwrap_or_default();
        let access: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                uid: user.uid,
                groups: user.groups,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(self.path.clone()),
                    verb: Some("get".into()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let status = access
            .create(&PostParams::default(), &sar)
            .await
            .map_err(|e| format!("SubjectAccessReview failed: {e}"))?
            .status
            .unwrap_or_default();
        let name = user.username.unwrap_or_default();
        Ok(if status.allowed {
            Verdict::Allowed
        } else {
            Verdict::Forbidden(format!(
                "{name} may not get {}{}",
                self.path,
                status
                    .reason
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ))
        })
    }
}

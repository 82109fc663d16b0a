//! The director: one request in, one routing decision out.
//!
//! Steps, in the GIE's order: parse the body, resolve the objective's priority, rewrite the
//! model, narrow the candidates to the gateway's subset hint, check saturation and shed
//! sheddable work, run the scheduling profile, then record the decision in the prefix index
//! and the in-flight counters. The returned [`Decision`] holds an [`InflightGuard`] whose
//! drop marks the request complete, so a stream that ends any way at all (response end,
//! reset, timeout, picker error) gives its slot back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rand::RngCore;

use crate::datastore::{Datastore, Snapshot};
use crate::endpoint::Endpoint;
use crate::flow::{Admission, FlowConfig, FlowQueue, Ticket};
use crate::prefix::{block_hashes, PrefixConfig, PrefixIndex};
use crate::request::{approx_tokens, parse_body, splice_model, ApiKind, BodyError, ParsedBody};
use crate::rewrite;
use crate::saturation::SaturationConfig;
use crate::scheduler::{EndpointView, PluginTimer, Profile, RequestFacts};

/// Everything that shapes scheduling, replaceable at run time.
#[derive(Debug)]
pub struct SchedulerConfig {
    pub profile: Profile,
    pub prefix: PrefixConfig,
    pub saturation: SaturationConfig,
    /// Scores ignore metrics older than this (`--metrics-staleness-threshold`).
    pub staleness: Duration,
    /// Count what this picker sent since the last scrape (on by default; off to compare).
    pub inflight_accounting: bool,
    /// Refuse (404) models that no rewrite rule or legacy InferenceModel names.
    pub strict_models: bool,
    /// Queue requests at the gateway while the pool is saturated (feature gate
    /// `flowControl`); `None` dispatches or sheds at once.
    pub flow: Option<FlowConfig>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            profile: Profile::default_profile(),
            prefix: PrefixConfig::default(),
            saturation: SaturationConfig::default(),
            staleness: Duration::from_secs(2),
            inflight_accounting: true,
            strict_models: false,
            flow: None,
        }
    }
}

/// What a gateway tells the director about one request.
#[derive(Debug, Clone, Default)]
pub struct RequestInput<'a> {
    /// The HTTP `:path`, which selects the API.
    pub path: &'a str,
    /// The full body; `None` when the request had none (pick on load alone).
    pub body: Option<&'a [u8]>,
    /// `x-gateway-inference-objective`.
    pub objective: Option<&'a str>,
    /// `test-epp-endpoint-selection`, comma-separated.
    pub test_selection: Option<&'a str>,
    /// The gateway's subset hint; `Some(empty)` means no endpoint is allowed.
    pub subset: Option<Vec<SocketAddr>>,
}

/// HTTP-ish class of a refusal; the protocol layer maps it to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    NotFound,
    Shed,
    NoEndpoints,
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Shed => 429,
            ErrorKind::NoEndpoints => 503,
            ErrorKind::Internal => 500,
        }
    }

    /// The code name used in error bodies and the `error_code` metric label.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "BadRequest",
            ErrorKind::NotFound => "NotFound",
            ErrorKind::Shed => "ResourceExhausted",
            ErrorKind::NoEndpoints => "ServiceUnavailable",
            ErrorKind::Internal => "Internal",
        }
    }
}

/// A request the director refuses, with a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PickError {
    pub kind: ErrorKind,
    pub message: String,
}

impl PickError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        PickError {
            kind,
            message: message.into(),
        }
    }
}

impl From<BodyError> for PickError {
    fn from(e: BodyError) -> Self {
        PickError::new(ErrorKind::BadRequest, e.to_string())
    }
}

/// Marks one dispatched request as outstanding on an endpoint until dropped, and its
/// prefill as queued there until [`InflightGuard::first_token`] (or the drop).
#[derive(Debug)]
pub struct InflightGuard {
    endpoint: Arc<Endpoint>,
    tokens: u64,
    /// Uncached prompt tokens the endpoint must prefill for this request.
    prefill: u64,
    /// Prefill this picker had queued there at dispatch, ahead of this request.
    ahead: u64,
    sent_at: Duration,
    prefill_pending: bool,
}

impl InflightGuard {
    fn new(endpoint: Arc<Endpoint>, tokens: u64, prefill: u64, now: Duration) -> Self {
        endpoint.add_inflight(tokens);
        let ahead = endpoint.latency().prefill_tokens();
        endpoint.latency().add_prefill(prefill);
        InflightGuard {
            endpoint,
            tokens,
            prefill,
            ahead,
            sent_at: now,
            prefill_pending: true,
        }
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The gateway served the request elsewhere (a fallback): move the count there.
    pub fn move_to(&mut self, endpoint: Arc<Endpoint>) {
        if !Arc::ptr_eq(&endpoint, &self.endpoint) {
            endpoint.add_inflight(self.tokens);
            if self.prefill_pending {
                endpoint.latency().add_prefill(self.prefill);
            }
            let old = std::mem::replace(&mut self.endpoint, endpoint);
            old.sub_inflight(self.tokens);
            if self.prefill_pending {
                old.latency().sub_prefill(self.prefill);
            }
            // What was queued at the first endpoint says nothing about this one.
            self.ahead = 0;
        }
    }

    /// The first output token of a streamed response reached the gateway at `now`: the
    /// prefill is done, and its time teaches the endpoint's TTFT line. Call it for streamed
    /// responses only (an unstreamed body arrives whole, long after the first token); later
    /// calls do nothing.
    pub fn first_token(&mut self, now: Duration) {
        if !self.prefill_pending {
            return;
        }
        self.prefill_pending = false;
        let lat = self.endpoint.latency();
        lat.sub_prefill(self.prefill);
        let ttft = now.saturating_sub(self.sent_at).as_secs_f64();
        lat.observe((self.ahead + self.prefill) as f64, ttft, now);
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.endpoint.sub_inflight(self.tokens);
        if self.prefill_pending {
            self.endpoint.latency().sub_prefill(self.prefill);
        }
    }
}

/// The outcome of scheduling one request.
#[derive(Debug)]
pub struct Decision {
    /// Primary first, then fallbacks.
    pub endpoints: Vec<SocketAddr>,
    /// The model the client asked for (empty when there was no body).
    pub model: String,
    /// The model the endpoint will serve; differs from `model` after a rewrite.
    pub target_model: String,
    pub priority: i32,
    /// The new body when the model was rewritten; `None` means forward the original bytes.
    pub rewritten_body: Option<Vec<u8>>,
    pub stream: bool,
    pub include_usage: bool,
    pub prompt_tokens: u64,
    /// Leading prompt blocks the primary was believed to hold, and the prompt's total.
    pub prefix_hit_blocks: usize,
    pub prompt_blocks: usize,
    pub inflight: InflightGuard,
}

/// What the prefix index holds, for metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixStats {
    pub entries: usize,
    pub max_entries: usize,
    pub hit_ratio: f64,
}

/// A clock and a sink for per-plugin timings (see [`Director::with_plugin_timing`]).
pub type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;
pub type PluginObserver = Arc<dyn Fn(&'static str, &'static str, Duration) + Send + Sync>;

/// Scheduling state shared by every request of one picker.
pub struct Director {
    datastore: Datastore,
    config: ArcSwap<SchedulerConfig>,
    prefix: Mutex<PrefixState>,
    decisions: AtomicU64,
    plugin_timing: Option<(Clock, PluginObserver)>,
    flow: FlowQueue,
}

/// A request read and checked, not yet scheduled (see [`Director::prepare`]).
#[derive(Debug)]
pub struct Prepared<'a> {
    parsed: Option<ParsedBody<'a>>,
    model: String,
    priority: i32,
}

impl Prepared<'_> {
    /// The priority of the request's objective (0 when it names none).
    pub fn priority(&self) -> i32 {
        self.priority
    }
}

impl std::fmt::Debug for Director {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Director")
            .field("decisions", &self.decisions)
            .field("plugin_timing", &self.plugin_timing.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct PrefixState {
    index: PrefixIndex,
    /// Datastore generation at the last sweep of departed endpoints.
    swept_generation: u64,
}

impl Director {
    pub fn new(datastore: Datastore, config: SchedulerConfig) -> Self {
        let index = PrefixIndex::new(config.prefix);
        Director {
            datastore,
            config: ArcSwap::from_pointee(config),
            prefix: Mutex::new(PrefixState {
                index,
                swept_generation: u64::MAX,
            }),
            decisions: AtomicU64::new(0),
            plugin_timing: None,
            flow: FlowQueue::default(),
        }
    }

    /// Time every plugin call with `clock` and report it to `observe` (extension point,
    /// plugin type, duration). Costs two clock reads per plugin per request.
    pub fn with_plugin_timing(mut self, clock: Clock, observe: PluginObserver) -> Self {
        self.plugin_timing = Some((clock, observe));
        self
    }

    pub fn datastore(&self) -> &Datastore {
        &self.datastore
    }

    pub fn config(&self) -> Arc<SchedulerConfig> {
        self.config.load_full()
    }

    /// Swap in a new configuration; the prefix index is kept if its settings are unchanged.
    pub fn reload(&self, config: SchedulerConfig) {
        let mut p = self.prefix.lock();
        if p.index.config() != &config.prefix {
            p.index = PrefixIndex::new(config.prefix);
        }
        self.config.store(Arc::new(config));
    }

    /// Size, bound and lifetime hit ratio of the prefix index (for metrics).
    pub fn prefix_stats(&self) -> PrefixStats {
        let p = self.prefix.lock();
        PrefixStats {
            entries: p.index.len(),
            max_entries: p.index.config().max_total_entries,
            hit_ratio: p.index.hit_ratio(),
        }
    }

    /// Number of successful decisions so far.
    pub fn decisions(&self) -> u64 {
        self.decisions.load(Ordering::Relaxed)
    }

    /// Schedule one request at `now`: [`Director::prepare`], then [`Director::pick`].
    pub fn decide(
        &self,
        input: &RequestInput<'_>,
        now: Duration,
        rng: &mut dyn RngCore,
    ) -> Result<Decision, PickError> {
        let prepared = self.prepare(input)?;
        self.pick(prepared, input, now, rng)
    }

    /// Read the body and resolve the model and priority; refuses what is malformed, an
    /// unknown objective, and (with `strict_models`) an unknown model.
    pub fn prepare<'a>(&self, input: &RequestInput<'a>) -> Result<Prepared<'a>, PickError> {
        let cfg = self.config.load();
        let snap = self.datastore.snapshot();
        let api = ApiKind::from_path(input.path);
        let parsed = input.body.map(|b| parse_body(api, b)).transpose()?;
        let model = parsed.as_ref().map(|p| p.model.clone()).unwrap_or_default();
        if cfg.strict_models && parsed.is_some() && !knows_model(&snap, &model) {
            return Err(unknown_model(&snap, &model));
        }
        let priority = resolve_priority(&snap, input.objective, &model)?;
        Ok(Prepared {
            parsed,
            model,
            priority,
        })
    }

    /// Whether a request of `priority` with `bytes` of body may be scheduled now, must wait
    /// in the flow-control queue, or is refused. Without flow control it is always `Now`.
    /// Keep the ticket until [`Director::pick`] has returned.
    pub fn admit(&self, priority: i32, bytes: u64, now: Duration) -> Admission {
        let cfg = self.config.load();
        let Some(flow) = cfg.flow else {
            // Nothing to count: no lock on the path of every request.
            return Admission::Now(Ticket::unqueued());
        };
        self.flow.admit(&flow, priority, bytes, now, |pending| {
            self.has_room(&cfg, now, pending)
        })
    }

    /// Release flow-control waiters while the pool has room. Call it every few
    /// milliseconds while [`Director::flow_waiting`] is non-zero.
    pub fn pump_flow(&self, now: Duration) -> usize {
        if self.flow.is_empty() {
            return 0;
        }
        let cfg = self.config.load();
        let Some(flow) = cfg.flow else {
            // Flow control was switched off by a reload: let everyone go.
            return self.flow.release(&FlowConfig::UNLIMITED, now, |_| true);
        };
        let (score, per_pending) = self.pool_load(&cfg, now);
        self.flow.release(&flow, now, |pending| {
            score + pending as f64 * per_pending < 1.0
        })
    }

    /// Requests waiting in the flow-control queue.
    pub fn flow_waiting(&self) -> usize {
        self.flow.len()
    }

    /// The pool's saturation score, and what one more dispatched request adds to it.
    fn pool_load(&self, cfg: &SchedulerConfig, now: Duration) -> (f64, f64) {
        let snap = self.datastore.snapshot();
        if snap.endpoints.is_empty() {
            return (f64::INFINITY, 0.0);
        }
        let sat = &cfg.saturation;
        let score = snap
            .endpoints
            .iter()
            .map(|e| {
                let v = EndpointView::build(e, now, cfg.staleness, cfg.inflight_accounting, "");
                sat.endpoint_score(&v, now)
            })
            .sum::<f64>()
            / snap.endpoints.len() as f64;
        // A request on its way counts as one more somewhere in the pool.
        (score, sat.per_request(snap.endpoints.len()))
    }

    fn has_room(&self, cfg: &SchedulerConfig, now: Duration, pending: usize) -> bool {
        let (score, per_pending) = self.pool_load(cfg, now);
        score + pending as f64 * per_pending < 1.0
    }

    /// Schedule a prepared request at `now` (after its admission, if flow control is on).
    pub fn pick(
        &self,
        prepared: Prepared<'_>,
        input: &RequestInput<'_>,
        now: Duration,
        rng: &mut dyn RngCore,
    ) -> Result<Decision, PickError> {
        let cfg = self.config.load();
        let snap = self.datastore.snapshot();
        let Prepared {
            parsed,
            model,
            priority,
        } = prepared;
        let target_model = match rewrite::choose(&snap.rewrites, &model, rng) {
            Some(t) if parsed.is_some() => t.to_string(),
            _ => model.clone(),
        };
        let rewritten_body = match (&parsed, input.body) {
            (Some(p), Some(body)) if target_model != model => {
                Some(splice_model(body, p.model_span.clone(), &target_model))
            }
            _ => None,
        };

        let mut cands: Vec<&Arc<Endpoint>> = snap.endpoints.iter().collect();
        if snap.endpoints.is_empty() {
            return Err(PickError::new(
                ErrorKind::NoEndpoints,
                "no ready endpoints in the pool",
            ));
        }
        if let Some(subset) = &input.subset {
            cands.retain(|e| subset.contains(&e.spec.addr));
            if cands.is_empty() {
                return Err(PickError::new(
                    ErrorKind::NoEndpoints,
                    format!(
                        "the gateway's subset hint ({} endpoints) matches none of the pool's {} ready endpoints",
                        subset.len(),
                        snap.endpoints.len()
                    ),
                ));
            }
        }

        let prompt_parts = parsed
            .as_ref()
            .map(|p| p.prompt_parts.as_slice())
            .unwrap_or(&[]);
        let prompt_tokens = parsed.as_ref().map_or(0, |p| approx_tokens(p.prompt_bytes));
        let mut views: Vec<EndpointView> = cands
            .iter()
            .map(|e| {
                EndpointView::build(
                    e,
                    now,
                    cfg.staleness,
                    cfg.inflight_accounting,
                    &target_model,
                )
            })
            .collect();

        let hashes = if cfg.profile.uses_prefix() && !prompt_parts.is_empty() {
            block_hashes(&cfg.prefix, &target_model, prompt_parts)
        } else {
            Vec::new()
        };
        if !hashes.is_empty() {
            let mut p = self.prefix.lock();
            self.sweep_departed(&mut p, &snap);
            let matches = p.index.longest_matches(&hashes);
            if !matches.is_empty() {
                for v in &mut views {
                    v.prefix_blocks = matches.get(&v.endpoint.id).copied().unwrap_or(0);
                }
            }
        }

        let all: Vec<usize> = (0..views.len()).collect();
        let sat = &cfg.saturation;
        // One utilisation score per candidate serves both shedding and steering.
        let utilisation: Vec<f64> = views.iter().map(|v| sat.endpoint_score(v, now)).collect();
        let pool_score = utilisation.iter().sum::<f64>() / utilisation.len().max(1) as f64;
        if priority < 0 && pool_score >= 1.0 {
            return Err(PickError::new(
                ErrorKind::Shed,
                format!(
                    "the pool is saturated and this request's priority ({priority}) is sheddable; retry later or use an objective with priority >= 0"
                ),
            ));
        }
        let facts = RequestFacts {
            target_model: target_model.clone(),
            prompt_blocks: hashes.len(),
            prompt_tokens,
            test_selection: input.test_selection.map(|s| {
                s.split(',')
                    .map(|x| x.trim().to_string())
                    .filter(|x| !x.is_empty())
                    .collect()
            }),
        };
        // Steer around endpoints past their saturation threshold (plus headroom) when any
        // others remain after the profile's filters.
        let limit = 1.0 + sat.headroom;
        // Likewise endpoints whose recent responses kept ending broken.
        let avoid = |i: usize| utilisation[i] >= limit || views[i].endpoint.avoided(now);
        let timer = self
            .plugin_timing
            .as_ref()
            .map(|(clock, observe)| PluginTimer {
                clock: clock.as_ref(),
                observe: observe.as_ref(),
            });
        let picked = cfg
            .profile
            .run(&facts, &views, all, &avoid, rng, timer.as_ref());
        let Some(&primary) = picked.first() else {
            return Err(PickError::new(
                ErrorKind::NoEndpoints,
                "no endpoint passed the scheduling filters (check test-epp-endpoint-selection or the profile's filters)",
            ));
        };
        let endpoint = views[primary].endpoint.clone();
        if !hashes.is_empty() {
            // The server counts its cache in its own blocks; the index in blocks of
            // blockSizeTokens. Convert, or a 16-token vLLM block against 64-token index
            // blocks would credit the endpoint with 4x the cache it has.
            let blocks = endpoint.with_sample(|s| {
                s.metrics.num_gpu_blocks.map(|b| {
                    crate::prefix::index_capacity(
                        b,
                        s.metrics.block_size,
                        cfg.prefix.block_size_tokens,
                    )
                })
            });
            self.prefix
                .lock()
                .index
                .insert(endpoint.id, &hashes, blocks);
        }
        let uncached = match hashes.len() {
            0 => prompt_tokens,
            n => {
                let hit = views[primary].prefix_blocks.min(n);
                prompt_tokens - prompt_tokens * hit as u64 / n as u64
            }
        };
        self.decisions.fetch_add(1, Ordering::Relaxed);
        let (stream, include_usage) = parsed
            .as_ref()
            .map_or((false, false), |p| (p.stream, p.include_usage));
        Ok(Decision {
            endpoints: picked.iter().map(|&i| views[i].addr()).collect(),
            prefix_hit_blocks: views[primary].prefix_blocks,
            prompt_blocks: hashes.len(),
            model,
            target_model,
            priority,
            rewritten_body,
            stream,
            include_usage,
            prompt_tokens,
            inflight: InflightGuard::new(endpoint, prompt_tokens, uncached, now),
        })
    }

    /// Drop index entries of endpoints that left the pool (once per datastore change).
    fn sweep_departed(&self, p: &mut PrefixState, snap: &Snapshot) {
        let generation = self.datastore.generation();
        if p.swept_generation == generation {
            return;
        }
        p.swept_generation = generation;
        let live: rustc_hash::FxHashSet<u32> = snap.endpoints.iter().map(|e| e.id).collect();
        for id in p.index.endpoints() {
            if !live.contains(&id) {
                p.index.remove_endpoint(id);
            }
        }
    }
}

/// Whether a rewrite rule matches `model` exactly or a legacy InferenceModel names it.
fn knows_model(snap: &Snapshot, model: &str) -> bool {
    snap.model_priorities.contains_key(model)
        || snap
            .rewrites
            .iter()
            .flat_map(|r| &r.rules)
            .any(|r| r.matches.iter().any(|m| m == model))
}

fn unknown_model(snap: &Snapshot, model: &str) -> PickError {
    let mut known: Vec<&str> = snap
        .rewrites
        .iter()
        .flat_map(|r| &r.rules)
        .flat_map(|r| r.matches.iter().map(String::as_str))
        .chain(snap.model_priorities.keys().map(String::as_str))
        .collect();
    known.sort_unstable();
    known.dedup();
    PickError::new(
        ErrorKind::NotFound,
        format!(
            "model {model:?} is not served by this pool (known: {}); the picker runs with --strict-models",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        ),
    )
}

/// Priority from the named objective, else from a legacy InferenceModel for the model, else 0.
fn resolve_priority(
    snap: &Snapshot,
    objective: Option<&str>,
    model: &str,
) -> Result<i32, PickError> {
    match objective.filter(|o| !o.is_empty()) {
        Some(name) => match snap.objectives.get(name) {
            Some(o) => Ok(o.priority),
            None => {
                let mut known: Vec<&str> = snap.objectives.keys().map(String::as_str).collect();
                known.sort_unstable();
                Err(PickError::new(
                    ErrorKind::BadRequest,
                    format!(
                        "unknown InferenceObjective {name:?} in x-gateway-inference-objective (known: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                ))
            }
        },
        None => Ok(snap.model_priorities.get(model).copied().unwrap_or(0)),
    }
}

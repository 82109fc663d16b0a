//! The engine: continuous batching in the style of vLLM's V1 scheduler.
//!
//! Each step the scheduler has a budget of `max_num_batched_tokens` tokens. It first serves
//! the running requests in order (one token for a decoding request, the next chunk of the
//! prompt for one still prefilling). When a running request needs a KV block and none is
//! free, the most recently admitted running request is preempted: its blocks are released
//! and it goes back to the front of the waiting queue, to be recomputed later (vLLM's
//! preemption by recompute). If nobody was preempted, waiting requests are admitted in
//! order while the budget, `max_num_seqs` and the KV cache allow; a waiting request whose
//! adapter would exceed `max_loras` adapters in the batch is skipped and keeps its place.
//! A request admitted with its leading prompt blocks in the prefix cache starts with those
//! tokens computed (`cached_tokens`). A request emits a token at the end of every step after
//! which all of its tokens so far are computed; it finishes at its output length.
//!
//! Times are `f64` seconds on the caller's clock.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rustc_hash::FxHashSet;
use xxhash_rust::xxh64::xxh64;

use crate::hist::{Histogram, ITL_BUCKETS, REQUEST_BUCKETS, TTFT_BUCKETS};
use crate::kv::BlockPool;
use crate::profile::{BatchShape, StepModel};
use crate::tokens::Prompt;

/// The engine's knobs; names and defaults follow vLLM's engine arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    pub block_size: u32,
    pub num_gpu_blocks: u32,
    pub max_num_seqs: u32,
    pub max_num_batched_tokens: u32,
    pub max_model_len: u32,
    pub enable_prefix_caching: bool,
    /// Adapters that may run in one batch (vLLM `--max-loras`, default 1).
    pub max_loras: u32,
    /// Adapters kept in host memory (vLLM `--max-cpu-loras`, default `max_loras`).
    pub max_cpu_loras: u32,
    /// Seconds to load an adapter that is not in host memory (from disk).
    pub lora_load_time: f64,
    /// Seconds to copy a host-resident adapter into a GPU slot.
    pub lora_swap_time: f64,
    pub step: StepModel,
    /// Each step's time is multiplied by a uniform factor in `1 +- jitter`.
    pub jitter: f64,
    /// How long answers are when the request does not set `ignore_eos`.
    pub eos: EosModel,
}

impl EngineConfig {
    /// vLLM's defaults for online serving on a GPU like the profile's.
    ///
    /// `max_num_seqs` is 256, vLLM's default on most GPUs and the setting of the benchmarks
    /// the profiles are fitted to (recent vLLM releases default to 1024 on H100-class GPUs).
    pub fn for_profile(p: &crate::Profile) -> EngineConfig {
        let block_size = 16;
        EngineConfig {
            block_size,
            num_gpu_blocks: p.num_gpu_blocks,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_model_len: p
                .max_model_len
                .min(p.num_gpu_blocks.saturating_mul(block_size)),
            enable_prefix_caching: true,
            max_loras: 1,
            max_cpu_loras: 1,
            lora_load_time: 0.05,
            lora_swap_time: 0.002,
            step: p.step,
            jitter: 0.02,
            eos: EosModel::default(),
        }
    }

    /// A problem with the values, in words, or `None`.
    pub fn validate(&self) -> Option<String> {
        let e = |s: &str| Some(s.to_owned());
        if self.block_size == 0 {
            return e("block_size must be at least 1");
        }
        if self.num_gpu_blocks == 0 {
            return e("num_gpu_blocks must be at least 1");
        }
        if self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            return e("max_num_seqs and max_num_batched_tokens must be at least 1");
        }
        if self.max_model_len as u64 > self.block_size as u64 * self.num_gpu_blocks as u64 {
            return Some(format!(
                "max_model_len {} does not fit in the KV cache ({} blocks of {} tokens); lower it or raise num_gpu_blocks",
                self.max_model_len, self.num_gpu_blocks, self.block_size
            ));
        }
        if self.max_loras == 0 || self.max_cpu_loras < self.max_loras {
            return e("max_loras must be at least 1 and max_cpu_loras at least max_loras");
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return e("jitter must be in 0..1");
        }
        None
    }
}

/// Output length of requests that may stop at end-of-sequence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EosModel {
    /// Always generate `max_tokens`.
    Never,
    /// A log-normal natural length (median tokens, sigma of its log), capped at `max_tokens`.
    LogNormal { median: f64, sigma: f64 },
}

impl Default for EosModel {
    /// ShareGPT answers have a median near 200 tokens with a long tail.
    fn default() -> Self {
        EosModel::LogNormal {
            median: 200.0,
            sigma: 1.0,
        }
    }
}

/// A request as the engine takes it.
#[derive(Clone, Debug)]
pub struct SimRequest {
    pub prompt: Prompt,
    /// The most tokens to generate (at least 1).
    pub max_tokens: u32,
    /// Generate exactly `max_tokens` (vLLM's `ignore_eos`); otherwise the engine's
    /// [`EosModel`] decides where the answer ends.
    pub ignore_eos: bool,
    pub lora: Option<Arc<str>>,
}

pub type RequestId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// Reached end-of-sequence.
    Stop,
    /// Reached `max_tokens`.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What happened to one request in a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Output {
    pub id: RequestId,
    /// 0-based index of the token produced in this step.
    pub token_index: u32,
    /// Set when this was the request's last token.
    pub finished: Option<Finished>,
}

/// Usage of a finished request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens found in the prefix cache when the request was first admitted.
    pub cached_tokens: u32,
    /// Seconds from arrival to the first token, and from arrival to the last.
    pub ttft: f64,
    pub e2e: f64,
    pub queue_time: f64,
    pub preemptions: u32,
}

/// The step that [`Engine::begin_step`] started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepPlan {
    pub start: f64,
    pub end: f64,
    pub shape: BatchShape,
    pub num_seqs: u32,
}

/// Counters and gauges for `/metrics`, computed on demand.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineStats {
    pub num_running: u32,
    pub num_waiting: u32,
    pub kv_usage: f64,
    pub running_loras: Vec<Arc<str>>,
    pub waiting_loras: Vec<Arc<str>>,
}

/// Cumulative counters and latency histograms, as vLLM exports them.
#[derive(Clone, Debug, PartialEq)]
pub struct Counters {
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub finished_stop: u64,
    pub finished_length: u64,
    pub aborted: u64,
    pub preemptions: u64,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub lora_loads: u64,
    pub steps: u64,
    pub busy_time: f64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
}

#[derive(Debug)]
struct Req {
    prompt_len: u32,
    /// Block hashes with the adapter mixed in (an adapter's KV differs from the base's).
    hashes: Vec<u64>,
    target: u32,
    max_tokens: u32,
    output: u32,
    computed: u32,
    blocks: Vec<u32>,
    lora: Option<Arc<str>>,
    state: State,
    arrival: f64,
    first_scheduled: Option<f64>,
    first_token: f64,
    last_token: f64,
    cached_tokens: u32,
    preemptions: u32,
    /// Aborted while in the batch that is running; released when the step ends.
    aborted: bool,
}

impl Req {
    fn total(&self) -> u32 {
        self.prompt_len + self.output
    }
}

/// Requests in slots: ids are `generation << 32 | slot`, so lookups are an index, and an id
/// of a finished request never finds its slot's next occupant.
#[derive(Default)]
struct Slab {
    slots: Vec<(u32, Option<Req>)>,
    free: Vec<u32>,
}

impl Slab {
    fn insert(&mut self, r: Req) -> RequestId {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push((0, None));
                (self.slots.len() - 1) as u32
            }
        };
        let e = &mut self.slots[slot as usize];
        e.0 = e.0.wrapping_add(1);
        e.1 = Some(r);
        ((e.0 as u64) << 32) | slot as u64
    }

    fn get_mut(&mut self, id: &RequestId) -> Option<&mut Req> {
        match self.slots.get_mut((*id as u32) as usize) {
            Some((g, Some(r))) if *g == (*id >> 32) as u32 => Some(r),
            _ => None,
        }
    }

    fn get(&self, id: &RequestId) -> Option<&Req> {
        match self.slots.get((*id as u32) as usize) {
            Some((g, Some(r))) if *g == (*id >> 32) as u32 => Some(r),
            _ => None,
        }
    }

    fn remove(&mut self, id: &RequestId) -> Option<Req> {
        self.get(id)?;
        let slot = *id as u32;
        self.free.push(slot);
        self.slots[slot as usize].1.take()
    }

    fn values(&self) -> impl Iterator<Item = &Req> {
        self.slots.iter().filter_map(|(_, r)| r.as_ref())
    }
}

impl std::ops::Index<&RequestId> for Slab {
    type Output = Req;
    fn index(&self, id: &RequestId) -> &Req {
        self.get(id).expect("live request id")
    }
}

/// One simulated model server.
pub struct Engine {
    cfg: EngineConfig,
    pool: BlockPool,
    reqs: Slab,
    /// Requests with an adapter, waiting or running; the LoRA bookkeeping is skipped at 0.
    lora_reqs: u32,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    rng: SmallRng,
    in_flight: Option<(StepPlan, Vec<(RequestId, u32)>)>,
    batch_buf: Vec<(RequestId, u32)>,
    /// Adapters in GPU slots and in host memory, most recently used last.
    gpu_loras: Vec<Arc<str>>,
    cpu_loras: Vec<Arc<str>>,
    counters: Counters,
}

impl Engine {
    /// An idle engine. Panics if the config does not [`validate`](EngineConfig::validate).
    pub fn new(cfg: EngineConfig, seed: u64) -> Engine {
        if let Some(problem) = cfg.validate() {
            panic!("invalid engine config: {problem}");
        }
        Engine {
            pool: BlockPool::new(cfg.num_gpu_blocks),
            cfg,
            reqs: Slab::default(),
            lora_reqs: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            rng: SmallRng::seed_from_u64(seed),
            in_flight: None,
            batch_buf: Vec::new(),
            gpu_loras: Vec::new(),
            cpu_loras: Vec::new(),
            counters: Counters {
                prompt_tokens: 0,
                generation_tokens: 0,
                finished_stop: 0,
                finished_length: 0,
                aborted: 0,
                preemptions: 0,
                prefix_queries: 0,
                prefix_hits: 0,
                lora_loads: 0,
                steps: 0,
                busy_time: 0.0,
                ttft: Histogram::new(TTFT_BUCKETS),
                itl: Histogram::new(ITL_BUCKETS),
                e2e: Histogram::new(REQUEST_BUCKETS),
                queue_time: Histogram::new(REQUEST_BUCKETS),
            },
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Why the engine would refuse `prompt_len + max_tokens`, as vLLM words it, or `None`.
    pub fn check_length(&self, prompt_len: u32, max_tokens: u32) -> Option<String> {
        let total = prompt_len as u64 + max_tokens as u64;
        if total > self.cfg.max_model_len as u64 {
            return Some(format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
                self.cfg.max_model_len, total, prompt_len, max_tokens
            ));
        }
        if prompt_len == 0 {
            return Some("The prompt is empty; it must hold at least one token.".to_owned());
        }
        None
    }

    /// Queues a request arriving at `now`. The caller checks [`check_length`](Self::check_length)
    /// first; a request that breaks it is clamped rather than left to block the queue.
    pub fn add(&mut self, req: SimRequest, now: f64) -> RequestId {
        let max_model_len = self.cfg.max_model_len;
        let prompt_len = req
            .prompt
            .len
            .clamp(1, max_model_len.saturating_sub(1).max(1));
        let max_tokens = req.max_tokens.clamp(1, (max_model_len - prompt_len).max(1));
        let target = if req.ignore_eos {
            max_tokens
        } else {
            match self.cfg.eos {
                EosModel::Never => max_tokens,
                EosModel::LogNormal { median, sigma } => {
                    let z = standard_normal(&mut self.rng);
                    ((median * (sigma * z).exp()).round() as u32).clamp(1, max_tokens)
                }
            }
        };
        let mut hashes = req.prompt.block_hashes;
        hashes.truncate((prompt_len / self.cfg.block_size) as usize);
        if let Some(l) = &req.lora {
            let salt = xxh64(l.as_bytes(), 0);
            for h in &mut hashes {
                *h = xxh64(&h.to_le_bytes(), salt);
            }
        }
        if req.lora.is_some() {
            self.lora_reqs += 1;
        }
        let id = self.reqs.insert(Req {
            prompt_len,
            hashes,
            target,
            max_tokens,
            output: 0,
            computed: 0,
            blocks: Vec::new(),
            lora: req.lora,
            state: State::Waiting,
            arrival: now,
            first_scheduled: None,
            first_token: 0.0,
            last_token: 0.0,
            cached_tokens: 0,
            preemptions: 0,
            aborted: false,
        });
        self.waiting.push_back(id);
        id
    }

    /// Drops a request (the client went away). Returns false if it was unknown or finished.
    pub fn abort(&mut self, id: RequestId) -> bool {
        let Some(r) = self.reqs.get_mut(&id) else {
            return false;
        };
        if r.aborted {
            return false;
        }
        self.counters.aborted += 1;
        let in_batch = self
            .in_flight
            .as_ref()
            .is_some_and(|(_, b)| b.iter().any(|(i, _)| *i == id));
        if in_batch {
            r.aborted = true;
            return true;
        }
        let r = self.reqs.remove(&id).expect("present");
        match r.state {
            State::Waiting => self.waiting.retain(|&w| w != id),
            State::Running => self.running.retain(|&w| w != id),
        }
        self.release(r);
        true
    }

    /// True when there is nothing to do.
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_none() && self.running.is_empty() && self.waiting.is_empty()
    }

    /// The step in progress, if any.
    pub fn in_flight(&self) -> Option<StepPlan> {
        self.in_flight.as_ref().map(|(p, _)| *p)
    }

    /// Schedules the next batch at `now` and returns its plan, or `None` when there is no work
    /// that can run (or a step is already in flight).
    pub fn begin_step(&mut self, now: f64) -> Option<StepPlan> {
        if self.in_flight.is_some() {
            return None;
        }
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut batch = std::mem::take(&mut self.batch_buf);
        batch.clear();
        let mut preempted = false;

        // 1. Running requests, in order.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let r = &self.reqs[&id];
            let n = (r.total() - r.computed).min(budget);
            let need = blocks_for(r.computed + n, bs).saturating_sub(r.blocks.len() as u32);
            let mut fresh = Vec::new();
            if self.pool.allocate(need, &mut fresh) {
                self.reqs
                    .get_mut(&id)
                    .expect("running")
                    .blocks
                    .extend(fresh);
                batch.push((id, n));
                budget -= n;
                i += 1;
                continue;
            }
            // Out of blocks: preempt the last running request and try again.
            preempted = true;
            let victim = self.running.pop().expect("non-empty");
            self.preempt(victim);
            if victim == id {
                break;
            }
        }

        // 2. Waiting requests, unless this step preempted someone.
        if !preempted {
            let mut loras: FxHashSet<Arc<str>> = FxHashSet::default();
            if self.lora_reqs > 0 {
                loras.extend(
                    self.running
                        .iter()
                        .filter_map(|id| self.reqs[id].lora.clone()),
                );
            }
            let mut j = 0;
            while j < self.waiting.len()
                && budget > 0
                && (self.running.len() as u32) < self.cfg.max_num_seqs
            {
                let id = self.waiting[j];
                let r = &self.reqs[&id];
                if r.arrival > now {
                    // Arrived after this step began (a real-time driver running late starts
                    // steps at their planned time); it joins the next one.
                    break;
                }
                if let Some(l) = &r.lora {
                    if !loras.contains(l) && loras.len() as u32 >= self.cfg.max_loras {
                        j += 1;
                        continue;
                    }
                }
                let total = r.total();
                // At least one token must be computed to produce logits.
                let cacheable = (((total - 1) / bs) as usize).min(r.hashes.len());
                let hit = if self.cfg.enable_prefix_caching {
                    self.pool.lookup(&r.hashes[..cacheable])
                } else {
                    Default::default()
                };
                let computed = hit.blocks * bs;
                let n = (total - computed).min(budget);
                let need = blocks_for(computed + n, bs) - hit.blocks;
                if self.pool.num_free() - hit.unreferenced < need {
                    break;
                }
                let r = self.reqs.get_mut(&id).expect("waiting");
                let mut blocks = std::mem::take(&mut r.blocks);
                self.pool
                    .touch(&r.hashes[..hit.blocks as usize], &mut blocks);
                let ok = self.pool.allocate(need, &mut blocks);
                debug_assert!(ok);
                r.blocks = blocks;
                r.computed = computed;
                r.state = State::Running;
                if r.first_scheduled.is_none() {
                    r.first_scheduled = Some(now);
                    r.cached_tokens = computed;
                    self.counters.queue_time.observe((now - r.arrival).max(0.0));
                }
                self.counters.prefix_queries += total as u64;
                self.counters.prefix_hits += computed as u64;
                if let Some(l) = &r.lora {
                    loras.insert(l.clone());
                }
                self.waiting.remove(j);
                self.running.push(id);
                batch.push((id, n));
                budget -= n;
            }
        }

        if batch.is_empty() {
            self.batch_buf = batch;
            return None;
        }

        // 3. The step's cost.
        let mut shape = BatchShape::default();
        let mut batch_loras: Vec<Arc<str>> = Vec::new();
        for &(id, n) in &batch {
            let r = &self.reqs[&id];
            if r.computed >= r.prompt_len && n == 1 {
                shape.decode_seqs += 1;
                shape.decode_context_tokens += (r.computed + 1) as u64;
            } else {
                shape.prefill_tokens += n as u64;
                shape.prefill_pairs += n as f64 * (r.computed as f64 + n as f64 / 2.0);
            }
            if let Some(l) = &r.lora {
                shape.has_lora = true;
                if !batch_loras.contains(l) {
                    batch_loras.push(l.clone());
                }
            }
        }
        let mut secs = self.cfg.step.step_time(&shape);
        if self.cfg.jitter > 0.0 {
            secs *= 1.0 + self.cfg.jitter * (self.rng.random::<f64>() * 2.0 - 1.0);
        }
        secs += self.swap_in(&batch_loras);
        let plan = StepPlan {
            start: now,
            end: now + secs,
            shape,
            num_seqs: batch.len() as u32,
        };
        self.in_flight = Some((plan, batch));
        Some(plan)
    }

    /// Completes the step in flight at its end time, appending what each request produced
    /// to `out`. Does nothing when no step is in flight.
    pub fn finish_step(&mut self, out: &mut Vec<Output>) {
        let Some((plan, mut batch)) = self.in_flight.take() else {
            return;
        };
        let now = plan.end;
        let bs = self.cfg.block_size;
        self.counters.steps += 1;
        self.counters.busy_time += plan.end - plan.start;
        let mut done = Vec::new();
        for (id, n) in batch.drain(..) {
            let r = self.reqs.get_mut(&id).expect("scheduled request exists");
            if r.aborted {
                let r = self.reqs.remove(&id).expect("present");
                self.running.retain(|&w| w != id);
                self.release(r);
                continue;
            }
            let full_before = (r.computed / bs) as usize;
            r.computed += n;
            let full_after = ((r.computed / bs) as usize).min(r.hashes.len());
            if self.cfg.enable_prefix_caching {
                for b in full_before..full_after {
                    self.pool.cache_block(r.blocks[b], r.hashes[b]);
                }
            }
            if r.computed < r.total() {
                continue; // still prefilling
            }
            if r.output == 0 {
                r.first_token = now;
                self.counters.ttft.observe(now - r.arrival);
                self.counters.prompt_tokens += r.prompt_len as u64;
            } else {
                self.counters.itl.observe(now - r.last_token);
            }
            r.last_token = now;
            r.output += 1;
            self.counters.generation_tokens += 1;
            let token_index = r.output - 1;
            let finished = (r.output >= r.target).then(|| {
                let reason = if r.output >= r.max_tokens {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                };
                Finished {
                    reason,
                    prompt_tokens: r.prompt_len,
                    completion_tokens: r.output,
                    cached_tokens: r.cached_tokens,
                    ttft: r.first_token - r.arrival,
                    e2e: now - r.arrival,
                    queue_time: r.first_scheduled.unwrap_or(now) - r.arrival,
                    preemptions: r.preemptions,
                }
            });
            if let Some(f) = finished {
                match f.reason {
                    FinishReason::Stop => self.counters.finished_stop += 1,
                    FinishReason::Length => self.counters.finished_length += 1,
                }
                self.counters.e2e.observe(f.e2e);
                done.push(id);
            }
            out.push(Output {
                id,
                token_index,
                finished,
            });
        }
        if !done.is_empty() {
            self.running.retain(|id| !done.contains(id));
            for id in done {
                let r = self.reqs.remove(&id).expect("present");
                self.release(r);
            }
        }
        self.batch_buf = batch;
    }

    fn release(&mut self, r: Req) {
        self.pool.free(&r.blocks);
        if r.lora.is_some() {
            self.lora_reqs -= 1;
        }
    }

    fn preempt(&mut self, id: RequestId) {
        let r = self.reqs.get_mut(&id).expect("running");
        self.pool.free(&r.blocks);
        r.blocks.clear();
        r.computed = 0;
        r.state = State::Waiting;
        r.preemptions += 1;
        self.counters.preemptions += 1;
        self.waiting.push_front(id);
    }

    /// Moves the batch's adapters into GPU slots; returns the seconds that costs.
    fn swap_in(&mut self, batch_loras: &[Arc<str>]) -> f64 {
        let mut secs = 0.0;
        for l in batch_loras {
            if let Some(pos) = self.gpu_loras.iter().position(|g| g == l) {
                let g = self.gpu_loras.remove(pos);
                self.gpu_loras.push(g);
                continue;
            }
            secs += self.cfg.lora_swap_time;
            self.counters.lora_loads += 1;
            match self.cpu_loras.iter().position(|c| c == l) {
                Some(pos) => {
                    let c = self.cpu_loras.remove(pos);
                    self.cpu_loras.push(c);
                }
                None => {
                    secs += self.cfg.lora_load_time;
                    if self.cpu_loras.len() as u32 >= self.cfg.max_cpu_loras {
                        self.cpu_loras.remove(0);
                    }
                    self.cpu_loras.push(l.clone());
                }
            }
            if self.gpu_loras.len() as u32 >= self.cfg.max_loras {
                // Evict the least recently used slot not needed by this batch.
                if let Some(pos) = self.gpu_loras.iter().position(|g| !batch_loras.contains(g)) {
                    self.gpu_loras.remove(pos);
                }
            }
            self.gpu_loras.push(l.clone());
        }
        secs
    }

    /// Requests in the running batch.
    pub fn num_running(&self) -> u32 {
        self.running.len() as u32
    }

    /// Requests waiting to be admitted (including preempted ones).
    pub fn num_waiting(&self) -> u32 {
        self.waiting.len() as u32
    }

    /// Gauges as of now.
    pub fn stats(&self) -> EngineStats {
        let mut running_loras: Vec<Arc<str>> = Vec::new();
        if self.lora_reqs == 0 {
            return EngineStats {
                num_running: self.running.len() as u32,
                num_waiting: self.waiting.len() as u32,
                kv_usage: self.pool.usage(),
                running_loras,
                waiting_loras: Vec::new(),
            };
        }
        for id in &self.running {
            if let Some(l) = &self.reqs[id].lora {
                if !running_loras.contains(l) {
                    running_loras.push(l.clone());
                }
            }
        }
        let mut waiting_loras: Vec<Arc<str>> = Vec::new();
        for id in &self.waiting {
            if let Some(l) = &self.reqs[id].lora {
                if !waiting_loras.contains(l) {
                    waiting_loras.push(l.clone());
                }
            }
        }
        EngineStats {
            num_running: self.running.len() as u32,
            num_waiting: self.waiting.len() as u32,
            kv_usage: self.pool.usage(),
            running_loras,
            waiting_loras,
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Adapters in GPU slots, least recently used first.
    pub fn gpu_loras(&self) -> &[Arc<str>] {
        &self.gpu_loras
    }

    /// Checks internal invariants (tests): every block is accounted for exactly once.
    pub fn check(&self) {
        self.pool.check();
        let held: usize = self.reqs.values().map(|r| r.blocks.len()).sum();
        let used = (self.pool.num_blocks() - self.pool.num_free()) as usize;
        assert!(held >= used, "blocks held {held} < blocks in use {used}");
        assert!(self.running.len() as u32 <= self.cfg.max_num_seqs);
        for id in &self.running {
            assert_eq!(self.reqs[id].state, State::Running);
        }
        for id in &self.waiting {
            let r = &self.reqs[id];
            assert_eq!(r.state, State::Waiting);
            assert!(r.blocks.is_empty());
        }
    }
}

fn blocks_for(tokens: u32, bs: u32) -> u32 {
    tokens.div_ceil(bs)
}

fn standard_normal(rng: &mut SmallRng) -> f64 {
    // Box-Muller; one of the pair is enough here.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

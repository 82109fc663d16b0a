//! Seeded request generators and arrival processes.
//!
//! A [`Workload`] is a request [`Shape`] (what each prompt looks like), an [`Arrivals`]
//! process over QPS [`Stage`]s (when requests are sent), and optional mixes of LoRA adapters
//! and priorities. The same seed always gives the same list of requests.
//!
//! # Prompts
//! A prompt is a run of words from [`infergate_sim::tokens::WORDS`], each exactly one token
//! under the simulator's tokenizer, so `prompt_tokens` is the number of words and equals
//! `infergate_sim::tokens::tokenize(&prompt).len()`.
//!
//! # Distributions and their sources
//! - **Chat** ([`Shape::sharegpt`]): prompt and output lengths are independent log-normals,
//!   rounded and clamped to `[1, max]`. The means are ShareGPT's as vLLM's and SGLang's
//!   serving benchmarks sample it: vLLM PR #18566 reports 229,711 input and 203,068 output
//!   tokens over 1,000 prompts, i.e. 230 in and 203 out per request. The maxima are vLLM's
//!   ShareGPT filter (prompts over 1,024 tokens are dropped). The shape parameter
//!   `sigma = 1.0` is our choice, not a published fit: it gives the heavy right tail ShareGPT
//!   lengths have (a few tokens to a few thousand, median about 0.6x the mean). The
//!   location `mu` is solved (bisection on the closed form of the clamped mean) so that the
//!   mean *after* clamping equals the published mean.
//! - **Shared prefix** ([`Shape::inference_perf_shared_prefix`]): inference-perf's
//!   `shared_prefix` data generator: `groups x prompts_per_group` prompts; each group has a
//!   system prompt of `system_len` tokens, identical within the group (drawn from an RNG
//!   seeded by the workload seed and the group) and different between groups, followed by a
//!   question of `question_len` tokens unique to the request; output `output_len` tokens.
//!   Requests walk a seeded permutation of the `groups x prompts_per_group` slots, so each
//!   full cycle sends every group exactly `prompts_per_group` times. DESIGN.md section 8:
//!   150 groups x 5 prompts, system 6,000, question 1,200, output 1,000.
//! - **Long context**: prompt length uniform in `[min_input, max_input]`, fixed output.
//! - **LoRA mix** ([`LoraMix`]): with probability `share` a request names an adapter
//!   ([`adapter_name`]); adapter ranks follow a Zipf law, `P(rank k) ~ 1 / (k+1)^s`, drawn
//!   through an inverse-CDF table. Rank 0 (`"adapter-0"`) is the most popular.
//! - **Priorities** ([`PriorityMix`]): with probability `batch_share` a request is sheddable
//!   batch work (objective `"batch"`, priority -1), otherwise `"interactive"`, priority 10;
//!   with `batch_share == 0` requests carry no objective (priority 0).
//! - **Arrivals**: Poisson (exponential gaps, mean `1/qps`) or constant (`k/qps` exactly),
//!   restarted at the start of each stage; stages follow one another in time.
//!
//! Arrival times and request contents come from separate RNG streams, so
//! [`Workload::generate_n`] gives the same prompts as [`Workload::generate`] (without times).

use infergate_sim::tokens::WORDS;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// One request of a workload.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RequestSpec {
    pub index: u64,
    /// Arrival, seconds from the start of the run (open loop); ignored in closed-loop runs.
    pub at: f64,
    /// Prompt text built from one-token words (see the module docs), so its token count is known.
    pub prompt: String,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub lora: Option<String>,
    /// InferenceObjective name (e.g. "interactive", "batch") and its priority.
    pub objective: Option<String>,
    pub priority: i32,
    /// Shared-prefix group, if any.
    pub group: Option<u32>,
}

/// The arrival process of an open-loop run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrivals {
    /// Exponential inter-arrival gaps with mean `1/qps`.
    Poisson,
    /// One request every `1/qps` seconds exactly.
    Constant,
}

/// A stretch of the run at one request rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stage {
    pub qps: f64,
    pub seconds: f64,
}

/// What each request looks like.
#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    /// Chat-like: log-normal prompt and output lengths with the given means after clamping
    /// to `[1, max]` (see the module docs for the source of [`Shape::sharegpt`]'s numbers).
    Chat {
        mean_input: f64,
        mean_output: f64,
        sigma: f64,
        max_input: u32,
        max_output: u32,
    },
    /// inference-perf's shared_prefix: groups x prompts_per_group, system prompt shared
    /// within a group, then a question unique to the request.
    SharedPrefix {
        groups: u32,
        prompts_per_group: u32,
        system_len: u32,
        question_len: u32,
        output_len: u32,
    },
    /// Prompt length uniform in `[min_input, max_input]`, fixed output length.
    LongContext {
        min_input: u32,
        max_input: u32,
        output: u32,
    },
}

impl Shape {
    /// ShareGPT as vLLM's serving benchmark samples it: means 230 in / 203 out, sigma 1.0,
    /// prompts up to 1,024 tokens, outputs up to 1,024.
    pub fn sharegpt() -> Shape {
        Shape::Chat {
            mean_input: 230.0,
            mean_output: 203.0,
            sigma: 1.0,
            max_input: 1024,
            max_output: 1024,
        }
    }

    /// DESIGN.md 8: 150 groups x 5 prompts, system 6000, question 1200, output 1000.
    pub fn inference_perf_shared_prefix() -> Shape {
        Shape::SharedPrefix {
            groups: 150,
            prompts_per_group: 5,
            system_len: 6000,
            question_len: 1200,
            output_len: 1000,
        }
    }
}

/// Multi-LoRA traffic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraMix {
    pub adapters: u32,
    /// Zipf exponent of adapter popularity
    pub zipf_s: f64,
    /// fraction of requests that use an adapter (rest base model)
    pub share: f64,
}

/// Mixed priorities.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PriorityMix {
    /// fraction of requests that are sheddable batch work (objective "batch", priority -1);
    /// the rest "interactive" priority 10 — or objective None when share is 0
    pub batch_share: f64,
}

/// A full workload description.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub shape: Shape,
    pub arrivals: Arrivals,
    pub stages: Vec<Stage>,
    pub lora: Option<LoraMix>,
    pub priorities: Option<PriorityMix>,
    pub seed: u64,
}

/// The name of the adapter of popularity rank `rank` (0 is the most popular).
pub fn adapter_name(rank: u32) -> String {
    format!("adapter-{rank}")
}

impl Workload {
    /// Every request of the run, in arrival order; the same seed gives the same list.
    pub fn generate(&self) -> Vec<RequestSpec> {
        let times = self.arrival_times();
        let mut reqs = self.generate_n(times.len());
        for (r, t) in reqs.iter_mut().zip(times) {
            r.at = t;
        }
        reqs
    }

    /// `n` requests without arrival times (closed-loop use).
    pub fn generate_n(&self, n: usize) -> Vec<RequestSpec> {
        let mut g = Gen::new(self);
        (0..n as u64).map(|i| g.request(i)).collect()
    }

    fn arrival_times(&self) -> Vec<f64> {
        let mut rng = SmallRng::seed_from_u64(mix(self.seed, 0xa11));
        let mut out = Vec::new();
        let mut start = 0.0;
        for st in &self.stages {
            let end = start + st.seconds.max(0.0);
            if st.qps > 0.0 && st.qps.is_finite() {
                match self.arrivals {
                    Arrivals::Constant => {
                        let mut k = 0u64;
                        loop {
                            let t = start + k as f64 / st.qps;
                            if t >= end {
                                break;
                            }
                            out.push(t);
                            k += 1;
                        }
                    }
                    Arrivals::Poisson => {
                        let mut t = start;
                        loop {
                            t += -(1.0 - rng.random::<f64>()).ln() / st.qps;
                            if t >= end {
                                break;
                            }
                            out.push(t);
                        }
                    }
                }
            }
            start = end;
        }
        out
    }
}

/// SplitMix64 finaliser over `seed` and a stream tag: independent seeds for sub-streams.
fn mix(seed: u64, tag: u64) -> u64 {
    let mut z = seed ^ tag.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn push_words(rng: &mut SmallRng, n: u32, out: &mut String) {
    for _ in 0..n {
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
}

/// A standard normal by Box-Muller.
fn normal(rng: &mut SmallRng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Standard normal CDF (Abramowitz & Stegun 7.1.26 erf, |error| < 1.5e-7).
fn phi(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-z * z).exp();
    if x >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// The `mu` of a log-normal with shape `sigma` whose mean after clamping above at `max`
/// is `mean`: E[min(X, c)] = e^(mu + s^2/2) Phi((ln c - mu - s^2)/s) + c (1 - Phi((ln c - mu)/s)).
fn lognormal_mu(mean: f64, sigma: f64, max: u32) -> f64 {
    let mean = mean.max(1.0);
    if sigma <= 0.0 {
        return mean.ln();
    }
    let c = f64::from(max.max(1));
    if mean >= c {
        return c.ln() + 10.0 * sigma;
    }
    let lc = c.ln();
    let clamped = |mu: f64| {
        (mu + sigma * sigma / 2.0).exp() * phi((lc - mu - sigma * sigma) / sigma)
            + c * (1.0 - phi((lc - mu) / sigma))
    };
    // The clamped mean increases with mu; bracket and bisect.
    let (mut lo, mut hi) = (mean.ln() - sigma * sigma / 2.0 - 1.0, lc + 10.0 * sigma);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if clamped(mid) < mean {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

struct Gen<'a> {
    w: &'a Workload,
    rng: SmallRng,
    /// Chat: (mu_in, mu_out).
    mus: (f64, f64),
    /// Shared prefix: seeded permutation of group slots, and system prompts built so far.
    slots: Vec<u32>,
    systems: Vec<Option<String>>,
    /// LoRA: cumulative Zipf probabilities by rank.
    zipf_cdf: Vec<f64>,
}

impl<'a> Gen<'a> {
    fn new(w: &'a Workload) -> Self {
        let mut rng = SmallRng::seed_from_u64(mix(w.seed, 0xc0));
        let mut mus = (0.0, 0.0);
        let mut slots = Vec::new();
        let mut systems = Vec::new();
        match w.shape {
            Shape::Chat {
                mean_input,
                mean_output,
                sigma,
                max_input,
                max_output,
            } => {
                mus = (
                    lognormal_mu(mean_input, sigma, max_input),
                    lognormal_mu(mean_output, sigma, max_output),
                );
            }
            Shape::SharedPrefix {
                groups,
                prompts_per_group,
                ..
            } => {
                slots = (0..groups)
                    .flat_map(|g| std::iter::repeat_n(g, prompts_per_group as usize))
                    .collect();
                // Fisher-Yates.
                for i in (1..slots.len()).rev() {
                    slots.swap(i, rng.random_range(0..=i));
                }
                systems = vec![None; groups as usize];
            }
            Shape::LongContext { .. } => {}
        }
        let zipf_cdf = match w.lora {
            Some(m) if m.adapters > 0 => {
                let weights: Vec<f64> = (0..m.adapters)
                    .map(|k| (f64::from(k) + 1.0).powf(-m.zipf_s))
                    .collect();
                let total: f64 = weights.iter().sum();
                let mut acc = 0.0;
                weights
                    .iter()
                    .map(|x| {
                        acc += x / total;
                        acc
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        Gen {
            w,
            rng,
            mus,
            slots,
            systems,
            zipf_cdf,
        }
    }

    fn request(&mut self, index: u64) -> RequestSpec {
        let mut prompt = String::new();
        let mut group = None;
        let (prompt_tokens, output_tokens) = match self.w.shape {
            Shape::Chat {
                sigma,
                max_input,
                max_output,
                ..
            } => {
                let mut draw = |mu: f64, max: u32| {
                    let x = (mu + sigma * normal(&mut self.rng)).exp().round();
                    x.clamp(1.0, f64::from(max.max(1))) as u32
                };
                let i = draw(self.mus.0, max_input);
                let o = draw(self.mus.1, max_output);
                push_words(&mut self.rng, i, &mut prompt);
                (i, o)
            }
            Shape::SharedPrefix {
                system_len,
                question_len,
                output_len,
                ..
            } => {
                if self.slots.is_empty() {
                    push_words(&mut self.rng, question_len, &mut prompt);
                    (question_len, output_len)
                } else {
                    let g = self.slots[(index % self.slots.len() as u64) as usize];
                    group = Some(g);
                    let seed = self.w.seed;
                    let sys = self.systems[g as usize].get_or_insert_with(|| {
                        let mut r =
                            SmallRng::seed_from_u64(mix(seed, 0x5_0000_0000 + u64::from(g)));
                        let mut s = String::new();
                        push_words(&mut r, system_len, &mut s);
                        s
                    });
                    prompt.push_str(sys);
                    push_words(&mut self.rng, question_len, &mut prompt);
                    (system_len + question_len, output_len)
                }
            }
            Shape::LongContext {
                min_input,
                max_input,
                output,
            } => {
                let (lo, hi) = (min_input.min(max_input), min_input.max(max_input));
                let i = self.rng.random_range(lo..=hi);
                push_words(&mut self.rng, i, &mut prompt);
                (i, output)
            }
        };
        // Always draw both, so adding one mix does not shift the other's stream.
        let (u_lora, u_rank, u_prio) = (
            self.rng.random::<f64>(),
            self.rng.random::<f64>(),
            self.rng.random::<f64>(),
        );
        let lora = match self.w.lora {
            Some(m) if !self.zipf_cdf.is_empty() && u_lora < m.share => {
                let rank = self
                    .zipf_cdf
                    .partition_point(|&c| c <= u_rank)
                    .min(self.zipf_cdf.len() - 1);
                Some(adapter_name(rank as u32))
            }
            _ => None,
        };
        let (objective, priority) = match self.w.priorities {
            Some(p) if p.batch_share > 0.0 => {
                if u_prio < p.batch_share {
                    (Some("batch".to_string()), -1)
                } else {
                    (Some("interactive".to_string()), 10)
                }
            }
            _ => (None, 0),
        };
        RequestSpec {
            index,
            at: 0.0,
            prompt,
            prompt_tokens,
            output_tokens,
            lora,
            objective,
            priority,
            group,
        }
    }
}

//! Reproduces published serving figures on the engine, on the virtual clock.
//!
//! Each measurement builds fresh engines from the given config (jitter off, unique prompts so
//! no prefix hits unless asked), runs the scenario the figure was measured with, and reads
//! the result the way the benchmark tool did. `infergate sim --calibrate` prints
//! [`report`]: first the profile's claims beside their sources, then the standard grid the
//! simulator is judged on (idle TTFT at 128/1k/8k tokens, ITL at batch 1/32/256, saturated
//! throughput on ShareGPT-shaped requests).

use std::fmt::Write as _;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::engine::{Engine, EngineConfig, EosModel, SimRequest};
use crate::profile::{Profile, Quantity};
use crate::tokens::Prompt;
use crate::vclock::{Cluster, Event};

/// A claim is met when the simulated figure is within this fraction of the published one.
pub const TOLERANCE: f64 = 0.25;

/// Mean request shape of ShareGPT as vLLM's and SGLang's serving benchmarks sample it:
/// vLLM PR #18566 reports 229,711 input and 203,068 output tokens over 1,000 prompts; the
/// SGLang v0.3.0 benchmark's 3,700.64 tok/s at 19.04 req/s is 194 output tokens a request.
pub const SHAREGPT_INPUT: u32 = 230;
pub const SHAREGPT_OUTPUT: u32 = 200;

fn quiet(cfg: &EngineConfig) -> EngineConfig {
    let mut c = cfg.clone();
    c.jitter = 0.0;
    c.eos = EosModel::Never;
    c
}

fn request(input: u32, output: u32, unique: u64, block_size: u32) -> SimRequest {
    SimRequest {
        prompt: Prompt::synthetic(input, 0, 0, unique, block_size),
        max_tokens: output,
        ignore_eos: true,
        lora: None,
    }
}

/// Seconds to the first token of one `prompt`-token request on an idle engine.
pub fn idle_ttft(cfg: &EngineConfig, prompt: u32) -> f64 {
    let mut c = Cluster::new(vec![Engine::new(quiet(cfg), 1)]);
    c.submit(0, request(prompt, 1, 1, cfg.block_size));
    let mut ev = Vec::new();
    c.run_to_idle(&mut ev);
    ev.iter()
        .find_map(|e| e.output.finished.map(|f| f.ttft))
        .expect("request finished")
}

/// Mean seconds between tokens while `batch` requests of `context` prompt tokens decode
/// together (measured after the last of them has its first token).
pub fn batch_itl(cfg: &EngineConfig, batch: u32, context: u32) -> f64 {
    let mut c = Cluster::new(vec![Engine::new(quiet(cfg), 1)]);
    for i in 0..batch {
        c.submit(0, request(context, 64, i as u64 + 1, cfg.block_size));
    }
    let mut ev = Vec::new();
    c.run_to_idle(&mut ev);
    let all_started = ev
        .iter()
        .filter(|e| e.output.token_index == 0)
        .map(|e| e.time)
        .fold(0.0, f64::max);
    let mut last = rustc_hash::FxHashMap::default();
    let (mut sum, mut n) = (0.0, 0u64);
    for e in &ev {
        if let Some(prev) = last.insert(e.output.id, e.time) {
            if prev >= all_started {
                sum += e.time - prev;
                n += 1;
            }
        }
    }
    sum / n.max(1) as f64
}

/// Output tokens per second with `requests` requests of one shape arriving at once.
pub fn saturated_tps(cfg: &EngineConfig, input: u32, output: u32, requests: u32) -> f64 {
    let mut c = Cluster::new(vec![Engine::new(quiet(cfg), 1)]);
    for i in 0..requests {
        c.submit(0, request(input, output, i as u64 + 1, cfg.block_size));
    }
    let mut ev = Vec::new();
    let end = c.run_to_idle(&mut ev);
    ev.len() as f64 / end
}

/// Per-request (TTFT, TPOT) under Poisson arrivals at `rate` per second.
pub fn open_loop(
    cfg: &EngineConfig,
    rate: f64,
    input: u32,
    output: u32,
    requests: u32,
) -> Vec<(f64, f64)> {
    let mut c = Cluster::new(vec![Engine::new(quiet(cfg), 1)]);
    let mut rng = SmallRng::seed_from_u64(7);
    let mut t = 0.0;
    let mut ev: Vec<Event> = Vec::new();
    for i in 0..requests {
        t += -(1.0 - rng.random::<f64>()).ln() / rate;
        c.run_until(t, &mut ev);
        c.submit(0, request(input, output, i as u64 + 1, cfg.block_size));
    }
    c.run_to_idle(&mut ev);
    ev.iter()
        .filter_map(|e| e.output.finished)
        .map(|f| {
            let tpot = (f.e2e - f.ttft) / (f.completion_tokens.max(2) - 1) as f64;
            (f.ttft, tpot)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The engine's figure for `q`.
pub fn measure(cfg: &EngineConfig, q: Quantity) -> f64 {
    match q {
        Quantity::IdleTtft { prompt_tokens } => idle_ttft(cfg, prompt_tokens),
        Quantity::Itl {
            batch,
            context_tokens,
        } => batch_itl(cfg, batch, context_tokens),
        Quantity::SaturatedOutputTps {
            input_tokens,
            output_tokens,
            requests,
        } => saturated_tps(cfg, input_tokens, output_tokens, requests),
        Quantity::OpenLoopTpot {
            rate,
            input_tokens,
            output_tokens,
            requests,
        }
        | Quantity::OpenLoopTtft {
            rate,
            input_tokens,
            output_tokens,
            requests,
        } => {
            let runs = open_loop(cfg, rate, input_tokens, output_tokens, requests);
            let tpot = matches!(q, Quantity::OpenLoopTpot { .. });
            median(
                runs.into_iter()
                    .map(|(ttft, tpot_)| if tpot { tpot_ } else { ttft })
                    .collect(),
            )
        }
    }
}

/// How a quantity reads in the report.
pub fn describe(q: Quantity) -> String {
    match q {
        Quantity::IdleTtft { prompt_tokens } => format!("TTFT, idle, {prompt_tokens}-token prompt"),
        Quantity::Itl {
            batch,
            context_tokens,
        } => format!("ITL, batch {batch}, {context_tokens}-token prompts"),
        Quantity::SaturatedOutputTps {
            input_tokens,
            output_tokens,
            requests,
        } => format!("output tok/s, {requests} x {input_tokens} in / {output_tokens} out at once"),
        Quantity::OpenLoopTpot {
            rate,
            input_tokens,
            output_tokens,
            ..
        } => format!("median TPOT, Poisson {rate} req/s, {input_tokens} in / {output_tokens} out"),
        Quantity::OpenLoopTtft {
            rate,
            input_tokens,
            output_tokens,
            ..
        } => format!("median TTFT, Poisson {rate} req/s, {input_tokens} in / {output_tokens} out"),
    }
}

fn is_rate(q: Quantity) -> bool {
    matches!(q, Quantity::SaturatedOutputTps { .. })
}

fn show(q: Quantity, v: f64) -> String {
    if is_rate(q) {
        format!("{v:.0} tok/s")
    } else {
        format!("{:.1} ms", v * 1e3)
    }
}

/// One claim checked.
#[derive(Clone, Debug)]
pub struct Check {
    pub quantity: Quantity,
    pub simulated: f64,
    pub published: f64,
    pub source: &'static str,
}

impl Check {
    /// Simulated over published, minus one.
    pub fn deviation(&self) -> f64 {
        self.simulated / self.published - 1.0
    }

    pub fn ok(&self) -> bool {
        self.deviation().abs() <= TOLERANCE
    }
}

/// Runs every claim of `profile` on an engine configured as `cfg`.
pub fn check(profile: &Profile, cfg: &EngineConfig) -> Vec<Check> {
    profile
        .references
        .iter()
        .map(|r| Check {
            quantity: r.quantity,
            simulated: measure(cfg, r.quantity),
            published: r.value,
            source: r.source,
        })
        .collect()
}

/// The standard grid the issue asks every profile to print.
pub fn grid() -> Vec<Quantity> {
    let mut g: Vec<Quantity> = [128, 1024, 8192]
        .map(|p| Quantity::IdleTtft { prompt_tokens: p })
        .to_vec();
    g.extend([1, 32, 256].map(|b| Quantity::Itl {
        batch: b,
        context_tokens: 512,
    }));
    g.push(Quantity::SaturatedOutputTps {
        input_tokens: SHAREGPT_INPUT,
        output_tokens: SHAREGPT_OUTPUT,
        requests: 1000,
    });
    g
}

/// The calibration report for `profile` with `cfg`'s engine knobs.
pub fn report(profile: &Profile, cfg: &EngineConfig) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "profile {}: {}", profile.name, profile.description);
    let m = &cfg.step;
    let _ = writeln!(
        s,
        "step model: {:.2} ms + {:.1} us/prefill token + {:.1} us/decode seq + {:.1} ns/context token + {:.2} ns/prefill pair; block_size {}, num_gpu_blocks {}, max_num_seqs {}, max_num_batched_tokens {}",
        m.base * 1e3,
        m.prefill_token * 1e6,
        m.decode_seq * 1e6,
        m.context_token * 1e9,
        m.prefill_pair * 1e9,
        cfg.block_size,
        cfg.num_gpu_blocks,
        cfg.max_num_seqs,
        cfg.max_num_batched_tokens
    );
    let _ = writeln!(
        s,
        "\nPublished figures this profile claims (target: within {:.0}%):",
        TOLERANCE * 100.0
    );
    let checks = check(profile, cfg);
    for c in &checks {
        let _ = writeln!(
            s,
            "  {:<62} sim {:>12}  published {:>12}  {:+5.0}% {}\n      source: {}",
            describe(c.quantity),
            show(c.quantity, c.simulated),
            show(c.quantity, c.published),
            c.deviation() * 100.0,
            if c.ok() { "ok" } else { "OUT OF TOLERANCE" },
            c.source
        );
    }
    let _ = writeln!(s, "\nStandard grid:");
    for q in grid() {
        let claim = profile.references.iter().find(|r| r.quantity == q);
        let published = match claim {
            Some(r) => format!("published {} ({})", show(q, r.value), r.source),
            None => "no public figure found for exactly this condition".to_owned(),
        };
        let _ = writeln!(
            s,
            "  {:<62} sim {:>12}  {}",
            describe(q),
            show(q, measure(cfg, q)),
            published
        );
    }
    let failed = checks.iter().filter(|c| !c.ok()).count();
    let _ = writeln!(
        s,
        "\n{} of {} claims within {:.0}%.",
        checks.len() - failed,
        checks.len(),
        TOLERANCE * 100.0
    );
    s
}

//! The step-time model and the named profiles.
//!
//! One engine step runs one forward pass over a batch. Its time is modelled as
//!
//! ```text
//! t = base + prefill_token * P + decode_seq * D + context_token * C + prefill_pair * Q
//! ```
//!
//! - `P`: prompt tokens computed in the step (compute-bound: ~2 x parameters FLOP each);
//! - `D`: sequences decoding one token (the per-sequence share of the matmuls);
//! - `C`: KV-cache tokens read by the decoding sequences (memory-bound attention);
//! - `Q`: (query, key) pairs attended by the prefill tokens (quadratic attention cost);
//! - `base`: what every step pays whatever its size: reading the weights once, kernel
//!   launches, the scheduler.
//!
//! A step with a LoRA adapter in it costs `lora_overhead` more (the extra adapter matmuls).
//! The coefficients of each profile are derived from the hardware's published limits and then
//! checked against published serving figures; `infergate sim --calibrate` runs the engine
//! against each [`Reference`] of a profile and prints both.

/// Work done in one step, as the scheduler built it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchShape {
    pub prefill_tokens: u64,
    /// Sum over prefill chunks of `chunk * (tokens before the chunk + chunk / 2)`.
    pub prefill_pairs: f64,
    pub decode_seqs: u64,
    /// Sum of the context lengths of the decoding sequences.
    pub decode_context_tokens: u64,
    pub has_lora: bool,
}

/// The coefficients of the step-time model, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepModel {
    pub base: f64,
    pub prefill_token: f64,
    pub decode_seq: f64,
    pub context_token: f64,
    pub prefill_pair: f64,
    /// Fraction added to a step that serves any LoRA adapter.
    pub lora_overhead: f64,
}

impl StepModel {
    /// Seconds the step takes, without jitter.
    pub fn step_time(&self, b: &BatchShape) -> f64 {
        let t = self.base
            + self.prefill_token * b.prefill_tokens as f64
            + self.decode_seq * b.decode_seqs as f64
            + self.context_token * b.decode_context_tokens as f64
            + self.prefill_pair * b.prefill_pairs;
        if b.has_lora {
            t * (1.0 + self.lora_overhead)
        } else {
            t
        }
    }
}

/// What a published figure measures; `infergate sim --calibrate` reproduces each on the engine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Quantity {
    /// Time to first token of one request on an idle engine.
    IdleTtft { prompt_tokens: u32 },
    /// Mean time between output tokens with `batch` requests decoding together, each with
    /// about `context_tokens` of context.
    Itl { batch: u32, context_tokens: u32 },
    /// Output tokens per second when `requests` requests of this shape all arrive at once
    /// (benchmark_serving with `--request-rate inf`).
    SaturatedOutputTps {
        input_tokens: u32,
        output_tokens: u32,
        requests: u32,
    },
    /// Median time per output token (excluding the first) under Poisson arrivals.
    OpenLoopTpot {
        rate: f64,
        input_tokens: u32,
        output_tokens: u32,
        requests: u32,
    },
    /// Median time to first token under Poisson arrivals.
    OpenLoopTtft {
        rate: f64,
        input_tokens: u32,
        output_tokens: u32,
        requests: u32,
    },
}

/// A published figure a profile claims to match.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reference {
    pub quantity: Quantity,
    /// Seconds for latencies, tokens/s for throughput.
    pub value: f64,
    /// Where the figure comes from, and under which conditions.
    pub source: &'static str,
}

/// A named model-on-hardware profile: the step model plus the engine's capacity.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    /// The model name the simulator serves by default (as vLLM's `--model`).
    pub model: &'static str,
    pub description: &'static str,
    pub step: StepModel,
    /// KV-cache blocks at vLLM's default `gpu_memory_utilization` 0.9.
    pub num_gpu_blocks: u32,
    pub max_model_len: u32,
    pub references: &'static [Reference],
}

/// Every built-in profile.
pub fn all() -> &'static [Profile] {
    &PROFILES
}

/// The profile called `name`.
pub fn by_name(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// The names of every built-in profile, for error messages.
pub fn names() -> Vec<&'static str> {
    PROFILES.iter().map(|p| p.name).collect()
}

// ---------------------------------------------------------------------------------------
// Llama-3.1-8B, BF16, one H100 SXM 80 GB.
//
// First principles (DESIGN.md section 8): 16 GB of weights read at 3.35 TB/s is 4.8 ms per
// step at least; ~16 GFLOP per token at 40-60% of 989 TFLOP/s dense BF16 is 27-40 us per
// prompt token; one token of KV is 2 x 32 layers x 8 heads x 128 x 2 bytes = 128 KiB, read at
// 3.35 TB/s in ~39 ns; a (query, key) attention pair costs 4 x 32 x 4096 FLOP = 0.5 MFLOP.
// KV capacity: 80 GB x 0.9 - 16 GB weights - activations = ~54 GB, 128 KiB a token: ~440k
// tokens; a published vLLM 0.4.1 start-up log of Llama-3-8B-Instruct BF16 on an 80 GB GPU
// (NVIDIA's NIM documentation) prints `# GPU blocks: 27793`, which we use.
//
// Fitted: `base` to the batch-10 and low-rate TPOT figures (7.56 and 7.63 ms) less the
// per-sequence cost; `prefill_token` (28 us, ~36k prompt tokens/s, inside the 27-40 us bound)
// to the 22.1 ms median TTFT of 512-token prompts; `decode_seq` and `context_token` to the
// saturated ShareGPT throughputs (8,088 and 6,583 tok/s: we land between them). The idle
// TTFT at 1k and 8k and the ITL at batch 32 and 256 have no public vLLM figure we could
// find; they follow from the same coefficients (see `infergate sim --calibrate`).
// ---------------------------------------------------------------------------------------
const LLAMA3_8B_H100: StepModel = StepModel {
    base: 0.0062,
    prefill_token: 0.000_028,
    decode_seq: 0.000_050,
    context_token: 0.000_000_060,
    prefill_pair: 0.000_000_001_1,
    lora_overhead: 0.15,
};

// ---------------------------------------------------------------------------------------
// Llama-3.1-70B, BF16, four H100 SXM 80 GB with tensor parallelism 4.
//
// 140 GB of weights, 35 GB per GPU read at 3.35 TB/s: 10.4 ms per step at least, plus the
// all-reduces; ~140 GFLOP per token over 4 x 989 TFLOP/s at ~45%: ~80 us per prompt token;
// KV per token 2 x 80 layers x 8 heads x 128 x 2 bytes = 320 KiB, spread over 4 GPUs and read
// at 4 x 3.35 TB/s: ~24 ns; attention pair 4 x 80 x 8192 FLOP = 2.6 MFLOP over 4 GPUs.
// KV capacity: 4 x (72 GB - 35 GB - ~4 GB) = ~132 GB, 320 KiB a token: ~410k tokens.
//
// Fitted: `base` (20 ms, about twice the weight-read floor, the rest all-reduce and launch
// overhead) to the median TPOT at 4 and 8 req/s (23.58 and 29.15 ms); the per-token costs
// from first principles, which then give the saturated 3,700 tok/s within a few percent.
// ---------------------------------------------------------------------------------------
const LLAMA3_70B_4XH100: StepModel = StepModel {
    base: 0.0200,
    prefill_token: 0.000_080,
    decode_seq: 0.000_075,
    context_token: 0.000_000_028,
    prefill_pair: 0.000_000_001_5,
    lora_overhead: 0.15,
};

static PROFILES: [Profile; 2] = [
    Profile {
        name: "llama3-8b-h100",
        model: "meta-llama/Llama-3.1-8B-Instruct",
        description: "Llama-3.1-8B BF16 on one H100 SXM 80GB, vLLM V1 defaults",
        step: LLAMA3_8B_H100,
        num_gpu_blocks: 27_793,
        max_model_len: 131_072,
        references: &LLAMA3_8B_REFS,
    },
    Profile {
        name: "llama3-70b-4xh100",
        model: "meta-llama/Llama-3.1-70B-Instruct",
        description:
            "Llama-3.1-70B BF16 on four H100 SXM 80GB (tensor parallel 4), vLLM V1 defaults",
        step: LLAMA3_70B_4XH100,
        num_gpu_blocks: 25_600,
        max_model_len: 131_072,
        references: &LLAMA3_70B_REFS,
    },
];

static LLAMA3_8B_REFS: [Reference; 5] = [
    Reference {
        quantity: Quantity::Itl { batch: 10, context_tokens: 137 },
        value: 0.00756,
        source: "LambdaLabsML/vllm-benchmark results/prompt_10/1xH100-80GB-SXM/Meta-Llama-3-8B-Instruct_tp1_len2048.json: median TPOT 7.56 ms, 10 ShareGPT prompts (mean 137 tokens) sent together, H100 SXM, BF16, vLLM 2024-09",
    },
    Reference {
        quantity: Quantity::OpenLoopTpot { rate: 1.11, input_tokens: 512, output_tokens: 256, requests: 50 },
        value: 0.00763,
        source: "vllm-project/vllm PR #16072 (comment 2025-04-08): llama 8B, vLLM V1, 50 requests 512 in / 256 out at 1.11 req/s, mean TPOT 7.63 ms (GPU not stated)",
    },
    Reference {
        quantity: Quantity::OpenLoopTtft { rate: 1.11, input_tokens: 512, output_tokens: 256, requests: 50 },
        value: 0.0221,
        source: "vllm-project/vllm PR #16072, same run: median TTFT 22.10 ms (includes HTTP and tokenisation)",
    },
    Reference {
        quantity: Quantity::SaturatedOutputTps { input_tokens: 230, output_tokens: 200, requests: 5000 },
        value: 8088.0,
        source: "LambdaLabsML/vllm-benchmark benchmark_v0.md: Llama 3.1 8B, 1x H100, vLLM 0.6.0 (10 scheduler steps), ShareGPT 5000 prompts at rate inf, max-num-seqs 256: 8,088 output tok/s",
    },
    Reference {
        quantity: Quantity::SaturatedOutputTps { input_tokens: 230, output_tokens: 203, requests: 1000 },
        value: 6582.87,
        source: "vllm-project/vllm PR #18566: Llama-3.1-8B-Instruct, vllm bench serve, ShareGPT 1000 prompts (229,711 in / 203,068 out) at rate inf: 6,582.87 output tok/s (GPU not stated)",
    },
];

static LLAMA3_70B_REFS: [Reference; 3] = [
    Reference {
        quantity: Quantity::OpenLoopTpot { rate: 4.0, input_tokens: 230, output_tokens: 194, requests: 1200 },
        value: 0.02358,
        source: "sgl-project/sglang benchmark/benchmark_vllm_060/README.md: Llama 3.1 70B Instruct BF16, 4x H100 80G TP4, vLLM 0.6.0, ShareGPT 1200 prompts at 4 req/s: median TPOT 23.58 ms",
    },
    Reference {
        quantity: Quantity::OpenLoopTpot { rate: 8.0, input_tokens: 230, output_tokens: 194, requests: 2400 },
        value: 0.02915,
        source: "same README: 2400 prompts at 8 req/s: median TPOT 29.15 ms",
    },
    Reference {
        quantity: Quantity::SaturatedOutputTps { input_tokens: 230, output_tokens: 194, requests: 5000 },
        value: 3700.64,
        source: "same README, offline: 5000 ShareGPT prompts at rate inf: 3,700.64 output tok/s (19.04 req/s)",
    },
];

//! Property tests: whatever arrives, aborts or runs, the engine's books balance.

use std::sync::Arc;

use infergate_sim::engine::EosModel;
use infergate_sim::{profile, Engine, EngineConfig, Prompt, SimRequest};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Add {
        len: u32,
        out: u32,
        group: u64,
        lora: Option<u8>,
    },
    Abort(usize),
    Step,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u32..900, 1u32..120, 0u64..4, prop::option::of(0u8..4))
            .prop_map(|(len, out, group, lora)| Op::Add { len, out, group, lora }),
        1 => (0usize..64).prop_map(Op::Abort),
        6 => Just(Op::Step),
    ]
}

fn small_cfg(blocks: u32, seqs: u32, budget: u32, loras: u32) -> EngineConfig {
    let mut c = EngineConfig::for_profile(profile::by_name("llama3-8b-h100").unwrap());
    c.num_gpu_blocks = blocks;
    c.max_model_len = 1024;
    c.max_num_seqs = seqs;
    c.max_num_batched_tokens = budget;
    c.max_loras = loras;
    c.max_cpu_loras = loras + 1;
    c.eos = EosModel::LogNormal {
        median: 20.0,
        sigma: 1.0,
    };
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn books_balance_and_every_request_ends(
        ops in prop::collection::vec(op(), 1..120),
        blocks in 64u32..200,
        seqs in 1u32..16,
        budget in 16u32..2048,
        loras in 1u32..3,
    ) {
        let mut e = Engine::new(small_cfg(blocks, seqs, budget, loras), 1);
        let mut now = 0.0;
        let mut live: Vec<u64> = Vec::new();
        let mut ended = 0usize;
        let mut added = 0usize;
        let mut aborted = 0usize;
        let mut outs = Vec::new();
        let mut step = |e: &mut Engine, now: &mut f64, live: &mut Vec<u64>, ended: &mut usize| {
            if let Some(plan) = e.begin_step(*now) {
                prop_assert!(plan.end > plan.start);
                prop_assert!(plan.num_seqs <= seqs);
                prop_assert!(plan.shape.prefill_tokens + plan.shape.decode_seqs <= budget as u64);
                prop_assert!(e.pool().usage() <= 1.0);
                e.check();
                *now = plan.end;
                outs.clear();
                e.finish_step(&mut outs);
                for o in &outs {
                    if o.finished.is_some() {
                        live.retain(|&id| id != o.id);
                        *ended += 1;
                    }
                }
                e.check();
            }
            Ok(())
        };
        for op in ops {
            match op {
                Op::Add { len, out, group, lora } => {
                    let len = len.min(1000);
                    let out = out.min(1024 - len);
                    let id = e.add(SimRequest {
                        prompt: Prompt::synthetic(len, len / 2, group, added as u64, 16),
                        max_tokens: out.max(1),
                        ignore_eos: group % 2 == 0,
                        lora: lora.map(|l| Arc::from(format!("adapter-{l}"))),
                    }, now);
                    live.push(id);
                    added += 1;
                }
                Op::Abort(i) => {
                    if !live.is_empty() {
                        let id = live.remove(i % live.len());
                        prop_assert!(e.abort(id));
                        aborted += 1;
                    }
                }
                Op::Step => step(&mut e, &mut now, &mut live, &mut ended)?,
            }
        }
        // Drain: everything still live must finish, in a bounded number of steps.
        let mut guard = 0;
        while !e.is_idle() {
            step(&mut e, &mut now, &mut live, &mut ended)?;
            guard += 1;
            prop_assert!(guard < 200_000, "engine did not drain");
        }
        prop_assert!(live.is_empty(), "requests never finished: {live:?}");
        prop_assert_eq!(ended + aborted, added);
        prop_assert_eq!(e.pool().usage(), 0.0);
        let s = e.stats();
        prop_assert_eq!(s.num_running + s.num_waiting, 0);
    }
}

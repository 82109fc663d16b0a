//! Behaviour of the simulated engine: the properties routing decisions depend on.

use std::sync::Arc;

use infergate_sim::calibrate::{batch_itl, idle_ttft, open_loop};
use infergate_sim::engine::EosModel;
use infergate_sim::profile;
use infergate_sim::vclock::{Cluster, Event};
use infergate_sim::{Engine, EngineConfig, Prompt, SimRequest};

fn cfg() -> EngineConfig {
    let mut c = EngineConfig::for_profile(profile::by_name("llama3-8b-h100").unwrap());
    c.jitter = 0.0;
    c.eos = EosModel::Never;
    c
}

fn req(len: u32, out: u32, group: u64, shared: u32, unique: u64) -> SimRequest {
    SimRequest {
        prompt: Prompt::synthetic(len, shared, group, unique, 16),
        max_tokens: out,
        ignore_eos: true,
        lora: None,
    }
}

fn finished(ev: &[Event]) -> Vec<(u64, infergate_sim::engine::Finished)> {
    ev.iter()
        .filter_map(|e| e.output.finished.map(|f| (e.output.id, f)))
        .collect()
}

#[test]
fn ttft_grows_with_prompt_length() {
    let c = cfg();
    let (a, b, d) = (idle_ttft(&c, 128), idle_ttft(&c, 1024), idle_ttft(&c, 8192));
    assert!(a < b && b < d, "{a} {b} {d}");
    // Prefill dominates long prompts: 8k tokens cost several times what 1k do.
    assert!(d > 5.0 * b, "{b} {d}");
}

#[test]
fn a_prefix_hit_skips_prefill_and_shows_in_cached_tokens() {
    let mut c = Cluster::new(vec![Engine::new(cfg(), 1)]);
    let mut ev = Vec::new();
    c.submit(0, req(4000, 1, 7, 3800, 1));
    c.run_to_idle(&mut ev);
    let cold = finished(&ev)[0].1;
    ev.clear();
    c.submit(0, req(4000, 1, 7, 3800, 2));
    c.run_to_idle(&mut ev);
    let warm = finished(&ev)[0].1;
    assert_eq!(cold.cached_tokens, 0);
    // 3800 shared tokens are 237 full blocks of 16.
    assert_eq!(warm.cached_tokens, 237 * 16);
    assert!(
        warm.ttft < cold.ttft / 4.0,
        "cold {} warm {}",
        cold.ttft,
        warm.ttft
    );
    let k = c.engine(0).counters();
    // Queries count the prompt and output tokens of each admitted request.
    assert_eq!(k.prefix_queries, 8000);
    assert_eq!(k.prefix_hits, 3792);
}

#[test]
fn prefix_caching_off_means_no_hits() {
    let mut conf = cfg();
    conf.enable_prefix_caching = false;
    let mut c = Cluster::new(vec![Engine::new(conf, 1)]);
    let mut ev = Vec::new();
    for u in 0..2 {
        c.submit(0, req(2000, 1, 7, 2000, u));
        c.run_to_idle(&mut ev);
    }
    assert!(finished(&ev).iter().all(|(_, f)| f.cached_tokens == 0));
}

#[test]
fn inter_token_latency_grows_with_batch_size() {
    let c = cfg();
    let (a, b, d) = (
        batch_itl(&c, 1, 512),
        batch_itl(&c, 32, 512),
        batch_itl(&c, 256, 512),
    );
    assert!(a < b && b < d, "{a} {b} {d}");
    assert!(d > 2.0 * a, "{a} {d}");
}

#[test]
fn throughput_saturates_and_queueing_appears_past_it() {
    let c = cfg();
    // Output tokens per second and median queue time as the offered load rises.
    let mut rows = Vec::new();
    for rate in [5.0, 20.0, 40.0, 80.0, 160.0] {
        let n = (rate * 20.0) as u32;
        let res = open_loop(&c, rate, 230, 200, n);
        let mut ttft: Vec<f64> = res.iter().map(|r| r.0).collect();
        ttft.sort_by(f64::total_cmp);
        rows.push((rate, ttft[ttft.len() / 2]));
    }
    // Below saturation TTFT stays near the idle prefill time; far past it, requests queue
    // for seconds.
    assert!(rows[0].1 < 0.05, "{rows:?}");
    assert!(rows[4].1 > 1.0, "{rows:?}");
    assert!(rows.windows(2).all(|w| w[1].1 >= w[0].1 * 0.9), "{rows:?}");
    // The engine's throughput plateaus: doubling the offered load past saturation adds
    // little output per second.
    let tps = |rate: f64| {
        let n = (rate * 20.0) as u32;
        let res = open_loop(&c, rate, 230, 200, n);
        let span = res.iter().map(|r| r.0).fold(0.0, f64::max) + 20.0;
        n as f64 * 200.0 / span
    };
    let (t80, t160) = (tps(80.0), tps(160.0));
    assert!(t160 < 1.25 * t80, "{t80} {t160}");
}

#[test]
fn kv_use_never_exceeds_capacity_and_preempted_requests_finish() {
    let mut conf = cfg();
    conf.num_gpu_blocks = 200; // 3,200 tokens: a handful of requests fill it
    conf.max_model_len = 3200;
    let mut e = Engine::new(conf, 3);
    let mut want = std::collections::HashMap::new();
    for i in 0..24u64 {
        let out = 300 + (i as u32 % 5) * 100;
        let id = e.add(req(400 + (i as u32 % 7) * 50, out, i % 3, 200, i), 0.0);
        want.insert(id, out);
    }
    let mut outs = Vec::new();
    let mut got = std::collections::HashMap::new();
    let mut now = 0.0;
    let mut max_usage: f64 = 0.0;
    while let Some(plan) = e.begin_step(now) {
        max_usage = max_usage.max(e.pool().usage());
        assert!(e.pool().num_free() <= e.pool().num_blocks());
        e.check();
        now = plan.end;
        outs.clear();
        e.finish_step(&mut outs);
        e.check();
        for o in &outs {
            if let Some(f) = o.finished {
                got.insert(o.id, f);
            }
        }
    }
    assert!(
        max_usage > 0.9,
        "the test should fill the cache: {max_usage}"
    );
    assert!(e.counters().preemptions > 0, "no preemption happened");
    assert_eq!(got.len(), want.len());
    for (id, f) in &got {
        assert_eq!(f.completion_tokens, want[id]);
    }
    assert!(got.values().any(|f| f.preemptions > 0));
    assert_eq!(e.pool().usage(), 0.0);
}

#[test]
fn a_lora_request_waits_while_all_slots_hold_other_adapters() {
    let mut conf = cfg();
    conf.max_loras = 1;
    conf.max_cpu_loras = 2;
    let mut c = Cluster::new(vec![Engine::new(conf.clone(), 1)]);
    let lora = |name: &str, out: u32, u: u64| SimRequest {
        lora: Some(Arc::from(name)),
        ..req(100, out, 0, 0, u)
    };
    let a = c.submit(0, lora("a", 200, 1));
    let mut ev = Vec::new();
    c.run_until(0.05, &mut ev);
    let b = c.submit(0, lora("b", 10, 2));
    let base = c.submit(0, req(100, 10, 0, 0, 3));
    c.run_until(0.07, &mut ev);
    let s = c.engine(0).stats();
    assert_eq!(s.num_running, 2, "a and the base-model request run");
    assert_eq!(s.num_waiting, 1);
    assert_eq!(s.running_loras, vec![Arc::<str>::from("a")]);
    assert_eq!(s.waiting_loras, vec![Arc::<str>::from("b")]);
    c.run_to_idle(&mut ev);
    let f = finished(&ev);
    let end = |id| f.iter().find(|(i, _)| *i == id).unwrap().1;
    let (fa, fb, fbase) = (end(a), end(b), end(base));
    assert!(fbase.e2e < fa.e2e, "the base-model request is not held up");
    // b could only start once a had finished (a arrived at 0, b at 0.05).
    assert!(fb.queue_time + 0.05 >= fa.e2e - 1e-9, "{fb:?} {fa:?}");
    assert_eq!(c.engine(0).counters().lora_loads, 2);
}

#[test]
fn swapping_in_an_adapter_costs_its_load_time() {
    let mut conf = cfg();
    conf.lora_load_time = 0.5;
    conf.lora_swap_time = 0.01;
    let ttft = |lora: Option<&str>, warm: bool| {
        let mut c = Cluster::new(vec![Engine::new(conf.clone(), 1)]);
        let mut ev = Vec::new();
        let r = |u| SimRequest {
            lora: lora.map(Arc::from),
            ..req(100, 1, 0, 0, u)
        };
        if warm {
            c.submit(0, r(1));
            c.run_to_idle(&mut ev);
            ev.clear();
        }
        c.submit(0, r(2));
        c.run_to_idle(&mut ev);
        finished(&ev)[0].1.ttft
    };
    let base = ttft(None, false);
    let cold = ttft(Some("x"), false);
    let warm = ttft(Some("x"), true);
    assert!(cold > base + 0.5, "{base} {cold}");
    assert!(warm < base + 0.01, "{base} {warm}");
}

#[test]
fn abort_frees_the_requests_blocks_even_mid_step() {
    let mut e = Engine::new(cfg(), 1);
    let id = e.add(req(1000, 100, 0, 0, 1), 0.0);
    let plan = e.begin_step(0.0).unwrap();
    assert!(e.pool().usage() > 0.0);
    assert!(e.abort(id));
    let mut out = Vec::new();
    e.finish_step(&mut out);
    assert!(out.is_empty());
    assert_eq!(e.pool().usage(), 0.0);
    assert!(e.is_idle());
    assert!(e.begin_step(plan.end).is_none());
    assert!(!e.abort(id));
}

#[test]
fn natural_lengths_stop_before_max_tokens_and_are_reproducible() {
    let mut conf = cfg();
    conf.eos = EosModel::LogNormal {
        median: 50.0,
        sigma: 0.5,
    };
    let run = |seed| {
        let mut c = Cluster::new(vec![Engine::new(conf.clone(), seed)]);
        for u in 0..50 {
            c.submit(
                0,
                SimRequest {
                    ignore_eos: false,
                    ..req(100, 1000, 0, 0, u)
                },
            );
        }
        let mut ev = Vec::new();
        c.run_to_idle(&mut ev);
        let mut v: Vec<_> = finished(&ev)
            .into_iter()
            .map(|(id, f)| (id, f.completion_tokens, f.reason))
            .collect();
        v.sort_by_key(|x| x.0);
        v
    };
    let a = run(9);
    assert_eq!(a, run(9));
    assert_ne!(a, run(10));
    assert!(a
        .iter()
        .all(|x| x.2 == infergate_sim::FinishReason::Stop && x.1 < 1000));
    let mean = a.iter().map(|x| x.1 as f64).sum::<f64>() / 50.0;
    assert!((30.0..90.0).contains(&mean), "{mean}");
}

#[test]
fn chunked_prefill_keeps_decoding_while_a_long_prompt_is_prefilled() {
    let mut conf = cfg();
    conf.max_num_batched_tokens = 2048;
    let mut c = Cluster::new(vec![Engine::new(conf, 1)]);
    let mut ev = Vec::new();
    let short = c.submit(0, req(100, 200, 0, 0, 1));
    c.run_until(0.1, &mut ev);
    c.submit(0, req(16000, 1, 0, 0, 2));
    ev.clear();
    c.run_until(1.0, &mut ev);
    // 16k tokens need 8 chunks of 2,048; the short request keeps getting a token every step.
    let mut times: Vec<f64> = ev
        .iter()
        .filter(|e| e.output.id == short)
        .map(|e| e.time)
        .collect();
    times.dedup();
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 8, "{gaps:?}");
    assert!(gaps.iter().all(|g| *g < 0.12), "{gaps:?}");
}

#[test]
fn the_virtual_clock_delivers_events_in_time_order_across_engines() {
    let engines = (0..8).map(|i| Engine::new(cfg(), i)).collect();
    let mut c = Cluster::new(engines);
    let mut ev = Vec::new();
    for i in 0..200u64 {
        c.run_until(i as f64 * 0.01, &mut ev);
        c.submit((i % 8) as usize, req(200, 20, 0, 0, i));
    }
    c.run_to_idle(&mut ev);
    assert!(ev.windows(2).all(|w| w[0].time <= w[1].time));
    assert_eq!(finished(&ev).len(), 200);
    assert_eq!(ev.len(), 200 * 20);
    assert!(c.engines().iter().all(|e| e.is_idle()));
}

#[test]
fn every_profile_meets_its_published_figures() {
    for p in profile::all() {
        let conf = EngineConfig::for_profile(p);
        for check in infergate_sim::calibrate::check(p, &conf) {
            assert!(
                check.ok(),
                "{}: {} is {:+.0}% off the published figure ({})",
                p.name,
                infergate_sim::calibrate::describe(check.quantity),
                check.deviation() * 100.0,
                check.source
            );
        }
    }
}

#[test]
fn a_step_never_admits_a_request_that_arrived_after_it_began() {
    // A real-time driver running late starts a step at its planned time, before requests
    // that came in during the lag; they must wait for the next step, or their TTFT would
    // come out shorter than the step that computed it.
    let mut e = Engine::new(cfg(), 1);
    e.add(req(100, 5, 0, 0, 1), 1.0);
    assert!(e.begin_step(0.5).is_none());
    assert!(!e.is_idle());
    let plan = e.begin_step(1.0).expect("admitted at its arrival time");
    let mut out = Vec::new();
    e.finish_step(&mut out);
    assert_eq!(out.len(), 1);
    assert!(e.counters().ttft.sum >= plan.end - plan.start - 1e-12);
}

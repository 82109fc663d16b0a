//! The virtual-clock runner: every request accounted for, and the Director's shedding and
//! routing visible in the outcomes.

use infergate_bench::stats::{by_priority, summarize};
use infergate_bench::virtual_run::{run, Router, VirtualPool};
use infergate_bench::workload::{Arrivals, PriorityMix, Shape, Stage, Workload};
use infergate_sim::{profile, EngineConfig};

fn pool(replicas: usize) -> VirtualPool {
    let p = profile::by_name("llama3-8b-h100").unwrap();
    VirtualPool {
        replicas,
        engine: EngineConfig::for_profile(p),
        model: p.model.to_owned(),
        scrape_interval: 0.05,
        objectives: vec![("interactive".into(), 10), ("batch".into(), -1)],
        seed: 3,
        slowdown: Vec::new(),
    }
}

fn chat(qps: f64, seconds: f64, batch_share: Option<f64>) -> Workload {
    Workload {
        shape: Shape::sharegpt(),
        arrivals: Arrivals::Poisson,
        stages: vec![Stage { qps, seconds }],
        lora: None,
        priorities: batch_share.map(|b| PriorityMix { batch_share: b }),
        seed: 11,
    }
}

#[test]
fn every_request_completes_with_its_tokens_under_both_routers() {
    let specs = chat(20.0, 10.0, None).generate();
    for router in [Router::RoundRobin, Router::reference_default().unwrap()] {
        let out = run(&pool(4), &router, &specs);
        assert_eq!(out.len(), specs.len());
        for (o, s) in out.iter().zip(&specs) {
            assert_eq!(o.status, 200, "{o:?}");
            assert_eq!(o.output_tokens, s.output_tokens.max(1));
            let first = o.first_token.expect("a first token");
            assert!(o.sent <= first && first <= o.done, "{o:?}");
        }
    }
}

#[test]
fn runs_are_reproducible() {
    let specs = chat(50.0, 5.0, Some(0.3)).generate();
    let router = Router::reference_default().unwrap();
    assert_eq!(
        run(&pool(3), &router, &specs),
        run(&pool(3), &router, &specs)
    );
}

#[test]
fn under_overload_the_director_sheds_batch_work_and_keeps_interactive() {
    // Two replicas offered several times what they can serve, a third of it batch work.
    let specs = chat(120.0, 20.0, Some(0.33)).generate();
    let out = run(&pool(2), &Router::reference_default().unwrap(), &specs);
    let duration = out.iter().map(|o| o.done).fold(0.0, f64::max);
    let classes = by_priority(&out, duration);
    let batch = &classes[&-1];
    let interactive = &classes[&10];
    assert!(batch.shed > batch.requests / 4, "{batch:?}");
    assert_eq!(interactive.shed, 0, "{interactive:?}");
    assert_eq!(interactive.ok, interactive.requests);
    // Round robin has no notion of priority: nothing is shed, everything queues.
    let rr = run(&pool(2), &Router::RoundRobin, &specs);
    assert!(rr.iter().all(|o| !o.shed));
}

#[test]
fn on_a_mixed_pool_infergate_learns_the_slow_replica_and_round_robin_does_not() {
    // Two replicas, the second three times slower, at a load the fast one could mostly
    // carry but half of which swamps the slow one.
    let mut p = pool(2);
    p.slowdown = vec![1.0, 3.0];
    let specs = chat(40.0, 20.0, None).generate();
    let summary = |router: &Router| {
        let out = run(&p, router, &specs);
        assert!(out.iter().all(|o| o.ok()));
        summarize(&out, 20.0)
    };
    let rr = summary(&Router::RoundRobin);
    let ig = summary(&Router::infergate().unwrap());
    let random = summary(&Router::Random);
    eprintln!(
        "mixed pool, TTFT p90 / TPOT p90 / e2e p90 (s): round robin {:.3} / {:.4} / {:.2}, random {:.3} / {:.4} / {:.2}, infergate {:.3} / {:.4} / {:.2}",
        rr.ttft_p90, rr.tpot_p90, rr.e2e_p90, random.ttft_p90, random.tpot_p90, random.e2e_p90,
        ig.ttft_p90, ig.tpot_p90, ig.e2e_p90
    );
    for base in [&rr, &random] {
        assert!(ig.ttft_p90 < base.ttft_p90, "{ig:?} vs {base:?}");
        assert!(ig.e2e_p90 * 1.5 < base.e2e_p90, "{ig:?} vs {base:?}");
    }
}

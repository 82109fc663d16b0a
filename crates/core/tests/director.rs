//! Director behaviour end to end inside `core`: decisions a user of the picker would notice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use infergate_core::director::{Director, ErrorKind, RequestInput, SchedulerConfig};
use infergate_core::objective::{Objective, Rewrite, RewriteRule, RewriteTarget};
use infergate_core::{Datastore, EndpointMetrics, EndpointSpec, Engine, Policy};
use rand::rngs::SmallRng;
use rand::SeedableRng;

const NOW: Duration = Duration::from_secs(1000);

fn addr(port: u16) -> SocketAddr {
    ([10, 0, 0, 1], port).into()
}

/// A pool with one endpoint per `(port, waiting, kv)`, all freshly scraped at `NOW`.
fn mk_pool(eps: &[(u16, u32, f64)]) -> Datastore {
    let ds = Datastore::new();
    ds.set_endpoints(
        eps.iter()
            .map(|&(p, _, _)| EndpointSpec::new(addr(p), Engine::Vllm))
            .collect(),
    );
    for &(p, waiting, kv) in eps {
        ds.snapshot().endpoint(addr(p)).unwrap().set_metrics(
            EndpointMetrics {
                waiting,
                kv_cache_usage: Some(kv),
                ..Default::default()
            },
            NOW,
        );
    }
    ds
}

fn completion(model: &str, prompt: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 8}))
        .unwrap()
}

fn input(body: &[u8]) -> RequestInput<'_> {
    RequestInput {
        path: "/v1/completions",
        body: Some(body),
        ..Default::default()
    }
}

#[test]
fn burst_between_scrapes_spreads_with_inflight_accounting_and_herds_without() {
    // Port 1 looks best in the last scrape; the others have one request queued.
    let pool = [(1, 0, 0.1), (2, 1, 0.1), (3, 1, 0.1), (4, 1, 0.1)];
    let run = |inflight: bool| {
        let ds = mk_pool(&pool);
        let cfg = SchedulerConfig {
            inflight_accounting: inflight,
            ..Default::default()
        };
        let d = Director::new(ds, cfg);
        let mut rng = SmallRng::seed_from_u64(42);
        let mut held = Vec::new();
        let mut per: HashMap<SocketAddr, usize> = HashMap::new();
        for i in 0..40 {
            let body = completion(
                "m",
                &format!("unrelated prompt number {i} {}", "x".repeat(i * 7)),
            );
            let dec = d.decide(&input(&body), NOW, &mut rng).unwrap();
            *per.entry(dec.endpoints[0]).or_default() += 1;
            held.push(dec); // requests stay in flight: no scrape happens during the burst
        }
        per
    };
    let herd = run(false);
    assert_eq!(
        herd.get(&addr(1)),
        Some(&40),
        "without accounting all land on the best-looking one: {herd:?}"
    );
    let spread = run(true);
    let max = *spread.values().max().unwrap();
    assert_eq!(spread.len(), 4, "{spread:?}");
    assert!(
        max <= 12,
        "with accounting no replica takes more than 12 of 40: {spread:?}"
    );
}

#[test]
fn inflight_returns_to_zero_when_decisions_drop() {
    let ds = mk_pool(&[(1, 0, 0.0), (2, 0, 0.0)]);
    let d = Director::new(ds.clone(), SchedulerConfig::default());
    let mut rng = SmallRng::seed_from_u64(1);
    let body = completion("m", &"p".repeat(400));
    let decisions: Vec<_> = (0..10)
        .map(|_| d.decide(&input(&body), NOW, &mut rng).unwrap())
        .collect();
    let total: u64 = ds
        .snapshot()
        .endpoints
        .iter()
        .map(|e| e.inflight_requests())
        .sum();
    assert_eq!(total, 10);
    assert!(
        ds.snapshot()
            .endpoints
            .iter()
            .map(|e| e.inflight_tokens())
            .sum::<u64>()
            >= 1000
    );
    drop(decisions);
    for e in &ds.snapshot().endpoints {
        assert_eq!((e.inflight_requests(), e.inflight_tokens()), (0, 0));
    }
}

#[test]
fn sheddable_request_gets_429_when_pool_saturated_and_others_are_served() {
    let ds = mk_pool(&[(1, 9, 0.5), (2, 7, 0.95)]);
    ds.set_policy(Policy {
        objectives: vec![
            Objective {
                name: "batch".into(),
                priority: -1,
            },
            Objective {
                name: "chat".into(),
                priority: 5,
            },
        ],
        ..Default::default()
    });
    let d = Director::new(ds, SchedulerConfig::default());
    let mut rng = SmallRng::seed_from_u64(1);
    let body = completion("m", "hello");
    let mut inp = input(&body);
    inp.objective = Some("batch");
    let err = d.decide(&inp, NOW, &mut rng).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Shed);
    assert_eq!(err.kind.status(), 429);
    inp.objective = Some("chat");
    assert_eq!(d.decide(&inp, NOW, &mut rng).unwrap().priority, 5);
    inp.objective = None;
    assert!(d.decide(&inp, NOW, &mut rng).is_ok());
}

#[test]
fn sheddable_request_is_served_when_pool_has_room() {
    let ds = mk_pool(&[(1, 0, 0.1), (2, 9, 0.9)]);
    ds.set_policy(Policy {
        objectives: vec![Objective {
            name: "batch".into(),
            priority: -1,
        }],
        ..Default::default()
    });
    let d = Director::new(ds, SchedulerConfig::default());
    let body = completion("m", "hello");
    let inp = RequestInput {
        objective: Some("batch"),
        ..input(&body)
    };
    let dec = d
        .decide(&inp, NOW, &mut SmallRng::seed_from_u64(1))
        .unwrap();
    assert_eq!(
        dec.endpoints,
        vec![addr(1)],
        "the saturated endpoint is avoided"
    );
}

#[test]
fn unknown_objective_is_refused_with_the_known_names() {
    let ds = mk_pool(&[(1, 0, 0.0)]);
    ds.set_policy(Policy {
        objectives: vec![Objective {
            name: "chat".into(),
            priority: 1,
        }],
        ..Default::default()
    });
    let d = Director::new(ds, SchedulerConfig::default());
    let body = completion("m", "x");
    let inp = RequestInput {
        objective: Some("chta"),
        ..input(&body)
    };
    let err = d
        .decide(&inp, NOW, &mut SmallRng::seed_from_u64(1))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::BadRequest);
    assert!(
        err.message.contains("\"chta\"") && err.message.contains("known: chat"),
        "{}",
        err.message
    );
}

#[test]
fn rewrite_splices_the_target_into_the_original_bytes() {
    let ds = mk_pool(&[(1, 0, 0.0)]);
    ds.set_policy(Policy {
        rewrites: vec![Rewrite {
            source: "default/r".into(),
            rules: vec![RewriteRule {
                matches: vec!["public".into()],
                targets: vec![RewriteTarget {
                    model: "served-v2".into(),
                    weight: 1,
                }],
            }],
        }],
        ..Default::default()
    });
    let d = Director::new(ds, SchedulerConfig::default());
    let body = br#"{"prompt": "say \"model\"",   "model":"public","max_tokens":1}"#;
    let dec = d
        .decide(&input(body), NOW, &mut SmallRng::seed_from_u64(1))
        .unwrap();
    assert_eq!(
        (dec.model.as_str(), dec.target_model.as_str()),
        ("public", "served-v2")
    );
    assert_eq!(
        dec.rewritten_body.as_deref(),
        Some(&br#"{"prompt": "say \"model\"",   "model":"served-v2","max_tokens":1}"#[..])
    );
}

#[test]
fn no_endpoints_and_empty_subset_are_503() {
    let d = Director::new(Datastore::new(), SchedulerConfig::default());
    let body = completion("m", "x");
    let err = d
        .decide(&input(&body), NOW, &mut SmallRng::seed_from_u64(1))
        .unwrap_err();
    assert_eq!(err.kind.status(), 503);

    let d = Director::new(
        mk_pool(&[(1, 0, 0.0), (2, 0, 0.0)]),
        SchedulerConfig::default(),
    );
    let inp = RequestInput {
        subset: Some(vec![]),
        ..input(&body)
    };
    assert_eq!(
        d.decide(&inp, NOW, &mut SmallRng::seed_from_u64(1))
            .unwrap_err()
            .kind
            .status(),
        503
    );
    let inp = RequestInput {
        subset: Some(vec![addr(2)]),
        ..input(&body)
    };
    for _ in 0..20 {
        assert_eq!(
            d.decide(&inp, NOW, &mut SmallRng::seed_from_u64(1))
                .unwrap()
                .endpoints,
            vec![addr(2)]
        );
    }
}

#[test]
fn shared_prefix_sticks_while_unrelated_prompts_spread() {
    let d = Director::new(
        mk_pool(&[(1, 0, 0.1), (2, 0, 0.1), (3, 0, 0.1)]),
        SchedulerConfig::default(),
    );
    let mut rng = SmallRng::seed_from_u64(5);
    let system = "You are a helpful assistant. ".repeat(150); // ~4 KB shared prefix
    let mut shared = HashMap::new();
    for i in 0..20 {
        let dec = d
            .decide(
                &input(&completion("m", &format!("{system} question {i}"))),
                NOW,
                &mut rng,
            )
            .unwrap();
        *shared.entry(dec.endpoints[0]).or_insert(0) += 1;
        // complete at once so load does not push requests away
    }
    assert_eq!(shared.len(), 1, "{shared:?}");
    let mut spread = HashMap::new();
    for i in 0..30 {
        let dec = d
            .decide(
                &input(&completion(
                    "m",
                    &format!("{i} unrelated {}", "q".repeat(100 + i)),
                )),
                NOW,
                &mut rng,
            )
            .unwrap();
        *spread.entry(dec.endpoints[0]).or_insert(0) += 1;
    }
    assert!(spread.len() >= 2, "{spread:?}");
}

#[test]
fn malformed_body_is_400_with_the_reason() {
    let d = Director::new(mk_pool(&[(1, 0, 0.0)]), SchedulerConfig::default());
    let err = d
        .decide(
            &input(b"{\"model\": "),
            NOW,
            &mut SmallRng::seed_from_u64(1),
        )
        .unwrap_err();
    assert_eq!(err.kind.status(), 400);
    assert!(err.message.contains("not valid JSON"), "{}", err.message);
}

#[test]
fn strict_models_refuses_unknown_names_with_404() {
    let ds = mk_pool(&[(1, 0, 0.0)]);
    ds.set_policy(Policy {
        rewrites: vec![Rewrite {
            source: "default/r".into(),
            rules: vec![RewriteRule {
                matches: vec!["llama".into()],
                targets: vec![RewriteTarget {
                    model: "llama-v1".into(),
                    weight: 1,
                }],
            }],
        }],
        ..Default::default()
    });
    let d = Director::new(
        ds,
        SchedulerConfig {
            strict_models: true,
            ..Default::default()
        },
    );
    let mut rng = SmallRng::seed_from_u64(1);
    let err = d
        .decide(&input(&completion("lama", "x")), NOW, &mut rng)
        .unwrap_err();
    assert_eq!(err.kind.status(), 404);
    assert!(
        err.message.contains("\"lama\"") && err.message.contains("known: llama"),
        "{}",
        err.message
    );
    assert_eq!(
        d.decide(&input(&completion("llama", "x")), NOW, &mut rng)
            .unwrap()
            .target_model,
        "llama-v1"
    );
}

#[test]
fn an_endpoint_whose_responses_keep_ending_broken_is_avoided_for_a_while() {
    // Port 1 is the obvious choice on load; port 2 has a queue.
    let ds = mk_pool(&[(1, 0, 0.1), (2, 3, 0.1)]);
    let d = Director::new(ds.clone(), SchedulerConfig::default());
    let mut rng = SmallRng::seed_from_u64(7);
    let body = completion("m", "hello");
    let pick = |d: &Director, rng: &mut SmallRng, now| {
        d.decide(&input(&body), now, rng).unwrap().endpoints[0]
    };
    assert_eq!(pick(&d, &mut rng, NOW), addr(1));
    let one = ds.snapshot().endpoint(addr(1)).unwrap().clone();
    // Four broken responses, then a complete one: the run starts over.
    for _ in 0..4 {
        assert_eq!(one.response_ended(false, NOW), None);
    }
    assert_eq!(one.response_ended(true, NOW), None);
    assert_eq!(pick(&d, &mut rng, NOW), addr(1));
    // Five in a row: avoided while port 2 remains, for ten seconds.
    for _ in 0..4 {
        assert_eq!(one.response_ended(false, NOW), None);
    }
    assert_eq!(
        one.response_ended(false, NOW),
        Some(infergate_core::endpoint::AVOID_FOR)
    );
    assert_eq!(pick(&d, &mut rng, NOW), addr(2));
    assert_eq!(pick(&d, &mut rng, NOW + Duration::from_secs(9)), addr(2));
    // Ten seconds on, with fresh metrics saying the same, port 1 is back.
    let later = NOW + Duration::from_secs(11);
    for (port, waiting) in [(1, 0), (2, 3)] {
        ds.snapshot().endpoint(addr(port)).unwrap().set_metrics(
            EndpointMetrics {
                waiting,
                kv_cache_usage: Some(0.1),
                ..Default::default()
            },
            later,
        );
    }
    assert_eq!(pick(&d, &mut rng, later), addr(1));
    // Avoided, but the only endpoint left: still used rather than refusing.
    ds.set_endpoints(vec![EndpointSpec::new(addr(1), Engine::Vllm)]);
    let again = ds.snapshot().endpoint(addr(1)).unwrap().clone();
    for _ in 0..5 {
        again.response_ended(false, NOW);
    }
    assert!(again.avoided(NOW));
    assert_eq!(pick(&d, &mut rng, NOW), addr(1));
}

#[test]
fn concurrency_detector_sheds_on_what_the_picker_has_in_flight_not_on_scrapes() {
    // Scrapes say both endpoints are idle; only the picker's own count matters.
    let ds = mk_pool(&[(1, 0, 0.0), (2, 0, 0.0)]);
    ds.set_policy(Policy {
        objectives: vec![Objective {
            name: "batch".into(),
            priority: -1,
        }],
        ..Default::default()
    });
    let yaml = "apiVersion: inference.networking.x-k8s.io/v1alpha1\n\
                kind: EndpointPickerConfig\n\
                plugins:\n\
                - type: concurrency-detector\n  parameters: {maxConcurrency: 2}\n\
                - type: queue-scorer\n- type: max-score-picker\n\
                schedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n  - pluginRef: max-score-picker\n";
    let cfg = infergate_api::config::EndpointPickerConfig::from_yaml_str(yaml, "epp.yaml").unwrap();
    let sched = infergate_core::build::scheduler_config(&cfg, Duration::from_secs(2)).unwrap();
    let d = Director::new(ds, sched);
    let mut rng = SmallRng::seed_from_u64(3);
    let body = completion("m", "hello");
    let mut batch = input(&body);
    batch.objective = Some("batch");
    // Three of the pool's four slots in use: sheddable work still goes.
    let mut held: Vec<_> = (0..3)
        .map(|_| d.decide(&input(&body), NOW, &mut rng).unwrap())
        .collect();
    held.push(d.decide(&batch, NOW, &mut rng).unwrap());
    // All four in use (mean 2 of 2): sheddable work is refused, the rest still goes.
    let err = d.decide(&batch, NOW, &mut rng).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Shed);
    held.push(d.decide(&input(&body), NOW, &mut rng).unwrap());
    // Two finish: room again.
    held.truncate(3);
    assert!(d.decide(&batch, NOW, &mut rng).is_ok());
}

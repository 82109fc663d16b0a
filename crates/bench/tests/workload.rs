use infergate_bench::workload::{
    adapter_name, Arrivals, LoraMix, PriorityMix, Shape, Stage, Workload,
};
use infergate_sim::tokens::tokenize;

fn chat(seed: u64) -> Workload {
    Workload {
        shape: Shape::sharegpt(),
        arrivals: Arrivals::Poisson,
        stages: vec![Stage {
            qps: 50.0,
            seconds: 4.0,
        }],
        lora: None,
        priorities: None,
        seed,
    }
}

fn small_prefix(seed: u64) -> Workload {
    Workload {
        shape: Shape::SharedPrefix {
            groups: 4,
            prompts_per_group: 3,
            system_len: 40,
            question_len: 10,
            output_len: 7,
        },
        arrivals: Arrivals::Constant,
        stages: vec![Stage {
            qps: 10.0,
            seconds: 4.0,
        }],
        lora: None,
        priorities: None,
        seed,
    }
}

#[test]
fn same_seed_same_list_different_seed_different() {
    for w in [chat(7), small_prefix(7)] {
        let a = w.generate();
        assert!(!a.is_empty());
        assert_eq!(a, w.generate());
        let other = Workload {
            seed: 8,
            ..w.clone()
        }
        .generate();
        assert_ne!(a, other);
    }
}

#[test]
fn indices_in_arrival_order_and_generate_n_matches_contents() {
    let w = chat(3);
    let reqs = w.generate();
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(r.index, i as u64);
    }
    assert!(reqs.windows(2).all(|p| p[0].at <= p[1].at));
    let closed = w.generate_n(reqs.len());
    for (a, b) in reqs.iter().zip(&closed) {
        assert_eq!(b.at, 0.0);
        assert_eq!((&a.prompt, a.output_tokens), (&b.prompt, b.output_tokens));
    }
}

#[test]
fn poisson_mean_rate_within_five_percent() {
    let w = Workload {
        stages: vec![Stage {
            qps: 200.0,
            seconds: 100.0,
        }],
        shape: Shape::LongContext {
            min_input: 1,
            max_input: 2,
            output: 1,
        },
        ..chat(11)
    };
    let reqs = w.generate();
    let rate = reqs.len() as f64 / 100.0;
    assert!((rate - 200.0).abs() < 10.0, "rate {rate}");
    // Gaps are exponential: their coefficient of variation is about 1.
    let gaps: Vec<f64> = reqs.windows(2).map(|p| p[1].at - p[0].at).collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
    assert!((sd / mean - 1.0).abs() < 0.05, "cv {}", sd / mean);
    assert!(reqs.iter().all(|r| (0.0..100.0).contains(&r.at)));
}

#[test]
fn constant_arrivals_exactly_spaced_and_stages_concatenate() {
    let w = Workload {
        arrivals: Arrivals::Constant,
        stages: vec![
            Stage {
                qps: 4.0,
                seconds: 2.0,
            },
            Stage {
                qps: 10.0,
                seconds: 1.0,
            },
            Stage {
                qps: 0.0,
                seconds: 5.0,
            },
            Stage {
                qps: 2.0,
                seconds: 1.0,
            },
        ],
        ..chat(1)
    };
    let at: Vec<f64> = w.generate().iter().map(|r| r.at).collect();
    let mut want: Vec<f64> = (0..8).map(|k| k as f64 / 4.0).collect();
    want.extend((0..10).map(|k| 2.0 + k as f64 / 10.0));
    want.extend([8.0, 8.5]);
    assert_eq!(at.len(), want.len());
    for (a, b) in at.iter().zip(&want) {
        assert!((a - b).abs() < 1e-9, "{at:?}");
    }
    // Poisson stages concatenate too: each stage's arrivals fall inside it, at its rate.
    let w = Workload {
        arrivals: Arrivals::Poisson,
        stages: vec![
            Stage {
                qps: 100.0,
                seconds: 20.0,
            },
            Stage {
                qps: 300.0,
                seconds: 20.0,
            },
        ],
        ..chat(2)
    };
    let at: Vec<f64> = w.generate().iter().map(|r| r.at).collect();
    let first = at.iter().filter(|&&t| t < 20.0).count() as f64 / 20.0;
    let second = at.iter().filter(|&&t| (20.0..40.0).contains(&t)).count() as f64 / 20.0;
    assert_eq!(at.iter().filter(|&&t| t >= 40.0).count(), 0);
    assert!(
        (first - 100.0).abs() < 10.0 && (second - 300.0).abs() < 20.0,
        "{first} {second}"
    );
}

#[test]
fn sharegpt_means_within_ten_percent() {
    let reqs = chat(5).generate_n(20_000);
    let mean_in = reqs.iter().map(|r| r.prompt_tokens as f64).sum::<f64>() / 20_000.0;
    let mean_out = reqs.iter().map(|r| r.output_tokens as f64).sum::<f64>() / 20_000.0;
    assert!((mean_in / 230.0 - 1.0).abs() < 0.1, "mean input {mean_in}");
    assert!(
        (mean_out / 200.0 - 1.0).abs() < 0.1,
        "mean output {mean_out}"
    );
    assert!(reqs
        .iter()
        .all(|r| (1..=1024).contains(&r.prompt_tokens) && (1..=1024).contains(&r.output_tokens)));
    // Heavy right tail: the median is well below the mean.
    let mut ins: Vec<u32> = reqs.iter().map(|r| r.prompt_tokens).collect();
    ins.sort_unstable();
    assert!((ins[10_000] as f64) < 0.8 * mean_in);
}

#[test]
fn prompt_tokens_match_the_tokenizer() {
    let mut all = chat(9).generate_n(200);
    all.extend(small_prefix(9).generate());
    all.extend(
        Workload {
            shape: Shape::LongContext {
                min_input: 3000,
                max_input: 5000,
                output: 10,
            },
            ..chat(9)
        }
        .generate_n(5),
    );
    for r in &all {
        assert_eq!(tokenize(&r.prompt).len(), r.prompt_tokens as usize);
    }
    assert!(all
        .iter()
        .rev()
        .take(5)
        .all(|r| (3000..=5000).contains(&r.prompt_tokens) && r.output_tokens == 10));
}

fn words(p: &str) -> Vec<&str> {
    // Every word carries its leading space.
    p.split(' ').skip(1).collect()
}

#[test]
fn shared_prefix_groups_share_exactly_the_system_prompt() {
    let reqs = small_prefix(21).generate();
    assert_eq!(reqs.len(), 40);
    // Each full cycle of groups x prompts_per_group sends every group prompts_per_group times.
    for cycle in reqs.chunks(12).filter(|c| c.len() == 12) {
        for g in 0..4 {
            assert_eq!(cycle.iter().filter(|r| r.group == Some(g)).count(), 3);
        }
    }
    for a in &reqs {
        assert_eq!((a.prompt_tokens, a.output_tokens), (50, 7));
        for b in &reqs {
            if a.index == b.index {
                continue;
            }
            let (wa, wb) = (words(&a.prompt), words(&b.prompt));
            assert_eq!(wa.len(), 50);
            if a.group == b.group {
                assert_eq!(wa[..40], wb[..40]);
                assert_ne!(wa[40..], wb[40..], "questions are unique to the request");
            } else {
                assert_ne!(wa[..40], wb[..40]);
            }
        }
    }
    // Another seed gives other system prompts.
    let other = small_prefix(22).generate();
    let sys = |r: &infergate_bench::workload::RequestSpec| words(&r.prompt)[..40].join(" ");
    assert!(reqs.iter().all(|a| other.iter().all(|b| sys(a) != sys(b))));
    // The published shape.
    assert_eq!(
        Shape::inference_perf_shared_prefix(),
        Shape::SharedPrefix {
            groups: 150,
            prompts_per_group: 5,
            system_len: 6000,
            question_len: 1200,
            output_len: 1000
        }
    );
}

#[test]
fn zipf_popularity_decreases_and_shares_are_as_asked() {
    let w = Workload {
        lora: Some(LoraMix {
            adapters: 8,
            zipf_s: 1.0,
            share: 0.6,
        }),
        priorities: Some(PriorityMix { batch_share: 0.3 }),
        shape: Shape::LongContext {
            min_input: 1,
            max_input: 4,
            output: 1,
        },
        ..chat(13)
    };
    let n = 40_000;
    let reqs = w.generate_n(n);
    let with = reqs.iter().filter(|r| r.lora.is_some()).count() as f64 / n as f64;
    assert!((with - 0.6).abs() < 0.02, "lora share {with}");
    let counts: Vec<usize> = (0..8)
        .map(|k| {
            reqs.iter()
                .filter(|r| r.lora.as_deref() == Some(adapter_name(k).as_str()))
                .count()
        })
        .collect();
    assert_eq!(
        counts.iter().sum::<usize>(),
        reqs.iter().filter(|r| r.lora.is_some()).count()
    );
    assert!(counts.windows(2).all(|c| c[0] > c[1]), "{counts:?}");
    // Zipf s=1: rank 0 is twice rank 1 (within noise).
    let ratio = counts[0] as f64 / counts[1] as f64;
    assert!((ratio - 2.0).abs() < 0.2, "{ratio}");

    let batch = reqs
        .iter()
        .filter(|r| r.objective.as_deref() == Some("batch"))
        .count() as f64
        / n as f64;
    assert!((batch - 0.3).abs() < 0.02, "batch share {batch}");
    for r in &reqs {
        match r.objective.as_deref() {
            Some("batch") => assert_eq!(r.priority, -1),
            Some("interactive") => assert_eq!(r.priority, 10),
            o => panic!("{o:?}"),
        }
    }
    let none = Workload {
        priorities: Some(PriorityMix { batch_share: 0.0 }),
        ..w
    }
    .generate_n(100);
    assert!(none
        .iter()
        .all(|r| r.objective.is_none() && r.priority == 0));
}

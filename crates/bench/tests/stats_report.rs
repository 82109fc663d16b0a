use infergate_bench::report::{svg_chart, to_json, to_markdown, RunReport};
use infergate_bench::stats::{by_priority, summarize, Outcome, Summary};
use proptest::prelude::*;

fn ok(index: u64, priority: i32, sent: f64, ttft: f64, e2e: f64, tokens: u32) -> Outcome {
    Outcome {
        index,
        priority,
        sent,
        first_token: Some(sent + ttft),
        done: sent + e2e,
        output_tokens: tokens,
        status: 200,
        shed: false,
        error: None,
        itl: Vec::new(),
    }
}

/// Nearest-rank quantile of a sorted slice, as HDR defines it.
fn exact(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
    sorted[rank - 1]
}

/// HDR at 3 significant figures over microseconds: within 0.1% plus rounding to 1 us.
fn close(hdr: f64, exact: f64) -> bool {
    (hdr - exact).abs() <= exact * 1e-3 + 1e-6
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn percentiles_match_a_sort(
        samples in prop::collection::vec((1e-4f64..30.0, 0.0f64..60.0, 2u32..2000), 1..400)
    ) {
        let outcomes: Vec<Outcome> = samples
            .iter()
            .enumerate()
            .map(|(i, &(ttft, decode, n))| ok(i as u64, 0, i as f64 * 0.01, ttft, ttft + decode, n))
            .collect();
        let s = summarize(&outcomes, 10.0);
        let sorted = |f: &dyn Fn(&Outcome) -> f64| {
            let mut v: Vec<f64> = outcomes.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let ttft = sorted(&|o| o.first_token.unwrap() - o.sent);
        let e2e = sorted(&|o| o.done - o.sent);
        let tpot = sorted(&|o| (o.done - o.first_token.unwrap()) / (o.output_tokens - 1) as f64);
        for (hdr, v, q) in [
            (s.ttft_p50, &ttft, 0.5), (s.ttft_p90, &ttft, 0.9), (s.ttft_p99, &ttft, 0.99),
            (s.e2e_p50, &e2e, 0.5), (s.e2e_p90, &e2e, 0.9), (s.e2e_p99, &e2e, 0.99),
            (s.tpot_p50, &tpot, 0.5), (s.tpot_p90, &tpot, 0.9),
        ] {
            prop_assert!(close(hdr, exact(v, q)), "q {} hdr {} exact {}", q, hdr, exact(v, q));
        }
        prop_assert_eq!(s.ok, outcomes.len() as u64);
        let tokens: u64 = samples.iter().map(|s| s.2 as u64).sum();
        prop_assert!((s.output_tok_per_s - tokens as f64 / 10.0).abs() < 1e-9);
        prop_assert!((s.req_per_s - outcomes.len() as f64 / 10.0).abs() < 1e-9);
    }
}

fn all_finite(s: &Summary) -> bool {
    [
        s.ttft_p50,
        s.ttft_p90,
        s.ttft_p99,
        s.tpot_p50,
        s.tpot_p90,
        s.e2e_p50,
        s.e2e_p90,
        s.e2e_p99,
        s.req_per_s,
        s.output_tok_per_s,
        s.duration,
    ]
    .iter()
    .all(|v| v.is_finite())
}

#[test]
fn empty_input_is_zero_not_nan() {
    for d in [0.0, 10.0] {
        let s = summarize(&[], d);
        assert!(all_finite(&s));
        assert_eq!((s.requests, s.ok, s.errors, s.shed), (0, 0, 0, 0));
        assert_eq!(
            (s.ttft_p90, s.e2e_p99, s.req_per_s, s.itl_p90),
            (0.0, 0.0, 0.0, None)
        );
    }
    assert!(by_priority(&[], 1.0).is_empty());
    // Zero duration: no division by zero.
    let s = summarize(&[ok(0, 0, 0.0, 0.1, 0.5, 1)], 0.0);
    assert!(all_finite(&s));
    assert_eq!(s.tpot_p90, 0.0, "one output token has no TPOT");
}

#[test]
fn shed_and_errors_counted_and_priorities_split() {
    let mut os = vec![
        ok(0, 10, 0.0, 0.1, 1.0, 11),
        ok(1, 10, 0.0, 0.3, 2.0, 11),
        ok(2, -1, 0.0, 0.2, 1.0, 5),
    ];
    os.push(Outcome {
        index: 3,
        priority: -1,
        sent: 1.0,
        done: 1.001,
        status: 429,
        shed: true,
        ..Default::default()
    });
    os.push(Outcome {
        index: 4,
        priority: -1,
        sent: 1.0,
        done: 1.5,
        status: 503,
        error: Some("no capacity".into()),
        ..Default::default()
    });
    os.push(Outcome {
        index: 5,
        priority: 10,
        sent: 1.0,
        first_token: Some(1.1),
        done: 2.0,
        output_tokens: 3,
        status: 0,
        error: Some("reset".into()),
        ..Default::default()
    });
    let s = summarize(&os, 2.0);
    assert_eq!((s.requests, s.ok, s.errors, s.shed), (6, 3, 2, 1));
    assert!((s.req_per_s - 1.5).abs() < 1e-12);
    assert!((s.output_tok_per_s - 13.5).abs() < 1e-12);
    // Failed requests are left out of latencies: the worst TTFT is 0.3 s.
    assert!(close(s.ttft_p99, 0.3));
    let p = by_priority(&os, 2.0);
    assert_eq!(p.keys().copied().collect::<Vec<_>>(), vec![-1, 10]);
    assert_eq!(
        (p[&-1].requests, p[&-1].ok, p[&-1].errors, p[&-1].shed),
        (3, 1, 1, 1)
    );
    assert_eq!(
        (p[&10].requests, p[&10].ok, p[&10].errors, p[&10].shed),
        (3, 2, 1, 0)
    );
    // TPOT of the batch request: (1.0 - 0.2) / 4.
    assert!(close(p[&-1].tpot_p50, 0.2));
}

fn run(router: &str, qps: f64, ttft_p90_ms: f64) -> RunReport {
    let mut os: Vec<Outcome> = (0..10)
        .map(|i| ok(i, 0, i as f64, ttft_p90_ms / 1e3, 1.0, 10))
        .collect();
    os.push(Outcome {
        index: 10,
        priority: 0,
        sent: 0.0,
        done: 0.1,
        status: 429,
        shed: true,
        ..Default::default()
    });
    os.push(Outcome {
        index: 11,
        priority: 0,
        sent: 0.0,
        done: 0.1,
        status: 500,
        error: Some("x".into()),
        ..Default::default()
    });
    os.push(Outcome {
        index: 12,
        priority: 0,
        sent: 0.0,
        done: 0.1,
        status: 500,
        error: Some("x".into()),
        ..Default::default()
    });
    os.push(Outcome {
        index: 13,
        priority: 0,
        sent: 0.0,
        done: 0.1,
        status: 500,
        error: Some("x".into()),
        ..Default::default()
    });
    let summary = summarize(&os, 10.0);
    RunReport {
        router: router.into(),
        workload: "chat".into(),
        stage_qps: qps,
        by_priority: by_priority(&os, 10.0),
        summary,
    }
}

fn runs() -> Vec<RunReport> {
    vec![
        run("round-robin", 200.0, 100.0),
        run("infergate", 100.0, 40.0),
        run("round-robin", 100.0, 80.0),
        run("infergate", 200.0, 60.0),
        run("round-robin", 300.0, 900.0),
    ]
}

#[test]
fn markdown_has_a_row_per_run_with_the_numbers() {
    let md = to_markdown(&runs());
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines.len(), 2 + 5);
    assert!(lines[0].starts_with("| router | QPS | TTFT p50 (ms)"));
    let cells: Vec<&str> = lines[2]
        .split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    // router, QPS, TTFT p50/p90/p99, TPOT p90 ((1.0 - 0.1) s over 9 tokens), tok/s, req/s, errors %, shed %.
    assert_eq!(
        cells,
        vec![
            "round-robin",
            "200",
            "100.0",
            "100.0",
            "100.0",
            "100.0",
            "10",
            "1.0",
            "21.4",
            "7.1"
        ]
    );
    assert!(lines[3].starts_with("| infergate | 100 | 40.0 | 40.0 | 40.0 |"));
}

#[test]
fn json_round_trips_with_the_fields() {
    let v: serde_json::Value = serde_json::from_str(&to_json(&runs())).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 5);
    let r = &arr[0];
    assert_eq!(r["router"], "round-robin");
    assert_eq!(r["workload"], "chat");
    assert_eq!(r["stage_qps"], 200.0);
    assert_eq!(r["summary"]["requests"], 14);
    assert_eq!(r["summary"]["shed"], 1);
    assert_eq!(r["summary"]["errors"], 3);
    assert!((r["summary"]["ttft_p90"].as_f64().unwrap() - 0.1).abs() < 1e-3);
    assert!(r["summary"]["itl_p90"].is_null());
    assert_eq!(r["by_priority"]["0"]["ok"], 10);
}

#[test]
fn svg_is_well_formed_with_one_ordered_line_per_router() {
    let svg = svg_chart(
        &runs(),
        "TTFT p90 <chat>",
        |s| s.ttft_p90 * 1e3,
        "TTFT p90 (ms)",
    );
    assert!(svg.starts_with("<svg"));
    assert!(svg.ends_with("</svg>"));
    assert!(svg.contains("TTFT p90 &lt;chat&gt;"));
    assert_eq!(svg.matches('<').count(), svg.matches('>').count());
    let lines: Vec<&str> = svg.lines().filter(|l| l.starts_with("<polyline")).collect();
    assert_eq!(lines.len(), 2);
    let points = |l: &str| -> Vec<(f64, f64)> {
        let p = l
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        p.split(' ')
            .map(|xy| {
                let (x, y) = xy.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    };
    let rr = points(lines[0]);
    let ig = points(lines[1]);
    assert_eq!((rr.len(), ig.len()), (3, 2));
    assert!(rr.windows(2).all(|p| p[0].0 < p[1].0), "QPS order");
    assert!(ig.windows(2).all(|p| p[0].0 < p[1].0));
    // Higher latency is higher on the chart (smaller y): round robin rises with QPS.
    assert!(rr.windows(2).all(|p| p[0].1 > p[1].1));
    // Empty input still gives a valid document.
    let empty = svg_chart(&[], "t", |s| s.ttft_p90, "y");
    assert!(empty.starts_with("<svg") && empty.ends_with("</svg>") && !empty.contains("<polyline"));
}

#[test]
fn itl_percentile_comes_from_every_recorded_gap() {
    let mut a = ok(0, 0, 0.0, 0.1, 1.0, 4);
    a.itl = vec![0.01, 0.02, 0.03];
    let mut b = ok(1, 0, 0.0, 0.1, 1.0, 8);
    b.itl = vec![0.01; 6];
    b.itl.push(0.5);
    // 10 gaps: 8 small, 0.03, 0.5; the 90th percentile is the 9th smallest.
    let s = summarize(&[a.clone(), b], 1.0);
    assert!(
        close(s.itl_p90.expect("gaps recorded"), 0.03),
        "{:?}",
        s.itl_p90
    );
    a.itl.clear();
    assert_eq!(summarize(&[a], 1.0).itl_p90, None);
}

#[test]
fn svg_switches_to_a_log_axis_when_values_span_decades() {
    let runs = vec![
        run("rr", 10.0, 20.0),
        run("rr", 20.0, 20_000.0),
        run("ig", 10.0, 15.0),
        run("ig", 20.0, 30.0),
    ];
    let svg = svg_chart(&runs, "t", |s| s.ttft_p90 * 1e3, "TTFT p90 (ms)");
    assert!(svg.contains("TTFT p90 (ms) (log scale)"), "{svg}");
    // Decade ticks from 10 to 100,000 (20,000 rounds up to the next decade).
    for tick in [">10<", ">100<", ">1000<", ">10000<", ">100000<"] {
        assert!(svg.contains(tick), "missing tick {tick}");
    }
    // The small values are not squashed onto the axis: 15 ms and 30 ms sit apart.
    let ys: Vec<f64> = svg
        .lines()
        .filter(|l| l.starts_with("<circle"))
        .filter_map(|l| l.split("cy=\"").nth(1)?.split('"').next()?.parse().ok())
        .collect();
    assert_eq!(ys.len(), 4);
    assert!((ys[2] - ys[3]).abs() > 20.0, "{ys:?}");
    // A narrow range keeps the linear axis.
    let lin = svg_chart(&runs[2..], "t", |s| s.ttft_p90 * 1e3, "TTFT p90 (ms)");
    assert!(!lin.contains("log scale"));
}

//! Reports of a set of runs: JSON, a Markdown table, and an SVG chart of a latency metric
//! against QPS (one line per router, like the GIE blog's charts).

use crate::stats::Summary;
use std::collections::BTreeMap;
use std::fmt::Write;

/// One run: a router under one workload at one QPS stage.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunReport {
    pub router: String,
    pub workload: String,
    pub stage_qps: f64,
    pub summary: Summary,
    pub by_priority: BTreeMap<i32, Summary>,
}

/// The runs as pretty-printed JSON (an array of [`RunReport`]).
pub fn to_json(runs: &[RunReport]) -> String {
    serde_json::to_string_pretty(runs).expect("reports serialise")
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}

/// A Markdown table: router, QPS, TTFT p50/p90/p99 (ms), TPOT p90 (ms), output tok/s,
/// req/s, errors %, shed %.
pub fn to_markdown(runs: &[RunReport]) -> String {
    let mut s = String::from(
        "| router | QPS | TTFT p50 (ms) | TTFT p90 (ms) | TTFT p99 (ms) | TPOT p90 (ms) | output tok/s | req/s | errors % | shed % |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in runs {
        let m = &r.summary;
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} |",
            r.router.replace('|', "\\|"),
            r.stage_qps,
            m.ttft_p50 * 1e3,
            m.ttft_p90 * 1e3,
            m.ttft_p99 * 1e3,
            m.tpot_p90 * 1e3,
            m.output_tok_per_s,
            m.req_per_s,
            pct(m.errors, m.requests),
            pct(m.shed, m.requests),
        );
    }
    s
}

/// What a real-time scenario measured of the router process itself during one stage
/// (`infergate bench scenario`, infergate's own routers only: `serve` and `epp`; every
/// field is absent for round robin and the peer routers, and on the virtual clock).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct RouterStageStats {
    /// Peak resident memory (VmRSS of /proc/PID/status, sampled once per second) of the
    /// router process during the stage, in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_rss_mb_peak: Option<f64>,
    /// The router's resident memory at the end of the stage, in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_rss_mb_end: Option<f64>,
    /// Envoy's peak resident memory during the stage, in MiB (epp behind Envoy only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envoy_rss_mb_peak: Option<f64>,
    /// Envoy's resident memory at the end of the stage, in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envoy_rss_mb_end: Option<f64>,
    /// Median time the router took to schedule one request during the stage, in
    /// microseconds, from the difference of its
    /// `inference_extension_scheduler_e2e_duration_seconds` histogram between the stage's
    /// start and end: the upper bound of the bucket the quantile falls in (buckets double
    /// from 1 us, so this is at most 2x the true value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler_p50_us: Option<f64>,
    /// The 99th percentile of the same, in microseconds (same bucket upper bound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler_p99_us: Option<f64>,
    /// Scheduling decisions the router recorded during the stage (the histogram's count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler_decisions: Option<u64>,
}

impl RouterStageStats {
    pub fn is_empty(&self) -> bool {
        *self == RouterStageStats::default()
    }
}

#[derive(serde::Serialize)]
struct RowWithStats<'a> {
    #[serde(flatten)]
    run: &'a RunReport,
    #[serde(flatten)]
    stats: &'a RouterStageStats,
}

/// Like [`to_json`], with each run's [`RouterStageStats`] (`stats[i]` for `runs[i]`;
/// missing or empty ones add nothing) as extra fields of the run's object.
pub fn to_json_with_stats(runs: &[RunReport], stats: &[RouterStageStats]) -> String {
    let none = RouterStageStats::default();
    let rows: Vec<RowWithStats> = runs
        .iter()
        .enumerate()
        .map(|(i, run)| RowWithStats {
            run,
            stats: stats.get(i).unwrap_or(&none),
        })
        .collect();
    serde_json::to_string_pretty(&rows).expect("reports serialise")
}

/// A Markdown table of the runs that have [`RouterStageStats`]: router, QPS, router RSS
/// peak and end (MiB), Envoy RSS peak / end (MiB), scheduling p50 / p99 (us, bucket upper
/// bounds) and decisions; "-" where a figure is missing. Empty when no run has any.
pub fn router_stats_markdown(runs: &[RunReport], stats: &[RouterStageStats]) -> String {
    if stats.iter().all(RouterStageStats::is_empty) {
        return String::new();
    }
    let mb = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    let mut s = String::from(
        "| router | QPS | router RSS peak (MiB) | router RSS end (MiB) | Envoy RSS peak / end (MiB) | scheduling p50 (us) | scheduling p99 (us) | decisions |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (r, st) in runs.iter().zip(stats) {
        if st.is_empty() {
            continue;
        }
        let envoy = if st.envoy_rss_mb_peak.is_some() || st.envoy_rss_mb_end.is_some() {
            format!("{} / {}", mb(st.envoy_rss_mb_peak), mb(st.envoy_rss_mb_end))
        } else {
            "-".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.router.replace('|', "\\|"),
            r.stage_qps,
            mb(st.router_rss_mb_peak),
            mb(st.router_rss_mb_end),
            envoy,
            us(st.scheduler_p50_us),
            us(st.scheduler_p99_us),
            st.scheduler_decisions
                .map_or("-".to_owned(), |n| n.to_string()),
        );
    }
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis step (1, 2 or 5 x 10^k) giving about `ticks` intervals over `span`.
fn nice_step(span: f64, ticks: f64) -> f64 {
    let raw = (span / ticks).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    mag * if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    }
}

fn fmt_tick(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// An SVG line chart of `metric` (e.g. TTFT p90 in ms) against QPS, one line per router,
/// like the GIE blog's charts; self-contained SVG text, no dependencies.
///
/// Routers appear in the order of their first run; each line's points are sorted by QPS.
/// Non-finite metric values are left out. When the values span more than 50x (a router
/// past saturation next to one that is not), the y axis is logarithmic, with decade ticks,
/// so both stay readable; the axis label says so.
pub fn svg_chart(
    runs: &[RunReport],
    title: &str,
    metric: fn(&Summary) -> f64,
    y_label: &str,
) -> String {
    let mut routers: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    for r in runs {
        let y = metric(&r.summary);
        if !y.is_finite() || !r.stage_qps.is_finite() {
            continue;
        }
        match routers.iter_mut().find(|(n, _)| *n == r.router) {
            Some((_, pts)) => pts.push((r.stage_qps, y)),
            None => routers.push((&r.router, vec![(r.stage_qps, y)])),
        }
    }
    for (_, pts) in &mut routers {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let all = routers.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    let mut y_min_pos = f64::INFINITY;
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
        if y > 0.0 {
            y_min_pos = y_min_pos.min(y);
        }
    }
    let log = y_min_pos.is_finite() && y1 / y_min_pos > 50.0;
    let (d0, d1) = if log {
        (y_min_pos.log10().floor(), y1.log10().ceil())
    } else {
        (0.0, 1.0)
    };
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    let xs = nice_step((x1 - x0).max(1e-9), 6.0);
    let (x0, x1) = ((x0 / xs).floor() * xs, ((x1 / xs).ceil() * xs).max(x0 + xs));
    let ys = nice_step(if y1 > 0.0 { y1 } else { 1.0 }, 5.0);
    let y1 = ((y1 / ys).ceil() * ys).max(ys);

    let (w, h) = (760.0, 440.0);
    let (l, r, t, b) = (70.0, 190.0, 40.0, 50.0);
    let (pw, ph) = (w - l - r, h - t - b);
    let px = |x: f64| l + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| {
        if log {
            let v = y.max(10f64.powf(d0)).log10();
            t + ph - (v - d0) / (d1 - d0) * ph
        } else {
            t + ph - y / y1 * ph
        }
    };
    let y_label = if log {
        format!("{y_label} (log scale)")
    } else {
        y_label.to_owned()
    };
    let y_ticks: Vec<f64> = if log {
        (d0 as i32..=d1 as i32).map(|k| 10f64.powi(k)).collect()
    } else {
        let n = (y1 / ys).round() as usize;
        (0..=n).map(|k| k as f64 * ys).collect()
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        l + pw / 2.0,
        esc(title)
    );
    // Grid and ticks.
    for &v in &y_ticks {
        let y = py(v);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            l + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            l - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
    }
    let mut v = x0;
    while v <= x1 + xs / 2.0 {
        let x = px(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/>"##,
            t + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            t + ph + 18.0,
            fmt_tick(v)
        );
        v += xs;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">QPS</text>"#,
        l + pw / 2.0,
        h - 10.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        t + ph / 2.0,
        t + ph / 2.0,
        esc(&y_label)
    );
    // One line per router, and the legend.
    for (i, (name, pts)) in routers.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let points: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        for &(x, y) in pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                px(x),
                py(y)
            );
        }
        let ly = t + 10.0 + i as f64 * 20.0;
        let lx = l + pw + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"/>"#,
            lx + 20.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}</text>"#,
            lx + 26.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(router: &str) -> RunReport {
        RunReport {
            router: router.into(),
            workload: "chat".into(),
            stage_qps: 2.0,
            summary: crate::stats::summarize(&[], 1.0),
            by_priority: BTreeMap::new(),
        }
    }

    #[test]
    fn router_stats_are_extra_fields_and_a_second_table() {
        let runs = [run("round-robin"), run("infergate-epp-envoy")];
        let stats = [
            RouterStageStats::default(),
            RouterStageStats {
                router_rss_mb_peak: Some(31.25),
                router_rss_mb_end: Some(30.0),
                envoy_rss_mb_peak: Some(60.0),
                envoy_rss_mb_end: Some(59.5),
                scheduler_p50_us: Some(32.0),
                scheduler_p99_us: Some(128.0),
                scheduler_decisions: Some(10),
            },
        ];
        let json: serde_json::Value =
            serde_json::from_str(&to_json_with_stats(&runs, &stats)).unwrap();
        assert!(json[0].get("router_rss_mb_peak").is_none(), "{json}");
        assert_eq!(json[0]["router"], "round-robin");
        assert_eq!(json[1]["router_rss_mb_peak"], 31.25);
        assert_eq!(json[1]["scheduler_decisions"], 10);
        assert_eq!(json[1]["stage_qps"], 2.0);
        // Without stats, the same as to_json.
        assert_eq!(to_json_with_stats(&runs, &[]), to_json(&runs));

        let md = router_stats_markdown(&runs, &stats);
        assert_eq!(md.lines().count(), 3, "{md}");
        assert!(
            md.contains("| infergate-epp-envoy | 2 | 31.2 | 30.0 | 60.0 / 59.5 | 32 | 128 | 10 |"),
            "{md}"
        );
        assert_eq!(router_stats_markdown(&runs, &stats[..1]), "");
    }
}

//! `infergate bench` as a user runs it: against `infergate sim` replicas, and against a URL
//! where nothing listens.

mod common;

use std::process::Command;

use common::Sim;

fn out_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "infergate-bench-cli-{tag}-{}-{}",
        std::process::id(),
        infergate_testkit::free_port()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn bench_against_two_sim_replicas_writes_a_report() {
    let sim = Sim::start(&["--port", "0", "--replicas", "2"], 2);
    let out = out_dir("ok");
    let res = Command::new(env!("CARGO_BIN_EXE_infergate"))
        .arg("bench")
        .args(["--url", &sim.url(0), "--url", &sim.url(1)])
        .args(["--qps", "5,8", "--stage-seconds", "2", "--seed", "4"])
        .args(["--max-seconds", "60"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run infergate bench");
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "exit {:?}\n{stderr}", res.status);

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let rows = json.as_array().expect("an array of runs");
    assert_eq!(rows.len(), 2, "one row per QPS stage: {json}");
    for (row, qps) in rows.iter().zip([5.0, 8.0]) {
        assert_eq!(row["stage_qps"], qps);
        assert_eq!(row["router"], "round-robin x2");
        assert_eq!(row["workload"], "chat");
        let s = &row["summary"];
        assert!(s["ok"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(s["errors"], 0, "{row}");
        assert_eq!(s["ok"], s["requests"], "{row}");
        assert!(s["ttft_p50"].as_f64().unwrap() > 0.0, "{row}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.starts_with("| router | QPS |"), "{md}");
    assert_eq!(md.lines().count(), 4, "{md}");
    // The table is printed too.
    assert!(stdout.contains(&md), "stdout:\n{stdout}");
    let svg = std::fs::read_to_string(out.join("ttft-p90.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{svg}");
    // Not a terminal: no progress bar drawing on stderr.
    assert!(!stderr.contains('\r'), "{stderr}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn unreachable_url_exits_2_naming_it() {
    let port = infergate_testkit::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let out = out_dir("down");
    let res = Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(["bench", "--url", &url, "--qps", "1", "--stage-seconds", "1"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run infergate bench");
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&url), "{stderr}");
    assert!(stderr.contains("infergate sim"), "{stderr}");
    assert!(!out.exists(), "no report for a run that did not start");
}

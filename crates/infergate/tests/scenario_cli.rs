//! `infergate bench scenario FILE` as a user runs it: a tiny scenario in real time (real
//! processes, torn down afterwards), the same on the virtual clock, and files it refuses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "infergate-scenario-cli-{tag}-{}-{}",
        std::process::id(),
        infergate_testkit::free_port()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_scenario(dir: &Path, yaml: &str, extra: &[&str]) -> Output {
    let file = dir.join("scenario.yaml");
    std::fs::write(&file, yaml).unwrap();
    Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(["bench", "scenario"])
        .arg(&file)
        .arg("--out")
        .arg(dir.join("out"))
        .args(extra)
        .output()
        .expect("run infergate bench scenario")
}

fn rows_of(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read(dir.join("out/report.json")).expect("report.json written");
    let json: serde_json::Value = serde_json::from_slice(&text).unwrap();
    json.as_array().expect("an array of runs").clone()
}

fn assert_routers_ok(rows: &[serde_json::Value], routers: &[&str]) {
    for r in routers {
        let mine: Vec<_> = rows.iter().filter(|row| row["router"] == *r).collect();
        assert!(!mine.is_empty(), "no row for {r}: {rows:?}");
        for row in mine {
            let s = &row["summary"];
            assert!(s["ok"].as_u64().unwrap() > 0, "{row}");
            assert_eq!(s["errors"], 0, "{row}");
        }
    }
}

#[test]
fn real_time_scenario_compares_two_routers_and_cleans_up() {
    let dir = scratch("real");
    let res = run_scenario(
        &dir,
        // Priority traffic: requests carry the `interactive` and `batch` objectives, which
        // the router must know (it gets them in its pool file), or it would refuse them.
        "replicas: 2\n\
         workload:\n  kind: priority\n\
         qps: [3]\n\
         stage_seconds: 3\n\
         max_seconds: 30\n\
         routers: [round-robin, infergate]\n\
         picker_config: |\n  \
           apiVersion: inference.networking.x-k8s.io/v1alpha1\n  \
           kind: EndpointPickerConfig\n  \
           plugins:\n  \
           - type: queue-scorer\n  \
           - type: max-score-picker\n  \
           schedulingProfiles:\n  \
           - name: default\n    \
             plugins:\n    \
             - pluginRef: queue-scorer\n    \
             - pluginRef: max-score-picker\n",
        &[],
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "exit {:?}\n{stderr}", res.status);
    let rows = rows_of(&dir);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_routers_ok(&rows, &["round-robin", "infergate"]);
    // The router's own figures: for infergate, not for round robin.
    for row in &rows {
        if row["router"] == "infergate" {
            assert!(row["router_rss_mb_peak"].as_f64().unwrap() > 1.0, "{row}");
            assert!(row["router_rss_mb_end"].as_f64().unwrap() > 1.0, "{row}");
            assert!(row["scheduler_decisions"].as_u64().unwrap() > 0, "{row}");
            assert!(row["scheduler_p50_us"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["scheduler_p99_us"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row.get("envoy_rss_mb_peak").is_none(), "{row}");
        } else {
            assert!(row.get("router_rss_mb_peak").is_none(), "{row}");
            assert!(row.get("scheduler_decisions").is_none(), "{row}");
        }
    }
    assert!(stdout.contains("scheduling p99 (us)"), "{stdout}");
    // The picker config reached the router as a file.
    let cfg = std::fs::read_to_string(dir.join("out/logs/picker-config.yaml")).unwrap();
    assert!(cfg.contains("queue-scorer"), "{cfg}");
    // The table is printed, one row per router.
    assert!(stdout.contains("| round-robin | 3 |"), "{stdout}");
    assert!(stdout.contains("| infergate | 3 |"), "{stdout}");
    let svg = std::fs::read_to_string(dir.join("out/ttft-p90.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");

    // Every process the run started is gone: the addresses it used are free again.
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/run.json")).unwrap()).unwrap();
    let mut addrs = Vec::new();
    for r in run["routers"].as_array().unwrap() {
        assert_eq!(r["status"], "ran", "{r}");
        for a in r["addresses"].as_array().unwrap() {
            addrs.push(a.as_str().unwrap().parse::<std::net::SocketAddr>().unwrap());
        }
    }
    // 2 replicas for round robin; 2 replicas and the gateway for infergate.
    assert_eq!(addrs.len(), 5, "{run}");
    for a in addrs {
        assert!(
            std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_millis(300))
                .is_err(),
            "something still listens on {a}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn virtual_scenario_runs_sixteen_replicas() {
    let dir = scratch("virtual");
    let res = run_scenario(
        &dir,
        "name: virtual check\n\
         replicas: 16\n\
         workload: {kind: prefix, groups: 8, prompts_per_group: 4, system_len: 1000, question_len: 50, output_len: 50}\n\
         qps: [20, 40]\n\
         stage_seconds: 5\n\
         routers: [round-robin, infergate, sglang-cache-aware]\n",
        &["--virtual"],
    );
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "exit {:?}\n{stderr}", res.status);
    let rows = rows_of(&dir);
    assert_eq!(
        rows.len(),
        4,
        "two stages for each of two routers: {rows:?}"
    );
    assert_routers_ok(&rows, &["round-robin", "infergate"]);
    // The peer router has no virtual-clock model: skipped, and said so.
    assert!(stderr.contains("sglang-cache-aware: skipped"), "{stderr}");
    let md = std::fs::read_to_string(dir.join("out/report.md")).unwrap();
    assert!(md.contains("sglang-cache-aware skipped"), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_scenarios_are_refused_with_the_reason() {
    let dir = scratch("bad");
    let res = run_scenario(
        &dir,
        "replicas: 2\nqps: [1]\nstage_seconds: 1\nrouters: [round-robin, nginx]\n",
        &[],
    );
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("nginx"), "{stderr}");
    assert!(
        stderr.contains("round-robin"),
        "lists the known routers: {stderr}"
    );

    let res = run_scenario(&dir, "replicas: [oops\nqps: 1\n", &[]);
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("scenario.yaml"), "names the file: {stderr}");

    let res = run_scenario(
        &dir,
        "replicas: 2\nqps: [1]\nstage_seconds: 1\nroutrs: [round-robin]\n",
        &[],
    );
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("routrs"),
        "names the unknown field: {stderr}"
    );

    let res = run_scenario(
        &dir,
        "replicas: 2\nqps: [1]\nstage_seconds: 1\nrouters: [round-robin]\n",
        &["--routers", "round-robin,bogus"],
    );
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("bogus"), "{stderr}");

    let res = run_scenario(
        &dir,
        "replicas: 2\nslow_replicas: 3\nqps: [1]\nstage_seconds: 1\nrouters: [round-robin]\n",
        &["--virtual"],
    );
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("slow_replicas (3) cannot exceed replicas (2)"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn virtual_mixed_gpu_pool_favours_the_router_that_learns_speeds() {
    // Half the replicas twice as slow, past the point where round robin's equal shares
    // swamp the slow half: infergate's p90 TTFT is far below round robin's.
    let dir = scratch("mixed");
    let res = run_scenario(
        &dir,
        "replicas: 4\nslow_replicas: 2\nslowdown: 2.0\nprofile: llama3-70b-4xh100\n\
         engine: {max_num_seqs: 32}\nworkload: {kind: chat}\nqps: [20]\nstage_seconds: 20\n\
         routers: [round-robin, infergate]\n",
        &["--virtual"],
    );
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "exit {:?}\n{stderr}", res.status);
    let rows = rows_of(&dir);
    let p90 = |router: &str| {
        rows.iter()
            .find(|r| r["router"] == router)
            .and_then(|r| r["summary"]["ttft_p90"].as_f64())
            .expect("row")
    };
    let (rr, ig) = (p90("round-robin"), p90("infergate"));
    assert!(ig * 4.0 < rr, "infergate {ig} s vs round robin {rr} s");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_picker_config_the_router_refuses_stops_the_scenario_before_it_starts() {
    let dir = scratch("badcfg");
    let t = std::time::Instant::now();
    let res = run_scenario(
        &dir,
        "replicas: 2\nqps: [1]\nstage_seconds: 30\n\
         routers: [round-robin, infergate]\n\
         picker_config: |\n  \
           apiVersion: inference.networking.x-k8s.io/v1alpha1\n  \
           kind: EndpointPickerConfig\n  \
           plugins:\n  \
           - type: no-such-scorer\n",
        &[],
    );
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{stderr}");
    assert!(stderr.contains("picker_config"), "{stderr}");
    assert!(
        stderr.contains("no-such-scorer"),
        "the router's own error: {stderr}"
    );
    // Before any router ran (round robin's 30 s stage included).
    assert!(t.elapsed() < std::time::Duration::from_secs(20), "{stderr}");
    assert!(!dir.join("out/report.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

//! `infergate sim` as a user runs it: the real binary, replicas on real ports, and the real
//! `infergate epp` scraping them.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{eventually, Epp, Sim};
use infergate_testkit::{free_port, get, post_json, post_json_stream};
use serde_json::{json, Value};

/// A port `p` such that `p` and `p + 1` are free a moment ago.
fn two_free_ports() -> u16 {
    loop {
        let p = free_port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

fn completion(model: &str, max_tokens: u32) -> String {
    json!({"model": model, "prompt": "Say something.", "max_tokens": max_tokens, "ignore_eos": true}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_listen_on_consecutive_ports_and_each_answers() {
    let port = two_free_ports();
    let sim = Sim::start(
        &[
            "--port",
            &port.to_string(),
            "--replicas",
            "2",
            "--time-scale",
            "20",
            "--served-model-name",
            "m",
        ],
        2,
    );
    assert_eq!(
        sim.replicas.iter().map(|a| a.port()).collect::<Vec<_>>(),
        vec![port, port + 1]
    );
    let mut texts = Vec::new();
    for i in 0..2 {
        let (status, _, body) = get(&sim.url(i), "/v1/models").await.unwrap();
        assert_eq!(status, 200);
        let models: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(models["data"][0]["id"], "m");
        let (status, _, body) = post_json(&sim.url(i), "/v1/completions", &[], completion("m", 8))
            .await
            .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 8);
        texts.push(v["choices"][0]["text"].as_str().unwrap().to_owned());
    }
    assert_ne!(texts[0], texts[1], "replicas must be seeded differently");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_simulator_cleanly() {
    let mut sim = Sim::start(&["--port", "0"], 1);
    let (status, _, _) = get(&sim.url(0), "/health").await.unwrap();
    assert_eq!(status, 200);
    let pid = sim.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = sim.child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(exited.expect("still running 5 s after SIGTERM").success());
}

#[test]
fn unknown_profile_is_refused_with_the_known_names() {
    let out = Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(["sim", "--profile", "llama3-8b-a100"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"llama3-8b-a100\" is unknown") && err.contains("llama3-8b-h100"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_fault_makes_the_port_refuse_connections() {
    let sim = Sim::start(&["--port", "0", "--fault-exit-after", "0.3"], 1);
    let (status, _, _) = get(&sim.url(0), "/health").await.unwrap();
    assert_eq!(status, 200);
    let addr = sim.replicas[0];
    let refused = eventually(Duration::from_secs(3), || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    assert!(refused, "{addr} still accepts connections");
}

/// The value of the picker's per-pod queue gauge for the endpoint on `port`.
fn pod_queue(page: &str, port: u16) -> Option<f64> {
    page.lines()
        .filter(|l| l.starts_with("inference_pool_per_pod_queue_size{"))
        .find(|l| l.contains(&format!(":{port}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_picker_reads_queue_and_kv_from_the_simulators_metrics() {
    // One request at a time per replica, at real speed: further requests queue.
    let sim = Sim::start(
        &[
            "--port",
            "0",
            "--replicas",
            "2",
            "--max-num-seqs",
            "1",
            "--served-model-name",
            "m",
        ],
        2,
    );
    let endpoints = format!("{},{}", sim.replicas[0], sim.replicas[1]);
    let epp = Epp::start(&["--endpoints".into(), endpoints]).await;

    // Three long answers straight to replica 0: one runs, two wait.
    let mut streams = Vec::new();
    let long = json!({"model": "m", "prompt": "Write forever.", "max_tokens": 50_000, "ignore_eos": true, "stream": true}).to_string();
    for _ in 0..3 {
        let (status, _, s) = post_json_stream(&sim.url(0), "/v1/completions", &[], long.clone())
            .await
            .unwrap();
        assert_eq!(status, 200);
        streams.push(s);
    }
    let (p0, p1) = (sim.replicas[0].port(), sim.replicas[1].port());
    let mut page = String::new();
    for _ in 0..40 {
        page = epp.metrics_text().await;
        if pod_queue(&page, p0) == Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        pod_queue(&page, p0),
        Some(2.0),
        "picker did not see replica 0's queue:\n{page}"
    );
    assert_eq!(pod_queue(&page, p1), Some(0.0), "{page}");
    let kv = page
        .lines()
        .find(|l| l.starts_with("inference_pool_average_kv_cache_utilization{"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .expect("average KV gauge");
    assert!(kv > 0.0, "the running request holds KV blocks: {kv}");
    assert!(
        !epp.log_text().contains("metrics scrape failing"),
        "{}",
        epp.log_text()
    );
}

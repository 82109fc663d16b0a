//! How fast a Kubernetes change reaches the traffic (issue 6's Measure): from a Pod's
//! Ready event at the API server to its first request through Envoy, and from its deletion
//! to the last request it is sent.
//!
//! A scripted API server (`infergate_testkit::kube_api`; no real one can run here) serves
//! the InferencePool and its Pods to the release `infergate epp` in Kubernetes mode, behind
//! a real Envoy. Pod a (127.0.0.2) is always Ready; pod b (127.0.0.3, same port) cycles:
//! Ready event, traffic, DELETED event, re-added unready. Four client tasks keep requests
//! flowing through Envoy the whole time and note, per request, when it was sent, when it
//! was answered and which Pod served it. Per cycle:
//! - ready -> traffic: from the MODIFIED (Ready) event to the answer of b's first request
//!   (an upper bound: the request was routed somewhat earlier);
//! - delete -> no traffic: from the DELETED event to the send time of the last request b
//!   served (0 when nothing sent after the event reached b).
//!
//! `--other-pods N` adds N Pods of other pools to the namespace and `--other-events R`
//! sends R events per second about them meanwhile, to see whether a busy namespace slows
//! the pool's own updates.
//!
//! ```sh
//! cargo build --release -p infergate --bin infergate --example k8s_propagation
//! target/release/examples/k8s_propagation [--cycles 20] [--other-pods 0] [--other-events 0]
//! ```

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infergate_testkit::kube_api::{
    kubeconfig, pod, pool, serve, FakeKubeApi, NS, OBJECTIVES, PODS, POOLS, REWRITES,
};
use infergate_testkit::{
    free_port, wait_for_port, Envoy, EnvoyConfig, FakeModelServer, HttpClient,
};

/// One answered request: sent and answered (since the start) and who served it.
struct Done {
    sent: Duration,
    answered: Duration,
    b: bool,
}

fn flag(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn other_pod(i: u64, rv: u64, ready: bool) -> serde_json::Value {
    let ip = format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255);
    let mut p = pod(&format!("other-{i}"), &ip, ready, rv as u32);
    p["metadata"]["labels"]["app"] = format!("other-{}", i % 1000).into();
    p
}

fn stats(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    println!(
        "{name}: n {}, p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        v.len(),
        q(0.5),
        q(0.9),
        q(1.0)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cycles = flag("--cycles", 20);
    let others = flag("--other-pods", 0);
    let other_rate = flag("--other-events", 0);

    let port = free_port();
    let a = FakeModelServer::start_on("pod-a", ([127, 0, 0, 2], port).into()).await?;
    let b = FakeModelServer::start_on("pod-b", ([127, 0, 0, 3], port).into()).await?;
    let api = FakeKubeApi::default();
    api.set_list(POOLS, vec![pool(port)]);
    let mut pods = vec![
        pod("a", "127.0.0.2", true, 10),
        pod("b", "127.0.0.3", false, 10),
    ];
    pods.extend((0..others).map(|i| other_pod(i, 10, true)));
    api.set_list(PODS, pods);
    api.set_list(OBJECTIVES, vec![]);
    api.set_list(REWRITES, vec![]);
    let (api_addr, _server) = serve(api.clone()).await;

    let dir = std::env::temp_dir().join(format!("k8s_propagation-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("kubeconfig");
    std::fs::write(&cfg, kubeconfig(api_addr, NS))?;
    let bin = infergate_testkit::release_infergate()?;
    let (grpc, health, metrics) = (free_port(), free_port(), free_port());
    let mut child = Command::new(&bin)
        .args(["epp", "--listen-address", "127.0.0.1"])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--grpc-health-port", &health.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .args(["--pool-namespace", NS, "--pool-name", "pool"])
        .arg("--ha-enable-leader-election=false")
        .env("KUBECONFIG", &cfg)
        .env("INFERGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("epp.log"))?)
        .spawn()?;
    let grpc_addr = ([127, 0, 0, 1], grpc).into();
    wait_for_port(grpc_addr, Duration::from_secs(20)).await?;
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .ext_proc(grpc_addr)
            .pool([a.addr(), b.addr()]),
    )
    .await?;
    // Let the first list land.
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let t0 = Instant::now();
    let log = Arc::new(Mutex::new(Vec::<Done>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (log, stop, url) = (log.clone(), stop.clone(), envoy.url());
        clients.push(tokio::spawn(async move {
            let http = HttpClient::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let body = format!(
                    r#"{{"model":"fake-model","prompt":"client {c} request {i}","max_tokens":2}}"#
                );
                let sent = t0.elapsed();
                if let Ok((s, h, _)) = http.post_json(&url, "/v1/completions", &[], body).await {
                    if s == 200 {
                        let b = h.get("x-served-by").is_some_and(|v| v == "pod-b");
                        log.lock().unwrap().push(Done {
                            sent,
                            answered: t0.elapsed(),
                            b,
                        });
                    }
                }
            }
        }));
    }
    let noise = (other_rate > 0).then(|| {
        let api = api.clone();
        tokio::spawn(async move {
            let mut rv = 100;
            let gap = Duration::from_secs_f64(1.0 / other_rate as f64);
            let mut next = Instant::now();
            loop {
                rv += 1;
                api.event(
                    PODS,
                    "MODIFIED",
                    other_pod(rv % others.max(1), rv, rv % 2 == 0),
                );
                next += gap;
                tokio::time::sleep_until(next.into()).await;
            }
        })
    });

    let (mut ready_ms, mut gone_ms) = (Vec::new(), Vec::new());
    let mut rv = 20;
    for _ in 0..cycles {
        rv += 1;
        let ready_at = t0.elapsed();
        api.event(PODS, "MODIFIED", pod("b", "127.0.0.3", true, rv));
        let first = loop {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let log = log.lock().unwrap();
            if let Some(d) = log.iter().find(|d| d.b && d.sent >= ready_at) {
                break d.answered;
            }
            anyhow::ensure!(
                t0.elapsed() - ready_at < Duration::from_secs(10),
                "b never served"
            );
        };
        ready_ms.push((first - ready_at).as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(200)).await;

        rv += 1;
        let deleted_at = t0.elapsed();
        api.event(PODS, "DELETED", pod("b", "127.0.0.3", true, rv));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let last_b = log
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d.b)
            .map(|d| d.sent)
            .max()
            .unwrap_or_default();
        gone_ms.push(last_b.saturating_sub(deleted_at).as_secs_f64() * 1e3);
        rv += 1;
        api.event(PODS, "ADDED", pod("b", "127.0.0.3", false, rv));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    if let Some(n) = noise {
        n.abort();
    }
    let total = log.lock().unwrap().len();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "k8s_propagation: {cycles} cycles, {others} other Pods, {other_rate} other events/s, {total} requests in {secs:.1} s ({:.0} req/s through Envoy)",
        total as f64 / secs
    );
    stats("Pod Ready event -> its first request answered", ready_ms);
    stats("Pod DELETED event -> last request sent to it", gone_ms);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

//! What Envoy 1.40 does with the picker's fallback endpoints when a replica dies: real
//! `infergate sim` processes (one replica each), the real `infergate epp`, real Envoy.
//!
//! - With the `override_host` load-balancing policy on a cluster of the pool
//!   ([`PickedCluster::OverrideHost`]) and a route retry policy, a request in flight to a
//!   replica that is killed is retried on the picker's next endpoint: the client gets 200.
//! - With the `ORIGINAL_DST` cluster most gateways use, the same retry policy retries the
//!   same, dead, address: the client gets 503. And that cluster cannot parse a
//!   `primary,fallback` list at all.
//! - When the picker is down and Envoy fails closed, the client gets a JSON error naming
//!   the picker, not an empty body.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Epp, Sim};
use futures::future::join_all;
use infergate_testkit::envoy::{PickedCluster, RetryPolicy, PICKER_UNAVAILABLE_TYPE};
use infergate_testkit::{post_json, Envoy, EnvoyConfig, HttpClient};

const MODEL: &str = "fm";

/// Three `infergate sim` processes, one replica each, so that one can be killed alone.
fn start_sims() -> Vec<Sim> {
    common::start_sims(MODEL, &[&[], &[], &[]])
}

/// The built-in `infergate` profile, its picker returning `endpoints` endpoints (primary
/// first, then fallbacks), as a config file for `infergate epp --config-file`.
fn profile_with_endpoints(dir: &std::path::Path, endpoints: u32) -> String {
    let yaml = infergate_api::config::INFERGATE_PROFILE_YAML.replacen(
        "- type: max-score-picker\n",
        &format!("- type: max-score-picker\n  parameters: {{maxNumOfEndpoints: {endpoints}}}\n"),
        1,
    );
    assert!(yaml.contains("maxNumOfEndpoints"), "{yaml}");
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("picker-{endpoints}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

async fn start_epp(addrs: &[SocketAddr], endpoints: u32) -> Epp {
    let dir = std::env::temp_dir().join(format!("infergate-retry-{}", std::process::id()));
    let list: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
    Epp::start(&[
        "--endpoints".into(),
        list.join(","),
        "--config-file".into(),
        profile_with_endpoints(&dir, endpoints),
    ])
    .await
}

/// A non-streamed completion of `tokens` tokens: its response starts only when it is done,
/// so while it runs a killed replica leaves Envoy free to retry it.
fn completion(i: usize, tokens: u32) -> String {
    serde_json::json!({
        "model": MODEL,
        "prompt": format!("request {i}: tell me something"),
        "max_tokens": tokens,
    })
    .to_string()
}

async fn send_wave(envoy: &Envoy, from: usize, n: usize, tokens: u32) -> Vec<(u16, String)> {
    let url = envoy.url();
    join_all((from..from + n).map(|i| {
        let url = url.clone();
        async move {
            match post_json(&url, "/v1/completions", &[], completion(i, tokens)).await {
                Ok((status, _, body)) => {
                    (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
                }
                Err(e) => (0, format!("{e:#}")),
            }
        }
    }))
    .await
}

/// Requests running on each replica, from its vLLM `/metrics`.
async fn running(addrs: &[SocketAddr]) -> Vec<u64> {
    let http = HttpClient::new();
    let mut out = Vec::new();
    for a in addrs {
        let text = match http.get(&format!("http://{a}"), "/metrics").await {
            Ok((_, _, body)) => String::from_utf8_lossy(&body).into_owned(),
            Err(_) => String::new(),
        };
        let n: f64 = text
            .lines()
            .filter(|l| l.starts_with("vllm:num_requests_running"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        out.push(n as u64);
    }
    out
}

/// An Envoy counter, summed over the lines whose names contain `name`.
async fn counter(envoy: &Envoy, name: &str) -> u64 {
    let text = envoy.stats(name).await.unwrap();
    text.lines()
        .filter(|l| l.split(':').next().is_some_and(|n| n.trim() == name))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<u64>().ok())
        .sum()
}

/// What one run saw: the statuses of the requests in flight at the kill, and of those sent
/// just after it.
struct KillRun {
    in_flight: Vec<(u16, String)>,
    after: Vec<(u16, String)>,
    killed_running: u64,
    retries: u64,
}

/// Sends 9 non-streamed requests of 150 tokens (over a second each), kills the replica
/// running the most of them, sends 6 more at once; waits for every answer.
async fn kill_the_busiest_replica(sims: &mut [Sim], envoy: &Envoy) -> KillRun {
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.replicas[0]).collect();
    // Warm up: connections, the picker's first scrapes.
    for (status, body) in send_wave(envoy, 1000, 3, 2).await {
        assert_eq!(status, 200, "{body}");
    }
    let wave = tokio::spawn({
        let url = envoy.url();
        async move {
            join_all((0..9).map(|i| {
                let url = url.clone();
                async move {
                    match post_json(&url, "/v1/completions", &[], completion(i, 150)).await {
                        Ok((status, _, body)) => {
                            (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
                        }
                        Err(e) => (0, format!("{e:#}")),
                    }
                }
            }))
            .await
        }
    });
    // Wait until the wave is running on the replicas.
    let mut load = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        load = running(&addrs).await;
        if load.iter().sum::<u64>() >= 9 {
            break;
        }
    }
    let busiest = (0..addrs.len()).max_by_key(|&i| load[i]).unwrap();
    let _ = sims[busiest].child.kill();
    let _ = sims[busiest].child.wait();
    let after = send_wave(envoy, 100, 6, 20).await;
    let in_flight = wave.await.unwrap();
    KillRun {
        in_flight,
        after,
        killed_running: load[busiest],
        retries: counter(envoy, "cluster.picked_endpoint.upstream_rq_retry").await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_requests_are_retried_on_the_pickers_fallback_endpoints() {
    let mut sims = start_sims();
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.replicas[0]).collect();
    let epp = start_epp(&addrs, 3).await;
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .ext_proc(epp.grpc)
            .picked_cluster(PickedCluster::OverrideHost)
            .pool(addrs.iter().copied()),
    )
    .await
    .unwrap();

    let run = kill_the_busiest_replica(&mut sims, &envoy).await;

    assert!(
        run.killed_running >= 1,
        "the killed replica ran nothing: the test proves nothing"
    );
    let stats = envoy.stats("picked_endpoint").await.unwrap();
    for (i, (status, body)) in run.in_flight.iter().chain(&run.after).enumerate() {
        assert_eq!(
            *status, 200,
            "request {i} (0-8 in flight at the kill, 9- sent after it) saw {status}: {body}\n{stats}"
        );
    }
    assert!(
        run.retries >= run.killed_running,
        "{} retries for {} requests cut by the kill",
        run.retries,
        run.killed_running
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_dst_retries_go_back_to_the_dead_address_and_reject_a_fallback_list() {
    let mut sims = start_sims();
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.replicas[0]).collect();

    // A `primary,fallback,...` header is one address to ORIGINAL_DST, which does not parse.
    {
        let epp = start_epp(&addrs, 3).await;
        let envoy = Envoy::start(
            EnvoyConfig::new()
                .ext_proc(epp.grpc)
                .pool(addrs.iter().copied()),
        )
        .await
        .unwrap();
        let answers = send_wave(&envoy, 0, 3, 2).await;
        for (status, body) in &answers {
            assert_eq!(*status, 503, "{body}");
        }
        assert!(counter(&envoy, "cluster.picked_endpoint.original_dst_host_invalid").await >= 3);
    }

    // One endpoint per pick, the default retry policy: a retry goes to the same address.
    let epp = start_epp(&addrs, 1).await;
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .ext_proc(epp.grpc)
            .retry_policy(Some(RetryPolicy::default()))
            .pool(addrs.iter().copied()),
    )
    .await
    .unwrap();
    let run = kill_the_busiest_replica(&mut sims, &envoy).await;
    assert!(run.killed_running >= 1, "the killed replica ran nothing");
    let failed = run.in_flight.iter().filter(|(s, _)| *s != 200).count();
    assert!(
        failed >= 1,
        "expected the requests on the killed replica to fail: {:?}",
        run.in_flight
    );
    for (status, body) in run.in_flight.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(*status, 503, "{body}");
    }
    assert!(run.retries >= 1, "Envoy did retry, to the same address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_picker_exchange_is_a_503_with_a_json_error_body() {
    let sims = start_sims();
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.replicas[0]).collect();
    let mut epp = start_epp(&addrs, 3).await;
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .ext_proc(epp.grpc)
            .picked_cluster(PickedCluster::OverrideHost)
            .status_on_error(503)
            .pool(addrs.iter().copied()),
    )
    .await
    .unwrap();
    assert_eq!(send_wave(&envoy, 0, 1, 2).await[0].0, 200);

    epp.kill();
    for (status, body) in send_wave(&envoy, 1, 3, 2).await {
        assert_eq!(status, 503, "{body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        assert_eq!(v["error"]["type"], PICKER_UNAVAILABLE_TYPE, "{body}");
        assert_eq!(v["error"]["code"], 503, "{body}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("endpoint picker is unavailable"), "{body}");
        let details = v["error"]["details"].as_str().unwrap_or_default();
        assert!(details.starts_with("ext_proc_error"), "{body}");
    }
}

#[test]
fn every_retry_cluster_and_error_setting_loads_in_real_envoy() {
    let pool = [
        SocketAddr::from(([127, 0, 0, 1], 18001)),
        SocketAddr::from(([127, 0, 0, 1], 18002)),
    ];
    let picker = SocketAddr::from(([127, 0, 0, 1], 18003));
    let policies = [
        None,
        Some(RetryPolicy::default()),
        Some(RetryPolicy {
            retries: 1,
            retry_on: "connect-failure".into(),
            retriable_status_codes: Vec::new(),
            avoid_previous_hosts: false,
        }),
    ];
    for cluster in [PickedCluster::OriginalDst, PickedCluster::OverrideHost] {
        for policy in &policies {
            let cfg = EnvoyConfig::new()
                .ext_proc(picker)
                .pool(pool)
                .picked_cluster(cluster)
                .retry_policy(policy.clone());
            for cfg in [cfg.clone(), cfg.status_on_error(503)] {
                if let Err(e) = cfg.validate() {
                    panic!("{cluster:?} {policy:?}: {e:#}\n{}", cfg.to_yaml());
                }
            }
        }
    }
    // Without ext_proc there is no error body to add.
    let plain = EnvoyConfig::new().pool(pool).to_yaml();
    assert!(!plain.contains("local_reply_config"), "{plain}");
}

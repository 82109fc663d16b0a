//! A replica that cuts every stream after a few tokens, behind the picker and a real Envoy.
//!
//! Such a replica finishes fast and so looks idle; without outlier handling it wins most
//! picks and most streams break. The picker sees each response end through ext_proc: one
//! cut off after its headers counts as broken, and after five in a row the replica is
//! avoided for ten seconds while others remain.

mod common;

use std::net::SocketAddr;

use common::{start_sims, Epp};
use futures::future::join_all;
use infergate_testkit::{post_json_stream, Envoy, EnvoyConfig};

const MODEL: &str = "fm";

/// One streamed chat completion; whether it ended with `[DONE]`.
async fn stream_completes(url: &str, i: usize) -> bool {
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": format!("request {i}: say something")}],
        "max_tokens": 12,
        "stream": true,
    })
    .to_string();
    let Ok((status, _, mut chunks)) =
        post_json_stream(url, "/v1/chat/completions", &[], body).await
    else {
        return false;
    };
    if status != 200 {
        return false;
    }
    let mut text = Vec::new();
    while let Some(chunk) = chunks.next_chunk().await {
        match chunk {
            Ok(c) => text.extend_from_slice(&c),
            Err(_) => return false,
        }
    }
    String::from_utf8_lossy(&text).contains("data: [DONE]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cuts_every_stream_is_avoided_after_five() {
    let sims = start_sims(MODEL, &[&["--fault-drop-after-tokens", "3"], &[], &[]]);
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.replicas[0]).collect();
    let list: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
    let epp = Epp::start(&["--endpoints".into(), list.join(",")]).await;
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .ext_proc(epp.grpc)
            .pool(addrs.iter().copied()),
    )
    .await
    .unwrap();
    let url = envoy.url();

    // 60 streams, three at a time: all within the ten seconds the replica is avoided.
    let mut broken = 0;
    for wave in 0..20 {
        let results = join_all((0..3).map(|j| stream_completes(&url, wave * 3 + j))).await;
        broken += results.iter().filter(|ok| !**ok).count();
    }
    // Five to notice, plus those already under way to it when it was noticed.
    assert!(
        broken <= 9,
        "{broken} of 60 streams broke; the cutting replica should be avoided after five"
    );
    let log = epp.log_text();
    assert!(
        log.contains("ended broken") && log.contains(&addrs[0].to_string()),
        "the picker should say which endpoint it avoids and why:\n{log}"
    );
}

//! The generated Envoy config against the real Envoy 1.40 binary.

use std::net::SocketAddr;

use std::time::Duration;

use infergate_testkit::{free_port, get, post_json, BodyMode, Envoy, EnvoyConfig, FakeModelServer};

const MODES: [BodyMode; 3] = [
    BodyMode::FullDuplexStreamed,
    BodyMode::Buffered,
    BodyMode::None,
];

/// An address on which nothing listens: a picker that is down.
fn mk_dead_picker() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn mk_body(model: &str) -> String {
    format!(r#"{{"model":"{model}","prompt":"hello there","max_tokens":3}}"#)
}

#[test]
fn generated_config_loads_in_real_envoy_for_every_mode() {
    let pool = [
        SocketAddr::from(([127, 0, 0, 1], 18001)),
        SocketAddr::from(([127, 0, 0, 1], 18002)),
    ];
    let mut configs = vec![
        EnvoyConfig::new(),
        EnvoyConfig::new().pool(pool),
        EnvoyConfig::new().pool(pool).without_ext_proc(),
    ];
    for req in MODES {
        for resp in MODES {
            for allow in [false, true] {
                configs.push(
                    EnvoyConfig::new()
                        .ext_proc(mk_dead_picker())
                        .pool(pool)
                        .request_body_mode(req)
                        .response_body_mode(resp)
                        .failure_mode_allow(allow),
                );
            }
        }
    }
    configs.push(
        EnvoyConfig::new()
            .ext_proc(mk_dead_picker())
            .forward_lb_metadata(false)
            .response_attributes(&[])
            .route_timeout(Duration::ZERO),
    );
    configs.push(
        EnvoyConfig::new()
            .ext_proc(mk_dead_picker())
            .ext_proc_health_check(Some(Duration::from_millis(200))),
    );
    configs.push(
        EnvoyConfig::new()
            .ext_proc_removed()
            .failure_mode_allow(true),
    );
    configs.push(
        EnvoyConfig::new()
            .ext_proc(mk_dead_picker())
            .ext_proc_plaintext(),
    );
    // Envoy takes a fraction of a second per validation; check them side by side.
    std::thread::scope(|s| {
        let handles: Vec<_> = configs
            .iter()
            .map(|cfg| s.spawn(move || (cfg, cfg.validate())))
            .collect();
        for h in handles {
            let (cfg, result) = h.join().expect("validation thread panicked");
            if let Err(e) = result {
                panic!("{cfg:?} did not validate: {e:#}\n{}", cfg.to_yaml());
            }
        }
    });
}

#[test]
fn picker_is_reached_over_tls_unless_plaintext_is_asked() {
    let tls = EnvoyConfig::new().ext_proc(mk_dead_picker()).to_yaml();
    let plain = EnvoyConfig::new()
        .ext_proc(mk_dead_picker())
        .ext_proc_plaintext()
        .to_yaml();
    assert!(tls.contains("UpstreamTlsContext"), "{tls}");
    assert!(
        !tls.contains("validation_context"),
        "gateways skip verification by default:\n{tls}"
    );
    assert!(!plain.contains("UpstreamTlsContext"), "{plain}");
    let verified = EnvoyConfig::new()
        .ext_proc(mk_dead_picker())
        .ext_proc_trusted_ca("/tmp/ca.crt")
        .to_yaml();
    assert!(
        verified.contains("trusted_ca: {filename: \"/tmp/ca.crt\"}"),
        "{verified}"
    );
}

#[test]
fn envoy_rejects_full_duplex_body_without_trailers() {
    // Guards the reason the generator sets trailer mode SEND with full-duplex bodies: if
    // Envoy ever stops insisting, this test shows validation is really being done.
    let cfg = EnvoyConfig::new()
        .ext_proc(mk_dead_picker())
        .request_body_mode(BodyMode::FullDuplexStreamed);
    let yaml = cfg
        .to_yaml()
        .replace("request_trailer_mode: SEND", "request_trailer_mode: SKIP");
    let dir = std::env::temp_dir().join(format!("infergate-testkit-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(infergate_testkit::envoy_binary().unwrap())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "envoy accepted it:\n{text}");
    assert!(text.contains("request_trailer_mode"), "{text}");
}

async fn mk_gateway(server: &FakeModelServer, cfg: EnvoyConfig) -> Envoy {
    Envoy::start(cfg.pool([server.addr()])).await.unwrap()
}

#[tokio::test]
async fn fail_open_routes_to_pool_when_picker_is_removed() {
    // The picker's Service has no endpoints (its Deployment is gone): Envoy cannot open the
    // ext_proc stream at all and, failing open, routes on the fallback route.
    let server = FakeModelServer::start("replica-a").await.unwrap();
    let envoy = mk_gateway(
        &server,
        EnvoyConfig::new()
            .ext_proc_removed()
            .failure_mode_allow(true),
    )
    .await;

    let (status, headers, body) = post_json(&envoy.url(), "/v1/completions", &[], mk_body("m1"))
        .await
        .unwrap();

    assert_eq!(status, 200, "body: {}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-served-by"], "replica-a");
    assert!(String::from_utf8_lossy(&body).contains(r#""model":"m1""#));
    assert_eq!(server.count(), 1);
    assert_eq!(server.requests()[0].body, mk_body("m1").as_bytes());
}

#[tokio::test]
async fn fail_open_routes_to_pool_when_health_checked_picker_is_down() {
    let server = FakeModelServer::start("replica-a").await.unwrap();
    let envoy = mk_gateway(
        &server,
        EnvoyConfig::new()
            .ext_proc(mk_dead_picker())
            .ext_proc_health_check(Some(Duration::from_millis(200)))
            .failure_mode_allow(true),
    )
    .await;

    let (status, headers, body) = post_json(&envoy.url(), "/v1/completions", &[], mk_body("m1"))
        .await
        .unwrap();

    assert_eq!(status, 200, "body: {}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-served-by"], "replica-a");
}

#[tokio::test]
async fn fail_open_routes_to_pool_in_buffered_mode_when_picker_refuses_connections() {
    let server = FakeModelServer::start("replica-a").await.unwrap();
    let envoy = mk_gateway(
        &server,
        EnvoyConfig::new()
            .ext_proc(mk_dead_picker())
            .request_body_mode(BodyMode::Buffered)
            .failure_mode_allow(true),
    )
    .await;

    let (status, headers, _) = post_json(&envoy.url(), "/v1/completions", &[], mk_body("m1"))
        .await
        .unwrap();

    assert_eq!(status, 200);
    assert_eq!(headers["x-served-by"], "replica-a");
}

#[tokio::test]
async fn full_duplex_fail_open_refuses_bodies_when_picker_refuses_connections() {
    // Envoy 1.40 behaviour worth knowing: with a full-duplex request body, a picker whose
    // port refuses connections is only found out after the body has been handed to the
    // stream, and failure_mode_allow then cannot recover: 500. A request without a body
    // still fails open. (Health checks or a picker with no endpoints avoid this; see above.)
    let server = FakeModelServer::start("replica-a").await.unwrap();
    let envoy = mk_gateway(
        &server,
        EnvoyConfig::new()
            .ext_proc(mk_dead_picker())
            .failure_mode_allow(true),
    )
    .await;

    let (with_body, _, _) = post_json(&envoy.url(), "/v1/completions", &[], mk_body("m1"))
        .await
        .unwrap();
    let (without_body, headers, _) = get(&envoy.url(), "/v1/models").await.unwrap();

    assert_eq!(with_body, 500);
    assert_eq!(without_body, 200);
    assert_eq!(headers["x-served-by"], "replica-a");
    assert_eq!(server.count(), 0);
}

#[tokio::test]
async fn fail_closed_refuses_when_picker_is_down() {
    let server = FakeModelServer::start("replica-a").await.unwrap();
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .ext_proc(mk_dead_picker())
            .failure_mode_allow(false)
            .pool([server.addr()]),
    )
    .await
    .unwrap();

    let (status, _, body) = post_json(&envoy.url(), "/v1/completions", &[], mk_body("m1"))
        .await
        .unwrap();

    // Envoy 1.40 answers 500 (empty body) when the ext_proc stream fails and the filter
    // fails closed.
    assert_eq!(status, 500, "body: {}", String::from_utf8_lossy(&body));
    assert_eq!(server.count(), 0, "the request must not reach the pool");
}

#[tokio::test]
async fn fail_closed_refuses_when_picker_is_removed() {
    let server = FakeModelServer::start("replica-a").await.unwrap();
    let envoy = mk_gateway(
        &server,
        EnvoyConfig::new()
            .ext_proc_removed()
            .failure_mode_allow(false),
    )
    .await;

    let (status, _, _) = post_json(&envoy.url(), "/v1/completions", &[], mk_body("m1"))
        .await
        .unwrap();

    assert_eq!(status, 500);
    assert_eq!(server.count(), 0);
}

#[tokio::test]
async fn plain_proxy_round_robins_over_pool() {
    let a = FakeModelServer::start("a").await.unwrap();
    let b = FakeModelServer::start("b").await.unwrap();
    let envoy = Envoy::start(EnvoyConfig::new().pool([a.addr(), b.addr()]))
        .await
        .unwrap();
    for _ in 0..4 {
        let (status, _, _) = post_json(&envoy.url(), "/v1/completions", &[], mk_body("m"))
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!((a.count(), b.count()), (2, 2));
}

#[tokio::test]
async fn destination_header_routes_to_that_endpoint() {
    // Without a picker, a client-supplied destination header still selects the
    // ORIGINAL_DST route; this checks the cluster wiring the picker relies on.
    let a = FakeModelServer::start("a").await.unwrap();
    let b = FakeModelServer::start("b").await.unwrap();
    let envoy = Envoy::start(EnvoyConfig::new().pool([a.addr()]))
        .await
        .unwrap();
    let dest = b.addr().to_string();
    let (status, headers, _) = post_json(
        &envoy.url(),
        "/v1/completions",
        &[("x-gateway-destination-endpoint", &dest)],
        mk_body("m"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-served-by"], "b");
    assert_eq!(a.count(), 0);
}

#[tokio::test]
async fn several_envoys_run_at_once() {
    let server = FakeModelServer::start("s").await.unwrap();
    let cfg = EnvoyConfig::new().pool([server.addr()]);
    let (one, two) = tokio::join!(Envoy::start(cfg.clone()), Envoy::start(cfg));
    let (one, two) = (one.unwrap(), two.unwrap());
    assert_ne!(one.url(), two.url());
    for envoy in [&one, &two] {
        let (status, _, _) = post_json(&envoy.url(), "/v1/completions", &[], mk_body("m"))
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    assert!(one.log_path().is_file());
}

//! Who may read the picker's /metrics outside Kubernetes: everyone by default, or only
//! the holder of the token in --metrics-bearer-token-file. (In Kubernetes mode the API
//! server reviews tokens; tests/k8s_mode.rs covers that.)

mod common;

use common::*;
use infergate_testkit::FakeModelServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_protects_metrics_and_other_flags_are_refused_clearly() {
    let backend = FakeModelServer::start("b0").await.unwrap();
    let dir = std::env::temp_dir().join(format!("infergate-metrics-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let epp = Epp::start(&[
        "--endpoints".into(),
        backend.addr().to_string(),
        "--metrics-bearer-token-file".into(),
        token.display().to_string(),
    ])
    .await;
    let (status, _) = epp.metrics_with_token(None).await;
    assert_eq!(status, 401);
    let (status, _) = epp.metrics_with_token(Some("s3cret-tokex")).await;
    assert_eq!(status, 401);
    let (status, body) = epp.metrics_with_token(Some("s3cret-token")).await;
    assert_eq!(status, 200);
    assert!(body.contains("inference_pool_ready_pods"), "{body}");

    // Without a token file or a cluster there is nothing to check a token against.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args([
            "epp",
            "--endpoints",
            &backend.addr().to_string(),
            "--metrics-endpoint-auth",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs --metrics-bearer-token-file"), "{err}");
    // An empty token file is refused rather than letting an empty token in.
    std::fs::write(&token, "  \n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(["epp", "--endpoints", &backend.addr().to_string()])
        .arg("--metrics-bearer-token-file")
        .arg(&token)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is empty"));
    let _ = std::fs::remove_dir_all(&dir);
}

//! `infergate serve --tls-cert-file --tls-key-file`: the standalone gateway over HTTPS, checked
//! with a rustls client that trusts only the test's self-signed certificate.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::Serve;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;

/// A self-signed certificate for `localhost` and its key, written as PEM files in a fresh
/// directory; returns the directory and the certificate (DER) for the client to trust.
fn mk_self_signed(name: &str) -> (std::path::PathBuf, CertificateDer<'static>) {
    let dir = std::env::temp_dir().join(format!(
        "infergate-serve-tls-{name}-{}-{}",
        std::process::id(),
        infergate_testkit::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    (dir, cert.cert.der().clone())
}

/// One HTTP/1.1 request over TLS to `addr` as `localhost`, trusting only `trusted`.
async fn https(
    addr: SocketAddr,
    trusted: &CertificateDer<'static>,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).map_err(|e| e.to_string())?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = common::tls_connect(addr, config).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_certificate_answers_https_clients_that_trust_it() {
    let (dir, cert) = mk_self_signed("ok");
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    let serve = Serve::start(&[
        "--sim-replicas",
        "1",
        "--tls-cert-file",
        cert_file.to_str().unwrap(),
        "--tls-key-file",
        key_file.to_str().unwrap(),
    ]);
    assert!(serve.url().starts_with("https://"), "{}", serve.url());

    let (status, models) = https(serve.addr, &cert, "GET", "/v1/models", "")
        .await
        .unwrap();
    assert_eq!(status, 200, "{models}");
    let models: serde_json::Value = serde_json::from_str(&models).unwrap();
    let model = models["data"][0]["id"]
        .as_str()
        .expect("a model")
        .to_owned();
    let chat = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 4,
    })
    .to_string();
    let (status, reply) = https(serve.addr, &cert, "POST", "/v1/chat/completions", &chat)
        .await
        .unwrap();
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("\"choices\""), "{reply}");

    // A client that does not trust the certificate is refused, and plain HTTP gets nothing.
    let (_, stranger) = mk_self_signed("stranger");
    let refused = https(serve.addr, &stranger, "GET", "/health", "").await;
    assert!(refused.is_err(), "{refused:?}");
    let plain = infergate_testkit::get(&format!("http://{}", serve.addr), "/health").await;
    assert!(
        plain.is_err(),
        "plain HTTP answered: {:?}",
        plain.map(|r| r.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_cert_file_without_key_file_is_refused() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args([
            "serve",
            "--port",
            "0",
            "--tls-cert-file",
            "/nonexistent.pem",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--tls-key-file"), "{stderr}");
}

#[test]
fn unreadable_tls_key_file_stops_the_start_naming_the_file() {
    let (dir, _) = mk_self_signed("bad-key");
    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    let key = dir.join("key.pem");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(["serve", "--port", "0", "--sim-replicas", "1"])
        .arg("--tls-cert-file")
        .arg(dir.join("cert.pem"))
        .arg("--tls-key-file")
        .arg(&key)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&key.display().to_string()), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

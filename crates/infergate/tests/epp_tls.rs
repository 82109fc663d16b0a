//! End-to-end: the picker's ext_proc port speaks TLS by default, as the reference picker's
//! does; with `--cert-path` it serves the mounted certificate, with `--secure-serving=false`
//! plaintext gRPC. Real Envoy 1.40 in front, as a gateway would be.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use infergate_scrape::tls::AcceptAnyCertificate;
use infergate_testkit::{post_json, Envoy, EnvoyConfig, FakeModelServer};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;

const PATH: &str = "/v1/completions";

async fn send_through(envoy: &Envoy) -> (u16, String) {
    let (status, headers, body) = post_json(&envoy.url(), PATH, &[], completion("m", "hello"))
        .await
        .unwrap();
    let who = headers
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    (status.as_u16(), who)
}

/// TLS handshakes Envoy completed with the picker.
async fn envoy_handshakes_with_picker(envoy: &Envoy) -> u64 {
    let stats = envoy.stats("cluster.ext_proc.ssl.handshake").await.unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cluster.ext_proc.ssl.handshake: "))
        .map_or(0, |n| n.trim().parse().unwrap())
}

fn ring() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Handshakes with `addr` as `localhost`, offering h2; returns the leaf certificate the
/// server presented and the protocol it chose.
async fn mk_tls_handshake(
    addr: SocketAddr,
    trusted_ca: Option<&CertificateDer<'static>>,
) -> Result<(CertificateDer<'static>, Option<Vec<u8>>), String> {
    let builder = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap();
    let mut config = match trusted_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.clone()).unwrap();
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(ring())))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tls_connect(addr, config).await?;
    let conn = tls.get_ref().1;
    let leaf = conn.peer_certificates().ok_or("no certificate")?[0].clone();
    Ok((leaf, conn.alpn_protocol().map(<[u8]>::to_vec)))
}

fn sha256_fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

/// Opens an ext_proc stream in plaintext gRPC (tonic without TLS), as a gateway configured
/// without TLS to the picker would.
async fn open_plaintext_ext_proc_stream(addr: SocketAddr) -> Result<(), String> {
    let mut client = ExternalProcessorClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (_tx, rx) = tokio::sync::mpsc::channel::<ProcessingRequest>(1);
    tokio::time::timeout(
        Duration::from_secs(5),
        client.process(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .map_err(|_| "no answer in 5 s".to_owned())?
    .map(drop)
    .map_err(|e| format!("process: {e}"))
}

/// A test CA and a server certificate for `localhost` it signed, in `dir` as `tls.crt` (leaf
/// then CA) and `tls.key`, plus `ca.crt`. Returns the CA and the leaf, DER.
fn mk_cert_dir(dir: &Path) -> (CertificateDer<'static>, CertificateDer<'static>) {
    std::fs::create_dir_all(dir).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "infergate test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    std::fs::write(dir.join("tls.crt"), leaf.pem() + &ca.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), leaf_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    (ca.der().clone(), leaf.der().clone())
}

fn mk_temp_dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "infergate-tls-{name}-{}-{}",
        std::process::id(),
        infergate_testkit::free_port()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_picker_serves_envoy_over_tls_with_a_logged_self_signed_certificate() {
    let rig = Rig::start(RigOptions::default()).await;

    let (status, who) = send_through(&rig.envoy).await;

    assert_eq!(status, 200, "{who}\nepp log:\n{}", rig.epp.log_text());
    assert!(rig.index_of(&who).is_some(), "served by {who}");
    assert!(
        envoy_handshakes_with_picker(&rig.envoy).await >= 1,
        "Envoy reached the picker without TLS"
    );
    let (leaf, alpn) = mk_tls_handshake(rig.epp.grpc, None).await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let log = rig.epp.log_text();
    assert!(log.contains("self-signed"), "{log}");
    assert!(
        log.contains(&sha256_fingerprint(&leaf)),
        "the logged fingerprint is not the presented certificate's:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_grpc_client_is_refused_by_a_default_picker() {
    let backend = FakeModelServer::start("b0").await.unwrap();
    let endpoints = ["--endpoints".to_owned(), backend.addr().to_string()];
    let tls_picker = Epp::start(&endpoints).await;
    let plain_picker =
        Epp::start(&[&endpoints[..], &["--secure-serving=false".to_owned()]].concat()).await;

    let refused = open_plaintext_ext_proc_stream(tls_picker.grpc).await;
    let accepted = open_plaintext_ext_proc_stream(plain_picker.grpc).await;

    assert!(
        refused.is_err(),
        "a TLS picker answered plaintext gRPC; log:\n{}",
        tls_picker.log_text()
    );
    // The same client works against a plaintext picker, so the refusal above is TLS's.
    assert_eq!(accepted, Ok(()), "log:\n{}", plain_picker.log_text());
    assert!(mk_tls_handshake(plain_picker.grpc, None).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_serving_false_picker_routes_behind_plaintext_envoy() {
    let rig = Rig::start(RigOptions {
        secure_serving: false,
        ..Default::default()
    })
    .await;

    let (status, who) = send_through(&rig.envoy).await;

    assert_eq!(status, 200, "{who}\nepp log:\n{}", rig.epp.log_text());
    assert!(rig.index_of(&who).is_some(), "served by {who}");
    assert_eq!(envoy_handshakes_with_picker(&rig.envoy).await, 0);
    let log = rig.epp.log_text();
    assert!(log.contains("serves plaintext gRPC"), "{log}");
    assert!(!log.contains("self-signed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picker_serves_the_certificate_in_cert_path_and_envoy_verifies_it() {
    let dir = mk_temp_dir("certs");
    let (ca, leaf) = mk_cert_dir(&dir);
    let rig = Rig::start(RigOptions {
        extra_args: vec!["--cert-path".into(), dir.display().to_string()],
        envoy_trusted_ca: Some(dir.join("ca.crt")),
        ..Default::default()
    })
    .await;

    // Envoy trusts only the test CA and checks the name `localhost`.
    let (status, who) = send_through(&rig.envoy).await;
    let (presented, _) = mk_tls_handshake(rig.epp.grpc, Some(&ca)).await.unwrap();

    assert_eq!(status, 200, "{who}\nepp log:\n{}", rig.epp.log_text());
    assert!(rig.index_of(&who).is_some(), "served by {who}");
    assert_eq!(presented, leaf, "the picker presented another certificate");
    assert!(rig.epp.log_text().contains(&sha256_fingerprint(&leaf)));

    // An Envoy that trusts another CA refuses the picker, so the 200 above was verified.
    let other = mk_temp_dir("other-ca");
    mk_cert_dir(&other);
    let distrustful = Envoy::start(
        EnvoyConfig::new()
            .ext_proc(rig.epp.grpc)
            .ext_proc_trusted_ca(other.join("ca.crt"))
            .pool(rig.backends.iter().map(|b| b.addr())),
    )
    .await
    .unwrap();
    let (status, _) = send_through(&distrustful).await;
    assert_ne!(status, 200);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other);
}

#[test]
fn cert_path_without_tls_key_stops_the_start_naming_the_file() {
    let dir = mk_temp_dir("no-key");
    mk_cert_dir(&dir);
    std::fs::remove_file(dir.join("tls.key")).unwrap();
    let port = infergate_testkit::free_port().to_string();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(["epp", "--endpoints", "127.0.0.1:1", "--grpc-port", &port])
        .arg("--cert-path")
        .arg(&dir)
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&dir.join("tls.key").display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("--cert-path"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

//! Scraping over https against real TLS model servers on 127.0.0.1, with certificates made
//! by rcgen: a server whose certificate a trusted CA signed for its IP is scraped; one
//! signed by another CA, or for another address, is never scraped and says why; skipping
//! verification scrapes anything; https never falls back to plain HTTP, and plain HTTP
//! still works.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::{endpoint, mk_config, start_scraping, updated_at, vllm, vllm_page, wait_for};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use infergate_core::Datastore;
use infergate_scrape::scraper::ScrapeConfig;
use infergate_scrape::{ScrapeTls, Transport, Trust};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A certificate authority that signs model servers' certificates.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A server certificate for `names` (IP addresses become IP SANs), and its key.
    fn sign(&self, names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    /// Writes the CA certificate as a PEM bundle and returns its path.
    fn bundle(&self, name: &str) -> PathBuf {
        mk_file(name, self.issuer.pem().as_bytes())
    }
}

fn mk_file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("scrape-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A model server answering `page` on every request, over TLS with `cert` (or plain HTTP
/// without one); counts the HTTP requests that reach it.
struct MetricsServer {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl MetricsServer {
    async fn start(
        page: String,
        cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    ) -> MetricsServer {
        let acceptor = cert.map(|(cert, key)| {
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
            TlsAcceptor::from(Arc::new(config))
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let conn_hits = hits.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, hits, page) = (acceptor.clone(), conn_hits.clone(), page.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let body = Full::new(Bytes::from(page.clone()));
                        async move { Ok::<_, Infallible>(Response::new(body)) }
                    });
                    let http = http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            // A client that refuses the certificate aborts the handshake.
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        MetricsServer { addr, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn mk_https_config(trust: Trust) -> ScrapeConfig {
    ScrapeConfig {
        transport: Transport::Https(ScrapeTls::new(trust).unwrap()),
        ..mk_config()
    }
}

/// Waits until `addr` has failed a few scrapes, then checks it never got a sample, was
/// reported once, and that its recorded reason contains every one of `reason`.
async fn assert_never_scraped(
    run: &common::Running,
    ds: &Datastore,
    addr: SocketAddr,
    reason: &[&str],
) {
    wait_for("several failed scrapes", || {
        run.stats
            .endpoint(addr)
            .is_some_and(|h| h.counts.failures >= 4)
    })
    .await;
    let h = run.stats.endpoint(addr).unwrap();
    assert!(h.failing, "{h:?}");
    assert_eq!(h.counts.successes, 0, "{h:?}");
    assert_eq!(
        h.counts.became_failing, 1,
        "reported once, not per scrape: {h:?}"
    );
    let failure = h.failure.unwrap();
    for part in reason {
        assert!(failure.contains(part), "{failure:?} lacks {part:?}");
    }
    assert_eq!(updated_at(ds, addr), None, "no sample from {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_signed_by_the_bundled_ca_is_scraped_over_https() {
    let ca = TestCa::new("model servers CA");
    let server = MetricsServer::start(vllm_page(3, 7, 0.25), Some(ca.sign(&["127.0.0.1"]))).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![vllm(server.addr)]);
    let run = start_scraping(
        &ds,
        mk_https_config(Trust::CaFile(ca.bundle("right-ca.pem"))),
    );

    wait_for("sample over https", || {
        updated_at(&ds, server.addr).is_some()
    })
    .await;
    let m = endpoint(&ds, server.addr).sample().metrics.clone();
    assert_eq!((m.waiting, m.running, m.kv_cache_usage), (3, 7, Some(0.25)));
    // The sample keeps refreshing: scrapes go on over the kept-alive TLS connection.
    let first = updated_at(&ds, server.addr);
    wait_for("a later sample", || updated_at(&ds, server.addr) > first).await;
    assert_eq!(run.stats.total().failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_signed_by_another_ca_is_never_scraped_and_says_why() {
    let trusted = TestCa::new("trusted CA");
    let other = TestCa::new("someone else's CA");
    let good = MetricsServer::start(vllm_page(1, 1, 0.1), Some(trusted.sign(&["127.0.0.1"]))).await;
    let bad = MetricsServer::start(vllm_page(9, 9, 0.9), Some(other.sign(&["127.0.0.1"]))).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![vllm(good.addr), vllm(bad.addr)]);
    let run = start_scraping(
        &ds,
        mk_https_config(Trust::CaFile(trusted.bundle("trusted.pem"))),
    );

    assert_never_scraped(
        &run,
        &ds,
        bad.addr,
        &["TLS handshake failed", "UnknownIssuer"],
    )
    .await;
    assert_eq!(
        bad.hits(),
        0,
        "no HTTP request may reach an unverified server"
    );
    assert!(
        updated_at(&ds, good.addr).is_some(),
        "the trusted server is scraped"
    );
    assert_eq!(run.stats.endpoint(good.addr).unwrap().counts.failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_for_another_address_is_refused() {
    let ca = TestCa::new("model servers CA");
    // Right CA, but the certificate names another Pod's IP and a DNS name, not 127.0.0.1.
    let server = MetricsServer::start(
        vllm_page(0, 0, 0.0),
        Some(ca.sign(&["10.1.2.3", "vllm.example"])),
    )
    .await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![vllm(server.addr)]);
    let run = start_scraping(&ds, mk_https_config(Trust::CaFile(ca.bundle("ca.pem"))));

    assert_never_scraped(
        &run,
        &ds,
        server.addr,
        &["TLS handshake failed", "not valid for name"],
    )
    .await;
    assert_eq!(server.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_scrapes_a_self_signed_server() {
    let self_signed = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = (
        self_signed.cert.der().clone(),
        PrivateKeyDer::Pkcs8(self_signed.signing_key.serialize_der().into()),
    );
    let server = MetricsServer::start(vllm_page(5, 2, 0.5), Some(cert)).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![vllm(server.addr)]);
    let run = start_scraping(&ds, mk_https_config(Trust::InsecureSkipVerify));

    wait_for("sample without verification", || {
        updated_at(&ds, server.addr).is_some()
    })
    .await;
    assert_eq!(endpoint(&ds, server.addr).sample().metrics.waiting, 5);
    assert_eq!(run.stats.total().failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_never_falls_back_to_plain_http() {
    let plain = MetricsServer::start(vllm_page(4, 0, 0.0), None).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![vllm(plain.addr)]);
    let run = start_scraping(&ds, mk_https_config(Trust::InsecureSkipVerify));

    assert_never_scraped(&run, &ds, plain.addr, &["TLS handshake failed"]).await;
    assert_eq!(plain.hits(), 0, "no request may go out in clear text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_still_works_and_does_not_speak_to_tls_servers() {
    let ca = TestCa::new("model servers CA");
    let plain = MetricsServer::start(vllm_page(6, 1, 0.3), None).await;
    let tls = MetricsServer::start(vllm_page(0, 0, 0.0), Some(ca.sign(&["127.0.0.1"]))).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![vllm(plain.addr), vllm(tls.addr)]);
    let run = start_scraping(&ds, mk_config());

    wait_for("sample over http", || updated_at(&ds, plain.addr).is_some()).await;
    assert_eq!(endpoint(&ds, plain.addr).sample().metrics.waiting, 6);
    assert_never_scraped(&run, &ds, tls.addr, &["request failed"]).await;
}

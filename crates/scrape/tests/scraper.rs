//! The scrape loop against real HTTP servers on 127.0.0.1: metrics land, failures leave
//! samples to go stale and are reported once, slow servers do not hold up fast ones, and
//! the task set follows the datastore.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{endpoint, mk_config, start_scraping, updated_at, vllm, vllm_page, wait_for};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use infergate_core::{Datastore, EndpointSpec, Engine};
use tokio::net::TcpListener;

/// What a fake model server answers on every request.
#[derive(Clone)]
enum Reply {
    Page(String),
    Status(u16),
    /// Accept the request and never answer.
    Hang,
    /// A 200 with a body over the scraper's cap.
    Huge,
}

struct FakeServer {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    reply: Arc<Mutex<Reply>>,
}

impl FakeServer {
    async fn start(reply: Reply) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let reply = Arc::new(Mutex::new(reply));
        let (conn_hits, conn_reply) = (hits.clone(), reply.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (hits, reply) = (conn_hits.clone(), conn_reply.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let reply = reply.lock().unwrap().clone();
                        async move { answer(reply).await }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeServer { addr, hits, reply }
    }

    fn set(&self, reply: Reply) {
        *self.reply.lock().unwrap() = reply;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn answer(reply: Reply) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match reply {
        Reply::Page(page) => (200, Bytes::from(page)),
        Reply::Status(code) => (code, Bytes::from_static(b"unavailable")),
        Reply::Hang => match std::future::pending::<Infallible>().await {},
        Reply::Huge => (200, Bytes::from(vec![b'#'; 5 * 1024 * 1024])),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_land_in_the_datastore() {
    let a = FakeServer::start(Reply::Page(vllm_page(3, 7, 0.25))).await;
    let b = FakeServer::start(Reply::Page(vllm_page(0, 2, 0.5))).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![vllm(a.addr), vllm(b.addr)]);
    let run = start_scraping(&ds, mk_config());

    wait_for("both endpoints scraped", || {
        updated_at(&ds, a.addr).is_some() && updated_at(&ds, b.addr).is_some()
    })
    .await;
    let ma = endpoint(&ds, a.addr).sample().metrics.clone();
    let mb = endpoint(&ds, b.addr).sample().metrics.clone();
    assert_eq!(
        (ma.waiting, ma.running, ma.kv_cache_usage),
        (3, 7, Some(0.25))
    );
    assert_eq!(
        (mb.waiting, mb.running, mb.kv_cache_usage),
        (0, 2, Some(0.5))
    );

    a.set(Reply::Page(vllm_page(9, 1, 0.75)));
    wait_for("new values scraped", || {
        endpoint(&ds, a.addr).sample().metrics.waiting == 9
    })
    .await;
    assert_eq!(run.stats.total().failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_page_leaves_old_sample_to_go_stale_while_others_update() {
    let bad = FakeServer::start(Reply::Page(vllm_page(4, 4, 0.1))).await;
    let good = FakeServer::start(Reply::Page(vllm_page(1, 1, 0.1))).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![vllm(bad.addr), vllm(good.addr)]);
    let run = start_scraping(&ds, mk_config());
    wait_for("first scrapes", || {
        updated_at(&ds, bad.addr).is_some() && updated_at(&ds, good.addr).is_some()
    })
    .await;

    bad.set(Reply::Page("vllm:num_requests_waiting{{{ oops\n".into()));
    wait_for("endpoint marked failing", || {
        run.stats.endpoint(bad.addr).is_some_and(|h| h.failing)
    })
    .await;
    let frozen = updated_at(&ds, bad.addr);
    let good_before = updated_at(&ds, good.addr);
    tokio::time::sleep(Duration::from_millis(400)).await;

    assert_eq!(
        updated_at(&ds, bad.addr),
        frozen,
        "failed scrapes must not refresh the sample"
    );
    assert_eq!(
        endpoint(&ds, bad.addr).sample().metrics.waiting,
        4,
        "old sample kept"
    );
    assert!(
        updated_at(&ds, good.addr) > good_before,
        "healthy endpoint keeps updating"
    );
    let health = run.stats.endpoint(bad.addr).unwrap();
    assert!(health.counts.failures >= 3, "{health:?}");
    assert_eq!(
        health.counts.became_failing, 1,
        "warned once, not per scrape"
    );
    let reason = health.failure.unwrap();
    assert!(
        reason.contains("line 1") && reason.contains("does not parse"),
        "{reason}"
    );
    assert_eq!(run.stats.endpoint(good.addr).unwrap().counts.failures, 0);

    bad.set(Reply::Page(vllm_page(2, 2, 0.2)));
    wait_for("recovery", || {
        run.stats.endpoint(bad.addr).is_some_and(|h| !h.failing)
    })
    .await;
    let health = run.stats.endpoint(bad.addr).unwrap();
    assert_eq!(
        (health.counts.became_failing, health.counts.recovered),
        (1, 1)
    );
    assert_eq!(health.failure, None);
    assert!(updated_at(&ds, bad.addr) > frozen);
    assert_eq!(endpoint(&ds, bad.addr).sample().metrics.waiting, 2);
    assert_eq!(run.stats.total().became_failing, 1);
    assert_eq!(run.stats.total().recovered, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_endpoint_does_not_slow_a_healthy_one() {
    let hung = FakeServer::start(Reply::Hang).await;
    let healthy = FakeServer::start(Reply::Page(vllm_page(0, 0, 0.0))).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![vllm(hung.addr), vllm(healthy.addr)]);
    let run = start_scraping(&ds, mk_config());
    wait_for("healthy endpoint scraped", || {
        updated_at(&ds, healthy.addr).is_some()
    })
    .await;

    let before = healthy.hits();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let scrapes = healthy.hits() - before;
    // 20 at a 50 ms interval; 10 leaves room for a loaded test machine.
    assert!(
        scrapes >= 10,
        "healthy endpoint scraped only {scrapes} times in 1 s"
    );
    assert!(hung.hits() >= 1);
    assert_eq!(updated_at(&ds, hung.addr), None);
    let health = run.stats.endpoint(hung.addr).unwrap();
    assert!(health.failing);
    assert_eq!(health.counts.became_failing, 1);
    assert!(
        health
            .failure
            .as_deref()
            .unwrap()
            .contains("no complete answer within 300ms"),
        "{health:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_kind_is_reported_once_with_its_reason() {
    let refused_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let unavailable = FakeServer::start(Reply::Status(503)).await;
    let huge = FakeServer::start(Reply::Huge).await;
    let wrong_engine = FakeServer::start(Reply::Page(vllm_page(0, 0, 0.0))).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![
        vllm(refused_addr),
        vllm(unavailable.addr),
        vllm(huge.addr),
        EndpointSpec::new(wrong_engine.addr, Engine::Sglang),
    ]);
    let run = start_scraping(&ds, mk_config());

    let cases = [
        (refused_addr, "request failed"),
        (unavailable.addr, "HTTP status 503"),
        (huge.addr, "over the 4194304-byte limit"),
        (wrong_engine.addr, "sglang:num_queue_reqs"),
    ];
    for (addr, _) in cases {
        wait_for("several failures", || {
            run.stats
                .endpoint(addr)
                .is_some_and(|h| h.counts.failures >= 4)
        })
        .await;
    }
    for (addr, reason) in cases {
        let h = run.stats.endpoint(addr).unwrap();
        assert!(h.failing);
        assert_eq!(h.counts.became_failing, 1, "{h:?}");
        assert_eq!(h.counts.successes, 0);
        let failure = h.failure.unwrap();
        assert!(
            failure.contains(reason),
            "{addr}: {failure:?} lacks {reason:?}"
        );
        assert_eq!(updated_at(&ds, addr), None);
    }
    assert_eq!(run.stats.total().became_failing, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_added_later_starts_being_scraped() {
    let first = FakeServer::start(Reply::Page(vllm_page(1, 0, 0.0))).await;
    let later = FakeServer::start(Reply::Page(vllm_page(5, 0, 0.0))).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![vllm(first.addr)]);
    let run = start_scraping(&ds, mk_config());
    wait_for("first endpoint scraped", || {
        updated_at(&ds, first.addr).is_some()
    })
    .await;
    assert_eq!(later.hits(), 0);

    ds.upsert_endpoint(vllm(later.addr));
    wait_for("added endpoint scraped", || {
        endpoint(&ds, later.addr).sample().metrics.waiting == 5
    })
    .await;
    assert_eq!(run.stats.endpoints().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_endpoint_is_no_longer_scraped() {
    let stays = FakeServer::start(Reply::Page(vllm_page(0, 0, 0.0))).await;
    let goes = FakeServer::start(Reply::Page(vllm_page(0, 0, 0.0))).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![vllm(stays.addr), vllm(goes.addr)]);
    let run = start_scraping(&ds, mk_config());
    wait_for("both scraped", || stays.hits() > 0 && goes.hits() > 0).await;

    ds.remove_endpoint(goes.addr);
    wait_for("task stopped", || run.stats.endpoint(goes.addr).is_none()).await;
    // Let any request already on the wire arrive before counting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (goes_before, stays_before) = (goes.hits(), stays.hits());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(goes.hits(), goes_before, "removed endpoint still scraped");
    assert!(
        stays.hits() > stays_before,
        "remaining endpoint stopped being scraped"
    );
    assert_eq!(run.stats.endpoints().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_engine_restarts_the_task_with_the_new_mapping() {
    let server = FakeServer::start(Reply::Page(vllm_page(3, 0, 0.0))).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![EndpointSpec::new(server.addr, Engine::Sglang)]);
    let run = start_scraping(&ds, mk_config());
    wait_for("wrong engine failing", || {
        run.stats.endpoint(server.addr).is_some_and(|h| h.failing)
    })
    .await;

    ds.upsert_endpoint(vllm(server.addr));
    wait_for("scraped as vllm", || {
        endpoint(&ds, server.addr).sample().metrics.waiting == 3
    })
    .await;
    let h = run.stats.endpoint(server.addr).unwrap();
    assert!(!h.failing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_loop_stops_every_scrape() {
    let server = FakeServer::start(Reply::Page(vllm_page(0, 0, 0.0))).await;
    let ds = Datastore::new();
    ds.set_endpoints(vec![vllm(server.addr)]);
    let run = start_scraping(&ds, mk_config());
    wait_for("scraped", || server.hits() > 0).await;

    drop(run);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = server.hits();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.hits(), before);
}

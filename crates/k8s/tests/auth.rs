//! Bearer tokens for `/metrics`, reviewed by the API server (TokenReview, then a
//! SubjectAccessReview for `get /metrics`). The API server is the scripted one of
//! `infergate_testkit::kube_api`: no real API server can run here.

mod common;
use common::mk_client;

use std::time::Duration;

use infergate_k8s::auth::{TokenReviewer, Verdict};
use infergate_testkit::kube_api::{serve, FakeKubeApi};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_authenticated_then_authorised_for_get_metrics_and_cached() {
    let api = FakeKubeApi::default();
    api.add_token("prom-token", "system:serviceaccount:monitoring:prometheus");
    api.add_token("app-token", "system:serviceaccount:llm:chat-app");
    api.allow_metrics("system:serviceaccount:monitoring:prometheus");
    let (addr, server) = serve(api.clone()).await;
    let reviewer =
        TokenReviewer::new(mk_client(addr), "/metrics").with_timeout(Duration::from_secs(2));

    assert_eq!(reviewer.review("prom-token").await, Ok(Verdict::Allowed));
    match reviewer.review("app-token").await {
        Ok(Verdict::Forbidden(why)) => assert!(why.contains("chat-app"), "{why}"),
        other => panic!("a user without the grant must be refused, got {other:?}"),
    }
    match reviewer.review("made-up").await {
        Ok(Verdict::Unauthenticated(why)) => assert!(why.contains("invalid"), "{why}"),
        other => panic!("an unknown token must be unauthenticated, got {other:?}"),
    }
    // Answers are cached: asking again costs the API server nothing.
    let asked = api.reviews();
    for _ in 0..5 {
        assert_eq!(reviewer.review("prom-token").await, Ok(Verdict::Allowed));
        assert!(matches!(
            reviewer.review("made-up").await,
            Ok(Verdict::Unauthenticated(_))
        ));
    }
    assert_eq!(api.reviews(), asked);

    // With the API server down, a new token gets an error, never a silent yes.
    api.set_unavailable(true);
    let t0 = std::time::Instant::now();
    let err = reviewer.review("another").await.unwrap_err();
    assert!(
        err.contains("TokenReview") || err.contains("did not answer"),
        "{err}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the review is bounded in time"
    );
    server.abort();
}

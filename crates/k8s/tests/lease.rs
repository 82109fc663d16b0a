//! Leader election on a Lease, with the real kube-rs client against a scripted fake API
//! server on 127.0.0.1 (`infergate_testkit::kube_api`): no real Kubernetes API server can
//! run here. The fake stores Leases as an API server does (get, create, replace guarded by
//! `resourceVersion`, 409 on a conflict) and can answer 503 to everything.
//!
//! Timings are shortened (lease 1 s, renew deadline 600 ms, retry 100 ms); each test is
//! bounded in time. The lease is a whole second because the Lease records it in seconds
//! and the elector honours the longer of its own and the holder's duration.

mod common;
use common::mk_client;

use std::future::Future;
use std::time::Duration;

use infergate_k8s::lease::{default_identity, run, LeaseConfig};
use infergate_testkit::kube_api::{serve, FakeKubeApi, NS};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

const LEASE: &str = "infergate-epp";
const LEASE_DURATION: Duration = Duration::from_secs(1);
const RENEW_DEADLINE: Duration = Duration::from_millis(600);
const RETRY: Duration = Duration::from_millis(100);
/// Sampling interval of the "never two leaders" checks.
const SAMPLE: Duration = Duration::from_millis(15);

fn mk_config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: LEASE_DURATION,
        renew_deadline: RENEW_DEADLINE,
        retry_period: RETRY,
        ..LeaseConfig::new(NS, LEASE, identity)
    }
}

/// One replica's elector: its leader flag, its shutdown trigger and its task.
struct Replica {
    leader: watch::Receiver<bool>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Replica `epp-a` leading and `epp-b` a standby that has seen the Lease renewed a few times.
async fn leader_and_standby(addr: std::net::SocketAddr) -> (Replica, Replica) {
    let a = mk_replica(addr, "epp-a");
    eventually("a leads", Duration::from_secs(3), || a.is_leader()).await;
    let b = mk_replica(addr, "epp-b");
    sleep(4 * RETRY).await;
    assert!(!b.is_leader());
    (a, b)
}

fn mk_replica(addr: std::net::SocketAddr, identity: &str) -> Replica {
    let (tx, leader) = watch::channel(false);
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let task = tokio::spawn(run(mk_client(addr), mk_config(identity), tx, shutdown));
    Replica {
        leader,
        shutdown: Some(stop),
        task,
    }
}

impl Replica {
    fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }
}

/// Waits up to `within` for `f`; returns how long it took.
async fn eventually(what: &str, within: Duration, f: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for: {what}"
        );
        sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

/// Runs a test body with an overall bound.
async fn bounded(body: impl Future<Output = ()>) {
    timeout(Duration::from_secs(20), body)
        .await
        .expect("test took longer than 20 s");
}

fn holder(api: &FakeKubeApi) -> Option<String> {
    api.lease(NS, LEASE)
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
}

fn transitions(api: &FakeKubeApi) -> i64 {
    api.lease(NS, LEASE)
        .and_then(|l| l["spec"]["leaseTransitions"].as_i64())
        .unwrap_or(-1)
}

/// A Lease held by `identity`, renewed at `renew_time`, for `seconds`.
fn mk_lease(identity: &str, renew_time: &str, seconds: i32) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": LEASE, "namespace": NS},
        "spec": {"holderIdentity": identity, "leaseDurationSeconds": seconds,
                 "acquireTime": "2026-01-01T00:00:00.000000Z", "renewTime": renew_time,
                 "leaseTransitions": 3}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_exactly_one_leader_and_never_two_at_once() {
    bounded(async {
        let api = FakeKubeApi::default();
        let (addr, server) = serve(api.clone()).await;
        let start = Instant::now();
        let a = mk_replica(addr, "epp-a");
        let b = mk_replica(addr, "epp-b");

        eventually("a leader", Duration::from_secs(3), || {
            a.is_leader() || b.is_leader()
        })
        .await;
        println!("first leader elected {:?} after start", start.elapsed());

        let start = Instant::now();
        let mut samples = 0;
        while start.elapsed() < Duration::from_secs(2) {
            let (la, lb) = (a.is_leader(), b.is_leader());
            assert!(!(la && lb), "both replicas lead at once");
            assert!(
                la || lb,
                "the leader stepped down with the API server healthy"
            );
            samples += 1;
            sleep(SAMPLE).await;
        }
        assert!(samples > 50, "only {samples} samples");

        let leader = if a.is_leader() { "epp-a" } else { "epp-b" };
        assert_eq!(holder(&api).as_deref(), Some(leader));
        assert_eq!(transitions(&api), 0, "one creation, no takeover");
        a.task.abort();
        b.task.abort();
        server.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_shuts_down_releases_and_the_standby_takes_over_at_once() {
    bounded(async {
        let api = FakeKubeApi::default();
        let (addr, server) = serve(api.clone()).await;
        let (mut a, b) = leader_and_standby(addr).await;

        a.shutdown.take().unwrap().send(()).unwrap();
        let took = eventually("b leads", Duration::from_secs(3), || b.is_leader()).await;
        println!("takeover after a release: {took:?} (lease duration {LEASE_DURATION:?})");
        assert!(
            took < LEASE_DURATION / 2,
            "the standby waited {took:?}, as if the Lease had not been released"
        );
        timeout(Duration::from_secs(2), a.task)
            .await
            .expect("a's elector ends on shutdown")
            .unwrap();
        assert!(!*a.leader.borrow(), "a still claims to lead after shutdown");
        assert_eq!(holder(&api).as_deref(), Some("epp-b"));
        assert_eq!(transitions(&api), 1);
        b.task.abort();
        server.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leader_is_replaced_after_the_lease_duration() {
    bounded(async {
        let api = FakeKubeApi::default();
        let (addr, server) = serve(api.clone()).await;
        let (a, b) = leader_and_standby(addr).await;

        // A crash: no release, the Lease still names a.
        a.task.abort();
        let took = eventually("b leads", Duration::from_secs(4), || b.is_leader()).await;
        println!("takeover after a crash: {took:?} (lease duration {LEASE_DURATION:?})");
        // b's wait began when it last saw a's renewal, which a sent up to one retry period
        // plus one round trip before the crash.
        assert!(
            took >= LEASE_DURATION - 2 * RETRY - Duration::from_millis(100),
            "b took over after {took:?}, before a's Lease could have expired"
        );
        assert!(took < LEASE_DURATION + Duration::from_secs(1));
        assert_eq!(holder(&api).as_deref(), Some("epp-b"));
        assert_eq!(transitions(&api), 1);
        b.task.abort();
        server.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_steps_down_and_reacquires_when_it_returns() {
    bounded(async {
        let api = FakeKubeApi::default();
        let (addr, server) = serve(api.clone()).await;
        let a = mk_replica(addr, "epp-a");
        eventually("a leads", Duration::from_secs(3), || a.is_leader()).await;
        sleep(3 * RETRY).await;

        api.set_unavailable(true);
        let took = eventually("a steps down", Duration::from_secs(3), || !a.is_leader()).await;
        println!("stepped down {took:?} after the API server went away (renew deadline {RENEW_DEADLINE:?})");
        // The last renewal before the outage was sent up to one retry period plus one round
        // trip earlier; a replica that gave up at the first failure would step down at once.
        assert!(
            took >= RENEW_DEADLINE - 2 * RETRY,
            "stepped down after {took:?}, before the renew deadline"
        );
        assert!(took < RENEW_DEADLINE + Duration::from_millis(500));
        assert!(!a.task.is_finished(), "the elector must keep running as a standby");

        // Still down: it stays a standby.
        sleep(3 * RETRY).await;
        assert!(!a.is_leader());

        api.set_unavailable(false);
        let took = eventually("a leads again", Duration::from_secs(3), || a.is_leader()).await;
        println!("reacquired {took:?} after the API server returned");
        assert_eq!(holder(&api).as_deref(), Some("epp-a"));
        a.task.abort();
        server.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_another_holder_keeps_renewing_is_never_taken() {
    bounded(async {
        let api = FakeKubeApi::default();
        let (addr, server) = serve(api.clone()).await;
        let renew = |api: &FakeKubeApi| {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            api.put_lease(NS, LEASE, mk_lease("other-picker", &now, 1));
        };
        renew(&api);
        let a = mk_replica(addr, "epp-a");

        // The foreign holder renews every 200 ms for three lease durations.
        let start = Instant::now();
        let mut last_renew = Instant::now();
        while start.elapsed() < 3 * LEASE_DURATION {
            assert!(!a.is_leader(), "took a Lease its holder keeps renewing");
            if last_renew.elapsed() >= Duration::from_millis(200) {
                renew(&api);
                last_renew = Instant::now();
            }
            sleep(SAMPLE).await;
        }
        assert_eq!(holder(&api).as_deref(), Some("other-picker"));

        // One last renewal, then the holder stops: a may take the Lease one lease duration
        // after it saw that renewal, which was after now.
        let stopped = Instant::now();
        renew(&api);
        eventually(
            "a takes the abandoned lease",
            Duration::from_secs(3),
            || a.is_leader(),
        )
        .await;
        let took = stopped.elapsed();
        println!("abandoned foreign Lease taken after {took:?}");
        assert!(
            took >= LEASE_DURATION,
            "taken after {took:?}, before it expired"
        );
        assert_eq!(holder(&api).as_deref(), Some("epp-a"));
        assert_eq!(transitions(&api), 4);
        a.task.abort();
        server.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_finds_its_lease_taken_steps_down_at_its_next_renewal() {
    bounded(async {
        let api = FakeKubeApi::default();
        let (addr, server) = serve(api.clone()).await;
        let a = mk_replica(addr, "epp-a");
        eventually("a leads", Duration::from_secs(3), || a.is_leader()).await;

        // Another writer takes the Lease (say, an operator forcing a handover).
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        api.put_lease(NS, LEASE, mk_lease("other-picker", &now, 1));
        let took = eventually("a steps down", Duration::from_secs(3), || !a.is_leader()).await;
        println!("stepped down {took:?} after the Lease was taken");
        assert!(
            took < RENEW_DEADLINE,
            "kept leading for {took:?} after another holder took the Lease"
        );
        a.task.abort();
        server.abort();
    })
    .await;
}

#[test]
fn default_identity_is_the_pod_name_or_host_and_pid() {
    let id = default_identity();
    match std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()) {
        Some(pod) => assert_eq!(id, pod),
        None => assert!(
            id.ends_with(&format!("-{}", std::process::id())) && id.len() > 2,
            "{id}"
        ),
    }
}

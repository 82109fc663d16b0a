//! Leader election on a `coordination.k8s.io/v1` Lease: one replica of the picker is
//! active, the others stand by.
//!
//! Every replica runs [`run`]. It reads the Lease; when the Lease does not exist it creates
//! it naming itself, and when it is free (no holder) or its holder has stopped renewing it
//! takes it over with a replace that carries the `resourceVersion` it read, so of two
//! replicas racing for it the API server lets exactly one win (the other gets a 409
//! Conflict and goes back to waiting). The holder renews the Lease every `retry_period`.
//!
//! Whether the holder has stopped renewing is judged by *our* clock: we note the instant
//! we last saw the Lease's record change and take it over only when it has not changed for
//! the lease duration since. The Lease's `renewTime` was written with the holder's clock,
//! and comparing it with ours would hand the Lease over early (or never) whenever the two
//! clocks disagree.
//!
//! A leader that cannot renew within `renew_deadline` (shorter than the lease duration, so
//! it lets go before anyone else may take over) steps down: `leader` turns false and it
//! goes back to trying to acquire. It does not exit. The standby keeps its watches warm and
//! reports not-ready, as the reference endpoint picker does, and the gateway sends only to
//! ready pickers; a standby that takes over serves at once, with no cold start. On shutdown
//! the leader releases the Lease (no holder, duration 1 s) so a standby takes over at once
//! instead of after the lease duration.
//!
//! This module touches only the one Lease, through the API server; it never exits the
//! process or panics on API errors, which are logged and retried every `retry_period`.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;

/// Which Lease to hold, as whom, and the election's timing.
///
/// The timings must keep `lease_duration > renew_deadline > retry_period`: a leader that
/// cannot renew must step down before a standby may take the Lease over.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's name in `holderIdentity`; unique per replica (the Pod name).
    pub identity: String,
    /// How long a standby waits, after it last saw the Lease change, before taking it over.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// How often to renew, and to retry after a failure.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The Lease `namespace`/`name` held as `identity`, with controller-runtime's default
    /// timings: lease 15 s, renew deadline 10 s, retry every 2 s.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// `lease_duration` in whole seconds, rounded up (the Lease field is an integer).
    fn lease_duration_seconds(&self) -> i32 {
        let ms = self.lease_duration.as_millis().max(1);
        i32::try_from(ms.div_ceil(1000)).unwrap_or(i32::MAX)
    }
}

/// This replica's identity: `POD_NAME` when set (the Downward API), else the host name and
/// the process id, e.g. `node-3-4711`.
pub fn default_identity() -> String {
    if let Some(pod) = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()) {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "infergate".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Runs the election until `shutdown` resolves, keeping `leader` true while this replica
/// holds the Lease. On shutdown it sets `leader` false and, if it was leading, releases the
/// Lease.
pub async fn run(
    client: Client,
    cfg: LeaseConfig,
    leader: watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) {
    if !(cfg.lease_duration > cfg.renew_deadline && cfg.renew_deadline > cfg.retry_period) {
        tracing::warn!(
            "Lease {}/{}: the timings should keep lease duration ({:?}) > renew deadline ({:?}) \
             > retry period ({:?}), or two replicas may both lead for a moment",
            cfg.namespace,
            cfg.name,
            cfg.lease_duration,
            cfg.renew_deadline,
            cfg.retry_period
        );
    }
    let mut elector = Elector {
        api: Api::namespaced(client, &cfg.namespace),
        cfg,
        observed: None,
        written: None,
    };
    let cfg = elector.cfg.clone();
    let lease = format!("{}/{}", cfg.namespace, cfg.name);
    tokio::pin!(shutdown);

    // When the last renewal that succeeded was sent; `Some` while leading.
    let mut renewed_at: Option<Instant> = None;
    let mut last_error = String::new();
    let step_down = |renewed_at: &mut Option<Instant>, why: &str| {
        if renewed_at.take().is_some() {
            leader.send_replace(false);
            tracing::info!(identity = %cfg.identity, "stepping down as leader of Lease {lease}: {why}");
        }
    };
    let missed_deadline = |renewed_at: &Option<Instant>| {
        renewed_at.is_some_and(|t| t.elapsed() >= cfg.renew_deadline)
    };
    loop {
        if missed_deadline(&renewed_at) {
            let why = format!(
                "no renewal succeeded within {:?} (last error: {last_error})",
                cfg.renew_deadline
            );
            step_down(&mut renewed_at, &why);
        }
        // The send time, not the answer's: the API server stored our renewal after it, so
        // a standby's wait started after it too.
        let started = Instant::now();
        let budget = match renewed_at {
            Some(t) => cfg.renew_deadline.saturating_sub(t.elapsed()),
            None => cfg.renew_deadline,
        };
        let attempt = tokio::select! {
            () = &mut shutdown => break,
            r = tokio::time::timeout(budget, elector.try_acquire_or_renew()) => r,
        };
        match attempt {
            Ok(Ok(Attempt::Holding)) => {
                if renewed_at.replace(started).is_none() {
                    leader.send_replace(true);
                    tracing::info!(identity = %cfg.identity, "became leader of Lease {lease}");
                }
            }
            Ok(Ok(Attempt::HeldBy(holder))) => {
                step_down(
                    &mut renewed_at,
                    &format!("the Lease is now held by {holder}"),
                );
                tracing::debug!("Lease {lease} is held by {holder}");
            }
            Ok(Ok(Attempt::Lost)) => {
                tracing::debug!("Lease {lease} was written by someone else meanwhile");
            }
            Ok(Err(e)) => {
                last_error = cause(&e);
                tracing::warn!(
                    "Lease {lease}: request to the API server failed (retrying in {:?}): {last_error}",
                    cfg.retry_period
                );
            }
            Err(_) => {
                last_error = format!("the API server did not answer within {budget:?}");
                tracing::warn!(
                    "Lease {lease}: {last_error} (retrying in {:?})",
                    cfg.retry_period
                );
            }
        }
        if missed_deadline(&renewed_at) {
            let why = format!(
                "no renewal succeeded within {:?} (last error: {last_error})",
                cfg.renew_deadline
            );
            step_down(&mut renewed_at, &why);
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(cfg.retry_period) => {}
        }
    }

    if renewed_at.is_some() {
        // Stop acting as leader before the Lease says anyone else may.
        leader.send_replace(false);
        match tokio::time::timeout(cfg.renew_deadline, elector.release()).await {
            Ok(Ok(())) => {
                tracing::info!(identity = %cfg.identity, "released Lease {lease} on shutdown")
            }
            Ok(Err(e)) => tracing::warn!(
                "Lease {lease}: could not release it on shutdown; a standby takes over after \
                 the lease duration: {}",
                cause(&e)
            ),
            Err(_) => tracing::warn!(
                "Lease {lease}: the API server did not answer the release on shutdown; a standby \
                 takes over after the lease duration"
            ),
        }
    }
    leader.send_replace(false);
}

/// What one round of acquire-or-renew found.
enum Attempt {
    /// We hold the Lease (just created, taken over or renewed).
    Holding,
    /// Another replica holds it and has renewed within the lease duration.
    HeldBy(String),
    /// Another write got in between our read and our write; try again next round.
    Lost,
}

struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// The Lease's record as last seen, and when (by our clock) it last changed.
    observed: Option<(LeaseSpec, Instant)>,
    /// The Lease as the API server returned our last write, for the release.
    written: Option<Lease>,
}

impl Elector {
    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let pp = PostParams::default();
        let now = MicroTime(Timestamp::now());
        let Some(current) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(self.cfg.lease_duration_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&pp, &lease).await {
                Ok(created) => Ok(self.wrote(created)),
                Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(Attempt::Lost),
                Err(e) => Err(e),
            };
        };

        let spec = current.spec.clone().unwrap_or_default();
        let since = self.observe(&spec);
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let ours = holder == Some(self.cfg.identity.as_str());
        if let Some(holder) = holder.filter(|_| !ours) {
            if since.elapsed() < self.expiry(&spec) {
                return Ok(Attempt::HeldBy(holder.to_owned()));
            }
            tracing::info!(
                identity = %self.cfg.identity,
                "Lease {}/{}: {holder} has not renewed it for {:?}; taking it over",
                self.cfg.namespace,
                self.cfg.name,
                since.elapsed()
            );
        }

        let transitions = spec.lease_transitions.unwrap_or(0);
        let next = Lease {
            metadata: current.metadata,
            spec: Some(LeaseSpec {
                holder_identity: Some(self.cfg.identity.clone()),
                lease_duration_seconds: Some(self.cfg.lease_duration_seconds()),
                acquire_time: if ours {
                    spec.acquire_time.clone()
                } else {
                    Some(now.clone())
                },
                renew_time: Some(now),
                lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
                ..spec
            }),
        };
        match self.api.replace(&self.cfg.name, &pp, &next).await {
            Ok(replaced) => Ok(self.wrote(replaced)),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(Attempt::Lost),
            Err(e) => Err(e),
        }
    }

    /// Clears the holder of the Lease we last wrote (if nobody wrote it since), with a
    /// duration of 1 s, so a standby may take it at once.
    async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.written.take() else {
            return Ok(());
        };
        let now = MicroTime(Timestamp::now());
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            // A conflict: someone else has written it since, so it is no longer ours.
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(()),
            r => r.map(drop),
        }
    }

    fn wrote(&mut self, lease: Lease) -> Attempt {
        self.observe(&lease.spec.clone().unwrap_or_default());
        self.written = Some(lease);
        Attempt::Holding
    }

    /// Records `spec` as seen now if it differs from what we saw last; returns when (by our
    /// clock) it last changed.
    fn observe(&mut self, spec: &LeaseSpec) -> Instant {
        match &self.observed {
            Some((seen, at)) if seen == spec => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((spec.clone(), at));
                at
            }
        }
    }

    /// How long an unchanged record keeps its holder: our lease duration, or the holder's
    /// if it asked for longer.
    fn expiry(&self, spec: &LeaseSpec) -> Duration {
        let theirs = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        self.cfg.lease_duration.max(theirs)
    }
}

/// An error with its chain of causes, e.g. "ServiceError: client error (Connect):
/// tcp connect error: Connection refused (os error 111)".
fn cause(e: &kube::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

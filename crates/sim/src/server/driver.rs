//! The real-time step loop of one replica.
//!
//! Begin a step, sleep until the real instant its simulated end falls on, finish it and hand
//! each produced token to its request's channel. The next step starts at the previous
//! step's planned end, not at the moment we woke up, so the latencies the engine reports
//! are not inflated by timer slack or a busy machine. Only when we fall more than
//! [`MAX_LAG`] behind do we give up and restart the clock from now (a "resync"), which is
//! counted and warned about: from then on the replica runs slower than its profile says.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::Output;
use crate::hist::Histogram;

use super::{until, RunState, Shared};

/// Engine seconds we may run behind the plan before restarting from now.
pub const MAX_LAG: f64 = 0.05;
/// At most one lag warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Buckets of `infergate_sim_step_lag_seconds` (engine seconds).
pub const LAG_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
];

/// How far behind plan the driver wakes up.
pub struct LagStats {
    pub hist: Histogram,
    pub resyncs: u64,
    resyncs_at_warn: u64,
}

impl LagStats {
    pub fn new() -> LagStats {
        LagStats {
            hist: Histogram::new(LAG_BUCKETS),
            resyncs: 0,
            resyncs_at_warn: 0,
        }
    }

    /// Records one wake-up `lag` engine seconds late; true when the driver must resync.
    fn observe(&mut self, lag: f64, time_scale: f64) -> bool {
        self.hist.observe(lag);
        if lag <= MAX_LAG {
            return false;
        }
        self.resyncs += 1;
        // One warning per process per period, however many replicas fall behind together.
        static LAST_WARN: parking_lot::Mutex<Option<Instant>> = parking_lot::Mutex::new(None);
        let mut last = LAST_WARN.lock();
        if last.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                lag_ms = lag * 1e3,
                replica_resyncs_since_its_last_warning = self.resyncs - self.resyncs_at_warn,
                time_scale,
                "simulator fell behind real time and restarted its clock; the replica runs slower \
                 than its profile (lower --time-scale or give it more CPU)"
            );
            self.resyncs_at_warn = self.resyncs;
        }
        true
    }
}

impl Default for LagStats {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs the replica's engine until the replica stops.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut state = shared.state.subscribe();
    let mut outputs: Vec<Output> = Vec::new();
    // Where the next step starts: the last step's planned end, or now after idling.
    let mut carry: Option<f64> = None;
    loop {
        if *state.borrow() == RunState::Stopped {
            return;
        }
        let plan = {
            let mut core = shared.core.lock();
            let start = carry.take().unwrap_or_else(|| shared.now());
            match core.engine.begin_step(start) {
                // Only requests that arrived after the planned start are waiting: start now.
                None if !core.engine.is_idle() => core.engine.begin_step(shared.now()),
                plan => plan,
            }
        };
        let Some(plan) = plan else {
            tokio::select! {
                _ = shared.wake.notified() => continue,
                _ = until(&mut state, |s| *s == RunState::Stopped) => return,
            }
        };
        match shared.instant_at(plan.end) {
            Some(at) if at > Instant::now() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = until(&mut state, |s| *s == RunState::Stopped) => return,
                }
            }
            Some(_) => {} // already late: catch up without sleeping
            None => {
                until(&mut state, |s| *s == RunState::Stopped).await;
                return;
            }
        }
        let now = shared.now();
        let lag = (now - plan.end).max(0.0);
        let resync = shared.lag.lock().observe(lag, shared.cfg.time_scale);
        carry = Some(if resync { now } else { plan.end });

        let mut core = shared.core.lock();
        core.engine.finish_step(&mut outputs);
        for out in outputs.drain(..) {
            let delivered = match core.streams.get(&out.id) {
                Some(tx) => tx.send(out).is_ok(),
                None => false,
            };
            if out.finished.is_some() || !delivered {
                core.streams.remove(&out.id);
            }
        }
    }
}

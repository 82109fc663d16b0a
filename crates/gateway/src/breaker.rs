//! Circuit breaker per model server: eject after consecutive failures, probe back later.
//!
//! Pure state, time passed in. An endpoint with `failures` consecutive failures is ejected
//! for `cooldown` (doubling on each repeated ejection, up to `max_cooldown`); once that
//! passes it is half-open: one probe request may go; a success closes the breaker, a failure
//! ejects it again for longer. A probe that never reports (its client went away) is
//! forgotten after one base cooldown, so an endpoint cannot stay half-open for ever.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    pub failures: u32,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed { failures: u32 },
    Open { until: Duration },
    HalfOpen { probe_since: Option<Duration> },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    state: State,
    /// Ejections in a row without a successful probe (sets the cooldown).
    ejections: u32,
}

/// What a failure did to the endpoint's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Counted,
    /// Ejected now, for this long.
    Ejected(Duration),
}

#[derive(Debug)]
pub struct Breakers {
    cfg: BreakerConfig,
    entries: Mutex<HashMap<SocketAddr, Entry>>,
    /// Entries not in the healthy default state; zero lets the hot path skip the lock.
    tracked: AtomicUsize,
}

impl Breakers {
    pub fn new(cfg: BreakerConfig) -> Self {
        Breakers {
            cfg: BreakerConfig {
                failures: cfg.failures.max(1),
                ..cfg
            },
            entries: Mutex::new(HashMap::new()),
            tracked: AtomicUsize::new(0),
        }
    }

    /// Whether any endpoint has a failure on record (cheap).
    pub fn any_tracked(&self) -> bool {
        self.tracked.load(Ordering::Relaxed) > 0
    }

    /// Whether a request may go to `addr` now (without claiming the half-open probe).
    #[cfg(test)]
    pub fn available(&self, addr: SocketAddr, now: Duration) -> bool {
        if !self.any_tracked() {
            return true;
        }
        let entries = self.entries.lock();
        self.entry_available(entries.get(&addr), now)
    }

    /// Keeps the addresses a request may go to now (one lock for all of them).
    pub fn retain_available(&self, addrs: &mut Vec<SocketAddr>, now: Duration) {
        if !self.any_tracked() {
            return;
        }
        let entries = self.entries.lock();
        addrs.retain(|a| self.entry_available(entries.get(a), now));
    }

    fn entry_available(&self, e: Option<&Entry>, now: Duration) -> bool {
        match e.map(|e| e.state) {
            None | Some(State::Closed { .. }) => true,
            Some(State::Open { until }) => now >= until,
            Some(State::HalfOpen { probe_since }) => {
                probe_since.is_none_or(|t| now.saturating_sub(t) >= self.cfg.cooldown)
            }
        }
    }

    /// A request is being sent to `addr`: if its cooldown is over, this is the probe.
    pub fn on_dispatch(&self, addr: SocketAddr, now: Duration) {
        if !self.any_tracked() {
            return;
        }
        if let Some(e) = self.entries.lock().get_mut(&addr) {
            match e.state {
                State::Open { until } if now >= until => {
                    e.state = State::HalfOpen {
                        probe_since: Some(now),
                    }
                }
                State::HalfOpen { .. } => {
                    e.state = State::HalfOpen {
                        probe_since: Some(now),
                    }
                }
                _ => {}
            }
        }
    }

    /// `addr` answered well: close its breaker and forget its history.
    pub fn on_success(&self, addr: SocketAddr) {
        if !self.any_tracked() {
            return;
        }
        if self.entries.lock().remove(&addr).is_some() {
            self.tracked.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// `addr` failed at `now`.
    pub fn on_failure(&self, addr: SocketAddr, now: Duration) -> Verdict {
        let mut entries = self.entries.lock();
        let e = entries.entry(addr).or_insert_with(|| {
            self.tracked.fetch_add(1, Ordering::Relaxed);
            Entry {
                state: State::Closed { failures: 0 },
                ejections: 0,
            }
        });
        let eject = match e.state {
            State::Closed { failures } => {
                let failures = failures + 1;
                e.state = State::Closed { failures };
                failures >= self.cfg.failures
            }
            // A failed probe (or a straggler from before the ejection) sends it back.
            State::HalfOpen { .. } => true,
            State::Open { .. } => false,
        };
        if !eject {
            return Verdict::Counted;
        }
        let factor = 1u32 << e.ejections.min(16);
        let cooldown = self
            .cfg
            .cooldown
            .saturating_mul(factor)
            .min(self.cfg.max_cooldown.max(self.cfg.cooldown));
        e.ejections += 1;
        e.state = State::Open {
            until: now + cooldown,
        };
        Verdict::Ejected(cooldown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

    fn mk(failures: u32) -> Breakers {
        Breakers::new(BreakerConfig {
            failures,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(12),
        })
    }

    fn s(x: u64) -> Duration {
        Duration::from_secs(x)
    }

    #[test]
    fn ejects_after_consecutive_failures_and_a_success_resets_the_count() {
        let b = mk(3);
        assert_eq!(b.on_failure(A, s(0)), Verdict::Counted);
        assert_eq!(b.on_failure(A, s(0)), Verdict::Counted);
        b.on_success(A);
        assert!(!b.any_tracked());
        assert_eq!(b.on_failure(A, s(0)), Verdict::Counted);
        assert_eq!(b.on_failure(A, s(0)), Verdict::Counted);
        assert_eq!(b.on_failure(A, s(1)), Verdict::Ejected(s(5)));
        assert!(!b.available(A, s(5)));
        assert!(b.available(A, s(6)));
    }

    #[test]
    fn half_open_allows_one_probe_and_a_failed_probe_doubles_the_cooldown_up_to_the_cap() {
        let b = mk(1);
        assert_eq!(b.on_failure(A, s(0)), Verdict::Ejected(s(5)));
        b.on_dispatch(A, s(5));
        assert!(!b.available(A, s(6)), "only one probe at a time");
        assert_eq!(b.on_failure(A, s(6)), Verdict::Ejected(s(10)));
        b.on_dispatch(A, s(16));
        assert_eq!(b.on_failure(A, s(16)), Verdict::Ejected(s(12)));
        b.on_dispatch(A, s(28));
        b.on_success(A);
        assert!(b.available(A, s(28)));
        assert_eq!(b.on_failure(A, s(30)), Verdict::Ejected(s(5)));
    }

    #[test]
    fn a_probe_that_never_reports_is_forgotten_after_one_cooldown() {
        let b = mk(1);
        b.on_failure(A, s(0));
        b.on_dispatch(A, s(5));
        assert!(!b.available(A, s(9)));
        assert!(b.available(A, s(10)));
    }
}

//! Flow control: requests wait at the gateway, not in the model servers' queues.
//!
//! Without it, every request that is not shed goes straight to a replica, and a burst of
//! low-priority work fills the replicas' queues ahead of the high-priority requests that
//! arrive next. With it (feature gate `flowControl`), a request is dispatched only while the
//! pool is below saturation (the same detector that sheds); otherwise it waits here, ordered
//! by priority and then by arrival, and is released when room appears. Sheddable requests
//! (priority < 0) never wait: they are dispatched only when nothing of higher priority is
//! waiting and the pool has room, and are refused with 429 otherwise.
//!
//! The queue is synchronous and clock-free like the rest of the core: [`FlowQueue::admit`]
//! answers at once or hands back a [`Waiter`] future, and the caller must call
//! [`crate::Director::pump_flow`] regularly (every few milliseconds while anything waits) to
//! release waiters; the waiting time limit is the caller's timer around the future.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;

use crate::director::{ErrorKind, PickError};

/// Limits of the waiting queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowConfig {
    pub max_requests: usize,
    pub max_bytes: u64,
    /// How long a request may wait (the caller's timer enforces it).
    pub ttl: Duration,
}

impl FlowConfig {
    /// No limits and no time limit: what flow control switched off amounts to.
    pub const UNLIMITED: FlowConfig = FlowConfig {
        max_requests: usize::MAX,
        max_bytes: u64::MAX,
        ttl: Duration::MAX,
    };
}

impl From<&infergate_api::config::FlowControlConfig> for FlowConfig {
    fn from(c: &infergate_api::config::FlowControlConfig) -> Self {
        FlowConfig {
            max_requests: usize::try_from(c.max_requests).unwrap_or(usize::MAX),
            max_bytes: c.max_bytes,
            ttl: c.default_request_ttl,
        }
    }
}

/// The waiting requests of one picker.
#[derive(Debug, Default)]
pub struct FlowQueue {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Waiting requests in release order: highest priority first, then oldest.
    order: BTreeSet<(std::cmp::Reverse<i32>, u64)>,
    slots: HashMap<u64, Slot>,
    bytes: u64,
    next_id: u64,
    /// Released (or admitted at once) but not yet scheduled: the scheduler has not counted
    /// them in any endpoint's in-flight figures, so the gate must.
    pending: usize,
}

#[derive(Debug)]
struct Slot {
    priority: i32,
    bytes: u64,
    /// When it started waiting.
    since: Duration,
    waker: Option<Waker>,
    /// Set when the request leaves the queue: released (`Ok`) or displaced (`Err`).
    outcome: Option<Result<(), PickError>>,
}

/// The answer to [`FlowQueue::admit`].
#[derive(Debug)]
pub enum Admission {
    /// Dispatch now; keep the ticket until the request is scheduled.
    Now(Ticket),
    /// Wait for the [`Waiter`], under a timer of [`FlowConfig::ttl`].
    Wait(Waiter),
    Refused(PickError),
}

/// Held from admission until the request is scheduled (its in-flight guard exists).
#[derive(Debug)]
pub struct Ticket {
    /// The queue that counts this request as pending; `None` without flow control.
    state: Option<Arc<Mutex<State>>>,
}

impl Ticket {
    /// The ticket of a request admitted without flow control: it is counted nowhere.
    pub fn unqueued() -> Ticket {
        Ticket { state: None }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(state) = &self.state {
            let mut st = state.lock();
            st.pending = st.pending.saturating_sub(1);
        }
    }
}

/// A request waiting in the queue; resolves to a [`Ticket`] when released, or to the
/// refusal when a higher-priority request displaced it. Dropping it (a timeout, a client
/// that went away) takes the request out of the queue.
#[derive(Debug)]
pub struct Waiter {
    state: Arc<Mutex<State>>,
    id: u64,
    done: bool,
}

impl Future for Waiter {
    type Output = Result<Ticket, PickError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.state.lock();
        let Some(slot) = st.slots.get_mut(&self.id) else {
            // Only reachable by polling again after completion.
            return Poll::Ready(Err(PickError::new(
                ErrorKind::Internal,
                "flow-control waiter polled after completion",
            )));
        };
        match slot.outcome.take() {
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Some(outcome) => {
                st.slots.remove(&self.id);
                drop(st);
                self.done = true;
                Poll::Ready(outcome.map(|()| Ticket {
                    state: Some(self.state.clone()),
                }))
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.state.lock();
        if let Some(slot) = st.slots.remove(&self.id) {
            match slot.outcome {
                // Released but never collected: give the dispatch slot back.
                Some(Ok(())) => st.pending = st.pending.saturating_sub(1),
                Some(Err(_)) => {}
                None => {
                    st.order
                        .remove(&(std::cmp::Reverse(slot.priority), self.id));
                    st.bytes -= slot.bytes;
                }
            }
        }
    }
}

impl FlowQueue {
    /// Number of requests waiting.
    pub fn len(&self) -> usize {
        self.state.lock().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests released but not yet scheduled.
    pub fn pending(&self) -> usize {
        self.state.lock().pending
    }

    /// Decide what happens to a request of `priority` with a body of `bytes`, arriving at
    /// `now`. `has_room` says whether the pool can take one more request when `pending`
    /// more are already on their way; it is asked only when the queue holds nothing ahead
    /// of this request.
    pub fn admit(
        &self,
        config: &FlowConfig,
        priority: i32,
        bytes: u64,
        now: Duration,
        has_room: impl FnOnce(usize) -> bool,
    ) -> Admission {
        let mut st = self.state.lock();
        let ahead = st
            .order
            .first()
            .is_some_and(|&(std::cmp::Reverse(p), _)| p >= priority);
        if !ahead && has_room(st.pending) {
            st.pending += 1;
            return Admission::Now(Ticket {
                state: Some(self.state.clone()),
            });
        }
        if priority < 0 {
            return Admission::Refused(PickError::new(
                ErrorKind::Shed,
                format!(
                    "the pool is saturated and this request's priority ({priority}) is sheddable, \
                     so it is not queued; retry later or use an objective with priority >= 0"
                ),
            ));
        }
        // Make room by displacing the newest waiting request of lower priority.
        while st.order.len() + 1 > config.max_requests || st.bytes + bytes > config.max_bytes {
            let Some(&(std::cmp::Reverse(p), victim)) = st.order.last() else {
                break;
            };
            if p >= priority {
                break;
            }
            st.order.pop_last();
            let slot = st.slots.get_mut(&victim).expect("queued slot");
            let freed = slot.bytes;
            slot.outcome = Some(Err(PickError::new(
                ErrorKind::Shed,
                format!(
                    "this request (priority {p}) was waiting for room in a saturated pool and \
                     was displaced by higher-priority work (flowControl queue full); retry later"
                ),
            )));
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
            st.bytes -= freed;
        }
        if st.order.len() + 1 > config.max_requests || st.bytes + bytes > config.max_bytes {
            return Admission::Refused(PickError::new(
                ErrorKind::Shed,
                format!(
                    "the pool is saturated and its flow-control queue is full ({} requests, {} \
                     bytes waiting; limits flowControl.maxRequests {} and maxBytes {}); retry later",
                    st.order.len(),
                    st.bytes,
                    config.max_requests,
                    config.max_bytes
                ),
            ));
        }
        let id = st.next_id;
        st.next_id += 1;
        st.order.insert((std::cmp::Reverse(priority), id));
        st.bytes += bytes;
        st.slots.insert(
            id,
            Slot {
                priority,
                bytes,
                since: now,
                waker: None,
                outcome: None,
            },
        );
        Admission::Wait(Waiter {
            state: self.state.clone(),
            id,
            done: false,
        })
    }

    /// Release waiting requests at `now` while `has_room(pending)` holds; returns how many.
    ///
    /// The best priority goes first. Within it, the oldest goes first, unless it has waited
    /// half its time limit: then the queue is not draining, and first come first served
    /// would make every request wait nearly the whole limit (the oldest is always next), so
    /// the newest goes first (adaptive LIFO) and the oldest are left to time out.
    pub fn release(
        &self,
        config: &FlowConfig,
        now: Duration,
        mut has_room: impl FnMut(usize) -> bool,
    ) -> usize {
        let mut st = self.state.lock();
        let mut released = 0;
        while let Some(&(std::cmp::Reverse(p), oldest)) = st.order.first() {
            if !has_room(st.pending) {
                break;
            }
            let congested = now.saturating_sub(st.slots[&oldest].since) >= config.ttl / 2;
            let key = if congested {
                let band = (std::cmp::Reverse(p), 0)..=(std::cmp::Reverse(p), u64::MAX);
                *st.order
                    .range(band)
                    .next_back()
                    .expect("the band holds `oldest`")
            } else {
                (std::cmp::Reverse(p), oldest)
            };
            st.order.remove(&key);
            let id = key.1;
            st.pending += 1;
            let slot = st.slots.get_mut(&id).expect("queued slot");
            slot.outcome = Some(Ok(()));
            let (bytes, waker) = (slot.bytes, slot.waker.take());
            st.bytes -= bytes;
            if let Some(w) = waker {
                w.wake();
            }
            released += 1;
        }
        released
    }
}

/// Wait for `waiter` until `timer` (a sleep of the request's time limit, `ttl`) fires: the
/// ticket, the 429 of a request displaced by higher-priority work, or the 503 of one that
/// waited too long (it then leaves the queue).
pub async fn wait(
    waiter: Waiter,
    ttl: Duration,
    timer: impl Future<Output = ()>,
) -> Result<Ticket, PickError> {
    let mut waiter = std::pin::pin!(waiter);
    let mut timer = std::pin::pin!(timer);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = waiter.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        timer.as_mut().poll(cx).map(|()| Err(timed_out(ttl)))
    })
    .await
}

/// The metric label for how a wait ended.
pub fn outcome_label(result: &Result<Ticket, PickError>) -> &'static str {
    match result {
        Ok(_) => "dispatched",
        Err(e) if e.kind == ErrorKind::Shed => "displaced",
        Err(_) => "expired",
    }
}

/// The 503 for a request that waited its whole time limit.
pub fn timed_out(ttl: Duration) -> PickError {
    PickError::new(
        ErrorKind::NoEndpoints,
        format!(
            "the pool stayed saturated for the {} ms this request may wait in the flow-control \
             queue (flowControl.defaultRequestTTL); retry later",
            ttl.as_millis()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    const T0: Duration = Duration::from_secs(100);
    const CFG: FlowConfig = FlowConfig {
        max_requests: 3,
        max_bytes: 1000,
        ttl: Duration::from_secs(1),
    };

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(w: &mut Waiter, waker: &Waker) -> Poll<Result<Ticket, PickError>> {
        Pin::new(w).poll(&mut Context::from_waker(waker))
    }

    fn wait(a: Admission) -> Waiter {
        match a {
            Admission::Wait(w) => w,
            other => panic!("expected to wait, got {other:?}"),
        }
    }

    #[test]
    fn with_room_and_nobody_ahead_a_request_goes_at_once() {
        let q = FlowQueue::default();
        let t = match q.admit(&CFG, 0, 10, T0, |pending| pending == 0) {
            Admission::Now(t) => t,
            other => panic!("{other:?}"),
        };
        assert_eq!(q.pending(), 1);
        // The next one sees the first as pending, and the gate says no.
        let _w = wait(q.admit(&CFG, 0, 10, T0, |pending| pending == 0));
        drop(t);
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn waiters_are_released_by_priority_then_arrival() {
        let q = FlowQueue::default();
        let counter = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut low = wait(q.admit(&CFG, 0, 1, T0, |_| false));
        let mut high1 = wait(q.admit(&CFG, 5, 1, T0, |_| false));
        let mut high2 = wait(q.admit(&CFG, 5, 1, T0, |_| false));
        for w in [&mut low, &mut high1, &mut high2] {
            assert!(poll(w, &waker).is_pending());
        }
        assert_eq!(q.release(&CFG, T0, |pending| pending < 1), 1);
        assert!(poll(&mut low, &waker).is_pending());
        assert!(poll(&mut high2, &waker).is_pending());
        let t1 = match poll(&mut high1, &waker) {
            Poll::Ready(Ok(t)) => t,
            other => panic!("{other:?}"),
        };
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        drop(t1);
        assert_eq!(q.release(&CFG, T0, |pending| pending < 1), 1);
        assert!(matches!(poll(&mut high2, &waker), Poll::Ready(Ok(_))));
        assert_eq!(q.release(&CFG, T0, |pending| pending < 1), 1);
        assert!(matches!(poll(&mut low, &waker), Poll::Ready(Ok(_))));
        assert!(q.is_empty());
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn a_queue_that_does_not_drain_serves_the_newest_first() {
        let q = FlowQueue::default();
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        // CFG's limit is 1 s: the oldest has waited 0.6 s when room appears.
        let mut old = wait(q.admit(&CFG, 0, 1, T0, |_| false));
        let later = T0 + Duration::from_millis(600);
        let mut new = wait(q.admit(&CFG, 0, 1, later, |_| false));
        let mut best = wait(q.admit(&CFG, 5, 1, later, |_| false));
        assert_eq!(q.release(&CFG, later, |pending| pending < 2), 2);
        // Priority still comes first; within priority 0 the newer request goes.
        assert!(matches!(poll(&mut best, &waker), Poll::Ready(Ok(_))));
        assert!(matches!(poll(&mut new, &waker), Poll::Ready(Ok(_))));
        assert!(poll(&mut old, &waker).is_pending());
        // A queue that drains (nothing older than half the limit) stays first come first
        // served: see `waiters_are_released_by_priority_then_arrival`.
    }

    #[test]
    fn sheddable_work_never_waits_and_never_jumps_the_queue() {
        let q = FlowQueue::default();
        let _w = wait(q.admit(&CFG, 0, 1, T0, |_| false));
        // Room, but a better request waits: refused.
        match q.admit(&CFG, -1, 1, T0, |_| true) {
            Admission::Refused(e) => {
                assert_eq!(e.kind.status(), 429);
                assert!(e.message.contains("sheddable"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        let q = FlowQueue::default();
        assert!(matches!(
            q.admit(&CFG, -1, 1, T0, |_| false),
            Admission::Refused(_)
        ));
        assert!(matches!(
            q.admit(&CFG, -1, 1, T0, |_| true),
            Admission::Now(_)
        ));
    }

    #[test]
    fn a_full_queue_displaces_lower_priority_or_refuses() {
        let q = FlowQueue::default();
        let counter = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut old_low = wait(q.admit(&CFG, 0, 1, T0, |_| false));
        let mut new_low = wait(q.admit(&CFG, 0, 1, T0, |_| false));
        let _mid = wait(q.admit(&CFG, 3, 1, T0, |_| false));
        assert!(poll(&mut new_low, &waker).is_pending());
        // Full: a priority-0 arrival is refused, a priority-9 one displaces the newest 0.
        match q.admit(&CFG, 0, 1, T0, |_| false) {
            Admission::Refused(e) => assert!(e.message.contains("queue is full"), "{}", e.message),
            other => panic!("{other:?}"),
        }
        let _high = wait(q.admit(&CFG, 9, 1, T0, |_| false));
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "the displaced waiter is woken"
        );
        match poll(&mut new_low, &waker) {
            Poll::Ready(Err(e)) => {
                assert_eq!(e.kind.status(), 429);
                assert!(e.message.contains("displaced"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        assert!(poll(&mut old_low, &waker).is_pending());
        assert_eq!(q.len(), 3);
        // Bytes count too.
        let q = FlowQueue::default();
        let _a = wait(q.admit(&CFG, 0, 900, T0, |_| false));
        assert!(matches!(
            q.admit(&CFG, 0, 200, T0, |_| false),
            Admission::Refused(_)
        ));
    }

    #[test]
    fn a_dropped_waiter_leaves_the_queue_and_frees_its_slot() {
        let q = FlowQueue::default();
        let w = wait(q.admit(&CFG, 0, 100, T0, |_| false));
        drop(w);
        assert!(q.is_empty());
        // Released but dropped before it was polled: the pending count comes back.
        let w = wait(q.admit(&CFG, 0, 100, T0, |_| false));
        assert_eq!(q.release(&CFG, T0, |_| true), 1);
        assert_eq!(q.pending(), 1);
        drop(w);
        assert_eq!(q.pending(), 0);
        assert_eq!(q.state.lock().bytes, 0);
        assert!(q.state.lock().slots.is_empty());
    }
}

//! Flow control in `serve`: whether a request may be scheduled now, and the wait in the
//! director's queue when the pool is saturated (feature gate `flowControl`).

use std::time::Duration;

use infergate_core::flow::{self, Admission, Ticket};
use infergate_core::{PickError, RequestInput};

use crate::Gateway;

impl Gateway {
    /// `Ok(None)` without flow control. Otherwise `Ok(ticket)` once the request may be
    /// scheduled (hold the ticket until it is), after waiting in the queue if need be, or
    /// the refusal: 429 for sheddable work, a full queue or a displaced request, 503 after
    /// `flowControl.defaultRequestTTL`. A client that goes away drops this future, which
    /// takes its request out of the queue.
    pub(crate) async fn admission(
        &self,
        input: &RequestInput<'_>,
    ) -> Result<Option<Ticket>, PickError> {
        let Some(flow_cfg) = self.director.config().flow else {
            return Ok(None);
        };
        // Reading the body twice (here and when scheduling) costs microseconds, and only
        // with flow control on.
        let priority = self.director.prepare(input)?.priority();
        let bytes = input.body.map_or(0, |b| b.len() as u64);
        let t0 = (self.clock)();
        match self.director.admit(priority, bytes, t0) {
            Admission::Now(ticket) => Ok(Some(ticket)),
            Admission::Refused(e) => {
                self.metrics.flow_wait(priority, "rejected", Duration::ZERO);
                Err(e)
            }
            Admission::Wait(waiter) => {
                let ttl = flow_cfg.ttl;
                let result = flow::wait(waiter, ttl, tokio::time::sleep(ttl)).await;
                let waited = (self.clock)().saturating_sub(t0);
                self.metrics
                    .flow_wait(priority, flow::outcome_label(&result), waited);
                result.map(Some)
            }
        }
    }
}

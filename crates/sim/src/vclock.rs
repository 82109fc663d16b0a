//! A discrete-event driver: many engines on one virtual clock, no sockets, no sleeping.
//!
//! The clock jumps from event to event. The caller interleaves its own arrivals with the
//! engines' step ends by calling [`Cluster::run_until`] with the time of its next arrival,
//! handling the [`Event`]s it returns, then [`Cluster::submit`]ting the arrival. A router
//! under test (the `core` scheduler, in the benchmark lab) decides which engine gets each
//! request from [`Cluster::engine`]'s state, exactly as it would from scraped metrics.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::engine::{Engine, Output, RequestId, SimRequest};

/// Something an engine produced at a virtual time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Event {
    pub time: f64,
    pub engine: usize,
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct StepEnd {
    time: f64,
    engine: usize,
}

impl Eq for StepEnd {}

impl Ord for StepEnd {
    fn cmp(&self, other: &Self) -> Ordering {
        // Earliest first; ties by engine index so runs are reproducible.
        other
            .time
            .total_cmp(&self.time)
            .then_with(|| other.engine.cmp(&self.engine))
    }
}

impl PartialOrd for StepEnd {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Engines sharing a virtual clock.
pub struct Cluster {
    engines: Vec<Engine>,
    ends: BinaryHeap<StepEnd>,
    now: f64,
    scratch: Vec<Output>,
    steps: u64,
}

impl Cluster {
    pub fn new(engines: Vec<Engine>) -> Cluster {
        Cluster {
            engines,
            ends: BinaryHeap::new(),
            now: 0.0,
            scratch: Vec::new(),
            steps: 0,
        }
    }

    /// The virtual time, in seconds.
    pub fn now(&self) -> f64 {
        self.now
    }

    pub fn len(&self) -> usize {
        self.engines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.engines.is_empty()
    }

    pub fn engine(&self, i: usize) -> &Engine {
        &self.engines[i]
    }

    pub fn engines(&self) -> &[Engine] {
        &self.engines
    }

    /// Steps run so far, over all engines.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Gives `req` to engine `i` now. An idle engine starts a step at once.
    pub fn submit(&mut self, i: usize, req: SimRequest) -> RequestId {
        let id = self.engines[i].add(req, self.now);
        self.kick(i);
        id
    }

    /// Aborts a request on engine `i`.
    pub fn abort(&mut self, i: usize, id: RequestId) -> bool {
        let ok = self.engines[i].abort(id);
        self.kick(i);
        ok
    }

    /// Processes every step that ends at or before `until`, appending what they produced to
    /// `out` in time order, then sets the clock to `until`.
    pub fn run_until(&mut self, until: f64, out: &mut Vec<Event>) {
        while let Some(&end) = self.ends.peek() {
            if end.time > until {
                break;
            }
            self.ends.pop();
            self.now = end.time;
            self.finish(end.engine, out);
        }
        self.now = self.now.max(until);
    }

    /// Runs until every engine is idle; returns the time that happened.
    pub fn run_to_idle(&mut self, out: &mut Vec<Event>) -> f64 {
        while let Some(end) = self.ends.pop() {
            self.now = end.time;
            self.finish(end.engine, out);
        }
        self.now
    }

    /// Time of the next step end, if any engine is busy.
    pub fn next_event(&self) -> Option<f64> {
        self.ends.peek().map(|e| e.time)
    }

    fn finish(&mut self, i: usize, out: &mut Vec<Event>) {
        let mut outs = std::mem::take(&mut self.scratch);
        self.engines[i].finish_step(&mut outs);
        self.steps += 1;
        let now = self.now;
        out.extend(outs.drain(..).map(|output| Event {
            time: now,
            engine: i,
            output,
        }));
        self.scratch = outs;
        self.kick(i);
    }

    fn kick(&mut self, i: usize) {
        let e = &mut self.engines[i];
        if e.in_flight().is_none() {
            if let Some(plan) = e.begin_step(self.now) {
                self.ends.push(StepEnd {
                    time: plan.end,
                    engine: i,
                });
            }
        }
    }
}

//! What the scrape-loop tests share: a vLLM metrics page, a clock, a running scrape loop
//! and ways to read and wait on what it wrote into the datastore.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use infergate_core::{Datastore, Endpoint, EndpointSpec, Engine};
use infergate_scrape::scraper::{run_with_stats, Clock, ScrapeConfig, ScrapeStats};
use tokio::task::JoinHandle;

/// A vLLM `/metrics` page with these queue and KV-cache values.
pub fn vllm_page(waiting: u32, running: u32, kv: f64) -> String {
    format!(
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"m\"}} {waiting}.0\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} {running}.0\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"m\"}} {kv}\n"
    )
}

pub fn mk_clock() -> Clock {
    let start = Instant::now();
    Arc::new(move || start.elapsed())
}

pub fn mk_config() -> ScrapeConfig {
    ScrapeConfig {
        timeout: Duration::from_millis(300),
        ..ScrapeConfig::default()
    }
}

pub fn vllm(addr: SocketAddr) -> EndpointSpec {
    EndpointSpec::new(addr, Engine::Vllm)
}

/// Runs the scrape loop until dropped.
pub struct Running {
    pub stats: ScrapeStats,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn start_scraping(datastore: &Datastore, config: ScrapeConfig) -> Running {
    let stats = ScrapeStats::new();
    let task = tokio::spawn(run_with_stats(
        datastore.clone(),
        config,
        mk_clock(),
        stats.clone(),
    ));
    Running { stats, task }
}

pub fn endpoint(datastore: &Datastore, addr: SocketAddr) -> Arc<Endpoint> {
    datastore
        .snapshot()
        .endpoint(addr)
        .expect("endpoint in datastore")
        .clone()
}

pub fn updated_at(datastore: &Datastore, addr: SocketAddr) -> Option<Duration> {
    endpoint(datastore, addr).sample().updated_at
}

pub async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

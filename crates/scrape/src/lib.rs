//! Model-server metrics for infergate: a hardened Prometheus text parser ([`text`]), the
//! per-engine metric mappings of vLLM, SGLang, TensorRT-LLM, Triton and llama.cpp
//! ([`engines`]), and the loop that scrapes every endpoint of a
//! [`Datastore`](infergate_core::Datastore) and writes the results in ([`scraper`]), over
//! plain HTTP or over HTTPS with the trust set up in [`tls`].
//!
//! `text` and `engines` are pure; `scraper` does the network I/O, and `tls` reads a CA
//! bundle once, at start.

pub mod engines;
pub mod scraper;
pub mod text;
pub mod tls;

pub use engines::{extract, ExtractError};
pub use scraper::{
    run, run_with_stats, Clock, EndpointScrapeHealth, ScrapeConfig, ScrapeCounts, ScrapeError,
    ScrapeStats,
};
pub use text::{parse, Label, ParseError, Sample};
pub use tls::{ScrapeTls, TlsSetupError, Transport, Trust};

//! Model-server metrics for infergate: a hardened Prometheus text parser ([`text`]), the
//! per-engine metric mappings of vLLM, SGLang, TensorRT-LLM, Triton and llama.cpp
//! ([`engines`]), and the loop that scrapes every endpoint of a
//! [`Datastore`](infergate_core::Datastore) and writes the results in ([`scraper`]).
//!
//! `text` and `engines` are pure; only `scraper` does I/O.

pub mod engines;
pub mod scraper;
pub mod text;

pub use engines::{extract, ExtractError};
pub use scraper::{
    run, run_with_stats, Clock, EndpointScrapeHealth, ScrapeConfig, ScrapeCounts, ScrapeError,
    ScrapeStats,
};
pub use text::{parse, Label, ParseError, Sample};

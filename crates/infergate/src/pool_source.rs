//! Static pool sources: `--endpoints` and `--pool-file`, the latter re-read when it changes.
//!
//! A pool file is checked in full before anything is applied, so an invalid edit leaves the
//! last good pool serving and says exactly what is wrong (file, line, field).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use infergate_api::pool_file::PoolFile;
use infergate_core::{build, Datastore};

/// Load `path` and apply it to `ds`.
pub fn apply_file(ds: &Datastore, path: &Path) -> anyhow::Result<usize> {
    let file = PoolFile::load(path)?;
    let endpoints = build::endpoints(&file);
    if endpoints.is_empty() {
        // Legitimate (a pool scaled to zero); requests get 503 until endpoints appear.
        tracing::warn!(file = %path.display(), "the pool file lists no endpoints; requests will get 503");
    }
    let n = endpoints.len();
    ds.set_endpoints(endpoints);
    ds.set_policy(build::policy(&file));
    Ok(n)
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Re-apply `path` whenever its modification time or size changes, polling every `every`.
/// Polling (rather than inotify) also sees ConfigMap symlink swaps and network filesystems.
pub async fn watch_file(ds: Datastore, path: PathBuf, every: Duration) {
    let mut last = stamp(&path);
    let mut last_text = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        let text = std::fs::read(&path).ok();
        if text == last_text {
            continue;
        }
        last_text = text;
        match apply_file(&ds, &path) {
            Ok(n) => tracing::info!(file = %path.display(), endpoints = n, "pool file reloaded"),
            Err(e) => tracing::error!(
                file = %path.display(),
                "pool file edit refused, still serving the last good pool: {e:#}"
            ),
        }
    }
}

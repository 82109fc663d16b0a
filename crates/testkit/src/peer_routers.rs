//! Installing the peer routers (PyPI `sglang-router` and `vllm-router`) for the benchmarks
//! that compare against them: `scripts/install-routers.sh` makes a venv under `target/` and
//! prints the path of its python on its last line.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the install script `script` (at most 600 s) and returns the python it printed.
/// `Err` says why the peer routers cannot run.
pub fn run_install_script(script: &Path) -> Result<PathBuf, String> {
    let mut child = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} took more than 600 s", script.display()));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "installing the peer routers failed ({}: {})",
            script.display(),
            out.status
        ));
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    if path.is_empty() {
        return Err(format!("{} printed no python path", script.display()));
    }
    Ok(PathBuf::from(path))
}

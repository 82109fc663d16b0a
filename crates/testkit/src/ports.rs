//! Ports on 127.0.0.1: picking a free one and waiting until one accepts connections.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 that was free a moment ago.
///
/// The port is released before returning, so another process may take it first; prefer
/// binding to port 0 directly where the server allows it.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 must work on a test machine")
}

/// Waits until `addr` accepts a TCP connection, retrying every 10 ms until `timeout`.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        let err = match attempt {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connect timed out".to_string(),
        };
        if Instant::now() >= deadline {
            anyhow::bail!(
                "{addr} did not accept a connection within {timeout:?} (last error: {err})"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

//! The gRPC side: one [`Exchange`] per ext_proc stream, and the health service.
//!
//! Each stream's replies are a lazy stream over Envoy's messages: each message is fed to the
//! exchange as tonic asks for the next reply. When the stream ends for any reason the
//! exchange is dropped, which releases the request's in-flight count.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use infergate_core::flow;

use crate::protocol::{Context, Exchange};

/// Health service names the GIE defines; `readiness` and the ext_proc name follow readiness.
pub const HEALTH_SERVICES: [&str; 3] = [
    "liveness",
    "readiness",
    "envoy.service.ext_proc.v3.ExternalProcessor",
];

/// The ext_proc service.
#[derive(Debug, Clone)]
pub struct Picker {
    ctx: Arc<Context>,
}

impl Picker {
    pub fn new(ctx: Arc<Context>) -> Self {
        Picker { ctx }
    }

    /// The tonic service, with message limits sized for the configured body limit.
    pub fn into_server(self) -> ExternalProcessorServer<Picker> {
        let limit = self.ctx.options.max_body_bytes.saturating_add(1 << 20);
        ExternalProcessorServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }
}

/// Per-stream state: Envoy's messages in, the exchange, replies not yet sent.
struct StreamState {
    inbound: Streaming<ProcessingRequest>,
    exchange: Exchange,
    pending: VecDeque<ProcessingResponse>,
    /// Messages that arrived while the request waited in the flow-control queue.
    held: VecDeque<ProcessingRequest>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Picker {
    type ProcessStream = ReplyStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let inbound = request.into_inner();
        let ctx = self.ctx.clone();
        let idle = ctx.options.idle_timeout;
        let state = StreamState {
            inbound,
            exchange: Exchange::new(ctx),
            pending: VecDeque::new(),
            held: VecDeque::new(),
        };
        // Replies are produced in the task tonic already polls for this stream, so a message
        // costs no extra task wake-up or channel hop. Dropping the stream (Envoy gone) drops
        // the exchange, which releases the request.
        let replies = futures::stream::unfold(state, move |mut st| async move {
            loop {
                if let Some(r) = st.pending.pop_front() {
                    return Some((Ok(r), st));
                }
                let msg = match tokio::time::timeout(idle, st.inbound.next()).await {
                    Ok(Some(Ok(m))) => m,
                    Ok(None) => return None,
                    Ok(Some(Err(e))) => {
                        tracing::debug!(error = %e, "ext_proc stream ended with an error");
                        return None;
                    }
                    Err(_) => {
                        tracing::warn!(
                            ?idle,
                            "ext_proc stream idle too long; dropping it and its in-flight count"
                        );
                        return None;
                    }
                };
                st.pending.extend(st.exchange.on_message(msg));
                if let Some((waiter, ttl)) = st.exchange.take_waiter() {
                    // Flow control holds the request. Envoy's further messages wait their
                    // turn; if Envoy ends the stream (the client left), the waiter is
                    // dropped and leaves the queue.
                    let wait = flow::wait(waiter, ttl, tokio::time::sleep(ttl));
                    tokio::pin!(wait);
                    let outcome = loop {
                        tokio::select! {
                            outcome = &mut wait => break outcome,
                            msg = st.inbound.next() => match msg {
                                Some(Ok(m)) => st.held.push_back(m),
                                _ => {
                                    tracing::debug!("ext_proc stream ended while its request waited in the flow-control queue");
                                    return None;
                                }
                            },
                        }
                    };
                    st.pending.extend(st.exchange.resume(outcome));
                    while let Some(m) = st.held.pop_front() {
                        st.pending.extend(st.exchange.on_message(m));
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

/// Serve ext_proc on `addr` until `shutdown` resolves.
///
/// With `tls` (a PEM certificate chain and key) the port speaks only TLS, as the reference
/// picker's does by default; gateways connect with TLS and, by default, skip verification.
pub async fn serve_extproc(
    picker: Picker,
    addr: SocketAddr,
    tls: Option<tonic::transport::Identity>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let mut server = tonic::transport::Server::builder();
    if let Some(identity) = tls {
        server = server.tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(identity)
                // A client that never finishes its handshake must not hold a task forever.
                .timeout(std::time::Duration::from_secs(10)),
        )?;
    }
    server
        // Fixed, generous windows: adaptive sizing adds ping frames to every burst, and
        // bodies of many megabytes must not stall on flow control.
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_service(picker.into_server())
        .serve_with_shutdown(addr, shutdown)
        .await
}

/// Serve gRPC health on `addr`; returns the reporter to flip readiness with.
pub async fn health_service() -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    (reporter, service)
}

/// Mark every GIE health service as serving or not.
pub async fn set_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    for name in HEALTH_SERVICES {
        let status = if serving || name == "liveness" {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter.set_service_status(name, status).await;
    }
    reporter
        .set_service_status(
            "",
            if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            },
        )
        .await;
}

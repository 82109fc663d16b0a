//! The gRPC side: one [`Exchange`] per ext_proc stream, and the health service.
//!
//! Each stream gets its own task that reads Envoy's messages in order, feeds them to the
//! exchange and forwards the replies; when the stream ends for any reason the exchange is
//! dropped, which releases the request's in-flight count.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

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

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Picker {
    type ProcessStream = ReplyStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let idle = ctx.options.idle_timeout;
            let mut exchange = Exchange::new(ctx);
            loop {
                let msg = match tokio::time::timeout(idle, inbound.next()).await {
                    Ok(Some(Ok(m))) => m,
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        tracing::debug!(error = %e, "ext_proc stream ended with an error");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(
                            ?idle,
                            "ext_proc stream idle too long; dropping it and its in-flight count"
                        );
                        break;
                    }
                };
                for reply in exchange.on_message(msg) {
                    if tx.send(Ok(reply)).await.is_err() {
                        return; // Envoy went away; dropping the exchange releases the request.
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serve ext_proc on `addr` until `shutdown` resolves.
pub async fn serve_extproc(
    picker: Picker,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .http2_adaptive_window(Some(true))
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

//! The HTTP gateway: accepts connections (hyper 1, HTTP/1.1 and h2c), answers its own
//! endpoints (`/health`, `/health/ready`), routes everything else by host and path
//! ([`router`], through the registry) to the component's slot, which runs it on the one
//! invocation path (`crate::runtime::invoke`). A tenant past its request rate gets 429
//! with `Retry-After` before anything is instantiated. Unrouted requests get a JSON 404.
//! `/metrics` is not here: it is the admin listener's.

pub mod router;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::capabilities::outbound::ResponseBody;
use crate::deploy::registry::Registry;
use crate::runtime::invoke::{error, json};
use crate::tenancy::Tenant;

pub type GatewayBody = ResponseBody;

/// How long in-flight requests may run on after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// What the gateway shares across connections.
pub struct Gateway {
    /// The components; routed requests get 503 until it is ready.
    pub registry: Arc<Registry>,
    /// Used as the `Host` a guest sees when a client sent none (HTTP/1.0).
    pub local_addr: SocketAddr,
}

impl Gateway {
    pub fn new(registry: Arc<Registry>, local_addr: SocketAddr) -> Self {
        Self {
            registry,
            local_addr,
        }
    }

    /// Accepts connections until `shutdown` resolves, then lets in-flight requests finish
    /// (up to a grace period).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            // Small request/response exchanges; Nagle would add up to 40 ms per response.
            let _ = stream.set_nodelay(true);
            let gateway = self.clone();
            let service = hyper::service::service_fn(move |request| {
                let gateway = gateway.clone();
                async move { Ok::<_, Infallible>(gateway.handle(request).await) }
            });
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        tracing::info!("shutting down: waiting for in-flight requests");
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight requests still running after {SHUTDOWN_GRACE:?}; closing anyway"
            );
        }
    }

    pub async fn handle(&self, request: Request<Incoming>) -> Response<GatewayBody> {
        match request.uri().path() {
            "/health" => return json(StatusCode::OK, serde_json::json!({"status": "live"})),
            "/health/ready" => return self.readiness(),
            _ => {}
        }
        if !self.registry.is_ready() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "starting",
                "the node is still loading its components",
                None,
            );
        }
        let host = request_host(&request).unwrap_or_default();
        let Some(slot) = self.registry.route(host, request.uri().path()) else {
            self.registry.metrics.count_unrouted();
            let message = format!(
                "no component serves {} on host {host:?}",
                request.uri().path()
            );
            return error(StatusCode::NOT_FOUND, "no_route", &message, None);
        };
        if let Err(wait) = slot.owner.admit_request() {
            return rate_limited(&slot.owner, wait);
        }
        slot.serve_http(request, self.local_addr).await
    }

    fn readiness(&self) -> Response<GatewayBody> {
        if !self.registry.is_ready() {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "loading"}),
            );
        }
        let components: Vec<_> = self
            .registry
            .slots()
            .iter()
            .map(|slot| serde_json::json!({"tenant": &*slot.tenant, "component": &*slot.name}))
            .collect();
        json(
            StatusCode::OK,
            serde_json::json!({"status": "ready", "components": components}),
        )
    }
}

/// 429 for a tenant past its `quota.requests_per_second`, with when to come back.
fn rate_limited(tenant: &Tenant, wait: Duration) -> Response<GatewayBody> {
    let limit = tenant.quota().requests_per_second.unwrap_or_default();
    let mut response = error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        &format!("the tenant's quota of {limit} requests per second is used up; retry later"),
        None,
    );
    // Whole seconds, rounded up (RFC 9110); never 0, which would invite a busy loop.
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, http::HeaderValue::from(seconds.max(1)));
    response
}

/// The host a request was sent to: the `Host` header (HTTP/1.1) or the URI authority (h2).
fn request_host<B>(request: &Request<B>) -> Option<&str> {
    request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
}

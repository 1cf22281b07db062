//! The HTTP gateway: accepts connections (hyper 1, HTTP/1.1 and h2c), answers its own
//! endpoints (`/health`, `/health/ready`, `/metrics`) and dispatches everything else to a
//! fresh instance of the routed component.
//!
//! Order on the request path, each step cheap before the next expensive one: route (404),
//! declared body size (413), admission permit (503, never a wait), read an undeclared-length
//! body up to the limit (413), then a new `Store`, instantiate from the pre-instance, call
//! `wasi:http/incoming-handler`. The permit is held by the task that runs the instance until
//! the instance is gone, including while it streams its response body.
//!
//! The instance runs inside the connection's task; only one that is still running when its
//! response head is ready (it streams a body) is moved to a task of its own.
//!
//! Every failure the client sees is JSON: `{"error": CODE, "message": ..., "component": ...}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiBody, WasiHttpView};

use crate::component::{DeadlineExceeded, Deployment};
use crate::metrics::{ComponentMetrics, Metrics};
use crate::router::Router;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// How long in-flight requests may run on after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// What the gateway shares across connections.
pub struct Gateway {
    /// Set once every component has loaded; until then routed requests get 503.
    pub router: OnceLock<Router>,
    pub metrics: Metrics,
    /// Used as the `Host` a guest sees when a client sent none (HTTP/1.0).
    pub local_addr: SocketAddr,
}

impl Gateway {
    pub fn new(local_addr: SocketAddr) -> Self {
        Self {
            router: OnceLock::new(),
            metrics: Metrics::default(),
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
            "/metrics" => return self.metrics_response(),
            _ => {}
        }
        let Some(router) = self.router.get() else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "starting",
                "the node is still loading its components",
                None,
            );
        };
        let host = request_host(&request).unwrap_or_default();
        let Some(deployment) = router.route(&host, request.uri().path()) else {
            self.metrics.count_unrouted();
            let message = format!(
                "no component serves {} on host {host:?}",
                request.uri().path()
            );
            return error(StatusCode::NOT_FOUND, "no_route", &message, None);
        };
        self.dispatch_counted(deployment, request).await
    }

    fn readiness(&self) -> Response<GatewayBody> {
        match self.router.get() {
            Some(router) => {
                let components: Vec<_> = router
                    .deployments()
                    .iter()
                    .map(|d| serde_json::json!({"tenant": &*d.tenant, "component": &*d.name}))
                    .collect();
                json(
                    StatusCode::OK,
                    serde_json::json!({"status": "ready", "components": components}),
                )
            }
            None => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "loading"}),
            ),
        }
    }

    fn metrics_response(&self) -> Response<GatewayBody> {
        let mut response = Response::new(full(self.metrics.encode()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        response
    }

    /// Serves a request from one component to another of the same tenant, in-process
    /// (`http://NAME.internal/...`), with the callee's own limits and deadline. `None` when
    /// the tenant has no such component or the node is not ready.
    pub async fn call_component(
        &self,
        tenant: &str,
        component: &str,
        request: Request<WasiBody>,
    ) -> Option<Response<GatewayBody>> {
        let deployment = self.router.get()?.component(tenant, component)?;
        Some(self.dispatch_counted(deployment, request).await)
    }

    /// [`dispatch`](Self::dispatch), with the request's latency and status recorded.
    async fn dispatch_counted<B>(
        &self,
        deployment: &Arc<Deployment>,
        request: Request<B>,
    ) -> Response<GatewayBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error> + Into<BoxError>,
    {
        let started = Instant::now();
        let response = self.dispatch(deployment, request).await;
        deployment
            .metrics
            .request_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .count_response(&deployment.metrics, response.status().as_u16());
        response
    }

    async fn dispatch<B>(
        &self,
        deployment: &Arc<Deployment>,
        request: Request<B>,
    ) -> Response<GatewayBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error> + Into<BoxError>,
    {
        let name = &*deployment.name;
        let max_body = deployment.limits.max_body.as_u64();
        let declared_length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|len| len > max_body) {
            return body_too_large(deployment);
        }

        let Some(permit) = deployment.try_admit() else {
            deployment.metrics.admission_rejections.inc();
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                &format!(
                    "component is at its limit of {} concurrent requests",
                    deployment.limits.max_concurrent
                ),
                Some(name),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        };

        let deadline = Instant::now() + deployment.limits.deadline;
        let (mut parts, body) = request.into_parts();
        if !parts.headers.contains_key(header::HOST) && parts.uri.authority().is_none() {
            parts.headers.insert(
                header::HOST,
                HeaderValue::from_str(&self.local_addr.to_string())
                    .expect("an address is a valid header"),
            );
        }
        // A body of unknown length is read (up to the limit, within the deadline) before the
        // guest runs, so that "too large" is a clean 413 rather than a guest read error.
        let body: UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error> =
            if declared_length.is_none() && !body.is_end_stream() {
                let collect = Limited::new(body, max_body as usize).collect();
                match tokio::time::timeout_at(deadline.into(), collect).await {
                    Ok(Ok(collected)) => Full::new(collected.to_bytes())
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                    Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                        return body_too_large(deployment);
                    }
                    Ok(Err(e)) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "bad_body",
                            &format!("reading the request body failed: {e}"),
                            Some(name),
                        );
                    }
                    Err(_) => return deadline_response(deployment),
                }
            } else {
                body.map_err(Into::into).boxed_unsync()
            };
        let request = Request::from_parts(parts, body);

        let mut store = match deployment.new_store(deadline) {
            Ok(store) => store,
            Err(e) => {
                tracing::error!(component = name, error = %format!("{e:#}"), "creating the instance state failed");
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "could not prepare the component",
                    Some(name),
                );
            }
        };
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let resources = {
            let mut http = store.data_mut().http();
            http.new_incoming_request(Scheme::Http, request)
                .and_then(|req| Ok((req, http.new_response_outparam(sender)?)))
        };
        let (guest_request, response_out) = match resources {
            Ok(resources) => resources,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("{e:#}"),
                    Some(name),
                );
            }
        };

        let instance = deployment.clone();
        let mut run_instance = Box::pin(async move {
            let _permit = permit;
            let _in_flight = InFlight::enter(&instance.metrics);
            let run = async {
                let instantiating = Instant::now();
                let Some(http) = instance.http() else {
                    wasmtime::bail!("the component does not export wasi:http/incoming-handler");
                };
                let proxy = http.instantiate_async(&mut store).await?;
                instance
                    .metrics
                    .instantiation_duration
                    .observe(instantiating.elapsed().as_secs_f64());
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, guest_request, response_out)
                    .await
            };
            let outcome = match tokio::time::timeout_at(deadline.into(), run).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Failure::classify(e, store.data().limiter.refused)),
                Err(_) => Err(Failure::Deadline),
            };
            if let Err(failure) = &outcome {
                failure.record(&instance);
            }
            outcome
        });

        // Run the instance here, in the connection's task: most guests answer and finish in
        // one go, and a spawned task would cost a cross-thread wakeup per request. Only a
        // guest still running when its response head is ready (streaming a body) moves to
        // a task of its own, which keeps the permit until it ends.
        let mut receiver = receiver;
        let first = tokio::select! {
            biased;
            outcome = &mut run_instance => First::Finished(outcome),
            head = &mut receiver => First::Head(head),
        };
        let (head, outcome) = match first {
            First::Finished(outcome) => (receiver.await, Some(outcome)),
            First::Head(Ok(head)) => {
                tokio::spawn(run_instance);
                (Ok(head), None)
            }
            First::Head(Err(closed)) => (Err(closed), Some(run_instance.await)),
        };

        match head {
            Ok(Ok(response)) => response.map(|body| body.map_err(BoxError::from).boxed_unsync()),
            Ok(Err(code)) => {
                tracing::warn!(component = name, error = ?code, "component answered with an error code");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "component_error",
                    &format!("{code:?}"),
                    Some(name),
                )
            }
            // The guest dropped the response outparam without setting it: find out why.
            Err(_) => match outcome {
                Some(Err(failure)) => failure.response(deployment),
                Some(Ok(())) | None => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "no_response",
                    "the component returned without sending a response",
                    Some(name),
                ),
            },
        }
    }
}

/// Which came first: the instance finishing, or its response head.
enum First {
    Finished(Result<(), Failure>),
    Head(
        Result<
            Result<Response<HyperOutgoingBody>, ErrorCode>,
            tokio::sync::oneshot::error::RecvError,
        >,
    ),
}

/// Why an instance did not finish its call.
#[derive(Debug)]
enum Failure {
    Deadline,
    MemoryLimit,
    /// The node-wide instance pool is exhausted.
    PoolExhausted,
    Trap(String),
}

impl Failure {
    fn classify(error: wasmtime::Error, memory_refused: bool) -> Self {
        if error.downcast_ref::<DeadlineExceeded>().is_some() {
            Failure::Deadline
        } else if error
            .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            .is_some()
        {
            Failure::PoolExhausted
        } else if memory_refused {
            Failure::MemoryLimit
        } else {
            tracing::debug!(error = ?error, "guest trap details");
            let reason = match error.downcast_ref::<wasmtime::Trap>() {
                Some(trap) => trap.to_string(),
                None => error.root_cause().to_string(),
            };
            Failure::Trap(reason)
        }
    }

    /// Logs and counts a failure; runs in the instance task, so it happens even when the
    /// response head was already sent.
    fn record(&self, deployment: &Deployment) {
        let (tenant, component) = (&*deployment.tenant, &*deployment.name);
        match self {
            Failure::Deadline => {
                deployment.metrics.deadline_kills.inc();
                tracing::warn!(tenant, component, deadline = ?deployment.limits.deadline, "instance stopped at its request deadline");
            }
            Failure::MemoryLimit => {
                deployment.metrics.memory_limit_kills.inc();
                tracing::warn!(tenant, component, limit = %deployment.limits.memory, "instance stopped: it tried to grow memory past its limit");
            }
            Failure::PoolExhausted => {
                deployment.metrics.admission_rejections.inc();
                tracing::warn!(
                    tenant,
                    component,
                    "node instance pool exhausted (node.max_instances)"
                );
            }
            Failure::Trap(reason) => {
                deployment.metrics.traps.inc();
                tracing::warn!(tenant, component, reason = %reason, "guest trapped");
            }
        }
    }

    fn response(&self, deployment: &Deployment) -> Response<GatewayBody> {
        let name = Some(&*deployment.name);
        match self {
            Failure::Deadline => deadline_response(deployment),
            Failure::MemoryLimit => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "memory_limit",
                &format!(
                    "the component tried to use more than its memory limit of {}",
                    deployment.limits.memory
                ),
                name,
            ),
            Failure::PoolExhausted => {
                let mut response = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "the node is at its instance limit",
                    name,
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
            Failure::Trap(_) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "component_trap",
                "the component trapped",
                name,
            ),
        }
    }
}

/// Counts an instance in `instances_in_flight` for as long as it lives.
struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    fn enter(metrics: &ComponentMetrics) -> Self {
        metrics.in_flight.inc();
        Self(metrics.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The host a request was sent to: the `Host` header (HTTP/1.1) or the URI authority (h2).
fn request_host<B>(request: &Request<B>) -> Option<String> {
    request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()))
}

fn body_too_large(deployment: &Deployment) -> Response<GatewayBody> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        &format!(
            "the request body is larger than this component's limit of {}",
            deployment.limits.max_body
        ),
        Some(&deployment.name),
    )
}

fn deadline_response(deployment: &Deployment) -> Response<GatewayBody> {
    error(
        StatusCode::GATEWAY_TIMEOUT,
        "deadline_exceeded",
        &format!(
            "the component did not finish within its deadline of {:?}",
            deployment.limits.deadline
        ),
        Some(&deployment.name),
    )
}

fn full(body: impl Into<Bytes>) -> GatewayBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<GatewayBody> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    component: Option<&str>,
) -> Response<GatewayBody> {
    let mut body = serde_json::json!({"error": code, "message": message});
    if let Some(component) = component {
        body["component"] = component.into();
    }
    json(status, body)
}

//! The one invocation path. HTTP requests from the gateway, `NAME.internal` calls,
//! message deliveries and the load check all go through here, in the same order:
//! admit (a permit of the component's slot, taken before anything is instantiated) →
//! store → instantiate → call → classify the outcome ([`Failure`]) → record it.
//!
//! How an instance is obtained is the version's business ([`Version::lease`]): a fresh
//! `Store` and instance per call, or a warm instance when the component opts into reuse
//! (`crate::runtime::reuse`; a WASIp3 component's HTTP requests then go to instances that
//! serve several at once, `crate::runtime::concurrent`). Either way the call runs under its own deadline and the
//! instance's memory limit, and only an instance whose call ended cleanly is kept.
//!
//! Every failure the client of an HTTP call sees is JSON:
//! `{"error": CODE, "message": ..., "component": ...}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Body;
use tokio::sync::OwnedSemaphorePermit;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::capabilities::outbound::{BoxError, ResponseBody};
use crate::runtime::body::{CutOff, EndsWithInstance, Flag, Metered, RequestBody};
use crate::runtime::concurrent::{Done, Job, SharedInstances};
use crate::runtime::instance::{InstanceState, MemoryLimiter};
use crate::runtime::reuse::{Exports, Lease};
use crate::runtime::version::{CallKind, DeadlineExceeded, HttpPre, Version};
use crate::telemetry::metrics::ComponentMetrics;
use crate::tenancy::{Limit, Tenant, quota};

/// A component's admission control: at most `max_concurrent` instances of the component
/// at once, and at most its tenant's `quota.max_instances` across the tenant. It belongs
/// to the component's slot, so every version of the component shares it.
pub struct Admission {
    component: Limit,
    tenant: Option<Arc<Tenant>>,
    /// Instances alive under this admission (`trellis_instances_in_flight`).
    in_flight: prometheus_client::metrics::gauge::Gauge,
}

/// Leave to run one instance; held until the instance is gone. Counts it in flight.
pub struct Permit {
    _component: OwnedSemaphorePermit,
    _tenant: Option<(
        OwnedSemaphorePermit,
        prometheus_client::metrics::gauge::Gauge,
    )>,
    in_flight: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.dec();
        if let Some((_, gauge)) = &self._tenant {
            gauge.dec();
        }
    }
}

impl Admission {
    pub fn new(
        max_concurrent: u32,
        tenant: Option<Arc<Tenant>>,
        in_flight: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        Self {
            component: Limit::new(max_concurrent),
            tenant,
            in_flight,
        }
    }

    /// Resizes to a new version's `max_concurrent`; permits already out stay valid.
    pub fn resize(&self, max_concurrent: u32) {
        self.component.resize(max_concurrent);
    }

    pub fn limit(&self) -> u32 {
        self.component.size()
    }

    /// A permit now, or the failure to answer at once (HTTP: 503, never a wait).
    pub fn try_admit(&self) -> Result<Permit, Failure> {
        if self.tenant.as_ref().is_some_and(|t| t.is_removed()) {
            return Err(Failure::TenantRemoved);
        }
        let component = self.component.try_take().ok_or(Failure::Overloaded {
            limit: self.component.size(),
        })?;
        let tenant = match &self.tenant {
            Some(tenant) => Some(tenant.instances.try_take().ok_or_else(|| {
                let limit = tenant.instances.size();
                tenant.breach(
                    quota::INSTANCES,
                    &format!("{limit} instances alive; call refused"),
                );
                Failure::TenantOverloaded { limit }
            })?),
            None => None,
        };
        Ok(self.permit(component, tenant))
    }

    /// Waits for a permit (message delivery: backpressure, not refusal); `None` once the
    /// tenant is removed. The tenant's permit comes first, so that a delivery waiting
    /// for it does not hold one of the component's (and narrow its HTTP capacity).
    pub async fn admit(&self) -> Option<Permit> {
        let tenant = match &self.tenant {
            Some(tenant) => Some(tenant.instances.take().await),
            None => None,
        };
        let component = self.component.take().await;
        if self.tenant.as_ref().is_some_and(|t| t.is_removed()) {
            return None;
        }
        Some(self.permit(component, tenant))
    }

    fn permit(
        &self,
        component: OwnedSemaphorePermit,
        tenant: Option<OwnedSemaphorePermit>,
    ) -> Permit {
        self.in_flight.inc();
        let tenant = tenant.zip(self.tenant.as_ref()).map(|(permit, owner)| {
            owner.metrics.instances.inc();
            (permit, owner.metrics.instances.clone())
        });
        Permit {
            _component: component,
            _tenant: tenant,
            in_flight: self.in_flight.clone(),
        }
    }
}

/// Why an invocation did not complete. One classification for every trigger.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The component is at `limits.max_concurrent`.
    Overloaded { limit: u32 },
    /// The tenant is at its `quota.max_instances`.
    TenantOverloaded { limit: u32 },
    /// The node-wide instance pool (`node.max_instances`) is exhausted.
    PoolExhausted,
    /// The call ran past `limits.deadline`.
    Deadline(Duration),
    /// The guest tried to grow memory past `limits.memory`.
    MemoryLimit(bytesize::ByteSize),
    /// The node's memory budget (`node.max_memory`) had no room for the growth.
    NodeMemory,
    /// The tenant's memory budget (`quota.max_memory`) had no room for the growth.
    TenantMemory,
    /// The tenant was removed after the call was routed.
    TenantRemoved,
    /// The guest trapped (a panic, `unreachable`, ...).
    Trap(String),
    /// The guest returned an error of its own (a message handler's `Err`).
    GuestError(String),
    /// The host could not prepare the call.
    Internal(String),
}

impl Failure {
    pub(crate) fn classify(
        error: wasmtime::Error,
        version: &Version,
        limiter: &MemoryLimiter,
    ) -> Self {
        if error.downcast_ref::<DeadlineExceeded>().is_some() {
            Failure::Deadline(version.limits.deadline)
        } else if error
            .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            .is_some()
        {
            Failure::PoolExhausted
        } else if limiter.tenant_refused {
            Failure::TenantMemory
        } else if limiter.node_refused {
            Failure::NodeMemory
        } else if limiter.refused {
            Failure::MemoryLimit(version.limits.memory)
        } else {
            tracing::debug!(error = ?error, "guest trap details");
            let reason = match error.downcast_ref::<wasmtime::Trap>() {
                Some(trap) => trap.to_string(),
                None => error.root_cause().to_string(),
            };
            Failure::Trap(reason)
        }
    }

    /// Logs and counts a failure of `version`.
    pub fn record(&self, version: &Version, metrics: &ComponentMetrics) {
        let (tenant, component, seq) = (&*version.tenant, &*version.name, version.seq);
        match self {
            Failure::Overloaded { .. } | Failure::TenantOverloaded { .. } => {
                metrics.admission_rejections.inc();
            }
            Failure::TenantMemory => {
                metrics.admission_rejections.inc();
            }
            Failure::TenantRemoved => {}
            Failure::Deadline(deadline) => {
                metrics.deadline_kills.inc();
                tracing::warn!(
                    tenant,
                    component,
                    version = seq,
                    ?deadline,
                    "instance stopped at its request deadline"
                );
            }
            Failure::MemoryLimit(limit) => {
                metrics.memory_limit_kills.inc();
                tracing::warn!(tenant, component, version = seq, %limit, "instance stopped: it tried to grow memory past its limit");
            }
            Failure::PoolExhausted => {
                metrics.admission_rejections.inc();
                tracing::warn!(
                    tenant,
                    component,
                    "node instance pool exhausted (node.max_instances)"
                );
            }
            Failure::NodeMemory => {
                metrics.admission_rejections.inc();
                tracing::warn!(
                    tenant,
                    component,
                    "node memory budget reached (node.max_memory); call refused"
                );
            }
            Failure::Trap(reason) => {
                metrics.traps.inc();
                tracing::warn!(tenant, component, version = seq, reason = %reason, "guest trapped");
            }
            Failure::GuestError(_) | Failure::Internal(_) => {}
        }
    }

    /// The HTTP answer for this failure.
    pub fn response(&self, component: &str) -> Response<ResponseBody> {
        let name = Some(component);
        let (status, code, message) = match self {
            Failure::Overloaded { limit } => {
                return overloaded(
                    &format!("component is at its limit of {limit} concurrent requests"),
                    name,
                );
            }
            Failure::TenantOverloaded { limit } => {
                return overloaded(
                    &format!("the tenant is at its quota of {limit} instances"),
                    name,
                );
            }
            Failure::TenantMemory => {
                return overloaded("the tenant is at its memory quota", name);
            }
            Failure::TenantRemoved => (
                StatusCode::NOT_FOUND,
                "no_route",
                "the tenant was removed".to_string(),
            ),
            Failure::PoolExhausted => {
                return overloaded("the node is at its instance limit", name);
            }
            Failure::NodeMemory => {
                return overloaded("the node is at its memory budget", name);
            }
            Failure::Deadline(deadline) => (
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                format!("the component did not finish within its deadline of {deadline:?}"),
            ),
            Failure::MemoryLimit(limit) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "memory_limit",
                format!("the component tried to use more than its memory limit of {limit}"),
            ),
            Failure::Trap(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "component_trap",
                "the component trapped".to_string(),
            ),
            Failure::GuestError(reason) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "component_error",
                reason.clone(),
            ),
            Failure::Internal(reason) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                reason.clone(),
            ),
        };
        error(status, code, &message, name)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Overloaded { limit } => {
                write!(f, "at its limit of {limit} concurrent instances")
            }
            Failure::TenantOverloaded { limit } => {
                write!(f, "the tenant is at its quota of {limit} instances")
            }
            Failure::TenantMemory => write!(f, "the tenant is at its memory quota"),
            Failure::TenantRemoved => write!(f, "the tenant was removed"),
            Failure::PoolExhausted => write!(f, "the node is at its instance limit"),
            Failure::NodeMemory => write!(f, "the node is at its memory budget"),
            Failure::Deadline(deadline) => write!(f, "ran past its deadline of {deadline:?}"),
            Failure::MemoryLimit(limit) => write!(f, "exceeded its memory limit of {limit}"),
            Failure::Trap(reason) => write!(f, "trapped: {reason}"),
            Failure::GuestError(reason) => write!(f, "returned an error: {reason}"),
            Failure::Internal(reason) => write!(f, "could not be prepared: {reason}"),
        }
    }
}

/// Instantiates once and throws the instance away: proves a version starts within its
/// limits before it is activated (or before the node calls itself ready).
pub async fn check(version: &Version, _permit: &Permit) -> Result<(), Failure> {
    let deadline = Instant::now() + version.limits.deadline;
    let mut store = version
        .new_store(deadline, &[])
        .map_err(|e| Failure::Internal(format!("{e:#}")))?;
    let turn = store.data().cpu_turn.clone();
    let instantiated =
        turn.released_while_waiting(version.instance_pre().instantiate_async(&mut store));
    match instantiated.await {
        Ok(_) => Ok(()),
        Err(e) => Err(Failure::classify(e, version, &store.data().limiter)),
    }
}

/// Gives `$lease` an instance from `$pre` unless it already holds a warm one (`$variant`
/// says which exports it keeps); a full instance pool gets one more try once idle warm
/// instances made room. Instantiation time is recorded.
macro_rules! ensure_instance {
    ($lease:expr, $metrics:expr, $pre:expr, $variant:path) => {
        if $lease.exports.is_none() {
            let instantiating = Instant::now();
            let instance = match $pre.instantiate_async(&mut $lease.store).await {
                Err(e) if made_room(&e) => $pre.instantiate_async(&mut $lease.store).await,
                other => other,
            }?;
            $metrics
                .instantiation_duration
                .observe(instantiating.elapsed().as_secs_f64());
            $lease.exports = Some($variant(instance));
        }
    };
}

/// Runs `handle-message` for one delivery attempt, under the version's limits.
pub async fn message(
    version: &Version,
    metrics: &ComponentMetrics,
    _permit: &Permit,
    message: &BrokerMessage,
    env: &[(String, String)],
) -> Result<(), Failure> {
    let Some(handler) = version.handler() else {
        return Err(Failure::Internal(
            "the component does not export wasmcloud:messaging/handler".into(),
        ));
    };
    let deadline = Instant::now() + version.limits.deadline;
    let mut lease = version
        .lease(CallKind::Message, deadline, env)
        .map_err(|e| Failure::Internal(format!("{e:#}")))?;
    let warm = lease.is_warm();
    let turn = lease.store.data().cpu_turn.clone();
    let run = async {
        ensure_instance!(lease, metrics, handler, Exports::Handler);
        let Some(Exports::Handler(instance)) = &lease.exports else {
            wasmtime::bail!("a warm instance of another kind");
        };
        instance
            .wasmcloud_messaging_handler()
            .call_handle_message(&mut lease.store, message)
            .await
    };
    let ran = tokio::time::timeout_at(deadline.into(), turn.released_while_waiting(run)).await;
    let outcome = match outcome_of(ran, version, &lease) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(guest_error)) => Err(Failure::GuestError(guest_error)),
        Err(failure) => Err(failure),
    };
    if warm {
        metrics.instances_reused.inc();
    }
    if let Err(failure) = &outcome {
        failure.record(version, metrics);
    }
    // A handler that returned its own error ran to the end: its instance is sound.
    let clean = matches!(outcome, Ok(()) | Err(Failure::GuestError(_)));
    version.give_back(CallKind::Message, lease, clean);
    outcome
}

/// The outcome of a guest call run under its deadline.
fn outcome_of<T>(
    ran: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>,
    version: &Version,
    lease: &Lease,
) -> Result<T, Failure> {
    match ran {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Failure::classify(e, version, &lease.store.data().limiter)),
        Err(_) => Err(Failure::Deadline(version.limits.deadline)),
    }
}

/// Whether an instantiation failed because the node's instance pool was full and idle
/// warm instances (of any component) were thrown away to make room: worth one more try.
pub(crate) fn made_room(error: &wasmtime::Error) -> bool {
    error
        .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
        && crate::runtime::reuse::evict_idle_everywhere() > 0
}

/// Serves one HTTP request with `version`: checks the declared body size (413), takes a
/// permit from `admission` (503, never a wait), then instantiates and calls
/// `wasi:http/incoming-handler` with the body streaming in, metered (413 past the limit). The permit is
/// held by the task that runs the instance until the instance is gone, including while it
/// streams its response body.
///
/// The instance runs inside the caller's task; only one that is still running when its
/// response head is ready (it streams a body) is moved to a task of its own.
pub async fn http<B>(
    version: Arc<Version>,
    admission: &Admission,
    metrics: &Arc<ComponentMetrics>,
    request: Request<B>,
    local_addr: SocketAddr,
    on_end: Option<OnEnd>,
) -> Response<ResponseBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<wasmtime_wasi_http::Error> + Into<BoxError>,
{
    let (response, ending) = serve(version, admission, metrics, request, local_addr).await;
    let status = response.status().as_u16();
    match (ending, on_end) {
        (Ending::Now(failure), Some(on_end)) => on_end(CallEnd { status, failure }),
        (Ending::Now(_), None) => {}
        (Ending::Later(instance), on_end) => {
            // The guest streams its body: it runs on in a task of its own, which keeps the
            // permit and reports how the call really ended.
            tokio::spawn(async move {
                let failure = instance.await.err();
                if let Some(on_end) = on_end {
                    on_end(CallEnd { status, failure });
                }
            });
        }
    }
    response
}

/// How a call ended, known once its instance is gone (after a streamed body, too).
pub struct CallEnd {
    /// The status the client was sent.
    pub status: u16,
    /// Why the instance failed, if it did (a trap after the head counts).
    pub failure: Option<Failure>,
}

/// Told how a call ended (a canary's verdict needs it).
pub type OnEnd = Box<dyn FnOnce(CallEnd) + Send>;

/// The end of a call: already known, or an instance still running (streaming its body).
enum Ending {
    Now(Option<Failure>),
    Later(std::pin::Pin<Box<dyn Future<Output = Result<(), Failure>> + Send>>),
}

async fn serve<B>(
    version: Arc<Version>,
    admission: &Admission,
    metrics: &Arc<ComponentMetrics>,
    request: Request<B>,
    local_addr: SocketAddr,
) -> (Response<ResponseBody>, Ending)
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<wasmtime_wasi_http::Error> + Into<BoxError>,
{
    let name = &*version.name;
    let max_body = version.limits.max_body.as_u64();
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|len| len > max_body) {
        return (body_too_large(&version), Ending::Now(None));
    }

    let permit = match admission.try_admit() {
        Ok(permit) => permit,
        Err(failure) => {
            failure.record(&version, metrics);
            return (failure.response(name), Ending::Now(Some(failure)));
        }
    };

    let deadline = Instant::now() + version.limits.deadline;
    let (mut parts, body) = request.into_parts();
    if !parts.headers.contains_key(header::HOST) && parts.uri.authority().is_none() {
        parts.headers.insert(
            header::HOST,
            HeaderValue::from_str(&local_addr.to_string()).expect("an address is a valid header"),
        );
    }
    // The body streams into the guest as it arrives, counted against `max_body`.
    let flags = CallFlags::default();
    let (ended_sender, ended) = tokio::sync::oneshot::channel();
    let body: UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error> =
        body.map_err(Into::into).boxed_unsync();
    let body = Metered::new(body, max_body, flags.body.clone()).boxed_unsync();
    let request = Request::from_parts(parts, body);

    let call = Call {
        version: version.clone(),
        metrics: metrics.clone(),
        permit,
        deadline,
        flags: flags.clone(),
        ended: ended_sender,
    };
    let (run_instance, head) = if let Some(shared) = version.shared_http() {
        p3_shared(call, shared, request)
    } else {
        let lease = match version.lease(CallKind::Http, deadline, &[]) {
            Ok(lease) => lease,
            Err(e) => {
                tracing::error!(component = name, error = %format!("{e:#}"), "creating the instance state failed");
                let failure = Failure::Internal("could not prepare the component".into());
                return (failure.response(name), Ending::Now(Some(failure)));
            }
        };
        match version.http() {
            Some(HttpPre::P2(_)) => match p2_instance(call, lease, request) {
                Ok(started) => started,
                Err(response) => return (*response, Ending::Now(None)),
            },
            Some(HttpPre::P3(_)) => p3_instance(call, lease, request),
            None => {
                version.give_back(CallKind::Http, lease, false);
                let failure = Failure::Internal("the component does not serve HTTP".into());
                return (failure.response(name), Ending::Now(Some(failure)));
            }
        }
    };
    let mut run_instance = run_instance;
    let mut head = head;

    // Most guests answer and finish in one go, and a spawned task would cost a
    // cross-thread wakeup per request. Only a guest still running when its response head
    // is ready (streaming a body) moves to a task of its own, which keeps the permit.
    let first = tokio::select! {
        biased;
        outcome = &mut run_instance => First::Finished(outcome),
        head = &mut head => First::Head(head),
    };
    let (head, outcome, ending) = match first {
        First::Finished(outcome) => (
            head.await,
            Some(outcome.clone()),
            Ending::Now(outcome.err()),
        ),
        First::Head(Ok(head)) => (Ok(head), None, Ending::Later(run_instance)),
        First::Head(Err(closed)) => {
            let outcome = run_instance.await;
            (
                Err(closed),
                Some(outcome.clone()),
                Ending::Now(outcome.err()),
            )
        }
    };

    // A failure the client caused (a body too large or too slow) is not the component's.
    let ending = match ending {
        Ending::Now(Some(failure)) if flags.body.clients_fault(&failure) => Ending::Now(None),
        Ending::Later(run) => {
            let body = flags.body.clone();
            Ending::Later(Box::pin(async move {
                match run.await {
                    Err(failure) if body.clients_fault(&failure) => Ok(()),
                    other => other,
                }
            }))
        }
        ending => ending,
    };
    if flags.body.overflow.raised() {
        return (body_too_large(&version), ending);
    }
    let response = match head {
        Ok(Ok(response)) => {
            let declared_length = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            response.map(|body| {
                let body = CutOff::new(
                    body,
                    flags.body.overflow.clone(),
                    "the request body passed max_body",
                );
                EndsWithInstance::new(body, declared_length, flags.failed, ended).boxed_unsync()
            })
        }
        Ok(Err(code)) => {
            tracing::warn!(component = name, error = %code, "component answered with an error code");
            Failure::GuestError(code).response(name)
        }
        // The guest dropped the response outparam without setting it: find out why.
        Err(_) => match outcome {
            Some(Err(failure)) => failure.response(name),
            Some(Ok(())) | None => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no_response",
                "the component returned without sending a response",
                Some(name),
            ),
        },
    };
    (response, ending)
}

/// One HTTP call, admitted, ready to run.
struct Call {
    version: Arc<Version>,
    metrics: Arc<ComponentMetrics>,
    permit: Permit,
    deadline: Instant,
    flags: CallFlags,
    /// Told the instance's outcome once it is gone (true: clean), for the response body.
    ended: tokio::sync::oneshot::Sender<bool>,
}

/// What the two sides of one HTTP call tell each other.
#[derive(Clone, Default)]
struct CallFlags {
    /// What the metering saw of the request body.
    body: RequestBody,
    /// Raised when the instance fails: a response body it was still writing is cut off
    /// (dropping the store would otherwise end it cleanly).
    failed: Flag,
}

impl CallFlags {
    /// Marks and records a failed instance, unless the client caused the failure.
    fn failed(&self, failure: &Failure, version: &Version, metrics: &ComponentMetrics) {
        self.failed.raise();
        if !self.body.clients_fault(failure) {
            failure.record(version, metrics);
        }
    }
}

/// A running instance: its outcome, known once it is gone.
type InstanceRun = std::pin::Pin<Box<dyn Future<Output = Result<(), Failure>> + Send>>;
/// The response head an instance sends (or the error code it answers with); an error
/// when it went away without one.
type HeadResult =
    Result<Result<Response<ResponseBody>, String>, tokio::sync::oneshot::error::RecvError>;
type Head = std::pin::Pin<Box<dyn Future<Output = HeadResult> + Send>>;

/// Starts a WASIp2 `wasi:http/incoming-handler` call; an answer at once if the request
/// cannot be handed to the guest.
fn p2_instance(
    call: Call,
    mut lease: Lease,
    request: Request<UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>>,
) -> Result<(InstanceRun, Head), Box<Response<ResponseBody>>> {
    let Call {
        version,
        metrics,
        permit,
        deadline,
        flags,
        ended,
    } = call;
    let name = &*version.name;
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let resources = {
        let mut http = lease.store.data_mut().http();
        http.new_incoming_request(Scheme::Http, request)
            .and_then(|req| Ok((req, http.new_response_outparam(sender)?)))
    };
    let (guest_request, response_out) = match resources {
        Ok(resources) => resources,
        Err(e) => {
            version.give_back(CallKind::Http, lease, false);
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("{e:#}"),
                Some(name),
            )));
        }
    };
    let instance = version.clone();
    let run_instance: InstanceRun = Box::pin(async move {
        let _permit = permit;
        let warm = lease.is_warm();
        let turn = lease.store.data().cpu_turn.clone();
        let run = async {
            let Some(HttpPre::P2(http)) = instance.http() else {
                wasmtime::bail!("the component does not export wasi:http/incoming-handler");
            };
            ensure_instance!(lease, metrics, http, Exports::HttpP2);
            let Some(Exports::HttpP2(proxy)) = &lease.exports else {
                wasmtime::bail!("a warm instance of another kind");
            };
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut lease.store, guest_request, response_out)
                .await
        };
        let ran = tokio::time::timeout_at(deadline.into(), turn.released_while_waiting(run)).await;
        let outcome = outcome_of(ran, &instance, &lease);
        end_http_call(
            &instance,
            &metrics,
            &flags,
            Some(lease),
            warm,
            ended,
            outcome,
        )
    });
    let head: Head = Box::pin(async move {
        receiver.await.map(|answer| {
            answer
                .map(|response| response.map(|body| body.map_err(BoxError::from).boxed_unsync()))
                .map_err(|code| format!("{code:?}"))
        })
    });
    Ok((run_instance, head))
}

/// Starts a WASIp3 `wasi:http/handler` call in an instance of its own (reuse off; with
/// reuse on, [`p3_shared`]). The guest may keep writing its body (and run other tasks)
/// after `handle` returns, so the store's event loop runs until every task of the instance
/// has exited; a failure is flagged before the store goes, so that a body it was still
/// writing ends in an error rather than a clean, truncated end.
fn p3_instance(
    call: Call,
    mut lease: Lease,
    request: Request<UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>>,
) -> (InstanceRun, Head) {
    let Call {
        version,
        metrics,
        permit,
        deadline,
        flags,
        ended,
    } = call;
    use wasmtime::component::Accessor;
    use wasmtime_wasi_http::p3;

    let request = with_absolute_uri(request);
    let (guest_request, request_io) =
        p3::Request::from_http(lease.store.data_mut().http().hooks, request);
    let (head_sender, head_receiver) =
        tokio::sync::oneshot::channel::<Result<Response<ResponseBody>, String>>();
    let instance = version.clone();
    let run_instance: InstanceRun = Box::pin(async move {
        let _permit = permit;
        let warm = lease.is_warm();
        let turn = lease.store.data().cpu_turn.clone();
        let run = async {
            let Some(HttpPre::P3(pre)) = instance.http() else {
                wasmtime::bail!("the component does not export wasi:http/handler@0.3");
            };
            ensure_instance!(lease, metrics, pre, Exports::HttpP3);
            let Some(Exports::HttpP3(service)) = &lease.exports else {
                wasmtime::bail!("a warm instance of another kind");
            };
            lease
                .store
                .run_concurrent(async move |accessor: &Accessor<InstanceState>| {
                    match service.handle(accessor, guest_request).await? {
                        Ok(response) => {
                            let response = accessor
                                .with(|mut access| response.into_http(&mut access, request_io))?;
                            let _ = head_sender
                                .send(Ok(response
                                    .map(|body| body.map_err(BoxError::from).boxed_unsync())));
                        }
                        Err(code) => {
                            let _ = head_sender.send(Err(format!("{code:?}")));
                        }
                    }
                    std::future::poll_fn(|cx| accessor.poll_no_interesting_tasks(cx)).await;
                    wasmtime::Result::<()>::Ok(())
                })
                .await?
        };
        let ran = tokio::time::timeout_at(deadline.into(), turn.released_while_waiting(run)).await;
        let outcome = outcome_of(ran, &instance, &lease);
        end_http_call(
            &instance,
            &metrics,
            &flags,
            Some(lease),
            warm,
            ended,
            outcome,
        )
    });
    (run_instance, Box::pin(head_receiver))
}

/// WASIp3 takes the scheme and authority from the URI: an origin-form URI is made
/// absolute from the Host header, as WASIp2 does for the guest.
fn with_absolute_uri<B>(request: Request<B>) -> Request<B> {
    let (mut parts, body) = request.into_parts();
    if parts.uri.authority().is_none()
        && let Some(authority) = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
    {
        let mut uri = parts.uri.clone().into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(authority);
        uri.path_and_query
            .get_or_insert(http::uri::PathAndQuery::from_static("/"));
        if let Ok(uri) = http::Uri::from_parts(uri) {
            parts.uri = uri;
        }
    }
    Request::from_parts(parts, body)
}

/// Hands a WASIp3 call to the component's shared instances (reuse on): one that may be
/// serving other requests at once takes it. The call ends, for its permit and its
/// response body, when the guest has returned its response.
fn p3_shared(
    call: Call,
    shared: &Arc<SharedInstances>,
    request: Request<UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>>,
) -> (InstanceRun, Head) {
    let Call {
        version,
        metrics,
        permit,
        deadline,
        flags,
        ended,
    } = call;
    let (done_sender, done) = tokio::sync::oneshot::channel();
    let (head_sender, head) = tokio::sync::oneshot::channel();
    shared.dispatch(
        &version,
        &metrics,
        Job {
            request: with_absolute_uri(request),
            deadline,
            head: head_sender,
            done: done_sender,
            failed: flags.failed.clone(),
        },
    );
    let run_instance: InstanceRun = Box::pin(async move {
        let _permit = permit;
        let done = done.await.unwrap_or(Done {
            outcome: Err(Failure::Internal("the instance went away".into())),
            warm: false,
        });
        // The instance stays with its worker: nothing to give back.
        end_http_call(
            &version,
            &metrics,
            &flags,
            None,
            done.warm,
            ended,
            done.outcome,
        )
    });
    (run_instance, Box::pin(head))
}

/// Where an HTTP call ends, the head already sent or not: the failure recorded (a body it
/// was writing is cut off), its instance kept warm or thrown away (`lease`; a shared
/// instance stays with its worker), and the response body told it may end.
fn end_http_call(
    version: &Version,
    metrics: &ComponentMetrics,
    flags: &CallFlags,
    lease: Option<Lease>,
    warm: bool,
    ended: tokio::sync::oneshot::Sender<bool>,
    outcome: Result<(), Failure>,
) -> Result<(), Failure> {
    if warm {
        metrics.instances_reused.inc();
    }
    if let Err(failure) = &outcome {
        flags.failed(failure, version, metrics);
    }
    if let Some(lease) = lease {
        version.give_back(CallKind::Http, lease, outcome.is_ok());
    }
    let _ = ended.send(outcome.is_ok());
    outcome
}

/// Which came first: the instance finishing, or its response head.
enum First {
    Finished(Result<(), Failure>),
    Head(HeadResult),
}

fn body_too_large(version: &Version) -> Response<ResponseBody> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        &format!(
            "the request body is larger than this component's limit of {}",
            version.limits.max_body
        ),
        Some(&version.name),
    )
}

fn overloaded(message: &str, component: Option<&str>) -> Response<ResponseBody> {
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        message,
        component,
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// A whole body from bytes.
pub fn full(body: impl Into<Bytes>) -> ResponseBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A JSON answer.
pub fn json(status: StatusCode, value: serde_json::Value) -> Response<ResponseBody> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The JSON error every host-made failure answers: `{"error", "message", "component"}`.
pub fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    component: Option<&str>,
) -> Response<ResponseBody> {
    let mut body = serde_json::json!({"error": code, "message": message});
    if let Some(component) = component {
        body["component"] = component.into();
    }
    json(status, body)
}

//! Outbound HTTP from guests (`wasi:http/outgoing-handler`): deny by default, allow only
//! the hosts a component's manifest lists.
//!
//! A rule is `host`, `host:port` or `*.domain[:port]`. Without a port it allows the
//! scheme's default port only (80 for http, 443 for https), so granting `api.example.com`
//! does not also open every other service on that machine. A denied request fails in
//! the guest with `error-code.HTTP-request-denied`, which it can read and report.
//!
//! `http://NAME.internal/...` is a call to component NAME of the caller's own tenant
//! (service discovery by name). It is served in-process by the gateway, with the callee's
//! own limits, deadline and admission, never through a socket, and it too must be allowed
//! by a rule (`NAME.internal`, or `*.internal` for every sibling; ports are ignored). A
//! name the tenant does not have fails like an unknown host (`DNS-error`).

use std::sync::{Arc, Weak};

use http::uri::Scheme;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

#[derive(Debug, Clone, PartialEq, Eq)]
struct HostRule {
    /// Lower-case host name, or the suffix (with its leading dot) of a `*.domain` rule.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

/// The outbound hosts one component may call, and how many calls one instance may make
/// (the tenant's `quota.max_outbound_per_request`). Cheap to clone (a few `Arc`s); each
/// instance gets its own copy ([`OutboundPolicy::for_instance`]) that counts its calls.
#[derive(Clone, Default)]
pub struct OutboundPolicy {
    rules: Arc<[HostRule]>,
    internal: Option<InternalCalls>,
    /// The tenant whose `quota.max_outbound_per_request` caps `sent`.
    owner: Option<Arc<crate::tenancy::Tenant>>,
    sent: u32,
}

/// Any error a body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A response body as components answer it.
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

/// Serves `NAME.internal` calls in-process. The node's registry implements it; this module
/// only knows the trait, so capabilities never reach up into the layers that use them.
pub trait ComponentCaller: Send + Sync {
    /// Calls `component` of `tenant` with the callee's own limits; `None` when the tenant
    /// has no such component.
    fn call_component(
        &self,
        tenant: Arc<str>,
        component: String,
        request: http::Request<WasiBody>,
    ) -> futures_util::future::BoxFuture<'static, Option<http::Response<ResponseBody>>>;
}

/// Where `NAME.internal` calls go: the node's component caller, within the caller's tenant.
/// Weak, because the caller (the registry) owns the versions that hold this policy.
#[derive(Clone)]
pub struct InternalCalls {
    pub caller: Weak<dyn ComponentCaller>,
    pub tenant: Arc<str>,
}

const INTERNAL_SUFFIX: &str = ".internal";

impl OutboundPolicy {
    /// Builds the policy from manifest patterns (already validated by the manifest).
    /// `internal` is where `NAME.internal` calls are served (none: they are refused).
    pub fn new(patterns: &[String], internal: Option<InternalCalls>) -> Self {
        let rules = patterns
            .iter()
            .map(|pattern| {
                let pattern = pattern.to_ascii_lowercase();
                let (host, port) = match pattern.rsplit_once(':') {
                    Some((host, port)) => (host.to_string(), port.parse().ok()),
                    None => (pattern, None),
                };
                match host.strip_prefix('*') {
                    Some(suffix) => HostRule {
                        host: suffix.to_string(),
                        wildcard: true,
                        port,
                    },
                    None => HostRule {
                        host,
                        wildcard: false,
                        port,
                    },
                }
            })
            .collect();
        Self {
            rules,
            internal,
            owner: None,
            sent: 0,
        }
    }

    /// The same policy, with calls counted against `owner`'s quota.
    pub fn with_quota(mut self, owner: Arc<crate::tenancy::Tenant>) -> Self {
        self.owner = Some(owner);
        self
    }

    /// A copy for one instance, with no calls counted yet.
    pub fn for_instance(&self) -> Self {
        Self {
            sent: 0,
            ..self.clone()
        }
    }

    /// Counts a call; refuses it past the tenant's quota.
    fn count_call(&mut self) -> Result<(), Error> {
        self.sent += 1;
        let Some(owner) = &self.owner else {
            return Ok(());
        };
        match owner.quota().max_outbound_per_request {
            Some(max) if self.sent > max => {
                let message = format!(
                    "the tenant's quota of {max} outbound requests per request is used up (quota.max_outbound_per_request)"
                );
                owner.breach(crate::tenancy::quota::OUTBOUND, &message);
                Err(Error::InternalError(Some(message)))
            }
            _ => Ok(()),
        }
    }

    /// Whether a `NAME.internal` host is allowed (any port: there is no socket).
    fn allows_internal(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.rules.iter().any(|rule| {
            if rule.wildcard {
                host.ends_with(&rule.host) && host.len() > rule.host.len()
            } else {
                host == rule.host
            }
        })
    }

    /// Whether a request to `host` on `port` (the effective port, default applied) over
    /// `scheme` is allowed.
    pub fn allows(&self, scheme: &Scheme, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
        self.rules.iter().any(|rule| {
            let host_ok = if rule.wildcard {
                host.ends_with(&rule.host) && host.len() > rule.host.len()
            } else {
                host == rule.host
            };
            host_ok && port == rule.port.unwrap_or(default_port)
        })
    }
}

type SendFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn Future<Output = Result<(), Error>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> SendFuture {
        drop(fut);
        if let Err(refused) = self.count_call() {
            return Box::new(async move { Err(refused) });
        }
        if let Some(host) = request.uri().host()
            && let Some(component) = host.to_ascii_lowercase().strip_suffix(INTERNAL_SUFFIX)
        {
            return self.call_component(component.to_string(), host.to_string(), request);
        }
        let uri = request.uri();
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let allowed = uri
            .host()
            .is_some_and(|host| self.allows(&scheme, host, uri.port_u16().unwrap_or(default_port)));
        if !allowed {
            tracing::debug!(uri = %uri, "outbound request denied: host not in the component's outbound list");
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = Result<(), Error>> + Send>,
            ))
        })
    }
}

impl OutboundPolicy {
    fn call_component(
        &self,
        component: String,
        host: String,
        request: http::Request<WasiBody>,
    ) -> SendFuture {
        let internal = match &self.internal {
            Some(internal) if self.allows_internal(&host) => internal.clone(),
            _ => {
                tracing::debug!(%host, "component call denied: not in the component's outbound list");
                return Box::new(async { Err(Error::HttpRequestDenied) });
            }
        };
        Box::new(async move {
            use http_body_util::BodyExt;
            let caller = internal
                .caller
                .upgrade()
                .ok_or(Error::DestinationUnavailable)?;
            let call = caller.call_component(internal.tenant.clone(), component.clone(), request);
            // A WASIp3 caller awaits this inside its own store's event loop, where another
            // store may not run: the callee gets a task of its own, aborted if the caller
            // goes away.
            let callee = AbortOnDrop(tokio::spawn(call));
            let response = callee
                .await
                .map_err(|e| Error::InternalError(Some(format!("the component call failed: {e}"))))?
                .ok_or_else(|| Error::DnsError {
                    rcode: Some(format!("no component {component:?} in this tenant")),
                    info_code: None,
                })?;
            let response = response.map(|body| {
                body.map_err(|e| Error::InternalError(Some(e.to_string())))
                    .boxed_unsync()
            });
            Ok((
                response,
                Box::new(async { Ok(()) }) as Box<dyn Future<Output = Result<(), Error>> + Send>,
            ))
        })
    }
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_host_and_port() {
        let policy = OutboundPolicy::new(
            &[
                "api.example.com".into(),
                "*.internal.test".into(),
                "127.0.0.1:9000".into(),
            ],
            None,
        );
        assert!(policy.allows(&Scheme::HTTPS, "api.example.com", 443));
        assert!(policy.allows(&Scheme::HTTP, "API.example.com", 80));
        assert!(!policy.allows(&Scheme::HTTPS, "api.example.com", 8443));
        assert!(policy.allows(&Scheme::HTTPS, "a.internal.test", 443));
        assert!(!policy.allows(&Scheme::HTTPS, "internal.test", 443));
        assert!(policy.allows(&Scheme::HTTP, "127.0.0.1", 9000));
        assert!(!policy.allows(&Scheme::HTTP, "127.0.0.1", 80));
        assert!(!policy.allows(&Scheme::HTTP, "evil.example.com", 80));
        assert!(!OutboundPolicy::default().allows(&Scheme::HTTP, "localhost", 80));
    }
}

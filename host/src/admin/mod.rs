//! The admin API, on its own listener (`node.admin_listen`, default `127.0.0.1:8081`),
//! never on the gateway: JSON in and out, every call authenticated ([`auth`]) with the
//! node's operator token, which may do everything, or a tenant token, which may manage
//! its own tenant's components and read its own status and metrics (anything else:
//! 403). It serves `/metrics` and the deployment calls of [`api`]; the CLI's
//! side of it is [`client`]. `docs/admin-api.openapi.json` describes every endpoint.

pub mod api;
pub mod auth;
pub mod client;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::capabilities::outbound::ResponseBody;
use crate::deploy::registry::Registry;
use crate::runtime::invoke::error;

/// Who is calling: the node's operator, or the bearer of a tenant's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Operator,
    Tenant(String),
}

pub struct Admin {
    pub registry: Arc<Registry>,
    token: String,
}

impl Admin {
    pub fn new(registry: Arc<Registry>, token: String) -> Self {
        Self { registry, token }
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let admin = self.clone();
            let service = hyper::service::service_fn(move |request| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(request).await) }
            });
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    }

    pub async fn handle(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        let header = request.headers().get(header::AUTHORIZATION);
        let caller = if auth::authorized(header, &self.token) {
            Some(Caller::Operator)
        } else {
            auth::bearer(header)
                .and_then(|token| self.registry.tokens.tenant_of(token))
                .filter(|tenant| self.registry.tenant_exists(tenant))
                .map(Caller::Tenant)
        };
        let Some(caller) = caller else {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the admin API needs the node's token: Authorization: Bearer TOKEN",
                None,
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            // The body (perhaps a large upload) is not read: the connection cannot be
            // reused, and the client should know it.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        };
        // A change runs to its end (swap and persist) even when the client goes away:
        // it is a task of its own, not part of the connection's future.
        let registry = self.registry.clone();
        match tokio::spawn(async move { api::handle(&registry, &caller, request).await }).await {
            Ok(response) => response,
            Err(e) => {
                tracing::error!(error = %e, "an admin call failed");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the call failed; see the node's log",
                    None,
                )
            }
        }
    }
}

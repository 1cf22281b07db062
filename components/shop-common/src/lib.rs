//! `shop-common`: what the shop's five services (user, product, order, payment,
//! notification) share, so that each service's crate holds only its domain logic.
//!
//! - [`api`]: the request a handler sees, JSON answers, and the error shape every service
//!   answers with (`{"error", "message", "field"?}` with the right status).
//! - [`auth`]: the JWT the user service issues and every service verifies, with the
//!   secret from the component's config (`JWT_SECRET`).
//! - [`db`]: typed parameters and row access over `trellis:platform/sql`.
//! - [`call`]: calls to sibling components (`http://NAME.internal/...`).
//! - [`events`]: publishing domain events on `wasmcloud:messaging`.
//!
//! Schemas are not created here: each service ships `migrations/*.sql`, which the host
//! applies at deploy (`migrations` in the manifest).

pub mod api;
pub mod auth;
pub mod call;
pub mod db;
pub mod events;

wit_bindgen::generate!({
    world: "trellis:platform/platform",
    path: "../../wit",
    generate_all,
});

pub use api::{ApiError, ApiResult, Page, Request, Response};

/// A fresh identifier: `prefix` and 16 random hex digits (`ord_3f9a...`), from the host's
/// `wasi:random`, so ids are unguessable and never collide across instances.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", wasip2::random::random::get_random_u64())
}

/// Now, as RFC 3339 with milliseconds (`2026-11-21T19:03:08.123Z`).
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// A configuration value of this component (`config` in the manifest).
pub fn config(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// Makes `$service` the component's `wasi:http` export, answering every request through
/// `$route` (see [`api::serve`]).
#[macro_export]
macro_rules! export_http {
    ($service:ident, $route:path) => {
        ::wasip2::http::proxy::export!($service);

        impl ::wasip2::exports::http::incoming_handler::Guest for $service {
            fn handle(
                request: ::wasip2::http::types::IncomingRequest,
                out: ::wasip2::http::types::ResponseOutparam,
            ) {
                $crate::api::serve(request, out, $route);
            }
        }
    };
}

/// Generates, in the calling service, the bindings of the `message-handler` world, with
/// the messaging types shared with this crate (so [`events`] and the handler agree).
/// The service then calls the generated `export!` on its type and implements
/// `exports::wasmcloud::messaging::handler::Guest`.
#[macro_export]
macro_rules! message_handler_bindings {
    () => {
        ::wit_bindgen::generate!({
            world: "trellis:platform/message-handler",
            path: "../../wit",
            with: { "wasmcloud:messaging/types@0.2.0": ::shop_common::wasmcloud::messaging::types },
        });
    };
}

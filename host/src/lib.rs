//! Trellis: a WebAssembly host where every microservice is a sandboxed WASI 0.2 component.
//!
//! A node reads a `trellis.toml` manifest ([`manifest`]), compiles and pre-instantiates each
//! component once ([`component`], on the engine of [`runtime`]), and serves HTTP through
//! the [`gateway`], which routes by host and path ([`router`]) to a fresh, limited instance
//! per request ([`instance`]). Capabilities a component may be granted live in their own
//! modules ([`keyvalue`] and [`sql`], on the per-component databases of [`storage`];
//! [`messaging`], on the in-process bus or NATS). [`node`] ties
//! these together for the `trellis` binary.

pub mod bindings;
pub mod component;
pub mod gateway;
pub mod instance;
pub mod keyvalue;
pub mod manifest;
pub mod messaging;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod router;
pub mod runtime;
pub mod sql;
pub mod storage;

//! Trellis: a WebAssembly host where every microservice is a sandboxed WASI 0.2 component.
//!
//! Layers, each depending only on those listed before it:
//! - [`grammar`]: routes, hosts and subjects (leaves); [`manifest`]: the `trellis.toml`
//!   (parsing and validation only);
//! - [`storage`]: one database per component; [`telemetry`]: metrics; `runtime::memory`
//!   (a leaf: memory budgets);
//! - [`tenancy`]: tenants as runtime objects, their quotas and tokens;
//! - [`capabilities`]: what a guest may be granted (key-value, SQL, messaging, outbound
//!   HTTP and `NAME.internal` calls), each with its linker wiring;
//! - [`runtime`]: the engine, per-instance state, a version ready to instantiate, and the
//!   one invocation path every trigger takes;
//! - [`deploy`]: component slots and their versions, the registry that changes and routes
//!   to them, code by digest, desired state, canaries, `--watch`;
//! - [`gateway`] (HTTP traffic) and [`admin`] (the operator's API and the CLI's client);
//! - [`node`]: ties them together for the `trellis` binary.

pub mod admin;
pub mod bindings;
pub mod capabilities;
pub mod deploy;
pub mod gateway;
pub mod grammar;
pub mod manifest;
pub mod node;
pub mod runtime;
pub mod storage;
pub mod telemetry;
pub mod tenancy;

//! Trellis's end-to-end tests: each module is one feature, driven through the real
//! `trellis` binary (built by cargo for this test) with the real guest components that
//! `cargo xtask build` put in `target/wasm/`, and real servers (NATS, PostgreSQL, an OCI
//! registry) started on loopback by `common`. They are one test binary so that a clean
//! build links once; run one feature with `cargo xtask test --test e2e reuse::`.

mod common;

mod admin_api;
mod component_calls;
mod gateway_endpoints;
mod guest_kinds;
mod hot_deploy;
mod keyvalue;
mod limits;
mod manifest_errors;
mod messaging;
mod reuse;
mod routing;
mod sandbox;
mod shop;
mod sql;
mod tenancy;

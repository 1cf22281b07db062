//! Deploying: component slots and their versions ([`slot`], [`canary`]), the registry that
//! changes them one at a time and routes to them ([`registry`]), code kept by digest
//! ([`code`]), the node's desired state that survives a restart ([`state`]), and
//! `trellis up --watch` ([`watch`]), and tenants changed at runtime ([`tenants`]).

pub mod canary;
pub mod code;
pub mod oci;
pub mod registry;
pub mod slot;
pub mod state;
pub mod tenants;
pub mod wasip3_rc;
pub mod watch;

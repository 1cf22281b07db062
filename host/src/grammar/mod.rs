//! The small grammars several modules share, kept as leaves that depend on nothing else in
//! the crate: route prefixes and host names ([`routes`]), message subjects
//! ([`subjects`]) and OCI registry references ([`oci`]). The manifest validates with them,
//! the router, the bus and the registry client use them.

pub mod oci;
pub mod routes;
pub mod subjects;

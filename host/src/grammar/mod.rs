//! The small grammars several modules share, kept as leaves that depend on nothing else in
//! the crate: route prefixes and host names ([`routes`]) and message subjects
//! ([`subjects`]). The manifest validates with them, the router and the bus match with them.

pub mod routes;
pub mod subjects;

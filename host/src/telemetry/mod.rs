//! What the node tells its operator about itself: Prometheus metrics ([`metrics`]).

pub mod metrics;

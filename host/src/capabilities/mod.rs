//! What a component may be granted, one module per capability: [`keyvalue`] and [`sql`]
//! (on the component's own database; [`keyvalue_draft2`] is Spin's version of the first),
//! [`messaging`] (the bus), [`outbound`] (HTTP out and `NAME.internal` calls) with
//! [`events`] (durable delivery of what guests publish), [`config`] (the drafts of
//! `wasi:config`; rc.1 comes from `wasmtime-wasi-config`) and [`logging`]
//! (`wasi:logging`). Each module
//! owns its linker wiring, its per-instance view and its backends; adding a capability
//! is one module plus one line in `crate::runtime::instance::build_linker`. Nothing here
//! depends on the layers that use it: `NAME.internal` calls go through the
//! [`outbound::ComponentCaller`] trait, which the deploy registry implements.

pub mod config;
pub mod events;
pub mod keyvalue;
pub mod keyvalue_draft2;
pub mod logging;
pub mod messaging;
pub mod outbound;
pub mod sql;

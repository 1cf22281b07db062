//! What a component may be granted, one module per capability: [`keyvalue`] and [`sql`]
//! (on the component's own database), [`messaging`] (the bus), [`outbound`] (HTTP out and
//! `NAME.internal` calls) with [`events`] (durable delivery of what guests publish).
//! `wasi:config` comes from `wasmtime-wasi-config`. Each module
//! owns its linker wiring, its per-instance view and its backends; adding a capability
//! is one module plus one line in `crate::runtime::instance::build_linker`. Nothing here
//! depends on the layers that use it: `NAME.internal` calls go through the
//! [`outbound::ComponentCaller`] trait, which the deploy registry implements.

pub mod events;
pub mod keyvalue;
pub mod messaging;
pub mod outbound;
pub mod sql;

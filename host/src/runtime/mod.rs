//! Running components: the node's wasmtime engine ([`engine`]), what one instance's `Store`
//! holds ([`instance`]), tenants' CPU turns ([`cpu_turn`]), a deployed version prepared
//! for instantiation ([`version`]) and the one path every call takes through it
//! ([`invoke`]), where a call's instance comes from, fresh or warm ([`reuse`]), WASIp3
//! instances serving several requests at once ([`concurrent`]), request bodies metered as
//! they stream ([`body`]), and the node's memory budget ([`memory`]).

pub mod body;
pub mod concurrent;
pub mod cpu_turn;
pub mod engine;
pub mod instance;
pub mod invoke;
pub mod memory;
pub mod reuse;
pub mod version;

//! The host side of the project's WIT world (`wit/world.wit`): the one `bindgen!` for every
//! interface Trellis implements itself (WASI, wasi:http and wasi:config come from the
//! wasmtime crates), and the message-handler export. Each capability module implements the
//! generated traits.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "trellis:platform/platform",
    imports: { default: async | trappable },
    with: {
        "wasi:keyvalue/store.bucket": crate::capabilities::keyvalue::Bucket,
        "trellis:platform/sql.transaction": crate::capabilities::sql::Transaction,
    },
    trappable_error_type: {
        "wasi:keyvalue/store.error" => crate::capabilities::keyvalue::KvError,
        "trellis:platform/sql.error" => crate::capabilities::sql::SqlError,
    },
});

/// The export side of messaging: calling a component's `handle-message`.
pub mod handler {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "trellis:platform/message-handler",
        exports: { default: async },
        with: {
            "wasmcloud:messaging/types": crate::bindings::wasmcloud::messaging::types,
        },
    });
}

/// The interface versions other hosts serve (`wit/compat/world.wit`): Spin 4's key-value
/// and config drafts, wasmCloud's config draft and logging. Implemented by the same
/// capabilities as Trellis's own versions.
pub mod compat {
    wasmtime::component::bindgen!({
        path: "../wit/compat",
        world: "trellis:compat/compat",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": crate::capabilities::keyvalue::Bucket,
            "wasi:keyvalue/atomics.cas": crate::capabilities::keyvalue_draft2::Cas,
        },
        trappable_error_type: {
            "wasi:keyvalue/store.error" => crate::capabilities::keyvalue::KvError,
        },
    });
}

/// wasmCloud's older `wasi:config/runtime@0.2.0-draft` (`wit/compat-runtime`).
pub mod compat_runtime {
    wasmtime::component::bindgen!({
        path: "../wit/compat-runtime",
        world: "trellis:compat-runtime/compat-runtime",
        imports: { default: trappable },
    });
}

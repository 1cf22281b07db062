//! The host side of the project's WIT world (`wit/world.wit`): the one `bindgen!` for every
//! interface Trellis implements itself (WASI, wasi:http and wasi:config come from the
//! wasmtime crates). Each capability module implements the generated traits.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "trellis:platform/platform",
    imports: { default: async | trappable },
    with: {
        "wasi:keyvalue/store.bucket": crate::keyvalue::Bucket,
        "trellis:platform/sql.transaction": crate::sql::Transaction,
    },
    trappable_error_type: {
        "wasi:keyvalue/store.error" => crate::keyvalue::KvError,
        "trellis:platform/sql.error" => crate::sql::SqlError,
    },
});

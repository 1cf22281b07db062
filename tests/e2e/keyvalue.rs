//! Key-value storage through the gateway, on SQLite and on a real PostgreSQL: the same
//! suite runs against both backends, and through both interface versions a component may
//! import: `wasi:keyvalue@0.2.0-draft` (`kv-probe`) and Spin 4's `@0.2.0-draft2`
//! (`kv-probe-draft2`, the same guest source).

use crate::common;
use common::{NodeOptions, TestNode, on_both_backends};

const MANIFEST: &str = r#"
[tenants.shop]
hosts = ["shop.test"]

[tenants.blog]
hosts = ["blog.test"]

[components.cart]
tenant = "shop"
source = "{wasm:kv-probe}"
routes = ["/cart"]
keyvalue = ["default", "sessions"]

[components.orders]
tenant = "shop"
source = "{wasm:kv-probe}"
routes = ["/orders"]
keyvalue = ["default"]

[components.posts]
tenant = "blog"
source = "{wasm:kv-probe}"
routes = ["/cart"]
keyvalue = ["default"]

[components.nothing]
tenant = "shop"
source = "{wasm:kv-probe}"
routes = ["/nothing"]
"#;

on_both_backends!(crud_atomics_and_batch);
on_both_backends!(crud_atomics_and_batch_through_draft2);
on_both_backends!(components_and_tenants_cannot_see_each_others_keys);
on_both_backends!(draft2_compare_and_swap_and_signed_counters);

/// The manifest with every component built against `probe`'s key-value version.
fn manifest(probe: &str) -> String {
    MANIFEST.replace("{wasm:kv-probe}", &format!("{{wasm:{probe}}}"))
}

async fn crud_atomics_and_batch(options: NodeOptions) {
    crud_atomics_and_batch_with(options, "kv-probe").await;
}

async fn crud_atomics_and_batch_through_draft2(options: NodeOptions) {
    crud_atomics_and_batch_with(options, "kv-probe-draft2").await;
}
on_both_backends!(data_survives_a_node_restart);
on_both_backends!(ungranted_buckets_are_access_denied);

async fn send(node: &TestNode, method: &str, path: &str, body: &str) -> serde_json::Value {
    let response = node
        .request(
            method,
            path,
            Some(body.to_string().into()),
            &[("host", "shop.test")],
        )
        .await;
    assert_eq!(response.status, 200, "{method} {path}: {}", response.body);
    response.json()
}

async fn crud_atomics_and_batch_with(options: NodeOptions, probe: &str) {
    let node = TestNode::start_with(&manifest(probe), &options).await;

    assert_eq!(
        send(&node, "GET", "/cart/kv/default/apple", "").await["value"],
        serde_json::Value::Null
    );
    send(&node, "PUT", "/cart/kv/default/apple", "red").await;
    assert_eq!(
        send(&node, "GET", "/cart/kv/default/apple", "").await["value"],
        "red"
    );
    send(&node, "PUT", "/cart/kv/default/apple", "green").await;
    assert_eq!(
        send(&node, "GET", "/cart/kv/default/apple", "").await["value"],
        "green",
        "set overwrites"
    );
    assert_eq!(
        send(&node, "GET", "/cart/exists/default/apple", "").await["exists"],
        true
    );
    // The empty identifier is the default bucket.
    assert_eq!(
        send(&node, "GET", "/cart/kv/~/apple", "").await["value"],
        "green"
    );
    send(&node, "DELETE", "/cart/kv/default/apple", "").await;
    assert_eq!(
        send(&node, "GET", "/cart/exists/default/apple", "").await["exists"],
        false
    );
    send(&node, "DELETE", "/cart/kv/default/apple", "").await; // deleting a missing key is fine

    // Atomics: a missing counter starts at the delta; non-counters are an error.
    assert_eq!(
        send(&node, "POST", "/cart/incr/default/visits?by=5", "").await["value"],
        5
    );
    assert_eq!(
        send(&node, "POST", "/cart/incr/default/visits?by=2", "").await["value"],
        7
    );
    send(&node, "PUT", "/cart/kv/default/word", "seven").await;
    let not_a_counter = node
        .request(
            "POST",
            "/cart/incr/default/word",
            None,
            &[("host", "shop.test")],
        )
        .await;
    assert_eq!(not_a_counter.status, 500);
    assert!(
        not_a_counter.json()["error"]
            .as_str()
            .unwrap()
            .contains("not a decimal counter")
    );

    // Batch, and buckets are separate namespaces.
    send(
        &node,
        "PUT",
        "/cart/batch/sessions",
        "s1=alice&s2=bob&s3=carol",
    )
    .await;
    let values = send(&node, "GET", "/cart/batch/sessions?keys=s1,missing,s3", "").await;
    assert_eq!(
        values["values"],
        serde_json::json!([["s1", "alice"], null, ["s3", "carol"]])
    );
    send(&node, "DELETE", "/cart/batch/sessions?keys=s1,s2", "").await;
    assert_eq!(
        send(&node, "GET", "/cart/keys/sessions", "").await["keys"],
        serde_json::json!(["s3"])
    );
    assert_eq!(
        send(&node, "GET", "/cart/keys/default", "").await["keys"],
        serde_json::json!(["visits", "word"])
    );
}

async fn components_and_tenants_cannot_see_each_others_keys(options: NodeOptions) {
    let node = TestNode::start_with(MANIFEST, &options).await;
    send(&node, "PUT", "/cart/kv/default/secret", "cart-only").await;

    // Another component of the same tenant, same bucket name: its own, empty store.
    assert_eq!(
        send(&node, "GET", "/orders/kv/default/secret", "").await["value"],
        serde_json::Value::Null
    );
    assert_eq!(
        send(&node, "GET", "/orders/keys/default", "").await["keys"],
        serde_json::json!([])
    );

    // Another tenant's component, routed at the same path: also its own store.
    let other_tenant = node
        .request(
            "GET",
            "/cart/kv/default/secret",
            None,
            &[("host", "blog.test")],
        )
        .await;
    assert_eq!(other_tenant.status, 200);
    assert_eq!(other_tenant.json()["value"], serde_json::Value::Null);
    let written = node
        .request(
            "PUT",
            "/cart/kv/default/secret",
            Some("blog".into()),
            &[("host", "blog.test")],
        )
        .await;
    assert_eq!(written.status, 200);
    assert_eq!(
        send(&node, "GET", "/cart/kv/default/secret", "").await["value"],
        "cart-only"
    );

    // No bucket name reaches another component's data: names are only keys in one's own store.
    for bucket in ["..", "orders", "shop.cart", "trellis_kv"] {
        let response = node
            .request(
                "GET",
                &format!("/cart/kv/{bucket}/secret"),
                None,
                &[("host", "shop.test")],
            )
            .await;
        assert_eq!(response.status, 403, "bucket {bucket:?} was not granted");
    }
}

async fn data_survives_a_node_restart(mut options: NodeOptions) {
    let data_dir = tempfile::tempdir().unwrap();
    options.data_dir = Some(data_dir.path().to_path_buf());

    let node = TestNode::start_with(MANIFEST, &options).await;
    send(&node, "PUT", "/cart/kv/default/kept", "across restarts").await;
    send(&node, "POST", "/cart/incr/default/counter?by=41", "").await;
    drop(node);

    let node = TestNode::start_with(MANIFEST, &options).await;
    assert_eq!(
        send(&node, "GET", "/cart/kv/default/kept", "").await["value"],
        "across restarts"
    );
    assert_eq!(
        send(&node, "POST", "/cart/incr/default/counter", "").await["value"],
        42
    );
}

async fn ungranted_buckets_are_access_denied(options: NodeOptions) {
    let node = TestNode::start_with(MANIFEST, &options).await;
    // `orders` was granted only "default".
    let response = node
        .request(
            "PUT",
            "/orders/kv/sessions/x",
            Some("y".into()),
            &[("host", "shop.test")],
        )
        .await;
    assert_eq!(response.status, 403);
    assert_eq!(response.json()["error"], "access-denied");
    // `nothing` was granted no key-value at all.
    let response = node
        .request(
            "GET",
            "/nothing/kv/default/x",
            None,
            &[("host", "shop.test")],
        )
        .await;
    assert_eq!(response.status, 403);
}

async fn draft2_compare_and_swap_and_signed_counters(options: NodeOptions) {
    let node = TestNode::start_with(&manifest("kv-probe-draft2"), &options).await;
    // Compare-and-swap: into an absent key, then from the value it holds.
    let swapped = send(&node, "POST", "/cart/cas/default/lock", "mine").await;
    assert_eq!(swapped["swapped"], true, "{swapped}");
    let swapped = send(&node, "POST", "/cart/cas/default/lock?expect=mine", "yours").await;
    assert_eq!(swapped["swapped"], true, "{swapped}");
    assert_eq!(
        send(&node, "GET", "/cart/kv/default/lock", "").await["value"],
        "yours"
    );
    // A write between reading and swapping: the host refuses the swap (cas-failed)...
    let refused = send(
        &node,
        "POST",
        "/cart/cas/default/lock?expect=yours&interfere=theirs",
        "mine-again",
    )
    .await;
    assert_eq!(refused["swapped"], false, "{refused}");
    assert_eq!(refused["reason"], "cas-failed", "{refused}");
    // ...and the other writer's value stands.
    assert_eq!(
        send(&node, "GET", "/cart/kv/default/lock", "").await["value"],
        "theirs"
    );

    // draft2's counters are signed.
    assert_eq!(
        send(&node, "POST", "/cart/incr/default/stock?by=2", "").await["value"],
        2
    );
    assert_eq!(
        send(&node, "POST", "/cart/incr/default/stock?by=-5", "").await["value"],
        -3
    );
}

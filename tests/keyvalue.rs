//! Key-value storage (`wasi:keyvalue@0.2.0-draft`) through the gateway, on SQLite and on a
//! real PostgreSQL: the same suite runs against both backends.

mod common;
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
on_both_backends!(components_and_tenants_cannot_see_each_others_keys);
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

async fn crud_atomics_and_batch(options: NodeOptions) {
    let node = TestNode::start_with(MANIFEST, &options).await;

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

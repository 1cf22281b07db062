//! Messaging (`wasmcloud:messaging@0.2.0`) through real components: publish to a
//! subscribed handler, request/reply, retries then dead-letter, publish grants; on the
//! in-process bus and on a real nats-server, including two nodes sharing the work and a
//! NATS restart in the middle.

mod common;
use std::time::{Duration, Instant};

use common::{Nats, NodeOptions, TestNode};
use serde_json::json;

const MANIFEST: &str = r#"
[components.orders]
source = "{wasm:msg-probe}"
routes = ["/orders"]
keyvalue = ["default"]
publish = ["order.*", "pay.>", "audit.*"]

[components.notifier]
source = "{wasm:msg-probe}"
routes = ["/notifier"]
keyvalue = ["default"]
subscriptions = ["order.*", "pay.>"]
limits = { message_attempts = 3 }

[components.dlq]
source = "{wasm:msg-probe}"
routes = ["/dlq"]
keyvalue = ["default"]
subscriptions = ["dead-letter.>"]
"#;

async fn post(node: &TestNode, path: &str, body: &str) -> serde_json::Value {
    let response = node.post(path, body.to_string()).await;
    assert_eq!(response.status, 200, "{path}: {}", response.body);
    response.json()
}

/// Polls `path` until `done` holds for its JSON (messages are asynchronous), up to 15 s.
async fn eventually(
    node: &TestNode,
    path: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let value = node.get(path).await.json();
        if done(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never got there; last: {value}\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish_request_retry_and_dead_letter(options: NodeOptions) {
    let node = TestNode::start_with(MANIFEST, &options).await;

    assert_eq!(
        post(&node, "/orders/publish/order.created", "o-1").await,
        json!({"ok": true})
    );
    eventually(&node, "/notifier/received", |v| {
        v["received"] == json!(["order.created|o-1"])
    })
    .await;

    let reply = post(&node, "/orders/request/pay.charge?timeout=5000", "p-1").await;
    assert_eq!(reply, json!({"reply": "reply:p-1"}));

    // A handler that keeps failing gets three attempts, then its message is dead-lettered.
    post(&node, "/orders/publish/order.fail", "broken").await;
    eventually(&node, "/dlq/received", |v| {
        v["received"] == json!(["dead-letter.notifier.order.fail|broken"])
    })
    .await;
    assert_eq!(
        node.get("/notifier/attempts/order.fail").await.json()["attempts"],
        3
    );
    // A trapping handler is retried too.
    post(&node, "/orders/publish/order.trap", "boom").await;
    eventually(&node, "/dlq/received", |v| {
        v["received"].as_array().is_some_and(|r| r.len() == 2)
    })
    .await;
    assert_eq!(
        node.get("/notifier/attempts/order.trap").await.json()["attempts"],
        3
    );
    let metrics = node.metrics().await;
    assert!(
        metrics.contains(
            r#"trellis_messages_dead_lettered_total{tenant="default",component="notifier"} 2"#
        ),
        "{metrics}"
    );

    // Publishing needs a grant for the subject; wildcards are for subscribing only.
    let denied = post(&node, "/orders/publish/secret.plans", "x").await;
    assert!(
        denied["error"].as_str().unwrap().contains("not granted"),
        "{denied}"
    );
    let wildcard = post(&node, "/orders/publish/order.*", "x").await;
    assert!(
        wildcard["error"].as_str().unwrap().contains("wildcards"),
        "{wildcard}"
    );
    let no_grant = post(&node, "/notifier/publish/order.created", "x").await;
    assert!(
        no_grant["error"].as_str().unwrap().contains("not granted"),
        "{no_grant}"
    );
    // A request nobody answers fails in the guest instead of hanging.
    let unanswered = post(&node, "/orders/request/audit.nobody?timeout=300", "x").await;
    assert!(unanswered["error"].is_string(), "{unanswered}");
}

#[tokio::test]
async fn on_the_in_process_bus() {
    publish_request_retry_and_dead_letter(NodeOptions::default()).await;
}

#[tokio::test]
async fn on_a_real_nats_server() {
    let nats = Nats::start();
    publish_request_retry_and_dead_letter(NodeOptions {
        nats_url: Some(nats.url()),
        ..Default::default()
    })
    .await;
}

#[tokio::test]
async fn tenants_only_see_their_own_subjects() {
    let node = TestNode::start(
        r#"
[tenants.shop]
hosts = ["shop.test"]
[tenants.blog]
hosts = ["blog.test"]

[components.shop-publisher]
tenant = "shop"
source = "{wasm:msg-probe}"
routes = ["/"]
keyvalue = ["default"]
publish = ["news.>"]

[components.blog-listener]
tenant = "blog"
source = "{wasm:msg-probe}"
routes = ["/"]
keyvalue = ["default"]
subscriptions = [">"]
"#,
    )
    .await;
    let published = node
        .request(
            "POST",
            "/publish/news.today",
            Some("shop-only".into()),
            &[("host", "shop.test")],
        )
        .await;
    assert_eq!(published.json(), json!({"ok": true}));
    // The blog's catch-all subscription sees nothing of the shop's subjects.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = node
        .request("GET", "/received", None, &[("host", "blog.test")])
        .await
        .json();
    assert_eq!(received["received"], json!([]));
}

#[tokio::test]
async fn two_nodes_on_one_nats_server_handle_each_message_once() {
    let nats = Nats::start();
    let options = |dir: &tempfile::TempDir| NodeOptions {
        nats_url: Some(nats.url()),
        data_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let node_a = TestNode::start_with(MANIFEST, &options(&dir_a)).await;
    let node_b = TestNode::start_with(MANIFEST, &options(&dir_b)).await;

    let total = 40;
    for i in 0..total {
        post(
            &node_a,
            &format!("/orders/publish/order.n{i}"),
            &format!("m{i}"),
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut a, mut b);
    loop {
        a = node_a.get("/notifier/received").await.json()["received"]
            .as_array()
            .unwrap()
            .clone();
        b = node_b.get("/notifier/received").await.json()["received"]
            .as_array()
            .unwrap()
            .clone();
        if a.len() + b.len() >= total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut all: Vec<String> = a
        .iter()
        .chain(b.iter())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(
        a.len() + b.len(),
        total,
        "every message handled exactly once (a: {}, b: {})",
        a.len(),
        b.len()
    );
    assert_eq!(all.len(), total, "no message handled twice");
    assert!(
        !a.is_empty() && !b.is_empty(),
        "the queue group splits the work: a {} b {}",
        a.len(),
        b.len()
    );
}

#[tokio::test]
async fn delivery_resumes_after_nats_restarts() {
    let mut nats = Nats::start();
    let node = TestNode::start_with(
        MANIFEST,
        &NodeOptions {
            nats_url: Some(nats.url()),
            ..Default::default()
        },
    )
    .await;
    post(&node, "/orders/publish/order.before", "1").await;
    eventually(&node, "/notifier/received", |v| {
        v["received"].as_array().is_some_and(|r| r.len() == 1)
    })
    .await;

    nats.restart();

    // Messages published while the node reconnects may be lost (core NATS is at-most-once);
    // keep publishing until one arrives: the subscription must come back by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        post(&node, &format!("/orders/publish/order.after{n}"), "2").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let received = node.get("/notifier/received").await.json();
        if received["received"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m.as_str().unwrap().starts_with("order.after"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery after the NATS restart:\n{}",
            node.log()
        );
    }
}

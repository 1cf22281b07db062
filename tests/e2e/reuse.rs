//! Warm instance reuse (`reuse = { ... }` in a component's entry), through the real binary
//! and real guests: state one call leaves in an instance is seen by the next only when
//! reuse is on; a trap, deadline kill or memory kill, `max_requests`, `max_memory`, `idle`
//! and a swap each retire the instance; tenants with the same bytes never share one;
//! message deliveries (durable events too, their ids through `wasi:config`) and WASIp3
//! handlers are reused alike, a WASIp3 instance serving several requests at once (a trap
//! failing the ones it had in flight, a deadline failing only its own request); idle warm
//! instances give way when the node's memory budget is short. The limits tests run with reuse on as well
//! (`limits.rs`).

use crate::common;
use std::time::{Duration, Instant};

use common::TestNode;

const MANIFEST: &str = r#"
[components.warm]
source = "{wasm:probe}"
routes = ["/warm"]
limits = { memory = "16MiB", deadline = "1s" }
reuse = { max_requests = 1000, idle = "30s" }

[components.cold]
source = "{wasm:probe}"
routes = ["/cold"]

[components.short]
source = "{wasm:probe}"
routes = ["/short"]
reuse = { max_requests = 3, idle = "30s" }

[components.holder]
source = "{wasm:probe}"
routes = ["/holder"]
limits = { memory = "32MiB" }
reuse = { idle = "30s", max_memory = "4MiB" }

[components.brief]
source = "{wasm:probe}"
routes = ["/brief"]
reuse = { idle = "300ms" }

[components.p3]
source = "{wasm:hello-p3}"
routes = ["/p3"]
limits = { deadline = "1s" }
reuse = { idle = "30s" }

[components.p3one]
source = "{wasm:hello-p3}"
routes = ["/p3one"]
reuse = { idle = "30s", concurrent = 1 }

[components.p3cold]
source = "{wasm:hello-p3}"
routes = ["/p3cold"]

[components.caller]
source = "{wasm:probe}"
routes = ["/caller"]
outbound = ["warm.internal", "cold.internal"]
"#;

/// The `count` a probe answered: calls its instance has served.
async fn count(node: &TestNode, path: &str) -> u64 {
    let response = node.get(path).await;
    assert_eq!(response.status, 200, "{path}: {}", response.body);
    response.json()["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("{path}: no count in {}", response.body))
}

async fn counts(node: &TestNode, path: &str, n: usize) -> Vec<u64> {
    let mut seen = Vec::new();
    for _ in 0..n {
        seen.push(count(node, path).await);
    }
    seen
}

#[tokio::test]
async fn state_left_by_a_call_is_seen_by_the_next_only_with_reuse_on() {
    let node = TestNode::start(MANIFEST).await;
    assert_eq!(counts(&node, "/warm/count", 4).await, [1, 2, 3, 4]);
    assert_eq!(
        counts(&node, "/cold/count", 4).await,
        [1, 1, 1, 1],
        "without reuse every call gets a fresh instance"
    );
    assert_eq!(
        node.metric("trellis_instances_reused_total", "default", "warm")
            .await,
        3.0
    );
    assert_eq!(
        node.metric("trellis_instances_reused_total", "default", "cold")
            .await,
        0.0
    );
    // NAME.internal calls take the same path: the caller reaches the same warm instance.
    assert_eq!(
        internal_count(&node, "http://warm.internal/warm/count").await,
        5,
        "an internal call is served warm"
    );
    assert_eq!(
        internal_count(&node, "http://cold.internal/cold/count").await,
        1
    );
}

/// The `count` a probe answered to a `NAME.internal` call made by `caller`.
async fn internal_count(node: &TestNode, url: &str) -> u64 {
    let reply = node.get(&format!("/caller/fetch?url={url}")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = reply.json();
    assert_eq!(reply["status"], 200, "{reply}");
    let body: serde_json::Value =
        serde_json::from_str(reply["body"].as_str().unwrap().trim()).unwrap();
    body["count"].as_u64().unwrap()
}

#[tokio::test]
async fn a_trap_a_deadline_kill_or_a_memory_kill_retires_the_instance() {
    let node = TestNode::start(MANIFEST).await;
    assert_eq!(counts(&node, "/warm/count", 2).await, [1, 2]);

    let trapped = node.get("/warm/trap").await;
    assert_eq!(trapped.status, 500, "{}", trapped.body);
    assert_eq!(trapped.json()["error"], "component_trap");
    assert_eq!(
        counts(&node, "/warm/count", 2).await,
        [1, 2],
        "after a trap the next call gets a fresh instance, which is then reused"
    );

    let looped = node.get("/warm/loop").await;
    assert_eq!(looped.status, 504, "{}", looped.body);
    assert_eq!(looped.json()["error"], "deadline_exceeded");
    assert_eq!(counts(&node, "/warm/count", 2).await, [1, 2]);

    let grown = node.get("/warm/grow").await;
    assert_eq!(grown.status, 500, "{}", grown.body);
    assert_eq!(grown.json()["error"], "memory_limit");
    assert_eq!(counts(&node, "/warm/count", 2).await, [1, 2]);

    // A warm instance runs under each call's own deadline, not the first call's.
    let slept = node.get("/warm/sleep?ms=600").await;
    assert_eq!(slept.status, 200, "{}", slept.body);
    let slept = node.get("/warm/sleep?ms=600").await;
    assert_eq!(slept.status, 200, "the second call has its own second");
    assert_eq!(
        count(&node, "/warm/count").await,
        3,
        "the same instance served both sleeps"
    );
}

#[tokio::test]
async fn max_requests_max_memory_and_idle_retire_an_instance() {
    let node = TestNode::start(MANIFEST).await;
    assert_eq!(
        counts(&node, "/short/count", 7).await,
        [1, 2, 3, 1, 2, 3, 1],
        "max_requests = 3"
    );

    assert_eq!(counts(&node, "/holder/count", 2).await, [1, 2]);
    let held = node.get("/holder/hold?mb=8").await;
    assert_eq!(held.status, 200, "{}", held.body);
    assert_eq!(held.json()["count"], 3, "served warm");
    assert_eq!(
        count(&node, "/holder/count").await,
        1,
        "an instance grown past max_memory is not kept"
    );

    assert_eq!(counts(&node, "/brief/count", 2).await, [1, 2]);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        count(&node, "/brief/count").await,
        1,
        "an instance idle past `idle` is dropped"
    );
}

#[tokio::test]
async fn a_swap_retires_warm_instances_even_of_a_version_that_comes_back() {
    let node = TestNode::start(MANIFEST).await;
    const WARM: &str = "/v1/tenants/default/components/warm";
    assert_eq!(counts(&node, "/warm/count", 3).await, [1, 2, 3]);

    let hello = std::fs::read(common::wasm("hello")).unwrap();
    let uploaded = node
        .admin(
            "POST",
            &format!("{WARM}/versions?activate=true"),
            Some(hello.into()),
        )
        .await;
    assert_eq!(uploaded.status, 201, "{}", uploaded.body);
    let swapped = node.get("/warm/count").await;
    assert_eq!(swapped.status, 200);
    assert!(swapped.json()["count"].is_null(), "hello serves now");

    // Back to the probe: the very version that served before, with none of its state.
    let rolled_back = node.admin("POST", &format!("{WARM}/rollback"), None).await;
    assert_eq!(rolled_back.status, 200, "{}", rolled_back.body);
    assert_eq!(counts(&node, "/warm/count", 2).await, [1, 2]);

    // The same for a WASIp3 component's shared instances, and a request in flight during
    // the swap finishes on the instance it started in.
    const P3: &str = "/v1/tenants/default/components/p3";
    assert_eq!(counts(&node, "/p3/count", 2).await, [1, 2]);
    let in_flight = node.get("/p3/wait?ms=500");
    let swap = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let hello = std::fs::read(common::wasm("hello")).unwrap();
        node.admin(
            "POST",
            &format!("{P3}/versions?activate=true"),
            Some(hello.into()),
        )
        .await
    };
    let (in_flight, uploaded) = tokio::join!(in_flight, swap);
    assert_eq!(uploaded.status, 201, "{}", uploaded.body);
    assert_eq!(in_flight.status, 200, "{}", in_flight.body);
    assert_eq!(in_flight.json()["most_at_once"], 1, "{}", in_flight.body);
    assert!(
        node.get("/p3/count").await.json()["count"].is_null(),
        "hello serves now"
    );
    let rolled_back = node.admin("POST", &format!("{P3}/rollback"), None).await;
    assert_eq!(rolled_back.status, 200, "{}", rolled_back.body);
    assert_eq!(counts(&node, "/p3/count", 2).await, [1, 2]);
}

#[tokio::test]
async fn two_tenants_with_the_same_bytes_never_share_an_instance() {
    let node = TestNode::start(
        r#"
[tenants.shop]
hosts = ["shop.test"]

[tenants.blog]
hosts = ["blog.test"]

[components.counter]
tenant = "shop"
source = "{wasm:probe}"
routes = ["/counter"]
reuse = { idle = "30s" }

[components.counter-too]
tenant = "blog"
source = "{wasm:probe}"
routes = ["/counter"]
reuse = { idle = "30s" }
"#,
    )
    .await;
    let count_at = |host: &'static str| {
        let node = &node;
        async move {
            let response = node.get_host(host, "/counter/count").await;
            assert_eq!(response.status, 200, "{host}: {}", response.body);
            response.json()["count"].as_u64().unwrap()
        }
    };
    assert_eq!(count_at("shop.test").await, 1);
    assert_eq!(
        count_at("shop.test").await,
        2,
        "reuse is on (positive control)"
    );
    assert_eq!(
        count_at("blog.test").await,
        1,
        "the other tenant's own instance"
    );
    assert_eq!(count_at("blog.test").await, 2);
    assert_eq!(count_at("shop.test").await, 3);
}

#[tokio::test]
async fn a_wasip3_handler_is_reused_and_retired_after_a_trap() {
    let node = TestNode::start(MANIFEST).await;
    assert_eq!(counts(&node, "/p3/count", 3).await, [1, 2, 3]);
    let trapped = node.get("/p3/trap").await;
    assert_eq!(trapped.status, 500, "{}", trapped.body);
    assert_eq!(counts(&node, "/p3/count", 2).await, [1, 2]);
    let looped = node.get("/p3/loop").await;
    assert_eq!(looped.status, 504, "{}", looped.body);
    assert_eq!(counts(&node, "/p3/count", 2).await, [1, 2]);
    // A streamed body still arrives whole from a warm instance.
    let streamed = node.stream_echo("/p3/echo", 256 << 10, 16 << 10).await;
    assert!(streamed.echoes(256 << 10), "{streamed:?}");
    assert_eq!(count(&node, "/p3/count").await, 3);
}

/// `n` GETs of `path` at once.
async fn at_once(node: &TestNode, path: &str, n: usize) -> Vec<common::Response> {
    futures_util::future::join_all((0..n).map(|_| node.get(path))).await
}

/// How many instances answered a batch of hello-p3 `/wait` calls, and the most requests
/// any of them saw in flight at once.
fn instances_and_most(answers: &[common::Response]) -> (usize, u64) {
    let mut instances = std::collections::BTreeSet::new();
    let mut most = 0;
    for answer in answers {
        assert_eq!(answer.status, 200, "{}", answer.body);
        let json = answer.json();
        instances.insert(json["instance"].as_str().unwrap().to_string());
        most = most.max(json["most_at_once"].as_u64().unwrap());
    }
    (instances.len(), most)
}

#[tokio::test]
async fn a_wasip3_instance_serves_several_requests_at_once() {
    let node = TestNode::start(MANIFEST).await;
    // Reuse on (concurrent = 16 by default): eight waiting requests share one instance.
    let shared = at_once(&node, "/p3/wait?ms=500", 8).await;
    let (instances, most) = instances_and_most(&shared);
    assert_eq!(instances, 1, "{shared:?}");
    assert!(most >= 2, "never more than one at once: {shared:?}");
    // Controls: concurrent = 1 gives each request in flight an instance of its own, and
    // without reuse every request gets a fresh one.
    for path in ["/p3one/wait?ms=300", "/p3cold/wait?ms=300"] {
        let answers = at_once(&node, path, 4).await;
        assert_eq!(instances_and_most(&answers), (4, 1), "{path}: {answers:?}");
    }
    let reused = node
        .metric("trellis_instances_reused_total", "default", "p3")
        .await;
    assert!(reused >= 7.0, "{reused}");
}

#[tokio::test]
async fn a_trap_fails_the_requests_its_shared_instance_had_in_flight() {
    let node = TestNode::start(MANIFEST).await;
    // Positive control: two waiting requests on one instance both answer.
    let calm = at_once(&node, "/p3/wait?ms=300", 2).await;
    assert_eq!(instances_and_most(&calm).0, 1, "{calm:?}");
    // The same two, and a request that traps in their instance while they wait.
    let trap = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        node.get("/p3/trap").await
    };
    let (waits, trapped) = tokio::join!(at_once(&node, "/p3/wait?ms=600", 2), trap);
    assert_eq!(trapped.status, 500, "{}", trapped.body);
    for wait in &waits {
        assert_eq!(wait.status, 500, "{}", wait.body);
        assert_eq!(wait.json()["error"], "component_trap", "{}", wait.body);
    }
    // The node goes on with a fresh instance, which is reused again.
    assert_eq!(counts(&node, "/p3/count", 2).await, [1, 2]);
}

#[tokio::test]
async fn a_request_past_its_deadline_in_a_shared_instance_fails_alone() {
    let node = TestNode::start(MANIFEST).await;
    // Deadline 1 s: the long wait expires while a short one in the same instance answers.
    let short = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        node.get("/p3/wait?ms=200").await
    };
    let (long, short) = tokio::join!(node.get("/p3/wait?ms=1500"), short);
    assert_eq!(long.status, 504, "{}", long.body);
    assert_eq!(short.status, 200, "{}", short.body);
    assert_eq!(short.json()["most_at_once"], 2, "{}", short.body);
    // The expired request's task may still run there: that instance takes no more, and
    // the next request gets a fresh one.
    assert_eq!(count(&node, "/p3/count").await, 1);
}

#[tokio::test]
async fn message_deliveries_reuse_instances_and_durable_events_keep_their_ids() {
    let node = TestNode::start(
        r#"
[components.orders]
source = "{wasm:msg-probe}"
routes = ["/orders"]
keyvalue = ["default"]
publish = ["tick.*", "order.*"]

[components.warm]
source = "{wasm:msg-probe}"
routes = ["/warm"]
keyvalue = ["default"]
subscriptions = ["tick.*", "order.*"]
ephemeral = ["tick.*"]
limits = { max_concurrent = 1 }
reuse = { idle = "30s" }

[components.cold]
source = "{wasm:msg-probe}"
routes = ["/cold"]
keyvalue = ["default"]
subscriptions = ["tick.*"]
ephemeral = ["tick.*"]
limits = { max_concurrent = 1 }
"#,
    )
    .await;
    for i in 0..3 {
        let published = node
            .post(&format!("/orders/publish/tick.{i}"), format!("t-{i}"))
            .await;
        assert_eq!(published.status, 200, "{}", published.body);
    }
    let published = node.post("/orders/publish/order.created", "o-1").await;
    assert_eq!(published.status, 200, "{}", published.body);

    let details = |path: &'static str, n: usize| {
        let node = &node;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let details = node.get(path).await.json()["details"].clone();
                if details.as_array().is_some_and(|d| d.len() >= n) {
                    return details;
                }
                assert!(Instant::now() < deadline, "{path}: {details}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let warm = details("/warm/details", 4).await;
    let in_instance = |details: &serde_json::Value, prefix: &str| -> Vec<u64> {
        details
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["subject"].as_str().unwrap().starts_with(prefix))
            .map(|d| d["in_instance"].as_u64().unwrap())
            .collect()
    };
    // Ticks and the event, one at a time (max_concurrent = 1) through one warm instance.
    let mut all = in_instance(&warm, "");
    all.sort();
    assert_eq!(all, [1, 2, 3, 4], "{warm}");
    // A durable event is served warm too; its id and attempt reach the guest through
    // wasi:config, set for this delivery (a warm instance's environment is its first's).
    let event: Vec<&serde_json::Value> = warm
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["subject"] == "order.created")
        .collect();
    assert_eq!(event.len(), 1, "{warm}");
    assert!(event[0]["in_instance"].as_u64().unwrap() >= 1, "{warm}");
    assert!(
        event[0]["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{warm}"
    );
    assert_eq!(event[0]["attempt"], "1", "{warm}");
    // A second event on the same warm instance sees its own id, not the first's.
    let published = node.post("/orders/publish/order.paid", "o-2").await;
    assert_eq!(published.status, 200, "{}", published.body);
    let warm = details("/warm/details", 5).await;
    let ids: Vec<&str> = warm
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["subject"].as_str().unwrap().starts_with("order."))
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{warm}");
    assert!(
        ids.iter().all(|id| !id.is_empty()) && ids[0] != ids[1],
        "{warm}"
    );
    assert!(
        warm.as_array()
            .unwrap()
            .iter()
            .any(|d| d["subject"] == "order.paid" && d["in_instance"].as_u64().unwrap() > 1),
        "the second event was served warm: {warm}"
    );
    let cold = details("/cold/details", 3).await;
    assert_eq!(in_instance(&cold, "tick."), [1, 1, 1], "{cold}");
}

#[tokio::test]
async fn idle_warm_instances_give_way_when_the_memory_budget_is_short() {
    let node = TestNode::start(
        r#"
[node]
max_memory = "48MiB"

[components.holder]
source = "{wasm:probe}"
routes = ["/holder"]
limits = { memory = "40MiB" }
reuse = { idle = "60s" }

[components.other]
source = "{wasm:probe}"
routes = ["/other"]
limits = { memory = "40MiB" }
"#,
    )
    .await;
    let held = node.get("/holder/hold?mb=28").await;
    assert_eq!(held.status, 200, "{}", held.body);
    assert_eq!(
        count(&node, "/holder/count").await,
        2,
        "kept warm, holding ~29 MiB"
    );
    let reserved = node.metrics().await;
    let reserved: f64 = reserved
        .lines()
        .find_map(|l| l.strip_prefix("trellis_node_memory_reserved_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(
        reserved > 28.0 * 1048576.0,
        "the warm instance holds its memory: {reserved}"
    );

    // 28 MiB more does not fit beside it; the idle warm instance is dropped to make room.
    let other = node.get("/other/hold?mb=28").await;
    assert_eq!(other.status, 200, "{}", other.body);
    assert_eq!(
        count(&node, "/holder/count").await,
        1,
        "the holder's warm instance was evicted"
    );
}

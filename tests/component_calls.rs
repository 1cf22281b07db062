//! Component-to-component calls: an outgoing wasi:http request to `http://NAME.internal/`
//! reaches component NAME of the caller's tenant in-process, with the callee's own limits,
//! and only when the caller's manifest allows that name.

mod common;
use common::TestNode;

const MANIFEST: &str = r#"
[tenants.shop]
hosts = ["shop.test"]

[tenants.blog]
hosts = ["blog.test"]

[components.caller]
tenant = "shop"
source = "{wasm:probe}"
routes = ["/caller"]
outbound = ["users.internal", "slow.internal", "ghost.internal", "writer.internal"]

[components.users]
tenant = "shop"
source = "{wasm:hello}"
routes = ["/api/users"]

[components.secret]
tenant = "shop"
source = "{wasm:hello}"
routes = ["/secret"]

[components.slow]
tenant = "shop"
source = "{wasm:probe}"
routes = ["/slow"]
limits = { deadline = "300ms" }

[components.writer]
tenant = "blog"
source = "{wasm:hello}"
routes = ["/"]
"#;

async fn fetch(node: &TestNode, url: &str) -> serde_json::Value {
    let response = node
        .request(
            "GET",
            &format!("/caller/fetch?url={url}"),
            None,
            &[("host", "shop.test")],
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

#[tokio::test]
async fn a_component_calls_another_of_its_tenant_by_name() {
    let node = TestNode::start(MANIFEST).await;

    let reply = fetch(&node, "http://users.internal/api/users/7").await;
    assert_eq!(reply["status"], 200, "{reply}");
    let body: serde_json::Value =
        serde_json::from_str(reply["body"].as_str().unwrap().trim()).unwrap();
    assert_eq!(body["service"], "hello");
    assert_eq!(body["path"], "/api/users/7");

    // The callee's request is counted as its own.
    let metrics = node.metrics().await;
    assert!(
        metrics
            .contains(r#"trellis_requests_total{tenant="shop",component="users",status="200"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_callee_keeps_its_own_deadline() {
    let node = TestNode::start(MANIFEST).await;
    let reply = fetch(&node, "http://slow.internal/slow/loop").await;
    assert_eq!(
        reply["status"], 504,
        "the callee's 300 ms deadline cut it off: {reply}"
    );
    assert_eq!(node.get_host("shop.test", "/caller").await.status, 200);
}

#[tokio::test]
async fn calls_need_a_grant_and_stay_inside_the_tenant() {
    let node = TestNode::start(MANIFEST).await;

    // `secret` exists in the tenant but is not in the caller's outbound list.
    let denied = fetch(&node, "http://secret.internal/secret").await;
    assert_eq!(denied["error"], "ErrorCode::HttpRequestDenied", "{denied}");

    // `writer` is allowed by name but belongs to another tenant: it does not exist here.
    let other_tenant = fetch(&node, "http://writer.internal/").await;
    assert!(
        other_tenant["error"].as_str().unwrap().contains("DnsError"),
        "{other_tenant}"
    );

    // A name no component has.
    let ghost = fetch(&node, "http://ghost.internal/").await;
    assert!(
        ghost["error"].as_str().unwrap().contains("DnsError"),
        "{ghost}"
    );
}

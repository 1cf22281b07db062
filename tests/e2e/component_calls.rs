//! Component-to-component calls: an outgoing wasi:http request to `http://NAME.internal/`
//! reaches component NAME of the caller's tenant in-process, with the callee's own limits,
//! and only when the caller's manifest allows that name.

use crate::common;
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

#[tokio::test]
async fn a_body_streams_to_a_sibling_and_back_while_it_is_written() {
    let node = TestNode::start(
        r#"
[components.caller]
source = "{wasm:probe}"
routes = ["/caller"]
outbound = ["echo.internal", "small.internal"]
limits = { deadline = "20s" }

[components.echo]
source = "{wasm:probe}"
routes = ["/echo"]
limits = { max_body = "16MiB", deadline = "20s" }

[components.small]
source = "{wasm:probe}"
routes = ["/small"]
limits = { max_body = "64KiB", deadline = "20s" }
"#,
    )
    .await;
    // The caller waits for the echo's response head before writing, then writes 4 MiB
    // while reading: with a body held back until complete this would hang to 504.
    let total = 4 * 1024 * 1024;
    let reply = node
        .get(&format!(
            "/caller/duplex?url=http://echo.internal/echo/echo&bytes={total}"
        ))
        .await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.body, node.log());
    let report = reply.json();
    assert_eq!(report["status"], 200, "{report}");
    assert_eq!(report["sent"], total, "{report}");
    assert_eq!(report["received"], total, "{report}");
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["read_error"], serde_json::Value::Null, "{report}");
    assert!(
        report["read_while_writing"].as_u64().unwrap() > 0,
        "the echo should come back while the body is still being written: {report}"
    );

    // The callee's max_body holds on a streamed body: the echo stops where it passes.
    let reply = node
        .get("/caller/duplex?url=http://small.internal/small/echo&bytes=1048576")
        .await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.body, node.log());
    let report = reply.json();
    assert!(
        report["received"].as_u64().unwrap() <= 64 * 1024,
        "nothing past the limit comes back: {report}"
    );
    assert!(
        !report["read_error"].is_null() || !report["write_error"].is_null(),
        "the caller is told the body was cut off: {report}"
    );
}

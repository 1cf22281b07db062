//! Routing: the Host header picks the tenant, the longest path prefix picks the component,
//! and anything unrouted gets a JSON 404.

use crate::common;
use common::TestNode;

const MANIFEST: &str = r#"
[tenants.shop]
hosts = ["shop.test", "*.shop.test"]

[tenants.blog]
hosts = ["blog.test", "*"]

[components.shop-api]
tenant = "shop"
source = "{wasm:hello}"
routes = ["/api"]

[components.shop-admin]
tenant = "shop"
source = "{wasm:probe}"
routes = ["/api/admin"]

[components.blog]
tenant = "blog"
source = "{wasm:hello-wstd}"
routes = ["/"]
"#;

#[tokio::test]
async fn longest_prefix_wins_within_a_tenant() {
    let node = TestNode::start(MANIFEST).await;

    let api = node.get_host("shop.test", "/api/orders/7").await;
    assert_eq!(api.status, 200);
    assert_eq!(api.json()["service"], "hello");
    assert_eq!(api.json()["path"], "/api/orders/7");

    let admin = node.get_host("shop.test", "/api/admin/stats").await;
    assert_eq!(admin.status, 200);
    assert_eq!(
        admin.json()["probe"],
        "ok",
        "the longer prefix /api/admin must win over /api"
    );

    // A prefix matches whole segments only: /apiary is not under /api.
    let apiary = node.get_host("shop.test", "/apiary").await;
    assert_eq!(apiary.status, 404);
}

#[tokio::test]
async fn host_header_selects_the_tenant() {
    let node = TestNode::start(MANIFEST).await;

    // Exact host, with a port (ignored), and a wildcard subdomain all reach the shop tenant.
    for host in ["shop.test", "shop.test:8080", "eu.shop.test", "SHOP.TEST"] {
        let response = node.get_host(host, "/api/x").await;
        assert_eq!(response.status, 200, "host {host}");
        assert_eq!(response.json()["service"], "hello", "host {host}");
    }

    // The blog tenant claims blog.test and every host no one else claims.
    for host in ["blog.test", "unknown.example"] {
        let response = node.get_host(host, "/api/x").await;
        assert_eq!(response.status, 200, "host {host}");
        assert_eq!(
            response.json()["service"],
            "hello-wstd",
            "host {host}: the shop's routes must not leak to other tenants"
        );
    }
}

#[tokio::test]
async fn unrouted_requests_get_a_json_404() {
    let node = TestNode::start(
        r#"
[tenants.only]
hosts = ["only.test"]

[components.hello]
tenant = "only"
source = "{wasm:hello}"
routes = ["/hello"]
"#,
    )
    .await;

    let no_path = node.get_host("only.test", "/elsewhere").await;
    assert_eq!(no_path.status, 404);
    assert_eq!(no_path.json()["error"], "no_route");
    assert_eq!(no_path.headers["content-type"], "application/json");

    // No tenant claims this host and there is no catch-all.
    let no_tenant = node.get_host("other.test", "/hello").await;
    assert_eq!(no_tenant.status, 404);
    assert_eq!(no_tenant.json()["error"], "no_route");

    assert_eq!(node.get_host("only.test", "/hello").await.status, 200);
}

#[tokio::test]
async fn without_tenants_the_default_tenant_serves_every_host() {
    let node = TestNode::start(
        r#"
[components.hello]
source = "{wasm:hello}"
routes = ["/"]
"#,
    )
    .await;
    for host in ["a.test", "b.example:9000", "127.0.0.1"] {
        assert_eq!(
            node.get_host(host, "/anything").await.status,
            200,
            "host {host}"
        );
    }
    let echo = node.post("/echo/it", "twelve bytes").await.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body_bytes"], 12);
}

#[tokio::test]
async fn bodies_stream_both_ways_through_the_gateway() {
    let node = TestNode::start(
        r#"
[components.echo]
source = "{wasm:probe}"
routes = ["/echo"]
limits = { max_body = "16MiB" }
"#,
    )
    .await;
    // Each 64 KiB chunk goes out only after the previous one came back: this completes
    // only if the request streams in and the response streams out.
    let total = 4 * 1024 * 1024;
    let streamed = node.stream_echo("/echo/echo", total, 64 * 1024).await;
    assert_eq!(streamed.status, 200, "{:?}", streamed.error);
    assert!(streamed.error.is_none(), "{:?}", streamed.error);
    assert_eq!(streamed.sent, total);
    assert!(
        streamed.echoes(total),
        "{} bytes came back, not the same",
        streamed.received.len()
    );
}

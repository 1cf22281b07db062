//! The gateway's own endpoints (liveness, readiness), and Prometheus metrics, which live
//! on the admin listener behind its token, not on any tenant's host.

use crate::common;
use common::TestNode;

const MANIFEST: &str = r#"
[tenants.shop]
hosts = ["*"]

[components.hello]
tenant = "shop"
source = "{wasm:hello}"
routes = ["/"]

[components.probe]
tenant = "shop"
source = "{wasm:probe}"
routes = ["/probe"]
"#;

#[tokio::test]
async fn health_and_readiness() {
    let node = TestNode::start(MANIFEST).await;
    let live = node.get("/health").await;
    assert_eq!(live.status, 200);
    assert_eq!(live.json()["status"], "live");

    let ready = node.get("/health/ready").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready");
    assert_eq!(
        ready.json()["components"],
        serde_json::json!([{"tenant": "shop", "component": "hello"}, {"tenant": "shop", "component": "probe"}])
    );
    // The gateway's paths win over a component routed at "/".
    assert_eq!(node.get("/health").await.json()["status"], "live");
}

#[tokio::test]
async fn metrics_count_requests_by_tenant_component_and_status() {
    let node = TestNode::start(MANIFEST).await;
    for _ in 0..3 {
        assert_eq!(node.get("/a").await.status, 200);
    }
    assert_eq!(node.get("/probe/trap").await.status, 500);

    let metrics = node.admin("GET", "/metrics", None).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.headers["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics-text")
    );
    let text = metrics.body;
    for expected in [
        r#"trellis_requests_total{tenant="shop",component="hello",status="200"} 3"#,
        r#"trellis_requests_total{tenant="shop",component="probe",status="500"} 1"#,
        r#"trellis_traps_total{tenant="shop",component="probe"} 1"#,
        r#"trellis_request_duration_seconds_count{tenant="shop",component="hello"} 3"#,
        r#"trellis_instantiation_duration_seconds_count{tenant="shop",component="hello"} 3"#,
        r#"trellis_instances_in_flight{tenant="shop",component="hello"} 0"#,
        r#"trellis_deadline_kills_total{tenant="shop",component="probe"} 0"#,
    ] {
        assert!(
            text.contains(expected),
            "/metrics should contain {expected}:\n{text}"
        );
    }
}

#[tokio::test]
async fn metrics_are_only_on_the_admin_listener_and_need_the_token() {
    let node = TestNode::start(MANIFEST).await;
    assert_eq!(node.get("/a").await.status, 200);

    // On the gateway, /metrics is an ordinary path: here the component routed at "/"
    // answers it, and no series of any tenant leaks.
    let on_gateway = node.get("/metrics").await;
    assert_eq!(on_gateway.json()["service"], "hello");
    assert!(!on_gateway.body.contains("trellis_requests_total"));

    // The admin listener refuses without the token, or with a wrong one...
    let anonymous = node.admin_with("GET", "/metrics", None, &[]).await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.json()["error"], "unauthorized");
    let wrong = node
        .admin_with(
            "GET",
            "/metrics",
            None,
            &[("authorization", "Bearer not-the-token")],
        )
        .await;
    assert_eq!(wrong.status, 401);
    // ...and answers with it.
    let metrics = node.metrics().await;
    // Both requests above reached hello.
    assert!(
        metrics
            .contains(r#"trellis_requests_total{tenant="shop",component="hello",status="200"} 2"#),
        "{metrics}"
    );
}

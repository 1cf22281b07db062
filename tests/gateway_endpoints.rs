//! The gateway's own endpoints: liveness, readiness and Prometheus metrics.

mod common;
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

    let metrics = node.get("/metrics").await;
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

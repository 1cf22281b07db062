//! Standard wasi:http components run unmodified, whichever way they were built: on the
//! `wasip2` crate, on wstd, or as a wasip1 module wrapped with the preview1 adapter (what
//! `cargo component build` produces).

mod common;
use common::TestNode;

#[tokio::test]
async fn components_built_every_usual_way_serve() {
    let node = TestNode::start(
        r#"
[components.wasip2]
source = "{wasm:hello}"
routes = ["/wasip2"]

[components.wstd]
source = "{wasm:hello-wstd}"
routes = ["/wstd"]

[components.adapter]
source = "{wasm:hello-p1}"
routes = ["/adapter"]
config = { ONE = "1", TWO = "2" }
"#,
    )
    .await;

    let wasip2 = node.post("/wasip2/a?b=c", "0123456789").await;
    assert_eq!(wasip2.status, 200);
    assert_eq!(wasip2.json()["service"], "hello");
    assert_eq!(wasip2.json()["path"], "/wasip2/a?b=c");
    assert_eq!(wasip2.json()["body_bytes"], 10);

    let wstd = node.get("/wstd/x").await;
    assert_eq!(wstd.status, 200);
    assert_eq!(wstd.json()["service"], "hello-wstd");
    assert_eq!(wstd.json()["path"], "/wstd/x");

    let adapter = node.get("/adapter/y").await;
    assert_eq!(adapter.status, 200, "{}", adapter.body);
    assert_eq!(adapter.json()["service"], "hello-p1");
    // std's environ_get went through the adapter to the granted config values.
    assert_eq!(adapter.json()["env_count"], 2);
    // Its println! went through the adapter's fd_write to the node's log, attributed.
    let log = node.log();
    assert!(
        log.lines()
            .any(|l| l.contains("hello-p1 serving /adapter/y") && l.contains("component=adapter")),
        "guest stdout should reach the log with its component name:\n{log}"
    );
}

#[tokio::test]
async fn a_line_written_in_pieces_is_one_log_line() {
    let node = TestNode::start(
        r#"
[components.probe]
source = "{wasm:probe}"
routes = ["/probe"]
"#,
    )
    .await;
    let printed = node
        .get("/probe/print?text=one-line-in-seven-pieces&pieces=7")
        .await;
    assert_eq!(printed.status, 200, "{}", printed.body);
    // Positive control: a line written whole is logged whole.
    let whole = node.get("/probe/print?text=written-whole&pieces=1").await;
    assert_eq!(whole.status, 200, "{}", whole.body);
    let log = node.log();
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(lines("written-whole"), 1, "{log}");
    assert_eq!(
        lines("one-line-in-seven-pieces"),
        1,
        "seven writes of one line should be one log line:\n{log}"
    );
    // Nothing else of the probe's output was logged: no fragment on a line of its own.
    let guest_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("trellis::guest") || l.contains("component=probe"))
        .filter(|l| l.contains("stdout"))
        .collect();
    assert_eq!(guest_lines.len(), 2, "{guest_lines:#?}");
}

#[tokio::test]
async fn a_wasip3_component_is_routed_limited_metered_and_called_like_a_p2_one() {
    let node = TestNode::start(
        r#"
[components.p3]
source = "{wasm:hello-p3}"
routes = ["/p3"]
outbound = ["p2.internal"]
limits = { max_body = "16MiB", deadline = "20s" }

[components.small]
source = "{wasm:hello-p3}"
routes = ["/small"]
limits = { max_body = "64KiB" }

[components.p2]
source = "{wasm:probe}"
routes = ["/p2"]
outbound = ["p3.internal"]
"#,
    )
    .await;
    // Routed (positive control beside the p2 component on the same node).
    let hello = node.get("/p3/hi?x=1").await;
    assert_eq!(hello.status, 200, "{}\n{}", hello.body, node.log());
    assert_eq!(hello.json()["service"], "hello-p3");
    assert_eq!(hello.json()["path"], "/p3/hi?x=1");
    assert_eq!(node.get("/p2").await.json()["probe"], "ok");

    // A multi-megabyte body streams in and back out, byte-identical, in lockstep.
    let total = 4 * 1024 * 1024;
    let echoed = node.stream_echo("/p3/echo", total, 64 * 1024).await;
    assert_eq!(echoed.status, 200, "{:?}", echoed.error);
    assert!(echoed.error.is_none(), "{:?}", echoed.error);
    assert!(echoed.echoes(total), "{} bytes back", echoed.received.len());

    // max_body holds on a p3 guest's streamed body too.
    let cut = node
        .stream_echo("/small/echo", 1024 * 1024, 16 * 1024)
        .await;
    assert!(cut.error.is_some(), "a cut-off body must not end cleanly");
    assert!(cut.received.len() <= 64 * 1024, "{}", cut.received.len());

    // NAME.internal both ways: p2 calls p3, p3 calls p2.
    let p2_to_p3 = node
        .get("/p2/fetch?url=http://p3.internal/p3/from-p2")
        .await;
    assert_eq!(p2_to_p3.status, 200, "{}", p2_to_p3.body);
    assert_eq!(p2_to_p3.json()["status"], 200, "{}", p2_to_p3.body);
    assert!(
        p2_to_p3.json()["body"]
            .as_str()
            .unwrap()
            .contains("hello-p3"),
        "{}",
        p2_to_p3.body
    );
    let p3_to_p2 = node.get("/p3/call?url=http://p2.internal/p2/x").await;
    assert_eq!(p3_to_p2.status, 200, "{}", p3_to_p2.body);
    assert_eq!(p3_to_p2.json()["status"], 200, "{}", p3_to_p2.body);
    assert!(
        p3_to_p2.json()["body"]
            .as_str()
            .unwrap()
            .contains("\"probe\":\"ok\""),
        "{}",
        p3_to_p2.body
    );
    // Denied like any guest's: p3 may not call what its outbound list does not name.
    let denied = node.get("/p3/call?url=http://small.internal/small").await;
    assert!(
        denied.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("HttpRequestDenied")),
        "{}",
        denied.body
    );

    // Metered like every component: each of those calls instantiated it once.
    let metrics = node.metrics().await;
    assert!(
        metrics.contains(r#"trellis_requests_total{tenant="default",component="p3",status="200"}"#),
        "{metrics}"
    );
    let instantiations = node
        .metric(
            "trellis_instantiation_duration_seconds_count",
            "default",
            "p3",
        )
        .await;
    assert!(instantiations >= 4.0, "{instantiations}");
}

#[tokio::test]
async fn a_wasip3_release_candidate_component_built_for_spin_4_serves() {
    // Built against wasi:http@0.3.0-rc-2026-03-15 (as Spin 4 serves), beside a 0.3.0 one.
    let node = TestNode::start(
        r#"
[components.rc]
source = "{wasm:hello-p3-rc}"
routes = ["/rc"]

[components.final]
source = "{wasm:hello-p3}"
routes = ["/final"]
"#,
    )
    .await;
    let rc = node.get("/rc/x").await;
    assert_eq!(rc.status, 200, "{}\n{}", rc.body, node.log());
    assert_eq!(rc.json()["service"], "hello-p3-rc");
    assert_eq!(rc.json()["path"], "/rc/x");
    assert_eq!(node.get("/final").await.json()["service"], "hello-p3");
}

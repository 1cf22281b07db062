//! Standard wasi:http components run unmodified, whichever way they were built: on the
//! `wasip2` crate, on wstd, or as a wasip1 module wrapped with the preview1 adapter (what
//! `cargo component build` produces).

use crate::common;
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
    let log = node.log_containing(&["hello-p1 serving /adapter/y"]).await;
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
    let log = node.log_containing(&["written-whole"]).await;
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
limits = { max_body = "64KiB", deadline = "300ms" }

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

    // A trap is the component's 500, and the next request gets a fresh instance.
    let trapped = node.get("/p3/trap").await;
    assert_eq!(trapped.status, 500, "{}", trapped.body);
    assert_eq!(trapped.json()["error"], "component_trap");
    assert_eq!(node.get("/p3/after").await.json()["service"], "hello-p3");
    // A runaway guest is stopped at its deadline.
    let stopped = node.get("/small/loop").await;
    assert_eq!(stopped.status, 504, "{}", stopped.body);
    assert_eq!(stopped.json()["error"], "deadline_exceeded");
    assert_eq!(node.get("/small/after").await.json()["service"], "hello-p3");

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

#[tokio::test]
async fn every_wasi_config_version_reads_the_same_values_and_wasi_logging_reaches_the_log() {
    let node = TestNode::start(
        r#"
[tenants.shop]
hosts = ["*"]
config = { REGION = "eu" }

[components.drafts]
tenant = "shop"
source = "{wasm:config-probe}"
routes = ["/drafts"]
config = { GREETING = "hej" }

[components.runtime]
tenant = "shop"
source = "{wasm:config-runtime-probe}"
routes = ["/runtime"]
config = { GREETING = "hallo" }

[components.rc1]
tenant = "shop"
source = "{wasm:probe}"
routes = ["/rc1"]
config = { GREETING = "hello" }
"#,
    )
    .await;
    // wasmCloud's 0.2.0-draft and Spin 4's 0.2.0-draft-2024-09-27, in one component.
    let drafts = node.get("/drafts/config?key=GREETING").await;
    assert_eq!(drafts.status, 200, "{}\n{}", drafts.body, node.log());
    let all = serde_json::json!([["GREETING", "hej"], ["REGION", "eu"]]);
    for version in ["draft", "spin"] {
        assert_eq!(drafts.json()[version]["value"], "hej", "{}", drafts.body);
        assert_eq!(drafts.json()[version]["all"], all, "{}", drafts.body);
    }
    let missing = node.get("/drafts/config?key=NOPE").await.json();
    assert_eq!(missing["draft"]["value"], serde_json::Value::Null);
    // wasmCloud's older `runtime` name for the same interface.
    let runtime = node.get("/runtime/config?key=GREETING").await;
    assert_eq!(runtime.status, 200, "{}", runtime.body);
    assert_eq!(runtime.json()["value"], "hallo");
    assert_eq!(
        runtime.json()["all"],
        serde_json::json!([["GREETING", "hallo"], ["REGION", "eu"]])
    );
    // Positive control: wasmtime's 0.2.0-rc.1 on the same node.
    let rc1 = node.get("/rc1/config?key=GREETING").await;
    assert_eq!(rc1.json()["value"], "hello", "{}", rc1.body);

    // wasi:logging: one line per call, at the guest's level, with its context.
    let logged = node
        .get("/drafts/log?context=checkout&message=card-declined")
        .await;
    assert_eq!(logged.status, 200, "{}", logged.body);
    let log = node
        .log_containing(&["card-declined (Level::Critical)"])
        .await;
    let line = |level: &str, needle: &str| {
        log.lines().find(|l| {
            l.contains(level)
                && l.contains(needle)
                && l.contains("component=drafts")
                && l.contains("tenant=shop")
                && l.contains("context=checkout")
        })
    };
    assert!(
        line("DEBUG", "card-declined (Level::Debug)").is_some(),
        "{log}"
    );
    assert!(
        line("INFO", "card-declined (Level::Info)").is_some(),
        "{log}"
    );
    assert!(
        line("WARN", "card-declined (Level::Warn)").is_some(),
        "{log}"
    );
    assert!(
        line("ERROR", "card-declined (Level::Error)").is_some(),
        "{log}"
    );
    let critical = line("ERROR", "card-declined (Level::Critical)").expect("the critical line");
    assert!(critical.contains("critical=true"), "{critical}");
    // The node's filter applies to guests too: trace is below it here.
    assert!(!log.contains("card-declined (Level::Trace)"), "{log}");
}

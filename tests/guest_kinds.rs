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

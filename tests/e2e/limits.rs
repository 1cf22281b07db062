//! Limits: a trap, a runaway loop, a memory hog, a flood and an oversized body each get
//! the documented answer, and the node keeps serving through all of them; with a fresh
//! instance per call and with warm instances reused alike.

use crate::common;
use std::io::{Read, Write};

use common::TestNode;

const MANIFEST: &str = r#"
[components.probe]
source = "{wasm:probe}"
routes = ["/probe"]
limits = { memory = "16MiB", deadline = "1s", max_concurrent = 8, max_body = "1KiB" }

[components.lonely]
source = "{wasm:probe}"
routes = ["/lonely"]
limits = { max_concurrent = 1, deadline = "20s" }

[components.hello]
source = "{wasm:hello}"
routes = ["/hello"]

# hello reads the whole body before it answers; echo streams it back as it comes.
[components.reader]
source = "{wasm:hello}"
routes = ["/reader"]
limits = { max_body = "1KiB" }

[components.echo]
source = "{wasm:probe}"
routes = ["/echo"]
limits = { max_body = "256KiB" }
"#;

/// Each test on [`MANIFEST`], once as it is (a fresh instance per call) and once with
/// every component reusing warm instances: the limits hold the same either way.
macro_rules! fresh_and_reused {
    ($($name:ident),* $(,)?) => {
        mod fresh {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::MANIFEST).await
            })*
        }
        mod reused {
            $(#[tokio::test]
            async fn $name() {
                super::$name(&super::with_reuse(super::MANIFEST)).await
            })*
        }
    };
}

fresh_and_reused!(
    a_trap_answers_500_naming_the_component_and_the_next_request_succeeds,
    an_infinite_loop_gets_504_at_its_deadline_while_other_components_keep_answering,
    a_guest_growing_memory_is_stopped_at_its_cap_and_the_node_stays_up,
    saturation_answers_503_promptly_instead_of_queueing,
    a_body_over_the_limit_gets_413_whether_its_length_is_declared_or_not,
    a_trap_while_streaming_a_body_cuts_it_off,
    a_streamed_body_is_cut_off_where_it_passes_the_limit,
);

/// `manifest` with `reuse` turned on for every component.
fn with_reuse(manifest: &str) -> String {
    manifest
        .lines()
        .flat_map(|line| {
            let table = line.starts_with("[components.");
            [
                Some(line.to_string()),
                table.then(|| r#"reuse = { idle = "30s" }"#.to_string()),
            ]
        })
        .flatten()
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value of `series` for `component` (of the default tenant) in the node's metrics.
async fn metric(node: &TestNode, series: &str, component: &str) -> f64 {
    node.metric(series, "default", component).await
}

async fn a_trap_answers_500_naming_the_component_and_the_next_request_succeeds(manifest: &str) {
    let node = TestNode::start(manifest).await;

    let trapped = node.get("/probe/trap").await;
    assert_eq!(trapped.status, 500);
    assert_eq!(trapped.json()["error"], "component_trap");
    assert_eq!(trapped.json()["component"], "probe");

    let next = node.get("/probe").await;
    assert_eq!(next.status, 200, "a fresh instance serves the next request");

    let log = node
        .log_containing(&["guest trapped", "probe was asked to trap"])
        .await;
    let line = log
        .lines()
        .find(|l| l.contains("guest trapped"))
        .expect("the trap is logged");
    assert!(
        line.contains("component=\"probe\"") && line.contains("unreachable"),
        "the log says whose trap and why: {line}"
    );
    // The guest's own panic message reaches the log too, attributed to it.
    assert!(
        log.lines()
            .any(|l| l.contains("probe was asked to trap") && l.contains("component=probe"))
    );
    assert_eq!(metric(&node, "trellis_traps_total", "probe").await, 1.0);
}

async fn an_infinite_loop_gets_504_at_its_deadline_while_other_components_keep_answering(
    manifest: &str,
) {
    let node = std::sync::Arc::new(TestNode::start(manifest).await);

    let looping = tokio::spawn({
        let node = node.clone();
        async move { node.get("/probe/loop").await }
    });
    // While the guest spins (deadline 1 s), the other component answers, and not just
    // once: the spinning instance must not hold a worker thread.
    let mut answered_during_loop = 0;
    for _ in 0..10 {
        let hello = node.get("/hello/still-here").await;
        assert_eq!(hello.status, 200);
        if !looping.is_finished() {
            answered_during_loop += 1;
        }
    }
    assert!(
        answered_during_loop > 0,
        "no request was answered while the loop ran"
    );

    let looped = looping.await.unwrap();
    assert_eq!(looped.status, 504, "{}", looped.body);
    assert_eq!(looped.json()["error"], "deadline_exceeded");
    assert_eq!(looped.json()["component"], "probe");
    assert_eq!(
        node.get("/probe").await.status,
        200,
        "the same component serves again"
    );
    assert_eq!(
        metric(&node, "trellis_deadline_kills_total", "probe").await,
        1.0
    );
}

async fn a_guest_growing_memory_is_stopped_at_its_cap_and_the_node_stays_up(manifest: &str) {
    let mut node = TestNode::start(manifest).await;

    let grown = node.get("/probe/grow").await;
    assert_eq!(grown.status, 500, "{}", grown.body);
    assert_eq!(grown.json()["error"], "memory_limit");
    assert!(
        grown.json()["message"]
            .as_str()
            .unwrap()
            .contains("16.0 MiB")
    );

    assert!(node.is_running());
    assert_eq!(node.get("/probe").await.status, 200);
    assert_eq!(node.get("/hello").await.status, 200);
    assert_eq!(
        metric(&node, "trellis_memory_limit_kills_total", "probe").await,
        1.0
    );
}

async fn saturation_answers_503_promptly_instead_of_queueing(manifest: &str) {
    let node = std::sync::Arc::new(TestNode::start(manifest).await);

    // `lonely` admits one instance at a time; occupy it.
    let sleeper = tokio::spawn({
        let node = node.clone();
        async move { node.get("/lonely/sleep?ms=3000").await }
    });
    let mut polls = 0;
    while metric(&node, "trellis_instances_in_flight", "lonely").await < 1.0 {
        polls += 1;
        assert!(
            polls < 500,
            "the sleeping instance never showed up in instances_in_flight"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let refused = node.get("/lonely").await;
    assert!(
        !sleeper.is_finished(),
        "the 503 must come while the slot is still taken, not after it"
    );
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"], "overloaded");
    assert_eq!(refused.headers["retry-after"], "1");

    assert_eq!(sleeper.await.unwrap().status, 200);
    assert_eq!(
        node.get("/lonely").await.status,
        200,
        "the slot is free again"
    );
    assert_eq!(
        metric(&node, "trellis_admission_rejections_total", "lonely").await,
        1.0
    );
}

async fn a_body_over_the_limit_gets_413_whether_its_length_is_declared_or_not(manifest: &str) {
    let node = TestNode::start(manifest).await;

    // Declared with content-length: refused before anything runs.
    let declared = node.post("/reader", vec![b'x'; 2000]).await;
    assert_eq!(declared.status, 413);
    assert_eq!(declared.json()["error"], "body_too_large");

    // Chunked: counted as it streams into the guest, which is answered 413 for it.
    let (status, body) = chunked_post(&node, "/reader", &[b'x'; 2000]);
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("body_too_large"));
    assert!(body.contains("\"component\":\"reader\""), "{body}");

    // Under the limit, both ways reach the guest.
    let (status, body) = chunked_post(&node, "/reader", &[b'x'; 500]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"body_bytes\":500"), "{body}");
    let declared = node.post("/reader", vec![b'x'; 1000]).await;
    assert_eq!(declared.status, 200);
    assert_eq!(declared.json()["body_bytes"], 1000);
}

async fn a_trap_while_streaming_a_body_cuts_it_off(manifest: &str) {
    let node = TestNode::start(manifest).await;
    let response = node
        .try_request("GET", "/probe/stream-trap", None, &[])
        .await;
    // The head was sent; the body must end in an error, never as if it were whole.
    assert!(
        response.is_err(),
        "a truncated body ended cleanly: {:?}",
        response.map(|r| r.body)
    );
    // Positive control: a whole streamed body ends cleanly.
    let whole = node.stream_echo("/echo/echo", 1024, 1024).await;
    assert!(whole.error.is_none() && whole.echoes(1024), "{whole:?}");
    assert_eq!(metric(&node, "trellis_traps_total", "probe").await, 1.0);
}

async fn a_streamed_body_is_cut_off_where_it_passes_the_limit(manifest: &str) {
    let node = TestNode::start(manifest).await;
    // Positive control: under the limit, the echo comes back whole.
    let whole = node.stream_echo("/echo/echo", 200 * 1024, 16 * 1024).await;
    assert_eq!(whole.status, 200, "{whole:?}");
    assert!(whole.error.is_none(), "{:?}", whole.error);
    assert!(
        whole.echoes(200 * 1024),
        "{} bytes back",
        whole.received.len()
    );

    // Past it, the response already streaming is cut off: an error, never a clean end.
    let cut = node.stream_echo("/echo/echo", 1024 * 1024, 16 * 1024).await;
    assert!(cut.error.is_some(), "a cut-off body must not end cleanly");
    assert!(
        cut.received.len() <= 256 * 1024,
        "no byte past the limit reaches the guest: {} came back",
        cut.received.len()
    );
    // The node is fine, and so is the next call.
    let again = node.stream_echo("/echo/echo", 64 * 1024, 16 * 1024).await;
    assert!(again.echoes(64 * 1024), "{again:?}");
}

/// A request with `Transfer-Encoding: chunked`, written by hand because the test client
/// always sends a content-length for a body it knows.
fn chunked_post(node: &TestNode, path: &str, body: &[u8]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(node.addr).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream
        .write_all(format!("{:x}\r\n", body.len()).as_bytes())
        .unwrap();
    stream.write_all(body).unwrap();
    stream.write_all(b"\r\n0\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

#[tokio::test]
async fn the_node_memory_budget_refuses_a_growth_with_503_and_gives_memory_back() {
    let node = TestNode::start(
        r#"
[node]
max_memory = "48MiB"

[components.hog]
source = "{wasm:probe}"
routes = ["/hog"]
limits = { memory = "64MiB" }

[components.capped]
source = "{wasm:probe}"
routes = ["/capped"]
limits = { memory = "16MiB" }
"#,
    )
    .await;
    // The hog may grow to 64 MiB by its own limit, but the node has 48 MiB for everyone:
    // refused as node overload (503, retry later), not as the component's fault.
    let refused = node.get("/hog/grow").await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["error"], "overloaded");
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap()
            .contains("memory budget")
    );
    assert_eq!(refused.headers["retry-after"], "1");
    // The hog's memory is given back by the low-priority reaper thread, soon but not at
    // once on a busy machine.
    let released = std::time::Instant::now();
    while !node
        .metrics()
        .await
        .contains("trellis_node_memory_reserved_bytes 0")
    {
        assert!(
            released.elapsed() < std::time::Duration::from_secs(10),
            "the hog's memory was never given back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Positive control: a component whose own cap comes first gets its own answer.
    let capped = node.get("/capped/grow").await;
    assert_eq!(capped.status, 500);
    assert_eq!(capped.json()["error"], "memory_limit");
    // Everything was given back, and the node serves.
    assert_eq!(node.get("/hog").await.status, 200);
    let metrics = node.metrics().await;
    assert!(
        metrics.contains("trellis_node_memory_budget_bytes 50331648"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_node_memory_reserved_bytes 0"),
        "{metrics}"
    );
}

//! Hot deploy, through the real binary and its admin API: versions uploaded and swapped
//! under load with no failed request, canaries split and rolled back by themselves, bad
//! uploads refused while the old version keeps serving, deployments surviving a restart,
//! `--watch`, a message handler swapped under a stream of messages, and the CLI.

use crate::common;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{ADMIN_TOKEN, NodeOptions, TestNode, on_both_backends, run_trellis, wasm};

const SVC: &str = "/v1/tenants/default/components/svc";

/// One HTTP component, `svc`, serving `hello` at /svc.
const MANIFEST: &str = r#"
[node]
max_component_size = "600KiB"

[components.svc]
source = "{wasm:hello}"
routes = ["/svc"]
"#;

fn bytes_of(name: &str) -> Bytes {
    Bytes::from(std::fs::read(wasm(name)).unwrap())
}

/// Uploads a fixture as a version of `path`'s component; `query` picks what happens to it.
async fn upload(node: &TestNode, path: &str, fixture: &str, query: &str) -> serde_json::Value {
    let response = node
        .admin(
            "POST",
            &format!("{path}/versions{query}"),
            Some(bytes_of(fixture)),
        )
        .await;
    assert_eq!(
        response.status, 201,
        "uploading {fixture}: {}",
        response.body
    );
    response.json()
}

/// Which fixture answered a request to /svc.
fn service(response: &common::Response) -> String {
    response.json()["service"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

async fn status(node: &TestNode, path: &str) -> serde_json::Value {
    let response = node.admin("GET", path, None).await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

#[tokio::test]
async fn a_hundred_swaps_under_load_fail_no_request_and_each_answer_comes_from_an_active_version() {
    let node = Arc::new(TestNode::start(MANIFEST).await);
    let wstd = upload(&node, SVC, "hello-wstd", "").await;
    assert_eq!(
        wstd["state"], "uploaded",
        "an upload alone does not activate"
    );
    assert_eq!(service(&node.get("/svc").await), "hello");
    let hello_digest = status(&node, SVC).await["active"]["version"]
        .as_str()
        .unwrap()
        .to_string();
    let wstd_digest = wstd["version"].as_str().unwrap().to_string();
    let service_of = |digest: &str| {
        if digest == hello_digest {
            "hello"
        } else {
            "hello-wstd"
        }
    };

    // Steady load from four clients, each request timed.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (node, stop) = (node.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = started.elapsed();
                let response = node.get("/svc/x").await;
                seen.push((sent, started.elapsed(), response.status, service(&response)));
            }
            seen
        }));
    }

    // 100 activations, alternating; each interval is when that version may have been
    // active: from the moment its activation was asked until the next one returned.
    let mut activations: Vec<(Duration, Duration, &str)> = Vec::new();
    for i in 0..100 {
        let digest = if i % 2 == 0 {
            &wstd_digest
        } else {
            &hello_digest
        };
        let asked = started.elapsed();
        let response = node
            .admin(
                "POST",
                &format!("{SVC}/activate"),
                Some(Bytes::from(
                    serde_json::json!({"version": digest}).to_string(),
                )),
            )
            .await;
        assert_eq!(response.status, 200, "{}", response.body);
        assert_eq!(response.json()["active"]["version"], digest.as_str());
        activations.push((asked, started.elapsed(), service_of(digest)));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.unwrap());
    }

    assert!(
        answers.len() > 100,
        "the load ran: {} requests",
        answers.len()
    );
    let failed: Vec<_> = answers.iter().filter(|a| a.2 != 200).collect();
    assert!(
        failed.is_empty(),
        "requests failed during swaps: {failed:?}"
    );
    let by_service = |name: &str| answers.iter().filter(|a| a.3 == name).count();
    assert!(
        by_service("hello") > 0 && by_service("hello-wstd") > 0,
        "both versions served"
    );
    // hello was active from the start until the first activation returned.
    let mut windows: Vec<(Duration, Duration, &str)> =
        vec![(Duration::ZERO, activations[0].1, "hello")];
    for (i, (asked, _, name)) in activations.iter().enumerate() {
        let until = activations.get(i + 1).map_or(Duration::MAX, |next| next.1);
        windows.push((*asked, until, name));
    }
    for (sent, answered, _, name) in &answers {
        assert!(
            windows
                .iter()
                .any(|(from, until, n)| n == name && from <= answered && sent <= until),
            "an answer from {name} (sent {sent:?}, answered {answered:?}) while it was never active"
        );
    }
    let activated = node
        .metric("trellis_activations_total", "default", "svc")
        .await;
    assert!(activated >= 101.0, "activations counted: {activated}");
}

#[tokio::test]
async fn a_canary_splits_by_weight_sticks_by_header_and_can_be_promoted_and_rolled_back() {
    let node = TestNode::start(MANIFEST).await;
    let canary = upload(&node, SVC, "hello-wstd", "?canary=20").await;
    assert_eq!(canary["state"], "canary");

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..400 {
        let response = node.get("/svc").await;
        assert_eq!(response.status, 200);
        *counts.entry(service(&response)).or_default() += 1;
    }
    let share = counts.get("hello-wstd").copied().unwrap_or(0) as f64 / 400.0;
    assert!(
        (0.12..=0.28).contains(&share),
        "20% canary took {:.1}% of requests: {counts:?}",
        share * 100.0
    );
    let running = status(&node, SVC).await;
    assert_eq!(running["canary"]["policy"]["weight"], 20);
    assert!(running["canary"]["calls"].as_u64().unwrap() > 40);
    assert_eq!(running["canary"]["failures"], 0);

    // Sticky by header: each user always sees one version; users spread over both.
    let digest = canary["version"].as_str().unwrap();
    node.admin("DELETE", &format!("{SVC}/canary"), None).await;
    let sticky = node
        .admin(
            "POST",
            &format!("{SVC}/canary"),
            Some(Bytes::from(
                serde_json::json!({"version": digest, "weight": 50, "sticky_header": "x-user"})
                    .to_string(),
            )),
        )
        .await;
    assert_eq!(sticky.status, 200, "{}", sticky.body);
    let mut sides = BTreeMap::new();
    for user in 0..20 {
        let user = format!("user-{user}");
        let first = service(
            &node
                .request("GET", "/svc", None, &[("x-user", &user)])
                .await,
        );
        for _ in 0..5 {
            let again = service(
                &node
                    .request("GET", "/svc", None, &[("x-user", &user)])
                    .await,
            );
            assert_eq!(again, first, "{user} switched versions");
        }
        *sides.entry(first).or_insert(0) += 1;
    }
    assert_eq!(sides.len(), 2, "users land on both sides: {sides:?}");

    // Promote: every request goes to the candidate; rollback: back to the old one.
    let promoted = node
        .admin("POST", &format!("{SVC}/canary/promote"), None)
        .await;
    assert_eq!(promoted.status, 200, "{}", promoted.body);
    assert_eq!(promoted.json()["active"]["version"], digest);
    assert!(promoted.json()["canary"].is_null());
    for _ in 0..20 {
        assert_eq!(service(&node.get("/svc").await), "hello-wstd");
    }
    let rolled_back = node.admin("POST", &format!("{SVC}/rollback"), None).await;
    assert_eq!(rolled_back.status, 200, "{}", rolled_back.body);
    for _ in 0..20 {
        assert_eq!(service(&node.get("/svc").await), "hello");
    }
    // No canary left to promote.
    let none = node
        .admin("POST", &format!("{SVC}/canary/promote"), None)
        .await;
    assert_eq!(none.status, 409);
    assert_eq!(none.json()["error"], "no_canary");
}

#[tokio::test]
async fn a_canary_that_traps_is_rolled_back_by_the_node_and_says_why() {
    let node = TestNode::start(MANIFEST).await;
    // The probe traps on /trap; hello answers it. 50% of /svc/trap goes to the probe.
    let canary = upload(
        &node,
        SVC,
        "probe",
        "?canary=50&min_requests=6&max_failure_rate=0.2&window=1m",
    )
    .await;
    let digest = canary["version"].as_str().unwrap().to_string();

    let mut failures = 0;
    let mut sent = 0;
    while status(&node, SVC).await["canary"].is_object() {
        sent += 1;
        assert!(sent < 200, "the failing canary was never rolled back");
        let response = node.get("/svc/trap").await;
        if response.status != 200 {
            assert_eq!(response.json()["error"], "component_trap");
            failures += 1;
        }
    }
    assert!(failures >= 2, "the canary failed before it was rolled back");
    // After the rollback, the active version serves everything.
    for _ in 0..20 {
        let response = node.get("/svc/trap").await;
        assert_eq!(response.status, 200);
        assert_eq!(service(&response), "hello");
    }
    let after = status(&node, SVC).await;
    let rollback = &after["last_canary_rollback"];
    assert_eq!(rollback["version"], digest.as_str());
    assert_eq!(rollback["event"], "canary_rolled_back");
    assert!(
        rollback["reason"]
            .as_str()
            .unwrap()
            .contains("calls failed"),
        "{rollback}"
    );
    assert_eq!(
        node.metric("trellis_canary_rollbacks_total", "default", "svc")
            .await,
        1.0
    );
    assert!(
        node.log()
            .lines()
            .any(|l| l.contains("canary_rolled_back") && l.contains("calls failed")),
        "the rollback is logged"
    );
}

#[tokio::test]
async fn bad_uploads_get_a_4xx_with_the_reason_and_the_old_version_keeps_serving() {
    let node = TestNode::start(MANIFEST).await;
    let active = status(&node, SVC).await["active"]["version"].clone();
    // A component whose first memory is above 1 MiB, in a component limited to 1 MiB.
    let tiny = node
        .admin(
            "PUT",
            "/v1/tenants/default/components/tiny",
            Some(Bytes::from(
                r#"{"routes": ["/tiny"], "limits": {"memory": "1MiB"}}"#,
            )),
        )
        .await;
    assert_eq!(tiny.status, 201, "{}", tiny.body);

    let empty_component = Bytes::from_static(b"\0asm\x0d\x00\x01\x00");
    let core_module = Bytes::from_static(b"\0asm\x01\x00\x00\x00");
    // (case, component path, body, extra headers, status, error code, words of the reason)
    type Case<'a> = (
        &'a str,
        &'a str,
        Bytes,
        Vec<(&'a str, &'a str)>,
        u16,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "not wasm",
            SVC,
            Bytes::from_static(b"#!/bin/sh\necho hi\n"),
            vec![],
            400,
            "invalid_component",
            "not a valid WebAssembly component",
        ),
        (
            "a core module",
            SVC,
            core_module,
            vec![],
            400,
            "core_module",
            "core WebAssembly module",
        ),
        (
            "no export to serve",
            SVC,
            empty_component,
            vec![],
            422,
            "missing_export",
            "exports neither wasi:http/incoming-handler@0.2.x nor wasi:http/handler@0.3.x",
        ),
        (
            "an import the host lacks",
            SVC,
            bytes_of("needs-missing"),
            vec![],
            422,
            "missing_import",
            "trellis-fixture:missing/clock",
        ),
        (
            "a digest that does not match",
            SVC,
            bytes_of("hello-wstd"),
            vec![(
                "x-trellis-digest",
                "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            )],
            400,
            "digest_mismatch",
            "not the expected",
        ),
        (
            "over the size limit",
            SVC,
            Bytes::from(vec![0u8; 700 << 10]),
            vec![],
            413,
            "too_large",
            "max_component_size",
        ),
        (
            "a memory limit breach while instantiating",
            "/v1/tenants/default/components/tiny",
            bytes_of("hello-wstd"),
            vec![],
            422,
            "instantiate_failed",
            "initial memory is above limits.memory",
        ),
        (
            "an unknown component",
            "/v1/tenants/default/components/nobody",
            bytes_of("hello"),
            vec![],
            404,
            "not_found",
            "no component",
        ),
    ];
    let auth = format!("Bearer {ADMIN_TOKEN}");
    for (case, path, body, extra, status_code, code, reason) in cases {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(extra);
        let response = node
            .admin_with(
                "POST",
                &format!("{path}/versions?activate=true"),
                Some(body),
                &headers,
            )
            .await;
        assert_eq!(response.status, status_code, "{case}: {}", response.body);
        assert_eq!(response.json()["error"], code, "{case}: {}", response.body);
        assert!(
            response.json()["message"]
                .as_str()
                .unwrap()
                .contains(reason),
            "{case}: the reason says {reason:?}: {}",
            response.body
        );
        // The running version is untouched and serves.
        let serving = node.get("/svc").await;
        assert_eq!(serving.status, 200, "{case}");
        assert_eq!(service(&serving), "hello", "{case}");
        assert_eq!(
            status(&node, SVC).await["active"]["version"],
            active,
            "{case}"
        );
    }
    // The needs-missing import is named.
    let named = node
        .admin(
            "POST",
            &format!("{SVC}/versions"),
            Some(bytes_of("needs-missing")),
        )
        .await;
    assert!(
        named.body.contains("trellis-fixture:missing/clock"),
        "{}",
        named.body
    );
    // Positive control: a good upload to the same component is taken.
    let good = upload(&node, SVC, "hello-wstd", "?activate=true").await;
    assert_eq!(good["state"], "active");
    assert_eq!(service(&node.get("/svc").await), "hello-wstd");
    // An entry with problems names the field.
    let bad_entry = node
        .admin(
            "PUT",
            "/v1/tenants/default/components/bad",
            Some(Bytes::from(
                r#"{"routes": ["svc"], "limits": {"deadline": "0s"}}"#,
            )),
        )
        .await;
    assert_eq!(bad_entry.status, 422, "{}", bad_entry.body);
    let fields: Vec<String> = bad_entry.json()["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["field"].as_str().unwrap().to_string())
        .collect();
    assert!(
        fields.iter().any(|f| f == "components.bad.routes[0]"),
        "{fields:?}"
    );
    assert!(
        fields.iter().any(|f| f == "components.bad.limits.deadline"),
        "{fields:?}"
    );
    let clash = node
        .admin(
            "PUT",
            "/v1/tenants/default/components/other",
            Some(Bytes::from(r#"{"routes": ["/svc"]}"#)),
        )
        .await;
    assert_eq!(clash.status, 422);
    assert!(
        clash
            .body
            .contains("already served by component \\\"svc\\\""),
        "{}",
        clash.body
    );
}

#[tokio::test]
async fn the_admin_api_refuses_a_missing_or_wrong_token() {
    let node = TestNode::start(MANIFEST).await;
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", "Basic dGVzdA==")],
    ] {
        let refused = node
            .admin_with(
                "POST",
                &format!("{SVC}/versions?activate=true"),
                Some(bytes_of("hello-wstd")),
                &headers,
            )
            .await;
        assert_eq!(refused.status, 401, "{headers:?}");
        assert_eq!(refused.json()["error"], "unauthorized");
        assert_eq!(refused.headers["www-authenticate"], "Bearer");
        assert_eq!(
            node.admin_with("GET", "/v1/status", None, &headers)
                .await
                .status,
            401
        );
        assert_eq!(
            service(&node.get("/svc").await),
            "hello",
            "nothing was deployed"
        );
    }
    // Positive control: the same upload with the token is taken.
    upload(&node, SVC, "hello-wstd", "?activate=true").await;
    assert_eq!(service(&node.get("/svc").await), "hello-wstd");
}

// The node's desired state lives in SQLite under the data dir, or in PostgreSQL with a
// database URL: both keep deployments across a crash.
on_both_backends!(a_restart_keeps_api_deployments_until_the_manifest_entry_changes);

async fn a_restart_keeps_api_deployments_until_the_manifest_entry_changes(options: NodeOptions) {
    let data = tempfile::tempdir().unwrap();
    let options = NodeOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..options
    };
    let mut node = TestNode::start_with(MANIFEST, &options).await;
    // A component created through the API, and a new version of the manifest's one.
    let created = node
        .admin(
            "PUT",
            "/v1/tenants/default/components/extra",
            Some(Bytes::from(
                r#"{"routes": ["/extra"], "config": {"GREETING": "hi"}}"#,
            )),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.json()["state"], "awaiting_version");
    assert_eq!(node.get("/extra").await.status, 404, "no version yet");
    upload(&node, "/v1/tenants/default/components/extra", "probe", "").await;
    assert_eq!(
        node.get("/extra/config?key=GREETING").await.json()["value"],
        "hi"
    );
    upload(&node, SVC, "hello-wstd", "?activate=true").await;
    assert_eq!(service(&node.get("/svc").await), "hello-wstd");

    // A crash, then the same manifest and data dir: everything is back.
    node.kill();
    let node = TestNode::start_with(
        MANIFEST,
        &NodeOptions {
            manifest_path: Some(node.manifest_path.clone()),
            ..options.clone()
        },
    )
    .await;
    assert_eq!(service(&node.get("/svc").await), "hello-wstd");
    assert_eq!(
        node.get("/extra/config?key=GREETING").await.json()["value"],
        "hi"
    );
    let svc = status(&node, SVC).await;
    assert_eq!(svc["origin"], "manifest");
    assert!(
        svc["previous"].is_object(),
        "the previous version is kept for rollback"
    );
    assert_eq!(
        status(&node, "/v1/tenants/default/components/extra").await["origin"],
        "api"
    );
    // Rollback works after the restart, and so does activating by digest.
    let wstd_digest = svc["active"]["version"].as_str().unwrap().to_string();
    assert_eq!(
        node.admin("POST", &format!("{SVC}/rollback"), None)
            .await
            .status,
        200
    );
    assert_eq!(service(&node.get("/svc").await), "hello");
    let again = node
        .admin(
            "POST",
            &format!("{SVC}/activate"),
            Some(Bytes::from(
                serde_json::json!({"version": wstd_digest}).to_string(),
            )),
        )
        .await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(service(&node.get("/svc").await), "hello-wstd");
    drop(node);

    // An edited manifest entry wins over what the API had deployed for it.
    let edited = MANIFEST.replace(
        "routes = [\"/svc\"]",
        "routes = [\"/svc\"]\nconfig = { EDITED = \"yes\" }",
    );
    let node = TestNode::start_with(&edited, &options).await;
    assert_eq!(service(&node.get("/svc").await), "hello");
    assert_eq!(
        node.get("/extra/config?key=GREETING").await.json()["value"],
        "hi"
    );
    // An API component can be deleted; a manifest one cannot.
    let refused = node.admin("DELETE", SVC, None).await;
    assert_eq!(refused.status, 409);
    assert_eq!(refused.json()["error"], "declared_in_manifest");
    assert_eq!(
        node.admin("DELETE", "/v1/tenants/default/components/extra", None)
            .await
            .status,
        204
    );
    assert_eq!(node.get("/extra").await.status, 404);
}

#[tokio::test]
async fn watch_mode_swaps_in_a_rebuilt_component_and_keeps_serving_through_a_broken_build() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("app.wasm");
    std::fs::copy(wasm("hello"), &source).unwrap();
    let manifest_path = dir.path().join("trellis.toml");
    let manifest = format!(
        "[components.app]\nsource = \"{}\"\nroutes = [\"/app\"]\n",
        source.display()
    );
    std::fs::write(&manifest_path, &manifest).unwrap();
    let node = TestNode::start_with(
        "",
        &NodeOptions {
            manifest_path: Some(manifest_path.clone()),
            extra_args: vec!["--watch".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(service(&node.get("/app").await), "hello");

    // A rebuild lands: the new code serves, without a restart.
    std::fs::copy(wasm("hello-wstd"), &source).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while service(&node.get("/app").await) != "hello-wstd" {
        assert!(
            Instant::now() < deadline,
            "the rebuilt component was not picked up:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A broken build is refused; the running version keeps serving.
    std::fs::write(&source, b"not a component").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node.log().contains("watch: new version refused") {
        assert!(
            Instant::now() < deadline,
            "the broken build was not reported:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(service(&node.get("/app").await), "hello-wstd");

    // A changed manifest entry is a new version too.
    std::fs::copy(wasm("hello"), &source).unwrap();
    std::fs::write(
        &manifest_path,
        manifest.replace("/app\"]", "/app\", \"/other\"]"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.get("/other").await.status != 200 {
        assert!(
            Instant::now() < deadline,
            "the manifest change was not picked up:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(service(&node.get("/app").await), "hello");
}

#[tokio::test]
async fn a_message_handler_swapped_under_a_stream_of_messages_loses_none() {
    let node = TestNode::start(
        r#"
[components.handler]
source = "{wasm:msg-probe}"
routes = ["/msg"]
keyvalue = ["default"]
subscriptions = ["events.>"]
publish = ["events.>"]
# Deliveries queue for SQLite writes in a debug build; room for them and the publisher.
limits = { max_concurrent = 400 }
"#,
    )
    .await;
    let path = "/v1/tenants/default/components/handler";
    let entry = |round: usize| {
        Bytes::from(
            serde_json::json!({
                "routes": ["/msg"],
                "keyvalue": ["default"],
                "subscriptions": ["events.>"],
                "publish": ["events.>"],
                "limits": {"max_concurrent": 400},
                "config": {"ROUND": round.to_string()},
            })
            .to_string(),
        )
    };
    const BATCHES: usize = 10;
    const PER_BATCH: usize = 20;
    for batch in 0..BATCHES {
        let published = node
            .post(
                &format!("/msg/publish-many/events.b{batch}?n={PER_BATCH}"),
                "",
            )
            .await;
        assert_eq!(
            published.json()["published"],
            PER_BATCH,
            "{}",
            published.body,
        );
        // A new version (same code, new entry) while those messages are being handled.
        let swapped = node.admin("PUT", path, Some(entry(batch))).await;
        assert_eq!(swapped.status, 200, "{}", swapped.body);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let received = loop {
        let received: Vec<String> = node.get("/msg/received").await.json()["received"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        if received.len() >= BATCHES * PER_BATCH || Instant::now() > deadline {
            break received;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut expected: Vec<String> = (0..BATCHES)
        .flat_map(|b| (0..PER_BATCH).map(move |i| format!("events.b{b}|{i}")))
        .collect();
    let mut got = received.clone();
    expected.sort();
    got.sort();
    assert_eq!(
        got, expected,
        "every message handled exactly once across {BATCHES} swaps"
    );
    let history = status(&node, path).await["events"]
        .as_array()
        .unwrap()
        .len();
    assert!(history >= BATCHES, "each swap is in the history");
}

#[tokio::test]
async fn the_cli_deploys_shows_status_rolls_back_and_exits_with_clear_codes() {
    let node = TestNode::start(MANIFEST).await;
    let admin = format!("http://{}", node.admin_addr);
    let base = ["--admin", admin.as_str(), "--token", ADMIN_TOKEN];
    let hello_wstd = wasm("hello-wstd");
    let with = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(base);
        run_trellis(&all)
    };

    let (code, out, err) = with(&["deploy", hello_wstd.to_str().unwrap(), "--component", "svc"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("default/svc: version sha256:") && out.contains("is active"),
        "{out}"
    );
    assert!(
        err.contains("uploading default/svc"),
        "a progress line: {err}"
    );
    assert_eq!(service(&node.get("/svc").await), "hello-wstd");
    // The same bytes again change nothing, and say so (the previous version stays hello).
    let (code, out, err) = with(&["deploy", hello_wstd.to_str().unwrap(), "--component", "svc"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is already active; nothing changed"), "{out}");

    let (code, out, _) = with(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("default/svc  active sha256:"), "{out}");

    let (code, out, err) = with(&["rollback", "--component", "svc"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("default/svc  active"), "{out}");
    assert_eq!(service(&node.get("/svc").await), "hello");

    // A new component from an entry file, then a canary of it, then its deletion.
    let entry = node.dir.path().join("greeter.toml");
    std::fs::write(
        &entry,
        "routes = [\"/greet\"]\n[limits]\ndeadline = \"5s\"\n",
    )
    .unwrap();
    let hello = wasm("hello");
    let (code, _, err) = with(&[
        "deploy",
        hello.to_str().unwrap(),
        "-c",
        "greeter",
        "--entry",
        entry.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(service(&node.get("/greet").await), "hello");
    let (code, _, err) = with(&[
        "deploy",
        hello_wstd.to_str().unwrap(),
        "-c",
        "greeter",
        "--canary",
        "30",
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = with(&["status", "-c", "greeter"]);
    assert!(
        out.contains("canary sha256:") && out.contains("at 30%"),
        "{out}"
    );
    let (code, _, _) = with(&["canary", "abort", "-c", "greeter"]);
    assert_eq!(code, 0);
    // New code and a new entry at once are one new version (the entry adds a route).
    std::fs::write(&entry, "routes = [\"/greet\", \"/greet2\"]\n").unwrap();
    let (code, out, err) = with(&[
        "deploy",
        hello_wstd.to_str().unwrap(),
        "-c",
        "greeter",
        "--entry",
        entry.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is active"), "{out}");
    assert_eq!(service(&node.get("/greet2").await), "hello-wstd");
    let (_, out, _) = with(&["status", "-c", "greeter", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        status["active"]["routes"],
        serde_json::json!(["/greet", "/greet2"])
    );
    assert_eq!(
        status["previous"]["routes"],
        serde_json::json!(["/greet"]),
        "no version in between"
    );
    let (code, _, _) = with(&["delete", "-c", "greeter"]);
    assert_eq!(code, 0);
    assert_eq!(node.get("/greet").await.status, 404);

    // Exit codes: refused 1, usage 2, unreachable 3, bad token 4.
    let (code, _, err) = with(&[
        "deploy",
        wasm("needs-missing").to_str().unwrap(),
        "-c",
        "svc",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("missing_import"), "{err}");
    let (code, _, _) = with(&["deploy", "/no/such/file.wasm", "-c", "svc"]);
    assert_eq!(code, 2);
    let (code, _, err) = run_trellis(&["status", "--admin", "http://127.0.0.1:1", "--token", "x"]);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = run_trellis(&["status", "--admin", &admin, "--token", "wrong"]);
    assert_eq!(code, 4, "{err}");
}

#[tokio::test]
async fn without_a_configured_token_the_node_generates_one_in_a_private_file() {
    let data = tempfile::tempdir().unwrap();
    let options = NodeOptions {
        data_dir: Some(data.path().to_path_buf()),
        generated_admin_token: true,
        ..Default::default()
    };
    let node = TestNode::start_with(MANIFEST, &options).await;
    let file = data.path().join("admin-token");
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_eq!(token.len(), 64, "32 random bytes, hex");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the node's owner may read the token");
    assert!(
        node.log().contains(&file.display().to_string()),
        "the node says where it is"
    );

    let auth = format!("Bearer {token}");
    let with_it = node
        .admin_with("GET", "/v1/status", None, &[("authorization", &auth)])
        .await;
    assert_eq!(with_it.status, 200, "{}", with_it.body);
    let test_token = format!("Bearer {ADMIN_TOKEN}");
    let without = node
        .admin_with("GET", "/v1/status", None, &[("authorization", &test_token)])
        .await;
    assert_eq!(without.status, 401, "another token is refused");

    // The same token after a restart, and the CLI finds it through --token-file.
    drop(node);
    let node = TestNode::start_with(MANIFEST, &options).await;
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), token);
    let admin = format!("http://{}", node.admin_addr);
    let (code, out, err) = run_trellis(&[
        "status",
        "--admin",
        &admin,
        "--token-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("default/svc  active"), "{out}");
}

#[tokio::test]
async fn a_version_whose_migration_fails_is_refused_and_the_old_one_keeps_serving() {
    let migrations = tempfile::tempdir().unwrap();
    std::fs::write(
        migrations.path().join("0001_notes.sql"),
        "CREATE TABLE notes (id BIGINT PRIMARY KEY, body TEXT NOT NULL);",
    )
    .unwrap();
    let node = TestNode::start(&format!(
        r#"
[components.notes]
source = "{{wasm:sql-probe}}"
routes = ["/notes"]
sql = true
migrations = "{}"
"#,
        migrations.path().display()
    ))
    .await;
    let path = "/v1/tenants/default/components/notes";
    let insert =
        r#"{"statements":[{"execute":"INSERT INTO notes (id, body) VALUES (1, 'kept')"}]}"#;
    assert_eq!(node.post("/notes", insert).await.status, 200);

    // A broken migration: the new version is refused, nothing of it is applied.
    std::fs::write(
        migrations.path().join("0002_broken.sql"),
        "ALTER TABLE notes ADD COLUMN extra TEXT; THIS IS NOT SQL;",
    )
    .unwrap();
    let entry = format!(
        r#"{{"routes": ["/notes"], "sql": true, "migrations": "{}", "config": {{"V": "2"}}}}"#,
        migrations.path().display()
    );
    let refused = node
        .admin("PUT", path, Some(Bytes::from(entry.clone())))
        .await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(refused.json()["error"], "migration_failed");
    assert!(
        refused.body.contains("0002_broken.sql"),
        "the file is named: {}",
        refused.body
    );
    let select = r#"{"statements":[{"query":"SELECT body FROM notes"}]}"#;
    let still = node.post("/notes", select).await;
    assert_eq!(still.status, 200);
    assert!(still.body.contains("kept"), "{}", still.body);
    let columns = node
        .post(
            "/notes",
            r#"{"statements":[{"query":"SELECT extra FROM notes"}]}"#,
        )
        .await;
    assert!(
        columns.body.contains("error"),
        "the failed migration left nothing: {}",
        columns.body
    );

    // Positive control: fixed, the same change is taken and its migration applied.
    std::fs::write(
        migrations.path().join("0002_broken.sql"),
        "ALTER TABLE notes ADD COLUMN extra TEXT;",
    )
    .unwrap();
    let taken = node.admin("PUT", path, Some(Bytes::from(entry))).await;
    assert_eq!(taken.status, 200, "{}", taken.body);
    let columns = node
        .post(
            "/notes",
            r#"{"statements":[{"query":"SELECT extra FROM notes"}]}"#,
        )
        .await;
    assert!(!columns.body.contains("\"error\""), "{}", columns.body);
}

#[tokio::test]
async fn a_healthy_canary_with_promote_after_is_promoted_by_the_node() {
    let node = TestNode::start(MANIFEST).await;
    let canary = upload(
        &node,
        SVC,
        "hello-wstd",
        "?canary=50&min_requests=4&promote_after=1s&window=1m",
    )
    .await;
    let digest = canary["version"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&node, SVC).await["canary"].is_object() {
        assert!(
            Instant::now() < deadline,
            "the healthy canary was never promoted"
        );
        assert_eq!(node.get("/svc").await.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = status(&node, SVC).await;
    assert_eq!(
        after["active"]["version"],
        digest.as_str(),
        "promoted, not dropped"
    );
    assert!(
        after["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "canary_promoted"),
        "{after}"
    );
    for _ in 0..10 {
        assert_eq!(service(&node.get("/svc").await), "hello-wstd");
    }
}

/// Runs `trellis ARGS` with a docker config directory of the test's choosing.
fn trellis_with_docker_config(args: &[&str], docker_config: &std::path::Path) -> (i32, String) {
    let output = std::process::Command::new(common::TRELLIS)
        .args(args)
        .env("TRELLIS_LOG", "warn")
        .env("DOCKER_CONFIG", docker_config)
        .output()
        .expect("running trellis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn components_are_pushed_to_and_deployed_from_an_oci_registry() {
    use common::{OciRegistry, REGISTRY_PASSWORD, REGISTRY_USER};
    let mut registry = OciRegistry::start();
    let host = registry.host();
    let no_credentials = tempfile::tempdir().unwrap();
    let hello = wasm("hello");
    let hello = hello.to_str().unwrap();

    // `trellis push`: refused without credentials (positive control below).
    let tag = format!("oci://{host}/shop/hello:1");
    let (code, out) = trellis_with_docker_config(&["push", hello, &tag], no_credentials.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused the credentials"), "{out}");
    let (code, out) = trellis_with_docker_config(
        &[
            "push",
            hello,
            &tag,
            "--username",
            REGISTRY_USER,
            "--password",
            REGISTRY_PASSWORD,
        ],
        no_credentials.path(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("manifest sha256:"), "{out}");

    // Credentials from a docker-style config file.
    let docker = tempfile::tempdir().unwrap();
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{REGISTRY_USER}:{REGISTRY_PASSWORD}"),
    );
    std::fs::write(
        docker.path().join("config.json"),
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    let probe = wasm("probe");
    let (code, out) = trellis_with_docker_config(
        &[
            "push",
            probe.to_str().unwrap(),
            &format!("oci://{host}/shop/probe:1"),
        ],
        docker.path(),
    );
    assert_eq!(code, 0, "{out}");
    let probe_manifest = out
        .split("manifest ")
        .nth(1)
        .and_then(|rest| rest.split([',', ')']).next())
        .expect("the manifest digest is printed")
        .to_string();

    // A node pulls by tag at start, with the manifest's credentials.
    let data_dir = tempfile::tempdir().unwrap();
    let manifest = format!(
        r#"
[node.registries."{host}"]
username = "{REGISTRY_USER}"
password = "{REGISTRY_PASSWORD}"

[components.svc]
source = "oci://{host}/shop/hello:1"
routes = ["/svc"]

[components.cached]
source = "oci://{host}/shop/hello:1"
routes = ["/cached"]
"#
    );
    let options = NodeOptions {
        data_dir: Some(data_dir.path().to_path_buf()),
        env: vec![(
            "DOCKER_CONFIG".into(),
            no_credentials.path().display().to_string(),
        )],
        ..Default::default()
    };
    let mut node = TestNode::start_with(&manifest, &options).await;
    assert_eq!(service(&node.get("/svc").await), "hello");

    // Deployed by digest through the CLI (the node pulls it).
    let admin = format!("http://{}", node.admin_addr);
    let deploy = |reference: &str| {
        trellis_with_docker_config(
            &[
                "deploy",
                reference,
                "-c",
                "svc",
                "--admin",
                &admin,
                "--token",
                ADMIN_TOKEN,
            ],
            no_credentials.path(),
        )
    };
    let by_digest = format!("oci://{host}/shop/probe@{probe_manifest}");
    let (code, out) = deploy(&by_digest);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("is active"), "{out}");
    let serving = node.get("/svc").await;
    assert_eq!(serving.json()["probe"], "ok", "{}", serving.body);

    // Something that is not a Wasm component: an ordinary container image.
    {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = oci_client::Client::try_from(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            ..Default::default()
        })
        .unwrap();
        let image: oci_client::Reference = format!("{host}/shop/image:1").parse().unwrap();
        let layer = oci_client::client::ImageLayer::new(
            b"not wasm".to_vec(),
            "application/vnd.oci.image.layer.v1.tar".into(),
            None,
        );
        let config = oci_client::client::Config::new(
            b"{}".to_vec(),
            "application/vnd.oci.image.config.v1+json".into(),
            None,
        );
        let auth = oci_client::secrets::RegistryAuth::Basic(
            REGISTRY_USER.into(),
            REGISTRY_PASSWORD.into(),
        );
        client
            .push(&image, &[layer], config, &auth, None)
            .await
            .unwrap();
    }
    // A component whose layer the registry will serve corrupted.
    let wstd = wasm("hello-wstd");
    let (code, out) = trellis_with_docker_config(
        &[
            "push",
            wstd.to_str().unwrap(),
            &format!("oci://{host}/shop/corrupt:1"),
        ],
        docker.path(),
    );
    assert_eq!(code, 0, "{out}");
    let wstd_bytes = std::fs::read(&wstd).unwrap();
    let blob = registry.blob_path(&trellis::deploy::code::digest(&wstd_bytes));
    let mut corrupted = wstd_bytes.clone();
    let middle = corrupted.len() / 2;
    corrupted[middle] ^= 0xff;
    std::fs::write(&blob, &corrupted).unwrap();

    // Each bad case is refused with a clear reason, and the running version keeps serving.
    for (reference, reason) in [
        (
            format!("oci://{host}/shop/hello:nope"),
            "no such tag or digest",
        ),
        (
            format!("oci://{host}/shop/hello"),
            "neither a :TAG nor an @sha256",
        ),
        (
            format!("oci://{host}/shop/image:1"),
            "not a Wasm component artifact",
        ),
        (
            format!("oci://{host}/shop/corrupt:1"),
            "does not match its digest",
        ),
    ] {
        let (code, out) = deploy(&reference);
        assert_eq!(code, 1, "{reference}: {out}");
        assert!(out.contains(reason), "{reference}: {out}");
        let serving = node.get("/svc").await;
        assert_eq!(
            serving.json()["probe"],
            "ok",
            "{reference}: {}",
            serving.body
        );
    }

    // Without the registry: a new tag cannot be pulled (the old version serves on)...
    registry.stop();
    let (code, out) = deploy(&format!("oci://{host}/shop/hello:2"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot be reached"), "{out}");
    assert_eq!(node.get("/svc").await.json()["probe"], "ok");

    // ...and a restart serves what the references last resolved to, from the node's cache.
    node.kill();
    let node = TestNode::start_with(&manifest, &options).await;
    assert_eq!(service(&node.get("/cached").await), "hello");
    let serving = node.get("/svc").await;
    assert_eq!(serving.json()["probe"], "ok", "{}", serving.body);
}

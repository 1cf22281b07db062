//! No ambient authority: a guest sees no host environment, no files and no network
//! unless the manifest grants them, and then exactly what was granted.

use crate::common;
use common::TestNode;

#[tokio::test]
async fn a_guest_sees_no_host_environment_or_files_by_default() {
    let node = TestNode::start(
        r#"
[components.probe]
source = "{wasm:probe}"
routes = ["/"]
"#,
    )
    .await;

    let env = node.get("/env").await.json();
    assert_eq!(
        env["env"],
        serde_json::json!([]),
        "the node's environment (PATH, HOME, TRELLIS_TEST_HOST_SECRET) must not leak"
    );

    let files = node.get("/files").await.json();
    assert_eq!(files["preopens"], serde_json::json!([]));
    assert_ne!(files["etc_passwd"], "readable");
}

#[tokio::test]
async fn config_values_are_the_whole_environment_and_the_config_store() {
    let node = TestNode::start(
        r#"
[components.probe]
source = "{wasm:probe}"
routes = ["/"]
config = { GREETING = "hello", DATABASE_NAME = "orders" }
"#,
    )
    .await;
    let env = node.get("/env").await.json();
    assert_eq!(
        env["env"],
        serde_json::json!([["DATABASE_NAME", "orders"], ["GREETING", "hello"]])
    );
}

/// `tenants.T.config` reaches every component of the tenant, under the component's own
/// values, and no component of another tenant.
#[tokio::test]
async fn tenant_config_is_shared_by_its_components_and_overridden_by_theirs() {
    let node = TestNode::start(
        r#"
[tenants.shop]
hosts = ["shop.test"]
config = { JWT_SECRET = "shared", REGION = "eu" }

[tenants.other]
hosts = ["other.test"]

[components.a]
tenant = "shop"
source = "{wasm:probe}"
routes = ["/"]

[components.b]
tenant = "shop"
source = "{wasm:probe}"
routes = ["/b"]
config = { REGION = "us" }

[components.c]
tenant = "other"
source = "{wasm:probe}"
routes = ["/"]
"#,
    )
    .await;
    let env = |host: &'static str, path: &'static str| {
        let node = &node;
        async move { node.get_host(host, path).await.json()["env"].clone() }
    };
    assert_eq!(
        env("shop.test", "/env").await,
        serde_json::json!([["JWT_SECRET", "shared"], ["REGION", "eu"]])
    );
    assert_eq!(
        env("shop.test", "/b/env").await,
        serde_json::json!([["JWT_SECRET", "shared"], ["REGION", "us"]])
    );
    assert_eq!(env("other.test", "/env").await, serde_json::json!([]));
}

#[tokio::test]
async fn granted_directories_are_visible_read_only_unless_marked_writable() {
    let shared = tempfile::tempdir().unwrap();
    std::fs::create_dir(shared.path().join("static")).unwrap();
    std::fs::create_dir(shared.path().join("uploads")).unwrap();
    std::fs::write(shared.path().join("static/motd.txt"), "welcome").unwrap();
    let node = TestNode::start(&format!(
        r#"
[components.probe]
source = "{{wasm:probe}}"
routes = ["/"]

[components.probe.dirs."/static"]
host = "{root}/static"

[components.probe.dirs."/uploads"]
host = "{root}/uploads"
writable = true
"#,
        root = shared.path().display()
    ))
    .await;

    let read = node.get("/files?read=/static/motd.txt").await.json();
    assert_eq!(read["preopens"], serde_json::json!(["/static", "/uploads"]));
    assert_eq!(read["read"], "welcome");
    assert_ne!(read["etc_passwd"], "readable");

    let denied = node.get("/files?write=/static/new.txt").await.json();
    assert!(
        denied["write"].as_str().unwrap().starts_with("error"),
        "{denied}"
    );
    assert!(!shared.path().join("static/new.txt").exists());

    let allowed = node.get("/files?write=/uploads/new.txt").await.json();
    assert_eq!(allowed["write"], "ok");
    assert_eq!(
        std::fs::read_to_string(shared.path().join("uploads/new.txt")).unwrap(),
        "written by probe"
    );

    // The grant is confined to the directory: no way up and out.
    let escape = node
        .get("/files?read=/static/../../etc/passwd")
        .await
        .json();
    assert!(
        escape["read"].as_str().unwrap().starts_with("error"),
        "{escape}"
    );
}

#[tokio::test]
async fn outbound_http_reaches_only_the_hosts_the_manifest_lists() {
    // A tiny upstream the guest may call.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_port = upstream.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut socket, _)) = upstream.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\nupstream").await;
            });
        }
    });
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();

    let node = TestNode::start(&format!(
        r#"
[components.probe]
source = "{{wasm:probe}}"
routes = ["/"]
outbound = ["127.0.0.1:{upstream_port}"]
"#
    ))
    .await;

    let allowed = node
        .get(&format!("/fetch?url=http://127.0.0.1:{upstream_port}/x"))
        .await
        .json();
    assert_eq!(allowed["status"], 200, "{allowed}");
    assert_eq!(allowed["body"], "upstream");

    for url in [
        format!("http://127.0.0.1:{other_port}/x"),
        "http://example.com/".to_string(),
    ] {
        let denied = node.get(&format!("/fetch?url={url}")).await.json();
        assert_eq!(
            denied["error"], "ErrorCode::HttpRequestDenied",
            "{url}: {denied}"
        );
    }
}

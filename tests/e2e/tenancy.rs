//! Multi-tenant nodes: tenants created, changed and removed at runtime through the admin
//! API; tenant tokens that manage only their tenant; every cross-tenant attempt tried
//! through a real guest, each with the owner's positive control in the same test; each
//! quota's documented answer; a noisy tenant next to a quiet one; CPU turns given up by
//! guests that wait in the host.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::{NodeOptions, Response, TestNode, on_both_backends, wasm};
use serde_json::{Value, json};

fn bytes_of(fixture: &str) -> Bytes {
    Bytes::from(std::fs::read(wasm(fixture)).unwrap())
}

fn body(value: Value) -> Option<Bytes> {
    Some(Bytes::from(value.to_string()))
}

async fn expect(response: Response, status: u16, what: &str) -> Value {
    assert_eq!(response.status, status, "{what}: {}", response.body);
    if response.body.is_empty() {
        Value::Null
    } else {
        response.json()
    }
}

/// Creates component `name` of `tenant` with `entry` and its first version, through the
/// admin API with `token` (the operator's when `None`).
async fn deploy(
    node: &TestNode,
    token: Option<&str>,
    tenant: &str,
    name: &str,
    entry: Value,
    fixture: &str,
) -> Response {
    let auth = format!("Bearer {}", token.unwrap_or(common::ADMIN_TOKEN));
    let headers = [("authorization", auth.as_str())];
    let path = format!("/v1/tenants/{tenant}/components/{name}");
    let created = node.admin_with("PUT", &path, body(entry), &headers).await;
    if created.status != 201 {
        return created;
    }
    node.admin_with(
        "POST",
        &format!("{path}/versions?activate=true"),
        Some(bytes_of(fixture)),
        &headers,
    )
    .await
}

async fn get(node: &TestNode, host: &str, path: &str) -> Response {
    node.request("GET", path, None, &[("host", host)]).await
}

async fn send(node: &TestNode, method: &str, host: &str, path: &str, data: &str) -> Response {
    node.request(
        method,
        path,
        Some(data.to_string().into()),
        &[("host", host)],
    )
    .await
}

const ONE_TENANT: &str = r#"
[tenants.ops]
hosts = ["ops.test"]
"#;

on_both_backends!(tenants_are_created_changed_and_removed_at_runtime);
on_both_backends!(the_storage_quota_stops_writes_not_reads);

async fn tenants_are_created_changed_and_removed_at_runtime(options: NodeOptions) {
    let data = tempfile::tempdir().unwrap();
    let options = NodeOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..options
    };
    let mut node = TestNode::start_with(ONE_TENANT, &options).await;

    // Created: served on its host at once, with its own config.
    let created = node
        .admin(
            "PUT",
            "/v1/tenants/acme",
            body(json!({"hosts": ["acme.test"], "config": {"GREETING": "hello acme"}})),
        )
        .await;
    let created = expect(created, 201, "creating acme").await;
    assert_eq!(created["origin"], "api");
    assert_eq!(get(&node, "acme.test", "/kv/default/k").await.status, 404);
    let entry = json!({"routes": ["/"], "keyvalue": ["default"]});
    expect(
        deploy(&node, None, "acme", "store", entry.clone(), "kv-probe").await,
        201,
        "deploying into acme",
    )
    .await;
    let stored = send(&node, "PUT", "acme.test", "/kv/default/k", "kept").await;
    assert_eq!(stored.status, 200, "{}", stored.body);
    assert_eq!(
        get(&node, "acme.test", "/kv/default/k").await.json()["value"],
        "kept"
    );
    // Listed with its usage.
    let listed = expect(node.admin("GET", "/v1/tenants", None).await, 200, "list").await;
    let names: Vec<&str> = listed["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme", "ops"]);

    // Changed: the new host serves, the old one no longer does.
    let changed = node
        .admin(
            "PUT",
            "/v1/tenants/acme",
            body(json!({"hosts": ["acme.example"]})),
        )
        .await;
    expect(changed, 200, "changing acme's hosts").await;
    assert_eq!(get(&node, "acme.test", "/kv/default/k").await.status, 404);
    assert_eq!(
        get(&node, "acme.example", "/kv/default/k").await.json()["value"],
        "kept"
    );
    // A host another tenant claims is refused, naming the field.
    let clash = node
        .admin(
            "PUT",
            "/v1/tenants/acme",
            body(json!({"hosts": ["ops.test"]})),
        )
        .await;
    let clash = expect(clash, 422, "claiming ops' host").await;
    assert_eq!(clash["problems"][0]["field"], "tenants.acme.hosts[0]");
    // A manifest tenant cannot be removed through the API.
    let declared = node.admin("DELETE", "/v1/tenants/ops", None).await;
    assert_eq!(
        expect(declared, 409, "removing ops").await["error"],
        "declared_in_manifest"
    );

    // A restart brings back the tenant, its component and its data.
    node.kill();
    let mut node = TestNode::start_with(
        ONE_TENANT,
        &NodeOptions {
            manifest_path: Some(node.manifest_path.clone()),
            ..options.clone()
        },
    )
    .await;
    assert_eq!(
        get(&node, "acme.example", "/kv/default/k").await.json()["value"],
        "kept"
    );

    // Removed, data kept: its traffic stops at once; re-created, the data is there.
    let removed = node.admin("DELETE", "/v1/tenants/acme", None).await;
    expect(removed, 204, "removing acme").await;
    assert_eq!(
        get(&node, "acme.example", "/kv/default/k").await.status,
        404
    );
    let gone = node.admin("GET", "/v1/tenants/acme", None).await;
    assert_eq!(
        expect(gone, 404, "a removed tenant").await["error"],
        "unknown_tenant"
    );
    expect(
        node.admin(
            "PUT",
            "/v1/tenants/acme",
            body(json!({"hosts": ["acme.example"]})),
        )
        .await,
        201,
        "re-creating acme",
    )
    .await;
    expect(
        deploy(&node, None, "acme", "store", entry.clone(), "kv-probe").await,
        201,
        "re-deploying",
    )
    .await;
    assert_eq!(
        get(&node, "acme.example", "/kv/default/k").await.json()["value"],
        "kept"
    );

    // Removed with its data: re-created, it starts empty.
    let removed = node
        .admin("DELETE", "/v1/tenants/acme?data=delete", None)
        .await;
    expect(removed, 204, "removing acme with its data").await;
    expect(
        node.admin(
            "PUT",
            "/v1/tenants/acme",
            body(json!({"hosts": ["acme.example"]})),
        )
        .await,
        201,
        "re-creating acme",
    )
    .await;
    expect(
        deploy(&node, None, "acme", "store", entry, "kv-probe").await,
        201,
        "re-deploying",
    )
    .await;
    assert_eq!(
        get(&node, "acme.example", "/kv/default/k").await.json()["value"],
        Value::Null
    );
    // After a restart, the removed tenant stays removed.
    node.admin("DELETE", "/v1/tenants/acme", None).await;
    node.kill();
    let node = TestNode::start_with(
        ONE_TENANT,
        &NodeOptions {
            manifest_path: Some(node.manifest_path.clone()),
            ..options
        },
    )
    .await;
    assert_eq!(
        node.admin("GET", "/v1/tenants/acme", None).await.status,
        404
    );
}

const TWO_TENANTS: &str = r#"
# Registries tenant tokens may have the node pull from (neither exists: a pull is tried
# and fails as unreachable, which is how the test tells "tried" from "refused").
[node.registries."shop-registry.invalid"]
tenants = ["shop"]

[node.registries."blog-registry.invalid"]
tenants = ["blog"]

[tenants.shop]
hosts = ["shop.test"]

[tenants.blog]
hosts = ["blog.test"]

[components.blog-hello]
tenant = "blog"
source = "{wasm:hello}"
routes = ["/"]
"#;

#[tokio::test]
async fn a_tenant_token_manages_only_its_tenant() {
    let node = TestNode::start(TWO_TENANTS).await;
    let issued = node
        .admin(
            "POST",
            "/v1/tenants/shop/tokens",
            body(json!({"label": "ci"})),
        )
        .await;
    let issued = expect(issued, 201, "issuing a token").await;
    let token = issued["token"].as_str().unwrap().to_string();
    let id = issued["id"].as_str().unwrap().to_string();
    // Listed by id, never shown again.
    let listed = node.admin("GET", "/v1/tenants/shop/tokens", None).await;
    let listed = expect(listed, 200, "listing tokens").await;
    assert_eq!(listed["tokens"][0]["id"], id.as_str());
    assert!(!listed.to_string().contains(&token));

    // Its own tenant: deploy, status, metrics (the positive control).
    let entry = json!({"routes": ["/"]});
    expect(
        deploy(&node, Some(&token), "shop", "hello", entry.clone(), "hello").await,
        201,
        "deploying with the shop's token",
    )
    .await;
    assert_eq!(get(&node, "shop.test", "/").await.status, 200);
    let auth = format!("Bearer {token}");
    let as_shop = [("authorization", auth.as_str())];
    let own = node
        .admin_with("GET", "/v1/tenants/shop", None, &as_shop)
        .await;
    assert_eq!(
        expect(own, 200, "its own tenant").await["components"],
        json!(["hello"])
    );
    let own = node
        .admin_with("GET", "/v1/tenants/shop/components/hello", None, &as_shop)
        .await;
    expect(own, 200, "its own component").await;
    let metrics = node.admin_with("GET", "/metrics", None, &as_shop).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains(r#"trellis_requests_total{tenant="shop",component="hello",status="200"} 1"#),
        "{}",
        metrics.body
    );
    assert!(
        !metrics.body.contains(r#"tenant="blog""#),
        "{}",
        metrics.body
    );
    assert!(
        node.metrics().await.contains(r#"tenant="blog""#),
        "the operator sees the blog's series"
    );

    // What only the operator may grant: host directories, migration folders, calls to
    // the node's own machine.
    let hello_path = "/v1/tenants/shop/components/hello";
    for entry in [
        json!({"routes": ["/"], "dirs": {"/host": {"host": "/"}}}),
        json!({"routes": ["/"], "sql": true, "migrations": "/tmp"}),
        json!({"routes": ["/"], "outbound": ["127.0.0.1:8081"]}),
        json!({"routes": ["/"], "outbound": ["localhost"]}),
        json!({"routes": ["/"], "outbound": ["169.254.169.254"]}),
    ] {
        let refused = node
            .admin_with("PUT", hello_path, body(entry.clone()), &as_shop)
            .await;
        let refused = expect(refused, 403, &format!("granting {entry}")).await;
        assert_eq!(refused["error"], "forbidden");
    }
    let allowed = node
        .admin_with(
            "PUT",
            hello_path,
            body(json!({"routes": ["/"], "outbound": ["api.example.com"]})),
            &as_shop,
        )
        .await;
    expect(allowed, 200, "a public outbound host").await;

    // Nor may it have the node pull code from a registry the operator did not list for it:
    // not the node's own machine, not a private network, not another tenant's registry.
    let versions = format!("{hello_path}/versions?activate=true&source=");
    for registry in [
        "127.0.0.1:5000",
        "10.0.0.7",
        "localhost:5000",
        "ghcr.io",
        "blog-registry.invalid",
    ] {
        let refused = node
            .admin_with(
                "POST",
                &format!("{versions}oci://{registry}/shop/hello:1"),
                None,
                &as_shop,
            )
            .await;
        let refused = expect(refused, 403, &format!("pulling from {registry}")).await;
        assert_eq!(refused["error"], "forbidden");
    }
    // Positive control: its own registry is tried (and, not existing, cannot be reached).
    let tried = node
        .admin_with(
            "POST",
            &format!("{versions}oci://shop-registry.invalid/shop/hello:1"),
            None,
            &as_shop,
        )
        .await;
    assert_eq!(tried.status, 502, "{}", tried.body);
    assert_eq!(
        tried.json()["error"],
        "registry_unreachable",
        "{}",
        tried.body
    );

    // Anything else: 403.
    for (method, path, payload) in [
        ("GET", "/v1/tenants/blog", None),
        ("GET", "/v1/tenants/blog/components", None),
        ("GET", "/v1/tenants/blog/components/blog-hello", None),
        ("PUT", "/v1/tenants/blog/components/x", body(entry.clone())),
        (
            "POST",
            "/v1/tenants/blog/components/blog-hello/rollback",
            None,
        ),
        ("DELETE", "/v1/tenants/blog/components/blog-hello", None),
        ("GET", "/v1/status", None),
        ("GET", "/v1/tenants", None),
        (
            "PUT",
            "/v1/tenants/shop",
            body(json!({"hosts": ["shop.test"], "quota": {"max_instances": 1000}})),
        ),
        ("DELETE", "/v1/tenants/blog", None),
        ("POST", "/v1/tenants/shop/tokens", None),
        ("GET", "/v1/tenants/shop/tokens", None),
    ] {
        let refused = node.admin_with(method, path, payload, &as_shop).await;
        let refused = expect(refused, 403, &format!("{method} {path}")).await;
        assert_eq!(refused["error"], "forbidden");
    }
    // The blog's component is untouched.
    assert_eq!(get(&node, "blog.test", "/").await.status, 200);

    // The CLI takes a tenant token like the operator's.
    let admin_url = format!("http://{}", node.admin_addr);
    let hello = wasm("hello-wstd");
    let cli = |tenant: &str| {
        common::run_trellis(&[
            "deploy",
            hello.to_str().unwrap(),
            "--component",
            "hello",
            "--tenant",
            tenant,
            "--admin",
            &admin_url,
            "--token",
            &token,
        ])
    };
    let (code, out, err) = cli("shop");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("shop/hello: version"), "{out}");
    let (code, out, err) = cli("blog");
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("forbidden") || err.contains("403"), "{err}");

    // Revoked: the token no longer opens anything.
    let revoked = node
        .admin("DELETE", &format!("/v1/tenants/shop/tokens/{id}"), None)
        .await;
    expect(revoked, 204, "revoking").await;
    let after = node
        .admin_with("GET", "/v1/tenants/shop", None, &as_shop)
        .await;
    assert_eq!(after.status, 401, "{}", after.body);
}

const NEIGHBOURS: &str = r#"
[tenants.shop]
hosts = ["shop.test"]

[tenants.blog]
hosts = ["blog.test"]

[components.shop-kv]
tenant = "shop"
source = "{wasm:kv-probe}"
routes = ["/store"]
keyvalue = ["default"]

[components.blog-kv]
tenant = "blog"
source = "{wasm:kv-probe}"
routes = ["/store"]
keyvalue = ["default", "shop", "shop-kv"]

[components.shop-sql]
tenant = "shop"
source = "{wasm:sql-probe}"
routes = ["/sql"]
sql = true

[components.blog-sql]
tenant = "blog"
source = "{wasm:sql-probe}"
routes = ["/sql"]
sql = true

[components.shop-msg]
tenant = "shop"
source = "{wasm:msg-probe}"
routes = ["/msg"]
keyvalue = ["default"]
publish = [">"]
subscriptions = ["news.>"]

[components.blog-msg]
tenant = "blog"
source = "{wasm:msg-probe}"
routes = ["/msg"]
keyvalue = ["default"]
publish = [">"]
subscriptions = [">"]

[components.shop-probe]
tenant = "shop"
source = "{wasm:probe}"
routes = ["/probe"]
outbound = ["*.internal"]

[components.blog-probe]
tenant = "blog"
source = "{wasm:probe}"
routes = ["/probe"]
outbound = ["*.internal"]
"#;

async fn sql(node: &TestNode, host: &str, statements: Value) -> Value {
    let response = send(
        node,
        "POST",
        host,
        "/sql",
        &json!({"statements": statements}).to_string(),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

#[tokio::test]
async fn no_tenant_reaches_another_through_its_guests() {
    let node = TestNode::start(NEIGHBOURS).await;
    let (shop, blog) = ("shop.test", "blog.test");

    // Key-value: the shop's key is the shop's (positive control), under every name the
    // blog can pass: the same bucket, buckets named after the shop or its component.
    assert_eq!(
        send(&node, "PUT", shop, "/store/kv/default/secret", "shop-only")
            .await
            .status,
        200
    );
    assert_eq!(
        get(&node, shop, "/store/kv/default/secret").await.json()["value"],
        "shop-only"
    );
    for bucket in ["default", "shop", "shop-kv"] {
        let seen = get(&node, blog, &format!("/store/kv/{bucket}/secret")).await;
        assert_eq!(
            seen.json()["value"],
            Value::Null,
            "bucket {bucket}: {}",
            seen.body
        );
    }
    let keys = get(&node, blog, "/store/keys/default").await.json();
    assert_eq!(keys["keys"], json!([]), "{keys}");

    // SQL: the shop's table is the shop's (positive control); the blog sees no such
    // table, and cannot ATTACH the shop's database file by path.
    let created = sql(
        &node,
        shop,
        json!([
            {"execute": "CREATE TABLE secrets (v TEXT)"},
            {"execute": "INSERT INTO secrets VALUES ('shop-only')"},
            {"query": "SELECT v FROM secrets"},
            {"query": "SELECT file FROM pragma_database_list WHERE name = 'main'"}
        ]),
    )
    .await;
    assert_eq!(
        created["results"][2]["rows"],
        json!([["shop-only"]]),
        "{created}"
    );
    let shop_file = created["results"][3]["rows"][0][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(shop_file.contains("shop"), "{shop_file}");
    let seen = sql(&node, blog, json!([{"query": "SELECT v FROM secrets"}])).await;
    assert!(
        seen["results"][0]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no such table"),
        "{seen}"
    );
    let attach = sql(
        &node,
        blog,
        json!([
            {"execute": format!("ATTACH DATABASE '{shop_file}' AS stolen")},
            {"query": "SELECT v FROM stolen.secrets"}
        ]),
    )
    .await;
    assert!(
        attach["results"][0]["error"].is_object(),
        "ATTACH was allowed: {attach}"
    );
    let vacuum = sql(
        &node,
        blog,
        json!([{"execute": "VACUUM INTO '/tmp/trellis-stolen.db'"}]),
    )
    .await;
    assert!(
        vacuum["results"][0]["error"].is_object(),
        "VACUUM INTO was allowed: {vacuum}"
    );

    // Messaging: the shop's own subscriber gets its event (positive control); the blog's
    // catch-all subscription sees none of it.
    let published = send(&node, "POST", shop, "/msg/publish/news.today", "shop-news").await;
    assert_eq!(published.json(), json!({"ok": true}));
    let mut received = Value::Null;
    for _ in 0..100 {
        received = get(&node, shop, "/msg/received").await.json();
        if received["received"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(received["received"], json!(["news.today|shop-news"]));
    // The blog publishes on the same subject: only its own subscriber sees it, and the
    // shop's does not.
    send(&node, "POST", blog, "/msg/publish/news.today", "blog-news").await;
    let mut blog_seen = Value::Null;
    for _ in 0..100 {
        blog_seen = get(&node, blog, "/msg/received").await.json();
        if blog_seen["received"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(blog_seen["received"], json!(["news.today|blog-news"]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get(&node, shop, "/msg/received").await.json()["received"],
        json!(["news.today|shop-news"])
    );

    // NAME.internal: a sibling of the shop answers the shop (positive control), and is
    // unknown to the blog under the same name.
    let own = get(
        &node,
        shop,
        "/probe/fetch?url=http://shop-kv.internal/store/kv/default/secret",
    )
    .await
    .json();
    assert_eq!(own["status"], 200, "{own}");
    assert!(own["body"].as_str().unwrap().contains("shop-only"), "{own}");
    let other = get(
        &node,
        blog,
        "/probe/fetch?url=http://shop-kv.internal/store/kv/default/secret",
    )
    .await
    .json();
    assert!(
        other["error"].as_str().unwrap().contains("DnsError"),
        "{other}"
    );

    // Routes: the same path on the blog's host reaches the blog's component.
    let blog_answer = get(&node, blog, "/store/kv/default/secret").await.json();
    assert_eq!(blog_answer["value"], Value::Null);
    let unknown = get(&node, "nobody.test", "/store/kv/default/secret").await;
    assert_eq!(unknown.status, 404, "no tenant claims that host");
}

const QUOTAS: &str = r#"
[node.tenant_quota]
max_instances = 50

[tenants.tight]
hosts = ["tight.test"]
quota = { requests_per_second = 5, burst = 5, max_instances = 2, max_memory = "40MiB", max_storage = "1MiB", max_components = 6, max_code_size = "700KiB", publish_per_second = 3, max_outbound_per_request = 2, max_instance_memory = "64MiB", max_deadline = "10s" }

[tenants.roomy]
hosts = ["roomy.test"]

[components.probe]
tenant = "tight"
source = "{wasm:probe}"
routes = ["/probe"]
outbound = ["*.internal"]

[components.store]
tenant = "tight"
source = "{wasm:kv-probe}"
routes = ["/store"]
keyvalue = ["default"]

[components.msg]
tenant = "tight"
source = "{wasm:msg-probe}"
routes = ["/msg"]
keyvalue = ["default"]
publish = ["tick"]

[components.roomy-probe]
tenant = "roomy"
source = "{wasm:probe}"
routes = ["/probe"]
"#;

async fn rejections(node: &TestNode, quota: &str) -> f64 {
    let prefix =
        format!(r#"trellis_tenant_quota_rejections_total{{tenant="tight",quota="{quota}"}}"#);
    node.metrics()
        .await
        .lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn each_quota_breach_gets_its_answer() {
    let node = TestNode::start(QUOTAS).await;
    let (tight, roomy) = ("tight.test", "roomy.test");

    // Requests per second: the burst passes, then 429 with Retry-After. The other
    // tenant is not limited (positive control).
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..12 {
        let response = get(&node, tight, "/probe/ok").await;
        if response.status == 429 {
            retry_after = response.headers.get("retry-after").cloned();
            assert_eq!(response.json()["error"], "rate_limited");
        }
        statuses.push(response.status);
    }
    assert!(statuses[..5].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(retry_after.expect("Retry-After").to_str().unwrap(), "1");
    for _ in 0..12 {
        assert_eq!(get(&node, roomy, "/probe/ok").await.status, 200);
    }
    assert!(rejections(&node, "requests_per_second").await >= 1.0);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Instances: two alive at once; a third gets 503 overloaded naming the tenant quota.
    let slow = |_| get(&node, tight, "/probe/sleep?ms=700");
    let (a, b) = tokio::join!(slow(0), slow(1));
    assert_eq!((a.status, b.status), (200, 200));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (a, b, c) = tokio::join!(slow(0), slow(1), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        get(&node, tight, "/probe/ok").await
    });
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(c.status, 503, "{}", c.body);
    assert!(
        c.json()["message"].as_str().unwrap().contains("tenant"),
        "{}",
        c.body
    );
    assert!(rejections(&node, "max_instances").await >= 1.0);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Memory in total: a guest growing without end hits the tenant's 40 MiB before its own
    // 64 MiB (503); the other tenant's guest hits its own limit (500 memory_limit).
    let grown = get(&node, tight, "/probe/grow").await;
    assert_eq!(grown.status, 503, "{}", grown.body);
    assert!(
        grown.json()["message"]
            .as_str()
            .unwrap()
            .contains("memory quota")
    );
    let roomy_grown = get(&node, roomy, "/probe/grow").await;
    assert_eq!(roomy_grown.status, 500, "{}", roomy_grown.body);
    assert_eq!(roomy_grown.json()["error"], "memory_limit");
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Storage: writes fail in the guest once the tenant's databases hold 1 MiB; reads and
    // deletes keep working.
    let chunk = "x".repeat(200 * 1024);
    let mut refused = None;
    for i in 0..20 {
        let response = send(
            &node,
            "PUT",
            tight,
            &format!("/store/kv/default/k{i}"),
            &chunk,
        )
        .await;
        if response.status != 200 {
            refused = Some((i, response));
            break;
        }
        tokio::time::sleep(Duration::from_millis(220)).await;
    }
    let (written, refusal) = refused.expect("the storage quota refused a write");
    assert!(written >= 3, "refused after {written} writes");
    assert!(
        refusal.body.contains("storage quota exceeded"),
        "{}",
        refusal.body
    );
    assert_eq!(
        get(&node, tight, "/store/kv/default/k0").await.json()["value"]
            .as_str()
            .map(str::len),
        Some(chunk.len())
    );
    assert_eq!(
        send(&node, "DELETE", tight, "/store/kv/default/k0", "")
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Publish rate: 3 a second; of ten at once, some are refused in the guest, which is
    // told why.
    let many = send(&node, "POST", tight, "/msg/publish-many/tick?n=10", "t")
        .await
        .json();
    assert!(many["published"].as_u64().unwrap() >= 3, "{many}");
    assert!(many["failed"].as_u64().unwrap() >= 1, "{many}");
    let one = send(&node, "POST", tight, "/msg/publish/tick", "t")
        .await
        .json();
    assert!(
        one["error"]
            .as_str()
            .unwrap_or_default()
            .contains("published messages per second"),
        "{one}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Outbound calls per request: two pass, the third fails in the guest.
    let fetched = get(
        &node,
        tight,
        "/probe/fetch-many?url=http://probe.internal/probe/ok&n=3",
    )
    .await
    .json();
    let reports = fetched["reports"].as_array().unwrap();
    assert_eq!(reports[0]["status"], 200, "{fetched}");
    assert_eq!(reports[1]["status"], 200, "{fetched}");
    assert!(
        reports[2]["error"]
            .as_str()
            .unwrap()
            .contains("outbound requests per request"),
        "{fetched}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Deploy-time quotas: instance memory and deadline above the tenant's, more
    // components than it may have, more code than it may run.
    let too_big = node
        .admin(
            "PUT",
            "/v1/tenants/tight/components/big",
            body(json!({"routes": ["/big"], "limits": {"memory": "128MiB"}})),
        )
        .await;
    let too_big = expect(too_big, 422, "memory above the quota").await;
    assert!(
        too_big.to_string().contains("max_instance_memory"),
        "{too_big}"
    );
    let too_long = node
        .admin(
            "PUT",
            "/v1/tenants/tight/components/long",
            body(json!({"routes": ["/long"], "limits": {"deadline": "1m"}})),
        )
        .await;
    let too_long = expect(too_long, 422, "deadline above the quota").await;
    assert!(too_long.to_string().contains("max_deadline"), "{too_long}");
    // Code: kv-probe, msg-probe and probe already run; one large component fits the
    // 700 KiB the tenant may run, a second does not, nor does `user` in place of `probe`.
    let sizes: u64 = ["probe", "kv-probe", "msg-probe"]
        .iter()
        .map(|f| std::fs::metadata(wasm(f)).unwrap().len())
        .sum();
    let order = std::fs::metadata(wasm("order")).unwrap().len();
    let user = std::fs::metadata(wasm("user")).unwrap().len();
    let probe = std::fs::metadata(wasm("probe")).unwrap().len();
    assert!(
        sizes + order <= 700 << 10
            && sizes + 2 * order > 700 << 10
            && sizes + order - probe + user > 700 << 10,
        "the fixtures' sizes do not suit this test"
    );
    let mut code_refusal = None;
    for i in 0..3 {
        let response = deploy(
            &node,
            None,
            "tight",
            &format!("extra{i}"),
            json!({"routes": [format!("/extra{i}")]}),
            "order",
        )
        .await;
        if response.status != 201 {
            code_refusal = Some(response);
            break;
        }
    }
    let code_refusal = expect(code_refusal.expect("a refusal"), 422, "code size").await;
    assert!(
        code_refusal.to_string().contains("max_code_size"),
        "{code_refusal}"
    );
    // Kept for later, then activated: refused at the activation.
    let kept = node
        .admin(
            "POST",
            "/v1/tenants/tight/components/probe/versions",
            Some(bytes_of("user")),
        )
        .await;
    let kept = expect(kept, 201, "keeping a version").await;
    assert_eq!(kept["state"], "uploaded");
    let activated = node
        .admin(
            "POST",
            "/v1/tenants/tight/components/probe/activate",
            body(json!({"version": kept["version"]})),
        )
        .await;
    let activated = expect(activated, 422, "activating past the code quota").await;
    assert_eq!(activated["error"], "quota_exceeded");
    // Components: six at most (created ones waiting for code count too).
    let mut count_refusal = None;
    for i in 0..6 {
        let response = node
            .admin(
                "PUT",
                &format!("/v1/tenants/tight/components/more{i}"),
                body(json!({"routes": [format!("/more{i}")]})),
            )
            .await;
        if response.status != 201 {
            count_refusal = Some(response);
            break;
        }
    }
    let count_refusal = expect(count_refusal.expect("a refusal"), 422, "components").await;
    assert!(
        count_refusal.to_string().contains("max_components"),
        "{count_refusal}"
    );

    // Status and metrics show the quota and what was refused; the log says it once.
    let status = expect(
        node.admin("GET", "/v1/tenants/tight", None).await,
        200,
        "status",
    )
    .await;
    assert_eq!(status["effective_quota"]["max_instances"], 2);
    assert_eq!(status["quota"]["requests_per_second"], 5);
    for quota in [
        "requests_per_second",
        "max_instances",
        "max_memory",
        "max_storage",
        "publish_per_second",
        "max_outbound_per_request",
        "component_limits",
        "max_code_size",
        "max_components",
    ] {
        assert!(
            status["usage"]["rejections"][quota].as_u64().unwrap_or(0) >= 1,
            "{quota}: {status}"
        );
    }
    let roomy_status = node.admin("GET", "/v1/tenants/roomy", None).await.json();
    assert_eq!(
        roomy_status["usage"]["rejections"],
        json!({}),
        "{roomy_status}"
    );
    assert_eq!(
        roomy_status["effective_quota"]["max_instances"], 50,
        "the node's default"
    );
    let metrics = node.metrics().await;
    assert!(
        metrics.contains(r#"trellis_tenant_quota_limit{tenant="tight",quota="max_instances"} 2"#),
        "{metrics}"
    );
    let log = node.log();
    let rate_lines = log
        .lines()
        .filter(|l| l.contains("tenant quota reached") && l.contains("requests_per_second"))
        .count();
    assert_eq!(rate_lines, 1, "logged once:\n{log}");
}

const STORAGE: &str = r#"
[tenants.small]
hosts = ["small.test"]
quota = { max_storage = "2MiB" }

[tenants.large]
hosts = ["large.test"]

[components.small-sql]
tenant = "small"
source = "{wasm:sql-probe}"
routes = ["/sql"]
sql = true

[components.large-sql]
tenant = "large"
source = "{wasm:sql-probe}"
routes = ["/sql"]
sql = true
"#;

/// Inserts 100 KiB rows into `host`'s table until an insert fails (at most `max`);
/// answers how many passed and the last answer.
async fn fill(node: &TestNode, host: &str, max: usize) -> (usize, Value) {
    let mut last = Value::Null;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..max {
        // Random hex: PostgreSQL compresses a repeated character to almost nothing.
        let blob: String = (0..100 * 1024 / 16)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                format!("{state:016x}")
            })
            .collect();
        last = sql(
            node,
            host,
            json!([{"execute": "INSERT INTO blobs (v) VALUES ($1)", "params": [blob]}]),
        )
        .await;
        if last["results"][0]["error"].is_object() {
            return (i, last);
        }
        // PostgreSQL's size is measured at most once a second.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    (max, last)
}

async fn the_storage_quota_stops_writes_not_reads(options: NodeOptions) {
    let node = TestNode::start_with(STORAGE, &options).await;
    for host in ["small.test", "large.test"] {
        let created = sql(
            &node,
            host,
            json!([{"execute": "CREATE TABLE blobs (v TEXT)"}]),
        )
        .await;
        assert!(created["results"][0]["error"].is_null(), "{created}");
    }
    // The small tenant is stopped near its 2 MiB; the large one writes as much (positive
    // control).
    let (small, refusal) = fill(&node, "small.test", 60).await;
    assert!(small < 60, "never refused: {refusal}");
    let message = refusal["results"][0]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("storage quota exceeded"), "{refusal}");
    let (large, _) = fill(&node, "large.test", small + 5).await;
    assert_eq!(large, small + 5, "the other tenant is not limited");
    // Another statement behind a read or a delete is a write too.
    for sneaky in [
        "SELECT 1; INSERT INTO blobs (v) VALUES ('x')",
        "DELETE FROM blobs WHERE 0; INSERT INTO blobs (v) VALUES ('x')",
    ] {
        let refused = sql(&node, "small.test", json!([{"execute": sneaky}])).await;
        assert!(
            refused["results"][0]["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("storage quota exceeded"),
            "{sneaky}: {refused}"
        );
    }
    // Reads and deletes keep working.
    let count = sql(
        &node,
        "small.test",
        json!([{"query": "SELECT count(*) FROM blobs"}]),
    )
    .await;
    assert_eq!(count["results"][0]["rows"][0][0], small as i64, "{count}");
    let deleted = sql(
        &node,
        "small.test",
        json!([{"execute": "DELETE FROM blobs"}]),
    )
    .await;
    assert!(deleted["results"][0]["error"].is_null(), "{deleted}");
    let status = node.admin("GET", "/v1/tenants/small", None).await.json();
    assert!(
        status["usage"]["storage_bytes"].as_u64().unwrap() > 1 << 20,
        "{status}"
    );
    assert!(
        status["usage"]["rejections"]["max_storage"]
            .as_u64()
            .unwrap()
            >= 1,
        "{status}"
    );
}

const NOISY: &str = r#"
[tenants.noisy]
hosts = ["noisy.test"]
quota = { max_instances = 6, max_memory = "200MiB" }

[tenants.quiet]
hosts = ["quiet.test"]

[components.loops]
tenant = "noisy"
source = "{wasm:probe}"
routes = ["/"]
limits = { deadline = "1s", memory = "48MiB" }

[components.hello]
tenant = "quiet"
source = "{wasm:hello}"
routes = ["/"]
"#;

#[tokio::test]
async fn a_noisy_tenant_leaves_a_quiet_one_without_errors() {
    let node = TestNode::start(NOISY).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The noisy tenant keeps its quota full of guests that loop to their deadline or
    // grow their memory to the limit.
    let mut noise = Vec::new();
    for i in 0..8 {
        let (url, stop) = (
            node.url(if i % 2 == 0 { "/loop" } else { "/grow" }),
            stop.clone(),
        );
        noise.push(tokio::spawn(async move {
            let client = reqwest_like::Client::new();
            let mut answered = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                answered.push(client.get(&url, "noisy.test").await);
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut quiet = Vec::new();
    for _ in 0..150 {
        quiet.push(get(&node, "quiet.test", "/").await.status);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut noisy_statuses = Vec::new();
    for task in noise {
        noisy_statuses.extend(task.await.unwrap());
    }
    assert!(
        quiet.iter().all(|s| *s == 200),
        "the quiet tenant saw {quiet:?}"
    );
    // The noise was real: deadlines, memory kills and refusals at the quota.
    assert!(noisy_statuses.contains(&504), "{noisy_statuses:?}");
    assert!(
        noisy_statuses.iter().any(|s| *s == 500 || *s == 503),
        "{noisy_statuses:?}"
    );
}

/// A small HTTP client of its own per noisy task (the node's test client is shared).
mod reqwest_like {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client as Hyper;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    pub struct Client(Hyper<HttpConnector, Full<Bytes>>);

    impl Client {
        pub fn new() -> Self {
            Self(Hyper::builder(TokioExecutor::new()).build_http())
        }

        /// The status of a GET to `url` with `host`; 0 when the request failed.
        pub async fn get(&self, url: &str, host: &str) -> u16 {
            let request = http::Request::get(url)
                .header("host", host)
                .body(Full::new(Bytes::new()))
                .unwrap();
            match self.0.request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let _ = response.into_body().collect().await;
                    status
                }
                Err(_) => 0,
            }
        }
    }
}

const ONE_CPU_TURN: &str = r#"
[tenants.busy]
hosts = ["busy.test"]
quota = { cpu_threads = 1 }

[components.probe]
tenant = "busy"
source = "{wasm:probe}"
routes = ["/"]
limits = { deadline = "20s" }
"#;

/// A guest that ran long enough to take its tenant's only CPU turn and then sleeps in the
/// host does not keep the turn: a sibling that computes past several ticks finishes while
/// the sleeper still sleeps. A turn kept while waiting would hold the sibling at its first
/// tick until the sleeper's instance ended.
#[tokio::test]
async fn a_guest_waiting_in_the_host_gives_up_its_cpu_turn() {
    let node = TestNode::start(ONE_CPU_TURN).await;
    let finished = std::sync::Mutex::new(Vec::new());
    let sleeper = async {
        let answer = get(&node, "busy.test", "/sleep?spin=30000000&ms=4000").await;
        finished.lock().unwrap().push("sleeper");
        answer
    };
    let sibling = async {
        // The sleeper is past its computation by then, waiting in the host.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let answer = get(&node, "busy.test", "/sleep?spin=30000000&ms=0").await;
        finished.lock().unwrap().push("sibling");
        answer
    };
    let (sleeper, sibling) = tokio::join!(sleeper, sibling);
    assert_eq!(sleeper.status, 200, "{}", sleeper.body);
    assert_eq!(sibling.status, 200, "{}", sibling.body);
    assert_eq!(*finished.lock().unwrap(), ["sibling", "sleeper"]);
}

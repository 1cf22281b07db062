//! The admin API's OpenAPI document (`docs/admin-api.openapi.json`) against a real node:
//! every documented operation is called, succeeding and failing (no or a wrong token,
//! unknown tenants and components, bad JSON, invalid entries and canaries, uploads that are
//! not components, lack an import, have the wrong digest or are over the size limit,
//! conflicts), and every answer has a status the document lists for its operation, a body
//! exactly when the document gives one, in the documented media type and accepted by the
//! documented schema. A path the API does not have answers the documented error body.

use crate::common;

use std::path::Path;

use bytes::Bytes;
use common::openapi::{self, Exchange};
use common::{ADMIN_TOKEN, TestNode, wasm};
use serde_json::{Value, json};

/// One HTTP component, `svc`, serving `hello` at /svc; uploads are limited to 600 KiB.
const MANIFEST: &str = r#"
[node]
max_component_size = "600KiB"

[components.svc]
source = "{wasm:hello}"
routes = ["/svc"]
"#;

const COMPONENTS: &str = "/v1/tenants/default/components";
const SVC: &str = "/v1/tenants/default/components/svc";
/// A component created through the API.
const EXTRA: &str = "/v1/tenants/default/components/extra";
/// A component that does not exist.
const NOBODY: &str = "/v1/tenants/default/components/nobody";
const NO_SUCH_VERSION: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn bytes_of(fixture: &str) -> Option<Bytes> {
    Some(Bytes::from(std::fs::read(wasm(fixture)).unwrap()))
}

fn json_body(value: Value) -> Option<Bytes> {
    Some(Bytes::from(value.to_string()))
}

/// A node and an admin client that keeps every exchange for the document check.
struct Admin {
    node: TestNode,
    exchanges: Vec<Exchange>,
}

impl Admin {
    /// Calls the admin API with exactly `headers` and keeps the exchange; returns the
    /// answer and its body as kept (JSON, text, or `null` when empty).
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> (common::Response, Value) {
        let response = self.node.admin_with(method, path, body, headers).await;
        let exchange = Exchange::new(method, path, &response)
            .unwrap_or_else(|e| panic!("{e}\nnode log:\n{}", self.node.log()));
        let kept = exchange.body.clone();
        self.exchanges.push(exchange);
        (response, kept)
    }

    /// Calls with the node's token and `extra` headers, expects `status`, and returns
    /// the body.
    async fn expect_with(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        extra: &[(&str, &str)],
        status: u16,
    ) -> Value {
        let bearer = format!("Bearer {ADMIN_TOKEN}");
        let mut headers = vec![("authorization", bearer.as_str())];
        headers.extend_from_slice(extra);
        let (response, value) = self.send(method, path, body, &headers).await;
        assert_eq!(
            response.status, status,
            "{method} {path}: {}",
            response.body
        );
        value
    }

    async fn expect(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        status: u16,
    ) -> Value {
        self.expect_with(method, path, body, &[], status).await
    }

    /// Expects a refusal with `status` and error `code`; returns the error body.
    async fn refused_with(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        extra: &[(&str, &str)],
        status: u16,
        code: &str,
    ) -> Value {
        let error = self.expect_with(method, path, body, extra, status).await;
        assert_eq!(error["error"], code, "{method} {path}: {error}");
        error
    }

    async fn refused(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        status: u16,
        code: &str,
    ) -> Value {
        self.refused_with(method, path, body, &[], status, code)
            .await
    }
}

#[tokio::test]
async fn the_openapi_document_matches_the_real_answers() {
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("docs/admin-api.openapi.json")).unwrap(),
    )
    .expect("admin-api.openapi.json is JSON");
    let mut admin = Admin {
        node: TestNode::start(MANIFEST).await,
        exchanges: Vec::new(),
    };
    let versions = format!("{SVC}/versions");
    let activate = format!("{SVC}/activate");
    let canary = format!("{SVC}/canary");
    let promote = format!("{SVC}/canary/promote");

    // Without the node's token, every operation is refused, and says how to authenticate.
    for (method, template) in openapi::operations(&spec) {
        let path = template
            .replace("{tenant}", "default")
            .replace("{component}", "svc")
            .replace("{token}", "none");
        for headers in [vec![], vec![("authorization", "Bearer wrong")]] {
            let (response, error) = admin.send(&method, &path, None, &headers).await;
            assert_eq!(response.status, 401, "{method} {path} with {headers:?}");
            assert_eq!(error["error"], "unauthorized");
            assert_eq!(response.headers["www-authenticate"], "Bearer");
        }
    }

    // The node, its metrics, a tenant's components, one component.
    let status = admin.expect("GET", "/v1/status", None, 200).await;
    assert_eq!(status["ready"], true);
    assert_eq!(status["components"][0]["component"], "svc");
    let metrics = admin.expect("GET", "/metrics", None, 200).await;
    assert!(
        metrics.as_str().is_some_and(|text| text.contains("# EOF")),
        "OpenMetrics text: {metrics}"
    );
    admin.expect("GET", COMPONENTS, None, 200).await;
    admin
        .refused(
            "GET",
            "/v1/tenants/nobody/components",
            None,
            404,
            "unknown_tenant",
        )
        .await;
    let svc = admin.expect("GET", SVC, None, 200).await;
    assert_eq!(svc["origin"], "manifest");
    let hello = svc["active"]["version"].as_str().unwrap().to_string();
    admin.refused("GET", NOBODY, None, 404, "not_found").await;
    admin
        .refused(
            "GET",
            "/v1/tenants/nobody/components/svc",
            None,
            404,
            "not_found",
        )
        .await;

    // A component created through the API awaits its first version, then serves.
    let created = admin
        .expect(
            "PUT",
            EXTRA,
            json_body(json!({"routes": ["/extra"], "config": {"GREETING": "hi"}})),
            201,
        )
        .await;
    assert_eq!(created["state"], "awaiting_version");
    admin.expect("GET", EXTRA, None, 200).await;
    let status = admin.expect("GET", "/v1/status", None, 200).await;
    assert_eq!(status["pending"][0]["component"], "extra");
    let listed = admin.expect("GET", COMPONENTS, None, 200).await;
    assert_eq!(
        listed["components"].as_array().unwrap().len(),
        2,
        "{listed}"
    );
    let first = admin
        .expect("POST", &format!("{EXTRA}/versions"), bytes_of("hello"), 201)
        .await;
    assert_eq!(first["state"], "active", "a first version is activated");
    assert_eq!(admin.expect("GET", EXTRA, None, 200).await["origin"], "api");
    admin
        .refused(
            "POST",
            &format!("{EXTRA}/rollback"),
            None,
            409,
            "no_previous_version",
        )
        .await;

    // Entries that are not JSON, not an entry, invalid, for an unknown tenant, or that
    // the running code cannot serve.
    admin
        .refused(
            "PUT",
            EXTRA,
            Some(Bytes::from_static(b"{\"routes\": ")),
            400,
            "bad_json",
        )
        .await;
    let unknown_field = admin
        .refused(
            "PUT",
            EXTRA,
            json_body(json!({"rutes": ["/x"]})),
            400,
            "bad_json",
        )
        .await;
    assert!(unknown_field["problems"].is_array(), "{unknown_field}");
    let invalid = admin
        .refused(
            "PUT",
            "/v1/tenants/default/components/bad",
            json_body(json!({"routes": ["bad"], "limits": {"deadline": "0s"}})),
            422,
            "invalid_entry",
        )
        .await;
    let fields: Vec<&str> = invalid["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["field"].as_str().unwrap())
        .collect();
    assert!(fields.contains(&"components.bad.routes[0]"), "{fields:?}");
    assert!(
        fields.contains(&"components.bad.limits.deadline"),
        "{fields:?}"
    );
    admin
        .refused(
            "PUT",
            "/v1/tenants/nobody/components/extra",
            json_body(json!({})),
            404,
            "unknown_tenant",
        )
        .await;
    admin
        .refused(
            "PUT",
            SVC,
            json_body(json!({"routes": ["/svc"], "subscriptions": ["events.>"]})),
            422,
            "missing_export",
        )
        .await;

    // Uploads: kept for later, then activated with its digest checked.
    let kept = admin
        .expect("POST", &versions, bytes_of("hello-wstd"), 201)
        .await;
    assert_eq!(kept["state"], "uploaded");
    let wstd = kept["version"].as_str().unwrap().to_string();
    let activated = admin
        .expect_with(
            "POST",
            &format!("{versions}?activate=true"),
            bytes_of("hello-wstd"),
            &[("x-trellis-digest", wstd.as_str())],
            201,
        )
        .await;
    assert_eq!(activated["state"], "active");

    // Uploads refused, each with its reason.
    admin
        .refused_with(
            "POST",
            &versions,
            bytes_of("hello-wstd"),
            &[("x-trellis-digest", NO_SUCH_VERSION)],
            400,
            "digest_mismatch",
        )
        .await;
    admin
        .refused(
            "POST",
            &versions,
            Some(Bytes::from_static(b"not a component")),
            400,
            "invalid_component",
        )
        .await;
    admin
        .refused(
            "POST",
            &versions,
            Some(Bytes::from_static(b"\0asm\x01\x00\x00\x00")),
            400,
            "core_module",
        )
        .await;
    admin
        .refused("POST", &versions, None, 400, "empty_upload")
        .await;
    admin
        .refused(
            "POST",
            &format!("{versions}?canary=lots"),
            Some(Bytes::from_static(b"refused before it is read")),
            400,
            "bad_query",
        )
        .await;
    admin
        .refused(
            "POST",
            &versions,
            Some(Bytes::from(vec![0u8; 700 << 10])),
            413,
            "too_large",
        )
        .await;
    admin
        .refused(
            "POST",
            &versions,
            bytes_of("needs-missing"),
            422,
            "missing_import",
        )
        .await;
    admin
        .refused(
            "POST",
            &format!("{versions}?canary=0"),
            bytes_of("probe"),
            422,
            "invalid_canary",
        )
        .await;
    admin
        .refused(
            "POST",
            &format!("{versions}?canary=20"),
            bytes_of("hello-wstd"),
            409,
            "already_active",
        )
        .await;
    admin
        .refused(
            "POST",
            &format!("{NOBODY}/versions"),
            bytes_of("hello"),
            404,
            "not_found",
        )
        .await;

    // Activating by digest, and rolling back.
    let back = admin
        .expect("POST", &activate, json_body(json!({"version": hello})), 200)
        .await;
    assert_eq!(back["active"]["version"], hello.as_str());
    assert_eq!(back["previous"]["version"], wstd.as_str());
    admin
        .refused(
            "POST",
            &activate,
            Some(Bytes::from_static(b"{\"version\": 7}")),
            400,
            "bad_json",
        )
        .await;
    admin
        .refused(
            "POST",
            &activate,
            json_body(json!({"version": "latest"})),
            400,
            "bad_version",
        )
        .await;
    admin
        .refused(
            "POST",
            &activate,
            json_body(json!({"version": NO_SUCH_VERSION})),
            404,
            "unknown_version",
        )
        .await;
    admin
        .refused(
            "POST",
            &format!("{NOBODY}/activate"),
            json_body(json!({"version": hello})),
            404,
            "not_found",
        )
        .await;
    let rolled_back = admin
        .expect("POST", &format!("{SVC}/rollback"), None, 200)
        .await;
    assert_eq!(rolled_back["active"]["version"], wstd.as_str());
    admin
        .refused(
            "POST",
            &format!("{NOBODY}/rollback"),
            None,
            404,
            "not_found",
        )
        .await;

    // A canary started by digest, refused changes while it runs, then promoted.
    let started = admin
        .expect(
            "POST",
            &canary,
            json_body(json!({
                "version": hello,
                "weight": 20,
                "sticky_header": "x-user",
                "window": "1m",
                "promote_after": "1h",
            })),
            200,
        )
        .await;
    assert_eq!(started["canary"]["version"], hello.as_str());
    assert_eq!(started["canary"]["policy"]["window"], "1m");
    // (method, path, body, status, error code) refused while the canary runs.
    let nobody_canary = format!("{NOBODY}/canary");
    let refusals = [
        (
            "PUT",
            SVC,
            json!({"routes": ["/svc", "/svc-v2"]}),
            409,
            "canary_running",
        ),
        (
            "POST",
            canary.as_str(),
            json!({"version": wstd, "weight": 20}),
            409,
            "already_active",
        ),
        (
            "POST",
            canary.as_str(),
            json!({"version": hello, "weight": 100}),
            422,
            "invalid_canary",
        ),
        (
            "POST",
            canary.as_str(),
            json!({"weight": 20}),
            400,
            "bad_json",
        ),
        (
            "POST",
            nobody_canary.as_str(),
            json!({"version": hello, "weight": 20}),
            404,
            "not_found",
        ),
    ];
    for (method, path, body, status, code) in refusals {
        admin
            .refused(method, path, json_body(body), status, code)
            .await;
    }
    let promoted = admin.expect("POST", &promote, None, 200).await;
    assert_eq!(promoted["active"]["version"], hello.as_str());
    assert!(promoted["canary"].is_null(), "{promoted}");
    admin
        .refused("POST", &promote, None, 409, "no_canary")
        .await;
    admin
        .refused(
            "POST",
            &format!("{NOBODY}/canary/promote"),
            None,
            404,
            "not_found",
        )
        .await;

    // A canary started by an upload, with its policy in the query, then aborted.
    let candidate = admin
        .expect(
            "POST",
            &format!(
                "{versions}?canary=10&sticky_cookie=user&window=2m&max_failure_rate=0.5&min_requests=5"
            ),
            bytes_of("probe"),
            201,
        )
        .await;
    assert_eq!(candidate["state"], "canary");
    let running = admin.expect("GET", SVC, None, 200).await;
    assert_eq!(running["canary"]["policy"]["sticky_cookie"], "user");
    assert_eq!(running["canary"]["policy"]["min_requests"], 5);
    let aborted = admin.expect("DELETE", &canary, None, 200).await;
    assert!(aborted["canary"].is_null(), "{aborted}");
    assert_eq!(aborted["active"]["version"], hello.as_str());
    admin
        .refused("DELETE", &canary, None, 409, "no_canary")
        .await;
    admin
        .refused(
            "DELETE",
            &format!("{NOBODY}/canary"),
            None,
            404,
            "not_found",
        )
        .await;

    // A new entry for a running component is a new version of its code.
    let changed = admin
        .expect(
            "PUT",
            SVC,
            json_body(json!({"routes": ["/svc"], "config": {"ROUND": "1"}})),
            200,
        )
        .await;
    assert_eq!(changed["spec"]["config"]["ROUND"], "1");
    assert_eq!(changed["active"]["version"], hello.as_str());

    // Deleting: not a manifest component; an API one, deployed or still awaiting code.
    admin
        .refused("DELETE", SVC, None, 409, "declared_in_manifest")
        .await;
    admin.expect("DELETE", EXTRA, None, 204).await;
    admin.refused("DELETE", EXTRA, None, 404, "not_found").await;
    let later = "/v1/tenants/default/components/later";
    admin.expect("PUT", later, json_body(json!({})), 201).await;
    admin.expect("DELETE", later, None, 204).await;

    // Tenants: created, changed, refused, listed; a token issued, used and revoked; the
    // tenant removed.
    let acme = "/v1/tenants/acme";
    let acme_tokens = format!("{acme}/tokens");
    admin
        .refused("GET", acme, None, 404, "unknown_tenant")
        .await;
    let created = admin
        .expect(
            "PUT",
            acme,
            json_body(json!({
                "hosts": ["acme.test"],
                "config": {"REGION": "eu"},
                "quota": {"max_instances": 4, "max_memory": "64MiB", "max_deadline": "30s"}
            })),
            201,
        )
        .await;
    assert_eq!(created["effective_quota"]["max_memory"], 64 << 20);
    admin
        .expect(
            "PUT",
            acme,
            json_body(json!({"hosts": ["acme.test"], "quota": {"requests_per_second": 100}})),
            200,
        )
        .await;
    let clash = admin
        .refused(
            "PUT",
            acme,
            json_body(json!({"hosts": ["*"]})),
            422,
            "invalid_tenant",
        )
        .await;
    assert_eq!(clash["problems"][0]["field"], "tenants.acme.hosts[0]");
    admin
        .refused(
            "PUT",
            acme,
            json_body(json!({"hosts": "acme.test"})),
            400,
            "bad_json",
        )
        .await;
    let tenants = admin.expect("GET", "/v1/tenants", None, 200).await;
    assert_eq!(tenants["tenants"].as_array().unwrap().len(), 2, "{tenants}");
    admin.expect("GET", "/v1/tenants/default", None, 200).await;
    let issued = admin
        .expect("POST", &acme_tokens, json_body(json!({"label": "ci"})), 201)
        .await;
    admin.expect("POST", &acme_tokens, None, 201).await;
    let listed = admin.expect("GET", &acme_tokens, None, 200).await;
    assert_eq!(listed["tokens"].as_array().unwrap().len(), 2, "{listed}");
    admin
        .refused(
            "GET",
            "/v1/tenants/nobody/tokens",
            None,
            404,
            "unknown_tenant",
        )
        .await;
    admin
        .refused(
            "POST",
            "/v1/tenants/nobody/tokens",
            None,
            404,
            "unknown_tenant",
        )
        .await;
    let bearer = format!("Bearer {}", issued["token"].as_str().unwrap());
    let as_acme = [("authorization", bearer.as_str())];
    let (own, _) = admin.send("GET", acme, None, &as_acme).await;
    assert_eq!(own.status, 200, "{}", own.body);
    let (metrics, _) = admin.send("GET", "/metrics", None, &as_acme).await;
    assert_eq!(metrics.status, 200);
    assert!(
        !metrics.body.contains(r#"tenant="default""#),
        "{}",
        metrics.body
    );
    for (method, path) in [
        ("GET", "/v1/status"),
        ("GET", "/v1/tenants/default"),
        ("GET", COMPONENTS),
    ] {
        let (refused, error) = admin.send(method, path, None, &as_acme).await;
        assert_eq!(refused.status, 403, "{method} {path}");
        assert_eq!(error["error"], "forbidden");
    }
    admin
        .refused(
            "DELETE",
            &format!("{acme_tokens}/nope"),
            None,
            404,
            "unknown_token",
        )
        .await;
    let id = issued["id"].as_str().unwrap();
    admin
        .expect("DELETE", &format!("{acme_tokens}/{id}"), None, 204)
        .await;
    let (revoked, _) = admin.send("GET", acme, None, &as_acme).await;
    assert_eq!(revoked.status, 401);
    admin
        .refused(
            "DELETE",
            "/v1/tenants/default",
            None,
            409,
            "declared_in_manifest",
        )
        .await;
    admin
        .refused(
            "DELETE",
            &format!("{acme}?data=maybe"),
            None,
            400,
            "bad_query",
        )
        .await;
    admin.expect("DELETE", acme, None, 204).await;
    admin
        .refused("DELETE", acme, None, 404, "unknown_tenant")
        .await;

    // The history of all this, as the status document tells it.
    let history = admin.expect("GET", SVC, None, 200).await;
    assert!(
        history["events"].as_array().unwrap().len() >= 6,
        "{history}"
    );

    // A path the API does not have: 404 with the documented error body (not an exchange
    // of the document, so not kept for the check).
    let bogus = format!("{SVC}/bogus");
    for (method, path) in [
        ("GET", "/v1/nothing"),
        ("POST", bogus.as_str()),
        ("GET", canary.as_str()),
    ] {
        let response = admin.node.admin(method, path, None).await;
        assert_eq!(response.status, 404, "{method} {path}: {}", response.body);
        let error = response.json();
        assert_eq!(error["error"], "not_found", "{method} {path}: {error}");
        let violations = openapi::validate(
            &spec,
            &json!({"$ref": "#/components/schemas/Error"}),
            &error,
        );
        assert!(violations.is_empty(), "{method} {path}: {violations:?}");
    }

    let problems = openapi::check(&spec, &admin.exchanges);
    assert!(
        problems.is_empty(),
        "{} mismatches:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

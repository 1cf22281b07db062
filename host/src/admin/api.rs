//! The admin API's endpoints. Every path names the tenant (and component) it changes.
//! The operator token may call every one; a tenant token only those marked T, for its
//! own tenant (anything else answers 403 `forbidden`):
//!
//! | method and path | does |
//! |---|---|
//! | `GET /metrics` | Prometheus metrics (T: the tenant's series only) |
//! | `GET /v1/status` | the node and every component |
//! | `GET /v1/tenants` | every tenant, its quota and usage |
//! | `GET /v1/tenants/T` | one tenant (T) |
//! | `PUT /v1/tenants/T` | create a tenant or change it (JSON: hosts, config, quota) |
//! | `DELETE /v1/tenants/T?data=keep\|delete` | remove it, keeping (default) or deleting its data |
//! | `GET /v1/tenants/T/tokens` | its tokens (ids only) |
//! | `POST /v1/tenants/T/tokens` | issue a token (shown once) |
//! | `DELETE /v1/tenants/T/tokens/ID` | revoke one |
//!
//! and, all T:
//!
//! | method and path | does |
//! |---|---|
//! | `GET /v1/tenants/T/components` | the tenant's components |
//! | `GET /v1/tenants/T/components/C` | one component: versions, canary, history |
//! | `PUT /v1/tenants/T/components/C` | create it (JSON entry), or change its entry |
//! | `DELETE /v1/tenants/T/components/C` | delete a component created here |
//! | `POST /v1/tenants/T/components/C/versions` | upload code (raw bytes, or `?source=oci://...`) |
//! | `POST /v1/tenants/T/components/C/activate` | make a version active |
//! | `POST /v1/tenants/T/components/C/rollback` | back to the previous version |
//! | `POST /v1/tenants/T/components/C/canary` | start a canary |
//! | `POST /v1/tenants/T/components/C/canary/promote` | promote it |
//! | `DELETE /v1/tenants/T/components/C/canary` | abort it |

use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::admin::Caller;
use crate::capabilities::outbound::ResponseBody;
use crate::deploy::canary::CanaryPolicy;
use crate::deploy::oci::Puller;
use crate::deploy::registry::{DeployError, Registry, UploadAction};
use crate::deploy::tenants::TenantData;
use crate::manifest::{ComponentSpec, TenantSpec};
use crate::runtime::invoke::{full, json};
use crate::tenancy::Tenant;

/// Largest JSON body the API reads.
const MAX_JSON: usize = 1 << 20;

pub async fn handle(
    registry: &Registry,
    caller: &Caller,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let path = request.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method().clone();
    if let Err(e) = allowed(caller, &method, &segments) {
        return deploy_error(&e);
    }
    let result = route(registry, caller, &method, &path, &segments, request).await;
    result.unwrap_or_else(|e| deploy_error(&e))
}

async fn route(
    registry: &Registry,
    caller: &Caller,
    method: &Method,
    path: &str,
    segments: &[&str],
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, DeployError> {
    match (method, segments) {
        (&Method::GET, ["metrics"]) => Ok(metrics(registry, caller)),
        (&Method::GET, ["v1", "status"]) => Ok(status(registry)),
        (&Method::GET, ["v1", "tenants"]) => Ok(json(
            StatusCode::OK,
            serde_json::json!({"tenants": registry.tenants.all().iter().map(|t| tenant_status(registry, t)).collect::<Vec<_>>()}),
        )),
        (&Method::GET, ["v1", "tenants", tenant]) => registry
            .tenants
            .get(tenant)
            .map(|t| json(StatusCode::OK, tenant_status(registry, &t)))
            .ok_or_else(|| DeployError::unknown_tenant(tenant)),
        (&Method::PUT, ["v1", "tenants", tenant]) => {
            let tenant = tenant.to_string();
            let spec: TenantSpec = read_json(request).await?;
            let (t, created) = registry.put_tenant(&tenant, spec).await?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json(status, tenant_status(registry, &t)))
        }
        (&Method::DELETE, ["v1", "tenants", tenant]) => {
            let params = form_pairs(request.uri().query().unwrap_or_default());
            let data = match param(&params, "data") {
                None | Some("keep") => TenantData::Keep,
                Some("delete") => TenantData::Delete,
                Some(other) => {
                    return Err(DeployError::new(
                        400,
                        "bad_query",
                        format!("data={other:?}: say keep or delete"),
                    ));
                }
            };
            registry
                .remove_tenant(tenant, data)
                .await
                .map(|()| no_content())
        }
        (&Method::GET, ["v1", "tenants", tenant, "tokens"]) => {
            if registry.tenant_exists(tenant) {
                Ok(json(
                    StatusCode::OK,
                    serde_json::json!({"tokens": registry.tokens.of(tenant).iter().map(|r| serde_json::json!({"id": r.id, "created_at": r.created_at, "label": r.label})).collect::<Vec<_>>()}),
                ))
            } else {
                Err(DeployError::unknown_tenant(tenant))
            }
        }
        (&Method::POST, ["v1", "tenants", tenant, "tokens"]) => {
            let tenant = tenant.to_string();
            let body: TokenBody = read_json_or_empty(request).await?;
            let (token, record) = registry.issue_token(&tenant, body.label).await?;
            Ok(json(
                StatusCode::CREATED,
                serde_json::json!({
                    "tenant": tenant,
                    "id": record.id,
                    "token": token,
                    "created_at": record.created_at,
                    "label": record.label,
                }),
            ))
        }
        (&Method::DELETE, ["v1", "tenants", tenant, "tokens", id]) => registry
            .revoke_token(tenant, id)
            .await
            .map(|()| no_content()),
        (&Method::GET, ["v1", "tenants", tenant, "components"]) => list(registry, tenant),
        (_, ["v1", "tenants", tenant, "components", name, rest @ ..]) => {
            let (tenant, name) = (tenant.to_string(), name.to_string());
            component(registry, caller, method, &tenant, &name, rest, request).await
        }
        _ => Err(DeployError::new(
            404,
            "not_found",
            format!("no admin endpoint {method} {path}"),
        )),
    }
}

/// Whether `caller` may make this call: a tenant token only on its own tenant's
/// components, its own tenant's status and the metrics (scoped to it).
fn allowed(caller: &Caller, method: &Method, segments: &[&str]) -> Result<(), DeployError> {
    let Caller::Tenant(own) = caller else {
        return Ok(());
    };
    let permitted = match (method, segments) {
        (&Method::GET, ["metrics"]) => true,
        (&Method::GET, ["v1", "tenants", tenant]) => tenant == own,
        (_, ["v1", "tenants", tenant, "components", ..]) => tenant == own,
        _ => false,
    };
    if permitted {
        Ok(())
    } else {
        Err(DeployError::new(
            403,
            "forbidden",
            format!(
                "this token manages tenant {own:?} only; that call needs the operator's token or the other tenant's"
            ),
        ))
    }
}

fn no_content() -> Response<ResponseBody> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

fn tenant_status(registry: &Registry, tenant: &Tenant) -> serde_json::Value {
    let mut status = tenant.status();
    let slots: Vec<_> = registry
        .slots()
        .into_iter()
        .filter(|s| s.tenant == tenant.name)
        .collect();
    let code_bytes: u64 = slots.iter().map(|s| s.code_size()).sum();
    let mut components: Vec<String> = slots.iter().map(|s| s.name.to_string()).collect();
    components.extend(
        registry
            .pending()
            .into_iter()
            .filter(|(t, _, _)| *t == *tenant.name)
            .map(|(_, n, _)| n),
    );
    status["usage"]["components"] = components.len().into();
    status["usage"]["code_bytes"] = code_bytes.into();
    status["components"] = components.into();
    status
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    #[serde(default)]
    label: Option<String>,
}

async fn read_json_or_empty<T: serde::de::DeserializeOwned + Default>(
    request: Request<Incoming>,
) -> Result<T, DeployError> {
    let bytes = read_body(request).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_json(&bytes)
}

/// What only the operator may grant: host directories and migration folders (paths on
/// the node's machine), and outbound calls to the node's own machine or private networks
/// by address. A tenant token's entries are refused for them (403).
fn tenant_may_grant(spec: &ComponentSpec) -> Result<(), DeployError> {
    let forbidden = |what: String| {
        Err(DeployError::new(
            403,
            "forbidden",
            format!("{what}: only the operator's token may grant that"),
        ))
    };
    if !spec.dirs.is_empty() {
        return forbidden("dirs names directories of the node's machine".into());
    }
    if spec.migrations.is_some() {
        return forbidden("migrations names a directory of the node's machine".into());
    }
    for host in &spec.outbound {
        let private = is_private_host(host);
        if private {
            return forbidden(format!(
                "outbound {host:?} is the node's own machine or a private network"
            ));
        }
    }
    Ok(())
}

/// Whether `host` (`NAME[:PORT]`) is the node's own machine or a private network, by
/// address or by a `localhost` name.
fn is_private_host(host: &str) -> bool {
    let name = host
        .rsplit_once(':')
        .filter(|(_, port)| port.parse::<u16>().is_ok())
        .map_or(host, |(name, _)| name)
        .trim_start_matches('[')
        .trim_end_matches(']');
    match name.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_unique_local()
                || ip.is_unicast_link_local()
        }
        Err(_) => name.eq_ignore_ascii_case("localhost") || name.ends_with(".localhost"),
    }
}

async fn component(
    registry: &Registry,
    caller: &Caller,
    method: &Method,
    tenant: &str,
    name: &str,
    rest: &[&str],
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, DeployError> {
    match (method, rest) {
        (&Method::GET, []) => component_status(registry, tenant, name),
        (&Method::PUT, []) => {
            let params = form_pairs(request.uri().query().unwrap_or_default());
            let version = param(&params, "version").map(str::to_string);
            let action = action_from(&params, UploadAction::Activate)?;
            let spec: ComponentSpec = read_json(request).await?;
            if matches!(caller, Caller::Tenant(_)) {
                tenant_may_grant(&spec)?;
            }
            let created = registry
                .put_spec(tenant, name, spec, version.as_deref(), action)
                .await?;
            let mut response = component_status(registry, tenant, name)?;
            if created {
                *response.status_mut() = StatusCode::CREATED;
            }
            Ok(response)
        }
        (&Method::DELETE, []) => {
            registry.delete(tenant, name).await?;
            Ok(no_content())
        }
        (&Method::POST, ["versions"]) => upload(registry, caller, tenant, name, request).await,
        (&Method::POST, ["activate"]) => {
            let body: VersionBody = read_json(request).await?;
            registry.activate(tenant, name, &body.version).await?;
            component_status(registry, tenant, name)
        }
        (&Method::POST, ["rollback"]) => {
            registry.rollback(tenant, name).await?;
            component_status(registry, tenant, name)
        }
        (&Method::POST, ["canary"]) => {
            let body: CanaryBody = read_json(request).await?;
            registry
                .start_canary(tenant, name, &body.version, body.policy)
                .await?;
            component_status(registry, tenant, name)
        }
        (&Method::POST, ["canary", "promote"]) => {
            registry.end_canary(tenant, name, true).await?;
            component_status(registry, tenant, name)
        }
        (&Method::DELETE, ["canary"]) => {
            registry.end_canary(tenant, name, false).await?;
            component_status(registry, tenant, name)
        }
        _ => Err(DeployError::new(
            404,
            "not_found",
            format!(
                "no admin endpoint {method} for a component with /{}",
                rest.join("/")
            ),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionBody {
    version: String,
}

/// `{"version": ..., ...the canary policy}`. Parsed in two steps because serde's flatten
/// would lose the policy's refusal of unknown fields.
struct CanaryBody {
    version: String,
    policy: CanaryPolicy,
}

impl<'de> Deserialize<'de> for CanaryBody {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut fields = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        let version = match fields.remove("version") {
            Some(serde_json::Value::String(version)) => version,
            Some(_) => return Err(D::Error::custom("version must be a string (sha256:...)")),
            None => return Err(D::Error::missing_field("version")),
        };
        let policy = CanaryPolicy::deserialize(serde_json::Value::Object(fields))
            .map_err(D::Error::custom)?;
        Ok(Self { version, policy })
    }
}

/// `POST .../versions`: the body is the component's bytes, or empty with
/// `source=oci://HOST/REPO:TAG` (or `@sha256:...`) to pull them. Query: `activate=true` to make
/// it active, or `canary=PERCENT` (with the other canary fields as query parameters) to
/// start a canary with it; neither keeps it for later. Header `x-trellis-digest` makes
/// the node verify the bytes.
async fn upload(
    registry: &Registry,
    caller: &Caller,
    tenant: &str,
    name: &str,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, DeployError> {
    let started = Instant::now();
    let params = form_pairs(request.uri().query().unwrap_or_default());
    let action = action_from(&params, UploadAction::Keep)?;
    let expected = request
        .headers()
        .get("x-trellis-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // `?source=oci://...`: the node pulls the code from a registry; the body is empty.
    let (bytes, pulled) = match param(&params, "source") {
        Some(reference) => {
            let puller = match caller {
                Caller::Tenant(tenant) => Puller::Tenant(tenant),
                Caller::Operator => Puller::Operator,
            };
            let pulled = registry.pull(reference, puller).await?;
            let origin = serde_json::json!({
                "source": reference,
                "manifest": pulled.manifest,
                "from_cache": pulled.from_cache,
            });
            (pulled.bytes, Some(origin))
        }
        None => (read_upload(registry, request).await?, None),
    };
    let size = bytes.len();
    let uploaded = registry
        .upload(tenant, name, bytes, expected.as_deref(), action)
        .await?;
    let mut answer = serde_json::json!({
        "tenant": tenant,
        "component": name,
        "version": uploaded.digest,
        "size": size,
        "state": uploaded.state,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    });
    if let Some(seq) = uploaded.seq {
        answer["seq"] = seq.into();
    }
    if let (Some(answer), Some(serde_json::Value::Object(origin))) =
        (answer.as_object_mut(), pulled)
    {
        answer.extend(origin);
    }
    let mut response = json(StatusCode::CREATED, answer);
    response.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&format!("/v1/tenants/{tenant}/components/{name}"))
            .expect("names are header-safe"),
    );
    Ok(response)
}

/// An upload's body: the component's bytes, up to `node.max_component_size`.
async fn read_upload(
    registry: &Registry,
    request: Request<Incoming>,
) -> Result<Vec<u8>, DeployError> {
    let limit = registry.node().max_component_size.as_u64() as usize;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        // Refused unread: the connection closes (see `deploy_error`).
        return Err(too_large(registry));
    }
    let bytes = match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large(registry)),
        Err(e) => {
            return Err(DeployError::new(
                400,
                "bad_body",
                format!("reading the upload failed: {e}"),
            ));
        }
    };
    if bytes.is_empty() {
        return Err(DeployError::new(
            400,
            "empty_upload",
            "the body must be the component's .wasm bytes",
        ));
    }
    Ok(bytes.to_vec())
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// What to do with a version, from query parameters: `canary=PERCENT` (with the other
/// canary fields as parameters), `activate=true|false`, or `default`.
fn action_from(
    params: &[(String, String)],
    default: UploadAction,
) -> Result<UploadAction, DeployError> {
    if let Some(weight) = param(params, "canary") {
        let mut policy = serde_json::Map::new();
        let weight: u8 = weight.parse().map_err(|_| {
            DeployError::new(
                400,
                "bad_query",
                format!("canary={weight:?} is not a percentage (1-99)"),
            )
        })?;
        policy.insert("weight".into(), weight.into());
        for key in ["sticky_header", "sticky_cookie", "window", "promote_after"] {
            if let Some(value) = param(params, key) {
                policy.insert(key.into(), value.into());
            }
        }
        if let Some(value) = param(params, "max_failure_rate") {
            let rate: f64 = value.parse().map_err(|_| {
                DeployError::new(
                    400,
                    "bad_query",
                    format!("max_failure_rate={value:?} is not a number"),
                )
            })?;
            policy.insert("max_failure_rate".into(), rate.into());
        }
        if let Some(value) = param(params, "min_requests") {
            let count: u64 = value.parse().map_err(|_| {
                DeployError::new(
                    400,
                    "bad_query",
                    format!("min_requests={value:?} is not a whole number"),
                )
            })?;
            policy.insert("min_requests".into(), count.into());
        }
        let policy: CanaryPolicy = serde_json::from_value(serde_json::Value::Object(policy))
            .map_err(|e| DeployError::new(400, "bad_query", e.to_string()))?;
        return Ok(UploadAction::Canary(policy));
    }
    Ok(match param(params, "activate") {
        Some("true" | "1" | "yes") => UploadAction::Activate,
        Some("false" | "0" | "no") => UploadAction::Keep,
        _ => default,
    })
}

fn too_large(registry: &Registry) -> DeployError {
    DeployError::new(
        413,
        "too_large",
        format!(
            "the upload is larger than node.max_component_size ({})",
            registry.node().max_component_size
        ),
    )
}

fn form_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, DeployError> {
    match Limited::new(request.into_body(), MAX_JSON).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(DeployError::new(
            400,
            "bad_body",
            format!("reading the body failed: {e}"),
        )),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, DeployError> {
    parse_json(&read_body(request).await?)
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DeployError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let field = e.path().to_string();
        let mut error = DeployError::new(400, "bad_json", format!("{field}: {}", e.inner()));
        error.problems.push(crate::manifest::Problem {
            field,
            reason: e.inner().to_string(),
        });
        error
    })
}

fn deploy_error(e: &DeployError) -> Response<ResponseBody> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = serde_json::json!({"error": e.code, "message": e.message});
    if !e.problems.is_empty() {
        body["problems"] = e
            .problems
            .iter()
            .map(|p| serde_json::json!({"field": p.field, "reason": p.reason}))
            .collect();
    }
    if status.is_server_error() {
        tracing::error!(code = e.code, "admin API: {}", e.message);
    }
    let mut response = json(status, body);
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // What was left of the body is not read: the connection cannot be reused.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn metrics(registry: &Registry, caller: &Caller) -> Response<ResponseBody> {
    let text = match caller {
        Caller::Operator => registry.metrics.encode(),
        Caller::Tenant(tenant) => registry.metrics.encode_for_tenant(tenant),
    };
    let mut response = Response::new(full(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

fn status(registry: &Registry) -> Response<ResponseBody> {
    let components: Vec<serde_json::Value> = registry.slots().iter().map(|s| s.status()).collect();
    let pending: Vec<serde_json::Value> = registry
        .pending()
        .into_iter()
        .map(|(tenant, name, spec)| pending_status(&tenant, &name, &spec))
        .collect();
    json(
        StatusCode::OK,
        serde_json::json!({
            "ready": registry.is_ready(),
            "components": components,
            "pending": pending,
        }),
    )
}

fn list(registry: &Registry, tenant: &str) -> Result<Response<ResponseBody>, DeployError> {
    if !registry.tenant_exists(tenant) {
        return Err(DeployError::unknown_tenant(tenant));
    }
    let mut components: Vec<serde_json::Value> = registry
        .slots()
        .iter()
        .filter(|s| &*s.tenant == tenant)
        .map(|s| s.status())
        .collect();
    components.extend(
        registry
            .pending()
            .into_iter()
            .filter(|(t, _, _)| t == tenant)
            .map(|(t, n, spec)| pending_status(&t, &n, &spec)),
    );
    Ok(json(
        StatusCode::OK,
        serde_json::json!({"components": components}),
    ))
}

fn pending_status(tenant: &str, name: &str, spec: &ComponentSpec) -> serde_json::Value {
    serde_json::json!({
        "tenant": tenant,
        "component": name,
        "state": "awaiting_version",
        "origin": "api",
        "spec": spec,
    })
}

fn component_status(
    registry: &Registry,
    tenant: &str,
    name: &str,
) -> Result<Response<ResponseBody>, DeployError> {
    if let Some(slot) = registry.slot(tenant, name) {
        return Ok(json(StatusCode::OK, slot.status()));
    }
    registry
        .pending()
        .into_iter()
        .find(|(t, n, _)| t == tenant && n == name)
        .map(|(t, n, spec)| json(StatusCode::OK, pending_status(&t, &n, &spec)))
        .ok_or_else(|| {
            DeployError::new(
                404,
                "not_found",
                format!("tenant {tenant:?} has no component {name:?}"),
            )
        })
}

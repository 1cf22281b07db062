//! The `trellis.toml` manifest: what a node serves, for which tenants, with which limits
//! and grants. Parsing and validation live here; nothing else reads TOML.
//!
//! Every error names the file, the field (as a dotted path such as
//! `components.hello.limits.memory`) and the reason, and validation collects every
//! problem in one pass so that `trellis check` can report them all at once. Relative
//! paths in a manifest are relative to the manifest's own directory, so a manifest means
//! the same thing whatever directory the node is started from.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// The tenant every component belongs to when a manifest declares no tenants.
pub const DEFAULT_TENANT: &str = "default";

pub use crate::grammar::routes::RESERVED_PATHS;

/// The longest `limits.deadline` accepted: a day.
pub const MAX_DEADLINE: Duration = Duration::from_secs(24 * 60 * 60);
use crate::grammar::routes::{normalize_route, route_matches};
use crate::grammar::subjects::subject_problem;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub node: NodeSettings,
    /// Tenants by name. None declared means one `default` tenant serving every host.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantSpec>,
    /// Components by name (unique across the node).
    #[serde(default)]
    pub components: BTreeMap<String, ComponentSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSettings {
    /// Address the gateway listens on.
    pub listen: SocketAddr,
    /// Where the node keeps its state (compiled-code cache, later: databases).
    pub data_dir: PathBuf,
    /// Instances that may exist at once across the whole node (the pooling allocator's
    /// size); requests beyond it get 503.
    pub max_instances: u32,
    /// The largest memory limit any component may ask for; each pooled memory slot is
    /// sized to it.
    pub max_instance_memory: ByteSize,
    /// `postgres://` URL of the database components' data lives in; unset: SQLite files
    /// under `data_dir`.
    pub database_url: Option<String>,
    /// `nats://` URL of the NATS server messages go through; unset: the in-process bus.
    pub nats_url: Option<String>,
    /// Where compiled components are cached (default: `data_dir/compile-cache`); nodes
    /// on one machine may share it.
    pub cache_dir: Option<PathBuf>,
    /// Address of the admin API (deployments, status, metrics); never on the gateway.
    pub admin_listen: SocketAddr,
    /// Bearer token the admin API requires. Unset: `TRELLIS_ADMIN_TOKEN`, else a token the
    /// node generates once and keeps in `DATA_DIR/admin-token` (mode 0600).
    pub admin_token: Option<String>,
    /// Largest component the admin API accepts in an upload.
    pub max_component_size: ByteSize,
    /// The linear memory all live instances together may use; a growth past it is refused
    /// and the call answered 503. Unset: three quarters of the machine's memory.
    pub max_memory: Option<ByteSize>,
    /// How published events are stored and delivered.
    pub events: EventSettings,
    /// The quota of every tenant that does not set its own (field by field).
    pub tenant_quota: QuotaSpec,
    /// OCI registries components are pulled from (`source = "oci://HOST/..."`), by host:
    /// credentials and transport. Unlisted registries use the docker config's
    /// credentials, or none.
    pub registries: BTreeMap<String, RegistrySpec>,
}

/// `[node.registries."HOST[:PORT]"]`: how to reach one OCI registry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySpec {
    pub username: Option<String>,
    pub password: Option<String>,
    /// Plain HTTP instead of HTTPS (loopback registries always are).
    #[serde(default)]
    pub insecure: bool,
    /// Tenants whose tokens may have the node pull from this registry, with these
    /// credentials (`"*"`: every tenant). A tenant token may pull from no other registry.
    #[serde(default)]
    pub tenants: Vec<String>,
}

/// `[node.events]`: durable events (JetStream with `nats_url`, else `DATA_DIR/events.db`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventSettings {
    /// Store events before `publish` returns and deliver them at least once (default).
    /// `false`: core NATS / the in-process bus, at most once.
    pub durable: bool,
    /// The JetStream stream's name.
    pub stream: String,
    /// Events older than this are dropped even if not yet handled.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Stored events at most (stream or local queue); past it, `publish` fails.
    pub max_bytes: ByteSize,
    /// JetStream drops an event re-sent with the same id within this window.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long JetStream waits for a node's ack before handing the event to another
    /// (a running handler keeps extending it).
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            durable: true,
            stream: "TRELLIS_EVENTS".into(),
            max_age: Duration::from_secs(7 * 24 * 60 * 60),
            max_bytes: ByteSize::gib(1),
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(10),
        }
    }
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from(".trellis"),
            max_instances: 1000,
            max_instance_memory: ByteSize::mib(256),
            database_url: None,
            nats_url: None,
            cache_dir: None,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            admin_token: None,
            max_component_size: ByteSize::mib(64),
            max_memory: None,
            events: EventSettings::default(),
            tenant_quota: QuotaSpec::default(),
            registries: BTreeMap::new(),
        }
    }
}

/// A tenant: in the manifest (`[tenants.NAME]`) or as JSON through the admin API.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    /// Host names this tenant is served on: exact (`shop.example.com`), a wildcard
    /// subdomain (`*.example.com`) or `*` for every host no other tenant claims.
    pub hosts: Vec<String>,
    /// Config every component of the tenant gets (a component's own `config` wins), so a
    /// value the services share, such as a token secret, is written once.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// What the tenant may take of the node; unset fields come from `node.tenant_quota`.
    #[serde(default)]
    pub quota: QuotaSpec,
}

/// A tenant's quota. Every field is optional: a tenant's own value wins over
/// `node.tenant_quota`, and a field set in neither is unlimited (bounded only by the
/// node's own limits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// Gateway requests per second, as a token bucket (past it: 429 with `Retry-After`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u32>,
    /// Requests the bucket lets through at once (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Instances alive at once across all its components (past it: 503 `overloaded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    /// The largest `limits.memory` one of its components may ask for.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exact_bytes_opt"
    )]
    pub max_instance_memory: Option<ByteSize>,
    /// Linear memory of all its live instances together (a growth past it is refused).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exact_bytes_opt"
    )]
    pub max_memory: Option<ByteSize>,
    /// The longest `limits.deadline` one of its components may ask for.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub max_deadline: Option<Duration>,
    /// Bytes its databases may hold on disk (past it, writes fail in the guest; reads
    /// keep working).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exact_bytes_opt"
    )]
    pub max_storage: Option<ByteSize>,
    /// Components it may have (deployed or waiting for their first version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_components: Option<u32>,
    /// Total size of its components' active code.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exact_bytes_opt"
    )]
    pub max_code_size: Option<ByteSize>,
    /// Events and messages its guests may publish per second (past it, `publish` fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_per_second: Option<u32>,
    /// Outbound HTTP requests and `NAME.internal` calls one instance may make.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_outbound_per_request: Option<u32>,
    /// Threads its guests may occupy at once once they run past one epoch tick (the
    /// long-running ones); others wait for a turn, so a quiet tenant always finds a free
    /// core. Default: all cores but one (at least one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_threads: Option<u32>,
}

impl QuotaSpec {
    /// This quota's fields, each falling back to `defaults`'.
    pub fn or(&self, defaults: &QuotaSpec) -> QuotaSpec {
        QuotaSpec {
            requests_per_second: self.requests_per_second.or(defaults.requests_per_second),
            burst: self.burst.or(defaults.burst),
            max_instances: self.max_instances.or(defaults.max_instances),
            max_instance_memory: self.max_instance_memory.or(defaults.max_instance_memory),
            max_memory: self.max_memory.or(defaults.max_memory),
            max_deadline: self.max_deadline.or(defaults.max_deadline),
            max_storage: self.max_storage.or(defaults.max_storage),
            max_components: self.max_components.or(defaults.max_components),
            max_code_size: self.max_code_size.or(defaults.max_code_size),
            publish_per_second: self.publish_per_second.or(defaults.publish_per_second),
            max_outbound_per_request: self
                .max_outbound_per_request
                .or(defaults.max_outbound_per_request),
            cpu_threads: self.cpu_threads.or(defaults.cpu_threads),
        }
    }

    /// Problems with the quota's values; `at` is its field path.
    pub fn problems(&self, at: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let zero = |field: &str| Problem {
            field: format!("{at}.{field}"),
            reason: "must be at least 1 (leave it unset for no limit)".into(),
        };
        for (field, value) in [
            ("requests_per_second", self.requests_per_second),
            ("burst", self.burst),
            ("max_instances", self.max_instances),
            ("max_components", self.max_components),
            ("publish_per_second", self.publish_per_second),
            ("cpu_threads", self.cpu_threads),
        ] {
            if value == Some(0) {
                problems.push(zero(field));
            }
        }
        for (field, value) in [
            ("max_instance_memory", self.max_instance_memory),
            ("max_memory", self.max_memory),
        ] {
            if value.is_some_and(|v| v.as_u64() < ByteSize::mib(1).as_u64()) {
                problems.push(Problem {
                    field: format!("{at}.{field}"),
                    reason: "is too small to run anything (at least 1 MiB)".into(),
                });
            }
        }
        if self.max_deadline.is_some_and(|d| d.is_zero()) {
            problems.push(Problem {
                field: format!("{at}.max_deadline"),
                reason: "must be longer than zero".into(),
            });
        }
        problems
    }

    /// Problems of a component's limits under this (effective) quota.
    pub fn limit_problems(&self, name: &str, limits: &Limits) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Some(max) = self.max_instance_memory
            && limits.memory > max
        {
            problems.push(Problem {
                field: format!("components.{name}.limits.memory"),
                reason: format!(
                    "{} is above the tenant's quota.max_instance_memory ({max})",
                    limits.memory
                ),
            });
        }
        if let Some(max) = self.max_deadline
            && limits.deadline > max
        {
            problems.push(Problem {
                field: format!("components.{name}.limits.deadline"),
                reason: format!(
                    "{:?} is longer than the tenant's quota.max_deadline ({max:?})",
                    limits.deadline
                ),
            });
        }
        problems
    }
}

/// The registry reference of a `source` that is one (`oci://...`), else `None` (a file).
pub fn component_oci_reference(source: &std::path::Path) -> Option<&str> {
    source
        .to_str()
        .filter(|text| crate::grammar::oci::is_oci(text))
}

/// One component's entry: in the manifest, or as JSON through the admin API (where
/// `source` is absent: the code is uploaded instead).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentSpec {
    /// Tenant this component belongs to (default: `default`).
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Path of the `.wasm` component, relative to the manifest (required there), or a
    /// registry reference: `oci://HOST/REPO:TAG` or `oci://HOST/REPO@sha256:DIGEST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    /// Path prefixes this component serves within its tenant; the longest prefix wins.
    #[serde(default)]
    pub routes: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    /// Values the component reads through `wasi:config/store` and as environment variables.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Hosts the component may send HTTP requests to (`api.example.com`,
    /// `api.example.com:8443`, `*.example.com`). Empty: no outbound HTTP at all.
    #[serde(default)]
    pub outbound: Vec<String>,
    /// Host directories the component may see, by guest path.
    #[serde(default)]
    pub dirs: BTreeMap<String, DirGrant>,
    /// Key-value buckets (`wasi:keyvalue`) the component may open. Empty: none.
    #[serde(default)]
    pub keyvalue: Vec<String>,
    /// Whether the component may use relational storage (`trellis:platform/sql`).
    #[serde(default)]
    pub sql: bool,
    /// A directory of `*.sql` files applied to the component's database in name order at
    /// deploy, each once (needs `sql = true`).
    #[serde(default)]
    pub migrations: Option<PathBuf>,
    /// Subjects (NATS wildcards allowed) whose messages call its `handle-message`.
    #[serde(default)]
    pub subscriptions: Vec<String>,
    /// Those of its `subscriptions` whose events it takes at most once, from core NATS or
    /// the in-process bus, instead of durably (for example frequent, disposable ticks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ephemeral: Vec<String>,
    /// Subjects (NATS wildcards allowed) it may publish and send requests on.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Warm instance reuse (absent: a fresh instance for every call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reuse: Option<Reuse>,
}

/// Opt-in warm instance reuse: an instance that finished a call cleanly serves the next
/// call of the same kind (HTTP or message) of the same version: one call at a time, except
/// a WASIp3 component's HTTP requests, up to `concurrent` at once.
/// State a call leaves in the instance (globals, its heap, open resources) is seen by later
/// calls: only for components that tolerate that. Instances are never shared across
/// components, tenants or versions.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reuse {
    /// Calls one instance serves before it is thrown away.
    pub max_requests: u32,
    /// How long an unused warm instance is kept.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// An instance whose linear memory grew past this is thrown away after its call
    /// (absent: `limits.memory`, which kills the call itself).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exact_bytes_opt"
    )]
    pub max_memory: Option<ByteSize>,
    /// HTTP requests one WASIp3 instance serves at once (WASIp2 handlers and message
    /// deliveries take one at a time).
    pub concurrent: u32,
}

impl Default for Reuse {
    fn default() -> Self {
        Self {
            max_requests: 1000,
            idle: Duration::from_secs(1),
            max_memory: None,
            concurrent: 16,
        }
    }
}

/// The longest a warm instance may wait for its next call.
pub const MAX_REUSE_IDLE: Duration = Duration::from_secs(60 * 60);

/// The most requests one WASIp3 instance may serve at once.
pub const MAX_REUSE_CONCURRENT: u32 = 1024;

/// Sizes are written as exact byte counts: bytesize's own text rounds ("976.6 KiB"), and an
/// entry that is stored and read back must mean the same limits.
fn exact_bytes<S: serde::Serializer>(size: &ByteSize, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(size.as_u64())
}

fn exact_bytes_opt<S: serde::Serializer>(
    size: &Option<ByteSize>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match size {
        Some(size) => serializer.serialize_u64(size.as_u64()),
        None => serializer.serialize_none(),
    }
}

fn default_tenant() -> String {
    DEFAULT_TENANT.to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Linear memory one instance may grow to.
    #[serde(serialize_with = "exact_bytes")]
    pub memory: ByteSize,
    /// Wall-clock time one request may take (the guest is interrupted after it: 504).
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Instances of this component that may run at once; more requests get 503.
    pub max_concurrent: u32,
    /// Largest request body accepted; more gets 413.
    #[serde(serialize_with = "exact_bytes")]
    pub max_body: ByteSize,
    /// Times a message is offered to the handler before it is dead-lettered.
    pub message_attempts: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: ByteSize::mib(64),
            deadline: Duration::from_secs(10),
            max_concurrent: 100,
            max_body: ByteSize::mib(2),
            message_attempts: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    /// The host directory, relative to the manifest.
    pub host: PathBuf,
    /// Whether the component may create and change files there (default: read-only).
    #[serde(default)]
    pub writable: bool,
}

/// One thing wrong with a manifest: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: cannot read the manifest: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {field}: {reason}")]
    Parse {
        file: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{file}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

/// A manifest that parsed and validated, with every relative path made absolute.
#[derive(Debug)]
pub struct LoadedManifest {
    pub path: PathBuf,
    pub manifest: Manifest,
}

impl LoadedManifest {
    /// The declared tenants, or the one `default` tenant serving every host.
    pub fn tenant_specs(&self) -> BTreeMap<String, TenantSpec> {
        if self.manifest.tenants.is_empty() {
            return BTreeMap::from([(
                DEFAULT_TENANT.to_string(),
                TenantSpec {
                    hosts: vec!["*".to_string()],
                    config: BTreeMap::new(),
                    quota: QuotaSpec::default(),
                },
            )]);
        }
        self.manifest.tenants.clone()
    }

    pub fn tenants(&self) -> Vec<(String, Vec<String>)> {
        self.tenant_specs()
            .into_iter()
            .map(|(name, spec)| (name, spec.hosts))
            .collect()
    }
}

/// Reads, parses and validates a manifest file.
pub fn load(path: &Path) -> Result<LoadedManifest, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and validates manifest text that came from `path` (used for relative paths and
/// in messages).
pub fn parse(path: &Path, text: &str) -> Result<LoadedManifest, ManifestError> {
    let file = path.to_path_buf();
    let deserializer = toml::Deserializer::parse(text).map_err(|e| ManifestError::Parse {
        file: file.clone(),
        field: "(syntax)".into(),
        reason: one_line(&e.to_string()),
    })?;
    let mut manifest: Manifest = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        ManifestError::Parse {
            file: file.clone(),
            field: if field == "." {
                "(top level)".into()
            } else {
                field
            },
            reason: one_line(&e.into_inner().to_string()),
        }
    })?;

    // Paths in a manifest are relative to the manifest's directory, made absolute so they
    // mean the same thing wherever they are used (wasmtime's cache insists on it).
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    let base = std::path::absolute(&base).unwrap_or(base);
    absolutize(&mut manifest, &base);

    inherit_tenant_config(&mut manifest);
    let problems = validate(&manifest);
    if !problems.is_empty() {
        return Err(ManifestError::Invalid { file, problems });
    }
    Ok(LoadedManifest {
        path: path.to_path_buf(),
        manifest,
    })
}

/// toml's messages carry a source excerpt over several lines; the reason stays on one.
fn one_line(message: &str) -> String {
    let mut lines = message.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default().to_string();
    // The last line is the actual reason; the first says where.
    match lines.next_back() {
        Some(reason) if first.starts_with("TOML parse error") => {
            format!(
                "{} ({})",
                reason.trim_start_matches(['|', '^', ' ']),
                first.trim_start_matches("TOML parse error at ")
            )
        }
        _ => first,
    }
}

fn inherit_tenant_config(manifest: &mut Manifest) {
    for component in manifest.components.values_mut() {
        if let Some(tenant) = manifest.tenants.get(&component.tenant) {
            for (key, value) in &tenant.config {
                component
                    .config
                    .entry(key.clone())
                    .or_insert_with(|| value.clone());
            }
        }
    }
}

fn absolutize(manifest: &mut Manifest, base: &Path) {
    let abs = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    manifest.node.data_dir = abs(&manifest.node.data_dir);
    if let Some(dir) = &mut manifest.node.cache_dir {
        *dir = abs(dir);
    }
    for component in manifest.components.values_mut() {
        if let Some(source) = &mut component.source
            && component_oci_reference(source).is_none()
        {
            *source = abs(source);
        }
        if let Some(dir) = &mut component.migrations {
            *dir = abs(dir);
        }
        for grant in component.dirs.values_mut() {
            grant.host = abs(&grant.host);
        }
    }
}

fn validate(manifest: &Manifest) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut problem = |field: String, reason: String| problems.push(Problem { field, reason });

    if manifest.node.max_instances == 0 {
        problem("node.max_instances".into(), "must be at least 1".into());
    }
    if let Some(budget) = manifest.node.max_memory
        && budget.as_u64() < ByteSize::mib(1).as_u64()
    {
        problem(
            "node.max_memory".into(),
            format!("{budget} is too small to run anything"),
        );
    }
    if let Some(url) = &manifest.node.database_url
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        problem(
            "node.database_url".into(),
            "must be a postgres:// URL (leave it unset for SQLite)".into(),
        );
    }
    let events = &manifest.node.events;
    if events.stream.is_empty()
        || !events
            .stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        problem(
            "node.events.stream".into(),
            format!(
                "{:?} is not a stream name (letters, digits, '_' and '-')",
                events.stream
            ),
        );
    }
    if events.ack_wait < Duration::from_secs(1) {
        problem("node.events.ack_wait".into(), "must be at least 1s".into());
    }
    if events.max_age.is_zero() {
        problem(
            "node.events.max_age".into(),
            "must be longer than zero".into(),
        );
    }

    for p in manifest.node.tenant_quota.problems("node.tenant_quota") {
        problem(p.field, p.reason);
    }

    // Tenants and the hosts they claim.
    let mut claimed: BTreeMap<String, &str> = BTreeMap::new();
    for (name, tenant) in &manifest.tenants {
        for p in tenant_problems(name, tenant) {
            problem(p.field, p.reason);
        }
        for (i, host) in tenant.hosts.iter().enumerate() {
            let normalized = host.to_ascii_lowercase();
            if host_pattern_problem(&normalized).is_none()
                && let Some(other) = claimed.insert(normalized, name)
            {
                problem(
                    format!("tenants.{name}.hosts[{i}]"),
                    format!("host {host:?} is already claimed by tenant {other:?}"),
                );
            }
        }
    }

    // Components: tenant, source, routes, limits, grants.
    let mut routes_seen: BTreeMap<(&str, String), &str> = BTreeMap::new();
    let mut per_component = Vec::new();
    for (name, component) in &manifest.components {
        let at = |field: &str| format!("components.{name}.{field}");
        let tenant_known = if manifest.tenants.is_empty() {
            component.tenant == DEFAULT_TENANT
        } else {
            manifest.tenants.contains_key(&component.tenant)
        };
        if !tenant_known {
            let declared: Vec<&str> = if manifest.tenants.is_empty() {
                vec![DEFAULT_TENANT]
            } else {
                manifest.tenants.keys().map(String::as_str).collect()
            };
            problem(
                at("tenant"),
                format!(
                    "unknown tenant {:?} (declared: {})",
                    component.tenant,
                    declared.join(", ")
                ),
            );
        }
        match &component.source {
            None => problem(
                at("source"),
                "missing: the path of the component's .wasm file".into(),
            ),
            Some(source) if component_oci_reference(source).is_some() => {
                if let Err(reason) =
                    crate::grammar::oci::parse(component_oci_reference(source).unwrap_or_default())
                {
                    problem(at("source"), format!("not an OCI reference: {reason}"));
                }
            }
            Some(source) if !source.is_file() => {
                problem(at("source"), format!("no such file: {}", source.display()))
            }
            Some(_) => {}
        }
        for (i, route) in component.routes.iter().enumerate() {
            let field = format!("components.{name}.routes[{i}]");
            if route_problem(route).is_some() {
                continue; // reported with the component's own problems
            }
            let normalized = normalize_route(route);
            if let Some(other) =
                routes_seen.insert((component.tenant.as_str(), normalized.clone()), name)
            {
                problem(
                    field,
                    format!(
                        "route {normalized:?} is already served by component {other:?} in tenant {:?}",
                        component.tenant
                    ),
                );
            }
        }
        per_component.extend(component_problems(name, component, &manifest.node));
        let quota = manifest
            .tenants
            .get(&component.tenant)
            .map(|t| t.quota)
            .unwrap_or_default()
            .or(&manifest.node.tenant_quota);
        per_component.extend(quota.limit_problems(name, &component.limits));
    }
    problems.extend(per_component);
    problems
}

/// Everything wrong with one tenant's entry on its own (hosts other tenants claim are the
/// caller's to check): used for the manifest and for the admin API.
pub fn tenant_problems(name: &str, tenant: &TenantSpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Some(reason) = name_problem(name) {
        problems.push(Problem {
            field: format!("tenants.{name}"),
            reason,
        });
    }
    if tenant.hosts.is_empty() {
        problems.push(Problem {
            field: format!("tenants.{name}.hosts"),
            reason: "a tenant needs at least one host (use \"*\" for any)".into(),
        });
    }
    for (i, host) in tenant.hosts.iter().enumerate() {
        if let Some(reason) = host_pattern_problem(&host.to_ascii_lowercase()) {
            problems.push(Problem {
                field: format!("tenants.{name}.hosts[{i}]"),
                reason,
            });
        }
    }
    for key in tenant.config.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            problems.push(Problem {
                field: format!("tenants.{name}.config.{key}"),
                reason: "config keys must be non-empty and contain no '=' or NUL".into(),
            });
        }
    }
    problems.extend(tenant.quota.problems(&format!("tenants.{name}.quota")));
    problems
}

/// Everything wrong with one component's entry on its own (routes clashing with other
/// components are the caller's to check): used for the manifest and for the admin API.
pub fn component_problems(
    name: &str,
    component: &ComponentSpec,
    node: &NodeSettings,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut problem = |field: String, reason: String| problems.push(Problem { field, reason });
    let at = |field: &str| format!("components.{name}.{field}");
    if let Some(dir) = &component.migrations {
        if !component.sql {
            problem(
                at("migrations"),
                "migrations need relational storage: set sql = true".to_string(),
            );
        }
        if !dir.is_absolute() {
            problem(
                at("migrations"),
                format!("{} must be an absolute path", dir.display()),
            );
        } else if !dir.is_dir() {
            problem(
                at("migrations"),
                format!("no such directory: {}", dir.display()),
            );
        }
    }
    for (i, route) in component.routes.iter().enumerate() {
        if let Some(reason) = route_problem(route) {
            problem(format!("components.{name}.routes[{i}]"), reason);
        }
    }
    let limits = &component.limits;
    if limits.memory.as_u64() < ByteSize::mib(1).as_u64() {
        problem(
            at("limits.memory"),
            format!(
                "{} is too small to run anything (at least 1 MiB)",
                limits.memory
            ),
        );
    }
    if limits.memory > node.max_instance_memory {
        problem(
            at("limits.memory"),
            format!(
                "{} is above node.max_instance_memory ({})",
                limits.memory, node.max_instance_memory
            ),
        );
    }
    if limits.deadline.is_zero() {
        problem(at("limits.deadline"), "must be longer than zero".into());
    }
    if limits.deadline > MAX_DEADLINE {
        problem(
            at("limits.deadline"),
            format!(
                "{:?} is longer than the {MAX_DEADLINE:?} a request may take",
                limits.deadline
            ),
        );
    }
    if limits.max_concurrent == 0 {
        problem(at("limits.max_concurrent"), "must be at least 1".into());
    }
    if let Some(reuse) = &component.reuse {
        if reuse.max_requests == 0 {
            problem(at("reuse.max_requests"), "must be at least 1".into());
        }
        if reuse.concurrent == 0 || reuse.concurrent > MAX_REUSE_CONCURRENT {
            problem(
                at("reuse.concurrent"),
                format!("{} is outside 1..{MAX_REUSE_CONCURRENT}", reuse.concurrent),
            );
        }
        if reuse.idle.is_zero() || reuse.idle > MAX_REUSE_IDLE {
            problem(
                at("reuse.idle"),
                format!("{:?} is outside 1ms..{MAX_REUSE_IDLE:?}", reuse.idle),
            );
        }
        if let Some(max) = reuse.max_memory
            && max > limits.memory
        {
            problem(
                at("reuse.max_memory"),
                format!("{max} is above limits.memory ({})", limits.memory),
            );
        }
    }
    for (i, host) in component.outbound.iter().enumerate() {
        if let Some(reason) = outbound_pattern_problem(host) {
            problem(at(&format!("outbound[{i}]")), reason);
        }
    }
    for (guest, grant) in &component.dirs {
        let field = at(&format!("dirs.\"{guest}\""));
        if !guest.starts_with('/') {
            problem(
                field.clone(),
                format!("guest path {guest:?} must be absolute"),
            );
        }
        if !grant.host.is_absolute() || !grant.host.is_dir() {
            problem(
                format!("{field}.host"),
                format!("no such directory: {}", grant.host.display()),
            );
        }
    }
    for (field, patterns) in [
        ("subscriptions", &component.subscriptions),
        ("publish", &component.publish),
    ] {
        for (i, pattern) in patterns.iter().enumerate() {
            if let Some(reason) = subject_problem(pattern, true) {
                problem(at(&format!("{field}[{i}]")), reason);
            }
        }
    }
    for (i, pattern) in component.ephemeral.iter().enumerate() {
        if !component.subscriptions.contains(pattern) {
            problem(
                at(&format!("ephemeral[{i}]")),
                format!("{pattern:?} is not one of the component's subscriptions"),
            );
        }
    }
    if limits.message_attempts == 0 {
        problem(at("limits.message_attempts"), "must be at least 1".into());
    }
    for (i, bucket) in component.keyvalue.iter().enumerate() {
        if bucket.is_empty() || bucket.len() > 255 || bucket.chars().any(char::is_control) {
            problem(
                at(&format!("keyvalue[{i}]")),
                format!("{bucket:?} is not a bucket name (1-255 printable characters)"),
            );
        }
    }
    for key in component.config.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            problem(
                at(&format!("config.{key}")),
                "config keys must be non-empty and contain no '=' or NUL".into(),
            );
        }
    }
    if let Some(reason) = name_problem(name) {
        problems.push(Problem {
            field: format!("components.{name}"),
            reason,
        });
    }
    problems
}

/// Why a route is not acceptable, if it is not.
pub fn route_problem(route: &str) -> Option<String> {
    if !route.starts_with('/') {
        return Some(format!("route {route:?} must start with '/'"));
    }
    let normalized = normalize_route(route);
    if RESERVED_PATHS.iter().any(|r| route_matches(&normalized, r)) && normalized != "/" {
        return Some(format!(
            "route {route:?} would shadow the gateway's own {}",
            RESERVED_PATHS.join(", ")
        ));
    }
    None
}

pub fn name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    (!ok).then(|| {
        format!("name {name:?} must be 1-63 characters of a-z, 0-9 and '-', not starting with '-'")
    })
}

fn host_pattern_problem(pattern: &str) -> Option<String> {
    if pattern == "*" {
        return None;
    }
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    let ok = !name.is_empty()
        && !name.contains('*')
        && name.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    (!ok).then(|| {
        format!("{pattern:?} is not a host name, \"*.domain\" or \"*\" (ports are not part of it)")
    })
}

fn outbound_pattern_problem(pattern: &str) -> Option<String> {
    let (host, port) = match pattern.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (pattern, None),
    };
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Some(format!("{pattern:?}: {port:?} is not a port"));
    }
    if host == "*" {
        return Some("\"*\" would allow every host; list the hosts instead".into());
    }
    host_pattern_problem(&host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        assert!(host_pattern_problem("shop.example.com").is_none());
        assert!(host_pattern_problem("*.example.com").is_none());
        assert!(host_pattern_problem("*").is_none());
        assert!(host_pattern_problem("shop.example.com:8080").is_some());
        assert!(host_pattern_problem("a.*.com").is_some());
        assert!(outbound_pattern_problem("api.example.com:8443").is_none());
        assert!(outbound_pattern_problem("*").is_some());
    }
}

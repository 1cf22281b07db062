//! The registry: every component slot of the node, the routing table built from them, and
//! every change to them. Deploying from the manifest, from `--watch`, and through the admin
//! API all come here, one change at a time; a change either fully succeeds (new version
//! compiled, linked, migrated and instantiated once, then swapped in atomically and
//! persisted) or leaves the running version serving untouched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use wasmtime_wasi_http::WasiBody;

use crate::capabilities::events::EventLog;
use crate::capabilities::keyvalue::{KeyValueBackend, KeyValueGrant};
use crate::capabilities::messaging::MessageBus;
use crate::capabilities::outbound::{ComponentCaller, InternalCalls, ResponseBody};
use crate::capabilities::sql::SqlGrant;
use crate::deploy::canary::{Canary, CanaryPolicy};
use crate::deploy::code::{self, CodeStore};
use crate::deploy::slot::{Slot, SlotObserver, Versions};
use crate::deploy::state::{Origin, SlotRecord, StateStore, StoredComponent};
use crate::gateway::router::Router;
use crate::grammar::routes::normalize_route;
use crate::manifest::{ComponentSpec, LoadedManifest, NodeSettings, Problem, TenantSpec};
use crate::runtime::engine::Engines;
use crate::runtime::instance::Linkers;
use crate::runtime::invoke::{self, Admission};
use crate::runtime::memory::MemoryBudget;
use crate::runtime::version::{LoadError, StorageGrants, Version, VersionServices, VersionSource};
use crate::storage::{ComponentDatabase, Storage, StorageMeter};
use crate::telemetry::metrics::Metrics;
use crate::tenancy::tokens::TokenSet;
use crate::tenancy::{Tenant, Tenants, quota};

/// Why a change was refused: an HTTP status, a code and a message for the admin API.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DeployError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Field-level problems, for an invalid entry.
    pub problems: Vec<Problem>,
}

impl DeployError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            problems: Vec::new(),
        }
    }

    /// An entry refused for `problems` (each a field and its reason), all in the message.
    pub fn with_problems(status: u16, code: &'static str, problems: Vec<Problem>) -> Self {
        let message = problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let mut error = Self::new(status, code, message);
        error.problems = problems;
        error
    }

    pub fn unknown_tenant(tenant: &str) -> Self {
        Self::new(
            404,
            "unknown_tenant",
            format!("there is no tenant {tenant:?}"),
        )
    }

    fn not_found(tenant: &str, name: &str) -> Self {
        Self::new(
            404,
            "not_found",
            format!("tenant {tenant:?} has no component {name:?}"),
        )
    }
}

impl From<LoadError> for DeployError {
    fn from(e: LoadError) -> Self {
        let status = match &e {
            LoadError::Read { .. } | LoadError::Storage { .. } | LoadError::Refused(_) => 500,
            LoadError::CoreModule { .. } | LoadError::Compile { .. } => 400,
            LoadError::MissingImport { .. }
            | LoadError::MissingExport { .. }
            | LoadError::Instantiate { .. } => 422,
        };
        DeployError::new(status, e.code(), e.to_string())
    }
}

type Key = (Arc<str>, Arc<str>);

/// A component's open database, its meter against the tenant's storage quota, and its
/// key-value backend once a version asked for one.
#[derive(Clone)]
pub(super) struct OpenDatabase {
    pub(super) database: ComponentDatabase,
    meter: Arc<StorageMeter>,
    keyvalue: Option<Arc<dyn KeyValueBackend>>,
}

/// The slots and the routes to them, replaced whole when a slot is added, removed or
/// changes routes.
struct Table {
    slots: BTreeMap<Key, Arc<Slot>>,
    router: Router<Arc<Slot>>,
}

/// What the registry needs to know of the node.
pub struct RegistryConfig {
    pub node: NodeSettings,
    /// The manifest's tenants (or the one `default` tenant).
    pub tenants: BTreeMap<String, TenantSpec>,
    /// The gateway's address (the `Host` a guest sees when a client sent none).
    pub local_addr: SocketAddr,
}

/// What becomes of a freshly uploaded version.
#[derive(Debug, Clone)]
pub enum UploadAction {
    Keep,
    Activate,
    Canary(CanaryPolicy),
}

pub struct Registry {
    me: Weak<Registry>,
    pub(super) config: RegistryConfig,
    linkers: Arc<Linkers>,
    pub(super) storage: Storage,
    bus: Arc<dyn MessageBus>,
    events: Arc<dyn EventLog>,
    pub metrics: Arc<Metrics>,
    /// The node's tenants and their quotas.
    pub tenants: Tenants,
    /// Tenant tokens (hashed).
    pub tokens: TokenSet,
    code: CodeStore,
    /// Components pulled from OCI registries.
    oci: super::oci::OciSource,
    pub(super) state: Option<StateStore>,
    table: ArcSwap<Table>,
    /// Components created through the API that wait for their first version.
    pub(super) pending: Mutex<BTreeMap<(String, String), ComponentSpec>>,
    /// Each component's database (and key-value backend on it), opened once and shared by
    /// all its versions: one pool and one SQLite write turn per component.
    pub(super) databases: tokio::sync::Mutex<HashMap<(String, String), OpenDatabase>>,
    /// One change at a time.
    pub(super) changes: tokio::sync::Mutex<()>,
    seq: AtomicU64,
    ready: AtomicBool,
    /// The node's memory budget, shared by every instance.
    memory_budget: Arc<MemoryBudget>,
}

impl Registry {
    pub fn new(
        config: RegistryConfig,
        engines: Engines,
        linkers: Arc<Linkers>,
        storage: Storage,
        bus: Arc<dyn MessageBus>,
        events: Arc<dyn EventLog>,
        state: Option<StateStore>,
    ) -> Arc<Self> {
        let code = CodeStore::new(&config.node.data_dir, engines);
        let oci = super::oci::OciSource::new(&config.node.data_dir, config.node.registries.clone());
        let metrics = Arc::new(Metrics::default());
        let tenants = Tenants::new(&config.tenants, config.node.tenant_quota, metrics.clone());
        let router = Router::new(&tenants.hosts(), &[]);
        let budget = config
            .node
            .max_memory
            .map_or_else(crate::runtime::memory::default_budget, |b| b.as_u64());
        metrics.node_memory_budget.set(budget as i64);
        let memory_budget = Arc::new(MemoryBudget::new(
            budget,
            metrics.node_memory_reserved.clone(),
        ));
        Arc::new_cyclic(|me| Registry {
            me: me.clone(),
            config,
            linkers,
            storage,
            bus,
            events,
            metrics,
            tenants,
            tokens: TokenSet::default(),
            memory_budget,
            code,
            oci,
            state,
            table: ArcSwap::from_pointee(Table {
                slots: BTreeMap::new(),
                router,
            }),
            pending: Mutex::new(BTreeMap::new()),
            databases: tokio::sync::Mutex::new(HashMap::new()),
            changes: tokio::sync::Mutex::new(()),
            seq: AtomicU64::new(1),
            ready: AtomicBool::new(false),
        })
    }

    pub fn node(&self) -> &NodeSettings {
        &self.config.node
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Removes the event consumers no running subscription claims (a subscription
    /// dropped from the manifest while the node was down keeps none behind). Called once
    /// every component has started.
    pub async fn retain_claimed_consumers(&self) {
        let claimed: HashSet<String> = self
            .slots()
            .iter()
            .flat_map(|slot| slot.consumers())
            .collect();
        if let Err(e) = self.events.retain_consumers(&claimed).await {
            tracing::warn!(error = %e, "removing unclaimed event consumers");
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// The component serving `path` on `host`.
    pub fn route(&self, host: &str, path: &str) -> Option<Arc<Slot>> {
        self.table.load().router.route(host, path).cloned()
    }

    pub fn slot(&self, tenant: &str, name: &str) -> Option<Arc<Slot>> {
        self.table
            .load()
            .slots
            .get(&(Arc::from(tenant), Arc::from(name)))
            .cloned()
    }

    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.table.load().slots.values().cloned().collect()
    }

    pub fn tenant_exists(&self, tenant: &str) -> bool {
        self.tenants.get(tenant).is_some()
    }

    fn tenant(&self, tenant: &str) -> Result<Arc<Tenant>, DeployError> {
        self.tenants
            .get(tenant)
            .ok_or_else(|| DeployError::unknown_tenant(tenant))
    }

    /// Components created through the API that have no version yet.
    pub fn pending(&self) -> Vec<(String, String, ComponentSpec)> {
        self.pending
            .lock()
            .expect("pending lock")
            .iter()
            .map(|((t, n), spec)| (t.clone(), n.clone(), spec.clone()))
            .collect()
    }

    // ---- starting ----------------------------------------------------------------

    /// Deploys what the node should run: the stored state where it still applies, the
    /// manifest for the rest. Returns every manifest component that failed to load.
    /// Components created through the API come last, so that the manifest's routes win a
    /// clash (the API component is then left out, and the log says why).
    pub async fn start(&self, manifest: &LoadedManifest) -> Result<(), Vec<LoadError>> {
        let _change = self.changes.lock().await;
        self.restore_tenants(manifest).await;
        let stored = match &self.state {
            Some(state) => state.load().await.unwrap_or_else(|e| {
                tracing::error!(error = %format!("{e:#}"), "cannot read the stored deployments; starting from the manifest");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let mut restored = HashSet::new();
        let mut created_through_api = Vec::new();
        for (tenant, name, component) in stored {
            let declared = manifest
                .manifest
                .components
                .get(&name)
                .filter(|spec| spec.tenant == tenant);
            match component {
                StoredComponent::Pending { spec } => {
                    if declared.is_none() && self.tenant_exists(&tenant) {
                        self.pending
                            .lock()
                            .expect("pending lock")
                            .insert((tenant, name), *spec);
                    } else {
                        self.forget(&tenant, &name).await;
                    }
                }
                StoredComponent::Deployed(record) => {
                    let applies = match (&record.origin, declared) {
                        (Origin::Api, None) => self.tenant_exists(&tenant),
                        (Origin::Manifest { fingerprint }, Some(spec)) => {
                            self.fingerprint_of(&name, spec).await.ok().as_ref()
                                == Some(fingerprint)
                        }
                        _ => false,
                    };
                    if !applies {
                        tracing::info!(%tenant, component = %name, "the manifest changed since this component was last deployed through the API; the manifest wins");
                        self.forget(&tenant, &name).await;
                    } else if record.origin == Origin::Api {
                        created_through_api.push((tenant, name, record));
                    } else {
                        match self.restore(&tenant, &name, *record).await {
                            Ok(()) => {
                                restored.insert(name);
                            }
                            Err(e) => {
                                tracing::error!(%tenant, component = %name, error = %e, "cannot restore a stored deployment; deploying the manifest's entry")
                            }
                        }
                    }
                }
            }
        }
        let mut failures = Vec::new();
        for (name, spec) in &manifest.manifest.components {
            if restored.contains(name) {
                continue;
            }
            let started = Instant::now();
            match self.deploy_manifest_entry_locked(name, spec).await {
                Ok(version) => tracing::info!(
                    tenant = %spec.tenant,
                    component = %name,
                    version = %version.digest,
                    routes = ?spec.routes,
                    elapsed = ?started.elapsed(),
                    "component loaded"
                ),
                Err(e) => failures.push(e),
            }
        }
        for (tenant, name, record) in created_through_api {
            if let Err(e) = self.restore(&tenant, &name, *record).await {
                tracing::error!(%tenant, component = %name, error = %e, "cannot restore a component created through the API; it is not served");
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures)
        }
    }

    async fn restore(
        &self,
        tenant: &str,
        name: &str,
        record: SlotRecord,
    ) -> Result<(), DeployError> {
        let active = self
            .build(
                tenant,
                name,
                &record.active.digest,
                None,
                &record.active.spec,
            )
            .await?;
        let previous = match &record.previous {
            Some(v) => self
                .build(tenant, name, &v.digest, None, &v.spec)
                .await
                .ok(),
            None => None,
        };
        let canary = match &record.canary {
            Some(c) => match self
                .build(tenant, name, &c.version.digest, None, &c.version.spec)
                .await
            {
                Ok(version) => Some(Arc::new(Canary::new(version, c.policy.clone()))),
                Err(_) => None,
            },
            None => None,
        };
        let versions = Versions {
            active,
            previous,
            canary,
        };
        let slot = self
            .install(tenant, name, &|_| versions.clone(), record.origin.clone())
            .await?;
        slot.set_known(record.versions, record.events);
        tracing::info!(tenant, component = name, version = %record.active.digest, "component restored from the node's stored state");
        Ok(())
    }

    // ---- building versions ----------------------------------------------------------

    /// Compiles (or reuses compiled code), opens storage, links, applies migrations, and
    /// instantiates once under the component's limits. Nothing is swapped in. Migrations
    /// come after everything that could refuse the code without touching the database.
    async fn build(
        &self,
        tenant: &str,
        name: &str,
        digest: &str,
        bytes: Option<Vec<u8>>,
        spec: &ComponentSpec,
    ) -> Result<Arc<Version>, DeployError> {
        let owner = self.tenant(tenant)?;
        let problems = owner.quota().limit_problems(name, &spec.limits);
        if !problems.is_empty() {
            owner.breach(quota::LIMITS, &problems[0].to_string());
            return Err(over_quota(problems));
        }
        let component = self.compile(name, digest, bytes).await?;
        let (storage, database) = self.open_storage(tenant, name, spec).await?;
        let services = VersionServices {
            owner,
            storage,
            internal_calls: Some(InternalCalls {
                caller: self.me.clone() as Weak<dyn ComponentCaller>,
                tenant: tenant.into(),
            }),
            bus: self.bus.clone(),
            events: self.events.clone(),
            memory_budget: self.memory_budget.clone(),
        };
        let version = Arc::new(Version::link(
            self.linkers.for_component(&component),
            VersionSource {
                tenant,
                name,
                digest,
                component: &component,
                spec,
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
            },
            services,
        )?);
        if let (Some(dir), Some(database)) = (&spec.migrations, database) {
            // A migration that fails refuses the version (its own transaction rolled back).
            let applied = database.migrate(dir).await.map_err(|e| {
                DeployError::new(
                    422,
                    "migration_failed",
                    format!("component {name:?}: {e:#}"),
                )
            })?;
            if !applied.is_empty() {
                tracing::info!(tenant, component = name, ?applied, "applied migrations");
            }
        }
        // The trial instance has an admission of its own: it never takes a permit from
        // live traffic, so a deploy cannot make a busy component answer 503.
        // Not counted in the component's in-flight gauge: no call is being served.
        let scratch = Admission::new(1, None, Default::default());
        let permit = scratch
            .admit()
            .await
            .expect("an admission without a tenant always admits");
        invoke::check(&version, &permit)
            .await
            .map_err(|failure| match failure {
                invoke::Failure::TenantMemory => DeployError::new(
                    503,
                    "tenant_busy",
                    "the tenant's live instances hold its whole memory quota (quota.max_memory); try again",
                ),
                invoke::Failure::PoolExhausted | invoke::Failure::NodeMemory => DeployError::new(
                    503,
                    "node_busy",
                    "the node is at its instance or memory limit (node.max_instances, node.max_memory); try again",
                ),
                invoke::Failure::MemoryLimit(limit) => DeployError::from(LoadError::Instantiate {
                    component: name.to_string(),
                    reason: format!("its initial memory is above limits.memory ({limit})"),
                }),
                other => DeployError::from(LoadError::Instantiate {
                    component: name.to_string(),
                    reason: other.to_string(),
                }),
            })?;
        Ok(version)
    }

    /// The compiled code of `digest`: from `bytes`, or the version store.
    async fn compile(
        &self,
        name: &str,
        digest: &str,
        bytes: Option<Vec<u8>>,
    ) -> Result<wasmtime::component::Component, DeployError> {
        let (bytes, source_name) = match bytes {
            Some(bytes) => (bytes, "the component".to_string()),
            None => (
                self.code
                    .get(digest)
                    .await
                    .map_err(|e| DeployError::new(404, "unknown_version", format!("{e:#}")))?,
                format!("version {digest}"),
            ),
        };
        Ok(self.code.compile(digest, bytes, name, &source_name).await?)
    }

    /// Opens the component's database (once) when it is granted storage, and prepares each
    /// granted capability on it; the database is returned for migrations.
    async fn open_storage(
        &self,
        tenant: &str,
        name: &str,
        spec: &ComponentSpec,
    ) -> Result<(StorageGrants, Option<ComponentDatabase>), DeployError> {
        if spec.keyvalue.is_empty() && !spec.sql {
            return Ok((StorageGrants::default(), None));
        }
        let storage_error = |e: anyhow::Error| {
            DeployError::from(LoadError::Storage {
                component: name.to_string(),
                reason: format!("{e:#}"),
            })
        };
        let mut databases = self.databases.lock().await;
        let key = (tenant.to_string(), name.to_string());
        let open = match databases.get_mut(&key) {
            Some(open) => open,
            None => {
                let database = self
                    .storage
                    .component_database(tenant, name)
                    .await
                    .map_err(storage_error)?;
                let meter = Arc::new(
                    StorageMeter::new(
                        database.clone(),
                        name.to_string(),
                        self.tenant(tenant)?.storage.clone(),
                    )
                    .await,
                );
                databases.entry(key).or_insert(OpenDatabase {
                    database,
                    meter,
                    keyvalue: None,
                })
            }
        };
        let keyvalue = if spec.keyvalue.is_empty() {
            None
        } else {
            let backend = match &open.keyvalue {
                Some(backend) => backend.clone(),
                None => {
                    let backend = KeyValueGrant::open_backend(open.database.clone())
                        .await
                        .map_err(storage_error)?;
                    open.keyvalue = Some(backend.clone());
                    backend
                }
            };
            Some(Arc::new(
                KeyValueGrant::with_backend(backend, &spec.keyvalue).with_meter(open.meter.clone()),
            ))
        };
        let database = open.database.clone();
        let meter = open.meter.clone();
        drop(databases);
        let sql = spec
            .sql
            .then(|| Arc::new(SqlGrant::new(database.clone()).with_meter(meter)));
        Ok((StorageGrants { keyvalue, sql }, Some(database)))
    }

    /// Puts a new set of versions in place, computed by `change` from the slot's current
    /// set (none for a new component) at the moment of the swap. A new slot subscribes
    /// before it is routed; an existing one subscribes to new patterns before the swap.
    async fn install(
        &self,
        tenant: &str,
        name: &str,
        change: &(dyn Fn(Option<&Versions>) -> Versions + Send + Sync),
        origin: Origin,
    ) -> Result<Arc<Slot>, DeployError> {
        let existing = self.slot(tenant, name);
        let preview = change(existing.as_ref().map(|slot| slot.versions()).as_deref());
        if let Some(clash) = self.route_clash(tenant, name, &preview.active.spec.routes) {
            return Err(DeployError::new(409, "route_taken", clash));
        }
        let patterns = preview.active.spec.subscriptions.clone();
        let ephemeral = preview.active.spec.ephemeral.clone();
        let subscribe_error =
            |e: anyhow::Error| DeployError::new(500, "subscribe_failed", format!("{e:#}"));
        let slot = match existing {
            Some(slot) => {
                slot.subscribe(&patterns, &ephemeral)
                    .await
                    .map_err(subscribe_error)?;
                let routes_before = slot.active().spec.routes.clone();
                let now = slot.update(|current| change(Some(current)));
                slot.set_origin(origin);
                if routes_before != now.active.spec.routes {
                    self.rebuild_table(None, None);
                }
                slot
            }
            None => {
                let slot = Slot::new(
                    preview.active.clone(),
                    self.tenant(tenant)?,
                    origin,
                    self.metrics.for_component(tenant, name),
                    self.bus.clone(),
                    self.events.clone(),
                    self.me.clone() as Weak<dyn SlotObserver>,
                );
                slot.swap(preview);
                slot.subscribe(&patterns, &ephemeral)
                    .await
                    .map_err(subscribe_error)?;
                self.rebuild_table(Some(slot.clone()), None);
                slot
            }
        };
        self.forget_unused_code();
        Ok(slot)
    }

    /// Which component of `tenant` (other than `name`, running or waiting for its first
    /// version) already serves one of `routes`.
    fn route_clash(&self, tenant: &str, name: &str, routes: &[String]) -> Option<String> {
        let table = self.table.load();
        let pending = self.pending.lock().expect("pending lock");
        let others = table
            .slots
            .values()
            .filter(|slot| &*slot.tenant == tenant && &*slot.name != name)
            .map(|slot| (slot.name.to_string(), slot.active().spec.routes.clone()))
            .chain(
                pending
                    .iter()
                    .filter(|((t, n), _)| t == tenant && n != name)
                    .map(|((_, n), spec)| (n.clone(), spec.routes.clone())),
            );
        for (other, their_routes) in others {
            for route in routes {
                let normalized = normalize_route(route);
                if their_routes
                    .iter()
                    .any(|r| normalize_route(r) == normalized)
                {
                    return Some(format!(
                        "route {normalized:?} is already served by component {other:?} in tenant {tenant:?}"
                    ));
                }
            }
        }
        None
    }

    /// Rebuilds the table with `add` added and `remove` removed, routes from each slot's
    /// active version.
    pub(super) fn rebuild_table(&self, add: Option<Arc<Slot>>, remove: Option<&Key>) {
        let mut slots = self.table.load().slots.clone();
        if let Some(slot) = add {
            slots.insert((slot.tenant.clone(), slot.name.clone()), slot);
        }
        if let Some(key) = remove {
            slots.remove(key);
        }
        let routes: Vec<(Arc<Slot>, Arc<str>, Vec<String>)> = slots
            .values()
            .map(|slot| {
                let routes = slot.active().spec.routes.clone();
                (slot.clone(), slot.tenant.clone(), routes)
            })
            .collect();
        let router = Router::new(&self.tenants.hosts(), &routes);
        self.table.store(Arc::new(Table { slots, router }));
    }

    /// Drops compiled code that no version in use needs (its bytes stay on disk; running
    /// instances hold their own reference).
    fn forget_unused_code(&self) {
        let in_use: HashSet<String> = self
            .table
            .load()
            .slots
            .values()
            .flat_map(|slot| {
                let v = slot.versions();
                let mut digests = vec![v.active.digest.to_string()];
                digests.extend(v.previous.as_ref().map(|p| p.digest.to_string()));
                digests.extend(v.canary.as_ref().map(|c| c.version.digest.to_string()));
                digests
            })
            .collect();
        self.code.retain(&in_use);
    }

    async fn persist(&self, slot: &Slot) {
        if let Some(state) = &self.state
            && let Err(e) = state
                .save(
                    &slot.tenant,
                    &slot.name,
                    &StoredComponent::Deployed(Box::new(slot.record())),
                )
                .await
        {
            tracing::error!(tenant = %slot.tenant, component = %slot.name, error = %format!("{e:#}"), "cannot persist the deployment");
        }
    }

    pub(super) async fn forget(&self, tenant: &str, name: &str) {
        if let Some(state) = &self.state
            && let Err(e) = state.remove(tenant, name).await
        {
            tracing::error!(tenant, component = name, error = %format!("{e:#}"), "cannot remove a stored deployment");
        }
    }

    // ---- the manifest (start and --watch) ---------------------------------------------

    /// Deploys (or re-deploys) a manifest entry from its source file and activates it.
    pub async fn deploy_manifest_entry(
        &self,
        name: &str,
        spec: &ComponentSpec,
    ) -> Result<Arc<Version>, LoadError> {
        let _change = self.changes.lock().await;
        let version = self.deploy_manifest_entry_locked(name, spec).await?;
        if let Some(slot) = self.slot(&spec.tenant, name) {
            self.persist(&slot).await;
        }
        Ok(version)
    }

    async fn deploy_manifest_entry_locked(
        &self,
        name: &str,
        spec: &ComponentSpec,
    ) -> Result<Arc<Version>, LoadError> {
        let (bytes, _) = self.read_source(name, spec).await?;
        let size = bytes.len() as u64;
        let owner = self
            .tenants
            .get(&spec.tenant)
            .ok_or_else(|| LoadError::Refused(format!("there is no tenant {:?}", spec.tenant)))?;
        if self.slot(&spec.tenant, name).is_none() {
            self.check_component_count(&owner, name)
                .map_err(into_load_error)?;
        }
        self.check_code_size(&owner, name, size)
            .map_err(into_load_error)?;
        let digest = self.code.put(&bytes).await.map_err(|e| LoadError::Read {
            component: name.to_string(),
            source_name: source_name(spec),
            reason: format!("keeping it in the version store: {e:#}"),
        })?;
        let fingerprint = fingerprint(spec, &digest);
        let version = self
            .build(&spec.tenant, name, &digest, Some(bytes), spec)
            .await
            .map_err(into_load_error)?;
        let active = version.clone();
        let slot = self
            .install(
                &spec.tenant,
                name,
                &move |current| Versions {
                    active: active.clone(),
                    previous: current.map(|c| c.active.clone()),
                    canary: None,
                },
                Origin::Manifest { fingerprint },
            )
            .await
            .map_err(into_load_error)?;
        slot.know(&digest, size);
        slot.event("activated", &version, None);
        Ok(version)
    }

    /// Removes a manifest component that left the manifest (`--watch`).
    pub async fn remove_manifest_entry(&self, tenant: &str, name: &str) {
        let _change = self.changes.lock().await;
        if let Some(slot) = self.slot(tenant, name)
            && matches!(slot.origin(), Origin::Manifest { .. })
        {
            self.remove_locked(&slot).await;
        }
    }

    // ---- the admin API ----------------------------------------------------------------

    /// Sets a component's entry. A component the node does not have is created, waiting
    /// for its first version (answers true). An existing one gets a new version: the code of
    /// `version` (default: the active code) with the new entry, activated or started as a
    /// canary as `action` says.
    pub async fn put_spec(
        &self,
        tenant: &str,
        name: &str,
        mut spec: ComponentSpec,
        version: Option<&str>,
        action: UploadAction,
    ) -> Result<bool, DeployError> {
        let _change = self.changes.lock().await;
        let owner = self.tenant(tenant)?;
        spec.tenant = tenant.to_string();
        spec.source = None;
        for (key, value) in owner.config() {
            spec.config.entry(key).or_insert(value);
        }
        self.check_spec(tenant, name, &spec)?;
        if let UploadAction::Canary(policy) = &action
            && let Some(problem) = policy.problem()
        {
            return Err(DeployError::new(422, "invalid_canary", problem));
        }
        let Some(slot) = self.slot(tenant, name) else {
            if version.is_some() {
                return Err(DeployError::new(
                    409,
                    "no_active_version",
                    "create the component first (an entry without a version), then upload its code",
                ));
            }
            self.check_component_count(&owner, name)?;
            if let Some(state) = &self.state {
                state
                    .save(
                        tenant,
                        name,
                        &StoredComponent::Pending {
                            spec: Box::new(spec.clone()),
                        },
                    )
                    .await
                    .map_err(|e| DeployError::new(500, "state_failed", format!("{e:#}")))?;
            }
            self.pending
                .lock()
                .expect("pending lock")
                .insert((tenant.to_string(), name.to_string()), spec);
            return Ok(true);
        };
        let current = slot.versions();
        if current.canary.is_some()
            && !matches!(action, UploadAction::Canary(_))
            && (current.active.spec.routes != spec.routes
                || current.active.spec.subscriptions != spec.subscriptions
                || current.active.spec.ephemeral != spec.ephemeral)
        {
            // The canary would no longer serve what the active version serves.
            return Err(DeployError::new(
                409,
                "canary_running",
                "promote or abort the running canary first",
            ));
        }
        let digest = match version {
            Some(digest) => self.known_digest(&slot, digest)?,
            None => current.active.digest.to_string(),
        };
        let size = match action {
            UploadAction::Canary(_) => slot.size_of(&current.active.digest) + slot.size_of(&digest),
            _ => slot.size_of(&digest),
        };
        self.check_code_size(&owner, name, size)?;
        let new = self.build(tenant, name, &digest, None, &spec).await?;
        match action {
            UploadAction::Canary(policy) => self.start_canary_locked(&slot, new, policy)?,
            UploadAction::Keep | UploadAction::Activate => {
                self.activate_locked(&slot, new, "activated", Some("entry changed".into()))
                    .await?;
            }
        }
        self.persist(&slot).await;
        Ok(false)
    }

    /// Problems with an entry given through the API, including routes another component
    /// of the tenant serves.
    fn check_spec(
        &self,
        tenant: &str,
        name: &str,
        spec: &ComponentSpec,
    ) -> Result<(), DeployError> {
        let mut problems = crate::manifest::component_problems(name, spec, &self.config.node);
        let owner = self.tenant(tenant)?;
        let over = owner.quota().limit_problems(name, &spec.limits);
        if let Some(first) = over.first() {
            owner.breach(quota::LIMITS, &first.to_string());
        }
        problems.extend(over);
        if let Some(clash) = self.route_clash(tenant, name, &spec.routes) {
            problems.push(Problem {
                field: format!("components.{name}.routes"),
                reason: clash,
            });
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(DeployError::with_problems(422, "invalid_entry", problems))
    }

    /// Takes an uploaded version. `Keep` verifies, keeps and compiles it and checks its
    /// imports (what it must export depends on the entry it will run with: that is checked
    /// when it is activated). `Activate` and `Canary` build it with the active entry (or a
    /// new component's entry) and swap it in or start a canary with it.
    pub async fn upload(
        &self,
        tenant: &str,
        name: &str,
        bytes: Vec<u8>,
        expected_digest: Option<&str>,
        action: UploadAction,
    ) -> Result<Uploaded, DeployError> {
        let size = bytes.len() as u64;
        let limit = self.config.node.max_component_size.as_u64();
        if size > limit {
            return Err(DeployError::new(
                413,
                "too_large",
                format!(
                    "the component is {size} bytes; node.max_component_size is {}",
                    self.config.node.max_component_size
                ),
            ));
        }
        let digest = code::digest(&bytes);
        if let Some(expected) = expected_digest
            && expected != digest
        {
            return Err(DeployError::new(
                400,
                "digest_mismatch",
                format!("the upload's digest is {digest}, not the expected {expected}"),
            ));
        }
        let _change = self.changes.lock().await;
        let owner = self.tenant(tenant)?;
        let slot = self.slot(tenant, name);
        // A first version serves at once, whatever the action says.
        if slot.is_none() || !matches!(action, UploadAction::Keep) {
            self.check_code_size(&owner, name, size)?;
        }
        let pending = self
            .pending
            .lock()
            .expect("pending lock")
            .get(&(tenant.to_string(), name.to_string()))
            .cloned();
        let spec = match (&slot, &pending) {
            (Some(slot), _) => (*slot.active().spec).clone(),
            (None, Some(spec)) => spec.clone(),
            (None, None) => return Err(DeployError::not_found(tenant, name)),
        };
        if let UploadAction::Canary(policy) = &action {
            if let Some(problem) = policy.problem() {
                return Err(DeployError::new(422, "invalid_canary", problem));
            }
            if slot.is_none() {
                return Err(DeployError::new(
                    409,
                    "no_active_version",
                    "a canary needs an active version to run beside; upload the first version without one",
                ));
            }
        }
        let Some(slot) = slot else {
            // The first version of a component created through the API: it serves now.
            let version = self
                .build(tenant, name, &digest, Some(bytes.clone()), &spec)
                .await?;
            self.keep(&bytes).await?;
            let active = version.clone();
            let slot = self
                .install(
                    tenant,
                    name,
                    &move |_| Versions {
                        active: active.clone(),
                        previous: None,
                        canary: None,
                    },
                    Origin::Api,
                )
                .await?;
            self.pending
                .lock()
                .expect("pending lock")
                .remove(&(tenant.to_string(), name.to_string()));
            slot.know(&digest, size);
            slot.event("activated", &version, None);
            self.persist(&slot).await;
            return Ok(Uploaded {
                digest,
                seq: Some(version.seq),
                state: "active",
            });
        };
        let (seq, state) = match action {
            UploadAction::Keep => {
                let component = self
                    .code
                    .compile(&digest, bytes.clone(), name, "the component")
                    .await?;
                self.linkers
                    .for_component(&component)
                    .instantiate_pre(&component)
                    .map_err(|e| {
                        DeployError::from(LoadError::MissingImport {
                            component: name.to_string(),
                            reason: format!("{e:#}"),
                        })
                    })?;
                self.keep(&bytes).await?;
                (None, "uploaded")
            }
            // The same code with the same entry: nothing to build or swap.
            UploadAction::Activate if *slot.active().digest == *digest => {
                (Some(slot.active().seq), "unchanged")
            }
            UploadAction::Activate => {
                let version = self
                    .build(tenant, name, &digest, Some(bytes.clone()), &spec)
                    .await?;
                self.keep(&bytes).await?;
                self.activate_locked(&slot, version.clone(), "activated", None)
                    .await?;
                (Some(version.seq), "active")
            }
            UploadAction::Canary(policy) => {
                let version = self
                    .build(tenant, name, &digest, Some(bytes.clone()), &spec)
                    .await?;
                self.keep(&bytes).await?;
                self.start_canary_locked(&slot, version.clone(), policy)?;
                (Some(version.seq), "canary")
            }
        };
        slot.know(&digest, size);
        self.persist(&slot).await;
        Ok(Uploaded { digest, seq, state })
    }

    async fn keep(&self, bytes: &[u8]) -> Result<(), DeployError> {
        self.code
            .put(bytes)
            .await
            .map(|_| ())
            .map_err(|e| DeployError::new(500, "store_failed", format!("{e:#}")))
    }

    fn existing(&self, tenant: &str, name: &str) -> Result<Arc<Slot>, DeployError> {
        self.slot(tenant, name)
            .ok_or_else(|| DeployError::not_found(tenant, name))
    }

    /// `digest`, if it is a version of this component.
    fn known_digest(&self, slot: &Slot, digest: &str) -> Result<String, DeployError> {
        if !code::is_digest(digest) {
            return Err(DeployError::new(
                400,
                "bad_version",
                format!("{digest:?} is not a version (sha256:HEX)"),
            ));
        }
        if !slot.knows(digest) && *slot.active().digest != *digest {
            return Err(DeployError::new(
                404,
                "unknown_version",
                format!(
                    "{digest} was never uploaded for {}/{}",
                    slot.tenant, slot.name
                ),
            ));
        }
        Ok(digest.to_string())
    }

    /// The version with `digest` for `slot`: a running one, else built from the version
    /// store with the active entry.
    async fn version_of(&self, slot: &Slot, digest: &str) -> Result<Arc<Version>, DeployError> {
        let digest = self.known_digest(slot, digest)?;
        let current = slot.versions();
        let candidates = [
            Some(current.active.clone()),
            current.previous.clone(),
            current.canary.as_ref().map(|c| c.version.clone()),
        ];
        if let Some(version) = candidates
            .into_iter()
            .flatten()
            .find(|v| *v.digest == *digest)
        {
            return Ok(version);
        }
        self.build(
            &slot.tenant,
            &slot.name,
            &digest,
            None,
            &current.active.spec,
        )
        .await
    }

    pub async fn activate(
        &self,
        tenant: &str,
        name: &str,
        digest: &str,
    ) -> Result<Arc<Version>, DeployError> {
        let _change = self.changes.lock().await;
        let slot = self.existing(tenant, name)?;
        let version = self.version_of(&slot, digest).await?;
        self.check_code_size(&slot.owner, name, slot.size_of(&version.digest))?;
        self.activate_locked(&slot, version.clone(), "activated", None)
            .await?;
        self.persist(&slot).await;
        Ok(version)
    }

    /// Makes `version` active, the active one previous. A running canary survives only if
    /// it is another version serving the same routes and subscriptions. The same code
    /// with the same entry is already active: nothing changes.
    async fn activate_locked(
        &self,
        slot: &Arc<Slot>,
        version: Arc<Version>,
        event: &str,
        reason: Option<String>,
    ) -> Result<(), DeployError> {
        let current = slot.versions();
        if current.active.digest == version.digest && *current.active.spec == *version.spec {
            return Ok(());
        }
        let active = version.clone();
        let change = move |current: Option<&Versions>| {
            let current = current.expect("activating needs a running component");
            let canary = current.canary.clone().filter(|c| {
                c.version.digest != active.digest
                    && c.version.spec.routes == active.spec.routes
                    && c.version.spec.subscriptions == active.spec.subscriptions
                    && c.version.spec.ephemeral == active.spec.ephemeral
            });
            Versions {
                active: active.clone(),
                previous: Some(current.active.clone()),
                canary,
            }
        };
        self.install(&slot.tenant, &slot.name, &change, slot.origin())
            .await?;
        slot.event(event, &version, reason);
        Ok(())
    }

    pub async fn rollback(&self, tenant: &str, name: &str) -> Result<Arc<Version>, DeployError> {
        let _change = self.changes.lock().await;
        let slot = self.existing(tenant, name)?;
        let Some(previous) = slot.versions().previous.clone() else {
            return Err(DeployError::new(
                409,
                "no_previous_version",
                "there is no previous version to roll back to",
            ));
        };
        self.activate_locked(&slot, previous.clone(), "rolled_back", None)
            .await?;
        self.persist(&slot).await;
        Ok(previous)
    }

    pub async fn start_canary(
        &self,
        tenant: &str,
        name: &str,
        digest: &str,
        policy: CanaryPolicy,
    ) -> Result<Arc<Version>, DeployError> {
        let _change = self.changes.lock().await;
        let slot = self.existing(tenant, name)?;
        if let Some(problem) = policy.problem() {
            return Err(DeployError::new(422, "invalid_canary", problem));
        }
        let version = self.version_of(&slot, digest).await?;
        let both = slot.size_of(&slot.active().digest) + slot.size_of(&version.digest);
        self.check_code_size(&slot.owner, name, both)?;
        self.start_canary_locked(&slot, version.clone(), policy)?;
        self.persist(&slot).await;
        Ok(version)
    }

    fn start_canary_locked(
        &self,
        slot: &Arc<Slot>,
        version: Arc<Version>,
        policy: CanaryPolicy,
    ) -> Result<(), DeployError> {
        let current = slot.versions();
        if current.active.digest == version.digest && *current.active.spec == *version.spec {
            return Err(DeployError::new(
                409,
                "already_active",
                "that version is already active",
            ));
        }
        if current.active.spec.routes != version.spec.routes
            || current.active.spec.subscriptions != version.spec.subscriptions
            || current.active.spec.ephemeral != version.spec.ephemeral
        {
            return Err(DeployError::new(
                409,
                "routes_differ",
                "a canary must serve the same routes and subscriptions as the active version; activate it instead",
            ));
        }
        let canary = Arc::new(Canary::new(version.clone(), policy.clone()));
        slot.update(|current| Versions {
            active: current.active.clone(),
            previous: current.previous.clone(),
            canary: Some(canary.clone()),
        });
        slot.event(
            "canary_started",
            &version,
            Some(format!("{}% of calls", policy.weight)),
        );
        self.forget_unused_code();
        Ok(())
    }

    /// Promotes (or, with `promote` false, aborts) the running canary.
    pub async fn end_canary(
        &self,
        tenant: &str,
        name: &str,
        promote: bool,
    ) -> Result<Arc<Version>, DeployError> {
        let _change = self.changes.lock().await;
        let slot = self.existing(tenant, name)?;
        let no_canary = || DeployError::new(409, "no_canary", "no canary is running");
        let canary = slot.versions().canary.clone().ok_or_else(no_canary)?;
        // The node may have decided on it meanwhile.
        if !slot.end_canary(&canary, promote) {
            return Err(no_canary());
        }
        let event = if promote {
            "canary_promoted"
        } else {
            "canary_aborted"
        };
        slot.event(event, &canary.version, None);
        self.forget_unused_code();
        self.persist(&slot).await;
        Ok(canary.version.clone())
    }

    /// Deletes a component created through the API (its data stays in its database).
    pub async fn delete(&self, tenant: &str, name: &str) -> Result<(), DeployError> {
        let _change = self.changes.lock().await;
        let key = (tenant.to_string(), name.to_string());
        if self
            .pending
            .lock()
            .expect("pending lock")
            .remove(&key)
            .is_some()
        {
            self.forget(tenant, name).await;
            return Ok(());
        }
        let slot = self.existing(tenant, name)?;
        if matches!(slot.origin(), Origin::Manifest { .. }) {
            return Err(DeployError::new(
                409,
                "declared_in_manifest",
                "this component is declared in the manifest; remove it there",
            ));
        }
        self.remove_locked(&slot).await;
        Ok(())
    }

    pub(super) async fn remove_locked(&self, slot: &Arc<Slot>) {
        slot.unsubscribe().await;
        self.rebuild_table(None, Some(&(slot.tenant.clone(), slot.name.clone())));
        self.databases
            .lock()
            .await
            .remove(&(slot.tenant.to_string(), slot.name.to_string()));
        self.forget(&slot.tenant, &slot.name).await;
        self.forget_unused_code();
        self.metrics.forget_component(&slot.tenant, &slot.name);
        tracing::info!(tenant = %slot.tenant, component = %slot.name, "component removed");
    }
}

/// What an upload became.
pub struct Uploaded {
    pub digest: String,
    /// The version's sequence number, when it was built (activated or a canary).
    pub seq: Option<u64>,
    /// `uploaded`, `active`, `canary`, or `unchanged` (already the active version).
    pub state: &'static str,
}

impl SlotObserver for Registry {
    fn changed(&self, slot: Arc<Slot>) {
        // A canary decided by itself; persisting it must not hold up the call that tipped
        // it. A slot deleted (or replaced) meanwhile is not written back.
        if let Some(registry) = self.me.upgrade() {
            tokio::spawn(async move {
                let _change = registry.changes.lock().await;
                if registry
                    .slot(&slot.tenant, &slot.name)
                    .is_some_and(|current| Arc::ptr_eq(&current, &slot))
                {
                    registry.persist(&slot).await;
                }
            });
        }
    }
}

impl ComponentCaller for Registry {
    fn call_component(
        &self,
        tenant: Arc<str>,
        component: String,
        request: Request<WasiBody>,
    ) -> BoxFuture<'static, Option<Response<ResponseBody>>> {
        let slot = self.slot(&tenant, &component);
        let local_addr = self.config.local_addr;
        async move {
            let slot = slot?;
            Some(slot.serve_http(request, local_addr).await)
        }
        .boxed()
    }
}

/// What identifies a manifest entry as deployed: the entry and its source bytes.
fn fingerprint(spec: &ComponentSpec, digest: &str) -> String {
    let entry = serde_json::to_string(spec).expect("an entry serializes");
    code::digest(format!("{entry}\n{digest}").as_bytes())
}

fn source_name(spec: &ComponentSpec) -> String {
    spec.source
        .as_ref()
        .map(|source| source.display().to_string())
        .unwrap_or_default()
}

/// A change refused by the tenant's quota, with the fields that are over it.
pub(super) fn over_quota(problems: Vec<Problem>) -> DeployError {
    DeployError::with_problems(422, "quota_exceeded", problems)
}

fn into_load_error(e: DeployError) -> LoadError {
    LoadError::Refused(e.message)
}

impl Registry {
    /// A manifest entry's code and its digest: the file's bytes, or the registry
    /// artifact's (pulled, or from the node's cache).
    async fn read_source(
        &self,
        name: &str,
        spec: &ComponentSpec,
    ) -> Result<(Vec<u8>, String), LoadError> {
        let source = spec.source.clone().unwrap_or_default();
        let read_error = |reason: String| LoadError::Read {
            component: name.to_string(),
            source_name: source.display().to_string(),
            reason,
        };
        if let Some(reference) = crate::manifest::component_oci_reference(&source) {
            let max = self.config.node.max_component_size.as_u64();
            let pulled = self
                .oci
                .pull(reference, &self.code, max, super::oci::Puller::Operator)
                .await
                .map_err(|e| read_error(e.to_string()))?;
            return Ok((pulled.bytes, pulled.digest));
        }
        let bytes = tokio::fs::read(&source)
            .await
            .map_err(|e| read_error(e.to_string()))?;
        let digest = code::digest(&bytes);
        Ok((bytes, digest))
    }

    async fn fingerprint_of(&self, name: &str, spec: &ComponentSpec) -> Result<String, LoadError> {
        let (_, digest) = self.read_source(name, spec).await?;
        Ok(fingerprint(spec, &digest))
    }

    /// Pulls `reference` for an upload through the admin API (`?source=oci://...`), on
    /// behalf of the operator or of a tenant token.
    pub async fn pull(
        &self,
        reference: &str,
        puller: super::oci::Puller<'_>,
    ) -> Result<super::oci::Pulled, DeployError> {
        let max = self.config.node.max_component_size.as_u64();
        self.oci
            .pull(reference, &self.code, max, puller)
            .await
            .map_err(|e| DeployError::new(e.status(), e.code(), e.to_string()))
    }

    /// Whether a manifest entry (or its source bytes) differs from what its slot runs;
    /// true for an entry the node does not run yet.
    pub async fn manifest_entry_changed(&self, name: &str, spec: &ComponentSpec) -> bool {
        let Some(slot) = self.slot(&spec.tenant, name) else {
            return true;
        };
        match (slot.origin(), self.fingerprint_of(name, spec).await) {
            (Origin::Manifest { fingerprint }, Ok(current)) => fingerprint != current,
            // An unreadable source is the deploy's to report.
            _ => true,
        }
    }
}

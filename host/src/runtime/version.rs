//! A version: one component's code, linked against the node's host interfaces and
//! pre-instantiated (`InstancePre`, `ProxyPre`) once, with the grants of the manifest entry
//! it was deployed with. Building one is the whole of "deploying": a request only creates a
//! `Store` and instantiates from it.
//!
//! Building fails with a [`LoadError`] that names the component and the reason: bytes that
//! are not a component (a core module is told apart), an import this host cannot satisfy
//! (named), a missing export for what the entry asks (routes need `wasi:http`,
//! subscriptions need the message handler). Compiling is not done here: compiled code is
//! shared by digest (`crate::deploy::code`).

use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi_config::WasiConfigVariables;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p3::bindings::ServicePre;

/// How a component serves HTTP: a WASIp2 `wasi:http/incoming-handler@0.2.x` export or a
/// WASIp3 `wasi:http/handler@0.3.x` service.
pub enum HttpPre {
    P2(ProxyPre<InstanceState>),
    P3(ServicePre<InstanceState>),
}

use crate::bindings::handler::MessageHandlerPre;
use crate::capabilities::keyvalue::KeyValueGrant;
use crate::capabilities::messaging::{MessageBus, MessagingGrant};
use crate::capabilities::outbound::{InternalCalls, OutboundPolicy};
use crate::capabilities::sql::SqlGrant;
use crate::manifest::{ComponentSpec, Limits};
use crate::runtime::concurrent::SharedInstances;
use crate::runtime::instance::{Grants, InstanceState};
use crate::runtime::reuse::{self, Lease, WarmPool};

/// Why a component (or a new version of one) cannot be deployed. Each names the component.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("component {component:?}: cannot read {source_name}: {reason}")]
    Read {
        component: String,
        source_name: String,
        reason: String,
    },
    #[error(
        "component {component:?}: {source_name} is a core WebAssembly module, not a component (build for wasm32-wasip2, or wrap it with `wasm-tools component new`)"
    )]
    CoreModule {
        component: String,
        source_name: String,
    },
    #[error(
        "component {component:?}: {source_name} is not a valid WebAssembly component: {reason}"
    )]
    Compile {
        component: String,
        source_name: String,
        reason: String,
    },
    #[error("component {component:?}: needs an import this host does not provide: {reason}")]
    MissingImport { component: String, reason: String },
    #[error("component {component:?}: {reason}")]
    MissingExport { component: String, reason: String },
    #[error("component {component:?}: cannot open its storage: {reason}")]
    Storage { component: String, reason: String },
    #[error("component {component:?}: fails to instantiate: {reason}")]
    Instantiate { component: String, reason: String },
    /// Any of the above, already said in full.
    #[error("{0}")]
    Refused(String),
}

impl LoadError {
    /// A short machine-readable code for API answers.
    pub fn code(&self) -> &'static str {
        match self {
            LoadError::Read { .. } => "unreadable",
            LoadError::CoreModule { .. } => "core_module",
            LoadError::Compile { .. } => "invalid_component",
            LoadError::MissingImport { .. } => "missing_import",
            LoadError::MissingExport { .. } => "missing_export",
            LoadError::Storage { .. } => "storage_failed",
            LoadError::Instantiate { .. } => "instantiate_failed",
            LoadError::Refused(_) => "refused",
        }
    }
}

/// Raised from the epoch callback when a request's deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("the request deadline passed")]
pub struct DeadlineExceeded;

/// The storage capabilities a version was granted, opened by its slot.
#[derive(Default)]
pub struct StorageGrants {
    pub keyvalue: Option<Arc<KeyValueGrant>>,
    pub sql: Option<Arc<SqlGrant>>,
}

/// What the node provides a version beyond its manifest entry.
pub struct VersionServices {
    pub storage: StorageGrants,
    /// Where its `NAME.internal` calls go (none: refused).
    pub internal_calls: Option<InternalCalls>,
    pub bus: Arc<dyn MessageBus>,
    pub events: Arc<dyn crate::capabilities::events::EventLog>,
    /// The node's memory budget.
    pub memory_budget: Arc<crate::runtime::memory::MemoryBudget>,
    /// The tenant the version belongs to (its quotas).
    pub owner: Arc<crate::tenancy::Tenant>,
}

/// One deployed version of a component, ready to instantiate.
pub struct Version {
    /// Node-wide sequence number, for logs ("version 7").
    pub seq: u64,
    /// `sha256:HEX` of the component's bytes.
    pub digest: Arc<str>,
    pub tenant: Arc<str>,
    pub name: Arc<str>,
    /// The entry it was deployed with.
    pub spec: Arc<ComponentSpec>,
    pub limits: Limits,
    instance_pre: InstancePre<InstanceState>,
    /// Present when the component serves HTTP (WASIp2 or WASIp3).
    http: Option<HttpPre>,
    /// Present when the component exports `wasmcloud:messaging/handler`.
    handler: Option<MessageHandlerPre<InstanceState>>,
    grants: Grants,
    /// Warm instances, when the entry opts into reuse.
    warm: Option<WarmPools>,
}

/// A version's warm instances: HTTP calls and message deliveries apart, so an instance is
/// only ever called through the export it was instantiated for.
struct WarmPools {
    http: HttpWarm,
    messages: Arc<WarmPool>,
}

/// Where a version's HTTP calls find warm instances.
enum HttpWarm {
    /// One call at a time per instance (WASIp2).
    OneAtATime(Arc<WarmPool>),
    /// Several requests at once per instance (WASIp3).
    Shared(Arc<SharedInstances>),
}

/// Which export a call goes to (and so which warm pool serves it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    Http,
    Message,
}

/// Who a version belongs to and what it is built from.
pub struct VersionSource<'a> {
    pub tenant: &'a str,
    pub name: &'a str,
    pub digest: &'a str,
    pub component: &'a Component,
    pub spec: &'a ComponentSpec,
    pub seq: u64,
}

impl Version {
    /// Links compiled code against the node's linker and checks its exports against what
    /// the entry asks for. Cheap next to compiling; no instance is created.
    pub fn link(
        linker: &Linker<InstanceState>,
        source: VersionSource<'_>,
        services: VersionServices,
    ) -> Result<Self, LoadError> {
        let VersionSource {
            tenant,
            name,
            digest,
            component,
            spec,
            seq,
        } = source;
        let component_name = name.to_string();
        let instance_pre =
            linker
                .instantiate_pre(component)
                .map_err(|e| LoadError::MissingImport {
                    component: component_name.clone(),
                    reason: format!("{e:#}"),
                })?;
        // WASIp3 first, as `wasmtime serve` does: a p3 service may also carry p2 exports.
        let http = match ServicePre::new(instance_pre.clone()) {
            Ok(pre) => Some(HttpPre::P3(pre)),
            Err(_) => ProxyPre::new(instance_pre.clone()).ok().map(HttpPre::P2),
        };
        let handler = MessageHandlerPre::new(instance_pre.clone()).ok();
        let missing_export = |reason: String| LoadError::MissingExport {
            component: component_name.clone(),
            reason,
        };
        if http.is_none() && !spec.routes.is_empty() {
            return Err(missing_export(
                "it has routes but exports neither wasi:http/incoming-handler@0.2.x nor wasi:http/handler@0.3.x".into(),
            ));
        }
        if handler.is_none() && !spec.subscriptions.is_empty() {
            return Err(missing_export(
                "it has subscriptions but does not export wasmcloud:messaging/handler@0.2.0".into(),
            ));
        }
        if http.is_none() && handler.is_none() {
            return Err(missing_export(
                "it exports none of wasi:http/incoming-handler@0.2.x, wasi:http/handler@0.3.x and wasmcloud:messaging/handler@0.2.0".into(),
            ));
        }

        let warm = spec.reuse.as_ref().map(|policy| WarmPools {
            http: match &http {
                Some(HttpPre::P3(_)) => HttpWarm::Shared(SharedInstances::new(policy)),
                _ => HttpWarm::OneAtATime(WarmPool::new(policy)),
            },
            messages: WarmPool::new(policy),
        });
        let tenant: Arc<str> = tenant.into();
        let name: Arc<str> = name.into();
        let grants = Grants {
            tenant: tenant.clone(),
            component: name.clone(),
            memory_limit: usize::try_from(spec.limits.memory.as_u64()).unwrap_or(usize::MAX),
            memory_budget: services.memory_budget,
            owner: services.owner.clone(),
            config: Arc::new(spec.config.iter().collect::<WasiConfigVariables>()),
            config_values: Arc::new(spec.config.clone()),
            env: spec
                .config
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            dirs: spec
                .dirs
                .iter()
                .map(|(guest, grant)| (grant.host.clone(), guest.clone(), grant.writable))
                .collect(),
            outbound: OutboundPolicy::new(&spec.outbound, services.internal_calls)
                .with_quota(services.owner.clone()),
            keyvalue: services.storage.keyvalue,
            sql: services.storage.sql,
            messaging: Arc::new(MessagingGrant {
                bus: services.bus,
                events: services.events,
                tenant: tenant.clone(),
                owner: services.owner,
                publish: spec.publish.clone(),
            }),
        };
        Ok(Self {
            seq,
            digest: digest.into(),
            name,
            tenant,
            spec: Arc::new(spec.clone()),
            limits: spec.limits,
            instance_pre,
            http,
            handler,
            grants,
            warm,
        })
    }

    /// The one-at-a-time pool for `kind`, when reuse is on (a WASIp3 component's HTTP
    /// calls have none: they go to [`Version::shared_http`]).
    fn pool(&self, kind: CallKind) -> Option<&WarmPool> {
        let warm = self.warm.as_ref()?;
        match (kind, &warm.http) {
            (CallKind::Http, HttpWarm::OneAtATime(pool)) => Some(pool),
            (CallKind::Http, HttpWarm::Shared(_)) => None,
            (CallKind::Message, _) => Some(&warm.messages),
        }
    }

    /// The store for one call: a warm instance when the entry opts into reuse and one is
    /// idle, else a fresh store. Either way the call's deadline and its own values (`env`:
    /// a delivery's event id) are set.
    pub fn lease(
        &self,
        kind: CallKind,
        deadline: Instant,
        env: &[(String, String)],
    ) -> wasmtime::Result<Lease> {
        let Some(pool) = self.pool(kind) else {
            // Fresh per call: the call's values are in its environment and its config.
            let mut store = self.new_store(deadline, env)?;
            store.data_mut().set_call_values(env);
            return Ok(Lease::fresh(store, None));
        };
        // Reused: the call's values only through `wasi:config`, set for every call, and
        // never in the environment, which a guest reads once and a warm instance keeps.
        let mut lease = match pool.take() {
            Some(mut lease) => {
                lease.store.data_mut().deadline = deadline;
                lease.store.set_epoch_deadline(1);
                lease
            }
            None => Lease::fresh(self.new_store(deadline, &[])?, Some(pool)),
        };
        lease.store.data_mut().set_call_values(env);
        Ok(lease)
    }

    /// Ends a call's use of its instance: a clean one goes back to the warm pool (when
    /// reuse is on and it is within its limits), any other is thrown away.
    pub fn give_back(&self, kind: CallKind, lease: Lease, clean: bool) {
        match self.pool(kind) {
            Some(pool) if clean && lease.exports.is_some() => pool.give_back(lease),
            _ => reuse::discard(lease.store),
        }
    }

    /// The shared instances a WASIp3 component's HTTP requests go to, when it opts into
    /// reuse.
    pub fn shared_http(&self) -> Option<&Arc<SharedInstances>> {
        match &self.warm.as_ref()?.http {
            HttpWarm::Shared(shared) => Some(shared),
            HttpWarm::OneAtATime(_) => None,
        }
    }

    /// Throws away this version's warm instances, idle ones now and busy ones when their
    /// call ends: it no longer serves.
    pub fn retire_warm(&self) {
        if let Some(warm) = &self.warm {
            match &warm.http {
                HttpWarm::OneAtATime(pool) => pool.retire_all(),
                HttpWarm::Shared(shared) => shared.retire_all(),
            }
            warm.messages.retire_all();
        }
    }

    /// The plain pre-instance (for the instantiation check).
    pub fn instance_pre(&self) -> &InstancePre<InstanceState> {
        &self.instance_pre
    }

    /// The HTTP pre-instance, when the component serves HTTP.
    pub fn http(&self) -> Option<&HttpPre> {
        self.http.as_ref()
    }

    /// The message-handler pre-instance, when the component handles messages.
    pub fn handler(&self) -> Option<&MessageHandlerPre<InstanceState>> {
        self.handler.as_ref()
    }

    /// A fresh store for one call: the memory limiter installed and an epoch callback
    /// that traps once `deadline` has passed and otherwise yields to the executor every
    /// tick. A guest still running at a tick is a long-running one: it gives back its
    /// tenant's CPU turn (if it held one) and queues (FIFO) for the next before it
    /// resumes, so one tenant's loops take at most `quota.cpu_threads` threads and leave
    /// the rest to other tenants. A turn is for running wasm: a guest that waits in the
    /// host gives it back (`runtime::cpu_turn`). Guests that finish within a tick never
    /// queue.
    pub fn new_store(
        &self,
        deadline: Instant,
        env: &[(String, String)],
    ) -> wasmtime::Result<Store<InstanceState>> {
        let mut state = InstanceState::new(&self.grants, env)?;
        state.deadline = deadline;
        let mut store = Store::new(self.instance_pre.engine(), state);
        store.limiter(|state| &mut state.limiter);
        // At least one tick, so that even instantiation runs under the deadline.
        store.set_epoch_deadline(1);
        let cpu = self.grants.owner.cpu.semaphore();
        store.epoch_deadline_callback(move |store| {
            // Read at every tick: a warm instance gets a new deadline for every call.
            let deadline = store.data().deadline;
            if Instant::now() >= deadline {
                return Err(DeadlineExceeded.into());
            }
            let turn = store.data().cpu_turn.clone();
            turn.give_back();
            let cpu = cpu.clone();
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    // Past the deadline the guest resumes without a turn and traps at the
                    // next tick (the call's own timeout has usually ended it already).
                    if let Ok(Ok(permit)) =
                        tokio::time::timeout_at(deadline.into(), cpu.acquire_owned()).await
                    {
                        turn.hold(permit);
                    }
                }),
            ))
        });
        Ok(store)
    }
}

//! Deployed components: each version is compiled once, linked against the node's linker
//! and pre-instantiated (`ProxyPre`) at load time; a request then only creates a `Store`
//! and instantiates from the pre-instance.
//!
//! Loading fails fast with a [`LoadError`] that names the component and the reason: an
//! unreadable file, bytes that are not a component, an import this host cannot satisfy
//! (named), a missing `wasi:http/incoming-handler` export, or a component that traps or
//! exceeds its limits while instantiating.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi_config::WasiConfigVariables;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::bindings::handler::MessageHandlerPre;
use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::instance::{Grants, InstanceState};
use crate::keyvalue::KeyValueGrant;
use crate::manifest::{ComponentSpec, Limits};
use crate::messaging::{MessageBus, MessagingGrant};
use crate::metrics::ComponentMetrics;
use crate::outbound::{InternalCalls, OutboundPolicy};
use crate::sql::SqlGrant;

/// The host interfaces every component may import. Interfaces are added here once per
/// node; what an instance may actually do is decided by its grants.
pub fn build_linker(engine: &Engine) -> anyhow::Result<Linker<InstanceState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    wasmtime_wasi_config::add_to_linker(&mut linker, InstanceState::config)?;
    crate::keyvalue::add_to_linker(&mut linker, InstanceState::keyvalue)?;
    crate::sql::add_to_linker(&mut linker, InstanceState::sql)?;
    crate::messaging::add_to_linker(&mut linker, InstanceState::messaging)?;
    Ok(linker)
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("component {component:?}: cannot read {}: {reason}", path.display())]
    Read {
        component: String,
        path: PathBuf,
        reason: String,
    },
    #[error("component {component:?}: {} is not a valid WebAssembly component: {reason}", path.display())]
    Compile {
        component: String,
        path: PathBuf,
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
}

/// What the node provides a deployment beyond its manifest entry.
pub struct NodeServices {
    pub metrics: ComponentMetrics,
    pub storage: StorageGrants,
    /// Where its `NAME.internal` calls go (none: refused).
    pub internal_calls: Option<InternalCalls>,
    pub bus: Arc<dyn MessageBus>,
}

/// The storage capabilities a deployment was granted, prepared before it is compiled.
#[derive(Default)]
pub struct StorageGrants {
    pub keyvalue: Option<Arc<KeyValueGrant>>,
    pub sql: Option<Arc<SqlGrant>>,
}

/// Raised from the epoch callback when a request's deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("the request deadline passed")]
pub struct DeadlineExceeded;

/// One component version, ready to serve.
pub struct Deployment {
    pub name: Arc<str>,
    pub tenant: Arc<str>,
    pub source: PathBuf,
    pub limits: Limits,
    pub metrics: ComponentMetrics,
    instance_pre: InstancePre<InstanceState>,
    /// Present when the component exports `wasi:http/incoming-handler`.
    http: Option<ProxyPre<InstanceState>>,
    /// Present when the component exports `wasmcloud:messaging/handler`.
    handler: Option<MessageHandlerPre<InstanceState>>,
    grants: Grants,
    admission: Arc<Semaphore>,
}

impl Deployment {
    /// Compiles and links a component. Blocking (it runs Cranelift): call it off the
    /// async executor.
    pub fn load(
        engine: &Engine,
        linker: &Linker<InstanceState>,
        name: &str,
        spec: &ComponentSpec,
        services: NodeServices,
    ) -> Result<Self, LoadError> {
        let NodeServices {
            metrics,
            storage,
            internal_calls,
            bus,
        } = services;
        let component_name = name.to_string();
        let bytes = std::fs::read(&spec.source).map_err(|e| LoadError::Read {
            component: component_name.clone(),
            path: spec.source.clone(),
            reason: e.to_string(),
        })?;
        let component = Component::new(engine, &bytes).map_err(|e| LoadError::Compile {
            component: component_name.clone(),
            path: spec.source.clone(),
            reason: format!("{e:#}"),
        })?;
        let instance_pre =
            linker
                .instantiate_pre(&component)
                .map_err(|e| LoadError::MissingImport {
                    component: component_name.clone(),
                    reason: format!("{e:#}"),
                })?;
        let http = ProxyPre::new(instance_pre.clone()).ok();
        let handler = MessageHandlerPre::new(instance_pre.clone()).ok();
        let missing_export = |reason: String| LoadError::MissingExport {
            component: component_name.clone(),
            reason,
        };
        if http.is_none() && !spec.routes.is_empty() {
            return Err(missing_export(
                "it has routes but does not export wasi:http/incoming-handler@0.2.x".into(),
            ));
        }
        if handler.is_none() && !spec.subscriptions.is_empty() {
            return Err(missing_export(
                "it has subscriptions but does not export wasmcloud:messaging/handler@0.2.0".into(),
            ));
        }
        if http.is_none() && handler.is_none() {
            return Err(missing_export(
                "it exports neither wasi:http/incoming-handler@0.2.x nor wasmcloud:messaging/handler@0.2.0".into(),
            ));
        }

        let tenant: Arc<str> = spec.tenant.as_str().into();
        let name: Arc<str> = name.into();
        let grants = Grants {
            tenant: tenant.clone(),
            component: name.clone(),
            memory_limit: usize::try_from(spec.limits.memory.as_u64()).unwrap_or(usize::MAX),
            config: Arc::new(spec.config.iter().collect::<WasiConfigVariables>()),
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
            outbound: OutboundPolicy::new(&spec.outbound, internal_calls),
            keyvalue: storage.keyvalue,
            sql: storage.sql,
            messaging: Arc::new(MessagingGrant {
                bus,
                tenant: tenant.clone(),
                publish: spec.publish.clone(),
            }),
        };
        Ok(Self {
            name,
            tenant,
            source: spec.source.clone(),
            limits: spec.limits,
            metrics,
            instance_pre,
            http,
            handler,
            grants,
            admission: Arc::new(Semaphore::new(spec.limits.max_concurrent as usize)),
        })
    }

    /// Instantiates once and throws the instance away: proves the component starts
    /// within its limits before the node calls itself ready.
    pub async fn check_instantiates(&self) -> Result<(), LoadError> {
        let fail = |reason: String| LoadError::Instantiate {
            component: self.name.to_string(),
            reason,
        };
        let mut store = self
            .new_store(Instant::now() + self.limits.deadline)
            .map_err(|e| fail(format!("{e:#}")))?;
        match self.instance_pre.instantiate_async(&mut store).await {
            Ok(_) => Ok(()),
            Err(_) if store.data().limiter.refused => Err(fail(format!(
                "its initial memory is above limits.memory ({})",
                self.limits.memory
            ))),
            Err(e) => Err(fail(format!("{e:#}"))),
        }
    }

    /// Takes one of the component's `max_concurrent` slots, or `None` when all are taken.
    /// Taken before instantiation and held until the instance is gone.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        self.admission.clone().try_acquire_owned().ok()
    }

    /// Waits for one of the component's slots (message delivery: backpressure, not refusal).
    pub async fn admit_waiting(&self) -> OwnedSemaphorePermit {
        self.admission
            .clone()
            .acquire_owned()
            .await
            .expect("the admission semaphore is never closed")
    }

    /// The HTTP pre-instance, when the component serves HTTP.
    pub fn http(&self) -> Option<&ProxyPre<InstanceState>> {
        self.http.as_ref()
    }

    /// Runs `handle-message` in a fresh instance, under the component's limits. The error
    /// says why the message was not handled: the guest's own error, a trap, the deadline.
    pub async fn handle_message(&self, message: &BrokerMessage) -> Result<(), String> {
        let Some(handler) = &self.handler else {
            return Err("the component does not export wasmcloud:messaging/handler".into());
        };
        let deadline = Instant::now() + self.limits.deadline;
        let mut store = self.new_store(deadline).map_err(|e| format!("{e:#}"))?;
        let run = async {
            let instance = handler.instantiate_async(&mut store).await?;
            instance
                .wasmcloud_messaging_handler()
                .call_handle_message(&mut store, message)
                .await
        };
        match tokio::time::timeout_at(deadline.into(), run).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(guest_error))) => {
                Err(format!("the handler returned an error: {guest_error}"))
            }
            Ok(Err(_)) if store.data().limiter.refused => Err(format!(
                "the handler exceeded its memory limit of {}",
                self.limits.memory
            )),
            Ok(Err(e)) if e.downcast_ref::<DeadlineExceeded>().is_some() => Err(format!(
                "the handler ran past its deadline of {:?}",
                self.limits.deadline
            )),
            Ok(Err(e)) => Err(format!("the handler trapped: {}", e.root_cause())),
            Err(_) => Err(format!(
                "the handler ran past its deadline of {:?}",
                self.limits.deadline
            )),
        }
    }

    /// A fresh store for one call: the memory limiter installed and an epoch callback
    /// that yields to the executor every tick and traps once `deadline` has passed.
    pub fn new_store(&self, deadline: Instant) -> wasmtime::Result<Store<InstanceState>> {
        let mut store = Store::new(
            self.instance_pre.engine(),
            InstanceState::new(&self.grants)?,
        );
        store.limiter(|state| &mut state.limiter);
        // At least one tick, so that even instantiation runs under the deadline.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Err(DeadlineExceeded.into())
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        Ok(store)
    }
}

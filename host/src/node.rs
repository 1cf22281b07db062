//! A running node: the engine, the gateway, and loading every component of the manifest.
//!
//! `trellis up` binds the listener first so that `/health` answers while components
//! compile, loads every component (compile, link, trial instantiation), and only then
//! installs the routing table and reports ready. A component that fails to load stops the
//! node with the reason: a node does not half-start with routes silently missing.
//! `trellis check` runs the same loading without serving.

use std::sync::{Arc, Weak};
use std::time::Instant;

use anyhow::{Context, Result};
use wasmtime::component::Linker;

use crate::component::{Deployment, LoadError, NodeServices, StorageGrants, build_linker};
use crate::gateway::Gateway;
use crate::instance::InstanceState;
use crate::keyvalue::KeyValueGrant;
use crate::manifest::{ComponentSpec, LoadedManifest};
use crate::messaging::MessageBus;
use crate::metrics::Metrics;
use crate::outbound::InternalCalls;
use crate::router::Router;
use crate::runtime::{EngineSettings, Runtime};
use crate::sql::SqlGrant;
use crate::storage::Storage;

/// The engine and linker a node's components are loaded with.
pub struct Host {
    pub runtime: Runtime,
    pub linker: Arc<Linker<InstanceState>>,
    pub storage: Storage,
    pub bus: Arc<dyn MessageBus>,
}

impl Host {
    /// `serving`: whether the node will serve (connects NATS if configured); `check` and
    /// tools pass false and get the in-process bus, which touches no network.
    pub async fn new(manifest: &LoadedManifest, serving: bool) -> Result<Self> {
        let node = &manifest.manifest.node;
        let runtime = Runtime::new(&EngineSettings {
            max_instances: node.max_instances,
            max_instance_memory: node.max_instance_memory.as_u64(),
            cache_dir: Some(
                node.cache_dir
                    .clone()
                    .unwrap_or_else(|| node.data_dir.join("compile-cache")),
            ),
        })?;
        let linker =
            Arc::new(build_linker(&runtime.engine).context("linking the host interfaces")?);
        let storage = Storage::open(&node.data_dir, node.database_url.as_deref()).await?;
        let bus = crate::messaging::connect(if serving {
            node.nats_url.as_deref()
        } else {
            None
        })
        .await?;
        Ok(Self {
            runtime,
            linker,
            storage,
            bus,
        })
    }

    /// Loads one component: compile (off the executor), link, trial-instantiate. With a
    /// gateway, its `NAME.internal` calls are served there.
    pub async fn load_component(
        &self,
        manifest: &LoadedManifest,
        name: &str,
        metrics: &Metrics,
        gateway: Option<Weak<Gateway>>,
    ) -> Result<Arc<Deployment>, LoadError> {
        let spec = &manifest.manifest.components[name];
        let component_metrics = metrics.for_component(&spec.tenant, name);
        let storage = self.storage_grants(name, spec).await?;
        let bus = self.bus.clone();
        let internal_calls = gateway.map(|gateway| InternalCalls {
            gateway,
            tenant: spec.tenant.as_str().into(),
        });
        // Compiling runs Cranelift for a while: keep it off the async workers.
        let (engine, linker) = (self.runtime.engine.clone(), self.linker.clone());
        let (owned_name, owned_spec) = (name.to_string(), spec.clone());
        let deployment = tokio::task::spawn_blocking(move || {
            let services = NodeServices {
                metrics: component_metrics,
                storage,
                internal_calls,
                bus,
            };
            Deployment::load(&engine, &linker, &owned_name, &owned_spec, services)
        })
        .await
        .map_err(|e| LoadError::Compile {
            component: name.to_string(),
            path: spec.source.clone(),
            reason: format!("the compile task failed: {e}"),
        })??;
        deployment.check_instantiates().await?;
        Ok(Arc::new(deployment))
    }

    /// Opens the component's database when it is granted any storage, and prepares each
    /// granted capability on it.
    async fn storage_grants(
        &self,
        name: &str,
        spec: &ComponentSpec,
    ) -> Result<StorageGrants, LoadError> {
        if spec.keyvalue.is_empty() && !spec.sql {
            return Ok(StorageGrants::default());
        }
        let storage_error = |e: anyhow::Error| LoadError::Storage {
            component: name.to_string(),
            reason: format!("{e:#}"),
        };
        let database = self
            .storage
            .component_database(&spec.tenant, name)
            .await
            .map_err(storage_error)?;
        let keyvalue = if spec.keyvalue.is_empty() {
            None
        } else {
            Some(Arc::new(
                KeyValueGrant::new(database.clone(), &spec.keyvalue)
                    .await
                    .map_err(storage_error)?,
            ))
        };
        if let Some(dir) = &spec.migrations {
            let applied = database.migrate(dir).await.map_err(storage_error)?;
            if !applied.is_empty() {
                tracing::info!(component = name, ?applied, "applied migrations");
            }
        }
        let sql = spec.sql.then(|| Arc::new(SqlGrant::new(database)));
        Ok(StorageGrants { keyvalue, sql })
    }

    /// Loads every component of the manifest; all failures are reported, not just the first.
    pub async fn load_all(
        &self,
        manifest: &LoadedManifest,
        metrics: &Metrics,
        gateway: Option<Weak<Gateway>>,
    ) -> Result<Router, Vec<LoadError>> {
        let mut loaded = Vec::new();
        let mut failures = Vec::new();
        for (name, spec) in &manifest.manifest.components {
            let started = Instant::now();
            match self
                .load_component(manifest, name, metrics, gateway.clone())
                .await
            {
                Ok(deployment) => {
                    tracing::info!(
                        tenant = %spec.tenant,
                        component = %name,
                        routes = ?spec.routes,
                        elapsed = ?started.elapsed(),
                        "component loaded"
                    );
                    loaded.push((deployment, spec.routes.clone()));
                }
                Err(e) => failures.push(e),
            }
        }
        if failures.is_empty() {
            Ok(Router::new(&manifest.tenants(), loaded))
        } else {
            Err(failures)
        }
    }
}

/// `trellis up`: serve until SIGINT/SIGTERM. Returns an error (exit 1) when the manifest's
/// components cannot all be loaded.
pub async fn up(manifest: LoadedManifest) -> Result<()> {
    let settings = &manifest.manifest.node;
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating node.data_dir {}", settings.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {} (node.listen)", settings.listen))?;
    let local_addr = listener.local_addr()?;
    let gateway = Arc::new(Gateway::new(local_addr));
    // A stable line on stdout that scripts and tests can wait for.
    println!("trellis listening on http://{local_addr}");
    tracing::info!(manifest = %manifest.path.display(), %local_addr, "node starting");

    let server = tokio::spawn(gateway.clone().serve(listener, shutdown_signal()));
    let host = Host::new(&manifest, true).await?;
    match host
        .load_all(&manifest, &gateway.metrics, Some(Arc::downgrade(&gateway)))
        .await
    {
        Ok(router) => {
            let count = router.deployments().len();
            for deployment in router.deployments() {
                let patterns = &manifest.manifest.components[&*deployment.name].subscriptions;
                if !patterns.is_empty() {
                    crate::messaging::start_subscriptions(&host.bus, deployment.clone(), patterns)
                        .await?;
                    tracing::info!(component = %deployment.name, subscriptions = ?patterns, "subscribed");
                }
            }
            let _ = gateway.router.set(router);
            tracing::info!(components = count, "node ready");
        }
        Err(failures) => {
            for failure in &failures {
                tracing::error!("{failure}");
            }
            anyhow::bail!(
                "{} component(s) failed to load:\n{}",
                failures.len(),
                failures
                    .iter()
                    .map(|f| format!("  {f}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    server.await.context("the gateway task failed")?;
    // The host (engine, pre-instances) lives until every request has finished.
    drop(host);
    Ok(())
}

/// `trellis check`: load every component without serving. Prints a report; returns whether
/// everything loaded.
pub async fn check(manifest: LoadedManifest) -> Result<bool> {
    let host = Host::new(&manifest, false).await?;
    let metrics = Metrics::default();
    let mut ok = true;
    println!("manifest {}: valid", manifest.path.display());
    for (tenant, hosts) in manifest.tenants() {
        println!("tenant {tenant}: hosts {}", hosts.join(", "));
    }
    for (name, spec) in &manifest.manifest.components {
        let started = Instant::now();
        match host.load_component(&manifest, name, &metrics, None).await {
            Ok(_) => println!(
                "ok      component {name} (tenant {}, routes {}) loaded in {} ms",
                spec.tenant,
                if spec.routes.is_empty() {
                    "none".to_string()
                } else {
                    spec.routes.join(" ")
                },
                started.elapsed().as_millis()
            ),
            Err(e) => {
                ok = false;
                println!("FAILED  {e}");
            }
        }
    }
    Ok(ok)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
}

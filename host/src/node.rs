//! A running node: binds the gateway and the admin listener, builds the engine, storage,
//! bus and registry, deploys what the node should run (stored state, then the manifest),
//! and serves until SIGINT/SIGTERM.
//!
//! `trellis up` binds its listeners first so that `/health` answers while components
//! compile, and reports ready only once every component loaded. A manifest component that
//! fails to load stops the node with the reason: a node does not half-start with routes
//! silently missing. `trellis check` runs the same loading without serving or persisting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::admin::Admin;
use crate::deploy::registry::{Registry, RegistryConfig};
use crate::deploy::state::StateStore;
use crate::gateway::Gateway;
use crate::manifest::LoadedManifest;
use crate::runtime::engine::{EngineSettings, Runtime};
use crate::storage::Storage;

/// Options of `trellis up` beyond the manifest.
#[derive(Debug, Default, Clone)]
pub struct UpOptions {
    /// Redeploy components whose source or manifest entry changes.
    pub watch: bool,
}

/// Builds the engine and the registry. `serving`: connect NATS and keep desired state
/// (`check` passes false: the in-process bus, nothing persisted).
async fn build_registry(
    manifest: &LoadedManifest,
    local_addr: SocketAddr,
    serving: bool,
) -> Result<(Runtime, Arc<Registry>)> {
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
    let linkers = Arc::new(
        crate::runtime::instance::Linkers::new(&runtime.engines)
            .context("linking the host interfaces")?,
    );
    let storage = Storage::open(&node.data_dir, node.database_url.as_deref()).await?;
    let (bus, nats) = crate::capabilities::messaging::connect(if serving {
        node.nats_url.as_deref()
    } else {
        None
    })
    .await?;
    let events = if serving {
        crate::capabilities::events::open(&node.events, &node.data_dir, nats, bus.clone()).await?
    } else {
        Arc::new(crate::capabilities::events::EphemeralLog::new(bus.clone()))
    };
    let state = if serving {
        Some(StateStore::open(&node.data_dir, node.database_url.as_deref()).await?)
    } else {
        None
    };
    let config = RegistryConfig {
        node: clone_settings(node),
        tenants: manifest.tenant_specs(),
        local_addr,
    };
    let registry = Registry::new(
        config,
        runtime.engines.clone(),
        linkers,
        storage,
        bus,
        events,
        state,
    );
    Ok((runtime, registry))
}

fn clone_settings(node: &crate::manifest::NodeSettings) -> crate::manifest::NodeSettings {
    crate::manifest::NodeSettings {
        listen: node.listen,
        data_dir: node.data_dir.clone(),
        max_instances: node.max_instances,
        max_instance_memory: node.max_instance_memory,
        database_url: node.database_url.clone(),
        nats_url: node.nats_url.clone(),
        cache_dir: node.cache_dir.clone(),
        admin_listen: node.admin_listen,
        admin_token: None,
        max_component_size: node.max_component_size,
        max_memory: node.max_memory,
        events: node.events.clone(),
        tenant_quota: node.tenant_quota,
        registries: node.registries.clone(),
    }
}

/// `trellis up`: serve until SIGINT/SIGTERM. Returns an error (exit 1) when the manifest's
/// components cannot all be loaded.
pub async fn up(manifest: LoadedManifest, options: UpOptions) -> Result<()> {
    raise_open_file_limit();
    let settings = &manifest.manifest.node;
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating node.data_dir {}", settings.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {} (node.listen)", settings.listen))?;
    let admin_listener = tokio::net::TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (node.admin_listen)",
                settings.admin_listen
            )
        })?;
    let local_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let (token, token_source) =
        crate::admin::auth::resolve_token(settings.admin_token.as_deref(), &settings.data_dir)?;
    tracing::info!(manifest = %manifest.path.display(), %local_addr, "node starting");

    let (runtime, registry) = build_registry(&manifest, local_addr, true).await?;
    let gateway = Arc::new(Gateway::new(registry.clone(), local_addr));
    let admin = Arc::new(Admin::new(registry.clone(), token));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait_stop = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let server = tokio::spawn(gateway.clone().serve(listener, wait_stop(stopped.clone())));
    let admin_server = tokio::spawn(admin.serve(admin_listener, wait_stop(stopped.clone())));
    // Stable lines on stdout that scripts and tests can wait for.
    println!("trellis listening on http://{local_addr}");
    println!("trellis admin listening on http://{admin_addr}");
    tracing::info!(%admin_addr, token = %token_source, "admin API listening (bearer token from {token_source})");
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });

    if let Err(failures) = registry.start(&manifest).await {
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
    registry.retain_claimed_consumers().await;
    registry.set_ready();
    tracing::info!(components = registry.slots().len(), "node ready");
    if options.watch {
        let (registry, manifest) = (registry.clone(), manifest);
        tokio::spawn(async move {
            if let Err(e) = crate::deploy::watch::watch(registry, manifest).await {
                tracing::error!(error = %format!("{e:#}"), "watching stopped");
            }
        });
    }
    server.await.context("the gateway task failed")?;
    let _ = admin_server.await;
    // The engine lives until every request has finished.
    drop(registry);
    drop(runtime);
    Ok(())
}

/// `trellis check`: load every component without serving. Prints a report; returns whether
/// everything loaded.
pub async fn check(manifest: LoadedManifest) -> Result<bool> {
    let (_runtime, registry) =
        build_registry(&manifest, SocketAddr::from(([127, 0, 0, 1], 0)), false).await?;
    let mut ok = true;
    println!("manifest {}: valid", manifest.path.display());
    for (tenant, hosts) in manifest.tenants() {
        println!("tenant {tenant}: hosts {}", hosts.join(", "));
    }
    for (name, spec) in &manifest.manifest.components {
        let started = Instant::now();
        match registry.deploy_manifest_entry(name, spec).await {
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

/// Raises the soft limit on open files to the hard one: each component's database holds
/// files while it is in use, and a node with thousands of tenants needs more than the
/// common default of 1024.
fn raise_open_file_limit() {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                tracing::debug!(
                    from = limit.rlim_cur,
                    to = limit.rlim_max,
                    "raised the open-file limit"
                );
            }
        }
    }
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

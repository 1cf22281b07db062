//! `trellis up --watch`: a changed `.wasm` under the manifest's sources, or a changed
//! manifest entry, becomes a new version and is swapped in; an entry that left the
//! manifest is removed. A broken build or a bad edit is logged and the running version
//! keeps serving. Directories are watched (not files), so editors and build tools that
//! replace a file by renaming are seen too; events are debounced.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_mini::{DebounceEventResult, new_debouncer};

use crate::deploy::registry::Registry;
use crate::manifest::{self, LoadedManifest};

/// How long the files must be quiet before a change is acted on.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Watches until the node stops. `manifest` is the one the node started with.
pub async fn watch(registry: Arc<Registry>, manifest: LoadedManifest) -> anyhow::Result<()> {
    let manifest_path = std::path::absolute(&manifest.path)?;
    let (events, mut changes) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut debouncer = new_debouncer(DEBOUNCE, move |result: DebounceEventResult| {
        let paths = match result {
            Ok(batch) => batch.into_iter().map(|e| e.path).collect(),
            Err(e) => {
                // A lost event (an overflowing queue, a directory that went away) is a
                // change we cannot name: look at everything again.
                tracing::warn!(error = %e, "watch: events were lost; checking every component");
                vec![PathBuf::new()]
            }
        };
        let _ = events.send(paths);
    })?;
    let mut watched: BTreeSet<PathBuf> = BTreeSet::new();
    let mut current = manifest;
    rewatch(&mut debouncer, &mut watched, &manifest_path, &current);
    tracing::info!(manifest = %manifest_path.display(), "watching the manifest and its components' sources");

    while let Some(mut paths) = changes.recv().await {
        // Take whatever else arrived meanwhile in one go.
        while let Ok(more) = changes.try_recv() {
            paths.extend(more);
        }
        let relevant = paths.iter().any(|p| {
            p.as_os_str().is_empty()
                || p == &manifest_path
                || current
                    .manifest
                    .components
                    .values()
                    .filter_map(|c| c.source.as_ref())
                    .any(|source| source == p)
        });
        if !relevant {
            continue;
        }
        let next = match manifest::load(&manifest_path) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!("the manifest changed but is invalid; nothing was redeployed: {e}");
                continue;
            }
        };
        apply(&registry, &current, &next).await;
        current = next;
        if paths.iter().any(|p| p.as_os_str().is_empty()) {
            // Directories may have been removed and made again: watch them afresh.
            watched.clear();
        }
        rewatch(&mut debouncer, &mut watched, &manifest_path, &current);
    }
    Ok(())
}

/// Deploys what changed between two readings of the manifest.
async fn apply(registry: &Registry, old: &LoadedManifest, new: &LoadedManifest) {
    if old.manifest.tenants.keys().ne(new.manifest.tenants.keys()) {
        tracing::warn!("tenants changed in the manifest; they take effect at the next restart");
    }
    for (name, spec) in &new.manifest.components {
        if !registry.manifest_entry_changed(name, spec).await {
            continue;
        }
        match registry.deploy_manifest_entry(name, spec).await {
            Ok(version) => {
                tracing::info!(component = %name, version = %version.digest, seq = version.seq, "watch: new version active")
            }
            Err(e) => {
                tracing::error!(component = %name, "watch: new version refused, the running version keeps serving: {e}")
            }
        }
    }
    for (name, spec) in &old.manifest.components {
        let still_there = new
            .manifest
            .components
            .get(name)
            .is_some_and(|s| s.tenant == spec.tenant);
        if !still_there {
            registry.remove_manifest_entry(&spec.tenant, name).await;
        }
    }
}

/// Watches the manifest's directory and every source's directory.
fn rewatch(
    debouncer: &mut notify_debouncer_mini::Debouncer<notify::RecommendedWatcher>,
    watched: &mut BTreeSet<PathBuf>,
    manifest_path: &Path,
    manifest: &LoadedManifest,
) {
    let mut wanted: BTreeSet<PathBuf> = manifest
        .manifest
        .components
        .values()
        .filter_map(|c| c.source.as_ref())
        // A registry source has no file to watch; a new tag is deployed by the API or a
        // manifest change.
        .filter(|source| manifest::component_oci_reference(source).is_none())
        .filter_map(|source| source.parent().map(Path::to_path_buf))
        .collect();
    if let Some(dir) = manifest_path.parent() {
        wanted.insert(dir.to_path_buf());
    }
    for dir in watched.difference(&wanted) {
        let _ = debouncer.watcher().unwatch(dir);
    }
    let mut now_watched = BTreeSet::new();
    for dir in &wanted {
        if watched.contains(dir) {
            now_watched.insert(dir.clone());
            continue;
        }
        let _ = debouncer.watcher().unwatch(dir);
        match debouncer.watcher().watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                now_watched.insert(dir.clone());
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "watch: cannot watch; will try again at the next change")
            }
        }
    }
    *watched = now_watched;
}

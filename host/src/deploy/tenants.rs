//! Tenants changed at runtime, through the registry: created, changed (hosts, config,
//! quota: in force at once) and removed (its traffic refused at once, its data kept or
//! deleted on request), and their tokens issued and revoked. Every change is persisted in
//! the state store, so a restart brings it back; a tenant the manifest declares and the
//! API changed keeps the API's version only while its manifest entry stays the same.
//!
//! The quota checks that happen at deploy time live here too: how many components a
//! tenant has, and the size of their code.

use std::sync::Arc;

use crate::deploy::registry::{DeployError, Registry, over_quota};
use crate::deploy::state::StoredTenant;
use crate::manifest::{LoadedManifest, Problem, TenantSpec};
use crate::tenancy::tokens::{TokenRecord, TokenSet};
use crate::tenancy::{Tenant, TenantError, TenantOrigin, quota};

/// What becomes of a removed tenant's databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantData {
    Keep,
    Delete,
}

impl From<TenantError> for DeployError {
    fn from(e: TenantError) -> Self {
        match e {
            TenantError::Unknown(name) => DeployError::unknown_tenant(&name),
            TenantError::Invalid(problems) => {
                DeployError::with_problems(422, "invalid_tenant", problems)
            }
        }
    }
}

fn entry_of(spec: &TenantSpec) -> String {
    serde_json::to_string(spec).expect("a tenant serializes")
}

impl Registry {
    /// Brings back the tenants the API created or changed (before any component starts).
    pub(super) async fn restore_tenants(&self, manifest: &LoadedManifest) {
        let Some(state) = &self.state else { return };
        let stored = state.load_tenants().await.unwrap_or_else(|e| {
            tracing::error!(error = %format!("{e:#}"), "cannot read the stored tenants");
            Vec::new()
        });
        for (name, tenant) in stored {
            let declared = manifest.manifest.tenants.get(&name);
            let applies = match (tenant.origin, declared) {
                (TenantOrigin::Api, None) => true,
                (_, Some(declared)) => tenant.manifest_entry == Some(entry_of(declared)),
                (TenantOrigin::Manifest, None) => false,
            };
            if !applies {
                tracing::info!(tenant = %name, "the manifest changed since this tenant was changed through the API; the manifest wins");
                let _ = state.remove_tenant(&name).await;
                continue;
            }
            if let Err(e) = self.tenants.put(&name, tenant.spec, tenant.origin) {
                tracing::error!(tenant = %name, error = %e, "cannot restore a stored tenant");
            }
        }
        match state.load_tokens().await {
            Ok(records) => {
                for record in records {
                    if self.tenant_exists(&record.tenant) {
                        self.tokens.insert(record);
                    }
                }
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot read the tenant tokens"),
        }
        self.rebuild_table(None, None);
    }

    /// Creates a tenant or changes one; answers it and whether it was created.
    pub async fn put_tenant(
        &self,
        name: &str,
        spec: TenantSpec,
    ) -> Result<(Arc<Tenant>, bool), DeployError> {
        let _change = self.changes.lock().await;
        let before = self.tenants.get(name);
        let origin = before.as_ref().map_or(TenantOrigin::Api, |t| t.origin());
        // For a tenant the manifest declares: its entry as the manifest has it (kept
        // from the first API change on), which decides at restart whose version applies.
        let manifest_entry = match (&before, &self.state) {
            (Some(tenant), Some(state)) if origin == TenantOrigin::Manifest => state
                .load_tenants()
                .await
                .ok()
                .and_then(|all| all.into_iter().find(|(n, _)| n == name))
                .and_then(|(_, stored)| stored.manifest_entry)
                .or_else(|| Some(entry_of(&tenant.spec()))),
            _ => None,
        };
        let (tenant, created) = self.tenants.put(name, spec.clone(), origin)?;
        if let Some(state) = &self.state {
            let stored = StoredTenant {
                spec,
                origin,
                manifest_entry,
            };
            state
                .save_tenant(name, &stored)
                .await
                .map_err(|e| DeployError::new(500, "state_failed", format!("{e:#}")))?;
        }
        self.rebuild_table(None, None);
        tracing::info!(
            tenant = name,
            created,
            "tenant {}",
            if created { "created" } else { "changed" }
        );
        Ok((tenant, created))
    }

    /// Removes a tenant: its routes and subscriptions stop at once, its components and
    /// tokens go, its databases are kept or deleted as `data` says.
    pub async fn remove_tenant(&self, name: &str, data: TenantData) -> Result<(), DeployError> {
        let _change = self.changes.lock().await;
        let tenant = self
            .tenants
            .get(name)
            .ok_or_else(|| TenantError::Unknown(name.to_string()))?;
        if tenant.origin() == TenantOrigin::Manifest {
            return Err(DeployError::new(
                409,
                "declared_in_manifest",
                "this tenant is declared in the manifest; remove it there",
            ));
        }
        self.tenants.remove(name)?;
        self.rebuild_table(None, None);
        // Taken before the slots go (removing a slot forgets its database).
        let databases: Vec<_> = {
            let mut open = self.databases.lock().await;
            let keys: Vec<_> = open.keys().filter(|(t, _)| t == name).cloned().collect();
            keys.into_iter().filter_map(|k| open.remove(&k)).collect()
        };
        for slot in self.slots().into_iter().filter(|s| &*s.tenant == name) {
            self.remove_locked(&slot).await;
        }
        self.pending
            .lock()
            .expect("pending lock")
            .retain(|(t, _), _| t != name);
        self.tokens.revoke_all(name);
        if let Some(state) = &self.state
            && let Err(e) = state.remove_tenant(name).await
        {
            tracing::error!(tenant = name, error = %format!("{e:#}"), "cannot forget a removed tenant");
        }
        if data == TenantData::Delete {
            for open in &databases {
                open.database.close().await;
            }
            self.storage
                .delete_tenant(name)
                .await
                .map_err(|e| DeployError::new(500, "delete_failed", format!("{e:#}")))?;
        }
        tracing::info!(tenant = name, data = ?data, "tenant removed");
        Ok(())
    }

    /// A new token for `tenant`: the token itself (shown once) and its record.
    pub async fn issue_token(
        &self,
        tenant: &str,
        label: Option<String>,
    ) -> Result<(String, TokenRecord), DeployError> {
        let _change = self.changes.lock().await;
        if !self.tenant_exists(tenant) {
            return Err(TenantError::Unknown(tenant.to_string()).into());
        }
        let (token, record) = TokenSet::issue(tenant, label)
            .map_err(|e| DeployError::new(500, "token_failed", e.to_string()))?;
        if let Some(state) = &self.state {
            state
                .save_token(&record)
                .await
                .map_err(|e| DeployError::new(500, "state_failed", format!("{e:#}")))?;
        }
        self.tokens.insert(record.clone());
        tracing::info!(tenant, id = %record.id, "tenant token issued");
        Ok((token, record))
    }

    pub async fn revoke_token(&self, tenant: &str, id: &str) -> Result<(), DeployError> {
        let _change = self.changes.lock().await;
        if !self.tokens.revoke(tenant, id) {
            return Err(DeployError::new(
                404,
                "unknown_token",
                format!("tenant {tenant:?} has no token {id:?}"),
            ));
        }
        if let Some(state) = &self.state
            && let Err(e) = state.remove_token(id).await
        {
            tracing::error!(tenant, id, error = %format!("{e:#}"), "cannot forget a revoked token");
        }
        tracing::info!(tenant, id, "tenant token revoked");
        Ok(())
    }

    /// Refuses a new component past the tenant's `quota.max_components`.
    pub(super) fn check_component_count(
        &self,
        owner: &Tenant,
        name: &str,
    ) -> Result<(), DeployError> {
        let Some(max) = owner.quota().max_components else {
            return Ok(());
        };
        let pending = self.pending.lock().expect("pending lock");
        let count = self
            .slots()
            .iter()
            .filter(|s| s.tenant == owner.name && &*s.name != name)
            .count()
            + pending
                .keys()
                .filter(|(t, n)| *t == *owner.name && n != name)
                .count();
        if count as u64 >= u64::from(max) {
            let reason =
                format!("the tenant has {count} components; its quota.max_components is {max}");
            owner.breach(quota::COMPONENTS, &reason);
            return Err(over_quota(vec![Problem {
                field: format!("tenants.{}.quota.max_components", owner.name),
                reason,
            }]));
        }
        Ok(())
    }

    /// Refuses code that would take the tenant's active code past `quota.max_code_size`.
    pub(super) fn check_code_size(
        &self,
        owner: &Tenant,
        name: &str,
        size: u64,
    ) -> Result<(), DeployError> {
        let Some(max) = owner.quota().max_code_size else {
            return Ok(());
        };
        let others: u64 = self
            .slots()
            .iter()
            .filter(|s| s.tenant == owner.name && &*s.name != name)
            .map(|s| s.code_size())
            .sum();
        if others + size > max.as_u64() {
            let reason = format!(
                "{size} bytes of code with the {others} its other components run is more than its quota.max_code_size ({max})"
            );
            owner.breach(quota::CODE_SIZE, &reason);
            return Err(over_quota(vec![Problem {
                field: format!("tenants.{}.quota.max_code_size", owner.name),
                reason,
            }]));
        }
        Ok(())
    }
}

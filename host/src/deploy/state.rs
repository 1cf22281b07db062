//! The node's desired state: what was deployed through the admin API (or changed since
//! the manifest was read), so that a restart brings it back. One row per component, its
//! state as JSON, in SQLite under the data dir (`DATA_DIR/node.db`) or, when the node has
//! a `database_url`, in that PostgreSQL database (table `trellis_deployments`). Only this
//! module knows where it lives.
//!
//! How it combines with the manifest (see the registry): a component the manifest declares
//! is restored from here only while its manifest entry (and source bytes) are unchanged
//! since the API last changed it; an edited manifest entry wins. Components created
//! through the API live only here.
//!
//! Tenants created or changed through the API (`trellis_tenants`) and tenant tokens
//! (`trellis_tenant_tokens`, hashes only) are kept here too.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::deploy::canary::CanaryPolicy;
use crate::manifest::{ComponentSpec, TenantSpec};
use crate::tenancy::TenantOrigin;
use crate::tenancy::tokens::TokenRecord;

/// Where a component's entry came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Declared in the manifest; the fingerprint is of its entry and source bytes.
    Manifest { fingerprint: String },
    /// Created through the admin API.
    Api,
}

/// A version as it is stored: its code (by digest) and the entry it runs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub digest: String,
    pub spec: ComponentSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryRecord {
    pub version: VersionRecord,
    pub policy: CanaryPolicy,
}

/// Code uploaded for a component, active or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnownVersion {
    pub digest: String,
    pub size: u64,
    pub uploaded_at: String,
}

/// Something that happened to a component's versions, kept for `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at: String,
    /// `activated`, `rolled_back`, `canary_started`, `canary_promoted`, `canary_aborted`,
    /// `canary_rolled_back`.
    pub event: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A deployed component's versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub origin: Origin,
    pub active: VersionRecord,
    pub previous: Option<VersionRecord>,
    pub canary: Option<CanaryRecord>,
    pub versions: Vec<KnownVersion>,
    pub events: Vec<Event>,
}

/// One stored component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoredComponent {
    Deployed(Box<SlotRecord>),
    /// Created through the API, waiting for its first version.
    Pending {
        spec: Box<ComponentSpec>,
    },
}

/// A tenant created or changed through the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredTenant {
    pub spec: TenantSpec,
    pub origin: TenantOrigin,
    /// For a tenant the manifest declares: its manifest entry when the API changed it
    /// (JSON). The stored spec applies only while the manifest still says the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_entry: Option<String>,
}

pub enum StateStore {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

const CREATE: &str = "CREATE TABLE IF NOT EXISTS trellis_deployments (
    tenant TEXT NOT NULL,
    component TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (tenant, component))";
const SELECT: &str = "SELECT tenant, component, state FROM trellis_deployments";
const CREATE_TENANTS: &str = "CREATE TABLE IF NOT EXISTS trellis_tenants (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL)";
const CREATE_TOKENS: &str = "CREATE TABLE IF NOT EXISTS trellis_tenant_tokens (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    record TEXT NOT NULL)";
const UPSERT: &str =
    "INSERT INTO trellis_deployments (tenant, component, state) VALUES ($1, $2, $3)
    ON CONFLICT (tenant, component) DO UPDATE SET state = excluded.state";
const DELETE: &str = "DELETE FROM trellis_deployments WHERE tenant = $1 AND component = $2";

/// Runs one statement on either backend (the SQL is the same on both).
macro_rules! on_backend {
    ($self:ident, $pool:ident => $body:expr) => {
        match $self {
            StateStore::Sqlite($pool) => $body,
            StateStore::Postgres($pool) => $body,
        }
    };
}

impl StateStore {
    pub async fn open(data_dir: &std::path::Path, database_url: Option<&str>) -> Result<Self> {
        let store = match database_url {
            None => {
                std::fs::create_dir_all(data_dir)
                    .with_context(|| format!("creating {}", data_dir.display()))?;
                let options = SqliteConnectOptions::new()
                    .filename(data_dir.join("node.db"))
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(5));
                let pool = SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await
                    .context("opening the node's state database (node.db)")?;
                StateStore::Sqlite(pool)
            }
            Some(url) => {
                let options = PgConnectOptions::from_str(url)
                    .context("node.database_url is not a valid postgres:// URL")?;
                let pool = PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options)
                    .await
                    .context("connecting to PostgreSQL for the node's state")?;
                StateStore::Postgres(pool)
            }
        };
        let created = &store;
        for create in [CREATE, CREATE_TENANTS, CREATE_TOKENS] {
            match on_backend!(created, pool => sqlx::query(create).execute(pool).await.map(|_| ()))
            {
                Ok(()) => {}
                // Another node created it at the same moment (PostgreSQL's IF NOT EXISTS is
                // not safe under concurrency).
                Err(sqlx::Error::Database(e))
                    if matches!(e.code().as_deref(), Some("23505" | "42P07")) => {}
                Err(e) => return Err(e).context("creating the node's state tables"),
            }
        }
        Ok(store)
    }

    /// Every stored component, by (tenant, component). A row that no longer parses is
    /// logged and skipped rather than stopping the node.
    pub async fn load(&self) -> Result<Vec<(String, String, StoredComponent)>> {
        let rows: Vec<(String, String, String)> = on_backend!(self, pool => {
            sqlx::query(SELECT)
                .fetch_all(pool)
                .await
                .map(|rows| {
                    rows.iter()
                        .map(|row| (row.get(0), row.get(1), row.get(2)))
                        .collect()
                })
        })
        .context("reading the node's deployments")?;
        let mut out = Vec::new();
        for (tenant, component, state) in rows {
            match serde_json::from_str(&state) {
                Ok(stored) => out.push((tenant, component, stored)),
                Err(e) => {
                    tracing::error!(%tenant, %component, error = %e, "a stored deployment cannot be read; ignored")
                }
            }
        }
        Ok(out)
    }

    pub async fn save(&self, tenant: &str, component: &str, state: &StoredComponent) -> Result<()> {
        let json = serde_json::to_string(state).expect("state serializes");
        on_backend!(self, pool => {
            sqlx::query(UPSERT)
                .bind(tenant)
                .bind(component)
                .bind(&json)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .with_context(|| format!("saving the deployment of {tenant}/{component}"))
    }

    /// Every tenant created or changed through the admin API.
    pub async fn load_tenants(&self) -> Result<Vec<(String, StoredTenant)>> {
        let rows: Vec<(String, String)> = on_backend!(self, pool => {
            sqlx::query_as("SELECT name, state FROM trellis_tenants").fetch_all(pool).await
        })
        .context("reading the node's tenants")?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, state)| match serde_json::from_str(&state) {
                Ok(stored) => Some((name, stored)),
                Err(e) => {
                    tracing::error!(tenant = %name, error = %e, "a stored tenant cannot be read; ignored");
                    None
                }
            })
            .collect())
    }

    pub async fn save_tenant(&self, name: &str, tenant: &StoredTenant) -> Result<()> {
        let json = serde_json::to_string(tenant).expect("a tenant serializes");
        on_backend!(self, pool => {
            sqlx::query("INSERT INTO trellis_tenants (name, state) VALUES ($1, $2) \
                ON CONFLICT (name) DO UPDATE SET state = excluded.state")
                .bind(name)
                .bind(&json)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .with_context(|| format!("saving tenant {name}"))
    }

    /// Forgets a tenant, its tokens and its deployments.
    pub async fn remove_tenant(&self, name: &str) -> Result<()> {
        for sql in [
            "DELETE FROM trellis_tenants WHERE name = $1",
            "DELETE FROM trellis_tenant_tokens WHERE tenant = $1",
            "DELETE FROM trellis_deployments WHERE tenant = $1",
        ] {
            on_backend!(self, pool => sqlx::query(sql).bind(name).execute(pool).await.map(|_| ()))
                .with_context(|| format!("removing tenant {name}"))?;
        }
        Ok(())
    }

    pub async fn load_tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows: Vec<(String,)> = on_backend!(self, pool => {
            sqlx::query_as("SELECT record FROM trellis_tenant_tokens").fetch_all(pool).await
        })
        .context("reading the tenant tokens")?;
        Ok(rows
            .into_iter()
            .filter_map(|(record,)| serde_json::from_str(&record).ok())
            .collect())
    }

    pub async fn save_token(&self, record: &TokenRecord) -> Result<()> {
        let json = serde_json::to_string(record).expect("a token record serializes");
        on_backend!(self, pool => {
            sqlx::query("INSERT INTO trellis_tenant_tokens (id, tenant, record) VALUES ($1, $2, $3)")
                .bind(&record.id)
                .bind(&record.tenant)
                .bind(&json)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .context("saving a tenant token")
    }

    pub async fn remove_token(&self, id: &str) -> Result<()> {
        on_backend!(self, pool => {
            sqlx::query("DELETE FROM trellis_tenant_tokens WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .context("revoking a tenant token")
    }

    pub async fn remove(&self, tenant: &str, component: &str) -> Result<()> {
        on_backend!(self, pool => {
            sqlx::query(DELETE)
                .bind(tenant)
                .bind(component)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .with_context(|| format!("removing the deployment of {tenant}/{component}"))
    }
}

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

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::deploy::canary::CanaryPolicy;
use crate::manifest::ComponentSpec;

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
        match on_backend!(created, pool => sqlx::query(CREATE).execute(pool).await.map(|_| ())) {
            Ok(()) => {}
            // Another node created it at the same moment (PostgreSQL's IF NOT EXISTS is not
            // safe under concurrency).
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("23505" | "42P07")) => {}
            Err(e) => return Err(e).context("creating the trellis_deployments table"),
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

//! Where components keep their data: one database per component ("database per service"),
//! never shared. By default a SQLite file per component under the node's data dir (WAL
//! mode); when the node is given a `postgres://` URL, one schema per component in that
//! PostgreSQL database.
//!
//! Names are derived from the tenant and the component, which the manifest restricts to
//! `[a-z0-9-]`, so they cannot be chosen by a guest and cannot collide: a component has no
//! way to name another component's or another tenant's database. On PostgreSQL, where SQL
//! could name another schema outright, each component's connections run as a role that owns
//! its schema and has no rights anywhere else.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Executor};

/// How long a SQLite writer waits for another to finish before it gets "busy".
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The node's storage backend, chosen by `node.database_url` / `--database-url`.
pub enum Storage {
    Sqlite {
        root: PathBuf,
    },
    Postgres {
        options: Box<PgConnectOptions>,
        admin: PgPool,
    },
}

/// One component's database.
#[derive(Clone)]
pub enum ComponentDatabase {
    Sqlite(SqliteDatabase),
    Postgres(PgPool),
}

/// A component's SQLite database: its pool, and the turn its writers take.
///
/// SQLite allows one writer per database at a time. Every writer of the component (SQL
/// and key-value alike) queues for [`write_turn`](Self::write_turn) in the async runtime
/// instead of inside SQLite, whose busy handler sleeps 1, 2, 5, 10... ms between retries
/// and made concurrent writes slow (p99 > 100 ms under load).
#[derive(Clone)]
pub struct SqliteDatabase {
    pub pool: SqlitePool,
    writer: Arc<tokio::sync::Mutex<()>>,
}

impl SqliteDatabase {
    /// The write turn, held until the guard drops. Waits as long as SQLite itself would
    /// (its busy timeout); `None` after that, so that a writer that waits on itself (a
    /// write outside the transaction it holds) gets "busy" rather than hanging.
    pub async fn write_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        tokio::time::timeout(SQLITE_BUSY_TIMEOUT, self.writer.clone().lock_owned())
            .await
            .ok()
    }
}

impl Storage {
    /// SQLite under `data_dir/tenants/`, or PostgreSQL at `database_url`.
    pub async fn open(data_dir: &Path, database_url: Option<&str>) -> Result<Self> {
        match database_url {
            None => Ok(Storage::Sqlite {
                root: data_dir.join("tenants"),
            }),
            Some(url) => {
                let options = PgConnectOptions::from_str(url)
                    .context("node.database_url is not a valid postgres:// URL")?;
                let admin = PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options.clone())
                    .await
                    .with_context(|| format!("connecting to PostgreSQL at {}", redact(url)))?;
                Ok(Storage::Postgres {
                    options: Box::new(options),
                    admin,
                })
            }
        }
    }

    /// Opens (creating when missing) the database of `component` in `tenant`.
    pub async fn component_database(
        &self,
        tenant: &str,
        component: &str,
    ) -> Result<ComponentDatabase> {
        match self {
            Storage::Sqlite { root } => {
                let dir = root.join(tenant).join(component);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let options = SqliteConnectOptions::new()
                    .filename(dir.join("data.db"))
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
                    // Pages are read through a mapping instead of read(2) copies; each
                    // connection re-reads what another one changed, so this is often.
                    .pragma("mmap_size", "268435456")
                    .foreign_keys(true);
                // Every SQLite connection is a thread of its own; idle ones are closed.
                let pool = SqlitePoolOptions::new()
                    // No ping before each use: it is a round trip to the connection's
                    // thread per statement, and a broken file fails the statement anyway.
                    .test_before_acquire(false)
                    .max_connections(4)
                    .min_connections(0)
                    .idle_timeout(Duration::from_secs(60))
                    .connect_with(options)
                    .await
                    .with_context(|| format!("opening {}", dir.join("data.db").display()))?;
                Ok(ComponentDatabase::Sqlite(SqliteDatabase {
                    pool,
                    writer: Arc::default(),
                }))
            }
            Storage::Postgres { options, admin } => {
                let schema = schema_name(tenant, component);
                create_schema(admin, &schema).await?;
                // Startup parameters, set once per connection so nothing leaks through a
                // shared pool: search_path makes the schema the default namespace, and the
                // schema's own role (which owns nothing else) makes PostgreSQL refuse any
                // other schema a guest might name explicitly.
                let options = (**options)
                    .clone()
                    .options([("search_path", schema.as_str()), ("role", schema.as_str())]);
                let pool = PgPoolOptions::new()
                    // No ping before each use (a network round trip per statement); a
                    // dropped connection fails its statement and is replaced.
                    .test_before_acquire(false)
                    .max_connections(4)
                    .min_connections(0)
                    .idle_timeout(Duration::from_secs(60))
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_lazy_with(options);
                Ok(ComponentDatabase::Postgres(pool))
            }
        }
    }
}

impl ComponentDatabase {
    /// Applies the `*.sql` files of `dir` that this database has not seen yet, in name
    /// order, each in a transaction of its own together with its entry in
    /// `trellis_migrations`; returns the names it applied. A failing file stops the deploy
    /// with its name and the database's reason, and leaves nothing of itself behind.
    pub async fn migrate(&self, dir: &Path) -> Result<Vec<String>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading migrations in {}", dir.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
            .collect();
        files.sort();
        // On a live component (a new version deployed beside the running one) the
        // migration queues with the other writers instead of in SQLite's busy handler.
        let _turn = match self {
            ComponentDatabase::Sqlite(database) => Some(
                database
                    .write_turn()
                    .await
                    .context("the database is busy: another writer held it too long")?,
            ),
            ComponentDatabase::Postgres(_) => None,
        };
        const LEDGER: &str = "CREATE TABLE IF NOT EXISTS trellis_migrations \
            (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)";
        let mut applied = Vec::new();
        for path in files {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let script = std::fs::read_to_string(&path)
                .with_context(|| format!("reading migration {}", path.display()))?;
            let context = || format!("migration {name}");
            let now = humantime_serde::re::humantime::format_rfc3339_seconds(
                std::time::SystemTime::now(),
            )
            .to_string();
            // The same steps on either backend; only how a writer takes its turn differs.
            macro_rules! apply_once {
                ($pool:expr, $begin:expr, $take_turn:expr) => {{
                    match $pool.execute(LEDGER).await {
                        Ok(_) => {}
                        // Another node created it at the same moment (PostgreSQL's IF NOT
                        // EXISTS is not safe under concurrency).
                        Err(sqlx::Error::Database(e))
                            if matches!(e.code().as_deref(), Some("23505" | "42P07")) => {}
                        Err(e) => return Err(e).with_context(context),
                    }
                    let mut tx = $begin.await?;
                    if let Some(lock) = $take_turn {
                        sqlx::query(lock).execute(&mut *tx).await?;
                    }
                    let seen: Option<(String,)> =
                        sqlx::query_as("SELECT name FROM trellis_migrations WHERE name = $1")
                            .bind(&name)
                            .fetch_optional(&mut *tx)
                            .await?;
                    if seen.is_none() {
                        sqlx::raw_sql(AssertSqlSafe(script))
                            .execute(&mut *tx)
                            .await
                            .with_context(context)?;
                        sqlx::query(
                            "INSERT INTO trellis_migrations (name, applied_at) VALUES ($1, $2)",
                        )
                        .bind(&name)
                        .bind(&now)
                        .execute(&mut *tx)
                        .await?;
                        tx.commit().await.with_context(context)?;
                    }
                    seen.is_none()
                }};
            }
            let done = match self {
                // IMMEDIATE takes SQLite's write lock first, so two nodes on one file take turns.
                ComponentDatabase::Sqlite(database) => apply_once!(
                    database.pool,
                    database.pool.begin_with("BEGIN IMMEDIATE"),
                    None::<&str>
                ),
                ComponentDatabase::Postgres(pool) => apply_once!(
                    pool,
                    pool.begin(),
                    Some("LOCK TABLE trellis_migrations IN EXCLUSIVE MODE")
                ),
            };
            if done {
                applied.push(name);
            }
        }
        Ok(applied)
    }
}

/// `trellis_<tenant>__<component>`, with '-' as '_'. Manifest names contain no '_', so the
/// mapping cannot make two components share a schema.
fn schema_name(tenant: &str, component: &str) -> String {
    format!(
        "trellis_{}__{}",
        tenant.replace('-', "_"),
        component.replace('-', "_")
    )
}

/// Creates the component's schema and a role of the same name that owns it and nothing
/// else (no login, no inherited rights), so the component's connections can reach only it.
async fn create_schema(admin: &PgPool, schema: &str) -> Result<()> {
    let statements = [
        format!("CREATE ROLE \"{schema}\" NOLOGIN NOINHERIT"),
        // The node's own user must be able to switch to the role.
        format!("GRANT \"{schema}\" TO CURRENT_USER"),
        format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\" AUTHORIZATION \"{schema}\""),
        format!("ALTER SCHEMA \"{schema}\" OWNER TO \"{schema}\""),
    ];
    for sql in statements {
        match admin.execute(AssertSqlSafe(sql.clone())).await {
            Ok(_) => {}
            // Already there (another node, an earlier run): 42710 duplicate role, 42P06
            // duplicate schema, 23505 a concurrent creation.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42710" | "42P06" | "23505")) => {}
            Err(e) => return Err(e).with_context(|| format!("preparing schema {schema}: {sql}")),
        }
    }
    Ok(())
}

/// A URL fit for a log line: the password replaced.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_distinct_per_tenant_and_component() {
        assert_eq!(schema_name("acme", "user-api"), "trellis_acme__user_api");
        assert_ne!(schema_name("a-b", "c"), schema_name("a", "b-c"));
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact("postgres://u:secret@host/db"),
            "postgres://u:***@host/db"
        );
        assert_eq!(redact("postgres://host/db"), "postgres://host/db");
    }
}

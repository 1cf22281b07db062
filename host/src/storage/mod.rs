//! Where components keep their data: one database per component ("database per service"),
//! never shared. By default a SQLite file per component under the node's data dir (WAL
//! mode); when the node is given a `postgres://` URL, one schema per component in that
//! PostgreSQL database.
//!
//! Names are derived from the tenant and the component, which the manifest restricts to
//! `[a-z0-9-]`, so they cannot be chosen by a guest and cannot collide: a component has no
//! way to name another component's or another tenant's database; a SQLite connection
//! cannot `ATTACH` another file either. On PostgreSQL, where SQL
//! could name another schema outright, each component's connections run as a role that owns
//! its schema and has no rights anywhere else.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use prometheus_client::metrics::gauge::Gauge;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Executor};

pub mod sqlite;

/// How long a component's database connection stays open unused. Short, because a node
/// may host thousands of components: an idle one should hold no connection (a thread and
/// three file handles on SQLite, a server process on PostgreSQL). Reopening costs well
/// under a millisecond, and a busy component never waits this long.
pub const IDLE_CONNECTION: Duration = Duration::from_secs(10);

/// The name of a component database's sqlx connection threads, before their number (within
/// the 15 bytes Linux keeps of a thread's name).
const CONNECTION_THREAD: &str = "trellis-db-";

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
    /// sqlx's pool, connecting only when used: the node runs guests' statements on
    /// `connections` and migrations on a connection of their own; the benchmarks' native
    /// baselines (host/examples) use this.
    pub pool: SqlitePool,
    /// The connections guests' statements run on, on the caller's thread ([`sqlite`]).
    pub connections: Arc<sqlite::Connections>,
    writer: Arc<tokio::sync::Mutex<()>>,
    /// The database file (its write-ahead log is beside it).
    path: PathBuf,
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
                    .foreign_keys(true)
                    // sqlx runs each connection on a thread of its own: named for the node.
                    .thread_name(|id| format!("{CONNECTION_THREAD}{id}"));
                // Creates the file in WAL mode, and fails here on one SQLite cannot open.
                // Closed at once: every sqlx SQLite connection is a thread of its own, and
                // a node deploying tenants would otherwise keep one per database alive for
                // `IDLE_CONNECTION` (thousands in the density benchmark).
                sqlx::SqliteConnection::connect_with(&options)
                    .await
                    .with_context(|| format!("opening {}", dir.join("data.db").display()))?
                    .close()
                    .await?;
                // Connects only when used; idle connections are closed.
                let pool = SqlitePoolOptions::new()
                    // No ping before each use: it is a round trip to the connection's
                    // thread per statement, and a broken file fails the statement anyway.
                    .test_before_acquire(false)
                    .max_connections(4)
                    .min_connections(0)
                    .idle_timeout(IDLE_CONNECTION)
                    .after_connect(|connection, _| Box::pin(forbid_attach(connection)))
                    .connect_lazy_with(options);
                let writer = Arc::default();
                Ok(ComponentDatabase::Sqlite(SqliteDatabase {
                    pool,
                    connections: sqlite::Connections::new(&dir.join("data.db"), &writer),
                    writer,
                    path: dir.join("data.db"),
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
                    .idle_timeout(IDLE_CONNECTION)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_lazy_with(options);
                Ok(ComponentDatabase::Postgres(pool))
            }
        }
    }
}

/// Makes `ATTACH DATABASE` (and `VACUUM INTO`) fail on a component's connection: a guest's
/// SQL could otherwise name any file the node can open, another tenant's database among
/// them.
async fn forbid_attach(connection: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    let mut handle = connection.lock_handle().await?;
    // SAFETY: the handle is locked (no other thread uses the connection meanwhile), and
    // sqlite3_limit only sets a per-connection limit.
    unsafe {
        libsqlite3_sys::sqlite3_limit(
            handle.as_raw_handle().as_ptr(),
            libsqlite3_sys::SQLITE_LIMIT_ATTACHED,
            0,
        );
    }
    Ok(())
}

impl Storage {
    /// Deletes every database of `tenant` (a tenant removed with its data). Pools still
    /// open must be closed first.
    pub async fn delete_tenant(&self, tenant: &str) -> Result<()> {
        match self {
            Storage::Sqlite { root } => {
                let dir = root.join(tenant);
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e).with_context(|| format!("deleting {}", dir.display())),
                }
            }
            Storage::Postgres { admin, .. } => {
                let prefix = schema_name(tenant, "");
                let schemas: Vec<(String,)> = sqlx::query_as(
                    "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)",
                )
                .bind(&prefix)
                .fetch_all(admin)
                .await
                .context("listing the tenant's schemas")?;
                // Component names never start with '-', so their part of a schema name
                // never starts with '_': what does belongs to a tenant named "NAME-...".
                let ours = schemas
                    .into_iter()
                    .filter(|(schema,)| !schema[prefix.len()..].starts_with('_'));
                for (schema,) in ours {
                    for sql in [
                        format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
                        format!("DROP ROLE IF EXISTS \"{schema}\""),
                    ] {
                        admin
                            .execute(AssertSqlSafe(sql.clone()))
                            .await
                            .with_context(|| format!("deleting the tenant's data: {sql}"))?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl ComponentDatabase {
    /// Closes the database's connections (before its files or schema are deleted).
    pub async fn close(&self) {
        match self {
            ComponentDatabase::Sqlite(database) => {
                database.connections.close();
                database.pool.close().await
            }
            ComponentDatabase::Postgres(pool) => pool.close().await,
        }
    }

    /// Bytes the database takes: the SQLite file and its write-ahead log, or the
    /// PostgreSQL schema's tables with their indexes and TOAST.
    pub async fn size(&self) -> Result<u64> {
        match self {
            ComponentDatabase::Sqlite(database) => {
                let mut wal = database.path.clone().into_os_string();
                wal.push("-wal");
                let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
                Ok(len(&database.path) + len(Path::new(&wal)))
            }
            ComponentDatabase::Postgres(pool) => {
                let (bytes,): (i64,) = sqlx::query_as(
                    "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::bigint \
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'm')",
                )
                .fetch_one(pool)
                .await
                .context("measuring the schema's size")?;
                Ok(bytes.max(0) as u64)
            }
        }
    }

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
        if files.is_empty() {
            return Ok(Vec::new());
        }
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
        // SQLite: a connection of its own, closed when done, rather than one from the pool
        // that would keep its thread for `IDLE_CONNECTION` after every deploy.
        enum Target<'a> {
            Sqlite(sqlx::SqliteConnection),
            Postgres(&'a PgPool),
        }
        let mut target = match self {
            ComponentDatabase::Sqlite(database) => {
                let mut connection =
                    sqlx::SqliteConnection::connect_with(&database.pool.connect_options())
                        .await
                        .with_context(|| format!("opening {}", database.path.display()))?;
                forbid_attach(&mut connection).await?;
                Target::Sqlite(connection)
            }
            ComponentDatabase::Postgres(pool) => Target::Postgres(pool),
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
            let done = match &mut target {
                // IMMEDIATE takes SQLite's write lock first, so two nodes on one file take turns.
                Target::Sqlite(connection) => apply_once!(
                    &mut *connection,
                    connection.begin_with("BEGIN IMMEDIATE"),
                    None::<&str>
                ),
                Target::Postgres(pool) => apply_once!(
                    pool,
                    pool.begin(),
                    Some("LOCK TABLE trellis_migrations IN EXCLUSIVE MODE")
                ),
            };
            if done {
                applied.push(name);
            }
        }
        if let Target::Sqlite(connection) = target {
            connection.close().await?;
        }
        Ok(applied)
    }
}

/// The bytes a tenant's databases hold, against its quota (`quota.max_storage`).
pub struct StorageUsage {
    limit: AtomicU64,
    by_database: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    gauge: Gauge,
    on_refusal: Box<dyn Fn(&str) + Send + Sync>,
}

impl StorageUsage {
    /// `gauge` shows the total (`trellis_tenant_storage_bytes`); `on_refusal` is told of
    /// every write refused (for the tenant's metrics and log).
    pub fn new(gauge: Gauge, on_refusal: Box<dyn Fn(&str) + Send + Sync>) -> Self {
        Self {
            limit: AtomicU64::new(u64::MAX),
            by_database: Default::default(),
            gauge,
            on_refusal,
        }
    }

    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Release);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    pub fn used(&self) -> u64 {
        self.by_database
            .lock()
            .expect("storage usage lock")
            .values()
            .sum()
    }

    /// Whether a write may start: not while the tenant is at its quota.
    pub fn may_write(&self) -> Result<(), String> {
        let (used, limit) = (self.used(), self.limit());
        if used >= limit {
            let message = format!(
                "storage quota exceeded: the tenant's databases hold {used} bytes of the {limit} its quota allows (quota.max_storage); reads and deletes still work"
            );
            (self.on_refusal)(&message);
            Err(message)
        } else {
            Ok(())
        }
    }

    fn record(&self, database: &str, bytes: u64) {
        let mut by_database = self.by_database.lock().expect("storage usage lock");
        by_database.insert(database.to_string(), bytes);
        self.gauge.set(by_database.values().sum::<u64>() as i64);
    }

    pub fn forget(&self, database: &str) {
        let mut by_database = self.by_database.lock().expect("storage usage lock");
        by_database.remove(database);
        self.gauge.set(by_database.values().sum::<u64>() as i64);
    }
}

/// Keeps one database's share of its tenant's [`StorageUsage`] current. Writes check the
/// tenant's quota before they start and re-measure after: after every write on SQLite (a
/// `stat`) when the tenant has a storage quota, else (and always on PostgreSQL, where it
/// is a query) at most once a second.
///
/// On PostgreSQL the measuring query runs in a task of its own, never on the writer's path.
/// It needs a connection of the component's pool, and the writer may be inside a
/// transaction holding one: if transactions queued behind the writer's row locks hold all
/// the others, a writer waiting for the measurement would wait for itself until the pool's
/// acquire timeout.
pub struct StorageMeter {
    database: ComponentDatabase,
    key: String,
    usage: Arc<StorageUsage>,
    measured: std::sync::Mutex<Option<std::time::Instant>>,
    /// A PostgreSQL measurement is under way (at most one at a time).
    measuring: AtomicBool,
}

impl StorageMeter {
    pub async fn new(database: ComponentDatabase, key: String, usage: Arc<StorageUsage>) -> Self {
        let meter = Self {
            database,
            key,
            usage,
            measured: std::sync::Mutex::new(None),
            measuring: AtomicBool::new(false),
        };
        meter.due(true);
        meter.measure().await;
        meter
    }

    /// Whether a write may start.
    pub fn may_write(&self) -> Result<(), String> {
        self.usage.may_write()
    }

    /// After a write: the database's size again, when due (on PostgreSQL, in the
    /// background).
    pub async fn wrote(self: &Arc<Self>) {
        if !self.due(false) {
            return;
        }
        match self.database {
            ComponentDatabase::Sqlite(_) => self.measure().await,
            ComponentDatabase::Postgres(_) => {
                if self.measuring.swap(true, Ordering::AcqRel) {
                    return;
                }
                let meter = self.clone();
                tokio::spawn(async move {
                    meter.measure().await;
                    meter.measuring.store(false, Ordering::Release);
                });
            }
        }
    }

    /// Whether a measurement is due (always when `now`), noting that one starts.
    fn due(&self, now: bool) -> bool {
        // Every write when a quota depends on it (a stat on SQLite); otherwise, and on
        // PostgreSQL (a query), at most once a second, for status and metrics.
        let every = match self.database {
            ComponentDatabase::Sqlite(_) if self.usage.limit() != u64::MAX => Duration::ZERO,
            _ => Duration::from_secs(1),
        };
        let mut measured = self.measured.lock().expect("meter lock");
        let fresh = measured.is_some_and(|at| at.elapsed() < every);
        if fresh && !now {
            return false;
        }
        *measured = Some(std::time::Instant::now());
        true
    }

    async fn measure(&self) {
        match self.database.size().await {
            Ok(bytes) => self.usage.record(&self.key, bytes),
            Err(e) => {
                tracing::warn!(database = %self.key, error = %format!("{e:#}"), "cannot measure a database")
            }
        }
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

    /// Threads of component databases' sqlx connections alive in this process, once the
    /// count has settled (a closed connection's thread ends just after the close returns).
    async fn connection_threads(expected: usize) -> usize {
        let count = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with(CONNECTION_THREAD))
                .count()
        };
        for _ in 0..50 {
            if count() == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        count()
    }

    #[tokio::test]
    async fn a_deploy_leaves_no_sqlite_connection_thread_behind() {
        let dir = tempfile::tempdir().unwrap();
        let migrations = dir.path().join("migrations");
        std::fs::create_dir_all(&migrations).unwrap();
        std::fs::write(
            migrations.join("001_items.sql"),
            "CREATE TABLE items (id INTEGER PRIMARY KEY);",
        )
        .unwrap();
        let storage = Storage::open(dir.path(), None).await.unwrap();
        let database = storage.component_database("acme", "shop").await.unwrap();
        assert_eq!(
            database.migrate(&migrations).await.unwrap(),
            vec!["001_items.sql"]
        );
        // Before, the opening check and the migration each left a pooled connection, and
        // so a thread, for IDLE_CONNECTION: thousands of threads on a node deploying tenants.
        assert_eq!(
            connection_threads(0).await,
            0,
            "a connection thread outlived the deploy"
        );

        // Positive control: the pool, when something uses it, does hold a thread that the
        // count sees, and the migration did apply.
        let ComponentDatabase::Sqlite(sqlite) = &database else {
            unreachable!("no database_url: SQLite")
        };
        let (tables,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM sqlite_master WHERE name = 'items'")
                .fetch_one(&sqlite.pool)
                .await
                .unwrap();
        assert_eq!(tables, 1);
        assert_eq!(connection_threads(1).await, 1);
        database.close().await;
        assert_eq!(connection_threads(0).await, 0);
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

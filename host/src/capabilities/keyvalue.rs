//! Key-value storage for guests: `wasi:keyvalue@0.2.0-draft` (store, atomics, batch), the
//! version wasmtime and wasmCloud implement, on the component's own database.
//!
//! - Grants: a component may open only the buckets its manifest lists in `keyvalue`
//!   (`""` means `"default"`); any other name, or any name without a grant, answers
//!   `access-denied`. Data lives in the component's database ([`crate::storage`]), so one
//!   component never sees another's keys, whatever bucket name it passes.
//! - Errors: a database failure is the guest's to handle (`error.other`); a host bug (a
//!   dangling resource) traps. [`KvError`] carries which, and `convert_error` decides.
//! - `atomics.increment` keeps counters as signed decimal text (as wasmtime's implementation
//!   does, draft2's counters being signed), creating a missing key with the delta; a value
//!   that is not a number, or an overflow, is `error.other`. Draft2 is [`super::keyvalue_draft2`].

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::OptionalExtension;
use sqlx::Row;
use tokio::sync::OwnedMutexGuard;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable, ResourceTableError};

use crate::bindings::wasi::keyvalue::{atomics, batch, store};
use crate::storage::{ComponentDatabase, SqliteDatabase, StorageMeter};

/// Keys returned per `list-keys` page.
const LIST_PAGE: u64 = 1000;

/// What the guest holds for an open bucket.
pub struct Bucket {
    name: String,
}

/// The error of every key-value host function: what the guest sees, or a trap.
pub enum KvError {
    Guest(store::Error),
    Trap(wasmtime::Error),
}

impl From<ResourceTableError> for KvError {
    fn from(e: ResourceTableError) -> Self {
        KvError::Trap(e.into())
    }
}

impl From<sqlx::Error> for KvError {
    fn from(e: sqlx::Error) -> Self {
        KvError::Guest(store::Error::Other(format!("storage error: {e}")))
    }
}

fn other(message: impl Into<String>) -> KvError {
    KvError::Guest(store::Error::Other(message.into()))
}

/// A key-value store, one per component database.
#[async_trait]
pub trait KeyValueBackend: Send + Sync {
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, sqlx::Error>;
    async fn set(&self, bucket: &str, key: &str, value: &[u8]) -> Result<(), sqlx::Error>;
    async fn delete(&self, bucket: &str, key: &str) -> Result<(), sqlx::Error>;
    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, sqlx::Error>;
    /// Keys in order, skipping `offset`, at most `limit`.
    async fn list_keys(
        &self,
        bucket: &str,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<String>, sqlx::Error>;
    /// Adds `delta` atomically; `Ok(Err(reason))` when the stored value is not a counter.
    async fn increment(
        &self,
        bucket: &str,
        key: &str,
        delta: i64,
    ) -> Result<Result<i64, String>, sqlx::Error>;
    /// Sets `key` to `value` only if it still holds `expected` (`None`: absent), in one
    /// statement; whether it did.
    async fn compare_and_swap(
        &self,
        bucket: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, sqlx::Error>;
}

/// What a deployment grants: the bucket names, and the backend they live in.
pub struct KeyValueGrant {
    buckets: Vec<String>,
    backend: Arc<dyn KeyValueBackend>,
    /// The tenant's storage quota, checked before writes (deletes always pass).
    meter: Option<Arc<StorageMeter>>,
}

impl KeyValueGrant {
    /// Prepares the component's key-value table and the grant.
    pub async fn new(database: ComponentDatabase, buckets: &[String]) -> anyhow::Result<Self> {
        Ok(Self::with_backend(
            Self::open_backend(database).await?,
            buckets,
        ))
    }

    /// The key-value backend on a component's database, its table created when missing.
    /// Done once per database: every version of the component shares it.
    pub async fn open_backend(
        database: ComponentDatabase,
    ) -> anyhow::Result<Arc<dyn KeyValueBackend>> {
        Ok(match database {
            ComponentDatabase::Sqlite(database) => Arc::new(SqliteKeyValue::new(database).await?),
            ComponentDatabase::Postgres(pool) => Arc::new(PostgresKeyValue::new(pool).await?),
        })
    }

    /// The grant of `buckets` on a backend opened before.
    pub fn with_backend(backend: Arc<dyn KeyValueBackend>, buckets: &[String]) -> Self {
        Self {
            buckets: buckets.to_vec(),
            backend,
            meter: None,
        }
    }

    /// The same grant, its writes held to a tenant's storage quota.
    pub fn with_meter(mut self, meter: Arc<StorageMeter>) -> Self {
        self.meter = Some(meter);
        self
    }

    /// The backend itself (the benchmark's native baseline calls it directly).
    pub fn backend(&self) -> Arc<dyn KeyValueBackend> {
        self.backend.clone()
    }
}

/// The view a store gives the key-value host functions.
pub struct KeyValue<'a> {
    pub grant: Option<&'a KeyValueGrant>,
    pub table: &'a mut ResourceTable,
}

struct HasKeyValue;

impl HasData for HasKeyValue {
    type Data<'a> = KeyValue<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> KeyValue<'_>,
) -> wasmtime::Result<()> {
    store::add_to_linker::<T, HasKeyValue>(linker, view)?;
    atomics::add_to_linker::<T, HasKeyValue>(linker, view)?;
    batch::add_to_linker::<T, HasKeyValue>(linker, view)?;
    Ok(())
}

impl KeyValue<'_> {
    /// Whether a write may start under the tenant's storage quota.
    pub(super) fn may_write(&self) -> Result<(), KvError> {
        match self.grant.and_then(|g| g.meter.as_ref()) {
            Some(meter) => meter.may_write().map_err(other),
            None => Ok(()),
        }
    }

    /// The meter to tell after a write (taken before the write: the view is not `Sync`).
    pub(super) fn meter(&self) -> Option<Arc<StorageMeter>> {
        self.grant.and_then(|g| g.meter.clone())
    }

    /// The bucket's name and the backend, for an open bucket handle.
    pub(super) fn bucket(
        &self,
        bucket: &Resource<Bucket>,
    ) -> Result<(String, Arc<dyn KeyValueBackend>), KvError> {
        let name = self.table.get(bucket)?.name.clone();
        // A bucket only exists if `open` found a grant.
        let grant = self
            .grant
            .ok_or_else(|| KvError::Trap(wasmtime::format_err!("bucket without a grant")))?;
        Ok((name, grant.backend.clone()))
    }

    /// Adds `delta` to a counter (both key-value versions' `increment`).
    pub(super) async fn add(
        &mut self,
        bucket: &Resource<Bucket>,
        key: &str,
        delta: i64,
    ) -> Result<i64, KvError> {
        let (name, backend) = self.bucket(bucket)?;
        self.may_write()?;
        let meter = self.meter();
        let value = backend.increment(&name, key, delta).await?.map_err(other)?;
        wrote(meter).await;
        Ok(value)
    }
}

impl store::Host for KeyValue<'_> {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, KvError> {
        let name = if identifier.is_empty() {
            "default".to_string()
        } else {
            identifier
        };
        match self.grant {
            Some(grant) if grant.buckets.contains(&name) => Ok(self.table.push(Bucket { name })?),
            _ => Err(KvError::Guest(store::Error::AccessDenied)),
        }
    }

    fn convert_error(&mut self, err: KvError) -> wasmtime::Result<store::Error> {
        match err {
            KvError::Guest(e) => Ok(e),
            KvError::Trap(e) => Err(e),
        }
    }
}

impl store::HostBucket for KeyValue<'_> {
    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, KvError> {
        let (name, backend) = self.bucket(&bucket)?;
        Ok(backend.get(&name, &key).await?)
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), KvError> {
        let (name, backend) = self.bucket(&bucket)?;
        self.may_write()?;
        let meter = self.meter();
        backend.set(&name, &key, &value).await?;
        wrote(meter).await;
        Ok(())
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), KvError> {
        let (name, backend) = self.bucket(&bucket)?;
        Ok(backend.delete(&name, &key).await?)
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, KvError> {
        let (name, backend) = self.bucket(&bucket)?;
        Ok(backend.exists(&name, &key).await?)
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, KvError> {
        let (name, backend) = self.bucket(&bucket)?;
        let offset = cursor.unwrap_or(0);
        let keys = backend.list_keys(&name, offset, LIST_PAGE).await?;
        let cursor = (keys.len() as u64 == LIST_PAGE).then(|| offset + LIST_PAGE);
        Ok(store::KeyResponse { keys, cursor })
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for KeyValue<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, KvError> {
        let delta =
            i64::try_from(delta).map_err(|_| other("the delta is larger than a counter holds"))?;
        let value = self.add(&bucket, &key, delta).await?;
        u64::try_from(value).map_err(|_| {
            other(
                "the counter is negative (set through wasi:keyvalue@0.2.0-draft2, which reads it)",
            )
        })
    }
}

impl batch::Host for KeyValue<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, KvError> {
        let (name, backend) = self.bucket(&bucket)?;
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            let value = backend.get(&name, &key).await?;
            found.push(value.map(|v| (key, v)));
        }
        Ok(found)
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Result<(), KvError> {
        let (name, backend) = self.bucket(&bucket)?;
        self.may_write()?;
        let meter = self.meter();
        for (key, value) in key_values {
            backend.set(&name, &key, &value).await?;
        }
        wrote(meter).await;
        Ok(())
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), KvError> {
        let (name, backend) = self.bucket(&bucket)?;
        for key in keys {
            backend.delete(&name, &key).await?;
        }
        Ok(())
    }
}

/// After a write: the database measured again.
pub(super) async fn wrote(meter: Option<Arc<StorageMeter>>) {
    if let Some(meter) = meter {
        meter.wrote().await;
    }
}

/// Parses a stored counter (signed decimal text) and adds `delta` to it.
fn add_to_counter(current: Option<&[u8]>, delta: i64) -> Result<i64, String> {
    let current = match current {
        None => 0,
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or("the stored value is not a decimal counter")?,
    };
    current
        .checked_add(delta)
        .ok_or_else(|| "the counter would overflow".to_string())
}

/// Implements [`KeyValueBackend`] for a backend type with `pool()` and `write_turn()`: the
/// statements are the same SQL on SQLite and PostgreSQL (both take `$n` placeholders), so
/// only the counter update, which locks differently, is written per backend
/// (`increment_counter`). Writes hold the backend's write turn (SQLite's; none on PostgreSQL).
macro_rules! sql_key_value_backend {
    ($backend:ty) => {
        #[async_trait]
        impl KeyValueBackend for $backend {
            async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
                let row =
                    sqlx::query("SELECT value FROM trellis_kv WHERE bucket = $1 AND key = $2")
                        .bind(bucket)
                        .bind(key)
                        .fetch_optional(self.pool())
                        .await?;
                row.map(|r| r.try_get::<Vec<u8>, _>(0)).transpose()
            }

            async fn set(&self, bucket: &str, key: &str, value: &[u8]) -> Result<(), sqlx::Error> {
                let _turn = self.write_turn().await?;
                sqlx::query(UPSERT)
                    .bind(bucket)
                    .bind(key)
                    .bind(value)
                    .execute(self.pool())
                    .await?;
                Ok(())
            }

            async fn delete(&self, bucket: &str, key: &str) -> Result<(), sqlx::Error> {
                let _turn = self.write_turn().await?;
                sqlx::query("DELETE FROM trellis_kv WHERE bucket = $1 AND key = $2")
                    .bind(bucket)
                    .bind(key)
                    .execute(self.pool())
                    .await?;
                Ok(())
            }

            async fn exists(&self, bucket: &str, key: &str) -> Result<bool, sqlx::Error> {
                let row = sqlx::query("SELECT 1 FROM trellis_kv WHERE bucket = $1 AND key = $2")
                    .bind(bucket)
                    .bind(key)
                    .fetch_optional(self.pool())
                    .await?;
                Ok(row.is_some())
            }

            async fn list_keys(
                &self,
                bucket: &str,
                offset: u64,
                limit: u64,
            ) -> Result<Vec<String>, sqlx::Error> {
                let rows = sqlx::query(
                    "SELECT key FROM trellis_kv WHERE bucket = $1 ORDER BY key LIMIT $2 OFFSET $3",
                )
                .bind(bucket)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .bind(i64::try_from(offset).unwrap_or(i64::MAX))
                .fetch_all(self.pool())
                .await?;
                rows.iter().map(|r| r.try_get::<String, _>(0)).collect()
            }

            async fn increment(
                &self,
                bucket: &str,
                key: &str,
                delta: i64,
            ) -> Result<Result<i64, String>, sqlx::Error> {
                self.increment_counter(bucket, key, delta).await
            }

            async fn compare_and_swap(
                &self,
                bucket: &str,
                key: &str,
                expected: Option<&[u8]>,
                value: &[u8],
            ) -> Result<bool, sqlx::Error> {
                let _turn = self.write_turn().await?;
                let done = match expected {
                    Some(expected) => sqlx::query(
                        "UPDATE trellis_kv SET value = $4 WHERE bucket = $1 AND key = $2 AND value = $3",
                    )
                    .bind(bucket)
                    .bind(key)
                    .bind(expected)
                    .bind(value)
                    .execute(self.pool())
                    .await?
                    .rows_affected(),
                    None => sqlx::query(
                        "INSERT INTO trellis_kv (bucket, key, value) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    )
                    .bind(bucket)
                    .bind(key)
                    .bind(value)
                    .execute(self.pool())
                    .await?
                    .rows_affected(),
                };
                Ok(done == 1)
            }
        }
    };
}

const UPSERT: &str = "INSERT INTO trellis_kv (bucket, key, value) VALUES ($1, $2, $3)
     ON CONFLICT (bucket, key) DO UPDATE SET value = excluded.value";

/// Key-value on a component's SQLite database, through its rusqlite connections on the
/// caller's thread (`crate::storage::sqlite`); writes take the database's write turn.
struct SqliteKeyValue {
    database: SqliteDatabase,
}

/// A rusqlite failure, as the backend trait's error.
fn sqlite_failure(e: rusqlite::Error) -> sqlx::Error {
    sqlx::Error::Protocol(e.to_string())
}

impl SqliteKeyValue {
    async fn write_turn(&self) -> Result<OwnedMutexGuard<()>, sqlx::Error> {
        self.database.write_turn().await.ok_or_else(|| {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "database is busy: another writer held it too long",
            ))
        })
    }

    /// Runs `work` (one read) on a connection.
    async fn run<R: Send + 'static>(
        &self,
        work: impl Fn(&rusqlite::Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, sqlx::Error> {
        let connection = self.database.connections.get().map_err(sqlite_failure)?;
        connection.run(work).await.map_err(sqlite_failure)
    }

    /// Runs `work` (one statement, or a transaction it opens and ends) in the database's
    /// write turn, on the writers' connection.
    async fn write<R: Send + 'static>(
        &self,
        work: impl Fn(&rusqlite::Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, sqlx::Error> {
        let _turn = self.write_turn().await?;
        let connection = self.database.connections.writer().map_err(sqlite_failure)?;
        connection.run(work).await.map_err(sqlite_failure)
    }

    async fn new(database: SqliteDatabase) -> Result<Self, sqlx::Error> {
        let store = Self { database };
        // DDL is a write: it takes its turn like any other writer.
        store
            .write(|c| {
                c.execute_batch(
                    "CREATE TABLE IF NOT EXISTS trellis_kv (
                        bucket TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
                        PRIMARY KEY (bucket, key)) WITHOUT ROWID",
                )
            })
            .await?;
        Ok(store)
    }
}

#[async_trait]
impl KeyValueBackend for SqliteKeyValue {
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.run(move |c| {
            c.prepare_cached("SELECT value FROM trellis_kv WHERE bucket = ?1 AND key = ?2")?
                .query_row((&bucket, &key), |row| row.get::<_, Vec<u8>>(0))
                .optional()
        })
        .await
    }

    async fn set(&self, bucket: &str, key: &str, value: &[u8]) -> Result<(), sqlx::Error> {
        let (bucket, key, value) = (bucket.to_string(), key.to_string(), value.to_vec());
        self.write(move |c| {
            c.prepare_cached(UPSERT)?.execute((&bucket, &key, &value))?;
            Ok(())
        })
        .await
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), sqlx::Error> {
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.write(move |c| {
            c.prepare_cached("DELETE FROM trellis_kv WHERE bucket = ?1 AND key = ?2")?
                .execute((&bucket, &key))?;
            Ok(())
        })
        .await
    }

    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, sqlx::Error> {
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.run(move |c| {
            c.prepare_cached("SELECT 1 FROM trellis_kv WHERE bucket = ?1 AND key = ?2")?
                .exists((&bucket, &key))
        })
        .await
    }

    async fn list_keys(
        &self,
        bucket: &str,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<String>, sqlx::Error> {
        let bucket = bucket.to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        self.run(move |c| {
            c.prepare_cached(
                "SELECT key FROM trellis_kv WHERE bucket = ?1 ORDER BY key LIMIT ?2 OFFSET ?3",
            )?
            .query_map((&bucket, limit, offset), |row| row.get::<_, String>(0))?
            .collect()
        })
        .await
    }

    async fn increment(
        &self,
        bucket: &str,
        key: &str,
        delta: i64,
    ) -> Result<Result<i64, String>, sqlx::Error> {
        // Read and write in one IMMEDIATE transaction, under the write turn.
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.write(move |c| {
            c.execute_batch("BEGIN IMMEDIATE")?;
            let result = (|| -> rusqlite::Result<Result<i64, String>> {
                let current: Option<Vec<u8>> = c
                    .prepare_cached("SELECT value FROM trellis_kv WHERE bucket = ?1 AND key = ?2")?
                    .query_row((&bucket, &key), |row| row.get(0))
                    .optional()?;
                let next = match add_to_counter(current.as_deref(), delta) {
                    Ok(next) => next,
                    Err(reason) => return Ok(Err(reason)),
                };
                c.prepare_cached(UPSERT)?.execute((
                    &bucket,
                    &key,
                    next.to_string().into_bytes(),
                ))?;
                Ok(Ok(next))
            })();
            let result = match result {
                Ok(Ok(next)) => c.execute_batch("COMMIT").map(|()| Ok(next)),
                other => other,
            };
            // Whatever failed (a statement, an interruption, the COMMIT), nothing stays
            // open for the next use of the connection, or for a run again.
            if !c.is_autocommit() {
                let _ = c.execute_batch("ROLLBACK");
            }
            result
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        bucket: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, sqlx::Error> {
        let (bucket, key, value) = (bucket.to_string(), key.to_string(), value.to_vec());
        let expected = expected.map(<[u8]>::to_vec);
        self.write(move |c| {
            let done = match &expected {
                Some(expected) => c
                    .prepare_cached(
                        "UPDATE trellis_kv SET value = ?4 WHERE bucket = ?1 AND key = ?2 AND value = ?3",
                    )?
                    .execute((&bucket, &key, expected, &value))?,
                None => c
                    .prepare_cached(
                        "INSERT INTO trellis_kv (bucket, key, value) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                    )?
                    .execute((&bucket, &key, &value))?,
            };
            Ok(done == 1)
        })
        .await
    }
}

struct PostgresKeyValue {
    pool: sqlx::PgPool,
}

sql_key_value_backend!(PostgresKeyValue);

impl PostgresKeyValue {
    fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }

    /// Writers need no turn: PostgreSQL locks rows.
    async fn write_turn(&self) -> Result<Option<OwnedMutexGuard<()>>, sqlx::Error> {
        Ok(None)
    }

    async fn new(pool: sqlx::PgPool) -> Result<Self, sqlx::Error> {
        let created = sqlx::query(
            "CREATE TABLE IF NOT EXISTS trellis_kv (
                bucket TEXT NOT NULL, key TEXT NOT NULL, value BYTEA NOT NULL,
                PRIMARY KEY (bucket, key))",
        )
        .execute(&pool)
        .await;
        match created {
            // Another node created it at the same moment.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {}
            other => {
                other?;
            }
        }
        Ok(Self { pool })
    }

    async fn increment_counter(
        &self,
        bucket: &str,
        key: &str,
        delta: i64,
    ) -> Result<Result<i64, String>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // Make sure the row exists, then lock it: concurrent increments queue on the lock.
        sqlx::query("INSERT INTO trellis_kv (bucket, key, value) VALUES ($1, $2, '0') ON CONFLICT DO NOTHING")
            .bind(bucket)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let current: Vec<u8> =
            sqlx::query("SELECT value FROM trellis_kv WHERE bucket = $1 AND key = $2 FOR UPDATE")
                .bind(bucket)
                .bind(key)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
        let next = match add_to_counter(Some(&current), delta) {
            Ok(next) => next,
            Err(reason) => return Ok(Err(reason)),
        };
        sqlx::query("UPDATE trellis_kv SET value = $3 WHERE bucket = $1 AND key = $2")
            .bind(bucket)
            .bind(key)
            .bind(next.to_string().into_bytes())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(next))
    }
}

#[cfg(test)]
mod tests {
    use super::add_to_counter;

    #[test]
    fn counters_are_decimal_text() {
        assert_eq!(add_to_counter(None, 5), Ok(5));
        assert_eq!(add_to_counter(Some(b"41"), 1), Ok(42));
        assert!(add_to_counter(Some(b"forty"), 1).is_err());
        assert!(add_to_counter(Some(i64::MAX.to_string().as_bytes()), 1).is_err());
        assert_eq!(add_to_counter(Some(b"2"), -5), Ok(-3));
    }
}

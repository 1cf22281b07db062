//! Relational storage for guests: `trellis:platform/sql` (see `wit/sql.wit`), parameterised
//! statements and transactions on the component's own database ([`crate::storage`]).
//!
//! - Grant: `sql = true` in the manifest; without it every call answers `access-denied`.
//!   A component's statements run in its own SQLite file or PostgreSQL schema, so a table
//!   name can only ever mean one of its own tables.
//! - Values cross as `null | boolean | integer | real | text | blob`. Columns of other
//!   types (PostgreSQL `numeric`, `timestamptz`, `uuid`, ...) must be cast in the SQL; the
//!   guest gets `invalid-statement` saying so.
//! - Errors: constraint failures are `constraint` with their kind, bad SQL is
//!   `invalid-statement`, anything else the database says is `other`. Host bugs trap.
//!   On PostgreSQL a failed statement aborts its transaction (only `rollback` is possible
//!   afterwards); SQLite undoes just the statement. Both roll back a dropped transaction.

use std::sync::Arc;

use sqlx::error::ErrorKind;
use sqlx::postgres::{PgArgumentBuffer, PgArguments, PgRow, PgTypeInfo, Postgres};
use sqlx::{Arguments, AssertSqlSafe, Column, Row, TypeInfo, ValueRef};
use tokio::sync::OwnedMutexGuard;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable, ResourceTableError};

use crate::bindings::trellis::platform::sql::{
    self as wit, ConstraintKind, ConstraintViolation, RowSet, Value,
};
use crate::storage::sqlite::Pooled;
use crate::storage::{ComponentDatabase, SqliteDatabase, StorageMeter};

/// An open transaction, held in the instance's resource table.
pub enum Transaction {
    Sqlite(SqliteTransaction),
    Postgres(sqlx::Transaction<'static, Postgres>),
}

/// A SQLite transaction: its connection, in `BEGIN IMMEDIATE`, and the component's write
/// turn, held until it ends. Dropped without a commit, it rolls back (then the turn goes).
pub struct SqliteTransaction {
    connection: Pooled,
    _turn: OwnedMutexGuard<()>,
}

impl SqliteTransaction {
    fn end(&self, how: &str) -> Result<(), SqlError> {
        run_cached(self.connection.connection(), how).map_err(SqlError::from)
    }
}

impl Drop for SqliteTransaction {
    fn drop(&mut self) {
        if !self.connection.connection().is_autocommit() {
            let _ = run_cached(self.connection.connection(), "ROLLBACK");
        }
    }
}

/// Runs a statement without parameters or rows (`BEGIN`, `COMMIT`) from the connection's
/// statement cache: `execute_batch` would parse it again each time.
fn run_cached(connection: &rusqlite::Connection, statement: &str) -> rusqlite::Result<()> {
    connection
        .prepare_cached(statement)?
        .raw_execute()
        .map(drop)
}

/// The error of every SQL host function: what the guest sees, or a trap.
pub enum SqlError {
    Guest(wit::Error),
    Trap(wasmtime::Error),
}

impl From<ResourceTableError> for SqlError {
    fn from(e: ResourceTableError) -> Self {
        SqlError::Trap(e.into())
    }
}

impl From<sqlx::Error> for SqlError {
    fn from(e: sqlx::Error) -> Self {
        SqlError::Guest(guest_error(e))
    }
}

impl From<rusqlite::Error> for SqlError {
    fn from(e: rusqlite::Error) -> Self {
        SqlError::Guest(sqlite::guest_error(e))
    }
}

fn invalid(message: impl Into<String>) -> SqlError {
    SqlError::Guest(wit::Error::InvalidStatement(message.into()))
}

/// Sorts a database error into what the guest can act on.
fn guest_error(e: sqlx::Error) -> wit::Error {
    match e {
        sqlx::Error::Database(db) => {
            let message = db.message().to_string();
            let kind = match db.kind() {
                ErrorKind::UniqueViolation => Some(ConstraintKind::Unique),
                ErrorKind::ForeignKeyViolation => Some(ConstraintKind::ForeignKey),
                ErrorKind::NotNullViolation => Some(ConstraintKind::NotNull),
                ErrorKind::CheckViolation => Some(ConstraintKind::Check),
                _ => None,
            };
            if let Some(kind) = kind {
                return wit::Error::Constraint(ConstraintViolation { kind, message });
            }
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            // PostgreSQL class 42 (syntax, undefined table/column...) and 22 (data), 08P01
            // (wrong parameter count); SQLite's generic SQLITE_ERROR (1) is bad SQL.
            let invalid_statement =
                code.starts_with("42") || code.starts_with("22") || code == "08P01" || code == "1";
            if invalid_statement {
                wit::Error::InvalidStatement(message)
            } else {
                wit::Error::Other(message)
            }
        }
        e @ (sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Encode(_)
        | sqlx::Error::TypeNotFound { .. }) => wit::Error::InvalidStatement(e.to_string()),
        e => wit::Error::Other(e.to_string()),
    }
}

/// What a deployment grants: its database.
pub struct SqlGrant {
    database: ComponentDatabase,
    /// The tenant's storage quota, checked before statements that may grow the database.
    meter: Option<Arc<StorageMeter>>,
}

impl SqlGrant {
    pub fn new(database: ComponentDatabase) -> Self {
        Self {
            database,
            meter: None,
        }
    }

    /// The same grant, its writes held to a tenant's storage quota.
    pub fn with_meter(mut self, meter: Arc<StorageMeter>) -> Self {
        self.meter = Some(meter);
        self
    }
}

/// The view a store gives the SQL host functions.
pub struct Sql<'a> {
    pub grant: Option<&'a SqlGrant>,
    pub table: &'a mut ResourceTable,
}

struct HasSql;

impl HasData for HasSql {
    type Data<'a> = Sql<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> Sql<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSql>(linker, view)
}

impl Sql<'_> {
    /// Whether `statement` may run under the tenant's storage quota: reads and deletes
    /// always may (a tenant at its quota must be able to make room).
    fn may_run(&self, statement: &str) -> Result<(), SqlError> {
        let Some(meter) = self.grant.and_then(|g| g.meter.as_ref()) else {
            return Ok(());
        };
        if is_read_only(statement) || starts_with_keyword(statement, "delete") {
            return Ok(());
        }
        meter
            .may_write()
            .map_err(|message| SqlError::Guest(wit::Error::Other(message)))
    }

    /// The meter to tell after a write (taken before the write: the view is not `Sync`).
    fn meter(&self) -> Option<Arc<StorageMeter>> {
        self.grant.and_then(|g| g.meter.clone())
    }

    fn database(&self) -> Result<ComponentDatabase, SqlError> {
        self.grant
            .map(|g| g.database.clone())
            .ok_or(SqlError::Guest(wit::Error::AccessDenied))
    }
}

/// The database's write turn (see [`SqliteDatabase`]), or the guest's "busy" error.
async fn write_turn(database: &SqliteDatabase) -> Result<OwnedMutexGuard<()>, SqlError> {
    database.write_turn().await.ok_or_else(|| {
        SqlError::Guest(wit::Error::Other(
            "database is busy: another writer held it too long".into(),
        ))
    })
}

impl wit::Host for Sql<'_> {
    async fn query(&mut self, statement: String, params: Vec<Value>) -> Result<RowSet, SqlError> {
        self.may_run(&statement)?;
        let meter = self.meter();
        let read_only = is_read_only(&statement);
        let rows = match self.database()? {
            // `INSERT/UPDATE/DELETE ... RETURNING` writes through `query`: it waits for the
            // write turn too. Plain reads never wait (WAL readers do not block writers).
            ComponentDatabase::Sqlite(db) if !read_only => {
                let _turn = write_turn(&db).await?;
                sqlite::query(db.connections.writer()?, statement, params).await
            }
            ComponentDatabase::Sqlite(db) => {
                sqlite::query(db.connections.get()?, statement, params).await
            }
            ComponentDatabase::Postgres(pool) => postgres::query(&pool, statement, &params).await,
        }?;
        if !read_only {
            wrote(meter).await;
        }
        Ok(rows)
    }

    async fn execute(&mut self, statement: String, params: Vec<Value>) -> Result<u64, SqlError> {
        self.may_run(&statement)?;
        let meter = self.meter();
        let changed = match self.database()? {
            // `execute` is how guests write; it waits for the write turn like a transaction.
            ComponentDatabase::Sqlite(db) => {
                let _turn = write_turn(&db).await?;
                sqlite::execute(db.connections.writer()?, statement, params).await
            }
            ComponentDatabase::Postgres(pool) => postgres::execute(&pool, statement, &params).await,
        }?;
        wrote(meter).await;
        Ok(changed)
    }

    async fn begin(&mut self) -> Result<Resource<Transaction>, SqlError> {
        let transaction = match self.database()? {
            // IMMEDIATE takes SQLite's write lock up front; a deferred transaction that
            // writes later can fail at once with SQLITE_BUSY under WAL.
            ComponentDatabase::Sqlite(db) => {
                let turn = write_turn(&db).await?;
                let connection = db.connections.writer()?;
                run_cached(connection.connection(), "BEGIN IMMEDIATE")?;
                Transaction::Sqlite(SqliteTransaction {
                    connection,
                    _turn: turn,
                })
            }
            ComponentDatabase::Postgres(pool) => Transaction::Postgres(pool.begin().await?),
        };
        Ok(self.table.push(transaction)?)
    }

    fn convert_error(&mut self, err: SqlError) -> wasmtime::Result<wit::Error> {
        match err {
            SqlError::Guest(e) => Ok(e),
            SqlError::Trap(e) => Err(e),
        }
    }
}

/// After a write: the database measured again.
async fn wrote(meter: Option<Arc<StorageMeter>>) {
    if let Some(meter) = meter {
        meter.wrote().await;
    }
}

/// Whether a statement only reads: one statement starting with SELECT (a `WITH` may hide a
/// write, and SQLite runs every statement of a string, so `SELECT 1; INSERT ...` is not
/// a read; a `;` inside a string literal only makes a read count as a write).
fn is_read_only(statement: &str) -> bool {
    starts_with_keyword(statement, "select")
}

/// Whether `statement` is one statement starting with `keyword`.
fn starts_with_keyword(statement: &str, keyword: &str) -> bool {
    let single = !statement.trim_end().trim_end_matches(';').contains(';');
    single
        && statement
            .trim_start()
            .get(..keyword.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(keyword))
}

impl wit::HostTransaction for Sql<'_> {
    async fn query(
        &mut self,
        this: Resource<Transaction>,
        statement: String,
        params: Vec<Value>,
    ) -> Result<RowSet, SqlError> {
        self.may_run(&statement)?;
        match self.table.get_mut(&this)? {
            Transaction::Sqlite(tx) => Ok(sqlite::query_rows(
                tx.connection.connection(),
                &statement,
                &params,
            )?),
            Transaction::Postgres(tx) => postgres::query(&mut **tx, statement, &params).await,
        }
    }

    async fn execute(
        &mut self,
        this: Resource<Transaction>,
        statement: String,
        params: Vec<Value>,
    ) -> Result<u64, SqlError> {
        self.may_run(&statement)?;
        let meter = self.meter();
        let changed = match self.table.get_mut(&this)? {
            Transaction::Sqlite(tx) => Ok(sqlite::execute_statement(
                tx.connection.connection(),
                &statement,
                &params,
            )?),
            Transaction::Postgres(tx) => postgres::execute(&mut **tx, statement, &params).await,
        }?;
        // Measured as it goes (what a transaction spilled to disk), not only at commit.
        wrote(meter).await;
        Ok(changed)
    }

    async fn commit(&mut self, this: Resource<Transaction>) -> Result<(), SqlError> {
        let meter = self.meter();
        match self.table.delete(this)? {
            Transaction::Sqlite(tx) => tx.end("COMMIT")?,
            Transaction::Postgres(tx) => tx.commit().await?,
        }
        wrote(meter).await;
        Ok(())
    }

    async fn rollback(&mut self, this: Resource<Transaction>) -> Result<(), SqlError> {
        match self.table.delete(this)? {
            Transaction::Sqlite(tx) => tx.end("ROLLBACK")?,
            Transaction::Postgres(tx) => tx.rollback().await?,
        }
        Ok(())
    }

    async fn drop(&mut self, this: Resource<Transaction>) -> wasmtime::Result<()> {
        // Dropping a transaction that was not committed rolls it back.
        self.table.delete(this)?;
        Ok(())
    }
}

/// The row-set of fetched rows; `decode` turns one column of one row into a value.
fn row_set<R: Row>(
    rows: &[R],
    decode: impl Fn(&R, usize) -> Result<Value, SqlError>,
) -> Result<RowSet, SqlError> {
    let columns = rows
        .first()
        .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
        .unwrap_or_default();
    let rows = rows
        .iter()
        .map(|row| (0..row.len()).map(|i| decode(row, i)).collect())
        .collect::<Result<_, _>>()?;
    Ok(RowSet { columns, rows })
}

/// `query` and `execute` for one backend module, whose `arguments` and `decode` turn WIT
/// values into the database's and back; `$cached` says whether prepared statements are
/// kept per connection.
macro_rules! statements {
    ($database:ty, $cached:expr) => {
        pub async fn query<'e, E>(
            executor: E,
            statement: String,
            params: &[Value],
        ) -> Result<RowSet, SqlError>
        where
            E: sqlx::Executor<'e, Database = $database>,
        {
            let rows = sqlx::query_with(AssertSqlSafe(statement), arguments(params)?)
                .persistent($cached)
                .fetch_all(executor)
                .await?;
            row_set(&rows, decode)
        }

        pub async fn execute<'e, E>(
            executor: E,
            statement: String,
            params: &[Value],
        ) -> Result<u64, SqlError>
        where
            E: sqlx::Executor<'e, Database = $database>,
        {
            let done = sqlx::query_with(AssertSqlSafe(statement), arguments(params)?)
                .persistent($cached)
                .execute(executor)
                .await?;
            Ok(done.rows_affected())
        }
    };
}

/// SQLite through rusqlite, on the caller's thread (`crate::storage::sqlite`): outside a
/// transaction under the statement budget, inside one as it comes.
mod sqlite {
    use rusqlite::types::{Value as SqliteValue, ValueRef as SqliteValueRef};
    use rusqlite::{Connection, ErrorCode, ffi};

    use super::*;

    pub async fn query(
        connection: Pooled,
        statement: String,
        params: Vec<Value>,
    ) -> Result<RowSet, SqlError> {
        Ok(connection
            .run(move |c| query_rows(c, &statement, &params))
            .await?)
    }

    pub async fn execute(
        connection: Pooled,
        statement: String,
        params: Vec<Value>,
    ) -> Result<u64, SqlError> {
        Ok(connection
            .run(move |c| execute_statement(c, &statement, &params))
            .await?)
    }

    fn bind(statement: &mut rusqlite::Statement<'_>, params: &[Value]) -> rusqlite::Result<()> {
        let values: Vec<SqliteValue> = params
            .iter()
            .map(|param| match param {
                Value::Null => SqliteValue::Null,
                Value::Boolean(b) => SqliteValue::Integer(i64::from(*b)),
                Value::Integer(i) => SqliteValue::Integer(*i),
                Value::Real(f) => SqliteValue::Real(*f),
                Value::Text(s) => SqliteValue::Text(s.clone()),
                Value::Blob(b) => SqliteValue::Blob(b.clone()),
            })
            .collect();
        crate::storage::sqlite::bind_numbered(statement, &values)
    }

    /// Rows of one statement, with its column names when there are any rows.
    pub fn query_rows(
        connection: &Connection,
        statement: &str,
        params: &[Value],
    ) -> rusqlite::Result<RowSet> {
        let mut prepared = connection.prepare_cached(statement)?;
        bind(&mut prepared, params)?;
        let width = prepared.column_count();
        let names: Vec<String> = prepared
            .column_names()
            .iter()
            .map(|n| n.to_string())
            .collect();
        let mut rows = Vec::new();
        let mut cursor = prepared.raw_query();
        while let Some(row) = cursor.next()? {
            let mut values = Vec::with_capacity(width);
            for i in 0..width {
                values.push(match row.get_ref(i)? {
                    SqliteValueRef::Null => Value::Null,
                    SqliteValueRef::Integer(i) => Value::Integer(i),
                    SqliteValueRef::Real(f) => Value::Real(f),
                    SqliteValueRef::Text(t) => {
                        Value::Text(String::from_utf8(t.to_vec()).map_err(|e| {
                            rusqlite::Error::FromSqlConversionFailure(
                                i,
                                rusqlite::types::Type::Text,
                                Box::new(e),
                            )
                        })?)
                    }
                    SqliteValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            rows.push(values);
        }
        let columns = if rows.is_empty() { Vec::new() } else { names };
        Ok(RowSet { columns, rows })
    }

    /// Runs one statement (or, without parameters, several) to its end; rows it changed.
    pub fn execute_statement(
        connection: &Connection,
        statement: &str,
        params: &[Value],
    ) -> rusqlite::Result<u64> {
        let mut prepared = match connection.prepare_cached(statement) {
            Err(rusqlite::Error::MultipleStatement) if params.is_empty() => {
                let before = connection.total_changes();
                // Outside a transaction, all or none: an interrupted batch is run again
                // from the start, which must not repeat statements that had committed.
                let own = connection.is_autocommit();
                if own {
                    connection.execute_batch("BEGIN")?;
                }
                let ran = connection.execute_batch(statement);
                match (&ran, own) {
                    (Ok(()), true) => connection.execute_batch("COMMIT")?,
                    (Err(_), true) if !connection.is_autocommit() => {
                        let _ = connection.execute_batch("ROLLBACK");
                    }
                    _ => {}
                }
                ran?;
                return Ok(connection.total_changes() - before);
            }
            other => other?,
        };
        bind(&mut prepared, params)?;
        let read_only = prepared.readonly();
        let mut cursor = prepared.raw_query();
        while cursor.next()?.is_some() {}
        drop(cursor);
        Ok(if read_only { 0 } else { connection.changes() })
    }

    /// Sorts a SQLite error into what the guest can act on, as for sqlx's.
    pub fn guest_error(e: rusqlite::Error) -> wit::Error {
        match e {
            rusqlite::Error::SqliteFailure(failure, message) => {
                let message = message.unwrap_or_else(|| failure.to_string());
                let kind = match failure.extended_code {
                    ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                        Some(ConstraintKind::Unique)
                    }
                    ffi::SQLITE_CONSTRAINT_FOREIGNKEY => Some(ConstraintKind::ForeignKey),
                    ffi::SQLITE_CONSTRAINT_NOTNULL => Some(ConstraintKind::NotNull),
                    ffi::SQLITE_CONSTRAINT_CHECK => Some(ConstraintKind::Check),
                    _ => None,
                };
                if let Some(kind) = kind {
                    return wit::Error::Constraint(ConstraintViolation { kind, message });
                }
                match failure.code {
                    ErrorCode::Unknown => wit::Error::InvalidStatement(message),
                    _ => wit::Error::Other(message),
                }
            }
            e @ (rusqlite::Error::MultipleStatement
            | rusqlite::Error::InvalidParameterCount(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidParameterName(..)) => {
                wit::Error::InvalidStatement(e.to_string())
            }
            e => wit::Error::Other(e.to_string()),
        }
    }
}

mod postgres {
    use super::*;

    /// A NULL of no declared type, so PostgreSQL infers it from where it is used (a
    /// typed NULL such as `None::<String>` fails against a non-text column).
    struct UntypedNull;

    impl sqlx::Type<Postgres> for UntypedNull {
        fn type_info() -> PgTypeInfo {
            PgTypeInfo::with_oid(sqlx::postgres::types::Oid(0))
        }

        fn compatible(_: &PgTypeInfo) -> bool {
            true
        }
    }

    impl sqlx::Encode<'_, Postgres> for UntypedNull {
        fn encode_by_ref(
            &self,
            _: &mut PgArgumentBuffer,
        ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
            Ok(sqlx::encode::IsNull::Yes)
        }
    }

    fn arguments(params: &[Value]) -> Result<PgArguments, SqlError> {
        let mut args = PgArguments::default();
        for param in params {
            let added = match param {
                Value::Null => args.add(UntypedNull),
                Value::Boolean(b) => args.add(*b),
                Value::Integer(i) => args.add(*i),
                Value::Real(f) => args.add(*f),
                Value::Text(s) => args.add(s.clone()),
                Value::Blob(b) => args.add(b.clone()),
            };
            added.map_err(|e| invalid(format!("parameter: {e}")))?;
        }
        Ok(args)
    }

    fn decode(row: &PgRow, i: usize) -> Result<Value, SqlError> {
        let raw = row.try_get_raw(i)?;
        if raw.is_null() {
            return Ok(Value::Null);
        }
        let type_name = raw.type_info().name().to_string();
        Ok(match type_name.as_str() {
            "BOOL" => Value::Boolean(row.try_get(i)?),
            "INT2" => Value::Integer(row.try_get::<i16, _>(i)?.into()),
            "INT4" => Value::Integer(row.try_get::<i32, _>(i)?.into()),
            "INT8" => Value::Integer(row.try_get(i)?),
            "FLOAT4" => Value::Real(row.try_get::<f32, _>(i)?.into()),
            "FLOAT8" => Value::Real(row.try_get(i)?),
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "UNKNOWN" => Value::Text(row.try_get(i)?),
            "BYTEA" => Value::Blob(row.try_get(i)?),
            "VOID" => Value::Null,
            other => {
                let column = row.columns()[i].name().to_string();
                return Err(invalid(format!(
                    "column {column:?} has type {other}, which is not returned as is: cast it in the query \
                     (e.g. {column}::text or {column}::float8)"
                )));
            }
        })
    }

    // Not cached: a component's ALTER TABLE would otherwise break its cached plans
    // ("cached plan must not change result type").
    statements!(Postgres, false);
}

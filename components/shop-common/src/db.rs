//! Typed access to the component's own database (`trellis:platform/sql`): the [`Sql`]
//! trait gives the direct connection ([`Db`]) and a [`Transaction`] the same helpers,
//! which turn storage failures into 500s; [`params!`](crate::params) builds parameter
//! lists from plain Rust values.

use crate::trellis::platform::sql;
pub use crate::trellis::platform::sql::{
    ConstraintKind, Error as SqlError, RowSet, Transaction, Value,
};

use crate::api::ApiError;

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Integer(v)
    }
}
impl From<Option<String>> for Value {
    fn from(v: Option<String>) -> Self {
        v.map(Value::Text).unwrap_or(Value::Null)
    }
}
impl From<Option<&str>> for Value {
    fn from(v: Option<&str>) -> Self {
        v.map(Value::from).unwrap_or(Value::Null)
    }
}

/// `params![a, b]`: a parameter list for `$1, $2`.
#[macro_export]
macro_rules! params {
    ($($value:expr),* $(,)?) => {
        &[$($crate::db::Value::from($value)),*]
    };
}

/// A storage failure the client can do nothing about.
pub fn storage_error(e: SqlError) -> ApiError {
    ApiError::internal(format!("storage: {e:?}"))
}

/// Whether `e` is a duplicate in a UNIQUE column or key.
pub fn is_unique_violation(e: &SqlError) -> bool {
    matches!(e, SqlError::Constraint(c) if c.kind == ConstraintKind::Unique)
}

/// Statements, on the component's database or inside a transaction.
pub trait Sql {
    fn raw_query(&self, statement: &str, params: &[Value]) -> Result<RowSet, SqlError>;
    fn raw_execute(&self, statement: &str, params: &[Value]) -> Result<u64, SqlError>;

    fn rows(&self, statement: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, ApiError> {
        self.raw_query(statement, params)
            .map(|set| set.rows)
            .map_err(storage_error)
    }

    fn row(&self, statement: &str, params: &[Value]) -> Result<Option<Vec<Value>>, ApiError> {
        Ok(self.rows(statement, params)?.into_iter().next())
    }

    fn execute(&self, statement: &str, params: &[Value]) -> Result<u64, ApiError> {
        self.raw_execute(statement, params).map_err(storage_error)
    }

    /// The single integer a `SELECT COUNT(*) ...` returns.
    fn count(&self, statement: &str, params: &[Value]) -> Result<i64, ApiError> {
        Ok(self
            .row(statement, params)?
            .map(|row| int(&row, 0))
            .unwrap_or(0))
    }
}

/// The component's database, outside any transaction.
pub struct Db;

impl Sql for Db {
    fn raw_query(&self, statement: &str, params: &[Value]) -> Result<RowSet, SqlError> {
        sql::query(statement, params)
    }
    fn raw_execute(&self, statement: &str, params: &[Value]) -> Result<u64, SqlError> {
        sql::execute(statement, params)
    }
}

impl Sql for Transaction {
    fn raw_query(&self, statement: &str, params: &[Value]) -> Result<RowSet, SqlError> {
        self.query(statement, params)
    }
    fn raw_execute(&self, statement: &str, params: &[Value]) -> Result<u64, SqlError> {
        Transaction::execute(self, statement, params)
    }
}

/// Starts a transaction (rolled back if dropped without [`commit`]).
pub fn begin() -> Result<Transaction, ApiError> {
    sql::begin().map_err(storage_error)
}

pub fn commit(tx: Transaction) -> Result<(), ApiError> {
    Transaction::commit(tx).map_err(storage_error)
}

/// Column `i` as text (`""` for NULL).
pub fn text(row: &[Value], i: usize) -> String {
    match row.get(i) {
        Some(Value::Text(s)) => s.clone(),
        Some(Value::Integer(n)) => n.to_string(),
        Some(Value::Real(x)) => x.to_string(),
        Some(Value::Boolean(b)) => b.to_string(),
        _ => String::new(),
    }
}

/// Column `i` as text, or `None` for NULL.
pub fn opt_text(row: &[Value], i: usize) -> Option<String> {
    match row.get(i) {
        None | Some(Value::Null) => None,
        Some(_) => Some(text(row, i)),
    }
}

/// Column `i` as an integer (0 for NULL).
pub fn int(row: &[Value], i: usize) -> i64 {
    match row.get(i) {
        Some(Value::Integer(n)) => *n,
        Some(Value::Real(x)) => *x as i64,
        Some(Value::Boolean(b)) => *b as i64,
        Some(Value::Text(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

impl From<SqlError> for ApiError {
    fn from(e: SqlError) -> Self {
        storage_error(e)
    }
}

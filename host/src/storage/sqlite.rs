//! SQLite statements on the caller's thread. sqlx gives every SQLite connection a worker
//! thread and sends it each statement over a channel: two thread wake-ups per statement,
//! which were most of a statement's cost (a point lookup is a few microseconds of SQLite).
//! Here a component's connections are plain `rusqlite` connections (the same libsqlite3
//! sqlx links, one copy in the build) kept in a small set per database, one of them kept
//! for whoever holds the write turn ([`Connections::writer`]), and a statement runs where
//! the guest's host call runs.
//!
//! A statement must not hold an async worker for long: outside a transaction each one runs
//! under a budget ([`STATEMENT_BUDGET`]). SQLite's progress handler interrupts it once the
//! budget has passed, and it is run again from the start on a blocking thread, with no
//! budget; that is safe because an interrupted statement outside a transaction is rolled
//! back whole. Statements inside a guest's transaction run to their end on the caller's
//! thread (an interrupt there would roll back the whole transaction).
//!
//! Connections are opened as sqlx's were: WAL, `synchronous = NORMAL`, foreign keys on,
//! a 256 MiB mmap, no `ATTACH`; but none checkpoints the write-ahead log itself. SQLite's
//! automatic checkpoint runs inside whichever commit passes 1,000 pages of log, on the
//! thread of that commit, here an async worker, and ends in an `fsync` of the database.
//! Instead, a database that was written to is checkpointed on a blocking thread
//! [`CHECKPOINT_EVERY`] after its first commit since the last checkpoint, or sooner once
//! [`CHECKPOINT_COMMITS`] commits are waiting (which keeps the log near the size SQLite's
//! own 1,000 pages kept it at, so that storage quotas, which count it, see the same). A
//! first pass runs beside the writers; a second takes the database's write turn, as the
//! automatic checkpoint did (it ran inside a writer's commit): with no writer appending
//! meanwhile it completes, and the next writer starts the log over instead of growing it.
//! The second pass copies only what was committed during the first, so writers wait for
//! the turn that long rather than for the whole copy and its `fsync`s. Writers still take
//! the database's write turn in the async runtime first
//! ([`super::SqliteDatabase::write_turn`]). Connections unused for
//! [`super::IDLE_CONNECTION`] are closed by a sweeper task, so an idle component holds none.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

/// How long a statement outside a transaction may run on an async worker thread before it
/// is moved to a blocking thread.
pub const STATEMENT_BUDGET: Duration = Duration::from_millis(10);

/// How often at most a written database's log is checkpointed (off the async workers).
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Commits after which the log is checkpointed without waiting for [`CHECKPOINT_EVERY`].
pub const CHECKPOINT_COMMITS: u32 = 256;

/// SQLite VM instructions between two looks at the clock.
const PROGRESS_STEPS: i32 = 1000;

/// Nanoseconds since the node started: the budget's clock, storable in an atomic.
fn now_nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// One connection and its budget (a deadline in [`now_nanos`], 0: none).
pub struct Conn {
    pub connection: Connection,
    budget: Arc<AtomicU64>,
}

/// The open connections of one database file.
pub struct Connections {
    path: PathBuf,
    idle: Mutex<Vec<(Conn, Instant)>>,
    /// The connection writers use ([`Connections::writer`]), while no writer has it.
    writer_idle: Mutex<Option<(Conn, Instant)>>,
    sweeping: AtomicBool,
    /// Commits that wrote since the last checkpoint started.
    written: Arc<AtomicU32>,
    /// Wakes a scheduled checkpoint early ([`CHECKPOINT_COMMITS`]).
    checkpoint_now: Arc<tokio::sync::Notify>,
    /// A checkpoint is scheduled or running.
    checkpointing: AtomicBool,
    /// The database's write turn ([`super::SqliteDatabase::write_turn`]).
    write_turn: Arc<tokio::sync::Mutex<()>>,
    /// Closed (the database is being deleted): connections given back are dropped.
    closed: AtomicBool,
    me: Weak<Connections>,
}

impl Connections {
    pub fn new(path: &Path, write_turn: &Arc<tokio::sync::Mutex<()>>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
            writer_idle: Mutex::new(None),
            sweeping: AtomicBool::new(false),
            written: Arc::new(AtomicU32::new(0)),
            checkpoint_now: Arc::new(tokio::sync::Notify::new()),
            checkpointing: AtomicBool::new(false),
            write_turn: write_turn.clone(),
            closed: AtomicBool::new(false),
            me: me.clone(),
        })
    }

    /// A connection, the most recently used idle one or a new one.
    pub fn get(&self) -> rusqlite::Result<Pooled> {
        let reused = self.idle.lock().expect("sqlite connections lock").pop();
        self.pooled(reused, false)
    }

    /// The connection for a holder of the database's write turn.
    ///
    /// In WAL mode a connection throws its whole page cache away whenever another
    /// connection committed since its last transaction. With writes spread over every
    /// connection, a write began by reading back the pages of the tables and indexes it
    /// touches, which other connections had just written (`pread`s of the log, page faults
    /// in the mapping). Writers take turns, so one connection can serve them all and its
    /// cache stays valid from one write to the next; readers still start over after each
    /// write. (Two callers at once, which the turn rules out, would only cost the second a
    /// connection of the pool.)
    pub fn writer(&self) -> rusqlite::Result<Pooled> {
        let kept = self
            .writer_idle
            .lock()
            .expect("sqlite connections lock")
            .take();
        let reused = kept.or_else(|| self.idle.lock().expect("sqlite connections lock").pop());
        self.pooled(reused, true)
    }

    /// `reused`, or a new connection, lent out until dropped.
    fn pooled(&self, reused: Option<(Conn, Instant)>, writer: bool) -> rusqlite::Result<Pooled> {
        let conn = match reused {
            Some((conn, _)) => conn,
            None => self.open()?,
        };
        Ok(Pooled {
            conn: Some(conn),
            home: self.me.clone(),
            writer,
        })
    }

    fn open(&self) -> rusqlite::Result<Conn> {
        let connection = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        connection.busy_timeout(super::SQLITE_BUSY_TIMEOUT)?;
        connection.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
             PRAGMA foreign_keys = ON; PRAGMA mmap_size = 268435456; \
             PRAGMA wal_autocheckpoint = 0;",
        )?;
        // Called only for transactions that wrote.
        let written = self.written.clone();
        connection.commit_hook(Some(move || {
            written.fetch_add(1, Ordering::Relaxed);
            false
        }))?;
        // A guest's SQL could otherwise ATTACH any file the node can open.
        connection.set_limit(rusqlite::limits::Limit::SQLITE_LIMIT_ATTACHED, 0)?;
        connection.set_prepared_statement_cache_capacity(64);
        plan_once(&connection)?;
        let budget = Arc::new(AtomicU64::new(0));
        let deadline = budget.clone();
        connection.progress_handler(
            PROGRESS_STEPS,
            Some(move || {
                let deadline = deadline.load(Ordering::Relaxed);
                deadline != 0 && now_nanos() > deadline
            }),
        )?;
        Ok(Conn { connection, budget })
    }

    /// Closes every idle connection now, and each busy one when it is given back.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.idle.lock().expect("sqlite connections lock").clear();
        self.writer_idle
            .lock()
            .expect("sqlite connections lock")
            .take();
    }

    /// Closes the connections unused for `IDLE_CONNECTION`; whether any are left.
    fn close_idle(&self) -> bool {
        let now = Instant::now();
        let fresh = |since: &Instant| now.duration_since(*since) < super::IDLE_CONNECTION;
        let mut writer = self.writer_idle.lock().expect("sqlite connections lock");
        if writer.as_ref().is_some_and(|(_, since)| !fresh(since)) {
            *writer = None;
        }
        let mut idle = self.idle.lock().expect("sqlite connections lock");
        idle.retain(|(_, since)| fresh(since));
        !idle.is_empty() || writer.is_some()
    }

    fn give_back(&self, conn: Conn, writer: bool) {
        // A connection left inside a transaction (a host bug) is not handed out again.
        if !conn.connection.is_autocommit() || self.closed.load(Ordering::Acquire) {
            return;
        }
        let written = self.written.load(Ordering::Relaxed);
        if written > 0 && !self.checkpointing.swap(true, Ordering::AcqRel) {
            self.schedule_checkpoint();
        } else if written >= CHECKPOINT_COMMITS {
            self.checkpoint_now.notify_one();
        }
        let conn = if writer {
            self.writer_idle
                .lock()
                .expect("sqlite connections lock")
                .replace((conn, Instant::now()))
        } else {
            Some((conn, Instant::now()))
        };
        if let Some(conn) = conn {
            self.idle
                .lock()
                .expect("sqlite connections lock")
                .push(conn);
        }
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sweeping.store(false, Ordering::Release);
            return;
        };
        let me = self.me.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(super::IDLE_CONNECTION / 2).await;
                let Some(connections) = me.upgrade() else {
                    return;
                };
                if !connections.close_idle() {
                    connections.sweeping.store(false, Ordering::Release);
                    // One returned meanwhile found the flag still set: look once more.
                    if !connections.close_idle()
                        || connections.sweeping.swap(true, Ordering::AcqRel)
                    {
                        return;
                    }
                }
            }
        });
    }

    /// Checkpoints the log after [`CHECKPOINT_EVERY`] (or [`CHECKPOINT_COMMITS`]), on a
    /// blocking thread, in two passes. PASSIVE: each copies what no reader still needs and
    /// never waits for readers or writers. The first runs beside the writers and does the
    /// bulk of the copying and syncing; the second, under the write turn, copies only the
    /// commits made during the first, so that the log is wholly checkpointed and the next
    /// writer starts it over, while writers wait for the turn only that long.
    fn schedule_checkpoint(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.checkpointing.store(false, Ordering::Release);
            return;
        };
        let me = self.me.clone();
        let write_turn = self.write_turn.clone();
        let now = self.checkpoint_now.clone();
        runtime.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(CHECKPOINT_EVERY) => {}
                () = now.notified() => {}
            }
            let first = me.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(connections) = first.upgrade() {
                    connections.checkpoint();
                }
            })
            .await;
            let turn =
                tokio::time::timeout(super::SQLITE_BUSY_TIMEOUT, write_turn.lock_owned()).await;
            let _ = tokio::task::spawn_blocking(move || {
                let _turn = turn;
                let Some(connections) = me.upgrade() else {
                    return;
                };
                connections.checkpoint();
                connections.checkpointing.store(false, Ordering::Release);
                // Commits made meanwhile are checkpointed next.
                if connections.written.load(Ordering::Relaxed) > 0
                    && !connections.checkpointing.swap(true, Ordering::AcqRel)
                {
                    connections.schedule_checkpoint();
                }
            })
            .await;
        });
    }

    /// One PASSIVE checkpoint of the log, here and now (a blocking thread's work); commits
    /// from here on count towards the next one.
    fn checkpoint(&self) {
        self.written.store(0, Ordering::Relaxed);
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let checkpointed = self.get().and_then(|pooled| {
            pooled
                .connection()
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        });
        if let Err(e) = checkpointed {
            tracing::warn!(path = %self.path.display(), error = %e, "checkpointing a database's write-ahead log");
        }
    }
}

/// A connection taken from its database's set; it goes back when dropped.
pub struct Pooled {
    conn: Option<Conn>,
    home: Weak<Connections>,
    /// Taken by [`Connections::writer`]: goes back to be the writers' connection.
    writer: bool,
}

impl Pooled {
    pub fn connection(&self) -> &Connection {
        &self.conn.as_ref().expect("a pooled connection").connection
    }

    /// Runs `work` (one statement outside a transaction) here, under the statement budget;
    /// past it, `work` is interrupted and run again on a blocking thread without one.
    pub async fn run<R, W>(self, work: W) -> rusqlite::Result<R>
    where
        R: Send + 'static,
        W: Fn(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let budget = &self.conn.as_ref().expect("a pooled connection").budget;
        budget.store(
            now_nanos() + STATEMENT_BUDGET.as_nanos() as u64,
            Ordering::Relaxed,
        );
        let result = work(self.connection());
        budget.store(0, Ordering::Relaxed);
        match result {
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) => {
                tokio::task::spawn_blocking(move || work(self.connection()))
                    .await
                    .unwrap_or(Err(e))
            }
            other => other,
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let (Some(conn), Some(home)) = (self.conn.take(), self.home.upgrade()) {
            home.give_back(conn, self.writer);
        }
    }
}

/// Turns on SQLite's query planner stability guarantee: a statement is planned once, when
/// it is prepared. Without it, SQLite marks a statement whose plan consulted a bound value
/// (`LIMIT ?`, a `LIKE ?` pattern, a range on an indexed column) as expired on every new
/// bind, so a cached statement was parsed and planned again on each use: 6.6% of the
/// shop's CPU went to re-preparing the event queue's lease statement alone. The price is
/// that such a plan no longer adapts to the value bound (as with PostgreSQL's generic
/// plans).
pub fn plan_once(connection: &Connection) -> rusqlite::Result<()> {
    connection.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// Binds `values` to `statement` the way sqlx does for SQLite: a parameter written `$N` or
/// `?N` takes the N-th value however often and wherever it appears (SQLite itself numbers
/// named parameters by first appearance, so `SET a = $2 WHERE b = $1` would swap them);
/// bare `?` and other names take the next values in order. A parameter with no value is an
/// error; values no parameter names are ignored (as PostgreSQL does).
pub fn bind_numbered(
    statement: &mut rusqlite::Statement<'_>,
    values: &[rusqlite::types::Value],
) -> rusqlite::Result<()> {
    let mut next = 0;
    let mut needed = 0;
    let mut slots = Vec::with_capacity(statement.parameter_count());
    for index in 1..=statement.parameter_count() {
        let numbered = statement
            .parameter_name(index)
            .and_then(|name| name.get(1..))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n >= 1);
        let value = match numbered {
            Some(n) => n - 1,
            None => {
                next += 1;
                next - 1
            }
        };
        needed = needed.max(value + 1);
        slots.push((index, value));
    }
    if needed > values.len() {
        return Err(rusqlite::Error::InvalidParameterCount(values.len(), needed));
    }
    for (index, value) in slots {
        statement.raw_bind_parameter(index, &values[value])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writers taking turns as fast as they can: the log is checkpointed and started over
    /// between them, so it stays near what [`CHECKPOINT_COMMITS`] commits write instead of
    /// holding every page written since the database was opened.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_stays_bounded_under_steady_writers() {
        const WRITERS: usize = 4;
        const ROWS_EACH: usize = 2_500;
        const ROW: usize = 8 * 1024;
        const BOUND: u64 = 24 << 20;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("data.db");
        let write_turn = Arc::new(tokio::sync::Mutex::new(()));
        let connections = Connections::new(&path, &write_turn);
        connections
            .get()
            .expect("a connection")
            .connection()
            .execute_batch("CREATE TABLE rows (id INTEGER PRIMARY KEY, data BLOB)")
            .expect("a table");

        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let connections = connections.clone();
                let write_turn = write_turn.clone();
                tokio::spawn(async move {
                    for _ in 0..ROWS_EACH {
                        let _turn = write_turn.lock().await;
                        connections
                            .get()
                            .expect("a connection")
                            .connection()
                            .execute(
                                "INSERT INTO rows (data) VALUES (zeroblob(?1))",
                                [ROW as i64],
                            )
                            .expect("an insert");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("a writer");
        }

        let wal = path.with_extension("db-wal");
        let log = std::fs::metadata(&wal).expect("the write-ahead log").len();
        // The control: what was written is several times the bound, so a log that kept
        // it all (no checkpoint, or one that never completes) would be far past it.
        let written = (WRITERS * ROWS_EACH * ROW) as u64;
        assert!(written > 3 * BOUND, "the load writes {written} bytes");
        assert!(
            log < BOUND,
            "the write-ahead log grew to {log} bytes after {written} bytes of rows"
        );
        let rows: i64 = connections
            .get()
            .expect("a connection")
            .connection()
            .query_row("SELECT count(*) FROM rows", [], |row| row.get(0))
            .expect("a count");
        assert_eq!(rows, (WRITERS * ROWS_EACH) as i64);
    }
}

//! Events on a single node: a durable queue in `DATA_DIR/events.db` (SQLite, WAL).
//!
//! An event is one row; each consumer whose filter matches it gets a delivery row in the
//! same transaction, so an event stored is an event owed to every subscriber. Handing a
//! delivery out leases it (so it is not handed out twice) and counts the attempt, so a
//! handler that died with the node counts as one. A delivery row is deleted when its
//! handler succeeded (or the event was dead-lettered); a retry clears the lease and pushes
//! the row back in time. Opening the queue clears every lease: after a crash, whatever was
//! being handled is due again. Consumers are rows too: events published while a component
//! is between restarts are kept for it.
//!
//! All writes, leases included, go through one task that commits whatever is waiting in
//! one transaction (group commit); with WAL and `synchronous = NORMAL` a commit survives
//! the process being killed (a power cut may lose the last commits; see the README). The
//! queue has one rusqlite connection; each batch and each sweep runs on it in one trip to
//! a blocking thread, not one per statement.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use tokio::sync::{Notify, mpsc, oneshot};

use super::{ConsumerSpec, Delivery, Event, EventLog, Settle};
use crate::capabilities::messaging::{Message, MessageBus};
use crate::grammar::subjects::subject_matches;
use crate::manifest::EventSettings;

/// Deliveries leased per query (and at most waiting in a consumer's channel).
const FETCH: i64 = 32;
/// Writes committed together at most.
const BATCH: usize = 512;

pub struct LocalLog {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Arc<Mutex<rusqlite::Connection>>,
    /// Appended events, for core subscribers (`ephemeral`), published off the writer so
    /// that a slow subscriber never holds up a commit.
    fan_out: mpsc::UnboundedSender<Event>,
    consumers: Mutex<HashMap<String, Consumer>>,
    writes: mpsc::Sender<Write>,
    stored_bytes: AtomicU64,
    max_bytes: u64,
    max_age: Duration,
}

struct Consumer {
    filter: String,
    wake: Arc<Notify>,
}

enum Op {
    Append(Event),
    Ack {
        consumer: String,
        seq: i64,
    },
    Retry {
        consumer: String,
        seq: i64,
        due_at: i64,
    },
    RemoveConsumer(String),
    /// Lease up to `limit` of the consumer's deliveries due at `now` (see [`lease`]).
    Lease {
        consumer: String,
        now: i64,
        limit: i64,
    },
    /// Taken (the op moved into the batch's commit).
    None,
}

struct Write {
    op: Op,
    /// What a lease took (nothing for every other write), once committed.
    done: oneshot::Sender<Result<Lease, String>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

impl LocalLog {
    pub async fn open(
        path: &Path,
        settings: &EventSettings,
        bus: Arc<dyn MessageBus>,
    ) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let connection = rusqlite::Connection::open(path)
            .and_then(|c| {
                c.busy_timeout(Duration::from_secs(5))?;
                crate::storage::sqlite::plan_once(&c)?;
                c.execute_batch(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;\
                     CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, \
                     id TEXT NOT NULL UNIQUE, subject TEXT NOT NULL, body BLOB NOT NULL, \
                     headers TEXT NOT NULL, stored_at INTEGER NOT NULL);\
                     CREATE TABLE IF NOT EXISTS consumers (name TEXT PRIMARY KEY, filter TEXT NOT NULL);\
                     CREATE TABLE IF NOT EXISTS deliveries (consumer TEXT NOT NULL, seq INTEGER NOT NULL, \
                     attempts INTEGER NOT NULL, due_at INTEGER NOT NULL, leased INTEGER NOT NULL DEFAULT 0, \
                     PRIMARY KEY (consumer, seq));\
                     CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (consumer, leased, due_at, seq);\
                     UPDATE deliveries SET leased = 0 WHERE leased = 1;",
                )?;
                Ok(c)
            })
            .with_context(|| format!("opening the event queue {}", path.display()))?;
        // (The UPDATE above: nothing is being handled yet, so what was leased before a
        // crash is due again.)
        let consumers = connection
            .prepare("SELECT name, filter FROM consumers")?
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    Consumer {
                        filter: row.get(1)?,
                        wake: Arc::new(Notify::new()),
                    },
                ))
            })?
            .collect::<Result<HashMap<_, _>, _>>()?;
        let stored: i64 = connection.query_row(
            "SELECT COALESCE(SUM(LENGTH(body)), 0) FROM events",
            [],
            |row| row.get(0),
        )?;
        let (writes, queue) = mpsc::channel(4096);
        let (fan_out, appended) = mpsc::unbounded_channel();
        tokio::spawn(fan_out_to_core(appended, bus));
        let inner = Arc::new(Inner {
            connection: Arc::new(Mutex::new(connection)),
            fan_out,
            consumers: Mutex::new(consumers),
            writes,
            stored_bytes: AtomicU64::new(stored.max(0) as u64),
            max_bytes: settings.max_bytes.as_u64(),
            max_age: settings.max_age,
        });
        tokio::spawn(writer(Arc::downgrade(&inner), queue));
        tokio::spawn(sweeper(Arc::downgrade(&inner)));
        tracing::info!(path = %path.display(), "durable events in the local queue");
        Ok(Self { inner })
    }
}

impl Inner {
    /// Runs `work` on the queue's connection, on a blocking thread.
    async fn db<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> rusqlite::Result<R> {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            work(&mut connection.lock().expect("event queue connection"))
        })
        .await
        .unwrap_or_else(|e| Err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))
    }

    async fn write(&self, op: Op) -> Result<Lease, String> {
        let (done, result) = oneshot::channel();
        self.writes
            .send(Write { op, done })
            .await
            .map_err(|_| "the event queue is closed".to_string())?;
        result
            .await
            .map_err(|_| "the event queue is closed".to_string())?
    }

    fn wake(&self, consumer: &str) {
        if let Some(c) = self.consumers.lock().expect("events lock").get(consumer) {
            c.wake.notify_one();
        }
    }
}

/// What one batch of writes came to.
#[derive(Default)]
struct Committed {
    results: Vec<Result<Lease, String>>,
    woken: HashSet<String>,
    appended: Vec<Event>,
    added_bytes: u64,
}

/// Commits what is waiting, in one transaction, then answers each write.
async fn writer(inner: std::sync::Weak<Inner>, mut queue: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let Some(inner) = inner.upgrade() else { return };
        let targets: Vec<(String, String)> = inner
            .consumers
            .lock()
            .expect("events lock")
            .iter()
            .map(|(name, c)| (name.clone(), c.filter.clone()))
            .collect();
        let ops: Vec<Op> = batch
            .iter_mut()
            .map(|w| std::mem::replace(&mut w.op, Op::None))
            .collect();
        let stored = inner.stored_bytes.load(Ordering::Relaxed);
        let max_bytes = inner.max_bytes;
        let outcome = inner
            .db(move |c| commit(c, &ops, &targets, stored, max_bytes))
            .await;
        match outcome {
            Ok(committed) => {
                inner
                    .stored_bytes
                    .fetch_add(committed.added_bytes, Ordering::Relaxed);
                for (write, result) in batch.drain(..).zip(committed.results) {
                    let _ = write.done.send(result);
                }
                for name in &committed.woken {
                    inner.wake(name);
                }
                for event in committed.appended {
                    let _ = inner.fan_out.send(event);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "writing to the event queue");
                for write in batch.drain(..) {
                    let _ = write
                        .done
                        .send(Err(format!("writing to the event queue: {e}")));
                }
            }
        }
    }
}

/// One batch of writes in one transaction.
fn commit(
    c: &mut rusqlite::Connection,
    ops: &[Op],
    targets: &[(String, String)],
    stored: u64,
    max_bytes: u64,
) -> rusqlite::Result<Committed> {
    let tx = c.transaction()?;
    let mut done = Committed::default();
    let mut acked: HashMap<&str, Vec<i64>> = HashMap::new();
    for op in ops {
        match op {
            Op::None => done.results.push(Ok(Lease::default())),
            Op::Append(event) => {
                let size = event.body.len() as u64;
                if stored + done.added_bytes + size > max_bytes {
                    done.results.push(Err(format!(
                        "the event queue is full (node.events.max_bytes = {})",
                        bytesize::ByteSize::b(max_bytes)
                    )));
                    continue;
                }
                let headers = serde_json::to_string(&event.headers).unwrap_or_default();
                let inserted = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO events (id, subject, body, headers, stored_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute((
                        &event.id,
                        &event.subject,
                        event.body.as_ref(),
                        headers,
                        now_ms(),
                    ))?;
                if inserted == 1 {
                    done.added_bytes += size;
                    let seq = tx.last_insert_rowid();
                    let owed: Vec<&String> = targets
                        .iter()
                        .filter(|(_, filter)| subject_matches(filter, &event.subject))
                        .map(|(name, _)| name)
                        .collect();
                    if !owed.is_empty() {
                        // One statement for every consumer the event is owed to.
                        tx.prepare_cached(
                            "INSERT INTO deliveries (consumer, seq, attempts, due_at) \
                             SELECT value, ?1, 0, 0 FROM json_each(?2)",
                        )?
                        .execute((seq, serde_json::to_string(&owed).unwrap_or_default()))?;
                        done.woken.extend(owed.into_iter().cloned());
                    }
                    done.appended.push(event.clone());
                }
                done.results.push(Ok(Lease::default()));
            }
            Op::Ack { consumer, seq } => {
                // Deleted together after the loop, one statement per consumer.
                acked.entry(consumer.as_str()).or_default().push(*seq);
                done.results.push(Ok(Lease::default()));
            }
            Op::Retry {
                consumer,
                seq,
                due_at,
            } => {
                tx.prepare_cached(
                    "UPDATE deliveries SET due_at = ?1, leased = 0 WHERE consumer = ?2 AND seq = ?3",
                )?
                .execute((due_at, consumer, seq))?;
                done.woken.insert(consumer.clone());
                done.results.push(Ok(Lease::default()));
            }
            Op::Lease {
                consumer,
                now,
                limit,
            } => done.results.push(Ok(lease(&tx, consumer, *now, *limit)?)),
            Op::RemoveConsumer(name) => {
                tx.prepare_cached("DELETE FROM consumers WHERE name = ?1")?
                    .execute([name])?;
                tx.prepare_cached("DELETE FROM deliveries WHERE consumer = ?1")?
                    .execute([name])?;
                done.results.push(Ok(Lease::default()));
            }
        }
    }
    for (consumer, seqs) in &acked {
        tx.prepare_cached(
            "DELETE FROM deliveries WHERE consumer = ?1 \
             AND seq IN (SELECT value FROM json_each(?2))",
        )?
        .execute((consumer, serde_json::to_string(seqs).unwrap_or_default()))?;
    }
    tx.commit()?;
    Ok(done)
}

/// Subscriptions marked ephemeral take events from the core bus.
async fn fan_out_to_core(mut appended: mpsc::UnboundedReceiver<Event>, bus: Arc<dyn MessageBus>) {
    while let Some(event) = appended.recv().await {
        let _ = bus
            .publish(Message {
                subject: event.subject,
                reply_to: None,
                body: event.body,
            })
            .await;
    }
}

/// Deletes events every consumer is done with, and events older than `max_age`.
async fn sweeper(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let Some(inner) = inner.upgrade() else { return };
        let oldest = now_ms() - inner.max_age.as_millis() as i64;
        let swept = inner
            .db(move |c| {
                let expired = c.execute(
                    "DELETE FROM deliveries WHERE seq IN (SELECT seq FROM events WHERE stored_at < ?1)",
                    [oldest],
                )?;
                c.execute(
                    "DELETE FROM events WHERE seq NOT IN (SELECT seq FROM deliveries)",
                    [],
                )?;
                let stored: i64 = c.query_row(
                    "SELECT COALESCE(SUM(LENGTH(body)), 0) FROM events",
                    [],
                    |row| row.get(0),
                )?;
                Ok((expired, stored))
            })
            .await
            .map(|(expired, stored)| {
                inner
                    .stored_bytes
                    .store(stored.max(0) as u64, Ordering::Relaxed);
                expired
            });
        match swept {
            Ok(0) => {}
            Ok(expired) => tracing::warn!(
                expired,
                "events older than node.events.max_age were dropped undelivered"
            ),
            Err(e) => tracing::warn!(error = %e, "sweeping the event queue"),
        }
    }
}

#[async_trait]
impl EventLog for LocalLog {
    async fn append(&self, event: Event) -> Result<(), String> {
        self.inner.write(Op::Append(event)).await.map(drop)
    }

    async fn consume(&self, spec: ConsumerSpec) -> Result<mpsc::Receiver<Delivery>, String> {
        let (name, filter) = (spec.name.clone(), spec.filter.clone());
        self.inner
            .db(move |c| {
                c.execute(
                    "INSERT OR REPLACE INTO consumers (name, filter) VALUES (?1, ?2)",
                    (name, filter),
                )
            })
            .await
            .map_err(|e| format!("registering consumer {}: {e}", spec.name))?;
        let wake = Arc::new(Notify::new());
        self.inner.consumers.lock().expect("events lock").insert(
            spec.name.clone(),
            Consumer {
                filter: spec.filter.clone(),
                wake: wake.clone(),
            },
        );
        let (sender, receiver) = mpsc::channel(32);
        tokio::spawn(fetcher(self.inner.clone(), spec.name, wake, sender));
        Ok(receiver)
    }

    async fn remove_consumer(&self, name: &str) -> Result<(), String> {
        self.inner
            .consumers
            .lock()
            .expect("events lock")
            .remove(name);
        // Through the writer, so that no append committed after it adds deliveries for it.
        self.inner
            .write(Op::RemoveConsumer(name.to_string()))
            .await
            .map(drop)
            .map_err(|e| format!("removing consumer {name}: {e}"))
    }

    async fn retain_consumers(&self, keep: &HashSet<String>) -> Result<(), String> {
        let unclaimed: Vec<String> = self
            .inner
            .consumers
            .lock()
            .expect("events lock")
            .keys()
            .filter(|name| !keep.contains(*name))
            .cloned()
            .collect();
        for name in unclaimed {
            tracing::info!(consumer = %name, "removing a consumer no subscription claims any more");
            self.remove_consumer(&name).await?;
        }
        Ok(())
    }

    fn durable(&self) -> bool {
        true
    }
}

/// How long an idle consumer waits before it looks at the queue again unwoken.
const IDLE_RECHECK_MS: i64 = 30_000;

/// Hands a consumer's due deliveries out, oldest first, until its receiver is gone.
async fn fetcher(
    inner: Arc<Inner>,
    consumer: String,
    wake: Arc<Notify>,
    sender: mpsc::Sender<Delivery>,
) {
    loop {
        // Lease only what the channel can take at once.
        let room = loop {
            let room = sender.capacity();
            if room > 0 {
                break room;
            }
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                () = sender.closed() => return,
            }
        };
        let (now, leased_at) = (now_ms(), tokio::time::Instant::now());
        let leased = inner
            .write(Op::Lease {
                consumer: consumer.clone(),
                now,
                limit: (room as i64).min(FETCH),
            })
            .await;
        let Lease {
            rows,
            drained,
            next_due,
        } = match leased {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(%consumer, error = %e, "reading the event queue");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let total = rows.len() as u64;
        for (i, row) in rows.into_iter().enumerate() {
            let delivery = Delivery {
                attempt: row.attempt,
                pending: total - i as u64 - 1,
                settle: Box::new(LocalSettle {
                    inner: inner.clone(),
                    consumer: consumer.clone(),
                    seq: row.seq,
                    settled: AtomicBool::new(false),
                }),
                event: row.event,
            };
            // A send that fails drops the delivery, whose settle releases its lease.
            if sender.send(delivery).await.is_err() {
                return;
            }
        }
        // Everything due was taken: leasing again at once would find nothing (a write
        // transaction and a read for the next retry's time, for each wake-up). Every write
        // that makes a delivery due wakes its consumer, so wait for that, or for the next
        // retry to fall due, and only look again now and then as a safety net: a node
        // with thousands of idle consumers must not poll them.
        if drained {
            let wait = next_due
                .map(|due| Duration::from_millis((due - now).clamp(1, IDLE_RECHECK_MS) as u64))
                .unwrap_or(Duration::from_millis(IDLE_RECHECK_MS as u64));
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep_until(leased_at + wait) => {}
                () = sender.closed() => return,
            }
        }
    }
}

struct Leased {
    seq: i64,
    attempt: u32,
    event: Event,
}

/// What one lease took.
#[derive(Default)]
struct Lease {
    rows: Vec<Leased>,
    /// The lease took every delivery of the consumer that was due.
    drained: bool,
    /// Then: when the first of its deliveries not yet due (a retry) falls due, if any.
    next_due: Option<i64>,
}

/// Leases up to `limit` due deliveries of `consumer` and counts their attempt (before any
/// handler runs, so a crash mid-handler counts). It runs in the writer's batch, so a lease
/// is committed with whatever else waits instead of being a transaction of its own, and
/// its deliveries are handed out only once that commit is done. Two statements whatever
/// the count: the lease itself is one UPDATE, then one read of the events.
fn lease(
    tx: &rusqlite::Transaction<'_>,
    consumer: &str,
    now: i64,
    limit: i64,
) -> rusqlite::Result<Lease> {
    let attempts: HashMap<i64, i64> = tx
        .prepare_cached(
            "UPDATE deliveries SET attempts = attempts + 1, leased = 1 WHERE rowid IN \
             (SELECT rowid FROM deliveries WHERE consumer = ?1 AND leased = 0 AND due_at <= ?2 \
              ORDER BY seq LIMIT ?3) RETURNING seq, attempts",
        )?
        .query_map((consumer, now, limit), |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let drained = (attempts.len() as i64) < limit;
    let next_due = if drained {
        tx.prepare_cached(
            "SELECT MIN(due_at) FROM deliveries \
             WHERE consumer = ?1 AND leased = 0 AND due_at > ?2",
        )?
        .query_row((consumer, now), |row| row.get(0))?
    } else {
        None
    };
    let rows = if attempts.is_empty() {
        Vec::new()
    } else {
        let seqs: Vec<i64> = attempts.keys().copied().collect();
        tx.prepare_cached(
            "SELECT seq, id, subject, body, headers FROM events \
             WHERE seq IN (SELECT value FROM json_each(?1)) ORDER BY seq",
        )?
        .query_map([serde_json::to_string(&seqs).unwrap_or_default()], |row| {
            let seq: i64 = row.get(0)?;
            Ok(Leased {
                seq,
                attempt: u32::try_from(attempts.get(&seq).copied().unwrap_or(1))
                    .unwrap_or(u32::MAX),
                event: Event {
                    id: row.get(1)?,
                    subject: row.get(2)?,
                    body: bytes::Bytes::from(row.get::<_, Vec<u8>>(3)?),
                    headers: serde_json::from_str(&row.get::<_, String>(4)?).unwrap_or_default(),
                },
            })
        })?
        .collect::<rusqlite::Result<_>>()?
    };
    Ok(Lease {
        rows,
        drained,
        next_due,
    })
}

struct LocalSettle {
    inner: Arc<Inner>,
    consumer: String,
    seq: i64,
    settled: AtomicBool,
}

#[async_trait]
impl Settle for LocalSettle {
    async fn ack(&self) -> Result<(), String> {
        self.settled.store(true, Ordering::Relaxed);
        self.inner
            .write(Op::Ack {
                consumer: self.consumer.clone(),
                seq: self.seq,
            })
            .await
            .map(drop)
    }

    async fn retry_after(&self, delay: Duration) -> Result<(), String> {
        self.settled.store(true, Ordering::Relaxed);
        self.inner
            .write(Op::Retry {
                consumer: self.consumer.clone(),
                seq: self.seq,
                due_at: now_ms() + delay.as_millis() as i64,
            })
            .await
            .map(drop)
    }
}

impl Drop for LocalSettle {
    /// A delivery dropped unsettled (its node is stopping the subscription) is due again.
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Relaxed) {
            let inner = self.inner.clone();
            // Due again at once.
            let op = Op::Retry {
                consumer: std::mem::take(&mut self.consumer),
                seq: self.seq,
                due_at: now_ms(),
            };
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = inner.write(op).await;
                });
            }
        }
    }
}

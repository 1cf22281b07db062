//! Durable events: what a guest `publish`es without a reply subject is an event, stored
//! before `publish` returns ok and handed to each subscribed component until a handler
//! succeeds (at least once). Three backends sit behind [`EventLog`], picked by the node's
//! settings:
//!
//! - [`jetstream::JetStreamLog`]: a JetStream stream (file storage) when the node has a
//!   `nats_url`; one durable pull consumer per component and subscription pattern, shared
//!   by every node on that NATS, so each event is handled by one node at a time.
//! - [`local::LocalLog`]: a queue in `DATA_DIR/events.db` (SQLite, WAL) when the node runs
//!   alone; the same consumer model, kept across restarts.
//! - [`EphemeralLog`]: core NATS / the in-process bus (`node.events.durable = false`): at
//!   most once, as before durable events existed.
//!
//! Events live in their own subject space, `trellis-events.TENANT.SUBJECT`, apart from the
//! core subjects `trellis.TENANT.SUBJECT` that requests and replies use: a JetStream stream
//! answers every publish on its subjects, which would hijack request/reply. Every append
//! also reaches core subscribers of the event subject, which is how subscriptions marked
//! `ephemeral` see events.
//!
//! Each event carries a host-assigned id (`Nats-Msg-Id` on JetStream, so a re-sent
//! duplicate is dropped), which the handler sees as `TRELLIS_EVENT_ID`.

pub mod jetstream;
pub mod local;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::capabilities::messaging::{Message, MessageBus};
use crate::manifest::EventSettings;

/// Header naming how many times a dead-lettered event was tried.
pub const ATTEMPTS_HEADER: &str = "Trellis-Attempts";
/// Header with the last error of a dead-lettered event.
pub const ERROR_HEADER: &str = "Trellis-Error";

/// One event: full (`trellis-events.`-prefixed) subject, body, id and headers.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub subject: String,
    pub body: Bytes,
    pub headers: Vec<(String, String)>,
}

impl Event {
    pub fn new(subject: String, body: Bytes) -> Event {
        Event {
            id: new_event_id(),
            subject,
            body,
            headers: Vec::new(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An event handed to a consumer, with what it takes to settle it.
pub struct Delivery {
    pub event: Event,
    /// Which attempt this is, from 1; a delivery to a node that died mid-handler counts.
    pub attempt: u32,
    /// Events still waiting for this consumer (not counting this one), as last known.
    pub pending: u64,
    pub settle: Box<dyn Settle>,
}

/// How a delivery ends: acknowledged (handled, or dead-lettered), or to be retried.
#[async_trait]
pub trait Settle: Send + Sync {
    async fn ack(&self) -> Result<(), String>;
    /// Hands the event back, to be delivered again after `delay`.
    async fn retry_after(&self, delay: Duration) -> Result<(), String>;
}

// A delivery that is dropped unsettled is delivered again (by every backend that keeps
// events): that is what happens to what a stopping subscription still held.

/// A durable consumer: one per component and subscription pattern.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Stable across restarts and nodes: nodes using the same name share its events.
    pub name: String,
    /// Full event-subject pattern (`trellis-events.TENANT.PATTERN`).
    pub filter: String,
}

#[async_trait]
pub trait EventLog: Send + Sync {
    /// Stores `event`; returns once it is stored (then core subscribers see it too).
    async fn append(&self, event: Event) -> Result<(), String>;
    /// Deliveries of `consumer` (created if missing) until the receiver is dropped.
    async fn consume(&self, consumer: ConsumerSpec) -> Result<mpsc::Receiver<Delivery>, String>;
    /// Forgets a consumer and what it still had to handle (its subscription was removed).
    async fn remove_consumer(&self, name: &str) -> Result<(), String>;
    /// Removes the consumers not in `keep` (once every component has subscribed after a
    /// start: a subscription dropped from the manifest while the node was down). Only
    /// where this node alone owns the consumers; shared ones (JetStream) expire instead.
    async fn retain_consumers(
        &self,
        _keep: &std::collections::HashSet<String>,
    ) -> Result<(), String> {
        Ok(())
    }
    /// Whether deliveries survive a crash (acks and retries mean something).
    fn durable(&self) -> bool;
}

/// Opens the node's event log for its settings: JetStream with NATS, the local queue
/// without, core delivery when durability is switched off.
pub async fn open(
    settings: &EventSettings,
    data_dir: &std::path::Path,
    nats: Option<async_nats::Client>,
    bus: Arc<dyn MessageBus>,
) -> anyhow::Result<Arc<dyn EventLog>> {
    if !settings.durable {
        return Ok(Arc::new(EphemeralLog { bus }));
    }
    match nats {
        Some(client) => Ok(Arc::new(
            jetstream::JetStreamLog::open(client, settings).await?,
        )),
        None => Ok(Arc::new(
            local::LocalLog::open(&data_dir.join("events.db"), settings, bus).await?,
        )),
    }
}

/// A node-unique prefix for event ids: start time and process id, hashed.
fn id_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| {
        use sha2::Digest;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let seed = format!("{nanos}/{}/{:p}", std::process::id(), &PREFIX);
        let hash = sha2::Sha256::digest(seed.as_bytes());
        hash[..8].iter().map(|b| format!("{b:02x}")).collect()
    })
}

/// A fresh event id, unique across nodes and restarts: `PREFIX-COUNTER`.
pub fn new_event_id() -> String {
    use std::fmt::Write;
    static NEXT: AtomicU64 = AtomicU64::new(1);
    // One allocation of the right size: this runs for every event published.
    let prefix = id_prefix();
    let mut id = String::with_capacity(prefix.len() + 21);
    id.push_str(prefix);
    id.push('-');
    let _ = write!(id, "{}", NEXT.fetch_add(1, Ordering::Relaxed));
    id
}

/// At-most-once events on the core bus (`node.events.durable = false`).
pub struct EphemeralLog {
    bus: Arc<dyn MessageBus>,
}

impl EphemeralLog {
    pub fn new(bus: Arc<dyn MessageBus>) -> Self {
        Self { bus }
    }
}

#[async_trait]
impl EventLog for EphemeralLog {
    async fn append(&self, event: Event) -> Result<(), String> {
        self.bus
            .publish(Message {
                subject: event.subject,
                reply_to: None,
                body: event.body,
            })
            .await
    }

    /// There are no consumers to keep: a subscription whose events are at most once
    /// takes them from the core bus itself (`durable()` says so), with in-memory retries.
    async fn consume(&self, consumer: ConsumerSpec) -> Result<mpsc::Receiver<Delivery>, String> {
        Err(format!(
            "events are at most once on this node (node.events.durable = false); \
             {} takes them from the core bus",
            consumer.name
        ))
    }

    async fn remove_consumer(&self, _: &str) -> Result<(), String> {
        Ok(())
    }

    fn durable(&self) -> bool {
        false
    }
}

/// A consumer name for a component's subscription: only the characters JetStream allows
/// in a durable name, made unique by a hash of what it stands for.
pub fn consumer_name(tenant: &str, component: &str, pattern: &str) -> String {
    use sha2::Digest;
    let readable: String = format!("{tenant}_{component}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    let hash = sha2::Sha256::digest(format!("{tenant}\n{component}\n{pattern}").as_bytes());
    let hash: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("trellis_{readable}_{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_valid_and_distinct() {
        let a = consumer_name("shop", "payment", "order.created");
        let b = consumer_name("shop", "payment", "order.*");
        assert_ne!(a, b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{a}"
        );
        assert_eq!(a, consumer_name("shop", "payment", "order.created"));
    }

    #[test]
    fn event_ids_are_unique() {
        assert_ne!(new_event_id(), new_event_id());
    }
}

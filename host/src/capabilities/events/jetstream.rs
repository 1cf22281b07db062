//! Events on JetStream: one stream (file storage, interest retention: an event is kept
//! until every consumer whose filter matches it has acknowledged it) and one durable pull
//! consumer per component and subscription pattern. Nodes on the same NATS share the
//! consumers, so each event goes to one node at a time; an event not acknowledged within
//! `ack_wait` (its node died) is delivered again. Acks and naks are the server's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc};

use super::{ConsumerSpec, Delivery, Event, EventLog, Settle};
use crate::manifest::EventSettings;

/// How long a publish keeps trying to store its event (NATS restarting, a lost ack).
const APPEND_PATIENCE: Duration = Duration::from_secs(8);

/// Deliveries one consumer may hold unsettled on this node.
const HELD: usize = 64;
/// How long one pull waits for events before asking again.
const PULL_WAIT: Duration = Duration::from_secs(5);

/// The subjects every event lives under (`trellis-events.TENANT.SUBJECT`).
const EVENT_SUBJECTS: &str = "trellis-events.>";

pub struct JetStreamLog {
    context: jetstream::Context,
    stream: stream::Stream,
    ack_wait: Duration,
    max_age: Duration,
}

impl JetStreamLog {
    /// Creates the stream if missing. Fails clearly when the server has no JetStream.
    pub async fn open(
        client: async_nats::Client,
        settings: &EventSettings,
    ) -> anyhow::Result<Self> {
        let context = jetstream::new(client);
        let config = stream::Config {
            name: settings.stream.clone(),
            subjects: vec![EVENT_SUBJECTS.into()],
            retention: stream::RetentionPolicy::Interest,
            storage: stream::StorageType::File,
            // A full stream refuses new events (the guest's publish fails) rather than
            // dropping stored ones.
            discard: stream::DiscardPolicy::New,
            max_age: settings.max_age,
            max_bytes: i64::try_from(settings.max_bytes.as_u64()).unwrap_or(i64::MAX),
            duplicate_window: settings.duplicate_window,
            ..Default::default()
        };
        // The server may still be starting (the client retries its first connect), so an
        // unavailable JetStream is asked again for a few seconds before it is taken as off.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let stream = loop {
            match context.get_or_create_stream(config.clone()).await {
                Ok(stream) => break stream,
                Err(e) => {
                    let text = e.to_string();
                    let disabled = ["not enabled", "unavailable", "no responders"]
                        .iter()
                        .any(|sign| text.contains(sign));
                    if tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    if disabled {
                        anyhow::bail!(
                            "the NATS server has JetStream disabled ({text}); durable events \
                             need it: start nats-server with -js (and -sd DIR), or set \
                             node.events.durable = false for at-most-once events"
                        );
                    }
                    anyhow::bail!("creating JetStream stream {}: {text}", settings.stream);
                }
            }
        };
        tracing::info!(stream = %settings.stream, "durable events on JetStream");
        Ok(Self {
            context,
            stream,
            ack_wait: settings.ack_wait,
            max_age: settings.max_age,
        })
    }

    fn consumer_config(&self, spec: &ConsumerSpec) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(spec.name.clone()),
            filter_subject: spec.filter.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Attempts are counted by the node (`limits.message_attempts`, then a dead
            // letter), so the server never gives up by itself.
            max_deliver: -1,
            max_ack_pending: 1024,
            // A new subscription starts with the events published from then on (as the
            // local queue does), not with whatever the stream still keeps for others.
            deliver_policy: consumer::DeliverPolicy::New,
            // A consumer no node pulls from for as long as events live (its subscription
            // was dropped while every node was down) is removed by the server.
            inactive_threshold: self.max_age,
            ..Default::default()
        }
    }
}

#[async_trait]
impl EventLog for JetStreamLog {
    /// Publishes and waits for the stream's ack. A lost connection or ack is retried for a
    /// few seconds with the same `Nats-Msg-Id`: the stream stores the event once however
    /// often it is sent, so a retry is safe even when the first send was stored.
    async fn append(&self, event: Event) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + APPEND_PATIENCE;
        loop {
            let mut publish = jetstream::message::PublishMessage::build()
                .payload(event.body.clone())
                .message_id(&event.id);
            for (name, value) in &event.headers {
                publish = publish.header(name.as_str(), value.as_str());
            }
            let stored = match self
                .context
                .send_publish(event.subject.clone(), publish)
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match stored {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("storing the event: {e}"));
                }
                Err(e) => {
                    tracing::debug!(error = %e, id = %event.id, "storing an event; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Pulls only as many events as may be outstanding (`HELD`), in one-shot batches, so
    /// that the node never holds an event it does not keep alive: every delivery handed
    /// out and not yet settled — waiting in the channel, waiting for admission, or in a
    /// handler — gets an in-progress ack every third of `ack_wait`, and the server hands
    /// it to another node only when this one stops doing so (it died).
    async fn consume(&self, spec: ConsumerSpec) -> Result<mpsc::Receiver<Delivery>, String> {
        let consumer: consumer::PullConsumer = self
            .stream
            .get_or_create_consumer(&spec.name, self.consumer_config(&spec))
            .await
            .map_err(|e| format!("creating consumer {}: {e}", spec.name))?;
        let (sender, receiver) = mpsc::channel(HELD);
        let held = Held::default();
        tokio::spawn(keep_alive(held.clone(), self.ack_wait / 3, sender.clone()));
        let stream = self.stream.clone();
        let config = self.consumer_config(&spec);
        tokio::spawn(async move {
            let mut consumer = consumer;
            loop {
                // Wait for room: settled deliveries make it.
                loop {
                    let room = held.room.notified();
                    if held.count() < HELD {
                        break;
                    }
                    tokio::select! {
                        () = room => {}
                        () = sender.closed() => return,
                    }
                }
                let want = HELD - held.count();
                if let Err(e) = pull_batch(&consumer, want, &held, &sender).await {
                    // The consumer may be gone (removed by another node or by hand): make
                    // it again, after a pause.
                    tracing::warn!(consumer = %spec.name, error = %e, "pulling events; recreating the consumer");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        () = sender.closed() => return,
                    }
                    match stream
                        .get_or_create_consumer(&spec.name, config.clone())
                        .await
                    {
                        Ok(again) => consumer = again,
                        Err(e) => {
                            tracing::warn!(consumer = %spec.name, error = %e, "recreating the consumer")
                        }
                    }
                }
                if sender.is_closed() {
                    return;
                }
            }
        });
        Ok(receiver)
    }

    async fn remove_consumer(&self, name: &str) -> Result<(), String> {
        match self.stream.delete_consumer(name).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(format!("removing consumer {name}: {e}")),
        }
    }

    fn durable(&self) -> bool {
        true
    }
}

/// One pull of up to `want` events, each handed to `sender` as it arrives. Ends when the
/// server ends the pull (the count reached, or nothing more within `PULL_WAIT`) or the
/// receiver is gone.
async fn pull_batch(
    consumer: &consumer::PullConsumer,
    want: usize,
    held: &Held,
    sender: &mpsc::Sender<Delivery>,
) -> Result<(), String> {
    let mut batch = consumer
        .batch()
        .max_messages(want)
        .expires(PULL_WAIT)
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let message = tokio::select! {
            message = batch.next() => message,
            () = sender.closed() => return Ok(()),
        };
        match message {
            None => return Ok(()),
            Some(Ok(message)) => {
                if sender.send(delivery(message, held)).await.is_err() {
                    return Ok(());
                }
            }
            Some(Err(e)) => return Err(e.to_string()),
        }
    }
}

/// Deliveries handed out and not settled yet, kept alive with in-progress acks.
#[derive(Clone, Default)]
struct Held {
    ackers: Arc<Mutex<HashMap<u64, Arc<Acker>>>>,
    next: Arc<AtomicU64>,
    room: Arc<Notify>,
}

impl Held {
    fn count(&self) -> usize {
        self.ackers.lock().expect("held lock").len()
    }

    fn add(&self, acker: Arc<Acker>) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.ackers.lock().expect("held lock").insert(token, acker);
        token
    }

    fn release(&self, token: u64) {
        self.ackers.lock().expect("held lock").remove(&token);
        self.room.notify_one();
    }
}

/// Tells the server every `every` that the held deliveries are still being worked on,
/// until the consumer's receiver is gone.
async fn keep_alive(held: Held, every: Duration, sender: mpsc::Sender<Delivery>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = sender.closed() => return,
        }
        let ackers: Vec<Arc<Acker>> = held
            .ackers
            .lock()
            .expect("held lock")
            .values()
            .cloned()
            .collect();
        for acker in ackers {
            let _ = acker.ack_with(AckKind::Progress).await;
        }
    }
}

fn delivery(message: jetstream::Message, held: &Held) -> Delivery {
    let (attempt, pending) = match message.info() {
        Ok(info) => (
            u32::try_from(info.delivered).unwrap_or(u32::MAX),
            info.pending,
        ),
        Err(_) => (1, 0),
    };
    let (message, acker) = message.split();
    let mut headers = Vec::new();
    let mut id = None;
    if let Some(map) = &message.headers {
        for (name, values) in map.iter() {
            for value in values {
                let name = name.to_string();
                if name.eq_ignore_ascii_case("Nats-Msg-Id") {
                    id = Some(value.as_str().to_string());
                }
                headers.push((name, value.as_str().to_string()));
            }
        }
    }
    let acker = Arc::new(acker);
    let token = held.add(acker.clone());
    Delivery {
        event: Event {
            id: id.unwrap_or_default(),
            subject: message.subject.to_string(),
            body: message.payload,
            headers,
        },
        attempt: attempt.max(1),
        pending,
        settle: Box::new(JetStreamSettle {
            acker,
            held: held.clone(),
            token,
        }),
    }
}

struct JetStreamSettle {
    acker: Arc<Acker>,
    held: Held,
    token: u64,
}

#[async_trait]
impl Settle for JetStreamSettle {
    async fn ack(&self) -> Result<(), String> {
        let result = self.acker.ack().await.map_err(|e| e.to_string());
        self.held.release(self.token);
        result
    }
    async fn retry_after(&self, delay: Duration) -> Result<(), String> {
        let result = self
            .acker
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| e.to_string());
        self.held.release(self.token);
        result
    }
}

impl Drop for JetStreamSettle {
    /// A delivery dropped unsettled stops being kept alive: the server redelivers it
    /// after `ack_wait`.
    fn drop(&mut self) {
        self.held.release(self.token);
    }
}

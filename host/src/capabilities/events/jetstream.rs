//! Events on JetStream: one stream (file storage, interest retention: an event is kept
//! until every consumer whose filter matches it has acknowledged it) and one durable pull
//! consumer per component and subscription pattern. Nodes on the same NATS share the
//! consumers, so each event goes to one node at a time; an event not acknowledged within
//! `ack_wait` (its node died) is delivered again. Acks and naks are the server's.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{ConsumerSpec, Delivery, Event, EventLog, Settle};
use crate::manifest::EventSettings;

/// How long a publish keeps trying to store its event (NATS restarting, a lost ack).
const APPEND_PATIENCE: Duration = Duration::from_secs(8);

/// The subjects every event lives under (`trellis-events.TENANT.SUBJECT`).
const EVENT_SUBJECTS: &str = "trellis-events.>";

pub struct JetStreamLog {
    context: jetstream::Context,
    stream: stream::Stream,
    ack_wait: Duration,
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
            deliver_policy: consumer::DeliverPolicy::All,
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

    async fn consume(&self, spec: ConsumerSpec) -> Result<mpsc::Receiver<Delivery>, String> {
        let consumer: consumer::PullConsumer = self
            .stream
            .get_or_create_consumer(&spec.name, self.consumer_config(&spec))
            .await
            .map_err(|e| format!("creating consumer {}: {e}", spec.name))?;
        let (sender, receiver) = mpsc::channel(64);
        let stream = self.stream.clone();
        let config = self.consumer_config(&spec);
        tokio::spawn(async move {
            let mut consumer = consumer;
            loop {
                match consumer.messages().await {
                    Ok(mut messages) => {
                        while let Some(message) = tokio::select! {
                            m = messages.next() => m,
                            () = sender.closed() => return,
                        } {
                            let message = match message {
                                Ok(m) => m,
                                Err(e) => {
                                    tracing::debug!(consumer = %spec.name, error = %e, "pulling events");
                                    continue;
                                }
                            };
                            let Some(delivery) = delivery(message) else {
                                continue;
                            };
                            if sender.send(delivery).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(consumer = %spec.name, error = %e, "pulling events; retrying")
                    }
                }
                if sender.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                // The consumer may have been removed meanwhile (by another node): make it again.
                if let Ok(again) = stream
                    .get_or_create_consumer(&spec.name, config.clone())
                    .await
                {
                    consumer = again;
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

    fn heartbeat(&self) -> Option<Duration> {
        Some(self.ack_wait / 3)
    }
}

fn delivery(message: jetstream::Message) -> Option<Delivery> {
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
    Some(Delivery {
        event: Event {
            id: id.unwrap_or_default(),
            subject: message.subject.to_string(),
            body: message.payload,
            headers,
        },
        attempt: attempt.max(1),
        pending,
        settle: Box::new(JetStreamSettle(acker)),
    })
}

struct JetStreamSettle(jetstream::message::Acker);

#[async_trait]
impl Settle for JetStreamSettle {
    async fn ack(&self) -> Result<(), String> {
        self.0.ack().await.map_err(|e| e.to_string())
    }
    async fn retry_after(&self, delay: Duration) -> Result<(), String> {
        self.0
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| e.to_string())
    }
    async fn in_progress(&self) -> Result<(), String> {
        self.0
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| e.to_string())
    }
}

//! Messaging for guests: `wasmcloud:messaging@0.2.0` (consumer: publish and request/reply;
//! handler: `handle-message`), on an in-process bus by default or on NATS when the node has
//! a `nats://` URL.
//!
//! - Subjects are namespaced per tenant: a guest of tenant `shop` publishing `order.created`
//!   puts `trellis.shop.order.created` on the bus, and its subscriptions only ever see its
//!   own tenant's subjects. Reply inboxes (`_INBOX.…`, unguessable) are the one exception.
//! - Grants: a component may publish or request only on subjects matching its manifest's
//!   `publish` patterns (NATS wildcards); without them the call answers an error string.
//!   Its `subscriptions` patterns are what trigger its `handle-message`.
//! - Each subscription uses the queue group `trellis.TENANT.COMPONENT`, so several nodes on
//!   one NATS server split a component's messages instead of all handling each one.
//! - A `publish` without a reply subject is an event: it goes to the node's event log
//!   (`crate::capabilities::events`), durable by default, under `trellis-events.TENANT.`.
//!   Requests, replies and publishes with a reply subject stay on the core bus.
//!
//! Delivering a subscription's messages to a component (admission, retries, dead letters)
//! belongs to the component's slot (`crate::deploy`), which outlives its versions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use wasmtime::component::{HasData, Linker};

use crate::bindings::wasmcloud::messaging::{consumer, types::BrokerMessage};
use crate::capabilities::events::{Event, EventLog};
use crate::grammar::subjects::{
    core_subject, event_subject, guest_subject, subject_matches, subject_problem,
};

/// A message on the bus (subjects here are full, tenant-prefixed bus subjects).
#[derive(Debug, Clone)]
pub struct Message {
    pub subject: String,
    pub reply_to: Option<String>,
    pub body: Bytes,
}

/// Messages queued per subscription before the bus waits for the handler to catch up.
const SUBSCRIPTION_BUFFER: usize = 1024;
const INBOX_PREFIX: &str = "_INBOX.";
/// Where messages go after their last failed attempt: `dead-letter.COMPONENT.SUBJECT`.
pub const DEAD_LETTER_PREFIX: &str = "dead-letter.";

/// A message bus: the in-process one or NATS.
#[async_trait]
pub trait MessageBus: Send + Sync {
    async fn publish(&self, message: Message) -> Result<(), String>;
    async fn request(
        &self,
        subject: String,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Message, String>;
    /// Messages on subjects matching `pattern`, each delivered to one member of `queue_group`.
    async fn subscribe(
        &self,
        pattern: String,
        queue_group: String,
    ) -> Result<mpsc::Receiver<Message>, String>;
}

/// Connects the node's bus: NATS at `nats_url` (its client is returned too, for the event
/// log), else the in-process bus.
pub async fn connect(
    nats_url: Option<&str>,
) -> anyhow::Result<(Arc<dyn MessageBus>, Option<async_nats::Client>)> {
    match nats_url {
        None => Ok((Arc::new(InProcessBus::default()), None)),
        Some(url) => {
            let bus = NatsBus::connect(url).await?;
            let client = bus.client.clone();
            Ok((Arc::new(bus), Some(client)))
        }
    }
}

/// What a deployment is granted: the bus, its tenant, and the subjects it may publish on.
pub struct MessagingGrant {
    pub bus: Arc<dyn MessageBus>,
    pub events: Arc<dyn EventLog>,
    pub tenant: Arc<str>,
    /// The tenant's quotas (its publish rate).
    pub owner: Arc<crate::tenancy::Tenant>,
    pub publish: Vec<String>,
}

impl MessagingGrant {
    /// The bus subject for a guest subject, if the guest may send there.
    fn outgoing_subject(&self, subject: &str) -> Result<String, String> {
        if subject.starts_with(INBOX_PREFIX) {
            return Ok(subject.to_string());
        }
        if let Some(problem) = subject_problem(subject, false) {
            return Err(problem);
        }
        if !self
            .publish
            .iter()
            .any(|pattern| subject_matches(pattern, subject))
        {
            return Err(format!(
                "publishing on {subject:?} is not granted to this component (manifest: publish)"
            ));
        }
        Ok(core_subject(&self.tenant, subject))
    }
}

/// The guest's view of a bus message or event: its tenant prefix removed.
pub fn to_guest(tenant: &str, message: Message) -> BrokerMessage {
    let strip = |mut s: String| {
        if let Some(prefix) = guest_subject(tenant, &s).map(|guest| s.len() - guest.len()) {
            s.drain(..prefix);
        }
        s
    };
    BrokerMessage {
        subject: strip(message.subject),
        body: message.body.to_vec(),
        reply_to: message.reply_to.map(strip),
    }
}

/// The view a store gives the consumer host functions.
pub struct Messaging<'a> {
    pub grant: &'a MessagingGrant,
}

struct HasMessaging;

impl HasData for HasMessaging {
    type Data<'a> = Messaging<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> Messaging<'_>,
) -> wasmtime::Result<()> {
    crate::bindings::wasmcloud::messaging::types::add_to_linker::<T, HasMessaging>(linker, view)?;
    consumer::add_to_linker::<T, HasMessaging>(linker, view)
}

impl crate::bindings::wasmcloud::messaging::types::Host for Messaging<'_> {}

impl consumer::Host for Messaging<'_> {
    async fn request(
        &mut self,
        subject: String,
        body: Vec<u8>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<BrokerMessage, String>> {
        let grant = self.grant;
        let bus_subject = match grant.outgoing_subject(&subject) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        if let Err(refused) = grant.owner.admit_publish() {
            return Ok(Err(refused));
        }
        let reply = grant
            .bus
            .request(
                bus_subject,
                body.into(),
                Duration::from_millis(timeout_ms.into()),
            )
            .await;
        Ok(reply.map(|m| to_guest(&grant.tenant, m)))
    }

    async fn publish(&mut self, msg: BrokerMessage) -> wasmtime::Result<Result<(), String>> {
        let grant = self.grant;
        let subject = match grant.outgoing_subject(&msg.subject) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let reply_to = match msg
            .reply_to
            .as_deref()
            .map(|r| grant.outgoing_subject(r))
            .transpose()
        {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        // Replies are the requester's traffic; everything else counts against the quota.
        if !msg.subject.starts_with(INBOX_PREFIX)
            && let Err(refused) = grant.owner.admit_publish()
        {
            return Ok(Err(refused));
        }
        if reply_to.is_none() && !msg.subject.starts_with(INBOX_PREFIX) {
            let subject = event_subject(&grant.tenant, &msg.subject);
            return Ok(grant
                .events
                .append(Event::new(subject, msg.body.into()))
                .await);
        }
        Ok(grant
            .bus
            .publish(Message {
                subject,
                reply_to,
                body: msg.body.into(),
            })
            .await)
    }
}

/// The single-node bus: subscriptions and request inboxes in memory.
#[derive(Default)]
pub struct InProcessBus {
    state: Mutex<BusState>,
}

#[derive(Default)]
struct BusState {
    subscriptions: Vec<Subscription>,
    inboxes: HashMap<String, oneshot::Sender<Message>>,
    next_inbox: u64,
    /// Round-robin position per queue group.
    turns: HashMap<String, usize>,
}

struct Subscription {
    pattern: String,
    queue_group: String,
    sender: mpsc::Sender<Message>,
}

impl InProcessBus {
    /// The subscribers the message goes to: one per queue group with a matching pattern.
    fn route(
        &self,
        message: &Message,
    ) -> Result<Vec<mpsc::Sender<Message>>, Option<oneshot::Sender<Message>>> {
        let mut state = self.state.lock().expect("bus lock");
        if let Some(inbox) = state.inboxes.remove(&message.subject) {
            return Err(Some(inbox));
        }
        state.subscriptions.retain(|s| !s.sender.is_closed());
        let mut groups: Vec<(String, Vec<mpsc::Sender<Message>>)> = Vec::new();
        for sub in state
            .subscriptions
            .iter()
            .filter(|s| subject_matches(&s.pattern, &message.subject))
        {
            match groups.iter_mut().find(|(g, _)| *g == sub.queue_group) {
                Some((_, members)) => members.push(sub.sender.clone()),
                None => groups.push((sub.queue_group.clone(), vec![sub.sender.clone()])),
            }
        }
        Ok(groups
            .into_iter()
            .map(|(group, members)| {
                let turn = state.turns.entry(group).or_default();
                *turn = turn.wrapping_add(1);
                members[*turn % members.len()].clone()
            })
            .collect())
    }
}

#[async_trait]
impl MessageBus for InProcessBus {
    async fn publish(&self, message: Message) -> Result<(), String> {
        match self.route(&message) {
            Err(Some(inbox)) => {
                let _ = inbox.send(message);
            }
            Err(None) => {}
            Ok(subscribers) => {
                for subscriber in subscribers {
                    let _ = subscriber.send(message.clone()).await;
                }
            }
        }
        Ok(())
    }

    async fn request(
        &self,
        subject: String,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Message, String> {
        let (inbox, reply) = {
            let mut state = self.state.lock().expect("bus lock");
            state.next_inbox += 1;
            let inbox = format!("{INBOX_PREFIX}{}", state.next_inbox);
            let (sender, receiver) = oneshot::channel();
            state.inboxes.insert(inbox.clone(), sender);
            (inbox, receiver)
        };
        let message = Message {
            subject: subject.clone(),
            reply_to: Some(inbox.clone()),
            body,
        };
        let subscribers = self.route(&message).unwrap_or_default();
        if subscribers.is_empty() {
            self.state.lock().expect("bus lock").inboxes.remove(&inbox);
            return Err(format!("no responders for {subject}"));
        }
        for subscriber in subscribers {
            let _ = subscriber.send(message.clone()).await;
        }
        let reply = tokio::time::timeout(timeout, reply).await;
        self.state.lock().expect("bus lock").inboxes.remove(&inbox);
        match reply {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(format!("request to {subject} lost its inbox")),
            Err(_) => Err(format!("request to {subject} timed out after {timeout:?}")),
        }
    }

    async fn subscribe(
        &self,
        pattern: String,
        queue_group: String,
    ) -> Result<mpsc::Receiver<Message>, String> {
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_BUFFER);
        self.state
            .lock()
            .expect("bus lock")
            .subscriptions
            .push(Subscription {
                pattern,
                queue_group,
                sender,
            });
        Ok(receiver)
    }
}

/// NATS, through async-nats. It reconnects by itself, and re-subscribes (with the same
/// queue groups) after a reconnect.
pub struct NatsBus {
    pub client: async_nats::Client,
}

impl NatsBus {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name("trellis")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((attempt as u64 * 100).min(2_000))
            })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS disconnected; reconnecting")
                    }
                    other => tracing::warn!("NATS: {other}"),
                }
            })
            .connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to NATS at {url}: {e}"))?;
        Ok(Self { client })
    }
}

#[async_trait]
impl MessageBus for NatsBus {
    async fn publish(&self, message: Message) -> Result<(), String> {
        let result = match message.reply_to {
            Some(reply) => {
                self.client
                    .publish_with_reply(message.subject, reply, message.body)
                    .await
            }
            None => self.client.publish(message.subject, message.body).await,
        };
        result.map_err(|e| e.to_string())
    }

    async fn request(
        &self,
        subject: String,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Message, String> {
        let request = async_nats::Request::new()
            .payload(body)
            .timeout(Some(timeout));
        let reply = self
            .client
            .send_request(subject.clone(), request)
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::TimedOut => {
                    format!("request to {subject} timed out after {timeout:?}")
                }
                async_nats::RequestErrorKind::NoResponders => {
                    format!("no responders for {subject}")
                }
                _ => format!("request to {subject} failed: {e}"),
            })?;
        Ok(Message {
            subject: reply.subject.to_string(),
            reply_to: reply.reply.map(|r| r.to_string()),
            body: reply.payload,
        })
    }

    async fn subscribe(
        &self,
        pattern: String,
        queue_group: String,
    ) -> Result<mpsc::Receiver<Message>, String> {
        let mut subscriber = self
            .client
            .queue_subscribe(pattern, queue_group)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_BUFFER);
        tokio::spawn(async move {
            loop {
                // Unsubscribe as soon as the receiver is gone, so that the queue group
                // does not hand this dead member a message that would then be lost.
                let message = tokio::select! {
                    message = subscriber.next() => message,
                    () = sender.closed() => None,
                };
                let Some(message) = message else { break };
                let message = Message {
                    subject: message.subject.to_string(),
                    reply_to: message.reply.map(|r| r.to_string()),
                    body: message.payload,
                };
                if sender.send(message).await.is_err() {
                    break;
                }
            }
            let _ = subscriber.unsubscribe().await;
        });
        Ok(receiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_see_subjects_without_their_tenant_prefix() {
        let message = Message {
            subject: "trellis.shop.order.created".into(),
            reply_to: Some("_INBOX.7".into()),
            body: Bytes::from_static(b"{}"),
        };
        let guest = to_guest("shop", message);
        assert_eq!(guest.subject, "order.created");
        assert_eq!(guest.reply_to.as_deref(), Some("_INBOX.7"));
    }
}

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
//! - Delivery takes the component's admission permit before instantiating (waiting for a
//!   slot up to the deadline), runs with its limits, and is retried (`limits.message_attempts`
//!   in all) when the handler returns an error or traps; then the message goes to the
//!   tenant subject `dead-letter.COMPONENT.ORIGINAL-SUBJECT`, never silently dropped. (A
//!   dead letter whose own handler fails is logged and counted, not dead-lettered again.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use wasmtime::component::{HasData, Linker};

use crate::bindings::wasmcloud::messaging::{consumer, types::BrokerMessage};
use crate::component::Deployment;

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
const DEAD_LETTER_PREFIX: &str = "dead-letter.";

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

/// Connects the node's bus: NATS at `nats_url`, else the in-process bus.
pub async fn connect(nats_url: Option<&str>) -> anyhow::Result<Arc<dyn MessageBus>> {
    match nats_url {
        None => Ok(Arc::new(InProcessBus::default())),
        Some(url) => Ok(Arc::new(NatsBus::connect(url).await?)),
    }
}

/// Whether `subject` matches the NATS pattern `pattern` (`*` one token, `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return p.next().is_none(),
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Why a subject or pattern is not acceptable, if it is not.
pub fn subject_problem(subject: &str, wildcards_allowed: bool) -> Option<String> {
    if subject.is_empty() || subject.chars().any(|c| c.is_whitespace()) {
        return Some(format!(
            "{subject:?} is not a subject (empty, or contains whitespace)"
        ));
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Some(format!("{subject:?} has an empty token"));
        }
        let wildcard = *token == "*" || *token == ">";
        if wildcard && !wildcards_allowed {
            return Some(format!(
                "{subject:?}: wildcards are for subscriptions, not for publishing"
            ));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Some(format!("{subject:?}: '>' must be the last token"));
        }
    }
    None
}

fn tenant_prefix(tenant: &str) -> String {
    format!("trellis.{tenant}.")
}

/// What a deployment is granted: the bus, its tenant, and the subjects it may publish on.
pub struct MessagingGrant {
    pub bus: Arc<dyn MessageBus>,
    pub tenant: Arc<str>,
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
        Ok(format!("{}{subject}", tenant_prefix(&self.tenant)))
    }
}

/// The guest's view of a bus message: its tenant prefix removed.
fn to_guest(tenant: &str, message: Message) -> BrokerMessage {
    let prefix = tenant_prefix(tenant);
    let strip = |s: String| s.strip_prefix(&prefix).map(str::to_string).unwrap_or(s);
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

/// Starts delivering a component's subscriptions. The returned tasks run until the node
/// stops.
pub async fn start_subscriptions(
    bus: &Arc<dyn MessageBus>,
    deployment: Arc<Deployment>,
    patterns: &[String],
) -> anyhow::Result<()> {
    let prefix = tenant_prefix(&deployment.tenant);
    let queue_group = format!("trellis.{}.{}", deployment.tenant, deployment.name);
    for pattern in patterns {
        let mut messages = bus
            .subscribe(format!("{prefix}{pattern}"), queue_group.clone())
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "subscribing component {:?} to {pattern:?}: {e}",
                    deployment.name
                )
            })?;
        let (deployment, bus) = (deployment.clone(), bus.clone());
        tokio::spawn(async move {
            while let Some(message) = messages.recv().await {
                // The admission permit comes before instantiation, as for HTTP; a message
                // waits for a slot (backpressure) rather than being refused.
                let permit = deployment.admit_waiting().await;
                let (deployment, bus) = (deployment.clone(), bus.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    deliver(&bus, &deployment, message).await;
                });
            }
        });
    }
    Ok(())
}

/// Runs the handler, retrying on failure, then dead-letters the message.
async fn deliver(bus: &Arc<dyn MessageBus>, deployment: &Deployment, message: Message) {
    let attempts = deployment.limits.message_attempts.max(1);
    let guest_message = to_guest(&deployment.tenant, message.clone());
    for attempt in 1..=attempts {
        match deployment.handle_message(&guest_message).await {
            Ok(()) => {
                deployment.metrics.messages_handled.inc();
                return;
            }
            Err(reason) => {
                deployment.metrics.message_failures.inc();
                tracing::warn!(
                    tenant = %deployment.tenant,
                    component = %deployment.name,
                    subject = %guest_message.subject,
                    attempt,
                    attempts,
                    %reason,
                    "message handler failed"
                );
                if attempt < attempts {
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                }
            }
        }
    }
    if guest_message.subject.starts_with(DEAD_LETTER_PREFIX) {
        // Dead-lettering a failed dead letter again would loop forever.
        deployment.metrics.messages_dead_lettered.inc();
        tracing::error!(
            tenant = %deployment.tenant,
            component = %deployment.name,
            subject = %guest_message.subject,
            "dead letter dropped: its handler failed {attempts} times"
        );
        return;
    }
    let dead_letter = format!(
        "{}{DEAD_LETTER_PREFIX}{}.{}",
        tenant_prefix(&deployment.tenant),
        deployment.name,
        guest_message.subject
    );
    deployment.metrics.messages_dead_lettered.inc();
    tracing::error!(
        tenant = %deployment.tenant,
        component = %deployment.name,
        subject = %guest_message.subject,
        %dead_letter,
        "message dead-lettered after {attempts} attempts"
    );
    if let Err(e) = bus
        .publish(Message {
            subject: dead_letter,
            reply_to: None,
            body: message.body,
        })
        .await
    {
        tracing::error!(component = %deployment.name, error = %e, "could not publish to the dead-letter subject");
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
    client: async_nats::Client,
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
            while let Some(message) = subscriber.next().await {
                let message = Message {
                    subject: message.subject.to_string(),
                    reply_to: message.reply.map(|r| r.to_string()),
                    body: message.payload,
                };
                if sender.send(message).await.is_err() {
                    break;
                }
            }
        });
        Ok(receiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(subject_matches("order.*", "order.created"));
        assert!(!subject_matches("order.*", "order.created.eu"));
        assert!(subject_matches("order.>", "order.created.eu"));
        assert!(!subject_matches("order.>", "order"));
        assert!(subject_matches("order.created", "order.created"));
        assert!(!subject_matches("order.created", "order.cancelled"));
        assert!(subject_problem("order.*", false).is_some());
        assert!(subject_problem("order.>.x", true).is_some());
        assert!(subject_problem("order..x", true).is_some());
        assert!(subject_problem("order.created", false).is_none());
    }

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

//! A slot: one component of one tenant, as it lives across its versions. It owns what must
//! outlive a version (admission permits, metrics, subscriptions, the history of what was
//! deployed) and an atomically swapped set of versions: the active one, the previous one
//! (for rollback) and an optional canary.
//!
//! A call loads the set once and runs start to end on the version it picked, however many
//! swaps happen meanwhile; every call that starts after a swap sees the new set. A message
//! delivery picks again on each attempt, so retries after a swap run the new version.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, header};
use hyper::body::Body;
use tokio::task::JoinHandle;

use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::capabilities::events::{
    self, ATTEMPTS_HEADER, ConsumerSpec, Delivery, ERROR_HEADER, EventLog, consumer_name,
    new_event_id,
};
use crate::capabilities::messaging::{DEAD_LETTER_PREFIX, Message, MessageBus, to_guest};
use crate::capabilities::outbound::{BoxError, ResponseBody};
use crate::deploy::canary::{Canary, Verdict};
use crate::deploy::state::{CanaryRecord, Event, KnownVersion, Origin, SlotRecord, VersionRecord};
use crate::grammar::subjects::{core_subject, event_subject};
use crate::runtime::invoke::{self, Admission, Failure};
use crate::runtime::version::Version;
use crate::telemetry::metrics::ComponentMetrics;

/// Events kept per component for `status`.
const EVENTS_KEPT: usize = 20;

/// The versions of a component at one moment; replaced whole on every change.
#[derive(Clone)]
pub struct Versions {
    pub active: Arc<Version>,
    pub previous: Option<Arc<Version>>,
    pub canary: Option<Arc<Canary>>,
}

/// Told when a slot changed by itself (a canary rolled back or promoted), so the change is
/// persisted. Implemented by the registry; the slot only knows this trait.
pub trait SlotObserver: Send + Sync {
    fn changed(&self, slot: Arc<Slot>);
}

pub struct Slot {
    pub tenant: Arc<str>,
    pub name: Arc<str>,
    /// The tenant object (its quotas).
    pub owner: Arc<crate::tenancy::Tenant>,
    pub metrics: Arc<ComponentMetrics>,
    pub admission: Admission,
    versions: ArcSwap<Versions>,
    meta: Mutex<Meta>,
    subscriptions: Mutex<Subscriptions>,
    bus: Arc<dyn MessageBus>,
    events: Arc<dyn EventLog>,
    observer: Weak<dyn SlotObserver>,
    me: Weak<Slot>,
}

struct Meta {
    origin: Origin,
    known: Vec<KnownVersion>,
    events: VecDeque<Event>,
}

/// The slot's subscriptions, by pattern. Each task forwards its pattern's messages to
/// deliveries until told to stop; then it stops taking new ones and drains what it holds.
#[derive(Default)]
struct Subscriptions {
    by_pattern: BTreeMap<String, Subscription>,
}

struct Subscription {
    stop: tokio::sync::watch::Sender<bool>,
    /// The durable consumer its events come from, if they are taken durably.
    consumer: Option<String>,
    _tasks: [JoinHandle<()>; 2],
}

impl Subscription {
    fn stop(self) {
        let _ = self.stop.send(true);
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Slot {
    pub fn new(
        active: Arc<Version>,
        owner: Arc<crate::tenancy::Tenant>,
        origin: Origin,
        metrics: ComponentMetrics,
        bus: Arc<dyn MessageBus>,
        events: Arc<dyn EventLog>,
        observer: Weak<dyn SlotObserver>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Slot {
            tenant: active.tenant.clone(),
            name: active.name.clone(),
            owner: owner.clone(),
            admission: Admission::new(
                active.limits.max_concurrent,
                Some(owner),
                metrics.in_flight.clone(),
            ),
            metrics: Arc::new(metrics),
            versions: ArcSwap::from_pointee(Versions {
                active,
                previous: None,
                canary: None,
            }),
            meta: Mutex::new(Meta {
                origin,
                known: Vec::new(),
                events: VecDeque::new(),
            }),
            subscriptions: Mutex::new(Subscriptions::default()),
            bus,
            events,
            observer,
            me: me.clone(),
        })
    }

    /// The current set of versions.
    pub fn versions(&self) -> Arc<Versions> {
        self.versions.load_full()
    }

    pub fn active(&self) -> Arc<Version> {
        self.versions.load().active.clone()
    }

    /// Replaces the set of versions; calls already running keep theirs. A version that
    /// stops serving has its warm instances thrown away.
    pub fn swap(&self, versions: Versions) {
        let old = self.versions.swap(Arc::new(versions));
        self.retire_warm(&old);
        self.fit_admission();
    }

    /// Changes the set of versions from whatever it is at that moment (a canary may have
    /// been rolled back or promoted by the node meanwhile); returns the new set.
    pub fn update(&self, change: impl Fn(&Versions) -> Versions) -> Arc<Versions> {
        let old = self.versions.rcu(|current| Arc::new(change(current)));
        self.retire_warm(&old);
        self.fit_admission();
        self.versions()
    }

    /// Throws away the warm instances of the versions in `old` that no longer serve.
    fn retire_warm(&self, old: &Versions) {
        let now = self.versions.load();
        let serving = |version: &Arc<Version>| {
            Arc::ptr_eq(version, &now.active)
                || now
                    .canary
                    .as_ref()
                    .is_some_and(|c| Arc::ptr_eq(version, &c.version))
        };
        let was_serving =
            std::iter::once(&old.active).chain(old.canary.as_ref().map(|c| &c.version));
        for version in was_serving {
            if !serving(version) {
                version.retire_warm();
            }
        }
    }

    /// The admission limit of the version active now.
    fn fit_admission(&self) {
        self.admission
            .resize(self.versions.load().active.limits.max_concurrent);
    }

    pub fn origin(&self) -> Origin {
        self.meta.lock().expect("slot lock").origin.clone()
    }

    pub fn set_origin(&self, origin: Origin) {
        self.meta.lock().expect("slot lock").origin = origin;
    }

    /// Notes uploaded code (once per digest).
    pub fn know(&self, digest: &str, size: u64) {
        let mut meta = self.meta.lock().expect("slot lock");
        if !meta.known.iter().any(|k| k.digest == digest) {
            meta.known.push(KnownVersion {
                digest: digest.to_string(),
                size,
                uploaded_at: now_rfc3339(),
            });
        }
    }

    pub fn set_known(&self, known: Vec<KnownVersion>, events: Vec<Event>) {
        let mut meta = self.meta.lock().expect("slot lock");
        meta.known = known;
        meta.events = events.into();
    }

    /// The size of uploaded code `digest` (0 when unknown).
    pub fn size_of(&self, digest: &str) -> u64 {
        self.meta
            .lock()
            .expect("slot lock")
            .known
            .iter()
            .find(|k| k.digest == digest)
            .map_or(0, |k| k.size)
    }

    /// Bytes of the code it runs: the active version's, and a canary's.
    pub fn code_size(&self) -> u64 {
        let versions = self.versions();
        let meta = self.meta.lock().expect("slot lock");
        let size_of = |digest: &str| {
            meta.known
                .iter()
                .find(|k| k.digest == digest)
                .map_or(0, |k| k.size)
        };
        size_of(&versions.active.digest)
            + versions
                .canary
                .as_ref()
                .map_or(0, |c| size_of(&c.version.digest))
    }

    pub fn knows(&self, digest: &str) -> bool {
        self.meta
            .lock()
            .expect("slot lock")
            .known
            .iter()
            .any(|k| k.digest == digest)
    }

    /// Records an event in the history, the log and (for activations) the metrics.
    pub fn event(&self, event: &str, version: &Version, reason: Option<String>) {
        if matches!(event, "activated" | "rolled_back" | "canary_promoted") {
            self.metrics.activations.inc();
        }
        match &reason {
            Some(reason) => {
                tracing::warn!(tenant = %self.tenant, component = %self.name, version = %version.digest, seq = version.seq, %reason, "{event}")
            }
            None => {
                tracing::info!(tenant = %self.tenant, component = %self.name, version = %version.digest, seq = version.seq, "{event}")
            }
        }
        let mut meta = self.meta.lock().expect("slot lock");
        meta.events.push_back(Event {
            at: now_rfc3339(),
            event: event.to_string(),
            version: version.digest.to_string(),
            reason,
        });
        while meta.events.len() > EVENTS_KEPT {
            meta.events.pop_front();
        }
    }

    /// What is persisted of this slot.
    pub fn record(&self) -> SlotRecord {
        let versions = self.versions();
        let record = |v: &Version| VersionRecord {
            digest: v.digest.to_string(),
            spec: (*v.spec).clone(),
        };
        let meta = self.meta.lock().expect("slot lock");
        SlotRecord {
            origin: meta.origin.clone(),
            active: record(&versions.active),
            previous: versions.previous.as_deref().map(record),
            canary: versions.canary.as_ref().map(|c| CanaryRecord {
                version: record(&c.version),
                policy: c.policy.clone(),
            }),
            versions: meta.known.clone(),
            events: meta.events.iter().cloned().collect(),
        }
    }

    /// The status document of this component (admin API).
    pub fn status(&self) -> serde_json::Value {
        let versions = self.versions();
        let version = |v: &Version| {
            serde_json::json!({
                "version": &*v.digest,
                "seq": v.seq,
                "routes": v.spec.routes,
                "subscriptions": v.spec.subscriptions,
            })
        };
        let canary = versions.canary.as_ref().map(|c| {
            serde_json::json!({
                "version": &*c.version.digest,
                "seq": c.version.seq,
                "policy": c.policy,
                "started_at": humantime::format_rfc3339_seconds(c.started_at).to_string(),
                "calls": c.calls.load(std::sync::atomic::Ordering::Relaxed),
                "failures": c.failures.load(std::sync::atomic::Ordering::Relaxed),
            })
        });
        let meta = self.meta.lock().expect("slot lock");
        let last_rollback = meta
            .events
            .iter()
            .rev()
            .find(|e| e.event == "canary_rolled_back")
            .cloned();
        serde_json::json!({
            "tenant": &*self.tenant,
            "component": &*self.name,
            "state": "serving",
            "origin": match &meta.origin { Origin::Manifest { .. } => "manifest", Origin::Api => "api" },
            "active": version(&versions.active),
            "previous": versions.previous.as_deref().map(version),
            "canary": canary,
            "last_canary_rollback": last_rollback,
            "spec": &*versions.active.spec,
            "versions": meta.known,
            "events": meta.events,
            "in_flight": self.metrics.in_flight.get(),
        })
    }

    /// Serves one HTTP request (from the gateway or a sibling's `NAME.internal` call).
    pub async fn serve_http<B>(
        &self,
        request: Request<B>,
        local_addr: SocketAddr,
    ) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error> + Into<BoxError>,
    {
        let (version, canary) = {
            let versions = self.versions.load();
            match &versions.canary {
                Some(canary) if canary.takes(sticky_value(&request, canary).as_deref()) => {
                    (canary.version.clone(), Some(canary.clone()))
                }
                _ => (versions.active.clone(), None),
            }
        };
        // A canary is judged on how the call really ended: a trap after the response
        // head (while streaming) counts too.
        let on_end = canary.map(|canary| {
            let slot = self.me.clone();
            Box::new(move |end: invoke::CallEnd| {
                let failed = match &end.failure {
                    // The host's own overload says nothing about the candidate.
                    Some(
                        Failure::Overloaded { .. }
                        | Failure::TenantOverloaded { .. }
                        | Failure::PoolExhausted
                        | Failure::NodeMemory
                        | Failure::TenantMemory
                        | Failure::TenantRemoved,
                    ) => return,
                    Some(_) => true,
                    None => end.status >= 500,
                };
                if let Some(slot) = slot.upgrade() {
                    slot.judge(&canary, failed);
                }
            }) as invoke::OnEnd
        });
        let started = Instant::now();
        let response = invoke::http(
            version,
            &self.admission,
            &self.metrics,
            request,
            local_addr,
            on_end,
        )
        .await;
        self.metrics
            .request_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.count_response(response.status().as_u16());
        response
    }

    /// Counts a canary call and acts on the verdict.
    fn judge(&self, canary: &Arc<Canary>, failed: bool) {
        match canary.record(failed) {
            Verdict::Continue => {}
            Verdict::RollBack(reason) => {
                if self.end_canary(canary, false) {
                    self.metrics.canary_rollbacks.inc();
                    self.event("canary_rolled_back", &canary.version, Some(reason));
                    self.notify();
                }
            }
            Verdict::Promote => {
                if self.end_canary(canary, true) {
                    self.event("canary_promoted", &canary.version, None);
                    self.notify();
                }
            }
        }
    }

    /// Ends `canary` if it is still the running one: promoted (it becomes active, the
    /// active one previous) or dropped. Returns whether it was still running.
    pub fn end_canary(&self, canary: &Arc<Canary>, promote: bool) -> bool {
        let mut ended = false;
        self.versions.rcu(|current| {
            ended = false;
            match &current.canary {
                Some(running) if Arc::ptr_eq(running, canary) => {
                    ended = true;
                    Arc::new(if promote {
                        Versions {
                            active: canary.version.clone(),
                            previous: Some(current.active.clone()),
                            canary: None,
                        }
                    } else {
                        Versions {
                            active: current.active.clone(),
                            previous: current.previous.clone(),
                            canary: None,
                        }
                    })
                }
                _ => current.clone(),
            }
        });
        if ended && promote {
            self.fit_admission();
        }
        ended
    }

    fn notify(&self) {
        if let (Some(observer), Some(me)) = (self.observer.upgrade(), self.me.upgrade()) {
            observer.changed(me);
        }
    }

    /// Makes the slot's subscriptions match `patterns` (of the active version), those in
    /// `ephemeral` taken at most once. A subscription kept keeps running: a swap does not
    /// drop it. New ones start before removed ones stop; a removed one drains what it
    /// already received, and its durable consumer (and what it still had to handle) is
    /// removed.
    pub async fn subscribe(&self, patterns: &[String], ephemeral: &[String]) -> anyhow::Result<()> {
        let wanted: BTreeMap<String, (String, bool)> = patterns
            .iter()
            .map(|pattern| {
                let durable = !ephemeral.contains(pattern) && self.events.durable();
                let key = if durable {
                    pattern.clone()
                } else {
                    format!("{pattern} (at most once)")
                };
                (key, (pattern.clone(), durable))
            })
            .collect();
        let current: BTreeSet<String> = self
            .subscriptions
            .lock()
            .expect("slot lock")
            .by_pattern
            .keys()
            .cloned()
            .collect();
        let mut added: Vec<(String, Subscription)> = Vec::new();
        for (key, (pattern, durable)) in wanted.iter().filter(|(k, _)| !current.contains(*k)) {
            match self.start_subscription(pattern, *durable).await {
                Ok(subscription) => added.push((key.clone(), subscription)),
                Err(e) => {
                    // Nothing changes: what this call subscribed so far stops again.
                    for (_, subscription) in added {
                        subscription.stop();
                    }
                    anyhow::bail!("subscribing component {:?} to {pattern:?}: {e}", self.name);
                }
            }
        }
        let removed: Vec<Subscription> = {
            let mut subscriptions = self.subscriptions.lock().expect("slot lock");
            subscriptions.by_pattern.extend(added);
            current
                .iter()
                .filter(|k| !wanted.contains_key(*k))
                .filter_map(|k| subscriptions.by_pattern.remove(k))
                .collect()
        };
        let any_removed = !removed.is_empty();
        for subscription in removed {
            self.end_subscription(subscription).await;
        }
        if !patterns.is_empty() || any_removed {
            tracing::info!(tenant = %self.tenant, component = %self.name, subscriptions = ?patterns, ephemeral = ?ephemeral, "subscribed");
        }
        Ok(())
    }

    /// One pattern's subscription: core messages (requests) always; events from a durable
    /// consumer, or from the core bus when taken at most once.
    async fn start_subscription(
        &self,
        pattern: &str,
        durable: bool,
    ) -> Result<Subscription, String> {
        let me = self.me.upgrade().expect("a slot being changed is alive");
        let queue_group = format!("trellis.{}.{}", self.tenant, self.name);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let core = self
            .bus
            .subscribe(core_subject(&self.tenant, pattern), queue_group.clone())
            .await?;
        let core_task = tokio::spawn(forward(me.clone(), core, stopped.clone()));
        let events_pattern = event_subject(&self.tenant, pattern);
        let events = if durable {
            let spec = ConsumerSpec {
                name: consumer_name(&self.tenant, &self.name, pattern),
                filter: events_pattern,
            };
            self.events.consume(spec.clone()).await.map(|deliveries| {
                let task = tokio::spawn(forward_events(me, deliveries, stopped));
                (task, Some(spec.name))
            })
        } else {
            self.bus
                .subscribe(events_pattern, queue_group)
                .await
                .map(|events| (tokio::spawn(forward(me, events, stopped)), None))
        };
        let (events_task, consumer) = match events {
            Ok(started) => started,
            Err(e) => {
                // The core subscription started above stops again.
                let _ = stop.send(true);
                return Err(e);
            }
        };
        Ok(Subscription {
            stop,
            consumer,
            _tasks: [core_task, events_task],
        })
    }

    /// The durable consumers its subscriptions take events from.
    pub fn consumers(&self) -> Vec<String> {
        self.subscriptions
            .lock()
            .expect("slot lock")
            .by_pattern
            .values()
            .filter_map(|s| s.consumer.clone())
            .collect()
    }

    /// Stops a subscription that is no longer wanted and removes its durable consumer.
    async fn end_subscription(&self, subscription: Subscription) {
        let consumer = subscription.consumer.clone();
        subscription.stop();
        if let Some(name) = consumer
            && let Err(e) = self.events.remove_consumer(&name).await
        {
            tracing::warn!(tenant = %self.tenant, component = %self.name, error = %e, "removing a durable consumer");
        }
    }

    /// Stops taking messages (the component is being deleted): what was received drains,
    /// and its durable consumers go (events still pending for it are dropped).
    pub async fn unsubscribe(&self) {
        let old = std::mem::take(&mut *self.subscriptions.lock().expect("slot lock"));
        for (_, subscription) in old.by_pattern {
            self.end_subscription(subscription).await;
        }
    }

    /// The version a message goes to (a canary takes its share), and the canary if so.
    fn pick_for_message(&self) -> (Arc<Version>, Option<Arc<Canary>>) {
        let versions = self.versions.load();
        match &versions.canary {
            Some(canary) if canary.takes(None) => (canary.version.clone(), Some(canary.clone())),
            _ => (versions.active.clone(), None),
        }
    }

    fn judge_message(&self, canary: &Option<Arc<Canary>>, outcome: &Result<(), Failure>) {
        if let Some(canary) = canary
            && !matches!(
                outcome,
                Err(Failure::Overloaded { .. }
                    | Failure::TenantOverloaded { .. }
                    | Failure::PoolExhausted
                    | Failure::NodeMemory
                    | Failure::TenantMemory
                    | Failure::TenantRemoved)
            )
        {
            self.judge(canary, outcome.is_err());
        }
    }

    fn log_handler_failure(
        &self,
        version: &Version,
        subject: &str,
        attempt: u32,
        attempts: u32,
        failure: &Failure,
    ) {
        self.metrics.message_failures.inc();
        tracing::warn!(
            tenant = %self.tenant,
            component = %self.name,
            version = version.seq,
            %subject,
            attempt,
            attempts,
            reason = %format!("the handler {failure}"),
            "message handler failed"
        );
    }

    /// Delivers one core message (a request, or an event taken at most once): the handler
    /// is tried up to `limits.message_attempts` times (each attempt on the version current
    /// at that moment), then the message is dead-lettered.
    async fn deliver(&self, permit: invoke::Permit, message: Message) {
        let guest_message: BrokerMessage = to_guest(&self.tenant, message.clone());
        let attempts = self.active().limits.message_attempts.max(1);
        let mut last_error = String::new();
        for attempt in 1..=attempts {
            let (version, canary) = self.pick_for_message();
            let outcome =
                invoke::message(&version, &self.metrics, &permit, &guest_message, &[]).await;
            self.judge_message(&canary, &outcome);
            match outcome {
                Ok(()) => {
                    self.metrics.messages_handled.inc();
                    return;
                }
                Err(failure) => {
                    self.log_handler_failure(
                        &version,
                        &guest_message.subject,
                        attempt,
                        attempts,
                        &failure,
                    );
                    last_error = format!("the handler {failure}");
                    if attempt < attempts {
                        tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                    }
                }
            }
        }
        drop(permit);
        let id = new_event_id();
        if let Err(e) = self
            .dead_letter(&guest_message, message.body, attempts, &last_error, &id)
            .await
        {
            tracing::error!(tenant = %self.tenant, component = %self.name, error = %e, "could not store the dead letter");
        }
    }

    /// Delivers one durable event: one attempt per delivery. Success acknowledges it; a
    /// failure hands it back for a later attempt with backoff, until the last attempt,
    /// after which it is dead-lettered, then acknowledged. Until it is settled the event
    /// log keeps the delivery alive, so no other node gets it meanwhile.
    async fn deliver_event(&self, permit: invoke::Permit, delivery: Delivery) {
        let Delivery {
            event,
            attempt,
            pending,
            settle,
        } = delivery;
        self.metrics.events_pending.set(pending as i64);
        if attempt > 1 {
            self.metrics.events_redelivered.inc();
        }
        let guest_message = to_guest(
            &self.tenant,
            Message {
                subject: event.subject.clone(),
                reply_to: None,
                body: event.body.clone(),
            },
        );
        let attempts = self.active().limits.message_attempts.max(1);
        let mut env = vec![
            ("TRELLIS_EVENT_ID".to_string(), event.id.clone()),
            ("TRELLIS_EVENT_ATTEMPT".to_string(), attempt.to_string()),
        ];
        if let Some(tried) = event.header(ATTEMPTS_HEADER) {
            env.push(("TRELLIS_DEAD_LETTER_ATTEMPTS".into(), tried.into()));
        }
        if let Some(error) = event.header(ERROR_HEADER) {
            env.push(("TRELLIS_DEAD_LETTER_ERROR".into(), error.into()));
        }
        let (version, canary) = self.pick_for_message();
        let outcome = invoke::message(&version, &self.metrics, &permit, &guest_message, &env).await;
        drop(permit);
        self.judge_message(&canary, &outcome);
        let settled = match outcome {
            Ok(()) => {
                self.metrics.messages_handled.inc();
                // Counted once the log has it: an event counted acked is not redelivered.
                let acked = settle.ack().await;
                if acked.is_ok() {
                    self.metrics.events_acked.inc();
                }
                acked
            }
            Err(failure) => {
                self.log_handler_failure(
                    &version,
                    &guest_message.subject,
                    attempt,
                    attempts,
                    &failure,
                );
                if attempt < attempts {
                    settle.retry_after(retry_delay(attempt)).await
                } else {
                    let reason = format!("the handler {failure}");
                    let id = format!("{}.dead-letter.{}", event.id, self.name);
                    match self
                        .dead_letter(&guest_message, event.body, attempt, &reason, &id)
                        .await
                    {
                        // Acknowledged only once the dead letter is stored: a crash in
                        // between means another attempt, never a lost event.
                        Ok(()) => {
                            let acked = settle.ack().await;
                            if acked.is_ok() {
                                self.metrics.events_acked.inc();
                            }
                            acked
                        }
                        Err(e) => {
                            tracing::error!(tenant = %self.tenant, component = %self.name, error = %e, "could not store the dead letter; the event will be tried again");
                            settle.retry_after(retry_delay(attempt)).await
                        }
                    }
                }
            }
        };
        if let Err(e) = settled {
            tracing::warn!(tenant = %self.tenant, component = %self.name, error = %e, "settling an event (it may be delivered again)");
        }
    }

    /// Stores a message whose handler kept failing as the event
    /// `dead-letter.COMPONENT.SUBJECT` of the tenant, with its attempts and last error.
    async fn dead_letter(
        &self,
        guest_message: &BrokerMessage,
        body: Bytes,
        attempts: u32,
        last_error: &str,
        id: &str,
    ) -> Result<(), String> {
        self.metrics.messages_dead_lettered.inc();
        if guest_message.subject.starts_with(DEAD_LETTER_PREFIX) {
            // Dead-lettering a failed dead letter again would loop forever.
            tracing::error!(
                tenant = %self.tenant,
                component = %self.name,
                subject = %guest_message.subject,
                "dead letter dropped: its handler failed {attempts} times"
            );
            return Ok(());
        }
        let subject = format!(
            "{DEAD_LETTER_PREFIX}{}.{}",
            self.name, guest_message.subject
        );
        tracing::error!(
            tenant = %self.tenant,
            component = %self.name,
            subject = %guest_message.subject,
            dead_letter = %subject,
            %last_error,
            "message dead-lettered after {attempts} attempts"
        );
        self.events
            .append(events::Event {
                id: id.to_string(),
                subject: event_subject(&self.tenant, &subject),
                body,
                headers: vec![
                    (ATTEMPTS_HEADER.into(), attempts.to_string()),
                    (ERROR_HEADER.into(), one_line(last_error)),
                ],
            })
            .await
    }
}

/// How long a failed event waits before its next attempt: 100 ms, doubling, at most 30 s.
fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.saturating_sub(1).min(9)))
        .min(Duration::from_secs(30))
}

/// Header values are one line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1000)
        .collect()
}

/// Hands core messages to deliveries until stopped; then closes the subscription and
/// drains what it had already received, so nothing taken is lost.
async fn forward(
    slot: Arc<Slot>,
    mut messages: tokio::sync::mpsc::Receiver<Message>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut stopping = false;
    loop {
        let message = tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s), if !stopping => {
                stopping = true;
                messages.close();
                continue;
            }
            message = messages.recv() => message,
        };
        let Some(message) = message else { break };
        // The permit comes before instantiation, as for HTTP; a message waits for a
        // slot (backpressure) rather than being refused.
        let Some(permit) = slot.admission.admit().await else {
            break; // the tenant was removed
        };
        let slot = slot.clone();
        // Boxed: the delivery's future is a few KiB, and a task's future is copied when
        // spawned and again when it completes; a box's pointer costs nothing to copy.
        tokio::spawn(Box::pin(async move { slot.deliver(permit, message).await }));
    }
}

/// Hands durable deliveries to handlers until stopped. What it holds unsettled then is
/// simply dropped: the event log delivers it again.
async fn forward_events(
    slot: Arc<Slot>,
    mut deliveries: tokio::sync::mpsc::Receiver<Delivery>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let delivery = tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => return,
            delivery = deliveries.recv() => delivery,
        };
        let Some(delivery) = delivery else { return };
        let permit = tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => return,
            permit = slot.admission.admit() => match permit {
                Some(permit) => permit,
                None => return, // the tenant was removed: the log keeps the event
            },
        };
        let slot = slot.clone();
        // Boxed, as in `forward`.
        tokio::spawn(Box::pin(async move {
            slot.deliver_event(permit, delivery).await
        }));
    }
}

/// The sticky value of a request for a canary with a sticky header or cookie.
fn sticky_value<B>(request: &Request<B>, canary: &Canary) -> Option<Vec<u8>> {
    if let Some(name) = &canary.policy.sticky_header {
        return request
            .headers()
            .get(name.as_str())
            .map(|v| v.as_bytes().to_vec());
    }
    let name = canary.policy.sticky_cookie.as_deref()?;
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.as_bytes().to_vec())
}

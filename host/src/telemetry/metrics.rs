//! Prometheus metrics, served as `/metrics` on the admin listener in the OpenMetrics text
//! format.
//!
//! Per-component series are resolved once per deployment ([`ComponentMetrics`]), so the
//! request path touches atomics only; the one family keyed by response status is looked up
//! per request.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabels {
    tenant: String,
    component: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    tenant: String,
    component: String,
    status: u16,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<ComponentLabels, Histogram, fn() -> Histogram>,
    instantiation_duration: Family<ComponentLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<ComponentLabels, Gauge>,
    traps: Family<ComponentLabels, Counter>,
    deadline_kills: Family<ComponentLabels, Counter>,
    memory_limit_kills: Family<ComponentLabels, Counter>,
    admission_rejections: Family<ComponentLabels, Counter>,
    messages_handled: Family<ComponentLabels, Counter>,
    message_failures: Family<ComponentLabels, Counter>,
    messages_dead_lettered: Family<ComponentLabels, Counter>,
    events_pending: Family<ComponentLabels, Gauge>,
    events_redelivered: Family<ComponentLabels, Counter>,
    events_acked: Family<ComponentLabels, Counter>,
    activations: Family<ComponentLabels, Counter>,
    canary_rollbacks: Family<ComponentLabels, Counter>,
    unrouted: Counter,
    /// Linear memory reserved by live instances, and the node's budget for it.
    pub node_memory_reserved: Gauge,
    pub node_memory_budget: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration =
            Family::<ComponentLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        let instantiation_duration =
            Family::<ComponentLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        let in_flight = Family::<ComponentLabels, Gauge>::default();
        let traps = Family::<ComponentLabels, Counter>::default();
        let deadline_kills = Family::<ComponentLabels, Counter>::default();
        let memory_limit_kills = Family::<ComponentLabels, Counter>::default();
        let admission_rejections = Family::<ComponentLabels, Counter>::default();
        let messages_handled = Family::<ComponentLabels, Counter>::default();
        let message_failures = Family::<ComponentLabels, Counter>::default();
        let messages_dead_lettered = Family::<ComponentLabels, Counter>::default();
        let events_pending = Family::<ComponentLabels, Gauge>::default();
        let events_redelivered = Family::<ComponentLabels, Counter>::default();
        let events_acked = Family::<ComponentLabels, Counter>::default();
        let unrouted = Counter::default();
        let node_memory_reserved = Gauge::default();
        let node_memory_budget = Gauge::default();
        registry.register(
            "node_memory_reserved_bytes",
            "Linear memory the node's live instances hold (node.max_memory bounds it)",
            node_memory_reserved.clone(),
        );
        registry.register(
            "node_memory_budget_bytes",
            "The node's memory budget for live instances (node.max_memory)",
            node_memory_budget.clone(),
        );
        let activations = Family::<ComponentLabels, Counter>::default();
        let canary_rollbacks = Family::<ComponentLabels, Counter>::default();
        registry.register(
            "activations",
            "Versions made active (deploys, rollbacks, canary promotions)",
            activations.clone(),
        );
        registry.register(
            "canary_rollbacks",
            "Canaries the node rolled back by itself because they failed too often",
            canary_rollbacks.clone(),
        );
        registry.register(
            "messages_handled",
            "Messages a handler accepted",
            messages_handled.clone(),
        );
        registry.register(
            "message_failures",
            "Handler attempts that returned an error, trapped or ran out of time",
            message_failures.clone(),
        );
        registry.register(
            "messages_dead_lettered",
            "Messages sent to the dead-letter subject after their last attempt",
            messages_dead_lettered.clone(),
        );
        registry.register(
            "events_pending",
            "Durable events waiting for the component's handler, as last reported by the event log",
            events_pending.clone(),
        );
        registry.register(
            "events_redelivered",
            "Durable event deliveries that were not the event's first (a failed attempt, or a node that died mid-handler)",
            events_redelivered.clone(),
        );
        registry.register(
            "events_acked",
            "Durable events acknowledged: handled, or dead-lettered after their last attempt",
            events_acked.clone(),
        );
        registry.register(
            "requests",
            "HTTP requests answered, by tenant, component and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from routing a request to its response head",
            request_duration.clone(),
        );
        registry.register(
            "instantiation_duration_seconds",
            "Time to instantiate a component for one request",
            instantiation_duration.clone(),
        );
        registry.register(
            "instances_in_flight",
            "Component instances alive right now",
            in_flight.clone(),
        );
        registry.register(
            "traps",
            "Guest traps (excluding deadline and memory-limit kills)",
            traps.clone(),
        );
        registry.register(
            "deadline_kills",
            "Instances stopped at their request deadline",
            deadline_kills.clone(),
        );
        registry.register(
            "memory_limit_kills",
            "Instances stopped after hitting their memory limit",
            memory_limit_kills.clone(),
        );
        registry.register(
            "admission_rejections",
            "Requests refused with 503 because the component was at max_concurrent",
            admission_rejections.clone(),
        );
        registry.register(
            "unrouted_requests",
            "Requests no component serves (404)",
            unrouted.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            instantiation_duration,
            in_flight,
            traps,
            deadline_kills,
            memory_limit_kills,
            admission_rejections,
            messages_handled,
            message_failures,
            messages_dead_lettered,
            events_pending,
            events_redelivered,
            events_acked,
            activations,
            canary_rollbacks,
            unrouted,
            node_memory_reserved,
            node_memory_budget,
        }
    }
}

impl Metrics {
    /// The series of one deployed component, resolved once.
    pub fn for_component(&self, tenant: &str, component: &str) -> ComponentMetrics {
        let labels = ComponentLabels {
            tenant: tenant.to_string(),
            component: component.to_string(),
        };
        ComponentMetrics {
            request_duration: self.request_duration.get_or_create(&labels).clone(),
            instantiation_duration: self.instantiation_duration.get_or_create(&labels).clone(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
            traps: self.traps.get_or_create(&labels).clone(),
            deadline_kills: self.deadline_kills.get_or_create(&labels).clone(),
            memory_limit_kills: self.memory_limit_kills.get_or_create(&labels).clone(),
            admission_rejections: self.admission_rejections.get_or_create(&labels).clone(),
            messages_handled: self.messages_handled.get_or_create(&labels).clone(),
            message_failures: self.message_failures.get_or_create(&labels).clone(),
            messages_dead_lettered: self.messages_dead_lettered.get_or_create(&labels).clone(),
            events_pending: self.events_pending.get_or_create(&labels).clone(),
            events_redelivered: self.events_redelivered.get_or_create(&labels).clone(),
            events_acked: self.events_acked.get_or_create(&labels).clone(),
            activations: self.activations.get_or_create(&labels).clone(),
            canary_rollbacks: self.canary_rollbacks.get_or_create(&labels).clone(),
            requests: self.requests.clone(),
            labels,
        }
    }

    pub fn count_unrouted(&self) {
        self.unrouted.inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Handles on one component's series; clones share the underlying atomics.
#[derive(Clone)]
pub struct ComponentMetrics {
    labels: ComponentLabels,
    pub request_duration: Histogram,
    pub instantiation_duration: Histogram,
    pub in_flight: Gauge,
    pub traps: Counter,
    pub deadline_kills: Counter,
    pub memory_limit_kills: Counter,
    pub admission_rejections: Counter,
    pub messages_handled: Counter,
    pub message_failures: Counter,
    pub messages_dead_lettered: Counter,
    pub events_pending: Gauge,
    pub events_redelivered: Counter,
    pub events_acked: Counter,
    pub activations: Counter,
    pub canary_rollbacks: Counter,
    requests: Family<RequestLabels, Counter>,
}

impl ComponentMetrics {
    /// Counts one answered request by its status.
    pub fn count_response(&self, status: u16) {
        let labels = RequestLabels {
            tenant: self.labels.tenant.clone(),
            component: self.labels.component.clone(),
            status,
        };
        self.requests.get_or_create(&labels).inc();
    }
}

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    tenant: String,
    quota: String,
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
    instances_reused: Family<ComponentLabels, Counter>,
    unrouted: Counter,
    tenant_rejections: Family<QuotaLabels, Counter>,
    tenant_quota: Family<QuotaLabels, Gauge>,
    tenant_instances: Family<TenantLabels, Gauge>,
    tenant_memory: Family<TenantLabels, Gauge>,
    tenant_storage: Family<TenantLabels, Gauge>,
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
        let tenant_rejections = Family::<QuotaLabels, Counter>::default();
        let tenant_quota = Family::<QuotaLabels, Gauge>::default();
        let tenant_instances = Family::<TenantLabels, Gauge>::default();
        let tenant_memory = Family::<TenantLabels, Gauge>::default();
        let tenant_storage = Family::<TenantLabels, Gauge>::default();
        registry.register(
            "tenant_quota_rejections",
            "Calls, writes, publishes and deploys refused because the tenant reached a quota",
            tenant_rejections.clone(),
        );
        registry.register(
            "tenant_quota_limit",
            "The tenant's quotas in force (absent: unlimited); bytes, counts or per second",
            tenant_quota.clone(),
        );
        registry.register(
            "tenant_instances",
            "Instances of the tenant's components alive right now",
            tenant_instances.clone(),
        );
        registry.register(
            "tenant_memory_reserved_bytes",
            "Linear memory the tenant's live instances hold",
            tenant_memory.clone(),
        );
        registry.register(
            "tenant_storage_bytes",
            "Bytes the tenant's databases hold on disk",
            tenant_storage.clone(),
        );
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
        let instances_reused = Family::<ComponentLabels, Counter>::default();
        registry.register(
            "instances_reused",
            "Calls served by a warm instance that served an earlier call (reuse on)",
            instances_reused.clone(),
        );
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
            instances_reused,
            unrouted,
            tenant_rejections,
            tenant_quota,
            tenant_instances,
            tenant_memory,
            tenant_storage,
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
            instances_reused: self.instances_reused.get_or_create(&labels).clone(),
            requests: self.requests.clone(),
            common_statuses: Default::default(),
            labels,
        }
    }

    /// The series of one tenant, resolved once.
    pub fn for_tenant(&self, tenant: &str) -> TenantMetrics {
        let labels = TenantLabels {
            tenant: tenant.to_string(),
        };
        TenantMetrics {
            tenant: tenant.to_string(),
            instances: self.tenant_instances.get_or_create(&labels).clone(),
            memory_reserved: self.tenant_memory.get_or_create(&labels).clone(),
            storage_bytes: self.tenant_storage.get_or_create(&labels).clone(),
            rejections: self.tenant_rejections.clone(),
            quota: self.tenant_quota.clone(),
        }
    }

    /// Drops a removed tenant's own series.
    pub fn forget_tenant(&self, tenant: &str) {
        let labels = TenantLabels {
            tenant: tenant.to_string(),
        };
        self.tenant_instances.remove(&labels);
        self.tenant_memory.remove(&labels);
        self.tenant_storage.remove(&labels);
        for quota in QUOTAS {
            let labels = QuotaLabels {
                tenant: tenant.to_string(),
                quota: quota.to_string(),
            };
            self.tenant_rejections.remove(&labels);
            self.tenant_quota.remove(&labels);
        }
    }

    /// Drops a removed component's series.
    pub fn forget_component(&self, tenant: &str, component: &str) {
        let labels = ComponentLabels {
            tenant: tenant.to_string(),
            component: component.to_string(),
        };
        self.request_duration.remove(&labels);
        self.instantiation_duration.remove(&labels);
        for family in [
            &self.traps,
            &self.deadline_kills,
            &self.memory_limit_kills,
            &self.admission_rejections,
            &self.messages_handled,
            &self.message_failures,
            &self.messages_dead_lettered,
            &self.events_redelivered,
            &self.events_acked,
            &self.activations,
            &self.canary_rollbacks,
            &self.instances_reused,
        ] {
            family.remove(&labels);
        }
        self.in_flight.remove(&labels);
        self.events_pending.remove(&labels);
    }

    /// The metrics text with only `tenant`'s series (and the families that have one).
    pub fn encode_for_tenant(&self, tenant: &str) -> String {
        let needle = format!("tenant=\"{tenant}\"");
        let mut out = String::new();
        let mut header = String::new();
        for line in self.encode().lines() {
            if line.starts_with("# EOF") {
                out.push_str(line);
                out.push('\n');
            } else if line.starts_with('#') {
                if line.starts_with("# HELP") {
                    header.clear();
                }
                header.push_str(line);
                header.push('\n');
            } else if line.contains(&needle) {
                out.push_str(&header);
                header.clear();
                out.push_str(line);
                out.push('\n');
            }
        }
        out
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

/// The quotas a tenant's series are kept for.
const QUOTAS: &[&str] = &[
    "requests_per_second",
    "burst",
    "max_instances",
    "max_instance_memory",
    "max_memory",
    "max_deadline",
    "max_storage",
    "max_components",
    "max_code_size",
    "publish_per_second",
    "max_outbound_per_request",
    "cpu_threads",
    "component_limits",
];

/// Handles on one tenant's series.
#[derive(Clone)]
pub struct TenantMetrics {
    tenant: String,
    pub instances: Gauge,
    pub memory_reserved: Gauge,
    pub storage_bytes: Gauge,
    rejections: Family<QuotaLabels, Counter>,
    quota: Family<QuotaLabels, Gauge>,
}

impl TenantMetrics {
    fn labels(&self, quota: &str) -> QuotaLabels {
        QuotaLabels {
            tenant: self.tenant.clone(),
            quota: quota.to_string(),
        }
    }

    /// Counts one refusal under `quota`.
    pub fn rejected(&self, quota: &str) {
        self.rejections.get_or_create(&self.labels(quota)).inc();
    }

    /// Refusals so far, by quota (those with any).
    pub fn rejections(&self) -> std::collections::BTreeMap<String, u64> {
        QUOTAS
            .iter()
            .filter_map(|quota| {
                let labels = self.labels(quota);
                let count = self.rejections.get(&labels).map(|c| c.get())?;
                Some((quota.to_string(), count))
            })
            .collect()
    }

    /// The quota in force, as gauges (unset quotas have none).
    pub fn set_limits(&self, quota: &crate::manifest::QuotaSpec) {
        let seconds = |d: std::time::Duration| d.as_secs() as i64;
        let values: [(&str, Option<i64>); 12] = [
            (
                "requests_per_second",
                quota.requests_per_second.map(i64::from),
            ),
            ("burst", quota.burst.map(i64::from)),
            ("max_instances", quota.max_instances.map(i64::from)),
            (
                "max_instance_memory",
                quota.max_instance_memory.map(|b| b.as_u64() as i64),
            ),
            ("max_memory", quota.max_memory.map(|b| b.as_u64() as i64)),
            ("max_deadline", quota.max_deadline.map(seconds)),
            ("max_storage", quota.max_storage.map(|b| b.as_u64() as i64)),
            ("max_components", quota.max_components.map(i64::from)),
            (
                "max_code_size",
                quota.max_code_size.map(|b| b.as_u64() as i64),
            ),
            (
                "publish_per_second",
                quota.publish_per_second.map(i64::from),
            ),
            (
                "max_outbound_per_request",
                quota.max_outbound_per_request.map(i64::from),
            ),
            ("cpu_threads", quota.cpu_threads.map(i64::from)),
        ];
        for (name, value) in values {
            let labels = self.labels(name);
            match value {
                Some(value) => {
                    self.quota.get_or_create(&labels).set(value);
                }
                None => {
                    self.quota.remove(&labels);
                }
            }
        }
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
    pub instances_reused: Counter,
    requests: Family<RequestLabels, Counter>,
    /// The series of [`COMMON_STATUSES`], each looked up in `requests` once: the lookup (a
    /// lock and a hash of both label strings) was about 700 instructions per request.
    common_statuses: [std::sync::OnceLock<Counter>; COMMON_STATUSES.len()],
}

/// The statuses most answers have.
const COMMON_STATUSES: [u16; 4] = [200, 201, 202, 204];

impl ComponentMetrics {
    /// Counts one answered request by its status.
    pub fn count_response(&self, status: u16) {
        let series = || {
            self.requests
                .get_or_create(&RequestLabels {
                    tenant: self.labels.tenant.clone(),
                    component: self.labels.component.clone(),
                    status,
                })
                .clone()
        };
        match COMMON_STATUSES.iter().position(|s| *s == status) {
            Some(i) => self.common_statuses[i].get_or_init(series).inc(),
            None => series().inc(),
        };
    }
}

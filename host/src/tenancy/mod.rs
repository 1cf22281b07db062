//! Tenants as the node runs them. A [`Tenant`] is a runtime object: its name, hosts and
//! config, its quota (its own values over `node.tenant_quota`), and the live state that
//! enforces that quota: token buckets for requests and publishes, a resizable limit on
//! its live instances, its memory budget, its storage usage, its turns on the CPU and
//! its quota metrics. [`Tenants`] is the node's directory of them, swapped whole on a
//! change, so a request looks its tenant up without a lock.
//!
//! A tenant object lives as long as the tenant: changing it through the admin API
//! changes its quota in place (every version of its components keeps pointing at the
//! same object), and removing it marks it removed, which refuses whatever still arrives
//! for it. Who may act on a tenant (tokens) is [`tokens`].

pub mod tokens;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytesize::ByteSize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::manifest::{QuotaSpec, TenantSpec};
use crate::runtime::memory::MemoryBudget;
use crate::storage::StorageUsage;
use crate::telemetry::metrics::{Metrics, TenantMetrics};

/// The quotas a breach can be reported for (metric label `quota`).
pub mod quota {
    pub const REQUESTS: &str = "requests_per_second";
    pub const INSTANCES: &str = "max_instances";
    pub const MEMORY: &str = "max_memory";
    pub const STORAGE: &str = "max_storage";
    pub const COMPONENTS: &str = "max_components";
    pub const CODE_SIZE: &str = "max_code_size";
    pub const PUBLISH: &str = "publish_per_second";
    pub const OUTBOUND: &str = "max_outbound_per_request";
    pub const LIMITS: &str = "component_limits";
}

/// A breach is logged for the operator once, then again only after this long.
const ALERT_EVERY: Duration = Duration::from_secs(60);

/// Where a tenant was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantOrigin {
    Manifest,
    Api,
}

/// A semaphore whose size can change while permits are out (permits above a new, lower
/// size are taken back as they come home).
pub struct Limit {
    semaphore: Arc<Semaphore>,
    size: AtomicU32,
}

/// Permits a limit has when nothing is set: more than anything can hold at once.
pub const UNLIMITED: u32 = 1 << 24;

impl Limit {
    pub fn new(size: u32) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(size as usize)),
            size: AtomicU32::new(size),
        }
    }

    pub fn size(&self) -> u32 {
        self.size.load(Ordering::Acquire)
    }

    /// Permits out right now.
    pub fn in_use(&self) -> u32 {
        self.size()
            .saturating_sub(self.semaphore.available_permits() as u32)
    }

    pub fn resize(&self, size: u32) {
        let old = self.size.swap(size, Ordering::AcqRel);
        if size > old {
            self.semaphore.add_permits((size - old) as usize);
        } else if old > size {
            let semaphore = self.semaphore.clone();
            let mut owed = (old - size) as usize;
            owed -= semaphore.forget_permits(owed);
            if owed > 0 {
                tokio::spawn(async move {
                    if let Ok(permits) = semaphore.acquire_many(owed as u32).await {
                        permits.forget();
                    }
                });
            }
        }
    }

    pub fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        self.semaphore.clone().try_acquire_owned().ok()
    }

    pub async fn take(&self) -> OwnedSemaphorePermit {
        self.semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("a limit's semaphore is never closed")
    }

    /// The semaphore itself, for a wait that must not borrow the limit.
    pub fn semaphore(&self) -> Arc<Semaphore> {
        self.semaphore.clone()
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up. Unset rate: no limit.
pub struct TokenBucket {
    /// Whether a rate is set at all (most tenants have none: no lock on their path).
    limited: AtomicBool,
    state: Mutex<Bucket>,
}

struct Bucket {
    rate: Option<f64>,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: Option<u32>, burst: Option<u32>) -> Self {
        let bucket = TokenBucket {
            limited: AtomicBool::new(false),
            state: Mutex::new(Bucket {
                rate: None,
                burst: 0.0,
                tokens: 0.0,
                last: Instant::now(),
            }),
        };
        bucket.set(rate, burst);
        bucket
    }

    /// Changes the rate and burst; a full bucket stays full.
    pub fn set(&self, rate: Option<u32>, burst: Option<u32>) {
        let mut state = self.state.lock().expect("bucket lock");
        let burst = f64::from(burst.or(rate).unwrap_or(1).max(1));
        let was_full = state.tokens >= state.burst;
        state.rate = rate.map(f64::from);
        state.tokens = if was_full {
            burst
        } else {
            state.tokens.min(burst)
        };
        state.burst = burst;
        self.limited.store(rate.is_some(), Ordering::Release);
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&self) -> Result<(), Duration> {
        if !self.limited.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut state = self.state.lock().expect("bucket lock");
        let Some(rate) = state.rate else {
            return Ok(());
        };
        let now = Instant::now();
        let elapsed = now.duration_since(state.last).as_secs_f64();
        state.last = now;
        state.tokens = (state.tokens + elapsed * rate).min(state.burst);
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - state.tokens) / rate))
        }
    }
}

/// One tenant of the node.
pub struct Tenant {
    pub name: Arc<str>,
    /// As declared or last set through the API (its own quota, not the effective one).
    spec: ArcSwap<TenantSpec>,
    /// The quota in force: the tenant's values over the node's defaults.
    quota: ArcSwap<QuotaSpec>,
    origin: Mutex<TenantOrigin>,
    requests: TokenBucket,
    publishes: TokenBucket,
    /// Live instances across all its components.
    pub instances: Limit,
    /// Threads its long-running guests may occupy at once.
    pub cpu: Limit,
    /// Linear memory of its live instances.
    pub memory: Arc<MemoryBudget>,
    /// Bytes its databases hold.
    pub storage: Arc<StorageUsage>,
    alerts: Mutex<HashMap<&'static str, Instant>>,
    pub metrics: TenantMetrics,
    removed: AtomicBool,
}

/// Threads a tenant's long-running guests may occupy when its quota does not say: every
/// core but one, so that another tenant always finds one free.
pub fn default_cpu_threads() -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    cores.saturating_sub(1).max(1)
}

impl Tenant {
    fn new(
        name: &str,
        spec: TenantSpec,
        defaults: &QuotaSpec,
        origin: TenantOrigin,
        metrics: &Metrics,
    ) -> Arc<Self> {
        let quota = spec.quota.or(defaults);
        let metrics = metrics.for_tenant(name);
        let tenant = Arc::new_cyclic(|me: &std::sync::Weak<Tenant>| Tenant {
            name: name.into(),
            requests: TokenBucket::new(None, None),
            publishes: TokenBucket::new(None, None),
            instances: Limit::new(UNLIMITED),
            cpu: Limit::new(default_cpu_threads()),
            memory: Arc::new(MemoryBudget::new(u64::MAX, metrics.memory_reserved.clone())),
            storage: Arc::new(StorageUsage::new(metrics.storage_bytes.clone(), {
                let me = me.clone();
                Box::new(move |message: &str| {
                    if let Some(tenant) = me.upgrade() {
                        tenant.breach(quota::STORAGE, message);
                    }
                })
            })),
            spec: ArcSwap::from_pointee(spec),
            quota: ArcSwap::from_pointee(quota),
            origin: Mutex::new(origin),
            alerts: Mutex::new(HashMap::new()),
            metrics,
            removed: AtomicBool::new(false),
        });
        tenant.apply(&quota);
        tenant
    }

    /// Puts `quota` in force on the live limits.
    fn apply(&self, quota: &QuotaSpec) {
        self.requests.set(quota.requests_per_second, quota.burst);
        self.publishes.set(quota.publish_per_second, None);
        self.instances
            .resize(quota.max_instances.unwrap_or(UNLIMITED));
        self.cpu
            .resize(quota.cpu_threads.unwrap_or_else(default_cpu_threads));
        self.memory
            .set_limit(quota.max_memory.map_or(u64::MAX, |m| m.as_u64()));
        self.storage
            .set_limit(quota.max_storage.map_or(u64::MAX, |m| m.as_u64()));
        self.metrics.set_limits(quota);
        self.quota.store(Arc::new(*quota));
    }

    pub fn spec(&self) -> Arc<TenantSpec> {
        self.spec.load_full()
    }

    pub fn hosts(&self) -> Vec<String> {
        self.spec.load().hosts.clone()
    }

    pub fn config(&self) -> BTreeMap<String, String> {
        self.spec.load().config.clone()
    }

    /// The quota in force.
    pub fn quota(&self) -> QuotaSpec {
        **self.quota.load()
    }

    pub fn origin(&self) -> TenantOrigin {
        *self.origin.lock().expect("tenant lock")
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// A gateway request: allowed, or refused with how long to wait.
    pub fn admit_request(&self) -> Result<(), Duration> {
        self.requests.take().inspect_err(|wait| {
            self.breach(
                quota::REQUESTS,
                &format!("rate limited; next request in {wait:?}"),
            )
        })
    }

    /// A publish: allowed, or refused with the guest's error text.
    pub fn admit_publish(&self) -> Result<(), String> {
        self.publishes.take().map_err(|_| {
            let limit = self.quota().publish_per_second.unwrap_or_default();
            let message =
                format!("the tenant's quota of {limit} published messages per second is used up");
            self.breach(quota::PUBLISH, &message);
            message
        })
    }

    /// Counts a refusal under `quota` and tells the operator, at most once a minute per
    /// tenant and quota.
    pub fn breach(&self, quota: &'static str, what: &str) {
        self.metrics.rejected(quota);
        let mut alerts = self.alerts.lock().expect("tenant lock");
        let now = Instant::now();
        let due = alerts
            .get(quota)
            .is_none_or(|last| now.duration_since(*last) >= ALERT_EVERY);
        if due {
            alerts.insert(quota, now);
            drop(alerts);
            tracing::warn!(tenant = %self.name, quota, "tenant quota reached: {what} (logged once a minute at most)");
        }
    }

    /// The tenant's status document (admin API): spec, quota in force and usage.
    pub fn status(&self) -> serde_json::Value {
        let quota = self.quota();
        let spec = self.spec();
        let bytes = |b: Option<ByteSize>| b.map(|b| b.as_u64());
        serde_json::json!({
            "tenant": &*self.name,
            "origin": self.origin(),
            "hosts": spec.hosts,
            "config": spec.config.keys().collect::<Vec<_>>(),
            "quota": spec.quota,
            "effective_quota": quota,
            "usage": {
                "instances": self.instances.in_use(),
                "memory_bytes": self.memory.reserved(),
                "storage_bytes": self.storage.used(),
                "max_storage_bytes": bytes(quota.max_storage),
                "rejections": self.metrics.rejections(),
            },
        })
    }
}

/// The node's tenants, by name.
pub struct Tenants {
    by_name: ArcSwap<BTreeMap<String, Arc<Tenant>>>,
    defaults: QuotaSpec,
    metrics: Arc<Metrics>,
    changes: Mutex<()>,
}

/// Why a tenant change was refused.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("there is no tenant {0:?}")]
    Unknown(String),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<crate::manifest::Problem>),
}

impl Tenants {
    /// The manifest's tenants (or the one `default` tenant serving every host).
    pub fn new(
        declared: &BTreeMap<String, TenantSpec>,
        defaults: QuotaSpec,
        metrics: Arc<Metrics>,
    ) -> Self {
        let tenants = Tenants {
            by_name: ArcSwap::from_pointee(BTreeMap::new()),
            defaults,
            metrics,
            changes: Mutex::new(()),
        };
        let mut by_name = BTreeMap::new();
        for (name, spec) in declared {
            by_name.insert(
                name.clone(),
                Tenant::new(
                    name,
                    spec.clone(),
                    &tenants.defaults,
                    TenantOrigin::Manifest,
                    &tenants.metrics,
                ),
            );
        }
        tenants.by_name.store(Arc::new(by_name));
        tenants
    }

    pub fn get(&self, name: &str) -> Option<Arc<Tenant>> {
        self.by_name.load().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Tenant>> {
        self.by_name.load().values().cloned().collect()
    }

    /// (name, hosts) of every tenant, for the router.
    pub fn hosts(&self) -> Vec<(String, Vec<String>)> {
        self.by_name
            .load()
            .iter()
            .map(|(name, tenant)| (name.clone(), tenant.hosts()))
            .collect()
    }

    /// The quota a tenant with `spec` would have.
    pub fn effective(&self, spec: &TenantSpec) -> QuotaSpec {
        spec.quota.or(&self.defaults)
    }

    /// Creates a tenant (with `origin`) or changes one in place (its origin stays);
    /// answers whether it was created. Hosts another tenant claims are refused.
    pub fn put(
        &self,
        name: &str,
        spec: TenantSpec,
        origin: TenantOrigin,
    ) -> Result<(Arc<Tenant>, bool), TenantError> {
        let _change = self.changes.lock().expect("tenants lock");
        let mut problems = crate::manifest::tenant_problems(name, &spec);
        let current = self.by_name.load_full();
        for (i, host) in spec.hosts.iter().enumerate() {
            let host = host.to_ascii_lowercase();
            if let Some((other, _)) = current.iter().find(|(other, tenant)| {
                other.as_str() != name
                    && tenant
                        .hosts()
                        .iter()
                        .any(|h| h.to_ascii_lowercase() == host)
            }) {
                problems.push(crate::manifest::Problem {
                    field: format!("tenants.{name}.hosts[{i}]"),
                    reason: format!("host {host:?} is already claimed by tenant {other:?}"),
                });
            }
        }
        if !problems.is_empty() {
            return Err(TenantError::Invalid(problems));
        }
        if let Some(tenant) = current.get(name) {
            let quota = self.effective(&spec);
            tenant.spec.store(Arc::new(spec));
            tenant.apply(&quota);
            return Ok((tenant.clone(), false));
        }
        let tenant = Tenant::new(name, spec, &self.defaults, origin, &self.metrics);
        let mut next = (*current).clone();
        next.insert(name.to_string(), tenant.clone());
        self.by_name.store(Arc::new(next));
        Ok((tenant, true))
    }

    /// Takes a tenant out of the directory; whatever still holds it sees it removed.
    pub fn remove(&self, name: &str) -> Result<Arc<Tenant>, TenantError> {
        let _change = self.changes.lock().expect("tenants lock");
        let current = self.by_name.load_full();
        let tenant = current
            .get(name)
            .cloned()
            .ok_or_else(|| TenantError::Unknown(name.to_string()))?;
        tenant.removed.store(true, Ordering::Release);
        let mut next = (*current).clone();
        next.remove(name);
        self.by_name.store(Arc::new(next));
        self.metrics.forget_tenant(name);
        Ok(tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_its_burst_through_then_its_rate() {
        let bucket = TokenBucket::new(Some(10), Some(3));
        for _ in 0..3 {
            assert!(bucket.take().is_ok());
        }
        let wait = bucket.take().expect_err("the burst is used up");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        std::thread::sleep(Duration::from_millis(120));
        assert!(bucket.take().is_ok(), "a token came back after 1/rate");
        assert!(TokenBucket::new(None, None).take().is_ok());
    }

    #[tokio::test]
    async fn a_limit_shrinks_and_grows_with_permits_out() {
        let limit = Limit::new(2);
        let a = limit.try_take().unwrap();
        let _b = limit.try_take().unwrap();
        assert!(limit.try_take().is_none());
        limit.resize(1);
        drop(a);
        tokio::task::yield_now().await;
        assert!(limit.try_take().is_none(), "one permit out, a limit of one");
        limit.resize(3);
        assert!(limit.try_take().is_some());
    }
}

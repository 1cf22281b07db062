//! Where a call's instance comes from: a fresh `Store` and instance per call (the default),
//! or, for a component whose manifest entry opts in with `reuse = { ... }`, a warm instance
//! that finished an earlier call of the same kind cleanly.
//!
//! Warm instances live in pools owned by their [`Version`](crate::runtime::version::Version):
//! one pool for HTTP calls (gateway and `NAME.internal`) and one for message deliveries,
//! so they are never shared across components, tenants or versions. A warm instance here
//! serves one call at a time (a WASIp3 component's HTTP requests go to
//! [`crate::runtime::concurrent`] instead, several at once); it goes back to its pool only
//! when the call ended without a failure (a trap, deadline or memory kill, or a host error
//! throws it away), while it has served
//! fewer than `max_requests` calls and holds no more than `max_memory`, and while its
//! version has not been swapped out since it was taken ([`WarmPool::retire_all`]). Idle
//! instances are dropped after `idle` by a sweeper task, and at once, node-wide, when an
//! instantiation or a memory growth elsewhere finds the instance pool or a memory budget
//! full ([`evict_idle_everywhere`]): warm instances are a cache, never a reason to refuse.
//!
//! The per-call parts of a store are set on every lease: the deadline the epoch callback
//! checks, a fresh epoch deadline, and the call's own values (a durable delivery's
//! `TRELLIS_EVENT_ID` and attempt), which a reused instance reads through `wasi:config`
//! only: a guest reads its environment once, so a warm instance would keep the first
//! call's values there.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p3::bindings::Service;

use crate::bindings::handler::MessageHandler;
use crate::manifest::Reuse;
use crate::runtime::instance::InstanceState;

/// What an instance was instantiated for, with its typed exports.
pub enum Exports {
    /// `wasi:http/incoming-handler@0.2.x`.
    HttpP2(Proxy),
    /// `wasi:http/handler@0.3.x`.
    HttpP3(Service),
    /// `wasmcloud:messaging/handler`.
    Handler(MessageHandler),
}

/// The store one call runs in, and the instance in it once there is one.
pub struct Lease {
    pub store: Store<InstanceState>,
    /// `None` until instantiated (a fresh store).
    pub exports: Option<Exports>,
    /// Calls this instance served before this one (0: fresh).
    pub served: u32,
    /// The pool's generation when the lease was taken: a lease from before a swap is
    /// not taken back.
    generation: u64,
}

impl Lease {
    /// A lease on a fresh store (no instance yet).
    pub fn fresh(store: Store<InstanceState>, pool: Option<&WarmPool>) -> Self {
        Self {
            store,
            exports: None,
            served: 0,
            generation: pool.map_or(0, |p| p.generation.load(Ordering::Acquire)),
        }
    }

    /// Whether this call runs in an instance that served an earlier one.
    pub fn is_warm(&self) -> bool {
        self.served > 0
    }
}

/// An idle warm instance.
struct Idle {
    lease: Lease,
    since: Instant,
}

/// One version's warm instances of one kind.
pub struct WarmPool {
    max_requests: u32,
    idle_for: Duration,
    /// `None`: the component's memory limit (which kills the call itself).
    max_memory: Option<u64>,
    idle: Mutex<Vec<Idle>>,
    /// Bumped on every swap: leases taken before it are not taken back.
    generation: AtomicU64,
    sweeping: AtomicBool,
    me: Weak<WarmPool>,
}

impl WarmPool {
    pub fn new(policy: &Reuse) -> Arc<Self> {
        let pool = Arc::new_cyclic(|me| Self {
            max_requests: policy.max_requests.max(1),
            idle_for: policy.idle,
            max_memory: policy.max_memory.map(|m| m.as_u64()),
            idle: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
            me: me.clone(),
        });
        let mut pools = POOLS.lock().expect("pool registry lock");
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(&pool));
        pool
    }

    /// The most recently used idle instance, if one is fresh enough.
    pub fn take(&self) -> Option<Lease> {
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("warm pool lock");
        let entry = idle.pop()?;
        if now.duration_since(entry.since) < self.idle_for {
            return Some(entry.lease);
        }
        // The rest are older still.
        let stale: Vec<Idle> = std::mem::take(&mut *idle);
        drop(idle);
        discard(entry.lease.store);
        stale.into_iter().for_each(|e| discard(e.lease.store));
        None
    }

    /// Takes an instance back after a call that ended cleanly; anything past its limits or
    /// from before a swap is thrown away.
    pub fn give_back(&self, mut lease: Lease) {
        lease.served += 1;
        lease.store.data().cpu_turn.give_back();
        let keep = lease.generation == self.generation.load(Ordering::Acquire)
            && lease.served < self.max_requests
            && self
                .max_memory
                .is_none_or(|max| lease.store.data().limiter.reserved() <= max);
        if !keep {
            discard(lease.store);
            return;
        }
        self.idle.lock().expect("warm pool lock").push(Idle {
            lease,
            since: Instant::now(),
        });
        self.sweep_later();
    }

    /// Throws away every idle instance and any leased now (when they come back): the
    /// version was swapped out.
    pub fn retire_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.evict_idle();
    }

    /// Idle instances now.
    fn idle_count(&self) -> usize {
        self.idle.lock().expect("warm pool lock").len()
    }

    /// Drops every idle instance here and now (not on the reaper thread): the caller
    /// needs their memory and pool slots back before it goes on.
    fn evict_idle(&self) -> usize {
        let idle = std::mem::take(&mut *self.idle.lock().expect("warm pool lock"));
        let count = idle.len();
        drop(idle);
        count
    }

    /// Drops instances idle for longer than `idle`; the oldest are first in the list.
    fn evict_stale(&self) -> usize {
        let now = Instant::now();
        let stale: Vec<Idle> = {
            let mut idle = self.idle.lock().expect("warm pool lock");
            let fresh_from = idle
                .iter()
                .position(|e| now.duration_since(e.since) < self.idle_for)
                .unwrap_or(idle.len());
            idle.drain(..fresh_from).collect()
        };
        let count = stale.len();
        stale.into_iter().for_each(|e| discard(e.lease.store));
        count
    }

    /// Starts the sweeper unless it runs; it stops once the pool is empty (or gone).
    fn sweep_later(&self) {
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sweeping.store(false, Ordering::Release);
            return;
        };
        let pool = self.me.clone();
        let period = (self.idle_for / 2).max(Duration::from_millis(10));
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(pool) = pool.upgrade() else { return };
                pool.evict_stale();
                if pool.idle_count() == 0 {
                    pool.sweeping.store(false, Ordering::Release);
                    // An instance given back between the check and the store would find
                    // the flag still set and not start a sweeper: look once more.
                    if pool.idle_count() == 0 || pool.sweeping.swap(true, Ordering::AcqRel) {
                        return;
                    }
                }
            }
        });
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        self.evict_idle();
    }
}

/// Every warm pool of the node, for eviction when room runs out.
static POOLS: Mutex<Vec<Weak<WarmPool>>> = Mutex::new(Vec::new());

/// Drops every idle warm instance of the node; how many there were. Called when an
/// instantiation finds the instance pool full or a memory budget refuses a growth.
pub fn evict_idle_everywhere() -> usize {
    let shared = crate::runtime::concurrent::evict_idle_everywhere();
    let pools: Vec<Arc<WarmPool>> = POOLS
        .lock()
        .expect("pool registry lock")
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    shared + pools.iter().map(|p| p.evict_idle()).sum::<usize>()
}

/// Linear memory past which an instance is torn down by the reaper thread.
const LARGE_INSTANCE: u64 = 16 << 20;

/// Ends an instance. Giving a large one's memory back to the system (madvise over tens of
/// MiB) takes milliseconds in the kernel: done on an async worker it would hold up every
/// task queued there, another tenant's requests among them, so it goes to a thread of
/// its own at the lowest CPU priority (its memory stays counted in the budgets until
/// then). Small instances (the common case) end in place: a thread hop would cost more
/// than their teardown.
pub fn discard(store: Store<InstanceState>) {
    // The guest is done: its tenant's CPU turn is free now, not when the store goes.
    store.data().cpu_turn.give_back();
    if store.data().limiter.reserved() < LARGE_INSTANCE {
        return;
    }
    static REAPER: OnceLock<Option<std::sync::mpsc::Sender<Store<InstanceState>>>> =
        OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (sender, stores) = std::sync::mpsc::channel::<Store<InstanceState>>();
        std::thread::Builder::new()
            .name("trellis-reaper".into())
            .spawn(move || {
                // SAFETY: setpriority on the calling thread (who = 0) only.
                #[cfg(target_os = "linux")]
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 19);
                }
                for store in stores {
                    drop(store);
                }
            })
            .ok()
            .map(|_| sender)
    });
    match reaper {
        Some(sender) => {
            if let Err(std::sync::mpsc::SendError(store)) = sender.send(store) {
                drop(store);
            }
        }
        None => drop(store),
    }
}

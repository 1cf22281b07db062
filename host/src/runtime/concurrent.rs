//! WASIp3 instances that serve several HTTP requests at once, for components that opt into
//! reuse (`reuse = { concurrent = N, ... }`; `wasi:http/handler@0.3` is async, so one
//! instance can wait on I/O for one request while it answers another).
//!
//! Each such instance is a *worker*: a task that owns the `Store` and runs one
//! `run_concurrent` event loop for the instance's whole life, taking requests from a
//! channel and running each as a task of its own inside the instance. The version's
//! [`SharedInstances`] hands each request to a worker: an idle one first, else the busiest
//! one with fewer than `concurrent` requests in flight, else a new one. Requests on one
//! instance take turns on one thread: `concurrent` is for handlers that mostly wait (on
//! outbound calls, storage, timers); CPU-bound ones spread better with `concurrent = 1`.
//!
//! Limits hold per request and per instance:
//! - every request is admitted (its permit) before it is handed over;
//! - the store's deadline is the earliest deadline among the requests in flight, so a guest
//!   that loops is stopped at the first deadline it passes; a request that is waiting when
//!   its deadline passes fails alone (504), and its instance takes no more requests and
//!   ends once the others are done, since a task of the expired request may still run;
//! - a trap, a deadline kill or a memory kill ends the instance and fails every request it
//!   had in flight (each answers its own 5xx and counts in the component's metrics once);
//!   a response body still streaming from it is cut off, not ended cleanly; requests handed
//!   to it but not yet started go to another instance;
//! - an instance takes no more requests after `max_requests`, after a request left it above
//!   `max_memory`, and when its version stops serving; it ends once its requests are done,
//!   after `idle` without one, or when the node needs room (idle ones only). Unlike the
//!   one-at-a-time pools' idle instances, which are dropped in place, a worker owns its
//!   store inside its event loop: eviction tells it to end, and the memory comes back when
//!   the worker task runs next.
//!
//! A worker ends only once the guest's own tasks are done (a body it was still writing),
//! within the last request's deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::Response;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::sync::{mpsc, oneshot};
use wasmtime::component::Accessor;
use wasmtime_wasi_http::p3;

use crate::capabilities::outbound::{BoxError, ResponseBody};
use crate::manifest::Reuse;
use crate::runtime::body::Flag;
use crate::runtime::instance::InstanceState;
use crate::runtime::invoke::Failure;
use crate::runtime::reuse;
use crate::runtime::version::{HttpPre, Version};
use crate::telemetry::metrics::ComponentMetrics;

/// A request body as the guest reads it.
pub type GuestRequest = http::Request<UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>>;

/// The response head a guest sent, or the error code it answered with.
pub type Head = Result<Response<ResponseBody>, String>;

/// One admitted request, handed to a worker.
pub struct Job {
    pub request: GuestRequest,
    pub deadline: Instant,
    pub head: oneshot::Sender<Head>,
    /// Told how the request's part in the instance ended.
    pub done: oneshot::Sender<Done>,
    /// Raised when the instance fails while this request's response body may still stream.
    pub failed: Flag,
}

/// How a request's part in a shared instance ended.
pub struct Done {
    /// `Ok` once the guest returned its response (its body may still stream); the failure
    /// when the request expired or the instance failed before that.
    pub outcome: Result<(), Failure>,
    /// The instance had served an earlier request.
    pub warm: bool,
}

/// A worker that takes new requests.
struct Open {
    id: u64,
    jobs: mpsc::UnboundedSender<Job>,
    /// Handed over and not yet finished.
    in_flight: usize,
    /// Handed over in all.
    accepted: u32,
}

/// One version's shared WASIp3 instances.
pub struct SharedInstances {
    concurrent: usize,
    max_requests: u32,
    idle_for: Duration,
    max_memory: Option<u64>,
    /// Workers that take requests; a worker dropped from here sees its channel close and
    /// ends once its requests are done.
    open: Mutex<Vec<Open>>,
    next_id: AtomicU64,
}

impl SharedInstances {
    pub fn new(policy: &Reuse) -> Arc<Self> {
        let shared = Arc::new(Self {
            concurrent: policy.concurrent.max(1) as usize,
            max_requests: policy.max_requests.max(1),
            idle_for: policy.idle,
            max_memory: policy.max_memory.map(|m| m.as_u64()),
            open: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        });
        let mut all = ALL.lock().expect("shared instance registry lock");
        all.retain(|s| s.strong_count() > 0);
        all.push(Arc::downgrade(&shared));
        shared
    }

    /// Hands `job` to a worker, starting one when none should take it.
    pub fn dispatch(
        self: &Arc<Self>,
        version: &Arc<Version>,
        metrics: &Arc<ComponentMetrics>,
        mut job: Job,
    ) {
        let mut open = self.open.lock().expect("shared instances lock");
        while let Some(i) = self.pick(&open) {
            let worker = &mut open[i];
            worker.in_flight += 1;
            worker.accepted += 1;
            match worker.jobs.send(job) {
                Ok(()) => {
                    if worker.accepted >= self.max_requests {
                        open.remove(i);
                    }
                    return;
                }
                // The worker is gone (it failed): forget it, try another.
                Err(mpsc::error::SendError(returned)) => {
                    job = returned;
                    open.remove(i);
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, jobs) = mpsc::unbounded_channel();
        sender.send(job).expect("the receiver is right here");
        if self.max_requests > 1 {
            open.push(Open {
                id,
                jobs: sender,
                in_flight: 1,
                accepted: 1,
            });
        }
        drop(open);
        tokio::spawn(run_worker(
            self.clone(),
            version.clone(),
            metrics.clone(),
            id,
            jobs,
        ));
    }

    /// Which open worker takes the next request, if any should: an idle one (the most
    /// recently used), else the busiest one below `concurrent`, so that a component's
    /// requests need as few instances as they can.
    fn pick(&self, open: &[Open]) -> Option<usize> {
        if let Some(idle) = open.iter().rposition(|w| w.in_flight == 0) {
            return Some(idle);
        }
        open.iter()
            .enumerate()
            .filter(|(_, w)| w.in_flight < self.concurrent)
            .max_by_key(|(_, w)| w.in_flight)
            .map(|(i, _)| i)
    }

    /// A request of worker `id` finished.
    fn finished(&self, id: u64) {
        let mut open = self.open.lock().expect("shared instances lock");
        if let Some(worker) = open.iter_mut().find(|w| w.id == id) {
            worker.in_flight = worker.in_flight.saturating_sub(1);
        }
    }

    /// Worker `id` takes no more requests.
    fn close(&self, id: u64) {
        self.open
            .lock()
            .expect("shared instances lock")
            .retain(|w| w.id != id);
    }

    /// Closes worker `id` if nothing is handed to it: whether it was closed.
    fn close_if_idle(&self, id: u64) -> bool {
        let mut open = self.open.lock().expect("shared instances lock");
        match open.iter().position(|w| w.id == id) {
            Some(i) if open[i].in_flight == 0 => {
                open.remove(i);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Every worker takes no more requests (the version was swapped out); each ends once
    /// its requests are done.
    pub fn retire_all(&self) {
        self.open.lock().expect("shared instances lock").clear();
    }

    /// Closes every idle worker; how many.
    fn evict_idle(&self) -> usize {
        let mut open = self.open.lock().expect("shared instances lock");
        let before = open.len();
        open.retain(|w| w.in_flight > 0);
        before - open.len()
    }
}

/// Every version's shared instances, for eviction when the node needs room.
static ALL: Mutex<Vec<Weak<SharedInstances>>> = Mutex::new(Vec::new());

/// Closes every idle shared instance of the node; how many. Their workers end (and give
/// their memory and pool slots back) as soon as they run next.
pub fn evict_idle_everywhere() -> usize {
    let all: Vec<Arc<SharedInstances>> = ALL
        .lock()
        .expect("shared instance registry lock")
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    all.iter().map(|s| s.evict_idle()).sum()
}

/// A request running in a worker.
struct Pending {
    done: oneshot::Sender<Done>,
    deadline: Instant,
    warm: bool,
}

/// One instance's life: instantiate, serve what the channel brings until it closes (and
/// nothing runs), then wait for the guest's own tasks.
async fn run_worker(
    shared: Arc<SharedInstances>,
    version: Arc<Version>,
    metrics: Arc<ComponentMetrics>,
    id: u64,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    let Some(first) = jobs.recv().await else {
        return;
    };
    let (mut store, service) = match instantiate(&version, &metrics, first.deadline).await {
        Ok(instance) => instance,
        Err(failure) => {
            shared.close(id);
            let _ = first.done.send(Done {
                outcome: Err(failure.clone()),
                warm: false,
            });
            jobs.close();
            while let Ok(job) = jobs.try_recv() {
                let _ = job.done.send(Done {
                    outcome: Err(failure.clone()),
                    warm: false,
                });
            }
            return;
        }
    };

    let mut pending: Vec<(u64, Pending)> = Vec::new();
    let mut streaming: Vec<Flag> = Vec::new();
    let mut last_deadline = first.deadline;
    // The worker waits (and gives its tenant's CPU turn back) only when none of its
    // requests runs wasm.
    let turn = store.data().cpu_turn.clone();
    let event_loop = store.run_concurrent(async |accessor: &Accessor<InstanceState>| {
        let service = &service;
        let mut running = FuturesUnordered::new();
        let mut next = Some(first);
        let mut started: u64 = 0;
        let mut closed = false;
        // One timer for the worker's idleness, armed once and moved on only when it
        // fires early: a timer made and dropped per request costs two trips through the
        // runtime's timer wheel.
        let mut last_finished = Instant::now();
        let idle = tokio::time::sleep(shared.idle_for);
        tokio::pin!(idle);
        loop {
            if let Some(job) = next.take() {
                started += 1;
                let Job {
                    request,
                    deadline,
                    head,
                    done,
                    failed,
                } = job;
                last_deadline = last_deadline.max(deadline);
                streaming.push(failed);
                pending.push((
                    started,
                    Pending {
                        done,
                        deadline,
                        warm: started > 1,
                    },
                ));
                set_deadline(accessor, &pending);
                let number = started;
                running.push(async move {
                    let handled = tokio::time::timeout_at(
                        deadline.into(),
                        handle(accessor, service, request, head),
                    )
                    .await;
                    (number, handled)
                });
            }
            if closed && running.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                Some((number, handled)) = running.next(), if !running.is_empty() => {
                    let Some(at) = pending.iter().position(|(n, _)| *n == number) else {
                        continue;
                    };
                    let (_, request) = pending.swap_remove(at);
                    let outcome = match handled {
                        Ok(Ok(())) => Ok(()),
                        // A trap in the request's task: the instance is done for.
                        Ok(Err(error)) => {
                            pending.push((number, request));
                            return Err(error);
                        }
                        Err(_) => {
                            // A task of the expired request may still run: no more
                            // requests for this instance.
                            shared.close(id);
                            Err(Failure::Deadline(version.limits.deadline))
                        }
                    };
                    set_deadline(accessor, &pending);
                    if let Some(max) = shared.max_memory
                        && accessor.with(|mut access| access.get().limiter.reserved()) > max
                    {
                        shared.close(id);
                    }
                    // Counted out before the caller hears of it: a client that read its
                    // answer and asks again finds this instance idle.
                    shared.finished(id);
                    last_finished = Instant::now();
                    let _ = request.done.send(Done { outcome, warm: request.warm });
                }
                job = jobs.recv(), if !closed => match job {
                    Some(job) => next = Some(job),
                    None => closed = true,
                },
                () = &mut idle, if running.is_empty() && !closed => {
                    let idle_until = last_finished + shared.idle_for;
                    if Instant::now() < idle_until {
                        idle.as_mut().reset(idle_until.into());
                    } else if shared.close_if_idle(id) {
                        jobs.close();
                    } else {
                        // A request is on its way through the channel.
                        idle.as_mut().reset((Instant::now() + shared.idle_for).into());
                    }
                }
            }
        }
        // The guest may still be writing a response body.
        let _ = tokio::time::timeout_at(
            last_deadline.into(),
            std::future::poll_fn(|cx| accessor.poll_no_interesting_tasks(cx)),
        )
        .await;
        wasmtime::Result::<()>::Ok(())
    });
    let served = turn
        .released_while_waiting(event_loop)
        .await
        .and_then(|served| served);

    if let Err(error) = served {
        let failure = Failure::classify(error, &version, &store.data().limiter);
        shared.close(id);
        // Raised before the store goes: a body still streaming is cut off.
        streaming.iter().for_each(Flag::raise);
        for (_, request) in pending {
            let _ = request.done.send(Done {
                outcome: Err(failure.clone()),
                warm: request.warm,
            });
        }
        // Handed over but never started: another instance takes them.
        jobs.close();
        while let Ok(job) = jobs.try_recv() {
            shared.dispatch(&version, &metrics, job);
        }
    }
    reuse::discard(store);
}

/// A fresh store and instance for a worker, with one more try when the node's instance
/// pool was full and idle warm instances made room.
async fn instantiate(
    version: &Version,
    metrics: &ComponentMetrics,
    deadline: Instant,
) -> Result<(wasmtime::Store<InstanceState>, p3::bindings::Service), Failure> {
    let Some(HttpPre::P3(pre)) = version.http() else {
        return Err(Failure::Internal(
            "the component does not export wasi:http/handler@0.3".into(),
        ));
    };
    let mut store = version
        .new_store(deadline, &[])
        .map_err(|e| Failure::Internal(format!("{e:#}")))?;
    let instantiating = Instant::now();
    let turn = store.data().cpu_turn.clone();
    let instance = turn
        .released_while_waiting(async {
            match pre.instantiate_async(&mut store).await {
                Err(e) if crate::runtime::invoke::made_room(&e) => {
                    pre.instantiate_async(&mut store).await
                }
                other => other,
            }
        })
        .await;
    match instance {
        Ok(service) => {
            metrics
                .instantiation_duration
                .observe(instantiating.elapsed().as_secs_f64());
            Ok((store, service))
        }
        Err(e) => {
            let failure = Failure::classify(e, version, &store.data().limiter);
            reuse::discard(store);
            Err(failure)
        }
    }
}

/// The store's deadline: the earliest of the requests in flight (unchanged when none is).
fn set_deadline(accessor: &Accessor<InstanceState>, pending: &[(u64, Pending)]) {
    if let Some(earliest) = pending.iter().map(|(_, p)| p.deadline).min() {
        accessor.with(|mut access| access.get().deadline = earliest);
    }
}

/// One request's task: hand it to the guest and send its response head.
async fn handle(
    accessor: &Accessor<InstanceState>,
    service: &p3::bindings::Service,
    request: GuestRequest,
    head: oneshot::Sender<Head>,
) -> wasmtime::Result<()> {
    // Only the forbidden-header filter is read here, and the node's hooks keep the default
    // one (they change outbound sends only); the store's own hooks could not be lent to
    // the request's future.
    let (request, request_io) =
        p3::Request::from_http(wasmtime_wasi_http::default_hooks(), request);
    match service.handle(accessor, request).await? {
        Ok(response) => {
            let response =
                accessor.with(|mut access| response.into_http(&mut access, request_io))?;
            let _ = head.send(Ok(
                response.map(|body| body.map_err(BoxError::from).boxed_unsync())
            ));
        }
        Err(code) => {
            let _ = head.send(Err(format!("{code:?}")));
        }
    }
    Ok(())
}

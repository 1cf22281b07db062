//! Tenant CPU turns: how many threads one tenant's long-running guests may occupy
//! (`quota.cpu_threads`). An instance takes a turn from its tenant's semaphore at an epoch
//! tick (a guest still running at a tick is a long-running one), gives it back at the next
//! tick and queues again (FIFO), and gives it back when its call ends.
//!
//! A turn is for running wasm: a guest that leaves wasm to wait in the host (I/O, a
//! sleep, a sibling of the same tenant) must not keep it, or the tenant's other guests
//! queue behind one that is not running (with one turn per tenant, the shop's order
//! placement fell 3.6x that way while turns were taken back only by the epoch ticker).
//! Watching every host call (a wasmtime call hook) costs 2-3% of a hello's instructions.
//! Instead every guest call (and instantiation) runs inside
//! [`CpuTurn::released_while_waiting`]: a call whose future returns `Pending` has left
//! wasm and is waiting, so its turn goes back then, at the cost of one relaxed load per
//! such poll. Host calls that finish without waiting keep the turn: the guest is still
//! using its thread. A guest that resumes wasm after a wait runs without a turn until its
//! next tick, where it queues like any other: so a tenant's guests that wait in the host
//! often can, between ticks, run on more threads than `cpu_threads`, while guests that
//! compute without waiting never do.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;

/// The turn one instance may hold.
#[derive(Default)]
pub struct CpuTurn {
    held: AtomicBool,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl CpuTurn {
    pub fn hold(&self, permit: OwnedSemaphorePermit) {
        *self.permit.lock().expect("cpu turn lock") = Some(permit);
        self.held.store(true, Ordering::Release);
    }

    /// Gives the turn back, if held (the common case, none held, writes nothing).
    pub fn give_back(&self) {
        if self.held.load(Ordering::Relaxed) && self.held.swap(false, Ordering::AcqRel) {
            self.permit.lock().expect("cpu turn lock").take();
        }
    }

    /// Runs `call`, a guest call on the store that owns this turn, giving the turn back
    /// whenever the call waits (its poll returns `Pending`: no wasm of the store runs).
    pub async fn released_while_waiting<F: Future>(self: Arc<Self>, call: F) -> F::Output {
        let mut call = std::pin::pin!(call);
        std::future::poll_fn(|cx| {
            let polled = call.as_mut().poll(cx);
            if polled.is_pending() {
                self.give_back();
            }
            polled
        })
        .await
    }
}

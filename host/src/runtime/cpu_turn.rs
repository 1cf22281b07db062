//! Tenant CPU turns: how many threads one tenant's long-running guests may occupy
//! (`quota.cpu_threads`). An instance takes a turn from its tenant's semaphore at an epoch
//! tick (a guest still running at a tick is a long-running one), gives it back at the next
//! tick and queues again (FIFO), and gives it back when its call ends.
//!
//! A turn is for running wasm: a guest that leaves wasm to wait in the host (I/O, a
//! sleep, a sibling of the same tenant) must not keep it. Watching every host call for
//! that (a wasmtime call hook) cost 2-3% of a hello's instructions, on every call of every
//! guest, for the few that hold a turn. Instead the epoch ticker looks at the turns that
//! are held: a running guest takes its turn anew at every tick, so one that was not taken
//! anew for a whole tick belongs to a guest outside wasm, and the ticker gives it back. A
//! waiting guest keeps a turn at most two ticks; if it resumes wasm meanwhile it runs
//! without one until its next tick, where it queues like any other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedSemaphorePermit;

/// The turn one instance may hold.
#[derive(Default)]
pub struct CpuTurn {
    held: AtomicBool,
    /// Moves at every `hold`: the ticker tells a turn taken anew from a stalled one.
    taken: AtomicU64,
    /// Whether the ticker watches this turn (at most one entry in [`WATCHED`]).
    watched: AtomicBool,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl CpuTurn {
    pub fn hold(self: &Arc<Self>, permit: OwnedSemaphorePermit) {
        *self.permit.lock().expect("cpu turn lock") = Some(permit);
        let taken = self.taken.fetch_add(1, Ordering::AcqRel) + 1;
        self.held.store(true, Ordering::Release);
        // Under the registry's lock, so that the ticker never forgets a turn it is
        // dropping from its list while the turn is taken again.
        let mut watched = WATCHED.lock().expect("cpu turn registry lock");
        if !self.watched.swap(true, Ordering::AcqRel) {
            // Seen as "not yet looked at": the ticker's next look only notes it, so a
            // turn is given back after a whole tick without being taken anew.
            watched.push((Arc::downgrade(self), taken.wrapping_sub(1)));
        }
    }

    /// Gives the turn back, if held (the common case, none held, writes nothing).
    pub fn give_back(&self) {
        if self.held.load(Ordering::Relaxed) && self.held.swap(false, Ordering::AcqRel) {
            self.permit.lock().expect("cpu turn lock").take();
        }
    }

    /// Gives the turn back unless it was taken anew since `seen`.
    fn give_back_if_still(&self, seen: u64) {
        let mut permit = self.permit.lock().expect("cpu turn lock");
        if self.taken.load(Ordering::Acquire) == seen {
            self.held.store(false, Ordering::Release);
            permit.take();
        }
    }
}

/// Turns held, each with how often it had been taken when the ticker last looked.
static WATCHED: Mutex<Vec<(Weak<CpuTurn>, u64)>> = Mutex::new(Vec::new());

/// Called by the epoch ticker once per tick: gives back every turn that was not taken
/// anew since the last tick (its guest is waiting in the host), and stops watching turns
/// no longer held.
pub fn give_back_stalled() {
    let mut watched = WATCHED.lock().expect("cpu turn registry lock");
    watched.retain_mut(|(turn, seen)| {
        let Some(turn) = turn.upgrade() else {
            return false;
        };
        let taken = turn.taken.load(Ordering::Acquire);
        if turn.held.load(Ordering::Acquire) {
            if taken != *seen {
                *seen = taken;
                return true;
            }
            turn.give_back_if_still(taken);
        }
        turn.watched.store(false, Ordering::Release);
        false
    });
}

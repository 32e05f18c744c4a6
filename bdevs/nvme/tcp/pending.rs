//! A controller the configuration attaches while its node does not answer: a head restarting
//! while one of its mirror's leg nodes is down (or still starting) must start and serve the
//! volume from the other legs, not fail its whole configuration over one leg. SPDK fails the
//! start there; tidemark keeps the controller *connecting*: a thread of its own tries the
//! attach again every `reconnect_delay_sec` (the attach's own policy) until it succeeds, or
//! until `ctrlr_loss_timeout_sec` has passed since the start (then it is dropped, and said so).
//! Meanwhile `bdev_nvme_get_controllers` lists it (state `connecting`, with the last error),
//! `save_config` keeps its attach call, and `bdev_nvme_detach_controller` cancels it. Once it
//! answers it is attached like any other, and its bdevs appear; a mirror that names one of
//! them as a leg missing since its assembly takes it back by itself (`bdevs/mirror`).
//!
//! Only a call from the configuration gets this: a client's attach fails at once as in SPDK.

use super::reconnect::{next_step, next_wait, sleep_unless, Step};
use super::rpc::{connect_and_register, Controllers, Prepared};
use crate::bdev::BdevCtx;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Pending {
    pub(super) prep: Prepared,
    /// Held for each attempt and by a cancel: a detach never races an attempt that is
    /// registering the controller (it waits for it, then detaches what it finds).
    gate: Mutex<Gate>,
    attempts: AtomicU64,
    since: Instant,
}

#[derive(Default)]
struct Gate {
    cancelled: bool,
    last_error: String,
}

impl Pending {
    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the attempts (shutdown, detach).
    pub fn cancel(&self) {
        self.gate().cancelled = true;
    }

    /// SPDK's `bdev_nvme_get_controllers` shape, state `connecting` (tidemark's).
    pub fn json(&self) -> Value {
        let p = &self.prep;
        json!({
            "name": p.name,
            "ctrlrs": [{
                "state": "connecting",
                "trid": { "trtype": "TCP", "adrfam": p.adrfam, "traddr": p.traddr, "trsvcid": p.trsvcid, "subnqn": p.subnqn },
                "bdevs": [],
                "attempts": self.attempts.load(Ordering::Relaxed),
                "connecting_for_sec": self.since.elapsed().as_secs(),
                "last_error": self.gate().last_error,
            }],
        })
    }
}

/// Keeps `prep`'s controller connecting (see the module documentation); `first_error`: why the
/// configuration's own attempt failed.
pub(super) fn start(m: Arc<Controllers>, b: BdevCtx, prep: Prepared, first_error: String) {
    let p =
        Arc::new(Pending { prep, gate: Mutex::new(Gate { cancelled: false, last_error: first_error }), attempts: AtomicU64::new(1), since: Instant::now() });
    m.pending().push(p.clone());
    let name = p.prep.name.clone();
    let spawned = std::thread::Builder::new().name(format!("nvme-attach-{name}")).spawn(move || keep_connecting(m, b, p));
    if let Err(e) = spawned {
        log::error!("NVMe/TCP controller {name}: cannot start its connect thread: {e}");
    }
}

/// Cancels the controller `name` if it is still connecting; whether it was.
pub(super) fn cancel(m: &Controllers, name: &str) -> bool {
    let Some(p) = m.pending().iter().find(|p| p.prep.name == name).cloned() else { return false };
    // Under the gate: an attempt under way finishes first. If it attached the controller it
    // has left the list, and the caller detaches the controller itself.
    let mut g = p.gate();
    let mut list = m.pending();
    let Some(i) = list.iter().position(|x| Arc::ptr_eq(x, &p)) else { return false };
    list.remove(i);
    g.cancelled = true;
    log::info!("NVMe/TCP controller {name}: detached while still connecting");
    true
}

/// The attempts, on the recovery's policy (`reconnect::next_step`, `next_wait`): one every
/// `reconnect_delay_sec`, until `ctrlr_loss_timeout_sec` has passed since the start. There is
/// no I/O to fail meanwhile (no bdev exists yet), so `fast_io_fail_timeout_sec` plays no part.
fn keep_connecting(m: Arc<Controllers>, b: BdevCtx, p: Arc<Pending>) {
    let policy = p.prep.policy;
    let name = p.prep.name.clone();
    loop {
        // At least 100 ms between attempts, whatever the policy's remaining time says.
        let wait = next_wait(&policy, p.since.elapsed(), true).max(Duration::from_millis(100));
        if !sleep_unless(wait, || p.gate().cancelled) {
            return;
        }
        let mut g = p.gate();
        if g.cancelled {
            return;
        }
        let attempts = p.attempts.load(Ordering::Relaxed);
        if next_step(&policy, p.since.elapsed(), attempts as u32, true) == Step::Lose {
            log::error!("NVMe/TCP controller {name}: not attached within ctrlr_loss_timeout_sec ({}); dropped from the configuration", g.last_error);
        } else {
            let n = p.attempts.fetch_add(1, Ordering::Relaxed) + 1;
            match connect_and_register(&m, &b, &p.prep) {
                Ok(bdevs) => log::info!("NVMe/TCP controller {name}: attached after {:?} ({n} attempts), bdevs {bdevs}", p.since.elapsed()),
                Err(e) => {
                    log::debug!("NVMe/TCP controller {name}: attempt {n}: {}", e.message);
                    g.last_error = e.message;
                    continue;
                }
            }
        }
        // Still under the gate: a detach that finds the controller no longer connecting
        // detaches the attached one itself (see `cancel`).
        m.pending().retain(|x| !Arc::ptr_eq(x, &p));
        return;
    }
}

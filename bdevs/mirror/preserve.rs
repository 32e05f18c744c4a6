//! The mirror's preserve: `bdev_snapshot_create {method: "split", base_bdev: LEG}` splits the
//! leg off as a read-only image (DESIGN §1, method 2).
//!
//! The image bdev is registered at once; from the split's instant new writes skip the leg,
//! writes submitted before still reach it, and when the last of them completed the leg is
//! sealed and the image takes it over. Nothing waits for host I/O, and host I/O never waits for
//! the split: the split closes no region, and its metadata (the leg marked as the image, the
//! superblocks that record the split and later its seal) and the leg's flush are written by
//! tasks of their own while the control task keeps serving writes. The split is recorded on
//! the legs before its instant, so before this call returns: an acknowledged split survives a
//! crash (after a restart the leg is the image, a crash image of the split's instant).

use super::split::SplitImageBdev;
use super::{MirrorBdev, MirrorError};
use crate::bdev::{Bdev, LatencyHistogram};
use crate::preserve::{Preservable, PreserveError, PreserveRequest, PreserveStats, SealSignal, SnapshotInfo, SnapshotState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the RPC waits for the split to be recorded and its epoch to start.
const START_WAIT: Duration = Duration::from_secs(60);

/// A split image this mirror made (in this run of the daemon).
pub(crate) struct ImageRecord {
    pub name: String,
    pub epoch: u64,
    pub signal: Arc<SealSignal>,
    pub created_ms: u64,
    /// Filled in when the image seals.
    pub time_to_seal_ns: Arc<Mutex<Option<u64>>>,
}

/// Images and seal latencies of one mirror (control plane only).
#[derive(Default)]
pub(crate) struct Images {
    pub records: Mutex<Vec<ImageRecord>>,
    pub seal_latency: LatencyHistogram,
}

impl From<MirrorError> for PreserveError {
    fn from(e: MirrorError) -> Self {
        match e {
            MirrorError::NotFound(m) => PreserveError::NotFound(m),
            MirrorError::Busy(m) => PreserveError::Busy(m),
            MirrorError::Invalid(m) => PreserveError::Invalid(m),
            MirrorError::Io(m) => PreserveError::Io(m),
        }
    }
}

impl MirrorBdev {
    fn records(&self) -> std::sync::MutexGuard<'_, Vec<ImageRecord>> {
        self.shared().images.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Preservable for MirrorBdev {
    fn method(&self) -> &'static str {
        "split"
    }

    fn preserve(&self, t: &crate::bdev::BdevCtx, req: &PreserveRequest) -> Result<Arc<SealSignal>, PreserveError> {
        if req.freeze {
            return Err(PreserveError::Invalid("a split never stops the mirror's I/O; `freeze` is for CoW volumes".into()));
        }
        let status = self.status();
        let leg = match &req.base_bdev {
            Some(l) => l.clone(),
            // Without a choice: the last in-sync leg (the first stays the reads' source).
            None => status
                .slots
                .iter()
                .rev()
                .find(|s| s.state == "active")
                .map(|s| s.name.clone())
                .ok_or_else(|| PreserveError::Invalid("no in-sync leg".into()))?,
        };
        if !status.slots.iter().any(|s| s.name == leg) {
            return Err(PreserveError::NotFound(format!("{leg} is not a leg of mirror {}", self.name())));
        }
        t.bdevs.check_new_name(&req.snapshot_name)?;
        let me = t.bdev(self.name()).map_err(|e| PreserveError::NotFound(e.message))?.bdev().clone();
        let (leg2, image) = (leg.clone(), req.snapshot_name.clone());
        let home = self.home_core();
        let started = t
            .reactors
            .call_async(home, START_WAIT, move || async move {
                let m = me.as_any().downcast_ref::<MirrorBdev>().expect("looked up as this mirror");
                m.split_start(&leg2, &image).await
            })
            .map_err(|e| PreserveError::Io(e.to_string()))??;
        let signal = SealSignal::new();
        let img = Arc::new(SplitImageBdev::draining(&req.snapshot_name, started.leg.clone(), self.geometry(), self.name(), self.uuid(), signal.clone()));
        let registered = t.bdevs.register(img.clone() as Arc<dyn Bdev>);
        let time_to_seal = Arc::new(Mutex::new(None));
        self.records().push(ImageRecord {
            name: req.snapshot_name.clone(),
            epoch: started.epoch,
            signal: signal.clone(),
            created_ms: crate::preserve::unix_ms(),
            time_to_seal_ns: time_to_seal.clone(),
        });
        // Seal on the home core when the old epoch drained.
        let (sig, sh, t0, name) = (signal.clone(), self.shared().clone(), Instant::now(), req.snapshot_name.clone());
        t.reactors.send(home, move || {
            crate::reactor::spawn_detached(async move {
                let outcome = match started.sealed.await {
                    Ok(Ok(sealed)) => img.install(sealed),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(MirrorError::Busy("the mirror shut down before the seal".into())),
                };
                match outcome {
                    Ok(()) => {
                        let ns = t0.elapsed().as_nanos() as u64;
                        sh.images.seal_latency.record(ns);
                        *time_to_seal.lock().unwrap_or_else(|e| e.into_inner()) = Some(ns);
                    }
                    Err(e) => {
                        log::error!("mirror {}: split image {name} failed: {e}", sh.props.name());
                        sig.set(SnapshotState::Failed);
                    }
                }
            })
        });
        registered?;
        Ok(signal)
    }

    fn snapshots(&self) -> Vec<SnapshotInfo> {
        let status = self.status();
        let recs = self.records();
        let mut out: Vec<SnapshotInfo> = recs
            .iter()
            .filter(|r| r.signal.get() != SnapshotState::Sealed || status.slots.iter().any(|s| s.image == r.name && s.state == "split"))
            .map(|r| {
                let state = r.signal.get();
                SnapshotInfo {
                    name: r.name.clone(),
                    origin: self.name().to_string(),
                    method: "split",
                    epoch: r.epoch,
                    state,
                    old_epoch_in_flight: if state == SnapshotState::Draining { self.shared().gate.in_flight_upto(r.epoch) } else { 0 },
                    grains_copied: 0,
                    bytes_used: 0,
                    creation_time_ms: r.created_ms,
                    time_to_seal_ns: *r.time_to_seal_ns.lock().unwrap_or_else(|e| e.into_inner()),
                }
            })
            .collect();
        // Images split off before a restart: known from the slot table.
        for s in status.slots.iter().filter(|s| s.state == "split" && !s.image.is_empty()) {
            if !recs.iter().any(|r| r.name == s.image) {
                out.push(SnapshotInfo {
                    name: s.image.clone(),
                    origin: self.name().to_string(),
                    method: "split",
                    epoch: 0,
                    state: SnapshotState::Sealed,
                    old_epoch_in_flight: 0,
                    grains_copied: 0,
                    bytes_used: 0,
                    creation_time_ms: 0,
                    time_to_seal_ns: None,
                });
            }
        }
        out
    }

    fn seal_signal(&self, name: &str) -> Option<Arc<SealSignal>> {
        if let Some(r) = self.records().iter().find(|r| r.name == name) {
            return Some(r.signal.clone());
        }
        self.status().slots.iter().any(|s| s.state == "split" && s.image == name).then(|| {
            let s = SealSignal::new();
            s.set(SnapshotState::Sealed);
            s
        })
    }

    fn delete_snapshot(&self, t: &crate::bdev::BdevCtx, name: &str) -> Result<(), PreserveError> {
        self.records().retain(|r| r.name != name);
        let me = t.bdev(self.name()).map_err(|e| PreserveError::NotFound(e.message))?.bdev().clone();
        let image = name.to_string();
        t.reactors
            .call_async(self.home_core(), START_WAIT, move || async move {
                let m = me.as_any().downcast_ref::<MirrorBdev>().expect("looked up as this mirror");
                m.forget_image(&image).await
            })
            .map_err(|e| PreserveError::Io(e.to_string()))?;
        Ok(())
    }

    fn stats(&self) -> PreserveStats {
        let mut s = PreserveStats::default();
        self.shared().images.seal_latency.accumulate(&mut s.seal_latency.0, &mut s.seal_latency.1);
        s.count_states(self.snapshots());
        s
    }
}

//! A remote leg as one head sees it: a view of a shared device that speaks NVMe reservations
//! with the target's own reservation code (`nvmf::reservation::Reservations`, the state, the
//! per-host in-flight counters, and `nvmf::io::reservation_drain`) under the head's host
//! identifier. Its writes meet Reservation Conflict as the target's would, and a Preempt
//! completes only after the preempted host's writes at the device did, as on the target. Used
//! by the mirror's fencing tests and the stale-head simulation (`super::stale_head`).

use crate::bdev::{Bdev, BdevError, BdevProps, Io, IoChannel, IoFuture, IoType, NvmePassthru, PassthruFuture};
use crate::nvmf::reservation::{Access, Command, HostId, Reservations, ResvError, SC_RESERVATION_CONFLICT};
use crate::nvmf::spec::io_opc;
use serde_json::{json, Value};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use uuid::Uuid;

pub struct ResvLeg {
    props: BdevProps,
    disk: Arc<dyn Bdev>,
    resv: Arc<Reservations>,
    host: HostId,
    /// The head's node died: its view of the leg answers nothing more (what it already sent
    /// to the device still completes there).
    dead: Arc<AtomicBool>,
}

impl ResvLeg {
    /// Head `host`'s view, named `name`, of `disk` whose reservations are `resv` (one per
    /// disk, shared by every head's view of it).
    pub fn new(name: &str, disk: Arc<dyn Bdev>, resv: Arc<Reservations>, host: HostId) -> ResvLeg {
        let props = BdevProps::new(name, "NVMe disk", disk.block_size(), disk.num_blocks(), Uuid::nil());
        ResvLeg { props, disk, resv, host, dead: Arc::new(AtomicBool::new(false)) }
    }

    /// The switch that kills this head's view (for a crash of the head).
    pub fn dead_switch(&self) -> Arc<AtomicBool> {
        self.dead.clone()
    }

    /// The reservations of a fresh disk.
    pub fn new_state() -> Arc<Reservations> {
        // Without a ptpl file nothing touches the file system, so this cannot fail.
        Arc::new(Reservations::new(None, Uuid::nil()).expect("no ptpl file"))
    }
}

struct ResvLegChannel {
    inner: Rc<dyn IoChannel>,
    resv: Arc<Reservations>,
    host: HostId,
    in_flight: Arc<AtomicU32>,
    dead: Arc<AtomicBool>,
}

/// Counts a command in its host's in-flight counter while it lives (as the target does).
struct Counted(Arc<AtomicU32>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl IoChannel for ResvLegChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        if self.dead.load(SeqCst) {
            return IoFuture::ready(Err(BdevError::Offline));
        }
        let access = if matches!(io, Io::Read { .. }) { Access::Read } else { Access::Write };
        // Counted before the check, as `nvmf::io::start` does.
        self.in_flight.fetch_add(1, SeqCst);
        let counted = Counted(self.in_flight.clone());
        if !self.resv.allows(&self.host, access) {
            return IoFuture::ready(Err(BdevError::Nvme { sct: 0, sc: SC_RESERVATION_CONFLICT }));
        }
        let fut = self.inner.submit(io);
        IoFuture::boxed(async move {
            let r = fut.await;
            drop(counted);
            r
        })
    }
}

impl Bdev for ResvLeg {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn supports(&self, io: IoType) -> bool {
        self.disk.supports(io)
    }
    fn driver_specific(&self) -> Value {
        json!({ "nvme": [{ "host": { "nqn": format!("host-{}", self.host[0]), "id": Uuid::from_bytes(self.host).to_string() } }] })
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(ResvLegChannel {
            inner: self.disk.open_channel()?,
            resv: self.resv.clone(),
            host: self.host,
            in_flight: self.resv.in_flight_counter(&self.host),
            dead: self.dead.clone(),
        }))
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        None
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn nvme_io_passthru(&self, cmd: NvmePassthru) -> Option<PassthruFuture> {
        if self.dead.load(SeqCst) {
            return Some(Box::pin(async { Err(BdevError::Offline) }));
        }
        let nvme = |e: ResvError| {
            let s = e.status();
            BdevError::Nvme { sct: s.sct, sc: s.sc }
        };
        if cmd.opcode == io_opc::RESERVATION_REPORT {
            let r = self.resv.lock().report(cmd.cdw11 & 1 != 0, |_| Some(1)).map(|mut d| {
                d.resize(cmd.data_in, 0);
                d
            });
            return Some(Box::pin(async move { r.map_err(nvme) }));
        }
        let Some(c) = Command::parse(cmd.opcode, cmd.cdw10, &cmd.data_out) else {
            return Some(Box::pin(async move { Err(nvme(ResvError::InvalidField)) }));
        };
        let (resv, host) = (self.resv.clone(), self.host);
        Some(Box::pin(async move {
            let out = resv.execute(&host, c).map_err(nvme)?;
            if matches!(c, Command::Acquire { .. }) {
                let drain = resv.acquire_drain(out.preempted());
                crate::nvmf::io::reservation_drain(&drain, "sim", 1).await;
            }
            Ok(Vec::new())
        }))
    }
}

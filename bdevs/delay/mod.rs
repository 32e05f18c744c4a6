//! `delay`: a pass-through bdev that adds latency to each I/O (average, and one I/O in a
//! hundred at the p99 figure), to emulate slow or remote devices.

pub mod rpc;

use crate::bdev::{Bdev, BdevError, BdevProps, Channel, HoldGuard, Io, IoChannel, IoFuture, IoType, PassThru};
use crate::reactor;
use serde_json::{json, Value};
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use uuid::Uuid;

/// Latencies in microseconds: avg_read, p99_read, avg_write, p99_write.
#[derive(Default)]
pub struct Latencies(pub [AtomicU64; 4]);

pub const AVG_READ: usize = 0;
pub const P99_READ: usize = 1;
pub const AVG_WRITE: usize = 2;
pub const P99_WRITE: usize = 3;

pub struct DelayBdev {
    pt: PassThru,
    latencies: Arc<Latencies>,
}

impl DelayBdev {
    pub fn new(name: String, base: HoldGuard, lat: [u64; 4], uuid: Option<Uuid>) -> DelayBdev {
        let latencies = Arc::new(Latencies::default());
        for (a, v) in latencies.0.iter().zip(lat) {
            a.store(v, Ordering::Relaxed);
        }
        DelayBdev { pt: PassThru::new(base, name, "delay", uuid), latencies }
    }

    pub fn latencies(&self) -> &Latencies {
        &self.latencies
    }
}

struct DelayChannel {
    base: Channel,
    latencies: Arc<Latencies>,
    count: Cell<u64>,
}

impl DelayChannel {
    fn delay(&self, t: IoType) -> u64 {
        let n = self.count.get();
        self.count.set(n + 1);
        let tail = n % 100 == 99;
        let idx = match (t, tail) {
            (IoType::Read, false) => AVG_READ,
            (IoType::Read, true) => P99_READ,
            (_, false) => AVG_WRITE,
            (_, true) => P99_WRITE,
        };
        self.latencies.0[idx].load(Ordering::Relaxed)
    }
}

impl IoChannel for DelayChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        let t = io.io_type();
        let us = if t == IoType::Flush { 0 } else { self.delay(t) };
        IoFuture::boxed(async move {
            let start = reactor::now_ns();
            let r = self.base.forward(io).await;
            if us > 0 {
                reactor::sleep_until(start + us * 1000).await;
            }
            r
        })
    }
}

impl Bdev for DelayBdev {
    fn props(&self) -> &BdevProps {
        self.pt.props()
    }
    fn supports(&self, io: IoType) -> bool {
        self.pt.supports(io)
    }
    fn read_only(&self) -> bool {
        self.pt.read_only()
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(DelayChannel { base: self.pt.base_channel()?, latencies: self.latencies.clone(), count: Cell::new(0) }))
    }
    fn driver_specific(&self) -> Value {
        let l = |i: usize| self.latencies.0[i].load(Ordering::Relaxed);
        json!({ "delay": { "base_bdev_name": self.pt.base_name(), "avg_read_latency": l(AVG_READ), "p99_read_latency": l(P99_READ), "avg_write_latency": l(AVG_WRITE), "p99_write_latency": l(P99_WRITE) } })
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        let l = |i: usize| self.latencies.0[i].load(Ordering::Relaxed);
        Some((
            "bdev_delay_create",
            json!({ "name": self.name(), "base_bdev_name": self.pt.base_name(), "avg_read_latency": l(AVG_READ), "p99_read_latency": l(P99_READ), "avg_write_latency": l(AVG_WRITE), "p99_write_latency": l(P99_WRITE), "uuid": self.uuid().to_string() }),
        ))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::BdevRegistry;
    use crate::bdevs::malloc::MallocBdev;
    use crate::reactor::ManualCores;

    #[test]
    fn adds_the_configured_latency_on_simulated_time() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let m = reg.register(Arc::new(MallocBdev::new("m", 64, 512, None).unwrap())).unwrap();
        let d = reg.register(Arc::new(DelayBdev::new("d".into(), m.claim("d").unwrap(), [100, 1000, 200, 2000], None))).unwrap();
        assert!(m.claim("other").is_err(), "a claimed bdev cannot be claimed twice");
        let done = Rc::new(Cell::new(0u64));
        let dn = done.clone();
        cores.enter(0, || {
            reactor::spawn_detached(async move {
                let ch = Channel::get(&d).unwrap();
                let mut b = vec![0u8; 512];
                ch.read_buf(0, &mut b).await.unwrap();
                dn.set(reactor::now_ns());
            })
        });
        cores.run_until_idle();
        assert_eq!(done.get(), 0);
        cores.advance_to(cores.next_timer().unwrap());
        cores.run_until_idle();
        assert_eq!(done.get(), 100_000);
    }
}

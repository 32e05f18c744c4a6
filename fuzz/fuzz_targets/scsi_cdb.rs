//! The SCSI command set: an arbitrary CDB (first 16 bytes) and Data-Out (the rest), parsed
//! against a small RAM logical unit and, when it parses, executed on a simulated core. Every
//! command must end with data or sense, never a panic, and never touch blocks outside the
//! device.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use tidemark::bdev::BdevRegistry;
use tidemark::bdevs::malloc::MallocBdev;
use tidemark::reactor::{spawn_detached, ManualCores};
use tidemark::scsi::{cdb, Context, LogicalUnit, PortIdentity};

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let (c, out) = data.split_at(16);
    let cores = ManualCores::new(1);
    let reg = BdevRegistry::new(1);
    let bs = if c[15] & 1 == 0 { 512 } else { 4096 };
    let entry = reg.register(Arc::new(MallocBdev::new("f", 64, bs, None).expect("malloc"))).expect("register");
    let lu = Arc::new(LogicalUnit::new(entry, 1));
    let g = lu.geometry();
    let Ok(cmd) = cdb::parse(c, &g) else { return };
    let din_len = cmd.data_in_len(&g).min(1 << 20) as usize;
    let out = out.to_vec();
    let done = Rc::new(RefCell::new(false));
    let d = done.clone();
    cores.enter(0, || {
        spawn_detached(async move {
            let nx = lu.nexus().expect("nexus");
            let port = PortIdentity { target_name: "iqn.f".into(), portal_group_tag: 1 };
            let ctx = Context { port: &port, luns: &[0, 1], data_out_expected: out.len() as u64 };
            let mut din = vec![0u8; din_len];
            let r = lu.execute(&nx, &cmd, &out, &mut din, &ctx).await;
            if let Ok(done) = r {
                assert!(done.data_len <= din.len());
            }
            *d.borrow_mut() = true;
        })
    });
    cores.run_until_idle();
    assert!(*done.borrow(), "a command never finished");
});

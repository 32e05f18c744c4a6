//! `nvme` over TCP: an NVMe/TCP initiator (host) bdev, SPDK's `bdev_nvme` with `trtype: "tcp"`.
//! `bdev_nvme_attach_controller` connects the admin queue, reads Identify Controller and the
//! active namespaces, and connects one I/O queue pair per reactor core; each namespace becomes
//! a bdev `{name}n{nsid}`. The connect sequence runs on the RPC thread (blocking, with a
//! timeout: a dead address never stalls a reactor); from then on everything runs on the
//! reactors: each core polls its own I/O queue's non-blocking socket, and core 0 sends the
//! keep-alives on the admin queue.
//!
//! The PDU and command layouts are the target's (`crate::nvmf::pdu`, `crate::nvmf::spec`) and
//! the connect sequence is the test initiator's (`crate::nvmf::initiator`): neither imports
//! the bdev modules, so there is no cycle, and the wire format is written once.

pub mod admin;
pub mod options;
pub mod pending;
pub mod queue;
pub mod reconnect;
pub mod rpc;

use crate::bdev::{gather, scatter, Bdev, BdevCtx, BdevError, BdevProps, BdevRegistry, BlockCount, CopyOut, Io, IoBuf, IoChannel, IoFuture, IoResult, IoType};
use crate::nvmf::initiator::{IdentifyController, IdentifyNamespace};
use crate::nvmf::spec::{io_opc, Sqe};
use crate::reactor;
use queue::{IoQueue, QueueError, QueueObserver};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use uuid::Uuid;

/// Most blocks one Read/Write/Write Zeroes carries (NLB is a 16-bit field).
const MAX_NLB: u64 = 1 << 16;
/// Ranges of one Dataset Management command.
const MAX_DSM_RANGES: usize = 256;

/// A controller's state, as `bdev_nvme_get_controllers` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Enabled = 0,
    /// The connection is lost: I/O waits while the controller reconnects.
    Resetting = 1,
    /// Still reconnecting, past `fast_io_fail_timeout_sec`: I/O fails.
    Failed = 2,
    /// Past `ctrlr_loss_timeout_sec`: no more reconnects, I/O fails until it is detached.
    Lost = 3,
    Deleting = 4,
}

impl State {
    pub const ALL: [State; 5] = [State::Enabled, State::Resetting, State::Failed, State::Lost, State::Deleting];

    pub fn name(self) -> &'static str {
        match self {
            State::Enabled => "enabled",
            State::Resetting => "resetting",
            State::Failed => "failed",
            State::Lost => "lost",
            State::Deleting => "deleting",
        }
    }

    fn from_u8(v: u8) -> State {
        State::ALL.get(v as usize).copied().unwrap_or(State::Deleting)
    }
}

/// What every core's queues and the keep-alive task of one controller share.
pub struct Shared {
    pub name: String,
    /// Unique in the process: the key of the core-local queue maps.
    pub id: u64,
    state: AtomicU8,
    pub io_errors: AtomicU64,
    pub reconnects: AtomicU64,
    pub keep_alives: AtomicU64,
    /// Set by detach: the keep-alive task and the recovery end.
    stop: AtomicBool,
    /// A recovery thread runs (at most one at a time).
    recovering: AtomicBool,
    /// Bumped when the admin queue is replaced: an older keep-alive task ends.
    generation: AtomicU64,
    pub target: reconnect::Target,
    /// The namespaces with a bdev, in NSID order: nsid, the bdev's block count (set when the
    /// controller reports a resize, see [`admin`]) and block size. A bdev adds itself when
    /// made and takes itself out when destroyed.
    pub namespaces: Mutex<Vec<(u32, BlockCount, u32)>>,
    /// Held while namespace bdevs are made or deleted (a namespace notice, a detach, the
    /// deletion of a lost controller): one of them at a time.
    bdev_changes: Mutex<()>,
    /// The controller and the bdev registry, for the namespace bdevs made and deleted after
    /// the attach. Weak: the registry holds the bdevs, which hold the controller.
    ctrl: OnceLock<Weak<TcpController>>,
    registry: Weak<BdevRegistry>,
    /// Detached or deleted: the module forgets it.
    pub removed: AtomicBool,
    me: Weak<Shared>,
}

impl Shared {
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn namespaces(&self) -> Vec<(u32, BlockCount, u32)> {
        self.namespaces.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The names of the controller's namespace bdevs, in NSID order.
    pub fn bdev_names(&self) -> Vec<String> {
        self.namespaces().iter().map(|(nsid, _, _)| bdev_name(&self.name, *nsid)).collect()
    }

    fn changes(&self) -> MutexGuard<'_, ()> {
        self.bdev_changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What deleting and making bdevs needs, while the target runs.
    fn bdev_ctx(&self) -> Option<BdevCtx> {
        Some(BdevCtx { reactors: self.target.reactors.clone(), bdevs: self.registry.upgrade()? })
    }

    /// Deletes the controller's bdevs and closes its queues, unless something holds one of
    /// its bdevs (a mirror leg, an export): then nothing changes and the holder is named.
    /// Must not run on a reactor (it waits for every core).
    pub fn remove(&self) -> Result<(), crate::rpc::RpcError> {
        let _g = self.changes();
        let ctx = self.bdev_ctx().ok_or_else(|| crate::rpc::RpcError::internal("the target is stopping"))?;
        let names = self.bdev_names();
        for n in &names {
            if let Some(h) = ctx.bdevs.get(n).and_then(|e| e.holder_list().first().cloned()) {
                return Err(crate::rpc::RpcError::busy(format!("bdev {n} is in use by {}", h.by)));
            }
        }
        self.set_state(State::Deleting);
        for n in &names {
            if ctx.bdevs.get(n).is_some() {
                ctx.delete_bdev(n)?;
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        let id = self.id;
        ctx.reactors.call_all(move || remove_queue(id))?;
        self.removed.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Applies what a namespace notice found (see [`admin`]): makes a bdev for each namespace
    /// that became active, deletes the bdev of each one that went away unless something holds
    /// it (its I/O then fails with the controller's status until the holder lets go and the
    /// controller is detached). Runs on a thread of its own, never a reactor.
    pub fn apply_namespace_changes(&self, added: Vec<(u32, IdentifyNamespace)>, removed: Vec<u32>) {
        let _g = self.changes();
        let (Some(ctx), Some(ctrl)) = (self.bdev_ctx(), self.ctrl.get().and_then(Weak::upgrade)) else { return };
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        let known = |nsid: u32| self.namespaces().iter().any(|n| n.0 == nsid);
        for nsid in removed.into_iter().filter(|&n| known(n)) {
            let name = bdev_name(&self.name, nsid);
            match ctx.delete_bdev(&name) {
                Ok(()) => log::info!("NVMe/TCP controller {}: namespace {nsid} is gone; bdev {name} deleted", self.name),
                Err(e) => log::error!(
                    "NVMe/TCP controller {}: namespace {nsid} is gone but bdev {name} stays ({}); its I/O fails with the controller's status",
                    self.name,
                    e.message
                ),
            }
        }
        for (nsid, ns) in added.into_iter().filter(|(n, _)| !known(*n)) {
            let name = bdev_name(&self.name, nsid);
            let (blocks, bs) = (ns.nsze, ns.block_size);
            let made = ctx.bdevs.check_new_name(&name).map_err(crate::rpc::RpcError::from).and_then(|()| {
                let b = NvmeTcpBdev::new(name.clone(), ctrl.clone(), nsid, ns);
                ctx.bdevs.register(Arc::new(b)).map(|_| ()).map_err(Into::into)
            });
            match made {
                Ok(()) => log::info!("NVMe/TCP controller {}: namespace {nsid} appeared; bdev {name} made ({blocks} blocks of {bs})", self.name),
                Err(e) => log::error!("NVMe/TCP controller {}: namespace {nsid} appeared but no bdev was made: {}", self.name, e.message),
            }
        }
    }

    /// `bdev_nvme_reset_controller`: drops the connections and connects again at once (I/O in
    /// flight waits and is sent again on the new queues). A lost controller may be reset too:
    /// one more attempt. If the attempt fails, the usual recovery takes over (reconnects every
    /// `reconnect_delay_sec` until the timeouts) and the error is returned.
    pub fn reset(&self) -> Result<(), crate::rpc::RpcError> {
        use crate::rpc::RpcError;
        if self.stop.load(Ordering::Relaxed) {
            return Err(RpcError::no_device(format!("NVMe controller {} is being deleted", self.name)));
        }
        match self.state() {
            State::Enabled if !self.recovering.swap(true, Ordering::SeqCst) => {}
            State::Lost => {}
            s => return Err(RpcError::busy(format!("NVMe controller {} is {}: a reconnect is already in progress", self.name, s.name()))),
        }
        self.set_state(State::Resetting);
        // The old admin task ends; the queues go down (their observer sees the reset and
        // starts nothing).
        self.generation.fetch_add(1, Ordering::SeqCst);
        let id = self.id;
        self.target.reactors.call_all(move || disconnect_queue(id))?;
        let Some(me) = self.me.upgrade() else { return Err(RpcError::internal("controller gone")) };
        match reconnect::reconnect(&me, self.target.opts.timeout) {
            Ok(()) => {
                self.set_state(State::Enabled);
                self.recovering.store(false, Ordering::SeqCst);
                log::info!("NVMe/TCP controller {}: reset", self.name);
                Ok(())
            }
            Err(e) => {
                log::error!("NVMe/TCP controller {}: reset failed: {e}; reconnecting as after a connection loss", self.name);
                reconnect::spawn_recovery(me, std::time::Instant::now());
                Err(RpcError::new(crate::rpc::EIO, format!("NVMe controller {}: reset failed: {e}", self.name)))
            }
        }
    }

    fn set_state(&self, s: State) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
}

impl QueueObserver for Shared {
    fn io_error(&self) {
        self.io_errors.fetch_add(1, Ordering::Relaxed);
    }

    fn queue_failed(&self, why: &QueueError) {
        if self.stop.load(Ordering::Relaxed) || self.state() != State::Enabled || self.recovering.swap(true, Ordering::SeqCst) {
            return;
        }
        log::error!("NVMe/TCP controller {}: {why}; I/O waits while it reconnects", self.name);
        self.set_state(State::Resetting);
        let now = std::time::Instant::now();
        if let Some(me) = self.me.upgrade() {
            reconnect::spawn_recovery(me, now.checked_sub(why.unanswered_for()).unwrap_or(now));
        }
    }
}

/// One attached NVMe/TCP controller.
pub struct TcpController {
    pub shared: Arc<Shared>,
    /// The attach call's parameters as given (save_config writes them back).
    pub attach_params: Value,
    pub traddr: String,
    pub trsvcid: String,
    pub adrfam: String,
    pub subnqn: String,
    pub hostnqn: String,
    pub cntlid: u16,
    pub ident: IdentifyController,
    /// Blocks per command are limited to this many bytes (MDTS, and the queue's receive buffer).
    pub max_transfer: usize,
    /// `bdev_nvme_set_options {generate_uuids}` when it was attached.
    pub generate_uuids: bool,
}

impl TcpController {
    /// Links the controller to its shared state (namespace bdevs made later need it).
    pub fn link(self: &Arc<Self>) {
        let _ = self.shared.ctrl.set(Arc::downgrade(self));
    }
}

/// The bdev of namespace `nsid` of controller `ctrl` (SPDK's naming).
pub fn bdev_name(ctrl: &str, nsid: u32) -> String {
    format!("{ctrl}n{nsid}")
}

/// One namespace of a controller.
pub struct NvmeTcpBdev {
    props: BdevProps,
    ctrl: Arc<TcpController>,
    nsid: u32,
    ns: IdentifyNamespace,
}

impl NvmeTcpBdev {
    pub fn new(name: String, ctrl: Arc<TcpController>, nsid: u32, ns: IdentifyNamespace) -> NvmeTcpBdev {
        let uuid = match (ns.nguid != [0; 16], ctrl.generate_uuids) {
            (true, _) => Uuid::from_bytes(ns.nguid),
            (false, true) => options::generated_uuid(&ctrl.ident.sn, nsid),
            (false, false) => Uuid::new_v4(),
        };
        let count = BlockCount::new(ns.nsze);
        {
            let mut all = ctrl.shared.namespaces.lock().unwrap_or_else(|e| e.into_inner());
            let at = all.partition_point(|n| n.0 < nsid);
            all.insert(at, (nsid, count.clone(), ns.block_size));
        }
        NvmeTcpBdev { props: BdevProps::with_count(name, "NVMe disk", ns.block_size, count, uuid), ctrl, nsid, ns }
    }

    pub fn controller(&self) -> &Arc<TcpController> {
        &self.ctrl
    }
}

/// The I/O queues of this core, by controller id.
#[derive(Default)]
struct CoreQueues(RefCell<HashMap<u64, Rc<IoQueue>>>);

/// Installs a connected I/O queue on the current core.
pub fn install_queue(ctrl_id: u64, q: IoQueue) {
    let q = Rc::new(q);
    let id = reactor::with_core(|c| c.add_poller(q.clone()));
    q.poller_id.set(Some(id));
    reactor::with_core(|c| c.local::<CoreQueues>()).0.borrow_mut().insert(ctrl_id, q);
}

/// The current core's queue of controller `ctrl_id` drops its connection; its commands wait
/// for the new one (a reset).
fn disconnect_queue(ctrl_id: u64) {
    if let Some(q) = core_queue(ctrl_id) {
        q.disconnect(&QueueError::Io("reset requested".into()));
    }
}

/// Removes the current core's queue of controller `ctrl_id`: its commands end with `Offline`.
pub fn remove_queue(ctrl_id: u64) {
    let q = reactor::with_core(|c| c.local::<CoreQueues>()).0.borrow_mut().remove(&ctrl_id);
    if let Some(q) = q {
        if let Some(id) = q.poller_id.take() {
            reactor::with_core(|c| c.remove_poller(id));
        }
        q.fail_pending();
    }
}

/// The current core's queue of controller `ctrl_id` fails its commands (see `reconnect`).
fn fail_queue(ctrl_id: u64) {
    if let Some(q) = core_queue(ctrl_id) {
        q.fail_pending();
    }
}

/// Whether the current core's queue of controller `ctrl_id` waits for a reconnect.
fn queue_is_down(ctrl_id: u64) -> bool {
    core_queue(ctrl_id).is_some_and(|q| q.is_down() && !q.is_failing())
}

/// The current core's queue of controller `ctrl_id` continues on a new connection.
fn reset_queue(ctrl_id: u64, stream: crate::nvmf::initiator::HostStream, p: queue::QueueParams) {
    if let Some(q) = core_queue(ctrl_id) {
        q.reset(stream, p);
    }
}

fn core_queue(ctrl_id: u64) -> Option<Rc<IoQueue>> {
    reactor::with_core(|c| c.local::<CoreQueues>()).0.borrow().get(&ctrl_id).cloned()
}

/// The (first block, count) of each command of a transfer of `blocks` at `slba`, split at
/// `max` blocks per command.
pub fn parts(slba: u64, blocks: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    assert!(max > 0);
    (0..blocks.div_ceil(max)).map(move |i| (slba + i * max, (blocks - i * max).min(max)))
}

/// A Read/Write/Write Zeroes command.
pub fn rw_sqe(opcode: u8, nsid: u32, slba: u64, blocks: u64) -> Sqe {
    debug_assert!(blocks >= 1 && blocks <= MAX_NLB);
    let mut s = Sqe::new(opcode, 0, nsid);
    s.set_cdw(10, slba as u32);
    s.set_cdw(11, (slba >> 32) as u32);
    s.set_cdw(12, (blocks - 1) as u32 & 0xFFFF);
    s
}

/// Dataset Management (deallocate) ranges for `blocks` at `slba`: the commands' range lists
/// (16 bytes each, at most 256 per command).
pub fn dsm_ranges(mut slba: u64, mut blocks: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while blocks > 0 {
        let mut cmd = Vec::new();
        while blocks > 0 && cmd.len() < MAX_DSM_RANGES * 16 {
            let n = blocks.min(u32::MAX as u64);
            let mut r = [0u8; 16];
            r[4..8].copy_from_slice(&(n as u32).to_le_bytes());
            r[8..16].copy_from_slice(&slba.to_le_bytes());
            cmd.extend_from_slice(&r);
            slba += n;
            blocks -= n;
        }
        out.push(cmd);
    }
    out
}

struct TcpChannel {
    q: Rc<IoQueue>,
    nsid: u32,
    block_size: u64,
    max_blocks: u64,
}

impl TcpChannel {
    /// Runs one command, waiting for a free queue entry if needed; returns its result and its
    /// buffer.
    async fn run_cmd(&self, sqe: Sqe, buf: Option<IoBuf>, data_in: bool) -> (IoResult, Option<IoBuf>) {
        let mut buf = buf;
        loop {
            match self.q.push(sqe, &mut buf, data_in) {
                Some(Ok(f)) => return f.owned().await,
                Some(Err(e)) => return (Err(e), buf),
                // Down: the recovery takes milliseconds at best; do not spin the core.
                None if self.q.is_down() => reactor::sleep(std::time::Duration::from_millis(1)).await,
                None => reactor::yield_now().await,
            }
        }
    }

    /// One command, boxed only when the queue is full; a read's data goes to `out`.
    fn start<'a>(&'a self, sqe: Sqe, buf: Option<IoBuf>, out: Option<CopyOut<'a>>) -> IoFuture<'a> {
        let data_in = out.is_some();
        let mut buf = buf;
        match self.q.push(sqe, &mut buf, data_in) {
            Some(Ok(f)) => match out {
                Some(out) => IoFuture::SlotInto(f, out),
                None => IoFuture::Slot(f),
            },
            Some(Err(e)) => IoFuture::ready(Err(e)),
            None => IoFuture::boxed(async move {
                let (r, b) = self.run_cmd(sqe, buf, data_in).await;
                if let (Ok(()), Some(b), Some(mut out)) = (&r, b, out) {
                    out.copy_from(&b);
                }
                r
            }),
        }
    }
}

impl IoChannel for TcpChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        let bs = self.block_size;
        let nsid = self.nsid;
        match io {
            Io::Read { offset_blocks, num_blocks, bufs } => {
                if num_blocks <= self.max_blocks {
                    let buf = IoBuf::alloc((num_blocks * bs) as usize);
                    return self.start(rw_sqe(io_opc::READ, nsid, offset_blocks, num_blocks), Some(buf), Some(CopyOut::new(bufs, 0)));
                }
                IoFuture::boxed(async move {
                    let cmds = parts(offset_blocks, num_blocks, self.max_blocks).map(|(slba, n)| {
                        let buf = IoBuf::alloc((n * bs) as usize);
                        async move { (slba, self.run_cmd(rw_sqe(io_opc::READ, nsid, slba, n), Some(buf), true).await) }
                    });
                    for (slba, (r, buf)) in futures::future::join_all(cmds).await {
                        r?;
                        if let Some(b) = buf {
                            scatter(bufs, ((slba - offset_blocks) * bs) as usize, &b);
                        }
                    }
                    Ok(())
                })
            }
            Io::Write { offset_blocks, num_blocks, bufs } => {
                if num_blocks <= self.max_blocks {
                    let mut buf = IoBuf::alloc((num_blocks * bs) as usize);
                    gather(bufs, 0, &mut buf);
                    return self.start(rw_sqe(io_opc::WRITE, nsid, offset_blocks, num_blocks), Some(buf), None);
                }
                IoFuture::boxed(async move {
                    let cmds = parts(offset_blocks, num_blocks, self.max_blocks).map(|(slba, n)| {
                        let mut buf = IoBuf::alloc((n * bs) as usize);
                        gather(bufs, ((slba - offset_blocks) * bs) as usize, &mut buf);
                        async move { self.run_cmd(rw_sqe(io_opc::WRITE, nsid, slba, n), Some(buf), false).await.0 }
                    });
                    futures::future::try_join_all(cmds).await.map(|_| ())
                })
            }
            Io::Flush => self.start(Sqe::new(io_opc::FLUSH, 0, nsid), None, None),
            Io::WriteZeroes { offset_blocks, num_blocks } => IoFuture::boxed(async move {
                for (slba, n) in parts(offset_blocks, num_blocks, MAX_NLB) {
                    self.run_cmd(rw_sqe(io_opc::WRITE_ZEROES, nsid, slba, n), None, false).await.0?;
                }
                Ok(())
            }),
            Io::Unmap { offset_blocks, num_blocks } => IoFuture::boxed(async move {
                for ranges in dsm_ranges(offset_blocks, num_blocks) {
                    let nr = ranges.len() / 16;
                    let mut buf = IoBuf::alloc(ranges.len());
                    buf.copy_from_slice(&ranges);
                    let mut sqe = Sqe::new(io_opc::DSM, 0, nsid);
                    sqe.set_cdw(10, (nr - 1) as u32);
                    sqe.set_cdw(11, 1 << 2); // AD: deallocate
                    self.run_cmd(sqe, Some(buf), false).await.0?;
                }
                Ok(())
            }),
        }
    }
}

impl Bdev for NvmeTcpBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn supports(&self, io: IoType) -> bool {
        match io {
            IoType::Read | IoType::Write => true,
            // A controller without a volatile write cache has nothing to flush.
            IoType::Flush => self.ctrl.ident.vwc & 1 != 0,
            IoType::Unmap => self.ctrl.ident.oncs & (1 << 2) != 0,
            IoType::WriteZeroes => self.ctrl.ident.oncs & (1 << 3) != 0,
        }
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        let q = core_queue(self.ctrl.shared.id).ok_or(BdevError::Offline)?;
        let bs = self.ns.block_size as u64;
        let max_blocks = (self.ctrl.max_transfer as u64 / bs).clamp(1, MAX_NLB);
        Ok(Rc::new(TcpChannel { q, nsid: self.nsid, block_size: bs, max_blocks }))
    }
    fn driver_specific(&self) -> Value {
        let c = &self.ctrl;
        json!({ "nvme": [{
            "trid": { "trtype": "TCP", "adrfam": c.adrfam, "traddr": c.traddr, "trsvcid": c.trsvcid, "subnqn": c.subnqn },
            "ctrlr_data": {
                "cntlid": c.cntlid,
                "vendor_id": format!("{:#06x}", c.ident.vid),
                "model_number": c.ident.mn,
                "serial_number": c.ident.sn,
                "firmware_revision": c.ident.fr,
                "subnqn": c.ident.subnqn,
                "oacs": {},
            },
            "ns_data": { "id": self.nsid },
            // Who this node is to the target (the mirror's fencing checks that two heads are
            // not one host to the legs).
            "host": { "nqn": c.hostnqn, "id": uuid::Uuid::from_bytes(crate::nvmf::initiator::host_id_for(&c.hostnqn)).to_string() },
            "state": c.shared.state().name(),
            "max_transfer_bytes": c.max_transfer,
        }]})
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        // One attach call, written by the lowest namespace, recreates every namespace of the
        // controller.
        let first = self.ctrl.shared.namespaces().first().map(|n| n.0);
        (first == Some(self.nsid)).then(|| ("bdev_nvme_attach_controller", self.ctrl.attach_params.clone()))
    }
    fn destroy(&self) {
        self.ctrl.shared.namespaces.lock().unwrap_or_else(|e| e.into_inner()).retain(|n| n.0 != self.nsid);
    }
    fn nvme_io_passthru(&self, cmd: crate::bdev::NvmePassthru) -> Option<crate::bdev::PassthruFuture> {
        let (id, nsid, bs) = (self.ctrl.shared.id, self.nsid, self.ns.block_size as u64);
        Some(Box::pin(async move {
            // The current core's I/O queue: a reservation command is an I/O command, and it
            // waits for a reconnect like any other I/O of the controller.
            let q = core_queue(id).ok_or(BdevError::Offline)?;
            let mut sqe = Sqe::new(cmd.opcode, 0, nsid);
            sqe.set_cdw(10, cmd.cdw10);
            sqe.set_cdw(11, cmd.cdw11);
            let (buf, data_in) = if cmd.data_in > 0 {
                (Some(IoBuf::zeroed(cmd.data_in)), true)
            } else if !cmd.data_out.is_empty() {
                let mut b = IoBuf::alloc(cmd.data_out.len());
                b.copy_from_slice(&cmd.data_out);
                (Some(b), false)
            } else {
                (None, false)
            };
            let ch = TcpChannel { q, nsid, block_size: bs, max_blocks: 1 };
            let (r, b) = ch.run_cmd(sqe, buf, data_in).await;
            r?;
            Ok(if data_in { b.map(|b| b.to_vec()).unwrap_or_default() } else { Vec::new() })
        }))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_split_at_the_limit() {
        let v: Vec<_> = parts(10, 5, 2).collect();
        assert_eq!(v, vec![(10, 2), (12, 2), (14, 1)]);
        assert_eq!(parts(0, 4, 4).collect::<Vec<_>>(), vec![(0, 4)]);
        assert_eq!(parts(7, 1, 256).collect::<Vec<_>>(), vec![(7, 1)]);
        // Every block once, in order, none past the limit.
        let v: Vec<_> = parts(3, 1000, 64).collect();
        assert!(v.iter().all(|&(_, n)| n >= 1 && n <= 64));
        assert_eq!(v.iter().map(|p| p.1).sum::<u64>(), 1000);
        assert!(v.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
    }

    #[test]
    fn read_write_commands_carry_zero_based_counts() {
        let s = rw_sqe(io_opc::READ, 3, 0x1_0000_0002, 8);
        assert_eq!(s.opcode(), io_opc::READ);
        assert_eq!(s.nsid(), 3);
        assert_eq!(s.slba(), 0x1_0000_0002);
        assert_eq!(s.cdw(12), 7);
        assert_eq!(rw_sqe(io_opc::WRITE, 1, 0, MAX_NLB).cdw(12), 0xFFFF);
    }

    #[test]
    fn deallocate_ranges_cover_the_extent() {
        let r = dsm_ranges(100, 50);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].len(), 16);
        assert_eq!(u32::from_le_bytes(r[0][4..8].try_into().unwrap()), 50);
        assert_eq!(u64::from_le_bytes(r[0][8..16].try_into().unwrap()), 100);
        // More than 256 ranges of 2^32-1 blocks: a second command.
        let big = 257 * u32::MAX as u64;
        let r = dsm_ranges(0, big);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].len(), 256 * 16);
        assert_eq!(r[1].len(), 16);
    }
}

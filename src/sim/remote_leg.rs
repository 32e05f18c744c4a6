//! A remote leg as the mirror sees it through tidemark's NVMe/TCP initiator
//! (`bdevs/nvme/tcp`): a [`SimDevice`] on a node behind one connection that can drop, and a
//! node that can hang, with the initiator's recovery driven by simulated time and the real
//! policy functions (`reconnect::next_step`, `reconnect::next_wait`).
//!
//! The model, command by command (what `tcp/queue.rs` and `tcp/reconnect.rs` do):
//! * A command is *sent* on the current connection (its epoch) and travels to the node for a
//!   seeded wire delay. If the connection is gone when it arrives (the node died or the host
//!   closed it) it is lost on the wire: never applied. If the node hangs, it waits at the node.
//!   Otherwise the node hands it to its device, which applies it when it completes (the
//!   device's own seeded latency), whatever happened to the connection meanwhile.
//! * The answer reaches the host only if the connection it came on is still the host's and
//!   the node is up; otherwise the command stays in the host's table (held), as on the real
//!   queue, and is **sent again** once the host reconnects: a write may be applied twice, and
//!   an answer lost after the write landed does not undo it.
//! * A drop (the node dies, or the network breaks with a reset) is seen by the host at once;
//!   a hang (the node stops answering, the connection stays up) only through the command
//!   timeout (`timeout_us`, action reset): a command outstanding longer than `timeout_ns`
//!   makes the host drop the connection. The fast_io_fail clock of a timeout reset counts from
//!   when that oldest command was sent (backdated), as the real initiator's does.
//! * The recovery follows `reconnect::next_step`/`next_wait`: a reconnect attempt at once and
//!   then every reconnect_delay, succeeding once the node answers; after fast_io_fail the held
//!   and new commands end with `Offline` (`IoQueue::fail_pending`) until a reconnect.
//! * Quiesce (`ConnCfg::quiesce`): a reconnect is accepted only once no command of an older
//!   connection is still at the node (queued at a hung node, or at its device); commands
//!   queued at a hung node for a connection the host closed are dropped when it recovers.
//!   Without it (`SIM_CONN_LATE=1`), a command of a closed connection may still be applied
//!   after the host sent it again and after newer writes, and a leg silently differs from the
//!   others: `SIM_CONN_LATE=1 SEED=7843` (and 5509) of `mirror_simulation_seeds` show it. That
//!   is a hazard of the initiator and target (NVMe's answer is a quiesce time before commands
//!   are retried), not one the mirror can see. The suite models the quiescing target, which
//!   tidemark's target is: it answers a host's new association (its admin Connect) only once
//!   the commands that host admitted before it have left the bdevs (`Conn::earlier_commands`
//!   in `nvmf::connection`; tests/nvmf_reservations.rs
//!   `a_new_association_waits_for_the_hosts_earlier_commands_at_the_bdev`). Another target
//!   as a leg (SPDK's `nvmf_tgt`) may not be.
//!
//! Not modelled: a node that loses its volatile cache when it dies (its device keeps what it
//! applied), and controller loss (`ctrlr_loss_timeout_sec`: the sim reconnects forever).

use super::device::SimDevice;
use crate::bdev::{Bdev, BdevError, BdevProps, Io, IoChannel, IoFuture, IoResult, IoType};
use crate::bdevs::nvme::tcp::reconnect::{next_step, next_wait, Policy, Step};
use crate::reactor;
use futures::channel::oneshot;
use futures::future::{select, Either};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use uuid::Uuid;

/// The initiator's settings for one leg (simulated time: milliseconds stand for the real
/// seconds, so that an outage costs few steps).
#[derive(Debug, Clone, Copy)]
pub struct ConnCfg {
    pub policy: Policy,
    /// A command outstanding this long resets the connection (`timeout_us`).
    pub timeout_ns: u64,
    /// How often the host looks for a command past its timeout.
    pub timeout_check_ns: u64,
    /// The most a command spends on the wire, each way.
    pub wire_ns: u64,
    /// A new connection waits for the node to be done with the old one's commands.
    pub quiesce: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Up,
    /// Dead or unreachable: the connection broke (the host sees it at once).
    Down,
    /// Alive but not answering: the connection stays up.
    Hung,
}

/// Counts of what the connection went through.
#[derive(Debug, Default, Clone)]
pub struct ConnStats {
    pub drops: u64,
    pub hangs: u64,
    /// Connections the host reset because a command timed out.
    pub timeouts: u64,
    pub reconnects: u64,
    /// Recoveries that reached fast_io_fail (held commands failed with Offline).
    pub fast_fails: u64,
    /// Reconnects before fast_io_fail with commands held (sent again, no error seen).
    pub quick_reconnects: u64,
    pub resent: u64,
    pub lost_on_wire: u64,
    /// Commands of a closed connection the node applied after the host sent them again
    /// (only without quiesce).
    pub late_executed: u64,
    /// Commands ended with an error (`Offline` after fast_io_fail).
    pub errors: u64,
    /// Longest a command waited in the host's table (submit to end), while a recovery ran.
    pub max_held_ns: u64,
}

struct State {
    node: Node,
    /// The host's connection; bumped at every disconnect.
    epoch: u64,
    /// The host has a connection (commands go out).
    up: bool,
    /// fast_io_fail passed: commands end with Offline until a reconnect.
    failing: bool,
    recovering: bool,
    next_id: u64,
    /// Commands in the host's table: id -> (epoch, sent at).
    outstanding: BTreeMap<u64, (u64, u64)>,
    /// Commands at the node (queued at it or at its device), per connection epoch.
    at_node: BTreeMap<u64, u64>,
    /// Tasks waiting for any change of this state.
    waiters: Vec<oneshot::Sender<()>>,
    rng: ChaCha8Rng,
    stats: ConnStats,
}

/// One leg's connection, shared by its channels (one per core) and the harness.
pub struct Conn {
    pub cfg: ConnCfg,
    st: Mutex<State>,
}

impl State {
    fn notify(&mut self) {
        for w in self.waiters.drain(..) {
            let _ = w.send(());
        }
    }

    fn changed(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waiters.push(tx);
        rx
    }
}

impl Conn {
    pub fn new(cfg: ConnCfg, seed: u64) -> Arc<Conn> {
        Arc::new(Conn {
            cfg,
            st: Mutex::new(State {
                node: Node::Up,
                epoch: 0,
                up: true,
                failing: false,
                recovering: false,
                next_id: 0,
                outstanding: BTreeMap::new(),
                at_node: BTreeMap::new(),
                waiters: Vec::new(),
                rng: ChaCha8Rng::seed_from_u64(seed),
                stats: ConnStats::default(),
            }),
        })
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> ConnStats {
        self.st().stats.clone()
    }

    pub fn node(&self) -> Node {
        self.st().node
    }

    /// Anything short of a node that answers and a host connected and not failing.
    pub fn disturbed(&self) -> bool {
        let s = self.st();
        s.node != Node::Up || !s.up || s.failing || s.recovering
    }

    /// The node dies or hangs (call on the core the recovery should run on).
    pub fn start_outage(self: &Arc<Self>, kind: Node) {
        assert_ne!(kind, Node::Up);
        let mut s = self.st();
        s.node = kind;
        if kind == Node::Down {
            s.stats.drops += 1;
            drop(s);
            self.disconnect(reactor::now_ns(), false);
        } else {
            s.stats.hangs += 1;
            s.notify();
        }
    }

    /// The node answers again.
    pub fn end_outage(&self) {
        let mut s = self.st();
        s.node = Node::Up;
        s.notify();
    }

    /// The host loses its connection (`IoQueue::disconnect`) and starts a recovery whose
    /// clock started at `since`.
    fn disconnect(self: &Arc<Self>, since: u64, timeout: bool) {
        let mut s = self.st();
        if !s.up {
            return;
        }
        s.up = false;
        s.epoch += 1;
        if timeout {
            s.stats.timeouts += 1;
        }
        s.recovering = true;
        s.notify();
        drop(s);
        reactor::spawn_detached(self.clone().recover(since));
    }

    /// `reconnect::recover` on simulated time, with the real policy's decisions.
    async fn recover(self: Arc<Self>, t0: u64) {
        let p = &self.cfg.policy;
        let (mut attempts, mut io_failed) = (0u32, false);
        let elapsed = || Duration::from_nanos(reactor::now_ns().saturating_sub(t0));
        loop {
            match next_step(p, elapsed(), attempts, io_failed) {
                Step::Lose => unreachable!("the simulation reconnects forever (ctrlr_loss None)"),
                Step::FailIo => {
                    io_failed = true;
                    let mut s = self.st();
                    s.failing = true;
                    s.stats.fast_fails += 1;
                    s.notify();
                    continue;
                }
                Step::Reconnect => {}
            }
            attempts += 1;
            {
                let mut s = self.st();
                let old_busy = s.at_node.iter().any(|(&e, &n)| e < s.epoch && n > 0);
                if s.node == Node::Up && !(self.cfg.quiesce && old_busy) {
                    s.up = true;
                    s.failing = false;
                    s.recovering = false;
                    s.stats.reconnects += 1;
                    if !io_failed && !s.outstanding.is_empty() {
                        s.stats.quick_reconnects += 1;
                    }
                    s.notify();
                    return;
                }
            }
            // The node does not answer yet (or, quiesce, is still busy with the old
            // connection's commands): the next attempt after the policy's wait.
            reactor::sleep(next_wait(p, elapsed(), io_failed)).await;
        }
    }

    /// The host's command timeout check (`timeout_us`, action reset), as a task for the
    /// harness to run on one core: while commands are outstanding on a connection, the one
    /// sent first is checked every `timeout_check_ns`; past `timeout_ns` the connection is
    /// reset and the recovery's clock starts when that command was sent. Runs for the life of
    /// its cores (with nothing outstanding it waits without a timer, holding up nothing).
    pub async fn watchdog(self: Arc<Self>) {
        loop {
            let oldest = {
                let mut s = self.st();
                let oldest = if s.up { s.outstanding.values().filter(|(e, _)| *e == s.epoch).map(|(_, t)| *t).min() } else { None };
                match oldest {
                    Some(t) => Ok(t),
                    None => Err(s.changed()),
                }
            };
            match oldest {
                Ok(t) if reactor::now_ns() >= t + self.cfg.timeout_ns => self.disconnect(t, true),
                Ok(_) => reactor::sleep(Duration::from_nanos(self.cfg.timeout_check_ns)).await,
                Err(rx) => {
                    let _ = rx.await;
                }
            }
        }
    }

    /// The node's side of one sent command: `exec` runs it on the device.
    async fn at_node<T>(self: Arc<Self>, epoch: u64, wire_ns: u64, exec: impl std::future::Future<Output = T>) -> Option<T> {
        reactor::sleep(Duration::from_nanos(wire_ns)).await;
        let mut queued = false;
        loop {
            let rx = {
                let mut s = self.st();
                let closed = s.epoch != epoch;
                match s.node {
                    Node::Down => {
                        s.stats.lost_on_wire += 1;
                        return None;
                    }
                    Node::Up if closed && (!queued || self.cfg.quiesce) => {
                        // Lost with its connection; or, waiting at a hung node, dropped with the
                        // connection the host closed meanwhile (quiesce).
                        s.stats.lost_on_wire += 1;
                        return None;
                    }
                    Node::Up => {
                        if closed {
                            s.stats.late_executed += 1;
                        }
                        *s.at_node.entry(epoch).or_default() += 1;
                        break;
                    }
                    Node::Hung => {
                        queued = true;
                        s.changed()
                    }
                }
            };
            let _ = rx.await;
        }
        let r = exec.await;
        let mut s = self.st();
        if let Some(n) = s.at_node.get_mut(&epoch) {
            *n -= 1;
        }
        Some(r)
    }
}

pub struct RemoteLeg {
    props: BdevProps,
    disk: Arc<SimDevice>,
    pub conn: Arc<Conn>,
}

impl RemoteLeg {
    pub fn new(name: &str, disk: Arc<SimDevice>, conn: Arc<Conn>) -> RemoteLeg {
        let props = BdevProps::new(name, "NVMe disk", disk.block_size(), disk.num_blocks(), Uuid::nil());
        RemoteLeg { props, disk, conn }
    }
}

struct RemoteChannel {
    disk: Rc<dyn IoChannel>,
    conn: Arc<Conn>,
    block_size: usize,
}

/// A command as the host's table keeps it (what is sent again).
#[derive(Clone)]
enum Cmd {
    Read { offset: u64, blocks: u64 },
    Write { offset: u64, blocks: u64, data: Rc<Vec<u8>> },
    Flush,
    Unmap { offset: u64, blocks: u64 },
    Zeroes { offset: u64, blocks: u64 },
}

/// Runs `cmd` on the node's device channel; a read returns its data.
async fn exec(disk: Rc<dyn IoChannel>, cmd: Cmd, bs: usize) -> (IoResult, Vec<u8>) {
    match cmd {
        Cmd::Read { offset, blocks } => {
            let mut buf = vec![0u8; blocks as usize * bs];
            let r = disk.submit(Io::Read { offset_blocks: offset, num_blocks: blocks, bufs: &mut [IoSliceMut::new(&mut buf)] }).await;
            (r, buf)
        }
        Cmd::Write { offset, blocks, data } => {
            (disk.submit(Io::Write { offset_blocks: offset, num_blocks: blocks, bufs: &[IoSlice::new(&data)] }).await, Vec::new())
        }
        Cmd::Flush => (disk.submit(Io::Flush).await, Vec::new()),
        Cmd::Unmap { offset, blocks } => (disk.submit(Io::Unmap { offset_blocks: offset, num_blocks: blocks }).await, Vec::new()),
        Cmd::Zeroes { offset, blocks } => (disk.submit(Io::WriteZeroes { offset_blocks: offset, num_blocks: blocks }).await, Vec::new()),
    }
}

/// A command in the host's table.
struct Held {
    id: u64,
    cmd: Cmd,
    submitted: u64,
    sends: u64,
}

impl RemoteChannel {
    /// Sends `h` if the host has a connection (as `IoQueue::push` does, at once: a command
    /// submitted is on its way before the caller polls it): its connection's epoch and where
    /// its answer comes. Err(Offline) after fast_io_fail; Ok(None) while held.
    fn send(&self, h: &mut Held) -> Result<Option<(u64, oneshot::Receiver<(IoResult, Vec<u8>)>)>, BdevError> {
        let conn = &self.conn;
        let (epoch, wire) = {
            let mut s = conn.st();
            if s.failing {
                return Err(BdevError::Offline);
            }
            if !s.up {
                return Ok(None);
            }
            let e = s.epoch;
            // The watchdog waits for a first outstanding command.
            let wake = !s.outstanding.values().any(|(oe, _)| *oe == e);
            s.outstanding.insert(h.id, (e, reactor::now_ns()));
            if h.sends > 0 {
                s.stats.resent += 1;
            }
            if wake {
                s.notify();
            }
            (e, s.rng.random_range(0..=conn.cfg.wire_ns))
        };
        h.sends += 1;
        let (tx, answer) = oneshot::channel();
        let (c2, disk, cmd2, bs) = (conn.clone(), self.disk.clone(), h.cmd.clone(), self.block_size);
        reactor::spawn_detached(async move {
            let Some(r) = c2.clone().at_node(epoch, wire, exec(disk, cmd2, bs)).await else { return };
            // The answer reaches the host only on the connection it came on; a hung node
            // sends it when (if) it recovers.
            loop {
                let rx = {
                    let mut s = c2.st();
                    match s.node {
                        _ if s.epoch != epoch => return,
                        Node::Up => break,
                        Node::Down => return,
                        Node::Hung => s.changed(),
                    }
                };
                let _ = rx.await;
            }
            let _ = tx.send(r);
        });
        Ok(Some((epoch, answer)))
    }

    /// One command through the host's table: held while there is no connection, sent (again)
    /// on every new one, ended by its answer or by fast_io_fail.
    async fn run(&self, mut h: Held, first: Result<Option<(u64, oneshot::Receiver<(IoResult, Vec<u8>)>)>, BdevError>) -> (IoResult, Vec<u8>) {
        let conn = &self.conn;
        let mut sent = first;
        let out = 'cmd: loop {
            let (epoch, mut answer) = match sent {
                Err(e) => break 'cmd (Err(e), Vec::new()),
                Ok(Some(x)) => x,
                Ok(None) => {
                    // Held until a connection (or failed).
                    let rx = conn.st().changed();
                    let _ = rx.await;
                    sent = self.send(&mut h);
                    continue;
                }
            };
            loop {
                let changed = conn.st().changed();
                match select(&mut answer, changed).await {
                    Either::Left((Ok(r), _)) => break 'cmd r,
                    // No answer will come on this connection: wait for what the host does.
                    Either::Left((Err(_), _)) => {
                        let rx = {
                            let mut s = conn.st();
                            if s.failing || s.epoch != epoch {
                                None
                            } else {
                                Some(s.changed())
                            }
                        };
                        if let Some(rx) = rx {
                            let _ = rx.await;
                            continue;
                        }
                    }
                    Either::Right(_) => {}
                }
                let s = conn.st();
                if s.failing {
                    break 'cmd (Err(BdevError::Offline), Vec::new());
                }
                if s.epoch != epoch {
                    // Still in the table: sent again once the host reconnects.
                    drop(s);
                    sent = self.send(&mut h);
                    continue 'cmd;
                }
            }
        };
        let mut s = conn.st();
        s.outstanding.remove(&h.id);
        if out.0.is_err() {
            s.stats.errors += 1;
        }
        if h.sends > 1 || out.0.is_err() {
            let held = reactor::now_ns() - h.submitted;
            s.stats.max_held_ns = s.stats.max_held_ns.max(held);
        }
        out
    }
}

impl IoChannel for RemoteChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        let cmd = match &io {
            Io::Read { offset_blocks, num_blocks, .. } => Cmd::Read { offset: *offset_blocks, blocks: *num_blocks },
            Io::Write { offset_blocks, num_blocks, bufs } => {
                let mut data = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
                for b in bufs.iter() {
                    data.extend_from_slice(b);
                }
                Cmd::Write { offset: *offset_blocks, blocks: *num_blocks, data: Rc::new(data) }
            }
            Io::Flush => Cmd::Flush,
            Io::Unmap { offset_blocks, num_blocks } => Cmd::Unmap { offset: *offset_blocks, blocks: *num_blocks },
            Io::WriteZeroes { offset_blocks, num_blocks } => Cmd::Zeroes { offset: *offset_blocks, blocks: *num_blocks },
        };
        let id = {
            let mut s = self.conn.st();
            s.next_id += 1;
            s.next_id
        };
        let mut h = Held { id, cmd, submitted: reactor::now_ns(), sends: 0 };
        let first = self.send(&mut h);
        IoFuture::boxed(async move {
            let (r, data) = self.run(h, first).await;
            if let (Ok(()), Io::Read { bufs, .. }) = (&r, io) {
                let mut pos = 0;
                for b in bufs.iter_mut() {
                    let n = b.len();
                    b.copy_from_slice(&data[pos..pos + n]);
                    pos += n;
                }
            }
            r
        })
    }
}

impl Bdev for RemoteLeg {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn supports(&self, io: IoType) -> bool {
        self.disk.supports(io)
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(RemoteChannel { disk: self.disk.open_channel()?, conn: self.conn.clone(), block_size: self.disk.block_size() as usize }))
    }
    fn config_call(&self) -> Option<(&'static str, serde_json::Value)> {
        None
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

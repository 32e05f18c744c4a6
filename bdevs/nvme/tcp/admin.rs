//! The admin queue of an attached controller, owned by a task on core 0 from attach (and from
//! each reconnect) until detach: it sends the Keep Alives and keeps one Asynchronous Event
//! Request outstanding (SPDK's `bdev_nvme` AER handling).
//!
//! At start the task enables Namespace Attribute Notices (Set Features, Asynchronous Event
//! Configuration), reads every namespace's size again (a volume grown while the connection was
//! down) and sends the AER. A Namespace Attribute Changed notice makes it read the Changed
//! Namespace List (which unmasks the event on the controller), identify each listed namespace
//! again and set the bdev's size: [`BlockCount::set`] tells the bdev registry, so this node's
//! own exports of the bdev tell their hosts in turn (NVMe: the same event; iSCSI: CAPACITY
//! DATA HAS CHANGED). The active namespace list is read too: a namespace that appeared gets
//! its bdev `{name}n{nsid}`, one that went away loses it (unless something holds it: then its
//! I/O fails with the status the controller gives), as SPDK's `bdev_nvme` does. The AER is
//! sent again after each event.
//!
//! Every command runs without blocking the core: submit, then poll every few milliseconds.

use super::queue::{QueueError, QueueObserver};
use super::Shared;
use crate::bdev::BlockCount;
use crate::nvmf::initiator::{Completion, Controller, Error as HostError, IdentifyNamespace, Payload};
use crate::nvmf::spec::{self, admin_opc, feat, Cqe, Sqe};
use crate::reactor;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Asynchronous Event Configuration: Namespace Attribute Notices.
const AEC_NS_ATTR: u32 = 1 << 8;
/// How often the task looks for an event between Keep Alives.
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for one admin command.
const CMD_TIMEOUT: Duration = Duration::from_secs(5);
/// Entries of the Changed Namespace List; its first entry FFFFFFFFh means "more than that".
const CHANGED_NS_LEN: usize = 4096;

/// What an Asynchronous Event Request completion says (NVMe Base, figure "Asynchronous Event
/// Request – Completion Queue Entry Dword 0").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    pub kind: u8,
    pub info: u8,
    pub log_page: u8,
}

impl AsyncEvent {
    pub fn from_dw0(dw0: u32) -> AsyncEvent {
        AsyncEvent { kind: (dw0 & 0x7) as u8, info: (dw0 >> 8) as u8, log_page: (dw0 >> 16) as u8 }
    }

    /// A Notice (type 2) of Namespace Attribute Changed (information 0).
    pub fn is_ns_changed(&self) -> bool {
        self.kind == 2 && self.info == 0
    }
}

/// The namespaces a Changed Namespace List names; `None`: more than it holds (read them all).
pub fn changed_namespaces(log: &[u8]) -> Option<Vec<u32>> {
    let ids: Vec<u32> = log.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).take_while(|&n| n != 0).collect();
    if ids.first() == Some(&u32::MAX) {
        None
    } else {
        Some(ids)
    }
}

struct Admin {
    c: Controller,
    /// The outstanding AER's command id.
    aer: Option<u16>,
    /// The controller refused or ended an AER with an error: no more are sent.
    aer_off: bool,
    /// AER completions not handled yet.
    events: Vec<Cqe>,
    /// How long a command other than Keep Alive may take (`timeout_admin_us`, else 5 s).
    cmd_timeout: Duration,
    /// Set when a command timed out: how long it went unanswered.
    timed_out: Option<Duration>,
}

impl Admin {
    fn other(&mut self, c: Completion) {
        if self.aer == Some(c.cid) {
            self.aer = None;
            self.events.push(c.cqe);
        }
    }

    /// Reads what arrived, never waits.
    fn poll(&mut self) -> Result<(), HostError> {
        let mut out = Vec::new();
        self.c.admin.poll(&mut out)?;
        for c in out {
            self.other(c);
        }
        Ok(())
    }

    /// Runs one admin command without blocking the core; returns its completion and data.
    async fn exec(&mut self, sqe: Sqe, payload: Payload<'_>, timeout: Duration) -> Result<(Cqe, Vec<u8>), HostError> {
        let cid = self.c.admin.submit(sqe, payload)?;
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            self.c.admin.poll(&mut out)?;
            let mut mine = None;
            for c in out.drain(..) {
                if c.cid == cid {
                    mine = Some(c.cqe);
                } else {
                    self.other(c);
                }
            }
            if let Some(cqe) = mine {
                return Ok((cqe, self.c.admin.data(cid).to_vec()));
            }
            if Instant::now() >= deadline {
                self.timed_out = Some(timeout);
                return Err(HostError::Timeout);
            }
            reactor::sleep(Duration::from_millis(1)).await;
        }
    }

    fn arm(&mut self) -> Result<(), HostError> {
        if self.aer.is_none() && !self.aer_off {
            self.aer = Some(self.c.admin.submit(Sqe::new(admin_opc::ASYNC_EVENT_REQUEST, 0, 0), Payload::None)?);
        }
        Ok(())
    }

    /// Enables the namespace notices, refreshes every namespace's size, sends the AER.
    async fn start(&mut self, shared: &Arc<Shared>) -> Result<(), HostError> {
        let mut sqe = Sqe::new(admin_opc::SET_FEATURES, 0, 0);
        sqe.set_cdw(10, feat::ASYNC_EVENT_CONFIG as u32);
        sqe.set_cdw(11, AEC_NS_ATTR);
        let (cqe, _) = self.exec(sqe, Payload::None, self.cmd_timeout).await?;
        if !cqe.status().is_success() {
            log::warn!("NVMe/TCP controller {}: the controller refuses namespace notices ({}); a remote resize is not seen", shared.name, cqe.status());
            self.aer_off = true;
        }
        self.refresh(shared, None).await?;
        self.arm()
    }

    /// Handles one AER completion and sends the AER again.
    async fn event(&mut self, shared: &Arc<Shared>, cqe: Cqe) -> Result<(), HostError> {
        if !cqe.status().is_success() {
            log::warn!("NVMe/TCP controller {}: Asynchronous Event Request ended with {}; no more events are asked", shared.name, cqe.status());
            self.aer_off = true;
            return Ok(());
        }
        let ev = AsyncEvent::from_dw0(cqe.dw0);
        if ev.is_ns_changed() {
            // Reading the log (without Retain Asynchronous Event) unmasks the event.
            let mut sqe = Sqe::new(admin_opc::GET_LOG_PAGE, 0, u32::MAX);
            let numd = (CHANGED_NS_LEN / 4) as u32 - 1;
            sqe.set_cdw(10, spec::log::CHANGED_NS as u32 | (numd & 0xFFFF) << 16);
            sqe.set_cdw(11, numd >> 16);
            let (cqe, data) = self.exec(sqe, Payload::In(CHANGED_NS_LEN), self.cmd_timeout).await?;
            let ids = if cqe.status().is_success() { changed_namespaces(&data) } else { None };
            log::info!(
                "NVMe/TCP controller {}: namespace attributes changed: {}",
                shared.name,
                ids.as_ref().map_or("all namespaces".to_string(), |v| format!("namespaces {v:?}"))
            );
            self.refresh(shared, ids.as_deref()).await?;
        } else {
            log::info!("NVMe/TCP controller {}: asynchronous event {ev:?} ignored", shared.name);
        }
        self.arm()
    }

    /// Reads the active namespace list and identifies the namespaces `only` names (all with
    /// `None`): sets the bdevs' sizes here, and hands the namespaces that appeared or went
    /// away to a thread that makes or deletes their bdevs (that waits for every core, which a
    /// reactor must not).
    async fn refresh(&mut self, shared: &Arc<Shared>, only: Option<&[u32]>) -> Result<(), HostError> {
        let mut sqe = Sqe::new(admin_opc::IDENTIFY, 0, 0);
        sqe.set_cdw(10, spec::cns::ACTIVE_NS_LIST as u32);
        let (cqe, data) = self.exec(sqe, Payload::In(spec::IDENTIFY_LEN), self.cmd_timeout).await?;
        // None: the controller would not say; then only namespaces it fails to identify count
        // as gone, and none as new.
        let active = cqe.status().is_success().then(|| changed_namespaces(&data).unwrap_or_default());
        let known: Vec<(u32, BlockCount, u32)> = shared.namespaces();
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for (nsid, count, bs) in known.iter().filter(|(nsid, _, _)| only.is_none_or(|o| o.contains(nsid))) {
            let (nsid, bs) = (*nsid, *bs);
            let listed = active.as_ref().is_none_or(|a| a.contains(&nsid));
            let ns = if listed { self.identify(nsid).await? } else { None };
            match ns {
                Some(ns) if ns.block_size == bs => {
                    let old = count.get();
                    if ns.nsze != old {
                        log::info!("NVMe/TCP controller {}: namespace {nsid} resized from {old} to {} blocks", shared.name, ns.nsze);
                        count.set(ns.nsze);
                    }
                }
                Some(ns) => {
                    log::error!(
                        "NVMe/TCP controller {}: namespace {nsid} changed its block size from {bs} to {}; the bdev keeps its geometry",
                        shared.name,
                        ns.block_size
                    )
                }
                None => {
                    log::error!("NVMe/TCP controller {}: namespace {nsid} is no longer active (removed from the subsystem?)", shared.name);
                    removed.push(nsid);
                }
            }
        }
        for nsid in active.unwrap_or_default() {
            if known.iter().any(|n| n.0 == nsid) {
                continue;
            }
            if let Some(ns) = self.identify(nsid).await? {
                added.push((nsid, ns));
            }
        }
        if !added.is_empty() || !removed.is_empty() {
            let s = shared.clone();
            let spawned = std::thread::Builder::new().name(format!("nvme-ns-{}", shared.id)).spawn(move || s.apply_namespace_changes(added, removed));
            if let Err(e) = spawned {
                log::error!("NVMe/TCP controller {}: cannot apply namespace changes: {e}", shared.name);
            }
        }
        Ok(())
    }

    /// Identify Namespace; None for a namespace that is not active (an error status or a
    /// zero size or block size).
    async fn identify(&mut self, nsid: u32) -> Result<Option<IdentifyNamespace>, HostError> {
        let mut sqe = Sqe::new(admin_opc::IDENTIFY, 0, nsid);
        sqe.set_cdw(10, spec::cns::NAMESPACE as u32);
        let (cqe, data) = self.exec(sqe, Payload::In(spec::IDENTIFY_LEN), self.cmd_timeout).await?;
        Ok(if cqe.status().is_success() { IdentifyNamespace::parse(&data).filter(|ns| ns.nsze > 0 && ns.block_size > 0) } else { None })
    }
}

/// The admin task (see the module documentation) of one connection of the controller: ends
/// when the controller is detached or reconnected (`generation`); a failed command starts the
/// recovery. A Keep Alive goes every `period` and may take `admin_timeout` (SPDK's
/// `timeout_admin_us`), else until the next one is due.
pub async fn run(c: Controller, shared: Arc<Shared>, period: Duration, admin_timeout: Option<Duration>, generation: u64) {
    let current = |s: &Shared| !s.stop.load(Ordering::Relaxed) && s.generation.load(Ordering::SeqCst) == generation;
    let mut a = Admin { c, aer: None, aer_off: false, events: Vec::new(), cmd_timeout: admin_timeout.unwrap_or(CMD_TIMEOUT), timed_out: None };
    let keep_alive_timeout = admin_timeout.unwrap_or(period);
    let mut next_keep_alive = Instant::now() + period;
    let mut started = false;
    loop {
        if started {
            reactor::sleep(POLL).await;
        }
        if !current(&shared) {
            break;
        }
        let step = async {
            if !started {
                started = true;
                a.start(&shared).await?;
            }
            a.poll()?;
            while let Some(cqe) = a.events.pop() {
                a.event(&shared, cqe).await?;
            }
            if Instant::now() >= next_keep_alive {
                next_keep_alive = Instant::now() + period;
                let (cqe, _) = a.exec(Sqe::new(admin_opc::KEEP_ALIVE, 0, 0), Payload::None, keep_alive_timeout).await?;
                if cqe.status().is_success() {
                    shared.keep_alives.fetch_add(1, Ordering::Relaxed);
                } else {
                    log::warn!("NVMe/TCP controller {}: Keep Alive failed: {}", shared.name, cqe.status());
                }
            }
            Ok::<(), HostError>(())
        };
        if let Err(e) = step.await {
            if current(&shared) {
                // An unanswered command means a hung controller since it was sent: the
                // recovery's clock starts there (see `reconnect`).
                let why = match (e, a.timed_out) {
                    (HostError::Timeout, Some(waited)) => QueueError::Timeout { waited },
                    (e, _) => QueueError::Io(format!("admin queue: {e}")),
                };
                shared.queue_failed(&why);
            }
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_the_changed_namespace_list_parse() {
        let ev = AsyncEvent::from_dw0(0x0004_0002);
        assert_eq!(ev, AsyncEvent { kind: 2, info: 0, log_page: spec::log::CHANGED_NS });
        assert!(ev.is_ns_changed());
        assert!(!AsyncEvent::from_dw0(0x0003_0302).is_ns_changed(), "another notice");
        let mut log = vec![0u8; CHANGED_NS_LEN];
        log[0..4].copy_from_slice(&3u32.to_le_bytes());
        log[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(changed_namespaces(&log), Some(vec![3, 7]));
        log[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(changed_namespaces(&log), None, "overflow: every namespace");
    }
}

//! A controller: what one host's Connect on the admin queue creates. It owns the controller
//! properties (CC/CSTS), features, the asynchronous event queue, the keep-alive timer and the
//! list of its queue pairs. Its admin commands run on the admin queue's core; other threads
//! (the RPC thread raising namespace events, I/O queues connecting on other cores) reach it
//! through the mutex. The data path never takes that mutex.

mod connect;
mod keep_alive;

pub(crate) use self::connect::{connect, Binding, Connecting};

use super::ana::ListenerAna;
use super::identify;
use super::reservation::{Notice, ResvError};
use super::spec::{admin_opc, cns, csc, feat, io_opc, log, prop, sc, sct, Sqe, Status, FABRICS_OPC, NSID_ALL};
use super::subsystem::{ListenAddr, Namespace, Subsystem};
use super::transport::TransportOpts;
use super::Nvmf;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Where a queue pair lives.
#[derive(Debug, Clone)]
pub struct QueueRef {
    pub core: usize,
    pub conn_id: u64,
    pub peer: SocketAddr,
    pub sqsize: u16,
}

/// The result of an admin command.
#[derive(Debug)]
pub enum AdminOutcome {
    /// Complete now with this status, CQE dwords 0 (low half) and 1 (high half), and data
    /// for the host.
    Done { status: Status, result: u64, data: Vec<u8> },
    /// An Asynchronous Event Request that completes when an event happens.
    Deferred,
}

impl AdminOutcome {
    fn ok(dw0: u32) -> Self {
        AdminOutcome::Done { status: Status::SUCCESS, result: dw0 as u64, data: Vec::new() }
    }
    fn data(data: Vec<u8>) -> Self {
        AdminOutcome::Done { status: Status::SUCCESS, result: 0, data }
    }
    fn err(status: Status) -> Self {
        AdminOutcome::Done { status, result: 0, data: Vec::new() }
    }
}

/// AER completion dword 0 of "namespace attribute changed" (notice type 2, info 0, log 04h).
pub const AEN_NS_CHANGED: u32 = (log::CHANGED_NS as u32) << 16 | 0x02;
/// AER completion dword 0 of "reservation log page available" (type 6, I/O command specific
/// status; info 0; log 80h).
pub const AEN_RESERVATION: u32 = (log::RESERVATION_NOTIFICATION as u32) << 16 | 0x06;
/// Most Reservation Notification log entries kept per controller (the page's "available"
/// field counts to 255); later ones are lost, which the host sees as a gap in the count.
const MAX_RESV_NOTICES: usize = 255;
/// Async Event Configuration bit enabling namespace attribute notices.
pub const AEC_NS_ATTR: u32 = 1 << 8;
/// AER completion dword 0 of "asymmetric namespace access change" (notice type 2, info 03h,
/// log 0Ch).
pub const AEN_ANA_CHANGE: u32 = (log::ANA as u32) << 16 | 0x03 << 8 | 0x02;
/// Async Event Configuration bit enabling ANA change notices (OAES bit 11).
pub const AEC_ANA_CHANGE: u32 = 1 << 11;

/// Bytes of one Error Information Log entry.
const ERROR_ENTRY_LEN: usize = 64;
/// Transport type of the entries (NVMe over Fabrics TRTYPE: TCP).
const TRTYPE_TCP: u8 = 3;

/// What an Error Information Log entry names of a failed command: its first LBA (commands
/// that address blocks) and its namespace (FFFFFFFFh when it has none: NSID 0, Fabrics).
fn error_site(c: &Sqe, sqid: u16) -> (u64, u32) {
    if c.opcode() == FABRICS_OPC || c.nsid() == 0 {
        return (0, NSID_ALL);
    }
    let addresses_blocks = sqid > 0 && matches!(c.opcode(), io_opc::READ | io_opc::WRITE | io_opc::COMPARE | io_opc::WRITE_ZEROES);
    (if addresses_blocks { c.slba() } else { 0 }, c.nsid())
}

pub struct Controller {
    pub cntlid: u16,
    pub subsys: Arc<Subsystem>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub opts: TransportOpts,
    /// The listener the admin queue came through (I/O queues must use the subsystem's too).
    pub listener: ListenAddr,
    /// The ANA states of that listener (None on the discovery subsystem): the data path
    /// checks a namespace's group here with one relaxed load.
    pub ana: Option<Arc<ListenerAna>>,
    pub admin: QueueRef,
    pub created: Instant,
    ready: AtomicBool,
    closed: AtomicBool,
    st: Mutex<CtrlState>,
}

struct CtrlState {
    cc: u32,
    csts: u32,
    kato_ms: u32,
    last_keep_alive: Instant,
    aec: u32,
    /// I/O queues granted by Set Features Number of Queues.
    io_queues: u16,
    io: BTreeMap<u16, QueueRef>,
    /// CIDs of outstanding Asynchronous Event Requests.
    aers: Vec<u16>,
    /// Events that found no outstanding AER.
    pending_events: VecDeque<u32>,
    ns_event_masked: bool,
    changed_ns: Vec<u32>,
    changed_overflow: bool,
    error_count: u64,
    /// The newest Error Information Log entries, newest first (at most ELPE + 1).
    error_log: VecDeque<[u8; ERROR_ENTRY_LEN]>,
    /// Reservation Notification log entries not read yet, oldest first: (count, type, nsid).
    resv_log: VecDeque<(u64, Notice, u32)>,
    /// Reservation notifications raised so far (the log page count; lost ones count too).
    resv_count: u64,
    /// A reservation AER was sent and the host has not read the log since.
    resv_event_masked: bool,
    /// An ANA change AER was sent and the host has not read the ANA log since.
    ana_event_masked: bool,
    /// Reservation Notification Mask (feature 82h) per namespace, and for the others.
    resv_masks: BTreeMap<u32, u32>,
    resv_mask_default: u32,
}

/// CC fields.
const CC_EN: u32 = 1;
const CC_SHN_SHIFT: u32 = 14;
/// CSTS fields.
const CSTS_RDY: u32 = 1;
const CSTS_SHST_COMPLETE: u32 = 2 << 2;

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cntlid: u16,
        subsys: Arc<Subsystem>,
        hostnqn: String,
        hostid: [u8; 16],
        opts: TransportOpts,
        listener: ListenAddr,
        admin: QueueRef,
        kato_ms: u32,
    ) -> Controller {
        Controller {
            cntlid,
            subsys,
            hostnqn,
            hostid,
            opts,
            listener,
            ana: None,
            admin,
            created: Instant::now(),
            ready: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            st: Mutex::new(CtrlState {
                cc: 0,
                csts: 0,
                kato_ms,
                last_keep_alive: Instant::now(),
                aec: 0,
                io_queues: opts.max_io_qpairs_per_ctrlr,
                io: BTreeMap::new(),
                aers: Vec::new(),
                pending_events: VecDeque::new(),
                ns_event_masked: false,
                changed_ns: Vec::new(),
                changed_overflow: false,
                error_count: 0,
                error_log: VecDeque::new(),
                resv_log: VecDeque::new(),
                resv_count: 0,
                resv_event_masked: false,
                ana_event_masked: false,
                resv_masks: BTreeMap::new(),
                resv_mask_default: 0,
            }),
        }
    }

    /// The controller with the ANA states of its listener.
    pub fn with_ana(mut self, ana: Option<Arc<ListenerAna>>) -> Controller {
        self.ana = ana;
        self
    }

    /// The host NQN for log lines (SPDK's tools may connect without one).
    pub fn host_display(&self) -> &str {
        if self.hostnqn.is_empty() {
            "(no host NQN)"
        } else {
            &self.hostnqn
        }
    }

    fn st(&self) -> MutexGuard<'_, CtrlState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// CSTS.RDY, and not torn down: I/O commands are accepted.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.closed.load(Ordering::Acquire)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the controller torn down; true if it was live.
    pub fn mark_closed(&self) -> bool {
        self.ready.store(false, Ordering::Release);
        !self.closed.swap(true, Ordering::AcqRel)
    }

    /// (core, connection) of every queue pair, admin first.
    pub fn queue_connections(&self) -> Vec<(usize, u64)> {
        let st = self.st();
        std::iter::once((self.admin.core, self.admin.conn_id)).chain(st.io.values().map(|q| (q.core, q.conn_id))).collect()
    }

    pub fn io_queue_count(&self) -> usize {
        self.st().io.len()
    }

    pub fn io_queues(&self) -> Vec<(u16, QueueRef)> {
        self.st().io.iter().map(|(q, r)| (*q, r.clone())).collect()
    }

    /// Registers I/O queue `qid`, checking the Connect against the controller's state. The
    /// error is the status and the Connect field offset to report.
    pub fn attach_io_queue(&self, qid: u16, q: QueueRef) -> Result<(), (Status, u16)> {
        let mut st = self.st();
        if self.is_closed() {
            return Err((Status::error(sct::COMMAND_SPECIFIC, csc::CONNECT_INVALID_PARAMETERS), 16));
        }
        if !self.ready.load(Ordering::Acquire) {
            return Err((Status::generic(sc::COMMAND_SEQUENCE_ERROR), 0));
        }
        if qid > st.io_queues || st.io.contains_key(&qid) {
            return Err((Status::error(sct::COMMAND_SPECIFIC, csc::CONNECT_INVALID_PARAMETERS), super::spec::connect::QID as u16));
        }
        st.io.insert(qid, q);
        Ok(())
    }

    pub fn detach_io_queue(&self, qid: u16, conn_id: u64) {
        let mut st = self.st();
        if st.io.get(&qid).is_some_and(|q| q.conn_id == conn_id) {
            st.io.remove(&qid);
        }
    }

    /// Counts a failed command and keeps its Error Information Log entry (NVMe base spec,
    /// Get Log Page 01h), for `nvme error-log` on the host: queue, command id, status, and
    /// from the command (when known) its opcode, namespace and first LBA.
    pub fn record_error(&self, sqid: u16, cid: u16, status: Status, sqe: Option<&Sqe>) {
        let mut st = self.st();
        st.error_count += 1;
        let mut e = [0u8; ERROR_ENTRY_LEN];
        e[0..8].copy_from_slice(&st.error_count.to_le_bytes());
        e[8..10].copy_from_slice(&sqid.to_le_bytes());
        e[10..12].copy_from_slice(&cid.to_le_bytes());
        // Status field in bits 15:1, phase tag (bit 0) cleared.
        e[12..14].copy_from_slice(&status.to_field().to_le_bytes());
        // Parameter error location: not known here.
        e[14..16].copy_from_slice(&0xFFFFu16.to_le_bytes());
        let (lba, nsid) = match sqe {
            Some(c) => error_site(c, sqid),
            None => (0, NSID_ALL),
        };
        e[16..24].copy_from_slice(&lba.to_le_bytes());
        e[24..28].copy_from_slice(&nsid.to_le_bytes());
        e[29] = TRTYPE_TCP;
        // Command set (NVM) and opcode, valid from log page version 1 on.
        e[30] = 0;
        e[31] = sqe.map(|c| c.opcode()).unwrap_or(0);
        e[63] = 1;
        st.error_log.push_front(e);
        st.error_log.truncate(identify::ELPE as usize + 1);
    }

    // --- asynchronous events ---

    /// An AER arrived: completes at once with a pending event, or waits.
    fn queue_aer(&self, cid: u16) -> AdminOutcome {
        let mut st = self.st();
        if let Some(ev) = st.pending_events.pop_front() {
            return AdminOutcome::ok(ev);
        }
        if st.aers.len() > identify::AERL as usize {
            return AdminOutcome::err(Status::error(sct::COMMAND_SPECIFIC, csc::ASYNC_EVENT_LIMIT_EXCEEDED));
        }
        st.aers.push(cid);
        AdminOutcome::Deferred
    }

    /// Records that namespace `nsid` changed and raises the event if the host enabled it.
    pub fn namespace_changed(&self, nvmf: &Nvmf, nsid: u32) {
        let deliver = {
            let mut st = self.st();
            if !st.changed_overflow && !st.changed_ns.contains(&nsid) {
                if st.changed_ns.len() >= 1024 {
                    st.changed_overflow = true;
                    st.changed_ns.clear();
                } else {
                    st.changed_ns.push(nsid);
                }
            }
            if st.aec & AEC_NS_ATTR == 0 || st.ns_event_masked {
                return;
            }
            // Masked until the host reads the Changed Namespace List (NVMe Base §5.2).
            st.ns_event_masked = true;
            match st.aers.pop() {
                Some(cid) => Some(cid),
                None => {
                    st.pending_events.push_back(AEN_NS_CHANGED);
                    None
                }
            }
        };
        if let Some(cid) = deliver {
            ::log::info!("nvmf: controller {} of {}: namespace {nsid} changed, async event sent", self.cntlid, self.subsys.nqn);
            let conn = self.admin.conn_id;
            nvmf.post(self.admin.core, move || super::connection::complete_aer(conn, cid, Status::SUCCESS, AEN_NS_CHANGED));
        }
    }

    /// The ANA states this controller sees changed: raises the ANA change async event if the
    /// host enabled it (one until the host reads the ANA log page).
    pub fn ana_changed(&self, nvmf: &Nvmf) {
        let deliver = {
            let mut st = self.st();
            if st.aec & AEC_ANA_CHANGE == 0 || st.ana_event_masked {
                return;
            }
            st.ana_event_masked = true;
            match st.aers.pop() {
                Some(cid) => Some(cid),
                None => {
                    st.pending_events.push_back(AEN_ANA_CHANGE);
                    None
                }
            }
        };
        if let Some(cid) = deliver {
            ::log::info!("nvmf: controller {} of {}: ANA state changed, async event sent", self.cntlid, self.subsys.nqn);
            let conn = self.admin.conn_id;
            nvmf.post(self.admin.core, move || super::connection::complete_aer(conn, cid, Status::SUCCESS, AEN_ANA_CHANGE));
        }
    }

    /// Records reservation notification `notice` for namespace `nsid` (log page 80h) unless
    /// the host masked it, and raises the async event (one until the host reads the log).
    pub fn reservation_notice(&self, nvmf: &Nvmf, nsid: u32, notice: Notice) {
        let deliver = {
            let mut st = self.st();
            let mask = st.resv_masks.get(&nsid).copied().unwrap_or(st.resv_mask_default);
            if mask & notice.mask_bit() != 0 {
                return;
            }
            // Count 0 means "no entry": the count skips it when it wraps.
            st.resv_count = st.resv_count.wrapping_add(1).max(1);
            if st.resv_log.len() < MAX_RESV_NOTICES {
                let count = st.resv_count;
                st.resv_log.push_back((count, notice, nsid));
            }
            if st.resv_event_masked {
                return;
            }
            st.resv_event_masked = true;
            match st.aers.pop() {
                Some(cid) => Some(cid),
                None => {
                    st.pending_events.push_back(AEN_RESERVATION);
                    None
                }
            }
        };
        if let Some(cid) = deliver {
            ::log::info!("nvmf: controller {} of {}: reservation notice {notice:?} on namespace {nsid}, async event sent", self.cntlid, self.subsys.nqn);
            let conn = self.admin.conn_id;
            nvmf.post(self.admin.core, move || super::connection::complete_aer(conn, cid, Status::SUCCESS, AEN_RESERVATION));
        }
    }

    /// The Reservation Notification log page (80h): the oldest unread entry, taken; zeros
    /// when there is none.
    fn reservation_log(&self, rae: bool) -> Vec<u8> {
        let mut st = self.st();
        let mut page = vec![0u8; 64];
        if let Some((count, notice, nsid)) = st.resv_log.pop_front() {
            page[0..8].copy_from_slice(&count.to_le_bytes());
            page[8] = notice as u8;
            page[9] = st.resv_log.len().min(255) as u8;
            page[12..16].copy_from_slice(&nsid.to_le_bytes());
        }
        if !rae {
            st.resv_event_masked = false;
        }
        page
    }

    /// Forgets the outstanding AER `cid`; true if there was one. A host that sends a new
    /// command with an AER's id has given that AER up without telling us: SPDK's host
    /// completes its AERs itself ("aborted, SQ deleted") when it shuts a controller down and
    /// reuses their ids for the Property Get/Set of the shutdown.
    pub fn forget_aer(&self, cid: u16) -> bool {
        let mut st = self.st();
        let before = st.aers.len();
        st.aers.retain(|&c| c != cid);
        st.aers.len() != before
    }

    /// The outstanding AER cids (taken, for a connection that closes).
    pub fn take_aers(&self) -> Vec<u16> {
        std::mem::take(&mut self.st().aers)
    }

    // --- properties ---

    fn cap(&self) -> u64 {
        let depth = if self.subsys.is_discovery() { self.opts.max_aq_depth } else { self.opts.max_queue_depth };
        let mqes = (depth - 1) as u64;
        // CQR (contiguous queues), TO = 15 s in 500 ms units, CSS bit 37 (NVM command set),
        // MPSMIN = MPSMAX = 4 KiB.
        mqes | (1 << 16) | (30 << 24) | (1 << 37)
    }

    fn property_get(&self, sqe: &Sqe) -> AdminOutcome {
        let size8 = sqe.0[super::spec::property::ATTRIB] & 0x7 == 1;
        let ofst = sqe.u32_at(super::spec::property::OFFSET);
        let st = self.st();
        let v: u64 = match ofst {
            prop::CAP => self.cap(),
            prop::VS => identify::NVME_VERSION as u64,
            prop::CC => st.cc as u64,
            prop::CSTS => st.csts as u64,
            _ => return AdminOutcome::err(Status::generic(sc::INVALID_FIELD)),
        };
        let v = if size8 { v } else { v & 0xFFFF_FFFF };
        AdminOutcome::Done { status: Status::SUCCESS, result: v, data: Vec::new() }
    }

    fn property_set(&self, nvmf: &Nvmf, sqe: &Sqe) -> AdminOutcome {
        let ofst = sqe.u32_at(super::spec::property::OFFSET);
        if ofst != prop::CC {
            return AdminOutcome::err(Status::generic(sc::INVALID_FIELD));
        }
        let new = sqe.u32_at(super::spec::property::VALUE);
        let mut reset = false;
        {
            let mut st = self.st();
            let old = st.cc;
            st.cc = new;
            if new & CC_EN != 0 && old & CC_EN == 0 {
                st.csts = (st.csts & !CSTS_SHST_COMPLETE) | CSTS_RDY;
                self.ready.store(true, Ordering::Release);
            } else if new & CC_EN == 0 && old & CC_EN != 0 {
                // Controller reset: I/O queues go away, the admin queue stays (NVMe-oF §3.5).
                st.csts &= !CSTS_RDY;
                self.ready.store(false, Ordering::Release);
                reset = true;
            }
            if (new >> CC_SHN_SHIFT) & 0x3 != 0 && (old >> CC_SHN_SHIFT) & 0x3 == 0 {
                // Nothing is cached above the bdevs; completed writes are already with them.
                st.csts |= CSTS_SHST_COMPLETE;
                st.csts &= !CSTS_RDY;
                self.ready.store(false, Ordering::Release);
                reset = true;
            }
        }
        if reset {
            for (qid, q) in self.io_queues() {
                self.detach_io_queue(qid, q.conn_id);
                let conn = q.conn_id;
                nvmf.post(q.core, move || super::connection::abort_connection(conn));
            }
        }
        AdminOutcome::ok(0)
    }

    /// Property Get/Set (Fabrics commands on the admin queue).
    pub fn property(&self, nvmf: &Nvmf, sqe: &Sqe, set: bool) -> AdminOutcome {
        if set {
            self.property_set(nvmf, sqe)
        } else {
            self.property_get(sqe)
        }
    }

    // --- admin commands ---

    /// Executes an admin command (not a Fabrics one) with `data` from the host.
    pub fn admin(&self, nvmf: &Nvmf, sqe: &Sqe, data: &[u8]) -> AdminOutcome {
        let opc = sqe.opcode();
        if sqe.fuse() != 0 {
            return AdminOutcome::err(Status::generic(sc::INVALID_FIELD));
        }
        if !self.is_ready() {
            return AdminOutcome::err(Status::generic(sc::COMMAND_SEQUENCE_ERROR));
        }
        // Any admin command shows the host is alive; Keep Alive exists for idle hosts.
        self.touch_keep_alive();
        let disc = self.subsys.is_discovery();
        match opc {
            admin_opc::IDENTIFY => self.identify(sqe),
            admin_opc::GET_LOG_PAGE => self.get_log_page(nvmf, sqe),
            admin_opc::SET_FEATURES => self.set_features(sqe),
            admin_opc::GET_FEATURES => self.get_features(sqe, data),
            admin_opc::KEEP_ALIVE => AdminOutcome::ok(0),
            admin_opc::ASYNC_EVENT_REQUEST => self.queue_aer(sqe.cid()),
            admin_opc::ABORT if !disc => self.abort(nvmf, sqe),
            _ => AdminOutcome::err(Status::generic(sc::INVALID_OPCODE)),
        }
    }

    fn identify(&self, sqe: &Sqe) -> AdminOutcome {
        let c = (sqe.cdw(10) & 0xFF) as u8;
        let csi = (sqe.cdw(11) >> 24) as u8;
        let nsid = sqe.nsid();
        if self.subsys.is_discovery() && c != cns::CONTROLLER {
            return AdminOutcome::err(Status::generic(sc::INVALID_FIELD));
        }
        let max = self.subsys.max_namespaces;
        match c {
            cns::CONTROLLER => AdminOutcome::data(identify::controller(self, &self.opts)),
            cns::NAMESPACE | cns::CS_NAMESPACE => {
                if c == cns::CS_NAMESPACE && csi != 0 {
                    return AdminOutcome::err(Status::generic(sc::INVALID_FIELD));
                }
                if nsid == 0 || nsid == NSID_ALL || nsid > max {
                    return AdminOutcome::err(Status::generic(sc::INVALID_NAMESPACE));
                }
                // An inactive namespace id reads as zeros (NVMe Base §5.15.2.1).
                match self.subsys.namespace(nsid) {
                    Some(ns) if c == cns::NAMESPACE => AdminOutcome::data(identify::namespace(&ns, self.subsys.ana_reporting)),
                    _ => AdminOutcome::data(vec![0u8; super::spec::IDENTIFY_LEN]),
                }
            }
            cns::ACTIVE_NS_LIST => {
                if nsid >= 0xFFFF_FFFE {
                    return AdminOutcome::err(Status::generic(sc::INVALID_NAMESPACE));
                }
                let ids: Vec<u32> = self.subsys.namespaces().iter().map(|n| n.nsid).collect();
                AdminOutcome::data(identify::active_ns_list(ids.into_iter(), nsid))
            }
            cns::NS_DESCRIPTORS => match self.subsys.namespace(nsid) {
                Some(ns) => AdminOutcome::data(identify::ns_descriptors(&ns)),
                None => AdminOutcome::err(Status::generic(sc::INVALID_NAMESPACE)),
            },
            cns::CS_CONTROLLER if csi == 0 => AdminOutcome::data(vec![0u8; super::spec::IDENTIFY_LEN]),
            _ => AdminOutcome::err(Status::generic(sc::INVALID_FIELD)),
        }
    }

    fn get_log_page(&self, nvmf: &Nvmf, sqe: &Sqe) -> AdminOutcome {
        let cdw10 = sqe.cdw(10);
        let lid = (cdw10 & 0xFF) as u8;
        let rae = cdw10 & (1 << 15) != 0;
        let numd = ((sqe.cdw(11) & 0xFFFF) << 16 | (cdw10 >> 16)) as u64 + 1;
        let len = numd * 4;
        let offset = (sqe.cdw(13) as u64) << 32 | sqe.cdw(12) as u64;
        if offset % 4 != 0 {
            return AdminOutcome::err(Status::generic(sc::INVALID_FIELD));
        }
        let disc = self.subsys.is_discovery();
        let page = match lid {
            log::DISCOVERY if disc => nvmf.discovery_log(&self.hostnqn),
            _ if disc => return AdminOutcome::err(Status::error(sct::COMMAND_SPECIFIC, csc::INVALID_LOG_PAGE)),
            log::ERROR => {
                // Newest first; unused entries are zero (error count 0 marks them invalid).
                let st = self.st();
                let mut page = vec![0u8; ERROR_ENTRY_LEN * (identify::ELPE as usize + 1)];
                for (slot, e) in page.chunks_exact_mut(ERROR_ENTRY_LEN).zip(st.error_log.iter()) {
                    slot.copy_from_slice(e);
                }
                page
            }
            log::SMART => {
                let nsid = sqe.nsid();
                let nss: Vec<Arc<Namespace>> = if nsid == 0 || nsid == NSID_ALL {
                    self.subsys.namespaces()
                } else {
                    match self.subsys.namespace(nsid) {
                        Some(ns) => vec![ns],
                        None => return AdminOutcome::err(Status::generic(sc::INVALID_NAMESPACE)),
                    }
                };
                let errors = self.st().error_count;
                identify::smart_log(&nss, self.created.elapsed().as_secs(), errors)
            }
            log::FW_SLOT => identify::firmware_log(),
            log::RESERVATION_NOTIFICATION => self.reservation_log(rae),
            log::ANA if self.subsys.ana_reporting => {
                // Log specific field bit 0 (CDW10 bit 8): Return Groups Only.
                let rgo = cdw10 & (1 << 8) != 0;
                let (count, groups) = self.subsys.ana_descriptors(&self.listener);
                if !rae {
                    self.st().ana_event_masked = false;
                }
                super::ana::log_page(count, &groups, rgo)
            }
            log::CHANGED_NS => {
                let mut st = self.st();
                let page = identify::changed_ns_log(&st.changed_ns, st.changed_overflow);
                if !rae {
                    st.changed_ns.clear();
                    st.changed_overflow = false;
                    st.ns_event_masked = false;
                }
                page
            }
            _ => return AdminOutcome::err(Status::error(sct::COMMAND_SPECIFIC, csc::INVALID_LOG_PAGE)),
        };
        if offset > page.len() as u64 {
            return AdminOutcome::err(Status::generic(sc::INVALID_FIELD));
        }
        let start = offset as usize;
        let end = (offset + len).min(page.len() as u64) as usize;
        let mut out = page[start..end].to_vec();
        // The host asked for `len` bytes: past the end of the page it reads zeros.
        out.resize(len.min(1 << 20) as usize, 0);
        AdminOutcome::data(out)
    }

    fn set_features(&self, sqe: &Sqe) -> AdminOutcome {
        let cdw10 = sqe.cdw(10);
        let fid = (cdw10 & 0xFF) as u8;
        if cdw10 & (1 << 31) != 0 {
            return AdminOutcome::err(Status::error(sct::COMMAND_SPECIFIC, csc::FEATURE_NOT_SAVEABLE));
        }
        let v = sqe.cdw(11);
        let disc = self.subsys.is_discovery();
        if !disc && matches!(fid, feat::RESERVATION_NOTIFICATION_MASK | feat::RESERVATION_PERSISTENCE) {
            return self.set_reservation_feature(fid, sqe.nsid(), v);
        }
        let mut st = self.st();
        match fid {
            feat::NUMBER_OF_QUEUES if !disc => {
                if !st.io.is_empty() {
                    return AdminOutcome::err(Status::generic(sc::COMMAND_SEQUENCE_ERROR));
                }
                let (nsqr, ncqr) = (v & 0xFFFF, v >> 16);
                if nsqr == 0xFFFF || ncqr == 0xFFFF {
                    return AdminOutcome::err(Status::generic(sc::INVALID_FIELD));
                }
                let granted = (nsqr.min(ncqr) + 1).min(self.opts.max_io_qpairs_per_ctrlr as u32) as u16;
                st.io_queues = granted;
                let g = (granted - 1) as u32;
                AdminOutcome::ok(g | g << 16)
            }
            feat::ASYNC_EVENT_CONFIG => {
                st.aec = v;
                AdminOutcome::ok(0)
            }
            feat::KEEP_ALIVE_TIMER => {
                st.kato_ms = v;
                st.last_keep_alive = Instant::now();
                AdminOutcome::ok(0)
            }
            feat::VOLATILE_WRITE_CACHE if !disc => AdminOutcome::err(Status::error(sct::COMMAND_SPECIFIC, csc::FEATURE_NOT_CHANGEABLE)),
            _ => AdminOutcome::err(Status::generic(sc::INVALID_FIELD)),
        }
    }

    fn get_features(&self, sqe: &Sqe, _data: &[u8]) -> AdminOutcome {
        let cdw10 = sqe.cdw(10);
        let fid = (cdw10 & 0xFF) as u8;
        let sel = (cdw10 >> 8) & 0x7;
        let disc = self.subsys.is_discovery();
        let resv = !disc && matches!(fid, feat::RESERVATION_NOTIFICATION_MASK | feat::RESERVATION_PERSISTENCE);
        if sel == 3 {
            let changeable = matches!(fid, feat::NUMBER_OF_QUEUES | feat::ASYNC_EVENT_CONFIG | feat::KEEP_ALIVE_TIMER) || resv;
            let known =
                matches!(fid, feat::NUMBER_OF_QUEUES | feat::ASYNC_EVENT_CONFIG | feat::KEEP_ALIVE_TIMER | feat::VOLATILE_WRITE_CACHE | feat::HOST_IDENTIFIER)
                    || resv;
            if !known {
                return AdminOutcome::err(Status::generic(sc::INVALID_FIELD));
            }
            // Capabilities: changeable (bit 2), per namespace (bit 1: the reservation
            // features); nothing is saveable.
            return AdminOutcome::ok(if changeable { 1 << 2 } else { 0 } | if resv { 1 << 1 } else { 0 });
        }
        if resv {
            return self.get_reservation_feature(fid, sqe.nsid(), sel == 1);
        }
        let st = self.st();
        let default = sel == 1;
        match fid {
            feat::NUMBER_OF_QUEUES if !disc => {
                let n = if default { self.opts.max_io_qpairs_per_ctrlr } else { st.io_queues } as u32 - 1;
                AdminOutcome::ok(n | n << 16)
            }
            feat::ASYNC_EVENT_CONFIG => AdminOutcome::ok(if default { 0 } else { st.aec }),
            feat::KEEP_ALIVE_TIMER => AdminOutcome::ok(st.kato_ms),
            feat::VOLATILE_WRITE_CACHE if !disc => AdminOutcome::ok(1),
            feat::HOST_IDENTIFIER => AdminOutcome::data(self.hostid.to_vec()),
            _ => AdminOutcome::err(Status::generic(sc::INVALID_FIELD)),
        }
    }

    /// Set Features Reservation Notification Mask (82h, per namespace or all of them) and
    /// Reservation Persistence (83h, per namespace: the PTPL state of its reservations).
    fn set_reservation_feature(&self, fid: u8, nsid: u32, v: u32) -> AdminOutcome {
        if fid == feat::RESERVATION_NOTIFICATION_MASK {
            // Bits 1-3: registration preempted, reservation released, reservation preempted.
            let mask = v & 0b1110;
            let mut st = self.st();
            if nsid == NSID_ALL {
                st.resv_mask_default = mask;
                st.resv_masks.clear();
            } else if self.subsys.namespace(nsid).is_some() {
                st.resv_masks.insert(nsid, mask);
            } else {
                return AdminOutcome::err(Status::generic(sc::INVALID_NAMESPACE));
            }
            return AdminOutcome::ok(0);
        }
        let Some(ns) = self.subsys.namespace(nsid) else { return AdminOutcome::err(Status::generic(sc::INVALID_NAMESPACE)) };
        match ns.resv.set_ptpl(v & 1 != 0) {
            Ok(()) => AdminOutcome::ok(0),
            Err(ResvError::InvalidField) => AdminOutcome::err(Status::error(sct::COMMAND_SPECIFIC, csc::FEATURE_NOT_CHANGEABLE)),
            Err(e) => AdminOutcome::err(e.status()),
        }
    }

    fn get_reservation_feature(&self, fid: u8, nsid: u32, default: bool) -> AdminOutcome {
        if fid == feat::RESERVATION_NOTIFICATION_MASK {
            let st = self.st();
            if nsid != NSID_ALL && self.subsys.namespace(nsid).is_none() {
                return AdminOutcome::err(Status::generic(sc::INVALID_NAMESPACE));
            }
            let mask = if default { 0 } else { st.resv_masks.get(&nsid).copied().unwrap_or(st.resv_mask_default) };
            return AdminOutcome::ok(mask);
        }
        let Some(ns) = self.subsys.namespace(nsid) else { return AdminOutcome::err(Status::generic(sc::INVALID_NAMESPACE)) };
        AdminOutcome::ok(if default { 0 } else { ns.resv.lock().ptpl() as u32 })
    }

    /// Abort: outstanding AERs can be aborted; commands already at a bdev cannot (the spec
    /// lets a controller decline: CQE dword 0 bit 0 = 1, "not aborted").
    fn abort(&self, nvmf: &Nvmf, sqe: &Sqe) -> AdminOutcome {
        let sqid = (sqe.cdw(10) & 0xFFFF) as u16;
        let cid = (sqe.cdw(10) >> 16) as u16;
        if sqid == 0 {
            let mut st = self.st();
            if let Some(i) = st.aers.iter().position(|&c| c == cid) {
                st.aers.remove(i);
                drop(st);
                let conn = self.admin.conn_id;
                nvmf.post(self.admin.core, move || super::connection::complete_aer(conn, cid, Status::generic(sc::ABORT_REQUESTED), 0));
                return AdminOutcome::ok(0);
            }
        }
        AdminOutcome::ok(1)
    }

    /// The `nvmf_subsystem_get_qpairs` entries of this controller.
    pub fn qpairs_json(&self) -> Vec<serde_json::Value> {
        let mut out = vec![qpair_json(self, 0, &self.admin)];
        for (qid, q) in self.io_queues() {
            out.push(qpair_json(self, qid, &q));
        }
        out
    }
}

fn qpair_json(c: &Controller, qid: u16, q: &QueueRef) -> serde_json::Value {
    serde_json::json!({
        "cntlid": c.cntlid,
        "qid": qid,
        "state": if c.is_closed() { "deleting" } else { "active" },
        "thread": format!("reactor_{}", q.core),
        "hostnqn": c.hostnqn,
        "queue_size": q.sqsize as u32 + 1,
        "listen_address": c.listener.to_json(),
        "peer_address": { "trtype": "TCP", "adrfam": if q.peer.is_ipv4() { "IPv4" } else { "IPv6" }, "traddr": q.peer.ip().to_string(), "trsvcid": q.peer.port().to_string() },
    })
}

impl Nvmf {
    /// The discovery log page as `hostnqn` may see it: every subsystem it is allowed on,
    /// once per listener.
    pub fn discovery_log(&self, hostnqn: &str) -> Vec<u8> {
        let subs = self.subsystems();
        let visible: Vec<(Arc<Subsystem>, Vec<(ListenAddr, bool)>)> =
            subs.into_iter().filter(|s| s.allows_host(hostnqn)).map(|s| (s.clone(), s.listeners_secure())).collect();
        let mut entries = Vec::new();
        for (s, ls) in &visible {
            for (a, secure) in ls {
                entries.push(identify::DiscoveryEntry { subsys: s, addr: a, portid: self.portid(a), secure: *secure });
            }
        }
        let asqsz = self.transport().map(|t| t.max_aq_depth).unwrap_or(32);
        identify::discovery_log(self.genctr(), &entries, asqsz)
    }
}

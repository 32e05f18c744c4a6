//! Fabrics Connect: a queue asks to join a controller. An admin queue creates the controller
//! (and starts its keep-alive timer); an I/O queue joins the controller its host created.

use super::keep_alive::spawn_keep_alive;
use super::{Controller, QueueRef};
use crate::nvmf::auth::{QueueAuth, Secret};
use crate::nvmf::pdu::DataPlan;
use crate::nvmf::spec::{connect, csc, sc, sct, ConnectRequest, Sqe, Status, CNTLID_DYNAMIC};
use crate::nvmf::subsystem::ListenAddr;
use crate::nvmf::tls::PskIdentity;
use crate::nvmf::transport::TransportOpts;
use crate::nvmf::Nvmf;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The queue that asks to connect, as the controller sees it.
pub(crate) struct Connecting<'a> {
    pub nvmf: &'a Arc<Nvmf>,
    /// The core that owns the queue's connection.
    pub core: usize,
    pub conn_id: u64,
    pub peer: SocketAddr,
    /// The listener the connection came in on (a subsystem accepts only its own).
    pub listener: &'a ListenAddr,
    pub opts: &'a TransportOpts,
    /// What the TLS handshake proved, on a secure listener's connection.
    pub tls: Option<&'a PskIdentity>,
}

/// What the queue is connected to.
#[derive(Clone)]
pub(crate) struct Binding {
    pub ctrl: Arc<Controller>,
    pub qid: u16,
    pub sqsize: u16,
    /// The host disabled SQ flow control: completions need no SQHD and read data may carry
    /// the SUCCESS flag.
    pub sqflow_off: bool,
}

/// Fabrics Connect of queue `q`: the controller it binds to (a new one for an admin queue,
/// with its keep-alive timer), or Err((status, IATTR, IPO)).
pub(crate) fn connect(q: &Connecting<'_>, sqe: &Sqe, plan: DataPlan, icd: Option<&[u8]>) -> Result<(Binding, Option<Box<QueueAuth>>), (Status, u8, u16)> {
    let invalid = |iattr: u8, ipo: usize| (Status::error(sct::COMMAND_SPECIFIC, csc::CONNECT_INVALID_PARAMETERS), iattr, ipo as u16);
    let data = match (plan, icd) {
        (DataPlan::InCapsule { offset: 0, len }, Some(d)) if len as usize == d.len() => d,
        _ => return Err((Status::generic(sc::DATA_SGL_LENGTH_INVALID), 0, 0)),
    };
    let req = ConnectRequest::parse(sqe, data)?;
    let (qid, sqsize, cattr, kato, hostid, cntlid) = (req.qid, req.sqsize, req.cattr, req.kato_ms, req.hostid, req.cntlid);
    let (subnqn, hostnqn) = (req.subnqn.as_str(), req.hostnqn.as_str());
    let Some(subsys) = q.nvmf.subsystem(subnqn) else {
        log::info!("nvmf: {} asked for unknown subsystem {subnqn:?}", q.peer);
        return Err(invalid(1, connect::DATA_SUBNQN));
    };
    if subsys.deleted.load(Ordering::Acquire) || (!subsys.is_discovery() && !subsys.has_listener(&q.listener)) {
        return Err(invalid(1, connect::DATA_SUBNQN));
    }
    if !subsys.allows_host(hostnqn) {
        log::warn!("nvmf: host {hostnqn} ({}) is not allowed on {subnqn}", q.peer);
        return Err((Status::error(sct::COMMAND_SPECIFIC, csc::CONNECT_INVALID_HOST), 1, connect::DATA_HOSTNQN as u16));
    }
    // TLS proved who holds the key: the queue may connect only that host to that subsystem
    // (the discovery subsystem: that host). A host with a PSK here connects only over TLS.
    let refuse_host = |why: &str| {
        log::warn!("nvmf: host {hostnqn} ({}) refused on {subnqn}: {why}", q.peer);
        Err((Status::error(sct::COMMAND_SPECIFIC, csc::CONNECT_INVALID_HOST), 1, connect::DATA_HOSTNQN as u16))
    };
    match q.tls {
        Some(id) if id.hostnqn != hostnqn || (!subsys.is_discovery() && id.subnqn != subnqn) => {
            return refuse_host(&format!("its TLS key was for host {} on {}", id.hostnqn, id.subnqn));
        }
        None if subsys.host_keys(hostnqn).is_some_and(|k| k.psk.is_some()) => return refuse_host("it has a TLS key here and must connect over TLS"),
        _ => {}
    }
    // A host with a DH-HMAC-CHAP key authenticates every queue before using it.
    let auth = match subsys.host_keys(hostnqn).filter(|k| k.key.is_some()) {
        None => None,
        Some(k) => {
            let secrets = k
                .key
                .as_ref()
                .map_or(Err(crate::nvmf::auth::secret::SecretError::Format), |key| Secret::parse(key.secret()))
                .and_then(|h| Ok((h, k.ctrlr_key.as_ref().map(|c| Secret::parse(c.secret())).transpose()?)));
            let Ok((host_key, ctrl_key)) = secrets else {
                // Checked when the host was added; the key's content cannot change since.
                log::error!("nvmf: DH-HMAC-CHAP key of host {hostnqn} on {subnqn} is not a secret; refusing it");
                return Err((Status::error(sct::COMMAND_SPECIFIC, csc::CONNECT_INVALID_HOST), 1, connect::DATA_HOSTNQN as u16));
            };
            let policy = q.nvmf.auth_policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Some(Box::new(QueueAuth::new(hostnqn, subnqn, &host_key, ctrl_key.as_ref(), policy)))
        }
    };
    let sqflow_off = cattr & connect::CATTR_DISABLE_SQ_FLOW != 0;
    let peer = q.peer;
    if qid == 0 {
        if cntlid != CNTLID_DYNAMIC && cntlid != 0xFFFE {
            return Err(invalid(1, connect::DATA_CNTLID));
        }
        if sqsize == 0 || sqsize >= q.opts.max_aq_depth {
            return Err(invalid(0, connect::SQSIZE));
        }
        let admin = QueueRef { core: q.core, conn_id: q.conn_id, peer, sqsize };
        let (opts, listener, host) = (*q.opts, q.listener.clone(), hostnqn.to_string());
        // Read before add_controller, which holds the subsystem's lock while it makes one.
        let ana = subsys.listener_ana(&listener);
        let ctrl = subsys
            .add_controller(|id| Arc::new(Controller::new(id, subsys.clone(), host, hostid, opts, listener, admin, kato).with_ana(ana)))
            .ok_or((Status::error(sct::COMMAND_SPECIFIC, csc::CONNECT_CONTROLLER_BUSY), 0, 0))?;
        log::info!("nvmf: host {} ({peer}) connected to {subnqn}: controller {}, core {}", ctrl.host_display(), ctrl.cntlid, q.core);
        spawn_keep_alive(q.nvmf.clone(), ctrl.clone());
        return Ok((Binding { ctrl, qid: 0, sqsize, sqflow_off }, auth));
    }
    let Some(ctrl) = subsys.controller(cntlid) else { return Err(invalid(1, connect::DATA_CNTLID)) };
    if ctrl.hostnqn != hostnqn {
        return Err(invalid(1, connect::DATA_HOSTNQN));
    }
    if ctrl.hostid != hostid {
        return Err(invalid(1, connect::DATA_HOSTID));
    }
    if subsys.is_discovery() {
        return Err(invalid(0, connect::QID));
    }
    if sqsize == 0 || sqsize >= q.opts.max_queue_depth {
        return Err(invalid(0, connect::SQSIZE));
    }
    ctrl.attach_io_queue(qid, QueueRef { core: q.core, conn_id: q.conn_id, peer, sqsize }).map_err(|(s, ipo)| (s, 0, ipo))?;
    log::debug!("nvmf: controller {} of {subnqn}: I/O queue {qid} (size {}) on core {}", ctrl.cntlid, sqsize as u32 + 1, q.core);
    Ok((Binding { ctrl, qid, sqsize, sqflow_off }, auth))
}

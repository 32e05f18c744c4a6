//! Fencing a stale head (issue #15 item 3; tidemark's own, SPDK has no such option): a mirror
//! created with a `reservation_key` holds an NVMe reservation on each leg that is an NVMe
//! namespace (a remote leg), so that once another node assembled the mirror and preempted it,
//! the legs refuse this node's writes. Shaped like Mayastor's nexus reservations.
//!
//! On each remote leg, before the mirror writes anything to it: Register the key (a
//! registration of this host with another key is replaced: it is this node's own, left by an
//! earlier run with another key), then Acquire a **Write Exclusive** reservation. Write
//! Exclusive, not Exclusive Access: the old head must not write, but a backup or a diagnosis
//! reading the leg through another path may still read; and not a registrants-only or
//! all-registrants type, under which every registered host (the old head's registration may
//! linger after a release) could still write. Held by another key: preempted only when
//! `preempt_key` names that key (the orchestrator says which head is stale), with Preempt and
//! Abort so that the target drops the stale head's commands that it has not started yet (see
//! `docs/failover.md` for what that does not cover); else the assembly is refused, naming the
//! leg.
//!
//! A leg write answered with Reservation Conflict means another head took over: the mirror is
//! fenced and acknowledges no host write any more (channel.rs).

use crate::bdev::{Bdev, BdevError, NvmePassthru};
use crate::nvmf::initiator::resv;
use crate::nvmf::reservation::{rtype, SC_RESERVATION_CONFLICT};
use crate::nvmf::spec::io_opc;

/// The reservation type the head holds (see the module comment).
pub const RTYPE: u8 = rtype::WRITE_EXCLUSIVE;

/// A mirror's reservation keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fencing {
    /// This head's key (nonzero).
    pub key: u64,
    /// The stale head's key, which this head may preempt: at assembly, and on a leg that
    /// returns later still reserved by that head (it was away during the failover).
    pub preempt: Option<u64>,
}

/// Why a leg could not be reserved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// Another head holds the leg and no preempt of its key was allowed.
    #[error("leg {leg} is reserved by another head (key {holder:#x}); give preempt_key {holder:#x} to take it over if that head is stale")]
    HeldByOther { leg: String, holder: u64 },
    /// This head's key is no longer registered or the reservation was taken: it was fenced.
    #[error("leg {leg} refused this head's reservation (Reservation Conflict): another head took it over")]
    Conflict { leg: String },
    /// This node is registered on the leg with the very key it was told to preempt: it has
    /// the stale head's host identifier (two nodes attach with the same hostnqn), and a
    /// preempt would fence nobody.
    #[error("leg {leg}: this node's host identifier is registered there with key {key:#x}, the stale head's: both nodes attach with the same hostnqn ({hostnqn}); attach the legs with this node's own hostnqn")]
    SharedIdentity { leg: String, key: u64, hostnqn: String },
    /// This node's host identifier holds the leg's reservation under another key: another
    /// head with the same hostnqn, or an earlier mirror of this node with another key. Taking
    /// the key over would leave both heads able to write (they are one host to the leg).
    #[error("leg {leg}: this node's host identifier already holds its reservation with key {key:#x}: another head attaches with the same hostnqn ({hostnqn}), or an earlier mirror here used that key; attach with this node's own hostnqn, or use that key")]
    HeldBySameHost { leg: String, key: u64, hostnqn: String },
    /// The command failed otherwise (the leg is unreachable, or does not do reservations).
    #[error("leg {leg}: {what} failed: {err}")]
    Failed { leg: String, what: &'static str, err: BdevError },
}

impl From<FenceError> for super::MirrorError {
    fn from(e: FenceError) -> Self {
        match e {
            FenceError::HeldByOther { .. } | FenceError::Conflict { .. } | FenceError::HeldBySameHost { .. } => super::MirrorError::Busy(e.to_string()),
            FenceError::SharedIdentity { .. } => super::MirrorError::Invalid(e.to_string()),
            FenceError::Failed { .. } => super::MirrorError::Io(e.to_string()),
        }
    }
}

/// Whether a leg's error is an NVMe Reservation Conflict: another head preempted this one.
pub fn is_conflict(e: &BdevError) -> bool {
    matches!(e, BdevError::Nvme { sct: 0, sc } if *sc == SC_RESERVATION_CONFLICT)
}

async fn run(b: &dyn Bdev, what: &'static str, cmd: NvmePassthru) -> Result<Vec<u8>, FenceError> {
    let leg = || b.name().to_string();
    let fut = b.nvme_io_passthru(cmd).ok_or_else(|| FenceError::Failed { leg: leg(), what, err: BdevError::Unsupported(crate::bdev::IoType::Write) })?;
    fut.await.map_err(|err| if is_conflict(&err) { FenceError::Conflict { leg: leg() } } else { FenceError::Failed { leg: leg(), what, err } })
}

/// Reports the leg's reservation (extended data structure: 128-bit host identifiers).
async fn report(b: &dyn Bdev) -> Result<(u8, Vec<resv::Registrant>), FenceError> {
    // Header and room for a few dozen registrants (more than a mirror's heads ever are).
    const LEN: usize = 64 * 64;
    let cmd = NvmePassthru { opcode: io_opc::RESERVATION_REPORT, cdw10: (LEN / 4 - 1) as u32, cdw11: 1, data_out: Vec::new(), data_in: LEN };
    let d = run(b, "Reservation Report", cmd).await?;
    resv::parse_report(&d).ok_or_else(|| FenceError::Failed { leg: b.name().to_string(), what: "Reservation Report", err: BdevError::Media })
}

async fn acquire(b: &dyn Bdev, action: u8, key: u64, prkey: u64) -> Result<(), FenceError> {
    let cmd = NvmePassthru {
        opcode: io_opc::RESERVATION_ACQUIRE,
        cdw10: resv::cdw10(action, false, RTYPE, 0),
        cdw11: 0,
        data_out: resv::keys(key, prkey),
        data_in: 0,
    };
    run(b, "Reservation Acquire", cmd).await.map(|_| ())
}

/// The host identifier and NQN this node uses on leg `b`, from what the bdev tells
/// `bdev_get_bdevs` (`driver_specific.nvme[0].host`), so that the mirror needs nothing of the
/// initiator module.
fn own_host(b: &dyn Bdev) -> Option<([u8; 16], String)> {
    let h = b.driver_specific().get("nvme")?.get(0)?.get("host")?.clone();
    let id = uuid::Uuid::parse_str(h.get("id")?.as_str()?).ok()?;
    Some((*id.as_bytes(), h.get("nqn")?.as_str()?.to_string()))
}

/// Reserves leg `b` for this head (see the module comment). `Ok(false)`: the leg is no NVMe
/// namespace (a local leg), nothing to do. Runs on a reactor core.
pub async fn reserve_leg(b: &dyn Bdev, f: Fencing) -> Result<bool, FenceError> {
    let probe = NvmePassthru {
        opcode: io_opc::RESERVATION_REGISTER,
        cdw10: resv::cdw10(resv::REGISTER, false, 0, 0),
        cdw11: 0,
        data_out: resv::keys(0, f.key),
        data_in: 0,
    };
    let Some(fut) = b.nvme_io_passthru(probe) else { return Ok(false) };
    let leg = b.name().to_string();
    // Once per process: the periodic check would repeat it every two seconds.
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.load(std::sync::atomic::Ordering::Relaxed)
        && own_host(b).is_some_and(|(_, nqn)| nqn == crate::nvmf::initiator::QpairOptions::default().hostnqn)
        && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        // Every node that attaches without a hostnqn is this same host to the legs: a head
        // on another such node could not fence this one, nor this one it.
        log::warn!(
            "leg {leg}: attached with the default hostnqn; give each node its own (bdev_nvme_attach_controller hostnqn) or fencing cannot tell the nodes apart"
        );
    }
    match fut.await {
        Ok(_) => {}
        // This host is registered with another key: its own, from an earlier run (a key is
        // per host, and this host is this node). Replace it, ignoring the old key.
        Err(e) if is_conflict(&e) => {
            // Unless that key is the stale head's (then this node *is* that head as far as the
            // leg can tell: the same hostnqn, and nothing could be fenced), or it holds the
            // reservation (replacing it would make this head a second writer beside whoever
            // holds it under this identity).
            if let Some((me, hostnqn)) = own_host(b) {
                let (_, regs) = report(b).await?;
                if let Some(r) = regs.iter().find(|r| r.host_id == me) {
                    if f.preempt == Some(r.key) {
                        return Err(FenceError::SharedIdentity { leg, key: r.key, hostnqn });
                    }
                    if r.holds {
                        return Err(FenceError::HeldBySameHost { leg, key: r.key, hostnqn });
                    }
                }
            }
            let cmd = NvmePassthru {
                opcode: io_opc::RESERVATION_REGISTER,
                cdw10: resv::cdw10(resv::REPLACE, true, 0, 0),
                cdw11: 0,
                data_out: resv::keys(0, f.key),
                data_in: 0,
            };
            run(b, "Reservation Register (replace)", cmd).await?;
            log::info!("leg {leg}: this host's earlier reservation key replaced by {:#x}", f.key);
        }
        Err(err) => return Err(FenceError::Failed { leg, what: "Reservation Register", err }),
    }
    let (held, regs) = report(b).await?;
    let holder = regs.iter().find(|r| r.holds);
    match (held, holder) {
        // Nobody holds it (a new leg, or a restarted target without persistence).
        (0, _) => acquire(b, resv::ACQUIRE, f.key, 0).await?,
        // Ours already (the same key: this head, or its restart with the same identity).
        (_, Some(h)) if h.key == f.key => acquire(b, resv::ACQUIRE, f.key, 0).await?,
        (_, Some(h)) if f.preempt == Some(h.key) => {
            match acquire(b, resv::PREEMPT_AND_ABORT, f.key, h.key).await {
                Ok(()) => {}
                // SPDK's nvmf_tgt v25.09 refuses Preempt and Abort (Invalid Field; later
                // versions wait for the preempted hosts' commands instead): a plain Preempt
                // fences the same, without the drain (see docs/failover.md).
                Err(FenceError::Failed { err: BdevError::Nvme { sct: 0, sc: 0x02 }, .. }) => {
                    log::info!("leg {leg}: Preempt and Abort refused (Invalid Field); preempting without abort");
                    acquire(b, resv::PREEMPT, f.key, h.key).await?;
                }
                Err(e) => return Err(e),
            }
            log::warn!("leg {leg}: reservation of the stale head (key {:#x}) preempted by key {:#x}", h.key, f.key);
        }
        (_, Some(h)) => return Err(FenceError::HeldByOther { leg, holder: h.key }),
        // Held, but the report names no holder (it did not fit): treat as another head's.
        (_, None) => return Err(FenceError::HeldByOther { leg, holder: 0 }),
    }
    Ok(true)
}

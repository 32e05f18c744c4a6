//! A logical unit: the SCSI block command set over one bdev. The unit is shared by every
//! connection; each I_T nexus (one connection's view of the unit) has a [`Nexus`] on the core
//! that owns the connection, with its channel and its pending unit attentions.

use super::cdb::{self, Command, Geometry};
use super::inquiry::{self, PortIdentity, UnitIdentity};
use super::mode::{self, ModeState};
use super::pr::{self, Access, ItNexus, OutCmd, Pr, PrError};
use super::sense::{asc, Sense, SenseKey, Status, FIXED_SENSE_LEN, MAX_SENSE_LEN};
use super::write_gate::{self, Exclusive, WriteGate, WriteHold};
use super::xcopy::{self, CopyResult};
use crate::bdev::{BdevEntry, BdevError, Channel, IoBuf, IoType};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Why a command did not complete with GOOD status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Check(Sense),
    /// The device is out of resources; the host retries (BUSY status).
    Busy,
    /// Another nexus holds a RESERVE(6) reservation (RESERVATION CONFLICT status).
    ReservationConflict,
}

impl From<Sense> for Failure {
    fn from(s: Sense) -> Self {
        Failure::Check(s)
    }
}

fn bdev_failure(e: BdevError, write: bool) -> Failure {
    match e {
        BdevError::NoResources => Failure::Busy,
        // An NVMe device below answered Reservation Conflict (generic status 83h; a fenced
        // mirror answers so too): the SCSI status of the same meaning, as the NVMe-SCSI
        // translation has it, so that the host does not take it for a medium error.
        BdevError::Nvme { sct: 0, sc: 0x83 } => Failure::ReservationConflict,
        e => Failure::Check(Sense::from_bdev(&e, write)),
    }
}

/// Outcome of a command that did not fail: its status and the bytes of Data-In produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub status: Status,
    pub data_len: usize,
}

impl Done {
    fn good(data_len: usize) -> Self {
        Done { status: Status::Good, data_len }
    }
}

/// What the transport passes along with a command.
pub struct Context<'a> {
    pub port: &'a PortIdentity,
    /// Every LUN of the target the nexus sees, for REPORT LUNS.
    pub luns: &'a [u64],
    /// Bytes of Data-Out the transport was told to expect (iSCSI's EDTL of a write).
    pub data_out_expected: u64,
    /// The other logical units of the target (EXTENDED COPY may name them); called only by
    /// the commands that need them.
    pub peers: Option<&'a dyn Fn() -> Vec<Arc<LogicalUnit>>>,
}

/// A copy source or destination: this unit or another unit of the target.
enum CopyUnit {
    This,
    Other(Arc<LogicalUnit>),
}

pub struct LogicalUnit {
    entry: Arc<BdevEntry>,
    ident: UnitIdentity,
    block_size: u32,
    write_cache: AtomicBool,
    default_wce: bool,
    /// Software write protect (SWP of the control mode page): writes fail as on a read-only
    /// bdev until a MODE SELECT clears it.
    swp: AtomicBool,
    /// A SANITIZE is running: every command but those describing the unit gets NOT READY,
    /// SANITIZE IN PROGRESS (SBC-4 §4.11.2).
    sanitizing: AtomicBool,
    /// Bumped by a LUN or target reset: every other nexus then reports a unit attention.
    reset_generation: AtomicU64,
    /// Bumped by a MODE SELECT that changed something (MODE PARAMETERS CHANGED elsewhere).
    mode_generation: AtomicU64,
    /// Every write of this target to the bdev holds its range here, so that COMPARE AND WRITE
    /// (compare, then write) is atomic against them. Shared by all units on one bdev.
    /// Ordinary writes pass it; atomic commands hold their blocks through it.
    gate: Arc<WriteGate>,
    /// The nexus holding a RESERVE(6) reservation (0: none).
    reserved_by: Arc<AtomicU64>,
    /// Persistent reservations, shared by every unit on the bdev.
    pr: Arc<Pr>,
}

/// Ids of nexuses (0 means "nobody").
static NEXT_NEXUS: AtomicU64 = AtomicU64::new(1);

impl LogicalUnit {
    /// A unit over `entry`, for a target with `cores` reactor cores; persistent reservations
    /// with APTPL are not kept across restarts (see [`LogicalUnit::with_pr_dir`]).
    pub fn new(entry: Arc<BdevEntry>, cores: usize) -> LogicalUnit {
        Self::build(entry, cores, None)
    }

    /// A unit whose APTPL persistent reservations live in `dir` (one file per bdev), and are
    /// read back from there.
    pub fn with_pr_dir(entry: Arc<BdevEntry>, cores: usize, dir: &std::path::Path) -> LogicalUnit {
        Self::build(entry, cores, Some(dir))
    }

    fn build(entry: Arc<BdevEntry>, cores: usize, pr_dir: Option<&std::path::Path>) -> LogicalUnit {
        let b = entry.bdev();
        let thin = b.supports(IoType::Unmap);
        let default_wce = b.supports(IoType::Flush);
        LogicalUnit {
            ident: UnitIdentity { uuid: b.uuid(), thin },
            block_size: b.block_size(),
            write_cache: AtomicBool::new(default_wce),
            default_wce,
            swp: AtomicBool::new(false),
            sanitizing: AtomicBool::new(false),
            reset_generation: AtomicU64::new(0),
            mode_generation: AtomicU64::new(0),
            gate: write_gate::for_bdev(entry.id(), cores),
            reserved_by: Arc::new(AtomicU64::new(0)),
            pr: pr::for_bdev(entry.id(), entry.name(), pr_dir),
            entry,
        }
    }

    pub fn entry(&self) -> &Arc<BdevEntry> {
        &self.entry
    }

    pub fn identity(&self) -> &UnitIdentity {
        &self.ident
    }

    /// The current geometry (the block count is read from the bdev, which may grow).
    pub fn geometry(&self) -> Geometry {
        Geometry { block_size: self.block_size, num_blocks: self.entry.bdev().num_blocks() }
    }

    fn read_only(&self) -> bool {
        self.entry.bdev().read_only()
    }

    /// Whether writes are refused: the bdev is read-only or a host set SWP.
    fn write_protected(&self) -> bool {
        self.swp.load(Relaxed) || self.read_only()
    }

    /// A reset of the unit (LOGICAL UNIT RESET through `_from`, or a target reset): every
    /// nexus, `_from`'s included, reports POWER ON, RESET, OR BUS DEVICE RESET OCCURRED on its
    /// next command (SAM-5 §6.3.3: the unit attention is for every I_T nexus; multipath hosts
    /// rely on seeing it on each path).
    pub fn reset(&self, _from: &Nexus) {
        // A reset releases a RESERVE(6) reservation (SPC-2 §5.5.1.1).
        self.reserved_by.store(0, Relaxed);
        self.reset_generation.fetch_add(1, Relaxed);
    }

    /// Opens the current core's nexus on this unit for the I_T nexus `it`.
    pub fn nexus(&self, it: ItNexus) -> Result<Nexus, BdevError> {
        Ok(Nexus {
            id: NEXT_NEXUS.fetch_add(1, Relaxed),
            it,
            seen_pr_uas: Cell::new(0),
            copy_results: RefCell::new(VecDeque::new()),
            pr_access: Cell::new((None, true, true)),
            reserved_by: self.reserved_by.clone(),
            channel: Channel::get(&self.entry)?,
            unit_attentions: RefCell::new(VecDeque::new()),
            seen_reset: Cell::new(self.reset_generation.load(Relaxed)),
            seen_mode: Cell::new(self.mode_generation.load(Relaxed)),
            seen_blocks: Cell::new(self.entry.bdev().num_blocks()),
        })
    }

    /// Holds blocks `lba..lba+blocks` for an ordinary write (no lock unless an atomic command
    /// runs: see [`write_gate`]).
    async fn hold_write(&self, lba: u64, blocks: u64) -> Option<WriteHold<'_>> {
        if blocks == 0 {
            return None;
        }
        Some(self.gate.write(lba, blocks).await)
    }

    /// Holds blocks `lba..lba+blocks` against every other write of every unit on the bdev.
    async fn hold_exclusive(&self, lba: u64, blocks: u64) -> Option<Exclusive<'_>> {
        if blocks == 0 {
            return None;
        }
        Some(self.gate.exclusive(lba, blocks).await)
    }

    fn mode_state(&self) -> ModeState {
        ModeState { write_cache: self.write_cache.load(Relaxed), swp: self.swp.load(Relaxed) }
    }

    /// Runs one parsed command. `data_out` holds the Data-Out the transport received (possibly
    /// less than the command asked for: writes then cover only the whole blocks received);
    /// Data-In goes to `data_in`, which is at least `cmd.data_in_len()` long or, if shorter,
    /// truncates it.
    pub async fn execute(&self, nx: &Nexus, cmd: &Command, data_out: &[u8], data_in: &mut [u8], ctx: &Context<'_>) -> Result<Done, Failure> {
        let g = self.geometry();
        let holder = self.reserved_by.load(Relaxed);
        if holder != 0 && holder != nx.id && cmd.conflicts_with_reservation() {
            return Err(Failure::ReservationConflict);
        }
        if self.pr_conflict(nx, cmd.pr_access()) {
            return Err(Failure::ReservationConflict);
        }
        if cmd.blocked_by_unit_attention() {
            if let Some(ua) = nx.take_unit_attention(self) {
                return Err(Failure::Check(Sense::unit_attention(ua)));
            }
        }
        if self.sanitizing.load(Relaxed) && !cmd.allowed_during_sanitize() {
            return Err(Sense::new(SenseKey::NotReady, asc::SANITIZE_IN_PROGRESS).into());
        }
        if cmd.writes_medium() && self.write_protected() {
            return Err(Sense::new(SenseKey::DataProtect, asc::WRITE_PROTECTED).into());
        }
        let bs = g.block_size as usize;
        let ch = &nx.channel;
        match *cmd {
            // With persistent reservations in use, RESERVE(6) conflicts and RELEASE(6) does
            // nothing (SPC-4 §5.13.3, CRH = 1).
            Command::Reserve if self.pr.active() => Err(Failure::ReservationConflict),
            Command::Release if self.pr.active() => Ok(Done::good(0)),
            Command::ExtendedCopy { len } => {
                let Some(params) = data_out.get(..len as usize) else {
                    return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR).into());
                };
                let Some(plan) = xcopy::parse(params)? else { return Ok(Done::good(0)) };
                let mut result = CopyResult { list_id: plan.list_id, ok: false, segments_done: 0, bytes: 0 };
                let r = self.extended_copy(nx, &plan, ctx, &mut result).await;
                result.ok = r.is_ok();
                if !plan.discard {
                    nx.hold_copy_result(result);
                }
                r.map(|_| Done::good(0))
            }
            Command::ReceiveCopyResults { sa, list_id, alloc } => {
                let d = if sa == 0x03 {
                    xcopy::operating_parameters()
                } else {
                    match nx.copy_result(list_id) {
                        Some(r) => xcopy::copy_status(&r),
                        // No copy with this list identifier (SPC-4 §6.27.3).
                        None => return Err(Sense::invalid_cdb(2, None).into()),
                    }
                };
                Ok(Done::good(copy_out(&d, data_in, alloc)))
            }
            Command::PersistentReserveIn { sa, alloc } => {
                let d = self.pr.lock().read(sa)?;
                Ok(Done::good(copy_out(&d, data_in, alloc)))
            }
            Command::PersistentReserveOut { sa, scope, rtype, len } => {
                let Some(params) = data_out.get(..len as usize) else {
                    return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR).into());
                };
                match self.pr.out(&nx.it, OutCmd { sa, scope, rtype }, params) {
                    Ok(()) => Ok(Done::good(0)),
                    Err(PrError::Conflict) => Err(Failure::ReservationConflict),
                    Err(PrError::Check(s)) => Err(s.into()),
                }
            }
            Command::Reserve => match self.reserved_by.compare_exchange(0, nx.id, Relaxed, Relaxed) {
                Ok(_) => Ok(Done::good(0)),
                Err(h) if h == nx.id => Ok(Done::good(0)),
                Err(_) => Err(Failure::ReservationConflict),
            },
            Command::Release => {
                // Releasing someone else's reservation (or none) is a no-op.
                let _ = self.reserved_by.compare_exchange(nx.id, 0, Relaxed, Relaxed);
                Ok(Done::good(0))
            }
            Command::OrWrite { lba, blocks, fua } => {
                let n = (blocks as usize * bs).min(data_out.len() / bs * bs);
                if n == 0 {
                    return Ok(Done::good(0));
                }
                // Read, OR and write holding the blocks exclusively: atomic like COMPARE AND WRITE.
                let _lock = self.hold_exclusive(lba, (n / bs) as u64).await;
                let mut merged = IoBuf::alloc(n);
                ch.read_buf(lba, &mut merged).await.map_err(|e| bdev_failure(e, false))?;
                for (m, d) in merged.iter_mut().zip(&data_out[..n]) {
                    *m |= *d;
                }
                ch.write_buf(lba, &merged).await.map_err(|e| bdev_failure(e, true))?;
                self.after_write(ch, fua).await?;
                Ok(Done::good(0))
            }
            Command::Sanitize { sa, .. } => {
                if sa == cdb::op::SA_SANITIZE_EXIT_FAILURE_MODE {
                    // A failed sanitize leaves no failure mode behind here (its error is
                    // reported and the unit stays usable), so there is nothing to exit.
                    return Ok(Done::good(0));
                }
                if !self.ident.thin {
                    // BLOCK ERASE is offered only where blocks can be deallocated.
                    return Err(Sense::invalid_cdb(1, Some(4)).into());
                }
                // IMMED is accepted, and the command still completes when the erase has: a
                // deallocation of the whole unit takes about as long as a flush.
                self.block_erase(ch, &g).await?;
                Ok(Done::good(0))
            }
            Command::TestUnitReady | Command::StartStopUnit | Command::PreventAllow | Command::Prefetch { .. } => Ok(Done::good(0)),
            Command::RequestSense { desc, alloc } => {
                nx.refresh(self);
                let s = nx.unit_attentions.borrow_mut().pop_front().map(Sense::unit_attention).unwrap_or(Sense::new(SenseKey::NoSense, asc::NO_ADDITIONAL));
                let mut buf = [0u8; MAX_SENSE_LEN];
                let n = if desc {
                    s.descriptor(&mut buf)
                } else {
                    buf[..FIXED_SENSE_LEN].copy_from_slice(&s.fixed());
                    FIXED_SENSE_LEN
                };
                Ok(Done::good(copy_out(&buf[..n], data_in, alloc)))
            }
            Command::Inquiry { evpd, page, alloc } => {
                if !evpd {
                    return Ok(Done::good(copy_out(&inquiry::standard(), data_in, alloc)));
                }
                let v = inquiry::vpd(page, &self.ident, &g, ctx.port)?;
                Ok(Done::good(copy_out(&v, data_in, alloc)))
            }
            Command::ModeSense { ten, dbd, llbaa, pc, page, subpage, alloc } => {
                let d = mode::sense(ten, dbd, llbaa, pc, page, subpage, &g, &self.mode_state(), self.default_wce, self.read_only())?;
                Ok(Done::good(copy_out(&d, data_in, alloc)))
            }
            Command::ModeSelect { ten, len, .. } => {
                let data = &data_out[..data_out.len().min(len as usize)];
                if data.len() < len as usize {
                    return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR).into());
                }
                let before = self.mode_state();
                let after = mode::select(ten, data, &g, &before)?;
                if after != before {
                    self.write_cache.store(after.write_cache, Relaxed);
                    self.swp.store(after.swp, Relaxed);
                    let gen = self.mode_generation.fetch_add(1, Relaxed) + 1;
                    nx.seen_mode.set(gen);
                }
                Ok(Done::good(0))
            }
            Command::ReadCapacity10 => {
                let last = g.num_blocks - 1;
                let mut d = [0u8; 8];
                d[..4].copy_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
                d[4..].copy_from_slice(&g.block_size.to_be_bytes());
                Ok(Done::good(copy_out(&d, data_in, 8)))
            }
            Command::ReadCapacity16 { alloc } => {
                let mut d = [0u8; 32];
                d[..8].copy_from_slice(&(g.num_blocks - 1).to_be_bytes());
                d[8..12].copy_from_slice(&g.block_size.to_be_bytes());
                if self.ident.thin {
                    d[14] = 0x80 | 0x40; // LBPME, LBPRZ
                }
                Ok(Done::good(copy_out(&d, data_in, alloc)))
            }
            Command::GetLbaStatus { lba, alloc } => {
                let d = self.lba_status(ch, lba, alloc, &g).await?;
                Ok(Done::good(copy_out(&d, data_in, alloc)))
            }
            Command::Read { lba, blocks, .. } => {
                let n = blocks as usize * bs;
                if n == 0 {
                    return Ok(Done::good(0));
                }
                if data_in.len() < n {
                    // The transport sized the buffer from the command; anything else is a bug.
                    debug_assert!(false, "Data-In buffer shorter than the read");
                    return Err(Sense::new(SenseKey::HardwareError, asc::INTERNAL_TARGET_FAILURE).into());
                }
                ch.read_buf(lba, &mut data_in[..n]).await.map_err(|e| bdev_failure(e, false))?;
                Ok(Done::good(n))
            }
            Command::Write { lba, blocks, fua } => {
                let n = (blocks as usize * bs).min(data_out.len() / bs * bs);
                if n > 0 {
                    let _lock = self.hold_write(lba, (n / bs) as u64).await;
                    ch.write_buf(lba, &data_out[..n]).await.map_err(|e| bdev_failure(e, true))?;
                    self.after_write(ch, fua).await?;
                }
                Ok(Done::good(0))
            }
            Command::WriteVerify { lba, blocks } => {
                let n = (blocks as usize * bs).min(data_out.len() / bs * bs);
                if n > 0 {
                    let _lock = self.hold_write(lba, (n / bs) as u64).await;
                    ch.write_buf(lba, &data_out[..n]).await.map_err(|e| bdev_failure(e, true))?;
                    // Verification reads back what the medium holds: make it durable first.
                    ch.flush().await.map_err(|e| bdev_failure(e, true))?;
                }
                Ok(Done::good(0))
            }
            Command::Verify { lba, blocks, bytchk } => {
                if blocks == 0 {
                    return Ok(Done::good(0));
                }
                let n = blocks as usize * bs;
                let mut medium = IoBuf::alloc(n);
                ch.read_buf(lba, &mut medium).await.map_err(|e| bdev_failure(e, false))?;
                match bytchk {
                    1 => {
                        let expect = &data_out[..data_out.len().min(n)];
                        if let Some(off) = first_difference(&medium[..expect.len()], expect) {
                            return Err(Sense::miscompare(off as u64).into());
                        }
                    }
                    3 => {
                        let Some(pattern) = data_out.get(..bs) else { return Ok(Done::good(0)) };
                        for (i, block) in medium.chunks(bs).enumerate() {
                            if let Some(off) = first_difference(block, pattern) {
                                return Err(Sense::miscompare((i * bs + off) as u64).into());
                            }
                        }
                    }
                    _ => {}
                }
                Ok(Done::good(0))
            }
            Command::SyncCache { .. } => {
                ch.flush().await.map_err(|e| bdev_failure(e, true))?;
                Ok(Done::good(0))
            }
            Command::WriteSame { lba, blocks, unmap, ndob } => {
                if blocks == 0 {
                    // Zero blocks from the last LBA + 1: nothing left to write.
                    return Ok(Done::good(0));
                }
                let zero_block = [0u8; 0];
                let pattern: &[u8] = if ndob {
                    &zero_block
                } else {
                    match data_out.get(..bs) {
                        Some(p) => p,
                        // The host sent less than one block: nothing to write.
                        None => return Ok(Done::good(0)),
                    }
                };
                let _lock = self.hold_write(lba, blocks as u64).await;
                self.write_same(ch, lba, blocks as u64, pattern, unmap).await?;
                Ok(Done::good(0))
            }
            Command::Unmap { len } => {
                if !self.ident.thin {
                    return Err(Sense::invalid_opcode().into());
                }
                self.unmap(ch, &data_out[..data_out.len().min(len as usize)], &g).await?;
                Ok(Done::good(0))
            }
            Command::CompareAndWrite { lba, blocks, fua } => {
                let n = blocks as usize * bs;
                // The Data-Out must hold exactly the compare and the write halves (SBC-3
                // §5.2): anything else means the host and the CDB disagree on the length.
                if ctx.data_out_expected != 2 * n as u64 {
                    return Err(Sense::invalid_cdb(13, None).into());
                }
                if blocks == 0 {
                    return Ok(Done::good(0));
                }
                if data_out.len() < 2 * n {
                    return Err(Sense::invalid_cdb(13, None).into());
                }
                // Atomic against every other write to these blocks, from any unit on the bdev
                // (the gate drains writes in flight there and holds later ones).
                let _lock = self.hold_exclusive(lba, blocks as u64).await;
                let mut medium = IoBuf::alloc(n);
                ch.read_buf(lba, &mut medium).await.map_err(|e| bdev_failure(e, false))?;
                if let Some(off) = first_difference(&medium, &data_out[..n]) {
                    return Err(Sense::miscompare(off as u64).into());
                }
                ch.write_buf(lba, &data_out[n..2 * n]).await.map_err(|e| bdev_failure(e, true))?;
                self.after_write(ch, fua).await?;
                Ok(Done::good(0))
            }
            Command::ReportLuns { select, alloc } => {
                let d = report_luns(select, ctx.luns);
                Ok(Done::good(copy_out(&d, data_in, alloc)))
            }
            Command::ReportOpcodes { rctd, options, opcode, sa, alloc } => {
                let d = report_opcodes(rctd, options, opcode, sa, self.ident.thin)?;
                Ok(Done::good(copy_out(&d, data_in, alloc)))
            }
            Command::ReportTmfs { alloc } => {
                // ABORT TASK, ABORT TASK SET, LOGICAL UNIT RESET, TARGET RESET.
                let d = [0x80 | 0x40 | 0x08 | 0x02, 0, 0, 0];
                Ok(Done::good(copy_out(&d, data_in, alloc)))
            }
        }
    }

    /// Whether a command of kind `access` from `nx` meets a persistent reservation conflict.
    /// Without registrations nothing is locked; with them, the nexus's cached access is used
    /// until the state changes (a counter), so commands do not take the lock one by one.
    fn pr_conflict(&self, nx: &Nexus, access: Access) -> bool {
        if access == Access::Always || !self.pr.active() {
            return false;
        }
        let now = self.pr.changes();
        let (seen, read, write) = nx.pr_access.get();
        let (read, write) = if seen == Some(now) {
            (read, write)
        } else {
            let (r, w) = self.pr.access(&nx.it);
            nx.pr_access.set((Some(now), r, w));
            (r, w)
        };
        match access {
            Access::Read => !read,
            Access::Write => !write,
            Access::Always => false,
        }
    }

    /// The unit an identification descriptor names, among this unit and the target's others.
    fn copy_unit(&self, c: &xcopy::Cscd, ctx: &Context<'_>) -> Option<CopyUnit> {
        if c.null {
            return None;
        }
        let names = |u: &LogicalUnit| match c.designator_type {
            3 => c.designator == inquiry::naa(&u.ident),
            2 => c.designator == inquiry::eui64(&u.ident),
            _ => false,
        };
        if names(self) {
            return Some(CopyUnit::This);
        }
        let peers = ctx.peers?;
        peers().into_iter().find(|u| names(u)).map(CopyUnit::Other)
    }

    /// Runs a validated EXTENDED COPY: every segment is checked (units reachable, ranges,
    /// reservations) before the first block moves; then each segment is copied in chunks of
    /// [`xcopy::CHUNK_BYTES`] through one buffer, each chunk written as an ordinary write.
    async fn extended_copy(&self, nx: &Nexus, plan: &xcopy::Plan, ctx: &Context<'_>, result: &mut CopyResult) -> Result<(), Failure> {
        let units: Vec<Option<CopyUnit>> = plan.cscds.iter().map(|c| self.copy_unit(c, ctx)).collect();
        let unit_at = |i: u16| -> Result<&LogicalUnit, Failure> {
            match units.get(i as usize) {
                Some(Some(CopyUnit::This)) => Ok(self),
                Some(Some(CopyUnit::Other(u))) => Ok(u),
                _ => Err(xcopy::unreachable().into()),
            }
        };
        let mut largest = 0u64;
        for (seg, i) in plan.segments.iter().zip(0u16..) {
            let (src, dst) = (unit_at(seg.src)?, unit_at(seg.dst)?);
            let bs = src.block_size;
            for (u, c) in [(src, &plan.cscds[seg.src as usize]), (dst, &plan.cscds[seg.dst as usize])] {
                if u.block_size != bs || (c.block_len != 0 && c.block_len != bs) {
                    return Err(xcopy::unreachable().into());
                }
            }
            let blocks = seg.blocks as u64;
            let (sg, dg) = (src.geometry(), dst.geometry());
            if seg.src_lba.checked_add(blocks).is_none_or(|e| e > sg.num_blocks) || seg.dst_lba.checked_add(blocks).is_none_or(|e| e > dg.num_blocks) {
                return Err(xcopy::aborted(asc::NO_ADDITIONAL).into());
            }
            if blocks * bs as u64 > xcopy::MAX_SEGMENT_BYTES {
                return Err(Sense::invalid_param(16 + 32 * plan.cscds.len() as u16 + 28 * i + 10, None).into());
            }
            largest = largest.max(blocks * bs as u64);
            // Looked up, not cached: `nx` caches its access to this unit's state only.
            let (src_read, _) = if src.pr.active() { src.pr.access(&nx.it) } else { (true, true) };
            let (_, dst_write) = if dst.pr.active() { dst.pr.access(&nx.it) } else { (true, true) };
            if !src_read || !dst_write {
                return Err(Failure::ReservationConflict);
            }
            if dst.write_protected() {
                return Err(Sense::new(SenseKey::DataProtect, asc::WRITE_PROTECTED).into());
            }
        }
        let mut buf = IoBuf::alloc((largest as usize).clamp(1, xcopy::CHUNK_BYTES));
        for seg in &plan.segments {
            let (src, dst) = (unit_at(seg.src)?, unit_at(seg.dst)?);
            let (src_owned, dst_owned);
            let src_ch = if std::ptr::eq(src, self) {
                &nx.channel
            } else {
                src_owned = Channel::get(&src.entry).map_err(|e| bdev_failure(e, false))?;
                &src_owned
            };
            let dst_ch = if std::ptr::eq(dst, self) {
                &nx.channel
            } else {
                dst_owned = Channel::get(&dst.entry).map_err(|e| bdev_failure(e, true))?;
                &dst_owned
            };
            let bs = src.block_size as u64;
            let per_chunk = (buf.len() as u64 / bs).max(1);
            let blocks = seg.blocks as u64;
            let chunks = blocks.div_ceil(per_chunk);
            // A copy forward within one unit onto a later, overlapping range goes backwards,
            // so that no block is overwritten before it is read.
            let backwards = std::ptr::eq(src, dst) && seg.dst_lba > seg.src_lba && seg.dst_lba < seg.src_lba + blocks;
            for k in 0..chunks {
                let k = if backwards { chunks - 1 - k } else { k };
                let off = k * per_chunk;
                let n = per_chunk.min(blocks - off);
                let bytes = (n * bs) as usize;
                src_ch.read_buf(seg.src_lba + off, &mut buf[..bytes]).await.map_err(|e| bdev_failure(e, false))?;
                let _lock = dst.hold_write(seg.dst_lba + off, n).await;
                dst_ch.write_buf(seg.dst_lba + off, &buf[..bytes]).await.map_err(|e| bdev_failure(e, true))?;
                result.bytes += bytes as u64;
            }
            dst.after_write(dst_ch, false).await?;
            result.segments_done += 1;
        }
        Ok(())
    }

    /// Write-through when the write cache is off, or when the host asked for FUA.
    async fn after_write(&self, ch: &Channel, fua: bool) -> Result<(), Failure> {
        if fua || !self.write_cache.load(Relaxed) {
            ch.flush().await.map_err(|e| bdev_failure(e, true))?;
        }
        Ok(())
    }

    /// SANITIZE BLOCK ERASE: every block deallocated (they then read as zeros, LBPRZ). Other
    /// commands get NOT READY meanwhile; writes already running finish first (the erase takes
    /// each range it deallocates exclusively).
    async fn block_erase(&self, ch: &Channel, g: &Geometry) -> Result<(), Failure> {
        if self.sanitizing.compare_exchange(false, true, Relaxed, Relaxed).is_err() {
            return Err(Sense::new(SenseKey::NotReady, asc::SANITIZE_IN_PROGRESS).into());
        }
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Relaxed);
            }
        }
        let _running = Running(&self.sanitizing);
        // In pieces the size UNMAP allows, so that no bdev sees a range larger than a host
        // could send it; each piece waits for the writes still running in it.
        let step = cdb::max_unmap_blocks(g) as u64;
        let mut lba = 0;
        while lba < g.num_blocks {
            let n = step.min(g.num_blocks - lba);
            let _lock = self.hold_exclusive(lba, n).await;
            ch.unmap(lba, n).await.map_err(|e| bdev_failure(e, true))?;
            lba += n;
        }
        ch.flush().await.map_err(|e| bdev_failure(e, true))
    }

    async fn write_same(&self, ch: &Channel, lba: u64, blocks: u64, pattern: &[u8], unmap: bool) -> Result<(), Failure> {
        let zeros = pattern.iter().all(|&b| b == 0);
        // UNMAP set: the blocks are unmapped whatever the data (SBC-3 §5.42); they then read
        // as zeros (LBPRZ), which is what hosts check.
        if unmap && ch.supports(IoType::Unmap) {
            return ch.unmap(lba, blocks).await.map_err(|e| bdev_failure(e, true));
        }
        if zeros && ch.supports(IoType::WriteZeroes) {
            return ch.write_zeroes(lba, blocks).await.map_err(|e| bdev_failure(e, true));
        }
        let bs = self.block_size as usize;
        let chunk_blocks = ((1usize << 20) / bs).min(blocks as usize).max(1);
        let mut buf = IoBuf::alloc(chunk_blocks * bs);
        for block in buf.chunks_mut(bs) {
            if zeros {
                block.fill(0);
            } else {
                block.copy_from_slice(pattern);
            }
        }
        let mut done = 0u64;
        while done < blocks {
            let n = (blocks - done).min(chunk_blocks as u64) as usize;
            ch.write_buf(lba + done, &buf[..n * bs]).await.map_err(|e| bdev_failure(e, true))?;
            done += n as u64;
        }
        self.after_write(ch, false).await
    }

    /// GET LBA STATUS: this target keeps no allocation map, but unmapped blocks read as zeros
    /// (LBPRZ), so a block that reads as zeros is reported deallocated and any other mapped.
    /// The scan covers at most [`LBA_STATUS_SCAN_BYTES`]; the last descriptor ends there.
    async fn lba_status(&self, ch: &Channel, lba: u64, alloc: u32, g: &Geometry) -> Result<Vec<u8>, Failure> {
        let bs = g.block_size as usize;
        let remaining = g.num_blocks - lba;
        let max_desc = ((alloc as usize).saturating_sub(8) / 16).clamp(1, 64);
        let mut runs: Vec<(u64, u64, u8)> = Vec::new();
        if !self.ident.thin {
            runs.push((lba, remaining, 0));
        } else {
            // Read in chunks until the descriptors are full, the unit ends or the scan budget
            // is spent, so that a long uniform run (a sanitized or fresh unit) is reported
            // whole: hosts and libiscsi's SANITIZE test expect one descriptor to the end.
            let total = remaining.min(LBA_STATUS_SCAN_BYTES / bs as u64);
            let chunk = total.min(LBA_STATUS_CHUNK_BYTES / bs as u64).max(1);
            let mut buf = IoBuf::alloc(chunk as usize * bs);
            let mut done = 0u64;
            'scan: while done < total {
                let n = chunk.min(total - done);
                let bytes = &mut buf[..n as usize * bs];
                ch.read_buf(lba + done, bytes).await.map_err(|e| bdev_failure(e, false))?;
                for (i, block) in bytes.chunks(bs).enumerate() {
                    let state = u8::from(is_zero(block));
                    let full = runs.len() == max_desc;
                    match runs.last_mut() {
                        Some(r) if r.2 == state => r.1 += 1,
                        _ if full => break 'scan,
                        _ => runs.push((lba + done + i as u64, 1, state)),
                    }
                }
                done += n;
            }
        }
        let mut d = Vec::with_capacity(8 + 16 * runs.len());
        d.extend_from_slice(&((4 + 16 * runs.len()) as u32).to_be_bytes());
        d.extend_from_slice(&[0; 4]);
        for (start, count, state) in runs {
            d.extend_from_slice(&start.to_be_bytes());
            d.extend_from_slice(&(count.min(u32::MAX as u64) as u32).to_be_bytes());
            d.push(state);
            d.extend_from_slice(&[0; 3]);
        }
        Ok(d)
    }

    async fn unmap(&self, ch: &Channel, list: &[u8], g: &Geometry) -> Result<(), Failure> {
        if list.is_empty() {
            return Ok(());
        }
        if list.len() < 8 {
            return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR).into());
        }
        let bd_len = u16::from_be_bytes([list[2], list[3]]) as usize;
        let descs = &list[8..(8 + bd_len).min(list.len())];
        let count = descs.len() / 16;
        if count as u32 > cdb::MAX_UNMAP_DESCRIPTORS {
            return Err(Sense::invalid_param(2, None).into());
        }
        let parse = |i: usize| {
            let d = &descs[i * 16..i * 16 + 16];
            let mut l = [0u8; 8];
            l.copy_from_slice(&d[..8]);
            (u64::from_be_bytes(l), u32::from_be_bytes([d[8], d[9], d[10], d[11]]))
        };
        // Check every descriptor before unmapping anything.
        for i in 0..count {
            let (lba, n) = parse(i);
            if lba > g.num_blocks || lba + n as u64 > g.num_blocks {
                return Err(Sense::lba_out_of_range().into());
            }
            if n > cdb::max_unmap_blocks(g) {
                return Err(Sense::invalid_param((8 + i * 16 + 8) as u16, None).into());
            }
        }
        for i in 0..count {
            let (lba, n) = parse(i);
            if n > 0 {
                let _lock = self.hold_write(lba, n as u64).await;
                ch.unmap(lba, n as u64).await.map_err(|e| bdev_failure(e, true))?;
            }
        }
        Ok(())
    }
}

/// Most bytes GET LBA STATUS reads to find unmapped (all-zero) blocks: the target keeps no
/// allocation map, so the scan is the cost of an answer (a host asks rarely, and a RAM or
/// NVMe bdev reads this in well under a second).
const LBA_STATUS_SCAN_BYTES: u64 = 256 << 20;
/// GET LBA STATUS reads through one buffer of this size.
const LBA_STATUS_CHUNK_BYTES: u64 = 1 << 20;

/// Whether a block is all zeros (slice comparison: memcmp, fast in debug builds too).
fn is_zero(block: &[u8]) -> bool {
    static ZEROS: [u8; 4096] = [0; 4096];
    block.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Copies `data` into `out`, at most `alloc` bytes; returns the bytes copied.
fn copy_out(data: &[u8], out: &mut [u8], alloc: u32) -> usize {
    let n = data.len().min(alloc as usize).min(out.len());
    out[..n].copy_from_slice(&data[..n]);
    n
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// One connection's view of a logical unit, on the connection's core.
pub struct Nexus {
    id: u64,
    /// The I_T nexus (initiator port, target port) persistent reservations know it by.
    it: ItNexus,
    /// The unit's count of persistent-reservation unit attentions last looked at.
    seen_pr_uas: Cell<u64>,
    /// Persistent reservation access cached at a count of state changes: (count, reads
    /// allowed, writes allowed).
    pr_access: Cell<(Option<u64>, bool, bool)>,
    /// Results of this nexus's recent EXTENDED COPY commands (RECEIVE COPY RESULTS).
    copy_results: RefCell<VecDeque<CopyResult>>,
    reserved_by: Arc<AtomicU64>,
    channel: Channel,
    unit_attentions: RefCell<VecDeque<(u8, u8)>>,
    seen_reset: Cell<u64>,
    seen_mode: Cell<u64>,
    seen_blocks: Cell<u64>,
}

/// Most unit attentions queued on one nexus; older ones are the ones kept.
const MAX_UNIT_ATTENTIONS: usize = 8;

impl Drop for Nexus {
    fn drop(&mut self) {
        // The I_T nexus is gone (logout, dropped connection): its reservation goes too.
        let _ = self.reserved_by.compare_exchange(self.id, 0, Relaxed, Relaxed);
    }
}

impl Nexus {
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Queues a unit attention (once: a condition already pending is not repeated).
    pub fn add_unit_attention(&self, code: (u8, u8)) {
        let mut q = self.unit_attentions.borrow_mut();
        if !q.contains(&code) && q.len() < MAX_UNIT_ATTENTIONS {
            q.push_back(code);
        }
    }

    /// Keeps the result of a copy, replacing an older one with the same list identifier; the
    /// oldest goes beyond [`xcopy::MAX_HELD_RESULTS`].
    fn hold_copy_result(&self, r: CopyResult) {
        let mut q = self.copy_results.borrow_mut();
        q.retain(|x| x.list_id != r.list_id);
        if q.len() == xcopy::MAX_HELD_RESULTS {
            q.pop_front();
        }
        q.push_back(r);
    }

    fn copy_result(&self, list_id: u8) -> Option<CopyResult> {
        self.copy_results.borrow().iter().find(|x| x.list_id == list_id).copied()
    }

    /// Drops every pending unit attention (the nexus itself was reset).
    pub fn clear_unit_attentions(&self) {
        self.unit_attentions.borrow_mut().clear();
    }

    /// Turns changes made elsewhere (resets, mode changes, capacity) into unit attentions.
    fn refresh(&self, lu: &LogicalUnit) {
        let r = lu.reset_generation.load(Relaxed);
        if r != self.seen_reset.get() {
            self.seen_reset.set(r);
            // A reset clears every other condition (SAM-5 §5.14).
            self.unit_attentions.borrow_mut().clear();
            self.add_unit_attention(asc::POWER_ON_RESET);
        }
        let m = lu.mode_generation.load(Relaxed);
        if m != self.seen_mode.get() {
            self.seen_mode.set(m);
            self.add_unit_attention(asc::MODE_PARAMETERS_CHANGED);
        }
        let p = lu.pr.ua_generation();
        if p != self.seen_pr_uas.get() {
            self.seen_pr_uas.set(p);
            for code in lu.pr.lock().take_unit_attentions(&self.it) {
                self.add_unit_attention(code);
            }
        }
        let b = lu.entry.bdev().num_blocks();
        if b != self.seen_blocks.get() {
            self.seen_blocks.set(b);
            self.add_unit_attention(asc::CAPACITY_DATA_HAS_CHANGED);
        }
    }

    fn take_unit_attention(&self, lu: &LogicalUnit) -> Option<(u8, u8)> {
        self.refresh(lu);
        self.unit_attentions.borrow_mut().pop_front()
    }

    /// Whether a unit attention would be reported (without consuming it).
    pub fn has_unit_attention(&self, lu: &LogicalUnit) -> bool {
        self.refresh(lu);
        !self.unit_attentions.borrow().is_empty()
    }
}

/// REPORT LUNS parameter data.
pub fn report_luns(select: u8, luns: &[u64]) -> Vec<u8> {
    // Select 01h asks for well-known LUNs only, and this target has none.
    let list: &[u64] = if select == 0x01 { &[] } else { luns };
    let mut d = Vec::with_capacity(8 + 8 * list.len());
    d.extend_from_slice(&((8 * list.len()) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for &l in list {
        d.extend_from_slice(&encode_lun(l));
    }
    d
}

/// SAM LUN encoding: peripheral addressing below 256, flat addressing up to 16383.
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        b[0] = 0x40 | ((lun >> 8) as u8 & 0x3F);
        b[1] = lun as u8;
    }
    b
}

/// Largest LUN number [`encode_lun`] can express.
pub const MAX_LUN: u64 = 0x3FFF;

/// Decodes a LUN field; None for addressing methods this target never reports.
pub fn decode_lun(b: &[u8; 8]) -> Option<u64> {
    if b[2..] != [0; 6] {
        return None;
    }
    match b[0] >> 6 {
        0 if b[0] == 0 => Some(b[1] as u64),
        1 => Some(((b[0] & 0x3F) as u64) << 8 | b[1] as u64),
        _ => None,
    }
}

fn report_opcodes(rctd: bool, options: u8, opcode: u8, sa: u16, thin: bool) -> Result<Vec<u8>, Sense> {
    // UNMAP and SANITIZE BLOCK ERASE need a bdev that deallocates blocks.
    let supported = |i: &&cdb::OpcodeInfo| {
        thin || !(i.opcode == cdb::op::UNMAP || (i.opcode == cdb::op::SANITIZE && i.sa == Some(cdb::op::SA_SANITIZE_BLOCK_ERASE as u16)))
    };
    let timeouts = |d: &mut Vec<u8>| {
        d.extend_from_slice(&[0x00, 0x0A, 0, 0]);
        d.extend_from_slice(&[0; 8]);
    };
    let mut d = Vec::new();
    match options {
        0 => {
            d.extend_from_slice(&[0; 4]);
            for i in cdb::SUPPORTED.iter().filter(supported) {
                d.push(i.opcode);
                d.push(0);
                d.extend_from_slice(&i.sa.unwrap_or(0).to_be_bytes());
                d.push(0);
                d.push(if rctd { 0x02 } else { 0 } | if i.sa.is_some() { 0x01 } else { 0 });
                d.extend_from_slice(&(i.usage.len() as u16).to_be_bytes());
                if rctd {
                    timeouts(&mut d);
                }
            }
            let len = (d.len() - 4) as u32;
            d[..4].copy_from_slice(&len.to_be_bytes());
        }
        _ => {
            let has_sa = cdb::SUPPORTED.iter().any(|i| i.opcode == opcode && i.sa.is_some());
            let want_sa = match options {
                1 if has_sa => return Err(Sense::invalid_cdb(2, Some(2))),
                1 => None,
                2 if !has_sa && cdb::SUPPORTED.iter().any(|i| i.opcode == opcode) => return Err(Sense::invalid_cdb(2, Some(2))),
                2 => Some(sa),
                _ => has_sa.then_some(sa),
            };
            let found = cdb::SUPPORTED.iter().filter(supported).find(|i| i.opcode == opcode && i.sa == want_sa);
            d.push(0);
            match found {
                Some(i) => {
                    d.push(if rctd { 0x80 } else { 0 } | 0x03);
                    d.extend_from_slice(&(i.usage.len() as u16).to_be_bytes());
                    d.extend_from_slice(i.usage);
                    if rctd {
                        timeouts(&mut d);
                    }
                }
                None => {
                    d.push(0x01);
                    d.extend_from_slice(&[0, 0]);
                }
            }
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::BdevRegistry;
    use crate::bdevs::malloc::MallocBdev;
    use crate::reactor::{self, ManualCores};
    use std::rc::Rc;

    fn test_it(n: u8) -> ItNexus {
        ItNexus::iscsi("iqn.2026-01.test:host", [0x40, 0, 0, 0, 0, n], "iqn.x", 1)
    }

    fn unit(reg: &BdevRegistry) -> Arc<LogicalUnit> {
        let e = reg.register(Arc::new(MallocBdev::new("m", 64, 512, None).unwrap())).unwrap();
        Arc::new(LogicalUnit::new(e, 1))
    }

    async fn exec(lu: &LogicalUnit, nx: &Nexus, cdb_bytes: &[u8], out: &[u8]) -> Result<(Done, Vec<u8>), Failure> {
        let port = PortIdentity { target_name: "iqn.x".into(), portal_group_tag: 1 };
        let ctx = Context { port: &port, luns: &[0, 3], data_out_expected: out.len() as u64, peers: None };
        let cmd = cdb::parse(cdb_bytes, &lu.geometry())?;
        let mut din = vec![0u8; cmd.data_in_len(&lu.geometry()) as usize];
        let d = lu.execute(nx, &cmd, out, &mut din, &ctx).await?;
        din.truncate(d.data_len);
        Ok((d, din))
    }

    #[test]
    fn write_read_compare_and_write_and_miscompare() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let lu = unit(&reg);
        cores.block_on(0, async move {
            let nx = lu.nexus(test_it(1)).unwrap();
            let data = vec![0xABu8; 1024];
            exec(&lu, &nx, &[0x2A, 0, 0, 0, 0, 4, 0, 0, 2, 0], &data).await.unwrap();
            let (_, back) = exec(&lu, &nx, &[0x28, 0, 0, 0, 0, 4, 0, 0, 2, 0], &[]).await.unwrap();
            assert_eq!(back, data);
            let mut caw = vec![0xABu8; 512];
            caw.extend(vec![0x11u8; 512]);
            let c = [0x89, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0];
            exec(&lu, &nx, &c, &caw).await.unwrap();
            // Now block 4 holds 0x11: the same compare fails at offset 0.
            let e = exec(&lu, &nx, &c, &caw).await.unwrap_err();
            let Failure::Check(s) = e else { panic!("{e:?}") };
            assert_eq!((s.key, s.asc, s.info), (SenseKey::Miscompare, 0x1D, Some(0)));
            // Out of range.
            let e = exec(&lu, &nx, &[0x28, 0, 0, 0, 0, 63, 0, 0, 2, 0], &[]).await.unwrap_err();
            assert_eq!(e, Failure::Check(Sense::lba_out_of_range()));
        });
    }

    #[test]
    fn compare_and_write_waits_for_an_overlapping_write() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let lu = unit(&reg);
        let held = Rc::new(Cell::new(false));
        let (release, released) = futures::channel::oneshot::channel::<()>();
        let h = held.clone();
        let l = lu.clone();
        // A write to blocks 4..6 is in flight (holds its range until released).
        cores.enter(0, || {
            reactor::spawn_detached(async move {
                let _hold = l.hold_write(4, 2).await;
                h.set(true);
                let _ = released.await;
            })
        });
        cores.run_until_idle();
        assert!(held.get());
        let done = Rc::new(Cell::new(false));
        let d = done.clone();
        let l = lu.clone();
        cores.enter(0, || {
            reactor::spawn_detached(async move {
                let nx = l.nexus(test_it(1)).unwrap();
                let mut caw = vec![0u8; 512];
                caw.extend(vec![0x22u8; 512]);
                exec(&l, &nx, &[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0], &caw).await.unwrap();
                d.set(true);
            })
        });
        cores.run_until_idle();
        assert!(!done.get(), "COMPARE AND WRITE ran while an overlapping write held its blocks");
        let _ = release.send(());
        cores.run_until_idle();
        assert!(done.get(), "COMPARE AND WRITE runs once the write is done");
    }

    #[test]
    fn lun_reset_raises_a_unit_attention_on_every_nexus() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let lu = unit(&reg);
        cores.block_on(0, async move {
            let a = lu.nexus(test_it(1)).unwrap();
            let b = lu.nexus(test_it(2)).unwrap();
            lu.reset(&a);
            // INQUIRY runs in spite of the pending condition.
            assert!(exec(&lu, &b, &[0x12, 0, 0, 0, 36, 0], &[]).await.is_ok());
            for nx in [&b, &a] {
                let e = exec(&lu, nx, &[0, 0, 0, 0, 0, 0], &[]).await.unwrap_err();
                assert_eq!(e, Failure::Check(Sense::unit_attention(asc::POWER_ON_RESET)));
                assert!(exec(&lu, nx, &[0, 0, 0, 0, 0, 0], &[]).await.is_ok(), "reported once");
            }
        });
    }

    #[test]
    fn write_same_unmap_and_report_luns() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let lu = unit(&reg);
        cores.block_on(0, async move {
            let nx = lu.nexus(test_it(1)).unwrap();
            exec(&lu, &nx, &[0x41, 0, 0, 0, 0, 8, 0, 0, 4, 0], &[7u8; 512]).await.unwrap();
            let (_, back) = exec(&lu, &nx, &[0x28, 0, 0, 0, 0, 8, 0, 0, 4, 0], &[]).await.unwrap();
            assert!(back.iter().all(|&b| b == 7));
            let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
            list.extend_from_slice(&9u64.to_be_bytes());
            list.extend_from_slice(&2u32.to_be_bytes());
            list.extend_from_slice(&[0; 4]);
            exec(&lu, &nx, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list).await.unwrap();
            let (_, back) = exec(&lu, &nx, &[0x28, 0, 0, 0, 0, 8, 0, 0, 4, 0], &[]).await.unwrap();
            assert!(back[..512].iter().all(|&b| b == 7) && back[512..1536].iter().all(|&b| b == 0) && back[1536..].iter().all(|&b| b == 7));
            let (_, luns) = exec(&lu, &nx, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]).await.unwrap();
            assert_eq!(&luns[..4], &16u32.to_be_bytes());
            assert_eq!(luns[8 + 8 + 1], 3);
            // Unmap beyond the end.
            let mut bad = list.clone();
            bad[8..16].copy_from_slice(&63u64.to_be_bytes());
            let e = exec(&lu, &nx, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &bad).await.unwrap_err();
            assert_eq!(e, Failure::Check(Sense::lba_out_of_range()));
        });
    }

    #[test]
    fn reserve6_conflicts_for_other_nexuses_until_released_or_gone() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let lu = unit(&reg);
        cores.block_on(0, async move {
            let a = lu.nexus(test_it(1)).unwrap();
            let b = lu.nexus(test_it(2)).unwrap();
            let tur = [0u8, 0, 0, 0, 0, 0];
            exec(&lu, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await.unwrap();
            exec(&lu, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await.expect("the holder may reserve again");
            assert_eq!(exec(&lu, &b, &tur, &[]).await.unwrap_err(), Failure::ReservationConflict);
            assert_eq!(exec(&lu, &b, &[0x16, 0, 0, 0, 0, 0], &[]).await.unwrap_err(), Failure::ReservationConflict);
            assert!(exec(&lu, &b, &[0x12, 0, 0, 0, 36, 0], &[]).await.is_ok(), "INQUIRY does not conflict");
            exec(&lu, &b, &[0x17, 0, 0, 0, 0, 0], &[]).await.expect("RELEASE by another nexus is a no-op");
            assert_eq!(exec(&lu, &b, &tur, &[]).await.unwrap_err(), Failure::ReservationConflict);
            drop(a);
            assert!(exec(&lu, &b, &tur, &[]).await.is_ok(), "the reservation goes with its nexus");
            exec(&lu, &b, &[0x16, 0, 0, 0, 0, 0], &[]).await.unwrap();
            let c = lu.nexus(test_it(3)).unwrap();
            lu.reset(&c);
            assert_eq!(exec(&lu, &c, &tur, &[]).await.unwrap_err(), Failure::Check(Sense::unit_attention(asc::POWER_ON_RESET)));
            assert!(exec(&lu, &c, &tur, &[]).await.is_ok(), "a reset releases it");
        });
    }

    #[test]
    fn persistent_reservation_conflicts_and_unit_attentions_reach_the_nexus() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let lu = unit(&reg);
        cores.block_on(0, async move {
            let a = lu.nexus(test_it(1)).unwrap();
            let b = lu.nexus(test_it(2)).unwrap();
            let pr_out = |sa: u8, rtype: u8| [0x5F, sa, rtype, 0, 0, 0, 0, 0, 24, 0];
            let params = |key: u64, sa_key: u64| {
                let mut p = vec![0u8; 24];
                p[..8].copy_from_slice(&key.to_be_bytes());
                p[8..16].copy_from_slice(&sa_key.to_be_bytes());
                p
            };
            exec(&lu, &a, &pr_out(6, 0), &params(0, 0xAA)).await.unwrap();
            exec(&lu, &b, &pr_out(6, 0), &params(0, 0xBB)).await.unwrap();
            // RESERVE(6) conflicts while registrations exist; RELEASE(6) is a no-op.
            assert_eq!(exec(&lu, &b, &[0x16, 0, 0, 0, 0, 0], &[]).await.unwrap_err(), Failure::ReservationConflict);
            exec(&lu, &b, &[0x17, 0, 0, 0, 0, 0], &[]).await.unwrap();
            // A exclusive access: B's reads and writes conflict, its TUR and INQUIRY do not.
            exec(&lu, &a, &pr_out(1, 3), &params(0xAA, 0)).await.unwrap();
            assert_eq!(exec(&lu, &b, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]).await.unwrap_err(), Failure::ReservationConflict);
            assert_eq!(exec(&lu, &b, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0u8; 512]).await.unwrap_err(), Failure::ReservationConflict);
            assert!(exec(&lu, &b, &[0, 0, 0, 0, 0, 0], &[]).await.is_ok());
            exec(&lu, &a, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]).await.expect("the holder reads");
            // READ KEYS from B.
            let (_, keys) = exec(&lu, &b, &[0x5E, 0, 0, 0, 0, 0, 0, 0, 64, 0], &[]).await.unwrap();
            assert_eq!(&keys[4..8], &16u32.to_be_bytes());
            // B preempts A: A's next command reports REGISTRATIONS PREEMPTED, then conflicts.
            exec(&lu, &b, &pr_out(4, 1), &params(0xBB, 0xAA)).await.unwrap();
            let e = exec(&lu, &a, &[0, 0, 0, 0, 0, 0], &[]).await.unwrap_err();
            assert_eq!(e, Failure::Check(Sense::unit_attention(asc::REGISTRATIONS_PREEMPTED)));
            assert_eq!(exec(&lu, &a, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0u8; 512]).await.unwrap_err(), Failure::ReservationConflict);
            exec(&lu, &a, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]).await.expect("write exclusive lets A read");
            exec(&lu, &b, &pr_out(3, 0), &params(0xBB, 0)).await.unwrap();
            exec(&lu, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await.expect("RESERVE(6) works again once the PR state is clear");
        });
    }

    fn unit_of(reg: &BdevRegistry, name: &str, blocks: u64) -> Arc<LogicalUnit> {
        let e = reg.register(Arc::new(MallocBdev::new(name, blocks, 512, None).unwrap())).unwrap();
        Arc::new(LogicalUnit::new(e, 1))
    }

    /// GET LBA STATUS from `lba` with a 256-byte allocation: (start, blocks, state) per descriptor.
    async fn lba_status(lu: &LogicalUnit, nx: &Nexus, lba: u64) -> Vec<(u64, u32, u8)> {
        let mut c = [0u8; 16];
        c[0] = 0x9E;
        c[1] = 0x12;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&256u32.to_be_bytes());
        let (_, d) = exec(lu, nx, &c, &[]).await.unwrap();
        d[8..].chunks(16).map(|x| (u64::from_be_bytes(x[..8].try_into().unwrap()), u32::from_be_bytes(x[8..12].try_into().unwrap()), x[12])).collect()
    }

    const SANITIZE_BLOCK_ERASE: [u8; 10] = [0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0];

    #[test]
    fn get_lba_status_reports_a_uniform_unit_in_one_descriptor_to_its_end() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        // 8 MiB: beyond the 1 MiB the scan used to stop at.
        let lu = unit_of(&reg, "big", 16384);
        cores.block_on(0, async move {
            let nx = lu.nexus(test_it(1)).unwrap();
            assert_eq!(lba_status(&lu, &nx, 0).await, vec![(0, 16384, 1)]);
            exec(&lu, &nx, &[0x2A, 0, 0, 0, 0x30, 0, 0, 0, 2, 0], &[1u8; 1024]).await.unwrap();
            assert_eq!(lba_status(&lu, &nx, 100).await, vec![(100, 12188, 1), (12288, 2, 0), (12290, 4094, 1)]);
        });
    }

    #[test]
    fn sanitize_block_erase_deallocates_every_block() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let lu = unit_of(&reg, "san", 16384);
        cores.block_on(0, async move {
            let nx = lu.nexus(test_it(1)).unwrap();
            let first = [0x2A, 0, 0, 0, 0, 0, 0, 1, 0, 0];
            let last = [0x2A, 0, 0, 0, 0x3F, 0, 0, 1, 0, 0];
            for c in [first, last] {
                exec(&lu, &nx, &c, &[b'a'; 256 * 512]).await.unwrap();
            }
            assert_eq!(lba_status(&lu, &nx, 0).await.len(), 3);
            exec(&lu, &nx, &SANITIZE_BLOCK_ERASE, &[]).await.unwrap();
            for lba in [0u8, 0x3F] {
                let (_, back) = exec(&lu, &nx, &[0x28, 0, 0, 0, lba, 0, 0, 1, 0, 0], &[]).await.unwrap();
                assert!(back.iter().all(|&b| b == 0), "block {lba:#x}00 still holds data");
            }
            assert_eq!(lba_status(&lu, &nx, 0).await, vec![(0, 16384, 1)]);
            assert!(!lu.sanitizing.load(Relaxed), "the unit is ready again");
            // EXIT FAILURE MODE has nothing to do; OVERWRITE is not offered.
            exec(&lu, &nx, &[0x48, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await.unwrap();
            let e = exec(&lu, &nx, &[0x48, 0x01, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await.unwrap_err();
            assert_eq!(e, Failure::Check(Sense::invalid_cdb(1, Some(4))));
        });
    }

    #[test]
    fn a_running_sanitize_makes_the_unit_not_ready_but_for_inquiry() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let lu = unit(&reg);
        cores.block_on(0, async move {
            let nx = lu.nexus(test_it(1)).unwrap();
            lu.sanitizing.store(true, Relaxed);
            let not_ready = Failure::Check(Sense::new(SenseKey::NotReady, asc::SANITIZE_IN_PROGRESS));
            assert_eq!(exec(&lu, &nx, &[0, 0, 0, 0, 0, 0], &[]).await.unwrap_err(), not_ready);
            assert_eq!(exec(&lu, &nx, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]).await.unwrap_err(), not_ready);
            assert_eq!(exec(&lu, &nx, &SANITIZE_BLOCK_ERASE, &[]).await.unwrap_err(), not_ready);
            assert!(exec(&lu, &nx, &[0x12, 0, 0, 0, 36, 0], &[]).await.is_ok());
            assert!(exec(&lu, &nx, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]).await.is_ok());
            lu.sanitizing.store(false, Relaxed);
            assert!(exec(&lu, &nx, &[0, 0, 0, 0, 0, 0], &[]).await.is_ok());
        });
    }

    #[test]
    fn software_write_protect_refuses_writes_from_every_nexus_until_cleared() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let lu = unit(&reg);
        cores.block_on(0, async move {
            let a = lu.nexus(test_it(1)).unwrap();
            let b = lu.nexus(test_it(2)).unwrap();
            let control = [0x1A, 0x08, 0x0A, 0, 255, 0];
            let (_, cur) = exec(&lu, &a, &control, &[]).await.unwrap();
            assert_eq!(cur.len(), 16);
            let select = |swp: bool| {
                let mut l = cur.clone();
                l[0] = 0;
                l[2] = 0;
                l[4 + 4] = if swp { 0x08 } else { 0 };
                l
            };
            let mode_select = [0x15, 0x10, 0, 0, 16, 0];
            exec(&lu, &a, &mode_select, &select(true)).await.unwrap();
            let write = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0];
            let protected = Failure::Check(Sense::new(SenseKey::DataProtect, asc::WRITE_PROTECTED));
            assert_eq!(exec(&lu, &b, &write, &[0u8; 512]).await.unwrap_err(), Failure::Check(Sense::unit_attention(asc::MODE_PARAMETERS_CHANGED)));
            for nx in [&a, &b] {
                assert_eq!(exec(&lu, nx, &write, &[0u8; 512]).await.unwrap_err(), protected);
                assert_eq!(exec(&lu, nx, &SANITIZE_BLOCK_ERASE, &[]).await.unwrap_err(), protected);
                assert_eq!(exec(&lu, nx, &[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0u8; 512]).await.unwrap_err(), protected);
                exec(&lu, nx, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]).await.expect("reads go on");
            }
            let (_, sense) = exec(&lu, &b, &control, &[]).await.unwrap();
            assert_eq!((sense[2] & 0x80, sense[4 + 4] & 0x08), (0x80, 0x08), "WP and SWP are reported");
            exec(&lu, &b, &mode_select, &select(false)).await.unwrap();
            exec(&lu, &b, &write, &[0u8; 512]).await.expect("writable again");
        });
    }

    #[test]
    fn orwrite_ors_the_data_into_the_blocks() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let lu = unit(&reg);
        cores.block_on(0, async move {
            let nx = lu.nexus(test_it(1)).unwrap();
            exec(&lu, &nx, &[0x2A, 0, 0, 0, 0, 2, 0, 0, 1, 0], &[0x0Fu8; 512]).await.unwrap();
            let mut c = [0u8; 16];
            c[0] = 0x8B;
            c[9] = 2;
            c[13] = 1;
            exec(&lu, &nx, &c, &[0xF0u8; 512]).await.unwrap();
            let (_, back) = exec(&lu, &nx, &[0x28, 0, 0, 0, 0, 2, 0, 0, 1, 0], &[]).await.unwrap();
            assert!(back.iter().all(|&b| b == 0xFF));
        });
    }

    #[test]
    fn lun_encoding_round_trips() {
        for l in [0u64, 1, 255, 256, 1000, MAX_LUN] {
            assert_eq!(decode_lun(&encode_lun(l)), Some(l));
        }
        assert_eq!(decode_lun(&[0x80, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode_lun(&[0, 1, 0, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn report_opcodes_one_command_and_all() {
        let all = report_opcodes(false, 0, 0, 0, true).unwrap();
        assert_eq!(u32::from_be_bytes([all[0], all[1], all[2], all[3]]) as usize, all.len() - 4);
        let one = report_opcodes(false, 1, 0x28, 0, true).unwrap();
        assert_eq!(one[1] & 0x07, 3);
        assert_eq!(one[4], 0x28);
        let none = report_opcodes(false, 1, 0xC5, 0, true).unwrap();
        assert_eq!(none[1] & 0x07, 1);
        assert!(report_opcodes(false, 1, 0x9E, 0, true).is_err(), "0x9E has service actions");
        let rc16 = report_opcodes(false, 2, 0x9E, 0x10, true).unwrap();
        assert_eq!(rc16[1] & 0x07, 3);
        assert_eq!(report_opcodes(false, 2, 0x48, 0x02, true).unwrap()[1] & 0x07, 3, "SANITIZE BLOCK ERASE on a thin unit");
        assert_eq!(report_opcodes(false, 2, 0x48, 0x02, false).unwrap()[1] & 0x07, 1, "not without deallocation");
        assert_eq!(report_opcodes(false, 2, 0x48, 0x01, true).unwrap()[1] & 0x07, 1, "no OVERWRITE");
    }
}

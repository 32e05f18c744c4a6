//! Data structures hosts read: Identify Controller and Namespace, the namespace lists and
//! descriptors, and the log pages (SMART, firmware slots, changed namespaces, discovery).
//! Offsets follow NVMe Base 1.4 (Figures 247, 249) and NVMe-oF 1.1 (Figure 35).

use super::controller::Controller;
use super::spec::{put_padded, IDENTIFY_LEN};
use super::subsystem::{ListenAddr, Namespace, Subsystem};
use super::transport::TransportOpts;
use crate::bdev::IoType;

/// PCI vendor ids: none (a software target has no PCI vendor; Linux nvmet reports 0 too).
pub const VID: u16 = 0;
pub const SSVID: u16 = 0;
/// NVMe version reported in VS and Identify: 1.4.0.
pub const NVME_VERSION: u32 = 0x0001_0400;
/// Keep Alive Support granularity, in 100 ms units.
pub const KAS_100MS: u16 = 10;
/// Asynchronous Event Request Limit (0's based): four outstanding AERs.
pub const AERL: u8 = 3;
/// Abort Command Limit (0's based).
pub const ACL: u8 = 3;
/// Error log entries (0's based).
pub const ELPE: u8 = 63;

fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}
fn put128(b: &mut [u8], o: usize, v: u128) {
    b[o..o + 16].copy_from_slice(&v.to_le_bytes());
}

/// The firmware revision: the crate version, space padded to 8 bytes.
pub fn firmware_revision() -> String {
    let v = env!("CARGO_PKG_VERSION");
    v.chars().take(8).collect()
}

/// Identify Controller (CNS 01h).
pub fn controller(ctrl: &Controller, opts: &TransportOpts) -> Vec<u8> {
    let sub = &ctrl.subsys;
    let disc = sub.is_discovery();
    let mut b = vec![0u8; IDENTIFY_LEN];
    put16(&mut b, 0, VID);
    put16(&mut b, 2, SSVID);
    put_padded(&mut b[4..24], if disc { "" } else { &sub.serial }, b' ');
    put_padded(&mut b[24..64], if disc { "" } else { &sub.model }, b' ');
    put_padded(&mut b[64..72], &firmware_revision(), b' ');
    b[72] = 6; // RAB: recommended arbitration burst
    if !disc {
        // CMIC bit 1: the subsystem may have more than one controller (hosts use multipath);
        // bit 3: ANA reporting (Linux's native multipath then follows the ANA states).
        b[76] = 1 << 1 | if sub.ana_reporting { 1 << 3 } else { 0 };
    }
    b[77] = opts.mdts();
    put16(&mut b, 78, ctrl.cntlid);
    put32(&mut b, 80, NVME_VERSION);
    // OAES: namespace attribute notices (I/O controllers), discovery log change (discovery).
    // With ANA reporting, also ANA change notices (bit 11).
    put32(&mut b, 92, if disc { 1 << 31 } else { 1 << 8 | if sub.ana_reporting { 1 << 11 } else { 0 } });
    // CTRATT bit 0: 128-bit host identifiers (fabrics hosts send a UUID in Connect).
    put32(&mut b, 96, 1);
    b[111] = if disc { 2 } else { 1 }; // CNTRLTYPE: I/O or discovery controller
    put16(&mut b, 256, 0); // OACS: no optional admin commands
    b[258] = ACL;
    b[259] = AERL;
    b[260] = (1 << 0) | (1 << 1); // FRMW: slot 1 read-only, one slot
                                  // LPA: SMART per namespace, extended data (offsets) for Get Log Page.
    b[261] = (1 << 0) | (1 << 2);
    b[262] = ELPE;
    b[263] = 0; // NPSS
    put16(&mut b, 320, KAS_100MS);
    if sub.ana_reporting {
        // NVMe Base 1.4 Figure 247: ANATT at byte 342, ANACAP 343, ANAGRPMAX 344-347,
        // NANAGRPID 348-351.
        b[342] = super::ana::ANATT_SECS;
        b[343] = super::ana::ANACAP;
        // Group ids 1..=max_namespaces, as in SPDK. Linux sizes its ANA log buffer from
        // NANAGRPID and MNAN and turns ANA off if that exceeds MDTS.
        put32(&mut b, 344, sub.ana_groups());
        put32(&mut b, 348, sub.ana_groups());
    }
    b[512] = 0x66; // SQES: 64-byte entries
    b[513] = 0x44; // CQES: 16-byte entries
    put16(&mut b, 514, if disc { opts.max_aq_depth } else { opts.max_queue_depth });
    put32(&mut b, 516, if disc { 0 } else { sub.max_namespaces });
    if !disc {
        // ONCS: Compare, Dataset Management, Write Zeroes, Reservations.
        put16(&mut b, 520, (1 << 0) | (1 << 2) | (1 << 3) | (1 << 5));
        b[525] = 1; // VWC: a volatile write cache is present (Flush reaches the bdev)
    }
    // SGLS: SGLs supported (bit 0, no alignment requirement) and the SGL Address field used
    // as an offset into in-capsule data (bit 20); no keyed SGLs on TCP.
    put32(&mut b, 536, (1 << 0) | (1 << 20));
    put32(&mut b, 540, if disc { 0 } else { sub.max_namespaces }); // MNAN
    put_padded(&mut b[768..1024], &sub.nqn, 0);
    // Fabrics: capsule sizes in 16-byte units; in-capsule data starts at offset 0.
    let icd = if disc { 0 } else { opts.in_capsule_data_size };
    put32(&mut b, 1792, (64 + icd) / 16);
    put32(&mut b, 1796, 1);
    put16(&mut b, 1800, 0); // ICDOFF
    b[1802] = 0; // FCATT: dynamic controller model
    b[1803] = 1; // MSDBD: one SGL data block descriptor per command
    put16(&mut b, 1804, 1); // OFCS: Disconnect supported
                            // Power state 0 (the only one): nominal values, like other software targets.
    put16(&mut b, 2048, 0x9c4);
    b
}

/// Identify Namespace (CNS 00h) of an active namespace.
pub fn namespace(ns: &Namespace, ana_reporting: bool) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let blocks = ns.num_blocks();
    put64(&mut b, 0, blocks); // NSZE
    put64(&mut b, 8, blocks); // NCAP
    put64(&mut b, 16, blocks); // NUSE
    b[25] = 0; // NLBAF: one format
    b[26] = 0; // FLBAS: format 0, no metadata
    b[30] = 1; // NMIC: may be attached to several controllers
    b[31] = super::reservation::rescap(ns.resv.ptpl_file().is_some()); // RESCAP
    if ana_reporting {
        put32(&mut b, 92, ns.anagrpid); // ANAGRPID
    }
    if ns.entry.bdev().read_only() {
        b[99] = 1; // NSATTR: write protected
    }
    b[104..120].copy_from_slice(&ns.nguid);
    b[120..128].copy_from_slice(&ns.eui64);
    // LBAF0: no metadata, LBADS = log2(block size), best relative performance.
    b[128 + 2] = ns.block_size().trailing_zeros() as u8;
    b
}

/// Active Namespace ID list (CNS 02h): ids greater than `after`, ascending.
pub fn active_ns_list(nsids: impl Iterator<Item = u32>, after: u32) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    for (i, id) in nsids.filter(|&n| n > after).take(IDENTIFY_LEN / 4).enumerate() {
        put32(&mut b, i * 4, id);
    }
    b
}

/// Namespace Identification Descriptor list (CNS 03h): EUI64, NGUID, UUID.
pub fn ns_descriptors(ns: &Namespace) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let mut o = 0;
    for (nidt, id) in [(1u8, &ns.eui64[..]), (2, &ns.nguid[..]), (3, &ns.uuid.as_bytes()[..])] {
        b[o] = nidt;
        b[o + 1] = id.len() as u8;
        b[o + 4..o + 4 + id.len()].copy_from_slice(id);
        o += 4 + id.len();
    }
    b
}

/// SMART / Health Information (log 02h) over `namespaces`.
pub fn smart_log(namespaces: &[std::sync::Arc<Namespace>], power_on_secs: u64, error_count: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    let (mut rd_bytes, mut wr_bytes, mut rd_cmds, mut wr_cmds) = (0u64, 0u64, 0u64, 0u64);
    for ns in namespaces {
        let s = ns.stats.snapshot();
        rd_bytes += s.bytes[IoType::Read.index()];
        wr_bytes += s.bytes[IoType::Write.index()];
        rd_cmds += s.ops[IoType::Read.index()];
        wr_cmds += s.ops[IoType::Write.index()];
    }
    b[0] = 0; // critical warning: none
    put16(&mut b, 1, 0); // composite temperature: not reported (a virtual device)
    b[3] = 100; // available spare %
    b[4] = 10; // available spare threshold %
    b[5] = 0; // percentage used
              // Data units are thousands of 512-byte units, rounded up.
    put128(&mut b, 32, (rd_bytes as u128).div_ceil(512_000));
    put128(&mut b, 48, (wr_bytes as u128).div_ceil(512_000));
    put128(&mut b, 64, rd_cmds as u128);
    put128(&mut b, 80, wr_cmds as u128);
    put128(&mut b, 128, (power_on_secs / 3600) as u128);
    put128(&mut b, 176, error_count as u128);
    b
}

/// Firmware Slot Information (log 03h): slot 1 active, holding our version.
pub fn firmware_log() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0] = 1;
    put_padded(&mut b[8..16], &firmware_revision(), b' ');
    b
}

/// Changed Namespace List (log 04h): up to 1024 ids; `overflow` reports "more than 1024".
pub fn changed_ns_log(list: &[u32], overflow: bool) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    if overflow {
        put32(&mut b, 0, 0xFFFF_FFFF);
    } else {
        for (i, id) in list.iter().take(1024).enumerate() {
            put32(&mut b, i * 4, *id);
        }
    }
    b
}

/// One discovery log entry: a subsystem reachable on a listener.
pub struct DiscoveryEntry<'a> {
    pub subsys: &'a Subsystem,
    pub addr: &'a ListenAddr,
    pub portid: u16,
    /// The listener speaks TLS only.
    pub secure: bool,
}

/// Discovery log page (log 70h).
pub fn discovery_log(genctr: u64, entries: &[DiscoveryEntry<'_>], asqsz: u16) -> Vec<u8> {
    let mut b = vec![0u8; 1024 * (1 + entries.len())];
    put64(&mut b, 0, genctr);
    put64(&mut b, 8, entries.len() as u64);
    put16(&mut b, 16, 0); // RECFMT
    for (i, e) in entries.iter().enumerate() {
        let r = &mut b[1024 * (i + 1)..1024 * (i + 2)];
        r[0] = 3; // TRTYPE: TCP
        r[1] = e.addr.adrfam.code();
        r[2] = if e.subsys.is_discovery() { 3 } else { 2 }; // SUBTYPE
                                                            // TREQ: secure channel required (TLS listener) or not; SQ flow control may be disabled.
        r[3] = if e.secure { 0b01 } else { 0b10 } | (1 << 2);
        put16(r, 4, e.portid);
        put16(r, 6, 0xFFFF); // CNTLID: dynamic
        put16(r, 8, asqsz);
        put_padded(&mut r[32..64], &e.addr.trsvcid, b' ');
        put_padded(&mut r[256..512], &e.subsys.nqn, 0);
        put_padded(&mut r[512..768], &e.addr.traddr, b' ');
        // TSAS for TCP: SECTYPE 2 (TLS 1.3) on a secure listener, else 0 (none).
        r[768] = if e.secure { 2 } else { 0 };
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_list_is_ascending_after_the_given_id() {
        let b = active_ns_list([1u32, 2, 5].into_iter(), 1);
        assert_eq!(&b[0..4], &2u32.to_le_bytes());
        assert_eq!(&b[4..8], &5u32.to_le_bytes());
        assert_eq!(&b[8..12], &[0; 4]);
    }

    #[test]
    fn changed_log_overflow() {
        let b = changed_ns_log(&[3], true);
        assert_eq!(&b[0..4], &[0xFF; 4]);
        let b = changed_ns_log(&[3, 9], false);
        assert_eq!(&b[4..8], &9u32.to_le_bytes());
    }
}

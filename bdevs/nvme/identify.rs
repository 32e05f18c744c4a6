//! NVMe admin passthrough on a namespace's generic character device (`/dev/ngXnY`): Identify
//! Controller and Identify Namespace, decoded into what the bdev needs.

use std::fs::File;
use std::os::fd::AsRawFd;

/// `struct nvme_passthru_cmd` of <linux/nvme_ioctl.h> (72 bytes).
#[repr(C)]
#[derive(Default)]
struct PassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

const _: () = assert!(std::mem::size_of::<PassthruCmd>() == 72);

/// _IOWR('N', 0x41, struct nvme_passthru_cmd)
const NVME_IOCTL_ADMIN_CMD: libc::c_ulong = 0xC048_4E41;
/// _IO('N', 0x40)
const NVME_IOCTL_ID: libc::c_ulong = 0x4E40;

#[derive(Debug, Clone)]
pub struct Identity {
    pub model: String,
    pub serial: String,
    pub firmware: String,
    pub vendor_id: u16,
    /// Largest transfer the controller takes in one command, in bytes (MDTS; None = no limit).
    pub max_transfer: Option<u64>,
    pub nsid: u32,
    pub block_size: u32,
    pub num_blocks: u64,
    pub volatile_write_cache: bool,
    pub write_zeroes: bool,
    pub deallocate: bool,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_matches(|c: char| c == ' ' || c == '\0').to_string()
}

fn admin(f: &File, opcode: u8, nsid: u32, cdw10: u32, buf: &mut [u8; 4096]) -> Result<(), String> {
    let mut cmd = PassthruCmd { opcode, nsid, addr: buf.as_mut_ptr() as u64, data_len: 4096, cdw10, timeout_ms: 5000, ..Default::default() };
    // SAFETY: the command points at a 4096-byte buffer that outlives the synchronous ioctl.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), NVME_IOCTL_ADMIN_CMD, &mut cmd) };
    match r {
        0 => Ok(()),
        r if r > 0 => Err(format!("NVMe status {r:#x}")),
        _ => Err(std::io::Error::last_os_error().to_string()),
    }
}

/// Reads the identity of the namespace behind `f` and checks that its format is supported.
pub fn identify(f: &File) -> Result<Identity, String> {
    // SAFETY: NVME_IOCTL_ID takes no argument and returns the namespace id.
    let nsid = unsafe { libc::ioctl(f.as_raw_fd(), NVME_IOCTL_ID) };
    if nsid <= 0 {
        return Err(format!("not an NVMe namespace device (NVME_IOCTL_ID: {})", std::io::Error::last_os_error()));
    }
    let nsid = nsid as u32;
    let mut c = [0u8; 4096];
    admin(f, 0x06, 0, 1, &mut c).map_err(|e| format!("Identify Controller failed: {e}"))?;
    let mut n = [0u8; 4096];
    admin(f, 0x06, nsid, 0, &mut n).map_err(|e| format!("Identify Namespace {nsid} failed: {e}"))?;
    decode(&c, &n, nsid, page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Decodes Identify Controller and Identify Namespace data (split out for tests).
pub fn decode(c: &[u8; 4096], n: &[u8; 4096], nsid: u32, mps_min: u64) -> Result<Identity, String> {
    let le16 = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let le64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let mdts = c[77];
    let oncs = le16(c, 520);
    let nsze = le64(n, 0);
    let nlbaf = n[25] as usize + 1;
    let flbas = n[26];
    let fmt = ((flbas & 0x0f) | ((flbas >> 1) & 0x30)) as usize;
    if fmt >= nlbaf.min(64) {
        return Err(format!("namespace {nsid}: current LBA format {fmt} is not among its {nlbaf} formats"));
    }
    let lbaf = 128 + 4 * fmt;
    let ms = le16(n, lbaf);
    let lbads = n[lbaf + 2];
    if ms != 0 {
        return Err(format!("namespace {nsid}: LBA format {fmt} carries {ms} bytes of metadata per block; formats with metadata are not supported"));
    }
    if n[29] & 0x7 != 0 {
        return Err(format!("namespace {nsid}: end-to-end protection (DPS {:#x}) is enabled; protection information is not supported", n[29]));
    }
    if !(9..=16).contains(&lbads) {
        return Err(format!("namespace {nsid}: unsupported block size 2^{lbads}"));
    }
    if nsze == 0 {
        return Err(format!("namespace {nsid} has no blocks"));
    }
    Ok(Identity {
        model: text(&c[24..64]),
        serial: text(&c[4..24]),
        firmware: text(&c[64..72]),
        vendor_id: le16(c, 0),
        max_transfer: (mdts != 0).then(|| mps_min << mdts.min(20)),
        nsid,
        block_size: 1 << lbads,
        num_blocks: nsze,
        volatile_write_cache: c[525] & 1 != 0,
        write_zeroes: oncs & (1 << 3) != 0,
        deallocate: oncs & (1 << 2) != 0,
        nguid: n[104..120].try_into().expect("16 bytes"),
        eui64: n[120..128].try_into().expect("8 bytes"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctrl() -> [u8; 4096] {
        let mut c = [0u8; 4096];
        c[0] = 0x36;
        c[4..12].copy_from_slice(b"SN123   ");
        c[24..34].copy_from_slice(b"QEMU NVMe ");
        c[64..70].copy_from_slice(b"8.0.0 ");
        c[77] = 7; // 4 KiB << 7 = 512 KiB
        c[520] = 0b1100; // DSM + Write Zeroes
        c[525] = 1;
        c
    }

    fn ns(ms: u16, lbads: u8, dps: u8) -> [u8; 4096] {
        let mut n = [0u8; 4096];
        n[0..8].copy_from_slice(&1000u64.to_le_bytes());
        n[25] = 1; // two formats
        n[26] = 1; // format 1 in use
        n[29] = dps;
        n[128 + 4 + 2] = lbads;
        n[128 + 4..128 + 6].copy_from_slice(&ms.to_le_bytes());
        n[104] = 0xab;
        n
    }

    #[test]
    fn decodes_identity_and_limits() {
        let id = decode(&ctrl(), &ns(0, 12, 0), 1, 4096).unwrap();
        assert_eq!(id.block_size, 4096);
        assert_eq!(id.num_blocks, 1000);
        assert_eq!(id.max_transfer, Some(512 << 10));
        assert_eq!(id.model, "QEMU NVMe");
        assert_eq!(id.serial, "SN123");
        assert!(id.write_zeroes && id.deallocate && id.volatile_write_cache);
        assert_eq!(id.nguid[0], 0xab);
    }

    #[test]
    fn refuses_metadata_and_protection() {
        assert!(decode(&ctrl(), &ns(8, 12, 0), 1, 4096).unwrap_err().contains("metadata"));
        assert!(decode(&ctrl(), &ns(0, 12, 1), 1, 4096).unwrap_err().contains("protection"));
        assert!(decode(&ctrl(), &ns(0, 3, 0), 1, 4096).is_err());
    }
}

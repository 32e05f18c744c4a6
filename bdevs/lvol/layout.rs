//! The on-media format of an lvol store (DESIGN §7): two metadata slots at the front of the
//! base bdev, then the data clusters.
//!
//! ```text
//! byte 0            slot 0: superblock + every volume + its cluster map (one encoded record)
//! byte slot_bytes   slot 1: the same, one commit older or newer
//! byte data_start   cluster 0, cluster 1, ... (data_start is a whole number of clusters)
//! ```
//!
//! A record is `magic "TDMKLVS1", version u32, crc32c u32, len u64, seq u64`, then the store
//! (uuid, name, cluster size, block size, data start, cluster count) and each volume (uuid,
//! name, size, flags, clear method, and its allocated clusters as (logical, physical) pairs).
//! The CRC32C covers bytes 16..len. A commit encodes the whole state with `seq + 1` into the
//! slot *not* holding the current record, flushes, and only then counts as durable; a torn
//! write therefore leaves the other slot, the previous state, valid. At open the valid record
//! with the higher sequence number wins. The open then zeroes the CRC of the slot that lost
//! (flushed before anything else is written): a record torn there by the crash would otherwise
//! be made whole by the next commit's record, torn by a later crash, whose blocks repeat its
//! bytes (same sequence number, same volumes up to the first that differs); see `void_slot`.
//! Only `len` bytes (rounded up to blocks) are written, so a commit costs in proportion to
//! what the store holds, not to the slot's size.
//!
//! Version 2 (the snapshot slice) adds to each volume its parent (16 bytes, the nil UUID for
//! none: the snapshot a clone reads through, see the module comment of `lvol`) and the flag
//! bit 2, *snapshot*. A physical cluster may now appear in the maps of several volumes (it is
//! shared); it never appears twice in one map. **Upgrade rule:** a version 1 record decodes
//! as version 2 with no parents and no snapshots. (The snapshot slice wrote version 1 as long as
//! no volume had a parent or was a snapshot; since version 3 every record is written in the
//! current version, see upgrade rule 2 below.)
//!
//! Version 3 (the map log) adds **log records** after the record in its slot. A commit that
//! changes nothing but cluster maps (first writes, copy-on-writes, unmaps: the data path's
//! commits) appends one log record instead of rewriting the whole state, so its cost follows
//! what changed, not what the store holds (a full record of a filled 1 TiB pool is ~8 MiB).
//! Any other change (a volume created, deleted, resized, snapshotted, ...) writes a whole record
//! into the other slot as before, and the log of the new slot starts empty after it.
//!
//! ```text
//! slot: | record (seq S) | log S+1 | log S+2 | ... | stale bytes of older records and logs |
//! ```
//!
//! A log record is `magic "TDMKLVJ1", version u32, crc32c u32, len u64, seq u64, store uuid,
//! count u32`, then `count` changes `(volume uuid, logical u32, physical u32)`, physical
//! `u32::MAX` for an unmapped cluster; each starts on a block boundary. At open the current
//! record is read, then the log records after it in order, as long as each is valid, names
//! the store's uuid and carries the next sequence number. Why stale bytes are never replayed:
//! logs left in a slot by an earlier cycle carry sequence numbers below the record now in the
//! slot (the slots alternate and sequence numbers only grow), and logs of a store deleted
//! and created again on the same bdev name another store uuid. A torn log record fails its
//! CRC, which ends the replay at the last acknowledged commit.
//!
//! **Upgrade rule 2:** version 1 and 2 records still open (no log follows them: those
//! versions never wrote one). The first commit after an open writes a whole version 3 record;
//! from then on earlier tidemarks refuse the store by its version and change nothing (they
//! would not replay the log and would lose acknowledged first writes).
//!
//! Little endian throughout.

use uuid::Uuid;

pub const MAGIC: &[u8; 8] = b"TDMKLVS1";
pub const VERSION: u32 = 3;
/// The first slice's format, still read (see the upgrade rule above).
pub const VERSION_1: u32 = 1;
/// The snapshot slice's format, still read.
pub const VERSION_2: u32 = 2;
/// Magic of a log record (see the module comment).
pub const LOG_MAGIC: &[u8; 8] = b"TDMKLVJ1";
const LOG_VERSION: u32 = 1;
/// Bytes of a log record before its changes.
const LOG_HEADER: usize = 8 + 4 + 4 + 8 + 8 + 16 + 4;
/// Bytes of one change in a log record.
const LOG_CHANGE: usize = 16 + 4 + 4;
/// Most volumes a store holds (the slot is sized for them; the issue asks for ≥ 1,000).
pub const MAX_VOLUMES: usize = 1024;
/// Longest store or volume name (SPDK's `SPDK_LVS_NAME_MAX` / `SPDK_LVOL_NAME_MAX` less the NUL).
pub const MAX_NAME: usize = 63;
/// Bytes of the record before the volumes, at most.
const HEADER_MAX: usize = 32 + 16 + 1 + MAX_NAME + 8 + 4 + 8 + 8 + 4;
/// Bytes of one volume record without its map, at most.
const VOLUME_MAX: usize = 16 + 1 + MAX_NAME + 8 + 1 + 1 + 16 + 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub uuid: Uuid,
    pub name: String,
    pub size_bytes: u64,
    pub thin: bool,
    pub read_only: bool,
    /// SPDK's `clear_method` (0 none, 1 unmap, 2 write_zeroes), kept for `get_lvols`.
    pub clear_method: u8,
    /// A snapshot: read-only, its clusters shared with the volume it was taken of.
    pub snapshot: bool,
    /// The snapshot this volume was taken from or cloned from (SPDK's `base_snapshot`).
    pub parent: Option<Uuid>,
    /// Allocated clusters: (logical cluster of the volume, physical cluster of the store),
    /// sorted by logical cluster.
    pub map: Vec<(u32, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRecord {
    pub seq: u64,
    pub uuid: Uuid,
    pub name: String,
    pub cluster_size: u64,
    pub block_size: u32,
    /// Byte offset of data cluster 0 on the base bdev.
    pub data_start: u64,
    pub total_clusters: u64,
    pub volumes: Vec<VolumeRecord>,
}

/// The geometry of a new store on a base of `base_bytes` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub slot_bytes: u64,
    pub data_start: u64,
    pub total_clusters: u64,
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Bytes a record of `volumes` volumes whose maps hold `entries` entries in all takes, at most.
pub fn record_bound(volumes: usize, entries: u64) -> u64 {
    (HEADER_MAX + volumes * VOLUME_MAX) as u64 + entries * 8
}

/// Bytes a slot needs for a store of at most `clusters` clusters and [`MAX_VOLUMES`] volumes,
/// each cluster mapped once. Snapshots and clones map shared clusters again: the store keeps
/// them within what the volume records leave unused (`Store::check_metadata_room`).
pub fn slot_bytes(clusters: u64, block_size: u32) -> u64 {
    round_up(record_bound(MAX_VOLUMES, clusters), block_size as u64)
}

/// Places the two slots and the data clusters; `None` if not one data cluster fits.
pub fn geometry(base_bytes: u64, block_size: u32, cluster_size: u64) -> Option<Geometry> {
    let slot = slot_bytes(base_bytes / cluster_size, block_size);
    let data_start = round_up(2 * slot, cluster_size);
    let total_clusters = base_bytes.checked_sub(data_start)? / cluster_size;
    // Below 2^31: the live map keeps a *shared* bit above the cluster number.
    (total_clusters > 0 && total_clusters < 1 << 31).then_some(Geometry { slot_bytes: slot, data_start, total_clusters })
}

/// Why a slot does not hold a usable record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("no lvol store (no TDMKLVS1 magic)")]
    NoMagic,
    #[error("lvol store format version {0}; this tidemark reads versions {VERSION_1} to {VERSION}")]
    Version(u32),
    #[error("lvol store metadata is torn or corrupt (CRC or length mismatch)")]
    Corrupt,
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn name(&mut self, s: &str) {
        assert!(s.len() <= MAX_NAME, "names are checked against MAX_NAME before they reach the record");
        self.u8(s.len() as u8);
        self.0.extend_from_slice(s.as_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Corrupt);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| DecodeError::Corrupt)?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| DecodeError::Corrupt)?))
    }
    fn uuid(&mut self) -> Result<Uuid, DecodeError> {
        Ok(Uuid::from_slice(self.take(16)?).map_err(|_| DecodeError::Corrupt)?)
    }
    fn name(&mut self) -> Result<String, DecodeError> {
        let n = self.u8()? as usize;
        if n > MAX_NAME {
            return Err(DecodeError::Corrupt);
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError::Corrupt)
    }
}

impl StoreRecord {
    /// The record as written to a slot (its length is `len`, not rounded to blocks).
    pub fn encode(&self) -> Vec<u8> {
        // Sized for the whole record at once, rounded to 4 KiB blocks so that padding it to the
        // slot's blocks (`Store::write_slot`) needs no copy either: a record of a full pool is
        // 8 bytes per mapped cluster, and growing the buffer by doubling held up to three
        // times that at once (the heap then keeps it, see the store's `memory`).
        let entries: u64 = self.volumes.iter().map(|v| v.map.len() as u64).sum();
        let cap = round_up(record_bound(self.volumes.len(), entries), 4096);
        let mut w = Writer(Vec::with_capacity(usize::try_from(cap).unwrap_or(0)));
        w.0.extend_from_slice(MAGIC);
        w.u32(VERSION);
        w.u32(0); // crc, below
        w.u64(0); // len, below
        w.u64(self.seq);
        w.0.extend_from_slice(self.uuid.as_bytes());
        w.name(&self.name);
        w.u64(self.cluster_size);
        w.u32(self.block_size);
        w.u64(self.data_start);
        w.u64(self.total_clusters);
        w.u32(self.volumes.len() as u32);
        for v in &self.volumes {
            w.0.extend_from_slice(v.uuid.as_bytes());
            w.name(&v.name);
            w.u64(v.size_bytes);
            w.u8(v.thin as u8 | (v.read_only as u8) << 1 | (v.snapshot as u8) << 2);
            w.u8(v.clear_method);
            w.0.extend_from_slice(v.parent.unwrap_or(Uuid::nil()).as_bytes());
            w.u32(v.map.len() as u32);
            for &(l, p) in &v.map {
                w.u32(l);
                w.u32(p);
            }
        }
        sealed(w.0)
    }

    /// Bytes of the record that starts `head` (its first block): what to read in all.
    pub fn encoded_len(head: &[u8]) -> Result<u64, DecodeError> {
        check_magic(head)?;
        let len = u64::from_le_bytes(head[16..24].try_into().map_err(|_| DecodeError::Corrupt)?);
        if len < 24 {
            return Err(DecodeError::Corrupt);
        }
        Ok(len)
    }

    /// Decodes a slot's bytes (at least the record's `len`); checks magic, version, CRC and
    /// every count against the bytes present.
    pub fn decode(b: &[u8]) -> Result<StoreRecord, DecodeError> {
        let version = check_magic(b)?;
        let b = checked(b, Self::encoded_len(b)?)?;
        let mut r = Reader(&b[24..]);
        let seq = r.u64()?;
        let uuid = r.uuid()?;
        let name = r.name()?;
        let cluster_size = r.u64()?;
        let block_size = r.u32()?;
        let data_start = r.u64()?;
        let total_clusters = r.u64()?;
        let nvol = r.u32()? as usize;
        if nvol > MAX_VOLUMES || block_size == 0 || cluster_size == 0 || cluster_size % block_size as u64 != 0 {
            return Err(DecodeError::Corrupt);
        }
        let mut volumes = Vec::with_capacity(nvol);
        for _ in 0..nvol {
            let uuid = r.uuid()?;
            let name = r.name()?;
            let size_bytes = r.u64()?;
            let flags = r.u8()?;
            let clear_method = r.u8()?;
            let parent = if version >= VERSION_2 { Some(r.uuid()?).filter(|u| !u.is_nil()) } else { None };
            let n = r.u32()? as usize;
            if n > r.0.len() / 8 {
                return Err(DecodeError::Corrupt);
            }
            let mut map = Vec::with_capacity(n);
            for _ in 0..n {
                let (l, p) = (r.u32()?, r.u32()?);
                if p as u64 >= total_clusters {
                    return Err(DecodeError::Corrupt);
                }
                map.push((l, p));
            }
            volumes.push(VolumeRecord {
                uuid,
                name,
                size_bytes,
                thin: flags & 1 != 0,
                read_only: flags & 2 != 0,
                clear_method,
                snapshot: flags & 4 != 0,
                parent,
                map,
            });
        }
        if !r.0.is_empty() {
            return Err(DecodeError::Corrupt);
        }
        Ok(StoreRecord { seq, uuid, name, cluster_size, block_size, data_start, total_clusters, volumes })
    }
}

/// Where a record's or log record's CRC32C is (of bytes 16..len).
pub const CRC: std::ops::Range<usize> = 12..16;

/// A record or log record with its `len` (bytes 16..24) and CRC32C ([`CRC`]) filled in.
fn sealed(mut b: Vec<u8>) -> Vec<u8> {
    let len = b.len() as u64;
    b[16..24].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&b[16..]);
    b[CRC].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The `len` bytes of a record or log record, if they are all present and their CRC32C
/// ([`CRC`]) matches.
fn checked(b: &[u8], len: u64) -> Result<&[u8], DecodeError> {
    let b = b.get(..usize::try_from(len).map_err(|_| DecodeError::Corrupt)?).ok_or(DecodeError::Corrupt)?;
    let crc = u32::from_le_bytes(b[CRC].try_into().map_err(|_| DecodeError::Corrupt)?);
    if crc32c::crc32c(&b[16..]) != crc {
        return Err(DecodeError::Corrupt);
    }
    Ok(b)
}

/// The record's format version, if it is one this tidemark reads.
fn check_magic(head: &[u8]) -> Result<u32, DecodeError> {
    if head.len() < 24 || &head[..8] != MAGIC {
        return Err(DecodeError::NoMagic);
    }
    let v = u32::from_le_bytes(head[8..12].try_into().map_err(|_| DecodeError::Corrupt)?);
    if !(VERSION_1..=VERSION).contains(&v) {
        return Err(DecodeError::Version(v));
    }
    Ok(v)
}

/// One change of a cluster map, as a log record carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapChange {
    pub vol: Uuid,
    pub logical: u32,
    /// The physical cluster now mapped, or None: unmapped.
    pub phys: Option<u32>,
}

/// A commit that changed cluster maps only (see the module comment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub seq: u64,
    /// The store it belongs to: a log of an earlier store on the same bdev is not replayed.
    pub store: Uuid,
    pub changes: Vec<MapChange>,
}

impl LogRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(LOG_HEADER + self.changes.len() * LOG_CHANGE));
        w.0.extend_from_slice(LOG_MAGIC);
        w.u32(LOG_VERSION);
        w.u32(0); // crc, below
        w.u64(0); // len, below
        w.u64(self.seq);
        w.0.extend_from_slice(self.store.as_bytes());
        w.u32(self.changes.len() as u32);
        for c in &self.changes {
            w.0.extend_from_slice(c.vol.as_bytes());
            w.u32(c.logical);
            w.u32(c.phys.unwrap_or(u32::MAX));
        }
        sealed(w.0)
    }

    /// Bytes of the log record that starts `head`; an error if `head` starts none.
    pub fn encoded_len(head: &[u8]) -> Result<u64, DecodeError> {
        if head.len() < LOG_HEADER || &head[..8] != LOG_MAGIC {
            return Err(DecodeError::NoMagic);
        }
        if u32::from_le_bytes(head[8..12].try_into().map_err(|_| DecodeError::Corrupt)?) != LOG_VERSION {
            return Err(DecodeError::Corrupt);
        }
        let len = u64::from_le_bytes(head[16..24].try_into().map_err(|_| DecodeError::Corrupt)?);
        if len < LOG_HEADER as u64 {
            return Err(DecodeError::Corrupt);
        }
        Ok(len)
    }

    /// Decodes a log record (the bytes hold at least its `len`); checks magic, CRC, counts,
    /// and that every physical cluster is below `total_clusters`.
    pub fn decode(b: &[u8], total_clusters: u64) -> Result<LogRecord, DecodeError> {
        let b = checked(b, Self::encoded_len(b)?)?;
        let mut r = Reader(&b[24..]);
        let seq = r.u64()?;
        let store = r.uuid()?;
        let n = r.u32()? as usize;
        if n != r.0.len() / LOG_CHANGE || r.0.len() % LOG_CHANGE != 0 {
            return Err(DecodeError::Corrupt);
        }
        let mut changes = Vec::with_capacity(n);
        for _ in 0..n {
            let vol = r.uuid()?;
            let logical = r.u32()?;
            let phys = Some(r.u32()?).filter(|p| *p != u32::MAX);
            if phys.is_some_and(|p| p as u64 >= total_clusters) {
                return Err(DecodeError::Corrupt);
            }
            changes.push(MapChange { vol, logical, phys });
        }
        Ok(LogRecord { seq, store, changes })
    }
}

/// Which slot holds the current state, given what each slot decodes to: the valid record with
/// the higher sequence number. An error if neither is valid (the more telling of the two).
pub fn pick(a: Result<StoreRecord, DecodeError>, b: Result<StoreRecord, DecodeError>) -> Result<(usize, StoreRecord), DecodeError> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if b.seq > a.seq { (1, b) } else { (0, a) }),
        (Ok(a), Err(_)) => Ok((0, a)),
        (Err(_), Ok(b)) => Ok((1, b)),
        (Err(ea), Err(eb)) => Err(match (ea, eb) {
            (DecodeError::Version(v), _) | (_, DecodeError::Version(v)) => DecodeError::Version(v),
            (DecodeError::Corrupt, _) | (_, DecodeError::Corrupt) => DecodeError::Corrupt,
            _ => DecodeError::NoMagic,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(seq: u64, nvol: usize) -> StoreRecord {
        StoreRecord {
            seq,
            uuid: Uuid::from_u128(7),
            name: "lvs0".into(),
            cluster_size: 1 << 20,
            block_size: 512,
            data_start: 1 << 20,
            total_clusters: 100,
            volumes: (0..nvol)
                .map(|i| VolumeRecord {
                    uuid: Uuid::from_u128(i as u128 + 100),
                    name: format!("vol{i}"),
                    size_bytes: (i as u64 + 1) << 20,
                    thin: i % 2 == 0,
                    read_only: i % 3 == 0,
                    clear_method: 1,
                    snapshot: i % 4 == 1,
                    parent: (i % 2 == 1).then(|| Uuid::from_u128(99)),
                    map: vec![(0, i as u32), (5, 50 + i as u32)],
                })
                .collect(),
        }
    }

    #[test]
    fn a_torn_commit_leaves_the_previous_state() {
        let old = sample(4, 2);
        let new = sample(5, 3);
        let mut slot1 = new.encode();
        // The write of the new record stopped half way: the old slot wins.
        let half = slot1.len() / 2;
        slot1[half..].iter_mut().for_each(|b| *b = 0);
        let (i, r) = pick(StoreRecord::decode(&old.encode()), StoreRecord::decode(&slot1)).unwrap();
        assert_eq!((i, r), (0, old.clone()));
        // Complete, it wins over the old one whichever slot it is in.
        let (i, r) = pick(StoreRecord::decode(&new.encode()), StoreRecord::decode(&old.encode())).unwrap();
        assert_eq!((i, r.seq), (0, 5));
    }

    #[test]
    fn refuses_other_versions_and_foreign_data() {
        let mut b = sample(1, 1).encode();
        b[8] = 9;
        assert_eq!(StoreRecord::decode(&b), Err(DecodeError::Version(9)));
        assert_eq!(StoreRecord::decode(&[0u8; 512]), Err(DecodeError::NoMagic));
        assert_eq!(pick(Err(DecodeError::NoMagic), Err(DecodeError::Corrupt)), Err(DecodeError::Corrupt));
    }

    #[test]
    fn a_slot_holds_the_largest_store() {
        let g = geometry(1 << 30, 512, 1 << 20).unwrap();
        let mut r = sample(1, 0);
        r.total_clusters = g.total_clusters;
        let long = "x".repeat(MAX_NAME);
        r.name = long.clone();
        // Every cluster allocated, spread over the most volumes with the longest names.
        r.volumes = (0..MAX_VOLUMES)
            .map(|i| VolumeRecord {
                uuid: Uuid::from_u128(i as u128),
                name: long.clone(),
                size_bytes: u64::MAX,
                thin: true,
                read_only: false,
                clear_method: 0,
                snapshot: false,
                parent: Some(Uuid::from_u128(1)),
                map: (i as u64..g.total_clusters).step_by(MAX_VOLUMES).map(|p| (p as u32, p as u32)).collect(),
            })
            .collect();
        assert_eq!(r.volumes.iter().map(|v| v.map.len() as u64).sum::<u64>(), g.total_clusters);
        assert!(r.encode().len() as u64 <= g.slot_bytes, "{} > {}", r.encode().len(), g.slot_bytes);
        assert_eq!(g.data_start % (1 << 20), 0);
        assert!(2 * g.slot_bytes <= g.data_start);
    }

    /// `sample(3, 1)` without snapshots or parents, as the first slice wrote it (version 1:
    /// no parent, no snapshot flag), byte for byte.
    const V1_RECORD: &str = "54444d4b4c56533101000000127f5d658800000000000000030000000000000000000000000000000000000000000007046c76733000001000000000000002000000001000000000006400000000000000010000000000000000000000000000000000006404766f6c30000010000000000003010200000000000000000000000500000032000000";

    fn unhex(h: &str) -> Vec<u8> {
        (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex")).collect()
    }

    #[test]
    fn a_version_1_record_still_opens() {
        let mut r = sample(3, 1);
        for v in &mut r.volumes {
            v.snapshot = false;
            v.parent = None;
        }
        let v1 = unhex(V1_RECORD);
        assert_eq!(StoreRecord::decode(&v1), Ok(r.clone()));
        // Written again, it is version 3 (upgrade rule 2), and decodes to the same state.
        let v3 = r.encode();
        assert_eq!(u32::from_le_bytes(v3[8..12].try_into().unwrap()), VERSION);
        assert_eq!(StoreRecord::decode(&v3), Ok(r.clone()));
        r.volumes[0].snapshot = true;
        assert_eq!(StoreRecord::decode(&r.encode()), Ok(r));
    }

    fn log(seq: u64, n: u32) -> LogRecord {
        LogRecord {
            seq,
            store: Uuid::from_u128(7),
            changes: (0..n).map(|i| MapChange { vol: Uuid::from_u128(100 + i as u128 % 3), logical: i * 5, phys: (i % 4 != 3).then_some(i) }).collect(),
        }
    }

    #[test]
    fn a_log_record_is_not_taken_for_a_store_record_nor_the_other_way() {
        let l = log(9, 4).encode();
        assert_eq!(StoreRecord::decode(&l), Err(DecodeError::NoMagic));
        assert_eq!(LogRecord::decode(&sample(9, 2).encode(), 100), Err(DecodeError::NoMagic));
        // A physical cluster past the store's end is corrupt, not a change to replay.
        assert_eq!(LogRecord::decode(&l, 2), Err(DecodeError::Corrupt));
        assert_eq!(LogRecord::decode(&l, 100), Ok(log(9, 4)));
    }

    proptest! {
        #[test]
        fn log_records_round_trip_and_any_tear_is_caught(seq in any::<u64>(), n in 0u32..60, cut in 0usize..4096) {
            let r = log(seq, n);
            let b = r.encode();
            prop_assert_eq!(LogRecord::decode(&b, 1000), Ok(r));
            let cut = cut % b.len();
            prop_assert!(LogRecord::decode(&b[..cut], 1000).is_err());
            let mut f = b.clone();
            f[cut.max(16)] ^= 0x01;
            prop_assert!(LogRecord::decode(&f, 1000).is_err());
        }
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(seq in any::<u64>(), nvol in 0usize..20, cut in 0usize..4096) {
            let r = sample(seq, nvol);
            let b = r.encode();
            prop_assert_eq!(StoreRecord::decode(&b), Ok(r));
            // Any truncation or flipped byte is caught, never decoded as another state.
            let cut = cut % b.len();
            prop_assert!(StoreRecord::decode(&b[..cut]).is_err());
            let mut f = b.clone();
            f[cut.max(16)] ^= 0x40;
            prop_assert!(StoreRecord::decode(&f).is_err());
        }
    }
}

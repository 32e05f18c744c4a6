//! The CoW store's on-media format.
//!
//! ```text
//! byte 0          header copy 0 (16 KiB)   } written alternately, each with a sequence number
//! byte 16 KiB     header copy 1 (16 KiB)   } and a CRC32C; the valid copy with the higher wins
//! byte 32 KiB     slot records: 16 bytes per slot (grain: u32, snapshot mask: u32,
//!                 pieces: u16, zero: 6 bytes), 4 KiB pages
//! data_offset     slot data: room for one grain per slot
//! ```
//! A slot record says "slot k holds the old content of the pieces of grain g whose bits are set
//! in `pieces`, for the snapshots whose bits are set in `mask`". A grain is copied in *pieces*
//! (a sixteenth of a grain, at least a block and a store block; the header records the size),
//! each at its own offset inside the slot, so a 4 KiB first write copies 4 KiB, not the grain;
//! the slot's other pieces hold nothing anyone reads. A record is 16 bytes inside one 512-byte
//! sector, so a torn page write leaves each record either old or new. Bits of snapshot indices
//! that the header does not list as live are ignored (and cleared) when the store is opened.
//!
//! A record may also carry a *check* (format 3): the pieces its last change added and the
//! CRC32C of their bytes (in piece order, each run of pieces as its bytes in the slot). That
//! lets a copy and its record go to the store together and become durable with one flush: if
//! a crash keeps the record but not all of the data, the check fails when the store is opened
//! and the added pieces are dropped from the record (nothing read them as durable: the host
//! write that needed them was not submitted before the flush completed, so the live image
//! still holds their image). A check is cleared (written as zero) by the next write of its
//! record page, so the store is opened with at most a few batches' checks to verify. Format 2
//! stores (no checks: zeros there) are read as they are.

use uuid::Uuid;

pub const MAGIC: [u8; 8] = *b"TDMKCOW1";
/// Format 3: records may carry a check of the pieces they add (format 2 had zeros there and is
/// read as it is; format 1 copied whole grains). Written headers say 3, so an older tidemark
/// refuses a store whose records it would trust without their check.
pub const VERSION: u32 = 3;
/// The oldest format this version reads.
pub const OLDEST_READABLE: u32 = 2;
pub const HEADER_BYTES: usize = 16 << 10;
pub const RECORDS_OFFSET: u64 = 2 * HEADER_BYTES as u64;
pub const PAGE_BYTES: usize = 4096;
pub const RECORD_BYTES: usize = 16;
pub const RECORDS_PER_PAGE: u64 = (PAGE_BYTES / RECORD_BYTES) as u64;
/// Pieces per grain at most (one bit each in a record's piece bitmap).
pub const MAX_PIECES: u32 = 16;
/// Snapshot indices per volume (one bit each in a slot record's mask).
pub const MAX_SNAPSHOTS: usize = 32;
pub const MAX_NAME: usize = 255;
const SNAP_REC: usize = 320;
const SNAPS_AT: usize = 64;

/// State of a snapshot index on media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskState {
    Free = 0,
    Draining = 1,
    Sealed = 2,
    /// Deleted; its bits may still be set in records (scrub pending).
    Deleting = 3,
    Failed = 4,
}

impl DiskState {
    fn from_u8(v: u8) -> Option<DiskState> {
        Some(match v {
            0 => DiskState::Free,
            1 => DiskState::Draining,
            2 => DiskState::Sealed,
            3 => DiskState::Deleting,
            4 => DiskState::Failed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SnapRecord {
    pub state: DiskState,
    pub epoch: u64,
    pub created_ms: u64,
    pub seal_ns: u64,
    pub uuid: Uuid,
    pub name: String,
}

impl SnapRecord {
    pub fn free() -> SnapRecord {
        SnapRecord { state: DiskState::Free, epoch: 0, created_ms: 0, seal_ns: 0, uuid: Uuid::nil(), name: String::new() }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub seq: u64,
    pub uuid: Uuid,
    pub base_num_blocks: u64,
    pub block_size: u32,
    pub grain_blocks: u32,
    /// Blocks per piece: a power of two, dividing the grain into at most [`MAX_PIECES`].
    pub piece_blocks: u32,
    pub slot_count: u32,
    pub snaps: Vec<SnapRecord>,
}

/// Where things are on a store of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub grain_bytes: u64,
    pub slot_count: u32,
    pub data_offset: u64,
}

impl Geometry {
    /// The largest slot count that fits `store_bytes` with grains of `grain_bytes`.
    pub fn fit(store_bytes: u64, grain_bytes: u64) -> Option<Geometry> {
        let room = store_bytes.checked_sub(RECORDS_OFFSET)?;
        let mut n = (room / (grain_bytes + RECORD_BYTES as u64)).min(u32::MAX as u64 - 1);
        loop {
            let g = Geometry::with_slots(grain_bytes, n as u32);
            if g.data_offset + n * grain_bytes <= store_bytes {
                return (n > 0).then_some(g);
            }
            n = n.checked_sub(1)?;
        }
    }

    pub fn with_slots(grain_bytes: u64, slot_count: u32) -> Geometry {
        let records = (slot_count as u64 * RECORD_BYTES as u64).div_ceil(PAGE_BYTES as u64) * PAGE_BYTES as u64;
        let data_offset = (RECORDS_OFFSET + records).div_ceil(PAGE_BYTES as u64) * PAGE_BYTES as u64;
        Geometry { grain_bytes, slot_count, data_offset }
    }

    pub fn record_pages(&self) -> u64 {
        (self.slot_count as u64).div_ceil(RECORDS_PER_PAGE)
    }

    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.data_offset + slot as u64 * self.grain_bytes
    }
}

/// The piece size for a grain: a sixteenth of it, but at least a block and a store block (so
/// that a piece is read and written whole on both devices).
pub fn piece_blocks(grain_blocks: u32, block_size: u32, store_bs: u32) -> u32 {
    let min_bytes = block_size.max(store_bs) as u64;
    let blocks_for_min = min_bytes.div_ceil(block_size as u64) as u32;
    (grain_blocks / MAX_PIECES).max(blocks_for_min).min(grain_blocks).max(1)
}

/// A slot record in RAM: grain and snapshot mask in one word (the piece bitmap lives beside it).
pub fn record(grain: u32, mask: u32) -> u64 {
    grain as u64 | ((mask as u64) << 32)
}

pub fn record_grain(r: u64) -> u32 {
    r as u32
}

pub fn record_mask(r: u64) -> u32 {
    (r >> 32) as u32
}

/// What a record's last change added and the CRC32C of those pieces' bytes (see the module
/// doc); `added == 0` means nothing to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Check {
    pub added: u16,
    pub crc: u32,
}

/// A record as stored: the word of [`record`], the piece bitmap, the check.
pub fn encode_record(r: u64, pieces: u16, check: Check) -> [u8; RECORD_BYTES] {
    let mut b = [0u8; RECORD_BYTES];
    b[0..8].copy_from_slice(&r.to_le_bytes());
    b[8..10].copy_from_slice(&pieces.to_le_bytes());
    b[10..12].copy_from_slice(&check.added.to_le_bytes());
    b[12..16].copy_from_slice(&check.crc.to_le_bytes());
    b
}

pub fn decode_record(b: &[u8]) -> (u64, u16, Check) {
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let word = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
    (word, u16_at(8), Check { added: u16_at(10), crc: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")) })
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..40].copy_from_slice(self.uuid.as_bytes());
        b[40..48].copy_from_slice(&self.base_num_blocks.to_le_bytes());
        b[48..52].copy_from_slice(&self.block_size.to_le_bytes());
        b[52..56].copy_from_slice(&self.grain_blocks.to_le_bytes());
        b[56..60].copy_from_slice(&self.slot_count.to_le_bytes());
        b[60..64].copy_from_slice(&self.piece_blocks.to_le_bytes());
        for (i, s) in self.snaps.iter().take(MAX_SNAPSHOTS).enumerate() {
            let r = &mut b[SNAPS_AT + i * SNAP_REC..SNAPS_AT + (i + 1) * SNAP_REC];
            r[0] = s.state as u8;
            r[8..16].copy_from_slice(&s.epoch.to_le_bytes());
            r[16..24].copy_from_slice(&s.created_ms.to_le_bytes());
            r[24..32].copy_from_slice(&s.seal_ns.to_le_bytes());
            r[32..48].copy_from_slice(s.uuid.as_bytes());
            let name = s.name.as_bytes();
            let n = name.len().min(MAX_NAME);
            r[48..50].copy_from_slice(&(n as u16).to_le_bytes());
            r[50..50 + n].copy_from_slice(&name[..n]);
        }
        let crc = crc32c::crc32c(&b);
        b[Self::CRC].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Where a header copy's CRC32C is (of the whole copy with these bytes zero).
    pub const CRC: std::ops::Range<usize> = 12..16;

    /// Decodes one header copy; None if it is not a valid one (torn, foreign, zeroed).
    pub fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_BYTES || b[0..8] != MAGIC {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if !(OLDEST_READABLE..=VERSION).contains(&u32_at(8)) {
            return None;
        }
        let mut copy = b[..HEADER_BYTES].to_vec();
        copy[Self::CRC].fill(0);
        if crc32c::crc32c(&copy) != u32_at(Self::CRC.start) {
            return None;
        }
        let mut snaps = Vec::with_capacity(MAX_SNAPSHOTS);
        for i in 0..MAX_SNAPSHOTS {
            let o = SNAPS_AT + i * SNAP_REC;
            let state = DiskState::from_u8(b[o])?;
            let n = (u16::from_le_bytes([b[o + 48], b[o + 49]]) as usize).min(MAX_NAME);
            let name = String::from_utf8(b[o + 50..o + 50 + n].to_vec()).ok()?;
            snaps.push(SnapRecord {
                state,
                epoch: u64_at(o + 8),
                created_ms: u64_at(o + 16),
                seal_ns: u64_at(o + 24),
                uuid: Uuid::from_slice(&b[o + 32..o + 48]).ok()?,
                name,
            });
        }
        Some(Header {
            seq: u64_at(16),
            uuid: Uuid::from_slice(&b[24..40]).ok()?,
            base_num_blocks: u64_at(40),
            block_size: u32_at(48),
            grain_blocks: u32_at(52),
            slot_count: u32_at(56),
            piece_blocks: u32_at(60),
            snaps,
        })
    }

    /// Byte offset of the copy that header `seq` is written to.
    pub fn copy_offset(seq: u64) -> u64 {
        (seq % 2) * HEADER_BYTES as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_detects_damage() {
        let mut snaps = vec![SnapRecord::free(); MAX_SNAPSHOTS];
        snaps[3] = SnapRecord { state: DiskState::Sealed, epoch: 7, created_ms: 1, seal_ns: 2, uuid: Uuid::new_v4(), name: "snap-a".into() };
        let h = Header { seq: 9, uuid: Uuid::new_v4(), base_num_blocks: 1 << 21, block_size: 512, grain_blocks: 128, piece_blocks: 8, slot_count: 1000, snaps };
        let mut b = h.encode();
        assert_eq!(Header::decode(&b), Some(h));
        b[5000] ^= 1;
        assert_eq!(Header::decode(&b), None);
        assert_eq!(Header::decode(&vec![0u8; HEADER_BYTES]), None);
    }

    #[test]
    fn geometry_fits_the_store() {
        let g = Geometry::fit(1 << 30, 64 << 10).unwrap();
        assert!(g.data_offset + g.slot_count as u64 * g.grain_bytes <= 1 << 30);
        assert!(g.slot_count > 16_000 && g.slot_count < 16_384);
        assert_eq!(g.data_offset % 4096, 0);
        assert!(Geometry::fit(RECORDS_OFFSET, 4096).is_none());
        let tiny = Geometry::fit(RECORDS_OFFSET + 4096 * 3, 4096).unwrap();
        assert_eq!(tiny.slot_count, 2);
    }

    #[test]
    fn pieces_are_a_sixteenth_of_a_grain_but_never_below_a_block() {
        assert_eq!(piece_blocks(128, 512, 512), 8); // 64 KiB grain of 512 B blocks: 4 KiB pieces
        assert_eq!(piece_blocks(16, 4096, 4096), 1); // 64 KiB grain of 4 KiB blocks
        assert_eq!(piece_blocks(8, 512, 512), 1); // 4 KiB grain: 512 B pieces, 8 of them
        assert_eq!(piece_blocks(8, 512, 4096), 8); // a 4 KiB store block: the grain is one piece
        assert_eq!(piece_blocks(1, 4096, 512), 1);
        for (g, bs, sbs) in [(128u32, 512u32, 512u32), (2048, 512, 4096), (256, 4096, 512), (8, 512, 1024)] {
            let p = piece_blocks(g, bs, sbs);
            assert!(g % p == 0 && g / p <= MAX_PIECES && (p * bs) % sbs == 0, "{g} {bs} {sbs} -> {p}");
        }
    }

    #[test]
    fn records_round_trip() {
        let r = record(77, 0x8000_0001);
        let c = Check { added: 0x0005, crc: 0xDEAD_BEEF };
        let b = encode_record(r, 0xA5A5, c);
        assert_eq!(decode_record(&b), (r, 0xA5A5, c));
        // A format 2 record (zeros after the bitmap) reads as one with nothing to check.
        let mut old = encode_record(r, 0xA5A5, c);
        old[10..].fill(0);
        assert_eq!(decode_record(&old), (r, 0xA5A5, Check::default()));
        assert_eq!(record_grain(r), 77);
        assert_eq!(record_mask(r), 0x8000_0001);
    }
}

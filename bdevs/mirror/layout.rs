//! What a mirror keeps on each of its legs, ahead of the data: two superblock copies, the
//! write-intent bitmap and one stale-region map per slot.
//!
//! ```text
//! page 0, 1        superblock copies, written alternately; the other copy holds the previous
//!                  one this leg got, so a torn superblock write leaves a valid one behind
//! pages 2..        write-intent bitmap: regions that may have writes in flight (crash recovery
//!                  resynchronises exactly these)
//! then, per slot   stale map: regions the leg in that slot has not received (its rebuild copies
//!                  exactly these)
//! data_offset      the mirror's block 0 (a multiple of 1 MiB)
//! ```
//!
//! A page is max(4 KiB, block size). Bitmap pages carry no checksum: a bitmap write sets or
//! clears bits, and a torn one leaves each sector old or new, both of which are safe (a set bit
//! whose write tore was never followed by data; a clear that tore only keeps a region dirty).
//! Everything here can come from a file, so decoding validates every field and never panics.

use uuid::Uuid;

pub const MAGIC: [u8; 8] = *b"TDMKMIR1";
pub const VERSION: u32 = 1;
/// Legs a mirror can have (slots in its table).
pub const MAX_SLOTS: usize = 8;
/// Longest mirror or image name stored in a superblock.
pub const MAX_NAME: usize = 255;
/// Bytes of the encoded superblock (the rest of its page is zero).
pub const SUPERBLOCK_BYTES: usize = 4096;
/// Superblock copies at the start of every leg.
pub const SUPERBLOCK_COPIES: u64 = 2;
/// The data area starts on a multiple of this.
pub const DATA_ALIGN_BYTES: u64 = 1 << 20;

/// The leg in this superblock was split off and sealed: it is a point-in-time image, never an
/// in-sync member of its mirror again (until re-joined by request).
pub const FLAG_SEALED_SPLIT: u32 = 1;

/// A slot's persistent state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// No leg.
    Empty,
    /// In sync: read and written.
    Active,
    /// Written, and being copied into; its stale map lists what is left to copy.
    Rebuilding,
    /// Dropped after an I/O error or because it was missing; its stale map lists what it missed.
    Failed,
    /// Removed by request; its stale map lists what it missed.
    Removed,
    /// Being split off (the split's epoch has not drained yet).
    Splitting,
    /// Split off and sealed as a point-in-time image.
    Split,
}

impl SlotState {
    fn code(self) -> u8 {
        match self {
            SlotState::Empty => 0,
            SlotState::Active => 1,
            SlotState::Rebuilding => 2,
            SlotState::Failed => 3,
            SlotState::Removed => 4,
            SlotState::Splitting => 5,
            SlotState::Split => 6,
        }
    }

    fn from_code(c: u8) -> Option<SlotState> {
        Some(match c {
            0 => SlotState::Empty,
            1 => SlotState::Active,
            2 => SlotState::Rebuilding,
            3 => SlotState::Failed,
            4 => SlotState::Removed,
            5 => SlotState::Splitting,
            6 => SlotState::Split,
            _ => return None,
        })
    }

    /// The leg left the mirror and misses writes (its stale map grows).
    pub fn departed(self) -> bool {
        matches!(self, SlotState::Failed | SlotState::Removed | SlotState::Splitting | SlotState::Split)
    }

    pub fn name(self) -> &'static str {
        match self {
            SlotState::Empty => "empty",
            SlotState::Active => "active",
            SlotState::Rebuilding => "rebuilding",
            SlotState::Failed => "failed",
            SlotState::Removed => "removed",
            SlotState::Splitting => "splitting",
            SlotState::Split => "split",
        }
    }
}

/// One slot of the mirror's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    /// Identity of the leg in the slot (written in that leg's own superblock).
    pub leg_uuid: Uuid,
    pub state: SlotState,
    /// For a split leg: the name of its image.
    pub image: String,
}

impl Default for SlotRecord {
    fn default() -> Self {
        SlotRecord { leg_uuid: Uuid::nil(), state: SlotState::Empty, image: String::new() }
    }
}

/// Where everything lives on a leg, in blocks of the legs' block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u32,
    /// Metadata page in bytes: max(4 KiB, block size).
    pub page_bytes: u32,
    pub region_blocks: u64,
    pub num_regions: u64,
    /// Pages of one bitmap (the write-intent bitmap and each stale map).
    pub bitmap_pages: u64,
    pub data_offset: u64,
    pub data_blocks: u64,
}

impl Geometry {
    /// The geometry of a new mirror on legs of `leg_blocks` blocks (the smallest leg).
    pub fn new(block_size: u32, leg_blocks: u64, region_bytes: u64) -> Result<Geometry, String> {
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(format!("legs' block size {block_size} is not a power of two from 512 to 65536"));
        }
        let bs = block_size as u64;
        if region_bytes < bs || region_bytes % bs != 0 || region_bytes > (1 << 32) {
            return Err(format!("region size {region_bytes} bytes must be a multiple of the block size {bs} and at most 4 GiB"));
        }
        let page_bytes = (block_size.max(4096)) as u64;
        let region_blocks = region_bytes / bs;
        // Size the bitmaps for the whole leg: the data area is smaller, so they fit.
        let max_regions = leg_blocks.div_ceil(region_blocks);
        let bitmap_pages = max_regions.div_ceil(8).div_ceil(page_bytes).max(1);
        let meta_bytes = (SUPERBLOCK_COPIES + (1 + MAX_SLOTS as u64) * bitmap_pages) * page_bytes;
        let data_offset = meta_bytes.div_ceil(DATA_ALIGN_BYTES) * DATA_ALIGN_BYTES / bs;
        if leg_blocks <= data_offset {
            return Err(format!(
                "legs of {} bytes are too small: the mirror's metadata takes the first {} bytes",
                leg_blocks.saturating_mul(bs),
                data_offset * bs
            ));
        }
        let data_blocks = leg_blocks - data_offset;
        let g = Geometry {
            block_size,
            page_bytes: page_bytes as u32,
            region_blocks,
            num_regions: data_blocks.div_ceil(region_blocks),
            bitmap_pages,
            data_offset,
            data_blocks,
        };
        debug_assert!(g.validate().is_ok());
        Ok(g)
    }

    /// Checks a geometry read from a leg.
    pub fn validate(&self) -> Result<(), String> {
        let bs = self.block_size as u64;
        if !self.block_size.is_power_of_two() || !(512..=65536).contains(&self.block_size) {
            return Err("bad block size".into());
        }
        if self.page_bytes as u64 != bs.max(4096) {
            return Err("bad metadata page size".into());
        }
        if self.region_blocks == 0 || self.region_blocks.saturating_mul(bs) > (1 << 32) {
            return Err("bad region size".into());
        }
        if self.data_blocks == 0 || self.num_regions != self.data_blocks.div_ceil(self.region_blocks) {
            return Err("region count does not match the data size".into());
        }
        if self.bitmap_pages == 0 || self.bitmap_pages.saturating_mul(self.page_bytes as u64).saturating_mul(8) < self.num_regions {
            return Err("bitmaps too small for the regions".into());
        }
        let meta_blocks = SUPERBLOCK_COPIES.saturating_add((1 + MAX_SLOTS as u64).saturating_mul(self.bitmap_pages)).saturating_mul(self.blocks_per_page());
        if self.data_offset < meta_blocks || self.data_offset.checked_add(self.data_blocks).is_none() {
            return Err("data area overlaps the metadata".into());
        }
        Ok(())
    }

    pub fn blocks_per_page(&self) -> u64 {
        self.page_bytes as u64 / self.block_size as u64
    }

    /// Blocks a leg needs to hold this mirror.
    pub fn leg_blocks_needed(&self) -> u64 {
        self.data_offset + self.data_blocks
    }

    pub fn region_bytes(&self) -> u64 {
        self.region_blocks * self.block_size as u64
    }

    /// First block of superblock copy `copy` (0 or 1).
    pub fn superblock_block(&self, copy: u64) -> u64 {
        copy * self.blocks_per_page()
    }

    /// First block of page `page` of bitmap `map`.
    pub fn bitmap_page_block(&self, map: BitmapId, page: u64) -> u64 {
        let index = match map {
            BitmapId::WriteIntent => 0,
            BitmapId::Stale(slot) => 1 + slot as u64,
        };
        (SUPERBLOCK_COPIES + index * self.bitmap_pages + page) * self.blocks_per_page()
    }

    /// The page of a bitmap that holds region `r`'s bit.
    pub fn page_of(&self, r: u64) -> u64 {
        r / (self.page_bytes as u64 * 8)
    }

    /// Regions [first, last] that blocks [offset, offset+count) touch (count > 0).
    pub fn regions_of(&self, offset: u64, count: u64) -> (u64, u64) {
        (offset / self.region_blocks, (offset + count.max(1) - 1) / self.region_blocks)
    }

    /// Blocks of region `r` as (offset, count) in the mirror's address space.
    pub fn region_range(&self, r: u64) -> (u64, u64) {
        let start = r * self.region_blocks;
        (start, self.region_blocks.min(self.data_blocks - start))
    }
}

/// Which bitmap of the metadata area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BitmapId {
    WriteIntent,
    Stale(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub mirror_uuid: Uuid,
    pub name: String,
    /// This leg's identity and slot.
    pub leg_uuid: Uuid,
    pub slot: usize,
    pub generation: u64,
    pub flags: u32,
    pub geometry: Geometry,
    pub slots: [SlotRecord; MAX_SLOTS],
}

// Offsets in the encoded superblock.
const O_MAGIC: usize = 0;
const O_VERSION: usize = 8;
const O_FLAGS: usize = 12;
const O_MIRROR: usize = 16;
const O_LEG: usize = 32;
const O_SLOT: usize = 48;
const O_BLOCK_SIZE: usize = 52;
const O_GENERATION: usize = 56;
const O_PAGE: usize = 64;
const O_REGION_BLOCKS: usize = 72;
const O_NUM_REGIONS: usize = 80;
const O_BITMAP_PAGES: usize = 88;
const O_DATA_OFFSET: usize = 96;
const O_DATA_BLOCKS: usize = 104;
const O_NAME_LEN: usize = 112;
const O_NAME: usize = 114;
const O_SLOTS: usize = O_NAME + MAX_NAME; // 369
const SLOT_BYTES: usize = 16 + 1 + 1 + MAX_NAME; // uuid, state, image length, image
/// Where a superblock's CRC32C is (of the bytes before it).
pub(crate) const O_CRC: usize = SUPERBLOCK_BYTES - 4;
const _: () = assert!(O_SLOTS + MAX_SLOTS * SLOT_BYTES <= O_CRC);

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn get_uuid(b: &[u8], at: usize) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Uuid::from_bytes(a)
}

impl Superblock {
    /// Encodes into `out` (at least [`SUPERBLOCK_BYTES`]; the rest is zeroed).
    pub fn encode(&self, out: &mut [u8]) {
        assert!(out.len() >= SUPERBLOCK_BYTES, "superblock buffer too small");
        assert!(self.name.len() <= MAX_NAME && self.slot < MAX_SLOTS, "superblock fields out of range");
        out.fill(0);
        let b = &mut out[..SUPERBLOCK_BYTES];
        b[O_MAGIC..O_MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(b, O_VERSION, VERSION);
        put_u32(b, O_FLAGS, self.flags);
        b[O_MIRROR..O_MIRROR + 16].copy_from_slice(self.mirror_uuid.as_bytes());
        b[O_LEG..O_LEG + 16].copy_from_slice(self.leg_uuid.as_bytes());
        put_u32(b, O_SLOT, self.slot as u32);
        let g = &self.geometry;
        put_u32(b, O_BLOCK_SIZE, g.block_size);
        put_u64(b, O_GENERATION, self.generation);
        put_u64(b, O_PAGE, g.page_bytes as u64);
        put_u64(b, O_REGION_BLOCKS, g.region_blocks);
        put_u64(b, O_NUM_REGIONS, g.num_regions);
        put_u64(b, O_BITMAP_PAGES, g.bitmap_pages);
        put_u64(b, O_DATA_OFFSET, g.data_offset);
        put_u64(b, O_DATA_BLOCKS, g.data_blocks);
        b[O_NAME_LEN..O_NAME_LEN + 2].copy_from_slice(&(self.name.len() as u16).to_le_bytes());
        b[O_NAME..O_NAME + self.name.len()].copy_from_slice(self.name.as_bytes());
        for (i, s) in self.slots.iter().enumerate() {
            let at = O_SLOTS + i * SLOT_BYTES;
            assert!(s.image.len() <= MAX_NAME, "image name too long");
            b[at..at + 16].copy_from_slice(s.leg_uuid.as_bytes());
            b[at + 16] = s.state.code();
            b[at + 17] = s.image.len() as u8;
            b[at + 18..at + 18 + s.image.len()].copy_from_slice(s.image.as_bytes());
        }
        let crc = crc32c::crc32c(&b[..O_CRC]);
        put_u32(b, O_CRC, crc);
    }

    /// Decodes a superblock; `None` for anything that is not a valid tidemark mirror superblock.
    pub fn decode(b: &[u8]) -> Option<Superblock> {
        if b.len() < SUPERBLOCK_BYTES || b[O_MAGIC..O_MAGIC + 8] != MAGIC {
            return None;
        }
        if crc32c::crc32c(&b[..O_CRC]) != get_u32(b, O_CRC) || get_u32(b, O_VERSION) != VERSION {
            return None;
        }
        let page = get_u64(b, O_PAGE);
        let geometry = Geometry {
            block_size: get_u32(b, O_BLOCK_SIZE),
            page_bytes: u32::try_from(page).ok()?,
            region_blocks: get_u64(b, O_REGION_BLOCKS),
            num_regions: get_u64(b, O_NUM_REGIONS),
            bitmap_pages: get_u64(b, O_BITMAP_PAGES),
            data_offset: get_u64(b, O_DATA_OFFSET),
            data_blocks: get_u64(b, O_DATA_BLOCKS),
        };
        geometry.validate().ok()?;
        let slot = get_u32(b, O_SLOT) as usize;
        if slot >= MAX_SLOTS {
            return None;
        }
        let name_len = u16::from_le_bytes([b[O_NAME_LEN], b[O_NAME_LEN + 1]]) as usize;
        if name_len > MAX_NAME {
            return None;
        }
        let name = std::str::from_utf8(&b[O_NAME..O_NAME + name_len]).ok()?.to_string();
        let mut slots: [SlotRecord; MAX_SLOTS] = Default::default();
        for (i, s) in slots.iter_mut().enumerate() {
            let at = O_SLOTS + i * SLOT_BYTES;
            let state = SlotState::from_code(b[at + 16])?;
            let len = b[at + 17] as usize;
            let image = std::str::from_utf8(&b[at + 18..at + 18 + len]).ok()?.to_string();
            *s = SlotRecord { leg_uuid: get_uuid(b, at), state, image };
        }
        Some(Superblock {
            mirror_uuid: get_uuid(b, O_MIRROR),
            name,
            leg_uuid: get_uuid(b, O_LEG),
            slot,
            generation: get_u64(b, O_GENERATION),
            flags: get_u32(b, O_FLAGS),
            geometry,
            slots,
        })
    }

    /// The format version of an intact tidemark mirror superblock (magic and checksum good)
    /// whose version this build does not read; `None` for anything else. Assemble refuses such
    /// a leg instead of taking it for a blank one and overwriting a mirror a newer (or older)
    /// tidemark wrote.
    pub fn other_version(b: &[u8]) -> Option<u32> {
        if b.len() < SUPERBLOCK_BYTES || b[O_MAGIC..O_MAGIC + 8] != MAGIC || crc32c::crc32c(&b[..O_CRC]) != get_u32(b, O_CRC) {
            return None;
        }
        Some(get_u32(b, O_VERSION)).filter(|v| *v != VERSION)
    }

    /// The newer valid superblock of two copies.
    pub fn newest(a: Option<Superblock>, b: Option<Superblock>) -> Option<Superblock> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.generation > a.generation { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// A bitmap of regions, in memory.
#[derive(Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    /// Bits set (kept up to date, so counting is free).
    ones: u64,
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitmap({} of {} set)", self.count(), self.len)
    }
}

impl Bitmap {
    pub fn new(len: u64) -> Bitmap {
        Bitmap { words: vec![0; len.div_ceil(64) as usize], len, ones: 0 }
    }

    pub fn full(len: u64) -> Bitmap {
        let mut b = Bitmap::new(len);
        b.words.iter_mut().for_each(|w| *w = u64::MAX);
        b.trim();
        b.recount();
        b
    }

    fn recount(&mut self) {
        self.ones = self.words.iter().map(|w| w.count_ones() as u64).sum();
    }

    fn trim(&mut self) {
        let tail = self.len % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it changed.
    pub fn set(&mut self, i: u64) -> bool {
        assert!(i < self.len, "bit {i} beyond bitmap of {}", self.len);
        let w = &mut self.words[(i / 64) as usize];
        let m = 1 << (i % 64);
        let changed = *w & m == 0;
        *w |= m;
        self.ones += changed as u64;
        changed
    }

    /// Clears bit `i`; returns whether it changed.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1 << (i % 64);
        let changed = *w & m != 0;
        *w &= !m;
        self.ones -= changed as u64;
        changed
    }

    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.ones = 0;
    }

    pub fn count(&self) -> u64 {
        self.ones
    }

    pub fn is_empty(&self) -> bool {
        self.ones == 0
    }

    /// ORs `other` (of the same length) into this bitmap.
    pub fn union_with(&mut self, other: &Bitmap) {
        assert_eq!(self.len, other.len, "bitmaps of different lengths");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        self.recount();
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut w = self.words[wi] & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                let i = wi as u64 * 64 + w.trailing_zeros() as u64;
                return (i < self.len).then_some(i);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = self.words[wi];
        }
    }

    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        let mut next = self.next_set(0);
        std::iter::from_fn(move || {
            let cur = next?;
            next = self.next_set(cur + 1);
            Some(cur)
        })
    }

    /// Encodes page `page` (`page_bytes` bytes, bit i of byte j = region page*8*page_bytes +
    /// 8j + i) into `out`.
    pub fn encode_page(&self, page: u64, out: &mut [u8]) {
        out.fill(0);
        let first = page * out.len() as u64 * 8;
        for (j, byte) in out.iter_mut().enumerate() {
            let base = first + j as u64 * 8;
            if base >= self.len {
                break;
            }
            let w = self.words[(base / 64) as usize];
            *byte = (w >> (base % 64)) as u8;
        }
        // Bits past the end are zero in `words` (trimmed), so nothing to mask.
    }

    /// ORs page `page` as read from a leg into this bitmap (bits past the end are ignored).
    pub fn merge_page(&mut self, page: u64, data: &[u8]) {
        let first = page * data.len() as u64 * 8;
        for (j, &byte) in data.iter().enumerate() {
            let base = first + j as u64 * 8;
            if base >= self.len {
                break;
            }
            self.words[(base / 64) as usize] |= (byte as u64) << (base % 64);
        }
        self.trim();
        self.recount();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Superblock {
        let g = Geometry::new(512, 1 << 21, 1 << 20).unwrap();
        let mut slots: [SlotRecord; MAX_SLOTS] = Default::default();
        slots[0] = SlotRecord { leg_uuid: Uuid::new_v4(), state: SlotState::Active, image: String::new() };
        slots[1] = SlotRecord { leg_uuid: Uuid::new_v4(), state: SlotState::Split, image: "snap-1".into() };
        Superblock { mirror_uuid: Uuid::new_v4(), name: "m0".into(), leg_uuid: slots[0].leg_uuid, slot: 0, generation: 7, flags: 0, geometry: g, slots }
    }

    #[test]
    fn geometry_leaves_room_for_metadata_and_aligns_data() {
        let g = Geometry::new(512, 2 << 20, 1 << 20).unwrap(); // 1 GiB legs
        assert_eq!(g.data_offset * 512 % DATA_ALIGN_BYTES, 0);
        assert_eq!(g.data_offset, 2048); // 1 MiB holds 11 pages of metadata
        assert_eq!(g.num_regions, g.data_blocks.div_ceil(2048));
        assert!(g.bitmap_page_block(BitmapId::Stale(7), 0) + g.blocks_per_page() <= g.data_offset);
        let big = Geometry::new(4096, 1 << 28, 1 << 20).unwrap(); // 1 TiB
        assert_eq!(big.bitmap_pages, 32);
        assert!(big.validate().is_ok());
        assert!(Geometry::new(512, 100, 1 << 20).is_err(), "too small for the metadata");
        assert!(Geometry::new(512, 1 << 21, 1000).is_err(), "region not a multiple of the block");
        assert!(Geometry::new(500, 1 << 21, 1 << 20).is_err());
    }

    #[test]
    fn superblock_round_trips_and_rejects_damage() {
        let sb = sample();
        let mut buf = vec![0u8; 4096];
        sb.encode(&mut buf);
        assert_eq!(Superblock::decode(&buf), Some(sb.clone()));
        for at in [0, 9, 60, 200, 4000, 4095] {
            let mut bad = buf.clone();
            bad[at] ^= 0x40;
            assert_eq!(Superblock::decode(&bad), None, "flipped byte {at}");
        }
        assert_eq!(Superblock::decode(&buf[..100]), None);
        assert_eq!(Superblock::other_version(&buf), None, "this build's version is not another");
        let mut other = buf.clone();
        other[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        let crc = crc32c::crc32c(&other[..4092]);
        other[4092..4096].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Superblock::decode(&other), None);
        assert_eq!(Superblock::other_version(&other), Some(VERSION + 1));
        let mut newer = sb.clone();
        newer.generation = 8;
        assert_eq!(Superblock::newest(Some(sb.clone()), Some(newer.clone())), Some(newer.clone()));
        assert_eq!(Superblock::newest(None, Some(sb.clone())), Some(sb));
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Superblock::decode(&data);
        }

        #[test]
        fn decoding_a_damaged_valid_block_never_panics(pos in 0usize..4092, val in any::<u8>()) {
            let mut buf = vec![0u8; 4096];
            sample().encode(&mut buf);
            buf[pos] = val;
            // Fix the checksum so that field validation, not the CRC, has to catch it.
            let crc = crc32c::crc32c(&buf[..4092]);
            buf[4092..].copy_from_slice(&crc.to_le_bytes());
            let _ = Superblock::decode(&buf);
        }

        #[test]
        fn bitmap_pages_round_trip(len in 1u64..70_000, bits in proptest::collection::vec(any::<u64>(), 0..64), page_bytes in prop_oneof![Just(4096usize), Just(8192usize)]) {
            let mut b = Bitmap::new(len);
            for x in &bits { b.set(x % len); }
            let pages = len.div_ceil(8).div_ceil(page_bytes as u64);
            let mut back = Bitmap::new(len);
            let mut page = vec![0u8; page_bytes];
            for p in 0..pages {
                b.encode_page(p, &mut page);
                back.merge_page(p, &page);
            }
            prop_assert_eq!(&back, &b);
            let set: Vec<u64> = b.iter_set().collect();
            let mut want: Vec<u64> = bits.iter().map(|x| x % len).collect();
            want.sort();
            want.dedup();
            prop_assert_eq!(set, want);
            prop_assert_eq!(b.count(), b.iter_set().count() as u64);
            prop_assert_eq!(back.count(), b.count());
        }
    }

    #[test]
    fn full_bitmap_has_exactly_len_bits() {
        let b = Bitmap::full(130);
        assert_eq!(b.count(), 130);
        assert_eq!(b.next_set(129), Some(129));
        assert_eq!(b.next_set(130), None);
    }
}

//! Building a mirror from its legs: a new mirror on blank (or foreign) legs, or the mirror
//! found in the legs' superblocks after a restart or a crash.
//!
//! Reassembly trusts the superblock with the highest generation for the slot table. Legs that
//! it lists as in sync are in sync (a leg is only ever dropped after its departure is durable).
//! The write-intent bitmaps of the in-sync legs are merged: those regions may differ between
//! legs after a crash and are resynchronised in the background (reads of them use one leg
//! until then). Every stale map is merged with them too, since the writes in flight may have
//! missed a departed leg without its stale map on disk saying so yet.

use super::control::{write_superblock, Ctl, CtlSlot};
use super::layout::{
    Bitmap, BitmapId, Geometry, SlotRecord, SlotState, Superblock, FLAG_SEALED_SPLIT, MAX_NAME, MAX_SLOTS, O_CRC, SUPERBLOCK_BYTES, SUPERBLOCK_COPIES,
};
use super::regions::RegionStates;
use super::{MirrorBdev, MirrorCounters, MirrorError, MirrorOptions, MirrorStatus, Shared, SlotShared};
use crate::bdev::{BdevProps, Channel, HoldGuard, IoBuf, IoResult};
use crate::reactor;
use crossbeam_utils::CachePadded;
use futures::channel::mpsc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// Reads both superblock copies of a leg; the newer valid one.
pub(crate) async fn read_superblock(ch: &Channel, block_size: u32) -> Option<Superblock> {
    read_superblock_copies(ch, block_size).await.0
}

/// The newer valid superblock of a leg, and the copy the next superblock write must go to: the
/// other one, so that a torn write always leaves the newest valid superblock behind (a leg
/// can miss generations, so generation parity cannot say which copy is which).
pub(crate) async fn read_superblock_copies(ch: &Channel, block_size: u32) -> (Option<Superblock>, u64) {
    let (sb, next, _) = read_superblock_copies_versioned(ch, block_size).await;
    (sb, next)
}

/// As [`read_superblock_copies`], and the format version of a copy this build cannot read
/// (a mirror superblock of another tidemark version), if any.
async fn read_superblock_copies_versioned(ch: &Channel, block_size: u32) -> (Option<Superblock>, u64, Option<u32>) {
    let page = (block_size as u64).max(4096);
    let blocks_per_page = page / block_size as u64;
    if ch.num_blocks() < SUPERBLOCK_COPIES * blocks_per_page {
        return (None, 0, None);
    }
    let mut buf = IoBuf::alloc(page as usize);
    let mut best: Option<(Superblock, u64)> = None;
    let mut other = None;
    for copy in 0..SUPERBLOCK_COPIES {
        if ch.read_buf(copy * blocks_per_page, &mut buf).await.is_ok() {
            if let Some(sb) = Superblock::decode(&buf[..SUPERBLOCK_BYTES]) {
                if best.as_ref().is_none_or(|(b, _)| sb.generation > b.generation) {
                    best = Some((sb, copy));
                }
            } else {
                other = other.or(Superblock::other_version(&buf[..SUPERBLOCK_BYTES]));
            }
        }
    }
    match best {
        Some((sb, copy)) => (Some(sb), 1 - copy, other),
        None => (None, 0, other),
    }
}

/// ORs bitmap `map` as stored on a leg into `into`.
async fn read_bitmap(ch: &Channel, g: &Geometry, map: BitmapId, into: &mut Bitmap) -> IoResult {
    let mut buf = IoBuf::alloc(g.page_bytes as usize);
    for p in 0..g.bitmap_pages {
        ch.read_buf(g.bitmap_page_block(map, p), &mut buf).await?;
        into.merge_page(p, &buf);
    }
    Ok(())
}

/// Writes every bitmap to a leg; with `fresh`, also clears both superblock copies first (no old
/// superblock may outrank the new one).
async fn write_all_bitmaps(ch: &Channel, g: &Geometry, wi: &Bitmap, stale: &[Bitmap], fresh: bool) -> IoResult {
    let mut buf = IoBuf::zeroed(g.page_bytes as usize);
    if fresh {
        for copy in 0..SUPERBLOCK_COPIES {
            ch.write_buf(g.superblock_block(copy), &buf).await?;
        }
    }
    for p in 0..g.bitmap_pages {
        wi.encode_page(p, &mut buf);
        ch.write_buf(g.bitmap_page_block(BitmapId::WriteIntent, p), &buf).await?;
    }
    for (s, map) in stale.iter().enumerate() {
        for p in 0..g.bitmap_pages {
            map.encode_page(p, &mut buf);
            ch.write_buf(g.bitmap_page_block(BitmapId::Stale(s), p), &buf).await?;
        }
    }
    ch.flush().await
}

struct Leg {
    guard: HoldGuard,
    ch: Channel,
    sb: Option<Superblock>,
    next_copy: u64,
    name: String,
}

pub(crate) async fn assemble(
    name: &str,
    guards: Vec<HoldGuard>,
    missing: Vec<String>,
    uuid: Option<Uuid>,
    options: MirrorOptions,
) -> Result<Arc<MirrorBdev>, MirrorError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(MirrorError::Invalid(format!("mirror name must be 1 to {MAX_NAME} bytes")));
    }
    if guards.len() + missing.len() > MAX_SLOTS {
        return Err(MirrorError::Invalid(format!("a mirror has at most {MAX_SLOTS} legs")));
    }
    if guards.is_empty() {
        return Err(MirrorError::NotFound(format!("none of the legs of mirror {name} exists ({})", missing.join(", "))));
    }
    let mut legs = Vec::new();
    for guard in guards {
        let entry = guard.entry().clone();
        let leg_name = entry.name().to_string();
        if entry.bdev().read_only() {
            return Err(MirrorError::Invalid(format!("{leg_name} is read-only")));
        }
        let ch = Channel::get(&entry).map_err(|e| MirrorError::Io(format!("cannot open {leg_name}: {e}")))?;
        legs.push(Leg { guard, ch, sb: None, next_copy: 0, name: leg_name });
    }
    let bs = legs[0].ch.block_size();
    if let Some(l) = legs.iter().find(|l| l.ch.block_size() != bs) {
        return Err(MirrorError::Invalid(format!("legs have different block sizes: {} has {}, {} has {bs}", l.name, l.ch.block_size(), legs[0].name)));
    }
    for l in legs.iter_mut() {
        let other;
        (l.sb, l.next_copy, other) = read_superblock_copies_versioned(&l.ch, bs).await;
        if let (None, Some(v)) = (&l.sb, other) {
            // A mirror written by another tidemark version: not blank, and not ours to rewrite.
            return Err(MirrorError::Invalid(format!(
                "{} holds a mirror superblock of format version {v}, this tidemark reads version {}: refusing to overwrite it (see docs/design.md, on-media formats)",
                l.name,
                super::layout::VERSION
            )));
        }
    }
    // Members: legs whose superblock names this mirror (by uuid if given, else by name). If
    // several mirrors match, the one with the newest superblock wins.
    let matches = |sb: &Superblock| sb.flags & FLAG_SEALED_SPLIT == 0 && uuid.map_or(sb.name == name, |u| sb.mirror_uuid == u);
    let newest = legs.iter().filter_map(|l| l.sb.as_ref()).filter(|sb| matches(sb)).max_by_key(|sb| sb.generation).cloned();
    match newest {
        None => {
            if !missing.is_empty() {
                return Err(MirrorError::NotFound(format!("bdev(s) {} do not exist", missing.join(", "))));
            }
            if legs.len() < 2 {
                return Err(MirrorError::Invalid("a new mirror needs at least 2 legs".into()));
            }
            create_new(name, legs, uuid, options).await
        }
        Some(auth) => reassemble(name, legs, missing, auth, options).await,
    }
}

async fn create_new(name: &str, legs: Vec<Leg>, uuid: Option<Uuid>, options: MirrorOptions) -> Result<Arc<MirrorBdev>, MirrorError> {
    let bs = legs[0].ch.block_size();
    let smallest = legs.iter().map(|l| l.ch.num_blocks()).min().unwrap_or(0);
    let g = Geometry::new(bs, smallest, options.region_bytes)?;
    let mirror_uuid = uuid.unwrap_or_else(Uuid::new_v4);
    let mut slots: Vec<CtlSlot> = (0..MAX_SLOTS).map(|_| CtlSlot::empty()).collect();
    let wi = Bitmap::new(g.num_regions);
    let stale: Vec<Bitmap> = (0..MAX_SLOTS).map(|_| Bitmap::new(g.num_regions)).collect();
    for (i, l) in legs.into_iter().enumerate() {
        slots[i] = CtlSlot {
            rec: SlotRecord { leg_uuid: Uuid::new_v4(), state: SlotState::Active, image: String::new() },
            name: l.name,
            guard: Some(l.guard),
            ch: Some(l.ch),
            failing: false,
            next_sb_copy: 0,
        };
    }
    let generation = 1;
    let table: [SlotRecord; MAX_SLOTS] = std::array::from_fn(|i| slots[i].rec.clone());
    for (i, s) in slots.iter().enumerate() {
        let Some(ch) = &s.ch else { continue };
        let sb = Superblock { mirror_uuid, name: name.to_string(), leg_uuid: s.rec.leg_uuid, slot: i, generation, flags: 0, geometry: g, slots: table.clone() };
        let r = async {
            write_all_bitmaps(ch, &g, &wi, &stale, true).await?;
            write_superblock(ch, &g, &sb, 0).await
        }
        .await;
        r.map_err(|e| MirrorError::Io(format!("cannot write the mirror's metadata to {}: {e}", s.name)))?;
    }
    for s in slots.iter_mut() {
        s.next_sb_copy = 1;
    }
    log::info!(
        "mirror {name}: created on {} legs, {} regions of {} KiB, data at block {}",
        table.iter().filter(|r| r.state == SlotState::Active).count(),
        g.num_regions,
        g.region_bytes() / 1024,
        g.data_offset
    );
    Ok(start(name, mirror_uuid, g, generation, slots, wi, stale, Bitmap::new(g.num_regions), options))
}

async fn reassemble(name: &str, legs: Vec<Leg>, missing: Vec<String>, auth: Superblock, options: MirrorOptions) -> Result<Arc<MirrorBdev>, MirrorError> {
    let g = auth.geometry;
    let bs = legs[0].ch.block_size();
    if bs != g.block_size {
        return Err(MirrorError::Invalid(format!("mirror {name} has {}-byte blocks but its legs have {bs}-byte blocks", g.block_size)));
    }
    let mut slots: Vec<CtlSlot> = (0..MAX_SLOTS).map(|_| CtlSlot::empty()).collect();
    for (i, rec) in auth.slots.iter().enumerate() {
        slots[i].rec = rec.clone();
    }
    // Place the legs that belong to the mirror in their slots.
    let mut newcomers = Vec::new();
    let mut provided = [false; MAX_SLOTS];
    let mut in_sync_members = Vec::new();
    for l in legs {
        // A sealed split image is never taken over by reassembly, whichever mirror it came
        // from: re-joining it is a request (bdev_raid_add_base_bdev), and another mirror's
        // image must not be overwritten by a configuration replay.
        // A leg marked as this mirror's image whose split the mirror does not record (the split
        // failed, or its record never reached the metadata legs) is a member like any other.
        let failed_split = l.sb.as_ref().is_some_and(|sb| {
            sb.flags & FLAG_SEALED_SPLIT != 0
                && sb.mirror_uuid == auth.mirror_uuid
                && sb.geometry == g
                && slots.get(sb.slot).is_some_and(|s| s.rec.leg_uuid == sb.leg_uuid && !matches!(s.rec.state, SlotState::Splitting | SlotState::Split))
        });
        if let Some(sb) = l.sb.as_ref().filter(|sb| sb.flags & FLAG_SEALED_SPLIT != 0 && !failed_split) {
            let image = sb.slots.get(sb.slot).map(|r| r.image.clone()).unwrap_or_default();
            log::warn!(
                "mirror {name}: {} holds the sealed split image {image:?} of mirror {}; left alone (bdev_raid_add_base_bdev re-joins it)",
                l.name,
                sb.name
            );
            continue;
        }
        let member = l.sb.as_ref().filter(|sb| sb.mirror_uuid == auth.mirror_uuid && sb.geometry == g).map(|sb| (sb.slot, sb.leg_uuid));
        match member {
            Some((slot, leg_uuid)) if slots[slot].rec.leg_uuid == leg_uuid && !provided[slot] => {
                let state = slots[slot].rec.state;
                if state == SlotState::Split {
                    log::info!(
                        "mirror {name}: {} is the split image {} of this mirror; not re-joined (use bdev_raid_add_base_bdev)",
                        l.name,
                        slots[slot].rec.image
                    );
                    continue;
                }
                if state == SlotState::Empty {
                    newcomers.push(l);
                    continue;
                }
                provided[slot] = true;
                if state == SlotState::Active {
                    in_sync_members.push(slot);
                }
                slots[slot].name = l.name;
                slots[slot].guard = Some(l.guard);
                slots[slot].ch = Some(l.ch);
                slots[slot].next_sb_copy = l.next_copy;
            }
            _ => newcomers.push(l),
        }
    }
    if in_sync_members.is_empty() {
        return Err(MirrorError::Invalid(format!("none of the legs given holds an in-sync copy of mirror {name} (generation {})", auth.generation)));
    }
    // The copy each member's next superblock goes to may hold one torn by the crash: its CRC is
    // zeroed before anything is written, or a later torn superblock could make it whole (see
    // `lvol::void_slot`). A member that cannot be written fails the assembly, as one whose
    // metadata cannot be read does.
    for s in slots.iter().filter(|s| s.guard.is_some()) {
        let Some(ch) = &s.ch else { continue };
        let at = g.superblock_block(s.next_sb_copy) * bs as u64 + O_CRC as u64;
        let (block, o) = (at / bs as u64, (at % bs as u64) as usize);
        ch.patch_block(block, |b| b[o..o + 4].fill(0))
            .await
            .map_err(|e| MirrorError::Io(format!("cannot write the metadata of mirror {name} to {}: {e}", s.name)))?;
    }
    // What the in-sync legs know: write intent (merged: any leg may have been the one that got
    // the last bit) and stale maps.
    let mut wi = Bitmap::new(g.num_regions);
    let mut stale: Vec<Bitmap> = (0..MAX_SLOTS).map(|_| Bitmap::new(g.num_regions)).collect();
    for &s in &in_sync_members {
        let Some(ch) = &slots[s].ch else { continue };
        let r = async {
            read_bitmap(ch, &g, BitmapId::WriteIntent, &mut wi).await?;
            for (i, map) in stale.iter_mut().enumerate() {
                read_bitmap(ch, &g, BitmapId::Stale(i), map).await?;
            }
            Ok::<(), crate::bdev::BdevError>(())
        }
        .await;
        r.map_err(|e| MirrorError::Io(format!("cannot read the metadata of mirror {name} from {}: {e}", slots[s].name)))?;
    }
    let mut changes = Vec::new();
    for s in 0..MAX_SLOTS {
        let state = slots[s].rec.state;
        let here = provided[s];
        let new_state = match state {
            // A split recorded before a stop: its leg was marked as the image before the record
            // (so it is never a member here), and its RPC may have been answered. The image is
            // kept: the leg holds every write before the split's instant that reached its
            // media, and no write after.
            SlotState::Splitting if !here => {
                changes.push(format!("split image {} kept", slots[s].rec.image));
                SlotState::Split
            }
            SlotState::Active | SlotState::Rebuilding if !here => {
                changes.push(format!("slot {s} missing"));
                SlotState::Failed
            }
            // A leg given as a member whose split is recorded but which was not marked (a record
            // written before the leg's mark existed): behind, like a failed one.
            SlotState::Splitting => SlotState::Rebuilding,
            SlotState::Failed | SlotState::Removed if here => {
                changes.push(format!("{} returns", slots[s].name));
                SlotState::Rebuilding
            }
            other => other,
        };
        slots[s].rec.state = new_state;
        if new_state != SlotState::Split {
            slots[s].rec.image.clear();
        }
        if new_state != SlotState::Active && new_state != SlotState::Empty {
            stale[s].union_with(&wi);
        }
    }
    // Legs that are not (or no longer) members join as new legs, copied in full.
    for l in newcomers {
        if l.ch.num_blocks() < g.leg_blocks_needed() {
            return Err(MirrorError::Invalid(format!(
                "{} is too small to be a leg of mirror {name}: {} blocks, needs {}",
                l.name,
                l.ch.num_blocks(),
                g.leg_blocks_needed()
            )));
        }
        // A failed slot whose leg was not given first: most often that leg is this one, back
        // without a readable superblock (it joined just before a crash); else a free slot.
        let free = |want: SlotState, slots: &[CtlSlot]| slots.iter().position(|s| s.rec.state == want && s.guard.is_none());
        let slot = free(SlotState::Failed, &slots)
            .or_else(|| free(SlotState::Empty, &slots))
            .or_else(|| free(SlotState::Removed, &slots))
            .ok_or_else(|| MirrorError::Invalid(format!("mirror {name} has no free slot for {}", l.name)))?;
        changes.push(format!("{} added", l.name));
        stale[slot] = Bitmap::full(g.num_regions);
        slots[slot] = CtlSlot {
            rec: SlotRecord { leg_uuid: Uuid::new_v4(), state: SlotState::Rebuilding, image: String::new() },
            name: l.name,
            guard: Some(l.guard),
            ch: Some(l.ch),
            failing: false,
            next_sb_copy: 0,
        };
        provided[slot] = true;
    }
    name_missing_legs(name, &mut slots, missing);
    let in_sync = slots.iter().filter(|s| s.rec.state == SlotState::Active && s.guard.is_some()).count();
    let unsynced = if in_sync >= 2 { wi.clone() } else { Bitmap::new(g.num_regions) };
    // Write the assembled state to every leg in use, bitmaps first; a leg that cannot take it
    // is dropped (its stale map then covers whatever may be in flight).
    let mut generation = auth.generation;
    for _ in 0..=MAX_SLOTS {
        generation += 1;
        let table: [SlotRecord; MAX_SLOTS] = std::array::from_fn(|i| slots[i].rec.clone());
        let mut failed = Vec::new();
        let mut flipped = Vec::new();
        for s in 0..MAX_SLOTS {
            let slot = &slots[s];
            if !matches!(slot.rec.state, SlotState::Active | SlotState::Rebuilding) {
                continue;
            }
            let Some(ch) = &slot.ch else { continue };
            let sb = Superblock {
                mirror_uuid: auth.mirror_uuid,
                name: name.to_string(),
                leg_uuid: slot.rec.leg_uuid,
                slot: s,
                generation,
                flags: 0,
                geometry: g,
                slots: table.clone(),
            };
            let fresh = slot.rec.state == SlotState::Rebuilding && stale[s].count() == g.num_regions;
            let copy = slot.next_sb_copy;
            let r = async {
                write_all_bitmaps(ch, &g, &wi, &stale, fresh).await?;
                write_superblock(ch, &g, &sb, copy).await
            }
            .await;
            if let Err(e) = r {
                log::error!("mirror {name}: cannot write metadata to {}: {e}; dropping it", slot.name);
                failed.push(s);
            } else {
                flipped.push(s);
            }
        }
        for s in flipped {
            slots[s].next_sb_copy = 1 - slots[s].next_sb_copy;
        }
        if failed.is_empty() {
            break;
        }
        for s in failed {
            slots[s].rec.state = SlotState::Failed;
            stale[s].union_with(&wi);
            slots[s].ch = None;
            slots[s].guard = None;
        }
        if !slots.iter().any(|s| s.rec.state == SlotState::Active && s.guard.is_some()) {
            return Err(MirrorError::Io(format!("no in-sync leg of mirror {name} accepts writes")));
        }
    }
    log::info!(
        "mirror {name}: reassembled at generation {generation} from {in_sync} in-sync leg(s); {} region(s) to resynchronise{}{}",
        unsynced.count(),
        if changes.is_empty() { "" } else { "; " },
        changes.join(", ")
    );
    Ok(start(name, auth.mirror_uuid, g, generation, slots, wi, stale, unsynced, options))
}

/// Gives the configured legs that do not exist now (`missing`: a node down at the restart) to
/// the failed slots whose leg was not given, in slot order, so that the mirror keeps naming them
/// (`save_config`, `bdev_raid_get_bdevs`) and the next restart from the saved configuration
/// looks for them again; without a name a missing leg would drop out of the configuration at
/// the first save and never be looked for. The superblocks keep no bdev names (a name is the
/// node's business, not the media's), so with several missing legs the pairing follows the
/// configuration's order, which `save_config` writes in slot order. The name is a label only: a
/// leg that comes back is matched to its slot by its superblock (`bdev_raid_add_base_bdev`),
/// never by name.
fn name_missing_legs(name: &str, slots: &mut [CtlSlot], missing: Vec<String>) {
    let mut names = missing.into_iter();
    for s in slots.iter_mut().filter(|s| s.rec.state == SlotState::Failed && s.guard.is_none() && s.name.is_empty()) {
        match names.next() {
            Some(n) => s.name = n,
            None => break,
        }
    }
    for n in names {
        // More names than missing legs: the superblocks record no leg this one could be.
        log::warn!("mirror {name}: base bdev {n} does not exist and the mirror records no missing leg; it is not a leg of the mirror");
    }
}

#[allow(clippy::too_many_arguments)]
fn start(
    name: &str,
    uuid: Uuid,
    g: Geometry,
    generation: u64,
    slots: Vec<CtlSlot>,
    wi: Bitmap,
    stale: Vec<Bitmap>,
    unsynced: Bitmap,
    options: MirrorOptions,
) -> Arc<MirrorBdev> {
    let cores = reactor::core_count();
    let (tx, rx) = mpsc::unbounded();
    let sh = Arc::new(Shared {
        props: BdevProps::new(name, "Raid Volume", g.block_size, g.data_blocks, uuid),
        geometry: g,
        home: reactor::current_index(),
        regions: RegionStates::new(g.num_regions),
        gate: crate::preserve::EpochTracker::new(cores.max(1), 1),
        // Shards chosen from the name: the same on every run (the simulation replays seeds).
        locks: crate::extent_lock::LockSpace::with_shard_seed(cores.max(1), g.region_blocks, crc32c::crc32c(name.as_bytes()) as u64),
        slots: std::array::from_fn(|_| SlotShared {
            mode: AtomicU8::new(0),
            incarnation: AtomicU64::new(0),
            split_epoch: AtomicU64::new(0),
            entry: Mutex::new(None),
        }),
        layout_gen: AtomicU64::new(0),
        source_slot: AtomicUsize::new(0),
        offline: AtomicBool::new(false),
        ctl_tx: tx,
        leg_stats: (0..cores.max(1)).map(|_| CachePadded::new(Default::default())).collect(),
        counters: MirrorCounters::default(),
        status: Mutex::new(MirrorStatus::default()),
        options,
        images: Default::default(),
        waits: Default::default(),
        ctl_preserve_io: AtomicU64::new(0),
        fenced: AtomicBool::new(false),
        fenced_by: Mutex::new(String::new()),
        registry: Default::default(),
    });
    // Regions dirty at assembly start open: their bits are durable, and every departed leg's
    // stale map already covers them.
    for r in wi.iter_set() {
        sh.regions.set(r, super::regions::FAST);
    }
    let ctl = Ctl::new(sh.clone(), generation, slots, wi, stale, unsynced);
    ctl.start(rx);
    Arc::new(MirrorBdev { shared: sh })
}

//! The split preserve's image: a leg split off a mirror and sealed, served read-only.
//!
//! The image holds exactly the writes submitted to the mirror before the split (the split's
//! epoch drained into it before it was sealed) and is independent of the mirror from then on:
//! it can be exported, backed up, opened after a restart from the leg's own superblock (which
//! says "sealed split image of mirror M"), and re-joined to its mirror, which then copies only
//! the regions written since the split.

use super::layout::{Geometry, FLAG_SEALED_SPLIT};
use super::{MirrorError, SplitSealed};
use crate::bdev::{Bdev, BdevEntry, BdevError, BdevProps, Channel, HoldGuard, Io, IoChannel, IoFuture, IoType};
use crate::preserve::{SealSignal, SnapshotState};
use serde_json::{json, Value};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// A stable identity for an image: the same after a restart (hosts see the same namespace).
fn image_uuid(mirror: Uuid, generation: u64, name: &str) -> Uuid {
    let mut bytes = *mirror.as_bytes();
    let seed = crc32c::crc32c(format!("{generation}/{name}").as_bytes());
    for (i, b) in bytes.iter_mut().enumerate() {
        *b ^= crc32c::crc32c_append(seed, &[i as u8]) as u8;
    }
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

pub struct SplitImageBdev {
    props: BdevProps,
    leg: Arc<BdevEntry>,
    /// The image's claim on its leg, from the seal on (while the split drains, the mirror
    /// still holds the leg and writes its old epoch to it).
    claim: Mutex<Option<HoldGuard>>,
    geometry: Geometry,
    mirror_name: String,
    mirror_uuid: Uuid,
    /// Mirror generation at the seal (0 while draining).
    generation: AtomicU64,
    signal: Arc<SealSignal>,
}

fn props(name: &str, g: &Geometry, uuid: Uuid) -> BdevProps {
    BdevProps::new(name, "Split Mirror Image", g.block_size, g.data_blocks, uuid)
}

impl SplitImageBdev {
    fn sealed(name: &str, leg: HoldGuard, geometry: Geometry, mirror_name: String, mirror_uuid: Uuid, generation: u64) -> SplitImageBdev {
        let signal = SealSignal::new();
        signal.set(SnapshotState::Sealed);
        SplitImageBdev {
            props: props(name, &geometry, image_uuid(mirror_uuid, generation, name)),
            leg: leg.entry().clone(),
            claim: Mutex::new(Some(leg)),
            geometry,
            mirror_name,
            mirror_uuid,
            generation: AtomicU64::new(generation),
            signal,
        }
    }

    /// The image of a split that just sealed. The leg comes claimed by the mirror; the image
    /// claims it under its own name.
    pub fn from_sealed(name: &str, sealed: SplitSealed, mirror_uuid: Uuid) -> Result<SplitImageBdev, MirrorError> {
        let entry = sealed.leg.entry().clone();
        drop(sealed.leg);
        let leg = entry.claim(name).map_err(|e| MirrorError::Busy(format!("cannot claim split leg {}: {e}", entry.name())))?;
        Ok(SplitImageBdev::sealed(name, leg, sealed.geometry, sealed.mirror_name, mirror_uuid, sealed.generation))
    }

    /// The image of a split whose epoch is still draining: readable at once (reads may run
    /// alongside the old epoch's last writes), sealed by [`Self::install`].
    pub fn draining(name: &str, leg: Arc<BdevEntry>, geometry: Geometry, mirror_name: &str, mirror_uuid: Uuid, signal: Arc<SealSignal>) -> SplitImageBdev {
        SplitImageBdev {
            // Stable across restarts only once sealed; a draining image has no config anyway.
            props: props(name, &geometry, image_uuid(mirror_uuid, u64::MAX, name)),
            leg,
            claim: Mutex::new(None),
            geometry,
            mirror_name: mirror_name.to_string(),
            mirror_uuid,
            generation: AtomicU64::new(0),
            signal,
        }
    }

    /// Seals a draining image: takes the leg over from the mirror.
    pub fn install(&self, sealed: SplitSealed) -> Result<(), MirrorError> {
        let entry = sealed.leg.entry().clone();
        drop(sealed.leg);
        let leg = entry.claim(self.name()).map_err(|e| MirrorError::Busy(format!("cannot claim split leg {}: {e}", entry.name())))?;
        *self.claim.lock().unwrap_or_else(|e| e.into_inner()) = Some(leg);
        self.generation.store(sealed.generation, SeqCst);
        self.signal.set(SnapshotState::Sealed);
        Ok(())
    }

    /// Opens the sealed image on `leg` (after a restart). Runs on a core.
    pub async fn open(name: &str, leg: HoldGuard) -> Result<SplitImageBdev, MirrorError> {
        let entry = leg.entry().clone();
        let ch = Channel::get(&entry).map_err(|e| MirrorError::Io(format!("cannot open {}: {e}", entry.name())))?;
        let sb = super::assemble::read_superblock(&ch, ch.block_size())
            .await
            .filter(|sb| sb.flags & FLAG_SEALED_SPLIT != 0)
            .ok_or_else(|| MirrorError::Invalid(format!("{} holds no sealed split image of a mirror", entry.name())))?;
        if ch.num_blocks() < sb.geometry.leg_blocks_needed() {
            return Err(MirrorError::Invalid(format!("{} is smaller than the image it should hold", entry.name())));
        }
        Ok(SplitImageBdev::sealed(name, leg, sb.geometry, sb.name, sb.mirror_uuid, sb.generation))
    }

    pub fn leg_name(&self) -> &str {
        self.leg.name()
    }

    pub fn mirror_name(&self) -> &str {
        &self.mirror_name
    }

    pub fn mirror_uuid(&self) -> Uuid {
        self.mirror_uuid
    }

    /// The mirror generation at which the image was sealed (0 while draining).
    pub fn generation(&self) -> u64 {
        self.generation.load(SeqCst)
    }

    pub fn state(&self) -> SnapshotState {
        self.signal.get()
    }
}

struct ImageChannel {
    leg: Channel,
    data_offset: u64,
}

impl IoChannel for ImageChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        match io {
            Io::Read { offset_blocks, bufs, .. } => IoFuture::boxed(self.leg.read(self.data_offset + offset_blocks, bufs)),
            Io::Flush => IoFuture::ready(Ok(())),
            // The channel wrapper refuses these before they get here (the bdev is read-only).
            _ => IoFuture::ready(Err(BdevError::ReadOnly)),
        }
    }
}

impl Bdev for SplitImageBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn supports(&self, io: IoType) -> bool {
        // Modifying types are "supported" so that hosts get "read-only" rather than "invalid
        // opcode" for them.
        io != IoType::Unmap
    }
    fn read_only(&self) -> bool {
        true
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(ImageChannel { leg: Channel::get(&self.leg)?, data_offset: self.geometry.data_offset }))
    }
    fn driver_specific(&self) -> Value {
        json!({ "split_image": {
            "mirror": self.mirror_name,
            "mirror_uuid": self.mirror_uuid.to_string(),
            "base_bdev": self.leg_name(),
            "generation": self.generation(),
            "state": self.state().name(),
        }})
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        // A draining image is on its leg already: the split marks the leg a sealed image of its
        // mirror before the split's instant (so before this bdev exists), and a restart
        // reassembles the mirror with the split kept, whether the seal completed or not (a
        // crash image of the split's instant if it did not). A failed split's leg is the
        // mirror's again.
        (self.state() != SnapshotState::Failed).then(|| ("bdev_raid_open_split_image", json!({ "name": self.name(), "base_bdev": self.leg_name() })))
    }
    fn config_needs(&self) -> Vec<String> {
        // While the split drains the mirror still claims the leg; the image is opened after the
        // leg exists and the mirror has reassembled (keeping the split) from it.
        if self.state() == SnapshotState::Draining {
            vec![self.leg_name().to_string(), self.mirror_name.clone()]
        } else {
            Vec::new()
        }
    }
    fn destroy(&self) {
        drop(self.claim.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

//! What the backup asks of the preserve layer: is a bdev a sealed preserved image, of which
//! volume, at which epoch; and which byte ranges changed between two images of one volume
//! (known from the CoW tables or the mirror's dirty map, never by reading both images).

use super::manifest::Source;
use crate::preserve::{self, SnapshotState};
use crate::rpc::{RpcError, EINVAL};
use crate::target::Target;

pub struct Described {
    pub source: Source,
    pub sealed: bool,
    /// The preserved volume's bdev name (asked for what changed between images).
    pub origin: String,
}

/// Describes the preserved image `name`.
pub fn describe(t: &Target, name: &str) -> Result<Described, RpcError> {
    let snap = t.bdev(name)?;
    let (origin, info) = preserve::all_snapshots(t)
        .into_iter()
        .find(|(_, s)| s.name == name)
        .ok_or_else(|| RpcError::new(EINVAL, format!("bdev {name} is not a preserved image (create one with bdev_snapshot_create)")))?;
    let vol = t.bdev(&origin)?;
    if info.state == SnapshotState::Failed {
        return Err(RpcError::new(EINVAL, format!("snapshot {name} has failed (its CoW store ran out of space); it cannot be backed up")));
    }
    Ok(Described {
        source: Source {
            volume: origin.clone(),
            volume_uuid: vol.bdev().uuid().to_string(),
            snapshot: name.to_string(),
            snapshot_uuid: snap.bdev().uuid().to_string(),
            epoch: info.epoch,
            method: info.method.to_string(),
        },
        sealed: info.state == SnapshotState::Sealed,
        origin,
    })
}

/// Byte ranges (offset, length), sorted and disjoint, that may differ between `older` and
/// `newer`, two sealed images of the same volume.
pub fn changed_ranges(t: &Target, older: &Described, newer: &Described) -> Result<Vec<(u64, u64)>, RpcError> {
    let vol = t.bdev(&newer.origin)?;
    let bs = vol.bdev().block_size() as u64;
    let p = preserve::preservable(vol.bdev().as_ref()).ok_or_else(|| RpcError::new(EINVAL, format!("bdev {} is not preservable", newer.origin)))?;
    let blocks = p.changed_between(&older.source.snapshot, &newer.source.snapshot)?;
    Ok(blocks.into_iter().map(|(o, n)| (o * bs, n * bs)).collect())
}

//! What the backup asks of the preserve layer: is a bdev a sealed preserved image, of which
//! volume, at which epoch; and which byte ranges changed between two images of one volume
//! (known from the CoW tables or the mirror's dirty map, never by reading both images).

use super::manifest::Source;
use crate::module::Ctx;
use crate::rpc::RpcError;

pub struct Described {
    pub source: Source,
    pub sealed: bool,
}

/// Describes the preserved image `name`.
pub fn describe(t: &Ctx, name: &str) -> Result<Described, RpcError> {
    let _ = t.bdev(name)?;
    let img = crate::preserve::describe_image(t, name).ok_or_else(|| RpcError::no_device(format!("bdev {name} is not a preserved image (snapshot)")))?;
    Ok(Described {
        sealed: img.info.state == crate::preserve::SnapshotState::Sealed,
        source: Source {
            volume: img.info.origin.clone(),
            volume_uuid: img.origin_uuid.to_string(),
            snapshot: name.to_string(),
            snapshot_uuid: img.snapshot_uuid.to_string(),
            epoch: img.info.epoch,
            method: img.info.method.to_string(),
        },
    })
}

/// Byte ranges (offset, length), sorted and disjoint, that differ between `older` and
/// `newer`, two images of the same volume.
pub fn changed_ranges(t: &Ctx, older: &Source, newer: &Source) -> Result<Vec<(u64, u64)>, RpcError> {
    if older.volume != newer.volume {
        return Err(RpcError::no_device(format!("{} and {} preserve different volumes", older.snapshot, newer.snapshot)));
    }
    crate::preserve::changed_ranges(t, &newer.volume, &older.snapshot, &newer.snapshot).map_err(RpcError::from)
}

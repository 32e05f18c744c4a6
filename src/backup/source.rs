//! What the backup asks of the preserve layer: is a bdev a sealed preserved image, of which
//! volume, at which epoch; and which byte ranges changed between two images of one volume
//! (known from the CoW tables or the mirror's dirty map, never by reading both images).

use super::manifest::Source;
use crate::rpc::RpcError;
use crate::target::Target;

pub struct Described {
    pub source: Source,
    pub sealed: bool,
}

/// Describes the preserved image `name`.
pub fn describe(t: &Target, name: &str) -> Result<Described, RpcError> {
    let _ = t.bdev(name)?;
    // Wired to the preserve layer (src/preserve) once it lands.
    Err(RpcError::no_device(format!("bdev {name} is not a preserved image (snapshot)")))
}

/// Byte ranges (offset, length), sorted and disjoint, that differ between `older` and
/// `newer`, two images of the same volume.
pub fn changed_ranges(_t: &Target, older: &Source, newer: &Source) -> Result<Vec<(u64, u64)>, RpcError> {
    Err(RpcError::no_device(format!("cannot tell what changed between {} and {}", older.snapshot, newer.snapshot)))
}

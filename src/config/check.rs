//! `tidemarkd --check-config`: every RPC call of a configuration run against a scratch target,
//! so that what would fail at start (an unknown method, `block_size = 100`, a namespace on a
//! bdev no earlier call made, a listener address that does not parse) fails now, named by its
//! key, while the running daemon (if any) and the machine stay untouched.
//!
//! The scratch target is a real one (reactors, bdev registry, subsystems, the same method
//! table) with three differences, each a guard in the handler concerned:
//! - its data directory is a fresh temporary one, removed afterwards, so files named relative
//!   to the data directory are created there and not in the configured one;
//! - a file or device a call would open is only checked to exist ([`stand_in_file`],
//!   `bdevs::nvme`'s stand-in): the bdev is made over a sparse file of the same size in the scratch
//!   directory (or a null bdev for NVMe devices), so later calls that refer to it see its size;
//! - NVMe/TCP listeners and iSCSI portals are validated (address, duplicates, references) but
//!   not bound ([`active`]); the RPC socket and the metrics endpoint are not opened at all.
//!
//! This file holds the scratch state and the guards the handlers call; the check itself
//! (starting the scratch target and running the calls) is the daemon's, `daemon::check`.
//!
//! The scratch state is process-wide (`--check-config` exits when done), which keeps the
//! guards to one line each and out of the handlers' signatures.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The data directory of the configuration being checked (relative filenames resolve there).
static REAL_DATA_DIR: OnceLock<PathBuf> = OnceLock::new();
/// The scratch target's data directory, where stand-in files go.
static SCRATCH_DIR: OnceLock<PathBuf> = OnceLock::new();
static STAND_INS: AtomicU64 = AtomicU64::new(0);

/// Size given to an NVMe namespace whose size cannot be read without opening it.
pub const UNKNOWN_DEVICE_BYTES: u64 = 1 << 30;

/// True while `--check-config` runs: handlers bind no listener and open no device.
pub fn active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

/// Starts the check: from now on handlers bind nothing, and files are resolved against
/// `real_data_dir` and stood in for in `scratch`.
pub fn begin(real_data_dir: &Path, scratch: &Path) {
    let _ = REAL_DATA_DIR.set(real_data_dir.to_path_buf());
    let _ = SCRATCH_DIR.set(scratch.to_path_buf());
    ACTIVE.store(true, Ordering::Release);
}

/// The size in bytes of a block device, from sysfs (the device itself is not opened).
pub fn block_device_bytes(meta: &std::fs::Metadata) -> Option<u64> {
    let rdev = meta.rdev();
    let sectors = std::fs::read_to_string(format!("/sys/dev/block/{}:{}/size", libc::major(rdev), libc::minor(rdev))).ok()?;
    sectors.trim().parse::<u64>().ok().map(|s| s * 512)
}

/// `bdev_uring_create`'s file, for the scratch target: `filename` resolved as the daemon would
/// (relative: in the configured data directory) must exist, or `size_mb` must be given to
/// create it. Returns the file the scratch bdev opens instead: a sparse stand-in of the same
/// size, or a path in the scratch directory where `size_mb` creates it.
pub fn stand_in_file(filename: &str, size_mb: Option<u64>) -> Result<PathBuf, String> {
    let (Some(real_dir), Some(scratch)) = (REAL_DATA_DIR.get(), SCRATCH_DIR.get()) else {
        return Err("internal: the configuration check is not set up".into());
    };
    let real = if Path::new(filename).is_absolute() { PathBuf::from(filename) } else { real_dir.join(filename) };
    let stand_in = scratch.join(format!("stand-in-{}", STAND_INS.fetch_add(1, Ordering::Relaxed)));
    let meta = match std::fs::metadata(&real) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && size_mb.is_some() => return Ok(stand_in),
        Err(e) => return Err(format!("field `filename`: cannot open {}: {e}", real.display())),
    };
    let bytes = if meta.file_type().is_block_device() {
        block_device_bytes(&meta).ok_or_else(|| format!("field `filename`: cannot read the size of block device {}", real.display()))?
    } else if meta.is_file() {
        meta.len()
    } else {
        return Err(format!("field `filename`: {} is neither a regular file nor a block device", real.display()));
    };
    let f = std::fs::File::create(&stand_in).map_err(|e| format!("scratch file {}: {e}", stand_in.display()))?;
    f.set_len(bytes).map_err(|e| format!("scratch file {}: {e}", stand_in.display()))?;
    Ok(stand_in)
}

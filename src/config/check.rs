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
//!   [`stand_in_device`]): the bdev is made over a sparse file of the same size in the scratch
//!   directory (or a null bdev for NVMe devices), so later calls that refer to it see its size;
//! - NVMe/TCP listeners and iSCSI portals are validated (address, duplicates, references) but
//!   not bound ([`active`]); the RPC socket and the metrics endpoint are not opened at all.
//!
//! The scratch state is process-wide (`--check-config` exits when done), which keeps the
//! guards to one line each and out of the handlers' signatures.

use super::Config;
use crate::rpc::{Methods, RpcError};
use crate::target::Target;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The data directory of the configuration being checked (relative filenames resolve there).
static REAL_DATA_DIR: OnceLock<PathBuf> = OnceLock::new();
/// The scratch target's data directory, where stand-in files go.
static SCRATCH_DIR: OnceLock<PathBuf> = OnceLock::new();
static STAND_INS: AtomicU64 = AtomicU64::new(0);

/// Size given to an NVMe namespace whose size cannot be read without opening it.
const UNKNOWN_DEVICE_BYTES: u64 = 1 << 30;

/// True while `--check-config` runs: handlers bind no listener and open no device.
pub fn active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

/// One call the check rejected: its key (`bdev[2]`, `bdev[0].method`) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub key: String,
    pub method: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key `{}` ({}): {}", self.key, self.method, self.message)
    }
}

/// Checks `config` (already parsed, so its settings are valid): first that every method
/// exists, then every call in order against a scratch target. Returns the number of calls
/// checked, or every problem found (a call that fails is skipped, so the calls that refer to
/// what it would have made report too: those are real consequences of the same mistake).
pub fn check(config: &Config) -> Result<usize, Vec<Problem>> {
    let methods = Methods::all();
    let known: Vec<&str> = methods.names().collect();
    let mut problems = Vec::new();
    let mut calls = 0;
    for (section, list) in config.sections() {
        for (i, call) in list.iter().enumerate() {
            calls += 1;
            if methods.get(&call.method).is_none() {
                let hint = closest(&call.method, &known).map(|m| format!(" (did you mean {m}?)")).unwrap_or_default();
                problems.push(Problem { key: format!("{section}[{i}].method"), method: call.method.clone(), message: format!("unknown method{hint}") });
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let scratch = scratch_dir().map_err(|e| vec![Problem { key: "daemon.data_dir".into(), method: "-".into(), message: e }])?;
    let result = run_calls(config, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| calls)
}

fn run_calls(config: &Config, scratch: &Path) -> Result<(), Vec<Problem>> {
    let setup = |message: String| vec![Problem { key: "reactor".into(), method: "-".into(), message }];
    let _ = REAL_DATA_DIR.set(config.daemon.data_dir.clone());
    let _ = SCRATCH_DIR.set(scratch.to_path_buf());
    ACTIVE.store(true, Ordering::Release);
    let mut c = config.clone();
    c.daemon.data_dir = scratch.join("data");
    c.metrics.listen = String::new();
    c.rpc.socket = scratch.join("unused.sock");
    // The check holds no host I/O: the smallest pool does.
    c.daemon.buffer_pool_mb = 1;
    let (reactors, target) = crate::daemon::start_target(c).map_err(setup)?;
    let mut problems = Vec::new();
    for (section, calls) in target.config.sections() {
        for (i, call) in calls.iter().enumerate() {
            let params = if call.params.is_null() { None } else { Some(call.params.clone()) };
            if let Err(e) = crate::rpc::call(&target, &call.method, params) {
                problems.push(Problem { key: format!("{section}[{i}]"), method: call.method.clone(), message: e.message });
            }
        }
    }
    target.shutdown();
    reactors.stop();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// A fresh private directory for the scratch target.
fn scratch_dir() -> Result<PathBuf, String> {
    let base = std::env::temp_dir();
    for n in 0..100u32 {
        let dir = base.join(format!("tidemarkd-check-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create a scratch directory in {}: {e}", base.display())),
        }
    }
    Err(format!("cannot create a scratch directory in {}", base.display()))
}

/// The method nearest to a misspelt one, if it is near enough to be what was meant.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known.iter().map(|k| (strsim::damerau_levenshtein(name, k), *k)).filter(|(d, _)| *d <= 3).min().map(|(_, k)| k)
}

/// The size in bytes of a block device, from sysfs (the device itself is not opened).
fn block_device_bytes(meta: &std::fs::Metadata) -> Option<u64> {
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

/// An NVMe namespace (`bdev_nvme_passthru_create`, `bdev_nvme_attach_controller`) in the
/// scratch target: `path` must exist; a null bdev named `name` stands in for it, with the
/// device's size when sysfs has it.
pub fn stand_in_device(t: &Target, name: &str, path: &Path) -> Result<(), RpcError> {
    let meta = std::fs::metadata(path).map_err(|e| RpcError::invalid_params(format!("field `filename`: cannot open {}: {e}", path.display())))?;
    let bytes = if meta.file_type().is_block_device() { block_device_bytes(&meta).unwrap_or(UNKNOWN_DEVICE_BYTES) } else { UNKNOWN_DEVICE_BYTES };
    if !(meta.file_type().is_block_device() || meta.file_type().is_char_device()) {
        return Err(RpcError::invalid_params(format!("field `filename`: {} is not an NVMe device", path.display())));
    }
    t.bdevs.check_new_name(name)?;
    let b = crate::bdevs::null::NullBdev::new(name, bytes / 512, 512, None).map_err(RpcError::invalid_params)?;
    t.bdevs.register(Arc::new(b))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_method_is_matched_to_the_one_meant() {
        let known = ["bdev_malloc_create", "bdev_malloc_delete", "bdev_null_create"];
        assert_eq!(closest("bdev_malloc_creat", &known), Some("bdev_malloc_create"));
        assert_eq!(closest("nvmf_make_everything", &known), None);
    }
}

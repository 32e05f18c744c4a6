//! Room on the file systems under file-backed bdevs: sparse files (created with `size_mb`, CoW
//! stores) take blocks only as they are written, so a file system can fill long after the
//! files were created. Then a write to a live volume fails with ENOSPC, and a copy-on-write
//! fails its snapshots (never the host write: see `bdevs/snapshot`). The daemon warns at start
//! when the files on a file system can grow beyond its free space, and exports the free space
//! and each file's unwritten part as metrics, so that an operator sees it coming.

use super::UringBdev;
use crate::bdev::Bdev;
use crate::metrics::{labels, MetricsOut};
use crate::module::Ctx;
use std::collections::btree_map::{BTreeMap, Entry};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A file system as `statvfs` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    /// Bytes an unprivileged writer may still allocate.
    pub free_bytes: u64,
    pub size_bytes: u64,
}

/// The file system holding `path`.
pub fn fs_space(path: &Path) -> Option<FsSpace> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let frsize = s.fragment_size() as u64;
    Some(FsSpace { free_bytes: s.blocks_available() as u64 * frsize, size_bytes: s.blocks() as u64 * frsize })
}

/// One regular file behind a uring bdev.
#[derive(Debug, Clone)]
pub struct FileUse {
    pub bdev: String,
    pub path: PathBuf,
    /// The file system's device number (files with the same one share its space).
    pub dev: u64,
    /// Bytes the file may still allocate: its size less the blocks it holds.
    pub unallocated_bytes: u64,
}

impl UringBdev {
    /// How much of this bdev's file is not allocated yet (None for block devices).
    pub fn file_use(&self) -> Option<FileUse> {
        if self.block_device {
            return None;
        }
        let m = self.file.metadata().ok()?;
        let allocated = m.blocks() * 512;
        Some(FileUse { bdev: self.name().to_string(), path: self.path.clone(), dev: m.dev(), unallocated_bytes: m.len().saturating_sub(allocated) })
    }
}

/// Every file-backed uring bdev of the target.
pub fn file_uses(t: &Ctx) -> Vec<FileUse> {
    t.bdevs.list().iter().filter_map(|e| e.bdev().as_any().downcast_ref::<UringBdev>().and_then(|u| u.file_use())).collect()
}

/// One file system that holds the data directory or file-backed bdevs: a path on it (the data
/// directory, else the directory of its first file), its space and the files on it.
pub struct FsReport {
    pub path: PathBuf,
    pub space: FsSpace,
    pub files: Vec<FileUse>,
}

impl FsReport {
    /// Bytes the sparse files on this file system may still claim.
    pub fn growth_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.unallocated_bytes).sum()
    }
}

/// The file systems under the data directory and the file-backed bdevs.
pub fn report(t: &Ctx) -> Vec<FsReport> {
    let mut by_dev: BTreeMap<u64, FsReport> = BTreeMap::new();
    if let (Ok(m), Some(space)) = (std::fs::metadata(&t.data_dir), fs_space(&t.data_dir)) {
        by_dev.insert(m.dev(), FsReport { path: t.data_dir.clone(), space, files: Vec::new() });
    }
    for f in file_uses(t) {
        let r = match by_dev.entry(f.dev) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let dir = f.path.parent().map(Path::to_path_buf).unwrap_or_else(|| f.path.clone());
                let Some(space) = fs_space(&dir) else { continue };
                v.insert(FsReport { path: dir, space, files: Vec::new() })
            }
        };
        r.files.push(f);
    }
    by_dev.into_values().collect()
}

/// Logs a WARN for every file system whose sparse files can outgrow its free space (run at
/// start, once the configuration's bdevs exist). Returns the warnings, for tests.
pub fn warn_if_sparse_files_can_outgrow(t: &Ctx) -> Vec<String> {
    let mut out = Vec::new();
    for r in report(t) {
        let growth = r.growth_bytes();
        if growth <= r.space.free_bytes {
            continue;
        }
        let files: Vec<String> = r
            .files
            .iter()
            .filter(|f| f.unallocated_bytes > 0)
            .map(|f| format!("{} ({}, {} MiB unwritten)", f.bdev, f.path.display(), f.unallocated_bytes >> 20))
            .collect();
        let msg = format!(
            "the file system of {} has {} MiB free, but sparse files on it can grow by {} MiB: {}; when it fills, writes to a volume on it fail and copy-on-write snapshots on it fail",
            r.path.display(),
            r.space.free_bytes >> 20,
            growth >> 20,
            files.join(", ")
        );
        log::warn!("{msg}");
        out.push(msg);
    }
    out
}

/// `tidemark_filesystem_{free,size}_bytes{path}` per file system, and
/// `tidemark_bdev_file_unallocated_bytes{bdev}` per file-backed bdev.
pub fn metrics(t: &Ctx, out: &mut MetricsOut<'_>) -> std::fmt::Result {
    let reports = report(t);
    let per_fs = |f: &dyn Fn(&FsReport) -> u64| reports.iter().map(|r| (labels(&[("path", &r.path.display().to_string())]), f(r) as f64)).collect::<Vec<_>>();
    out.gauge(
        "tidemark_filesystem_free_bytes",
        "Bytes still free on the file system of the data directory or of file-backed bdevs.",
        &per_fs(&|r| r.space.free_bytes),
    )?;
    out.gauge("tidemark_filesystem_size_bytes", "Size of the file system of the data directory or of file-backed bdevs.", &per_fs(&|r| r.space.size_bytes))?;
    out.gauge(
        "tidemark_filesystem_sparse_growth_bytes",
        "Bytes the sparse files of file-backed bdevs on this file system may still allocate; above the free bytes, the file system can fill.",
        &per_fs(&|r| r.growth_bytes()),
    )?;
    let files: Vec<_> = reports.iter().flat_map(|r| r.files.iter()).map(|f| (labels(&[("bdev", &f.bdev)]), f.unallocated_bytes as f64)).collect();
    out.gauge("tidemark_bdev_file_unallocated_bytes", "Bytes of a file-backed bdev's file not allocated yet (a sparse file's room to grow).", &files)
}

//! Where backups may be written and read: under the backup root (`backup.root`, by default
//! `<data_dir>/backups`), plus, for reading only, the absolute `backup.restore_allowed_dirs`.
//! A backup is a full copy of a volume, so the daemon (often root) must not be talked into
//! writing one where others can read it, or into reading files it was not meant to:
//! relative paths resolve under the root, `..` is refused, and every path is checked after
//! symlinks are resolved. Files are created 0600 and directories 0700.

use crate::module::Ctx;
use crate::rpc::{RpcError, EPERM};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// The backup root as configured (relative: under the data directory), created 0700 if
/// missing, with its symlinks resolved.
pub fn root(t: &Ctx) -> Result<PathBuf, RpcError> {
    let r = t.data_dir.join(&t.config.backup.root);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&r)
        .map_err(|e| RpcError::internal(format!("cannot create the backup root {}: {e}", r.display())))?;
    r.canonicalize().map_err(|e| RpcError::internal(format!("backup root {}: {e}", r.display())))
}

fn outside(given: &str, root: &Path) -> RpcError {
    RpcError::new(EPERM, format!("field `path`: {given} is outside the backup root {} (backup.root)", root.display()))
}

/// The path of a new backup image: `given` relative to the root or absolute inside it, with
/// no `..`; missing directories under the root are created 0700; the directory it lands in
/// must still be inside the root once symlinks are resolved. The image itself is created
/// with `O_EXCL` ([`create_private`]), which never follows a symlink.
pub fn output_path(t: &Ctx, given: &str) -> Result<PathBuf, RpcError> {
    let root = root(t)?;
    let g = Path::new(given);
    if given.is_empty() || g.components().any(|c| c == Component::ParentDir) {
        return Err(outside(given, &root));
    }
    let p = if g.is_absolute() { g.to_path_buf() } else { root.join(g) };
    let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else { return Err(outside(given, &root)) };
    if !dir.starts_with(&root) {
        return Err(outside(given, &root));
    }
    // Create what is missing below the root one level at a time, checking each level: an
    // existing symlink on the way must not take the creation elsewhere.
    let mut cur = root.clone();
    for c in dir.strip_prefix(&root).map_err(|_| outside(given, &root))?.components() {
        cur.push(c);
        if std::fs::symlink_metadata(&cur).is_err() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&cur)
                .map_err(|e| RpcError::invalid_params(format!("field `path`: cannot create {}: {e}", cur.display())))?;
        }
        let real = cur.canonicalize().map_err(|e| RpcError::invalid_params(format!("field `path`: {}: {e}", cur.display())))?;
        if !real.starts_with(&root) {
            return Err(outside(given, &root));
        }
        cur = real;
    }
    Ok(cur.join(name))
}

/// The directories a backup may be read from: the root and `backup.restore_allowed_dirs`
/// (those that exist), symlinks resolved.
fn readable_dirs(t: &Ctx, root: &Path) -> Vec<PathBuf> {
    std::iter::once(root.to_path_buf()).chain(t.config.backup.restore_allowed_dirs.iter().filter_map(|d| d.canonicalize().ok())).collect()
}

/// Checks that `p` (an existing file: a manifest or an image) is, symlinks resolved, under
/// the root, or under an allowed directory if `allow_elsewhere`. Returns the resolved path.
fn check_readable(t: &Ctx, root: &Path, given: &str, p: &Path, allow_elsewhere: bool) -> Result<PathBuf, RpcError> {
    let real = p.canonicalize().map_err(|e| RpcError::invalid_params(format!("field `path`: cannot read {}: {e}", p.display())))?;
    let dirs = if allow_elsewhere { readable_dirs(t, root) } else { vec![root.to_path_buf()] };
    if dirs.iter().any(|d| real.starts_with(d)) {
        return Ok(real);
    }
    Err(RpcError::new(EPERM, format!("field `path`: {given} is outside the backup root {} (backup.root) and backup.restore_allowed_dirs", root.display())))
}

/// The manifest a restore (or an incremental's base) names: `given` relative to the root, or
/// absolute under the root or an allowed directory.
pub fn input_manifest(t: &Ctx, given: &str) -> Result<PathBuf, RpcError> {
    let root = root(t)?;
    let g = Path::new(given);
    // Refused before any lookup, so that the answer says nothing about files out there.
    if !g.is_absolute() && g.components().any(|c| c == Component::ParentDir) {
        return Err(outside(given, &root));
    }
    let p = if g.is_absolute() { g.to_path_buf() } else { root.join(g) };
    let mp = if p.extension().is_some_and(|e| e == "json") { p } else { super::manifest::manifest_path(&p) };
    check_readable(t, &root, given, &mp, g.is_absolute())
}

/// Loads the chain ending at manifest `mp` (as [`input_manifest`] gave it), checking each
/// manifest before it is read and each image, against the same rule as the path the caller
/// gave: a manifest names its base freely.
pub fn load_chain(t: &Ctx, given: &str, mp: &Path) -> Result<Vec<(PathBuf, super::manifest::Manifest)>, RpcError> {
    let root = root(t)?;
    let elsewhere = Path::new(given).is_absolute();
    let refused = std::cell::Cell::new(None);
    let chain = super::manifest::Manifest::chain_checked(mp, |p| {
        check_readable(t, &root, given, p, elsewhere).map(|_| ()).map_err(|e| {
            let m = e.message.clone();
            refused.set(Some(e));
            m
        })
    });
    let chain = match (chain, refused.take()) {
        (_, Some(e)) => return Err(e),
        (Err(e), None) => return Err(RpcError::invalid_params(e)),
        (Ok(c), None) => c,
    };
    for (mp, m) in &chain {
        check_readable(t, &root, given, &m.image_path(mp), elsewhere)?;
    }
    Ok(chain)
}

/// Creates `path` for writing, owner-only (0600), failing if anything (a symlink included)
/// is there already.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

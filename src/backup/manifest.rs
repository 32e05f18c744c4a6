//! The backup format: a raw image file (sparse; usable by `qemu-img` as format `raw`) and a
//! JSON manifest beside it (`IMAGE.manifest.json`) with the source's identity, the extents the
//! image holds and a CRC32C per extent. An incremental backup's image holds only the extents
//! that changed since its base backup; its manifest names the base, and a restore applies the
//! chain oldest first. Verification and restore into a file need no daemon.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "tidemark-backup-1";
/// Checksum granularity of full backups (an incremental's extents are the changed parts of grains).
pub const EXTENT_BYTES: u64 = 1 << 20;
/// Longest chain of incremental backups a restore or verify follows.
pub const MAX_CHAIN: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    InProgress,
    Complete,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Full,
    Incremental,
}

/// What was backed up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// The volume the snapshot preserves, and its UUID (an incremental's base must match it).
    pub volume: String,
    pub volume_uuid: String,
    pub snapshot: String,
    pub snapshot_uuid: String,
    /// The preserve epoch of the snapshot (orders snapshots of one volume).
    pub epoch: u64,
    pub method: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseRef {
    /// Path of the base backup's manifest, relative to this manifest's directory if relative.
    pub manifest: String,
    pub snapshot: String,
    pub snapshot_uuid: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// CRC32C of the extent's bytes; absent for zero extents (stored as holes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub id: String,
    pub state: State,
    pub kind: Kind,
    pub source: Source,
    pub block_size: u32,
    pub size_bytes: u64,
    /// The raw image, relative to the manifest's directory.
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
    pub extents: Vec<Extent>,
    pub started_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The manifest path of an image path.
pub fn manifest_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".manifest.json");
    PathBuf::from(s)
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read manifest {}: {e}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| format!("{} is not a tidemark backup manifest: {e}", path.display()))?;
        if m.format != FORMAT {
            return Err(format!("{}: unknown format {:?} (expected {FORMAT})", path.display(), m.format));
        }
        Ok(m)
    }

    /// Writes the manifest atomically (temporary file, fsync, rename): a crash leaves the old
    /// or the new manifest, never half of one.
    /// The file is owner-only (0600): it describes a volume's content. The temporary file is
    /// created afresh (`O_EXCL`, so never through a symlink left in its place).
    pub fn store(&self, path: &Path) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&tmp);
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        f.write_all(&text).and_then(|_| f.sync_all()).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(())
    }

    pub fn image_path(&self, manifest: &Path) -> PathBuf {
        resolve(manifest, &self.image)
    }

    /// The chain this manifest ends: the full backup first, this one last.
    pub fn chain(path: &Path) -> Result<Vec<(PathBuf, Manifest)>, String> {
        Manifest::chain_checked(path, |_| Ok(()))
    }

    /// [`Manifest::chain`], with `check` asked about each manifest before it is read (the
    /// daemon reads only where its configuration allows).
    pub fn chain_checked(path: &Path, check: impl Fn(&Path) -> Result<(), String>) -> Result<Vec<(PathBuf, Manifest)>, String> {
        let mut out = Vec::new();
        let mut cur = path.to_path_buf();
        loop {
            if out.len() >= MAX_CHAIN {
                return Err(format!("backup chain of {} is longer than {MAX_CHAIN}", path.display()));
            }
            check(&cur)?;
            let m = Manifest::load(&cur)?;
            let next = match (&m.kind, &m.base) {
                (Kind::Full, _) => None,
                (Kind::Incremental, Some(b)) => Some(resolve(&cur, &b.manifest)),
                (Kind::Incremental, None) => return Err(format!("{}: incremental backup without a base", cur.display())),
            };
            if let Some((_, newer)) = out.last() {
                let newer: &Manifest = newer;
                let b = newer.base.as_ref().expect("an incremental's base was followed");
                if m.source.snapshot_uuid != b.snapshot_uuid || m.source.volume_uuid != newer.source.volume_uuid {
                    return Err(format!("{}: base {} is not the backup it was made on (snapshot or volume differs)", path.display(), cur.display()));
                }
            }
            out.push((cur.clone(), m));
            match next {
                Some(n) => cur = n,
                None => break,
            }
        }
        out.reverse();
        Ok(out)
    }
}

fn resolve(manifest: &Path, rel: &str) -> PathBuf {
    let p = PathBuf::from(rel);
    if p.is_absolute() {
        p
    } else {
        manifest.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Checks every extent of every backup in the chain ending at `path` against its checksum.
/// Returns the number of bytes checked, or an error naming the backup and the extent.
pub fn verify_chain(path: &Path, mut progress: impl FnMut(u64, u64)) -> Result<u64, String> {
    let chain = Manifest::chain(path)?;
    let total: u64 = chain.iter().map(|(_, m)| m.extents.iter().filter(|e| !e.zero).map(|e| e.length).sum::<u64>()).sum();
    let mut done = 0u64;
    let mut buf = vec![0u8; EXTENT_BYTES as usize];
    for (mpath, m) in &chain {
        if m.state != State::Complete {
            return Err(format!("{}: backup is {:?}, not complete", mpath.display(), m.state));
        }
        if m.size_bytes != chain[0].1.size_bytes {
            return Err(format!("{}: size differs from its base", mpath.display()));
        }
        let img = m.image_path(mpath);
        let f = File::open(&img).map_err(|e| format!("cannot open image {}: {e}", img.display()))?;
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        if len != m.size_bytes {
            return Err(format!("{}: image is {len} bytes, manifest says {}", img.display(), m.size_bytes));
        }
        let mut prev_end = 0;
        for e in &m.extents {
            if e.offset < prev_end || e.offset.checked_add(e.length).is_none_or(|end| end > m.size_bytes) {
                return Err(format!("{}: extent at offset {} (length {}) overlaps another or lies outside the image", mpath.display(), e.offset, e.length));
            }
            prev_end = e.offset + e.length;
            if e.zero {
                continue;
            }
            let Some(want) = e.crc32c else {
                return Err(format!("{}: extent at offset {} has no checksum", mpath.display(), e.offset));
            };
            let mut crc = 0u32;
            let mut pos = e.offset;
            while pos < e.offset + e.length {
                let n = (e.offset + e.length - pos).min(buf.len() as u64) as usize;
                f.read_exact_at(&mut buf[..n], pos).map_err(|err| format!("{}: cannot read extent at offset {}: {err}", img.display(), e.offset))?;
                crc = crc32c::crc32c_append(crc, &buf[..n]);
                pos += n as u64;
            }
            if crc != want {
                return Err(format!(
                    "{}: extent at offset {} (length {}) is corrupt: checksum {crc:#010x}, expected {want:#010x}",
                    img.display(),
                    e.offset,
                    e.length
                ));
            }
            done += e.length;
            progress(done, total);
        }
    }
    Ok(done)
}

/// Writes the chain ending at `path` into the file `out` (created or truncated to the
/// volume's size): the full backup, then each incremental's extents on top.
/// What a restore to a file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Size of the restored image: the volume's size when its backup was taken.
    pub image_bytes: u64,
    /// Bytes of extents read from the chain, every backup of it together. An extent written in
    /// several backups counts once per backup, so this can exceed the image's size: it is the
    /// work done, not what the image holds.
    pub read_bytes: u64,
    /// Backups in the chain, the full one included.
    pub backups: usize,
}

/// Restores the chain ending at `path` into the file `out` (created or truncated, mode 0600).
pub fn restore_chain_to_file(path: &Path, out: &Path, mut progress: impl FnMut(u64, u64)) -> Result<Restored, String> {
    let chain = Manifest::chain(path)?;
    for (p, m) in &chain {
        if m.state != State::Complete {
            return Err(format!("{}: backup is {:?}, not complete", p.display(), m.state));
        }
    }
    let size = chain[0].1.size_bytes;
    use std::os::unix::fs::OpenOptionsExt;
    // A new file is owner-only: it is a copy of a volume.
    let mut o = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    o.set_len(size).map_err(|e| e.to_string())?;
    let total: u64 = chain.iter().map(|(_, m)| m.extents.iter().map(|e| e.length).sum::<u64>()).sum();
    let mut done = 0;
    let mut buf = vec![0u8; EXTENT_BYTES as usize];
    for (i, (mpath, m)) in chain.iter().enumerate() {
        let img = m.image_path(mpath);
        let mut f = File::open(&img).map_err(|e| format!("cannot open image {}: {e}", img.display()))?;
        for e in &m.extents {
            let mut pos = e.offset;
            while pos < e.offset + e.length {
                let n = (e.offset + e.length - pos).min(buf.len() as u64) as usize;
                if e.zero {
                    buf[..n].fill(0);
                } else {
                    f.seek(SeekFrom::Start(pos)).map_err(|err| err.to_string())?;
                    f.read_exact(&mut buf[..n]).map_err(|err| format!("{}: cannot read at {pos}: {err}", img.display()))?;
                }
                // Zeros in a fresh file are holes already; write them only over older data.
                if !e.zero || i > 0 {
                    o.seek(SeekFrom::Start(pos)).map_err(|err| err.to_string())?;
                    o.write_all(&buf[..n]).map_err(|err| format!("cannot write {}: {err}", out.display()))?;
                }
                pos += n as u64;
            }
            done += e.length;
            progress(done, total);
        }
    }
    o.sync_all().map_err(|e| e.to_string())?;
    Ok(Restored { image_bytes: size, read_bytes: done, backups: chain.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(uuid: &str) -> Source {
        Source { volume: "v".into(), volume_uuid: "vu".into(), snapshot: uuid.into(), snapshot_uuid: uuid.into(), epoch: 1, method: "cow".into() }
    }

    fn write_backup(dir: &Path, name: &str, data: &[(u64, Vec<u8>)], size: u64, base: Option<(&str, &str)>, snap: &str) -> PathBuf {
        let img = dir.join(name);
        let f = File::create(&img).unwrap();
        f.set_len(size).unwrap();
        let mut extents = Vec::new();
        for (off, d) in data {
            f.write_all_at(d, *off).unwrap();
            extents.push(Extent { offset: *off, length: d.len() as u64, crc32c: Some(crc32c::crc32c(d)), zero: false });
        }
        let m = Manifest {
            format: FORMAT.into(),
            id: name.into(),
            state: State::Complete,
            kind: if base.is_some() { Kind::Incremental } else { Kind::Full },
            source: src(snap),
            block_size: 512,
            size_bytes: size,
            image: name.into(),
            base: base.map(|(m, s)| BaseRef { manifest: m.into(), snapshot: s.into(), snapshot_uuid: s.into() }),
            extents,
            started_at: 0,
            finished_at: Some(0),
            error: None,
        };
        let mp = manifest_path(&img);
        m.store(&mp).unwrap();
        mp
    }

    #[test]
    fn chain_restores_newest_data_and_verify_names_a_corrupt_extent() {
        let d = tempfile::tempdir().unwrap();
        let size = 4 << 20;
        let full = write_backup(d.path(), "full.img", &[(0, vec![1u8; 1 << 20]), (2 << 20, vec![2u8; 1 << 20])], size, None, "s1");
        let inc = write_backup(d.path(), "inc.img", &[(2 << 20, vec![3u8; 65536])], size, Some(("full.img.manifest.json", "s1")), "s2");
        assert_eq!(verify_chain(&inc, |_, _| {}).unwrap(), (2 << 20) + 65536);
        let out = d.path().join("restored.img");
        let done = restore_chain_to_file(&inc, &out, |_, _| {}).unwrap();
        assert_eq!((done.image_bytes, done.backups), (size, 2), "the image's size, not the chain's sum: {done:?}");
        let r = std::fs::read(&out).unwrap();
        assert_eq!(r.len() as u64, size);
        assert!(r[..1 << 20].iter().all(|&b| b == 1));
        assert!(r[1 << 20..2 << 20].iter().all(|&b| b == 0));
        assert!(r[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 3));
        assert!(r[(2 << 20) + 65536..3 << 20].iter().all(|&b| b == 2));
        // Corrupt one byte of the full backup's second extent.
        let f = std::fs::OpenOptions::new().write(true).open(d.path().join("full.img")).unwrap();
        f.write_all_at(&[9], (2 << 20) + 5).unwrap();
        let e = verify_chain(&inc, |_, _| {}).unwrap_err();
        assert!(e.contains("offset 2097152"), "{e}");
        assert!(e.contains("full.img"), "{e}");
        let _ = full;
    }

    #[test]
    fn a_base_of_another_snapshot_is_refused() {
        let d = tempfile::tempdir().unwrap();
        write_backup(d.path(), "full.img", &[(0, vec![1u8; 4096])], 1 << 20, None, "s1");
        let inc = write_backup(d.path(), "inc.img", &[(0, vec![3u8; 4096])], 1 << 20, Some(("full.img.manifest.json", "other")), "s2");
        assert!(verify_chain(&inc, |_, _| {}).is_err());
    }
}

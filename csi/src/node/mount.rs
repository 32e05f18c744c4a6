//! Mounts and file systems on the node: what is mounted where (/proc/self/mountinfo), what a
//! block device holds (superblock magic, then util-linux `blkid -p`), mkfs, mount, umount,
//! statvfs, growing a mounted file system.

use super::run::{self, which};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Status;

const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// mkfs of a large volume writes its inode tables lazily; still, give it time.
const MKFS_TIMEOUT: Duration = Duration::from_secs(300);
const GROW_TIMEOUT: Duration = Duration::from_secs(300);

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    /// The device numbers of the mounted file system (for a bind of a device node: of the file
    /// system holding the node, e.g. devtmpfs).
    pub dev: (u32, u32),
    /// The path inside that file system which is mounted (`/` for a whole file system, the
    /// node's path for a bind-mounted device node).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, ...).
    pub options: String,
    pub fstype: String,
    pub source: String,
}

impl Mount {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            if sep < 6 || f.len() < sep + 3 {
                return None;
            }
            let (maj, min) = f[2].split_once(':')?;
            Some(Mount {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                root: unescape(f[3]),
                mount_point: PathBuf::from(unescape(f[4])),
                options: f[5].to_string(),
                fstype: f[sep + 1].to_string(),
                source: unescape(f[sep + 2]),
            })
        })
        .collect()
}

pub fn mounts() -> Result<Vec<Mount>, Status> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse_mountinfo(&t)).map_err(|e| Status::internal(format!("/proc/self/mountinfo: {e}")))
}

/// The path as mountinfo spells it: absolute, symlinks resolved when it exists.
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The mount on top at `path`, if any.
pub fn mounted_at<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    let p = canonical(path);
    mounts.iter().rev().find(|m| m.mount_point == p || m.mount_point == path)
}

/// Every mount that uses block device `name` with numbers `dev`: the file system on it, and
/// binds of its device node (`/nvme0n1` of devtmpfs).
pub fn users<'a>(mounts: &'a [Mount], dev: (u32, u32), name: &str) -> Vec<&'a Mount> {
    let node = format!("/{name}");
    mounts.iter().filter(|m| m.dev == dev || (m.root == node && (m.fstype == "devtmpfs" || m.fstype == "tmpfs"))).collect()
}

/// What a device holds, from its first bytes: a file system type, another known signature
/// (`partition table`, `LUKS`, `swap`), or None.
pub fn probe_magic(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.len() >= off + magic.len() && &head[off..off + magic.len()] == magic;
    if at(1080, &[0x53, 0xef]) {
        return Some("ext4");
    }
    if at(0, b"XFSB") {
        return Some("xfs");
    }
    if at(65600, b"_BHRfS_M") {
        return Some("btrfs");
    }
    if at(0, b"LUKS\xba\xbe") {
        return Some("LUKS");
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        return Some("swap");
    }
    if at(512, b"EFI PART") || at(510, &[0x55, 0xaa]) {
        return Some("partition table");
    }
    None
}

/// What block device `dev` holds: Some(type) or None when blank. The superblock magics above
/// first; when none matches, util-linux `blkid -p` (if installed) has the last word.
pub fn probe(dev: &Path) -> Result<Option<String>, Status> {
    let mut f = std::fs::File::open(dev).map_err(|e| Status::internal(format!("{}: {e}", dev.display())))?;
    let mut head = vec![0u8; 68 * 1024];
    let mut n = 0;
    f.seek(SeekFrom::Start(0)).ok();
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Status::internal(format!("reading {}: {e}", dev.display()))),
        }
    }
    if let Some(t) = probe_magic(&head[..n]) {
        return Ok(Some(t.to_string()));
    }
    let d = dev.to_string_lossy();
    if which("blkid").is_some() {
        // util-linux: 0 with TYPE=/PTTYPE= found, 2 nothing found. Anything else (busybox's
        // blkid has no -p) leaves the magics' answer.
        let o = run::run("blkid", &["-p", "-o", "export", "--", &d], Duration::from_secs(30))?;
        if o.code == Some(0) {
            for l in o.stdout.lines() {
                if let Some(t) = l.strip_prefix("TYPE=").or_else(|| l.strip_prefix("PTTYPE=")) {
                    return Ok(Some(t.to_string()));
                }
            }
        }
    }
    Ok(None)
}

/// Makes a `fstype` file system on `dev`.
pub fn mkfs(dev: &Path, fstype: &str) -> Result<(), Status> {
    let d = dev.to_string_lossy();
    match fstype {
        "ext4" => {
            let prog = if which("mkfs.ext4").is_some() { "mkfs.ext4" } else { "mke2fs" };
            let mut args = vec!["-F", "-q"];
            if prog == "mke2fs" {
                args.extend(["-t", "ext4"]);
            }
            args.push(&d);
            run::check(prog, &args, MKFS_TIMEOUT)?;
        }
        "xfs" => {
            if which("mkfs.xfs").is_none() {
                return Err(Status::failed_precondition("mkfs.xfs is not installed on this node (xfsprogs): cannot make an xfs file system"));
            }
            run::check("mkfs.xfs", &["-q", &d], MKFS_TIMEOUT)?;
        }
        t => return Err(Status::invalid_argument(format!("file system {t:?} is not supported (ext4, xfs)"))),
    }
    Ok(())
}

/// The -o options of a file system mount: the capability's flags, and `nouuid` for xfs (a
/// clone or a restored snapshot carries its origin's UUID, which xfs refuses twice).
pub fn fs_options(fstype: &str, flags: &[String]) -> String {
    let mut o: Vec<String> = flags.iter().flat_map(|f| f.split(',')).filter(|f| !f.is_empty()).map(String::from).collect();
    if fstype == "xfs" && !o.iter().any(|f| f == "nouuid") {
        o.push("nouuid".into());
    }
    o.join(",")
}

pub fn mount_fs(dev: &Path, target: &Path, fstype: &str, flags: &[String]) -> Result<(), Status> {
    let (d, t) = (dev.to_string_lossy(), target.to_string_lossy());
    let o = fs_options(fstype, flags);
    let mut args = vec!["-t", fstype];
    if !o.is_empty() {
        args.extend(["-o", &o]);
    }
    args.extend([&*d, &*t]);
    run::check("mount", &args, MOUNT_TIMEOUT).map(drop)
}

/// Bind-mounts `src` at `target`, read-only when asked (a bind takes `ro` only on a remount).
pub fn bind(src: &Path, target: &Path, read_only: bool) -> Result<(), Status> {
    let (s, t) = (src.to_string_lossy(), target.to_string_lossy());
    run::check("mount", &["-o", "bind", &s, &t], MOUNT_TIMEOUT)?;
    if read_only {
        if let Err(e) = run::check("mount", &["-o", "remount,bind,ro", &t], MOUNT_TIMEOUT) {
            let _ = umount(target);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts everything stacked at `path`; nothing mounted there is fine.
pub fn umount_all(path: &Path) -> Result<(), Status> {
    for _ in 0..8 {
        if mounted_at(&mounts()?, path).is_none() {
            return Ok(());
        }
        umount(path)?;
    }
    Err(Status::internal(format!("{} is still mounted after 8 umounts", path.display())))
}

fn umount(path: &Path) -> Result<(), Status> {
    let p = canonical(path);
    let p = p.to_string_lossy();
    let o = run::run("umount", &[&p], MOUNT_TIMEOUT)?;
    if o.ok() || mounted_at(&mounts()?, path).is_none() {
        return Ok(());
    }
    Err(Status::internal(run::failure("umount", &[&p], &o)))
}

/// Grows the file system mounted at `mount_point` from block device `dev` to fill it.
pub fn grow(dev: &Path, mount_point: &Path, fstype: &str) -> Result<(), Status> {
    match fstype {
        "ext2" | "ext3" | "ext4" => run::check("resize2fs", &[&dev.to_string_lossy()], GROW_TIMEOUT).map(drop),
        "xfs" => run::check("xfs_growfs", &[&mount_point.to_string_lossy()], GROW_TIMEOUT).map(drop),
        t => Err(Status::failed_precondition(format!("cannot grow a {t} file system (ext4, xfs)"))),
    }
}

pub struct FsStats {
    pub total: u64,
    pub available: u64,
    pub used: u64,
    pub inodes: u64,
    pub inodes_free: u64,
    pub inodes_used: u64,
}

pub fn statvfs(path: &Path) -> Result<FsStats, Status> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Status::invalid_argument("path holds a NUL byte"))?;
    // SAFETY: a valid C string and a zeroed out-struct that statvfs fills.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Status::internal(format!("statvfs {}: {e}", path.display())));
    }
    let f = s.f_frsize as u64;
    Ok(FsStats {
        total: s.f_blocks as u64 * f,
        available: s.f_bavail as u64 * f,
        used: (s.f_blocks as u64).saturating_sub(s.f_bfree as u64) * f,
        inodes: s.f_files as u64,
        inodes_free: s.f_ffree as u64,
        inodes_used: (s.f_files as u64).saturating_sub(s.f_ffree as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / / rw,relatime - rootfs rootfs rw
25 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=500k
40 22 259:1 / /var/lib/kubelet/plugins/kubernetes.io/csi/csi.tidemark.io/abc/globalmount rw,relatime shared:30 - ext4 /dev/nvme0n1 rw
41 22 259:1 / /var/lib/kubelet/pods/p\\0401/volumes/mount rw,relatime shared:30 - ext4 /dev/nvme0n1 rw
42 41 259:1 / /var/lib/kubelet/pods/p\\0401/volumes/mount ro,relatime shared:30 master:3 - ext4 /dev/nvme0n1 rw
43 22 0:5 /nvme1n1 /var/lib/kubelet/pods/p2/volumeDevices/blk rw,nosuid - devtmpfs devtmpfs rw
bad line
";

    #[test]
    fn mountinfo_parses_escapes_stacks_and_device_binds() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 6, "the bad line is skipped");
        assert_eq!(m[2].dev, (259, 1));
        assert_eq!((m[2].fstype.as_str(), m[2].source.as_str()), ("ext4", "/dev/nvme0n1"));
        let pub_path = Path::new("/var/lib/kubelet/pods/p 1/volumes/mount");
        let top = mounted_at(&m, pub_path).unwrap();
        assert!(top.read_only(), "the top of the stack is the ro remount");
        assert_eq!(top.options, "ro,relatime");
        assert!(mounted_at(&m, Path::new("/var/lib/kubelet/pods")).is_none());
        assert_eq!(users(&m, (259, 1), "nvme0n1").len(), 3);
        let blk = users(&m, (259, 2), "nvme1n1");
        assert_eq!(blk.len(), 1);
        assert_eq!(blk[0].mount_point, Path::new("/var/lib/kubelet/pods/p2/volumeDevices/blk"));
        assert_eq!(unescape("a\\011b\\134c\\04"), "a\tb\\c\\04");
    }

    #[test]
    fn superblock_magics() {
        let mut b = vec![0u8; 68 * 1024];
        assert_eq!(probe_magic(&b), None, "zeros are blank");
        b[1080] = 0x53;
        b[1081] = 0xef;
        assert_eq!(probe_magic(&b), Some("ext4"));
        let mut x = vec![0u8; 4096];
        x[..4].copy_from_slice(b"XFSB");
        assert_eq!(probe_magic(&x), Some("xfs"));
        let mut p = vec![0u8; 4096];
        p[510] = 0x55;
        p[511] = 0xaa;
        assert_eq!(probe_magic(&p), Some("partition table"));
        assert_eq!(probe_magic(&[]), None, "a short read is no magic");
        // A file holding an ext4 magic is probed from the file.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("img"), &b).unwrap();
        assert_eq!(probe(&dir.path().join("img")).unwrap().as_deref(), Some("ext4"));
    }

    #[test]
    fn options_for_mounts() {
        assert_eq!(fs_options("ext4", &[]), "");
        assert_eq!(fs_options("ext4", &["noatime,discard".into(), "".into()]), "noatime,discard");
        assert_eq!(fs_options("xfs", &["noatime".into()]), "noatime,nouuid");
        assert_eq!(fs_options("xfs", &["nouuid".into()]), "nouuid");
    }

    #[test]
    fn statvfs_of_a_directory() {
        let s = statvfs(Path::new("/")).unwrap();
        assert!(s.total > 0 && s.total >= s.available);
        assert!(statvfs(Path::new("/no/such/path")).is_err());
    }
}

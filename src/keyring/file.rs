//! Key files (SPDK's `keyring_file` module): a key is the content of a file that only the
//! daemon's user can read. The file is checked on the open descriptor (fstat), so what is
//! checked is what is read, with no window for a swap between the check and the read.

use super::Secret;
use crate::rpc::{EINVAL, EIO, EPERM};
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use zeroize::Zeroizing;

/// Largest key file: DH-HMAC-CHAP secrets and TLS PSKs in their interchange formats are a few
/// hundred bytes; anything far larger is a wrong path, not a key.
pub const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Why a key file was refused. Every message names the file; none quotes its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("key file path {0} is not absolute")]
    NotAbsolute(String),
    #[error("key file {0} is a symbolic link; give the path of the file itself")]
    Symlink(String),
    #[error("cannot open key file {path}: {reason}")]
    Open { path: String, errno: i32, reason: String },
    #[error("key file {path} is not a regular file ({kind})")]
    NotRegular { path: String, kind: &'static str },
    #[error("invalid permissions for key file {path}: mode 0{mode:o}; group and other must have no access (chmod 0600)")]
    Mode { path: String, mode: u32 },
    #[error("key file {path} is owned by uid {owner}, not by the daemon's user (uid {daemon})")]
    Owner { path: String, owner: u32, daemon: u32 },
    #[error("key file {path} is {size} bytes, more than the {max} a key may have")]
    TooLarge { path: String, size: u64, max: u64 },
    #[error("key file {0} is empty")]
    Empty(String),
    #[error("cannot read key file {path}: {reason}")]
    Read { path: String, reason: String },
}

impl FileError {
    /// The JSON-RPC code: SPDK's -EPERM for a file refused for its path, kind, mode or owner;
    /// the open's errno (negated, as SPDK answers) when the file cannot be opened.
    pub fn code(&self) -> i32 {
        match self {
            FileError::NotAbsolute(_) | FileError::Symlink(_) | FileError::NotRegular { .. } | FileError::Mode { .. } | FileError::Owner { .. } => EPERM,
            FileError::Open { errno, .. } => -errno.abs(),
            FileError::TooLarge { .. } | FileError::Empty(_) => EINVAL,
            FileError::Read { .. } => EIO,
        }
    }
}

/// Checks and reads the key in `path`: an absolute path to a regular file (not a symlink),
/// owned by the daemon's effective user, with no permission bits for group or other. The
/// content, without trailing whitespace (a newline from `echo`), is the key.
pub fn read_key(path: &Path) -> Result<Secret, FileError> {
    let shown = path.display().to_string();
    if !path.is_absolute() {
        return Err(FileError::NotAbsolute(shown));
    }
    // O_NOFOLLOW: a symlink fails the open (ELOOP) instead of being followed to a file that
    // someone else may control. O_NONBLOCK: a FIFO planted at the path must not hang the RPC
    // thread in open(); it is refused below as not a regular file.
    let f =
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => FileError::Symlink(shown.clone()),
            errno => FileError::Open { path: shown.clone(), errno: errno.unwrap_or(libc::EIO), reason: e.to_string() },
        })?;
    let md = f.metadata().map_err(|e| FileError::Read { path: shown.clone(), reason: e.to_string() })?;
    let ft = md.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() { "a directory" } else { "a device, FIFO or socket" };
        return Err(FileError::NotRegular { path: shown, kind });
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(FileError::Mode { path: shown, mode });
    }
    let daemon = nix::unistd::geteuid().as_raw();
    if md.uid() != daemon {
        return Err(FileError::Owner { path: shown, owner: md.uid(), daemon });
    }
    if md.len() > MAX_KEY_FILE_BYTES {
        return Err(FileError::TooLarge { path: shown, size: md.len(), max: MAX_KEY_FILE_BYTES });
    }
    // Room for the whole file up front, so the buffer is not reallocated while it fills (a
    // reallocation would free a copy of the secret without wiping it). One byte more tells a
    // file that grew since the fstat.
    let mut buf = Zeroizing::new(Vec::with_capacity(md.len() as usize + 1));
    f.take(MAX_KEY_FILE_BYTES + 1).read_to_end(&mut buf).map_err(|e| FileError::Read { path: shown.clone(), reason: e.to_string() })?;
    if buf.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(FileError::TooLarge { path: shown, size: buf.len() as u64, max: MAX_KEY_FILE_BYTES });
    }
    // Truncating keeps the dropped bytes in the capacity, which Zeroizing wipes on drop.
    let end = buf.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    buf.truncate(end);
    if buf.is_empty() {
        return Err(FileError::Empty(shown));
    }
    Ok(Secret::new(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, name: &str, content: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn reads_a_private_file_without_its_trailing_newline() {
        let d = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400, 0o700] {
            let p = file(d.path(), &format!("k{mode:o}"), "NVMeTLSkey-1:01:abc:\n\n", mode);
            assert_eq!(read_key(&p).unwrap().expose(), b"NVMeTLSkey-1:01:abc:");
        }
    }

    #[test]
    fn group_or_other_access_is_refused_naming_file_and_mode() {
        let d = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o610, 0o601] {
            let p = file(d.path(), "k", "s", mode);
            let e = read_key(&p).unwrap_err();
            assert_eq!(e, FileError::Mode { path: p.display().to_string(), mode }, "{mode:o}");
            assert_eq!(e.code(), EPERM);
            let m = e.to_string();
            assert!(m.contains(&p.display().to_string()) && m.contains(&format!("0{mode:o}")), "{m}");
        }
    }

    #[test]
    fn symlinks_directories_fifos_relative_and_missing_paths_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = file(d.path(), "real", "s", 0o600);
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(read_key(&link).unwrap_err(), FileError::Symlink(link.display().to_string()));
        assert!(matches!(read_key(d.path()).unwrap_err(), FileError::NotRegular { .. }));
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(read_key(&fifo).unwrap_err(), FileError::NotRegular { .. }), "a FIFO is refused, not waited on");
        assert!(matches!(read_key(Path::new("relative/key")).unwrap_err(), FileError::NotAbsolute(_)));
        let e = read_key(&d.path().join("missing")).unwrap_err();
        assert_eq!(e.code(), -libc::ENOENT, "{e:?}");
        let empty = file(d.path(), "empty", " \n", 0o600);
        assert_eq!(read_key(&empty).unwrap_err(), FileError::Empty(empty.display().to_string()));
        let big = file(d.path(), "big", &"x".repeat(MAX_KEY_FILE_BYTES as usize + 1), 0o600);
        assert!(matches!(read_key(&big).unwrap_err(), FileError::TooLarge { .. }));
    }

    #[test]
    fn a_file_of_another_user_is_refused() {
        // Only root can give a file away; as another user the check is the mode test's.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = file(d.path(), "k", "s", 0o600);
        nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let e = read_key(&p).unwrap_err();
        assert_eq!(e, FileError::Owner { path: p.display().to_string(), owner: 65534, daemon: 0 });
        assert_eq!(e.code(), EPERM);
    }
}

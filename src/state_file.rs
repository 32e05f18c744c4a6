//! Small JSON state files that must survive power loss (SCSI persistent reservations with
//! APTPL, NVMe reservations with a `ptpl_file`): written to a temporary file, fsynced, renamed
//! over the old one and the directory fsynced, so that after a crash the file holds either the
//! old state or the new one, never a mix, and a command that reported success finds its state.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The state in `f`; None when there is no file.
pub fn load<T: DeserializeOwned>(f: &Path) -> Result<Option<T>, String> {
    match std::fs::read(f) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| format!("{}: {e}", f.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", f.display())),
    }
}

/// Writes `s` to `f` atomically and durably, or with None removes the file (durably too).
pub fn store<T: Serialize>(f: &Path, s: Option<&T>) -> std::io::Result<()> {
    let dir = match f.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match s {
        None => match std::fs::remove_file(f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        },
        Some(s) => {
            std::fs::create_dir_all(dir)?;
            let mut tmp = f.as_os_str().to_owned();
            tmp.push(".tmp");
            let tmp = PathBuf::from(tmp);
            let body = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&body)?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&tmp, f)?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_state_loads_back_and_removal_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("sub/state.json");
        assert_eq!(load::<Vec<u32>>(&f).unwrap(), None);
        store(&f, Some(&vec![1u32, 2])).unwrap();
        assert_eq!(load::<Vec<u32>>(&f).unwrap(), Some(vec![1, 2]));
        assert!(!d.path().join("sub/state.json.tmp").exists());
        store::<Vec<u32>>(&f, None).unwrap();
        assert_eq!(load::<Vec<u32>>(&f).unwrap(), None);
        store::<Vec<u32>>(&f, None).unwrap();
        std::fs::write(&f, b"{not json").unwrap();
        assert!(load::<Vec<u32>>(&f).unwrap_err().contains("state.json"));
    }
}

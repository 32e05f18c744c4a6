//! How CSI names and ids map to lvols, so that the driver keeps no state of its own: a volume's
//! or snapshot's lvol name is derived from its CSI name, and its id says where it lives.
//!
//! - volume `NAME` → lvol `v-H(NAME)`, id `node/pool/v-H(NAME)`;
//! - snapshot `NAME` of volume lvol `v-S` taken at `T` → lvol `s-H(NAME)-S-T` (T: Unix seconds in
//!   hex), so that the source and the creation time a ListSnapshots reports survive a restart;
//! - a volume cloned from a volume goes through a hidden snapshot `c-H(NAME)` of the source.
//!
//! H is 24 hex digits (96 bits) of a UUIDv5 of the name: names longer than an lvol name allows
//! (CSI allows 128 bytes and any characters) still map to one lvol, collisions are negligible.

pub const VOLUME_PREFIX: &str = "v-";
pub const SNAPSHOT_PREFIX: &str = "s-";
pub const CLONE_BASE_PREFIX: &str = "c-";
const HASH_HEX: usize = 24;
/// Fixed, so the same name maps to the same lvol in every version of the driver.
const NAMESPACE: uuid::Uuid = uuid::uuid!("6a8e0f4c-3a43-5d0e-9a52-7d1c1b2e5a10");

fn hash(name: &str) -> String {
    let mut h = uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes()).simple().to_string();
    h.truncate(HASH_HEX);
    h
}

pub fn volume_lvol(name: &str) -> String {
    format!("{VOLUME_PREFIX}{}", hash(name))
}

/// The hidden snapshot a volume cloned from another volume grows from.
pub fn clone_base_lvol(volume_lvol: &str) -> String {
    format!("{CLONE_BASE_PREFIX}{}", volume_lvol.strip_prefix(VOLUME_PREFIX).unwrap_or(volume_lvol))
}

/// The start of the lvol name of every snapshot named `name`, whatever its source and time.
pub fn snapshot_prefix(name: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{}-", hash(name))
}

pub fn snapshot_lvol(name: &str, source_lvol: &str, created_secs: u64) -> String {
    let src = source_lvol.strip_prefix(VOLUME_PREFIX).unwrap_or(source_lvol);
    format!("{}{src}-{:08x}", snapshot_prefix(name), created_secs as u32)
}

/// The source volume's lvol and the creation time of the snapshot lvol `lvol`.
pub fn parse_snapshot_lvol(lvol: &str) -> Option<(String, u64)> {
    let rest = lvol.strip_prefix(SNAPSHOT_PREFIX)?;
    let mut parts = rest.split('-');
    let (h, src, t) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if parts.next().is_some() || !hex(h, HASH_HEX) || !hex(src, HASH_HEX) || !hex(t, 8) {
        return None;
    }
    Some((format!("{VOLUME_PREFIX}{src}"), u64::from_str_radix(t, 16).ok()?))
}

/// A volume or snapshot id: `node/pool/lvol`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Id {
    pub node: String,
    pub pool: String,
    pub lvol: String,
}

impl Id {
    pub fn new(node: &str, pool: &str, lvol: &str) -> Id {
        Id { node: node.into(), pool: pool.into(), lvol: lvol.into() }
    }

    /// None for anything that is not an id of this driver with the given lvol prefix.
    pub fn parse(id: &str, prefix: &str) -> Option<Id> {
        let mut p = id.split('/');
        let (node, pool, lvol) = (p.next()?, p.next()?, p.next()?);
        if p.next().is_some() || node.is_empty() || pool.is_empty() || !lvol.starts_with(prefix) || lvol.len() <= prefix.len() {
            return None;
        }
        Some(Id::new(node, pool, lvol))
    }

    /// The lvol's alias on its node (`lvs/lvol`), what bdev_lvol_* calls take.
    pub fn alias(&self) -> String {
        format!("{}/{}", self.pool, self.lvol)
    }

    /// The NVMe subsystem that exports the volume.
    pub fn nqn(&self) -> String {
        format!("nqn.2016-06.io.tidemark:csi-{}", self.lvol)
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.node, self.pool, self.lvol)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_short_stable_lvol_names() {
        let long = "pvc-".to_string() + &"x".repeat(124);
        let v = volume_lvol(&long);
        assert_eq!(v, volume_lvol(&long), "stable");
        assert_ne!(v, volume_lvol("pvc-other"));
        let s = snapshot_lvol("snap/ü \"1\"", &v, 0x6554_3210);
        assert!(s.len() <= 63 && v.len() <= 63, "fits an lvol name: {s}");
        assert!(s.starts_with(&snapshot_prefix("snap/ü \"1\"")));
        assert_eq!(parse_snapshot_lvol(&s), Some((v.clone(), 0x6554_3210)));
        assert_eq!(parse_snapshot_lvol(&v), None);
        assert_eq!(parse_snapshot_lvol("s-zz-yy-00000000"), None);
        assert_eq!(clone_base_lvol(&v), format!("c-{}", &v[2..]));
    }

    #[test]
    fn ids_round_trip_and_foreign_ids_are_refused() {
        let id = Id::new("node-a", "pool", "v-0123");
        assert_eq!(Id::parse(&id.to_string(), VOLUME_PREFIX), Some(id.clone()));
        assert_eq!(id.alias(), "pool/v-0123");
        for bad in ["", "some-volume", "a/b", "a/b/c", "a/b/v-", "a//v-1", "a/b/v-1/x", "/b/v-1"] {
            assert_eq!(Id::parse(bad, VOLUME_PREFIX), None, "{bad}");
        }
        assert_eq!(Id::parse("a/b/v-1", SNAPSHOT_PREFIX), None, "a volume id is not a snapshot id");
    }
}

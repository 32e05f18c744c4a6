//! What the simulated hosts write and how a read is judged: every block written carries the
//! write's tag and its own address, so a read tells which write it returned (or that it is
//! garbage), and the model says which tags a block may show.

use super::device::SIM_BLOCK;
use crate::bdev::{BdevEntry, Channel, IoBuf};
use std::sync::Arc;

/// Fills `buf` (blocks from `off`) with write `tag`'s data; tag 0 is the zeroes of a block
/// never written.
pub fn fill(buf: &mut [u8], off: u64, tag: u64) {
    for (i, b) in buf.chunks_mut(SIM_BLOCK as usize).enumerate() {
        b.fill(0);
        if tag != 0 {
            b[0..8].copy_from_slice(&tag.to_le_bytes());
            b[8..16].copy_from_slice(&(off + i as u64).to_le_bytes());
        }
    }
}

/// The tag of a block read back, or a description of garbage.
pub fn tag_of(b: &[u8], lba: u64) -> Result<u64, String> {
    let tag = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
    if tag == 0 {
        return if b.iter().all(|&x| x == 0) { Ok(0) } else { Err(format!("block {lba}: garbage (zero tag, non-zero data)")) };
    }
    let at = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    if at != lba || b[16..].iter().any(|&x| x != 0) {
        return Err(format!("block {lba}: data of write {tag} written for block {at}"));
    }
    Ok(tag)
}

/// Reads `n` blocks at `off` from `e` on the current core; returns their tags.
pub async fn read_tags(e: &Arc<BdevEntry>, off: u64, n: u64) -> Result<Vec<u64>, String> {
    let ch = Channel::get(e).map_err(|x| x.to_string())?;
    let mut buf = IoBuf::alloc((n * SIM_BLOCK as u64) as usize);
    ch.read_buf(off, &mut buf[..]).await.map_err(|x| format!("read of {} failed: {x}", e.name()))?;
    buf.chunks(SIM_BLOCK as usize).enumerate().map(|(i, b)| tag_of(b, off + i as u64)).collect()
}

/// Checks tags read from `off` against the tags the model allows for each block.
pub fn check_values(what: &str, off: u64, got: &[u64], ok: impl Fn(u64) -> Vec<u64>) -> Result<(), String> {
    for (i, &g) in got.iter().enumerate() {
        let b = off + i as u64;
        let allowed = ok(b);
        if !allowed.contains(&g) {
            return Err(format!("{what}: block {b} reads write {g}, allowed {allowed:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_reads_back_as_its_tag_and_misplaced_data_is_caught() {
        let mut buf = vec![0u8; 2 * SIM_BLOCK as usize];
        fill(&mut buf, 7, 42);
        assert_eq!(tag_of(&buf[..SIM_BLOCK as usize], 7), Ok(42));
        assert_eq!(tag_of(&buf[SIM_BLOCK as usize..], 8), Ok(42));
        assert!(tag_of(&buf[..SIM_BLOCK as usize], 8).is_err(), "block 7's data read at block 8");
        fill(&mut buf, 0, 0);
        assert_eq!(tag_of(&buf[..SIM_BLOCK as usize], 3), Ok(0));
        buf[100] = 1;
        assert!(tag_of(&buf[..SIM_BLOCK as usize], 0).is_err(), "garbage in a zero block");
        assert!(check_values("x", 5, &[1, 2], |b| vec![b - 4]).is_ok());
        assert!(check_values("x", 5, &[1, 3], |b| vec![b - 4]).is_err());
    }
}

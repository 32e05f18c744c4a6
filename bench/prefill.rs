//! Writing a whole bdev once before a benchmark measures it: RAM bdevs map their pages on
//! first touch and files allocate on first write, and neither cost belongs in a steady-state
//! figure. Shared by the benchmarks that build their bdevs in process.

use std::time::Duration;
use tidemark::bdev::{Channel, IoBuf};
use tidemark::target::Target;

/// Writes the whole of `bdev` once, sequentially in 1 MiB writes of zeroes, on core 0.
pub fn prefill(t: &Target, bdev: &str) -> Result<(), String> {
    let e = t.bdevs.get(bdev).ok_or_else(|| format!("no bdev {bdev}"))?;
    let name = bdev.to_string();
    t.reactors
        .call_async(0, Duration::from_secs(600), move || async move {
            let ch = Channel::get(&e).map_err(|x| x.to_string())?;
            let buf = IoBuf::zeroed(1 << 20);
            let step = (1u64 << 20) / ch.block_size() as u64;
            let mut off = 0;
            while off < ch.num_blocks() {
                let n = step.min(ch.num_blocks() - off);
                ch.write_buf(off, &buf[..(n * ch.block_size() as u64) as usize]).await.map_err(|x| format!("prefill of {name}: {x}"))?;
                off += n;
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?
}

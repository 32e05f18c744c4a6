//! The background process: copies the regions a leg being rebuilt still misses, and
//! resynchronises regions that had writes in flight at a crash, one region (window) at a time.
//!
//! Each window is locked (no host write is inside it while it is copied; host writes to it
//! wait, the rest of the mirror keeps serving), read from an in-sync leg, written to the legs
//! that need it, and reported to the control task, which clears the stale bits. The copy rate
//! is limited by `bdev_raid_set_options {process_max_bandwidth_mb_sec}`.

use super::control::{Request, Step};
use super::layout::MAX_SLOTS;
use super::Shared;
use crate::bdev::{Channel, IoBuf};
use crate::reactor;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;

/// Smallest and largest copy chunk.
const MIN_CHUNK: u64 = 4096;
const MAX_CHUNK: u64 = 16 << 20;

/// Keeps the copy rate under the configured bandwidth.
struct RateLimit {
    since_ns: u64,
    bytes: u64,
    limit_mb: u64,
}

impl RateLimit {
    async fn wait(&mut self, sh: &Shared, next_bytes: u64) {
        let limit = sh.process_options().max_bandwidth_mb_sec.load(Relaxed);
        if limit != self.limit_mb {
            // A new limit applies from now.
            *self = RateLimit { since_ns: reactor::now_ns(), bytes: 0, limit_mb: limit };
        }
        if limit > 0 {
            let due = self.since_ns + (self.bytes as u128 * 1_000_000_000 / (limit as u128 * (1 << 20))) as u64;
            // In slices, so that a shutdown does not wait for a slow copy's next window.
            while reactor::now_ns() < due && !sh.offline.load(SeqCst) {
                reactor::sleep_until(due.min(reactor::now_ns() + 10_000_000)).await;
            }
        }
        self.bytes += next_bytes;
    }
}

pub(crate) async fn run(sh: Arc<Shared>) {
    let g = sh.geometry;
    let bs = g.block_size as u64;
    let mut cursor = 0;
    let mut rate = RateLimit { since_ns: reactor::now_ns(), bytes: 0, limit_mb: sh.process_options().max_bandwidth_mb_sec.load(Relaxed) };
    let mut buf: Option<IoBuf> = None;
    loop {
        let Some(Some(step)) = sh.ask(|reply| Request::ProcessNext { cursor, reply }).await else { return };
        cursor = step.region + 1;
        let (offset, count) = g.region_range(step.region);
        rate.wait(&sh, count * bs).await;
        match sh.ask(|reply| Request::Lock { region: step.region, write_intent: false, reply }).await {
            Some(Ok(())) => {}
            // Shut down meanwhile: the next ProcessNext ends the process.
            _ => continue,
        }
        let chunk = (sh.process_options().window_bytes.load(Relaxed).clamp(MIN_CHUNK, MAX_CHUNK) / bs).max(1);
        let b = match buf.take() {
            Some(b) if b.len() as u64 == chunk * bs => b,
            _ => IoBuf::alloc((chunk * bs) as usize),
        };
        let (copied, unreadable, bytes, b) = copy_region(&sh, &step, offset, count, chunk, b).await;
        buf = Some(b);
        sh.send(Request::ProcessDone { region: step.region, copied, resynced: step.resync && !unreadable, unreadable, bytes });
        sh.send(Request::Unlock { region: step.region });
    }
}

/// The slot's leg and its incarnation (read first: a failure is never held against a newer leg).
fn leg(sh: &Shared, s: usize) -> Option<(Channel, u64)> {
    let inc = sh.slots[s].incarnation.load(SeqCst);
    sh.slots[s].entry().and_then(|e| Channel::get(&e).ok()).map(|c| (c, inc))
}

/// Copies one locked region; returns the targets that got all of it, whether the region could
/// not be read at all, and the bytes copied.
async fn copy_region(sh: &Shared, step: &Step, offset: u64, count: u64, chunk: u64, mut buf: IoBuf) -> (u8, bool, u64, IoBuf) {
    let g = &sh.geometry;
    let bs = g.block_size as u64;
    let mut targets = step.targets;
    if step.resync {
        for &s in step.sources.iter().skip(1) {
            targets |= 1 << s;
        }
    }
    let mut done = 0;
    let mut bytes = 0;
    while done < count && targets != 0 {
        let n = chunk.min(count - done);
        let data = &mut buf[..(n * bs) as usize];
        let at = g.data_offset + offset + done;
        let mut read = false;
        for &s in &step.sources {
            let Some((ch, _)) = leg(sh, s) else { continue };
            if ch.read_buf(at, data).await.is_ok() {
                read = true;
                break;
            }
        }
        if !read {
            return (0, true, bytes, buf);
        }
        for s in 0..MAX_SLOTS {
            if targets & (1 << s) == 0 {
                continue;
            }
            let (ok, incarnation) = match leg(sh, s) {
                Some((ch, inc)) => (ch.write_buf(at, data).await.is_ok(), inc),
                None => (false, sh.slots[s].incarnation.load(SeqCst)),
            };
            if !ok {
                targets &= !(1 << s);
                log::warn!("mirror {}: copy to the leg in slot {s} failed; dropping it", sh.props.name());
                let _ = sh.ask(|reply| Request::LegFailed { slot: s, incarnation, reply }).await;
            }
        }
        done += n;
        bytes += n * bs;
    }
    (targets, false, bytes, buf)
}

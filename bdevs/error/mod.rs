//! `error`: a pass-through bdev over a base that fails chosen I/Os on command, to test how the
//! layers above (mirror, snapshot, front ends) handle device failures. Named `EE_<base>` as in
//! SPDK.

pub mod rpc;

use crate::bdev::{Bdev, BdevError, BdevProps, Channel, HoldGuard, Io, IoBuf, IoChannel, IoFuture, IoType, PassThru};
use crate::reactor;
use serde_json::{json, Value};
use std::io::IoSlice;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// Complete with a media error.
    Failure,
    /// Complete with "no resources" (the caller should retry).
    Nomem,
    /// Flip bits of the data (after a read, before a write) and report success.
    CorruptData,
    /// Never complete until the injection is cleared; then fail as aborted.
    Pending,
}

const NONE: u8 = 0;

fn encode(t: ErrorType) -> u8 {
    match t {
        ErrorType::Failure => 1,
        ErrorType::Nomem => 2,
        ErrorType::CorruptData => 3,
        ErrorType::Pending => 4,
    }
}

fn decode(v: u8) -> Option<ErrorType> {
    match v {
        1 => Some(ErrorType::Failure),
        2 => Some(ErrorType::Nomem),
        3 => Some(ErrorType::CorruptData),
        4 => Some(ErrorType::Pending),
        _ => None,
    }
}

/// One injection per I/O type, shared by every core (a few atomics; this is a test device).
#[derive(Default)]
pub struct Injections {
    kind: [AtomicU8; 5],
    /// Errors left to inject; negative = until cleared.
    remaining: [AtomicI64; 5],
    /// Bumped when injections are cleared, to release pending I/O.
    generation: AtomicU64,
    injected: AtomicU64,
}

impl Injections {
    pub fn set(&self, t: IoType, kind: ErrorType, num: u64) {
        let n = if num == 0 { -1 } else { num as i64 };
        self.remaining[t.index()].store(n, Ordering::SeqCst);
        self.kind[t.index()].store(encode(kind), Ordering::SeqCst);
    }

    pub fn clear(&self) {
        for i in 0..5 {
            self.kind[i].store(NONE, Ordering::SeqCst);
            self.remaining[i].store(0, Ordering::SeqCst);
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Takes one injection for an I/O of type `t`, if one is armed.
    fn take(&self, t: IoType) -> Option<ErrorType> {
        let i = t.index();
        let kind = decode(self.kind[i].load(Ordering::Relaxed))?;
        let took = self.remaining[i].fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| match r {
            0 => None,
            r if r < 0 => Some(r),
            r => Some(r - 1),
        });
        match took {
            Ok(1) => {
                self.kind[i].store(NONE, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(_) => return None,
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        Some(kind)
    }
}

pub struct ErrorBdev {
    pt: PassThru,
    injections: Arc<Injections>,
}

impl ErrorBdev {
    pub fn new(name: String, base: HoldGuard, uuid: Option<Uuid>) -> ErrorBdev {
        ErrorBdev { pt: PassThru::new(base, name, "Error Injection Disk", uuid), injections: Arc::new(Injections::default()) }
    }

    pub fn injections(&self) -> &Arc<Injections> {
        &self.injections
    }
}

struct ErrorChannel {
    base: Channel,
    injections: Arc<Injections>,
}

/// Flips the first byte of every block: detectable by any checksum, keeps the length.
fn corrupt(buf: &mut [u8], block_size: usize) {
    for b in buf.chunks_mut(block_size) {
        b[0] ^= 0xff;
    }
}

impl ErrorChannel {
    async fn pending(&self) -> Result<(), BdevError> {
        let generation = self.injections.generation.load(Ordering::SeqCst);
        while self.injections.generation.load(Ordering::SeqCst) == generation {
            reactor::sleep(Duration::from_millis(1)).await;
        }
        Err(BdevError::Aborted)
    }
}

impl IoChannel for ErrorChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        let t = io.io_type();
        let injected = self.injections.take(t);
        IoFuture::boxed(async move {
            match injected {
                Some(ErrorType::Failure) => return Err(BdevError::Media),
                Some(ErrorType::Nomem) => return Err(BdevError::NoResources),
                Some(ErrorType::Pending) => return self.pending().await,
                Some(ErrorType::CorruptData) | None => {}
            }
            let corrupting = injected == Some(ErrorType::CorruptData);
            let bs = self.base.block_size() as usize;
            match io {
                Io::Read { offset_blocks, bufs, .. } => {
                    self.base.read(offset_blocks, bufs).await?;
                    if corrupting {
                        bufs.iter_mut().for_each(|b| corrupt(b, bs));
                    }
                    Ok(())
                }
                Io::Write { offset_blocks, bufs, .. } if corrupting => {
                    let total: usize = bufs.iter().map(|b| b.len()).sum();
                    let mut copy = IoBuf::alloc(total);
                    let mut pos = 0;
                    for b in bufs.iter() {
                        copy[pos..pos + b.len()].copy_from_slice(b);
                        pos += b.len();
                    }
                    corrupt(&mut copy, bs);
                    self.base.write(offset_blocks, &[IoSlice::new(&copy)]).await
                }
                other => self.base.forward(other).await,
            }
        })
    }
}

impl Bdev for ErrorBdev {
    fn props(&self) -> &BdevProps {
        self.pt.props()
    }
    fn supports(&self, io: IoType) -> bool {
        self.pt.supports(io)
    }
    fn read_only(&self) -> bool {
        self.pt.read_only()
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(ErrorChannel { base: self.pt.base_channel()?, injections: self.injections.clone() }))
    }
    fn driver_specific(&self) -> Value {
        let inj: serde_json::Map<String, Value> = IoType::ALL
            .iter()
            .filter_map(|t| {
                let k = decode(self.injections.kind[t.index()].load(Ordering::Relaxed))?;
                let r = self.injections.remaining[t.index()].load(Ordering::Relaxed);
                Some((t.name().to_string(), json!({ "error_type": k, "remaining": if r < 0 { json!("unlimited") } else { json!(r) } })))
            })
            .collect();
        json!({ "error": { "base_bdev": self.pt.base_name(), "injections": inj, "errors_injected": self.injections.injected.load(Ordering::Relaxed) } })
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        Some(("bdev_error_create", json!({ "base_name": self.pt.base_name(), "uuid": self.uuid().to_string() })))
    }
    fn destroy(&self) {
        // Release I/O parked by a `pending` injection.
        self.injections.clear();
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injections_count_down_and_clear() {
        let i = Injections::default();
        assert_eq!(i.take(IoType::Read), None);
        i.set(IoType::Read, ErrorType::Failure, 2);
        assert_eq!(i.take(IoType::Write), None);
        assert_eq!(i.take(IoType::Read), Some(ErrorType::Failure));
        assert_eq!(i.take(IoType::Read), Some(ErrorType::Failure));
        assert_eq!(i.take(IoType::Read), None);
        i.set(IoType::Write, ErrorType::Nomem, 0);
        for _ in 0..100 {
            assert_eq!(i.take(IoType::Write), Some(ErrorType::Nomem));
        }
        i.clear();
        assert_eq!(i.take(IoType::Write), None);
    }
}

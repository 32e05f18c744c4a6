//! One backup job: reads the extents of a sealed preserved image on a reactor core, one chunk
//! at a time, and writes them into the image file from the job's own thread, under a
//! bandwidth cap. The job thread is control plane: it never touches data-path state, it asks
//! the core to read (a message) and writes the file itself, so file writes never block a
//! reactor.

use super::manifest::{self, Extent, Kind, Manifest, State};
use crate::bdev::{BdevEntry, Channel, HoldGuard, IoBuf};
use crate::reactor::ReactorHandle;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest chunk read from the source in one request: small enough that one backup read
/// never holds the device (or the reactor's copy loop) long in front of host I/O.
pub const CHUNK_BYTES: u64 = 256 << 10;

/// Lowers the calling job thread's CPU priority to the minimum: it shares cores with the
/// reactors and the hosts' initiators, and must yield to both.
pub fn lower_priority() {
    // SAFETY: setpriority on the calling thread (tid) only changes its nice value.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// Live progress of a job, read by `backup_get` and the metrics.
#[derive(Default)]
pub struct Progress {
    pub bytes_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub cancel: AtomicBool,
}

/// What a job reads and where it writes.
pub struct JobSpec {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub image_path: PathBuf,
    /// Byte ranges to copy, sorted, non-overlapping (full: the whole image).
    pub ranges: Vec<(u64, u64)>,
    /// Bytes per second; 0 = unlimited.
    pub max_bytes_per_sec: u64,
    pub core: usize,
}

/// Runs a job to its end; returns the final manifest (state complete, failed or cancelled).
/// `source` is held open for the whole job, so the image cannot be deleted under it.
pub fn run(reactors: &ReactorHandle, source: HoldGuard, mut spec: JobSpec, progress: Arc<Progress>, final_state: Arc<Mutex<Option<Manifest>>>) -> Manifest {
    lower_priority();
    let total: u64 = spec.ranges.iter().map(|r| r.1).sum();
    progress.bytes_total.store(total, Ordering::Relaxed);
    let result = copy(reactors, source.entry(), &mut spec, &progress);
    let mut m = spec.manifest;
    m.finished_at = Some(manifest::now_unix());
    match result {
        Ok(extents) => {
            m.extents = extents;
            m.state = State::Complete;
        }
        Err(e) if progress.cancel.load(Ordering::Relaxed) => {
            m.state = State::Cancelled;
            m.error = Some(e);
        }
        Err(e) => {
            m.state = State::Failed;
            m.error = Some(e);
        }
    }
    if let Err(e) = m.store(&spec.manifest_path) {
        m.state = State::Failed;
        m.error = Some(format!("cannot write the manifest: {e}"));
    }
    *final_state.lock().unwrap_or_else(|e| e.into_inner()) = Some(m.clone());
    drop(source);
    m
}

fn copy(reactors: &ReactorHandle, src: &Arc<BdevEntry>, spec: &mut JobSpec, progress: &Progress) -> Result<Vec<Extent>, String> {
    let f = std::fs::OpenOptions::new().write(true).open(&spec.image_path).map_err(|e| format!("cannot open {}: {e}", spec.image_path.display()))?;
    let bs = src.bdev().block_size() as u64;
    let start = Instant::now();
    let mut done = 0u64;
    let mut extents: Vec<Extent> = Vec::new();
    for &(off, len) in &spec.ranges {
        let mut pos = off;
        while pos < off + len {
            if progress.cancel.load(Ordering::Relaxed) {
                return Err("cancelled".into());
            }
            let n = (off + len - pos).min(CHUNK_BYTES);
            let data = read_chunk(reactors, spec.core, src, pos / bs, n as usize)?;
            let zero = data.iter().all(|&b| b == 0);
            let is_full = spec.manifest.kind == Kind::Full;
            if !zero {
                f.write_all_at(&data, pos).map_err(|e| format!("cannot write {}: {e}", spec.image_path.display()))?;
            }
            let ext = Extent { offset: pos, length: n, crc32c: (!zero).then(|| crc32c::crc32c(&data)), zero };
            // Full backups coalesce runs of zeros (holes) into one extent.
            match extents.last_mut() {
                Some(last) if zero && last.zero && is_full && last.offset + last.length == pos => last.length += n,
                _ => extents.push(ext),
            }
            pos += n;
            done += n;
            progress.bytes_done.store(done, Ordering::Relaxed);
            throttle(start, done, spec.max_bytes_per_sec, progress);
        }
    }
    f.sync_all().map_err(|e| format!("cannot sync {}: {e}", spec.image_path.display()))?;
    Ok(extents)
}

/// Sleeps so that `done` bytes take at least `done / rate` seconds since `start`.
fn throttle(start: Instant, done: u64, rate: u64, progress: &Progress) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    while start.elapsed() < due && !progress.cancel.load(Ordering::Relaxed) {
        std::thread::sleep((due - start.elapsed()).min(Duration::from_millis(50)));
    }
}

fn read_chunk(reactors: &ReactorHandle, core: usize, src: &Arc<BdevEntry>, offset_blocks: u64, len: usize) -> Result<Vec<u8>, String> {
    let entry = src.clone();
    let r = reactors.call_async(core, Duration::from_secs(60), move || async move {
        let ch = Channel::get(&entry).map_err(|e| e.to_string())?;
        let mut buf = IoBuf::alloc(len);
        ch.read_buf(offset_blocks, &mut buf).await.map_err(|e| e.to_string())?;
        Ok::<Vec<u8>, String>(buf.to_vec())
    });
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("reading the source at block {offset_blocks}: {e}")),
        Err(e) => Err(format!("reading the source at block {offset_blocks}: {e}")),
    }
}

/// Creates the image file (sparse, the volume's size, owner-only) for a new job; refuses to
/// overwrite, or to follow a symlink.
pub fn create_image(path: &std::path::Path, size: u64) -> Result<(), String> {
    let f = super::root::create_private(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.set_len(size).map_err(|e| format!("cannot size {}: {e}", path.display()))?;
    Ok(())
}

/// Reads `len` bytes at `offset` of a file (restore jobs).
pub fn read_file_at(f: &File, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, offset).map_err(|e| e.to_string())?;
    Ok(v)
}

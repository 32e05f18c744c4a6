//! `backup_start`, `backup_get`, `backup_cancel`, `backup_restore`.

use super::job::{self, JobSpec, Progress};
use super::manifest::{self, BaseRef, Kind, Manifest, State};
use super::{source, BackupService, Job, JobKind, JobRecord, MAX_RUNNING};
use crate::bdev::{Channel, HolderKind, IoBuf};
use crate::module::Ctx;
use crate::rpc::{parse, RpcError, EALREADY, EBUSY, EEXIST, EINVAL, EIO, ENODEV};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

crate::register_module! {
    name: "backup",
    order: 60,
    construct: |_, _| std::sync::Arc::new(super::BackupService::default()),
    methods: [
        ("backup_start", backup_start, Start, "Starts a full or incremental backup of a sealed snapshot to a directory.", [&[
            (ENODEV, "the source (or incremental_from) is not a snapshot, no complete backup of incremental_from is known, or the two preserve different volumes"),
            (EBUSY, "the snapshot is not sealed yet, or the most jobs run already"),
            (EPERM, "path is outside backup.root"),
            (EEXIST, "the output file exists"),
            (EINVAL, "the volume cannot tell what changed between the two snapshots (incremental)"),
            (EIO, "the image or manifest cannot be written"),
        ]]),
        ("backup_get", backup_get, Get, "Describes backups: progress and result.", [&[(ENODEV, "no job has that id")]]),
        ("backup_cancel", backup_cancel, Cancel, "Cancels a running backup.", [&[(ENODEV, "no job has that id"), (EALREADY, "the job has ended already")]]),
        ("backup_restore", backup_restore, Restore, "Restores a backup into a bdev.", [&[
            (EPERM, "path is outside backup.root and backup.restore_allowed_dirs"),
            (ENODEV, "the bdev does not exist"),
            (EBUSY, "a virtual bdev claims the bdev, an export or job has it open and force is not given, or the most jobs run already"),
            (EINVAL, "the bdev cannot hold the image"),
        ]]),
    ],
}

fn service(t: &Ctx) -> Result<&BackupService, RpcError> {
    let s = t.module::<BackupService>().ok_or_else(|| RpcError::internal("the backup service is not running"))?;
    s.ensure_loaded(t);
    Ok(s)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Start {
    source: String,
    path: String,
    #[serde(default)]
    incremental_from: Option<String>,
    /// The base backup's manifest (or image) path; by default the newest complete backup of
    /// `incremental_from` that this daemon made.
    #[serde(default)]
    base_path: Option<String>,
    #[serde(default)]
    max_bandwidth_mb_sec: Option<u64>,
}

fn running(s: &BackupService) -> usize {
    let mut jobs = s.jobs.lock().unwrap_or_else(|e| e.into_inner());
    super::refresh(&mut jobs);
    jobs.values().filter(|j| j.record.state == State::InProgress).count()
}

fn check_output(path: &Path) -> Result<(), RpcError> {
    let mp = manifest::manifest_path(path);
    // symlink_metadata: a symlink (even dangling) in the way counts as existing.
    if std::fs::symlink_metadata(path).is_ok() || std::fs::symlink_metadata(&mp).is_ok() {
        return Err(RpcError::new(EEXIST, format!("{} already exists; a backup never overwrites", path.display())));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let meta = std::fs::metadata(dir).map_err(|e| RpcError::invalid_params(format!("field `path`: directory {} is not usable: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(RpcError::invalid_params(format!("field `path`: {} is not a directory", dir.display())));
    }
    // Probe writability without leaving anything behind.
    let probe = dir.join(format!(".tidemark-probe-{}", std::process::id()));
    super::root::create_private(&probe).map_err(|e| RpcError::invalid_params(format!("field `path`: cannot write in {}: {e}", dir.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn backup_start(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Start = parse(p)?;
    let s = service(t)?;
    let described = source::describe(t, &p.source)?;
    if !described.sealed {
        return Err(RpcError::new(
            EBUSY,
            format!("snapshot {} is not sealed yet (old-epoch I/O still in flight); retry when bdev_snapshot_get shows it sealed", p.source),
        ));
    }
    let src = described.source.clone();
    let entry = t.bdev(&p.source)?;
    let bs = entry.bdev().block_size();
    let size = entry.bdev().num_blocks() * bs as u64;
    let path = super::root::output_path(t, &p.path)?;
    check_output(&path)?;
    let rate = p.max_bandwidth_mb_sec.unwrap_or(0);
    if rate > 1 << 20 {
        return Err(RpcError::invalid_params("field `max_bandwidth_mb_sec`: over 1 TiB/s; use 0 or omit it for no cap"));
    }
    let (kind, base, ranges) = match &p.incremental_from {
        None => (Kind::Full, None, vec![(0, size)]),
        Some(older) => {
            let older_d = source::describe(t, older)?;
            if !older_d.sealed {
                return Err(RpcError::new(EBUSY, format!("snapshot {older} is not sealed yet")));
            }
            let o = older_d.source.clone();
            if o.volume_uuid != src.volume_uuid {
                return Err(RpcError::invalid_params(format!(
                    "field `incremental_from`: {older} preserves volume {}, not {} like {}",
                    o.volume, src.volume, p.source
                )));
            }
            if o.epoch >= src.epoch {
                return Err(RpcError::invalid_params(format!("field `incremental_from`: {older} is not older than {}", p.source)));
            }
            let base_manifest = match &p.base_path {
                Some(bp) => super::root::input_manifest(t, bp)?,
                None => newest_backup_of(s, &o.snapshot_uuid)
                    .ok_or_else(|| RpcError::new(ENODEV, format!("no complete backup of {older} is known to this daemon; pass base_path")))?,
            };
            let bm = Manifest::load(&base_manifest).map_err(RpcError::invalid_params)?;
            if bm.state != State::Complete || bm.source.snapshot_uuid != o.snapshot_uuid {
                return Err(RpcError::invalid_params(format!("field `base_path`: {} is not a complete backup of {older}", base_manifest.display())));
            }
            let ranges = source::changed_ranges(t, &o, &src)?;
            let base = BaseRef { manifest: base_manifest.display().to_string(), snapshot: o.snapshot.clone(), snapshot_uuid: o.snapshot_uuid.clone() };
            (Kind::Incremental, Some(base), ranges)
        }
    };
    if running(s) >= MAX_RUNNING {
        return Err(RpcError::new(EBUSY, format!("{MAX_RUNNING} jobs are running already")));
    }
    let id = s.new_id();
    let hold = entry.open(&format!("backup {id}"))?;
    let image_name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let m = Manifest {
        format: manifest::FORMAT.into(),
        id: id.clone(),
        state: State::InProgress,
        kind,
        source: src,
        block_size: bs,
        size_bytes: size,
        image: image_name,
        base,
        extents: Vec::new(),
        started_at: manifest::now_unix(),
        finished_at: None,
        error: None,
    };
    let mp = manifest::manifest_path(&path);
    job::create_image(&path, size).map_err(|e| RpcError::new(EIO, e))?;
    if let Err(e) = m.store(&mp) {
        let _ = std::fs::remove_file(&path);
        return Err(RpcError::new(EIO, e));
    }
    let progress = Arc::new(Progress::default());
    let result = Arc::new(std::sync::Mutex::new(None));
    let core = (t.reactors.core_count() - 1).min(1);
    let spec = JobSpec { manifest: m, manifest_path: mp, image_path: path.clone(), ranges, max_bytes_per_sec: rate << 20, core };
    let reactors = t.reactors.clone();
    let (pg, rs) = (progress.clone(), result.clone());
    let thread = std::thread::Builder::new()
        .name(format!("backup-{id}"))
        .spawn(move || {
            job::run(&reactors, hold, spec, pg, rs);
        })
        .map_err(|e| RpcError::internal(format!("cannot start the job thread: {e}")))?;
    let record = JobRecord {
        id: id.clone(),
        kind: JobKind::Backup,
        source: p.source.clone(),
        path: path.display().to_string(),
        state: State::InProgress,
        error: None,
        started_at: manifest::now_unix(),
        finished_at: None,
        bytes_done: 0,
        bytes_total: 0,
    };
    s.jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), Job { record, progress, started: std::time::Instant::now(), result, thread: Some(thread) });
    s.save(t);
    Ok(json!({ "id": id, "state": "in_progress", "path": path.display().to_string() }))
}

fn newest_backup_of(s: &BackupService, snapshot_uuid: &str) -> Option<PathBuf> {
    let jobs = s.jobs.lock().unwrap_or_else(|e| e.into_inner());
    jobs.values()
        .filter(|j| j.record.kind == JobKind::Backup && j.record.state == State::Complete)
        .filter_map(|j| {
            let mp = manifest::manifest_path(Path::new(&j.record.path));
            let m = Manifest::load(&mp).ok()?;
            (m.source.snapshot_uuid == snapshot_uuid && m.state == State::Complete).then_some((m.finished_at.unwrap_or(0), mp))
        })
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Get {
    #[serde(default)]
    id: Option<String>,
}

fn describe_job(j: &Job) -> Value {
    let r = &j.record;
    let secs = j.started.elapsed().as_secs_f64().max(1e-3);
    let running = r.state == State::InProgress;
    // Running: the rate so far. Ended: the job's average (whole seconds, from the record, so
    // that it survives a restart).
    let rate = match (running, r.finished_at) {
        (true, _) => r.bytes_done as f64 / secs,
        (false, Some(end)) => r.bytes_done as f64 / end.saturating_sub(r.started_at).max(1) as f64,
        (false, None) => 0.0,
    };
    let eta = if running && rate > 0.0 { Some(((r.bytes_total.saturating_sub(r.bytes_done)) as f64 / rate).ceil() as u64) } else { None };
    json!({
        "id": r.id, "kind": r.kind, "source": r.source, "path": r.path, "state": r.state, "error": r.error,
        "bytes_done": r.bytes_done, "bytes_total": r.bytes_total,
        "rate_mb_sec": (rate / (1 << 20) as f64 * 10.0).round() / 10.0, "eta_sec": eta,
        "started_at": r.started_at, "finished_at": r.finished_at,
    })
}

fn backup_get(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Get = parse(p)?;
    let s = service(t)?;
    let mut jobs = s.jobs.lock().unwrap_or_else(|e| e.into_inner());
    super::refresh(&mut jobs);
    match p.id {
        Some(id) => jobs.get(&id).map(|j| json!([describe_job(j)])).ok_or_else(|| RpcError::no_device(format!("no backup job {id}"))),
        None => Ok(Value::Array(jobs.values().map(describe_job).collect())),
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Cancel {
    id: String,
}

fn backup_cancel(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Cancel = parse(p)?;
    let s = service(t)?;
    let thread = {
        let mut jobs = s.jobs.lock().unwrap_or_else(|e| e.into_inner());
        super::refresh(&mut jobs);
        let j = jobs.get_mut(&p.id).ok_or_else(|| RpcError::no_device(format!("no backup job {}", p.id)))?;
        if j.record.state != State::InProgress {
            return Err(RpcError::new(EALREADY, format!("job {} is already {:?}", p.id, j.record.state)));
        }
        j.progress.cancel.store(true, Ordering::SeqCst);
        j.thread.take()
    };
    if let Some(th) = thread {
        let _ = th.join();
    }
    s.save(t);
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Restore {
    /// A backup's manifest or image path; its whole chain is applied.
    path: String,
    bdev: String,
    /// Restore into a bdev that is exported or open by a job: what hosts read changes under
    /// them. A claim (a virtual bdev built on it) is never overridden.
    #[serde(default)]
    force: bool,
}

/// Refuses a restore into a bdev something else uses: a virtual bdev that claims it (its
/// content is that bdev's own metadata and data: always refused), or an export or job that
/// has it open (refused unless `force`). -16 naming every holder, as a delete is refused.
fn check_restore_target(entry: &crate::bdev::BdevEntry, force: bool) -> Result<(), RpcError> {
    let holders = entry.holder_list();
    let names = |hs: &[&crate::bdev::Holder]| hs.iter().map(|h| h.by.as_str()).collect::<Vec<_>>().join(", ");
    let claims: Vec<_> = holders.iter().filter(|h| h.kind == HolderKind::Claim).collect();
    if !claims.is_empty() {
        return Err(RpcError::busy(format!(
            "bdev {} is claimed by {}: restore into that bdev instead (force does not override a claim)",
            entry.name(),
            names(&claims)
        )));
    }
    let opens: Vec<_> = holders.iter().collect();
    if !opens.is_empty() && !force {
        return Err(RpcError::busy(format!(
            "bdev {} is in use by {}: a restore would change data under it; remove the export first, or pass force: true",
            entry.name(),
            names(&opens)
        )));
    }
    Ok(())
}

fn backup_restore(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Restore = parse(p)?;
    let s = service(t)?;
    let mp = super::root::input_manifest(t, &p.path)?;
    let chain = super::root::load_chain(t, &p.path, &mp)?;
    for (path, m) in &chain {
        if m.state != State::Complete {
            return Err(RpcError::invalid_params(format!("field `path`: {} is {:?}, not complete", path.display(), m.state)));
        }
    }
    let entry = t.bdev(&p.bdev)?;
    check_restore_target(&entry, p.force)?;
    if p.force && !entry.holder_list().is_empty() {
        log::warn!("backup_restore: forced into {}, in use by {:?}", p.bdev, entry.holder_list().iter().map(|h| h.by.clone()).collect::<Vec<_>>());
    }
    let b = entry.bdev();
    let size = chain[0].1.size_bytes;
    let bs = b.block_size() as u64;
    if b.num_blocks() * bs < size || size % bs != 0 {
        return Err(RpcError::new(EINVAL, format!("bdev {} ({} bytes, {}-byte blocks) cannot hold a {size}-byte image", p.bdev, b.num_blocks() * bs, bs)));
    }
    if running(s) >= MAX_RUNNING {
        return Err(RpcError::new(EBUSY, format!("{MAX_RUNNING} jobs are running already")));
    }
    let id = s.new_id();
    let hold = entry.open(&format!("restore {id}"))?;
    let progress = Arc::new(Progress::default());
    let result = Arc::new(std::sync::Mutex::new(None));
    let total: u64 = chain.iter().map(|(_, m)| m.extents.iter().map(|e| e.length).sum::<u64>()).sum();
    progress.bytes_total.store(total, Ordering::Relaxed);
    let reactors = t.reactors.clone();
    let (pg, rs) = (progress.clone(), result.clone());
    let core = (t.reactors.core_count() - 1).min(1);
    let thread = std::thread::Builder::new()
        .name(format!("restore-{id}"))
        .spawn(move || {
            job::lower_priority();
            let r = restore_into_bdev(&reactors, core, &hold, &chain, &pg);
            let mut last = chain.last().map(|(_, m)| m.clone()).expect("a chain has at least one backup");
            last.finished_at = Some(manifest::now_unix());
            match r {
                Ok(()) => last.state = State::Complete,
                Err(e) => {
                    last.state = if pg.cancel.load(Ordering::Relaxed) { State::Cancelled } else { State::Failed };
                    last.error = Some(e);
                }
            }
            *rs.lock().unwrap_or_else(|e| e.into_inner()) = Some(last);
        })
        .map_err(|e| RpcError::internal(format!("cannot start the job thread: {e}")))?;
    let record = JobRecord {
        id: id.clone(),
        kind: JobKind::Restore,
        source: mp.display().to_string(),
        path: p.bdev.clone(),
        state: State::InProgress,
        error: None,
        started_at: manifest::now_unix(),
        finished_at: None,
        bytes_done: 0,
        bytes_total: total,
    };
    s.jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), Job { record, progress, started: std::time::Instant::now(), result, thread: Some(thread) });
    s.save(t);
    Ok(json!({ "id": id, "state": "in_progress" }))
}

fn restore_into_bdev(
    reactors: &crate::reactor::ReactorHandle,
    core: usize,
    hold: &crate::bdev::HoldGuard,
    chain: &[(PathBuf, Manifest)],
    progress: &Progress,
) -> Result<(), String> {
    let bs = hold.entry().bdev().block_size() as u64;
    let mut done = 0;
    for (mpath, m) in chain {
        let img = m.image_path(mpath);
        let f = std::fs::File::open(&img).map_err(|e| format!("cannot open {}: {e}", img.display()))?;
        for e in &m.extents {
            let mut pos = e.offset;
            while pos < e.offset + e.length {
                if progress.cancel.load(Ordering::Relaxed) {
                    return Err("cancelled".into());
                }
                let n = (e.offset + e.length - pos).min(job::CHUNK_BYTES);
                let data = if e.zero { None } else { Some(job::read_file_at(&f, pos, n as usize)?) };
                // Zero extents are written as zeroes: the target bdev may hold old data.
                let entry = hold.entry().clone();
                let (offset_blocks, num_blocks) = (pos / bs, n / bs);
                let r = reactors.call_async(core, Duration::from_secs(60), move || async move {
                    let ch = Channel::get(&entry).map_err(|e| e.to_string())?;
                    match data {
                        None => ch.write_zeroes(offset_blocks, num_blocks).await.map_err(|e| e.to_string()),
                        Some(d) => {
                            let mut buf = IoBuf::alloc(d.len());
                            buf.copy_from_slice(&d);
                            ch.write_buf(offset_blocks, &buf).await.map_err(|e| e.to_string())
                        }
                    }
                });
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(format!("writing block {offset_blocks}: {e}")),
                    Err(e) => return Err(format!("writing block {offset_blocks}: {e}")),
                }
                pos += n;
                done += n;
                progress.bytes_done.store(done, Ordering::Relaxed);
            }
        }
    }
    // Make the restored data durable before reporting the job complete.
    let entry = hold.entry().clone();
    match reactors.call_async(core, Duration::from_secs(60), move || async move {
        Channel::get(&entry).map_err(|e| e.to_string())?.flush().await.map_err(|e| e.to_string())
    }) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("flush: {e}")),
        Err(e) => Err(format!("flush: {e}")),
    }
}

//! Backup of preserved images while the live volume serves (full and incremental), restore,
//! and the job registry behind `backup_start` / `backup_get` / `backup_cancel` /
//! `backup_restore`. Jobs are recorded in the data directory, so a job cut short by a crash is
//! reported as failed after the restart, never as complete.

mod job;
pub mod manifest;
pub mod root;
pub mod rpc;
mod source;

pub use job::Progress;

use crate::metrics::{labels, Labels, MetricsOut};
use crate::module::{Ctx, Module};
use manifest::{Manifest, State};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Jobs kept in the registry (finished ones are dropped oldest first beyond this).
pub const MAX_JOBS: usize = 256;
/// Jobs running at once.
pub const MAX_RUNNING: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Backup,
    Restore,
}

/// The persistent record of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    pub source: String,
    pub path: String,
    pub state: State,
    #[serde(default)]
    pub error: Option<String>,
    pub started_at: u64,
    #[serde(default)]
    pub finished_at: Option<u64>,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: u64,
}

pub(crate) struct Job {
    pub record: JobRecord,
    pub progress: Arc<Progress>,
    pub started: std::time::Instant,
    pub result: Arc<Mutex<Option<Manifest>>>,
    pub thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
pub struct BackupService {
    pub(crate) jobs: Mutex<BTreeMap<String, Job>>,
    next_id: Mutex<u64>,
    loaded: std::sync::OnceLock<()>,
}

impl BackupService {
    fn records_path(t: &Ctx) -> PathBuf {
        t.data_dir.join("backup-jobs.json")
    }

    /// Loads the job records of earlier runs; a job that was running when the daemon stopped
    /// is marked failed.
    pub(crate) fn ensure_loaded(&self, t: &Ctx) {
        self.loaded.get_or_init(|| {
            let Ok(text) = std::fs::read_to_string(Self::records_path(t)) else { return };
            let Ok(records) = serde_json::from_str::<Vec<JobRecord>>(&text) else {
                log::warn!("backup: ignoring unreadable {}", Self::records_path(t).display());
                return;
            };
            let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let mut max = 0;
            for mut r in records {
                if r.state == State::InProgress {
                    r.state = State::Failed;
                    r.error = Some("interrupted: the daemon stopped while the job ran".into());
                    // The manifest on disk says so too, so `verify` refuses the partial image.
                    if r.kind == JobKind::Backup {
                        let mp = manifest::manifest_path(std::path::Path::new(&r.path));
                        if let Ok(mut m) = Manifest::load(&mp) {
                            m.state = State::Failed;
                            m.error = r.error.clone();
                            let _ = m.store(&mp);
                        }
                    }
                }
                if let Some(n) = r.id.strip_prefix("job").and_then(|n| n.parse::<u64>().ok()) {
                    max = max.max(n + 1);
                }
                jobs.insert(
                    r.id.clone(),
                    Job { record: r, progress: Arc::default(), started: std::time::Instant::now(), result: Arc::default(), thread: None },
                );
            }
            *self.next_id.lock().unwrap_or_else(|e| e.into_inner()) = max;
        });
        self.save(t);
    }

    pub(crate) fn new_id(&self) -> String {
        let mut n = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        let id = format!("job{}", *n);
        *n += 1;
        id
    }

    /// Brings records up to date with running jobs and writes them (atomically).
    pub(crate) fn save(&self, t: &Ctx) {
        let records: Vec<JobRecord> = {
            let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            refresh(&mut jobs);
            jobs.values().map(|j| j.record.clone()).collect()
        };
        let path = Self::records_path(t);
        let tmp = path.with_extension("json.tmp");
        let ok = serde_json::to_vec_pretty(&records).ok().map(|b| std::fs::write(&tmp, b).and_then(|_| std::fs::rename(&tmp, &path)));
        if !matches!(ok, Some(Ok(()))) {
            log::warn!("backup: cannot record jobs in {}", path.display());
        }
    }
}

/// Updates each record from its job's live progress and final manifest.
pub(crate) fn refresh(jobs: &mut BTreeMap<String, Job>) {
    for j in jobs.values_mut() {
        j.record.bytes_done = j.progress.bytes_done.load(Ordering::Relaxed).max(j.record.bytes_done);
        j.record.bytes_total = j.progress.bytes_total.load(Ordering::Relaxed).max(j.record.bytes_total);
        if j.record.state == State::InProgress {
            if let Some(m) = j.result.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                j.record.state = m.state;
                j.record.error = m.error.clone();
                j.record.finished_at = m.finished_at;
            }
        }
    }
    // Bound the registry: forget the oldest finished jobs.
    while jobs.len() > MAX_JOBS {
        let Some(oldest) = jobs.iter().filter(|(_, j)| j.record.state != State::InProgress).min_by_key(|(_, j)| j.record.started_at).map(|(k, _)| k.clone())
        else {
            break;
        };
        jobs.remove(&oldest);
    }
}

impl Module for BackupService {
    fn name(&self) -> &'static str {
        "backup"
    }

    fn config(&self, _t: &Ctx) -> Vec<crate::config::ConfigCall> {
        // Jobs are work, not configuration.
        Vec::new()
    }

    fn shutdown(&self, t: &Ctx) {
        let threads: Vec<JoinHandle<()>> = {
            let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            for j in jobs.values() {
                j.progress.cancel.store(true, Ordering::SeqCst);
            }
            jobs.values_mut().filter_map(|j| j.thread.take()).collect()
        };
        for th in threads {
            let _ = th.join();
        }
        self.save(t);
    }

    fn metrics(&self, _t: &Ctx, out: &mut MetricsOut<'_>) -> std::fmt::Result {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        refresh(&mut jobs);
        let mut done = Vec::new();
        let mut total = Vec::new();
        let mut running = 0.0;
        // Jobs by state, every state always present so that alerts on `failed` see a series.
        let states = [(State::InProgress, "in_progress"), (State::Complete, "complete"), (State::Failed, "failed"), (State::Cancelled, "cancelled")];
        let mut by_state = [0.0f64; 4];
        for j in jobs.values() {
            if let Some(i) = states.iter().position(|(s, _)| *s == j.record.state) {
                by_state[i] += 1.0;
            }
            let l = labels(&[
                ("backup_job", &j.record.id),
                ("kind", if j.record.kind == JobKind::Backup { "backup" } else { "restore" }),
                ("source", &j.record.source),
            ]);
            done.push((l.clone(), j.record.bytes_done));
            total.push((l, j.record.bytes_total as f64));
            if j.record.state == State::InProgress {
                running += 1.0;
            }
        }
        out.counter("tidemark_backup_bytes_done", "Bytes copied by each backup or restore job.", &done)?;
        out.gauge("tidemark_backup_size_bytes", "Bytes each backup or restore job has to copy.", &total)?;
        out.gauge("tidemark_backup_jobs_running", "Backup and restore jobs running now.", &[(vec![], running)])?;
        let by: Vec<(Labels, f64)> = states.iter().zip(by_state).map(|((_, n), c)| (labels(&[("state", n)]), c)).collect();
        out.gauge("tidemark_backup_jobs", "Backup and restore jobs this daemon knows, by state (kept across restarts).", &by)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

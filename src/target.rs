//! The target: everything one daemon serves (reactors, bdevs, front ends) and the subsystems
//! that make it up. RPC handlers, the config loader and the metrics endpoint all work on it.

use crate::bdev::{BdevRegistry, Channel};
use crate::config::{Config, ConfigCall};
use crate::metrics::MetricsOut;
use crate::reactor::ReactorHandle;
use crate::rpc::{Methods, RpcError};
use std::any::Any;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// A part of the target with its own configuration, shutdown and metrics (SPDK's subsystems:
/// bdev, nvmf, iscsi, ...).
pub trait Subsystem: Send + Sync + 'static {
    /// The subsystem's name in configurations ("bdev", "nvmf", "iscsi").
    fn name(&self) -> &'static str;
    /// The RPC calls that recreate the subsystem's current state, in order.
    fn config(&self, target: &Target) -> Vec<ConfigCall>;
    /// Stops serving hosts (listeners, connections); called at shutdown before bdevs close.
    fn shutdown(&self, _target: &Target) {}
    /// Writes the subsystem's metrics.
    fn metrics(&self, _target: &Target, _out: &mut MetricsOut<'_>) -> std::fmt::Result {
        Ok(())
    }
    fn as_any(&self) -> &dyn Any;
}

pub struct Target {
    pub reactors: ReactorHandle,
    pub bdevs: BdevRegistry,
    pub methods: Methods,
    /// The configuration the daemon started with (settings sections are saved back as they were).
    pub config: Config,
    pub data_dir: PathBuf,
    pub started: Instant,
    subsystems: Vec<Arc<dyn Subsystem>>,
    shutdown: (Mutex<bool>, Condvar),
    shutting_down: AtomicBool,
}

impl Target {
    pub fn new(reactors: ReactorHandle, config: Config) -> Target {
        let cores = reactors.core_count();
        // Shutdown runs this list backwards: jobs stop first, then the front ends, then bdevs.
        let subsystems: Vec<Arc<dyn Subsystem>> = vec![
            Arc::new(crate::keyring::Keyring::default()),
            Arc::new(crate::bdev::BdevSubsystem),
            Arc::new(crate::bdevs::mirror::metrics::MirrorSubsystem),
            Arc::new(crate::preserve::PreserveSubsystem),
            Arc::new(crate::nvmf::NvmfTarget::new(reactors.clone())),
            Arc::new(crate::iscsi::IscsiSubsystem::new(cores)),
            Arc::new(crate::backup::BackupService::default()),
        ];
        // Each subsystem once: twice would write its metric families twice (Prometheus then
        // rejects the whole scrape) and run its shutdown twice.
        let mut names: Vec<&str> = subsystems.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        assert!(names.windows(2).all(|w| w[0] != w[1]), "a subsystem is listed twice: {names:?}");
        Target {
            reactors,
            bdevs: BdevRegistry::new(cores),
            methods: Methods::all(),
            data_dir: config.daemon.data_dir.clone(),
            config,
            started: Instant::now(),
            subsystems,
            shutdown: (Mutex::new(false), Condvar::new()),
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn subsystems(&self) -> &[Arc<dyn Subsystem>] {
        &self.subsystems
    }

    /// The subsystem of type `T`.
    pub fn subsystem<T: Subsystem>(&self) -> Option<&T> {
        self.subsystems.iter().find_map(|s| s.as_any().downcast_ref::<T>())
    }

    /// Resolves a path given in a configuration or RPC: relative paths live in the data dir.
    pub fn data_path(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            self.data_dir.join(p)
        }
    }

    /// Deletes a bdev nothing holds: unregisters it, drops every core's channel, destroys it.
    pub fn delete_bdev(&self, name: &str) -> Result<(), RpcError> {
        let entry = self.bdevs.unregister(name)?;
        let id = entry.id();
        self.reactors.call_all(move || Channel::evict(id))?;
        entry.bdev().destroy();
        Ok(())
    }

    /// Looks a bdev up for an RPC, with SPDK's error for a missing one.
    pub fn bdev(&self, name: &str) -> Result<Arc<crate::bdev::BdevEntry>, RpcError> {
        self.bdevs.lookup(name).map_err(RpcError::from)
    }

    /// Asks the daemon to shut down (SIGTERM, SIGINT or `spdk_kill_instance`).
    pub fn request_shutdown(&self) {
        let mut s = self.shutdown.0.lock().unwrap_or_else(|e| e.into_inner());
        *s = true;
        self.shutdown.1.notify_all();
    }

    /// Blocks until a shutdown is requested.
    pub fn wait_shutdown(&self) {
        let mut s = self.shutdown.0.lock().unwrap_or_else(|e| e.into_inner());
        while !*s {
            s = self.shutdown.1.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops the front ends and closes every bdev, top of each stack first.
    pub fn shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in self.subsystems.iter().rev() {
            s.shutdown(self);
        }
        let mut order = self.bdevs.in_creation_order();
        order.reverse();
        for e in order {
            let name = e.name().to_string();
            drop(e);
            // Flush first so a file-backed volume is durable when we exit.
            let entry = self.bdevs.get(&name);
            if let Some(entry) = entry {
                let r = self.reactors.call_async(0, std::time::Duration::from_secs(10), move || async move {
                    match Channel::get(&entry) {
                        Ok(ch) => ch.flush().await,
                        Err(e) => Err(e),
                    }
                });
                if let Ok(Err(e)) = r {
                    log::warn!("shutdown: flushing {name} failed: {e}");
                }
            }
            if let Err(e) = self.delete_bdev(&name) {
                log::warn!("shutdown: closing bdev {name}: {e}");
            }
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

//! [`Ctx`]: what a module sees of the target.

use super::{declared, method_table, MethodDecl, Module};
use crate::bdev::{BdevCtx, Channel};
use crate::config::Config;
use crate::reactor::ReactorHandle;
use crate::rpc::{RpcError, METHOD_NOT_FOUND};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

thread_local! {
    /// Set while this thread runs a configuration step (see [`Ctx::call_from_config`]).
    static FROM_CONFIG: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The narrow context every module and RPC handler receives: the reactors, the bdev registry,
/// the data directory and settings the daemon started with, the start time, the shutdown
/// request and the other modules (by type, [`Ctx::module`]).
///
/// `ctx.reactors`, `ctx.bdevs`, `ctx.bdev(name)` and `ctx.delete_bdev(name)` are the bdev
/// layer's [`BdevCtx`] (through `Deref`), which is what a bdev itself receives.
pub struct Ctx {
    bdev: BdevCtx,
    /// The configuration the daemon started with (settings sections are saved back as they were).
    pub config: Config,
    pub data_dir: PathBuf,
    pub started: Instant,
    modules: Vec<Arc<dyn Module>>,
    methods: BTreeMap<&'static str, &'static MethodDecl>,
    shutdown: (Mutex<bool>, Condvar),
    shutting_down: AtomicBool,
}

impl std::ops::Deref for Ctx {
    type Target = BdevCtx;

    fn deref(&self) -> &BdevCtx {
        &self.bdev
    }
}

impl Ctx {
    /// Builds every linked, enabled module in order (see [`super::declared`]).
    pub fn new(reactors: ReactorHandle, config: Config) -> Ctx {
        let decls = declared();
        let methods = method_table(&decls);
        let modules: Vec<Arc<dyn Module>> = decls
            .iter()
            .filter_map(|d| {
                let m = (d.construct?)(&reactors, &config);
                assert_eq!(m.name(), d.name, "module declared as {} names itself {}", d.name, m.name());
                Some(m)
            })
            .collect();
        let bdev = BdevCtx::new(reactors);
        for m in &modules {
            let m = Arc::downgrade(m);
            bdev.bdevs.subscribe_resize(move |name| {
                if let Some(m) = m.upgrade() {
                    m.bdev_resized(name)
                }
            });
        }
        Ctx {
            bdev,
            data_dir: config.daemon.data_dir.clone(),
            config,
            started: Instant::now(),
            modules,
            methods,
            shutdown: (Mutex::new(false), Condvar::new()),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// The modules with running state, in startup order.
    pub fn modules(&self) -> &[Arc<dyn Module>] {
        &self.modules
    }

    /// The module of type `T`.
    pub fn module<T: Module>(&self) -> Option<&T> {
        self.modules.iter().find_map(|s| s.as_any().downcast_ref::<T>())
    }

    /// Every RPC method, by name.
    pub fn methods(&self) -> impl Iterator<Item = &'static MethodDecl> + '_ {
        self.methods.values().copied()
    }

    /// Calls RPC `method` with `params`.
    pub fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let m = self.methods.get(method).ok_or_else(|| RpcError::new(METHOD_NOT_FOUND, format!("Method not found: {method}")))?;
        (m.handler)(self, params)
    }

    /// Calls `method` as a step of the configuration being applied at startup. A handler may
    /// treat such a call as "make sure this exists" ([`Ctx::from_config`]): the configuration
    /// is replayed on every start over the data the previous run left in the data directory,
    /// so a step that created something on the first start finds it there on the next.
    pub fn call_from_config(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        struct Reset(bool);
        impl Drop for Reset {
            fn drop(&mut self) {
                FROM_CONFIG.with(|f| f.set(self.0));
            }
        }
        // Per thread rather than per target: an RPC client served on another thread while
        // the configuration applies gets the strict behaviour.
        let _reset = Reset(FROM_CONFIG.with(|f| f.replace(true)));
        self.call(method, params)
    }

    /// Whether the running handler serves a configuration step ([`Ctx::call_from_config`])
    /// rather than an RPC client.
    pub fn from_config(&self) -> bool {
        FROM_CONFIG.with(|f| f.get())
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
        for s in self.modules.iter().rev() {
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

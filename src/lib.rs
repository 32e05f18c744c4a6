//! tidemark: a userspace, polled-mode block storage target (see docs/design.md).
//!
//! Layout: [`reactor`] (threads, executor, message rings), [`bdev`] (the one bdev trait,
//! registry, channels, buffers), [`module`] (the `Module` trait, self-registration and the
//! `Ctx` every module receives), the modules in `bdevs/`, the front ends, [`rpc`] (JSON-RPC
//! protocol and server), [`config`], [`metrics`], [`target`] (the composition root) and
//! [`daemon`] (startup and shutdown).

pub mod backup;
pub mod bdev;
#[path = "../bdevs/mod.rs"]
pub mod bdevs;
pub mod config;
pub mod daemon;
pub mod extent_lock;
#[doc(hidden)]
pub mod fuzz;
pub mod iscsi;
pub mod keyring;
pub mod metrics;
pub mod module;
pub mod nvmf;
pub mod preserve;
pub mod reactor;
pub mod rpc;
pub mod scsi;
pub mod sim;
pub mod state_file;
pub mod target;

/// Every allocation of the target comes from mimalloc (its thread-local free lists keep the
/// control path's allocations lock-free and syscall-free), behind a counter that tests arm on
/// the reactor threads to prove the data paths allocate nothing per I/O.
#[global_allocator]
static ALLOC: reactor::alloc::CountingMiMalloc = reactor::alloc::CountingMiMalloc;

//! The bdev layer: one trait that every block device module implements (DESIGN §2), the data
//! every bdev has ([`BdevProps`]), the pass-through helper of virtual bdevs over one base
//! ([`PassThru`]), the registry of bdevs by name with claims, per-core I/O channels, buffers
//! and statistics.
//!
//! A bdev is shared by all cores (`Bdev: Send + Sync`); its I/O goes through an [`IoChannel`]
//! that each core opens for itself (for `uring`, the core's own ring: SPDK's queue pair). I/O
//! futures borrow the caller's buffers, but a device never sees them: modules completed by a
//! device (io_uring) copy through a pool buffer that the completion slot owns until the
//! device answers (see `completion`). Dropping an in-flight I/O future is therefore safe and
//! returns at once; the I/O itself still runs to its end on the device.

pub mod budget;
mod buffer;
mod channel;
mod completion;
mod ctx;
pub mod passthru;
pub mod preservable;
mod props;
pub mod qos;
mod registry;
mod stats;

pub use budget::{ConnBudget, CoreBudget, Lease, Short};
pub use buffer::set_pool_bytes;
pub use buffer::{buffer_pool_info, current_pool_region, pool_free_buffers, IoBuf, BUF_ALIGN};
pub use channel::{Channel, Running, Started};
pub use completion::{gather, scatter, CompletionFuture, Completions, CopyOut};
pub use ctx::BdevCtx;
pub use passthru::PassThru;
pub use props::{BdevProps, BlockCount};
pub use qos::{QosError, QosLimits};
pub use registry::{BdevEntry, BdevRegistry, HoldGuard, Holder, HolderKind};
pub use stats::{BdevStats, IoStatSnapshot, LatencyHistogram, LATENCY_BUCKETS_US};

use serde_json::Value;
use std::future::Future;
use std::io::{IoSlice, IoSliceMut};
use std::pin::Pin;
use std::task::{Context, Poll};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoType {
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
}

impl IoType {
    pub const ALL: [IoType; 5] = [IoType::Read, IoType::Write, IoType::Flush, IoType::Unmap, IoType::WriteZeroes];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Flush => "flush",
            IoType::Unmap => "unmap",
            IoType::WriteZeroes => "write_zeroes",
        }
    }

    /// Whether the operation changes the content of the device.
    pub fn modifies(self) -> bool {
        matches!(self, IoType::Write | IoType::Unmap | IoType::WriteZeroes)
    }
}

/// Why an I/O failed. Front ends map these to NVMe status codes and SCSI sense data; nothing
/// below the front ends knows about either.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BdevError {
    #[error("media error")]
    Media,
    #[error("I/O error (errno {0})")]
    Os(i32),
    #[error("blocks {offset}+{count} are beyond the end of the device ({size} blocks)")]
    OutOfRange { offset: u64, count: u64, size: u64 },
    #[error("buffer of {len} bytes is not a whole number of {block_size}-byte blocks")]
    BadLength { len: usize, block_size: u32 },
    #[error("the device is read-only")]
    ReadOnly,
    #[error("{0:?} is not supported by this device")]
    Unsupported(IoType),
    #[error("no resources for the I/O, retry later")]
    NoResources,
    #[error("the I/O was aborted")]
    Aborted,
    #[error("the device is offline")]
    Offline,
    /// A thin device has no free space for a write that needs new space; other I/O goes on.
    #[error("no free space for a write that needs new space")]
    NoSpace,
    #[error("NVMe status type {sct:#x} code {sc:#x}")]
    Nvme { sct: u8, sc: u8 },
}

pub type IoResult = Result<(), BdevError>;

/// The future of one I/O. Synchronous devices complete in place without allocating; devices
/// completed by a poller use a per-core completion slot; the rest box their future.
pub enum IoFuture<'a> {
    /// Completed in place; the flag says it already gave up its turn once (see `poll`).
    Ready(Option<IoResult>, bool),
    Slot(CompletionFuture),
    /// A read through a slot-owned buffer: its data is copied to the caller's buffers when the
    /// completion is polled.
    SlotInto(CompletionFuture, CopyOut<'a>),
    Boxed(Pin<Box<dyn Future<Output = IoResult> + 'a>>),
}

impl<'a> IoFuture<'a> {
    pub fn ready(r: IoResult) -> Self {
        IoFuture::Ready(Some(r), false)
    }

    pub fn boxed(f: impl Future<Output = IoResult> + 'a) -> Self {
        IoFuture::Boxed(Box::pin(f))
    }

    /// The result of an I/O the device completed in place, or the future back. A layer that
    /// takes the result here completes its own I/O in place too, instead of boxing a future
    /// that awaits this one (the caller's own `Ready` still yields by the task's budget).
    pub fn into_ready(self) -> Result<IoResult, Self> {
        match self {
            IoFuture::Ready(Some(r), _) => Ok(r),
            other => Err(other),
        }
    }
}

impl Future for IoFuture<'_> {
    type Output = IoResult;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoResult> {
        match self.get_mut() {
            IoFuture::Ready(r, yielded) => {
                // A task whose I/Os all complete in place (RAM bdevs) would otherwise never
                // return to the reactor: messages, timers and other tasks of the core would
                // starve for as long as it loops. Past its budget it yields once.
                if !*yielded && !crate::reactor::consume_budget() {
                    *yielded = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(r.take().expect("IoFuture polled after completion"))
            }
            IoFuture::Slot(s) => Pin::new(s).poll(cx),
            IoFuture::SlotInto(s, out) => s.poll_owned(cx).map(|(r, buf)| {
                if let (Ok(()), Some(b)) = (&r, buf) {
                    out.copy_from(&b);
                }
                r
            }),
            IoFuture::Boxed(f) => f.as_mut().poll(cx),
        }
    }
}

/// One request to a channel. Offsets and counts are in blocks of the bdev; for reads and
/// writes the count equals the buffers' total length divided by the block size (checked by
/// [`Channel`] before the request reaches the module).
pub enum Io<'a, 'b> {
    Read { offset_blocks: u64, num_blocks: u64, bufs: &'a mut [IoSliceMut<'b>] },
    Write { offset_blocks: u64, num_blocks: u64, bufs: &'a [IoSlice<'b>] },
    Flush,
    Unmap { offset_blocks: u64, num_blocks: u64 },
    WriteZeroes { offset_blocks: u64, num_blocks: u64 },
}

impl Io<'_, '_> {
    pub fn io_type(&self) -> IoType {
        match self {
            Io::Read { .. } => IoType::Read,
            Io::Write { .. } => IoType::Write,
            Io::Flush => IoType::Flush,
            Io::Unmap { .. } => IoType::Unmap,
            Io::WriteZeroes { .. } => IoType::WriteZeroes,
        }
    }

    /// (offset, count) in blocks; (0, 0) for flush.
    pub fn range(&self) -> (u64, u64) {
        match self {
            Io::Read { offset_blocks, num_blocks, .. }
            | Io::Write { offset_blocks, num_blocks, .. }
            | Io::Unmap { offset_blocks, num_blocks }
            | Io::WriteZeroes { offset_blocks, num_blocks } => (*offset_blocks, *num_blocks),
            Io::Flush => (0, 0),
        }
    }
}

/// A core's handle on a bdev's I/O path. Never shared between cores.
pub trait IoChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a>;
}

/// What every bdev module implements: its behaviour. Its data (name, sizes, UUID) is one
/// [`BdevProps`] that the module returns from `props`; the getters below read it and are not
/// meant to be overridden. Claims and statistics are kept by the registry ([`BdevEntry`]).
pub trait Bdev: Send + Sync + 'static {
    fn props(&self) -> &BdevProps;
    fn name(&self) -> &str {
        self.props().name()
    }
    /// Module name as in SPDK's `product_name` ("Malloc disk", "URING bdev", ...).
    fn product_name(&self) -> &str {
        self.props().product_name()
    }
    fn block_size(&self) -> u32 {
        self.props().block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.props().num_blocks()
    }
    fn uuid(&self) -> Uuid {
        self.props().uuid()
    }
    fn supports(&self, io: IoType) -> bool;
    /// Writes (and unmaps) are refused with [`BdevError::ReadOnly`].
    fn read_only(&self) -> bool {
        false
    }
    /// Opens this core's channel. Called on the core that will use it, once per core.
    fn open_channel(&self) -> Result<std::rc::Rc<dyn IoChannel>, BdevError>;
    /// Module-specific information for `bdev_get_bdevs` (`driver_specific`).
    fn driver_specific(&self) -> Value {
        Value::Null
    }
    /// The RPC call that recreates this bdev (`save_config`); `None` if it is not persistent
    /// configuration (a snapshot that its volume recreates, say).
    fn config_call(&self) -> Option<(&'static str, Value)>;
    /// Bdevs that `config_call` needs and this bdev does not claim (a split image still
    /// draining names its leg, which its mirror holds until the seal): `save_config` writes
    /// them first, as it writes the bdevs a bdev claims first.
    fn config_needs(&self) -> Vec<String> {
        Vec::new()
    }
    /// Called once, after the bdev is unregistered and every core dropped its channel.
    fn destroy(&self) {}
    fn as_any(&self) -> &dyn std::any::Any;
    /// The bdev's preserve interface (`bdev_snapshot_*`), if it can be preserved: the generic
    /// layer asks the bdev instead of knowing which modules' bdevs can.
    fn as_preservable(&self) -> Option<&dyn preservable::Preservable> {
        None
    }
    /// Passes an NVMe I/O command through to the namespace this bdev is (SPDK's
    /// `spdk_bdev_nvme_io_passthru`); `None` when the bdev is no NVMe namespace. The mirror
    /// sends Reservation Register/Acquire/Report this way to fence a stale head on its remote
    /// legs without knowing the initiator module. Must be awaited on a reactor core.
    fn nvme_io_passthru(&self, _cmd: NvmePassthru) -> Option<PassthruFuture> {
        None
    }
}

/// An NVMe I/O command for [`Bdev::nvme_io_passthru`]: the bdev fills in its NSID (and the
/// command identifier); the caller gives the opcode, CDW10/11 and the data. Plain fields, so
/// that the bdev layer needs nothing of the NVMe modules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NvmePassthru {
    pub opcode: u8,
    pub cdw10: u32,
    pub cdw11: u32,
    /// Host-to-controller data (empty: none).
    pub data_out: Vec<u8>,
    /// Bytes of controller-to-host data expected (0: none). Not both directions at once.
    pub data_in: usize,
}

/// The result of a passed-through command: the data it read (empty for a command that reads
/// nothing), or its failure (`BdevError::Nvme` carries a command's NVMe status).
pub type PassthruFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, BdevError>>>>;

/// Errors of a method that registers a bdev under a name it is given (the registry's
/// [`CreateError::Exists`]); here, not with the bdev modules, because the preserve layer's
/// methods name new bdevs too.
pub const NEW_NAME_ERRORS: &[(i32, &str)] = &[(crate::rpc::EEXIST, "a bdev of that name exists")];

/// A module's reason for refusing to create a bdev, mapped to a JSON-RPC error at the edge.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("bdev {0} already exists")]
    Exists(String),
    #[error("bdev {0} does not exist")]
    NotFound(String),
    #[error("bdev {name} is in use by {by}")]
    Busy { name: String, by: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
}

/// SPDK's codes for a refused creation (the RPC layer is below this one).
impl From<CreateError> for crate::rpc::RpcError {
    fn from(e: CreateError) -> Self {
        let code = match &e {
            CreateError::Exists(_) => crate::rpc::EEXIST,
            CreateError::NotFound(_) => crate::rpc::ENODEV,
            CreateError::Busy { .. } => crate::rpc::EBUSY,
            CreateError::Invalid(_) => crate::rpc::INVALID_PARAMS,
            CreateError::Io(_) => crate::rpc::EIO,
        };
        let message = match &e {
            CreateError::Invalid(m) => format!("Invalid parameters: {m}"),
            other => other.to_string(),
        };
        crate::rpc::RpcError::new(code, message)
    }
}

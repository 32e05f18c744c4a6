//! The CSI node service: attaches a volume to this host with the kernel NVMe/TCP initiator
//! (nvme-cli), makes a file system on it when it is blank, mounts it at the staging path and
//! bind-mounts it into pods; grows the file system after the controller grew the volume;
//! reports usage and condition.
//!
//! The plugin keeps no state: what is connected comes from sysfs, what is mounted from
//! /proc/self/mountinfo, and a volume's NVMe subsystem from its id (names.rs), so every call
//! can be repeated, also by a plugin restarted after a crash half way through one.
//!
//! - `run.rs`: the runner of external tools (time-bounded, stderr into the error);
//! - `nvme.rs`: sysfs look-ups, nvme connect / disconnect / ns-rescan;
//! - `mount.rs`: mountinfo, superblock probing, mkfs, mount, umount, statvfs, growing.

mod mount;
mod nvme;
mod run;

use crate::names::{Id, VOLUME_PREFIX};
use bpfman_csi::v1::node_server::Node;
use bpfman_csi::v1::node_service_capability::rpc::Type as Cap;
use bpfman_csi::v1::volume_capability::AccessType;
use bpfman_csi::v1::*;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Request, Response, Status};

/// How long a connected subsystem may take to show its namespace's block device.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a rescanned namespace may take to show the size the controller grew it to.
const RESIZE_TIMEOUT: Duration = Duration::from_secs(30);
/// The name of the symlink to the device that a staged raw block volume leaves in its
/// staging directory (informational: publishing finds the device from the volume id).
const BLOCK_LINK: &str = "device";

pub struct NodeService {
    inner: Arc<Inner>,
}

struct Inner {
    host_nqn: String,
    topology: BTreeMap<String, String>,
    max_volumes: i64,
    sys: nvme::Sys,
    /// Volumes with a call in progress: a second call for the same volume is ABORTED (the
    /// spec's answer), not raced against the first.
    busy: Mutex<HashSet<String>>,
}

struct Busy<'a>(&'a Mutex<HashSet<String>>, String);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}

impl NodeService {
    pub fn new(host_nqn: String, topology: BTreeMap<String, String>, max_volumes: i64) -> NodeService {
        NodeService { inner: Arc::new(Inner { host_nqn, topology, max_volumes, sys: nvme::Sys::new("/"), busy: Mutex::new(HashSet::new()) }) }
    }

    /// Runs `f` on the blocking pool: node work waits on tools, devices and the kernel.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<T, Status> + Send + 'static) -> Result<Response<T>, Status> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|e| Status::internal(format!("node task failed: {e}")))?.map(Response::new)
    }
}

/// How a volume is used on the node.
#[derive(Debug, Clone, PartialEq)]
enum Access {
    Mount { fstype: String, flags: Vec<String> },
    Block,
}

fn need(value: &str, name: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{name}: missing")));
    }
    Ok(())
}

fn access(c: Option<&VolumeCapability>) -> Result<Access, Status> {
    let c = c.ok_or_else(|| Status::invalid_argument("volume_capability: missing"))?;
    match &c.access_type {
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => {
            let fstype = if m.fs_type.is_empty() { "ext4".to_string() } else { m.fs_type.clone() };
            if !["ext4", "xfs"].contains(&fstype.as_str()) {
                return Err(Status::invalid_argument(format!("file system {fstype:?} is not supported (ext4, xfs)")));
            }
            Ok(Access::Mount { fstype, flags: m.mount_flags.clone() })
        }
        None => Err(Status::invalid_argument("volume_capability: access_type missing")),
    }
}

/// The volume's id, parsed: its NVMe subsystem is `id.nqn()`.
fn volume(volume_id: &str) -> Result<Id, Status> {
    Id::parse(volume_id, VOLUME_PREFIX).ok_or_else(|| Status::not_found(format!("volume {volume_id:?} is not a volume of this driver")))
}

fn absolute(p: &str, name: &str) -> Result<PathBuf, Status> {
    need(p, name)?;
    let p = PathBuf::from(p);
    if !p.is_absolute() {
        return Err(Status::invalid_argument(format!("{name}: {} is not an absolute path", p.display())));
    }
    Ok(p)
}

fn io(what: &str, p: &Path) -> impl FnOnce(std::io::Error) -> Status {
    let (what, p) = (what.to_string(), p.display().to_string());
    move |e| Status::internal(format!("{what} {p}: {e}"))
}

impl Inner {
    fn claim(&self, key: &str) -> Result<Busy<'_>, Status> {
        if !self.busy.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_string()) {
            return Err(Status::aborted(format!("an operation on volume {key} is already in progress")));
        }
        Ok(Busy(&self.busy, key.to_string()))
    }

    /// The namespace block device of the volume's subsystem, when connected.
    fn device_of(&self, id: &Id) -> Option<String> {
        self.sys.namespaces(&id.nqn()).into_iter().find(|n| self.sys.dev_node(n).is_some())
    }

    fn stage(&self, r: NodeStageVolumeRequest) -> Result<NodeStageVolumeResponse, Status> {
        need(&r.volume_id, "volume_id")?;
        let staging = absolute(&r.staging_target_path, "staging_target_path")?;
        let access = access(r.volume_capability.as_ref())?;
        let target = nvme::Target::from_context(&r.publish_context)?;
        let id = volume(&r.volume_id)?;
        if target.subnqn != id.nqn() {
            return Err(Status::invalid_argument(format!("publish_context: subnqn {} is not the subsystem of volume {}", target.subnqn, r.volume_id)));
        }
        let _busy = self.claim(&r.volume_id)?;
        std::fs::create_dir_all(&staging).map_err(io("creating", &staging))?;

        nvme::connect(&self.sys, &target, &self.host_nqn)?;
        let name = self.sys.wait_namespace(&target.subnqn, DEVICE_TIMEOUT)?;
        let dev = PathBuf::from("/dev").join(&name);
        let numbers = self.sys.dev_numbers(&name).ok_or_else(|| Status::internal(format!("no device numbers for {name} in sysfs")))?;

        let (fstype, flags) = match access {
            Access::Block => {
                // Nothing to mount: a symlink says which device the volume is on.
                let link = staging.join(BLOCK_LINK);
                if std::fs::read_link(&link).ok().as_deref() != Some(dev.as_path()) {
                    let _ = std::fs::remove_file(&link);
                    std::os::unix::fs::symlink(&dev, &link).map_err(io("linking", &link))?;
                }
                return Ok(NodeStageVolumeResponse {});
            }
            Access::Mount { fstype, flags } => (fstype, flags),
        };
        let mounts = mount::mounts()?;
        if let Some(m) = mount::mounted_at(&mounts, &staging) {
            if m.dev == numbers {
                return Ok(NodeStageVolumeResponse {});
            }
            return Err(Status::already_exists(format!("{} has {} mounted, not volume {} ({})", staging.display(), m.source, r.volume_id, dev.display())));
        }
        match mount::probe(&dev)? {
            None => {
                log::info!("volume {}: making an {fstype} file system on {}", r.volume_id, dev.display());
                mount::mkfs(&dev, &fstype)?;
            }
            Some(found) if found == fstype => {}
            Some(found) if found == "ext4" || found == "xfs" => {
                return Err(Status::failed_precondition(format!("volume {} holds an {found} file system, not the {fstype} asked for", r.volume_id)));
            }
            Some(found) => return Err(Status::failed_precondition(format!("volume {} holds {found}, not a file system: refusing to format it", r.volume_id))),
        }
        mount::mount_fs(&dev, &staging, &fstype, &flags)?;
        log::info!("volume {} staged: {} on {} ({fstype})", r.volume_id, dev.display(), staging.display());
        Ok(NodeStageVolumeResponse {})
    }

    fn unstage(&self, r: NodeUnstageVolumeRequest) -> Result<NodeUnstageVolumeResponse, Status> {
        need(&r.volume_id, "volume_id")?;
        let staging = absolute(&r.staging_target_path, "staging_target_path")?;
        let _busy = self.claim(&r.volume_id)?;
        mount::umount_all(&staging)?;
        let link = staging.join(BLOCK_LINK);
        if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&link).map_err(io("removing", &link))?;
        }
        // An id of no volume of this driver was never connected by it.
        let Ok(id) = volume(&r.volume_id) else { return Ok(NodeUnstageVolumeResponse {}) };
        let nqn = id.nqn();
        // Never pull a device from under a mount: the CO unpublishes first.
        let mounts = mount::mounts()?;
        for name in self.sys.namespaces(&nqn) {
            if let Some(numbers) = self.sys.dev_numbers(&name) {
                if let Some(m) = mount::users(&mounts, numbers, &name).first() {
                    return Err(Status::failed_precondition(format!(
                        "volume {} (/dev/{name}) is still mounted at {}: unpublish it first",
                        r.volume_id,
                        m.mount_point.display()
                    )));
                }
            }
        }
        nvme::disconnect(&self.sys, &nqn)?;
        log::info!("volume {} unstaged from {}", r.volume_id, staging.display());
        Ok(NodeUnstageVolumeResponse {})
    }

    fn publish(&self, r: NodePublishVolumeRequest) -> Result<NodePublishVolumeResponse, Status> {
        need(&r.volume_id, "volume_id")?;
        let staging = absolute(&r.staging_target_path, "staging_target_path")?;
        let target = absolute(&r.target_path, "target_path")?;
        let access = access(r.volume_capability.as_ref())?;
        let id = volume(&r.volume_id)?;
        let _busy = self.claim(&r.volume_id)?;
        let mounts = mount::mounts()?;
        let (source, numbers, block_name) = match access {
            Access::Mount { .. } => {
                let m = mount::mounted_at(&mounts, &staging)
                    .ok_or_else(|| Status::failed_precondition(format!("volume {} is not staged at {}", r.volume_id, staging.display())))?;
                std::fs::create_dir_all(&target).map_err(io("creating", &target))?;
                (staging.clone(), m.dev, None)
            }
            Access::Block => {
                let name = self
                    .device_of(&id)
                    .ok_or_else(|| Status::failed_precondition(format!("volume {} is not staged: no device of {}", r.volume_id, id.nqn())))?;
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
                }
                if !target.exists() {
                    std::fs::File::create(&target).map_err(io("creating", &target))?;
                }
                let numbers = self.sys.dev_numbers(&name).unwrap_or((0, 0));
                (PathBuf::from("/dev").join(&name), numbers, Some(name))
            }
        };
        if let Some(m) = mount::mounted_at(&mounts, &target) {
            let same = match &block_name {
                None => m.dev == numbers,
                Some(n) => m.root == format!("/{n}"),
            };
            if !same {
                return Err(Status::already_exists(format!("{} has {} mounted, not volume {}", target.display(), m.source, r.volume_id)));
            }
            if m.read_only() != r.readonly {
                return Err(Status::already_exists(format!(
                    "{} is published {} already",
                    target.display(),
                    if m.read_only() { "read-only" } else { "read-write" }
                )));
            }
            return Ok(NodePublishVolumeResponse {});
        }
        mount::bind(&source, &target, r.readonly)?;
        Ok(NodePublishVolumeResponse {})
    }

    fn unpublish(&self, r: NodeUnpublishVolumeRequest) -> Result<NodeUnpublishVolumeResponse, Status> {
        need(&r.volume_id, "volume_id")?;
        let target = absolute(&r.target_path, "target_path")?;
        let _busy = self.claim(&r.volume_id)?;
        mount::umount_all(&target)?;
        match std::fs::symlink_metadata(&target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Status::internal(format!("{}: {e}", target.display()))),
            // An empty directory (mount) or the file a block volume was bound on; a directory
            // with files in it is not ours to delete.
            Ok(m) if m.is_dir() => std::fs::remove_dir(&target).map_err(io("removing", &target))?,
            Ok(_) => std::fs::remove_file(&target).map_err(io("removing", &target))?,
        }
        Ok(NodeUnpublishVolumeResponse {})
    }

    /// The block device behind `path` (a mount of the volume, or a published block volume),
    /// its mount if any.
    fn device_at(&self, path: &Path) -> Result<(String, Option<mount::Mount>), Status> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Status::not_found(format!("{} does not exist", path.display())),
            _ => Status::internal(format!("{}: {e}", path.display())),
        })?;
        if meta.file_type().is_block_device() {
            let rdev = meta.rdev();
            let numbers = (((rdev >> 32) & 0xffff_f000 | (rdev >> 8) & 0xfff) as u32, ((rdev >> 12) & 0xffff_ff00 | rdev & 0xff) as u32);
            let name = self.sys.block_name(numbers).ok_or_else(|| Status::not_found(format!("the device of {} is gone", path.display())))?;
            return Ok((name, None));
        }
        let mounts = mount::mounts()?;
        let m = mount::mounted_at(&mounts, path).ok_or_else(|| Status::not_found(format!("no volume is mounted at {}", path.display())))?.clone();
        let name = self.sys.block_name(m.dev).unwrap_or_default();
        Ok((name, Some(m)))
    }

    /// Abnormal when the device or every live path to it is gone.
    fn condition(&self, name: &str) -> VolumeCondition {
        let abnormal = |message: String| VolumeCondition { abnormal: true, message };
        if name.is_empty() || self.sys.size(name).is_none() {
            return abnormal("the volume's block device is gone".into());
        }
        let Some(nqn) = self.sys.nqn_of(name) else { return VolumeCondition { abnormal: false, message: "ok".into() } };
        let ctrls = self.sys.controllers_of(&nqn);
        if !ctrls.iter().any(|c| c.state == "live") {
            let states: Vec<String> = ctrls.iter().map(|c| format!("{} {}", c.name, c.state)).collect();
            return abnormal(format!("no live NVMe/TCP controller of {nqn} ({})", if states.is_empty() { "none".into() } else { states.join(", ") }));
        }
        VolumeCondition { abnormal: false, message: "ok".into() }
    }

    fn stats(&self, r: NodeGetVolumeStatsRequest) -> Result<NodeGetVolumeStatsResponse, Status> {
        need(&r.volume_id, "volume_id")?;
        let path = absolute(&r.volume_path, "volume_path")?;
        let (name, m) = self.device_at(&path)?;
        let condition = Some(self.condition(&name));
        use volume_usage::Unit;
        let usage = match m {
            None => vec![VolumeUsage { total: self.sys.size(&name).unwrap_or(0) as i64, unit: Unit::Bytes as i32, ..Default::default() }],
            Some(_) => {
                let s = mount::statvfs(&path)?;
                vec![
                    VolumeUsage { available: s.available as i64, total: s.total as i64, used: s.used as i64, unit: Unit::Bytes as i32 },
                    VolumeUsage { available: s.inodes_free as i64, total: s.inodes as i64, used: s.inodes_used as i64, unit: Unit::Inodes as i32 },
                ]
            }
        };
        Ok(NodeGetVolumeStatsResponse { usage, volume_condition: condition })
    }

    fn expand(&self, r: NodeExpandVolumeRequest) -> Result<NodeExpandVolumeResponse, Status> {
        need(&r.volume_id, "volume_id")?;
        let path = absolute(&r.volume_path, "volume_path")?;
        let required = r.capacity_range.as_ref().map_or(0, |c| c.required_bytes.max(0) as u64);
        let _busy = self.claim(&r.volume_id)?;
        let (name, m) = self.device_at(&path)?;
        if name.is_empty() {
            return Err(Status::not_found(format!("the device mounted at {} is gone", path.display())));
        }
        // The controller grew the namespace; the target's event may not have arrived yet.
        if let Some(nqn) = self.sys.nqn_of(&name) {
            if self.sys.size(&name).unwrap_or(0) < required {
                nvme::rescan(&self.sys, &nqn);
            }
        }
        let deadline = std::time::Instant::now() + RESIZE_TIMEOUT;
        let size = loop {
            let size = self.sys.size(&name).unwrap_or(0);
            if size >= required {
                break size;
            }
            if std::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!("/dev/{name} is {size} bytes, not the {required} the volume was grown to (after a rescan)")));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let block = matches!(r.volume_capability.as_ref().and_then(|c| c.access_type.as_ref()), Some(AccessType::Block(_)));
        if let (Some(m), false) = (m, block) {
            mount::grow(&Path::new("/dev").join(&name), &m.mount_point, &m.fstype)?;
            log::info!("volume {}: {} file system on /dev/{name} grown to fill {size} bytes", r.volume_id, m.fstype);
        }
        Ok(NodeExpandVolumeResponse { capacity_bytes: size as i64 })
    }
}

fn capability(t: Cap) -> NodeServiceCapability {
    NodeServiceCapability { r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc { r#type: t as i32 })) }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(&self, request: Request<NodeStageVolumeRequest>) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        self.blocking(move |n| n.stage(r)).await
    }

    async fn node_unstage_volume(&self, request: Request<NodeUnstageVolumeRequest>) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        self.blocking(move |n| n.unstage(r)).await
    }

    async fn node_publish_volume(&self, request: Request<NodePublishVolumeRequest>) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        self.blocking(move |n| n.publish(r)).await
    }

    async fn node_unpublish_volume(&self, request: Request<NodeUnpublishVolumeRequest>) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        self.blocking(move |n| n.unpublish(r)).await
    }

    async fn node_get_volume_stats(&self, request: Request<NodeGetVolumeStatsRequest>) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        self.blocking(move |n| n.stats(r)).await
    }

    async fn node_expand_volume(&self, request: Request<NodeExpandVolumeRequest>) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        self.blocking(move |n| n.expand(r)).await
    }

    async fn node_get_capabilities(&self, _: Request<NodeGetCapabilitiesRequest>) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [Cap::StageUnstageVolume, Cap::GetVolumeStats, Cap::ExpandVolume, Cap::VolumeCondition, Cap::SingleNodeMultiWriter]
            .into_iter()
            .map(capability)
            .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        let n = &self.inner;
        let accessible_topology = (!n.topology.is_empty()).then(|| Topology { segments: n.topology.iter().map(|(k, v)| (k.clone(), v.clone())).collect() });
        Ok(Response::new(NodeGetInfoResponse { node_id: n.host_nqn.clone(), max_volumes_per_node: n.max_volumes, accessible_topology }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bpfman_csi::v1::volume_capability::{AccessMode, BlockVolume, MountVolume};
    use std::collections::HashMap;

    fn service(root: &Path) -> Inner {
        Inner { host_nqn: "nqn.h".into(), topology: BTreeMap::new(), max_volumes: 0, sys: nvme::Sys::new(root), busy: Mutex::new(HashSet::new()) }
    }

    fn mount_cap(fs: &str) -> Option<VolumeCapability> {
        Some(VolumeCapability {
            access_mode: Some(AccessMode { mode: 1 }),
            access_type: Some(AccessType::Mount(MountVolume { fs_type: fs.into(), mount_flags: vec!["noatime".into()], ..Default::default() })),
        })
    }

    const VOL: &str = "n1/pool/v-0123456789abcdef01234567";

    fn ctx() -> HashMap<String, String> {
        HashMap::from([
            ("trtype".into(), "tcp".into()),
            ("traddr".into(), "10.0.2.2".into()),
            ("trsvcid".into(), "4420".into()),
            ("subnqn".into(), "nqn.2016-06.io.tidemark:csi-v-0123456789abcdef01234567".into()),
        ])
    }

    #[test]
    fn capabilities_and_file_systems() {
        assert_eq!(access(mount_cap("").as_ref()).unwrap(), Access::Mount { fstype: "ext4".into(), flags: vec!["noatime".into()] });
        assert_eq!(access(mount_cap("xfs").as_ref()).unwrap(), Access::Mount { fstype: "xfs".into(), flags: vec!["noatime".into()] });
        assert_eq!(access(mount_cap("btrfs").as_ref()).unwrap_err().code(), tonic::Code::InvalidArgument);
        let block = VolumeCapability { access_mode: None, access_type: Some(AccessType::Block(BlockVolume {})) };
        assert_eq!(access(Some(&block)).unwrap(), Access::Block);
        assert_eq!(access(None).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(access(Some(&VolumeCapability::default())).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn arguments_are_checked_before_anything_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let n = service(dir.path());
        let stage = |f: &dyn Fn(&mut NodeStageVolumeRequest)| {
            let mut r = NodeStageVolumeRequest {
                volume_id: VOL.into(),
                staging_target_path: dir.path().join("staging").to_string_lossy().into(),
                volume_capability: mount_cap(""),
                publish_context: ctx(),
                ..Default::default()
            };
            f(&mut r);
            n.stage(r).unwrap_err().code()
        };
        use tonic::Code::*;
        assert_eq!(stage(&|r| r.volume_id.clear()), InvalidArgument);
        assert_eq!(stage(&|r| r.staging_target_path.clear()), InvalidArgument);
        assert_eq!(stage(&|r| r.staging_target_path = "relative/path".into()), InvalidArgument);
        assert_eq!(stage(&|r| r.volume_capability = None), InvalidArgument);
        assert_eq!(stage(&|r| r.publish_context.clear()), InvalidArgument);
        assert_eq!(stage(&|r| r.volume_id = "n1/pool/v-other".into()), InvalidArgument, "subnqn of another volume");
        assert_eq!(stage(&|r| r.volume_id = "not-ours".into()), NotFound);
        assert!(!dir.path().join("staging").exists(), "nothing was created for a refused call");

        let p = |v: &str, s: &str, t: &str, cap| NodePublishVolumeRequest {
            volume_id: v.into(),
            staging_target_path: s.into(),
            target_path: t.into(),
            volume_capability: cap,
            ..Default::default()
        };
        assert_eq!(n.publish(p("", "/s", "/t", mount_cap(""))).unwrap_err().code(), InvalidArgument);
        assert_eq!(n.publish(p(VOL, "", "/t", mount_cap(""))).unwrap_err().code(), InvalidArgument);
        assert_eq!(n.publish(p(VOL, "/s", "", mount_cap(""))).unwrap_err().code(), InvalidArgument);
        assert_eq!(n.publish(p(VOL, "/s", "/t", None)).unwrap_err().code(), InvalidArgument);
        let unstaged = dir.path().join("nothing-staged-here");
        assert_eq!(n.publish(p(VOL, &unstaged.to_string_lossy(), "/t", mount_cap(""))).unwrap_err().code(), FailedPrecondition);

        assert_eq!(n.unstage(NodeUnstageVolumeRequest { volume_id: VOL.into(), ..Default::default() }).unwrap_err().code(), InvalidArgument);
        assert_eq!(n.unpublish(NodeUnpublishVolumeRequest { target_path: "/t".into(), ..Default::default() }).unwrap_err().code(), InvalidArgument);
        let stats = |p: &str| n.stats(NodeGetVolumeStatsRequest { volume_id: VOL.into(), volume_path: p.into(), ..Default::default() }).unwrap_err().code();
        assert_eq!(stats(""), InvalidArgument);
        assert_eq!(stats(&dir.path().join("gone").to_string_lossy()), NotFound);
        assert_eq!(stats(&dir.path().to_string_lossy()), NotFound, "a directory with nothing mounted");
        let expand =
            n.expand(NodeExpandVolumeRequest { volume_id: VOL.into(), volume_path: dir.path().join("gone").to_string_lossy().into(), ..Default::default() });
        assert_eq!(expand.unwrap_err().code(), NotFound);
    }

    #[test]
    fn unpublish_and_unstage_of_nothing_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let n = service(dir.path());
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let r = NodeUnpublishVolumeRequest { volume_id: VOL.into(), target_path: target.to_string_lossy().into() };
        n.unpublish(r.clone()).unwrap();
        assert!(!target.exists(), "the target directory is removed");
        n.unpublish(r).unwrap();
        // A block volume's staging link goes; no controller of the subsystem: nothing to disconnect.
        let staging = dir.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        std::os::unix::fs::symlink("/dev/nvme9n1", staging.join(BLOCK_LINK)).unwrap();
        let r = NodeUnstageVolumeRequest { volume_id: VOL.into(), staging_target_path: staging.to_string_lossy().into() };
        n.unstage(r.clone()).unwrap();
        assert!(std::fs::symlink_metadata(staging.join(BLOCK_LINK)).is_err());
        n.unstage(r).unwrap();
    }

    #[test]
    fn concurrent_calls_on_a_volume_abort() {
        let n = service(Path::new("/nonexistent"));
        let _held = n.claim(VOL).unwrap();
        assert_eq!(n.claim(VOL).err().unwrap().code(), tonic::Code::Aborted);
        assert!(n.claim("other").is_ok());
    }
}

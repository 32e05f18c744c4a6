//! SPDK's lvol RPCs (`scripts/rpc.py bdev_lvol_*`, same names and parameters), plus
//! `bdev_lvol_load_lvstore {bdev_name}` (tidemark: opens the store found on a bdev; what
//! `save_config` writes), and the module's metrics. As steps of the configuration applied at
//! startup, `bdev_lvol_create_lvstore` and `bdev_lvol_create` open what an earlier start made
//! (see the module comment, **Restart**).

use super::layout::MAX_NAME;
use super::{LvolBdev, LvolError, Store, CLEAR_METHODS};
use crate::bdev::{BdevCtx, Channel};
use crate::config::ConfigCall;
use crate::metrics::MetricsOut;
use crate::module::{Ctx, ErrorDoc, Module};
use crate::rpc::{parse, RpcError, EBUSY, EEXIST, EIO, ENODEV, ENOSPC, INVALID_PARAMS};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

crate::register_module! {
    name: "lvol",
    order: 12,
    construct: |_reactors, _config| Arc::new(LvolModule::default()),
    methods: [
        ("bdev_lvol_create_lvstore", create_lvstore, CreateLvstore, "Creates an lvol store (a pool of volumes) on a bdev.", [&[
            (EEXIST, "an lvol store of that name exists, or the bdev holds one"),
            (ENODEV, "the bdev does not exist"),
            (EBUSY, "something holds the bdev already"),
            (EIO, "the base bdev fails an I/O"),
        ]]),
        ("bdev_lvol_load_lvstore", load_lvstore, LoadLvstore, "Opens the lvol store found on a bdev (tidemark; save_config writes it).", [&[
            (ENODEV, "the bdev does not exist or holds no lvol store"),
            (EBUSY, "something else holds the bdev"),
            (EEXIST, "a store of that name or uuid is open from another bdev, or a bdev has a volume's name"),
            (EIO, "the base bdev fails an I/O"),
        ]]),
        ("bdev_lvol_delete_lvstore", delete_lvstore, StoreRef, "Deletes an lvol store and its volumes.", [STORE, &[(EBUSY, "something holds one of its volumes")]]),
        ("bdev_lvol_get_lvstores", get_lvstores, StoreRef, "Lists lvol stores (tidemark adds `metadata_memory_bytes`: what the store's metadata takes in memory).", [&[(ENODEV, "no lvol store has that uuid or name")]]),
        ("bdev_lvol_rename_lvstore", rename_lvstore, RenameLvstore, "Renames an lvol store.", [STORE, &[(EEXIST, "a store named new_name exists")]]),
        ("bdev_lvol_create", create, Create, "Creates a volume in an lvol store.", [STORE, &[(EEXIST, "a volume of that name is in the store"), (ENOSPC, "the pool, or its metadata, has no room for the volume")]]),
        ("bdev_lvol_get_lvols", get_lvols, GetLvols, "Lists volumes of lvol stores.", [&[(ENODEV, "no lvol store has that uuid or name")]]),
        ("bdev_lvol_delete", delete, ByName, "Deletes a volume.", [LVOL, &[(EBUSY, "something holds the volume, or it is a snapshot with clones")]]),
        ("bdev_lvol_rename", rename, Rename, "Renames a volume.", [LVOL, &[(EEXIST, "a volume named new_name is in the store")]]),
        ("bdev_lvol_resize", resize, Resize, "Resizes a volume.", [LVOL, &[(ENOSPC, "growing needs more free clusters than the store has")]]),
        ("bdev_lvol_set_read_only", set_read_only, ByName, "Makes a volume read-only.", [LVOL]),
        ("bdev_lvol_snapshot", snapshot, Snapshot, "Takes a read-only snapshot of a volume without pausing its I/O.", [LVOL, &[(EEXIST, "a volume named snapshot_name is in the store"), (ENOSPC, "the store or its metadata has no room")]]),
        ("bdev_lvol_clone", clone, CloneParams, "Creates a thin writable clone of a snapshot.", [LVOL, &[(EEXIST, "a volume named clone_name is in the store"), (ENOSPC, "the store or its metadata has no room")]]),
        ("bdev_lvol_inflate", inflate, ByName, "Gives a volume its own copy of every cluster and drops its parent.", [LVOL]),
        ("bdev_lvol_decouple_parent", decouple_parent, ByName, "Detaches a volume from its parent snapshot.", [LVOL]),
        ("bdev_lvol_revert", revert, Revert, "Reverts a volume to a snapshot's content (tidemark).", [LVOL, &[(EBUSY, "something holds the volume and force is not given, or first writes are in flight"), (ENOSPC, "the metadata has no room")]]),
    ],
}

/// Errors of a method on the lvol store named by `uuid` or `lvs_name`.
const STORE: &[ErrorDoc] = &[(ENODEV, "no lvol store has that uuid or name"), (EIO, "the base bdev fails an I/O")];

/// Errors of a method on one volume, named by its bdev name or `lvs/name` alias.
const LVOL: &[ErrorDoc] = &[(ENODEV, "no bdev has that name, or it is not an lvol"), (EIO, "the base bdev fails an I/O")];

/// Long enough for a commit behind a slow disk, short enough to answer the caller.
const CALL_WAIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// The open stores.
#[derive(Default)]
pub struct LvolModule {
    stores: Mutex<Vec<Arc<Store>>>,
}

impl LvolModule {
    fn stores(&self) -> Vec<Arc<Store>> {
        self.stores.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn add(&self, s: Arc<Store>) {
        self.stores.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    }

    fn remove(&self, uuid: Uuid) {
        self.stores.lock().unwrap_or_else(|e| e.into_inner()).retain(|s| s.uuid != uuid);
    }
}

impl Module for LvolModule {
    fn name(&self) -> &'static str {
        "lvol"
    }

    fn config(&self, _ctx: &Ctx) -> Vec<ConfigCall> {
        // The stores come back through their anchor volume's config call (bdev section).
        Vec::new()
    }

    fn metrics(&self, _ctx: &Ctx, out: &mut MetricsOut<'_>) -> std::fmt::Result {
        let stores = self.stores();
        let mut clusters = Vec::new();
        let mut vols = Vec::new();
        let mut commits = Vec::new();
        let mut memory = Vec::new();
        for s in &stores {
            commits.push((vec![("lvs", s.name())], s.commits()));
            memory.push((vec![("lvs", s.name())], s.memory().total() as f64));
            let name = s.name();
            clusters.push((vec![("lvs", name.clone()), ("state", "total".to_string())], s.total_clusters() as f64));
            clusters.push((vec![("lvs", name.clone()), ("state", "free".to_string())], s.free_clusters() as f64));
            for (rec, allocated) in s.volumes() {
                vols.push((vec![("lvs", name.clone()), ("lvol", rec.name.clone())], allocated as f64));
            }
        }
        out.gauge("tidemark_lvol_store_clusters", "Clusters of each lvol store, total and free (neither allocated nor reserved).", &clusters)?;
        out.gauge("tidemark_lvol_allocated_clusters", "Clusters allocated to each volume.", &vols)?;
        out.gauge(
            "tidemark_lvol_metadata_memory_bytes",
            "Memory each lvol store's metadata takes (maps, cluster references, volume records), counted from its structures.",
            &memory,
        )?;
        out.counter(
            "tidemark_lvol_metadata_commits",
            "Metadata records written by each lvol store (one covers every first write pending when it began).",
            &commits,
        )
    }

    fn shutdown(&self, ctx: &Ctx) {
        // The front ends are stopped (they come later in the order); close the volumes, then
        // let go of the bases so the bdev layer can close them.
        for s in self.stores() {
            for (rec, _) in s.volumes() {
                if let Err(e) = ctx.delete_bdev(&rec.uuid.to_string()) {
                    log::warn!("shutdown: closing lvol {}: {}", rec.name, e.message);
                }
            }
            s.release_base();
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl From<LvolError> for RpcError {
    fn from(e: LvolError) -> Self {
        let code = match &e {
            LvolError::Invalid(_) => INVALID_PARAMS,
            LvolError::NotFound(_) => ENODEV,
            LvolError::Exists(_) => EEXIST,
            LvolError::NoSpace(_) => ENOSPC,
            LvolError::Busy(_) => EBUSY,
            LvolError::Io(_) => EIO,
        };
        RpcError::new(code, e.to_string())
    }
}

fn module(t: &Ctx) -> Result<&LvolModule, RpcError> {
    t.module::<LvolModule>().ok_or_else(|| RpcError::internal("the lvol module is not running"))
}

pub(super) fn check_name(field: &str, v: &str) -> Result<(), RpcError> {
    if v.is_empty() || v.len() > MAX_NAME || v.contains('/') || v.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
        return Err(RpcError::invalid_params(format!(
            "field `{field}`: {v:?} must be 1 to {MAX_NAME} bytes without slash, quote, backslash or control characters"
        )));
    }
    Ok(())
}

/// The store named by `uuid` or `lvs_name` (exactly one of them).
fn find_store(t: &Ctx, uuid: Option<&str>, lvs_name: Option<&str>) -> Result<Arc<Store>, RpcError> {
    let stores = module(t)?.stores();
    match (uuid, lvs_name) {
        (Some(u), None) => stores
            .into_iter()
            .find(|s| s.uuid.to_string() == u.to_ascii_lowercase())
            .ok_or_else(|| RpcError::no_device(format!("field `uuid`: no lvol store with uuid {u}"))),
        (None, Some(n)) => stores.into_iter().find(|s| s.name() == n).ok_or_else(|| RpcError::no_device(format!("field `lvs_name`: no lvol store named {n}"))),
        _ => Err(RpcError::invalid_params("give exactly one of `uuid` and `lvs_name`")),
    }
}

/// The volume named `name` (`lvs/lvol` alias or UUID).
fn find_lvol(t: &Ctx, field: &str, name: &str) -> Result<(Arc<crate::bdev::BdevEntry>, Arc<Store>, Uuid), RpcError> {
    let e = t.bdevs.get(name).ok_or_else(|| RpcError::no_device(format!("field `{field}`: no lvol {name}")))?;
    let l = e.bdev().as_any().downcast_ref::<LvolBdev>().ok_or_else(|| RpcError::no_device(format!("field `{field}`: bdev {name} is not an lvol")))?;
    let (s, u) = (l.store().clone(), l.lvol_uuid());
    Ok((e, s, u))
}

/// Runs `f` with the store and the base's channel on core 0 and waits for it.
pub(super) fn on_store<T: Send + 'static, Fut>(t: &BdevCtx, s: &Arc<Store>, f: impl FnOnce(Arc<Store>, Channel) -> Fut + Send + 'static) -> Result<T, RpcError>
where
    Fut: std::future::Future<Output = Result<T, LvolError>> + 'static,
{
    let s = s.clone();
    let r = t.reactors.call_async(0, CALL_WAIT, move || async move {
        let ch = Channel::get(&s.base).map_err(LvolError::Io)?;
        f(s, ch).await
    })?;
    Ok(r?)
}

/// Registers a volume's bdev under its UUID, with the alias `lvs/lvol`.
pub(super) fn register_volume(t: &BdevCtx, s: &Arc<Store>, uuid: Uuid) -> Result<String, RpcError> {
    let live = s.live(uuid).ok_or_else(|| RpcError::internal(format!("lvol {uuid} vanished")))?;
    let rec = s.volumes().into_iter().find(|(r, _)| r.uuid == uuid).map(|(r, _)| r).ok_or_else(|| RpcError::internal(format!("lvol {uuid} vanished")))?;
    let name = uuid.to_string();
    t.bdevs.register(Arc::new(LvolBdev::new(name.clone(), uuid, s.clone(), live, rec.thin)))?;
    t.bdevs.add_alias(&format!("{}/{}", s.name(), rec.name), &name)?;
    if s.anchor().is_none() {
        s.set_anchor(Some(uuid))?;
    }
    Ok(name)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreateLvstore {
    bdev_name: String,
    lvs_name: String,
    #[serde(default)]
    cluster_sz: Option<u64>,
    #[serde(default)]
    clear_method: Option<String>,
    /// SPDK's metadata sizing; tidemark sizes its metadata for the largest store (accepted, unused).
    #[serde(default)]
    num_md_pages_per_cluster_ratio: Option<u64>,
    #[serde(default)]
    md_page_size: Option<u64>,
}

fn create_lvstore(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: CreateLvstore = parse(p)?;
    let _ = (p.num_md_pages_per_cluster_ratio, p.md_page_size);
    check_name("lvs_name", &p.lvs_name)?;
    if let Some(c) = &p.clear_method {
        if !CLEAR_METHODS.contains(&c.as_str()) {
            return Err(RpcError::invalid_params(format!("field `clear_method`: {c:?} is not one of none, unmap, write_zeroes")));
        }
    }
    let m = module(t)?;
    let cluster = p.cluster_sz.unwrap_or(MIB);
    // A configuration step is replayed at every start: the store it created on the first one
    // is then on the bdev (or already open), and is opened instead, as SPDK's examine would.
    // A store of another name or cluster size there is still an error.
    let replay = t.from_config();
    let base_entry = t.bdev(&p.bdev_name)?;
    if let Some(s) = m.stores().into_iter().find(|s| s.name() == p.lvs_name) {
        if replay && s.base.id() == base_entry.id() && s.cluster_size() == cluster {
            log::info!("lvol store {} ({}) on {} is open already: not created again", p.lvs_name, s.uuid, p.bdev_name);
            return Ok(json!(s.uuid.to_string()));
        }
        return Err(RpcError::exists(format!("field `lvs_name`: lvol store {} already exists", p.lvs_name)));
    }
    let base = base_entry.claim(&format!("lvs:{}", p.lvs_name))?;
    let cores = t.reactors.core_count();
    let name = p.lvs_name.clone();
    let (s, created) = t.reactors.call_async(0, CALL_WAIT, move || async move { Store::create_or_open(base, &name, cluster, cores, replay).await })??;
    let uuid = s.uuid;
    if created {
        m.add(s);
    } else {
        let n = s.volumes().len();
        open_found(t, m, s, &p.bdev_name)?;
        log::info!("lvol store {} ({uuid}) found on {}: opened with its {n} volumes, not created again", p.lvs_name, p.bdev_name);
    }
    Ok(json!(uuid.to_string()))
}

/// Makes a store just read from `bdev_name` usable: refuses one whose name or uuid an open
/// store has, then registers every volume.
fn open_found(t: &Ctx, m: &LvolModule, s: Arc<Store>, bdev_name: &str) -> Result<(), RpcError> {
    if m.stores().iter().any(|o| o.name() == s.name() || o.uuid == s.uuid) {
        return Err(RpcError::exists(format!("field `bdev_name`: lvol store {} ({}) on {bdev_name} is already open from another bdev", s.name(), s.uuid)));
    }
    s.set_anchor(None)?;
    m.add(s.clone());
    for (rec, _) in s.volumes() {
        register_volume(t, &s, rec.uuid)?;
    }
    Ok(())
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct LoadLvstore {
    bdev_name: String,
}

fn load_lvstore(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: LoadLvstore = parse(p)?;
    let m = module(t)?;
    let base_entry = t.bdev(&p.bdev_name)?;
    if let Some(s) = m.stores().into_iter().find(|s| s.base.id() == base_entry.id()) {
        return Ok(json!(s.uuid.to_string()));
    }
    let base = base_entry.claim("lvs:load")?;
    let cores = t.reactors.core_count();
    let s = t.reactors.call_async(0, CALL_WAIT, move || async move { Store::load(base, cores).await })??;
    let uuid = s.uuid;
    open_found(t, m, s, &p.bdev_name)?;
    Ok(json!(uuid.to_string()))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct StoreRef {
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    lvs_name: Option<String>,
}

fn delete_lvstore(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: StoreRef = parse(p)?;
    let s = find_store(t, p.uuid.as_deref(), p.lvs_name.as_deref())?;
    let vols = s.volumes();
    for (rec, _) in &vols {
        if let Some(e) = t.bdevs.get(&rec.uuid.to_string()) {
            if let Some(h) = e.holder_list().first() {
                return Err(RpcError::busy(format!("lvol {}/{} is in use by {}", s.name(), rec.name, h.by)));
            }
        }
    }
    for (rec, _) in &vols {
        t.delete_bdev(&rec.uuid.to_string())?;
    }
    on_store(t, &s, |s, _| async move { Ok(s.destroy_on_media().await?) })?;
    s.release_base();
    module(t)?.remove(s.uuid);
    Ok(json!(true))
}

fn get_lvstores(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Option<StoreRef> = p.map(|v| parse(Some(v))).transpose()?;
    let stores = match p {
        Some(StoreRef { uuid: None, lvs_name: None }) | None => module(t)?.stores(),
        Some(r) => vec![find_store(t, r.uuid.as_deref(), r.lvs_name.as_deref())?],
    };
    Ok(Value::Array(
        stores
            .iter()
            .map(|s| {
                json!({
                    "uuid": s.uuid.to_string(),
                    "name": s.name(),
                    "base_bdev": s.base_name(),
                    "total_data_clusters": s.total_clusters(),
                    "free_clusters": s.free_clusters(),
                    "block_size": s.block_size(),
                    "cluster_size": s.cluster_size(),
                    // tidemark: what the store's metadata takes in memory (Store::memory).
                    "metadata_memory_bytes": s.memory().total(),
                })
            })
            .collect(),
    ))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RenameLvstore {
    old_name: String,
    new_name: String,
}

fn rename_lvstore(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: RenameLvstore = parse(p)?;
    check_name("new_name", &p.new_name)?;
    let s = find_store(t, None, Some(&p.old_name)).map_err(|e| RpcError::new(e.code, e.message.replace("`lvs_name`", "`old_name`")))?;
    if module(t)?.stores().iter().any(|o| o.name() == p.new_name) {
        return Err(RpcError::exists(format!("field `new_name`: lvol store {} already exists", p.new_name)));
    }
    let new = p.new_name.clone();
    on_store(t, &s, move |s, ch| async move { s.rename(&ch, &new).await })?;
    for (rec, _) in s.volumes() {
        t.bdevs.remove_alias(&format!("{}/{}", p.old_name, rec.name));
        t.bdevs.add_alias(&format!("{}/{}", p.new_name, rec.name), &rec.uuid.to_string())?;
    }
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Create {
    lvol_name: String,
    size_in_mib: u64,
    #[serde(default)]
    thin_provision: bool,
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    lvs_name: Option<String>,
    #[serde(default)]
    clear_method: Option<String>,
}

fn create(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    check_name("lvol_name", &p.lvol_name)?;
    let s = find_store(t, p.uuid.as_deref(), p.lvs_name.as_deref())?;
    let clear = match p.clear_method.as_deref() {
        None => 1,
        Some(c) => CLEAR_METHODS
            .iter()
            .position(|m| *m == c)
            .ok_or_else(|| RpcError::invalid_params(format!("field `clear_method`: {c:?} is not one of none, unmap, write_zeroes")))? as u8,
    };
    let pool_bytes = s.total_clusters() * s.cluster_size();
    if p.size_in_mib == 0 {
        return Err(RpcError::invalid_params("field `size_in_mib`: must be at least 1"));
    }
    let size = p.size_in_mib.checked_mul(MIB).ok_or_else(|| RpcError::invalid_params("field `size_in_mib`: too large"))?;
    // Rounded up to whole clusters, as SPDK does.
    let size = size.div_ceil(s.cluster_size()) * s.cluster_size();
    if !p.thin_provision && size > pool_bytes {
        return Err(RpcError::new(ENOSPC, format!("field `size_in_mib`: {} MiB is past the pool's {} MiB", p.size_in_mib, pool_bytes / MIB)));
    }
    if size / s.cluster_size() > u32::MAX as u64 || size / s.block_size() as u64 > u64::MAX / 2 {
        return Err(RpcError::invalid_params("field `size_in_mib`: too large"));
    }
    if t.from_config() {
        if let Some(existing) = existing_for_config(&s, &p, size)? {
            return Ok(json!(existing));
        }
    }
    t.bdevs.check_new_name(&format!("{}/{}", s.name(), p.lvol_name)).or_else(|e| match e {
        crate::bdev::CreateError::Invalid(_) => Ok(()),
        e => Err(e),
    })?;
    let (name, thin) = (p.lvol_name.clone(), p.thin_provision);
    let uuid = on_store(t, &s, move |s, ch| async move { Ok(s.create_volume(&ch, &name, size, thin, clear).await?.0) })?;
    Ok(json!(register_volume(t, &s, uuid)?))
}

/// A configuration step replayed at a restart finds the volume it created on the first start:
/// its bdev name, if `p` describes it. Of another kind (thick for thin, a snapshot), it is an
/// error. Of another size, it is kept as it is: `bdev_lvol_resize` changes a volume's size
/// while it runs, and a restart must neither undo that nor refuse to start.
fn existing_for_config(s: &Store, p: &Create, size: u64) -> Result<Option<String>, RpcError> {
    let Some((rec, _)) = s.volumes().into_iter().find(|(r, _)| r.name == p.lvol_name) else {
        return Ok(None);
    };
    let name = format!("{}/{}", s.name(), rec.name);
    if rec.snapshot {
        return Err(RpcError::exists(format!("field `lvol_name`: {name} exists and is a snapshot")));
    }
    if rec.thin != p.thin_provision {
        let kind = |thin: bool| if thin { "thin" } else { "thick" };
        return Err(RpcError::exists(format!("field `thin_provision`: {name} exists and is {}, not {}", kind(rec.thin), kind(p.thin_provision))));
    }
    if rec.size_bytes == size {
        log::info!("lvol {name} ({}) exists with this size: not created again", rec.uuid);
    } else {
        log::warn!(
            "lvol {name} ({}) exists with {} MiB, not the configured {} MiB (resized since it was created): kept as it is",
            rec.uuid,
            rec.size_bytes / MIB,
            size / MIB
        );
    }
    Ok(Some(rec.uuid.to_string()))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct GetLvols {
    #[serde(default)]
    lvs_uuid: Option<String>,
    #[serde(default)]
    lvs_name: Option<String>,
}

fn get_lvols(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Option<GetLvols> = p.map(|v| parse(Some(v))).transpose()?;
    let stores = match p {
        Some(GetLvols { lvs_uuid: None, lvs_name: None }) | None => module(t)?.stores(),
        Some(r) => {
            vec![find_store(t, r.lvs_uuid.as_deref(), r.lvs_name.as_deref()).map_err(|e| RpcError::new(e.code, e.message.replace("`uuid`", "`lvs_uuid`")))?]
        }
    };
    let mut out = Vec::new();
    for s in stores {
        let lvs = s.name();
        let vols = s.volumes();
        let name_of = |u: Uuid| vols.iter().find(|(r, _)| r.uuid == u).map(|(r, _)| r.name.clone());
        for (rec, allocated) in &vols {
            let clones: Vec<String> = vols.iter().filter(|(r, _)| r.parent == Some(rec.uuid)).map(|(r, _)| r.name.clone()).collect();
            let mut o = json!({
                "alias": format!("{lvs}/{}", rec.name),
                "uuid": rec.uuid.to_string(),
                "name": rec.name,
                "is_thin_provisioned": rec.thin,
                "is_snapshot": rec.snapshot,
                "is_clone": rec.parent.is_some(),
                "is_esnap_clone": false,
                "is_degraded": false,
                "num_allocated_clusters": allocated,
                "num_clusters": rec.size_bytes.div_ceil(s.cluster_size()),
                "read_only": rec.read_only,
                "lvs": { "name": lvs, "uuid": s.uuid.to_string() },
            });
            if let Some(p) = rec.parent.and_then(name_of) {
                o["base_snapshot"] = json!(p);
            }
            if rec.snapshot {
                o["clones"] = json!(clones);
            }
            out.push(o);
        }
    }
    Ok(Value::Array(out))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ByName {
    name: String,
}

fn delete(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByName = parse(p)?;
    let (e, s, uuid) = find_lvol(t, "name", &p.name)?;
    drop(e);
    s.check_delete(uuid, "name")?;
    t.delete_bdev(&uuid.to_string())?;
    on_store(t, &s, move |s, ch| async move { s.delete_volume(&ch, uuid).await })?;
    if s.anchor() == Some(uuid) {
        s.set_anchor(s.volumes().first().map(|(r, _)| r.uuid))?;
    }
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Rename {
    old_name: String,
    new_name: String,
}

fn rename(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Rename = parse(p)?;
    check_name("new_name", &p.new_name)?;
    let (_, s, uuid) = find_lvol(t, "old_name", &p.old_name)?;
    let lvs = s.name();
    let new_alias = format!("{lvs}/{}", p.new_name);
    if t.bdevs.get(&new_alias).is_some() {
        return Err(RpcError::exists(format!("field `new_name`: lvol {new_alias} already exists")));
    }
    let old = s.volumes().into_iter().find(|(r, _)| r.uuid == uuid).map(|(r, _)| r.name).unwrap_or_default();
    let new = p.new_name.clone();
    on_store(t, &s, move |s, ch| async move {
        s.update_volume(&ch, uuid, |rec, _| {
            rec.name = new;
            Ok(())
        })
        .await
    })?;
    t.bdevs.remove_alias(&format!("{lvs}/{old}"));
    t.bdevs.add_alias(&new_alias, &uuid.to_string())?;
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Resize {
    name: String,
    size_in_mib: u64,
    /// tidemark: shrink below allocated data, dropping it.
    #[serde(default)]
    force: bool,
}

fn resize(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Resize = parse(p)?;
    let (_, s, uuid) = find_lvol(t, "name", &p.name)?;
    if p.size_in_mib == 0 {
        return Err(RpcError::invalid_params("field `size_in_mib`: must be at least 1"));
    }
    let size = p.size_in_mib.checked_mul(MIB).ok_or_else(|| RpcError::invalid_params("field `size_in_mib`: too large"))?;
    let size = size.div_ceil(s.cluster_size()) * s.cluster_size();
    if size / s.cluster_size() > u32::MAX as u64 {
        return Err(RpcError::invalid_params("field `size_in_mib`: too large"));
    }
    let force = p.force;
    on_store(t, &s, move |s, ch| async move { s.resize(&ch, uuid, size, force).await })?;
    Ok(json!(true))
}

fn set_read_only(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByName = parse(p)?;
    let (_, s, uuid) = find_lvol(t, "name", &p.name)?;
    on_store(t, &s, move |s, ch| async move {
        s.update_volume(&ch, uuid, |rec, live| {
            rec.read_only = true;
            live.read_only.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
        .await
    })?;
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    lvol_name: String,
    snapshot_name: String,
}

fn snapshot(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Snapshot = parse(p)?;
    check_name("snapshot_name", &p.snapshot_name)?;
    let (_, s, uuid) = find_lvol(t, "lvol_name", &p.lvol_name)?;
    let name = p.snapshot_name.clone();
    let snap = on_store(t, &s, move |s, ch| async move { Ok(s.snapshot(&ch, uuid, &name).await?.0) })?;
    Ok(json!(register_volume(t, &s, snap)?))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CloneParams {
    snapshot_name: String,
    clone_name: String,
}

fn clone(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: CloneParams = parse(p)?;
    check_name("clone_name", &p.clone_name)?;
    let (_, s, snap) = find_lvol(t, "snapshot_name", &p.snapshot_name)?;
    let (snap_name, name) = (p.snapshot_name.clone(), p.clone_name.clone());
    let uuid = on_store(t, &s, move |s, ch| async move { Ok(s.clone_volume(&ch, snap, &snap_name, &name).await?.0) })?;
    Ok(json!(register_volume(t, &s, uuid)?))
}

fn inflate(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByName = parse(p)?;
    let (_, s, uuid) = find_lvol(t, "name", &p.name)?;
    on_store(t, &s, move |s, ch| async move { s.inflate(&ch, uuid).await })?;
    Ok(json!(true))
}

fn decouple_parent(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByName = parse(p)?;
    let (_, s, uuid) = find_lvol(t, "name", &p.name)?;
    on_store(t, &s, move |s, ch| async move { s.decouple(&ch, uuid, "name").await })?;
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Revert {
    name: String,
    snapshot_name: String,
    /// Revert even while a host has the volume open.
    #[serde(default)]
    force: bool,
}

fn revert(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Revert = parse(p)?;
    let (e, s, uuid) = find_lvol(t, "name", &p.name)?;
    let (_, s2, snap) = find_lvol(t, "snapshot_name", &p.snapshot_name)?;
    if s2.uuid != s.uuid {
        return Err(RpcError::invalid_params(format!("field `snapshot_name`: {} is in another lvol store", p.snapshot_name)));
    }
    if !p.force {
        if let Some(h) = e.holder_list().first() {
            return Err(RpcError::busy(format!("field `name`: lvol {} is in use by {}; give `force` to revert it under its host", p.name, h.by)));
        }
    }
    drop(e);
    on_store(t, &s, move |s, ch| async move { s.revert(&ch, uuid, snap).await })?;
    Ok(json!(true))
}

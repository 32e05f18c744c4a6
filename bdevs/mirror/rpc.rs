//! SPDK's raid RPCs for the mirror: `bdev_raid_create` (raid1), `bdev_raid_get_bdevs`,
//! `bdev_raid_delete`, `bdev_raid_add_base_bdev`, `bdev_raid_remove_base_bdev`,
//! `bdev_raid_set_options`; and `bdev_raid_open_split_image`, which opens a sealed split image
//! from its leg (what `save_config` writes for a split image).
//!
//! Every check that can fail is made before anything changes, so a refused call leaves the
//! target as it was.

use super::layout::MAX_SLOTS;
use super::{describe, MirrorBdev, MirrorOptions, SplitImageBdev, PROCESS_OPTIONS};
use crate::bdev::BdevEntry;
use crate::module::Ctx;
use crate::rpc::{non_empty, parse, parse_spdk, RpcError, SpdkParams, EINVAL};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// How long an RPC waits for the mirror's home core (metadata I/O on every leg).
const CALL_WAIT: Duration = Duration::from_secs(120);

crate::register_module! {
    name: "raid",
    order: 20,
    construct: |_, _| std::sync::Arc::new(super::metrics::MirrorSubsystem),
    methods: [
        ("bdev_raid_create", create, Create, "Creates a mirror (RAID1) bdev over base bdevs.", [
            crate::bdevs::NEW_NAME_ERRORS,
            &[
                (EBUSY, "something holds a base bdev already, or (reservation_key) another head holds a leg's reservation and preempt_key does not name its key (the message names the leg)"),
                (ENODEV, "a base bdev is missing and the others hold no mirror to reassemble"),
                (EINVAL, "the base bdevs do not make one mirror (block sizes, superblocks), or (preempt_key) this node is registered on a leg with the stale head's key: both attach with the same hostnqn"),
                (EIO, "a leg's superblock cannot be read or written, or a remote leg's reservation command failed"),
            ],
        ]),
        ("bdev_raid_get_bdevs", get_bdevs, GetBdevs, "Describes mirror bdevs and their legs.", []),
        ("bdev_raid_delete", delete, Delete, "Deletes a mirror bdev.", [crate::bdevs::DELETE_ERRORS]),
        ("bdev_raid_add_base_bdev", add_base_bdev, AddBase, "Adds a leg to a mirror; it is resynchronised.", [&[
                (ENODEV, "the raid bdev or the base bdev does not exist, or raid_bdev is not a raid bdev"),
                (EBUSY, "something holds the base bdev (or the split image), it is a leg already, or the mirror is shutting down or still releasing it"),
                (EINVAL, "the base bdev does not fit the mirror (block size, size, read-only), is an image of another mirror, or the mirror has no free slot"),
                (EIO, "the superblocks cannot be written"),
            ]]),
        ("bdev_raid_remove_base_bdev", remove_base_bdev, crate::bdevs::ByName, "Removes a leg from its mirror.", [&[
                (ENODEV, "the bdev does not exist or is not an active leg of a raid bdev"),
                (EBUSY, "it is the last in-sync leg, or the mirror is resynchronising after a crash or shutting down"),
            ]]),
        ("bdev_raid_set_options", set_options, SetOptions, "Sets the mirror module's options.", []),
        ("bdev_raid_open_split_image", open_split_image, OpenImage, "Opens a split leg's image as a bdev.", [crate::bdevs::NEW_NAME_ERRORS, crate::bdevs::BASE_ERRORS, &[(EINVAL, "the base bdev is not a leg split off a mirror"), (EIO, "its superblock cannot be read")]]),
    ],
}

/// SPDK accepts base bdevs as a list or as one space-separated string.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
enum BaseBdevs {
    List(Vec<String>),
    Words(String),
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    raid_level: String,
    base_bdevs: BaseBdevs,
    /// Accepted and ignored: a mirror has no strips.
    #[serde(default)]
    #[allow(dead_code)]
    strip_size_kb: Option<u64>,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
    /// SPDK's default is `false` (and SPDK's clients send it unless `-s` is given). A tidemark
    /// mirror always keeps its superblock and write-intent bitmap on the legs, whatever this
    /// says: both are what let a returning leg be rebuilt from the regions it missed.
    /// `bdev_raid_get_bdevs` reports `superblock: true`.
    #[serde(default)]
    superblock: bool,
    /// Size of a write-intent region (default 1024 KiB); a reassembled mirror keeps its own.
    #[serde(default)]
    region_size_kb: Option<u64>,
    /// tidemark's own (SPDK has no fencing): nonzero turns fencing on. The mirror registers
    /// this key on every leg that is an NVMe namespace (a remote leg) and holds a Write
    /// Exclusive reservation on it, so that a head assembling the mirror elsewhere can fence
    /// this one (see docs/failover.md). Give each head its own key.
    #[serde(default)]
    reservation_key: Option<u64>,
    /// tidemark's own: the key of a stale head whose reservation on the legs this head may
    /// preempt (Preempt and Abort). Only with `reservation_key`; used by this call only
    /// (`save_config` does not keep it).
    #[serde(default)]
    preempt_key: Option<u64>,
}

fn mirror_of(t: &Ctx, name: &str) -> Result<(Arc<BdevEntry>, Arc<dyn crate::bdev::Bdev>), RpcError> {
    let e = t.bdev(name)?;
    let b = e.bdev().clone();
    if b.as_any().downcast_ref::<MirrorBdev>().is_none() {
        return Err(RpcError::no_device(format!("bdev {name} is a {}, not a raid bdev", b.product_name())));
    }
    Ok((e, b))
}

/// Runs `f(mirror)` on the mirror's home core and waits for its result.
fn on_home<T, Fut>(t: &Ctx, b: &Arc<dyn crate::bdev::Bdev>, f: impl FnOnce(Arc<dyn crate::bdev::Bdev>) -> Fut + Send + 'static) -> Result<T, RpcError>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    let home = b.as_any().downcast_ref::<MirrorBdev>().map_or(0, |m| m.home_core());
    let b = b.clone();
    Ok(t.reactors.call_async(home, CALL_WAIT, move || f(b))?)
}

fn as_mirror(b: &Arc<dyn crate::bdev::Bdev>) -> &MirrorBdev {
    b.as_any().downcast_ref::<MirrorBdev>().expect("checked to be a mirror by the caller")
}

fn create(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    non_empty("name", &p.name)?;
    match p.raid_level.to_ascii_lowercase().as_str() {
        "raid1" | "1" => {}
        other => return Err(RpcError::invalid_params(format!("field `raid_level`: {other:?} is not supported; tidemark's raid bdevs are raid1 mirrors"))),
    }
    if !p.superblock {
        log::info!("bdev_raid_create {}: superblock false (SPDK's default) given; tidemark's raid1 keeps its superblock and bitmap on the legs anyway", p.name);
    }
    let bases: Vec<String> = match p.base_bdevs {
        BaseBdevs::List(v) => v,
        BaseBdevs::Words(s) => s.split_whitespace().map(str::to_string).collect(),
    };
    if bases.is_empty() || bases.len() > MAX_SLOTS {
        return Err(RpcError::invalid_params(format!("field `base_bdevs`: a mirror has 2 to {MAX_SLOTS} legs")));
    }
    for (i, b) in bases.iter().enumerate() {
        if b.is_empty() || bases[..i].contains(b) {
            return Err(RpcError::invalid_params(format!("field `base_bdevs`: {b:?} is empty or listed twice")));
        }
    }
    let mut options = MirrorOptions::default();
    if let Some(kb) = p.region_size_kb {
        if !(4..=(4 << 20)).contains(&kb) {
            return Err(RpcError::invalid_params("field `region_size_kb`: must be from 4 to 4194304"));
        }
        options.region_bytes = kb * 1024;
    }
    options.fencing = match (p.reservation_key.filter(|&k| k != 0), p.preempt_key) {
        (None, Some(_)) => return Err(RpcError::invalid_params("field `preempt_key`: needs a nonzero `reservation_key`")),
        (Some(k), Some(pk)) if pk == k || pk == 0 => {
            return Err(RpcError::invalid_params("field `preempt_key`: must be nonzero and differ from `reservation_key` (it names another head's key)"))
        }
        (None, None) => None,
        (Some(key), preempt) => Some(super::fence::Fencing { key, preempt }),
    };
    t.bdevs.check_new_name(&p.name)?;
    // Claim what exists; legs that are missing are tolerated only when the mirror is
    // reassembled from the others (it then runs degraded).
    let mut guards = Vec::new();
    let mut missing = Vec::new();
    for b in &bases {
        match t.bdevs.get(b) {
            Some(e) => match e.claim(&p.name) {
                Ok(g) => guards.push(g),
                // Replaying a configuration, a leg that something else holds now (the operator
                // took a failed leg's bdev for another use) is left out like a missing one:
                // `save_config` keeps failed legs, and one of them must not keep the whole
                // configuration from starting. A new mirror still fails (no superblock to
                // reassemble from). From a client the call is refused as before.
                Err(err) if t.from_config() => {
                    log::warn!("bdev_raid_create {}: base bdev {b} is left out: {err}", p.name);
                    missing.push(b.clone());
                }
                Err(err) => return Err(err.into()),
            },
            None => missing.push(b.clone()),
        }
    }
    let (name, uuid) = (p.name.clone(), p.uuid);
    let m = t.reactors.call_async(0, CALL_WAIT, move || async move { MirrorBdev::assemble(&name, guards, missing, uuid, options).await })??;
    m.set_registry(&t.bdevs);
    if let Err(e) = t.bdevs.register(m.clone() as Arc<dyn crate::bdev::Bdev>) {
        let m2 = m.clone();
        let _ = t.reactors.call_async(m.home_core(), CALL_WAIT, move || async move { m2.shutdown().await });
        return Err(e.into());
    }
    Ok(json!(p.name))
}

/// `bdev_raid_delete` (SPDK's parameters).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Delete {
    name: String,
    /// SPDK: wipe the superblock of the legs on delete.
    #[serde(default)]
    clear_sb: bool,
}

impl SpdkParams for Delete {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        vec![("clear_sb", !self.clear_sb, "clearing the legs' superblock is not supported (the legs keep it, so the mirror can be created again from them)")]
    }
}

fn delete(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Delete = parse_spdk(p)?;
    crate::bdevs::delete_handler::<MirrorBdev>(t, Some(json!({ "name": p.name })))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    #[serde(default)]
    category: Option<String>,
}

fn get_bdevs(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: GetBdevs = parse(p)?;
    let category = p.category.unwrap_or_else(|| "all".into());
    if !matches!(category.as_str(), "all" | "online" | "configuring" | "offline") {
        return Err(RpcError::invalid_params(format!("field `category`: {category:?} is not one of all, online, configuring, offline")));
    }
    let mut out: Vec<Value> = t
        .bdevs
        .list()
        .iter()
        .filter_map(|e| e.bdev().as_any().downcast_ref::<MirrorBdev>().map(describe))
        .filter(|d| category == "all" || d["state"] == category.as_str())
        .collect();
    for m in out.iter_mut() {
        if let Some(legs) = m["base_bdevs_list"].as_array_mut() {
            for leg in legs {
                let remote = leg["name"].as_str().and_then(|n| t.bdevs.get(n)).and_then(|e| remote_path(&e.bdev().driver_specific()));
                if let Some(r) = remote {
                    leg["remote"] = r;
                }
            }
        }
    }
    Ok(Value::Array(out))
}

/// Where a leg that is an NVMe-oF initiator bdev lives: its path and its controller's state,
/// from what the bdev tells `bdev_get_bdevs` (`driver_specific.nvme[0]`), so that the mirror
/// needs nothing of the initiator module.
fn remote_path(ds: &Value) -> Option<Value> {
    let n = ds.get("nvme")?.get(0)?;
    let trid = n.get("trid")?;
    Some(json!({
        "trtype": trid.get("trtype")?.as_str()?.to_ascii_lowercase(),
        "adrfam": trid.get("adrfam"),
        "traddr": trid.get("traddr")?,
        "trsvcid": trid.get("trsvcid"),
        "subnqn": trid.get("subnqn"),
        "nsid": n.get("ns_data").and_then(|d| d.get("id")),
        "state": n.get("state"),
    }))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AddBase {
    raid_bdev: String,
    base_bdev: String,
}

fn add_base_bdev(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: AddBase = parse(p)?;
    let (_, b) = mirror_of(t, &p.raid_bdev)?;
    let m = as_mirror(&b);
    let base = t.bdev(&p.base_bdev)?;
    // Re-joining a split image: the image goes away (it must not be in use) and its leg returns.
    let leg_name = match base.bdev().as_any().downcast_ref::<SplitImageBdev>() {
        Some(img) => {
            if img.mirror_uuid() != b.uuid() {
                return Err(RpcError::new(EINVAL, format!("{} is an image of mirror {}, not of {}", p.base_bdev, img.mirror_name(), p.raid_bdev)));
            }
            let leg = img.leg_name().to_string();
            if let Some(h) = base.holder_list().first() {
                return Err(RpcError::busy(format!("image {} is in use by {}", p.base_bdev, h.by)));
            }
            drop(base);
            t.delete_bdev(&p.base_bdev)?;
            leg
        }
        None => {
            let g = m.geometry();
            let lb = base.bdev();
            if lb.block_size() != g.block_size {
                return Err(RpcError::new(
                    EINVAL,
                    format!("{} has {}-byte blocks; the legs of {} have {}-byte blocks", p.base_bdev, lb.block_size(), p.raid_bdev, g.block_size),
                ));
            }
            if lb.num_blocks() < g.leg_blocks_needed() {
                return Err(RpcError::new(
                    EINVAL,
                    format!("{} is too small: it has {} blocks, a leg of {} needs {}", p.base_bdev, lb.num_blocks(), p.raid_bdev, g.leg_blocks_needed()),
                ));
            }
            drop(base);
            p.base_bdev.clone()
        }
    };
    let guard = t.bdev(&leg_name)?.claim(&p.raid_bdev)?;
    let added = on_home(t, &b, move |b| async move { as_mirror(&b).add_leg(guard).await })??;
    Ok(json!({ "base_bdev": leg_name, "slot": added.slot, "returning": added.returning, "regions_to_copy": added.regions_to_copy }))
}

fn remove_base_bdev(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: crate::bdevs::ByName = parse(p)?;
    t.bdev(&p.name)?;
    let owner = t.bdevs.list().into_iter().find(|e| e.bdev().as_any().downcast_ref::<MirrorBdev>().is_some_and(|m| m.has_leg(&p.name)));
    let Some(owner) = owner else {
        return Err(RpcError::no_device(format!("bdev {} is not a leg of any raid bdev", p.name)));
    };
    let b = owner.bdev().clone();
    let name = p.name.clone();
    on_home(t, &b, move |b| async move { as_mirror(&b).remove_leg(&name).await })??;
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SetOptions {
    #[serde(default)]
    process_window_size_kb: Option<u64>,
    #[serde(default)]
    process_max_bandwidth_mb_sec: Option<u64>,
    /// A leg dropped after I/O errors re-joins by itself, incrementally, once its bdev answers
    /// again (a remote leg's controller reconnected). Default true; tidemark's own option.
    /// Legs removed by `bdev_raid_remove_base_bdev` and split-off legs never re-join by
    /// themselves.
    #[serde(default)]
    auto_rejoin: Option<bool>,
}

fn set_options(_t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: SetOptions = parse(p)?;
    if let Some(kb) = p.process_window_size_kb {
        if !(4..=16384).contains(&kb) {
            return Err(RpcError::invalid_params("field `process_window_size_kb`: must be from 4 to 16384"));
        }
    }
    if let Some(kb) = p.process_window_size_kb {
        PROCESS_OPTIONS.window_bytes.store(kb * 1024, Relaxed);
    }
    if let Some(bw) = p.process_max_bandwidth_mb_sec {
        PROCESS_OPTIONS.max_bandwidth_mb_sec.store(bw, Relaxed);
    }
    if let Some(auto) = p.auto_rejoin {
        PROCESS_OPTIONS.auto_rejoin.store(auto, Relaxed);
    }
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct OpenImage {
    name: String,
    base_bdev: String,
}

fn open_split_image(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: OpenImage = parse(p)?;
    t.bdevs.check_new_name(&p.name)?;
    let guard = t.bdev(&p.base_bdev)?.claim(&p.name)?;
    let name = p.name.clone();
    let img = t.reactors.call_async(0, CALL_WAIT, move || async move { SplitImageBdev::open(&name, guard).await })??;
    t.bdevs.register(Arc::new(img))?;
    Ok(json!(p.name))
}

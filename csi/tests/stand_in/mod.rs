//! A stand-in for tidemarkd's lvol RPCs with SPDK's semantics for `bdev_lvol_snapshot` and
//! `bdev_lvol_clone`, used only until tidemarkd serves them (they are being written on another
//! branch): it lets the driver's snapshot and clone paths run over its real JSON-RPC client.
//! It follows SPDK's documented behaviour: a snapshot is a read-only lvol whose source becomes
//! its clone; a clone is a thin lvol of a snapshot; a snapshot with more than one clone cannot
//! be deleted (EBUSY); replies are the new lvol's UUID. Volumes and stores as in tidemarkd.

use serde_json::{json, Value};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;

const MIB: u64 = 1 << 20;

struct Lvol {
    name: String,
    uuid: String,
    clusters: u64,
    thin: bool,
    snapshot: bool,
    /// The snapshot this lvol is a clone of.
    parent: Option<String>,
}

struct Pool {
    total: u64,
    lvols: Vec<Lvol>,
    next: u64,
}

impl Pool {
    fn free(&self) -> u64 {
        self.total - self.lvols.iter().filter(|l| !l.thin && !l.snapshot).map(|l| l.clusters).sum::<u64>()
    }

    fn find(&self, alias: &str) -> Option<usize> {
        let name = alias.strip_prefix("pool/")?;
        self.lvols.iter().position(|l| l.name == name)
    }

    fn add(&mut self, name: &str, clusters: u64, thin: bool, snapshot: bool, parent: Option<String>) -> Value {
        self.next += 1;
        let uuid = format!("00000000-0000-4000-8000-{:012x}", self.next);
        self.lvols.push(Lvol { name: name.into(), uuid: uuid.clone(), clusters, thin, snapshot, parent });
        json!(uuid)
    }

    fn handle(&mut self, method: &str, p: &Value) -> Result<Value, (i64, String)> {
        let nodev = |what: &str| (-19, format!("no lvol {what}"));
        let name_taken = |s: &Pool, n: &str| s.lvols.iter().any(|l| l.name == n);
        match method {
            "rpc_get_methods" => Ok(json!([
                "rpc_get_methods",
                "bdev_lvol_get_lvstores",
                "bdev_lvol_get_lvols",
                "bdev_lvol_create",
                "bdev_lvol_delete",
                "bdev_lvol_resize",
                "bdev_lvol_snapshot",
                "bdev_lvol_clone"
            ])),
            "bdev_lvol_get_lvstores" => Ok(
                json!([{"name": "pool", "uuid": "11111111-0000-4000-8000-000000000000", "cluster_size": MIB, "block_size": 512, "total_data_clusters": self.total, "free_clusters": self.free()}]),
            ),
            "bdev_lvol_get_lvols" => Ok(Value::Array(
                self.lvols
                    .iter()
                    .map(|l| {
                        json!({"alias": format!("pool/{}", l.name), "uuid": l.uuid, "name": l.name, "is_thin_provisioned": l.thin, "is_snapshot": l.snapshot,
                               "is_clone": l.parent.is_some(), "num_clusters": l.clusters, "lvs": {"name": "pool"}})
                    })
                    .collect(),
            )),
            "bdev_lvol_create" => {
                let (n, mib, thin) = (p["lvol_name"].as_str().unwrap(), p["size_in_mib"].as_u64().unwrap(), p["thin_provision"].as_bool().unwrap_or(false));
                if name_taken(self, n) {
                    return Err((-17, "exists".into()));
                }
                if !thin && mib > self.free() {
                    return Err((-28, "no space".into()));
                }
                Ok(self.add(n, mib, thin, false, None))
            }
            "bdev_lvol_resize" => {
                let i = self.find(p["name"].as_str().unwrap()).ok_or_else(|| nodev("to resize"))?;
                let mib = p["size_in_mib"].as_u64().unwrap();
                let l = &self.lvols[i];
                if !l.thin && mib > l.clusters && mib - l.clusters > self.free() {
                    return Err((-28, "no space".into()));
                }
                self.lvols[i].clusters = mib;
                Ok(json!(true))
            }
            "bdev_lvol_snapshot" => {
                let i = self.find(p["lvol_name"].as_str().unwrap()).ok_or_else(|| nodev("to snapshot"))?;
                let n = p["snapshot_name"].as_str().unwrap().to_string();
                if name_taken(self, &n) {
                    return Err((-17, "exists".into()));
                }
                // The snapshot takes the source's place in its chain.
                let (clusters, chain) = (self.lvols[i].clusters, self.lvols[i].parent.take());
                self.lvols[i].parent = Some(n.clone());
                Ok(self.add(&n, clusters, false, true, chain))
            }
            "bdev_lvol_clone" => {
                let i = self.find(p["snapshot_name"].as_str().unwrap()).ok_or_else(|| nodev("to clone"))?;
                if !self.lvols[i].snapshot {
                    return Err((-22, "not a snapshot".into()));
                }
                let n = p["clone_name"].as_str().unwrap();
                if name_taken(self, n) {
                    return Err((-17, "exists".into()));
                }
                let (clusters, parent) = (self.lvols[i].clusters, self.lvols[i].name.clone());
                Ok(self.add(n, clusters, true, false, Some(parent)))
            }
            "bdev_lvol_delete" => {
                let i = self.find(p["name"].as_str().unwrap()).ok_or_else(|| nodev("to delete"))?;
                let name = self.lvols[i].name.clone();
                let clones: Vec<usize> = (0..self.lvols.len()).filter(|&j| self.lvols[j].parent.as_deref() == Some(&name)).collect();
                if clones.len() > 1 {
                    return Err((-16, format!("snapshot {name} has {} clones", clones.len())));
                }
                // A snapshot with one clone is merged into it (the clone takes its parent).
                let grand = self.lvols[i].parent.clone();
                for j in clones {
                    self.lvols[j].parent = grand.clone();
                }
                self.lvols.remove(i);
                Ok(json!(true))
            }
            m => Err((-32601, format!("Method not found: {m}"))),
        }
    }
}

/// Serves the stand-in on `path` from a thread, for the life of the test process.
pub fn serve(path: &Path, pool_mib: u64) {
    let listener = UnixListener::bind(path).expect("bind the stand-in's socket");
    std::thread::spawn(move || {
        let mut pool = Pool { total: pool_mib - 4, lvols: Vec::new(), next: 0 };
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            let Some(Ok(req)) = serde_json::Deserializer::from_reader(BufReader::new(&s)).into_iter::<Value>().next() else { continue };
            let resp = match pool.handle(req["method"].as_str().unwrap_or(""), &req["params"]) {
                Ok(r) => json!({"jsonrpc": "2.0", "id": req["id"], "result": r}),
                Err((code, message)) => json!({"jsonrpc": "2.0", "id": req["id"], "error": {"code": code, "message": message}}),
            };
            let _ = (&s).write_all(resp.to_string().as_bytes());
        }
    });
}

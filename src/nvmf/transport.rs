//! The TCP transport: its options (SPDK's `nvmf_create_transport` parameters) and listeners.
//! A listener runs on core 0 and hands every accepted connection to a core chosen
//! round-robin, which owns it from then on.

use super::subsystem::ListenAddr;
use super::Nvmf;
use crate::reactor::{self, TcpListener};
use openssl::ssl::SslContext;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// Options of the TCP transport. Names and defaults follow SPDK where SPDK has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportOpts {
    /// Entries of an I/O queue (MQES + 1): the most commands a host may have outstanding.
    #[serde(default = "d_queue_depth")]
    pub max_queue_depth: u16,
    /// I/O queues per controller (the admin queue not counted).
    #[serde(default = "d_io_qpairs")]
    pub max_io_qpairs_per_ctrlr: u16,
    /// Largest in-capsule data of an I/O command (IOCCSZ = 64 + this, in 16-byte units).
    #[serde(default = "d_icd")]
    pub in_capsule_data_size: u32,
    /// Largest data transfer of one command (MDTS) and largest H2CData PDU (MAXH2CDATA).
    #[serde(default = "d_io_size")]
    pub max_io_size: u32,
    /// Accepted for SPDK compatibility; buffers here are sized per command.
    #[serde(default = "d_io_size")]
    pub io_unit_size: u32,
    /// Entries of an admin queue.
    #[serde(default = "d_aq_depth")]
    pub max_aq_depth: u16,
    /// Send read data with the C2HData SUCCESS flag (no CapsuleResp) when the host disabled
    /// SQ flow control.
    #[serde(default = "d_true")]
    pub c2h_success: bool,
}

fn d_queue_depth() -> u16 {
    128
}
fn d_io_qpairs() -> u16 {
    127
}
fn d_icd() -> u32 {
    8192
}
fn d_io_size() -> u32 {
    131072
}
fn d_aq_depth() -> u16 {
    128
}
fn d_true() -> bool {
    true
}

impl Default for TransportOpts {
    fn default() -> Self {
        TransportOpts {
            max_queue_depth: d_queue_depth(),
            max_io_qpairs_per_ctrlr: d_io_qpairs(),
            in_capsule_data_size: d_icd(),
            max_io_size: d_io_size(),
            io_unit_size: d_io_size(),
            max_aq_depth: d_aq_depth(),
            c2h_success: true,
        }
    }
}

/// Admin commands may carry this much in-capsule data (Fabrics Connect needs 1 KiB; Linux
/// sends up to 8 KiB in the admin capsule).
pub const ADMIN_ICD: u32 = 8192;

impl TransportOpts {
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=4096).contains(&self.max_queue_depth) {
            return Err("field `max_queue_depth`: must be between 2 and 4096".into());
        }
        if !(1..=1024).contains(&self.max_io_qpairs_per_ctrlr) {
            return Err("field `max_io_qpairs_per_ctrlr`: must be between 1 and 1024".into());
        }
        if self.in_capsule_data_size > 131072 || self.in_capsule_data_size % 16 != 0 {
            return Err("field `in_capsule_data_size`: must be a multiple of 16 up to 131072".into());
        }
        if !self.max_io_size.is_power_of_two() || !(4096..=1 << 20).contains(&self.max_io_size) {
            return Err("field `max_io_size`: must be a power of two from 4096 to 1048576".into());
        }
        if !(32..=4096).contains(&self.max_aq_depth) {
            return Err("field `max_aq_depth`: must be between 32 and 4096".into());
        }
        Ok(())
    }

    /// MDTS in units of the 4 KiB minimum page size, as a power of two.
    pub fn mdts(&self) -> u8 {
        (self.max_io_size / 4096).trailing_zeros() as u8
    }

    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        v["trtype"] = Value::String("TCP".into());
        v
    }
}

/// Listeners running on core 0, by address; dropping a task stops its accept loop.
#[derive(Default)]
struct Listeners(RefCell<HashMap<ListenAddr, async_task::Task<()>>>);

/// Binds `a` on core 0 and starts accepting.
/// With `tls`, every connection it accepts must complete a TLS handshake first.
pub fn start_listener(nvmf: &Arc<Nvmf>, a: &ListenAddr, tls: Option<SslContext>) -> Result<(), String> {
    let n = nvmf.clone();
    let addr = a.clone();
    nvmf.reactors
        .call(0, move || -> Result<(), String> {
            let l = TcpListener::bind(addr.socket_addr()).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            log::info!("nvmf: listening on {addr} (NVMe/TCP{})", if tls.is_some() { " over TLS 1.3" } else { "" });
            let task = reactor::spawn(accept_loop(n, l, addr.clone(), tls));
            reactor::with_core(|c| c.local::<Listeners>()).0.borrow_mut().insert(addr, task);
            Ok(())
        })
        .map_err(|e| e.to_string())?
}

/// Stops accepting on `a` (connections already accepted stay).
pub fn stop_listener(nvmf: &Arc<Nvmf>, a: &ListenAddr) {
    let addr = a.clone();
    let r = nvmf.reactors.call(0, move || {
        let task = reactor::with_core(|c| c.local::<Listeners>()).0.borrow_mut().remove(&addr);
        if task.is_some() {
            log::info!("nvmf: stopped listening on {addr}");
        }
        drop(task);
    });
    if let Err(e) = r {
        log::warn!("nvmf: stopping listener {a}: {e}");
    }
}

async fn accept_loop(nvmf: Arc<Nvmf>, l: TcpListener, addr: ListenAddr, tls: Option<SslContext>) {
    loop {
        match l.accept().await {
            Ok((s, peer)) => {
                if nvmf.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let core = nvmf.next_core();
                let n = nvmf.clone();
                let a = addr.clone();
                let t = tls.clone();
                reactor::send_to(core, move || reactor::spawn_detached(super::connection::serve(n, s, a, peer, t)));
            }
            Err(e) => {
                // Out of descriptors with no spare left to shed with: back off instead of
                // spinning.
                log::warn!("nvmf: accept on {addr} failed: {e}");
                reactor::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_mdts_matches() {
        let o = TransportOpts::default();
        o.validate().unwrap();
        assert_eq!(o.mdts(), 5);
        let mut bad = o;
        bad.max_io_size = 5000;
        assert!(bad.validate().is_err());
    }
}

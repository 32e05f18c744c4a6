//! Portals: listening sockets. Every listener lives on core 0 and hands each accepted
//! connection to a core chosen round-robin, which then owns it for its whole life.

use super::IscsiShared;
use crate::reactor::{self, TcpListener};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The core that runs every listener.
pub const LISTEN_CORE: usize = 0;

/// Listener tasks of core 0, by id. Dropping a task stops its accept loop and closes the socket.
#[derive(Default)]
struct Listeners(RefCell<HashMap<u64, async_task::Task<()>>>);

/// Binds `addr` on the current core (core 0) and starts accepting; returns the listener id and
/// the bound address.
pub(crate) fn start(addr: SocketAddr, shared: Arc<IscsiShared>, pg_tag: u16, id: u64) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let bound = l.local_addr()?;
    let task = reactor::spawn(accept_loop(l, shared, pg_tag));
    reactor::with_core(|c| c.local::<Listeners>()).0.borrow_mut().insert(id, task);
    log::info!("iscsi: portal group {pg_tag} listening on {bound}");
    Ok(bound)
}

/// Stops listener `id` (on core 0).
pub(crate) fn stop(id: u64) {
    let t = reactor::with_core(|c| c.local::<Listeners>()).0.borrow_mut().remove(&id);
    drop(t);
}

/// Stops every listener (on core 0).
pub(crate) fn stop_all() {
    let all: Vec<_> = reactor::with_core(|c| c.local::<Listeners>()).0.borrow_mut().drain().collect();
    drop(all);
}

async fn accept_loop(l: TcpListener, shared: Arc<IscsiShared>, pg_tag: u16) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let core = shared.next_core();
                let sh = shared.clone();
                reactor::send_to(core, move || reactor::spawn_detached(super::conn::serve(s, sh, pg_tag)));
            }
            Err(e) => {
                // Out of descriptors, say: back off instead of spinning.
                log::warn!("iscsi: accept on portal group {pg_tag} failed: {e}");
                reactor::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

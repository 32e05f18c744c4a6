//! Keep-alive: a controller whose host stops sending Keep Alive within KATO is destroyed
//! (NVMe base spec, 3.9), by a timer task started when the admin queue connects.

use super::Controller;
use crate::nvmf::identify;
use crate::nvmf::Nvmf;
use crate::reactor;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Controller {
    pub fn kato(&self) -> Duration {
        Duration::from_millis(self.st().kato_ms as u64)
    }

    pub fn touch_keep_alive(&self) {
        self.st().last_keep_alive = Instant::now();
    }

    /// Whether the host let the keep-alive timeout pass without a Keep Alive.
    pub fn keep_alive_expired(&self) -> bool {
        let st = self.st();
        // The spec lets a controller add slack; we allow the timeout plus one KAS granule.
        st.kato_ms > 0 && st.last_keep_alive.elapsed() > Duration::from_millis(st.kato_ms as u64 + 100 * identify::KAS_100MS as u64)
    }
}

/// Starts the keep-alive timer of a new controller on the current core.
pub(crate) fn spawn_keep_alive(nvmf: Arc<Nvmf>, ctrl: Arc<Controller>) {
    reactor::spawn_detached(async move {
        loop {
            let kato = ctrl.kato();
            let period = if kato.is_zero() { Duration::from_secs(1) } else { (kato / 4).clamp(Duration::from_millis(50), Duration::from_secs(5)) };
            reactor::sleep(period).await;
            if ctrl.is_closed() {
                return;
            }
            if ctrl.keep_alive_expired() {
                log::warn!("nvmf: controller {} of {} ({}): keep-alive timeout of {kato:?} expired", ctrl.cntlid, ctrl.subsys.nqn, ctrl.hostnqn);
                nvmf.destroy_controller(&ctrl, "keep-alive timeout");
                return;
            }
        }
    });
}

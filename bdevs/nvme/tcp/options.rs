//! `bdev_nvme_set_options`: the module's defaults for the controllers attached after it (SPDK's
//! `spdk_bdev_nvme_opts`). As in SPDK it is a startup call, refused (-EPERM) once a controller
//! is attached: a queue's keep-alive and timeouts are fixed when it connects.
//!
//! Every SPDK parameter is accepted so that a configuration SPDK's `save_config` wrote loads
//! unchanged. What they do here:
//! - applied: `keep_alive_timeout_ms` (the KATO each Connect asks), `ctrlr_loss_timeout_sec`,
//!   `reconnect_delay_sec`, `fast_io_fail_timeout_sec` (defaults an attach call may override),
//!   `tcp_connect_timeout_ms` (bounds the TCP connect and each step of the connect sequence),
//!   `generate_uuids` (a namespace without an NGUID gets a UUID derived from the controller's
//!   serial number and the namespace ID, the same on every attach, instead of a random one);
//! - applied: `timeout_us` / `timeout_admin_us` / `action_on_timeout` (see [`Timeouts`]): an I/O
//!   command (admin command) unanswered for that long means a hung controller; with `reset` (or
//!   `abort`, handled as `reset`: a controller that does not answer a command does not answer its
//!   Abort either) the queue drops its connection and the controller reconnects, with
//!   `fast_io_fail_timeout_sec` counted from when the oldest unanswered command was sent, so a
//!   hung node holds a host's I/O no longer than a dead one does; with `none` it is only logged;
//! - accepted with no effect: the PCIe and RDMA tuning (`arbitration_burst`, the priority
//!   weights, `rdma_*`, `transport_tos`), polling periods (each reactor polls its queue every
//!   loop), `io_queue_requests`, `delay_cmd_submit`, retry counts (a failed command is not
//!   retried: I/O waits for a reconnect instead), statistics switches, `allow_accel_sequence`,
//!   the DH-HMAC-CHAP lists (the initiator does not authenticate), `disable_auto_failback`
//!   (one path per controller), `enable_flush` (a Flush always reaches a controller with a
//!   volatile write cache: an acknowledged flush must be durable).

use super::reconnect::Policy;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// SPDK's parameters and defaults (v25.09).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// What a command unanswered for `timeout_us` does: `none` (logged), `reset` (the
    /// controller reconnects), `abort` (handled as `reset`).
    pub action_on_timeout: String,
    /// I/O command timeout (0: none).
    pub timeout_us: u64,
    /// Admin command timeout, Keep Alive included (0: `timeout_us`'s rules do not apply to the
    /// admin queue).
    pub timeout_admin_us: u64,
    /// The keep-alive timeout each Connect asks for (0: the controller never times the host
    /// out; tidemark still sends a Keep Alive every 5 s to notice a dead controller).
    pub keep_alive_timeout_ms: u32,
    /// Deprecated name of `transport_retry_count`.
    #[serde(skip_serializing)]
    pub retry_count: Option<u32>,
    pub transport_retry_count: u32,
    pub arbitration_burst: u32,
    pub low_priority_weight: u32,
    pub medium_priority_weight: u32,
    pub high_priority_weight: u32,
    pub nvme_adminq_poll_period_us: u64,
    pub nvme_ioq_poll_period_us: u64,
    pub io_queue_requests: u32,
    pub delay_cmd_submit: bool,
    /// -1 (forever) or more.
    pub bdev_retry_count: i32,
    pub transport_ack_timeout: u8,
    /// Default of the attach parameter of the same name (-1: reconnect forever).
    pub ctrlr_loss_timeout_sec: i64,
    pub reconnect_delay_sec: u32,
    pub fast_io_fail_timeout_sec: u32,
    pub disable_auto_failback: bool,
    /// A namespace without an NGUID gets a UUID derived from the serial number and the NSID.
    pub generate_uuids: bool,
    pub transport_tos: u8,
    pub nvme_error_stat: bool,
    pub rdma_srq_size: u32,
    pub io_path_stat: bool,
    pub allow_accel_sequence: bool,
    pub rdma_max_cq_size: u32,
    pub rdma_cm_event_timeout_ms: u16,
    pub dhchap_digests: Option<Vec<String>>,
    pub dhchap_dhgroups: Option<Vec<String>>,
    pub rdma_umr_per_io: bool,
    /// Bounds the TCP connect and each step of a queue's connect sequence (0: tidemark's 5 s).
    pub tcp_connect_timeout_ms: u64,
    pub enable_flush: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            action_on_timeout: "none".into(),
            timeout_us: 0,
            timeout_admin_us: 0,
            keep_alive_timeout_ms: 10_000,
            retry_count: None,
            transport_retry_count: 4,
            arbitration_burst: 0,
            low_priority_weight: 0,
            medium_priority_weight: 0,
            high_priority_weight: 0,
            nvme_adminq_poll_period_us: 10_000,
            nvme_ioq_poll_period_us: 0,
            io_queue_requests: 0,
            delay_cmd_submit: true,
            bdev_retry_count: 3,
            transport_ack_timeout: 0,
            ctrlr_loss_timeout_sec: 0,
            reconnect_delay_sec: 0,
            fast_io_fail_timeout_sec: 0,
            disable_auto_failback: false,
            generate_uuids: false,
            transport_tos: 0,
            nvme_error_stat: false,
            rdma_srq_size: 0,
            io_path_stat: false,
            allow_accel_sequence: false,
            rdma_max_cq_size: 0,
            rdma_cm_event_timeout_ms: 0,
            dhchap_digests: None,
            dhchap_dhgroups: None,
            rdma_umr_per_io: false,
            tcp_connect_timeout_ms: 0,
            enable_flush: false,
        }
    }
}

/// SPDK's command timeouts (`timeout_us`, `timeout_admin_us`, `action_on_timeout`), fixed for a
/// controller when it is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// An I/O command unanswered for this long is timed out.
    pub io: Option<Duration>,
    /// An admin command (a Keep Alive too) unanswered for this long is timed out.
    pub admin: Option<Duration>,
    /// A timed-out command resets the controller (`reset`, `abort`); else it is only logged.
    pub reset: bool,
}

/// The connect sequence's bound when `tcp_connect_timeout_ms` is 0.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The Keep Alive period when the keep-alive timeout is 0 (the controller never times out).
const KEEP_ALIVE_WITHOUT_KATO: Duration = Duration::from_secs(5);

impl Options {
    /// SPDK's checks, then tidemark's refusals; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.timeout_us == 0 && self.timeout_admin_us != 0 {
            return Err("field `timeout_admin_us`: needs `timeout_us` as well".into());
        }
        if self.bdev_retry_count < -1 {
            return Err("field `bdev_retry_count`: must be -1 (forever) or at least 0".into());
        }
        if !["none", "reset", "abort"].contains(&self.action_on_timeout.as_str()) {
            return Err(format!("field `action_on_timeout`: {:?} is not none, reset or abort", self.action_on_timeout));
        }
        self.policy().map(|_| ())
    }

    /// The command timeouts of the controllers attached after these options.
    pub fn timeouts(&self) -> Timeouts {
        let d = |us: u64| (us > 0).then(|| Duration::from_micros(us));
        Timeouts { io: d(self.timeout_us), admin: d(self.timeout_admin_us), reset: self.action_on_timeout != "none" }
    }

    /// The reconnect policy an attach call without its own timeouts gets.
    pub fn policy(&self) -> Result<Policy, String> {
        Policy::from_params(self.ctrlr_loss_timeout_sec, self.reconnect_delay_sec, self.fast_io_fail_timeout_sec)
    }

    pub fn connect_timeout(&self) -> Duration {
        match self.tcp_connect_timeout_ms {
            0 => DEFAULT_CONNECT_TIMEOUT,
            ms => Duration::from_millis(ms),
        }
    }

    /// How often the admin queue sends a Keep Alive for a keep-alive timeout of `kato_ms`:
    /// half of it, so that one lost round trip does not time the host out.
    pub fn keep_alive_period(kato_ms: u32) -> Duration {
        match kato_ms {
            0 => KEEP_ALIVE_WITHOUT_KATO,
            ms => Duration::from_millis(ms.max(2) as u64 / 2),
        }
    }

    /// The call that restores these options (save_config), when they are not the defaults.
    pub fn config_call(&self) -> Option<(&'static str, serde_json::Value)> {
        let mut normal = self.clone();
        normal.retry_count = None;
        (normal != Options::default()).then(|| ("bdev_nvme_set_options", serde_json::to_value(&normal).unwrap_or_default()))
    }

    /// Folds the deprecated `retry_count` into `transport_retry_count`.
    pub fn normalize(mut self) -> Options {
        if let Some(n) = self.retry_count.take() {
            self.transport_retry_count = n;
        }
        self
    }
}

/// The UUID of a namespace without an NGUID with `generate_uuids` (SPDK derives it from the
/// serial number and the namespace ID too, so that it is stable across attaches; the exact
/// derivation here is tidemark's own: a name-based UUID, version 5).
pub fn generated_uuid(serial: &str, nsid: u32) -> uuid::Uuid {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("nvme:{}:{nsid}", serial.trim()).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spdk_defaults_parse_validate_and_are_not_saved() {
        let o: Options = serde_json::from_value(json!({})).unwrap();
        assert_eq!(o, Options::default());
        assert!(o.validate().is_ok());
        assert_eq!(o.config_call(), None);
        assert_eq!(o.connect_timeout(), DEFAULT_CONNECT_TIMEOUT);
    }

    #[test]
    fn what_spdk_save_config_writes_loads() {
        // The shape of SPDK v25.09's save_config output for this method.
        let spdk = json!({
            "action_on_timeout": "none", "timeout_us": 0, "timeout_admin_us": 0, "keep_alive_timeout_ms": 10000,
            "arbitration_burst": 0, "low_priority_weight": 0, "medium_priority_weight": 0, "high_priority_weight": 0,
            "nvme_adminq_poll_period_us": 10000, "nvme_ioq_poll_period_us": 0, "io_queue_requests": 0,
            "delay_cmd_submit": true, "transport_retry_count": 4, "bdev_retry_count": 3, "transport_ack_timeout": 0,
            "ctrlr_loss_timeout_sec": 0, "reconnect_delay_sec": 0, "fast_io_fail_timeout_sec": 0,
            "disable_auto_failback": false, "generate_uuids": false, "transport_tos": 0, "nvme_error_stat": false,
            "rdma_srq_size": 0, "io_path_stat": false, "allow_accel_sequence": false, "rdma_max_cq_size": 0,
            "rdma_cm_event_timeout_ms": 0, "dhchap_digests": ["sha256", "sha384", "sha512"],
            "dhchap_dhgroups": ["null", "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192"],
            "rdma_umr_per_io": false, "tcp_connect_timeout_ms": 0, "enable_flush": false
        });
        let o: Options = serde_json::from_value(spdk).unwrap();
        assert!(o.validate().is_ok());
        assert!(serde_json::from_value::<Options>(json!({"no_such_option": 1})).is_err());
    }

    #[test]
    fn spdk_checks_and_tidemark_refusals_name_the_field() {
        let bad = |v: serde_json::Value| serde_json::from_value::<Options>(v).unwrap().validate().unwrap_err();
        assert!(bad(json!({"timeout_admin_us": 5})).contains("timeout_admin_us"));
        assert!(bad(json!({"bdev_retry_count": -2})).contains("bdev_retry_count"));
        let ok = |v: serde_json::Value| serde_json::from_value::<Options>(v).unwrap().validate().map(|()| ());
        assert_eq!(ok(json!({"timeout_us": 500_000, "timeout_admin_us": 2_000_000, "action_on_timeout": "reset"})), Ok(()));
        assert_eq!(ok(json!({"timeout_us": 500_000, "action_on_timeout": "abort"})), Ok(()));
        assert!(bad(json!({"action_on_timeout": "explode"})).contains("explode"));
        assert!(bad(json!({"ctrlr_loss_timeout_sec": 10})).contains("reconnect_delay_sec"));
        let o: Options = serde_json::from_value(json!({"ctrlr_loss_timeout_sec": -1, "reconnect_delay_sec": 2, "fast_io_fail_timeout_sec": 4})).unwrap();
        let p = o.policy().unwrap();
        assert_eq!((p.ctrlr_loss, p.reconnect_delay, p.fast_io_fail), (None, Duration::from_secs(2), Some(Duration::from_secs(4))));
    }

    #[test]
    fn command_timeouts_follow_spdk_parameters() {
        let t = |v: serde_json::Value| serde_json::from_value::<Options>(v).unwrap().timeouts();
        assert_eq!(t(json!({})), Timeouts { io: None, admin: None, reset: false });
        let ms = Duration::from_millis;
        assert_eq!(t(json!({"timeout_us": 500_000, "action_on_timeout": "reset"})), Timeouts { io: Some(ms(500)), admin: None, reset: true });
        assert_eq!(
            t(json!({"timeout_us": 1000, "timeout_admin_us": 3000, "action_on_timeout": "abort"})),
            Timeouts { io: Some(ms(1)), admin: Some(ms(3)), reset: true }
        );
        assert!(!t(json!({"timeout_us": 1000})).reset, "`none` only logs");
    }

    #[test]
    fn changed_options_are_saved_and_the_old_retry_name_is_folded() {
        let o: Options = serde_json::from_value(json!({"keep_alive_timeout_ms": 4000, "retry_count": 7})).unwrap();
        let o = o.normalize();
        assert_eq!(o.transport_retry_count, 7);
        let (m, p) = o.config_call().unwrap();
        assert_eq!(m, "bdev_nvme_set_options");
        assert_eq!(p["keep_alive_timeout_ms"], 4000);
        assert!(p.get("retry_count").is_none());
        let back: Options = serde_json::from_value(p).unwrap();
        assert_eq!(back, o, "save_config round trip");
    }

    #[test]
    fn keep_alives_go_at_half_the_timeout_and_without_one_still_go() {
        assert_eq!(Options::keep_alive_period(10_000), Duration::from_secs(5));
        assert_eq!(Options::keep_alive_period(0), KEEP_ALIVE_WITHOUT_KATO);
        assert_eq!(Options::keep_alive_period(1), Duration::from_millis(1));
    }

    #[test]
    fn generated_uuids_are_stable_per_serial_and_namespace() {
        assert_eq!(generated_uuid("SN1 ", 1), generated_uuid("SN1", 1));
        assert_ne!(generated_uuid("SN1", 1), generated_uuid("SN1", 2));
        assert_ne!(generated_uuid("SN1", 1), generated_uuid("SN2", 1));
    }
}

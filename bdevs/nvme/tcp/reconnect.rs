//! Connection loss (SPDK's `bdev_nvme` reset path): when a queue's connection or the admin
//! queue's keep-alive fails, the controller's I/O waits while a recovery thread reconnects
//! every `reconnect_delay_sec`; once `fast_io_fail_timeout_sec` has passed, waiting and new I/O
//! fail with an I/O error (so that a mirror can drop the leg); once `ctrlr_loss_timeout_sec`
//! has passed, the controller stops reconnecting and is deleted with its bdevs, as SPDK does,
//! unless something holds one of them (a mirror leg, an export): then it stays `lost`, its I/O
//! failing, until it is detached or reset.
//!
//! The clock of the two timeouts starts when the controller stopped answering, as far as the
//! host can tell: when the connection broke, or when the oldest command a command timeout (or
//! the Keep Alive a keep-alive timeout) caught was sent. So `fast_io_fail_timeout_sec` bounds
//! how long a host's I/O waits on a hung node as on a dead one, not that plus the detection.
//! A reconnect attempt to a hung node blocks for up to the connect timeout: an attempt never
//! runs past the moment I/O must fail (its timeout is cut to it), so I/O fails on time.
//!
//! The connect sequence blocks (connect, ICReq, Fabrics Connect, each with a timeout), so it
//! runs on a thread of its own that exists only while the controller is down, never on a
//! reactor; the cores only swap the new sockets into their queues.

use super::options::Timeouts;
use super::queue::{QueueError, QueueObserver, QueueParams};
use super::{Shared, State};
use crate::nvmf::initiator::{Controller, Error as HostError, HostStream, Qpair, QpairOptions};
use crate::reactor::{self, ReactorHandle};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Entries of each I/O queue.
pub const IO_QUEUE_SIZE: u16 = 128;

/// SPDK's three timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// None: reconnect forever (-1); zero: one attempt, at once.
    pub ctrlr_loss: Option<Duration>,
    pub reconnect_delay: Duration,
    /// None: I/O waits until the controller is lost.
    pub fast_io_fail: Option<Duration>,
}

impl Policy {
    /// From SPDK's parameters, with SPDK's checks.
    pub fn from_params(ctrlr_loss_sec: i64, reconnect_delay_sec: u32, fast_io_fail_sec: u32) -> Result<Policy, String> {
        let secs = |s: u64| Duration::from_secs(s);
        match ctrlr_loss_sec {
            n if n < -1 => return Err("field `ctrlr_loss_timeout_sec`: must be -1 (forever) or at least 0".into()),
            0 if reconnect_delay_sec != 0 || fast_io_fail_sec != 0 => {
                return Err("fields `reconnect_delay_sec` and `fast_io_fail_timeout_sec` must be 0 when `ctrlr_loss_timeout_sec` is 0".into())
            }
            0 => {}
            _ if reconnect_delay_sec == 0 => return Err("field `reconnect_delay_sec`: must be set when `ctrlr_loss_timeout_sec` is not 0".into()),
            n if n > 0 && reconnect_delay_sec as i64 > n => return Err("field `reconnect_delay_sec`: must not exceed `ctrlr_loss_timeout_sec`".into()),
            n if n > 0 && fast_io_fail_sec as i64 > n => return Err("field `fast_io_fail_timeout_sec`: must not exceed `ctrlr_loss_timeout_sec`".into()),
            _ => {}
        }
        if fast_io_fail_sec != 0 && fast_io_fail_sec < reconnect_delay_sec {
            return Err("field `fast_io_fail_timeout_sec`: must not be less than `reconnect_delay_sec`".into());
        }
        Ok(Policy {
            ctrlr_loss: (ctrlr_loss_sec >= 0).then(|| secs(ctrlr_loss_sec as u64)),
            reconnect_delay: secs(reconnect_delay_sec as u64),
            fast_io_fail: (fast_io_fail_sec > 0).then(|| secs(fast_io_fail_sec as u64)),
        })
    }
}

/// What the recovery does next, `elapsed` after the connection was lost, after `attempts`
/// reconnects failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Reconnect,
    /// Fail the waiting I/O and refuse new I/O, and keep reconnecting.
    FailIo,
    /// Give up: fail the I/O and stop reconnecting.
    Lose,
}

pub fn next_step(p: &Policy, elapsed: Duration, attempts: u32, io_failed: bool) -> Step {
    let lost = match p.ctrlr_loss {
        None => false,
        Some(d) if d.is_zero() => attempts >= 1,
        Some(d) => elapsed >= d,
    };
    if lost {
        Step::Lose
    } else if !io_failed && p.fast_io_fail.is_some_and(|f| elapsed >= f) {
        Step::FailIo
    } else {
        Step::Reconnect
    }
}

/// How long the recovery sleeps before its next step.
pub fn next_wait(p: &Policy, elapsed: Duration, io_failed: bool) -> Duration {
    let mut w = p.reconnect_delay;
    if let (false, Some(f)) = (io_failed, p.fast_io_fail) {
        w = w.min(f.saturating_sub(elapsed));
    }
    if let Some(l) = p.ctrlr_loss {
        w = w.min(l.saturating_sub(elapsed));
    }
    w
}

/// What a reconnect needs.
pub struct Target {
    pub reactors: ReactorHandle,
    pub addr: SocketAddr,
    pub subnqn: String,
    pub opts: QpairOptions,
    pub cores: usize,
    pub policy: Policy,
    /// `bdev_nvme_set_options {timeout_us, timeout_admin_us, action_on_timeout}` at attach.
    pub timeouts: Timeouts,
    /// The keyring key TLS uses (held: it cannot be removed while the controller exists).
    pub psk: Option<crate::keyring::KeyRef>,
}

/// Connects I/O queue `core + 1` and returns its connection (plain or TLS, with its session)
/// and what it negotiated, for the bdev's queue on that core.
pub fn connect_queue(c: &mut Controller, core: usize, timeouts: Timeouts) -> Result<(HostStream, QueueParams), HostError> {
    let q: Qpair = c.connect_io(core as u16 + 1, IO_QUEUE_SIZE)?;
    let qp = QueueParams { hdgst: q.hdgst, ddgst: q.ddgst, maxh2cdata: q.maxh2cdata, max_inline: q.max_inline, depth: IO_QUEUE_SIZE, timeouts };
    Ok((q.into_stream(), qp))
}

/// Starts the recovery of `shared`'s controller on a thread of its own; `since`: when the
/// controller stopped answering (the timeouts' clock starts there).
pub fn spawn_recovery(shared: Arc<Shared>, since: Instant) {
    let name = shared.name.clone();
    let spawned = std::thread::Builder::new().name(format!("nvme-reconnect-{}", shared.id)).spawn(move || recover(shared, since));
    if let Err(e) = spawned {
        log::error!("NVMe/TCP controller {name}: cannot start its reconnect thread: {e}");
    }
}

/// The recovery of `shared`'s controller; runs on its own thread until the controller is back,
/// lost or detached.
fn recover(shared: Arc<Shared>, t0: Instant) {
    let t = &shared.target;
    let (mut attempts, mut io_failed) = (0, false);
    // The keep-alive task of the old admin queue ends.
    shared.generation.fetch_add(1, Ordering::SeqCst);
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        match next_step(&t.policy, t0.elapsed(), attempts, io_failed) {
            Step::Lose => {
                log::error!("NVMe/TCP controller {}: lost (no reconnect within ctrlr_loss_timeout_sec); its I/O fails", shared.name);
                shared.set_state(State::Lost);
                fail_io(&shared);
                match shared.remove() {
                    Ok(()) => log::error!("NVMe/TCP controller {}: deleted with its bdevs after ctrlr_loss_timeout_sec", shared.name),
                    Err(e) => log::error!("NVMe/TCP controller {}: stays lost, not deleted: {} (detach it once that lets go)", shared.name, e.message),
                }
                return;
            }
            Step::FailIo => {
                log::warn!("NVMe/TCP controller {}: fast_io_fail_timeout_sec passed; I/O fails while it reconnects", shared.name);
                io_failed = true;
                shared.set_state(State::Failed);
                fail_io(&shared);
                continue;
            }
            Step::Reconnect => {}
        }
        attempts += 1;
        match reconnect(&shared, attempt_timeout(&t.policy, t0.elapsed(), io_failed, t.opts.timeout)) {
            Ok(()) => {
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
                shared.set_state(State::Enabled);
                shared.recovering.store(false, Ordering::SeqCst);
                log::info!("NVMe/TCP controller {}: reconnected after {:?} ({attempts} attempts)", shared.name, t0.elapsed());
                // A queue whose new connection broke while the others were being reset told
                // nobody (this recovery was still running): start another one.
                let id = shared.id;
                if t.reactors.call_all(move || super::queue_is_down(id)).is_ok_and(|down| down.into_iter().any(|d| d)) {
                    shared.queue_failed(&QueueError::Closed);
                }
                return;
            }
            Err(e) => log::warn!("NVMe/TCP controller {}: reconnect attempt {attempts} failed: {e}", shared.name),
        }
        sleep_unless(next_wait(&t.policy, t0.elapsed(), io_failed), || shared.stop.load(Ordering::Relaxed));
    }
}

/// Sleeps for `d`, looking at `stopped` every 100 ms at most (a detach or a shutdown does not
/// wait for a whole reconnect delay); false if it was stopped.
pub fn sleep_unless(d: Duration, stopped: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if stopped() {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
    }
}

fn fail_io(shared: &Shared) {
    let id = shared.id;
    if let Err(e) = shared.target.reactors.call_all(move || super::fail_queue(id)) {
        log::error!("NVMe/TCP controller {}: failing its I/O: {e}", shared.name);
    }
}

/// How long each step of a reconnect attempt may wait: the connect timeout, cut to the moment
/// the waiting I/O must fail (or the controller is lost), but not below 50 ms: a live
/// controller answers a connect on a working network in far less, and an attempt cut to
/// nothing would never succeed.
pub fn attempt_timeout(p: &Policy, elapsed: Duration, io_failed: bool, connect: Duration) -> Duration {
    next_wait(&Policy { reconnect_delay: connect, ..*p }, elapsed, io_failed).max(Duration::from_millis(50))
}

/// One attempt: connects the admin and every I/O queue (each step waiting up to `timeout`),
/// then gives the cores their new connections.
pub fn reconnect(shared: &Arc<Shared>, timeout: Duration) -> Result<(), HostError> {
    let t = &shared.target;
    let opts = QpairOptions { timeout, ..t.opts.clone() };
    let mut c = Controller::connect(t.addr, &t.subnqn, &opts)?;
    let granted = c.set_queue_count(t.cores as u16)?;
    if (granted as usize) < t.cores {
        return Err(HostError::Protocol(format!("the controller grants {granted} I/O queues, {} reactor cores need one each", t.cores)));
    }
    let mut queues = Vec::with_capacity(t.cores);
    for core in 0..t.cores {
        queues.push(connect_queue(&mut c, core, t.timeouts)?);
    }
    // The admin queue's own commands are timed by the admin task from now on.
    c.opts.timeout = t.opts.timeout;
    let id = shared.id;
    for (core, (stream, qp)) in queues.into_iter().enumerate() {
        t.reactors.call(core, move || super::reset_queue(id, stream, qp)).map_err(|e| HostError::Protocol(e.to_string()))?;
    }
    start_keep_alive(c, shared.clone());
    Ok(())
}

/// Hands the admin queue to core 0, which sends the keep-alives and handles the
/// controller's asynchronous events ([`super::admin`]).
pub fn start_keep_alive(c: Controller, shared: Arc<Shared>) {
    let generation = shared.generation.load(Ordering::SeqCst);
    let period = super::options::Options::keep_alive_period(c.opts.kato_ms);
    let reactors = shared.target.reactors.clone();
    let admin_timeout = shared.target.timeouts.admin;
    reactors.send(0, move || reactor::spawn_detached(super::admin::run(c, shared, period, admin_timeout, generation)));
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn spdk_defaults_try_once_then_lose() {
        let p = Policy::from_params(0, 0, 0).unwrap();
        assert_eq!(next_step(&p, S(0), 0, false), Step::Reconnect);
        assert_eq!(next_step(&p, S(0), 1, false), Step::Lose);
    }

    #[test]
    fn io_waits_until_fast_io_fail_then_fails_while_reconnecting_until_loss() {
        let p = Policy::from_params(30, 2, 5).unwrap();
        assert_eq!(next_step(&p, S(0), 0, false), Step::Reconnect);
        assert_eq!(next_step(&p, S(4), 2, false), Step::Reconnect);
        assert_eq!(next_step(&p, S(5), 3, false), Step::FailIo);
        // Once failed, it keeps reconnecting.
        assert_eq!(next_step(&p, S(6), 3, true), Step::Reconnect);
        assert_eq!(next_step(&p, S(29), 14, true), Step::Reconnect);
        assert_eq!(next_step(&p, S(30), 15, true), Step::Lose);
        // Loss wins over a fast fail due at the same time.
        let q = Policy::from_params(5, 1, 5).unwrap();
        assert_eq!(next_step(&q, S(5), 5, false), Step::Lose);
    }

    #[test]
    fn waits_stop_at_the_next_deadline() {
        let p = Policy::from_params(30, 10, 12).unwrap();
        assert_eq!(next_wait(&p, S(0), false), S(10));
        assert_eq!(next_wait(&p, S(10), false), S(2), "wakes for fast_io_fail");
        assert_eq!(next_wait(&p, S(12), true), S(10));
        assert_eq!(next_wait(&p, S(25), true), S(5), "wakes for ctrlr_loss");
        let forever = Policy::from_params(-1, 3, 0).unwrap();
        assert_eq!(forever.ctrlr_loss, None);
        assert_eq!(next_step(&forever, S(1_000_000), 1000, false), Step::Reconnect);
        assert_eq!(next_wait(&forever, S(1_000_000), false), S(3));
    }

    #[test]
    fn spdk_parameter_checks() {
        assert!(Policy::from_params(-2, 1, 0).is_err());
        assert!(Policy::from_params(0, 1, 0).is_err(), "a delay without reconnects");
        assert!(Policy::from_params(10, 0, 0).is_err(), "reconnects need a delay");
        assert!(Policy::from_params(10, 11, 0).is_err());
        assert!(Policy::from_params(10, 2, 11).is_err());
        assert!(Policy::from_params(10, 5, 3).is_err(), "fast fail before the first retry");
        assert!(Policy::from_params(-1, 5, 30).is_ok());
    }

    #[test]
    fn a_reconnect_attempt_never_runs_past_the_moment_io_must_fail() {
        let p = Policy::from_params(120, 1, 2).unwrap();
        let ms = Duration::from_millis;
        // Far from the deadline: the whole connect timeout.
        assert_eq!(attempt_timeout(&p, ms(0), false, S(1)), S(1));
        // 500 ms before I/O fails: cut to it, so a hung node's half-open connect cannot hold
        // the waiting I/O past fast_io_fail_timeout_sec.
        assert_eq!(attempt_timeout(&p, ms(1500), false, S(5)), ms(500));
        // I/O has failed: only the loss deadline cuts it.
        assert_eq!(attempt_timeout(&p, ms(2500), true, S(5)), S(5));
        assert_eq!(attempt_timeout(&p, ms(118_000), true, S(5)), S(2));
        // Never below 50 ms.
        assert_eq!(attempt_timeout(&p, ms(1990), false, S(5)), ms(50));
    }
}

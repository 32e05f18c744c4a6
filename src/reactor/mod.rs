//! The reactor: one thread per core, each polling its message ring, its devices and its
//! sockets, with no locks between cores (DESIGN §2).

#[doc(hidden)]
pub mod alloc;
mod clock;
mod core;
mod io;
mod mailbox;
mod net;
mod recv;
mod thread;
mod timer;
mod tls;
mod workers;

pub use self::clock::{monotonic_ns, Clock};
pub use self::core::{
    call_on, consume_budget, core_count, current_index, now_ns, send_to, spawn, spawn_detached, task_bytes, try_current, with_core, yield_now, Core, Poller,
};
pub use self::io::{IoDriver, Registration};
pub use self::mailbox::{Mailbox, Message, ReactorCounters, MESSAGE_RING_CAPACITY};
pub use self::net::{connection_cap, connection_stats, set_fd_reserve, Accepted, ConnectionSlot, TcpListener, TcpStream};
pub use self::recv::{RecvBuf, Source, RECV_BUF_DEFAULT};
pub use self::thread::{CallError, ManualCores, PollMode, ReactorHandle, ReactorOptions, Reactors, CALL_TIMEOUT};
pub use self::timer::{sleep, sleep_until, timeout, Elapsed, Sleep};
pub use self::tls::{Channel, TlsStream, TLS_CONNECTION_BYTES};
pub use self::workers::{Worker, Workers};

/// Parses a core mask (`0x3`, `3`, `[0,1]`) into CPU ids.
pub fn parse_cpumask(mask: &str) -> Result<Vec<usize>, String> {
    let m = mask.trim();
    if let Some(list) = m.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        let mut cpus = Vec::new();
        for part in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            cpus.push(part.parse::<usize>().map_err(|_| format!("bad CPU id {part:?} in core mask {mask:?}"))?);
        }
        if cpus.is_empty() {
            return Err(format!("core mask {mask:?} selects no CPU"));
        }
        return Ok(cpus);
    }
    let hex = m.strip_prefix("0x").or_else(|| m.strip_prefix("0X")).unwrap_or(m);
    let bits = u128::from_str_radix(hex, 16).map_err(|_| format!("core mask {mask:?} is not a hex number like 0x3"))?;
    let cpus: Vec<usize> = (0..128).filter(|b| bits & (1u128 << b) != 0).collect();
    if cpus.is_empty() {
        return Err(format!("core mask {mask:?} selects no CPU"));
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn cpumask_forms() {
        assert_eq!(parse_cpumask("0x2").unwrap(), vec![1]);
        assert_eq!(parse_cpumask("0x3").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpumask("5").unwrap(), vec![0, 2]);
        assert_eq!(parse_cpumask("[1, 3]").unwrap(), vec![1, 3]);
        assert!(parse_cpumask("0x0").is_err());
        assert!(parse_cpumask("zz").is_err());
        assert!(parse_cpumask("[]").is_err());
    }

    #[test]
    fn manual_cores_run_tasks_timers_and_messages_deterministically() {
        let cores = ManualCores::new(2);
        let log = Rc::new(std::cell::RefCell::new(Vec::new()));
        let l = log.clone();
        cores.enter(0, || {
            spawn_detached(async move {
                l.borrow_mut().push(("start", now_ns()));
                sleep(Duration::from_micros(10)).await;
                l.borrow_mut().push(("slept", now_ns()));
                let v = call_on(1, || current_index() * 10).await;
                l.borrow_mut().push(("called", v as u64));
            })
        });
        cores.run_until_idle();
        assert_eq!(cores.next_timer(), Some(10_000));
        cores.advance_to(10_000);
        cores.run_until_idle();
        assert_eq!(*log.borrow(), vec![("start", 0), ("slept", 10_000), ("called", 10)]);
    }

    #[test]
    fn reactors_run_messages_and_sleep_when_idle() {
        let opts = ReactorOptions { cpus: vec![0, 0], poll_mode: PollMode::Adaptive, idle_us: 100, pin: false };
        let r = Reactors::start(&opts).unwrap();
        let h = r.handle();
        let hits = Arc::new(AtomicUsize::new(0));
        for i in 0..1000 {
            let hits = hits.clone();
            h.send(i % 2, move || {
                hits.fetch_add(1, Ordering::Relaxed);
            });
        }
        // Each ring is FIFO: once both cores answered, every earlier message has run.
        assert_eq!(h.call(0, current_index).unwrap(), 0);
        assert_eq!(h.call(1, current_index).unwrap(), 1);
        assert_eq!(hits.load(Ordering::Relaxed), 1000);
        // A task on core 0 sleeping on a timer wakes on time although the core sleeps.
        let v = h
            .call_async(0, Duration::from_secs(5), || async {
                let t = now_ns();
                sleep(Duration::from_millis(20)).await;
                now_ns() - t
            })
            .unwrap();
        assert!(v >= 20_000_000, "slept only {v} ns");
        std::thread::sleep(Duration::from_millis(100));
        let c = &h.mailbox(0).counters;
        assert!(c.sleep_ns.load(Ordering::Relaxed) > 0, "an idle adaptive reactor must sleep");
        r.stop();
    }

    #[test]
    fn cross_core_wake_reaches_a_sleeping_core() {
        // The safety-net sleep is set far beyond the call's timeout: only the notifier can wake
        // a core in time, so a broken wake-up fails here instead of costing 500 ms.
        let opts = ReactorOptions { cpus: vec![0, 0], poll_mode: PollMode::Adaptive, idle_us: 10, pin: false };
        let r = Reactors::start_with_max_sleep(&opts, Duration::from_secs(3600)).unwrap();
        let h = r.handle();
        let asleep = |core: usize| {
            // A sleeping reactor runs no loop iterations.
            let loops = &h.mailbox(core).counters.loops;
            let before = loops.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
            loops.load(Ordering::Relaxed) == before
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !(asleep(0) && asleep(1)) {
            assert!(std::time::Instant::now() < deadline, "idle adaptive reactors never went to sleep");
        }
        let woken = |core: usize| h.mailbox(core).counters.wakeups.load(Ordering::Relaxed);
        let (w0, w1) = (woken(0), woken(1));
        // The test thread wakes core 0, core 0 wakes core 1, core 1's answer wakes core 0.
        let got = h
            .call_async(0, Duration::from_secs(5), || async {
                let flag = Rc::new(Cell::new(0));
                let v = call_on(1, || 7usize).await;
                flag.set(v);
                flag.get()
            })
            .expect("a sleeping core was not woken by its notifier");
        assert_eq!(got, 7);
        assert!(woken(0) > w0 && woken(1) > w1, "both cores were asleep and must have been woken through the notifier");
        r.stop();
    }

    #[test]
    fn a_reader_that_drained_the_last_data_sees_the_fin_that_came_in_the_same_edge() {
        let r = Reactors::start(&ReactorOptions { cpus: vec![0], poll_mode: PollMode::Adaptive, idle_us: 10, pin: false }).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let got = r
            .handle()
            .call_async(0, Duration::from_secs(10), move || async move {
                let s = TcpStream::from_std(s).unwrap();
                // Data and FIN arrive together, and the reactor takes their one edge, before the
                // reader looks.
                std::io::Write::write_all(&mut c, b"last").unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                sleep(Duration::from_millis(100)).await;
                let tick = s.read_tick();
                let mut buf = [0u8; 64];
                let n = s.try_read(&mut buf).unwrap();
                // A short read: the socket looked drained, so a reader waits for the next edge.
                let edge = timeout(Duration::from_secs(2), s.readable(tick)).await;
                (n, edge.is_ok(), s.try_read(&mut buf).ok())
            })
            .unwrap();
        assert_eq!(got, (4, true, Some(0)), "the wait for readiness after the drained data must end at once: the peer closed");
        r.stop();
    }

    #[test]
    fn a_task_whose_io_completes_in_place_still_lets_the_core_run_others() {
        let cores = ManualCores::new(1);
        let stop = Rc::new(std::cell::Cell::new(false));
        let ios = Rc::new(std::cell::Cell::new(0u32));
        let (s1, n1, s2) = (stop.clone(), ios.clone(), stop.clone());
        cores.enter(0, || {
            // A RAM bdev's I/O: always complete at the first poll.
            spawn_detached(async move {
                while !s1.get() && n1.get() < 1_000_000 {
                    crate::bdev::IoFuture::ready(Ok(())).await.unwrap();
                    n1.set(n1.get() + 1);
                }
            });
            spawn_detached(async move { s2.set(true) });
        });
        cores.run_until_idle();
        assert!(stop.get());
        assert!(ios.get() <= 2 * self::core::TASK_BUDGET, "the looping task ran {} I/Os before the other task got a turn", ios.get());
    }
}

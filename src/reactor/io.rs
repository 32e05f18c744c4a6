//! Readiness of file descriptors on one core (epoll through mio, edge-triggered).
//!
//! A busy reactor asks the kernel for events without waiting; an idle one waits here, and the
//! core's eventfd (the mailbox notifier) and the eventfds of its io_uring rings wake it.

use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll as TaskPoll, Waker};
use std::time::Duration;

/// Token of the mailbox notifier.
pub(crate) const NOTIFY_TOKEN: Token = Token(usize::MAX);
/// Token of descriptors that only wake the reactor (their poller does the work).
pub(crate) const WAKE_ONLY_TOKEN: Token = Token(usize::MAX - 1);

#[derive(Default)]
pub struct SourceState {
    read_tick: Cell<u64>,
    write_tick: Cell<u64>,
    /// The peer closed its side (or the socket failed): reads never wait again. Epoll is
    /// edge-triggered and the FIN may come in the same edge as the last data, so a reader
    /// that drained the data and waits for a further edge would wait forever.
    read_closed: Cell<bool>,
    /// Likewise for writes.
    write_closed: Cell<bool>,
    read_waker: RefCell<Option<Waker>>,
    write_waker: RefCell<Option<Waker>>,
}

pub struct IoDriver {
    poll: RefCell<Poll>,
    events: RefCell<Events>,
    sources: RefCell<Slab<Rc<SourceState>>>,
}

impl IoDriver {
    pub fn new() -> io::Result<Self> {
        Ok(IoDriver { poll: RefCell::new(Poll::new()?), events: RefCell::new(Events::with_capacity(256)), sources: RefCell::new(Slab::new()) })
    }

    pub(crate) fn new_notifier(&self) -> io::Result<mio::Waker> {
        mio::Waker::new(self.poll.borrow().registry(), NOTIFY_TOKEN)
    }

    /// Waits for readiness for at most `timeout`; wakes the tasks waiting on ready sources.
    /// Returns how many source events were delivered.
    pub(crate) fn poll(&self, timeout: Option<Duration>) -> usize {
        let mut events = self.events.borrow_mut();
        if let Err(e) = self.poll.borrow_mut().poll(&mut events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                log::error!("epoll failed: {e}");
            }
            return 0;
        }
        let mut n = 0;
        for ev in events.iter() {
            let tok = ev.token();
            if tok == NOTIFY_TOKEN || tok == WAKE_ONLY_TOKEN {
                continue;
            }
            let Some(state) = self.sources.borrow().get(tok.0).cloned() else { continue };
            n += 1;
            if ev.is_read_closed() || ev.is_error() {
                state.read_closed.set(true);
            }
            if ev.is_write_closed() || ev.is_error() {
                state.write_closed.set(true);
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                state.read_tick.set(state.read_tick.get().wrapping_add(1));
                if let Some(w) = state.read_waker.borrow_mut().take() {
                    w.wake();
                }
            }
            if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                state.write_tick.set(state.write_tick.get().wrapping_add(1));
                if let Some(w) = state.write_waker.borrow_mut().take() {
                    w.wake();
                }
            }
        }
        n
    }

    /// Whether any socket or other readiness source is registered (a busy reactor with none
    /// skips the epoll call; the wake-only descriptors matter only when it sleeps).
    pub(crate) fn has_sources(&self) -> bool {
        !self.sources.borrow().is_empty()
    }

    /// Registers a descriptor whose readiness only needs to wake the reactor.
    pub fn register_wake_only(&self, fd: RawFd) -> io::Result<()> {
        self.poll.borrow().registry().register(&mut mio::unix::SourceFd(&fd), WAKE_ONLY_TOKEN, Interest::READABLE)
    }

    pub fn deregister_wake_only(&self, fd: RawFd) {
        let _ = self.poll.borrow().registry().deregister(&mut mio::unix::SourceFd(&fd));
    }
}

/// A descriptor registered with the current core's readiness driver; deregistered on drop.
pub struct Registration {
    token: usize,
    fd: RawFd,
    state: Rc<SourceState>,
}

impl Registration {
    /// Registers `fd` on the current core for read and write readiness.
    pub fn new(fd: RawFd) -> io::Result<Self> {
        super::with_core(|core| {
            let io = core.io.as_ref().ok_or_else(|| io::Error::other("this core has no I/O driver"))?;
            let state = Rc::new(SourceState::default());
            let token = io.sources.borrow_mut().insert(state.clone());
            let r = io.poll.borrow().registry().register(&mut mio::unix::SourceFd(&fd), Token(token), Interest::READABLE | Interest::WRITABLE);
            if let Err(e) = r {
                io.sources.borrow_mut().remove(token);
                return Err(e);
            }
            Ok(Registration { token, fd, state })
        })
    }

    pub fn read_tick(&self) -> u64 {
        self.state.read_tick.get()
    }

    pub fn write_tick(&self) -> u64 {
        self.state.write_tick.get()
    }

    /// Completes when a read-readiness edge arrives after `tick` was read.
    pub fn readable(&self, tick: u64) -> ReadyFuture<'_> {
        ReadyFuture { reg: self, tick, write: false }
    }

    /// Completes when a write-readiness edge arrives after `tick` was read.
    pub fn writable(&self, tick: u64) -> ReadyFuture<'_> {
        ReadyFuture { reg: self, tick, write: true }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = super::core::try_current().map(|core| {
            if let Some(io) = core.io.as_ref() {
                let _ = io.poll.borrow().registry().deregister(&mut mio::unix::SourceFd(&self.fd));
                if io.sources.borrow().contains(self.token) {
                    io.sources.borrow_mut().remove(self.token);
                }
            }
        });
    }
}

pub struct ReadyFuture<'a> {
    reg: &'a Registration,
    tick: u64,
    write: bool,
}

impl Future for ReadyFuture<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> TaskPoll<()> {
        let st = &self.reg.state;
        let (tick, slot, closed) =
            if self.write { (&st.write_tick, &st.write_waker, &st.write_closed) } else { (&st.read_tick, &st.read_waker, &st.read_closed) };
        if tick.get() != self.tick || closed.get() {
            return TaskPoll::Ready(());
        }
        *slot.borrow_mut() = Some(cx.waker().clone());
        TaskPoll::Pending
    }
}

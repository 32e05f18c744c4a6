//! The receive buffer of a host connection, shared by the front ends (NVMe/TCP and iSCSI).
//!
//! Bytes read from the socket and not yet consumed. One `read` usually brings many small PDUs
//! (headers, commands); a large data segment is read straight into its destination (the
//! command's `IoBuf`) instead of through this buffer, so the buffer never has to hold more
//! than a header and a small segment. It is therefore small and fixed: a front end's
//! per-connection memory does not depend on the transfer sizes its hosts negotiate, and the
//! buffer's size can be counted in the memory budget once, when the connection is accepted.
//! A caller that would need more than [`RecvBuf::capacity`] bytes at once gets an error
//! instead of a buffer that grows behind the budget's back.

use super::net::TcpStream;
use std::future::Future;
use std::io::{self, ErrorKind};

/// What a receive buffer reads from: a socket, plain or TLS (`super::tls::Channel`).
pub trait Source {
    /// Reads without waiting; `WouldBlock` when nothing is there. A read shorter than `buf`
    /// means the source is drained (a wait after it is for new bytes).
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// The readiness tick to take before a `try_read` whose `WouldBlock` is then waited on.
    fn read_tick(&self) -> u64;
    /// Waits for bytes that arrive after `tick`.
    fn readable(&self, tick: u64) -> impl Future<Output = ()>;
}

impl Source for TcpStream {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::try_read(self, buf)
    }
    fn read_tick(&self) -> u64 {
        TcpStream::read_tick(self)
    }
    fn readable(&self, tick: u64) -> impl Future<Output = ()> {
        TcpStream::readable(self, tick)
    }
}

/// Default size of a receive buffer: a few dozen command headers per `read`.
pub const RECV_BUF_DEFAULT: usize = 16 * 1024;

pub struct RecvBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The readiness tick before a read that returned less than it could have: the socket was
    /// empty then, so the next read waits for a readiness edge after that tick instead of
    /// spending a system call on a `WouldBlock`.
    drained_at: Option<u64>,
}

impl RecvBuf {
    pub fn new(capacity: usize) -> RecvBuf {
        assert!(capacity >= 512, "a receive buffer must hold the largest PDU header");
        RecvBuf { buf: vec![0u8; capacity].into_boxed_slice(), start: 0, end: 0, drained_at: None }
    }

    /// Most bytes [`RecvBuf::fill`] can make available at once.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// The bytes read and not consumed yet.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn available(&self) -> usize {
        self.end - self.start
    }

    pub fn consume(&mut self, n: usize) {
        // Callers consume what `fill` made available; more would put `start` past `end` and
        // hand out bytes that were never received.
        assert!(n <= self.available(), "consuming {n} of {} buffered bytes", self.available());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads until at least `n` bytes are buffered. `UnexpectedEof` when the peer closed
    /// first, `InvalidInput` when `n` is more than the buffer holds.
    pub async fn fill(&mut self, s: &impl Source, n: usize) -> io::Result<()> {
        if n > self.buf.len() {
            return Err(io::Error::new(ErrorKind::InvalidInput, "more than the receive buffer holds"));
        }
        while self.available() < n {
            // Move the partial PDU left over to the front: reads then land in the first pages
            // (appending would walk every connection's buffer through the resident set).
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if let Some(t) = self.drained_at.take() {
                s.readable(t).await;
            }
            let tick = s.read_tick();
            let space = self.buf.len() - self.end;
            match s.try_read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(k) => {
                    self.end += k;
                    if k < space {
                        self.drained_at = Some(tick);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => s.readable(tick).await,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Fills `dst`: first from what is buffered; a small rest through the buffer (the same
    /// `read` brings the next PDUs), a large one straight from the socket.
    pub async fn read_into(&mut self, s: &impl Source, dst: &mut [u8]) -> io::Result<()> {
        let n = self.available().min(dst.len());
        dst[..n].copy_from_slice(&self.data()[..n]);
        self.consume(n);
        let mut off = n;
        let rest = dst.len() - off;
        if rest == 0 {
            return Ok(());
        }
        if rest <= self.buf.len() / 2 {
            self.fill(s, rest).await?;
            dst[off..].copy_from_slice(&self.data()[..rest]);
            self.consume(rest);
            return Ok(());
        }
        // The buffer is empty now: the direct reads below leave nothing behind in it.
        self.drained_at = None;
        while off < dst.len() {
            let tick = s.read_tick();
            match s.try_read(&mut dst[off..]) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(k) => off += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => s.readable(tick).await,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Consumes `n` bytes without keeping them; each piece goes to `seen` (a digest).
    pub async fn discard(&mut self, s: &impl Source, mut n: usize, mut seen: impl FnMut(&[u8])) -> io::Result<()> {
        while n > 0 {
            if self.available() == 0 {
                self.fill(s, n.min(self.buf.len())).await?;
            }
            let k = n.min(self.available());
            seen(&self.data()[..k]);
            self.consume(k);
            n -= k;
        }
        Ok(())
    }

    /// Reads a little-endian u32 (a data digest).
    pub async fn read_u32_le(&mut self, s: &impl Source) -> io::Result<u32> {
        self.fill(s, 4).await?;
        let a = self.data();
        let v = u32::from_le_bytes([a[0], a[1], a[2], a[3]]);
        self.consume(4);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::{PollMode, ReactorOptions, Reactors};
    use std::time::Duration;

    /// Runs `f` with the reactor's end of a loopback connection whose peer wrote `input` and
    /// closed its sending side.
    fn with_input<R: Send + 'static, F: std::future::Future<Output = R> + 'static>(input: Vec<u8>, f: impl FnOnce(TcpStream) -> F + Send + 'static) -> R {
        let r = Reactors::start(&ReactorOptions { cpus: vec![0], poll_mode: PollMode::Adaptive, idle_us: 10, pin: false }).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let writer = std::thread::spawn(move || {
            std::io::Write::write_all(&mut c, &input).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            c
        });
        let got = r.handle().call_async(0, Duration::from_secs(20), move || f(TcpStream::from_std(s).unwrap())).unwrap();
        drop(writer.join());
        r.stop();
        got
    }

    #[test]
    fn small_pieces_come_through_the_buffer_and_large_ones_around_it() {
        let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expect = input.clone();
        let (out, cap_ok, beyond) = with_input(input, |s| async move {
            let mut rb = RecvBuf::new(4096);
            let mut out = Vec::new();
            // A header, a segment larger than the buffer, a small one, a skipped stretch.
            rb.fill(&s, 48).await.unwrap();
            out.extend_from_slice(&rb.data()[..48]);
            rb.consume(48);
            let mut big = vec![0u8; 100_000];
            rb.read_into(&s, &mut big).await.unwrap();
            out.extend_from_slice(&big);
            let mut small = vec![0u8; 1000];
            rb.read_into(&s, &mut small).await.unwrap();
            out.extend_from_slice(&small);
            let mut skipped = Vec::new();
            rb.discard(&s, 50_000, |b| skipped.extend_from_slice(b)).await.unwrap();
            out.extend_from_slice(&skipped);
            let beyond = rb.fill(&s, 4097).await.map_err(|e| e.kind());
            let mut rest = vec![0u8; 200_000 - out.len()];
            rb.read_into(&s, &mut rest).await.unwrap();
            out.extend_from_slice(&rest);
            let eof = rb.fill(&s, 1).await.map_err(|e| e.kind());
            (out, rb.capacity() == 4096 && eof == Err(ErrorKind::UnexpectedEof), beyond)
        });
        assert!(out == expect, "the bytes came out changed or in the wrong order");
        assert!(cap_ok, "the buffer grew, or the end of the stream was not reported");
        assert_eq!(beyond, Err(ErrorKind::InvalidInput), "asking for more than the buffer holds must fail, not grow it");
    }
}

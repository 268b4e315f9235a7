//! Payloads held in pipes: taken from a socket with `splice`, duplicated
//! with `tee`, written to a file or another socket with `splice`, so their
//! bytes never pass through user space.
//!
//! The replication link receives large payloads this way, and the NBD
//! server hands large client writes to a device that takes them
//! ([`crate::BlockDevice::takes_pipes`]) this way too.

use rustix::fd::OwnedFd;
use rustix::io::Errno;
use rustix::pipe::{fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice, tee};
use rustix::pipe::{PipeFlags, SpliceFlags};
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// What one pipe slot holds at most.
pub const PAGE: usize = 4096;

/// The largest pipe an unprivileged process may ask for by default
/// (`/proc/sys/fs/pipe-max-size`); a payload whose rest does not fit is
/// read the ordinary way.
pub const PIPE_MAX: usize = 1 << 20;

/// Pipes one payload may take. A pipe counts slots, not bytes, and a slot
/// holds a page or less: a payload sent with `sendfile` arrives a page per
/// fragment, and a page cut between two TCP segments takes two slots, so
/// a 1 MiB payload needs a few slots more than a 1 MiB pipe has. Only a
/// process with CAP_SYS_RESOURCE may make a pipe larger than
/// pipe-max-size (1 MiB by default), so the overflow goes into a second,
/// small pipe instead (before, a quarter of all 1 MiB resync payloads
/// fell back to memory and a blocking write on the actor's thread).
pub const MAX_CHAIN: usize = 4;

/// A new pipe's size: 16 slots.
pub const DEFAULT_PIPE: usize = 16 * PAGE;

/// Payloads at least this large are moved from a socket into a pipe with
/// `splice` instead of being read: the kernel hands the socket's pages to
/// the pipe, and the one copy left is the pipe's into the page cache when
/// the write is done. Below this the syscalls cost more than the copy they
/// save.
pub const SPLICE_MIN: usize = 128 * 1024;

/// Pipes holding payloads, at most, in the whole process: each holds two
/// descriptors while it is filled and one afterwards, and a peer or a
/// client may have far more writes in flight than a process has
/// descriptors to spare. Payloads beyond that are read into memory.
pub const MAX_PIPES: usize = 256;

/// Pipes holding payloads now, in the whole process.
static PIPES: AtomicUsize = AtomicUsize::new(0);

/// One of the [`MAX_PIPES`], released when dropped.
#[derive(Debug)]
pub struct PipeSlot(());

impl PipeSlot {
    /// A slot, if fewer than [`MAX_PIPES`] are taken.
    pub fn take() -> Option<Self> {
        PIPES
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_PIPES).then_some(n + 1)
            })
            .ok()
            .map(|_| PipeSlot(()))
    }
}

impl Drop for PipeSlot {
    fn drop(&mut self) {
        PIPES.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The rest of a payload, held in pipes until it is written. Each pipe
/// holds one descriptor and at most about 1 MiB.
#[derive(Debug)]
pub struct Piped {
    /// The pipes, in payload order.
    pub parts: Vec<PipePart>,
}

impl Piped {
    /// Bytes in the pipes.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len).sum()
    }

    /// No bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pipes' read ends with their byte counts, in payload order, for
    /// a write, and what keeps them counted in [`MAX_PIPES`] until it is
    /// dropped.
    pub fn into_pipes(self) -> (Vec<(OwnedFd, usize)>, PipeGuard) {
        let mut slots = Vec::with_capacity(self.parts.len());
        let pipes = self
            .parts
            .into_iter()
            .map(|p| {
                slots.push(p._slot);
                (p.fd, p.len)
            })
            .collect();
        (pipes, PipeGuard(slots))
    }

    /// A second copy of the same bytes in new pipes, leaving these as
    /// they are (`tee`: the pages are shared, not copied). `None` when no
    /// pipe is to be had or the bytes do not fit: then read these instead.
    pub fn tee(&self) -> Option<Piped> {
        let mut parts = Vec::with_capacity(self.parts.len());
        for p in &self.parts {
            // The same size holds the same slots, whatever their fill.
            let size = fcntl_getpipe_size(&p.fd).ok()?;
            let (r, w, slot) = new_pipe(size)?;
            let mut done = 0;
            while done < p.len {
                match tee(&p.fd, &w, p.len - done, SpliceFlags::NONBLOCK) {
                    Ok(0) | Err(Errno::AGAIN) => return None,
                    Ok(n) => done += n,
                    Err(Errno::INTR) => {}
                    Err(_) => return None,
                }
            }
            parts.push(PipePart {
                fd: r,
                len: p.len,
                _slot: slot,
            });
        }
        Some(Piped { parts })
    }

    /// Every byte, in order, after `head`, consuming the pipes.
    pub fn read_after(self, head: &[u8]) -> io::Result<Vec<u8>> {
        let mut all = Vec::with_capacity(head.len() + self.len());
        all.extend_from_slice(head);
        for part in &self.parts {
            let start = all.len();
            all.resize(start + part.len, 0);
            crate::read_pipe_exact(&part.fd, &mut all[start..])?;
        }
        Ok(all)
    }
}

/// Keeps the pipes of a [`Piped`] counted until dropped. The slots are
/// never read: holding them is the point.
#[derive(Debug)]
pub struct PipeGuard(#[allow(dead_code)] Vec<PipeSlot>);

/// One pipe of a [`Piped`] payload.
#[derive(Debug)]
pub struct PipePart {
    /// The pipe's read end.
    pub fd: OwnedFd,
    /// Bytes in it.
    pub len: usize,
    /// Counts the pipe in [`MAX_PIPES`] until dropped.
    _slot: PipeSlot,
}

/// A new empty non-blocking pipe of `size` bytes (up to [`PIPE_MAX`]), and
/// its slot.
pub fn new_pipe(size: usize) -> Option<(OwnedFd, OwnedFd, PipeSlot)> {
    let slot = PipeSlot::take()?;
    let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).ok()?;
    if size != DEFAULT_PIPE {
        fcntl_setpipe_size(&w, size.min(PIPE_MAX)).ok()?;
    }
    Some((r, w, slot))
}

/// A stream socket whose bytes can be spliced, with tokio's readiness.
pub trait SpliceSocket: AsFd + Sync {
    /// Wait until the socket may be readable.
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Run a non-blocking read attempt; `WouldBlock` clears readiness.
    fn attempt<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// Wait until the socket may be writable.
    fn ready_out(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Run a non-blocking write attempt; `WouldBlock` clears readiness.
    fn attempt_out<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

macro_rules! splice_socket {
    ($t:ty) => {
        impl SpliceSocket for $t {
            async fn ready(&self) -> io::Result<()> {
                self.readable().await
            }
            fn attempt<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
                self.try_io(tokio::io::Interest::READABLE, f)
            }
            async fn ready_out(&self) -> io::Result<()> {
                self.writable().await
            }
            fn attempt_out<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
                self.try_io(tokio::io::Interest::WRITABLE, f)
            }
        }
    };
}
splice_socket!(tokio::net::TcpStream);
splice_socket!(tokio::net::UnixStream);

/// Take up to `want` bytes from `sock` into pipes: a first one of
/// `pipe_size` bytes, and while it fills before all are in, further ones,
/// at most `max_chain` in all. Returns the pipes (in order) and the bytes
/// they hold, which is less than `want` when the chain or the process's
/// pipes ran out: the caller reads the rest. A sender that sends nothing
/// for `stall` is a `TimedOut` error; the end of the stream before `want`
/// bytes is `UnexpectedEof`.
pub async fn splice_in<S: SpliceSocket>(
    sock: &S,
    want: usize,
    pipe_size: usize,
    max_chain: usize,
    stall: Duration,
) -> io::Result<(Vec<PipePart>, usize)> {
    // Filled pipes, in payload order, then the one being filled.
    let mut parts: Vec<PipePart> = Vec::new();
    let mut cur = if pipe_size > 0 {
        new_pipe(pipe_size)
    } else {
        None
    };
    let mut cur_len = 0;
    let mut spliced = 0;
    while let Some((_, w, _)) = &cur {
        if spliced == want {
            break;
        }
        stalled(stall, sock.ready()).await??;
        // EAGAIN means an empty socket (wait for it) or a full pipe, and
        // only the first may clear tokio's readiness: with bytes waiting
        // and readiness cleared, nothing would wake the read that takes
        // them. So a full pipe is told apart inside the attempt.
        let n = sock.attempt(|| {
            // Bytes may arrive between an EAGAIN of an empty socket and the
            // FIONREAD that follows it; only a second EAGAIN with bytes
            // waiting means a full pipe (else a chain link is wasted).
            let mut tries = 0;
            loop {
                match splice(
                    sock,
                    None,
                    w,
                    None,
                    want - spliced,
                    SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
                ) {
                    Ok(n) => return Ok(Some(n)),
                    Err(Errno::AGAIN) if rustix::io::ioctl_fionread(sock).unwrap_or(0) > 0 => {
                        tries += 1;
                        if tries == 2 {
                            return Ok(None);
                        }
                    }
                    Err(e) => return Err(io::Error::from(e)),
                }
            }
        });
        match n {
            Ok(Some(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Some(n)) => {
                spliced += n;
                cur_len += n;
            }
            Ok(None) => {
                // Full: the remainder goes into the next pipe, if any.
                let next = if parts.len() + 1 < max_chain {
                    // The default size is enough for a small remainder.
                    new_pipe((want - spliced).saturating_mul(2).max(DEFAULT_PIPE))
                } else {
                    None
                };
                let Some((r, _w, slot)) = std::mem::replace(&mut cur, next) else {
                    break;
                };
                parts.push(PipePart {
                    fd: r,
                    len: std::mem::take(&mut cur_len),
                    _slot: slot,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    if let Some((r, _w, slot)) = cur.take() {
        parts.push(PipePart {
            fd: r,
            len: cur_len,
            _slot: slot,
        });
    }
    parts.retain(|p| p.len > 0);
    Ok((parts, spliced))
}

/// Send what `piped` holds to `sock`, in order, consuming the pipes: the
/// socket takes the pipes' pages without a copy.
pub async fn splice_out<S: SpliceSocket>(sock: &S, piped: Piped) -> io::Result<()> {
    let last = piped.parts.len().saturating_sub(1);
    for (i, part) in piped.parts.iter().enumerate() {
        // More of this payload follows: the socket need not send a short
        // segment at the pipe's end.
        let flags = if i < last {
            SpliceFlags::NONBLOCK | SpliceFlags::MORE
        } else {
            SpliceFlags::NONBLOCK
        };
        let mut left = part.len;
        while left > 0 {
            sock.ready_out().await?;
            let r = sock.attempt_out(|| match splice(&part.fd, None, sock, None, left, flags) {
                // A full socket, unless the pipe is what is empty.
                Err(Errno::AGAIN) if rustix::io::ioctl_fionread(&part.fd).unwrap_or(0) == 0 => {
                    Ok(0)
                }
                r => r.map_err(io::Error::from),
            });
            match r {
                Ok(0) => {
                    return Err(io::Error::other(format!(
                        "payload pipe ran dry with {left} bytes to send"
                    )))
                }
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Send `bytes` (a bulk frame's header, say) to `sock` with `MSG_MORE`:
/// the socket holds them back for what [`splice_out`] sends next, so they
/// leave in the payload's first segment instead of a tiny one of their own.
pub async fn send_more<S: SpliceSocket>(sock: &S, bytes: &[u8]) -> io::Result<()> {
    let flags = rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL;
    let mut at = 0;
    while at < bytes.len() {
        sock.ready_out().await?;
        match sock.attempt_out(|| Ok(rustix::net::send(sock, &bytes[at..], flags)?)) {
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `f`, or a `TimedOut` error when it takes longer than `stall`: how long
/// a sender may send nothing in the middle of a payload.
pub async fn stalled<F: Future>(stall: Duration, f: F) -> io::Result<F::Output> {
    tokio::time::timeout(stall, f)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the sender stopped sending"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A [`Piped`] of `chunks` (one pipe each), filled by plain writes.
    fn piped(chunks: &[&[u8]]) -> Piped {
        let parts = chunks
            .iter()
            .map(|c| {
                let (r, w, slot) = new_pipe(PIPE_MAX).unwrap();
                let mut at = 0;
                while at < c.len() {
                    at += rustix::io::write(&w, &c[at..]).unwrap();
                }
                PipePart {
                    fd: r,
                    len: c.len(),
                    _slot: slot,
                }
            })
            .collect();
        Piped { parts }
    }

    /// Each `tee` is the same bytes, the original stays whole for the next
    /// one, and with every pipe of the process taken there is no `tee` but
    /// the original can still be read.
    #[test]
    fn tee_copies_without_consuming_and_fails_cleanly_without_pipes() {
        let a: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let b = vec![7u8; 5000];
        let p = piped(&[&a, &b]);
        let want: Vec<u8> = [&b"head"[..], &a, &b].concat();
        for round in 0..2 {
            let t = p.tee().unwrap();
            assert_eq!(t.len(), p.len());
            assert!(t.read_after(b"head").unwrap() == want, "tee {round}");
        }
        let held: Vec<PipeSlot> = std::iter::from_fn(PipeSlot::take).collect();
        assert!(p.tee().is_none(), "a tee without a pipe to put it in");
        drop(held);
        assert!(p.read_after(b"head").unwrap() == want, "the original");
    }
}

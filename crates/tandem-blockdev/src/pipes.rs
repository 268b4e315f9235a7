//! Payloads held in pipes: taken from a socket with `splice`, duplicated
//! with `tee`, written to a file or another socket with `splice`, so their
//! bytes never pass through user space.
//!
//! The replication link receives large payloads this way, and the NBD
//! server hands large client writes to a device that takes them
//! ([`crate::BlockDevice::takes_pipes`]) this way too.

use rustix::fd::{BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::pipe::{fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice, tee};
use rustix::pipe::{PipeFlags, SpliceFlags};
use std::future::Future;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
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

    /// The pipes with their byte counts, in payload order, for a write.
    pub fn into_pipes(self) -> Vec<PipePart> {
        self.parts
    }

    /// A second copy of the same bytes in new pipes, leaving these as
    /// they are (`tee`: the pages are shared, not copied). `None` when no
    /// pipe is to be had or the bytes do not fit: then read these instead.
    pub fn tee(&self) -> Option<Piped> {
        let mut parts = Vec::with_capacity(self.parts.len());
        for p in &self.parts {
            // The same size holds the same slots, whatever their fill.
            let copy = new_pipe(p.pipe.size())?;
            let mut done = 0;
            while done < p.len {
                match tee(
                    p.pipe.reader(),
                    copy.writer(),
                    p.len - done,
                    SpliceFlags::NONBLOCK,
                ) {
                    Ok(0) | Err(Errno::AGAIN) => return None,
                    Ok(n) => done += n,
                    Err(Errno::INTR) => {}
                    Err(_) => return None,
                }
            }
            parts.push(PipePart {
                pipe: copy,
                len: p.len,
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
            crate::read_pipe_exact(part.pipe.reader(), &mut all[start..])?;
        }
        Ok(all)
    }
}

/// One pipe of a [`Piped`] payload.
#[derive(Debug)]
pub struct PipePart {
    /// The pipe.
    pub pipe: Pipe,
    /// Bytes in it.
    pub len: usize,
}

/// A non-blocking pipe for payload bytes, counted in [`MAX_PIPES`]. When
/// dropped it is emptied and kept for the next payload:
/// making a pipe costs a `pipe2`, an `F_SETPIPE_SZ` that allocates its ring
/// and a `close` that frees it, for each payload and each `tee` of it
/// (5–6 % of both daemons' CPU under 1 MiB writes, measured with `perf`).
#[derive(Debug)]
pub struct Pipe {
    ends: ManuallyDrop<Ends>,
    _slot: PipeSlot,
}

#[derive(Debug)]
struct Ends {
    r: OwnedFd,
    w: OwnedFd,
    /// Its capacity in bytes (a slot per page).
    size: usize,
}

impl Pipe {
    /// The read end.
    pub fn reader(&self) -> BorrowedFd<'_> {
        self.ends.r.as_fd()
    }

    /// The write end.
    pub fn writer(&self) -> BorrowedFd<'_> {
        self.ends.w.as_fd()
    }

    /// Its capacity in bytes.
    pub fn size(&self) -> usize {
        self.ends.size
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // SAFETY: `ends` is taken once, here, and not touched again.
        let ends = unsafe { ManuallyDrop::take(&mut self.ends) };
        if !drain(&ends.r) {
            return;
        }
        if let Ok(mut spare) = SPARE.lock() {
            if spare.len() < SPARE_MAX {
                spare.push(ends);
            }
        }
    }
}

/// Empty the pipe read by `r` (a payload that others took `tee`s of is
/// dropped full), so it can be reused; false if that failed, and then it
/// is closed, bytes and all. Splicing into `/dev/null` only releases the
/// buffers, which closing the pipe would do too.
fn drain(r: &OwnedFd) -> bool {
    static NULL: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    let mut left = match rustix::io::ioctl_fionread(r) {
        Ok(n) => n as usize,
        Err(_) => return false,
    };
    if left == 0 {
        return true;
    }
    let null = NULL.get_or_init(|| {
        let flags = rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC;
        rustix::fs::open("/dev/null", flags, rustix::fs::Mode::empty()).ok()
    });
    let Some(null) = null else { return false };
    // A pipe holds at most 1 MiB; `/dev/null` takes it all at once, so
    // more than a few rounds mean something else is wrong.
    for _ in 0..4 {
        match splice(r, None, null, None, left, SpliceFlags::NONBLOCK) {
            Ok(n) if n > 0 && n <= left => left -= n,
            _ => return false,
        }
        if left == 0 {
            return true;
        }
    }
    false
}

/// Empty pipes kept for reuse. They hold no slot of [`MAX_PIPES`] (no
/// payload), only their two descriptors each.
static SPARE: Mutex<Vec<Ends>> = Mutex::new(Vec::new());

/// Empty pipes kept at most: about what a Primary has in flight under
/// 1 MiB writes at queue depth 8 (a pipe per payload and one per `tee`).
const SPARE_MAX: usize = 32;

/// A non-blocking pipe of at least `size` bytes (up to [`PIPE_MAX`]): a
/// spare one if one is large enough, else a new one. `None` when
/// [`MAX_PIPES`] are taken or no pipe can be made.
pub fn new_pipe(size: usize) -> Option<Pipe> {
    let slot = PipeSlot::take()?;
    let size = size.min(PIPE_MAX);
    // A pipe smaller than the default is asked for to hold just that (a
    // test of chaining); no spare is that small.
    let reuse = size >= DEFAULT_PIPE;
    let spare = SPARE.lock().ok().filter(|_| reuse).and_then(|mut spare| {
        // The smallest that is large enough, so large ones stay for large
        // payloads.
        let (i, _) = spare
            .iter()
            .enumerate()
            .filter(|(_, e)| e.size >= size)
            .min_by_key(|(_, e)| e.size)?;
        Some(spare.swap_remove(i))
    });
    let ends = match spare {
        Some(e) => e,
        None => {
            let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).ok()?;
            let size = if size != DEFAULT_PIPE {
                fcntl_setpipe_size(&w, size).ok()?
            } else {
                fcntl_getpipe_size(&w).ok()?
            };
            Ends { r, w, size }
        }
    };
    Some(Pipe {
        ends: ManuallyDrop::new(ends),
        _slot: slot,
    })
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
    while let Some(pipe) = &cur {
        let w = pipe.writer();
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
                let Some(pipe) = std::mem::replace(&mut cur, next) else {
                    break;
                };
                parts.push(PipePart {
                    pipe,
                    len: std::mem::take(&mut cur_len),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    if let Some(pipe) = cur.take() {
        parts.push(PipePart { pipe, len: cur_len });
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
            let fd = part.pipe.reader();
            let r = sock.attempt_out(|| match splice(fd, None, sock, None, left, flags) {
                // A full socket, unless the pipe is what is empty.
                Err(Errno::AGAIN) if rustix::io::ioctl_fionread(fd).unwrap_or(0) == 0 => Ok(0),
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
pub(crate) mod tests {
    use super::*;

    /// Held by the tests of this crate that make pipes, so that under
    /// plain `cargo test` (one process) none takes another's spare pipe.
    pub(crate) static PIPE_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn pipe_tests() -> std::sync::MutexGuard<'static, ()> {
        PIPE_TESTS.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pipe's identity: its inode.
    fn inode(p: &Pipe) -> u64 {
        rustix::fs::fstat(p.reader()).expect("fstat a pipe").st_ino
    }

    /// A payload's pipe, dropped empty or full, serves the next payload
    /// (no new pipe made), empty; kept pipes hold no place among the
    /// process's [`MAX_PIPES`].
    #[test]
    fn dropped_pipes_are_emptied_and_reused() {
        let _g = pipe_tests();
        // Pipes other tests left would serve the requests below.
        SPARE.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let a = new_pipe(PIPE_MAX).expect("a pipe");
        assert_eq!(a.size(), PIPE_MAX);
        let first = inode(&a);
        rustix::io::write(a.writer(), &[1u8; 5000]).expect("fill");
        let mut buf = vec![0u8; 5000];
        crate::read_pipe_exact(a.reader(), &mut buf).expect("drain");
        let taken = PIPES.load(Ordering::Acquire);
        drop(a);
        assert_eq!(
            PIPES.load(Ordering::Acquire),
            taken - 1,
            "a kept pipe holds no slot"
        );
        let b = new_pipe(PIPE_MAX).expect("a pipe");
        assert_eq!(inode(&b), first, "the emptied pipe is reused");
        assert_eq!(b.size(), PIPE_MAX);
        let mut empty = [0u8; 1];
        assert!(
            rustix::io::read(b.reader(), &mut empty).is_err(),
            "a reused pipe starts empty"
        );
        // Dropped full (as a payload whose users each took a `tee`), it is
        // emptied and reused too.
        rustix::io::write(b.writer(), &[2u8; 100_000]).expect("fill");
        drop(b);
        let c = new_pipe(PIPE_MAX).expect("a pipe");
        assert_eq!(inode(&c), first, "the pipe dropped full is reused");
        assert!(
            rustix::io::read(c.reader(), &mut empty).is_err(),
            "a reused pipe starts empty, whatever it held"
        );
        // A smaller request takes a kept pipe that is large enough.
        drop(c);
        let d = new_pipe(DEFAULT_PIPE).expect("a pipe");
        assert_eq!(
            inode(&d),
            first,
            "a large enough kept pipe serves a smaller request"
        );
    }

    /// A [`Piped`] of `chunks` (one pipe each), filled by plain writes.
    fn piped(chunks: &[&[u8]]) -> Piped {
        let parts = chunks
            .iter()
            .map(|c| {
                let pipe = new_pipe(PIPE_MAX).expect("a pipe for the test");
                let mut at = 0;
                while at < c.len() {
                    at += rustix::io::write(pipe.writer(), &c[at..]).expect("fill the pipe");
                }
                PipePart { pipe, len: c.len() }
            })
            .collect();
        Piped { parts }
    }

    /// Each `tee` is the same bytes, the original stays whole for the next
    /// one, and with every pipe of the process taken there is no `tee` but
    /// the original can still be read.
    #[test]
    fn tee_copies_without_consuming_and_fails_cleanly_without_pipes() {
        let _g = pipe_tests();
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

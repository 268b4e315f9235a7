//! A [`BlockDevice`] over a regular file or a Linux block device.
//!
//! Positioned I/O (`pread`/`pwrite`) on a shared descriptor: no global lock,
//! any number of requests in flight. Small buffered reads and writes run
//! inline on the calling task, because a page-cache copy costs less than the
//! hand-off to a blocking thread and back (two wake-ups); anything that may
//! wait on the disk (fdatasync, FUA, O_DIRECT, fallocate, large copies) runs on
//! tokio's blocking pool so it never stalls the other connections.

use crate::pipes::{PipePart, Piped};
use crate::{range_end, AlignedBuf, BlockDevice, BlockSizes, Capabilities, Extent, ZeroFlags};
use bytes::Bytes;
use rustix::buffer::spare_capacity;
use rustix::fd::BorrowedFd;
use rustix::fs::{Advice, FallocateFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};
use rustix::pipe::SpliceFlags;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How to open a [`FileDevice`].
#[derive(Clone, Debug)]
pub struct FileOptions {
    /// Open read-only and refuse every modification.
    pub read_only: bool,
    /// Bypass the page cache (O_DIRECT) for aligned requests.
    pub direct: bool,
    /// Buffered reads up to this many bytes run inline on the calling task;
    /// larger ones go to the blocking pool, so that copying them out of the
    /// page cache overlaps with sending the previous reply.
    pub inline_read_max: usize,
    /// Buffered writes without FUA up to this many bytes run inline: the
    /// payload was just received on this core, and copying it into the page
    /// cache here beats handing it to another thread (measured in
    /// docs/benchmarks.md). Larger writes go to the blocking pool so that one
    /// request never holds a runtime thread for long.
    pub inline_write_max: usize,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            direct: false,
            inline_read_max: 256 * 1024,
            inline_write_max: 1024 * 1024,
        }
    }
}

/// Why a backing file could not be opened.
#[derive(Debug)]
pub struct OpenError {
    /// The path that was being opened.
    pub path: PathBuf,
    /// What went wrong, in words.
    pub reason: String,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for OpenError {}

/// The largest payload a single READ or WRITE may carry (the NBD default
/// maximum, and what the Linux client sends at most).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Alignment used for O_DIRECT when the device reports nothing larger.
const DIRECT_ALIGN: usize = 4096;

/// Zero-writing fallback chunk: large enough to amortise syscalls, small
/// enough to keep a bounded buffer.
const ZERO_CHUNK: usize = 1024 * 1024;

#[derive(Debug)]
struct Inner {
    file: File,
    /// Second descriptor with O_DIRECT, used for aligned requests only.
    direct: Option<File>,
    align: usize,
    is_block: bool,
    /// Cleared the first time the file system says it cannot punch holes.
    punch_hole: AtomicBool,
    /// Cleared the first time the file system says it cannot zero ranges.
    zero_range: AtomicBool,
    /// Cleared if the kernel lacks pwritev2(RWF_DSYNC).
    rwf_dsync: AtomicBool,
}

/// A file or block device served as a block device.
#[derive(Debug, Clone)]
pub struct FileDevice {
    inner: Arc<Inner>,
    size: u64,
    caps: Capabilities,
    inline_read_max: usize,
    inline_write_max: usize,
}

impl FileDevice {
    /// Open `path`, a regular file or a block device.
    pub fn open(path: &Path, opts: &FileOptions) -> Result<Self, OpenError> {
        let err = |reason: String| OpenError {
            path: path.to_path_buf(),
            reason,
        };
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        let file = oo
            .open(path)
            .map_err(|e| err(format!("cannot open: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| err(format!("cannot stat: {e}")))?;
        let ft = meta.file_type();
        let is_block = ft.is_block_device();
        if !is_block && !ft.is_file() {
            return Err(err(
                "not a regular file or block device (expected a backing file or a block device)"
                    .into(),
            ));
        }
        let size = if is_block {
            block_device_size(&file).map_err(|e| err(format!("cannot read device size: {e}")))?
        } else {
            meta.len()
        };
        let mut align = DIRECT_ALIGN;
        if is_block {
            if let Ok(logical) = rustix::fs::ioctl_blksszget(&file) {
                align = align.max(logical as usize);
            }
        }
        let direct = if opts.direct {
            let mut oo = OpenOptions::new();
            oo.read(true)
                .write(!opts.read_only)
                .custom_flags(libc::O_DIRECT);
            Some(
                oo.open(path)
                    .map_err(|e| err(format!("cannot open with O_DIRECT: {e}")))?,
            )
        } else {
            None
        };
        let writable = !opts.read_only;
        let caps = Capabilities {
            read_only: opts.read_only,
            flush: writable,
            fua: writable,
            trim: writable,
            write_zeroes: writable,
            fast_zero: writable,
            cache: true,
            block_status: !is_block,
            rotational: false,
            multi_conn: true,
            block_sizes: BlockSizes {
                minimum: if opts.direct { align as u32 } else { 1 },
                preferred: 4096.max(align as u32),
                maximum_payload: MAX_PAYLOAD,
            },
        };
        Ok(Self {
            inner: Arc::new(Inner {
                file,
                direct,
                align,
                is_block,
                punch_hole: AtomicBool::new(true),
                zero_range: AtomicBool::new(true),
                rwf_dsync: AtomicBool::new(true),
            }),
            size,
            caps,
            // O_DIRECT waits for the disk: never on a runtime thread.
            inline_read_max: if opts.direct { 0 } else { opts.inline_read_max },
            inline_write_max: if opts.direct {
                0
            } else {
                opts.inline_write_max
            },
        })
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match range_end(offset, len, self.size) {
            Some(_) => Ok(()),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} lies beyond the device end {}",
                    self.size
                ),
            )),
        }
    }

    fn writable(&self) -> io::Result<()> {
        if self.caps.read_only {
            Err(Errno::PERM.into())
        } else {
            Ok(())
        }
    }

    /// Run `f` inline when `inline`, else on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        inline: bool,
        f: impl FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        if inline {
            return f(&self.inner);
        }
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || f(&inner)).await {
            Ok(r) => r,
            Err(e) => Err(io::Error::other(format!("blocking I/O task failed: {e}"))),
        }
    }
}

impl Inner {
    fn aligned(&self, offset: u64, len: usize) -> bool {
        self.direct.is_some() && offset % self.align as u64 == 0 && len % self.align == 0 && len > 0
    }

    fn read_into(&self, fd: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
                Ok(0) => return Err(truncated()),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        if let (true, Some(direct)) = (self.aligned(offset, len), &self.direct) {
            let mut buf =
                AlignedBuf::zeroed(len, self.align).ok_or_else(|| io::Error::from(Errno::NOMEM))?;
            self.read_into(direct, buf.as_mut_slice(), offset)?;
            return Ok(Bytes::from_owner(buf));
        }
        // Read into uninitialised capacity: zeroing a buffer the kernel is
        // about to overwrite costs a full extra pass over the data.
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            match rustix::io::pread(&self.file, spare_capacity(&mut buf), at) {
                Ok(0) => return Err(truncated()),
                Ok(_) => {}
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Bytes::from(buf))
    }

    fn write_all(&self, fd: &File, data: &[u8], offset: u64, dsync: bool) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let r = if dsync {
                let iov = [io::IoSlice::new(&data[done..])];
                rustix::io::pwritev2(fd, &iov, at, ReadWriteFlags::DSYNC)
            } else {
                rustix::io::pwrite(fd, &data[done..], at)
            };
            match r {
                Ok(0) => return Err(Errno::NOSPC.into()),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let use_dsync = fua && self.rwf_dsync.load(Ordering::Relaxed);
        let aligned_copy;
        let (fd, data) = match (&self.direct, self.aligned(offset, data.len())) {
            (Some(direct), true) => {
                aligned_copy = if data.as_ptr() as usize % self.align == 0 {
                    None
                } else {
                    Some(
                        AlignedBuf::copy_from(data, self.align)
                            .ok_or_else(|| io::Error::from(Errno::NOMEM))?,
                    )
                };
                (direct, aligned_copy.as_ref().map_or(data, |b| b.as_ref()))
            }
            _ => (&self.file, data),
        };
        match self.write_all(fd, data, offset, use_dsync) {
            // Kernels before 4.7 reject RWF_DSYNC: fall back to a sync after the write.
            Err(e) if use_dsync && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.rwf_dsync.store(false, Ordering::Relaxed);
                self.write_all(fd, data, offset, false)?;
                self.sync()
            }
            Err(e) => Err(e),
            Ok(()) if fua && !use_dsync => self.sync(),
            Ok(()) => Ok(()),
        }
    }

    fn sync(&self) -> io::Result<()> {
        rustix::fs::fdatasync(&self.file)?;
        Ok(())
    }

    /// Write `head`, then the bytes waiting in `pipes` (each its count, in
    /// order), from `offset`: the pipes' pages are copied into the page
    /// cache by the kernel, never through user space; with `writeback`
    /// their writeback starts at once. With O_DIRECT (which `splice` cannot
    /// serve with arbitrary pages) the pipes are read into memory and
    /// written as usual.
    fn write_piped(
        &self,
        offset: u64,
        head: &[u8],
        pipes: &[PipePart],
        fua: bool,
        writeback: bool,
    ) -> io::Result<()> {
        let len: usize = pipes.iter().map(|p| p.len).sum();
        if self.direct.is_some() {
            let mut all = Vec::with_capacity(head.len() + len);
            all.extend_from_slice(head);
            for p in pipes {
                let start = all.len();
                all.resize(start + p.len, 0);
                read_pipe_exact(p.pipe.reader(), &mut all[start..])?;
            }
            return self.write(offset, &all, fua);
        }
        self.write_all(&self.file, head, offset, false)?;
        let mut at = offset + head.len() as u64;
        let mut moved = 0;
        for p in pipes {
            let mut left = p.len;
            while left > 0 {
                match rustix::pipe::splice(
                    p.pipe.reader(),
                    None,
                    &self.file,
                    Some(&mut at),
                    left,
                    SpliceFlags::empty(),
                ) {
                    Ok(0) | Err(Errno::AGAIN) => return Err(pipe_ran_dry(len, moved)),
                    Ok(k) => {
                        left -= k;
                        moved += k;
                    }
                    Err(Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if fua {
            self.sync()?;
        } else if writeback {
            self.start_writeback(offset, head.len() + len);
        }
        Ok(())
    }

    /// Ask the kernel to start writing `[offset, offset + len)` back now,
    /// without waiting. Piped payloads come from the peer (replicated and
    /// resync writes), which this node flushes soon anyway (a barrier every
    /// 100 ms, a resync batch every 256 MiB): starting their writeback at
    /// once spreads it over the transfer instead of leaving it all to the
    /// flush, which then stalls less (measured: 1 MiB protocol C writes
    /// about a fifth faster, a full resync 8 % faster). Errors are left to
    /// that flush to report.
    fn start_writeback(&self, offset: u64, len: usize) {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on a descriptor this struct owns; no
        // memory is passed.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    /// Try one fallocate mode; `Ok(false)` when the file system lacks it
    /// (remembered in `flag`, so later calls skip the syscall).
    fn try_fallocate(
        &self,
        flag: &AtomicBool,
        mode: FallocateFlags,
        offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        if !flag.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match rustix::fs::fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(true),
            Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => {
                flag.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.try_fallocate(
            &self.punch_hole,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut done = flags.may_trim && self.punch_hole(offset, len)?;
        // A block device may fall back to writing zeroes in the kernel, which is
        // not "fast": only regular files trust ZERO_RANGE as fast.
        let zero_range_is_fast = !self.is_block;
        if !done && (zero_range_is_fast || !flags.fast_only) {
            done = self.try_fallocate(
                &self.zero_range,
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            )?;
        }
        if !done {
            if flags.fast_only {
                return Err(Errno::NOTSUP.into());
            }
            let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
            let mut at = offset;
            let end = offset + len;
            while at < end {
                let n = (end - at).min(zeroes.len() as u64) as usize;
                self.write_all(&self.file, &zeroes[..n], at, false)?;
                at += n as u64;
            }
        }
        if flags.fua {
            self.sync()?;
        }
        Ok(())
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
        size: u64,
    ) -> io::Result<Vec<Extent>> {
        let end = offset + len;
        if self.is_block {
            return Ok(vec![Extent {
                length: len,
                hole: false,
                zero: false,
            }]);
        }
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max_extents.max(1) {
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(d) => d,
                // ENXIO: no data at or after pos; the rest is a hole.
                Err(Errno::NXIO) => size,
                // File systems without SEEK_DATA: report everything as data.
                Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) => {
                    out.push(Extent {
                        length: end - pos,
                        hole: false,
                        zero: false,
                    });
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                let stop = data.min(end);
                out.push(Extent {
                    length: stop - pos,
                    hole: true,
                    zero: true,
                });
                pos = stop;
                continue;
            }
            let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(pos)) {
                Ok(h) => h,
                Err(Errno::NXIO) => size,
                Err(e) => return Err(e.into()),
            };
            // A hole at pos right after SEEK_DATA said data: the file changed
            // under us; report one block as data and move on.
            let stop = if hole > pos {
                hole.min(end)
            } else {
                (pos + 1).min(end)
            };
            out.push(Extent {
                length: stop - pos,
                hole: false,
                zero: false,
            });
            pos = stop;
        }
        Ok(out)
    }
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "backing file ended early (was it truncated?)",
    )
}

/// BLKGETSIZE64: the size in bytes of a block device.
fn block_device_size(file: &File) -> io::Result<u64> {
    use rustix::ioctl::{ioctl, opcode, Getter};
    // SAFETY: BLKGETSIZE64 is _IOR(0x12, 114, size_t) and writes one u64
    // (size_t is 64 bits on every target this builds for).
    let size = unsafe {
        ioctl(
            file,
            Getter::<{ opcode::read::<u64>(0x12, 114) }, u64>::new(),
        )
    }?;
    Ok(size)
}

impl FileDevice {
    /// Write `head` and then the bytes waiting in `pipes` (each pipe must
    /// hold at least its count; they follow each other) at `offset`,
    /// without copying the pipes' bytes through user space. With
    /// `writeback` their writeback starts at once: for data a flush
    /// follows soon (see `Inner::start_writeback`), not for a client's
    /// write, which a page cache should absorb.
    pub async fn write_from_pipes(
        &self,
        offset: u64,
        head: Bytes,
        pipes: Vec<PipePart>,
        fua: bool,
        writeback: bool,
    ) -> io::Result<()> {
        self.writable()?;
        let len: usize = pipes.iter().map(|p| p.len).sum();
        self.check(offset, (head.len() + len) as u64)?;
        self.run(false, move |i| {
            i.write_piped(offset, &head, &pipes, fua, writeback)
        })
        .await
    }

    /// Whether reads and writes go around the page cache (O_DIRECT); then
    /// `sendfile_to`, which reads through it, should not be used.
    pub fn is_direct(&self) -> bool {
        self.inner.direct.is_some()
    }

    /// One `sendfile` of up to `len` bytes from `*offset` to `sock`,
    /// advancing `offset`: the bytes go from the page cache to the socket
    /// without a copy through user space. Blocks while pages are read from
    /// the disk, so call it off the async workers; a non-blocking `sock`
    /// that is full gives `WouldBlock`.
    pub fn sendfile_to(
        &self,
        sock: BorrowedFd<'_>,
        offset: &mut u64,
        len: usize,
    ) -> io::Result<usize> {
        self.check(*offset, len as u64)?;
        match rustix::fs::sendfile(sock, &self.inner.file, Some(offset), len) {
            Ok(0) if len > 0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the backing file ends at {offset}, inside the device"),
            )),
            Ok(n) => Ok(n),
            Err(e) => Err(e.into()),
        }
    }
}

impl FileDevice {
    /// `len` bytes from `offset` taken into pipes with `splice`: the pipes
    /// hold the page cache's pages, not a copy, and a socket takes them
    /// from there without one either. Blocks while pages are read from the
    /// disk, so call it off the async workers; once it returns, sending
    /// the pipes waits for nothing but the socket. `Ok(None)` when the
    /// pipes run out ([`crate::pipes::MAX_PIPES`] taken, or more than
    /// [`crate::pipes::MAX_CHAIN`] needed): readahead of the range is
    /// started then, for whoever reads it next.
    pub fn read_into_pipes(&self, offset: u64, len: usize) -> io::Result<Option<Piped>> {
        use crate::pipes::{new_pipe, MAX_CHAIN, PIPE_MAX};
        self.check(offset, len as u64)?;
        if self.is_direct() {
            // Splicing would read through the page cache the disk is
            // opened around.
            return Ok(None);
        }
        let mut parts: Vec<PipePart> = Vec::new();
        let mut at = offset;
        let mut left = len;
        while left > 0 {
            let pipe = match (parts.len() < MAX_CHAIN).then(|| new_pipe(left.min(PIPE_MAX))) {
                Some(Some(p)) => p,
                _ => {
                    if let Some(n) = std::num::NonZeroU64::new(left as u64) {
                        rustix::fs::fadvise(&self.inner.file, at, Some(n), Advice::WillNeed)?;
                    }
                    return Ok(None);
                }
            };
            let mut n = 0;
            while n < left {
                match rustix::pipe::splice(
                    &self.inner.file,
                    Some(&mut at),
                    pipe.writer(),
                    None,
                    left - n,
                    SpliceFlags::NONBLOCK,
                ) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the backing file ends at {at}, inside the device"),
                        ))
                    }
                    Ok(k) => n += k,
                    // The pipe is full: the rest goes into the next one.
                    Err(Errno::AGAIN) if n > 0 => break,
                    Err(Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            left -= n;
            parts.push(PipePart { pipe, len: n });
        }
        Ok(Some(Piped { parts }))
    }
}

/// Fill `buf` from a pipe that already holds at least that many bytes;
/// an error if it holds fewer (a non-blocking pipe runs dry rather than
/// waiting).
pub fn read_pipe_exact(pipe: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match rustix::io::read(pipe, &mut buf[at..]) {
            Ok(0) | Err(Errno::AGAIN) => return Err(pipe_ran_dry(buf.len(), at)),
            Ok(n) => at += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn pipe_ran_dry(len: usize, moved: usize) -> io::Error {
    io::Error::other(format!("payload pipe ran dry after {moved} of {len} bytes"))
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.check(offset, len as u64)?;
        self.run(len <= self.inline_read_max, move |i| i.read(offset, len))
            .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.writable()?;
        self.check(offset, data.len() as u64)?;
        let inline = !fua && data.len() <= self.inline_write_max;
        self.run(inline, move |i| i.write(offset, &data, fua)).await
    }

    async fn flush(&self) -> io::Result<()> {
        if self.caps.read_only {
            return Ok(());
        }
        self.run(false, |i| i.sync()).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.writable()?;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.run(false, move |i| {
            // Trim is advisory: a file system without hole punching just keeps the data.
            i.punch_hole(offset, len)?;
            if fua {
                i.sync()?;
            }
            Ok(())
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.writable()?;
        self.check(offset, len)?;
        self.run(false, move |i| i.write_zeroes(offset, len, flags))
            .await
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        // fadvise(WILLNEED) starts readahead and returns; a length of zero
        // would mean "to the end of the file", so skip it.
        if let Some(len) = std::num::NonZeroU64::new(len) {
            rustix::fs::fadvise(&self.inner.file, offset, Some(len), Advice::WillNeed)?;
        }
        Ok(())
    }

    async fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let size = self.size;
        self.run(false, move |i| {
            i.block_status(offset, len, max_extents, size)
        })
        .await
    }

    // `takes_pipes` stays false: for a write that is only copied into the
    // page cache, taking the payload into pipes measured no less CPU than
    // reading it, and `tandem serve` no faster (docs/architecture.md).

    async fn write_piped(
        &self,
        offset: u64,
        head: Bytes,
        piped: crate::pipes::Piped,
        fua: bool,
    ) -> io::Result<()> {
        self.write_from_pipes(offset, head, piped.into_pipes(), fua, false)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn temp_file(size: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        f
    }

    fn open(f: &tempfile::NamedTempFile, opts: FileOptions) -> FileDevice {
        FileDevice::open(f.path(), &opts).unwrap()
    }

    #[test]
    fn a_range_read_into_pipes_holds_its_bytes_in_order() {
        let _g = crate::pipes::tests::PIPE_TESTS
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let size = 8u64 << 20;
        let f = temp_file(size);
        let data: Vec<u8> = (0..size as u32).map(|i| (i * 7 + i / 4096) as u8).collect();
        f.as_file().write_all_at(&data, 0).expect("fill the file");
        let dev = open(&f, FileOptions::default());
        // Three pipes' worth, starting one page in.
        let (offset, len) = (4096u64, (3 << 20) + 8192);
        let piped = dev
            .read_into_pipes(offset, len)
            .expect("read")
            .expect("pipes for 3 MiB");
        assert_eq!(piped.len(), len);
        assert!(
            piped.parts.len() > 1,
            "more than a pipe's worth spans pipes"
        );
        let got = piped.read_after(&[]).expect("the pipes hold the bytes");
        assert!(got[..] == data[offset as usize..offset as usize + len]);
        // More than MAX_CHAIN pipes hold: the caller reads another way.
        let too_long = crate::pipes::MAX_CHAIN * crate::pipes::PIPE_MAX + 4096;
        assert!(dev.read_into_pipes(0, too_long).expect("read").is_none());
        assert!(
            dev.read_into_pipes(size - 4096, 8192).is_err(),
            "past the end"
        );
        let direct = open(
            &f,
            FileOptions {
                direct: true,
                ..FileOptions::default()
            },
        );
        assert!(direct.read_into_pipes(0, 4096).expect("read").is_none());
    }

    // The guard only keeps other tests' pipes apart; nothing else takes it.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn piped_writes_land_byte_for_byte_and_a_short_pipe_is_an_error() {
        let _g = crate::pipes::tests::PIPE_TESTS
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let f = temp_file(8 << 20);
        for direct in [false, true] {
            let dev = open(
                &f,
                FileOptions {
                    direct,
                    ..FileOptions::default()
                },
            );
            let head: Vec<u8> = (0..4096u32).map(|i| (i * 3) as u8).collect();
            let tail: Vec<u8> = (0..200_000u32).map(|i| (i * 13 + 1) as u8).collect();
            let pipe = crate::pipes::new_pipe(256 * 1024).expect("a pipe for the test");
            let mut at = 0;
            while at < tail.len() {
                at += rustix::io::write(pipe.writer(), &tail[at..]).expect("fill the pipe");
            }
            let offset = 1 << 20;
            let part = PipePart {
                pipe,
                len: tail.len(),
            };
            dev.write_from_pipes(offset, Bytes::from(head.clone()), vec![part], direct, true)
                .await
                .expect("a full pipe writes");
            let got = dev.read(offset, head.len() + tail.len()).await.unwrap();
            assert!(got[..head.len()] == head[..], "head (direct={direct})");
            assert!(
                got[head.len()..] == tail[..],
                "piped part (direct={direct})"
            );
            // A pipe holding less than announced fails the write.
            let pipe = crate::pipes::new_pipe(256 * 1024).expect("a pipe for the test");
            rustix::io::write(pipe.writer(), &[7u8; 1000]).expect("fill the pipe");
            let part = PipePart { pipe, len: 8192 };
            let err = dev
                .write_from_pipes(0, Bytes::new(), vec![part], false, true)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("ran dry"), "{err}");
        }
    }

    #[tokio::test]
    async fn write_read_round_trip_inline_and_blocking() {
        let f = temp_file(8 << 20);
        for inline_max in [0, 1 << 30] {
            let dev = open(
                &f,
                FileOptions {
                    inline_read_max: inline_max,
                    inline_write_max: inline_max,
                    ..FileOptions::default()
                },
            );
            let data: Vec<u8> = (0..100_000u32)
                .map(|i| (i * 7 + inline_max as u32) as u8)
                .collect();
            dev.write(12345, Bytes::from(data.clone()), false)
                .await
                .unwrap();
            dev.write(1 << 20, Bytes::from(data.clone()), true)
                .await
                .unwrap();
            assert_eq!(dev.read(12345, data.len()).await.unwrap(), data);
            assert_eq!(dev.read(1 << 20, data.len()).await.unwrap(), data);
            dev.flush().await.unwrap();
        }
    }

    #[tokio::test]
    async fn direct_io_aligned_and_unaligned() {
        let f = temp_file(4 << 20);
        let dev = open(
            &f,
            FileOptions {
                direct: true,
                ..FileOptions::default()
            },
        );
        assert_eq!(dev.capabilities().block_sizes.minimum, 4096);
        let data = Bytes::from(vec![0xabu8; 8192]);
        dev.write(4096, data.clone(), false).await.unwrap();
        assert_eq!(dev.read(4096, 8192).await.unwrap(), data);
        // Unaligned requests take the buffered descriptor and still see the data.
        assert_eq!(dev.read(4097, 10).await.unwrap(), vec![0xab; 10]);
        dev.write(5000, Bytes::from_static(b"xyz"), true)
            .await
            .unwrap();
        let back = dev.read(4096, 8192).await.unwrap();
        assert_eq!(&back[904..907], b"xyz");
    }

    #[tokio::test]
    async fn read_only_refuses_modification() {
        let f = temp_file(1 << 20);
        let dev = open(
            &f,
            FileOptions {
                read_only: true,
                ..FileOptions::default()
            },
        );
        let caps = dev.capabilities();
        assert!(caps.read_only && !caps.trim && !caps.write_zeroes);
        let e = dev
            .write(0, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let e = dev.trim(0, 4096, false).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    #[tokio::test]
    async fn out_of_range_is_an_error_not_a_panic() {
        let f = temp_file(4096);
        let dev = open(&f, FileOptions::default());
        assert!(dev.read(4000, 200).await.is_err());
        assert!(dev
            .write(u64::MAX, Bytes::from_static(b"x"), false)
            .await
            .is_err());
        assert!(dev.block_status(4096, 1, 8).await.is_err());
    }

    #[tokio::test]
    async fn zeroes_and_trim_and_block_status() {
        let f = temp_file(16 << 20);
        f.as_file().write_all(&vec![1u8; 8 << 20]).unwrap();
        let dev = open(&f, FileOptions::default());
        // Punched hole reads back as zeroes and shows up as a hole.
        dev.write_zeroes(
            1 << 20,
            1 << 20,
            ZeroFlags {
                may_trim: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(dev
            .read(1 << 20, 1 << 20)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0));
        // NO_HOLE zeroing allocates but still reads zero.
        dev.write_zeroes(3 << 20, 4096, ZeroFlags::default())
            .await
            .unwrap();
        assert!(dev
            .read(3 << 20, 4096)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0));
        assert_eq!(dev.read((3 << 20) + 4096, 1).await.unwrap(), vec![1]);
        dev.trim(5 << 20, 1 << 20, true).await.unwrap();

        let extents = dev.block_status(0, 16 << 20, 64).await.unwrap();
        assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), 16 << 20);
        assert!(extents.iter().all(|e| e.length > 0));
        // The first MiB is data, the second a hole, the tail beyond 8 MiB a hole.
        assert_eq!(
            extents[0],
            Extent {
                length: 1 << 20,
                hole: false,
                zero: false
            }
        );
        assert_eq!(
            extents[1],
            Extent {
                length: 1 << 20,
                hole: true,
                zero: true
            }
        );
        assert!(extents.last().unwrap().hole);
        // A cap on the number of extents returns a covering prefix.
        let capped = dev.block_status(0, 16 << 20, 1).await.unwrap();
        assert_eq!(capped.len(), 1);
        assert_eq!(capped[0].length, 1 << 20);
    }

    #[test]
    fn open_errors_name_the_path() {
        let e =
            FileDevice::open(Path::new("/nonexistent/x.img"), &FileOptions::default()).unwrap_err();
        assert!(
            e.to_string().starts_with("/nonexistent/x.img: cannot open"),
            "{e}"
        );
        let e = FileDevice::open(Path::new("/dev/null"), &FileOptions::default()).unwrap_err();
        assert!(
            e.to_string().contains("not a regular file or block device"),
            "{e}"
        );
    }
}

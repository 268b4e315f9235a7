//! The block device abstraction every tandem frontend serves, and a backend
//! for plain files and Linux block devices.
//!
//! The NBD server (and later ublk) only ever talks to a [`BlockDevice`]. The
//! replication engine implements the same trait, so the frontends never know
//! whether a write is mirrored. Methods are asynchronous because a replicated
//! write completes only when its protocol's conditions hold, which may be a
//! network round trip away; a local file completes most requests inline.
//!
//! Range checks are the caller's job (the NBD server answers out-of-range
//! requests with the spec's errors before they reach a device), but no device
//! may panic on any input: a bad range is an `io::Error`.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod aligned;
pub mod file;
pub mod pipes;

pub use aligned::AlignedBuf;
pub use file::{read_pipe_exact, FileDevice, FileOptions, OpenError};

use bytes::Bytes;
use std::future::Future;
use std::io;

/// Block size constraints a device reports to its clients (NBD_INFO_BLOCK_SIZE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest request granularity the device handles without read-modify-write.
    pub minimum: u32,
    /// The size that performs best.
    pub preferred: u32,
    /// Largest READ/WRITE payload accepted.
    pub maximum_payload: u32,
}

/// What a device can do. Frontends advertise exactly this and nothing more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes, trims and zeroing are refused with `EPERM`.
    pub read_only: bool,
    /// The device has a volatile cache that `flush` makes stable.
    pub flush: bool,
    /// `fua` on a write makes that write stable before it completes.
    pub fua: bool,
    /// `trim` may deallocate storage.
    pub trim: bool,
    /// `write_zeroes` is cheaper than writing a buffer of zeroes.
    pub write_zeroes: bool,
    /// `write_zeroes` with `fast_only` fails at once when zeroing would be slow.
    pub fast_zero: bool,
    /// `cache` prefetches.
    pub cache: bool,
    /// `block_status` reports holes (the device is sparse-aware).
    pub block_status: bool,
    /// Seek cost matters (a hint for clients' I/O schedulers).
    pub rotational: bool,
    /// Flush and FUA act on the whole device, whatever connection sent them,
    /// so clients may spread I/O over several connections.
    pub multi_conn: bool,
    /// Block size constraints.
    pub block_sizes: BlockSizes,
}

/// How `write_zeroes` may achieve its result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Deallocating (punching a hole) is acceptable: the client did not send NO_HOLE.
    pub may_trim: bool,
    /// Fail with `ENOTSUP` rather than fall back to writing zeroes (FAST_ZERO).
    pub fast_only: bool,
    /// Stable before completion (FUA).
    pub fua: bool,
}

/// One run of a block-status answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; never zero.
    pub length: u64,
    /// Storage is not allocated.
    pub hole: bool,
    /// Reads return zeroes.
    pub zero: bool,
}

/// A block device as the frontends see it.
///
/// Every method takes a range the caller has already checked against
/// [`BlockDevice::size`]. A completed `write` is visible to every later
/// `read` from any caller; it is durable only after a completed `flush`, or at
/// once when it carried `fua`.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes, fixed for the device's lifetime.
    fn size(&self) -> u64;

    /// What the device supports.
    fn capabilities(&self) -> Capabilities;

    /// Read `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> impl Future<Output = io::Result<Bytes>> + Send + '_;

    /// Write `data` at `offset`; with `fua`, stable before completion.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send + '_;

    /// Make every completed write stable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send + '_;

    /// Deallocate a range; its contents become unspecified (advisory).
    fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send + '_;

    /// Make a range read back as zeroes.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> impl Future<Output = io::Result<()>> + Send + '_;

    /// Prefetch a range (advisory).
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send + '_;

    /// Whether [`BlockDevice::write_piped`] saves a copy over
    /// [`BlockDevice::write`]: the NBD server then hands large write
    /// payloads over in pipes instead of reading them.
    fn takes_pipes(&self) -> bool {
        false
    }

    /// Write `head`, then the bytes in `piped`, at `offset`; as
    /// [`BlockDevice::write`] otherwise. By default the pipes are read
    /// into memory and written.
    fn write_piped(
        &self,
        offset: u64,
        head: Bytes,
        piped: pipes::Piped,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send + '_ {
        async move {
            let data = piped.read_after(&head)?;
            self.write(offset, Bytes::from(data), fua).await
        }
    }

    /// Allocation status of `[offset, offset + len)`, in order, in at most
    /// `max_extents` runs that together cover a non-empty prefix of the range.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send + '_;
}

/// `Some(offset + len)` when the range lies within a device of `size` bytes.
pub fn range_end(offset: u64, len: u64, size: u64) -> Option<u64> {
    offset.checked_add(len).filter(|end| *end <= size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_end_rejects_overflow_and_past_end() {
        assert_eq!(range_end(0, 10, 10), Some(10));
        assert_eq!(range_end(10, 0, 10), Some(10));
        assert_eq!(range_end(10, 1, 10), None);
        assert_eq!(range_end(u64::MAX, 2, u64::MAX), None);
    }
}

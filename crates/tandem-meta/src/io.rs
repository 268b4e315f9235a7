//! The small block I/O interface the metadata code runs over, a file
//! implementation, and a crash-model disk for tests.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// Positioned, synchronous I/O on the device that holds the metadata.
///
/// Synchronous on purpose: metadata updates are rare (one AL transaction per
/// cold 4 MiB extent) and must be durable before the caller continues, so the
/// engine runs them on a blocking thread of its own.
pub trait MetaIo {
    /// Size of the device in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fill `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `buf` at `offset` (not yet durable).
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Make every completed write durable.
    fn sync(&self) -> io::Result<()>;
}

/// A file or block device.
#[derive(Debug)]
pub struct FileIo {
    file: File,
    is_block: bool,
}

impl FileIo {
    /// Open `path` for reading and, unless `read_only`, writing.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        let ft = file.metadata()?.file_type();
        use std::os::unix::fs::FileTypeExt;
        if !ft.is_file() && !ft.is_block_device() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        }
        Ok(Self {
            file,
            is_block: ft.is_block_device(),
        })
    }

    /// Take the advisory lock the daemon holds on its metadata (exclusive)
    /// and the read-only verbs share, without waiting.
    pub fn lock(&self, exclusive: bool) -> Result<(), String> {
        use rustix::fs::{flock, FlockOperation};
        let op = if exclusive {
            FlockOperation::NonBlockingLockExclusive
        } else {
            FlockOperation::NonBlockingLockShared
        };
        flock(&self.file, op).map_err(|e| {
            if e == rustix::io::Errno::WOULDBLOCK {
                "metadata is in use (is the resource up? run `tandem down` first)".to_string()
            } else {
                format!("cannot lock: {e}")
            }
        })
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Grow a regular file to `len` bytes (sparse); block devices cannot grow.
    pub fn grow_to(&self, len: u64) -> io::Result<()> {
        if self.is_block {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a block device cannot be grown",
            ));
        }
        if self.size()? < len {
            self.file.set_len(len)?;
        }
        Ok(())
    }
}

impl MetaIo for FileIo {
    fn size(&self) -> io::Result<u64> {
        if self.is_block {
            // Seeking to the end is the portable way to size a block device.
            Ok(rustix::fs::seek(&self.file, rustix::fs::SeekFrom::End(0))?)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        Ok(rustix::fs::fdatasync(&self.file)?)
    }
}

/// How a [`CrashDisk`] treats writes that were not synced when it crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unsynced write is lost.
    DropAll,
    /// Every unsynced write survives.
    KeepAll,
    /// Each unsynced 512-byte sector independently survives or not, decided
    /// by the seed: the torn writes of a power failure.
    Tear(u64),
}

#[derive(Debug, Default)]
struct CrashState {
    durable: Vec<u8>,
    /// Written but not yet synced: (offset, bytes), in write order.
    pending: Vec<(u64, Vec<u8>)>,
    /// Number of writes after which the next write fails (a full disk or a
    /// dying one), if set.
    fail_after: Option<usize>,
    writes: usize,
    syncs: usize,
}

/// An in-memory disk that keeps written-but-unsynced data apart from durable
/// data and can drop or tear it at a crash, like a power failure would.
/// Clones share the same disk.
#[derive(Clone, Debug, Default)]
pub struct CrashDisk {
    state: Arc<Mutex<CrashState>>,
}

const SECTOR: usize = 512;

impl CrashDisk {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(CrashState {
                durable: vec![0; size],
                ..CrashState::default()
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CrashState> {
        // A panic while holding the lock is a test failure already; keep the
        // data usable for the report.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply the unsynced writes as `mode` says and forget the rest.
    pub fn crash(&self, mode: CrashMode) {
        let mut st = self.lock();
        let pending = std::mem::take(&mut st.pending);
        let mut rng = match mode {
            CrashMode::Tear(seed) => seed | 1,
            _ => 0,
        };
        for (offset, data) in pending {
            for (i, sector) in data.chunks(SECTOR).enumerate() {
                let keep = match mode {
                    CrashMode::DropAll => false,
                    CrashMode::KeepAll => true,
                    CrashMode::Tear(_) => {
                        // xorshift64: deterministic per seed, no dependency.
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng & 1 == 1
                    }
                };
                if keep {
                    let at = offset as usize + i * SECTOR;
                    st.durable[at..at + sector.len()].copy_from_slice(sector);
                }
            }
        }
    }

    /// Make the `n`-th write from now on (0 = the next) and every later one fail.
    pub fn fail_writes_after(&self, n: usize) {
        let mut st = self.lock();
        st.fail_after = Some(st.writes + n);
    }

    /// Let writes succeed again.
    pub fn stop_failing(&self) {
        self.lock().fail_after = None;
    }

    /// Number of writes and syncs so far.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.writes, st.syncs)
    }

    fn check(len: usize, offset: u64, n: usize) -> io::Result<usize> {
        let start = usize::try_from(offset).ok();
        match start.and_then(|s| s.checked_add(n).map(|e| (s, e))) {
            Some((s, e)) if e <= len => Ok(s),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("range {offset}+{n} beyond the end of a {len}-byte disk"),
            )),
        }
    }
}

impl MetaIo for CrashDisk {
    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().durable.len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let st = self.lock();
        let start = Self::check(st.durable.len(), offset, buf.len())?;
        buf.copy_from_slice(&st.durable[start..start + buf.len()]);
        // The page cache shows unsynced writes to readers.
        for (o, data) in &st.pending {
            let (o, end) = (*o as usize, *o as usize + data.len());
            let lo = o.max(start);
            let hi = end.min(start + buf.len());
            if lo < hi {
                buf[lo - start..hi - start].copy_from_slice(&data[lo - o..hi - o]);
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        Self::check(st.durable.len(), offset, buf.len())?;
        if st.fail_after.is_some_and(|n| st.writes >= n) {
            return Err(io::Error::other("injected write error"));
        }
        st.writes += 1;
        st.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.lock();
        st.syncs += 1;
        let pending = std::mem::take(&mut st.pending);
        for (o, data) in pending {
            let o = o as usize;
            st.durable[o..o + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_model_separates_synced_from_unsynced() {
        let d = CrashDisk::new(4096);
        d.write_at(0, &[1; 1024]).unwrap();
        d.sync().unwrap();
        d.write_at(1024, &[2; 1024]).unwrap();
        let mut b = [0u8; 2048];
        d.read_at(0, &mut b).unwrap();
        assert_eq!(b[1500], 2, "unsynced data is visible before the crash");
        d.crash(CrashMode::DropAll);
        d.read_at(0, &mut b).unwrap();
        assert_eq!((b[0], b[1500]), (1, 0));

        d.write_at(1024, &[3; 4096 - 1024]).unwrap();
        d.crash(CrashMode::Tear(7));
        let mut all = vec![0u8; 4096];
        d.read_at(0, &mut all).unwrap();
        let kept: Vec<bool> = all[1024..].chunks(512).map(|s| s[0] == 3).collect();
        assert!(
            kept.iter().any(|k| *k) && kept.iter().any(|k| !*k),
            "{kept:?}"
        );
        assert!(d.read_at(4000, &mut b).is_err());
    }
}

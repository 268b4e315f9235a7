//! A heap buffer aligned for O_DIRECT.
//!
//! O_DIRECT needs the memory, the offset and the length aligned to the
//! device's logical block size. `Vec<u8>` gives no alignment guarantee, so
//! direct I/O goes through this type; `Bytes::from_owner` hands it to the
//! network layer without a copy.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// A zero-initialised buffer whose start is aligned to `align` bytes.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
    len: usize,
}

// SAFETY: the buffer is uniquely owned heap memory, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access is read-only (`AsRef<[u8]>`); mutation needs `&mut`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two).
    /// `None` if the layout is impossible or memory is exhausted.
    pub fn zeroed(len: usize, align: usize) -> Option<Self> {
        // A zero-sized allocation is not allowed by the allocator API.
        let layout = Layout::from_size_align(len.max(1), align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw)?;
        Some(Self { ptr, layout, len })
    }

    /// A copy of `data` in aligned memory.
    pub fn copy_from(data: &[u8], align: usize) -> Option<Self> {
        let mut buf = Self::zeroed(data.len(), align)?;
        buf.as_mut_slice().copy_from_slice(data);
        Some(buf)
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to `layout.size() >= len` initialised bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr points to `layout.size() >= len` initialised bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 1 << 20] {
            let buf = AlignedBuf::zeroed(len, 4096).unwrap();
            assert_eq!(buf.as_ref().as_ptr() as usize % 4096, 0);
            assert_eq!(buf.as_ref().len(), len);
            assert!(buf.as_ref().iter().all(|b| *b == 0));
        }
        let copy = AlignedBuf::copy_from(b"abc", 512).unwrap();
        assert_eq!(copy.as_ref(), b"abc");
    }
}

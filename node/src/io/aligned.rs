//! A heap buffer aligned for O_DIRECT. The alignment is part of the type's contract: the
//! address and the capacity are multiples of [`DIRECT_IO_ALIGN`], which covers both the
//! disk's 512-byte logical and 4 KiB physical blocks, so writes are never read-modify-write.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// Alignment of every direct-I/O buffer, offset and length.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// Rounds `len` up to a multiple of [`DIRECT_IO_ALIGN`].
pub const fn align_up(len: usize) -> usize {
    len.div_ceil(DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN
}

/// A zero-initialised, fixed-capacity buffer aligned to [`DIRECT_IO_ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of initialised bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `capacity` bytes (rounded up to the alignment).
    pub fn new(capacity: usize) -> Self {
        let capacity = align_up(capacity.max(1));
        let layout = Layout::from_size_align(capacity, DIRECT_IO_ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self {
            ptr,
            capacity,
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the buffer (contents are overwritten before the next use).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `bytes`; panics if they do not fit (callers size groups before filling).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        assert!(
            self.len + bytes.len() <= self.capacity,
            "aligned buffer overflow"
        );
        // SAFETY: the range [len, len + bytes.len()) lies inside the allocation (checked
        // above) and cannot overlap `bytes`, which is borrowed immutably elsewhere.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(self.len),
                bytes.len(),
            );
        }
        self.len += bytes.len();
    }

    /// Zero-fills up to the next multiple of the alignment, so the buffer can be written
    /// with O_DIRECT as it is.
    pub fn pad_to_alignment(&mut self) {
        let target = align_up(self.len);
        let len = self.len;
        self.as_mut_full()[len..target].fill(0);
        self.len = target;
    }

    /// Sets the length (for buffers filled by a read).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity);
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes are initialised (the allocation is zeroed).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole capacity, for reads into the buffer.
    pub fn as_mut_full(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is `capacity` bytes, zero-initialised, exclusively owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.capacity, DIRECT_IO_ALIGN).expect("valid layout");
        // SAFETY: allocated in `new` with exactly this layout and not freed since.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_padded() {
        let mut buf = AlignedBuf::new(10_000);
        assert_eq!(buf.capacity(), 12_288);
        assert_eq!(buf.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        buf.extend_from_slice(&[7; 100]);
        buf.pad_to_alignment();
        assert_eq!(buf.len(), 4096);
        assert_eq!(buf.as_slice()[99], 7);
        assert_eq!(buf.as_slice()[100], 0);
    }
}

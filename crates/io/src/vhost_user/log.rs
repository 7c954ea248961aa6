//! The dirty-page log of a live migration (vhost-user `LOG_SHMFD` with
//! `VHOST_F_LOG_ALL`).
//!
//! QEMU migrates a running guest by copying its RAM while it runs, then
//! again every page written since. Pages this backend writes (frames into
//! the guest's receive buffers, used-ring entries and indices) are not seen
//! by QEMU's own tracking, so the backend records them in a log QEMU shares
//! with it (`SET_LOG_BASE`: a file descriptor, a size, an offset): a bitmap
//! with one bit per 4 KiB page of guest-physical memory, bit `n % 8` of byte
//! `n / 8` for page `n`. Logging is on while the acked features include
//! `VHOST_F_LOG_ALL`; QEMU reads and clears the bitmap meanwhile, so bits are
//! set with atomic ORs, never plain stores.
//!
//! Every write to guest memory goes through vm-memory's checked accessors,
//! which tell the region's bitmap each byte range they write
//! (`Bitmap::mark_dirty`, relative to the region). [`LogBitmap`] is that
//! bitmap: it adds the region's guest-physical base and sets the pages' bits
//! in the device's [`DirtyLog`]. When logging is off this costs one atomic
//! load per write.
//!
//! The log's size and offset are the frontend's word, so they are checked
//! against the file (a mapping past its end would raise `SIGBUS` on first
//! touch) and bounded ([`MAX_LOG_BYTES`]); a page past the log's end is not
//! logged (it is counted: [`DirtyLog::outside`]), never written out of
//! bounds. A new `SET_LOG_BASE` replaces the mapping; the old one is
//! unmapped once no writer holds it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};

/// Bytes of guest memory one bit of the log stands for (the vhost log page).
pub const LOG_PAGE: u64 = 0x1000;

/// Largest log accepted: 1 GiB of bitmap covers 32 TiB of guest memory.
pub const MAX_LOG_BYTES: u64 = 1 << 30;

/// `VHOST_F_LOG_ALL` (26): the frontend wants every write logged.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// Why a log was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Size 0, over [`MAX_LOG_BYTES`], or past the end of the file.
    #[error("log of {size} bytes at offset {offset}: {reason}")]
    Bounds {
        /// The size asked for.
        size: u64,
        /// The offset asked for.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be examined or mapped.
    #[error("log file: {0}")]
    Io(#[from] std::io::Error),
}

/// The log's bitmap mapped from QEMU's file.
#[derive(Debug)]
struct LogMap {
    /// The mapping's start (page aligned) and length, for `munmap`.
    base: NonNull<libc::c_void>,
    map_len: usize,
    /// The bitmap's first byte (the mapping's start plus the offset's part
    /// below a page) and its length.
    bits: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is shared memory owned by this value until it drops;
// it is only reached through atomic byte operations (`AtomicU8`), which may
// run on any thread at once.
unsafe impl Send for LogMap {}
// SAFETY: as for `Send`: every access is atomic.
unsafe impl Sync for LogMap {}

impl LogMap {
    fn map(file: &File, size: u64, offset: u64) -> Result<LogMap, LogError> {
        let bounds = |reason: String| LogError::Bounds { size, offset, reason };
        if size == 0 || size > MAX_LOG_BYTES {
            return Err(bounds(format!("the size must be 1 to {MAX_LOG_BYTES} bytes")));
        }
        let file_len = file.metadata()?.len();
        let end = offset
            .checked_add(size)
            .ok_or_else(|| bounds("offset + size overflows".into()))?;
        if end > file_len {
            return Err(bounds(format!("past the end of its {file_len}-byte file")));
        }
        // SAFETY: sysconf takes no pointers.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as u64,
            _ => 4096,
        };
        let map_offset = offset - offset % page;
        let lead = (offset - map_offset) as usize;
        let len = usize::try_from(size).map_err(|_| bounds("too large for this machine".into()))?;
        let map_len = lead + len;
        let file_offset = libc::off_t::try_from(map_offset).map_err(|_| bounds("offset out of range".into()))?;
        // SAFETY: a new shared mapping of `map_len` bytes of the file at a
        // page-aligned offset, inside the file (checked above); the kernel
        // picks the address, so nothing existing is replaced.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                file_offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        let base = NonNull::new(base).ok_or_else(|| bounds("mapped at address 0".into()))?;
        // SAFETY: `lead` < one page <= `map_len`: inside the mapping.
        let bits = unsafe { NonNull::new_unchecked(base.as_ptr().cast::<u8>().add(lead)) };
        Ok(LogMap {
            base,
            map_len,
            bits,
            len,
        })
    }

    /// The log's byte `i`, if it is inside the log.
    fn byte(&self, i: u64) -> Option<&AtomicU8> {
        let i = usize::try_from(i).ok().filter(|&i| i < self.len)?;
        // SAFETY: `i < len`, so the byte is inside the mapping, which lives
        // as long as `self`; `AtomicU8` has the size and alignment of `u8`,
        // and the memory is only ever accessed atomically by this process.
        Some(unsafe { &*self.bits.as_ptr().add(i).cast::<AtomicU8>() })
    }

    /// Set the bits of the pages `[gpa, gpa + len)` touches; how many pages
    /// fell past the log's end.
    fn set(&self, gpa: u64, len: usize) -> u64 {
        if len == 0 {
            return 0;
        }
        let last = gpa.saturating_add(len as u64 - 1);
        let mut outside = 0;
        for page in gpa / LOG_PAGE..=last / LOG_PAGE {
            match self.byte(page / 8) {
                Some(b) => {
                    b.fetch_or(1 << (page % 8), Ordering::Relaxed);
                }
                None => outside += 1,
            }
        }
        outside
    }

    fn is_set(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE;
        self.byte(page / 8)
            .is_some_and(|b| b.load(Ordering::Relaxed) & (1 << (page % 8)) != 0)
    }
}

impl Drop for LogMap {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `map` made; nothing borrows it once its owner drops.
        unsafe {
            libc::munmap(self.base.as_ptr(), self.map_len);
        }
    }
}

/// One device's dirty-page log: the mapped bitmap (when QEMU gave one) and
/// whether logging is on. Shared by the bitmaps of every region of the
/// device's guest memory.
#[derive(Debug, Default)]
pub struct DirtyLog {
    on: AtomicBool,
    map: RwLock<Option<LogMap>>,
    outside: AtomicU64,
}

impl DirtyLog {
    /// Map `size` bytes of `file` at `offset` as the log, replacing any log
    /// before it. Refused (and the old log kept) when the range is bad.
    pub fn set_base(&self, file: &File, size: u64, offset: u64) -> Result<(), LogError> {
        let map = LogMap::map(file, size, offset)?;
        // The old mapping, if any, is unmapped here, after the writers
        // holding the lock let go.
        let old = self.map.write().unwrap_or_else(|p| p.into_inner()).replace(map);
        drop(old);
        Ok(())
    }

    /// Logging on (`VHOST_F_LOG_ALL` acked) or off.
    pub fn set_logging(&self, on: bool) {
        self.on.store(on, Ordering::Release);
    }

    /// Whether writes are logged now (on, and a log is mapped).
    pub fn logging(&self) -> bool {
        self.on.load(Ordering::Acquire) && self.map.read().is_ok_and(|m| m.is_some())
    }

    /// Logging off and the log unmapped (the session ended).
    pub fn clear(&self) {
        self.set_logging(false);
        let old = self.map.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(old);
    }

    /// Pages written while logging that fell past the log's end.
    pub fn outside(&self) -> u64 {
        self.outside.load(Ordering::Relaxed)
    }

    /// Log a write of `len` bytes at guest-physical `gpa`.
    pub fn mark(&self, gpa: u64, len: usize) {
        if !self.on.load(Ordering::Acquire) {
            return;
        }
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = map.as_ref() {
            let outside = m.set(gpa, len);
            if outside != 0 {
                self.outside.fetch_add(outside, Ordering::Relaxed);
            }
        }
    }

    /// Whether the page holding `gpa` is marked in the log.
    pub fn is_marked(&self, gpa: u64) -> bool {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|m| m.is_set(gpa))
    }
}

/// Where one region of guest memory is, and the log it writes to.
#[derive(Debug, Default)]
pub struct RegionLog {
    base: AtomicU64,
    log: OnceLock<Arc<DirtyLog>>,
}

impl RegionLog {
    fn mark(&self, offset: usize, len: usize) {
        if let Some(log) = self.log.get() {
            log.mark(self.base.load(Ordering::Relaxed).saturating_add(offset as u64), len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log
            .get()
            .is_some_and(|log| log.is_marked(self.base.load(Ordering::Relaxed).saturating_add(offset as u64)))
    }
}

/// The bitmap of one region of a device's guest memory (vm-memory's
/// `Bitmap`): writes are logged in the device's [`DirtyLog`] once the region
/// is attached to it ([`LogBitmap::attach`]); before, they are not.
#[derive(Debug, Clone, Default)]
pub struct LogBitmap {
    region: Arc<RegionLog>,
}

impl LogBitmap {
    /// The region starts at guest-physical `base` and logs into `log` (once: a region is attached when mapped).
    pub fn attach(&self, base: u64, log: Arc<DirtyLog>) {
        self.region.base.store(base, Ordering::Relaxed);
        let _ = self.region.log.set(log);
    }
}

impl NewBitmap for LogBitmap {
    fn with_len(_len: usize) -> Self {
        LogBitmap::default()
    }
}

impl<'a> WithBitmapSlice<'a> for LogBitmap {
    type S = LogSlice<'a>;
}

impl Bitmap for LogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.region.mark(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.region.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> LogSlice<'_> {
        LogSlice {
            region: &self.region,
            offset,
        }
    }
}

/// A [`LogBitmap`] from an offset into its region on (vm-memory's bitmap
/// slice, made for every access: a reference and an offset, no reference count).
#[derive(Debug, Clone, Copy)]
pub struct LogSlice<'a> {
    region: &'a RegionLog,
    offset: usize,
}

impl WithBitmapSlice<'_> for LogSlice<'_> {
    type S = Self;
}

impl BitmapSlice for LogSlice<'_> {}

impl Bitmap for LogSlice<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.region.mark(self.offset.saturating_add(offset), len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.region.dirty_at(self.offset.saturating_add(offset))
    }

    fn slice_at(&self, offset: usize) -> Self {
        LogSlice {
            region: self.region,
            offset: self.offset.saturating_add(offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(len: usize) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0u8; len]).unwrap();
        f
    }

    fn bytes(f: &File, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0; len];
        f.read_exact_at(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn marks_the_pages_a_write_touches_in_the_shared_file() {
        let f = file(16);
        let log = DirtyLog::default();
        log.set_base(&f, 16, 0).unwrap();
        // Off: nothing is logged.
        log.mark(0, 1);
        assert_eq!(bytes(&f, 16), vec![0; 16]);
        log.set_logging(true);
        assert!(log.logging());
        // Page 1 (one byte), pages 9-10 (a write across a page boundary).
        log.mark(LOG_PAGE + 5, 1);
        log.mark(10 * LOG_PAGE - 2, 4);
        let b = bytes(&f, 16);
        assert_eq!(b[0], 0b0000_0010);
        assert_eq!(b[1], 0b0000_0110);
        assert!(b[2..].iter().all(|&x| x == 0));
        assert!(log.is_marked(LOG_PAGE) && !log.is_marked(0) && !log.is_marked(2 * LOG_PAGE));
        // Past the log's end (16 bytes = 128 pages): counted, not written.
        log.mark(128 * LOG_PAGE, 2 * LOG_PAGE as usize);
        assert_eq!(log.outside(), 2);
        log.mark(u64::MAX - 1, 10);
        assert_eq!(log.outside(), 3);
        assert_eq!(bytes(&f, 16)[2..], [0; 14]);
        // Off again, and cleared.
        log.clear();
        assert!(!log.logging());
        log.mark(0, 1);
        assert_eq!(bytes(&f, 16)[0], 0b0000_0010);
    }

    #[test]
    fn refuses_logs_that_do_not_fit_their_file_and_keeps_the_old_one() {
        let f = file(8192);
        let log = DirtyLog::default();
        log.set_base(&f, 16, 4096 + 3).unwrap();
        log.set_logging(true);
        log.mark(8 * LOG_PAGE, 1);
        // The offset below a page is honoured: byte 1 of the log is file byte 4100.
        assert_eq!(bytes(&f, 8192)[4096 + 3 + 1], 1);
        for (size, offset) in [
            (0, 0),
            (8193, 0),
            (16, 8190),
            (16, u64::MAX - 3),
            (MAX_LOG_BYTES + 1, 0),
        ] {
            assert!(
                matches!(log.set_base(&f, size, offset), Err(LogError::Bounds { .. })),
                "{size} at {offset}"
            );
        }
        assert!(log.logging(), "a refused log leaves the old one");
        // Replaced by a new log: writes go there.
        let g = file(16);
        log.set_base(&g, 16, 0).unwrap();
        log.mark(0, 1);
        assert_eq!(bytes(&g, 16)[0], 1);
    }

    #[test]
    fn a_region_bitmap_logs_at_its_guest_physical_base() {
        let f = file(64);
        let log = Arc::new(DirtyLog::default());
        log.set_base(&f, 64, 0).unwrap();
        log.set_logging(true);
        let b = LogBitmap::with_len(0x10000);
        b.mark_dirty(0, 1);
        assert_eq!(bytes(&f, 64), vec![0; 64], "not attached: not logged");
        b.attach(0x10_0000, log.clone());
        b.slice_at(0x2000).mark_dirty(0x10, 1);
        // Page 0x102 → byte 0x20, bit 2.
        assert_eq!(bytes(&f, 64)[0x20], 0b100);
        assert!(b.dirty_at(0x2000) && !b.dirty_at(0x3000));
        assert!(b.slice_at(0x1000).slice_at(0x1000).dirty_at(0));
    }
}

//! The guest's memory, as QEMU shares it in `SET_MEM_TABLE`.
//!
//! Each region arrives as a file descriptor (the memfd or hugetlbfs file
//! backing guest RAM), an offset into it, a size, the guest-physical
//! address it appears at, and the address QEMU itself mapped it at. The
//! regions are mapped shared into this process and gathered into one
//! `vm_memory::GuestMemoryMmap`, through whose checked accessors every
//! access to guest memory goes. Ring addresses arrive as QEMU's own
//! virtual addresses (`SET_VRING_ADDR`) and are translated to
//! guest-physical ones here.
//!
//! Each region's bitmap ([`super::log::LogBitmap`]) is attached to the
//! device's dirty-page log, so every write through those accessors is
//! logged while QEMU migrates the guest.
//!
//! A region that extends past the end of its file is refused: touching
//! such a mapping would raise `SIGBUS` and kill the agent. (QEMU's
//! `memory-backend-memfd` seals its file against shrinking; an unsealed
//! file truncated later is a frontend bug this process cannot guard
//! against without handling `SIGBUS`.)

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::log::{DirtyLog, LogBitmap};

/// The guest memory type of the device: shared mappings whose writes are
/// logged while the guest migrates ([`super::log`]).
pub type GuestMem = GuestMemoryMmap<LogBitmap>;

/// Why a memory table was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MemoryError {
    #[error("{regions} regions but {files} file descriptors")]
    FdCount { regions: usize, files: usize },
    #[error("region {index}: {reason}")]
    Region { index: usize, reason: String },
    #[error("regions overlap or cannot be combined: {0}")]
    Combine(String),
}

/// Where one region sits in QEMU's address space and in the guest's.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    user_addr: u64,
    size: u64,
    guest_addr: u64,
}

/// The mapped guest memory and the translation of QEMU's addresses.
#[derive(Debug, Clone)]
pub(crate) struct MemoryTable {
    pub mem: Arc<GuestMem>,
    mappings: Vec<Mapping>,
}

impl MemoryTable {
    /// Map `regions`, whose backing files are `files` in the same order,
    /// their writes logged in `log`.
    pub fn map(
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        log: &Arc<DirtyLog>,
    ) -> Result<MemoryTable, MemoryError> {
        if regions.len() != files.len() {
            return Err(MemoryError::FdCount {
                regions: regions.len(),
                files: files.len(),
            });
        }
        let mut mapped = Vec::with_capacity(regions.len());
        let mut mappings = Vec::with_capacity(regions.len());
        for (index, (region, file)) in regions.iter().zip(files).enumerate() {
            let bad = |reason: String| MemoryError::Region { index, reason };
            // The message struct is packed: copy its fields out before use.
            let (size, offset) = (region.memory_size, region.mmap_offset);
            let (guest_addr, user_addr) = (region.guest_phys_addr, region.user_addr);
            let file_len = file
                .metadata()
                .map_err(|e| bad(format!("cannot stat its file: {e}")))?
                .len();
            let end = offset
                .checked_add(size)
                .ok_or_else(|| bad("offset + size overflows".into()))?;
            if size == 0 || end > file_len {
                return Err(bad(format!(
                    "{size} bytes at offset {offset} do not fit its {file_len}-byte file"
                )));
            }
            if guest_addr.checked_add(size).is_none() || user_addr.checked_add(size).is_none() {
                return Err(bad("address + size overflows".into()));
            }
            let mapping = region
                .mmap_region::<LogBitmap>(file)
                .map_err(|e| bad(format!("mmap: {e}")))?;
            mapping.bitmap().attach(guest_addr, log.clone());
            let guest = GuestRegionMmap::new(mapping, GuestAddress(guest_addr))
                .ok_or_else(|| bad("guest address + size overflows".into()))?;
            mapped.push(guest);
            mappings.push(Mapping {
                user_addr,
                size,
                guest_addr,
            });
        }
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Combine(e.to_string()))?;
        Ok(MemoryTable {
            mem: Arc::new(mem),
            mappings,
        })
    }

    /// Number of regions.
    pub fn regions(&self) -> usize {
        self.mappings.len()
    }

    /// The guest-physical address of QEMU's virtual address `user_addr`.
    pub fn translate(&self, user_addr: u64) -> Option<u64> {
        self.mappings.iter().find_map(|m| {
            let off = user_addr.checked_sub(m.user_addr)?;
            (off < m.size).then(|| m.guest_addr + off)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn region(gpa: u64, size: u64, user: u64, offset: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(gpa, size, user, offset)
    }

    fn log() -> Arc<DirtyLog> {
        Arc::new(DirtyLog::default())
    }

    fn file(len: usize) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0u8; len]).unwrap();
        f
    }

    #[test]
    fn maps_regions_and_translates_qemu_addresses() {
        let regions = [
            region(0, 0x10000, 0x7f00_0000_0000, 0),
            region(0x10_0000, 0x1000, 0x7f00_1000_0000, 0x1000),
        ];
        let t = MemoryTable::map(&regions, vec![file(0x10000), file(0x2000)], &log()).unwrap();
        assert_eq!(t.regions(), 2);
        assert_eq!(t.translate(0x7f00_0000_0010), Some(0x10));
        assert_eq!(t.translate(0x7f00_1000_0fff), Some(0x10_0fff));
        assert_eq!(t.translate(0x7f00_1000_1000), None);
        assert_eq!(t.translate(0), None);
        t.mem.write_obj(0xabcdu16, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(t.mem.num_regions(), 2);
    }

    #[test]
    fn refuses_regions_that_do_not_fit_their_file_or_overlap() {
        let past_end = MemoryTable::map(&[region(0, 0x2000, 0x1000_0000, 0)], vec![file(0x1000)], &log());
        assert!(
            matches!(past_end, Err(MemoryError::Region { index: 0, .. })),
            "{past_end:?}"
        );
        let offset_past = MemoryTable::map(
            &[region(0, 0x1000, 0x1000_0000, u64::MAX - 10)],
            vec![file(0x1000)],
            &log(),
        );
        assert!(
            matches!(offset_past, Err(MemoryError::Region { .. })),
            "{offset_past:?}"
        );
        let empty = MemoryTable::map(&[region(0, 0, 0x1000_0000, 0)], vec![file(0x1000)], &log());
        assert!(matches!(empty, Err(MemoryError::Region { .. })), "{empty:?}");
        let overlap = MemoryTable::map(
            &[
                region(0, 0x2000, 0x1000_0000, 0),
                region(0x1000, 0x2000, 0x2000_0000, 0),
            ],
            vec![file(0x2000), file(0x2000)],
            &log(),
        );
        assert!(matches!(overlap, Err(MemoryError::Combine(_))), "{overlap:?}");
        let fds = MemoryTable::map(&[region(0, 0x1000, 0, 0)], vec![], &log());
        assert!(matches!(fds, Err(MemoryError::FdCount { .. })), "{fds:?}");
    }
}

//! A minimal, safe binding to Vectorscan (libhs, the maintained fork of
//! Hyperscan; Debian's `libvectorscan-dev`): literal databases in block
//! mode, scratch space, and scanning.
//!
//! Only what the prefilter needs is declared, from `hs/hs_compile.h`,
//! `hs/hs_runtime.h` and `hs/hs_common.h` (version 5.4). Ownership follows
//! the library's rules: a compiled [`Database`] is immutable and may be
//! shared by threads; a [`Scratch`] is used by one thread at a time and must
//! have been sized for every database it scans with (see [`Scratch::fit`]).
//! The match callback never unwinds into C: it only pushes pattern ids into
//! a vector, inside `catch_unwind`, and stops the scan if that panicked.

use core::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void};
use core::ptr::NonNull;

#[repr(C)]
struct HsDatabase {
    _private: [u8; 0],
}

#[repr(C)]
struct HsScratch {
    _private: [u8; 0],
}

#[repr(C)]
struct HsCompileError {
    message: *const c_char,
    expression: c_int,
}

const HS_SUCCESS: c_int = 0;
const HS_FLAG_CASELESS: c_uint = 1;
const HS_FLAG_SINGLEMATCH: c_uint = 8;
const HS_MODE_BLOCK: c_uint = 1;

type MatchHandler =
    unsafe extern "C" fn(id: c_uint, from: c_ulonglong, to: c_ulonglong, flags: c_uint, ctx: *mut c_void) -> c_int;

#[link(name = "hs")]
unsafe extern "C" {
    fn hs_compile_lit_multi(
        expressions: *const *const c_char,
        flags: *const c_uint,
        ids: *const c_uint,
        lens: *const usize,
        elements: c_uint,
        mode: c_uint,
        platform: *const c_void,
        db: *mut *mut HsDatabase,
        error: *mut *mut HsCompileError,
    ) -> c_int;
    fn hs_free_compile_error(error: *mut HsCompileError) -> c_int;
    fn hs_free_database(db: *mut HsDatabase) -> c_int;
    fn hs_database_size(db: *const HsDatabase, size: *mut usize) -> c_int;
    fn hs_alloc_scratch(db: *const HsDatabase, scratch: *mut *mut HsScratch) -> c_int;
    fn hs_free_scratch(scratch: *mut HsScratch) -> c_int;
    fn hs_scan(
        db: *const HsDatabase,
        data: *const c_char,
        length: c_uint,
        flags: c_uint,
        scratch: *mut HsScratch,
        on_event: Option<MatchHandler>,
        ctx: *mut c_void,
    ) -> c_int;
}

/// A Vectorscan call that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vectorscan: {0}")]
pub struct VectorscanError(pub String);

/// A compiled literal database.
#[derive(Debug)]
pub struct Database {
    ptr: NonNull<HsDatabase>,
    /// Longest pattern, for scanning long data in overlapping pieces.
    max_len: usize,
}

// SAFETY: a compiled database is never written after compilation; the
// library documents it as safe to use from many threads at once.
unsafe impl Send for Database {}
// SAFETY: as above: shared references only read it.
unsafe impl Sync for Database {}

impl Database {
    /// Compiles literals, matched ASCII case-insensitively, each reported at
    /// most once per scan, identified by their index.
    pub fn literals(patterns: &[Vec<u8>]) -> Result<Database, VectorscanError> {
        if patterns.is_empty() || patterns.iter().any(Vec::is_empty) {
            return Err(VectorscanError("no patterns, or an empty one".into()));
        }
        let count = c_uint::try_from(patterns.len()).map_err(|_| VectorscanError("too many patterns".into()))?;
        let ptrs: Vec<*const c_char> = patterns.iter().map(|p| p.as_ptr().cast()).collect();
        let lens: Vec<usize> = patterns.iter().map(Vec::len).collect();
        let flags = vec![HS_FLAG_CASELESS | HS_FLAG_SINGLEMATCH; patterns.len()];
        let ids: Vec<c_uint> = (0..count).collect();
        let mut db: *mut HsDatabase = core::ptr::null_mut();
        let mut err: *mut HsCompileError = core::ptr::null_mut();
        // SAFETY: the four arrays hold `count` elements each and outlive the
        // call; literals carry their lengths, so they need no terminator; the
        // out-pointers are valid.
        let rc = unsafe {
            hs_compile_lit_multi(
                ptrs.as_ptr(),
                flags.as_ptr(),
                ids.as_ptr(),
                lens.as_ptr(),
                count,
                HS_MODE_BLOCK,
                core::ptr::null(),
                &mut db,
                &mut err,
            )
        };
        if rc != HS_SUCCESS {
            let msg = if err.is_null() {
                format!("compile failed ({rc})")
            } else {
                // SAFETY: on failure the library sets `err` to a compile error whose
                // message is a NUL-terminated string; we free it exactly once.
                unsafe {
                    let m = core::ffi::CStr::from_ptr((*err).message).to_string_lossy().into_owned();
                    hs_free_compile_error(err);
                    m
                }
            };
            return Err(VectorscanError(msg));
        }
        let ptr = NonNull::new(db).ok_or_else(|| VectorscanError("compile returned no database".into()))?;
        Ok(Database {
            ptr,
            max_len: lens.iter().copied().max().unwrap_or(1),
        })
    }

    /// Bytes of the compiled database.
    pub fn size(&self) -> usize {
        let mut size = 0usize;
        // SAFETY: `self.ptr` is a live database; `size` is a valid out-pointer.
        let rc = unsafe { hs_database_size(self.ptr.as_ptr(), &mut size) };
        if rc == HS_SUCCESS { size } else { 0 }
    }

    /// Adds the index of every pattern found in `data` to `found` (once each).
    pub fn scan(&self, scratch: &mut Scratch, data: &[u8], found: &mut Vec<u32>) -> Result<(), VectorscanError> {
        let Some(s) = scratch.ptr else {
            return Err(VectorscanError("scratch not allocated for this database".into()));
        };
        // Pieces no longer than the library's length type, overlapping by a
        // pattern length so that nothing straddling a cut is missed.
        const PIECE: usize = 1 << 30;
        let mut at = 0;
        loop {
            let end = (at + PIECE).min(data.len());
            let piece = &data[at..end];
            let mut ctx = Ctx { found, panicked: false };
            // SAFETY: the database and scratch are live, the scratch was sized for
            // this database (`Scratch::fit`) and is borrowed mutably, so no other
            // scan uses it; `piece` is valid for its length, which fits a c_uint;
            // `ctx` outlives the call, and the callback only touches `ctx`.
            let rc = unsafe {
                hs_scan(
                    self.ptr.as_ptr(),
                    piece.as_ptr().cast(),
                    piece.len() as c_uint,
                    0,
                    s.as_ptr(),
                    Some(on_match),
                    (&mut ctx as *mut Ctx<'_>).cast(),
                )
            };
            if ctx.panicked {
                return Err(VectorscanError("match callback failed".into()));
            }
            if rc != HS_SUCCESS {
                return Err(VectorscanError(format!("scan failed ({rc})")));
            }
            if end == data.len() {
                return Ok(());
            }
            at = end - (self.max_len - 1).min(end - at);
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // SAFETY: the database was allocated by the library and is freed once.
        unsafe {
            hs_free_database(self.ptr.as_ptr());
        }
    }
}

struct Ctx<'a> {
    found: &'a mut Vec<u32>,
    panicked: bool,
}

unsafe extern "C" fn on_match(
    id: c_uint,
    _from: c_ulonglong,
    _to: c_ulonglong,
    _flags: c_uint,
    ctx: *mut c_void,
) -> c_int {
    // SAFETY: `ctx` is the `Ctx` passed to hs_scan by `Database::scan`, alive
    // and not otherwise borrowed for the duration of the scan.
    let ctx = unsafe { &mut *ctx.cast::<Ctx<'_>>() };
    let found = &mut *ctx.found;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| found.push(id))) {
        Ok(()) => 0,
        Err(_) => {
            ctx.panicked = true;
            1
        }
    }
}

/// Scratch space for scanning; one per thread.
#[derive(Debug, Default)]
pub struct Scratch {
    ptr: Option<NonNull<HsScratch>>,
}

// SAFETY: a scratch may move between threads; it is used by one at a time,
// which `&mut self` in `Database::scan` guarantees (it is not `Sync`).
unsafe impl Send for Scratch {}

impl Scratch {
    /// An empty scratch (fit it to databases before scanning).
    #[cfg(test)]
    pub fn new() -> Self {
        Scratch { ptr: None }
    }

    /// Grows the scratch so it can scan with `db` too.
    pub fn fit(&mut self, db: &Database) -> Result<(), VectorscanError> {
        let mut p: *mut HsScratch = self.ptr.map_or(core::ptr::null_mut(), NonNull::as_ptr);
        // SAFETY: `db` is live; `p` is null or a scratch this value owns, which the
        // library reallocates in place of (and updates `p`) when it must grow.
        let rc = unsafe { hs_alloc_scratch(db.ptr.as_ptr(), &mut p) };
        self.ptr = NonNull::new(p);
        if rc != HS_SUCCESS {
            return Err(VectorscanError(format!("scratch allocation failed ({rc})")));
        }
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(p) = self.ptr.take() {
            // SAFETY: the scratch was allocated by the library and is freed once.
            unsafe {
                hs_free_scratch(p.as_ptr());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_found_once_each_case_insensitively() {
        let db = Database::literals(&[b"abc".to_vec(), b"BCD".to_vec(), b"\xff\x00\x01".to_vec()]).unwrap();
        let mut s = Scratch::new();
        s.fit(&db).unwrap();
        let mut found = Vec::new();
        db.scan(&mut s, b"xxABCDabcd\xff\x00\x01", &mut found).unwrap();
        found.sort();
        assert_eq!(found, vec![0, 1, 2]);
        assert!(db.size() > 0);
        assert!(Database::literals(&[]).is_err());
        assert!(Database::literals(&[Vec::new()]).is_err());
        // The library takes a literal starting with NUL for an empty one (the prefilter cuts them).
        assert!(Database::literals(&[b"\x00a".to_vec()]).is_err());
    }

    #[test]
    fn an_unfitted_scratch_is_refused() {
        let db = Database::literals(&[b"x".to_vec()]).unwrap();
        let mut s = Scratch::new();
        assert!(db.scan(&mut s, b"x", &mut Vec::new()).is_err());
    }
}

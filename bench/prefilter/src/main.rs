//! Prefilter shootout: the `aho-corasick` crate against Vectorscan (libhs,
//! Debian's libvectorscan-dev), on the fast patterns of the inspect
//! benchmark's synthetic rulesets (10k and 40k rules, same seed) and on the
//! payloads of `../shared/pcaps`.
//!
//! Both are asked the prefilter's question, "which patterns occur in this
//! buffer, ASCII case-insensitively", one buffer per packet payload (what the
//! engine does), and must give the same answer: the run fails if the sets
//! differ. Reported: build time, memory, MB/s over the payloads.
//!
//!   cargo run --release -- [PCAP_DIR]

#[path = "../../../crates/inspect/benches/common/synth.rs"]
mod synth;

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void};
use std::path::{Path, PathBuf};
use std::time::Instant;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};
use palisade_inspect::decode::{self, LinkType};
use palisade_io::capture::CaptureReader;

/// The handful of libhs entry points used, as declared in `hs/hs_compile.h`,
/// `hs/hs_runtime.h` and `hs/hs_common.h`.
mod hs {
    use super::*;

    #[repr(C)]
    pub struct Database {
        _private: [u8; 0],
    }
    #[repr(C)]
    pub struct Scratch {
        _private: [u8; 0],
    }
    #[repr(C)]
    pub struct CompileError {
        pub message: *const c_char,
        pub expression: c_int,
    }

    pub const SUCCESS: c_int = 0;
    pub const FLAG_CASELESS: c_uint = 1;
    pub const FLAG_SINGLEMATCH: c_uint = 8;
    pub const MODE_BLOCK: c_uint = 1;

    pub type MatchHandler =
        unsafe extern "C" fn(id: c_uint, from: c_ulonglong, to: c_ulonglong, flags: c_uint, ctx: *mut c_void) -> c_int;

    unsafe extern "C" {
        pub fn hs_compile_lit_multi(
            expressions: *const *const c_char,
            flags: *const c_uint,
            ids: *const c_uint,
            lens: *const usize,
            elements: c_uint,
            mode: c_uint,
            platform: *const c_void,
            db: *mut *mut Database,
            error: *mut *mut CompileError,
        ) -> c_int;
        pub fn hs_free_compile_error(error: *mut CompileError) -> c_int;
        pub fn hs_alloc_scratch(db: *const Database, scratch: *mut *mut Scratch) -> c_int;
        pub fn hs_free_scratch(scratch: *mut Scratch) -> c_int;
        pub fn hs_free_database(db: *mut Database) -> c_int;
        pub fn hs_database_size(db: *const Database, size: *mut usize) -> c_int;
        pub fn hs_scan(
            db: *const Database,
            data: *const c_char,
            length: c_uint,
            flags: c_uint,
            scratch: *mut Scratch,
            on_event: Option<MatchHandler>,
            ctx: *mut c_void,
        ) -> c_int;
    }
}

/// A compiled Vectorscan literal database with its scratch space.
struct Vectorscan {
    db: *mut hs::Database,
    scratch: *mut hs::Scratch,
}

impl Vectorscan {
    fn build(patterns: &[Vec<u8>]) -> Vectorscan {
        let ptrs: Vec<*const c_char> = patterns.iter().map(|p| p.as_ptr().cast()).collect();
        let lens: Vec<usize> = patterns.iter().map(Vec::len).collect();
        let flags = vec![hs::FLAG_CASELESS | hs::FLAG_SINGLEMATCH; patterns.len()];
        let ids: Vec<c_uint> = (0..patterns.len() as c_uint).collect();
        let mut db = std::ptr::null_mut();
        let mut err = std::ptr::null_mut();
        // SAFETY: the four arrays have `patterns.len()` elements and outlive the
        // call; literal expressions need no NUL terminator since their lengths are given.
        let rc = unsafe {
            hs::hs_compile_lit_multi(
                ptrs.as_ptr(),
                flags.as_ptr(),
                ids.as_ptr(),
                lens.as_ptr(),
                patterns.len() as c_uint,
                hs::MODE_BLOCK,
                std::ptr::null(),
                &mut db,
                &mut err,
            )
        };
        if rc != hs::SUCCESS {
            // SAFETY: on failure `err` is a valid compile error with a NUL-terminated message.
            let msg = unsafe { std::ffi::CStr::from_ptr((*err).message).to_string_lossy().into_owned() };
            // SAFETY: `err` came from hs_compile_lit_multi and is freed once.
            unsafe { hs::hs_free_compile_error(err) };
            panic!("hs_compile_lit_multi: {msg}");
        }
        let mut scratch = std::ptr::null_mut();
        // SAFETY: `db` is a valid database; `scratch` receives a new allocation.
        assert_eq!(unsafe { hs::hs_alloc_scratch(db, &mut scratch) }, hs::SUCCESS);
        Vectorscan { db, scratch }
    }

    fn memory(&self) -> usize {
        let mut size = 0;
        // SAFETY: `self.db` is valid for the lifetime of self.
        unsafe { hs::hs_database_size(self.db, &mut size) };
        size
    }

    fn scan(&self, data: &[u8], out: &mut Vec<u32>) {
        unsafe extern "C" fn on_match(id: c_uint, _: c_ulonglong, _: c_ulonglong, _: c_uint, ctx: *mut c_void) -> c_int {
            // SAFETY: `ctx` is the `&mut Vec<u32>` passed to hs_scan below, alive for the scan.
            let out = unsafe { &mut *ctx.cast::<Vec<u32>>() };
            out.push(id);
            0
        }
        // SAFETY: db and scratch are valid and used by one thread; data is valid for
        // its length; the callback's context is `out`, borrowed for the call.
        let rc = unsafe {
            hs::hs_scan(
                self.db,
                data.as_ptr().cast(),
                data.len() as c_uint,
                0,
                self.scratch,
                Some(on_match),
                (out as *mut Vec<u32>).cast(),
            )
        };
        assert_eq!(rc, hs::SUCCESS);
    }
}

impl Drop for Vectorscan {
    fn drop(&mut self) {
        // SAFETY: both were allocated by libhs and are freed once.
        unsafe {
            hs::hs_free_scratch(self.scratch);
            hs::hs_free_database(self.db);
        }
    }
}

fn payloads(dir: &Path) -> Vec<Vec<u8>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        let mut v: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        v.sort();
        for p in v {
            if p.is_dir() {
                walk(&p, out)
            } else {
                out.push(p)
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for f in files {
        let Ok(mut r) = CaptureReader::open(&f) else { continue };
        while let Some(Ok(m)) = r.next_into(&mut buf) {
            for p in decode::decode(LinkType(m.linktype.0), &buf, false).packets {
                if !p.payload.is_empty() {
                    out.push(p.payload.to_vec());
                }
            }
        }
    }
    out
}

fn ac(patterns: &[Vec<u8>], kind: AhoCorasickKind) -> AhoCorasick {
    AhoCorasickBuilder::new()
        .ascii_case_insensitive(true)
        .match_kind(MatchKind::Standard)
        .kind(Some(kind))
        .build(patterns)
        .expect("literals build")
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/pcaps"));
    let bufs = payloads(&dir);
    let bytes: usize = bufs.iter().map(Vec::len).sum();
    println!("traffic: {} payloads, {:.1} MB from {}", bufs.len(), bytes as f64 / 1e6, dir.display());
    for n in [10_000usize, 40_000] {
        let mut pats = synth::patterns(n, 0x5eed);
        pats.sort();
        pats.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
        println!("\n{n} rules: {} distinct fast patterns", pats.len());
        // Reference answer, and timing, per candidate.
        let t = Instant::now();
        let vs = Vectorscan::build(&pats);
        let vs_build = t.elapsed();
        let mut vs_sets = Vec::with_capacity(bufs.len());
        let mut scratch = Vec::new();
        let t = Instant::now();
        for b in &bufs {
            scratch.clear();
            vs.scan(b, &mut scratch);
            vs_sets.push(scratch.len());
        }
        let vs_s = t.elapsed().as_secs_f64();
        println!(
            "  vectorscan         build {:>7.3} s  memory {:>7.1} MB  scan {:>8.1} MB/s",
            vs_build.as_secs_f64(),
            vs.memory() as f64 / 1e6,
            bytes as f64 / vs_s / 1e6
        );
        for (name, kind) in [("aho-corasick dfa", AhoCorasickKind::DFA), ("aho-corasick nfa", AhoCorasickKind::ContiguousNFA)] {
            let t = Instant::now();
            let a = ac(&pats, kind);
            let build = t.elapsed();
            let mut seen = vec![false; pats.len()];
            let t = Instant::now();
            let mut sizes = Vec::with_capacity(bufs.len());
            let mut found = Vec::new();
            for b in &bufs {
                for m in a.find_overlapping_iter(b) {
                    let i = m.pattern().as_usize();
                    if !seen[i] {
                        seen[i] = true;
                        found.push(i);
                    }
                }
                sizes.push(found.len());
                for i in found.drain(..) {
                    seen[i] = false;
                }
            }
            let s = t.elapsed().as_secs_f64();
            assert_eq!(sizes, vs_sets, "{name} and vectorscan disagree on which patterns occur");
            println!(
                "  {name:18} build {:>7.3} s  memory {:>7.1} MB  scan {:>8.1} MB/s (same answers)",
                build.as_secs_f64(),
                a.memory_usage() as f64 / 1e6,
                bytes as f64 / s / 1e6
            );
        }
    }
}

//! Dirty tracking by content: a 64-bit hash per page, compared from one
//! harvest to the next. The fallback for kernels with neither uffd-wp
//! async nor soft-dirty; needs nothing but /proc/PID/pagemap and
//! `process_vm_readv` (or /proc/PID/mem for PROT_NONE areas).
//!
//! Cost: every harvest reads the pagemap of every area (8 bytes per page)
//! and reads and hashes every *populated* page, so it is proportional to
//! the resident size, not to what was written: ~0.1–0.3 s per GiB resident
//! here (see the `track_uffd` test), against ~1 ms for uffd-wp. The job
//! itself pays nothing (no faults), but the copy competes with it for
//! memory bandwidth. Memory: 8 bytes per page of every area (0.2 % of the
//! address space covered, populated or not).
//!
//! What it sees: a page whose contents differ from the last harvest (or
//! from what was sent, see [`super::Tracker::note_sent`]), a page that
//! became populated, and a page that lost its contents (MADV_DONTNEED,
//! now zero). A page that changes and changes back between two harvests
//! is, correctly, not reported. Without `note_sent` a page that changes
//! between this tracker's read and the sender's read and then changes back
//! is missed, so senders should call it. Hash collisions: a change confined
//! to one of the four interleaved 8-byte lanes of a page (e.g. any
//! single-word change) is always detected; any other change is missed with
//! probability 2^-64.

use super::{push_range, Area, DirtyRange, HarvestStats, NewAreaReport, TrackError, Tracker, PAGE};
use crate::proc::{Pagemap, PagemapEntry, ProcError};
use crate::sys::{self, RemoteRange, IOV_MAX, PAGE_SIZE};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

/// Hash state of a page that is not populated (reads as zero / the file).
const UNPOPULATED: u64 = 0;
/// Hash state of a page never looked at.
const UNSEEN: u64 = 2;
/// Hash state of a page that could not be read: always reported.
const UNREADABLE: u64 = 4;
/// Populated pages read per batch (2 MiB).
const BATCH_PAGES: usize = 512;

/// A fast 64-bit hash of a page for change detection (not cryptographic):
/// four interleaved lanes of `rotl((lane ^ word) * M, 29)`, each step a
/// bijection of the lane, then a bijective finaliser per lane XORed
/// together. A difference confined to one lane always changes the result.
pub fn page_hash(page: &[u8]) -> u64 {
    const M: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut a: [u64; 4] = [
        0x243f_6a88_85a3_08d3,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    ];
    let mut step = |c: &[u8]| {
        for (j, lane) in a.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&c[j * 8..j * 8 + 8]);
            *lane = (*lane ^ u64::from_le_bytes(w))
                .wrapping_mul(M)
                .rotate_left(29);
        }
    };
    let mut chunks = page.chunks_exact(32);
    for c in &mut chunks {
        step(c);
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        let mut t = [0u8; 32];
        t[..rem.len()].copy_from_slice(rem);
        step(&t);
    }
    let fmix = |mut x: u64| {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    };
    let mut h = fmix((page.len() as u64) ^ M);
    for (j, lane) in a.iter().enumerate() {
        h ^= fmix(lane.wrapping_add(j as u64));
    }
    h
}

/// The state stored for a page with contents `page`: never one of the
/// sentinels (which are even).
fn state_of(page: &[u8]) -> u64 {
    page_hash(page) | 1
}

struct HashedArea {
    start: u64,
    end: u64,
    hashes: Vec<u64>,
}

/// Dirty-page tracker by per-page content hashes (see the module docs).
pub struct HashTracker {
    pid: i32,
    pagemap: Option<Pagemap>,
    mem: File,
    areas: Vec<HashedArea>,
    harvested: bool,
    new_areas: NewAreaReport,
    entries: Vec<u64>,
    buf: Vec<u8>,
}

impl HashTracker {
    /// A tracker for `pid` (needs PTRACE_MODE_ATTACH rights on it, as for
    /// /proc/PID/mem; no ptrace stop).
    pub fn new(pid: i32) -> Result<Self, TrackError> {
        let pagemap = Pagemap::open(pid)?;
        let mem = File::open(format!("/proc/{pid}/mem")).map_err(|source| {
            match source.raw_os_error() {
                Some(libc::ENOENT | libc::ESRCH) => TrackError::Gone { pid },
                _ => TrackError::Sys {
                    pid,
                    op: "open /proc/PID/mem",
                    source,
                },
            }
        })?;
        Ok(HashTracker {
            pid,
            pagemap: Some(pagemap),
            mem,
            areas: Vec::new(),
            harvested: false,
            new_areas: NewAreaReport::default(),
            entries: Vec::new(),
            buf: vec![0u8; BATCH_PAGES * PAGE_SIZE],
        })
    }

    /// How areas that appear after the first harvest are reported.
    pub fn set_new_area_report(&mut self, r: NewAreaReport) {
        self.new_areas = r;
    }

    /// Reads `ranges` (total `bytes`) into the front of `self.buf`;
    /// false if some could not be read.
    fn read(&mut self, readable: bool, ranges: &[RemoteRange], bytes: usize) -> bool {
        let buf = &mut self.buf[..bytes];
        let mut done = 0usize;
        if readable {
            match sys::process_vm_readv(self.pid, buf, ranges) {
                Ok(n) if n == bytes => return true,
                Ok(n) => done = n,
                Err(_) => {}
            }
        }
        // PROT_NONE areas, or the rest after a short read: /proc/PID/mem
        // ignores protections.
        let mut off = 0usize;
        for r in ranges {
            if off + r.len <= done {
                off += r.len;
                continue;
            }
            let skip = done.saturating_sub(off);
            if self
                .mem
                .read_exact_at(&mut buf[off + skip..off + r.len], r.addr + skip as u64)
                .is_err()
            {
                return false;
            }
            off += r.len;
        }
        true
    }
}

/// Hash states for `area`, carried over from the old areas it overlaps.
fn carry_over(old: &[HashedArea], area: &Area) -> Vec<u64> {
    let n = area.pages() as usize;
    let mut v = vec![UNSEEN; n];
    let mut i = old.partition_point(|o| o.end <= area.start);
    while let Some(o) = old.get(i) {
        if o.start >= area.end {
            break;
        }
        let s = o.start.max(area.start);
        let e = o.end.min(area.end);
        let dst = ((s - area.start) / PAGE) as usize;
        let src = ((s - o.start) / PAGE) as usize;
        let len = ((e - s) / PAGE) as usize;
        v[dst..dst + len].copy_from_slice(&o.hashes[src..src + len]);
        i += 1;
    }
    v
}

impl Tracker for HashTracker {
    fn name(&self) -> &'static str {
        "hash"
    }

    fn start(&mut self, _areas: &[Area]) -> Result<(), TrackError> {
        if self.pagemap.is_none() {
            return Err(TrackError::Stopped {
                pid: self.pid,
                tracker: "hash",
            });
        }
        // Nothing to arm: the first harvest hashes every populated page.
        Ok(())
    }

    fn harvest(
        &mut self,
        areas: &[Area],
        out: &mut Vec<DirtyRange>,
    ) -> Result<HarvestStats, TrackError> {
        let t0 = Instant::now();
        out.clear();
        let pid = self.pid;
        let mut pagemap = self.pagemap.take().ok_or(TrackError::Stopped {
            pid,
            tracker: "hash",
        })?;
        let r = self.harvest_with(&mut pagemap, areas, out);
        self.pagemap = Some(pagemap);
        let mut stats = r?;
        stats.ranges = out.len();
        stats.pages = out.iter().map(|r| r.npages).sum();
        stats.elapsed = t0.elapsed();
        Ok(stats)
    }

    fn stop(&mut self) -> Result<(), TrackError> {
        self.pagemap = None;
        self.areas = Vec::new();
        Ok(())
    }

    fn note_sent(&mut self, addr: u64, page: &[u8]) {
        let i = self.areas.partition_point(|a| a.end <= addr);
        if let Some(a) = self.areas.get_mut(i) {
            if a.start <= addr && addr < a.end {
                a.hashes[((addr - a.start) / PAGE) as usize] = state_of(page);
            }
        }
    }
}

impl HashTracker {
    fn harvest_with(
        &mut self,
        pagemap: &mut Pagemap,
        areas: &[Area],
        out: &mut Vec<DirtyRange>,
    ) -> Result<HarvestStats, TrackError> {
        let pid = self.pid;
        let first = !self.harvested;
        let policy = self.new_areas;
        let mut stats = HarvestStats::default();
        let mut sorted: Vec<&Area> = areas
            .iter()
            .filter(|a| !a.is_special() && a.end > a.start)
            .collect();
        sorted.sort_by_key(|a| a.start);
        let mut next = Vec::with_capacity(sorted.len());
        let mut entries = std::mem::take(&mut self.entries);
        let mut ranges: Vec<RemoteRange> = Vec::with_capacity(IOV_MAX);
        let mut batch: Vec<usize> = Vec::with_capacity(BATCH_PAGES);
        for area in sorted {
            stats.areas += 1;
            let n = area.pages() as usize;
            let mut hashes = carry_over(&self.areas, area);
            if !first && hashes.contains(&UNSEEN) {
                stats.new_areas += 1;
                let mut j = 0;
                while j < n {
                    if hashes[j] != UNSEEN {
                        j += 1;
                        continue;
                    }
                    let s = j;
                    while j < n && hashes[j] == UNSEEN {
                        j += 1;
                    }
                    let a = area.start + s as u64 * PAGE;
                    stats.reset.push((a, area.start + j as u64 * PAGE));
                }
            }
            stats.calls += 1;
            match pagemap.read(area.start, n, &mut entries) {
                Ok(()) => {}
                Err(ProcError::Gone { .. }) => return Err(TrackError::Gone { pid }),
                Err(e) => return Err(e.into()),
            }
            // Whether a page with old state `o` and new state `s` is dirty.
            // A new PROT_NONE area (often a huge reservation) is reported
            // by its populated pages only, as the uffd-wp tracker does.
            let populated_only =
                first || policy == NewAreaReport::Populated || area.is_inaccessible();
            let dirty = |o: u64, s: u64| match o {
                UNSEEN if populated_only => s != UNPOPULATED,
                UNSEEN => true,
                UNREADABLE => true,
                o => o != s,
            };
            let mut i = 0usize;
            while i < n {
                // A window [w, i) holding up to BATCH_PAGES populated pages
                // in up to IOV_MAX ranges.
                let w = i;
                ranges.clear();
                batch.clear();
                while i < n && batch.len() < BATCH_PAGES {
                    let e = PagemapEntry(entries[i]);
                    if e.present() || e.swapped() {
                        let addr = area.start + i as u64 * PAGE;
                        if !sys::push_page_range(&mut ranges, addr) {
                            break;
                        }
                        batch.push(i);
                    }
                    i += 1;
                }
                let ok = batch.is_empty() || {
                    stats.calls += 1;
                    self.read(area.readable, &ranges, batch.len() * PAGE_SIZE)
                };
                let mut k = 0;
                for (j, slot) in hashes.iter_mut().enumerate().take(i).skip(w) {
                    let new = if batch.get(k) == Some(&j) {
                        k += 1;
                        if ok {
                            state_of(&self.buf[(k - 1) * PAGE_SIZE..k * PAGE_SIZE])
                        } else {
                            UNREADABLE
                        }
                    } else {
                        UNPOPULATED
                    };
                    if dirty(*slot, new) {
                        let a = area.start + j as u64 * PAGE;
                        push_range(out, a, a + PAGE);
                    }
                    *slot = new;
                }
            }
            next.push(HashedArea {
                start: area.start,
                end: area.end,
                hashes,
            });
        }
        self.entries = entries;
        self.areas = next;
        self.harvested = true;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_sees_single_word_changes_and_order() {
        let mut p = vec![0u8; 4096];
        let h0 = page_hash(&p);
        for off in [0, 7, 8, 31, 32, 2048, 4095] {
            p[off] ^= 1;
            assert_ne!(page_hash(&p), h0, "byte {off}");
            p[off] ^= 1;
        }
        assert_eq!(page_hash(&p), h0);
        // Swapping two words of different lanes changes the hash.
        p[0] = 1;
        let a = page_hash(&p);
        p[0] = 0;
        p[8] = 1;
        assert_ne!(page_hash(&p), a);
        // Sentinels never collide with real states.
        assert_eq!(state_of(&p) & 1, 1);
        assert_ne!(page_hash(&[]), page_hash(&[0]));
    }

    #[test]
    fn carry_over_copies_overlaps() {
        let old = vec![
            HashedArea {
                start: 0x1000,
                end: 0x3000,
                hashes: vec![11, 13],
            },
            HashedArea {
                start: 0x5000,
                end: 0x6000,
                hashes: vec![17],
            },
        ];
        let v = carry_over(&old, &Area::anon(0x2000, 0x7000));
        assert_eq!(v, vec![13, UNSEEN, UNSEEN, 17, UNSEEN]);
    }
}

//! The target's copy of a migrating job's memory: every page received so
//! far, per process, in an arena of large chunks (no per-page allocation).
//! A page resent in a later round overwrites its slot in place; with
//! several page streams a batch of an older round can arrive after a newer
//! one, so each slot remembers the round that wrote it and older data never
//! wins. At restore time it becomes the image's page runs and the
//! [`PageSource`] restore reads from.

use crate::image::{PageKind, PageRun, ProcessImage};
use crate::restore::{PageSink, PageSource, RestoreError};
use crate::sys::{self, PAGE_SIZE};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::mpsc;

const PAGE: u64 = PAGE_SIZE as u64;
/// Arena chunk: 64 MiB; runs never cross a chunk.
const CHUNK: usize = 64 << 20;

#[derive(Debug, Clone, Copy)]
enum Slot {
    Zero { round: u32 },
    Data { at: u64, round: u32 },
}

impl Slot {
    fn round(&self) -> u32 {
        match *self {
            Slot::Zero { round } | Slot::Data { round, .. } => round,
        }
    }
}

/// Hashes page addresses (and pids) with one multiplication: every page
/// received goes through the index, and SipHash's resistance to chosen
/// keys buys nothing here (a peer that could choose colliding addresses
/// could as well send that many pages).
#[derive(Default)]
struct PageHasher(u64);

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        // Fibonacci hashing: the low bits (bucket) of consecutive page
        // numbers stay distinct, the high bits (hashbrown's tag) are mixed.
        self.0 = (self.0.rotate_left(5) ^ v.rotate_right(12)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn write_i32(&mut self, v: i32) {
        self.write_u64(u64::from(v as u32) << 12);
    }
}

type Fast = BuildHasherDefault<PageHasher>;

#[derive(Default)]
struct ProcPages {
    index: HashMap<u64, Slot, Fast>,
}

/// Page-sized slots in 64 MiB chunks backed by transparent huge pages: a
/// fresh chunk then costs one fault per 2 MiB as it fills, not one per
/// page. Touching fresh memory is still the receiver's largest cost (in a
/// VM that hands freed memory back to its host, 0.15 to over 2 s per GiB),
/// so for a large migration a helper thread populates the next chunks
/// while pages arrive; it stays at most [`AHEAD`] chunks ahead of use.
#[derive(Default)]
struct Arena {
    chunks: Vec<Vec<u8>>,
    /// Bytes used in the last chunk.
    used: usize,
    /// Chunks populated in advance, while the helper owes some.
    ready: Option<mpsc::Receiver<Vec<u8>>>,
}

/// Populated chunks the helper may hold besides the one it works on.
const AHEAD: usize = 1;

fn new_chunk() -> Vec<u8> {
    let mut c = vec![0u8; CHUNK];
    // Advice only: without THP the chunk works, just slower.
    if let Err(e) = sys::madvise::hugepage(&mut c) {
        tracing::debug!("MADV_HUGEPAGE on a page arena chunk: {e}");
    }
    c
}

impl Arena {
    /// Starts populating chunks for about `bytes` of page data. Only whole
    /// chunks are prepared, so a small migration commits no memory it
    /// does not fill.
    fn expect(&mut self, bytes: u64) {
        let n = (bytes / CHUNK as u64).saturating_sub(self.chunks.len() as u64);
        if n == 0 || self.ready.is_some() {
            return;
        }
        let (tx, rx) = mpsc::sync_channel(AHEAD);
        let spawned = std::thread::Builder::new()
            .name("ferry-arena".into())
            .spawn(move || {
                for _ in 0..n {
                    let mut c = new_chunk();
                    if let Err(e) = sys::madvise::populate_write(&mut c) {
                        tracing::debug!("MADV_POPULATE_WRITE on a page arena chunk: {e}");
                    }
                    // The session ended (or took what it needed).
                    if tx.send(c).is_err() {
                        break;
                    }
                }
            });
        match spawned {
            Ok(_) => self.ready = Some(rx),
            Err(e) => tracing::debug!("no arena helper thread: {e}"),
        }
    }

    fn alloc(&mut self) -> u64 {
        if self.chunks.is_empty() || self.used + PAGE_SIZE > CHUNK {
            // Waiting for the helper's chunk costs no more than preparing
            // one here: it is already under way.
            let c = match self.ready.as_ref().map(|r| r.recv()) {
                Some(Ok(c)) => c,
                Some(Err(_)) => {
                    self.ready = None;
                    new_chunk()
                }
                None => new_chunk(),
            };
            self.chunks.push(c);
            self.used = 0;
        }
        let at = (self.chunks.len() - 1) * CHUNK + self.used;
        self.used += PAGE_SIZE;
        at as u64
    }

    fn slice_mut(&mut self, at: u64) -> &mut [u8] {
        let (c, o) = ((at as usize) / CHUNK, (at as usize) % CHUNK);
        &mut self.chunks[c][o..o + PAGE_SIZE]
    }

    fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let (c, o) = ((offset as usize) / CHUNK, (offset as usize) % CHUNK);
        self.chunks.get(c)?.get(o..o + len)
    }
}

/// Received pages of every process of a migrating tree.
#[derive(Default)]
pub struct MemPages {
    procs: HashMap<i32, ProcPages, Fast>,
    arena: Arena,
    pub pages_zero: u64,
    pub pages_data: u64,
}

impl MemPages {
    pub fn new() -> Self {
        Self::default()
    }

    /// The source announced about `pages` pages: prepare memory for them
    /// ahead of their arrival.
    pub fn expect(&mut self, pages: u64) {
        self.arena.expect(pages.saturating_mul(PAGE));
    }

    /// Stores one page of `pid` at `addr` received in `round`; `data` None
    /// means a zero page.
    pub fn put(&mut self, pid: i32, addr: u64, round: u32, data: Option<&[u8]>) {
        let index = &mut self.procs.entry(pid).or_default().index;
        match index.entry(addr) {
            Entry::Occupied(mut o) => {
                let prev = *o.get();
                if prev.round() > round {
                    return;
                }
                let slot = match (data, prev) {
                    (None, _) => Slot::Zero { round },
                    (Some(d), Slot::Data { at, .. }) => {
                        self.arena.slice_mut(at).copy_from_slice(&d[..PAGE_SIZE]);
                        Slot::Data { at, round }
                    }
                    (Some(d), Slot::Zero { .. }) => {
                        let at = self.arena.alloc();
                        self.arena.slice_mut(at).copy_from_slice(&d[..PAGE_SIZE]);
                        Slot::Data { at, round }
                    }
                };
                o.insert(slot);
            }
            Entry::Vacant(v) => {
                let slot = match data {
                    None => Slot::Zero { round },
                    Some(d) => {
                        let at = self.arena.alloc();
                        self.arena.slice_mut(at).copy_from_slice(&d[..PAGE_SIZE]);
                        Slot::Data { at, round }
                    }
                };
                v.insert(slot);
            }
        }
    }

    /// Forgets a page (its area was unmapped).
    pub fn drop_page(&mut self, pid: i32, addr: u64) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.index.remove(&addr);
        }
    }

    /// Forgets every page of `pid` inside the sorted, disjoint `[start,
    /// end)` ranges; costs what is held, not what the ranges span.
    pub fn drop_ranges(&mut self, pid: i32, ranges: &[(u64, u64)]) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.index.retain(|&addr, _| {
                let i = ranges.partition_point(|&(_, end)| end <= addr);
                ranges.get(i).is_none_or(|&(start, _)| start > addr)
            });
        }
    }

    /// Number of distinct pages held.
    pub fn len(&self) -> usize {
        self.procs.values().map(|p| p.index.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills the page runs of every area of `p` from what was received.
    /// Pages outside the final areas (unmapped during the migration) are
    /// ignored.
    pub fn build_runs(&mut self, p: &mut ProcessImage) {
        let Some(pp) = self.procs.get(&p.pid) else {
            return;
        };
        let mut pages: Vec<(u64, Slot)> = pp.index.iter().map(|(&a, &s)| (a, s)).collect();
        pages.sort_unstable_by_key(|&(a, _)| a);
        let (mut zero, mut data) = (0u64, 0u64);
        let mut i = 0;
        for v in &mut p.vmas {
            v.pages.clear();
            while i < pages.len() && pages[i].0 < v.start {
                i += 1;
            }
            while i < pages.len() && pages[i].0 < v.end {
                let (addr, slot) = pages[i];
                let extend = match (v.pages.last_mut(), slot) {
                    (Some(r), Slot::Zero { .. })
                        if r.kind == PageKind::Zero && r.addr + r.npages as u64 * PAGE == addr =>
                    {
                        Some(r)
                    }
                    (Some(r), Slot::Data { at, .. }) => match r.kind {
                        PageKind::Data { offset, .. }
                            if r.addr + r.npages as u64 * PAGE == addr
                                && offset + r.npages as u64 * PAGE == at
                                && (offset as usize) / CHUNK == (at as usize) / CHUNK =>
                        {
                            Some(r)
                        }
                        _ => None,
                    },
                    _ => None,
                };
                match extend {
                    Some(r) => r.npages += 1,
                    None => v.pages.push(PageRun {
                        addr,
                        npages: 1,
                        kind: match slot {
                            Slot::Zero { .. } => PageKind::Zero,
                            Slot::Data { at, .. } => PageKind::Data { offset: at, crc: 0 },
                        },
                    }),
                }
                match slot {
                    Slot::Zero { .. } => zero += 1,
                    Slot::Data { .. } => data += 1,
                }
                i += 1;
            }
        }
        self.pages_zero += zero;
        self.pages_data += data;
    }

    /// Every data page held as (pid, address, offset in its chunk), one
    /// list per arena chunk in arena order: how a lazy restore hands the
    /// chunks over whole.
    pub fn data_by_chunk(&self) -> Vec<Vec<(i32, u64, usize)>> {
        let mut out = vec![Vec::new(); self.arena.chunks.len()];
        for (&pid, pp) in &self.procs {
            for (&addr, slot) in &pp.index {
                if let Slot::Data { at, .. } = *slot {
                    let (c, o) = ((at as usize) / CHUNK, (at as usize) % CHUNK);
                    out[c].push((pid, addr, o));
                }
            }
        }
        for c in &mut out {
            c.sort_unstable_by_key(|&(_, _, o)| o);
        }
        out
    }

    /// Takes arena chunk `c` out; its pages can no longer be read here.
    pub fn take_chunk(&mut self, c: usize) -> Vec<u8> {
        // Nothing more arrives: chunks prepared ahead are not needed.
        self.arena.ready = None;
        self.arena
            .chunks
            .get_mut(c)
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The page of `pid` at `addr`: `Some(None)` for a zero page,
    /// `Some(Some(contents))` for data still here (its chunk not taken).
    pub fn page(&self, pid: i32, addr: u64) -> Option<Option<&[u8]>> {
        match *self.procs.get(&pid)?.index.get(&addr)? {
            Slot::Zero { .. } => Some(None),
            Slot::Data { at, .. } => self.bytes(at, PAGE_SIZE).map(Some),
        }
    }

    fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        self.arena.bytes(offset, len)
    }
}

impl PageSource for MemPages {
    fn read(
        &self,
        p: &ProcessImage,
        offset: u64,
        _crc: u32,
        buf: &mut [u8],
    ) -> Result<(), RestoreError> {
        let src = self
            .bytes(offset, buf.len())
            .ok_or_else(|| RestoreError::Step {
                pid: p.pid,
                what: format!("received pages at {offset}"),
                why: "outside the received data".into(),
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn read_chunked(
        &self,
        p: &ProcessImage,
        offset: u64,
        len: u64,
        _crc: u32,
        _chunk: &mut [u8],
        sink: &mut PageSink<'_>,
    ) -> Result<(), RestoreError> {
        // The run is contiguous in memory already: hand it over in one piece.
        let src = self
            .bytes(offset, len as usize)
            .ok_or_else(|| RestoreError::Step {
                pid: p.pid,
                what: format!("received pages at {offset}"),
                why: "outside the received data".into(),
            })?;
        sink(0, src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Advice, Vma, VmaKind};

    fn vma(start: u64, end: u64) -> Vma {
        Vma {
            start,
            end,
            prot: 3,
            shared: false,
            kind: VmaKind::Anon {
                name: None,
                heap: false,
                stack: false,
            },
            advice: Advice::default(),
            pages: Vec::new(),
            guards: Vec::new(),
        }
    }

    #[test]
    fn newer_round_wins_and_runs_are_built() {
        let mut m = MemPages::new();
        let a = [1u8; PAGE_SIZE];
        let b = [2u8; PAGE_SIZE];
        m.put(7, 0x1000, 0, Some(&a));
        m.put(7, 0x2000, 0, Some(&a));
        m.put(7, 0x3000, 0, None);
        // Round 2 then a late round-1 batch for the same page.
        m.put(7, 0x1000, 2, Some(&b));
        m.put(7, 0x1000, 1, Some(&a));
        let mut p = crate::image::tests_support::process(7, vec![vma(0x1000, 0x5000)]);
        m.build_runs(&mut p);
        let runs = &p.vmas[0].pages;
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].npages, 2);
        assert_eq!(runs[1].kind, PageKind::Zero);
        let PageKind::Data { offset, .. } = runs[0].kind else {
            panic!("data run expected")
        };
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        m.read(&p, offset, 0, &mut buf).unwrap();
        assert!(buf[..PAGE_SIZE].iter().all(|&x| x == 2));
        assert!(buf[PAGE_SIZE..].iter().all(|&x| x == 1));
    }

    #[test]
    fn planned_ranges_are_dropped() {
        let mut m = MemPages::new();
        for a in [0x1000u64, 0x2000, 0x3000, 0x8000, 0x9000] {
            m.put(4, a, 1, Some(&[5u8; PAGE_SIZE]));
        }
        m.put(5, 0x2000, 1, None);
        m.drop_ranges(4, &[(0x2000, 0x4000), (0x9000, 0xa000)]);
        assert_eq!(m.len(), 3);
        let mut p = crate::image::tests_support::process(4, vec![vma(0x1000, 0xa000)]);
        m.build_runs(&mut p);
        let kept: Vec<(u64, u32)> = p.vmas[0].pages.iter().map(|r| (r.addr, r.npages)).collect();
        assert_eq!(kept, vec![(0x1000, 1), (0x8000, 1)]);
    }

    #[test]
    fn prepared_chunks_hold_pages_across_a_chunk_boundary() {
        let mut m = MemPages::new();
        let per_chunk = (CHUNK / PAGE_SIZE) as u64;
        // Two chunks announced: the helper prepares them ahead of use.
        m.expect(2 * per_chunk);
        let base = 0x10_0000_0000u64;
        let n = per_chunk + 2;
        let mut page = [0u8; PAGE_SIZE];
        for k in 0..n {
            page[..8].copy_from_slice(&k.to_le_bytes());
            m.put(9, base + k * PAGE, 1, Some(&page));
        }
        // A resend overwrites in place; an older round does not.
        page[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        m.put(9, base + (n - 1) * PAGE, 2, Some(&page));
        m.put(9, base, 0, Some(&page));
        assert_eq!(m.arena.chunks.len(), 2);
        let mut p = crate::image::tests_support::process(9, vec![vma(base, base + n * PAGE)]);
        m.build_runs(&mut p);
        let runs = &p.vmas[0].pages;
        // Runs never cross a chunk.
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].npages as u64, per_chunk);
        let mut got = Vec::new();
        for r in runs {
            let PageKind::Data { offset, .. } = r.kind else {
                panic!("data run expected")
            };
            let mut buf = vec![0u8; r.npages as usize * PAGE_SIZE];
            m.read(&p, offset, 0, &mut buf).unwrap();
            for c in buf.chunks_exact(PAGE_SIZE) {
                got.push(u64::from_le_bytes(c[..8].try_into().unwrap()));
            }
        }
        let mut want: Vec<u64> = (0..n).collect();
        want[(n - 1) as usize] = u64::MAX;
        assert_eq!(got, want);
    }

    #[test]
    fn pages_outside_final_areas_are_ignored() {
        let mut m = MemPages::new();
        m.put(1, 0x9000, 0, Some(&[3u8; PAGE_SIZE]));
        let mut p = crate::image::tests_support::process(1, vec![vma(0x1000, 0x2000)]);
        m.build_runs(&mut p);
        assert!(p.vmas[0].pages.is_empty());
    }
}

//! Page batches: the binary payload of `PageBatch` frames.
//!
//! ```text
//! offset  size  field
//! 0       4     pid (i32 LE)            the process the pages belong to
//! 4       4     round (u32 LE)          pre-copy round (1, 2, ...)
//! 8       4     entries (u32 LE)        number of entries in the table
//! 12      4     table_len (u32 LE)      bytes of the entry table
//! 16      ...   entry table             `entries` entries, table_len bytes
//! ...     ...   page data               payloads of Raw/Lz4/Zstd entries, in entry order
//! ```
//!
//! An entry is a LEB128 varint `gap << 3 | kind`, then for some kinds one
//! more varint:
//!
//! | kind | name       | pages | extra varint         | data bytes |
//! |------|------------|-------|----------------------|------------|
//! | 0    | Zero       | 1     | —                    | 0          |
//! | 1    | Raw        | 1     | —                    | 4096       |
//! | 2    | Lz4        | 1     | compressed length    | length     |
//! | 3    | Zstd       | 1     | compressed length    | length     |
//! | 4    | Absent     | 1     | —                    | 0          |
//! | 5    | ZeroRun    | n     | n − 2                | 0          |
//! | 6    | AbsentRun  | n     | n − 2                | 0          |
//! | 7    | reserved   |       |                      |            |
//!
//! `gap` is the number of pages between the end of the previous entry (or
//! page 0 for the first) and this entry's first page, so addresses are
//! strictly increasing and consecutive pages cost a gap of 0: an isolated
//! zero page is one byte, a run of a million zero pages four. Compressed
//! lengths are 1..=4095; a page that lz4/zstd cannot shrink by at least
//! [`MIN_SAVING`] bytes is sent Raw. An lz4/zstd page must decompress to
//! exactly 4096 bytes.
//!
//! The decoder validates the whole table (kinds, lengths, address
//! overflow, data length) before it hands out a single page.

use super::messages::Compression;
use super::sink::PageSink;
use super::{WireError, PAGE_SIZE};
use serde::{Deserialize, Serialize};

/// Bytes of the batch header.
pub const BATCH_HEADER_LEN: usize = 16;
/// A compressed page is used only if it saves at least this many bytes.
pub const MIN_SAVING: usize = PAGE_SIZE / 32;
/// Longest zero/absent run in one entry (4 GiB); longer runs are split.
pub const MAX_RUN_PAGES: u32 = 1 << 20;
/// Default target size of a batch payload.
pub const DEFAULT_BATCH_BYTES: usize = 1 << 20;

const PAGE_SHIFT: u32 = 12;
/// Page numbers are below 2^52 (addresses below 2^64).
const MAX_PAGE_NO: u64 = 1 << (64 - PAGE_SHIFT);
/// Largest entry-table bytes one page can add (two 10-byte varints).
const MAX_ENTRY_LEN: usize = 20;

const K_ZERO: u64 = 0;
const K_RAW: u64 = 1;
const K_LZ4: u64 = 2;
const K_ZSTD: u64 = 3;
const K_ABSENT: u64 = 4;
const K_ZERO_RUN: u64 = 5;
const K_ABSENT_RUN: u64 = 6;

const _: () = assert!(PAGE_SIZE == 1 << PAGE_SHIFT);

/// How one entry's pages are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// All-zero pages (a run when `npages` > 1).
    Zero,
    /// 4096 raw bytes.
    Raw,
    /// An lz4 block.
    Lz4,
    /// A zstd frame.
    Zstd,
    /// Pages the source no longer has (unmapped or discarded since sent).
    Absent,
}

/// One entry of a validated batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub addr: u64,
    pub npages: u32,
    pub kind: EntryKind,
    /// The page data as carried (empty for Zero/Absent).
    pub data: &'a [u8],
}

/// A decoded page (or run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page<'a> {
    Data {
        addr: u64,
        bytes: &'a [u8; PAGE_SIZE],
    },
    Zero {
        addr: u64,
        npages: u32,
    },
    Absent {
        addr: u64,
        npages: u32,
    },
}

/// Pages and bytes by kind. Encoders count what they send, decoders what
/// they receive; `+=` merges connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireStats {
    pub batches: u64,
    pub zero_pages: u64,
    pub raw_pages: u64,
    pub lz4_pages: u64,
    pub zstd_pages: u64,
    pub absent_pages: u64,
    /// Data bytes of raw pages (4096 each).
    pub raw_bytes: u64,
    /// Compressed bytes of lz4 pages.
    pub lz4_bytes: u64,
    /// Compressed bytes of zstd pages.
    pub zstd_bytes: u64,
    /// Batch headers and entry tables.
    pub meta_bytes: u64,
}

impl WireStats {
    /// Pages with contents (raw or compressed).
    pub fn data_pages(&self) -> u64 {
        self.raw_pages + self.lz4_pages + self.zstd_pages
    }

    /// Every page described, zero and absent included.
    pub fn pages(&self) -> u64 {
        self.data_pages() + self.zero_pages + self.absent_pages
    }

    /// Bytes of batch payloads (frame headers excluded).
    pub fn payload_bytes(&self) -> u64 {
        self.raw_bytes + self.lz4_bytes + self.zstd_bytes + self.meta_bytes
    }

    /// What the present pages (data and zero) would take uncompressed.
    pub fn memory_bytes(&self) -> u64 {
        (self.data_pages() + self.zero_pages) * PAGE_SIZE as u64
    }

    /// Payload bytes over memory bytes (0 when nothing was sent).
    pub fn ratio(&self) -> f64 {
        let m = self.memory_bytes();
        if m == 0 {
            0.0
        } else {
            self.payload_bytes() as f64 / m as f64
        }
    }

    fn count(&mut self, kind: EntryKind, npages: u32, bytes: usize) {
        let n = npages as u64;
        let b = bytes as u64;
        match kind {
            EntryKind::Zero => self.zero_pages += n,
            EntryKind::Absent => self.absent_pages += n,
            EntryKind::Raw => {
                self.raw_pages += n;
                self.raw_bytes += b;
            }
            EntryKind::Lz4 => {
                self.lz4_pages += n;
                self.lz4_bytes += b;
            }
            EntryKind::Zstd => {
                self.zstd_pages += n;
                self.zstd_bytes += b;
            }
        }
    }
}

impl std::ops::AddAssign<&WireStats> for WireStats {
    fn add_assign(&mut self, o: &WireStats) {
        self.batches += o.batches;
        self.zero_pages += o.zero_pages;
        self.raw_pages += o.raw_pages;
        self.lz4_pages += o.lz4_pages;
        self.zstd_pages += o.zstd_pages;
        self.absent_pages += o.absent_pages;
        self.raw_bytes += o.raw_bytes;
        self.lz4_bytes += o.lz4_bytes;
        self.zstd_bytes += o.zstd_bytes;
        self.meta_bytes += o.meta_bytes;
    }
}

/// Whether a page is all zero (compared a machine word at a time, 64 bytes
/// per step, stopping at the first non-zero block).
pub fn is_zero_page(page: &[u8; PAGE_SIZE]) -> bool {
    page.chunks_exact(64).all(|block| {
        block.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().unwrap_or([1; 8]))
        }) == 0
    })
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*pos)?;
        *pos += 1;
        if shift == 63 && b > 1 {
            return None;
        }
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    zero: bool,
    start: u64,
    n: u32,
}

enum Compressor {
    None,
    Lz4(Box<lz4_flex::block::CompressTable>),
    Zstd(Box<zstd::bulk::Compressor<'static>>),
}

/// Builds page batches: zero detection, compression into reused buffers,
/// raw fallback, zero/absent runs. One batch holds pages of one pid, with
/// strictly increasing addresses.
///
/// ```ignore
/// enc.begin(pid, round);
/// for (addr, page) in pages {
///     enc.push(addr, page)?;
///     if enc.is_full() { writer.write_batch(&mut enc)?; }
/// }
/// if !enc.is_empty() { writer.write_batch(&mut enc)?; }
/// ```
pub struct BatchEncoder {
    compression: Compression,
    compressor: Compressor,
    scratch: Box<[u8]>,
    target: Option<(i32, u32)>,
    header: [u8; BATCH_HEADER_LEN],
    table: Vec<u8>,
    /// Batch data is `data[..dlen]`; the rest is initialised room kept
    /// across batches (so filling it in place never clears memory).
    data: Vec<u8>,
    dlen: usize,
    /// Start and page count of the room handed out by `page_slots`.
    slots: (usize, usize),
    entries: u32,
    /// End (page number) of everything pushed, pending run included.
    end: u64,
    /// End of what is in the table.
    written_end: u64,
    run: Option<Run>,
    target_bytes: usize,
    max_bytes: usize,
    stats: WireStats,
}

impl std::fmt::Debug for BatchEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEncoder")
            .field("compression", &self.compression)
            .field("target", &self.target)
            .field("entries", &self.entries)
            .field("bytes", &self.len_bytes())
            .finish_non_exhaustive()
    }
}

/// The three parts of a finished batch payload.
#[derive(Debug, Clone, Copy)]
pub struct BatchParts<'a> {
    pub header: &'a [u8; BATCH_HEADER_LEN],
    pub table: &'a [u8],
    pub data: &'a [u8],
}

impl<'a> BatchParts<'a> {
    pub fn as_slices(&self) -> [&'a [u8]; 3] {
        [self.header, self.table, self.data]
    }

    pub fn len(&self) -> usize {
        BATCH_HEADER_LEN + self.table.len() + self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The payload as one vector (tests, tools).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        for s in self.as_slices() {
            v.extend_from_slice(s);
        }
        v
    }
}

/// The page at `at` of a batch's data room.
fn slot(data: &[u8], at: usize) -> Result<&[u8; PAGE_SIZE], WireError> {
    data.get(at..at + PAGE_SIZE)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| WireError::Encoder(format!("page slot at {at} outside the batch room")))
}

/// Compresses `page` into `scratch` if that saves at least [`MIN_SAVING`]
/// bytes: (kind, entry code, compressed length).
fn compress(
    compressor: &mut Compressor,
    page: &[u8; PAGE_SIZE],
    scratch: &mut [u8],
) -> Option<(EntryKind, u64, usize)> {
    let limit = PAGE_SIZE - MIN_SAVING;
    match compressor {
        Compressor::None => None,
        Compressor::Lz4(table) => {
            match lz4_flex::block::compress_into_with_table(page, scratch, table) {
                Ok(n) if n > 0 && n <= limit => Some((EntryKind::Lz4, K_LZ4, n)),
                _ => None,
            }
        }
        Compressor::Zstd(c) => match c.compress_to_buffer(&page[..], scratch) {
            Ok(n) if n > 0 && n <= limit => Some((EntryKind::Zstd, K_ZSTD, n)),
            _ => None,
        },
    }
}

impl BatchEncoder {
    /// An encoder aiming at [`DEFAULT_BATCH_BYTES`] per batch, never above
    /// the default frame cap.
    pub fn new(compression: Compression) -> Result<BatchEncoder, WireError> {
        Self::with_sizes(
            compression,
            DEFAULT_BATCH_BYTES,
            super::DEFAULT_MAX_PAYLOAD as usize,
        )
    }

    /// `target_bytes`: when [`is_full`](Self::is_full) turns true;
    /// `max_bytes`: the hard cap (the peer's frame cap).
    pub fn with_sizes(
        compression: Compression,
        target_bytes: usize,
        max_bytes: usize,
    ) -> Result<BatchEncoder, WireError> {
        let min = BATCH_HEADER_LEN + PAGE_SIZE + MAX_ENTRY_LEN;
        if max_bytes < min {
            return Err(WireError::Encoder(format!(
                "a batch cap of {max_bytes} bytes cannot hold one page ({min} bytes)"
            )));
        }
        let compressor = match compression {
            Compression::None => Compressor::None,
            Compression::Lz4 => Compressor::Lz4(Box::new(lz4_flex::block::CompressTable::small())),
            Compression::Zstd(level) => {
                let mut c = zstd::bulk::Compressor::new(level)
                    .map_err(|e| WireError::Encoder(format!("zstd level {level}: {e}")))?;
                for p in [
                    zstd::zstd_safe::CParameter::ContentSizeFlag(false),
                    zstd::zstd_safe::CParameter::ChecksumFlag(false),
                    zstd::zstd_safe::CParameter::DictIdFlag(false),
                ] {
                    c.set_parameter(p)
                        .map_err(|e| WireError::Encoder(format!("zstd parameter: {e}")))?;
                }
                Compressor::Zstd(Box::new(c))
            }
        };
        let scratch_len = lz4_flex::block::get_maximum_output_size(PAGE_SIZE)
            .max(zstd::zstd_safe::compress_bound(PAGE_SIZE));
        Ok(BatchEncoder {
            compression,
            compressor,
            scratch: vec![0u8; scratch_len].into_boxed_slice(),
            target: None,
            header: [0; BATCH_HEADER_LEN],
            table: Vec::with_capacity(4096),
            data: vec![0u8; target_bytes.min(max_bytes) + PAGE_SIZE],
            dlen: 0,
            slots: (0, 0),
            entries: 0,
            end: 0,
            written_end: 0,
            run: None,
            target_bytes: target_bytes.min(max_bytes),
            max_bytes,
            stats: WireStats::default(),
        })
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Everything this encoder has put in finished batches so far (pages
    /// are counted when pushed, batches and meta bytes when finished).
    pub fn stats(&self) -> &WireStats {
        &self.stats
    }

    /// Starts a batch for `pid` in `round`, dropping anything unfinished.
    pub fn begin(&mut self, pid: i32, round: u32) {
        self.clear();
        self.target = Some((pid, round));
    }

    /// Empties the batch, keeping its pid and round.
    pub fn clear(&mut self) {
        self.table.clear();
        self.dlen = 0;
        self.slots = (0, 0);
        self.entries = 0;
        self.end = 0;
        self.written_end = 0;
        self.run = None;
    }

    /// No entries yet.
    pub fn is_empty(&self) -> bool {
        self.entries == 0 && self.run.is_none()
    }

    /// Payload bytes so far (a pending run counts its entry).
    pub fn len_bytes(&self) -> usize {
        BATCH_HEADER_LEN
            + self.table.len()
            + self.dlen
            + if self.run.is_some() { MAX_ENTRY_LEN } else { 0 }
    }

    /// The batch reached its target size: write it out.
    pub fn is_full(&self) -> bool {
        self.len_bytes() + PAGE_SIZE + MAX_ENTRY_LEN > self.target_bytes
    }

    fn pid(&self) -> Option<i32> {
        self.target.map(|t| t.0)
    }

    fn check(&self, addr: u64, npages: u32) -> Result<u64, WireError> {
        let bad = |why: String| {
            Err(WireError::Batch {
                pid: self.pid(),
                why,
            })
        };
        if self.target.is_none() {
            return bad("page pushed before begin()".into());
        }
        if addr % PAGE_SIZE as u64 != 0 {
            return bad(format!("address {addr:#x} is not page aligned"));
        }
        let page = addr >> PAGE_SHIFT;
        if page < self.end {
            return bad(format!(
                "address {addr:#x} is below the end of the previous page ({:#x}); a batch's addresses must increase",
                self.end << PAGE_SHIFT
            ));
        }
        if npages == 0 || page + npages as u64 > MAX_PAGE_NO {
            return bad(format!(
                "{npages} pages at {addr:#x} do not fit the address space"
            ));
        }
        Ok(page)
    }

    fn room(&self, data: usize) -> Result<(), WireError> {
        if self.len_bytes() + data + 2 * MAX_ENTRY_LEN > self.max_bytes {
            return Err(WireError::Batch {
                pid: self.pid(),
                why: format!(
                    "batch is full ({} of {} bytes): write it before pushing more",
                    self.len_bytes(),
                    self.max_bytes
                ),
            });
        }
        Ok(())
    }

    fn entry(&mut self, page: u64, kind: u64, extra: Option<u64>) {
        let gap = page - self.written_end;
        put_varint(&mut self.table, (gap << 3) | kind);
        if let Some(x) = extra {
            put_varint(&mut self.table, x);
        }
        self.entries += 1;
    }

    fn flush_run(&mut self) {
        if let Some(r) = self.run.take() {
            let (one, many) = if r.zero {
                (K_ZERO, K_ZERO_RUN)
            } else {
                (K_ABSENT, K_ABSENT_RUN)
            };
            if r.n == 1 {
                self.entry(r.start, one, None);
            } else {
                self.entry(r.start, many, Some(r.n as u64 - 2));
            }
            self.written_end = r.start + r.n as u64;
        }
    }

    fn push_run(&mut self, zero: bool, mut page: u64, mut n: u32) -> Result<(), WireError> {
        while n > 0 {
            match &mut self.run {
                Some(r)
                    if r.zero == zero && r.start + r.n as u64 == page && r.n < MAX_RUN_PAGES =>
                {
                    let k = n.min(MAX_RUN_PAGES - r.n);
                    r.n += k;
                    page += k as u64;
                    n -= k;
                }
                _ => {
                    self.flush_run();
                    self.room(0)?;
                    let k = n.min(MAX_RUN_PAGES);
                    self.run = Some(Run {
                        zero,
                        start: page,
                        n: k,
                    });
                    page += k as u64;
                    n -= k;
                }
            }
        }
        self.end = page;
        Ok(())
    }

    /// Makes `data[dlen..dlen + n]` exist (initialised), keeping what is
    /// there.
    fn reserve_data(&mut self, n: usize) {
        let need = self.dlen + n;
        if self.data.len() < need {
            self.data.resize(need.max(self.data.len() * 2), 0);
        }
    }

    /// Adds one page; returns how it will be carried.
    pub fn push(&mut self, addr: u64, page: &[u8; PAGE_SIZE]) -> Result<EntryKind, WireError> {
        let pno = self.check(addr, 1)?;
        if is_zero_page(page) {
            self.push_run(true, pno, 1)?;
            self.stats.count(EntryKind::Zero, 1, 0);
            return Ok(EntryKind::Zero);
        }
        self.flush_run();
        self.room(PAGE_SIZE)?;
        self.slots = (0, 0);
        let compressed = compress(&mut self.compressor, page, &mut self.scratch);
        let (kind, n) = match compressed {
            Some((kind, code, n)) => {
                self.entry(pno, code, Some(n as u64));
                self.reserve_data(n);
                self.data[self.dlen..self.dlen + n].copy_from_slice(&self.scratch[..n]);
                (kind, n)
            }
            None => {
                self.entry(pno, K_RAW, None);
                self.reserve_data(PAGE_SIZE);
                self.data[self.dlen..self.dlen + PAGE_SIZE].copy_from_slice(page);
                (EntryKind::Raw, PAGE_SIZE)
            }
        };
        self.dlen += n;
        self.stats.count(kind, 1, n);
        self.written_end = pno + 1;
        self.end = pno + 1;
        Ok(kind)
    }

    /// Room to read pages into in place, saving a copy of each: up to
    /// `max` whole pages (fewer when the batch would outgrow its target
    /// size; at least one) at the end of the batch data. Fill them, then
    /// hand their addresses to [`commit_slots`](Self::commit_slots); any
    /// other push in between discards the room.
    pub fn page_slots(&mut self, max: usize) -> &mut [u8] {
        let used = self.len_bytes() + 2 * MAX_ENTRY_LEN;
        let fit = self.target_bytes.saturating_sub(used) / (PAGE_SIZE + MAX_ENTRY_LEN);
        let n = fit.clamp(1, max.max(1));
        self.reserve_data(n * PAGE_SIZE);
        self.slots = (self.dlen, n);
        &mut self.data[self.dlen..self.dlen + n * PAGE_SIZE]
    }

    /// Adds the first `addrs.len()` pages of the room from
    /// [`page_slots`](Self::page_slots), page `i` at `addrs[i]` (increasing),
    /// as [`push`](Self::push) would; those for which `present(i)` is false
    /// are added as absent instead. Zero pages are squeezed out of the data.
    pub fn commit_slots(
        &mut self,
        addrs: &[u64],
        present: impl Fn(usize) -> bool,
    ) -> Result<(), WireError> {
        let (base, n) = std::mem::take(&mut self.slots);
        if addrs.len() > n || base != self.dlen {
            return Err(WireError::Batch {
                pid: self.pid(),
                why: format!(
                    "{} pages committed, {n} slots handed out (or the batch changed since)",
                    addrs.len()
                ),
            });
        }
        for (i, &addr) in addrs.iter().enumerate() {
            let pno = self.check(addr, 1)?;
            let at = base + i * PAGE_SIZE;
            if !present(i) {
                self.push_run(false, pno, 1)?;
                self.stats.count(EntryKind::Absent, 1, 0);
                continue;
            }
            if is_zero_page(slot(&self.data, at)?) {
                self.push_run(true, pno, 1)?;
                self.stats.count(EntryKind::Zero, 1, 0);
                continue;
            }
            self.flush_run();
            self.room(PAGE_SIZE)?;
            // The write position never passes the read position: each page
            // adds at most its own 4096 bytes.
            let page = slot(&self.data, at)?;
            let (kind, len) = match compress(&mut self.compressor, page, &mut self.scratch) {
                Some((kind, code, len)) => {
                    self.entry(pno, code, Some(len as u64));
                    self.data[self.dlen..self.dlen + len].copy_from_slice(&self.scratch[..len]);
                    (kind, len)
                }
                None => {
                    self.entry(pno, K_RAW, None);
                    if at != self.dlen {
                        self.data.copy_within(at..at + PAGE_SIZE, self.dlen);
                    }
                    (EntryKind::Raw, PAGE_SIZE)
                }
            };
            self.dlen += len;
            self.stats.count(kind, 1, len);
            self.written_end = pno + 1;
            self.end = pno + 1;
        }
        Ok(())
    }

    /// Adds consecutive pages starting at `addr` (`data.len()` must be a
    /// multiple of 4096; stops early when the batch fills up and returns
    /// how many bytes were taken).
    pub fn push_pages(&mut self, addr: u64, data: &[u8]) -> Result<usize, WireError> {
        if data.len() % PAGE_SIZE != 0 {
            return Err(WireError::Batch {
                pid: self.pid(),
                why: format!("{} bytes is not a whole number of pages", data.len()),
            });
        }
        let mut taken = 0;
        for chunk in data.chunks_exact(PAGE_SIZE) {
            if self.is_full() {
                break;
            }
            let page: &[u8; PAGE_SIZE] = chunk.try_into().map_err(|_| WireError::Batch {
                pid: self.pid(),
                why: "page slice of the wrong size".into(),
            })?;
            self.push(addr + taken as u64, page)?;
            taken += PAGE_SIZE;
        }
        Ok(taken)
    }

    /// Adds `npages` pages known to be zero (e.g. from a pagemap scan).
    pub fn push_zero(&mut self, addr: u64, npages: u32) -> Result<(), WireError> {
        let pno = self.check(addr, npages)?;
        self.push_run(true, pno, npages)?;
        self.stats.count(EntryKind::Zero, npages, 0);
        Ok(())
    }

    /// Adds `npages` pages the source no longer has.
    pub fn push_absent(&mut self, addr: u64, npages: u32) -> Result<(), WireError> {
        let pno = self.check(addr, npages)?;
        self.push_run(false, pno, npages)?;
        self.stats.count(EntryKind::Absent, npages, 0);
        Ok(())
    }

    /// Completes the batch and returns its payload parts. The encoder keeps
    /// them until [`clear`](Self::clear) or [`begin`](Self::begin).
    pub fn finish(&mut self) -> Result<BatchParts<'_>, WireError> {
        let Some((pid, round)) = self.target else {
            return Err(WireError::Batch {
                pid: None,
                why: "finish() before begin()".into(),
            });
        };
        self.flush_run();
        let table_len = u32::try_from(self.table.len()).map_err(|_| WireError::Batch {
            pid: Some(pid),
            why: "entry table over 4 GiB".into(),
        })?;
        self.header[0..4].copy_from_slice(&pid.to_le_bytes());
        self.header[4..8].copy_from_slice(&round.to_le_bytes());
        self.header[8..12].copy_from_slice(&self.entries.to_le_bytes());
        self.header[12..16].copy_from_slice(&table_len.to_le_bytes());
        self.stats.batches += 1;
        self.stats.meta_bytes += (BATCH_HEADER_LEN + self.table.len()) as u64;
        Ok(BatchParts {
            header: &self.header,
            table: &self.table,
            data: &self.data[..self.dlen],
        })
    }
}

/// The fixed fields of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub pid: i32,
    pub round: u32,
    pub entries: u32,
}

/// Reads the fixed header of a batch payload without validating the rest.
pub fn peek_header(payload: &[u8]) -> Result<BatchHeader, WireError> {
    let Some(h) = payload.first_chunk::<BATCH_HEADER_LEN>() else {
        return Err(WireError::Batch {
            pid: None,
            why: format!("{} bytes, shorter than the batch header", payload.len()),
        });
    };
    let le = |o: usize| [h[o], h[o + 1], h[o + 2], h[o + 3]];
    Ok(BatchHeader {
        pid: i32::from_le_bytes(le(0)),
        round: u32::from_le_bytes(le(4)),
        entries: u32::from_le_bytes(le(8)),
    })
}

/// A validated batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    pub header: BatchHeader,
    table: &'a [u8],
    data: &'a [u8],
    /// What the batch holds, by kind (batches = 1).
    pub stats: WireStats,
}

impl<'a> BatchView<'a> {
    /// Validates a batch payload completely: header, every entry, address
    /// arithmetic, and that the data is exactly what the entries claim.
    pub fn parse(payload: &'a [u8]) -> Result<BatchView<'a>, WireError> {
        let bad = |pid: Option<i32>, why: String| WireError::Batch { pid, why };
        let Some(h) = payload.first_chunk::<BATCH_HEADER_LEN>() else {
            return Err(bad(
                None,
                format!("{} bytes, shorter than the batch header", payload.len()),
            ));
        };
        let le = |o: usize| [h[o], h[o + 1], h[o + 2], h[o + 3]];
        let pid = i32::from_le_bytes(le(0));
        let round = u32::from_le_bytes(le(4));
        let entries = u32::from_le_bytes(le(8));
        let table_len = u32::from_le_bytes(le(12)) as usize;
        let rest = &payload[BATCH_HEADER_LEN..];
        if table_len > rest.len() {
            return Err(bad(
                Some(pid),
                format!(
                    "entry table of {table_len} bytes but only {} bytes follow the header",
                    rest.len()
                ),
            ));
        }
        if entries as usize > table_len {
            return Err(bad(
                Some(pid),
                format!("{entries} entries cannot fit a {table_len}-byte table"),
            ));
        }
        let (table, data) = rest.split_at(table_len);
        let mut stats = WireStats {
            batches: 1,
            meta_bytes: (BATCH_HEADER_LEN + table_len) as u64,
            ..WireStats::default()
        };
        let mut pos = 0;
        let mut end = 0u64;
        let mut data_len = 0usize;
        for i in 0..entries {
            let e = parse_entry(table, &mut pos, &mut end)
                .map_err(|why| bad(Some(pid), format!("entry {i}: {why}")))?;
            data_len += e.2;
            if data_len > data.len() {
                return Err(bad(
                    Some(pid),
                    format!(
                        "entry {i} needs data up to byte {data_len}, the batch has {}",
                        data.len()
                    ),
                ));
            }
            stats.count(e.0, e.1, e.2);
        }
        if pos != table.len() {
            return Err(bad(
                Some(pid),
                format!("{} stray bytes after the last entry", table.len() - pos),
            ));
        }
        if data_len != data.len() {
            return Err(bad(
                Some(pid),
                format!(
                    "entries carry {data_len} data bytes, the batch has {}",
                    data.len()
                ),
            ));
        }
        Ok(BatchView {
            header: BatchHeader {
                pid,
                round,
                entries,
            },
            table,
            data,
            stats,
        })
    }

    /// The entries, in address order.
    pub fn entries(&self) -> Entries<'a> {
        Entries {
            table: self.table,
            data: self.data,
            pos: 0,
            dpos: 0,
            end: 0,
            left: self.header.entries,
            pid: self.header.pid,
        }
    }
}

/// Parses one entry: (kind, pages, data bytes); advances `pos` and `end`.
fn parse_entry(
    table: &[u8],
    pos: &mut usize,
    end: &mut u64,
) -> Result<(EntryKind, u32, usize, u64), String> {
    let v = get_varint(table, pos).ok_or("truncated or overlong varint")?;
    let gap = v >> 3;
    let start = end
        .checked_add(gap)
        .filter(|p| *p < MAX_PAGE_NO)
        .ok_or_else(|| format!("address gap of {gap} pages leaves the address space"))?;
    let extra = |pos: &mut usize| get_varint(table, pos).ok_or("truncated or overlong varint");
    let (kind, n, len) = match v & 7 {
        K_ZERO => (EntryKind::Zero, 1u32, 0usize),
        K_ABSENT => (EntryKind::Absent, 1, 0),
        K_RAW => (EntryKind::Raw, 1, PAGE_SIZE),
        k @ (K_LZ4 | K_ZSTD) => {
            let len = extra(pos)?;
            if len == 0 || len >= PAGE_SIZE as u64 {
                return Err(format!("compressed length {len} is outside 1..{PAGE_SIZE}"));
            }
            let kind = if k == K_LZ4 {
                EntryKind::Lz4
            } else {
                EntryKind::Zstd
            };
            (kind, 1, len as usize)
        }
        k @ (K_ZERO_RUN | K_ABSENT_RUN) => {
            let n = extra(pos)?
                .checked_add(2)
                .filter(|n| *n <= MAX_RUN_PAGES as u64)
                .ok_or_else(|| format!("run longer than {MAX_RUN_PAGES} pages"))?;
            let kind = if k == K_ZERO_RUN {
                EntryKind::Zero
            } else {
                EntryKind::Absent
            };
            (kind, n as u32, 0)
        }
        k => return Err(format!("reserved entry kind {k}")),
    };
    let stop = start + n as u64;
    if stop > MAX_PAGE_NO {
        return Err(format!(
            "{n} pages at page {start:#x} leave the address space"
        ));
    }
    *end = stop;
    Ok((kind, n, len, start))
}

/// Iterator over the entries of a [`BatchView`].
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    table: &'a [u8],
    data: &'a [u8],
    pos: usize,
    dpos: usize,
    end: u64,
    left: u32,
    pid: i32,
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The view was validated, so this cannot fail; stay total anyway.
        let r = parse_entry(self.table, &mut self.pos, &mut self.end).and_then(
            |(kind, npages, len, start)| {
                let data = self
                    .data
                    .get(self.dpos..self.dpos + len)
                    .ok_or_else(|| "data ends early".to_string())?;
                self.dpos += len;
                Ok(Entry {
                    addr: start << PAGE_SHIFT,
                    npages,
                    kind,
                    data,
                })
            },
        );
        Some(r.map_err(|why| {
            self.left = 0;
            WireError::Batch {
                pid: Some(self.pid),
                why,
            }
        }))
    }
}

/// Decodes page batches with reused decompression state. Counts what it
/// accepted in [`WireStats`].
pub struct BatchDecoder {
    zstd: zstd::bulk::Decompressor<'static>,
    buf: Box<[u8; PAGE_SIZE]>,
    stats: WireStats,
}

impl std::fmt::Debug for BatchDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchDecoder")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl BatchDecoder {
    pub fn new() -> Result<BatchDecoder, WireError> {
        let zstd = zstd::bulk::Decompressor::new()
            .map_err(|e| WireError::Encoder(format!("zstd decompressor: {e}")))?;
        Ok(BatchDecoder {
            zstd,
            buf: Box::new([0; PAGE_SIZE]),
            stats: WireStats::default(),
        })
    }

    /// Everything accepted so far.
    pub fn stats(&self) -> &WireStats {
        &self.stats
    }

    /// Validates a batch and counts it.
    pub fn open<'p>(&mut self, payload: &'p [u8]) -> Result<BatchView<'p>, WireError> {
        let v = BatchView::parse(payload)?;
        self.stats += &v.stats;
        Ok(v)
    }

    /// The contents of a data entry: borrowed from the batch for Raw,
    /// decompressed into `buf` for Lz4/Zstd; exactly 4096 bytes or an
    /// error. Zero/Absent entries have no contents (an error here).
    pub fn page_data<'a>(
        &mut self,
        pid: i32,
        entry: &Entry<'a>,
        buf: &'a mut [u8; PAGE_SIZE],
    ) -> Result<&'a [u8; PAGE_SIZE], WireError> {
        decompress(&mut self.zstd, pid, entry, buf)
    }

    /// Decodes a whole batch, handing each page or run to `f`.
    pub fn decode(
        &mut self,
        payload: &[u8],
        mut f: impl FnMut(&BatchHeader, Page<'_>) -> Result<(), WireError>,
    ) -> Result<BatchHeader, WireError> {
        let view = self.open(payload)?;
        let h = view.header;
        for e in view.entries() {
            let e = e?;
            let page = match e.kind {
                EntryKind::Zero => Page::Zero {
                    addr: e.addr,
                    npages: e.npages,
                },
                EntryKind::Absent => Page::Absent {
                    addr: e.addr,
                    npages: e.npages,
                },
                _ => Page::Data {
                    addr: e.addr,
                    bytes: decompress(&mut self.zstd, h.pid, &e, &mut self.buf)?,
                },
            };
            f(&h, page)?;
        }
        Ok(h)
    }

    /// Decodes a whole batch into `sink`.
    pub fn decode_to<S: PageSink + ?Sized>(
        &mut self,
        payload: &[u8],
        sink: &mut S,
    ) -> Result<BatchHeader, WireError> {
        self.decode(payload, |h, page| {
            let (addr, r) = match page {
                Page::Data { addr, bytes } => (addr, sink.page(h.pid, h.round, addr, bytes)),
                Page::Zero { addr, npages } => (addr, sink.zero(h.pid, h.round, addr, npages)),
                Page::Absent { addr, npages } => (addr, sink.absent(h.pid, h.round, addr, npages)),
            };
            r.map_err(|source| WireError::Sink {
                pid: h.pid,
                addr,
                source,
            })
        })
    }
}

fn decompress<'a>(
    zstd: &mut zstd::bulk::Decompressor<'static>,
    pid: i32,
    e: &Entry<'a>,
    buf: &'a mut [u8; PAGE_SIZE],
) -> Result<&'a [u8; PAGE_SIZE], WireError> {
    let bad = |why: String| WireError::Page {
        pid,
        addr: e.addr,
        why,
    };
    let n = match e.kind {
        EntryKind::Raw => {
            return e
                .data
                .try_into()
                .map_err(|_| bad(format!("raw page of {} bytes", e.data.len())));
        }
        EntryKind::Lz4 => lz4_flex::block::decompress_into(e.data, &mut buf[..])
            .map_err(|err| bad(format!("lz4: {err}")))?,
        EntryKind::Zstd => zstd
            .decompress_to_buffer(e.data, &mut buf[..])
            .map_err(|err| bad(format!("zstd: {err}")))?,
        EntryKind::Zero | EntryKind::Absent => {
            return Err(bad(format!("{:?} entry has no data", e.kind)));
        }
    };
    if n != PAGE_SIZE {
        return Err(bad(format!(
            "{:?} page decompressed to {n} bytes, not {PAGE_SIZE}",
            e.kind
        )));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(seed: u64) -> [u8; PAGE_SIZE] {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut p = [0u8; PAGE_SIZE];
        for w in p.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            w.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        p
    }

    fn text(seed: u64) -> [u8; PAGE_SIZE] {
        let words = [&b"migrate "[..], b"the ", b"process ", b"page ", b"ferry "];
        let mut p = [0u8; PAGE_SIZE];
        let mut i = 0;
        let mut k = seed as usize;
        while i < PAGE_SIZE {
            let w = words[k % words.len()];
            let n = w.len().min(PAGE_SIZE - i);
            p[i..i + n].copy_from_slice(&w[..n]);
            i += n;
            k = k.wrapping_mul(31).wrapping_add(7);
        }
        p
    }

    fn decode_all(payload: &[u8]) -> Vec<(u64, Option<Vec<u8>>, bool)> {
        let mut d = BatchDecoder::new().unwrap();
        let mut out = Vec::new();
        d.decode(payload, |_, p| {
            match p {
                Page::Data { addr, bytes } => out.push((addr, Some(bytes.to_vec()), false)),
                Page::Zero { addr, npages } => {
                    for i in 0..npages as u64 {
                        out.push((addr + i * 4096, None, false))
                    }
                }
                Page::Absent { addr, npages } => {
                    for i in 0..npages as u64 {
                        out.push((addr + i * 4096, None, true))
                    }
                }
            }
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn varints_round_trip_and_reject_overlong() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut pos = 0;
            assert_eq!(get_varint(&b, &mut pos), Some(v));
            assert_eq!(pos, b.len());
        }
        let mut pos = 0;
        assert_eq!(get_varint(&[0xff; 11], &mut pos), None);
        let mut pos = 0;
        assert_eq!(get_varint(&[0x80], &mut pos), None);
    }

    #[test]
    fn zero_detection_looks_at_every_word() {
        let mut p = [0u8; PAGE_SIZE];
        assert!(is_zero_page(&p));
        for i in [0, 7, 8, 63, 64, 2047, 4095] {
            p[i] = 1;
            assert!(!is_zero_page(&p), "byte {i}");
            p[i] = 0;
        }
    }

    #[test]
    fn mixed_batch_round_trips_in_every_mode() {
        let zero = [0u8; PAGE_SIZE];
        for mode in [
            Compression::None,
            Compression::Lz4,
            Compression::Zstd(1),
            Compression::Zstd(19),
        ] {
            let mut enc = BatchEncoder::new(mode).unwrap();
            enc.begin(42, 3);
            let pages: Vec<(u64, [u8; PAGE_SIZE])> = vec![
                (0x1000, noise(1)),
                (0x2000, zero),
                (0x3000, zero),
                (0x4000, text(2)),
                (0x9000, zero),
                (0x10000, noise(3)),
                (0x11000, text(4)),
            ];
            let mut kinds = Vec::new();
            for (a, p) in &pages {
                kinds.push(enc.push(*a, p).unwrap());
            }
            enc.push_absent(0x20000, 3).unwrap();
            enc.push_zero(0x23000, 2).unwrap();
            let payload = enc.finish().unwrap().to_vec();
            assert_eq!(kinds[1], EntryKind::Zero);
            assert_eq!(kinds[0], EntryKind::Raw, "noise never compresses");
            match mode {
                Compression::None => assert_eq!(kinds[3], EntryKind::Raw),
                Compression::Lz4 => assert_eq!(kinds[3], EntryKind::Lz4),
                Compression::Zstd(_) => assert_eq!(kinds[3], EntryKind::Zstd),
            }
            let got = decode_all(&payload);
            let mut want: Vec<(u64, Option<Vec<u8>>, bool)> = pages
                .iter()
                .map(|(a, p)| (*a, (p != &zero).then(|| p.to_vec()), false))
                .collect();
            for i in 0..3 {
                want.push((0x20000 + i * 4096, None, true));
            }
            for i in 0..2 {
                want.push((0x23000 + i * 4096, None, false));
            }
            assert_eq!(got, want, "{mode:?}");
            // Stats agree on both ends.
            let mut d = BatchDecoder::new().unwrap();
            d.open(&payload).unwrap();
            let mut es = *enc.stats();
            es.batches = 1;
            assert_eq!(d.stats(), &es);
            assert_eq!(es.zero_pages, 5);
            assert_eq!(es.absent_pages, 3);
            assert_eq!(es.pages(), 12);
        }
    }

    #[test]
    fn pages_filled_in_place_encode_as_pushed_ones() {
        let zero = [0u8; PAGE_SIZE];
        let pages: Vec<(u64, [u8; PAGE_SIZE], bool)> = vec![
            (0x1000, noise(1), true),
            (0x2000, zero, true),
            (0x3000, text(5), false),
            (0x4000, text(2), true),
            (0x5000, zero, true),
            (0x6000, noise(7), true),
            (0x9000, noise(3), true),
            (0xa000, zero, false),
            (0x11000, text(4), true),
        ];
        for mode in [Compression::None, Compression::Lz4, Compression::Zstd(1)] {
            let mut a = BatchEncoder::new(mode).unwrap();
            let mut b = BatchEncoder::new(mode).unwrap();
            a.begin(7, 2);
            b.begin(7, 2);
            a.push(0x0, &noise(9)).unwrap();
            b.push(0x0, &noise(9)).unwrap();
            for (addr, p, present) in &pages {
                if *present {
                    a.push(*addr, p).unwrap();
                } else {
                    a.push_absent(*addr, 1).unwrap();
                }
            }
            // In two reads of 4 and 5 pages.
            for part in [&pages[..4], &pages[4..]] {
                let room = b.page_slots(part.len());
                assert_eq!(room.len(), part.len() * PAGE_SIZE);
                for (i, (_, p, _)) in part.iter().enumerate() {
                    room[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(p);
                }
                let addrs: Vec<u64> = part.iter().map(|x| x.0).collect();
                b.commit_slots(&addrs, |i| part[i].2).unwrap();
            }
            assert_eq!(b.stats(), a.stats(), "{mode:?}");
            let (pa, pb) = (a.finish().unwrap().to_vec(), b.finish().unwrap().to_vec());
            assert_eq!(pa, pb, "{mode:?}");
        }
    }

    #[test]
    fn page_slots_stop_at_the_target_size_and_check_commits() {
        let mut enc = BatchEncoder::with_sizes(Compression::None, 64 << 10, 64 << 10).unwrap();
        enc.begin(1, 1);
        let n = enc.page_slots(1000).len() / PAGE_SIZE;
        assert!((1..16).contains(&n), "{n} slots");
        // More pages than handed out are refused.
        let addrs: Vec<u64> = (0..=n as u64).map(|i| (i + 1) << 12).collect();
        assert!(enc.commit_slots(&addrs, |_| true).is_err());
        let room = enc.page_slots(1000);
        let n = room.len() / PAGE_SIZE;
        room.fill(1);
        enc.commit_slots(&addrs[..n], |_| true).unwrap();
        assert!(enc.is_full());
        assert!(enc.len_bytes() <= 64 << 10);
        // A batch that is full still hands out one slot.
        assert_eq!(enc.page_slots(5).len(), PAGE_SIZE);
        // A commit without slots is refused.
        enc.begin(1, 1);
        assert!(enc.commit_slots(&[0x1000], |_| true).is_err());
    }

    #[test]
    fn zero_runs_are_tiny_and_split_at_the_cap() {
        let mut enc = BatchEncoder::new(Compression::Lz4).unwrap();
        enc.begin(1, 1);
        let zero = [0u8; PAGE_SIZE];
        for i in 0..1000u64 {
            enc.push(0x7f00_0000_0000 + i * 4096, &zero).unwrap();
        }
        let p = enc.finish().unwrap().to_vec();
        assert!(p.len() <= BATCH_HEADER_LEN + 12, "{} bytes", p.len());
        enc.begin(1, 1);
        enc.push_zero(0, MAX_RUN_PAGES).unwrap();
        enc.push_zero(MAX_RUN_PAGES as u64 * 4096, 5).unwrap();
        let p = enc.finish().unwrap().to_vec();
        let v = BatchView::parse(&p).unwrap();
        assert_eq!(v.header.entries, 2);
        assert_eq!(v.stats.zero_pages, MAX_RUN_PAGES as u64 + 5);
    }

    #[test]
    fn encoder_refuses_misuse() {
        let mut enc = BatchEncoder::new(Compression::None).unwrap();
        let p = noise(9);
        assert!(enc.push(0x1000, &p).is_err(), "push before begin");
        enc.begin(5, 1);
        assert!(enc.push(0x1001, &p).is_err(), "unaligned");
        enc.push(0x5000, &p).unwrap();
        assert!(enc.push(0x5000, &p).is_err(), "repeat");
        assert!(enc.push(0x4000, &p).is_err(), "descending");
        assert!(enc.push_zero(!0xfffu64, 2).is_err(), "overflow");
        assert!(enc.push_pages(0x9000, &[0u8; 100]).is_err());
    }

    #[test]
    fn encoder_fills_to_target_and_never_passes_the_cap() {
        let mut enc = BatchEncoder::with_sizes(Compression::None, 64 << 10, 64 << 10).unwrap();
        enc.begin(1, 1);
        let mut a = 0;
        let mut n = 0;
        while !enc.is_full() {
            enc.push(a, &noise(a)).unwrap();
            a += 4096;
            n += 1;
        }
        assert!(n >= 14, "{n}");
        let len = enc.finish().unwrap().len();
        assert!(len <= 64 << 10, "{len}");
        let data: Vec<u8> = (0..40).flat_map(|i| noise(i).to_vec()).collect();
        enc.begin(1, 2);
        let taken = enc.push_pages(0x100000, &data).unwrap();
        assert!(taken < data.len() && taken % PAGE_SIZE == 0);
    }

    #[test]
    fn decoder_rejects_bad_compressed_pages() {
        let mut enc = BatchEncoder::new(Compression::Lz4).unwrap();
        enc.begin(9, 1);
        enc.push(0x1000, &text(1)).unwrap();
        let good = enc.finish().unwrap().to_vec();
        assert_eq!(decode_all(&good).len(), 1);
        // Corrupt the compressed data: either the lz4 decoder fails or the
        // size is wrong; both are errors, never a panic.
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x55;
            let mut d = BatchDecoder::new().unwrap();
            let _ = d.decode(&b, |_, _| Ok(()));
        }
        // An lz4 block of a 100-byte page is refused for its size.
        let small = lz4_flex::block::compress(&[7u8; 100]);
        let mut p = Vec::new();
        p.extend_from_slice(&9i32.to_le_bytes());
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&1u32.to_le_bytes());
        let mut table = Vec::new();
        put_varint(&mut table, (1 << 3) | K_LZ4);
        put_varint(&mut table, small.len() as u64);
        p.extend_from_slice(&(table.len() as u32).to_le_bytes());
        p.extend_from_slice(&table);
        p.extend_from_slice(&small);
        let mut d = BatchDecoder::new().unwrap();
        assert!(matches!(
            d.decode(&p, |_, _| Ok(())),
            Err(WireError::Page {
                pid: 9,
                addr: 0x1000,
                ..
            })
        ));
    }

    #[test]
    fn decoder_rejects_structural_lies() {
        let mut enc = BatchEncoder::new(Compression::None).unwrap();
        enc.begin(3, 1);
        enc.push(0x1000, &noise(1)).unwrap();
        enc.push(0x2000, &[0; PAGE_SIZE]).unwrap();
        let good = enc.finish().unwrap().to_vec();
        assert!(BatchView::parse(&good).is_ok());
        // Truncation anywhere.
        for n in 0..good.len() {
            assert!(BatchView::parse(&good[..n]).is_err(), "truncated to {n}");
        }
        // Trailing data.
        let mut b = good.clone();
        b.push(0);
        assert!(BatchView::parse(&b).is_err());
        // Entry count too high / low.
        for entries in [0u32, 1, 3, u32::MAX] {
            let mut b = good.clone();
            b[8..12].copy_from_slice(&entries.to_le_bytes());
            assert!(BatchView::parse(&b).is_err(), "{entries} entries");
        }
        // Reserved kind.
        let mut b = good.clone();
        b[BATCH_HEADER_LEN] = (b[BATCH_HEADER_LEN] & !7) | 7;
        assert!(BatchView::parse(&b).is_err());
    }
}

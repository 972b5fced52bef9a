//! /proc/PID/pagemap: one 64-bit entry per virtual page
//! (Documentation/admin-guide/mm/pagemap.rst).

use super::{pid_path, ProcError};
pub use crate::sys::uffd::PageRegion;
use crate::sys::uffd::{self, ScanMasks};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Size of the pages pagemap describes (x86_64 base pages).
const PAGE_SIZE: u64 = 4096;
/// Bytes per pagemap entry.
const ENTRY_SIZE: usize = 8;
/// Entries fetched per pread: large enough that syscalls are noise, small
/// enough (256 KiB) that the byte buffer stays in cache while decoding.
const CHUNK_PAGES: usize = 32 * 1024;
/// More pages than any x86_64 address space has (57-bit, 5-level paging).
const MAX_PAGES: u64 = 1 << (57 - 12);

/// One pagemap entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    /// Bit 63: the page is present in RAM.
    pub fn present(self) -> bool {
        self.0 & (1 << 63) != 0
    }

    /// Bit 62: the page is swapped out.
    pub fn swapped(self) -> bool {
        self.0 & (1 << 62) != 0
    }

    /// Bit 61: the page is file-backed or shared anonymous.
    pub fn file_or_shared_anon(self) -> bool {
        self.0 & (1 << 61) != 0
    }

    /// Bit 58: a guard region (MADV_GUARD_INSTALL, Linux 6.15+); these do
    /// not show up in maps.
    pub fn guard(self) -> bool {
        self.0 & (1 << 58) != 0
    }

    /// Bit 57: the page is userfaultfd write-protected.
    pub fn uffd_wp(self) -> bool {
        self.0 & (1 << 57) != 0
    }

    /// Bit 56: the page is mapped exclusively (by this process only).
    pub fn exclusive(self) -> bool {
        self.0 & (1 << 56) != 0
    }

    /// Bit 55: soft-dirty (always 0 without CONFIG_MEM_SOFT_DIRTY).
    pub fn soft_dirty(self) -> bool {
        self.0 & (1 << 55) != 0
    }

    /// Bits 0-54: the page frame number if present (0 without
    /// CAP_SYS_ADMIN), or swap type and offset if swapped.
    pub fn pfn(self) -> u64 {
        self.0 & ((1 << 55) - 1)
    }
}

/// An open /proc/PID/pagemap, reused across reads.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
    pid: i32,
    path: PathBuf,
    /// Raw bytes of one chunk, kept to avoid an allocation per read.
    buf: Vec<u8>,
    /// The kernel's output buffer for [`Pagemap::scan`].
    regions: Vec<PageRegion>,
}

impl Pagemap {
    /// Opens /proc/PID/pagemap (needs PTRACE_MODE_READ on the process).
    pub fn open(pid: i32) -> Result<Pagemap, ProcError> {
        let path = pid_path(pid, "pagemap");
        let file = File::open(&path).map_err(|e| ProcError::from_io(pid, &path, e))?;
        Ok(Pagemap {
            file,
            pid,
            path,
            buf: Vec::new(),
            regions: Vec::new(),
        })
    }

    /// The pid this pagemap belongs to.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Replaces `out` with the raw entries of the `npages` pages starting at
    /// the page containing `start_addr`; wrap them in [`PagemapEntry`] to
    /// decode. Unmapped pages read as 0. Reading past the end of the user
    /// address space fails with an `Io` error (UnexpectedEof).
    pub fn read(
        &mut self,
        start_addr: u64,
        npages: usize,
        out: &mut Vec<u64>,
    ) -> Result<(), ProcError> {
        if npages as u64 > MAX_PAGES {
            let e = io::Error::new(io::ErrorKind::InvalidInput, "too many pages");
            return Err(ProcError::from_io(self.pid, &self.path, e));
        }
        out.resize(npages, 0);
        let chunk_len = npages.min(CHUNK_PAGES) * ENTRY_SIZE;
        if self.buf.len() < chunk_len {
            self.buf.resize(chunk_len, 0);
        }

        let mut offset = (start_addr / PAGE_SIZE) * ENTRY_SIZE as u64;
        for dst in out.chunks_mut(CHUNK_PAGES) {
            let bytes = &mut self.buf[..dst.len() * ENTRY_SIZE];
            self.file
                .read_exact_at(bytes, offset)
                .map_err(|e| ProcError::from_io(self.pid, &self.path, e))?;
            for (d, raw) in dst.iter_mut().zip(bytes.chunks_exact(ENTRY_SIZE)) {
                *d = u64::from_ne_bytes(raw.try_into().unwrap_or([0; ENTRY_SIZE]));
            }
            offset += bytes.len() as u64;
        }
        Ok(())
    }

    /// Appends to `out` the runs of pages of `[start, end)` that match
    /// `masks`, each with its categories masked by the return mask
    /// (`PAGEMAP_SCAN`): the kernel walks the page tables and reports runs,
    /// which costs a small fraction of reading an entry per page, so areas
    /// of gigabytes are looked at in a millisecond or two. Scan one area at
    /// a time: a refusal (EPERM) part-way through loses that call's output.
    pub fn scan(
        &mut self,
        start: u64,
        end: u64,
        masks: &ScanMasks,
        out: &mut Vec<PageRegion>,
    ) -> Result<(), ProcError> {
        if self.regions.capacity() == 0 {
            self.regions.reserve(SCAN_REGIONS);
        }
        let mut pos = start;
        while pos < end {
            let r = uffd::pagemap_scan(self.file.as_fd(), pos, end, masks, &mut self.regions)
                .map_err(|e| ProcError::from_io(self.pid, &self.path, e))?;
            out.extend_from_slice(&self.regions);
            if r.walk_end <= pos {
                let e = io::Error::other(format!("PAGEMAP_SCAN made no progress at {pos:#x}"));
                return Err(ProcError::from_io(self.pid, &self.path, e));
            }
            pos = r.walk_end;
        }
        Ok(())
    }
}

/// Regions one `PAGEMAP_SCAN` call may return (24 bytes each).
const SCAN_REGIONS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn me() -> i32 {
        std::process::id() as i32
    }

    #[test]
    fn entry_bits() {
        let e = PagemapEntry(1 << 63 | 1 << 56 | 0x1234);
        assert!(e.present() && e.exclusive() && !e.swapped());
        assert_eq!(e.pfn(), 0x1234);
        let e = PagemapEntry(1 << 62 | 1 << 61 | 1 << 58 | 1 << 57 | 1 << 55 | 1 << 54);
        assert!(e.swapped() && e.file_or_shared_anon() && e.guard() && e.uffd_wp());
        assert!(e.soft_dirty() && !e.present() && !e.exclusive());
        assert_eq!(e.pfn(), 1 << 54);
        assert_eq!(PagemapEntry(u64::MAX).pfn(), (1 << 55) - 1);
    }

    #[test]
    fn scan_finds_what_read_finds() {
        const PAGES: usize = 16 * 1024;
        let mut v = vec![0u8; (PAGES + 1) * 4096];
        // Every page but every 7th written; the written ones present.
        for i in (0..v.len()).step_by(4096) {
            if (i / 4096) % 7 != 3 {
                v[i] = 1;
            }
        }
        let first = (v.as_ptr() as u64).div_ceil(4096) * 4096;
        let end = first + PAGES as u64 * 4096;
        let mut pm = Pagemap::open(me()).unwrap();
        let mut entries = Vec::new();
        pm.read(first, PAGES, &mut entries).unwrap();
        let by_read: Vec<u64> = (0..PAGES)
            .filter(|&i| PagemapEntry(entries[i]).present())
            .map(|i| first + i as u64 * 4096)
            .collect();
        let masks = ScanMasks {
            category_anyof_mask: uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED,
            return_mask: uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED | uffd::PAGE_IS_FILE,
            ..ScanMasks::default()
        };
        let mut regions = Vec::new();
        pm.scan(first, end, &masks, &mut regions).unwrap();
        let by_scan: Vec<u64> = regions
            .iter()
            .flat_map(|r| (r.start..r.end).step_by(4096))
            .collect();
        assert_eq!(by_scan.len(), by_read.len());
        assert_eq!(by_scan, by_read);
        std::hint::black_box(&v);
    }

    #[test]
    fn written_vec_is_present() {
        const PAGES: usize = 64;
        let mut v = vec![0u8; (PAGES + 1) * 4096];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        let base = v.as_ptr() as u64;
        let first = base.div_ceil(4096) * 4096;

        let mut pm = Pagemap::open(me()).unwrap();
        let mut out = vec![7; 3]; // stale contents must be replaced
        pm.read(first, PAGES, &mut out).unwrap();
        assert_eq!(out.len(), PAGES);
        for (i, raw) in out.iter().enumerate() {
            let e = PagemapEntry(*raw);
            assert!(e.present() && !e.swapped(), "page {i}: {raw:#x}");
            assert!(
                e.exclusive() && !e.file_or_shared_anon(),
                "page {i}: {raw:#x}"
            );
        }
        assert_eq!(pm.pid(), me());
        std::hint::black_box(&v);
    }

    #[test]
    fn untouched_reservation_is_not_present() {
        // A large malloc is a fresh mmap; glibc only writes its header page.
        let v: Vec<u8> = Vec::with_capacity(64 << 20);
        let first = (v.as_ptr() as u64).div_ceil(4096) * 4096 + (1 << 20);
        let mut out = Vec::new();
        Pagemap::open(me())
            .unwrap()
            .read(first, 1024, &mut out)
            .unwrap();
        assert!(out.iter().all(|raw| !PagemapEntry(*raw).present()));
        std::hint::black_box(&v);
    }

    #[test]
    fn code_page_is_file_backed() {
        let addr = code_page_is_file_backed as fn() as usize as u64;
        let mut out = Vec::new();
        Pagemap::open(me())
            .unwrap()
            .read(addr, 1, &mut out)
            .unwrap();
        let e = PagemapEntry(out[0]);
        assert!(e.present() && e.file_or_shared_anon(), "{:#x}", out[0]);
    }

    #[test]
    fn large_read_reuses_buffers() {
        // 1 GiB of address space; mostly unmapped, which the kernel fills
        // with zeros. This exercises the chunking and buffer reuse.
        let v: Vec<u8> = Vec::with_capacity(1 << 30);
        let start = v.as_ptr() as u64;
        let mut pm = Pagemap::open(me()).unwrap();
        let mut out = Vec::new();
        let t = Instant::now();
        pm.read(start, 262_144, &mut out).unwrap();
        let took = t.elapsed();
        assert_eq!(out.len(), 262_144);
        let cap = out.capacity();
        pm.read(start, 1000, &mut out).unwrap();
        assert_eq!((out.len(), out.capacity()), (1000, cap));
        eprintln!("pagemap read of 262144 entries: {took:?}");
        std::hint::black_box(&v);
    }

    #[test]
    fn past_user_space_is_io_error() {
        let mut out = Vec::new();
        let mut pm = Pagemap::open(me()).unwrap();
        let r = pm.read(0xffff_ffff_ff60_0000, 1, &mut out);
        assert!(matches!(r, Err(ProcError::Io { .. })), "{r:?}");
        let r = pm.read(0, usize::MAX, &mut out);
        assert!(matches!(r, Err(ProcError::Io { .. })), "{r:?}");
    }

    #[test]
    fn missing_process_is_gone() {
        assert!(matches!(
            Pagemap::open(i32::MAX),
            Err(ProcError::Gone { .. })
        ));
    }
}

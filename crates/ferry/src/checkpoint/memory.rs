//! Memory capture: which areas there are, which of their pages hold data
//! the process owns, and the dump of those pages into the page store.
//!
//! Page path: one pagemap read per area, `process_vm_readv` with up to
//! IOV_MAX ranges into one reused buffer, zero checks a word at a time,
//! runs of data appended to the store with one CRC each.

use super::CheckpointError;
use crate::image::{Advice, ImageDir, PageKind, PageRun, PageStoreWriter, Vma, VmaKind};
use crate::proc::{MapEntry, Pagemap, PagemapEntry, Special};
use crate::sys::uffd::{self, ScanMasks};
use crate::sys::{self, RemoteRange, IOV_MAX, PAGE_SIZE};
use std::fs::File;
use std::os::unix::fs::FileExt;

const PAGE: u64 = PAGE_SIZE as u64;
/// Pages read per batch (2 MiB): large enough to amortise the syscalls,
/// small enough to stay in cache.
const BATCH_PAGES: usize = 512;

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub pages_data: u64,
    pub pages_zero: u64,
    pub bytes: u64,
}

/// Refuses areas ferry cannot restore, naming the first one.
pub fn check_supported(pid: i32, maps: &[MapEntry], tree: &[i32]) -> Result<(), CheckpointError> {
    let unsupported = |m: &MapEntry, why: &str| CheckpointError::Unsupported {
        pid,
        what: format!(
            "memory area {:#x}-{:#x} ({}): {why}",
            m.start,
            m.end,
            m.path.as_deref().unwrap_or("anonymous")
        ),
    };
    for m in maps {
        // [vvar] and friends are kernel-provided special mappings (with
        // io/pf flags); they are recreated by the kernel, not copied.
        if matches!(
            m.special(),
            Some(Special::Vdso | Special::Vvar | Special::VvarVclock | Special::Vsyscall)
        ) {
            continue;
        }
        let flags = m.vm_flags.as_ref();
        if flags.is_some_and(|f| f.io() || f.pfnmap() || f.mixedmap()) {
            return Err(unsupported(m, "device memory"));
        }
        if flags.is_some_and(|f| f.hugetlb()) {
            return Err(unsupported(m, "hugetlbfs pages are not supported yet"));
        }
        if flags.is_some_and(|f| f.uffd_wp() || f.uffd_missing() || f.uffd_minor()) {
            return Err(unsupported(m, "registered with a userfaultfd"));
        }
        if let Some(p) = &m.path {
            if p.starts_with("/SYSV") {
                return Err(unsupported(m, "SysV shared memory is not supported yet"));
            }
            if m.deleted && !m.is_shmem() {
                return Err(unsupported(m, "a mapping of a deleted file"));
            }
        }
    }
    let shmem: Vec<&MapEntry> = maps.iter().filter(|m| m.is_shmem()).collect();
    if !shmem.is_empty() {
        if let Some((other, m)) = shared_with_others(tree, &shmem) {
            return Err(unsupported(
                m,
                &format!("shared with process {other}, which is not being checkpointed"),
            ));
        }
    }
    Ok(())
}

/// Finds another process that maps one of these shared-memory objects.
fn shared_with_others<'a>(tree: &[i32], shmem: &[&'a MapEntry]) -> Option<(i32, &'a MapEntry)> {
    let dir = std::fs::read_dir("/proc").ok()?;
    for e in dir.flatten() {
        let Some(other) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if tree.contains(&other) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(format!("/proc/{other}/maps")) else {
            continue;
        };
        for line in text.lines() {
            // Only lines naming the same object can match; the parser is
            // used for those few lines only.
            if let Some(m) = shmem.iter().find(|m| line_maps_inode(line, m)) {
                return Some((other, m));
            }
        }
    }
    None
}

fn line_maps_inode(line: &str, m: &MapEntry) -> bool {
    let mut it = line.split_whitespace();
    let (_, _, _, dev, ino) = (it.next(), it.next(), it.next(), it.next(), it.next());
    let want = format!("{:02x}:{:02x}", m.dev_major, m.dev_minor);
    dev == Some(want.as_str()) && ino.and_then(|i| i.parse::<u64>().ok()) == Some(m.inode)
}

pub fn advice(m: &MapEntry) -> Advice {
    let Some(f) = m.vm_flags.as_ref() else {
        return Advice::default();
    };
    Advice {
        growsdown: f.growsdown(),
        locked: f.locked(),
        dontfork: f.dontfork(),
        wipeonfork: f.wipeonfork(),
        dontdump: f.dontdump(),
        hugepage: f.hugepage(),
        nohugepage: f.nohugepage(),
        mergeable: f.mergeable(),
    }
}

pub fn kind_of(m: &MapEntry) -> VmaKind {
    match m.special() {
        Some(Special::Vdso) => return VmaKind::Vdso,
        Some(Special::Vvar) => return VmaKind::Vvar,
        Some(Special::VvarVclock) => return VmaKind::VvarVclock,
        Some(Special::Vsyscall) => return VmaKind::Vsyscall,
        _ => {}
    }
    if m.is_shmem() {
        return VmaKind::Shmem {
            name: m.path.clone().unwrap_or_default(),
            offset: m.offset,
            size: m.end - m.start + m.offset,
            id: crate::image::shmem_id(m.dev_major, m.dev_minor, m.inode),
        };
    }
    match (&m.path, m.inode) {
        (Some(p), ino) if ino != 0 && p.starts_with('/') => VmaKind::File {
            path: p.clone(),
            offset: m.offset,
            blob: None,
        },
        _ => {
            let special = m.special();
            VmaKind::Anon {
                name: m.path.clone().filter(|p| p.starts_with("[anon:")),
                heap: matches!(special, Some(Special::Heap)),
                stack: matches!(special, Some(Special::Stack)),
            }
        }
    }
}

/// Whether a page of this area holds data that only the process has.
pub fn wanted(kind: &VmaKind, shared: bool, e: PagemapEntry) -> bool {
    match kind {
        VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall => false,
        // Shared file pages live in the file itself.
        VmaKind::File { .. } if shared => false,
        // Private file pages: only those copied on write (anonymous now).
        VmaKind::File { .. } => e.swapped() || (e.present() && !e.file_or_shared_anon()),
        VmaKind::Shmem { .. } | VmaKind::Anon { .. } => e.present() || e.swapped(),
    }
}

/// Accumulates consecutive pages of one kind into [`PageRun`]s.
struct RunBuilder {
    runs: Vec<PageRun>,
    cur: Option<(u64, u32, bool, u64)>, // addr, npages, is_data, store offset
    crc: u32,
}

impl RunBuilder {
    fn push(&mut self, addr: u64, is_data: bool, store_off: u64, data: Option<&[u8]>) {
        let extends =
            matches!(self.cur, Some((a, n, d, _)) if d == is_data && a + n as u64 * PAGE == addr);
        if !extends {
            self.flush();
            self.cur = Some((addr, 0, is_data, store_off));
            self.crc = 0;
        }
        if let Some(c) = self.cur.as_mut() {
            c.1 += 1;
        }
        if let Some(d) = data {
            self.crc = crc32c::crc32c_append(self.crc, d);
        }
    }

    fn flush(&mut self) {
        if let Some((addr, npages, is_data, offset)) = self.cur.take() {
            let kind = if is_data {
                PageKind::Data {
                    offset,
                    crc: self.crc,
                }
            } else {
                PageKind::Zero
            };
            self.runs.push(PageRun { addr, npages, kind });
        }
    }
}

/// Dumps the contents of every area into the page store `pages_file`.
pub fn dump(
    pid: i32,
    maps: &[MapEntry],
    img: &ImageDir,
    pages_file: &str,
) -> Result<(Vec<Vma>, Stats), CheckpointError> {
    let mut store = PageStoreWriter::create(&img.path(pages_file))?;
    let mut pagemap = Pagemap::open(pid)?;
    let mem = File::open(format!("/proc/{pid}/mem")).map_err(|source| CheckpointError::Io {
        pid,
        what: "open /proc/PID/mem".into(),
        source,
    })?;
    let mut entries: Vec<u64> = Vec::new();
    let mut buf = vec![0u8; BATCH_PAGES * PAGE_SIZE];
    let mut ranges: Vec<RemoteRange> = Vec::with_capacity(IOV_MAX);
    let mut addrs: Vec<u64> = Vec::with_capacity(BATCH_PAGES);
    let mut stats = Stats::default();
    let mut vmas = Vec::with_capacity(maps.len());

    for m in maps {
        let kind = kind_of(m);
        let mut vma = Vma {
            start: m.start,
            end: m.end,
            prot: m.perms.prot() as u32,
            shared: m.perms.shared,
            kind,
            advice: advice(m),
            pages: Vec::new(),
            guards: Vec::new(),
        };
        if matches!(vma.kind, VmaKind::Vsyscall) {
            vmas.push(vma);
            continue;
        }
        let npages = ((m.end - m.start) / PAGE) as usize;
        pagemap.read(m.start, npages, &mut entries)?;
        let mut rb = RunBuilder {
            runs: Vec::new(),
            cur: None,
            crc: 0,
        };
        let mut guard_run: Option<(u64, u64)> = None;
        let mut i = 0;
        while i < npages {
            // Gather up to BATCH_PAGES wanted pages as contiguous ranges.
            ranges.clear();
            addrs.clear();
            while i < npages && addrs.len() < BATCH_PAGES {
                let e = PagemapEntry(entries[i]);
                let addr = m.start + i as u64 * PAGE;
                if e.guard() {
                    match guard_run.as_mut() {
                        Some((a, n)) if *a + *n * PAGE == addr => *n += 1,
                        _ => {
                            if let Some(g) = guard_run.take() {
                                vma.guards.push(g);
                            }
                            guard_run = Some((addr, 1));
                        }
                    }
                }
                if wanted(&vma.kind, vma.shared, e) {
                    if !sys::push_page_range(&mut ranges, addr) {
                        break;
                    }
                    addrs.push(addr);
                }
                i += 1;
            }
            if addrs.is_empty() {
                continue;
            }
            let bytes = addrs.len() * PAGE_SIZE;
            read_ranges(pid, &mem, m.perms.read, &ranges, &mut buf[..bytes])?;
            // Zero pages become flags; each stretch of data pages goes to
            // the store in one write, straight from the read buffer.
            let page = |k: usize| &buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
            let mut k = 0;
            while k < addrs.len() {
                if sys::is_zero_page(page(k)) {
                    stats.pages_zero += 1;
                    rb.push(addrs[k], false, 0, None);
                    k += 1;
                    continue;
                }
                let first = k;
                k += 1;
                while k < addrs.len() && !sys::is_zero_page(page(k)) {
                    k += 1;
                }
                let off = store.append(&buf[first * PAGE_SIZE..k * PAGE_SIZE])?;
                for (i, &addr) in addrs[first..k].iter().enumerate() {
                    let at = off + (i * PAGE_SIZE) as u64;
                    rb.push(addr, true, at, Some(page(first + i)));
                }
                stats.pages_data += (k - first) as u64;
            }
        }
        rb.flush();
        if let Some(g) = guard_run.take() {
            vma.guards.push(g);
        }
        vma.pages = rb.runs;
        vmas.push(vma);
    }
    stats.bytes = store.finish()? + crate::image::format::HEADER_LEN as u64;
    Ok((vmas, stats))
}

/// Reads the ranges into `out`: `process_vm_readv` for readable areas,
/// /proc/PID/mem (which ignores protections) for PROT_NONE ones.
fn read_ranges(
    pid: i32,
    mem: &File,
    readable: bool,
    ranges: &[RemoteRange],
    out: &mut [u8],
) -> Result<(), CheckpointError> {
    let err = |addr, source| CheckpointError::Memory { pid, addr, source };
    if readable {
        let n = sys::process_vm_readv(pid, out, ranges).map_err(|e| err(ranges[0].addr, e))?;
        if n == out.len() {
            return Ok(());
        }
        // Short read: fall back to /proc/PID/mem for the rest.
        let mut done = 0usize;
        for r in ranges {
            if done + r.len <= n {
                done += r.len;
                continue;
            }
            let skip = n.saturating_sub(done);
            mem.read_exact_at(&mut out[done + skip..done + r.len], r.addr + skip as u64)
                .map_err(|e| err(r.addr, e))?;
            done += r.len;
        }
        return Ok(());
    }
    let mut off = 0usize;
    for r in ranges {
        mem.read_exact_at(&mut out[off..off + r.len], r.addr)
            .map_err(|e| err(r.addr, e))?;
        off += r.len;
    }
    Ok(())
}

/// The areas of a process without their contents (pages left empty): what
/// live migration sends as the final layout, its pages having gone ahead.
/// Guard regions are read from pagemap as in [`dump`].
/// The areas of `maps` without their pages, with their guard regions:
/// those of an identical area in `earlier` (sorted by address; an earlier
/// layout of the same process) are taken from it, the others are scanned.
pub fn layout(pid: i32, maps: &[MapEntry], earlier: &[Vma]) -> Result<Vec<Vma>, CheckpointError> {
    let mut pagemap = Pagemap::open(pid)?;
    let mut regions = Vec::new();
    let mut vmas = Vec::with_capacity(maps.len());
    for m in maps {
        let mut vma = Vma {
            start: m.start,
            end: m.end,
            prot: m.perms.prot() as u32,
            shared: m.perms.shared,
            kind: kind_of(m),
            advice: advice(m),
            pages: Vec::new(),
            guards: Vec::new(),
        };
        let i = earlier.partition_point(|e| e.start < m.start);
        let same = earlier.get(i).filter(|e| {
            (e.end, e.prot, e.shared, &e.kind, &e.advice)
                == (vma.end, vma.prot, vma.shared, &vma.kind, &vma.advice)
        });
        if let Some(e) = same {
            vma.guards = e.guards.clone();
        } else if !matches!(vma.kind, VmaKind::Vsyscall) {
            // Guard markers only: the page tables are walked by the kernel,
            // which matters in a frozen phase (a per-page read of a 4 GiB
            // area took tens of milliseconds).
            regions.clear();
            pagemap.scan(m.start, m.end, &GUARDS, &mut regions)?;
            vma.guards = regions
                .iter()
                .map(|r| (r.start, (r.end - r.start) / PAGE))
                .collect();
        }
        vmas.push(vma);
    }
    Ok(vmas)
}

/// `PAGEMAP_SCAN` masks for guard regions (MADV_GUARD_INSTALL).
const GUARDS: ScanMasks = ScanMasks {
    flags: 0,
    category_mask: 0,
    category_anyof_mask: uffd::PAGE_IS_GUARD,
    category_inverted: 0,
    return_mask: uffd::PAGE_IS_GUARD,
    max_pages: 0,
};

/// `PAGEMAP_SCAN` masks that find the pages [`wanted`] keeps in an area of
/// this kind, with the categories [`wanted_region`] decides on; `None` when
/// the area never has any.
pub fn wanted_scan(kind: &VmaKind, shared: bool) -> Option<ScanMasks> {
    match kind {
        VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall => None,
        VmaKind::File { .. } if shared => None,
        // Asking whether pages are file pages makes the kernel look at each
        // page's struct page: several times slower, so only where it counts.
        VmaKind::File { .. } => Some(ScanMasks {
            category_anyof_mask: uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED,
            return_mask: uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED | uffd::PAGE_IS_FILE,
            ..ScanMasks::default()
        }),
        _ => Some(ScanMasks {
            category_anyof_mask: uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED,
            return_mask: uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED,
            ..ScanMasks::default()
        }),
    }
}

/// [`wanted`] for a region found with [`wanted_scan`]'s masks.
pub fn wanted_region(kind: &VmaKind, categories: u64) -> bool {
    match kind {
        // Private file pages: only those copied on write (anonymous now).
        VmaKind::File { .. } => {
            categories & uffd::PAGE_IS_SWAPPED != 0 || categories & uffd::PAGE_IS_FILE == 0
        }
        _ => true,
    }
}

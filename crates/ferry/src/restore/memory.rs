//! Rebuilding the address space: map every area read-write, fill the
//! stored pages with `process_vm_writev` in large batches, then apply the
//! final protections, madvise flags, guard regions and mm fields.

use super::filetable::FileTable;
use super::stub::Stub;
use super::RestoreError;
use crate::image::{ImageDir, PageKind, PageStoreReader, ProcessImage, Vma, VmaKind};
use crate::sys::{self, PrctlMmMap, RemoteRange, IOV_MAX, PAGE_SIZE};
use std::collections::HashMap;

const PAGE: u64 = PAGE_SIZE as u64;
/// Bytes gathered before one process_vm_writev.
const BATCH: usize = 8 << 20;

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub pages_data: u64,
    pub pages_zero: u64,
    pub bytes: u64,
}

const RW: u64 = (libc::PROT_READ | libc::PROT_WRITE) as u64;

pub fn restore(
    st: &mut Stub,
    pages: &dyn PageSource,
    table: &FileTable,
    p: &ProcessImage,
) -> Result<Stats, RestoreError> {
    // Shared memory objects come from ferry's table, so processes of the
    // tree that shared them share them again.
    let mut ids: Vec<u64> = p
        .vmas
        .iter()
        .filter_map(|v| match v.kind {
            VmaKind::Shmem { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let local: Vec<i32> = ids.iter().filter_map(|&id| table.shmem(id)).collect();
    let got = st.receive_fds(&local)?;
    let mut shmem_fds: HashMap<u64, u64> = ids.into_iter().zip(got).collect();
    for v in &p.vmas {
        map_area(st, v, &shmem_fds)?;
    }
    for (_, fd) in shmem_fds.drain() {
        st.call("close", libc::SYS_close, &[fd])?;
    }
    tracing::debug!("areas mapped");
    let stats = fill(st, pages, p)?;
    tracing::debug!("pages written");
    for v in &p.vmas {
        finish_area(st, v)?;
    }
    set_mm(st, p)?;
    Ok(stats)
}

fn map_area(st: &mut Stub, v: &Vma, shmem_fds: &HashMap<u64, u64>) -> Result<(), RestoreError> {
    let len = v.len();
    match &v.kind {
        VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall => {}
        VmaKind::Anon { .. } => {
            let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
            if v.advice.growsdown {
                flags |= libc::MAP_GROWSDOWN;
            }
            st.call(
                "mmap(anon)",
                libc::SYS_mmap,
                &[v.start, len, RW, flags as u64, u64::MAX, 0],
            )?;
        }
        VmaKind::File { path, offset, .. } => {
            st.r.reset_scratch();
            let pathp = st.r.put_cstr(path)?;
            // A shared writable mapping needs a writable descriptor; try
            // read-write first for every shared mapping, since the original
            // may have been mapped read-only from a read-write file.
            let (fd, prot, flags) = if v.shared {
                let fd =
                    st.r.syscall_raw("open", libc::SYS_open, &[pathp, libc::O_RDWR as u64, 0])?
                        .0;
                let fd = if fd < 0 {
                    st.call("open", libc::SYS_open, &[pathp, libc::O_RDONLY as u64, 0])?
                } else {
                    fd as u64
                };
                (fd, v.prot as u64, libc::MAP_SHARED)
            } else {
                let fd = st.call("open", libc::SYS_open, &[pathp, libc::O_RDONLY as u64, 0])?;
                (fd, RW, libc::MAP_PRIVATE)
            };
            let r = st.r.syscall_raw(
                "mmap(file)",
                libc::SYS_mmap,
                &[
                    v.start,
                    len,
                    prot,
                    (flags | libc::MAP_FIXED) as u64,
                    fd,
                    *offset,
                ],
            )?;
            st.call("close", libc::SYS_close, &[fd])?;
            if r.0 < 0 {
                return Err(RestoreError::Step {
                    pid: st.pid,
                    what: format!("mapping of {path} at {:#x}", v.start),
                    why: std::io::Error::from_raw_os_error(-r.0 as i32).to_string(),
                });
            }
        }
        VmaKind::Shmem { id, offset, .. } => {
            let fd = *shmem_fds.get(id).ok_or_else(|| RestoreError::Step {
                pid: st.pid,
                what: format!("shared memory at {:#x}", v.start),
                why: "object missing from the file table".into(),
            })?;
            st.call(
                "mmap(shmem)",
                libc::SYS_mmap,
                &[
                    v.start,
                    len,
                    RW,
                    (libc::MAP_SHARED | libc::MAP_FIXED) as u64,
                    fd,
                    *offset,
                ],
            )?;
        }
    }
    Ok(())
}

/// Receives pieces of a run: (offset within the run, bytes).
pub type PageSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), RestoreError> + 'a;

/// Where restore reads page contents from: an image's page stores on
/// disk, or pages received over the wire and held in memory.
pub trait PageSource {
    /// Copies the run recorded at `offset` (with `crc`) for process `p`
    /// into `buf`, whose length is the run's.
    fn read(
        &self,
        p: &ProcessImage,
        offset: u64,
        crc: u32,
        buf: &mut [u8],
    ) -> Result<(), RestoreError>;
    /// Streams a long run of `len` bytes through `chunk`, handing each piece
    /// and its offset within the run to `sink`; a source with checksums
    /// checks the whole run at the end.
    fn read_chunked(
        &self,
        p: &ProcessImage,
        offset: u64,
        len: u64,
        crc: u32,
        chunk: &mut [u8],
        sink: &mut PageSink<'_>,
    ) -> Result<(), RestoreError>;
}

/// The page stores of an image directory.
pub struct DiskPages<'a> {
    img: &'a ImageDir,
    open: std::cell::RefCell<Option<(i32, PageStoreReader)>>,
}

impl<'a> DiskPages<'a> {
    pub fn new(img: &'a ImageDir) -> Self {
        Self {
            img,
            open: std::cell::RefCell::new(None),
        }
    }

    fn with_store<T>(
        &self,
        p: &ProcessImage,
        f: impl FnOnce(&PageStoreReader) -> Result<T, RestoreError>,
    ) -> Result<T, RestoreError> {
        let mut open = self.open.borrow_mut();
        if open.as_ref().is_none_or(|(pid, _)| *pid != p.pid) {
            *open = Some((p.pid, PageStoreReader::open(&self.img.path(&p.pages_file))?));
        }
        match open.as_ref() {
            Some((_, store)) => f(store),
            None => unreachable!("opened above"),
        }
    }
}

impl PageSource for DiskPages<'_> {
    fn read(
        &self,
        p: &ProcessImage,
        offset: u64,
        crc: u32,
        buf: &mut [u8],
    ) -> Result<(), RestoreError> {
        self.with_store(p, |s| Ok(s.read_run(offset, crc, buf)?))
    }

    fn read_chunked(
        &self,
        p: &ProcessImage,
        offset: u64,
        len: u64,
        crc: u32,
        chunk: &mut [u8],
        sink: &mut PageSink<'_>,
    ) -> Result<(), RestoreError> {
        self.with_store(p, |s| {
            s.read_run_chunked(offset, len, crc, chunk, |at, piece| sink(at, piece))
        })
    }
}

/// Writes every stored page into the stub.
fn fill(st: &mut Stub, pages: &dyn PageSource, p: &ProcessImage) -> Result<Stats, RestoreError> {
    let mut stats = Stats::default();
    let mut buf: Vec<u8> = Vec::with_capacity(BATCH);
    let mut ranges: Vec<RemoteRange> = Vec::with_capacity(IOV_MAX);
    let zero_page = vec![0u8; PAGE_SIZE];
    let mut chunk = vec![0u8; BATCH];
    for v in &p.vmas {
        // Pages never stored read as zero in fresh anonymous memory; in a
        // private file mapping they must be written, the file differs.
        let zeros_matter = matches!(v.kind, VmaKind::File { .. });
        for run in &v.pages {
            let len = run.npages as usize * PAGE_SIZE;
            match run.kind {
                PageKind::Zero => {
                    stats.pages_zero += run.npages as u64;
                    if !zeros_matter {
                        continue;
                    }
                    for k in 0..run.npages as u64 {
                        push(st, &mut buf, &mut ranges, run.addr + k * PAGE, &zero_page)?;
                    }
                }
                PageKind::Data { offset, crc } => {
                    stats.pages_data += run.npages as u64;
                    stats.bytes += len as u64;
                    if len <= BATCH {
                        if buf.len() + len > BATCH || ranges.len() == IOV_MAX {
                            flush(st, &mut buf, &mut ranges)?;
                        }
                        let at = buf.len();
                        buf.resize(at + len, 0);
                        pages.read(p, offset, crc, &mut buf[at..])?;
                        ranges.push(RemoteRange {
                            addr: run.addr,
                            len,
                        });
                        continue;
                    }
                    // A long run streams through the chunk buffer; its CRC is
                    // checked at the end, and a mismatch aborts the restore
                    // (the stub is killed), so nothing wrong ever runs.
                    flush(st, &mut buf, &mut ranges)?;
                    pages.read_chunked(
                        p,
                        offset,
                        len as u64,
                        crc,
                        &mut chunk,
                        &mut |at, piece| write_all(st, run.addr + at, piece),
                    )?;
                }
            }
        }
    }
    flush(st, &mut buf, &mut ranges)?;
    Ok(stats)
}

fn push(
    st: &Stub,
    buf: &mut Vec<u8>,
    ranges: &mut Vec<RemoteRange>,
    addr: u64,
    data: &[u8],
) -> Result<(), RestoreError> {
    if buf.len() + data.len() > BATCH || ranges.len() == IOV_MAX {
        flush(st, buf, ranges)?;
    }
    buf.extend_from_slice(data);
    match ranges.last_mut() {
        Some(r) if r.addr + r.len as u64 == addr => r.len += data.len(),
        _ => ranges.push(RemoteRange {
            addr,
            len: data.len(),
        }),
    }
    Ok(())
}

/// Writes one contiguous piece of memory into the stub.
fn write_all(st: &Stub, addr: u64, data: &[u8]) -> Result<(), RestoreError> {
    let n = sys::process_vm_writev(
        st.pid,
        data,
        &[RemoteRange {
            addr,
            len: data.len(),
        }],
    );
    match n {
        Ok(n) if n == data.len() => Ok(()),
        Ok(n) => Err(RestoreError::Step {
            pid: st.pid,
            what: format!("memory at {addr:#x}"),
            why: format!("short write: {n} of {} bytes", data.len()),
        }),
        Err(e) => Err(RestoreError::Step {
            pid: st.pid,
            what: format!("memory at {addr:#x}"),
            why: e.to_string(),
        }),
    }
}

fn flush(st: &Stub, buf: &mut Vec<u8>, ranges: &mut Vec<RemoteRange>) -> Result<(), RestoreError> {
    if ranges.is_empty() {
        return Ok(());
    }
    let n = sys::process_vm_writev(st.pid, buf, ranges).map_err(|e| RestoreError::Step {
        pid: st.pid,
        what: format!("memory at {:#x}", ranges[0].addr),
        why: e.to_string(),
    })?;
    if n != buf.len() {
        return Err(RestoreError::Step {
            pid: st.pid,
            what: format!("memory at {:#x}", ranges[0].addr),
            why: format!("short write: {n} of {} bytes", buf.len()),
        });
    }
    buf.clear();
    ranges.clear();
    Ok(())
}

/// Final protection, advice and guard regions of one area.
fn finish_area(st: &mut Stub, v: &Vma) -> Result<(), RestoreError> {
    if matches!(
        v.kind,
        VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall
    ) {
        return Ok(());
    }
    let len = v.len();
    let shared_file = v.shared && matches!(v.kind, VmaKind::File { .. });
    if v.prot as u64 != RW && !shared_file {
        st.call(
            "mprotect",
            libc::SYS_mprotect,
            &[v.start, len, v.prot as u64],
        )?;
    }
    let a = v.advice;
    let advice = [
        (a.dontfork, libc::MADV_DONTFORK),
        (a.wipeonfork, libc::MADV_WIPEONFORK),
        (a.dontdump, libc::MADV_DONTDUMP),
        (a.hugepage, libc::MADV_HUGEPAGE),
        (a.nohugepage, libc::MADV_NOHUGEPAGE),
        (a.mergeable, libc::MADV_MERGEABLE),
    ];
    for (on, adv) in advice {
        if on {
            let r =
                st.r.syscall_raw("madvise", libc::SYS_madvise, &[v.start, len, adv as u64])?;
            if r.0 < 0 {
                tracing::warn!(
                    addr = v.start,
                    advice = adv,
                    "madvise failed: errno {}",
                    -r.0
                );
            }
        }
    }
    for &(addr, n) in &v.guards {
        st.call(
            "madvise(GUARD_INSTALL)",
            libc::SYS_madvise,
            &[addr, n * PAGE, sys::MADV_GUARD_INSTALL],
        )?;
    }
    if a.locked {
        let r =
            st.r.syscall_raw("mlock", libc::SYS_mlock, &[v.start, len])?;
        if r.0 < 0 {
            tracing::warn!(addr = v.start, "mlock failed: errno {}", -r.0);
        }
    }
    Ok(())
}

/// mm fields, auxv and /proc/PID/exe through one PR_SET_MM_MAP.
fn set_mm(st: &mut Stub, p: &ProcessImage) -> Result<(), RestoreError> {
    st.r.reset_scratch();
    let exe = st.r.put_cstr(&p.exe)?;
    let exe_fd = st.call(
        "open(exe)",
        libc::SYS_open,
        &[exe, libc::O_RDONLY as u64, 0],
    )?;
    let auxv = st.r.put(&p.auxv)?;
    let m = &p.mm;
    let map = PrctlMmMap {
        start_code: m.start_code,
        end_code: m.end_code,
        start_data: m.start_data,
        end_data: m.end_data,
        start_brk: m.start_brk,
        brk: m.brk,
        start_stack: m.start_stack,
        arg_start: m.arg_start,
        arg_end: m.arg_end,
        env_start: m.env_start,
        env_end: m.env_end,
        auxv,
        auxv_size: p.auxv.len() as u32,
        exe_fd: exe_fd as u32,
    };
    let mapp = st.r.put(sys::pod_bytes(&map))?;
    let r = st.r.syscall_raw(
        "prctl(PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[
            sys::PR_SET_MM,
            sys::PR_SET_MM_MAP,
            mapp,
            std::mem::size_of::<PrctlMmMap>() as u64,
        ],
    )?;
    st.call("close", libc::SYS_close, &[exe_fd])?;
    if r.0 < 0 {
        return Err(RestoreError::Step {
            pid: st.pid,
            what: "the mm fields (PR_SET_MM_MAP)".into(),
            why: std::io::Error::from_raw_os_error(-r.0 as i32).to_string(),
        });
    }
    Ok(())
}

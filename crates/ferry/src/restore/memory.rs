//! Rebuilding the address space: map every area read-write, fill the
//! stored pages, then apply the final protections, madvise flags, guard
//! regions and mm fields.
//!
//! Filling: private anonymous areas (nearly all of a job's memory) are
//! filled with `UFFDIO_COPY` through a userfaultfd made inside the stub by
//! a remote syscall, taken with `pidfd_getfd` and closed there again. The
//! kernel then allocates each page and copies into it in one step; with
//! `process_vm_writev` it first zeroes the fresh page on the fault, then
//! copies, which made restore spend most of its time clearing memory. The
//! runs go through a small reused buffer (read, CRC and copy stay in the
//! CPU cache). Everything else (file and shared mappings, zero pages of
//! private file mappings), and every area when no userfaultfd can be had
//! (or `FERRY_RESTORE_NO_UFFD` is set in the environment), is written with
//! `process_vm_writev` in large batches.

use super::filetable::FileTable;
use super::stub::Stub;
use super::RestoreError;
use crate::image::{ImageDir, PageKind, PageStoreReader, ProcessImage, Vma, VmaKind};
use crate::sys::{self, uffd, PrctlMmMap, RemoteRange, IOV_MAX, PAGE_SIZE};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

const PAGE: u64 = PAGE_SIZE as u64;
/// Bytes gathered before one process_vm_writev.
const BATCH: usize = 8 << 20;
/// Bytes read from a page source per `UFFDIO_COPY` (fits in L2, so the
/// read, its CRC and the copy into the stub hit the cache).
const UFFD_CHUNK: usize = 256 << 10;
/// Below this much private anonymous data the userfaultfd's setup (two
/// remote syscalls and a few ioctls) costs more than it saves.
const UFFD_MIN_BYTES: u64 = 4 << 20;
/// Set in the environment to fill every area with `process_vm_writev`.
pub const NO_UFFD_ENV: &str = "FERRY_RESTORE_NO_UFFD";

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
    // A file mapped in several areas (a library's text, data, bss...) is
    // opened once for all of them: the areas of one file follow each other.
    // The executable's descriptor is kept for PR_SET_MM_MAP.
    let mut files = Files {
        open: None,
        exe: &p.exe,
        exe_fd: None,
    };
    for v in &p.vmas {
        map_area(st, v, &shmem_fds, &mut files)?;
    }
    files.close_open(st)?;
    let exe_fd = files.exe_fd;
    for (_, fd) in shmem_fds.drain() {
        st.call("close", libc::SYS_close, &[fd])?;
    }
    tracing::debug!("areas mapped");
    let stats = fill(st, pages, p)?;
    tracing::debug!("pages written");
    for v in &p.vmas {
        finish_area(st, v)?;
    }
    set_mm(st, p, exe_fd)?;
    Ok(stats)
}

/// A descriptor the stub holds on a mapped file, kept for the next area.
struct OpenFile {
    path: String,
    shared: bool,
    fd: u64,
}

/// Descriptors of mapped files in the stub while the areas are mapped.
struct Files<'a> {
    open: Option<OpenFile>,
    /// The image's executable, and a read-only descriptor of it once seen.
    exe: &'a str,
    exe_fd: Option<u64>,
}

impl Files<'_> {
    /// Closes the open descriptor, or keeps it if it is the executable's.
    fn close_open(&mut self, st: &mut Stub) -> Result<(), RestoreError> {
        if let Some(f) = self.open.take() {
            if self.exe_fd.is_none() && !f.shared && f.path == self.exe {
                self.exe_fd = Some(f.fd);
            } else {
                st.call("close", libc::SYS_close, &[f.fd])?;
            }
        }
        Ok(())
    }

    /// A descriptor for `path` in the stub: the one already open if it
    /// fits, else a new one (read-write first for shared mappings, since
    /// the original may have been mapped read-only from a read-write file).
    fn fd(&mut self, st: &mut Stub, path: &str, shared: bool) -> Result<u64, RestoreError> {
        if let Some(f) = self.open.as_ref() {
            if f.path == path && f.shared == shared {
                return Ok(f.fd);
            }
        }
        if !shared && path == self.exe {
            if let Some(fd) = self.exe_fd {
                return Ok(fd);
            }
        }
        self.close_open(st)?;
        st.r.reset_scratch();
        let pathp = st.r.put_cstr(path)?;
        let fd = if shared {
            let fd =
                st.r.syscall_raw("open", libc::SYS_open, &[pathp, libc::O_RDWR as u64, 0])?
                    .0;
            if fd < 0 {
                st.call("open", libc::SYS_open, &[pathp, libc::O_RDONLY as u64, 0])?
            } else {
                fd as u64
            }
        } else {
            st.call("open", libc::SYS_open, &[pathp, libc::O_RDONLY as u64, 0])?
        };
        self.open = Some(OpenFile {
            path: path.to_string(),
            shared,
            fd,
        });
        Ok(fd)
    }
}

/// Areas without stored pages get their final protection when mapped (no
/// `mprotect` afterwards); the others are mapped read-write to be filled.
fn map_prot(v: &Vma) -> u64 {
    if v.pages.is_empty() {
        v.prot as u64
    } else {
        RW
    }
}

fn map_area(
    st: &mut Stub,
    v: &Vma,
    shmem_fds: &HashMap<u64, u64>,
    files: &mut Files<'_>,
) -> Result<(), RestoreError> {
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
                &[v.start, len, map_prot(v), flags as u64, u64::MAX, 0],
            )?;
        }
        VmaKind::File { path, offset, .. } => {
            // A shared writable mapping needs a writable descriptor.
            let fd = files.fd(st, path, v.shared)?;
            let (prot, flags) = if v.shared {
                (v.prot as u64, libc::MAP_SHARED)
            } else {
                (map_prot(v), libc::MAP_PRIVATE)
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
                    map_prot(v),
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

/// A userfaultfd on the stub's mm, held only by ferry, with the areas
/// registered on it in MISSING mode.
struct Filler {
    fd: OwnedFd,
    registered: Vec<(u64, u64)>,
}

impl Filler {
    /// Makes the userfaultfd in the stub; None (the caller falls back to
    /// `process_vm_writev`) when the kernel or the stub's privileges refuse.
    fn open(st: &mut Stub) -> Result<Option<Filler>, RestoreError> {
        if std::env::var_os(NO_UFFD_ENV).is_some() {
            return Ok(None);
        }
        let base = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let mut r =
            st.r.syscall_raw("userfaultfd", libc::SYS_userfaultfd, &[base])?
                .0;
        if r < 0 {
            // Only user-mode faults are handled then; UFFDIO_COPY works the
            // same, and the areas are unregistered before the job runs.
            let flags = base | uffd::UFFD_USER_MODE_ONLY as u64;
            r =
                st.r.syscall_raw("userfaultfd", libc::SYS_userfaultfd, &[flags])?
                    .0;
        }
        if r < 0 {
            tracing::debug!(pid = st.pid, errno = -r, "no userfaultfd in the stub");
            return Ok(None);
        }
        let got = sys::pidfd_getfd(&st.pidfd, r as i32);
        st.call("close(userfaultfd)", libc::SYS_close, &[r as u64])?;
        let fd = match got {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(pid = st.pid, "pidfd_getfd of the userfaultfd: {e}");
                return Ok(None);
            }
        };
        match uffd::api(fd.as_fd(), 0) {
            Ok((_, ioctls)) if ioctls & uffd::IOCTL_REGISTER_BIT != 0 => Ok(Some(Filler {
                fd,
                registered: Vec::new(),
            })),
            Ok(_) => Ok(None),
            Err(e) => {
                tracing::debug!(pid = st.pid, "UFFDIO_API: {e}");
                Ok(None)
            }
        }
    }

    /// Registers a private anonymous area holding data; false if it must
    /// be written the other way.
    fn register(&mut self, v: &Vma) -> bool {
        if !matches!(v.kind, VmaKind::Anon { .. }) || v.shared {
            return false;
        }
        if !v
            .pages
            .iter()
            .any(|r| matches!(r.kind, PageKind::Data { .. }))
        {
            return false;
        }
        match uffd::register(
            self.fd.as_fd(),
            v.start,
            v.len(),
            uffd::UFFDIO_REGISTER_MODE_MISSING,
        ) {
            Ok(ioctls) => {
                self.registered.push((v.start, v.len()));
                if ioctls & uffd::IOCTL_COPY_BIT != 0 {
                    return true;
                }
                self.unregister_last();
                false
            }
            Err(e) => {
                tracing::debug!(addr = v.start, "UFFDIO_REGISTER: {e}");
                false
            }
        }
    }

    fn unregister_last(&mut self) {
        if let Some((start, len)) = self.registered.pop() {
            let _ = uffd::unregister(self.fd.as_fd(), start, len);
        }
    }

    /// Fills `[addr, addr + data.len())`, all missing pages of a
    /// registered area. A page that is somehow present already (EEXIST)
    /// is overwritten with `process_vm_writev`.
    fn copy(&self, st: &Stub, addr: u64, data: &[u8]) -> Result<(), RestoreError> {
        let mut done = 0usize;
        let mut retries = 0;
        while done < data.len() {
            let at = addr + done as u64;
            let rest = &data[done..];
            match uffd::copy(self.fd.as_fd(), at, rest, uffd::UFFDIO_COPY_MODE_DONTWAKE) {
                Ok(n) if n > 0 => done += n as usize,
                Ok(_) => {
                    return Err(RestoreError::Step {
                        pid: st.pid,
                        what: format!("memory at {at:#x}"),
                        why: "UFFDIO_COPY copied nothing".into(),
                    })
                }
                Err(e) => {
                    done += e.done as usize;
                    match e.error.raw_os_error() {
                        Some(libc::EAGAIN) if retries < 1000 => retries += 1,
                        Some(libc::EEXIST) => {
                            let at = addr + done as u64;
                            let end = (done + PAGE_SIZE).min(data.len());
                            write_all(st, at, &data[done..end])?;
                            done = end;
                        }
                        _ => {
                            return Err(RestoreError::Step {
                                pid: st.pid,
                                what: format!("memory at {:#x}", addr + done as u64),
                                why: format!("UFFDIO_COPY: {e}"),
                            })
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Unregisters every area; the fd is closed on drop, the stub holds
    /// none, so nothing of it stays with the job.
    fn finish(mut self, st: &Stub) -> Result<(), RestoreError> {
        for (start, len) in self.registered.drain(..) {
            uffd::unregister(self.fd.as_fd(), start, len).map_err(|e| RestoreError::Step {
                pid: st.pid,
                what: format!("memory at {start:#x}"),
                why: format!("UFFDIO_UNREGISTER: {e}"),
            })?;
        }
        Ok(())
    }
}

/// Writes every stored page into the stub.
fn fill(st: &mut Stub, pages: &dyn PageSource, p: &ProcessImage) -> Result<Stats, RestoreError> {
    let anon_data: u64 = p
        .vmas
        .iter()
        .filter(|v| matches!(v.kind, VmaKind::Anon { .. }) && !v.shared)
        .flat_map(|v| &v.pages)
        .filter(|r| matches!(r.kind, PageKind::Data { .. }))
        .map(|r| r.npages as u64 * PAGE)
        .sum();
    let mut filler = if anon_data >= UFFD_MIN_BYTES {
        Filler::open(st)?
    } else {
        None
    };
    let stats = fill_with(st, pages, p, filler.as_mut());
    // Unregister even after a failure: the stub is killed then anyway,
    // but nothing should be left registered in a process that might run.
    let done = match filler {
        Some(f) => f.finish(st),
        None => Ok(()),
    };
    let stats = stats?;
    done?;
    Ok(stats)
}

fn fill_with(
    st: &mut Stub,
    pages: &dyn PageSource,
    p: &ProcessImage,
    mut filler: Option<&mut Filler>,
) -> Result<Stats, RestoreError> {
    let mut stats = Stats::default();
    let mut buf: Vec<u8> = Vec::with_capacity(BATCH);
    let mut ranges: Vec<RemoteRange> = Vec::with_capacity(IOV_MAX);
    let zero_page = vec![0u8; PAGE_SIZE];
    let mut chunk = Vec::new();
    let mut uffd_chunk = Vec::new();
    for v in &p.vmas {
        // Pages never stored read as zero in fresh anonymous memory; in a
        // private file mapping they must be written, the file differs.
        let zeros_matter = matches!(v.kind, VmaKind::File { .. });
        let by_uffd = match filler.as_deref_mut() {
            Some(f) => f.register(v),
            None => false,
        };
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
                    if let (true, Some(f)) = (by_uffd, filler.as_deref()) {
                        if uffd_chunk.is_empty() {
                            uffd_chunk = vec![0u8; UFFD_CHUNK];
                        }
                        // As below, a CRC mismatch found at the end of the
                        // run aborts the restore; the stub never runs.
                        pages.read_chunked(
                            p,
                            offset,
                            len as u64,
                            crc,
                            &mut uffd_chunk,
                            &mut |at, piece| f.copy(st, run.addr + at, piece),
                        )?;
                        continue;
                    }
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
                    if chunk.is_empty() {
                        chunk = vec![0u8; BATCH];
                    }
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
    if v.prot as u64 != map_prot(v) && !shared_file {
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
fn set_mm(st: &mut Stub, p: &ProcessImage, exe_fd: Option<u64>) -> Result<(), RestoreError> {
    st.r.reset_scratch();
    let exe_fd = match exe_fd {
        Some(fd) => fd,
        None => {
            let exe = st.r.put_cstr(&p.exe)?;
            st.call(
                "open(exe)",
                libc::SYS_open,
                &[exe, libc::O_RDONLY as u64, 0],
            )?
        }
    };
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

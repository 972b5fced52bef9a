//! userfaultfd and the `PAGEMAP_SCAN` ioctl of /proc/PID/pagemap.
//!
//! Thin, typed wrappers; every call returns `std::io::Result` with the errno
//! and callers add pid/address context. The structs mirror
//! include/uapi/linux/userfaultfd.h and include/uapi/linux/fs.h of Linux
//! 6.18 (Debian 12's linux-libc-dev 6.1 lacks WP_ASYNC and PAGEMAP_SCAN);
//! their sizes and the ioctl request numbers are checked at compile time and
//! were compared with the values the C headers give on this machine.
//!
//! A userfaultfd binds to the mm of the process that *created* it, so a
//! tracker for another process creates it there with a remote syscall and
//! takes it with `pidfd_getfd` (see `track::uffd_wp`). The ioctls below then
//! act on that process's address space; addresses are the target's.

use super::Pod;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `UFFD_API`: the only API version.
pub const UFFD_API: u64 = 0xaa;
/// `UFFD_USER_MODE_ONLY` flag of `userfaultfd(2)`: only faults from user
/// mode are handled (allowed for unprivileged callers when
/// vm.unprivileged_userfaultfd=0).
pub const UFFD_USER_MODE_ONLY: i32 = 1;

// Features (`uffdio_api.features`).
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

// Registration modes.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

// `uffd_msg.arg.pagefault.flags`.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// The page is in the page cache but not mapped here (MINOR mode).
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

// Per-ioctl modes.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;

// Bits of the `ioctls` masks returned by UFFDIO_API / UFFDIO_REGISTER
// (1 << _UFFDIO_*).
pub const IOCTL_REGISTER_BIT: u64 = 1 << 0x00;
pub const IOCTL_UNREGISTER_BIT: u64 = 1 << 0x01;
pub const IOCTL_WAKE_BIT: u64 = 1 << 0x02;
pub const IOCTL_COPY_BIT: u64 = 1 << 0x03;
pub const IOCTL_ZEROPAGE_BIT: u64 = 1 << 0x04;
pub const IOCTL_MOVE_BIT: u64 = 1 << 0x05;
pub const IOCTL_WRITEPROTECT_BIT: u64 = 1 << 0x06;
pub const IOCTL_CONTINUE_BIT: u64 = 1 << 0x07;
pub const IOCTL_POISON_BIT: u64 = 1 << 0x08;
pub const IOCTL_API_BIT: u64 = 1 << 0x3f;

// PAGEMAP_SCAN flags.
/// Write-protect the pages that match (atomically with reporting them).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with EPERM on a VMA that is not registered for async write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

// PAGEMAP_SCAN page categories.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;
pub const PAGE_IS_GUARD: u64 = 1 << 8;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
// SAFETY: repr(C), u64 fields only.
unsafe impl Pod for UffdioApi {}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);
// SAFETY: repr(C), u64 fields only.
unsafe impl Pod for UffdioRange {}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
// SAFETY: repr(C), u64 fields only.
unsafe impl Pod for UffdioRegister {}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Bytes copied, or a negative errno.
    pub copy: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
// SAFETY: repr(C), integer fields only.
unsafe impl Pod for UffdioCopy {}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    /// Bytes zero-mapped, or a negative errno.
    pub zeropage: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);
// SAFETY: repr(C), integer fields only.
unsafe impl Pod for UffdioZeropage {}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
// SAFETY: repr(C), u64 fields only.
unsafe impl Pod for UffdioWriteprotect {}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioContinue {
    pub range: UffdioRange,
    pub mode: u64,
    /// Bytes mapped, or a negative errno.
    pub mapped: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioContinue>() == 32);
// SAFETY: repr(C), integer fields only.
unsafe impl Pod for UffdioContinue {}

/// `struct pm_scan_arg` (PAGEMAP_SCAN).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    /// Set by the kernel: where the walk stopped.
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}
const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
// SAFETY: repr(C), u64 fields only.
unsafe impl Pod for PmScanArg {}

/// `struct page_region`: `[start, end)` pages sharing `categories`
/// (masked with the scan's `return_mask`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);
// SAFETY: repr(C), u64 fields only.
unsafe impl Pod for PageRegion {}

// ioctl request numbers: _IOC(dir, type, nr, size) from
// include/uapi/asm-generic/ioctl.h.
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}
const fn iowr(ty: u8, nr: u8, size: usize) -> u64 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size)
}
const fn ior(ty: u8, nr: u8, size: usize) -> u64 {
    ioc(IOC_READ, ty, nr, size)
}
const UFFDIO: u8 = 0xaa;
use std::mem::size_of;
pub const UFFDIO_REGISTER: u64 = iowr(UFFDIO, 0x00, size_of::<UffdioRegister>());
pub const UFFDIO_UNREGISTER: u64 = ior(UFFDIO, 0x01, size_of::<UffdioRange>());
pub const UFFDIO_WAKE: u64 = ior(UFFDIO, 0x02, size_of::<UffdioRange>());
pub const UFFDIO_COPY: u64 = iowr(UFFDIO, 0x03, size_of::<UffdioCopy>());
pub const UFFDIO_ZEROPAGE: u64 = iowr(UFFDIO, 0x04, size_of::<UffdioZeropage>());
pub const UFFDIO_WRITEPROTECT: u64 = iowr(UFFDIO, 0x06, size_of::<UffdioWriteprotect>());
pub const UFFDIO_CONTINUE: u64 = iowr(UFFDIO, 0x07, size_of::<UffdioContinue>());
pub const UFFDIO_API: u64 = iowr(UFFDIO, 0x3f, size_of::<UffdioApi>());
pub const PAGEMAP_SCAN: u64 = iowr(b'f', 16, size_of::<PmScanArg>());
// The values the C headers give (printed by a probe on this machine).
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
const _: () = assert!(UFFDIO_CONTINUE == 0xc020_aa07);
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

/// ioctl with a pointer to `arg`; returns the non-negative result.
///
/// # Safety
/// `req` must be a request whose argument is a `T` (its size is encoded in
/// `req`, checked above), and every pointer stored inside `arg` (`vec` of
/// PAGEMAP_SCAN, `src` of UFFDIO_COPY) must be valid for what the kernel
/// does with it during the call.
unsafe fn ioctl_ptr<T: Pod>(fd: BorrowedFd<'_>, req: u64, arg: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `arg` is a live, exclusively borrowed repr(C) struct of the
    // size the request names; embedded pointers are the caller's contract.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as libc::c_long)
    }
}

/// `userfaultfd(flags)` in the calling process (flags: O_CLOEXEC,
/// O_NONBLOCK, UFFD_USER_MODE_ONLY). The fd acts on the caller's own mm.
pub fn userfaultfd(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with an integer argument.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// `UFFDIO_API`: the handshake, once per uffd. Asks for `features`; returns
/// (granted features, supported ioctls). With `features == 0` the kernel
/// reports every feature it supports. EINVAL if one is unknown (the
/// handshake can then be retried with fewer).
pub fn api(uffd: BorrowedFd<'_>, features: u64) -> io::Result<(u64, u64)> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a uffdio_api, which holds no pointers.
    unsafe { ioctl_ptr(uffd, UFFDIO_API, &mut a) }?;
    Ok((a.features, a.ioctls))
}

/// `UFFDIO_REGISTER` of `[start, start+len)` with `mode` (a combination of
/// `UFFDIO_REGISTER_MODE_*`); returns the mask of ioctls usable on it.
pub fn register(uffd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<u64> {
    let mut r = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER takes a uffdio_register, which holds no
    // pointers into our memory (the range is in the uffd's mm).
    unsafe { ioctl_ptr(uffd, UFFDIO_REGISTER, &mut r) }?;
    Ok(r.ioctls)
}

/// `UFFDIO_UNREGISTER` of `[start, start+len)`; also drops write protection
/// (and uffd-wp markers) in the range.
pub fn unregister(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    // SAFETY: a uffdio_range, no pointers into our memory.
    unsafe { ioctl_ptr(uffd, UFFDIO_UNREGISTER, &mut r) }.map(|_| ())
}

/// `UFFDIO_WAKE`: wakes threads blocked on faults in the range.
pub fn wake(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    // SAFETY: a uffdio_range, no pointers into our memory.
    unsafe { ioctl_ptr(uffd, UFFDIO_WAKE, &mut r) }.map(|_| ())
}

/// `UFFDIO_WRITEPROTECT`: sets (`protect`) or clears write protection of the
/// range. `mode_extra` may add `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
pub fn writeprotect(
    uffd: BorrowedFd<'_>,
    start: u64,
    len: u64,
    protect: bool,
    mode_extra: u64,
) -> io::Result<()> {
    let mut w = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        } | mode_extra,
    };
    // SAFETY: a uffdio_writeprotect, no pointers into our memory.
    unsafe { ioctl_ptr(uffd, UFFDIO_WRITEPROTECT, &mut w) }.map(|_| ())
}

/// Failure of a filling ioctl (COPY, ZEROPAGE, CONTINUE) with how much of the
/// range was done before it (EAGAIN: retry the rest; EEXIST: already there).
#[derive(Debug)]
pub struct FillError {
    pub error: io::Error,
    /// Bytes filled before the failure.
    pub done: u64,
}

impl std::fmt::Display for FillError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (after {} bytes)", self.error, self.done)
    }
}

impl std::error::Error for FillError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

fn fill_result(r: io::Result<libc::c_long>, done: i64) -> Result<u64, FillError> {
    match r {
        Ok(_) => Ok(done.max(0) as u64),
        Err(error) => Err(FillError {
            error,
            done: done.max(0) as u64,
        }),
    }
}

/// `UFFDIO_COPY`: atomically fills `[dst, dst+src.len())` of the uffd's mm
/// with `src` (bytes in *our* address space); `mode` takes
/// `UFFDIO_COPY_MODE_*`. Returns the bytes copied.
pub fn copy(uffd: BorrowedFd<'_>, dst: u64, src: &[u8], mode: u64) -> Result<u64, FillError> {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode,
        copy: 0,
    };
    // SAFETY: `c.src` points at `src.len()` initialised bytes borrowed for
    // the call, which the kernel only reads; `dst` is in the uffd's mm.
    let r = unsafe { ioctl_ptr(uffd, UFFDIO_COPY, &mut c) };
    fill_result(r, c.copy)
}

/// `UFFDIO_ZEROPAGE`: maps zero pages in the missing range.
pub fn zeropage(uffd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> Result<u64, FillError> {
    let mut z = UffdioZeropage {
        range: UffdioRange { start, len },
        mode,
        zeropage: 0,
    };
    // SAFETY: a uffdio_zeropage, no pointers into our memory.
    let r = unsafe { ioctl_ptr(uffd, UFFDIO_ZEROPAGE, &mut z) };
    fill_result(r, z.zeropage)
}

/// `UFFDIO_CONTINUE`: maps the page-cache pages already present for a range
/// registered in MINOR mode (shmem, hugetlbfs).
pub fn cont(uffd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> Result<u64, FillError> {
    let mut c = UffdioContinue {
        range: UffdioRange { start, len },
        mode,
        mapped: 0,
    };
    // SAFETY: a uffdio_continue, no pointers into our memory.
    let r = unsafe { ioctl_ptr(uffd, UFFDIO_CONTINUE, &mut c) };
    fill_result(r, c.mapped)
}

/// Where a [`pagemap_scan`] stopped and how many regions it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanResult {
    /// The walk covered `[start, walk_end)`; less than `end` when the output
    /// filled up (or `max_pages` was reached): call again from `walk_end`.
    pub walk_end: u64,
    /// Regions written to `out`.
    pub regions: usize,
}

/// The masks of one `PAGEMAP_SCAN` (see Documentation/admin-guide/mm/pagemap.rst):
/// a page matches when `(categories ^ inverted) & mask == mask` and, if
/// `anyof` is non-zero, `(categories ^ inverted) & anyof != 0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanMasks {
    pub flags: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub category_inverted: u64,
    pub return_mask: u64,
    /// Stop after this many matching pages (0: no limit).
    pub max_pages: u64,
}

/// `PAGEMAP_SCAN` on an open /proc/PID/pagemap over `[start, end)`.
/// Replaces the contents of `out` with the regions found; `out`'s capacity
/// (at least 1; reserve what you need and keep the Vec to reuse it) is the
/// kernel's `vec_len`. With `PM_SCAN_WP_MATCHING` the matching pages are
/// write-protected in the same pass. On an error nothing in `out` is
/// reliable: the kernel may have written and write-protected some regions.
pub fn pagemap_scan(
    pagemap: BorrowedFd<'_>,
    start: u64,
    end: u64,
    masks: &ScanMasks,
    out: &mut Vec<PageRegion>,
) -> io::Result<ScanResult> {
    out.clear();
    if out.capacity() == 0 {
        out.reserve(1);
    }
    let mut a = PmScanArg {
        size: size_of::<PmScanArg>() as u64,
        flags: masks.flags,
        start,
        end,
        walk_end: 0,
        vec: out.as_mut_ptr() as u64,
        vec_len: out.capacity() as u64,
        max_pages: masks.max_pages,
        category_inverted: masks.category_inverted,
        category_mask: masks.category_mask,
        category_anyof_mask: masks.category_anyof_mask,
        return_mask: masks.return_mask,
    };
    // SAFETY: `a.vec` points at `out`'s buffer of `vec_len` (= capacity)
    // PageRegion entries, borrowed mutably for the call; the kernel writes
    // at most that many.
    let n = unsafe { ioctl_ptr(pagemap, PAGEMAP_SCAN, &mut a) }? as usize;
    assert!(n <= out.capacity());
    // SAFETY: the kernel initialised the first `n` (≤ capacity, checked)
    // entries; PageRegion is plain data valid for any bit pattern.
    unsafe { out.set_len(n) };
    Ok(ScanResult {
        walk_end: if a.walk_end == 0 { end } else { a.walk_end },
        regions: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    const PG: u64 = 4096;

    /// A private mapping of our own, unmapped on drop.
    struct Map {
        addr: u64,
        len: u64,
    }

    impl Map {
        fn anon(pages: u64) -> Map {
            Map::new(pages, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
        }

        fn new(pages: u64, flags: i32, fd: i32) -> Map {
            let len = pages * PG;
            // SAFETY: a fresh mapping chosen by the kernel; nothing else
            // refers to that range.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    fd,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "{}", io::Error::last_os_error());
            Map {
                addr: p as u64,
                len,
            }
        }

        fn page(&self, i: u64) -> u64 {
            self.addr + i * PG
        }

        /// Writes one byte; only for pages that cannot block (not
        /// registered in MISSING/MINOR mode, or already filled).
        fn poke(&self, i: u64, v: u8) {
            // SAFETY: the page lies inside our live read-write mapping.
            unsafe { std::ptr::write_volatile((self.page(i) + 7) as *mut u8, v) }
        }

        fn peek(&self, off: u64) -> u8 {
            assert!(off < self.len);
            // SAFETY: inside our live readable mapping; callers check the
            // page is present first when it is registered for missing faults.
            unsafe { std::ptr::read_volatile((self.addr + off) as *const u8) }
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping this value owns.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
        }
    }

    /// A uffd on ourselves, or None (with a note) where the kernel or the
    /// sysctl forbid it.
    fn local_uffd() -> Option<OwnedFd> {
        let base = libc::O_CLOEXEC | libc::O_NONBLOCK;
        match userfaultfd(base).or_else(|_| userfaultfd(base | UFFD_USER_MODE_ONLY)) {
            Ok(fd) => Some(fd),
            Err(e) => {
                eprintln!("skipped: userfaultfd not available: {e}");
                None
            }
        }
    }

    fn pagemap_self() -> std::fs::File {
        std::fs::File::open("/proc/self/pagemap").unwrap()
    }

    fn present(pm: &std::fs::File, addr: u64) -> bool {
        let mut b = [0u8; 8];
        pm.read_exact_at(&mut b, addr / PG * 8).unwrap();
        u64::from_ne_bytes(b) & (1 << 63) != 0
    }

    const HARVEST: ScanMasks = ScanMasks {
        flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        category_mask: PAGE_IS_WRITTEN,
        category_anyof_mask: 0,
        category_inverted: 0,
        return_mask: PAGE_IS_WRITTEN,
        max_pages: 0,
    };

    /// Harvest of `m` as page-index ranges, continuing partial walks.
    fn harvest(pm: &std::fs::File, m: &Map, buf: &mut Vec<PageRegion>) -> Vec<(u64, u64)> {
        let mut got = Vec::new();
        let mut s = m.addr;
        while s < m.addr + m.len {
            let r = pagemap_scan(pm.as_fd(), s, m.addr + m.len, &HARVEST, buf).unwrap();
            assert_eq!(r.regions, buf.len());
            for g in buf.iter() {
                got.push(((g.start - m.addr) / PG, (g.end - m.addr) / PG));
            }
            assert!(r.walk_end > s);
            s = r.walk_end;
        }
        got
    }

    #[test]
    fn api_reports_features_and_ioctls() {
        let Some(u) = local_uffd() else { return };
        let (features, ioctls) = api(u.as_fd(), 0).unwrap();
        assert_ne!(ioctls & IOCTL_REGISTER_BIT, 0);
        assert_ne!(ioctls & IOCTL_UNREGISTER_BIT, 0);
        assert_ne!(ioctls & IOCTL_API_BIT, 0);
        eprintln!("uffd features {features:#x} ioctls {ioctls:#x}");
        // A second handshake is refused.
        assert!(api(u.as_fd(), 0).is_err());
    }

    #[test]
    fn unknown_feature_is_einval_and_retry_works() {
        let Some(u) = local_uffd() else { return };
        let e = api(u.as_fd(), 1 << 40).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        api(u.as_fd(), 0).unwrap();
    }

    #[test]
    fn wp_async_harvest_writeprotect_unregister() {
        let Some(u) = local_uffd() else { return };
        let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        let (got, _) = match api(u.as_fd(), want) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipped: no WP_ASYNC here: {e}");
                return;
            }
        };
        assert_eq!(got & want, want);
        let m = Map::anon(16);
        for i in 0..16 {
            m.poke(i, 1);
        }
        let ioctls = register(u.as_fd(), m.addr, m.len, UFFDIO_REGISTER_MODE_WP).unwrap();
        assert_ne!(ioctls & IOCTL_WRITEPROTECT_BIT, 0);
        let pm = pagemap_self();
        let mut buf = Vec::with_capacity(64);
        assert_eq!(harvest(&pm, &m, &mut buf), vec![(0, 16)]);
        assert_eq!(harvest(&pm, &m, &mut buf), vec![]);
        m.poke(3, 2);
        m.poke(9, 2);
        m.poke(10, 2);
        assert_eq!(harvest(&pm, &m, &mut buf), vec![(3, 4), (9, 11)]);
        // Dropping protection makes every page count as written ...
        writeprotect(u.as_fd(), m.page(4), 2 * PG, false, 0).unwrap();
        assert_eq!(harvest(&pm, &m, &mut buf), vec![(4, 6)]);
        // ... and setting it hides writes made before.
        m.poke(12, 3);
        writeprotect(u.as_fd(), m.addr, m.len, true, 0).unwrap();
        assert_eq!(harvest(&pm, &m, &mut buf), vec![]);
        // A full output buffer ends the walk early; the caller goes on.
        m.poke(1, 4);
        m.poke(5, 4);
        m.poke(14, 4);
        let mut one = Vec::with_capacity(1);
        let r = pagemap_scan(pm.as_fd(), m.addr, m.addr + m.len, &HARVEST, &mut one).unwrap();
        assert_eq!((one[0].start, one[0].end), (m.page(1), m.page(2)));
        // The walk stops where the next region would have started.
        assert!(r.regions == 1 && r.walk_end > m.page(1) && r.walk_end <= m.page(5));
        assert_eq!(harvest(&pm, &m, &mut one), vec![(5, 6), (14, 15)]);
        unregister(u.as_fd(), m.addr, m.len).unwrap();
        let e = pagemap_scan(pm.as_fd(), m.addr, m.addr + m.len, &HARVEST, &mut buf).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn copy_and_zeropage_fill_missing_pages() {
        let Some(u) = local_uffd() else { return };
        api(u.as_fd(), 0).unwrap();
        let m = Map::anon(4);
        let ioctls = register(u.as_fd(), m.addr, m.len, UFFDIO_REGISTER_MODE_MISSING).unwrap();
        assert_ne!(ioctls & IOCTL_COPY_BIT, 0);
        assert_ne!(ioctls & IOCTL_ZEROPAGE_BIT, 0);
        let src: Vec<u8> = (0..2 * PG).map(|i| (i % 251) as u8).collect();
        assert_eq!(copy(u.as_fd(), m.page(0), &src, 0).unwrap(), 2 * PG);
        assert_eq!(zeropage(u.as_fd(), m.page(2), PG, 0).unwrap(), PG);
        // Filling a present page again is EEXIST.
        let e = copy(u.as_fd(), m.page(1), &src[..PG as usize], 0).unwrap_err();
        assert_eq!(e.error.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(e.done, 0);
        let e = zeropage(u.as_fd(), m.page(0), PG, 0).unwrap_err();
        assert_eq!(e.error.raw_os_error(), Some(libc::EEXIST));
        // Touch only pages known to be present: a missing one would block.
        let pm = pagemap_self();
        for i in 0..3 {
            assert!(present(&pm, m.page(i)), "page {i}");
        }
        assert!(!present(&pm, m.page(3)));
        for off in [0, 1, 4095, 4096, 8191] {
            assert_eq!(m.peek(off), (off % 251) as u8);
        }
        assert_eq!(m.peek(2 * PG + 17), 0);
        wake(u.as_fd(), m.addr, m.len).unwrap();
        unregister(u.as_fd(), m.addr, m.len).unwrap();
    }

    #[test]
    fn continue_maps_shmem_page_cache() {
        let Some(u) = local_uffd() else { return };
        let (features, _) = api(u.as_fd(), UFFD_FEATURE_MINOR_SHMEM).unwrap();
        assert_ne!(features & UFFD_FEATURE_MINOR_SHMEM, 0);
        let fd = super::super::memfd_create("uffd-continue").unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(2 * PG).unwrap();
        file.write_all_at(b"hello from the page cache", PG).unwrap();
        let m = Map::new(2, libc::MAP_SHARED, file.as_raw_fd());
        let ioctls = register(u.as_fd(), m.addr, m.len, UFFDIO_REGISTER_MODE_MINOR).unwrap();
        assert_ne!(ioctls & IOCTL_CONTINUE_BIT, 0);
        let pm = pagemap_self();
        assert!(!present(&pm, m.page(1)));
        assert_eq!(cont(u.as_fd(), m.page(1), PG, 0).unwrap(), PG);
        assert!(present(&pm, m.page(1)));
        let got: Vec<u8> = (0..25).map(|i| m.peek(PG + i)).collect();
        assert_eq!(&got, b"hello from the page cache");
        // Page 0 has no page-cache page yet: CONTINUE cannot map it.
        assert!(cont(u.as_fd(), m.page(0), PG, 0).is_err());
        unregister(u.as_fd(), m.addr, m.len).unwrap();
    }

    /// Reads one fault message from a non-blocking uffd, waiting up to 5 s:
    /// (flags, page address).
    fn next_fault(u: &OwnedFd) -> (u64, u64) {
        let mut pfd = [libc::pollfd {
            fd: u.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        assert_eq!(
            super::super::poll(&mut pfd, 5000).unwrap(),
            1,
            "no fault came"
        );
        let mut m = [0u8; 32];
        let mut f = std::fs::File::from(u.try_clone().unwrap());
        use std::io::Read;
        assert_eq!(f.read(&mut m).unwrap(), 32);
        assert_eq!(m[0], 0x12, "a page fault message");
        let flags = u64::from_ne_bytes(m[8..16].try_into().unwrap());
        let addr = u64::from_ne_bytes(m[16..24].try_into().unwrap());
        (flags, addr & !(PG - 1))
    }

    /// What post-copy of shared memory relies on (KERNEL.md §4): a shmem
    /// area registered MISSING|MINOR faults MISSING on a hole and MINOR on a
    /// page that is in the page cache but not mapped in this area; COPY and
    /// ZEROPAGE fill holes (and the page cache), CONTINUE maps cached pages
    /// and fails with EFAULT on a hole; a second mapping of the same object
    /// sees a page placed through the first one as MINOR.
    #[test]
    fn shmem_missing_and_minor_faults() {
        let Some(u) = local_uffd() else { return };
        let want = UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_MISSING_SHMEM;
        let (features, _) = api(u.as_fd(), want).unwrap();
        assert_eq!(features & want, want);
        let fd = super::super::memfd_create("uffd-minor-missing").unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(8 * PG).unwrap();
        let a = Map::new(8, libc::MAP_SHARED, file.as_raw_fd());
        let b = Map::new(8, libc::MAP_SHARED, file.as_raw_fd());
        let mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR;
        for m in [&a, &b] {
            let ioctls = register(u.as_fd(), m.addr, m.len, mode).unwrap();
            for bit in [IOCTL_COPY_BIT, IOCTL_ZEROPAGE_BIT, IOCTL_CONTINUE_BIT] {
                assert_ne!(ioctls & bit, 0, "ioctls {ioctls:#x}");
            }
        }
        let pm = pagemap_self();
        let page: Vec<u8> = (0..PG).map(|i| (i % 253) as u8).collect();
        let mut got = vec![0u8; PG as usize];
        // A hole: COPY fills the page cache and maps it in `a` only.
        copy(u.as_fd(), a.page(0), &page, 0).unwrap();
        file.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, page);
        assert!(present(&pm, a.page(0)) && !present(&pm, b.page(0)));
        // In the cache now: COPY through the other view is EEXIST, CONTINUE maps it.
        let e = copy(u.as_fd(), b.page(0), &page, 0).unwrap_err();
        assert_eq!(e.error.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(cont(u.as_fd(), b.page(0), PG, 0).unwrap(), PG);
        assert_eq!(b.peek(PG - 1), ((PG - 1) % 253) as u8);
        let e = cont(u.as_fd(), b.page(0), PG, 0).unwrap_err();
        assert_eq!(e.error.raw_os_error(), Some(libc::EEXIST), "mapped already");
        // CONTINUE on a hole.
        let e = cont(u.as_fd(), a.page(1), PG, 0).unwrap_err();
        assert_eq!(e.error.raw_os_error(), Some(libc::EFAULT), "hole: {e}");
        // ZEROPAGE on a hole allocates a (zeroed) page-cache page.
        assert_eq!(zeropage(u.as_fd(), a.page(1), PG, 0).unwrap(), PG);
        assert_eq!(cont(u.as_fd(), b.page(1), PG, 0).unwrap(), PG);
        assert_eq!(b.peek(PG + 5), 0);
        // A page written into the cache through the file (as the pager
        // does): no fault needed to place it, CONTINUE maps it in both.
        file.write_all_at(&page, 2 * PG).unwrap();
        // Page 3 is still a hole: CONTINUE maps page 2 and stops there. A
        // partial result is reported as EAGAIN whatever stopped it; the
        // rest, retried, gives the reason.
        let e = cont(u.as_fd(), a.page(2), 2 * PG, 0).unwrap_err();
        assert_eq!((e.error.raw_os_error(), e.done), (Some(libc::EAGAIN), PG));
        let e = cont(u.as_fd(), a.page(3), PG, 0).unwrap_err();
        assert_eq!((e.error.raw_os_error(), e.done), (Some(libc::EFAULT), 0));
        assert_eq!(cont(u.as_fd(), b.page(2), PG, 0).unwrap(), PG);
        assert_eq!(a.peek(2 * PG + 9), 9);
        // Real faults: a hole is MISSING, a cached page MINOR; the flags
        // word says which.
        let addr_hole = a.page(4);
        file.write_all_at(&page, 5 * PG).unwrap();
        let (pa, pb) = (a.page(4), b.page(5));
        let t = std::thread::spawn(move || {
            // SAFETY: both pages lie in live shared mappings owned by the
            // test, which outlive this thread (joined below).
            unsafe {
                let x = std::ptr::read_volatile((pa + 3) as *const u8);
                let y = std::ptr::read_volatile((pb + 3) as *const u8);
                (x, y)
            }
        });
        let (flags, addr) = next_fault(&u);
        assert_eq!(addr, addr_hole);
        assert_eq!(
            flags & UFFD_PAGEFAULT_FLAG_MINOR,
            0,
            "a hole faults MISSING"
        );
        copy(u.as_fd(), addr, &page, 0).unwrap();
        let (flags, addr) = next_fault(&u);
        assert_eq!(addr, pb);
        assert_ne!(
            flags & UFFD_PAGEFAULT_FLAG_MINOR,
            0,
            "a cached page faults MINOR"
        );
        // MINOR fault answered by writing the cache again and CONTINUE.
        cont(u.as_fd(), addr, PG, 0).unwrap();
        assert_eq!(t.join().unwrap(), (3, 3));
        // A MISSING fault whose page reached the cache meanwhile (through
        // the file): COPY is EEXIST, CONTINUE maps it and wakes the thread.
        let pc = a.page(6);
        let t = std::thread::spawn(move || {
            // SAFETY: as above.
            unsafe { std::ptr::read_volatile((pc + 4) as *const u8) }
        });
        let (flags, addr) = next_fault(&u);
        assert_eq!((flags & UFFD_PAGEFAULT_FLAG_MINOR, addr), (0, pc));
        file.write_all_at(&page, 6 * PG).unwrap();
        let e = copy(u.as_fd(), pc, &page, 0).unwrap_err();
        assert_eq!(e.error.raw_os_error(), Some(libc::EEXIST));
        cont(u.as_fd(), pc, PG, 0).unwrap();
        assert_eq!(t.join().unwrap(), 4);
        // DONTNEED on a shared mapping drops the mapping, not the data: the
        // next touch faults MINOR.
        // SAFETY: a range of our own live mapping.
        assert_eq!(
            unsafe { libc::madvise(pc as *mut libc::c_void, PG as usize, libc::MADV_DONTNEED) },
            0
        );
        assert!(!present(&pm, pc));
        let t = std::thread::spawn(move || {
            // SAFETY: as above.
            unsafe { std::ptr::read_volatile((pc + 5) as *const u8) }
        });
        let (flags, addr) = next_fault(&u);
        assert_eq!(addr, pc);
        assert_ne!(flags & UFFD_PAGEFAULT_FLAG_MINOR, 0);
        cont(u.as_fd(), pc, PG, 0).unwrap();
        assert_eq!(t.join().unwrap(), 5);
        unregister(u.as_fd(), a.addr, a.len).unwrap();
        unregister(u.as_fd(), b.addr, b.len).unwrap();
    }
}

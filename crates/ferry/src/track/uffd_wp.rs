//! Dirty tracking with userfaultfd write-protect in async mode and
//! `PAGEMAP_SCAN` (KERNEL.md §3).
//!
//! Setup: a userfaultfd is created *inside* the target by a remote
//! `userfaultfd(O_CLOEXEC|O_NONBLOCK)` (it binds to the caller's mm), taken
//! with `pidfd_getfd` and closed in the target, so only ferry holds it.
//! `UFFDIO_API(WP_ASYNC|WP_UNPOPULATED|WP_HUGETLBFS_SHMEM)`; areas are
//! registered in MODE_WP. With WP_ASYNC a write to a protected page never
//! blocks: the kernel just drops the protection, and that is what
//! `PAGEMAP_SCAN` reports as `PAGE_IS_WRITTEN`.
//!
//! Which areas are registered: every area but kernel-provided ones and
//! PROT_NONE ones, read-only ones included (so a W^X flip RO→RW→RO between
//! two harvests is still seen). PROT_NONE areas are usually huge address
//! reservations: arming one would build page tables for all of it (see
//! cost below). Their populated pages are reported once (only those, even
//! under [`NewAreaReport::Whole`]: a new reservation is not read wholly;
//! it is listed in `HarvestStats::reset`); if they become
//! accessible (mprotect) the area shows up changed and is registered then.
//! A PROT_NONE→RW→PROT_NONE flip entirely between two harvests is not seen.
//! An area whose registration is refused is, if writable, reported wholly
//! dirty on every harvest (`untracked_areas`), and if read-only reported
//! once (shared mappings of files opened read-only cannot be written).
//!
//! Harvest of a tracked range: one `PAGEMAP_SCAN` with
//! `WP_MATCHING|CHECK_WPASYNC`, `category_mask = return_mask =
//! PAGE_IS_WRITTEN` (the kernel's fast path), continued from `walk_end`
//! when the output fills up. A range that has lost its registration (mremap
//! moves the VMA without it; munmap + mmap replaces it) fails with EPERM —
//! after the kernel has already reported *and re-protected* the pages
//! before the failure point, with the count lost — so the whole range is
//! reported dirty, registered again and re-armed.
//!
//! Arming a range for the first time is a richer scan (`category_mask =
//! 0`, `return_mask = PRESENT|SWAPPED`) that protects every page and tells,
//! in the same atomic pass, which ones hold data. Facts measured on 6.18
//! that this relies on (they go beyond KERNEL.md §3):
//! - Unpopulated pages of a registered VMA count as WRITTEN, whether the
//!   PTE is none or there is no page table at all. A plain harvest would
//!   therefore report a fresh area wholly, and arming installs uffd-wp
//!   markers everywhere, allocating page tables for the whole range:
//!   8 bytes per 4 KiB page (2 MiB per GiB of area).
//! - After arming, a page that is zapped (MADV_DONTNEED, even of a whole
//!   2 MiB range whose page table is then freed) counts as written again,
//!   so "written then zapped" is reported and reads as zeros.
//! - Markers show as PAGE_IS_SWAPPED (and the swap bit in
//!   /proc/PID/pagemap) while tracking is on; unregistering or closing the
//!   uffd removes them.
//!
//! Known gaps: (1) a PROT_NONE area whose pages were populated before it
//! was first seen and that is replaced by another PROT_NONE mapping at the
//! same place (mmap MAP_FIXED) is not noticed: it was never registered, so
//! no EPERM tells. (2) An `execve` in the tracked process is not detected:
//! the uffd and the pagemap fd keep referring to the old, empty mm, so
//! harvests report nothing for the new program; a caller that may see one
//! should compare /proc/PID/stat's start time and exe, or re-create the
//! tracker. (3) Writes to shared memory by *another* process (its own
//! mapping, `pwrite` to the file) are not reported (KERNEL.md §3).
//!
//! Cost (release build, this machine): see the crate's `track_uffd` test;
//! KERNEL.md §3 gives 0.2–0.5 ms per GiB for an empty harvest and ~1 ms per
//! GiB with 26k dirty pages. The job pays ~1 µs for the first write to each
//! protected page per round.

use super::{push_range, Area, DirtyRange, HarvestStats, NewAreaReport, TrackError, Tracker, PAGE};
use crate::remote::{self, Remote, RemoteError};
use crate::sys::{self, uffd};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

/// Features asked for; WP_HUGETLBFS_SHMEM is dropped on kernels without it.
const WANT: u64 = uffd::UFFD_FEATURE_WP_ASYNC
    | uffd::UFFD_FEATURE_WP_UNPOPULATED
    | uffd::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
/// Features tracking cannot do without.
const NEED: u64 = uffd::UFFD_FEATURE_WP_ASYNC | uffd::UFFD_FEATURE_WP_UNPOPULATED;
/// Regions per PAGEMAP_SCAN call (1.5 MiB of output buffer).
const SCAN_REGIONS: usize = 64 * 1024;

const HARVEST: uffd::ScanMasks = uffd::ScanMasks {
    flags: uffd::PM_SCAN_WP_MATCHING | uffd::PM_SCAN_CHECK_WPASYNC,
    category_mask: uffd::PAGE_IS_WRITTEN,
    category_anyof_mask: 0,
    category_inverted: 0,
    return_mask: uffd::PAGE_IS_WRITTEN,
    max_pages: 0,
};
const ARM: uffd::ScanMasks = uffd::ScanMasks {
    flags: uffd::PM_SCAN_WP_MATCHING | uffd::PM_SCAN_CHECK_WPASYNC,
    category_mask: 0,
    category_anyof_mask: 0,
    category_inverted: 0,
    return_mask: uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED,
    max_pages: 0,
};
/// Populated pages of an area that is not registered (no write protection).
const POPULATED: uffd::ScanMasks = uffd::ScanMasks {
    flags: 0,
    category_mask: 0,
    category_anyof_mask: uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED,
    category_inverted: 0,
    return_mask: uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED,
    max_pages: 0,
};

/// Whether this kernel can do uffd-wp async tracking: a userfaultfd of our
/// own offers WP_ASYNC and WP_UNPOPULATED, and /proc/self/pagemap answers
/// PAGEMAP_SCAN. Touches no other process.
pub fn uffd_wp_available() -> Result<(), TrackError> {
    let unsupported = |why: String| TrackError::Unsupported {
        what: "uffd-wp tracking",
        why,
    };
    let base = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let fd = uffd::userfaultfd(base)
        .or_else(|_| uffd::userfaultfd(base | uffd::UFFD_USER_MODE_ONLY))
        .map_err(|e| unsupported(format!("userfaultfd: {e}")))?;
    let (features, _) =
        uffd::api(fd.as_fd(), 0).map_err(|e| unsupported(format!("UFFDIO_API: {e}")))?;
    if features & NEED != NEED {
        return Err(unsupported(format!(
            "the kernel lacks UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED (features {features:#x})"
        )));
    }
    let pm = File::open("/proc/self/pagemap").map_err(|e| unsupported(format!("pagemap: {e}")))?;
    let mut buf = Vec::with_capacity(1);
    uffd::pagemap_scan(pm.as_fd(), 0, PAGE, &POPULATED, &mut buf)
        .map_err(|e| unsupported(format!("PAGEMAP_SCAN: {e}")))?;
    Ok(())
}

/// The tracking state of a range of the address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Registered by `start`, not armed yet.
    Registered,
    /// Registered and armed: harvested with the fast scan.
    Tracked,
    /// Not registered (PROT_NONE, or registration refused on a read-only
    /// area); its populated pages were reported once.
    Static,
    /// Writable but registration refused: reported wholly every harvest.
    Untracked,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    state: State,
    /// (readable, writable) when the state was decided: a change re-decides.
    prot: (bool, bool),
}

fn push_span(v: &mut Vec<Span>, s: Span) {
    if s.end <= s.start {
        return;
    }
    if let Some(l) = v.last_mut() {
        if l.end == s.start && l.state == s.state && l.prot == s.prot {
            l.end = s.end;
            return;
        }
    }
    v.push(s);
}

/// The kernel objects: the uffd, the target's pagemap, and a reused
/// output buffer.
struct Kernel {
    pid: i32,
    uffd: OwnedFd,
    pagemap: File,
    buf: Vec<uffd::PageRegion>,
    calls: usize,
}

enum ScanError {
    /// The range (or part of it) is not registered any more (EPERM), or the
    /// walk was interrupted (EINTR): what was reported is incomplete.
    Lost(io::Error),
    Fatal(TrackError),
}

impl Kernel {
    fn fatal(&self, op: &'static str, start: u64, end: u64, e: io::Error) -> TrackError {
        if matches!(e.raw_os_error(), Some(libc::ESRCH)) || !sys::pid_exists(self.pid) {
            return TrackError::Gone { pid: self.pid };
        }
        TrackError::Range {
            pid: self.pid,
            op,
            start,
            end,
            source: e,
        }
    }

    /// Runs `masks` over `[start, end)` to the end, calling `each` for
    /// every region.
    fn scan(
        &mut self,
        start: u64,
        end: u64,
        masks: &uffd::ScanMasks,
        mut each: impl FnMut(&uffd::PageRegion),
    ) -> Result<(), ScanError> {
        let mut pos = start;
        while pos < end {
            self.calls += 1;
            match uffd::pagemap_scan(self.pagemap.as_fd(), pos, end, masks, &mut self.buf) {
                Ok(r) => {
                    self.buf.iter().for_each(&mut each);
                    if r.walk_end <= pos {
                        // No progress would loop forever; the kernel always
                        // advances unless the output is empty-sized.
                        let e = io::Error::other("PAGEMAP_SCAN made no progress");
                        return Err(ScanError::Fatal(self.fatal("PAGEMAP_SCAN", pos, end, e)));
                    }
                    pos = r.walk_end;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINTR)) => {
                    return Err(ScanError::Lost(e));
                }
                Err(e) => return Err(ScanError::Fatal(self.fatal("PAGEMAP_SCAN", pos, end, e))),
            }
        }
        Ok(())
    }

    fn register(&mut self, start: u64, end: u64) -> io::Result<()> {
        self.calls += 1;
        uffd::register(
            self.uffd.as_fd(),
            start,
            end - start,
            uffd::UFFDIO_REGISTER_MODE_WP,
        )
        .map(|_| ())
    }
}

/// Dirty-page tracker on userfaultfd write-protect (async) + PAGEMAP_SCAN.
pub struct UffdWpTracker {
    pid: i32,
    k: Option<Kernel>,
    features: u64,
    user_mode_only: bool,
    spans: Vec<Span>,
    next: Vec<Span>,
    harvested: bool,
    new_areas: NewAreaReport,
}

impl UffdWpTracker {
    /// Creates the tracker for `pid` through `tid`, one of its threads that
    /// the calling thread holds in a ptrace stop (the uffd is made by a
    /// remote syscall there; the thread's registers are restored and it
    /// stays stopped). After this the process may run: tracking needs no
    /// ptrace.
    pub fn create(pid: i32, tid: i32) -> Result<Self, TrackError> {
        let remote_err = |source| TrackError::Remote { pid, source };
        let gadget = remote::find_vdso_gadget(pid).map_err(remote_err)?;
        let mut r = Remote::new(tid, gadget).map_err(remote_err)?;
        let made = Self::create_with(pid, &mut r);
        let finished = r.finish().map_err(remote_err);
        let t = made?;
        finished?;
        Ok(t)
    }

    /// Like [`UffdWpTracker::create`] with a [`Remote`] the caller already
    /// drives (its registers are not restored here).
    pub fn create_with(pid: i32, r: &mut Remote) -> Result<Self, TrackError> {
        let remote_err = |source| TrackError::Remote { pid, source };
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let nr = libc::SYS_userfaultfd;
        // With vm.unprivileged_userfaultfd=0 an unprivileged target gets
        // EPERM; UFFD_USER_MODE_ONLY is allowed and WP_ASYNC still records
        // writes made by the kernel on its behalf (KERNEL.md §3).
        let (fd, user_mode_only) = match r.syscall("userfaultfd", nr, &[flags]) {
            Ok(fd) => (fd, false),
            Err(RemoteError::Syscall {
                errno: libc::EPERM, ..
            }) => {
                let f = flags | uffd::UFFD_USER_MODE_ONLY as u64;
                match r.syscall("userfaultfd", nr, &[f]) {
                    Ok(fd) => (fd, true),
                    Err(RemoteError::Syscall { errno, .. }) => {
                        return Err(TrackError::Unsupported {
                            what: "uffd-wp tracking",
                            why: format!(
                                "userfaultfd in process {pid}: {}",
                                io::Error::from_raw_os_error(errno)
                            ),
                        })
                    }
                    Err(e) => return Err(remote_err(e)),
                }
            }
            Err(RemoteError::Syscall { errno, .. })
                if errno == libc::ENOSYS || errno == libc::EINVAL =>
            {
                return Err(TrackError::Unsupported {
                    what: "uffd-wp tracking",
                    why: format!(
                        "userfaultfd in process {pid}: {}",
                        io::Error::from_raw_os_error(errno)
                    ),
                })
            }
            Err(e) => return Err(remote_err(e)),
        };
        let taken = sys::pidfd_open(pid).and_then(|p| sys::pidfd_getfd(&p, fd as i32));
        // Close the target's copy whatever happened, so the job is left as
        // it was and the uffd lives only as long as ferry holds it.
        let closed = r
            .syscall("close", libc::SYS_close, &[fd])
            .map_err(remote_err);
        let uffd_fd = taken.map_err(|source| TrackError::Sys {
            pid,
            op: "pidfd_getfd of the new userfaultfd",
            source,
        })?;
        closed?;
        let mut t = Self::from_uffd(pid, uffd_fd)?;
        t.user_mode_only = user_mode_only;
        Ok(t)
    }

    /// Builds the tracker from a userfaultfd that was created in `pid`'s
    /// mm and has not had its API handshake yet.
    pub fn from_uffd(pid: i32, uffd_fd: OwnedFd) -> Result<Self, TrackError> {
        let unsupported = |why: String| TrackError::Unsupported {
            what: "uffd-wp tracking",
            why,
        };
        let features = match uffd::api(uffd_fd.as_fd(), WANT) {
            Ok((f, _)) => f,
            // Unknown feature: the handshake can be retried with fewer.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                uffd::api(uffd_fd.as_fd(), NEED)
                    .map_err(|e| unsupported(format!("UFFDIO_API(WP_ASYNC|WP_UNPOPULATED): {e}")))?
                    .0
            }
            Err(e) => return Err(unsupported(format!("UFFDIO_API: {e}"))),
        };
        if features & NEED != NEED {
            return Err(unsupported(format!(
                "UFFDIO_API granted features {features:#x}"
            )));
        }
        let path = format!("/proc/{pid}/pagemap");
        let pagemap = File::open(&path).map_err(|source| match source.raw_os_error() {
            Some(libc::ENOENT | libc::ESRCH) => TrackError::Gone { pid },
            _ => TrackError::Sys {
                pid,
                op: "open /proc/PID/pagemap",
                source,
            },
        })?;
        Ok(UffdWpTracker {
            pid,
            k: Some(Kernel {
                pid,
                uffd: uffd_fd,
                pagemap,
                buf: Vec::with_capacity(SCAN_REGIONS),
                calls: 0,
            }),
            features,
            user_mode_only: false,
            spans: Vec::new(),
            next: Vec::new(),
            harvested: false,
            new_areas: NewAreaReport::default(),
        })
    }

    /// The features UFFDIO_API granted.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether the uffd had to be made with UFFD_USER_MODE_ONLY.
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// How areas that appear after the first harvest are reported
    /// (default: [`NewAreaReport::Whole`]).
    pub fn set_new_area_report(&mut self, r: NewAreaReport) {
        self.new_areas = r;
    }

    fn kernel(&mut self) -> Result<&mut Kernel, TrackError> {
        let pid = self.pid;
        self.k.as_mut().ok_or(TrackError::Stopped {
            pid,
            tracker: "uffd-wp",
        })
    }
}

/// Reporting context of one harvest.
struct Round<'a> {
    out: &'a mut Vec<DirtyRange>,
    stats: HarvestStats,
    /// First harvest: report populated pages of everything.
    first: bool,
    policy: NewAreaReport,
}

impl Round<'_> {
    fn whole(&mut self, s: u64, e: u64) {
        push_range(self.out, s, e);
    }

    /// Saves the output position so a failed scan can take its partial
    /// output back.
    fn mark(&self) -> (usize, u64) {
        (self.out.len(), self.out.last().map_or(0, |r| r.npages))
    }

    fn rewind(&mut self, (len, npages): (usize, u64)) {
        self.out.truncate(len);
        if let Some(l) = self.out.last_mut() {
            l.npages = npages;
        }
    }
}

impl Kernel {
    /// Arms a freshly registered range, reporting it as `report` says
    /// (None: not at all). Returns false if the range turned out not to be
    /// registered (it was changed under us), having reported it wholly.
    fn arm(
        &mut self,
        s: u64,
        e: u64,
        report: Option<NewAreaReport>,
        round: &mut Round<'_>,
    ) -> Result<bool, TrackError> {
        let mark = round.mark();
        let populated = report == Some(NewAreaReport::Populated);
        let out = &mut *round.out;
        let r = self.scan(s, e, &ARM, |g| {
            if populated && g.categories != 0 {
                push_range(out, g.start, g.end);
            }
        });
        match r {
            Ok(()) => {
                if report == Some(NewAreaReport::Whole) {
                    round.whole(s, e);
                }
                Ok(true)
            }
            Err(ScanError::Lost(_)) => {
                round.rewind(mark);
                round.whole(s, e);
                Ok(false)
            }
            Err(ScanError::Fatal(e)) => Err(e),
        }
    }

    /// Reports the populated pages of an unregistered range.
    fn populated(&mut self, s: u64, e: u64, round: &mut Round<'_>) -> Result<(), TrackError> {
        let out = &mut *round.out;
        match self.scan(s, e, &POPULATED, |g| push_range(out, g.start, g.end)) {
            Ok(()) => Ok(()),
            Err(ScanError::Lost(err)) => Err(self.fatal("PAGEMAP_SCAN", s, e, err)),
            Err(ScanError::Fatal(e)) => Err(e),
        }
    }

    /// Registers and arms a range seen for the first time; returns its new
    /// state.
    fn new_range(
        &mut self,
        s: u64,
        e: u64,
        area: &Area,
        round: &mut Round<'_>,
    ) -> Result<State, TrackError> {
        let report = if round.first {
            NewAreaReport::Populated
        } else {
            round.stats.new_areas += 1;
            round.stats.reset.push((s, e));
            round.policy
        };
        if area.is_inaccessible() {
            // Often a huge reservation: only its populated pages, whatever
            // the policy (the range is listed in `reset`).
            self.populated(s, e, round)?;
            return Ok(State::Static);
        }
        match self.register(s, e) {
            Ok(()) => {
                if self.arm(s, e, Some(report), round)? {
                    Ok(State::Tracked)
                } else {
                    Ok(State::Untracked)
                }
            }
            Err(err) if area.writable => {
                tracing::debug!(pid = self.pid, "cannot register {s:#x}-{e:#x}: {err}");
                round.stats.untracked_areas += 1;
                round.whole(s, e);
                Ok(State::Untracked)
            }
            Err(err) => {
                tracing::debug!(pid = self.pid, "cannot register {s:#x}-{e:#x}: {err}");
                match report {
                    NewAreaReport::Populated => self.populated(s, e, round)?,
                    NewAreaReport::Whole => round.whole(s, e),
                }
                Ok(State::Static)
            }
        }
    }

    /// Harvests a tracked range; on lost registration reports it wholly
    /// and tracks it again.
    fn tracked(&mut self, s: u64, e: u64, round: &mut Round<'_>) -> Result<State, TrackError> {
        let mark = round.mark();
        let out = &mut *round.out;
        match self.scan(s, e, &HARVEST, |g| push_range(out, g.start, g.end)) {
            Ok(()) => Ok(State::Tracked),
            Err(ScanError::Lost(err)) => {
                tracing::debug!(pid = self.pid, "re-registering {s:#x}-{e:#x}: {err}");
                round.rewind(mark);
                round.whole(s, e);
                round.stats.reregistered += 1;
                if !round.first {
                    round.stats.reset.push((s, e));
                }
                if self.register(s, e).is_err() {
                    round.stats.untracked_areas += 1;
                    return Ok(State::Untracked);
                }
                // Already reported wholly: arm without reporting.
                let armed = self.arm(s, e, None, round)?;
                Ok(if armed {
                    State::Tracked
                } else {
                    State::Untracked
                })
            }
            Err(ScanError::Fatal(e)) => Err(e),
        }
    }
}

impl Tracker for UffdWpTracker {
    fn name(&self) -> &'static str {
        "uffd-wp"
    }

    fn start(&mut self, areas: &[Area]) -> Result<(), TrackError> {
        let k = self.kernel()?;
        let mut spans = Vec::new();
        for a in areas.iter().filter(|a| !a.is_special() && a.end > a.start) {
            let state = if a.is_inaccessible() {
                State::Static
            } else {
                match k.register(a.start, a.end) {
                    Ok(()) => State::Registered,
                    Err(_) if a.writable => State::Untracked,
                    Err(_) => State::Static,
                }
            };
            spans.push(Span {
                start: a.start,
                end: a.end,
                state,
                prot: (a.readable, a.writable),
            });
        }
        spans.sort_by_key(|s| s.start);
        self.spans.clear();
        for s in spans {
            push_span(&mut self.spans, s);
        }
        Ok(())
    }

    fn harvest(
        &mut self,
        areas: &[Area],
        out: &mut Vec<DirtyRange>,
    ) -> Result<HarvestStats, TrackError> {
        let t0 = Instant::now();
        out.clear();
        let first = !self.harvested;
        let policy = self.new_areas;
        let pid = self.pid;
        let k = self.k.as_mut().ok_or(TrackError::Stopped {
            pid,
            tracker: "uffd-wp",
        })?;
        k.calls = 0;
        let mut round = Round {
            out,
            stats: HarvestStats::default(),
            first,
            policy,
        };
        let mut sorted: Vec<&Area> = areas
            .iter()
            .filter(|a| !a.is_special() && a.end > a.start)
            .collect();
        sorted.sort_by_key(|a| a.start);
        let old = &self.spans;
        let next = &mut self.next;
        next.clear();
        for area in sorted {
            round.stats.areas += 1;
            let prot = (area.readable, area.writable);
            // Split the area along the old spans.
            let mut i = old.partition_point(|s| s.end <= area.start);
            let mut pos = area.start;
            while pos < area.end {
                let (piece_end, was) = match old.get(i) {
                    Some(s) if s.start <= pos => (s.end.min(area.end), Some(*s)),
                    Some(s) if s.start < area.end => (s.start, None),
                    _ => (area.end, None),
                };
                let state = match was.map(|s| (s.state, s.prot)) {
                    Some((State::Tracked, _)) => k.tracked(pos, piece_end, &mut round)?,
                    Some((State::Registered, _)) => {
                        let report = if first {
                            NewAreaReport::Populated
                        } else {
                            policy
                        };
                        if k.arm(pos, piece_end, Some(report), &mut round)? {
                            State::Tracked
                        } else if k.register(pos, piece_end).is_ok() {
                            // Changed under us: reported wholly; arm it anew.
                            let armed = k.arm(pos, piece_end, None, &mut round)?;
                            if armed {
                                State::Tracked
                            } else {
                                State::Untracked
                            }
                        } else {
                            State::Untracked
                        }
                    }
                    Some((State::Static, p)) if p == prot && !first => State::Static,
                    Some((State::Untracked, _)) if !first => {
                        round.stats.untracked_areas += 1;
                        round.whole(pos, piece_end);
                        if area.writable {
                            State::Untracked
                        } else {
                            State::Static
                        }
                    }
                    _ => k.new_range(pos, piece_end, area, &mut round)?,
                };
                push_span(
                    next,
                    Span {
                        start: pos,
                        end: piece_end,
                        state,
                        prot,
                    },
                );
                if was.is_some_and(|s| s.end <= piece_end) {
                    i += 1;
                }
                pos = piece_end;
            }
        }
        std::mem::swap(&mut self.spans, &mut self.next);
        self.harvested = true;
        let mut stats = round.stats;
        stats.calls = k.calls;
        stats.ranges = out.len();
        stats.pages = out.iter().map(|r| r.npages).sum();
        stats.elapsed = t0.elapsed();
        Ok(stats)
    }

    fn stop(&mut self) -> Result<(), TrackError> {
        if let Some(k) = self.k.take() {
            for s in &self.spans {
                if matches!(s.state, State::Tracked | State::Registered) {
                    // Best effort: a range may have been unmapped or moved;
                    // closing the uffd below unregisters whatever is left.
                    let _ = uffd::unregister(k.uffd.as_fd(), s.start, s.end - s.start);
                }
            }
            drop(k);
        }
        self.spans.clear();
        Ok(())
    }
}

impl Drop for UffdWpTracker {
    fn drop(&mut self) {
        // Closing the only reference to the uffd unregisters every range
        // and removes the write protection: the job runs on untouched.
        let _ = self.stop();
    }
}

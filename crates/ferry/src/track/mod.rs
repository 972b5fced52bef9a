//! Dirty-page trackers: which pages a running process wrote since the last
//! look, for pre-copy migration.
//!
//! A [`Tracker`] is started on the areas of one process and then harvested
//! repeatedly while the process runs; each harvest returns the pages written
//! since the previous one (the first returns every page that holds data) and
//! re-arms them, so a write after the harvest shows up in the next one.
//! Pages must be *read* after the harvest that reported them: a write that
//! races with the read is then reported again next time.
//!
//! Implementations:
//! - [`UffdWpTracker`] (`uffd-wp`): userfaultfd write-protect in async mode
//!   plus the `PAGEMAP_SCAN` ioctl (KERNEL.md §3). Exact, and cheap: about
//!   0.5 ms per GiB when nothing was written, 1 ms per GiB with 26k dirty
//!   pages. Needs Linux 6.7+.
//! - soft-dirty (`soft-dirty`): not implemented. This kernel is built
//!   without CONFIG_MEM_SOFT_DIRTY (no VMA shows the `sd` flag), so it could
//!   not be tested here, and a soft-dirty harvest (read pagemap, then
//!   `clear_refs` 4) loses writes that land between the two steps unless the
//!   process is frozen for each harvest. [`by_name`] reports which of the
//!   two applies.
//! - [`HashTracker`] (`hash`): works on any kernel: it keeps a 64-bit hash
//!   of every populated page and re-reads and re-hashes all of them on each
//!   harvest (see its docs for the cost).
//!
//! [`auto`] picks the best one available; [`by_name`] serves `--tracker`.
//!
//! A tracker follows one process. Children created by `fork` are not
//! tracked (their VMAs lose the userfaultfd registration); track each
//! process of a tree with its own tracker.

mod hash;
mod uffd_wp;

pub use hash::{page_hash, HashTracker};
pub use uffd_wp::{uffd_wp_available, UffdWpTracker};

use crate::proc::{self, MapEntry, ProcError, Special};
use crate::remote::RemoteError;
use std::io;
use std::time::Duration;

/// Size of the pages trackers report.
pub const PAGE: u64 = crate::sys::PAGE_SIZE as u64;

/// Names accepted by [`by_name`] (the `--tracker` values).
pub const TRACKER_NAMES: &[&str] = &["auto", "uffd-wp", "soft-dirty", "hash"];

/// What backs an area, as far as tracking cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AreaKind {
    /// Private anonymous memory (heap, stacks, `[anon:...]`).
    Anon,
    /// A file mapping (private or shared).
    File,
    /// A shmem object: shared anonymous memory, memfd, SysV segment.
    Shmem,
    /// A kernel-provided mapping (`[vdso]`, `[vvar]`, `[vsyscall]`, ...):
    /// never tracked, never reported; the kernel recreates it.
    Special,
}

/// One memory area (VMA) of the tracked process, as listed by
/// /proc/PID/maps at the time of a harvest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Area {
    /// First address (page-aligned).
    pub start: u64,
    /// One past the last address (page-aligned).
    pub end: u64,
    /// PROT_READ.
    pub readable: bool,
    /// PROT_WRITE.
    pub writable: bool,
    /// MAP_SHARED.
    pub shared: bool,
    pub kind: AreaKind,
}

impl Area {
    /// The area of one maps entry.
    pub fn from_map(m: &MapEntry) -> Area {
        let kind = if m
            .special()
            .is_some_and(|s| !matches!(s, Special::Heap | Special::Stack))
        {
            AreaKind::Special
        } else if m.is_shmem() {
            AreaKind::Shmem
        } else if m.inode != 0 {
            AreaKind::File
        } else {
            AreaKind::Anon
        };
        Area {
            start: m.start,
            end: m.end,
            readable: m.perms.read,
            writable: m.perms.write,
            shared: m.perms.shared,
            kind,
        }
    }

    /// A private read-write anonymous area (for tests and callers that
    /// build area lists themselves).
    pub fn anon(start: u64, end: u64) -> Area {
        Area {
            start,
            end,
            readable: true,
            writable: true,
            shared: false,
            kind: AreaKind::Anon,
        }
    }

    /// Length in pages.
    pub fn pages(&self) -> u64 {
        self.end.saturating_sub(self.start) / PAGE
    }

    /// Whether `addr` lies inside the area.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Kernel-provided areas, which trackers ignore.
    pub fn is_special(&self) -> bool {
        self.kind == AreaKind::Special
    }

    /// Neither readable nor writable (PROT_NONE): the process cannot
    /// touch it without changing its protection first.
    pub fn is_inaccessible(&self) -> bool {
        !self.readable && !self.writable
    }
}

/// The areas of `pid` from /proc/PID/maps (cheap: no page-table walk, unlike
/// smaps), in address order.
pub fn read_areas(pid: i32) -> Result<Vec<Area>, TrackError> {
    Ok(proc::read_maps(pid)?.iter().map(Area::from_map).collect())
}

/// `npages` consecutive dirty pages from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DirtyRange {
    pub start: u64,
    pub npages: u64,
}

impl DirtyRange {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.npages * PAGE
    }
}

/// Appends `[start, end)` to a sorted list, merging with the last range
/// when they touch.
pub(crate) fn push_range(out: &mut Vec<DirtyRange>, start: u64, end: u64) {
    if end <= start {
        return;
    }
    // Fold in every range already reported that this one touches: when
    // arming a piece fails part way, the piece is reported whole after some
    // of its pages were. Output stays sorted and disjoint, as
    // `Tracker::harvest` promises (page batches need increasing addresses).
    let (mut start, mut end) = (start, end);
    while let Some(last) = out.last() {
        if last.end() < start {
            break;
        }
        debug_assert!(last.start <= end, "ranges are reported in address order");
        start = start.min(last.start);
        end = end.max(last.end());
        out.pop();
    }
    out.push(DirtyRange {
        start,
        npages: (end - start) / PAGE,
    });
}

/// What a harvest found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HarvestStats {
    /// Dirty pages reported.
    pub pages: u64,
    /// Ranges reported (after merging neighbours).
    pub ranges: usize,
    /// Areas looked at (special areas excluded).
    pub areas: usize,
    /// Areas (or parts of areas) seen for the first time since the first
    /// harvest: mapped, moved or grown since. Reported as
    /// [`NewAreaReport`] says.
    pub new_areas: usize,
    /// Tracked ranges that had lost their registration (mremap, or an
    /// munmap + mmap at the same place): reported wholly dirty and tracked
    /// again.
    pub reregistered: usize,
    /// Writable areas that cannot be tracked (registration refused, e.g. a
    /// device mapping or memory the job registered with its own
    /// userfaultfd): reported wholly dirty on every harvest.
    pub untracked_areas: usize,
    /// Kernel calls made for the harvest (PAGEMAP_SCAN, register, reads).
    pub calls: usize,
    /// Ranges whose contents were replaced as a whole since the previous
    /// harvest (new, moved and re-registered areas; empty on the first
    /// harvest). A receiver that is sent only the populated pages of such a
    /// range ([`NewAreaReport::Populated`]) must reset the rest of it to the
    /// area's default contents (zeros, or the file).
    pub reset: Vec<(u64, u64)>,
    /// Wall time of the harvest.
    pub elapsed: Duration,
}

/// How pages of an area that appears after the first harvest are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NewAreaReport {
    /// Every page of the area, populated or not (safe whatever the
    /// receiver holds at those addresses; unpopulated pages read as zeros).
    #[default]
    Whole,
    /// Only pages that hold data (present or swapped); the receiver must
    /// reset the rest of [`HarvestStats::reset`] itself.
    Populated,
}

/// A dirty-page tracker for one process.
pub trait Tracker: Send {
    /// `uffd-wp`, `hash`, ...
    fn name(&self) -> &'static str;

    /// Prepares tracking of `areas` (the process may be running or stopped).
    /// Nothing is reported yet: the first [`Tracker::harvest`] returns
    /// every page that holds data.
    fn start(&mut self, areas: &[Area]) -> Result<(), TrackError>;

    /// Replaces `out` with the pages written since the previous harvest
    /// (page-aligned, sorted, merged ranges) and re-arms them. `areas` is
    /// the current list ([`read_areas`]): areas mapped since are reported as
    /// [`NewAreaReport`] says, unmapped ones disappear, moved ones are
    /// reported at their new address and tracked there. Ranges may have
    /// been unmapped by the time they are read: treat a failed read of a
    /// reported range as "gone". A page written and then zapped
    /// (MADV_DONTNEED) is reported and now reads as zeros. After an error
    /// some pages may have been re-armed without being reported: drop the
    /// tracker (or treat everything as dirty) rather than harvest again.
    fn harvest(
        &mut self,
        areas: &[Area],
        out: &mut Vec<DirtyRange>,
    ) -> Result<HarvestStats, TrackError>;

    /// Ends tracking; the process keeps running untouched (no write
    /// protection or registration left behind).
    fn stop(&mut self) -> Result<(), TrackError>;

    /// Tells the tracker which bytes were sent for the page at `addr`.
    /// Trackers that compare contents ([`HashTracker`]) use it as the
    /// reference for the next harvest, which closes the window between
    /// their read during the harvest and the sender's read; the others
    /// ignore it.
    fn note_sent(&mut self, addr: u64, page: &[u8]) {
        let _ = (addr, page);
    }
}

/// Why tracking failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("process {pid}: cannot set up a userfaultfd inside it: {source}")]
    Remote {
        pid: i32,
        #[source]
        source: RemoteError,
    },
    #[error("process {pid}: {op} failed: {source}")]
    Sys {
        pid: i32,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("process {pid}: {op} of {start:#x}-{end:#x} failed: {source}")]
    Range {
        pid: i32,
        op: &'static str,
        start: u64,
        end: u64,
        #[source]
        source: io::Error,
    },
    #[error("process {pid}: reading memory at {addr:#x} failed: {source}")]
    Memory {
        pid: i32,
        addr: u64,
        #[source]
        source: io::Error,
    },
    #[error("{what} is not available: {why}")]
    Unsupported { what: &'static str, why: String },
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("process {pid} is gone")]
    Gone { pid: i32 },
    #[error("process {pid}: the {tracker} tracker was stopped")]
    Stopped { pid: i32, tracker: &'static str },
    #[error("unknown tracker {name:?} (expected one of auto, uffd-wp, soft-dirty, hash)")]
    UnknownName { name: String },
}

impl TrackError {
    /// Whether the failure means "this kind of tracker cannot work here"
    /// (so [`auto`] may fall back to another one).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, TrackError::Unsupported { .. })
    }
}

/// Whether the kernel maintains soft-dirty bits: it then sets the `sd` flag
/// on new VMAs, which shows in smaps (`CONFIG_MEM_SOFT_DIRTY`).
pub fn soft_dirty_available() -> bool {
    std::fs::read_to_string("/proc/self/smaps")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("VmFlags:"))
                .any(|l| l.split_whitespace().any(|f| f == "sd"))
        })
        .unwrap_or(false)
}

fn soft_dirty_unsupported() -> TrackError {
    let why = if soft_dirty_available() {
        "ferry has no soft-dirty tracker yet (use uffd-wp or hash)".to_string()
    } else {
        "this kernel is built without CONFIG_MEM_SOFT_DIRTY".to_string()
    };
    TrackError::Unsupported {
        what: "soft-dirty tracking",
        why,
    }
}

/// The best tracker for `pid`: uffd-wp where the kernel has it, else
/// soft-dirty (not implemented, see the module docs), else hashing.
/// `tid` must be a thread of `pid` in a ptrace stop of the calling thread
/// (e.g. from [`crate::checkpoint::Frozen`]): the uffd-wp tracker creates
/// its userfaultfd inside the process with a remote syscall.
pub fn auto(pid: i32, tid: i32) -> Result<Box<dyn Tracker>, TrackError> {
    match uffd_wp_available() {
        Ok(()) => match UffdWpTracker::create(pid, tid) {
            Ok(t) => return Ok(Box::new(t)),
            Err(e) if e.is_unsupported() => {
                tracing::info!(pid, "uffd-wp tracking unavailable ({e}); trying others");
            }
            Err(e) => return Err(e),
        },
        Err(e) => tracing::info!(pid, "uffd-wp tracking unavailable ({e}); trying others"),
    }
    tracing::info!(pid, "{}", soft_dirty_unsupported());
    Ok(Box::new(HashTracker::new(pid)?))
}

/// The tracker named `name` (`auto`, `uffd-wp`, `soft-dirty`, `hash`), for
/// `--tracker`; `tid` as for [`auto`] (unused by `hash`).
pub fn by_name(name: &str, pid: i32, tid: i32) -> Result<Box<dyn Tracker>, TrackError> {
    match name {
        "auto" => auto(pid, tid),
        "uffd-wp" => Ok(Box::new(UffdWpTracker::create(pid, tid)?)),
        "soft-dirty" => Err(soft_dirty_unsupported()),
        "hash" => Ok(Box::new(HashTracker::new(pid)?)),
        _ => Err(TrackError::UnknownName {
            name: name.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_range_folds_overlaps_into_one_sorted_range() {
        let mut v = Vec::new();
        push_range(&mut v, 0x1000, 0x2000);
        push_range(&mut v, 0x5000, 0x6000);
        push_range(&mut v, 0x8000, 0x9000);
        // A piece reported whole after some of its pages.
        push_range(&mut v, 0x4000, 0xa000);
        push_range(&mut v, 0xa000, 0xb000);
        assert_eq!(
            v,
            vec![
                DirtyRange {
                    start: 0x1000,
                    npages: 1
                },
                DirtyRange {
                    start: 0x4000,
                    npages: 7
                }
            ]
        );
    }

    #[test]
    fn push_range_merges_neighbours() {
        let mut v = Vec::new();
        push_range(&mut v, 0x1000, 0x3000);
        push_range(&mut v, 0x3000, 0x4000);
        push_range(&mut v, 0x6000, 0x7000);
        push_range(&mut v, 0x7000, 0x7000);
        assert_eq!(
            v,
            vec![
                DirtyRange {
                    start: 0x1000,
                    npages: 3
                },
                DirtyRange {
                    start: 0x6000,
                    npages: 1
                }
            ]
        );
        assert_eq!(v[0].end(), 0x4000);
    }

    #[test]
    fn areas_of_self_classify_specials() {
        let areas = read_areas(std::process::id() as i32).unwrap();
        assert!(areas.iter().any(|a| a.kind == AreaKind::Special));
        assert!(areas.iter().any(|a| a.kind == AreaKind::File));
        assert!(areas.iter().any(|a| a.kind == AreaKind::Anon && a.writable));
        assert!(areas.windows(2).all(|w| w[0].end <= w[1].start));
    }

    #[test]
    fn names() {
        let e = by_name("nope", 1, 1).err().unwrap();
        assert!(matches!(e, TrackError::UnknownName { .. }), "{e}");
        let e = by_name("soft-dirty", 1, 1).err().unwrap();
        assert!(e.is_unsupported(), "{e}");
        for n in TRACKER_NAMES {
            assert!(["auto", "uffd-wp", "soft-dirty", "hash"].contains(n));
        }
    }
}

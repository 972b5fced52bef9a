//! What to zero and what to release in a chunk about to go back to glibc.
//!
//! glibc (2.36, x86_64) lays an allocated chunk out as
//!
//! ```text
//!  ptr-16  prev_size   (belongs to the previous chunk when that one is in use)
//!  ptr-8   size | A(4) | M(2) | P(1)          <- our header word
//!  ptr     user data ... malloc_usable_size(ptr) bytes ...
//!          the last 8 usable bytes are the next chunk's prev_size field
//!  ptr+us  next chunk's size field            (not ours)
//! ```
//!
//! `free` then writes, inside what used to be user data: the tcache `next`
//! and `key` words (ptr+0..16) or the bin `fd`/`bk` pointers (ptr+0..16),
//! for large chunks `fd_nextsize`/`bk_nextsize` (ptr+16..32), and, for
//! chunks that go to a bin, the footer (the next chunk's `prev_size`, the
//! last 8 usable bytes). A chunk merged into a free neighbour or the top
//! chunk gets the merged chunk's header wherever that starts.
//!
//! Until the real `free` runs, every usable byte is still the program's, so
//! writing any of them is safe; the layout only decides what is *worth*
//! touching:
//!
//! * the first [`FREE_KEEP`] bytes are never written: glibc overwrites them
//!   anyway, and leaving tcache's `key` word alone keeps glibc's "double
//!   free detected in tcache" check working when a program frees twice;
//! * in `release` mode, a page is only given back if glibc will not write
//!   into it again at once: the range starts at the first page boundary at
//!   or after `ptr + 32` ([`FREE_META`]) and ends at the last page boundary
//!   at or before `ptr + usable - 8` ([`FOOT`]). The bytes on either side
//!   (partial pages) are zeroed instead.

use core::ffi::c_void;
use core::ops::Range;

use crate::init::{Config, Mode};
use crate::stats::{self, Stat};

/// `IS_MMAPPED` bit of glibc's chunk size field: the chunk is its own
/// mapping, which glibc's free unmaps (or, for realloc, mremaps).
pub(crate) const IS_MMAPPED: usize = 0x2;
/// The three flag bits of the size field.
const SIZE_BITS: usize = 0x7;
/// Bytes at the start of a freed chunk that glibc overwrites and we leave.
pub(crate) const FREE_KEEP: usize = 16;
/// Bytes at the start of a freed chunk that glibc may write (fd, bk,
/// fd_nextsize, bk_nextsize): the page holding them is not released.
pub(crate) const FREE_META: usize = 32;
/// Bytes at the start of a realloc tail that glibc may write: the new
/// size's alignment padding (< 24), the remainder chunk's size field and
/// its four list pointers.
pub(crate) const TAIL_META: usize = 64;
/// The next chunk's `prev_size`, the last usable word, written on free.
pub(crate) const FOOT: usize = 8;

/// The chunk header word of a glibc allocation.
///
/// # Safety
/// `ptr` must be a live pointer returned by glibc's malloc family.
#[inline]
pub(crate) unsafe fn header(ptr: *mut c_void) -> usize {
    // SAFETY: for a live glibc chunk the 8 bytes before `ptr` are the
    // chunk's own size field, readable and not written concurrently (only
    // the owner's free/realloc change it). glibc's free reads it first too.
    unsafe { ptr.cast::<usize>().sub(1).read() }
}

/// The usable size implied by a (non-mmapped) header word: an upper bound
/// used to skip small chunks without calling `malloc_usable_size`.
#[inline]
pub(crate) fn usable_from_header(h: usize) -> usize {
    (h & !SIZE_BITS).saturating_sub(FOOT)
}

/// What to do with the byte range `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Zeroed with memset.
    pub(crate) zero_head: Range<usize>,
    /// Whole pages given back with `madvise(MADV_DONTNEED)`.
    pub(crate) release: Range<usize>,
    /// Zeroed with memset.
    pub(crate) zero_tail: Range<usize>,
}

/// The plan for `[start, end)`: `keep` leading bytes are left alone; in
/// release mode the released pages start at or after `start + meta` and end
/// at or before `end - FOOT`.
pub(crate) fn plan(
    mode: Mode,
    start: usize,
    end: usize,
    keep: usize,
    meta: usize,
    page: usize,
) -> Plan {
    let first = start.saturating_add(keep).min(end);
    let all = Plan {
        zero_head: first..end,
        release: 0..0,
        zero_tail: end..end,
    };
    match mode {
        Mode::Off => Plan {
            zero_head: end..end,
            ..all
        },
        Mode::Zero => all,
        Mode::Release => {
            let lo = match start
                .checked_add(meta)
                .and_then(|a| a.checked_add(page - 1))
            {
                Some(a) => a & !(page - 1),
                None => return all,
            };
            let hi = end.saturating_sub(FOOT) & !(page - 1);
            if lo >= hi {
                return all;
            }
            Plan {
                zero_head: first..lo.max(first),
                release: lo..hi,
                zero_tail: hi..end,
            }
        }
    }
}

/// The mode to scrub `len` freed bytes with: `release` falls back to
/// zeroing below `FERRY_ZERO_RELEASE_MIN`.
#[inline]
pub(crate) fn mode_for(cfg: &Config, len: usize) -> Mode {
    if cfg.mode == Mode::Release && len < cfg.release_min {
        Mode::Zero
    } else {
        cfg.mode
    }
}

/// Carries out `plan`, counting what was done.
///
/// # Safety
/// Every byte of the plan's ranges must belong to one allocation the caller
/// owns and is about to give back (nothing else may access it meanwhile).
pub(crate) unsafe fn apply(cfg: &Config, plan: &Plan) {
    let t0 = stats::clock(cfg);
    // SAFETY: zero_head is within the caller's allocation (contract).
    unsafe { zero(cfg, &plan.zero_head) };
    if !plan.release.is_empty() {
        let len = plan.release.end - plan.release.start;
        // SAFETY: a page-aligned range of whole pages inside the caller's
        // allocation; MADV_DONTNEED on private anonymous memory (glibc's
        // heaps) makes it read back as zeros, which is all the program may
        // assume about memory it is freeing. Nothing else references it.
        let rc =
            unsafe { libc::madvise(plan.release.start as *mut c_void, len, libc::MADV_DONTNEED) };
        if rc == 0 {
            stats::add(cfg, Stat::PagesReleased, (len / cfg.page) as u64);
        } else {
            // E.g. EINVAL on mlock()ed memory: zero it instead.
            stats::add(cfg, Stat::MadviseFailures, 1);
            // SAFETY: as for zero_head.
            unsafe { zero(cfg, &plan.release) };
        }
    }
    // SAFETY: zero_tail is within the caller's allocation (contract).
    unsafe { zero(cfg, &plan.zero_tail) };
    stats::add_since(cfg, Stat::ScrubNs, t0);
}

/// # Safety
/// `r` must be writable memory owned by the caller.
unsafe fn zero(cfg: &Config, r: &Range<usize>) {
    if r.is_empty() {
        return;
    }
    let len = r.end - r.start;
    // SAFETY: caller contract.
    unsafe { core::ptr::write_bytes(r.start as *mut u8, 0, len) };
    stats::add(cfg, Stat::BytesZeroed, len as u64);
}

/// Scrubs the glibc chunk at `ptr` (header word `h`, not mmapped, at least
/// `cfg.min` usable bytes) before it is freed.
///
/// # Safety
/// `ptr` must be a live glibc allocation that the caller is freeing.
pub(crate) unsafe fn before_free(cfg: &Config, ptr: *mut c_void) {
    // SAFETY: caller contract.
    let h = unsafe { header(ptr) };
    if h & IS_MMAPPED != 0 {
        // glibc munmaps it: the kernel drops the pages, nothing stale stays.
        stats::add(cfg, Stat::SkippedMmapped, 1);
        return;
    }
    if usable_from_header(h) < cfg.min {
        stats::add(cfg, Stat::SkippedSmall, 1);
        return;
    }
    // SAFETY: live glibc allocation (contract). This is glibc's own answer,
    // checked against the header: it is 0 for a chunk glibc already keeps in
    // a bin (a double free), and then we touch nothing and let glibc's free
    // diagnose it.
    let usable = unsafe { libc::malloc_usable_size(ptr) };
    if usable < cfg.min || usable > usable_from_header(h) {
        stats::add(cfg, Stat::SkippedSmall, 1);
        return;
    }
    let start = ptr as usize;
    let p = plan(
        mode_for(cfg, usable),
        start,
        start + usable,
        FREE_KEEP,
        FREE_META,
        cfg.page,
    );
    // SAFETY: all ranges lie in [ptr, ptr + usable), the caller's chunk.
    unsafe { apply(cfg, &p) };
    stats::add(cfg, Stat::Chunks, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: usize = 4096;

    #[test]
    fn zero_mode_keeps_the_first_16_bytes() {
        let p = plan(Mode::Zero, 0x1010, 0x1010 + 1000, FREE_KEEP, FREE_META, P);
        assert_eq!(p.zero_head, 0x1020..0x1010 + 1000);
        assert!(p.release.is_empty() && p.zero_tail.is_empty());
    }

    #[test]
    fn release_mode_skips_the_metadata_pages() {
        // A chunk starting right at a page boundary: its first page holds
        // the list pointers and is zeroed, not released.
        let start = 0x10_0000;
        let end = start + 4 * P + 0x10;
        let p = plan(Mode::Release, start, end, FREE_KEEP, FREE_META, P);
        assert_eq!(p.zero_head, start + 16..start + P);
        assert_eq!(p.release, start + P..start + 4 * P);
        assert_eq!(p.zero_tail, start + 4 * P..end);

        // Ending exactly on a boundary: the last page holds the footer.
        let end = start + 4 * P;
        let p = plan(Mode::Release, start + 0x10, end, FREE_KEEP, FREE_META, P);
        assert_eq!(p.release, start + P..start + 3 * P);
        assert_eq!(p.zero_tail, start + 3 * P..end);

        // Head metadata just before a boundary pushes the start one page on.
        let s = start + P - 16;
        let p = plan(Mode::Release, s, s + 8 * P, FREE_KEEP, FREE_META, P);
        assert_eq!(p.release.start, start + 2 * P);
        assert_eq!(p.zero_head, s + 16..start + 2 * P);
    }

    #[test]
    fn release_mode_without_whole_pages_zeroes_everything() {
        let p = plan(
            Mode::Release,
            0x1010,
            0x1010 + 5000,
            FREE_KEEP,
            FREE_META,
            P,
        );
        assert_eq!(p.zero_head, 0x1020..0x1010 + 5000);
        assert!(p.release.is_empty() && p.zero_tail.is_empty());
    }

    #[test]
    fn every_byte_is_covered_once() {
        for start in (0x4000..0x4000 + 2 * P).step_by(16) {
            for len in [24, 100, 4088, 4096, 8192, 9000, 65536 + 8] {
                for mode in [Mode::Zero, Mode::Release] {
                    let p = plan(mode, start, start + len, FREE_KEEP, FREE_META, P);
                    assert_eq!(p.zero_head.start, start + FREE_KEEP);
                    if !p.release.is_empty() {
                        assert_eq!(p.zero_head.end, p.release.start);
                        assert_eq!(p.release.start % P, 0);
                        assert_eq!(p.release.end % P, 0);
                        // The largest such range: first boundary >= start + 32,
                        // last boundary <= end - 8.
                        assert!(p.release.start >= start + FREE_META);
                        assert!(p.release.start - (start + FREE_META) < P);
                        assert!(p.release.end + FOOT <= start + len);
                        assert!(start + len - FOOT - p.release.end < P);
                        assert_eq!(p.zero_tail, p.release.end..start + len);
                    } else {
                        assert_eq!(p.zero_head.end, start + len);
                    }
                }
            }
        }
    }

    #[test]
    fn off_does_nothing_and_tiny_ranges_do_not_underflow() {
        let p = plan(Mode::Off, 0x1000, 0x2000, FREE_KEEP, FREE_META, P);
        assert!(p.zero_head.is_empty() && p.release.is_empty() && p.zero_tail.is_empty());
        let p = plan(Mode::Release, 0x1000, 0x1008, FREE_KEEP, FREE_META, P);
        assert!(p.zero_head.is_empty() && p.release.is_empty());
        let p = plan(Mode::Release, usize::MAX - 100, usize::MAX, 0, TAIL_META, P);
        assert!(p.release.is_empty());
    }

    #[test]
    fn header_sizes() {
        assert_eq!(usable_from_header(0x1000 | 1), 0x1000 - 8);
        assert_eq!(usable_from_header(0x20 | 5), 0x18);
        assert_eq!(usable_from_header(0), 0);
    }
}

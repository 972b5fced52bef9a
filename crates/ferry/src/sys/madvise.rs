//! Advice on ferry's own buffers: large, long-lived buffers that would
//! otherwise take one page fault per 4 KiB page as they first fill (in a
//! VM each of those is an expensive exit), e.g. the target's arena of
//! received pages.

use std::io;

/// `MADV_POPULATE_WRITE` (Linux 5.14): fault the range in, writable.
pub const MADV_POPULATE_WRITE: i32 = libc::MADV_POPULATE_WRITE;
const _: () = assert!(MADV_POPULATE_WRITE == 23);

/// The whole pages inside `buf`: (start, len), len 0 if none.
fn inner_pages(buf: &[u8]) -> (usize, usize) {
    let page = super::PAGE_SIZE;
    let start = buf.as_ptr() as usize;
    let first = start.div_ceil(page) * page;
    let end = (start + buf.len()) / page * page;
    (first, end.saturating_sub(first))
}

fn advise(buf: &mut [u8], advice: i32) -> io::Result<()> {
    let (start, len) = inner_pages(buf);
    if len == 0 {
        return Ok(());
    }
    // SAFETY: [start, start+len) lies inside `buf`, which we borrow
    // mutably for the call; the advice used here (populate, huge pages)
    // never changes the contents of the memory or its mapping.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, len, advice) };
    super::cvt_i(r).map(|_| ())
}

/// Faults in every whole page of `buf` now, in one call, instead of one
/// fault per page as it is first written. The contents stay as they are.
pub fn populate_write(buf: &mut [u8]) -> io::Result<()> {
    advise(buf, MADV_POPULATE_WRITE)
}

/// Asks for transparent huge pages behind `buf` (`MADV_HUGEPAGE`); with
/// THP in `madvise` mode this makes a fault fill 2 MiB at once.
pub fn hugepage(buf: &mut [u8]) -> io::Result<()> {
    advise(buf, libc::MADV_HUGEPAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn populate_and_hugepage_keep_contents() {
        let mut v = vec![0u8; 4 << 20];
        v[0] = 1;
        v[(3 << 20) + 5] = 7;
        hugepage(&mut v).unwrap();
        populate_write(&mut v).unwrap();
        assert_eq!((v[0], v[(3 << 20) + 5], v[100]), (1, 7, 0));
        // Less than a page: nothing to do.
        let mut small = [0u8; 100];
        populate_write(&mut small).unwrap();
    }

    #[test]
    fn inner_pages_round_inwards() {
        let v = vec![0u8; 3 * 4096];
        let (s, l) = inner_pages(&v[1..]);
        assert_eq!(s % 4096, 0);
        assert!(s > v.as_ptr() as usize);
        assert!(s + l <= v.as_ptr() as usize + v.len());
        assert_eq!(l % 4096, 0);
    }
}

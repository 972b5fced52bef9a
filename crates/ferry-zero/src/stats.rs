//! Counters (only maintained with `FERRY_ZERO_STATS` set, so the hot paths
//! do not share a contended cache line otherwise) and their one-line report.

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::init::Config;

#[derive(Clone, Copy)]
pub(crate) enum Stat {
    /// Chunks scrubbed before free (including old blocks of realloc moves).
    Chunks,
    /// Bytes written with zeros.
    BytesZeroed,
    /// Pages given back with madvise(MADV_DONTNEED).
    PagesReleased,
    /// Frees passed straight through: usable size below FERRY_ZERO_MIN.
    SkippedSmall,
    /// Frees passed straight through: mmapped chunks.
    SkippedMmapped,
    /// realloc growths done as malloc + copy + scrubbed free.
    ReallocMoves,
    /// Native realloc growths that moved the block: the old chunk was
    /// freed inside glibc, unscrubbed.
    ReallocUnscrubbed,
    /// realloc shrinks whose cut-off tail was scrubbed.
    ReallocTails,
    /// madvise failures (the range was zeroed instead).
    MadviseFailures,
    /// Blocks leaked because free was called during our own dlsym.
    BootstrapLeaks,
    /// Calls into the operator delete interposers.
    Deletes,
    /// Nanoseconds spent zeroing and releasing (CLOCK_MONOTONIC around
    /// each chunk's scrub; page faults that released pages cause later
    /// are not included).
    ScrubNs,
}

const N: usize = 12;
const NAMES: [&str; N] = [
    "chunks",
    "bytes_zeroed",
    "pages_released",
    "skipped_small",
    "skipped_mmapped",
    "realloc_moves",
    "realloc_unscrubbed",
    "realloc_tails",
    "madvise_failures",
    "bootstrap_leaks",
    "deletes",
    "scrub_ns",
];

static COUNTERS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];

#[inline]
pub(crate) fn add(cfg: &Config, which: Stat, n: u64) {
    if cfg.stats {
        COUNTERS[which as usize].fetch_add(n, Ordering::Relaxed);
    }
}

/// CLOCK_MONOTONIC in nanoseconds when counters are kept, else 0 (no
/// clock read on the hot path).
#[inline]
pub(crate) fn clock(cfg: &Config) -> u64 {
    if !cfg.stats {
        return 0;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists
    // (the vDSO answers without a syscall or allocation).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// Adds the nanoseconds since `t0` (from [`clock`]) to `which`.
#[inline]
pub(crate) fn add_since(cfg: &Config, which: Stat, t0: u64) {
    if cfg.stats {
        add(cfg, which, clock(cfg).saturating_sub(t0));
    }
}

/// Counted whatever the configuration (there is none yet when it happens).
pub(crate) fn bootstrap_leak() {
    COUNTERS[Stat::BootstrapLeaks as usize].fetch_add(1, Ordering::Relaxed);
}

/// A fixed buffer that `write!` fills without allocating (truncating).
pub(crate) struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl Line {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// `ferry-zero: mode=release active=1 min=4096 release_min=65536 stats=1
/// chunks=N ...`
/// (newline-terminated). Counters read 0 unless `FERRY_ZERO_STATS` is set.
pub(crate) fn line() -> Line {
    let mut l = Line {
        buf: [0; 512],
        len: 0,
    };
    match crate::init::config() {
        Some(c) => {
            let _ = write!(
                l,
                "ferry-zero: mode={} active={} min={} release_min={} realloc={} stats={}",
                c.mode.name(),
                u8::from(c.active),
                c.min,
                c.release_min,
                if c.realloc_copy { "copy" } else { "native" },
                u8::from(c.stats)
            );
        }
        None => {
            let _ = write!(l, "ferry-zero: initialising");
        }
    }
    for (name, c) in NAMES.iter().zip(COUNTERS.iter()) {
        let _ = write!(l, " {}={}", name, c.load(Ordering::Relaxed));
    }
    let _ = l.write_str("\n");
    l
}

/// Writes `msg` to stderr with write(2) (no stdio, no allocation).
pub(crate) fn say(msg: &[u8]) {
    let mut rest = msg;
    while !rest.is_empty() {
        // SAFETY: `rest` is a valid readable buffer of the given length.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            return;
        }
        rest = rest.get(n as usize..).unwrap_or(&[]);
    }
}

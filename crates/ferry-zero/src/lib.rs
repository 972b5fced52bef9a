//! # ferry-zero: scrub freed heap memory so migration does not copy it
//!
//! `libferry_zero.so` is an `LD_PRELOAD` library for jobs that ferry may
//! live-migrate. Memory a program has `free()`d keeps its old contents:
//! glibc only writes a few list pointers into it, so every page of freed
//! heap still looks like data to a migration, which copies it, and it
//! neither counts as a zero page nor compresses well. Gad et al.
//! ("Accelerating Application Migration in HPC", for VM migration) fill
//! freed memory with zeros on `free()` so that zero-page detection and
//! compression can work; they report up to 19 % shorter migrations at
//! negligible overhead for some applications. This library does that, or
//! better, gives whole freed pages back to the kernel, for unmodified
//! binaries using glibc malloc:
//!
//! ```sh
//! LD_PRELOAD=target/release/libferry_zero.so FERRY_ZERO=release ./job
//! ```
//!
//! ## What is interposed
//!
//! `free`, `cfree`, `realloc` and the twelve C++ `operator delete`
//! variants (plain/array × unsized/sized × unaligned/aligned, and the
//! `nothrow` ones). The real `free`/`realloc` are found with
//! `dlsym(RTLD_NEXT, ..)`. `malloc`, `calloc` and friends are *not*
//! interposed, so initialisation cannot recurse into them.
//!
//! `operator delete`: when the next definition is libstdc++'s (every
//! variant of which is `free(ptr)`), or there is none, our `free` runs
//! directly; any other definition (a replacement allocator in a shared
//! library) is called untouched, and whatever it frees with `free` is
//! scrubbed there. A pointer given to `operator delete` is never assumed
//! to come from malloc otherwise.
//!
//! ## Modes (`FERRY_ZERO`)
//!
//! * `release` (default): for a chunk of at least `FERRY_ZERO_RELEASE_MIN`
//!   usable bytes (64 KiB), the whole pages strictly inside the chunk, from
//!   the first page boundary at or after `ptr + 32` (glibc writes up to four
//!   list pointers at the start of a freed chunk) to the last one at or
//!   before `ptr + usable - 8` (the footer glibc writes into the last usable
//!   word), are given back with `madvise(MADV_DONTNEED)`: they become absent
//!   (pagemap bit 63 clear), cost nothing to migrate and read back as
//!   zeros; the partial pages at both ends are zeroed. If madvise fails
//!   (e.g. `mlock`ed memory) the pages are zeroed instead. Smaller chunks
//!   are zeroed as in `zero` mode: a released page costs a page fault when
//!   glibc hands it out again, far more than a memset of it, and smaller
//!   chunks are the ones glibc reuses soonest.
//! * `zero`: the chunk's usable size (`malloc_usable_size`) is filled with
//!   zeros before the real `free` — the paper's method. Also touches pages
//!   the program never did, so large sparse chunks become resident.
//! * `off`: everything is passed through (measures the interposition).
//!
//! Why 4096 for `FERRY_ZERO_MIN`: a chunk smaller than a page holds no
//! whole page, so scrubbing it alone never turns a page into a zero or
//! absent one (it only helps when its freed neighbours are scrubbed too, and
//! lz4 compresses the page a little better); these chunks are also the
//! bulk of a program's frees and are reused at once (tcache, fast bins).
//! `FERRY_ZERO_MIN=0` scrubs everything.
//!
//! In both active modes the first 16 bytes are left alone: glibc writes its
//! tcache `next`/`key` or bin `fd`/`bk` words there anyway, and keeping
//! tcache's key keeps glibc's double-free detection working (zeroing it
//! lets `free(p); free(p);` of a small block go undetected). Chunks glibc
//! got with `mmap` (`IS_MMAPPED` bit in the size word at `ptr - 8`) are
//! skipped — free unmaps them and the kernel drops the pages. (The mmap
//! *threshold* is not a usable test: it moves at run time and heap chunks
//! can be larger.) See `scrub.rs` for the chunk layout.
//!
//! ## realloc
//!
//! When glibc's realloc moves a block it frees the old one internally, not
//! through `free`, and once it has returned the old block may already
//! belong to another thread, so it cannot be scrubbed afterwards. Hence:
//!
//! * `realloc(NULL, n)` and mmapped chunks (glibc uses `mremap`, nothing
//!   stale is left) go straight to glibc;
//! * shrinking (`n <= usable`, which glibc always does in place) first
//!   scrubs the cut-off tail `[ptr + n, ptr + usable)`, which the program
//!   has just given up, then calls glibc (which frees the tail);
//! * growing beyond the chunk by half its usable size or more is done as
//!   `malloc(n)`, copy of the usable bytes, scrubbed `free` of the old
//!   chunk. This gives up glibc's in-place extension (into a free
//!   neighbour or the top chunk) for such growths; since a copy happens
//!   only when the size grows by 1.5x or more, the copies of any growth
//!   sequence add up to at most twice its final size;
//! * smaller growths call glibc's realloc: a block grown in small steps
//!   (`+4 KiB` at a time) is extended in place or mremapped as usual —
//!   copying it every time would be quadratic (measured: 280x slower in
//!   `zero` mode). When glibc moves such a block, the old chunk is freed
//!   inside glibc and is *not* scrubbed (counted as `realloc_unscrubbed`);
//! * `FERRY_ZERO_REALLOC=native` sends every growth to glibc;
//! * `realloc(ptr, 0)` frees `ptr` (scrubbed) and returns NULL, like glibc.
//!
//! Chunks below `FERRY_ZERO_MIN` are passed through in every case; a cut-off
//! tail shorter than `FERRY_ZERO_RELEASE_MIN` is zeroed, not released.
//!
//! ## Environment
//!
//! | variable | values | default |
//! | --- | --- | --- |
//! | `FERRY_ZERO` | `release`, `zero`, `off` | `release` |
//! | `FERRY_ZERO_MIN` | bytes: chunks with a smaller usable size are passed straight to free | 4096 |
//! | `FERRY_ZERO_RELEASE_MIN` | bytes: `release` mode zeroes chunks (and realloc tails) smaller than this instead of releasing their pages | 65536 |
//! | `FERRY_ZERO_REALLOC` | `copy` (large growths moved by us), `native` (see above) | `copy` |
//! | `FERRY_ZERO_STATS` | `1`: keep counters, print them to stderr at exit | off |
//!
//! The counters are also available to the program through
//! `size_t ferry_zero_stats(char *buf, size_t len)`, which writes one line
//! (`ferry-zero: mode=.. chunks=N bytes_zeroed=N pages_released=N ..
//! scrub_ns=N`, NUL
//! terminated, truncated to `len`) and returns its full length. `scrub_ns`
//! is the time spent zeroing and releasing (a clock read per scrubbed
//! chunk, only with `FERRY_ZERO_STATS`). A program
//! that leaves with `_exit` never prints the at-exit line.
//!
//! ## Cost
//!
//! Frees below `FERRY_ZERO_MIN` (most frees of most programs) cost a read
//! of the chunk header and a compare. `zero` costs a memset of every freed
//! chunk from 4 KiB up (glibc's `MALLOC_PERTURB_` does the same for all of
//! them). `release` costs that memset below 64 KiB and a madvise per
//! larger chunk, and then a page fault for every released page that the
//! heap hands out again (~2.5 us per page on the 2-vCPU test VM, several
//! times a memset of the page): glibc reuses freed heap memory quickly, so
//! a program that keeps freeing and reallocating big blocks pays a fault
//! per page per cycle. `release` is the only mode that lowers the resident
//! size, never touches pages the program left untouched, and makes the
//! pages absent (not sent at all) rather than zero (sent as a flag).
//!
//! Measured with `ferry-bench zero` (bench/RESULTS.md; release build,
//! 2-vCPU VM shared with other work):
//!
//! * a solver-like job (`bench/workloads/phases.c`: 256 MiB live, 256 MiB
//!   of 8 MiB temporaries freed per ~3 s phase): the library spent 0.36 %
//!   (`zero`) and 0.60 % (`release`) of the run scrubbing (`scrub_ns`);
//!   the run times with and without it differ by less than the noise of
//!   the machine;
//! * a malloc microbenchmark (`bench/workloads/churn.c`: 4 threads, sizes
//!   16 B-64 KiB log-uniform, a block freed per malloc): the interposition
//!   alone (`off`) ~1.0-1.2x; `zero`/`release` ~1.4-1.6x when the program
//!   writes its blocks and ~3.5x when it only touches them (the memset then
//!   is most of the work); `FERRY_ZERO_MIN=0` ~1.75x/~3.9x;
//!   `FERRY_ZERO_MIN=65536` ~0.9-1.1x/~1.4x. Before the size floors,
//!   `tests/c/zero_bench.c` measured `zero` ~3x and `release` ~30x.
//!
//! //! ## Limits
//!
//! * glibc malloc only: if `free`, `realloc`, `malloc` or
//!   `malloc_usable_size` come from another object (jemalloc, tcmalloc,
//!   ...), everything is passed through (with a note on stderr).
//! * glibc's own allocations (stdio buffers, `getline`, `reallocarray`,
//!   ...) are covered: libc calls `free`/`realloc` through its PLT/GOT, so
//!   they reach this library too. Not covered: the old block when glibc's
//!   realloc moves a block itself (see above), and the bytes glibc writes
//!   into freed chunks (up to 32 at the start, 8 at the end).
//! * A `free` issued from inside our own `dlsym` (only possible during the
//!   first call, normally made by the load-time constructor) leaks that
//!   block; a `realloc` there fails with `ENOMEM`. Counted as
//!   `bootstrap_leaks`.
//! * A program reading memory after freeing it sees zeros instead of stale
//!   data (as with glibc's own `MALLOC_PERTURB_`, which fills with a byte).
//! * Process-private heaps only: glibc's heaps are private anonymous
//!   memory, where `MADV_DONTNEED` means "reads back as zeros".
//!
//! Nothing here locks: a chunk is the caller's until the real free runs.
//! No function allocates. A panic (no path is expected to panic) aborts
//! instead of unwinding into C: Rust aborts when unwinding would leave an
//! `extern "C"` function (`panic = "abort"` cannot be set per package in a
//! workspace profile).

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

mod init;
mod scrub;
mod stats;

use core::ffi::{c_char, c_void, CStr};
use core::sync::atomic::{AtomicUsize, Ordering};

use stats::Stat;

// ---------------------------------------------------------------------------
// free

/// Scrubs (if active) and frees `ptr`.
///
/// # Safety
/// `ptr` must be null or a live allocation of the program's malloc.
#[inline]
unsafe fn free_impl(ptr: *mut c_void) {
    if ptr.is_null() {
        return;
    }
    let Some(cfg) = init::config() else {
        // Called from inside our own dlsym: no real free to call yet.
        stats::bootstrap_leak();
        return;
    };
    if cfg.active {
        // SAFETY: the caller is freeing this live glibc allocation (active
        // implies glibc's malloc); it stays ours until the call below.
        unsafe { scrub::before_free(cfg, ptr) };
    }
    // SAFETY: forwarding the caller's pointer to the real free.
    unsafe { (cfg.free)(ptr) }
}

/// `free(3)`: scrubs the chunk, then calls the real `free`.
///
/// # Safety
/// As for `free(3)`.
#[cfg_attr(not(test), unsafe(export_name = "free"))]
pub unsafe extern "C" fn ferry_free(ptr: *mut c_void) {
    // SAFETY: caller contract of free(3).
    unsafe { free_impl(ptr) }
}

/// `cfree(3)`: the obsolete alias of `free` (glibc keeps a compat symbol).
///
/// # Safety
/// As for `free(3)`.
#[cfg_attr(not(test), unsafe(export_name = "cfree"))]
pub unsafe extern "C" fn ferry_cfree(ptr: *mut c_void) {
    // SAFETY: caller contract of free(3).
    unsafe { free_impl(ptr) }
}

// ---------------------------------------------------------------------------
// realloc

fn set_errno(e: i32) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// # Safety
/// As for `realloc(3)`.
unsafe fn realloc_impl(ptr: *mut c_void, size: usize) -> *mut c_void {
    let Some(cfg) = init::config() else {
        // Called from inside our own dlsym: fail the way realloc may.
        stats::bootstrap_leak();
        set_errno(libc::ENOMEM);
        return core::ptr::null_mut();
    };
    if ptr.is_null() || !cfg.active {
        // SAFETY: forwarding the caller's arguments.
        return unsafe { (cfg.realloc)(ptr, size) };
    }
    if size == 0 {
        // glibc: realloc(p, 0) frees p and returns NULL.
        // SAFETY: the caller gives up this live allocation.
        unsafe { free_impl(ptr) };
        return core::ptr::null_mut();
    }
    // SAFETY: a live glibc allocation (caller contract; active => glibc).
    let h = unsafe { scrub::header(ptr) };
    if h & scrub::IS_MMAPPED != 0 || scrub::usable_from_header(h) < cfg.min {
        // mremap leaves nothing stale; small chunks are not scrubbed.
        // SAFETY: forwarding the caller's arguments.
        return unsafe { (cfg.realloc)(ptr, size) };
    }
    // SAFETY: a live glibc allocation.
    let usable = unsafe { libc::malloc_usable_size(ptr) };
    if usable == 0 || usable > scrub::usable_from_header(h) {
        // Not an allocation glibc considers live: let it diagnose.
        // SAFETY: forwarding the caller's arguments.
        return unsafe { (cfg.realloc)(ptr, size) };
    }
    let start = ptr as usize;
    if size <= usable {
        // glibc shrinks in place (request2size(size) <= chunk size), and
        // the program keeps only [ptr, ptr + size).
        if usable - size >= cfg.min {
            let p = scrub::plan(
                scrub::mode_for(cfg, usable - size),
                start + size,
                start + usable,
                0,
                scrub::TAIL_META,
                cfg.page,
            );
            // SAFETY: the tail lies inside the caller's chunk, beyond the
            // bytes realloc must preserve; it is still ours until the call.
            unsafe { scrub::apply(cfg, &p) };
            stats::add(cfg, Stat::ReallocTails, 1);
        }
        // SAFETY: forwarding the caller's arguments.
        return unsafe { (cfg.realloc)(ptr, size) };
    }
    if !cfg.realloc_copy || size - usable < usable / 2 {
        // Native: small growths (by less than half) and FERRY_ZERO_REALLOC=
        // native. glibc extends in place when it can; if it moves the block
        // instead, the old chunk is freed inside glibc, unscrubbed.
        // SAFETY: forwarding the caller's arguments.
        let new = unsafe { (cfg.realloc)(ptr, size) };
        if !new.is_null() && new != ptr {
            stats::add(cfg, Stat::ReallocUnscrubbed, 1);
        }
        return new;
    }
    // Growth by half or more: move it ourselves so the old chunk can be
    // scrubbed while it is still ours. The copy (`usable` bytes) is at most
    // 2/3 of the new size, so over any sequence of growths the copies add
    // up to at most twice the final size.
    // SAFETY: malloc has no preconditions; it sets errno on failure.
    let new = unsafe { libc::malloc(size) };
    if new.is_null() {
        return new; // the old block is untouched, as realloc requires
    }
    // SAFETY: `ptr` has `usable` readable bytes (possibly uninitialised,
    // which a byte copy does not care about); `new` has at least
    // size > usable writable bytes; distinct live allocations.
    unsafe { core::ptr::copy_nonoverlapping(ptr.cast::<u8>(), new.cast::<u8>(), usable) };
    // SAFETY: the old block is the caller's and is given up here, as
    // realloc does after a move.
    unsafe { free_impl(ptr) };
    stats::add(cfg, Stat::ReallocMoves, 1);
    new
}

/// `realloc(3)`; see the crate docs for how moves and shrinks are handled.
///
/// # Safety
/// As for `realloc(3)`.
#[cfg_attr(not(test), unsafe(export_name = "realloc"))]
pub unsafe extern "C" fn ferry_realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: caller contract of realloc(3).
    unsafe { realloc_impl(ptr, size) }
}

// ---------------------------------------------------------------------------
// operator delete

/// Slot value: call our `free` directly.
const USE_FREE: usize = 1;

/// Symbol names, in slot order.
const DELETES: [&CStr; 12] = [
    c"_ZdlPv",
    c"_ZdaPv",
    c"_ZdlPvm",
    c"_ZdaPvm",
    c"_ZdlPvSt11align_val_t",
    c"_ZdaPvSt11align_val_t",
    c"_ZdlPvmSt11align_val_t",
    c"_ZdaPvmSt11align_val_t",
    c"_ZdlPvRKSt9nothrow_t",
    c"_ZdaPvRKSt9nothrow_t",
    c"_ZdlPvSt11align_val_tRKSt9nothrow_t",
    c"_ZdaPvSt11align_val_tRKSt9nothrow_t",
];

/// The next definition of each operator delete: 0 unresolved, `USE_FREE`,
/// or its address.
static NEXT_DELETE: [AtomicUsize; 12] = [const { AtomicUsize::new(0) }; 12];

/// Resolves slot `i` (racing resolutions store the same value).
fn next_delete(i: usize) -> usize {
    let v = NEXT_DELETE[i].load(Ordering::Relaxed);
    if v != 0 {
        return v;
    }
    let f = init::lookup(libc::RTLD_NEXT, DELETES[i]);
    let v = if f.is_null() || init::defined_in(f, b"libstdc++.so") {
        USE_FREE
    } else {
        f as usize
    };
    NEXT_DELETE[i].store(v, Ordering::Relaxed);
    v
}

macro_rules! operator_delete {
    ($(#[doc = $doc:literal])* $slot:literal $rust:ident = $sym:literal ($($arg:ident: $ty:ty),*)) => {
        $(#[doc = $doc])*
        ///
        /// # Safety
        /// As for the C++ operator.
        #[cfg_attr(not(test), unsafe(export_name = $sym))]
        pub unsafe extern "C" fn $rust(ptr: *mut c_void $(, $arg: $ty)*) {
            if let Some(cfg) = init::config() {
                stats::add(cfg, Stat::Deletes, 1);
            }
            let next = next_delete($slot);
            if next == USE_FREE {
                // SAFETY: libstdc++'s operator delete is free(ptr) for every
                // variant (or no other definition exists): same contract.
                unsafe { free_impl(ptr) }
            } else {
                // SAFETY: `next` is the next definition of this very symbol,
                // so it has this signature; arguments forwarded unchanged.
                unsafe {
                    let f = core::mem::transmute::<
                        usize,
                        unsafe extern "C" fn(*mut c_void $(, $ty)*),
                    >(next);
                    f(ptr $(, $arg)*)
                }
            }
        }
    };
}

operator_delete!(
    /// `operator delete(void*)`.
    0 ferry_delete = "_ZdlPv" ()
);
operator_delete!(
    /// `operator delete[](void*)`.
    1 ferry_delete_array = "_ZdaPv" ()
);
operator_delete!(
    /// `operator delete(void*, size_t)`.
    2 ferry_delete_sized = "_ZdlPvm" (_size: usize)
);
operator_delete!(
    /// `operator delete[](void*, size_t)`.
    3 ferry_delete_array_sized = "_ZdaPvm" (_size: usize)
);
operator_delete!(
    /// `operator delete(void*, std::align_val_t)`.
    4 ferry_delete_aligned = "_ZdlPvSt11align_val_t" (_align: usize)
);
operator_delete!(
    /// `operator delete[](void*, std::align_val_t)`.
    5 ferry_delete_array_aligned = "_ZdaPvSt11align_val_t" (_align: usize)
);
operator_delete!(
    /// `operator delete(void*, size_t, std::align_val_t)`.
    6 ferry_delete_sized_aligned = "_ZdlPvmSt11align_val_t" (_size: usize, _align: usize)
);
operator_delete!(
    /// `operator delete[](void*, size_t, std::align_val_t)`.
    7 ferry_delete_array_sized_aligned = "_ZdaPvmSt11align_val_t" (_size: usize, _align: usize)
);
operator_delete!(
    /// `operator delete(void*, const std::nothrow_t&)`.
    8 ferry_delete_nothrow = "_ZdlPvRKSt9nothrow_t" (_nt: *const c_void)
);
operator_delete!(
    /// `operator delete[](void*, const std::nothrow_t&)`.
    9 ferry_delete_array_nothrow = "_ZdaPvRKSt9nothrow_t" (_nt: *const c_void)
);
operator_delete!(
    /// `operator delete(void*, std::align_val_t, const std::nothrow_t&)`.
    10 ferry_delete_aligned_nothrow = "_ZdlPvSt11align_val_tRKSt9nothrow_t"
        (_align: usize, _nt: *const c_void)
);
operator_delete!(
    /// `operator delete[](void*, std::align_val_t, const std::nothrow_t&)`.
    11 ferry_delete_array_aligned_nothrow = "_ZdaPvSt11align_val_tRKSt9nothrow_t"
        (_align: usize, _nt: *const c_void)
);

// ---------------------------------------------------------------------------
// statistics, load and exit

/// Writes the statistics line (see the crate docs) into `buf`, truncated
/// to `len - 1` bytes and NUL-terminated, and returns its full length.
/// With `buf == NULL` or `len == 0` only the length is returned.
///
/// # Safety
/// `buf` must be null or point to `len` writable bytes.
#[cfg_attr(not(test), unsafe(export_name = "ferry_zero_stats"))]
pub unsafe extern "C" fn ferry_zero_stats(buf: *mut c_char, len: usize) -> usize {
    let line = stats::line();
    let bytes = line.as_bytes();
    if !buf.is_null() && len > 0 {
        let n = bytes.len().min(len - 1);
        // SAFETY: the caller provides `len` writable bytes; we write n + 1
        // <= len of them, from a buffer that cannot overlap (our stack).
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
            buf.add(n).write(0);
        }
    }
    bytes.len()
}

/// Load-time constructor: resolve before the program (and its threads)
/// start, and look up the delete operators if libstdc++ is loaded.
extern "C" fn at_load() {
    if init::config().is_some() && !init::lookup(libc::RTLD_NEXT, DELETES[0]).is_null() {
        for i in 0..DELETES.len() {
            next_delete(i);
        }
    }
}

/// At exit (not `_exit`): print the statistics with `FERRY_ZERO_STATS`.
extern "C" fn at_exit() {
    if matches!(init::config(), Some(c) if c.stats) {
        stats::say(stats::line().as_bytes());
    }
}

#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = at_load;

#[cfg(not(test))]
#[used]
#[link_section = ".fini_array"]
static DESTRUCTOR: extern "C" fn() = at_exit;

// Keep the hooks referenced in unit-test builds, where nothing exports them.
#[cfg(test)]
mod tests {
    #[test]
    fn mode_names() {
        assert_eq!(super::init::Mode::Release.name(), "release");
        assert_eq!(super::init::Mode::Zero.name(), "zero");
        let _ = (
            super::at_load as extern "C" fn(),
            super::at_exit as extern "C" fn(),
        );
    }
}

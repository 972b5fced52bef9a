//! Finding the real `free`/`realloc` and reading the configuration, once.
//!
//! The first call into the library (normally the load-time constructor,
//! otherwise whichever `free`/`realloc` comes first) resolves the next
//! definitions with `dlsym(RTLD_NEXT, ..)`, reads the environment and
//! publishes a [`Config`]. `dlsym` may allocate and free (its error buffer),
//! and a `free` from inside it reaches our `free` again: the thread doing
//! the resolution is recorded, and such a recursive call gets `None` (the
//! caller then leaks that one block rather than guess which `free` to use).
//! We never interpose `malloc`/`calloc`, so nothing else can recurse.

use core::cell::UnsafeCell;
use core::ffi::{c_char, c_void, CStr};
use core::sync::atomic::{AtomicI32, AtomicU8, Ordering};

/// `free(3)` as resolved with `RTLD_NEXT`.
pub(crate) type FreeFn = unsafe extern "C" fn(*mut c_void);
/// `realloc(3)` as resolved with `RTLD_NEXT`.
pub(crate) type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;

/// What to do with a freed chunk (`FERRY_ZERO`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Pass everything straight through (`FERRY_ZERO=off`).
    Off,
    /// Fill the chunk with zeros (the paper's method).
    Zero,
    /// `madvise(MADV_DONTNEED)` whole pages, zero the partial ones.
    Release,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Zero => "zero",
            Mode::Release => "release",
        }
    }
}

/// Everything the hot paths need, written once before `STATE` becomes
/// `READY` and never again.
pub(crate) struct Config {
    pub(crate) mode: Mode,
    /// `mode != Off` and the allocator is glibc's (the chunk-layout
    /// knowledge in `scrub` only holds for glibc malloc).
    pub(crate) active: bool,
    /// Chunks with a usable size below this are passed straight through.
    pub(crate) min: usize,
    /// `release` mode: chunks (and realloc tails) with at least this many
    /// usable bytes have their whole pages released; smaller ones are
    /// zeroed (a released page costs a page fault when the heap hands it
    /// out again, a zeroed one only a memset).
    pub(crate) release_min: usize,
    /// realloc growth beyond the chunk as malloc + copy + scrubbed free
    /// (`FERRY_ZERO_REALLOC=copy`, the default) instead of glibc's realloc.
    pub(crate) realloc_copy: bool,
    /// `FERRY_ZERO_STATS`: maintain counters and print them at exit.
    pub(crate) stats: bool,
    pub(crate) page: usize,
    pub(crate) free: FreeFn,
    pub(crate) realloc: ReallocFn,
}

const UNINIT: u8 = 0;
const BUSY: u8 = 1;
const READY: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);
/// TID of the thread running `resolve` (valid while `STATE == BUSY`).
static RESOLVER: AtomicI32 = AtomicI32::new(0);

struct ConfigCell(UnsafeCell<Option<Config>>);
// SAFETY: the cell is written exactly once, by the thread that moved STATE
// from UNINIT to BUSY, before it stores READY with Release ordering; it is
// only read after an Acquire load of READY. No reference to it exists while
// it is written.
unsafe impl Sync for ConfigCell {}
static CONFIG: ConfigCell = ConfigCell(UnsafeCell::new(None));

/// How long a thread waits for another thread's resolution before giving
/// up (it then behaves like a recursive call). Only reachable in the first
/// microseconds of a process, or if that thread is stuck behind the dynamic
/// linker's lock which we would be holding.
const MAX_SPINS: u32 = 10_000;

/// The configuration, resolving it on first use; `None` only for a call
/// made while the resolution is still running (see the module docs).
#[inline]
pub(crate) fn config() -> Option<&'static Config> {
    if STATE.load(Ordering::Acquire) == READY {
        // SAFETY: READY was observed with Acquire, so the single write of
        // CONFIG happened-before this read and no write follows.
        return unsafe { (*CONFIG.0.get()).as_ref() };
    }
    init_slow()
}

#[cold]
#[inline(never)]
fn init_slow() -> Option<&'static Config> {
    let me = gettid();
    let mut spins = 0;
    loop {
        match STATE.compare_exchange(UNINIT, BUSY, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => {
                RESOLVER.store(me, Ordering::Relaxed);
                let Some(cfg) = resolve() else {
                    crate::stats::say(b"ferry-zero: dlsym(RTLD_NEXT) found no free/realloc\n");
                    // SAFETY: abort has no preconditions; without a real free
                    // no call could be handled correctly.
                    unsafe { libc::abort() }
                };
                // SAFETY: we won the UNINIT -> BUSY transition, so we are the
                // only writer and nobody reads before READY is published.
                unsafe { *CONFIG.0.get() = Some(cfg) };
                STATE.store(READY, Ordering::Release);
                // SAFETY: written just above; never written again.
                return unsafe { (*CONFIG.0.get()).as_ref() };
            }
            Err(READY) => {
                // SAFETY: as in `config`: READY observed with Acquire.
                return unsafe { (*CONFIG.0.get()).as_ref() };
            }
            Err(_) => {
                if RESOLVER.load(Ordering::Relaxed) == me || spins >= MAX_SPINS {
                    return None;
                }
                spins += 1;
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
            }
        }
    }
}

fn gettid() -> i32 {
    // SAFETY: SYS_gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// `dlsym(handle, name)`, as a raw pointer (null if absent). A failed lookup
/// leaves a message in the thread's dlerror state; it is cleared so that the
/// program's own `dlerror()` never reports our lookups.
pub(crate) fn lookup(handle: *mut c_void, name: &CStr) -> *mut c_void {
    // SAFETY: `name` is NUL-terminated; RTLD_NEXT/RTLD_DEFAULT or a handle
    // are valid first arguments. RTLD_NEXT is relative to the object holding
    // this code, i.e. ferry-zero itself, which is what we want.
    let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if p.is_null() {
        // SAFETY: dlerror has no preconditions (it frees the message with
        // free(), which is ours and, being past bootstrap or recursive,
        // handles it).
        unsafe { libc::dlerror() };
    }
    p
}

/// Whether `addr` lies in an object whose file name starts with `prefix`
/// (e.g. `libc.so`, `libstdc++.so`).
pub(crate) fn defined_in(addr: *mut c_void, prefix: &[u8]) -> bool {
    if addr.is_null() {
        return false;
    }
    // SAFETY: Dl_info is plain data; all-zero is a valid value.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: `info` is a valid out-pointer; dladdr only reads `addr` as a
    // number and does not allocate.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return false;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the dynamic
    // linker, valid as long as the object is loaded (longer than this call).
    let path = unsafe { CStr::from_ptr(info.dli_fname) }.to_bytes();
    let base = match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    };
    base.starts_with(prefix)
}

fn env(name: &CStr) -> Option<&'static [u8]> {
    // SAFETY: `name` is NUL-terminated. getenv does not allocate. The
    // returned string lives in the environment block; we only read it here,
    // at startup, before the program is likely to call setenv.
    let p: *const c_char = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null getenv results are NUL-terminated strings.
    Some(unsafe { CStr::from_ptr(p) }.to_bytes())
}

fn parse_usize(s: &[u8]) -> Option<usize> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0usize, |acc, &b| {
        let d = (b as char).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(d as usize)
    })
}

/// Default `FERRY_ZERO_MIN` (both modes): a chunk smaller than a page
/// holds no whole page, so scrubbing it alone never makes a page zero or
/// absent; it only helps together with freed neighbours.
pub(crate) const DEFAULT_MIN: usize = 4096;
/// Default `FERRY_ZERO_RELEASE_MIN`.
pub(crate) const DEFAULT_RELEASE_MIN: usize = 64 << 10;

/// A byte count from the environment variable `name`, `default` when it is
/// unset or empty (with a note on stderr when it is not a number).
fn env_bytes(name: &CStr, default: usize, complaint: &[u8]) -> usize {
    match env(name) {
        None | Some(b"") => default,
        Some(s) => parse_usize(s).unwrap_or_else(|| {
            crate::stats::say(complaint);
            default
        }),
    }
}

fn resolve() -> Option<Config> {
    let free = lookup(libc::RTLD_NEXT, c"free");
    let realloc = lookup(libc::RTLD_NEXT, c"realloc");
    if free.is_null() || realloc.is_null() {
        return None;
    }
    // The layout knowledge (chunk header at ptr - 8, IS_MMAPPED, what free
    // writes where) is glibc's: with another allocator in front of glibc we
    // only forward.
    let glibc = defined_in(free, b"libc.so")
        && defined_in(realloc, b"libc.so")
        && defined_in(lookup(libc::RTLD_DEFAULT, c"malloc"), b"libc.so")
        && defined_in(
            lookup(libc::RTLD_DEFAULT, c"malloc_usable_size"),
            b"libc.so",
        );

    let mode = match env(c"FERRY_ZERO") {
        None | Some(b"") | Some(b"release") => Mode::Release,
        Some(b"zero") => Mode::Zero,
        Some(b"off") => Mode::Off,
        Some(_) => {
            crate::stats::say(
                b"ferry-zero: unknown FERRY_ZERO (zero|release|off), using release\n",
            );
            Mode::Release
        }
    };
    let min = env_bytes(
        c"FERRY_ZERO_MIN",
        DEFAULT_MIN,
        b"ferry-zero: FERRY_ZERO_MIN is not a byte count, using the default\n",
    );
    let release_min = env_bytes(
        c"FERRY_ZERO_RELEASE_MIN",
        DEFAULT_RELEASE_MIN,
        b"ferry-zero: FERRY_ZERO_RELEASE_MIN is not a byte count, using the default\n",
    );
    let realloc_copy = match env(c"FERRY_ZERO_REALLOC") {
        None | Some(b"") | Some(b"copy") => true,
        Some(b"native") => false,
        Some(_) => {
            crate::stats::say(
                b"ferry-zero: unknown FERRY_ZERO_REALLOC (copy|native), using copy\n",
            );
            true
        }
    };
    let stats = !matches!(env(c"FERRY_ZERO_STATS"), None | Some(b"") | Some(b"0"));
    if mode != Mode::Off && !glibc {
        crate::stats::say(b"ferry-zero: malloc is not glibc's; passing everything through\n");
    }
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 && (p as usize).is_power_of_two() => p as usize,
        _ => 4096,
    };
    Some(Config {
        mode,
        active: glibc && mode != Mode::Off,
        min,
        release_min,
        realloc_copy,
        stats,
        page,
        // SAFETY: both are the next definitions of free(3)/realloc(3), whose
        // C signatures these types match.
        free: unsafe { core::mem::transmute::<*mut c_void, FreeFn>(free) },
        // SAFETY: as above.
        realloc: unsafe { core::mem::transmute::<*mut c_void, ReallocFn>(realloc) },
    })
}

#[cfg(test)]
mod tests {
    use super::parse_usize;

    #[test]
    fn parses_byte_counts() {
        assert_eq!(parse_usize(b"0"), Some(0));
        assert_eq!(parse_usize(b"4096"), Some(4096));
        assert_eq!(parse_usize(b""), None);
        assert_eq!(parse_usize(b"4k"), None);
        assert_eq!(parse_usize(b"-1"), None);
        assert_eq!(parse_usize(b"99999999999999999999999"), None);
    }
}

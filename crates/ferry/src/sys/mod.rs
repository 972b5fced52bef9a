//! The only place in ferry with `unsafe`: thin, typed wrappers over the raw
//! kernel interfaces the engine needs (ptrace, process_vm_*, pidfd, clone3,
//! kcmp, prlimit, tee). Every wrapper returns `std::io::Result` carrying the
//! errno; callers add the pid/address context in their own error types.
//!
//! Kernel ABI structs are declared here with `#[repr(C)]` and their sizes are
//! checked at compile time against the values the kernel reports
//! (KERNEL.md: NT_PRSTATUS 216, PR_SET_MM_MAP_SIZE 104, rseq config 24).
#![allow(unsafe_code)]

pub mod abi;
pub mod madvise;
pub mod ptrace;
pub mod uffd;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

pub use abi::*;

fn cvt(r: libc::c_long) -> io::Result<libc::c_long> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_i(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Size of a page on x86_64. ferry does not support other page sizes.
pub const PAGE_SIZE: usize = 4096;

/// One range in another process's address space, for `process_vm_*`.
#[derive(Debug, Clone, Copy)]
pub struct RemoteRange {
    pub addr: u64,
    pub len: usize,
}

/// The kernel accepts at most this many iovecs per `process_vm_*` call.
pub const IOV_MAX: usize = 1024;

/// Adds the page at `addr` to a `process_vm_*` range list, extending the
/// last range when contiguous. Returns false (adding nothing) when a new
/// range is needed and the list already holds IOV_MAX.
pub fn push_page_range(ranges: &mut Vec<RemoteRange>, addr: u64) -> bool {
    let full = ranges.len() >= IOV_MAX;
    match ranges.last_mut() {
        Some(r) if r.addr + r.len as u64 == addr => r.len += PAGE_SIZE,
        _ if full => return false,
        _ => ranges.push(RemoteRange {
            addr,
            len: PAGE_SIZE,
        }),
    }
    true
}

/// Reads `remote` ranges of `pid` into the consecutive bytes of `local`.
/// Returns the number of bytes read (a short count means a range failed).
pub fn process_vm_readv(pid: i32, local: &mut [u8], remote: &[RemoteRange]) -> io::Result<usize> {
    let total: usize = remote.iter().map(|r| r.len).sum();
    assert!(total <= local.len() && remote.len() <= IOV_MAX);
    let liov = libc::iovec {
        iov_base: local.as_mut_ptr().cast(),
        iov_len: total,
    };
    let mut riov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; IOV_MAX];
    for (d, r) in riov.iter_mut().zip(remote) {
        d.iov_base = r.addr as *mut libc::c_void;
        d.iov_len = r.len;
    }
    // SAFETY: `liov` covers `total` bytes of `local`, which is borrowed
    // mutably for the duration of the call; the remote iovecs name memory in
    // another process, which the kernel validates.
    let n = unsafe { libc::process_vm_readv(pid, &liov, 1, riov.as_ptr(), remote.len() as _, 0) };
    Ok(cvt(n as libc::c_long)? as usize)
}

/// Writes the consecutive bytes of `local` into the `remote` ranges of `pid`.
pub fn process_vm_writev(pid: i32, local: &[u8], remote: &[RemoteRange]) -> io::Result<usize> {
    let total: usize = remote.iter().map(|r| r.len).sum();
    assert!(total <= local.len() && remote.len() <= IOV_MAX);
    let liov = libc::iovec {
        iov_base: local.as_ptr() as *mut libc::c_void,
        iov_len: total,
    };
    let mut riov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; IOV_MAX];
    for (d, r) in riov.iter_mut().zip(remote) {
        d.iov_base = r.addr as *mut libc::c_void;
        d.iov_len = r.len;
    }
    // SAFETY: the local iovec covers `total` initialised bytes of `local`,
    // which the kernel only reads.
    let n = unsafe { libc::process_vm_writev(pid, &liov, 1, riov.as_ptr(), remote.len() as _, 0) };
    Ok(cvt(n as libc::c_long)? as usize)
}

/// `pidfd_open(2)`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_getfd(2)`: a duplicate of descriptor `fd` of the process behind `pidfd`.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall with integer arguments.
    let r = cvt(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// `kcmp(KCMP_FILE)`: whether two descriptors refer to one open file description.
pub fn kcmp_same_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: plain syscall with integer arguments.
    let r = cvt(unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) })?;
    Ok(r == 0)
}

/// `prlimit(2)` on another process: sets `new` if given, returns the old limit.
pub fn prlimit(pid: i32, resource: u32, new: Option<(u64, u64)>) -> io::Result<(u64, u64)> {
    let newl = new.map(|(c, m)| libc::rlimit64 {
        rlim_cur: c,
        rlim_max: m,
    });
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let newp = newl.as_ref().map_or(std::ptr::null(), |r| r as *const _);
    // SAFETY: `newp` is null or points to a live rlimit64; `old` is writable.
    cvt_i(unsafe { libc::prlimit64(pid, resource as _, newp, &mut old) })?;
    Ok((old.rlim_cur, old.rlim_max))
}

/// `get_robust_list(2)` of another thread: (head, len).
pub fn get_robust_list(tid: i32) -> io::Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: u64 = 0;
    // SAFETY: both out-pointers are valid for writes of a pointer/size_t.
    cvt(unsafe { libc::syscall(libc::SYS_get_robust_list, tid, &mut head, &mut len) })?;
    Ok((head, len))
}

/// `kill(2)`.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    cvt_i(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

/// `tgkill(2)`.
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    cvt(unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) }).map(|_| ())
}

/// Whether a process with this pid exists (it may be a zombie).
pub fn pid_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Effective uid of the caller.
pub fn geteuid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::geteuid() }
}

/// pid of the caller.
pub fn getpid() -> i32 {
    // SAFETY: always succeeds.
    unsafe { libc::getpid() }
}

/// `pipe2(O_CLOEXEC)`: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for two descriptors.
    cvt_i(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: the kernel returned two new descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `tee(2)`: duplicates up to `len` bytes from pipe `from` into pipe `to`
/// without consuming them.
pub fn tee(from: RawFd, to: RawFd, len: usize, nonblock: bool) -> io::Result<usize> {
    let flags = if nonblock { libc::SPLICE_F_NONBLOCK } else { 0 };
    // SAFETY: plain syscall with descriptor and integer arguments.
    let r = unsafe { libc::tee(from, to, len, flags) };
    Ok(cvt(r as libc::c_long)? as usize)
}

/// `fcntl(fd, cmd, arg)` for integer commands (F_GETPIPE_SZ, F_SETPIPE_SZ, F_GETFL, ...).
pub fn fcntl_int(fd: RawFd, cmd: i32, arg: i32) -> io::Result<i32> {
    // SAFETY: integer commands take no pointers.
    cvt_i(unsafe { libc::fcntl(fd, cmd, arg) })
}

/// Bytes queued in a pipe (`FIONREAD`).
pub fn fionread(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    cvt_i(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) })?;
    Ok(n as usize)
}

/// `poll(2)` on `fds` (events in, revents out) for at most `timeout_ms`
/// (-1: no limit); returns how many have events. EINTR counts as none.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the
    // length passed.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

/// Takes ownership of the descriptor a userfaultfd `UFFD_EVENT_FORK`
/// message names: the kernel installed it in this process's table for the
/// reader of the event, and nothing else refers to it.
pub fn adopt_fork_uffd(fd: u32) -> io::Result<OwnedFd> {
    let fd = fd as RawFd;
    // F_GETFD fails unless `fd` is open here.
    fcntl_int(fd, libc::F_GETFD, 0)?;
    // SAFETY: `fd` is open (checked above) and, coming from a fork event
    // read by this process, owned by no other object.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Decoded `waitpid` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    Exited(i32),
    Signaled(i32),
    /// Stopped with signal and the ptrace event (status >> 16).
    Stopped {
        sig: i32,
        event: i32,
    },
    Continued,
}

/// `waitpid(pid, flags)`; returns None with WNOHANG when nothing changed.
/// Retries on EINTR.
pub fn waitpid(pid: i32, flags: i32) -> io::Result<Option<(i32, WaitStatus)>> {
    loop {
        let mut st: libc::c_int = 0;
        // SAFETY: `st` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut st, flags) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(None);
        }
        let ws = if libc::WIFEXITED(st) {
            WaitStatus::Exited(libc::WEXITSTATUS(st))
        } else if libc::WIFSIGNALED(st) {
            WaitStatus::Signaled(libc::WTERMSIG(st))
        } else if libc::WIFSTOPPED(st) {
            WaitStatus::Stopped {
                sig: libc::WSTOPSIG(st),
                event: (st >> 16) & 0xff,
            }
        } else {
            WaitStatus::Continued
        };
        return Ok(Some((r, ws)));
    }
}

/// `CPUID(leaf, subleaf)` → (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Size of the XSAVE area the kernel exposes through `NT_X86_XSTATE`:
/// CPUID(0xD,0).EBX, the size for the features enabled in XCR0.
pub fn xstate_size() -> usize {
    cpuid(0xd, 0).1 as usize
}

/// XCR0, the xstate features the kernel enabled (XGETBV 0).
pub fn xcr0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX=0 is valid whenever OSXSAVE is set, which
    // every x86_64 Linux kernel with XSAVE support (all of ours) enables.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    (lo as u64) | ((hi as u64) << 32)
}

/// Whether a page holds only zero bytes, compared a machine word at a time.
pub fn is_zero_page(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
    // the aligned middle part of the slice.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0u64, |a, &w| a | w) == 0)
}

/// Raw `clone3` with `set_tid` that starts a *stub*: a copy of the caller
/// that only waits, to be taken over by ptrace and rebuilt into a restored
/// process. The child runs nothing but raw async-signal-safe syscalls.
/// `set_tid` lists the wanted pid from the innermost pid namespace outwards.
/// Returns the child's pid as seen by the caller.
pub fn clone3_stub(set_tid: &[i32], parent_death_kill: bool) -> io::Result<i32> {
    let tids: Vec<libc::pid_t> = set_tid.to_vec();
    let args = CloneArgs {
        flags: 0,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: if tids.is_empty() {
            0
        } else {
            tids.as_ptr() as u64
        },
        set_tid_size: tids.len() as u64,
        cgroup: 0,
    };
    let ppid = getpid();
    // SAFETY: clone3 without CLONE_VM duplicates the address space, so the
    // child owns its own copy of every Rust object; it then only performs
    // raw syscalls (prctl, getppid, kill, pause) that touch no Rust state
    // and never returns into Rust code.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r == 0 {
        // SAFETY: raw syscalls only, see above.
        unsafe {
            if parent_death_kill {
                libc::syscall(libc::SYS_prctl, libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::syscall(libc::SYS_getppid) != ppid as libc::c_long {
                    libc::syscall(libc::SYS_exit_group, 1);
                }
            }
            loop {
                libc::syscall(libc::SYS_pause);
            }
        }
    }
    Ok(cvt(r)? as i32)
}

/// Reinterprets a plain-old-data kernel struct as bytes.
pub fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `Pod` types are repr(C) with no padding-sensitive invariants;
    // reading their bytes is always defined.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// Builds a plain-old-data kernel struct from bytes (None if too short).
pub fn pod_from_bytes<T: Pod>(b: &[u8]) -> Option<T> {
    if b.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: `Pod` types accept any bit pattern; read_unaligned copes with
    // the byte slice's alignment.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

/// Makes the caller ignore SIGINT and SIGQUIT, as `system(3)` does while it
/// waits: a Ctrl-C on the terminal is meant for the job in the foreground.
pub fn ignore_interactive_signals() {
    for sig in [libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: installing SIG_IGN has no memory-safety requirements.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
}

/// Makes `cmd` close every descriptor above stderr in the child before it
/// execs: jobs must not inherit stray descriptors (a CI runner's pipes, a
/// shell's fds) that would make them impossible to checkpoint.
pub fn close_extra_fds_on_spawn(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only performs the
    // async-signal-safe close_range syscall.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
}

/// Most descriptors one SCM_RIGHTS message may carry (SCM_MAX_FD).
pub const SCM_MAX_FD: usize = 253;

/// Sends descriptors over a unix socket with one SCM_RIGHTS message
/// (one data byte, as the kernel requires some payload).
pub fn send_fds(sock: RawFd, fds: &[RawFd]) -> io::Result<()> {
    assert!(!fds.is_empty() && fds.len() <= SCM_MAX_FD);
    let payload = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let data_len = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; the pointers set below stay valid for
    // the sendmsg call; the CMSG_* macros are used on a buffer of CMSG_SPACE
    // bytes, aligned for cmsghdr (u64 storage).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as usize;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr(),
            libc::CMSG_DATA(cmsg).cast::<RawFd>(),
            fds.len(),
        );
        cvt(libc::sendmsg(sock, &msg, 0) as libc::c_long)?;
    }
    Ok(())
}

/// `memfd_create(name, MFD_CLOEXEC)`.
pub fn memfd_create(name: &str) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let fd = cvt_i(unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: new descriptor owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `unshare(CLONE_NEWPID)`: the caller's next child is pid 1 of a new
/// pid namespace (the caller itself stays where it is).
pub fn unshare_pidns() -> io::Result<()> {
    // SAFETY: plain syscall with an integer argument.
    cvt_i(unsafe { libc::unshare(libc::CLONE_NEWPID) }).map(|_| ())
}

fn sigset_of(mask: u64) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in 1..=64 {
            if mask & (1u64 << (sig - 1)) != 0 {
                libc::sigaddset(&mut set, sig);
            }
        }
        set
    }
}

/// Blocks the signals in `mask` (bit N-1 = signal N) for the calling thread.
pub fn block_signals(mask: u64) -> io::Result<()> {
    let set = sigset_of(mask);
    // SAFETY: `set` is initialised; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits for one of the (blocked) signals in `mask`; returns its number.
pub fn sigwait(mask: u64) -> io::Result<i32> {
    let set = sigset_of(mask);
    loop {
        // SAFETY: `set` is initialised; siginfo is not requested.
        let r = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if r >= 0 {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Makes `cmd`'s child start with an empty signal mask and default
/// dispositions, whatever its parent blocked.
pub fn reset_signals_on_spawn(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
}

static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_sig: libc::c_int) {
    STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set a flag instead of killing the process, so
/// long operations can stop cleanly; returns the flag.
pub fn stop_flag_on_signals() -> &'static std::sync::atomic::AtomicBool {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; sigaction with a zeroed mask is well-formed.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    &STOP_REQUESTED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_page_range_merges_and_caps() {
        let mut r = Vec::new();
        assert!(push_page_range(&mut r, 0x1000));
        assert!(push_page_range(&mut r, 0x2000));
        assert!(push_page_range(&mut r, 0x5000));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].len, 2 * PAGE_SIZE);
        r.clear();
        for i in 0..IOV_MAX as u64 {
            assert!(push_page_range(&mut r, i * 2 * PAGE_SIZE as u64));
        }
        // A new range does not fit, a contiguous page still does.
        assert!(!push_page_range(&mut r, u64::MAX - PAGE_SIZE as u64 * 4));
        assert!(push_page_range(
            &mut r,
            (IOV_MAX as u64 - 1) * 2 * PAGE_SIZE as u64 + PAGE_SIZE as u64
        ));
        assert_eq!(r.len(), IOV_MAX);
    }
}

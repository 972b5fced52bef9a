//! ptrace requests. Every request for a tracee must come from the thread
//! that attached it (KERNEL.md §6), so callers keep one tracer thread.

use super::abi::*;
use super::{cvt, pod_bytes};
use std::io;

fn req(request: u32, tid: i32, addr: u64, data: u64) -> io::Result<libc::c_long> {
    // SAFETY: callers pass pointers in `addr`/`data` only for requests whose
    // buffers they own and have sized for the kernel's writes.
    let r = unsafe {
        libc::ptrace(
            request as _,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    cvt(r)
}

pub const O_TRACECLONE: u64 = libc::PTRACE_O_TRACECLONE as u64;
pub const O_TRACEFORK: u64 = libc::PTRACE_O_TRACEFORK as u64;
pub const O_EXITKILL: u64 = libc::PTRACE_O_EXITKILL as u64;
pub const O_SUSPEND_SECCOMP: u64 = libc::PTRACE_O_SUSPEND_SECCOMP as u64;
pub const EVENT_CLONE: i32 = libc::PTRACE_EVENT_CLONE;
pub const EVENT_FORK: i32 = libc::PTRACE_EVENT_FORK;
pub const EVENT_STOP: i32 = libc::PTRACE_EVENT_STOP;

pub fn seize(tid: i32, options: u64) -> io::Result<()> {
    req(libc::PTRACE_SEIZE, tid, 0, options).map(|_| ())
}

pub fn interrupt(tid: i32) -> io::Result<()> {
    req(libc::PTRACE_INTERRUPT, tid, 0, 0).map(|_| ())
}

pub fn detach(tid: i32, sig: i32) -> io::Result<()> {
    req(libc::PTRACE_DETACH, tid, 0, sig as u64).map(|_| ())
}

pub fn cont(tid: i32, sig: i32) -> io::Result<()> {
    req(libc::PTRACE_CONT, tid, 0, sig as u64).map(|_| ())
}

pub fn singlestep(tid: i32, sig: i32) -> io::Result<()> {
    req(libc::PTRACE_SINGLESTEP, tid, 0, sig as u64).map(|_| ())
}

pub fn set_options(tid: i32, options: u64) -> io::Result<()> {
    req(libc::PTRACE_SETOPTIONS, tid, 0, options).map(|_| ())
}

pub fn get_event_msg(tid: i32) -> io::Result<u64> {
    let mut v: u64 = 0;
    req(libc::PTRACE_GETEVENTMSG, tid, 0, &mut v as *mut u64 as u64)?;
    Ok(v)
}

pub fn get_regs(tid: i32) -> io::Result<UserRegs> {
    let mut r = UserRegs::default();
    let mut iov = libc::iovec {
        iov_base: (&mut r as *mut UserRegs).cast(),
        iov_len: std::mem::size_of::<UserRegs>(),
    };
    req(
        libc::PTRACE_GETREGSET,
        tid,
        NT_PRSTATUS as u64,
        &mut iov as *mut libc::iovec as u64,
    )?;
    if iov.iov_len != std::mem::size_of::<UserRegs>() {
        return Err(io::Error::other(format!(
            "NT_PRSTATUS returned {} bytes, expected 216",
            iov.iov_len
        )));
    }
    Ok(r)
}

pub fn set_regs(tid: i32, r: &UserRegs) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: pod_bytes(r).as_ptr() as *mut libc::c_void,
        iov_len: std::mem::size_of::<UserRegs>(),
    };
    req(
        libc::PTRACE_SETREGSET,
        tid,
        NT_PRSTATUS as u64,
        &mut iov as *mut libc::iovec as u64,
    )
    .map(|_| ())
}

/// Reads the XSAVE area (standard format) into `buf`, which must be sized to
/// [`super::xstate_size`]. Returns the length the kernel filled.
pub fn get_xstate(tid: i32, buf: &mut [u8]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    req(
        libc::PTRACE_GETREGSET,
        tid,
        NT_X86_XSTATE as u64,
        &mut iov as *mut libc::iovec as u64,
    )?;
    Ok(iov.iov_len)
}

/// Sets the XSAVE area; the kernel needs exactly its own size (KERNEL.md §2).
pub fn set_xstate(tid: i32, buf: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    req(
        libc::PTRACE_SETREGSET,
        tid,
        NT_X86_XSTATE as u64,
        &mut iov as *mut libc::iovec as u64,
    )
    .map(|_| ())
}

pub fn get_sigmask(tid: i32) -> io::Result<u64> {
    let mut m: u64 = 0;
    req(libc::PTRACE_GETSIGMASK, tid, 8, &mut m as *mut u64 as u64)?;
    Ok(m)
}

pub fn set_sigmask(tid: i32, mask: u64) -> io::Result<()> {
    req(libc::PTRACE_SETSIGMASK, tid, 8, &mask as *const u64 as u64).map(|_| ())
}

/// Pending signals of a thread (or, with `shared`, of its process), as raw
/// 128-byte siginfo records, without dequeuing them.
pub fn peek_siginfo(tid: i32, shared: bool) -> io::Result<Vec<[u8; SIGINFO_SIZE]>> {
    let mut out = Vec::new();
    let mut buf = [[0u8; SIGINFO_SIZE]; 32];
    loop {
        let args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: buf.len() as i32,
        };
        let n = req(
            libc::PTRACE_PEEKSIGINFO,
            tid,
            &args as *const PeekSiginfoArgs as u64,
            buf.as_mut_ptr() as u64,
        )? as usize;
        out.extend_from_slice(&buf[..n.min(buf.len())]);
        if n < buf.len() {
            return Ok(out);
        }
    }
}

/// rseq registration of a thread (pointer 0 when none).
pub fn get_rseq_config(tid: i32) -> io::Result<RseqConfig> {
    let mut c = RseqConfig::default();
    req(
        PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        std::mem::size_of::<RseqConfig>() as u64,
        &mut c as *mut RseqConfig as u64,
    )?;
    Ok(c)
}

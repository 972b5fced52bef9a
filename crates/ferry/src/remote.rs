//! Remote syscalls: make a ptrace-stopped thread execute one syscall on our
//! behalf. No code is injected: the thread's RIP is pointed at an existing
//! `syscall` instruction (in its vDSO, or a private gadget page during
//! restore), arguments go in registers, one PTRACE_SINGLESTEP runs it, and
//! RAX holds the result. `orig_rax = -1` keeps the kernel's syscall-restart
//! logic away from these frames (KERNEL.md, injection primitive).

use crate::sys::{self, ptrace, UserRegs, WaitStatus};
use std::fs::File;
use std::os::unix::fs::FileExt;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("thread {tid}: ptrace {op} failed: {source}")]
    Ptrace {
        tid: i32,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("thread {tid}: remote {name} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Syscall {
        tid: i32,
        name: &'static str,
        errno: i32,
    },
    #[error("thread {tid} died during a remote {name} ({status:?})")]
    Died {
        tid: i32,
        name: &'static str,
        status: WaitStatus,
    },
    #[error("thread {tid}: no `syscall` instruction found in its vDSO")]
    NoGadget { tid: i32 },
    #[error("thread {tid}: cannot access memory at {addr:#x}: {source}")]
    Mem {
        tid: i32,
        addr: u64,
        source: std::io::Error,
    },
    #[error("thread {tid}: remote scratch area too small for {need} bytes")]
    Scratch { tid: i32, need: usize },
}

/// What happened besides the syscall itself (clone/fork events).
#[derive(Debug, Default, Clone)]
pub struct Events {
    /// Tracee-side pids/tids (as the tracer sees them) created by the call.
    pub new_tasks: Vec<i32>,
}

/// A stopped thread driven by remote syscalls.
pub struct Remote {
    pub tid: i32,
    gadget: u64,
    /// Registers to put back when done.
    pub saved: UserRegs,
    mem: File,
    scratch: Option<(u64, usize)>,
    scratch_used: usize,
}

/// Finds a `syscall` (0f 05) instruction in the [vdso] of `pid`.
pub fn find_vdso_gadget(pid: i32) -> Result<u64, RemoteError> {
    let maps =
        std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| RemoteError::Mem {
            tid: pid,
            addr: 0,
            source: e,
        })?;
    let line = maps
        .lines()
        .find(|l| l.ends_with("[vdso]"))
        .ok_or(RemoteError::NoGadget { tid: pid })?;
    let range = line.split_whitespace().next().unwrap_or("");
    let (s, e) = range
        .split_once('-')
        .ok_or(RemoteError::NoGadget { tid: pid })?;
    let s = u64::from_str_radix(s, 16).map_err(|_| RemoteError::NoGadget { tid: pid })?;
    let e = u64::from_str_radix(e, 16).map_err(|_| RemoteError::NoGadget { tid: pid })?;
    let mem = File::open(format!("/proc/{pid}/mem")).map_err(|source| RemoteError::Mem {
        tid: pid,
        addr: s,
        source,
    })?;
    let mut buf = vec![0u8; (e - s) as usize];
    mem.read_exact_at(&mut buf, s)
        .map_err(|source| RemoteError::Mem {
            tid: pid,
            addr: s,
            source,
        })?;
    buf.windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|i| s + i as u64)
        .ok_or(RemoteError::NoGadget { tid: pid })
}

impl Remote {
    /// Takes over a thread that is already in a ptrace stop, using the
    /// `syscall` instruction at `gadget`.
    pub fn new(tid: i32, gadget: u64) -> Result<Self, RemoteError> {
        let saved = ptrace::get_regs(tid).map_err(|source| RemoteError::Ptrace {
            tid,
            op: "GETREGS",
            source,
        })?;
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{tid}/mem"))
            .map_err(|source| RemoteError::Mem {
                tid,
                addr: 0,
                source,
            })?;
        Ok(Self {
            tid,
            gadget,
            saved,
            mem,
            scratch: None,
            scratch_used: 0,
        })
    }

    /// Switches to another `syscall` instruction (e.g. a private gadget page).
    pub fn set_gadget(&mut self, gadget: u64) {
        self.gadget = gadget;
    }

    pub fn gadget(&self) -> u64 {
        self.gadget
    }

    /// Runs one syscall and returns RAX as the kernel left it (negative
    /// errno on failure), plus clone/fork events it caused.
    pub fn syscall_raw(
        &mut self,
        name: &'static str,
        nr: i64,
        args: &[u64],
    ) -> Result<(i64, Events), RemoteError> {
        let tid = self.tid;
        let pt = |op: &'static str| move |source| RemoteError::Ptrace { tid, op, source };
        let mut r = self.saved;
        let a = |i: usize| args.get(i).copied().unwrap_or(0);
        r.rax = nr as u64;
        r.rdi = a(0);
        r.rsi = a(1);
        r.rdx = a(2);
        r.r10 = a(3);
        r.r8 = a(4);
        r.r9 = a(5);
        r.rip = self.gadget;
        r.orig_rax = u64::MAX;
        ptrace::set_regs(tid, &r).map_err(pt("SETREGS"))?;
        let mut ev = Events::default();
        let mut spurious = 0;
        loop {
            ptrace::singlestep(tid, 0).map_err(pt("SINGLESTEP"))?;
            let st = match sys::waitpid(tid, libc::__WALL).map_err(pt("waitpid"))? {
                Some((_, st)) => st,
                None => continue,
            };
            match st {
                WaitStatus::Stopped {
                    sig: libc::SIGTRAP,
                    event: 0,
                } => break,
                WaitStatus::Stopped { event, .. }
                    if event == ptrace::EVENT_CLONE || event == ptrace::EVENT_FORK =>
                {
                    let child = ptrace::get_event_msg(tid).map_err(pt("GETEVENTMSG"))?;
                    ev.new_tasks.push(child as i32);
                }
                WaitStatus::Stopped { .. } if spurious < 16 => {
                    // A group stop or a non-blockable signal; ferry blocks
                    // every other signal while it drives a thread.
                    spurious += 1;
                }
                status => return Err(RemoteError::Died { tid, name, status }),
            }
        }
        let out = ptrace::get_regs(tid).map_err(pt("GETREGS"))?;
        Ok((out.rax as i64, ev))
    }

    /// Runs one syscall; a negative errno result becomes an error.
    pub fn syscall(
        &mut self,
        name: &'static str,
        nr: i64,
        args: &[u64],
    ) -> Result<u64, RemoteError> {
        let (r, _) = self.syscall_raw(name, nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(RemoteError::Syscall {
                tid: self.tid,
                name,
                errno: -r as i32,
            });
        }
        Ok(r as u64)
    }

    /// Maps a private read-write scratch area in the tracee for arguments.
    pub fn map_scratch(&mut self, len: usize) -> Result<u64, RemoteError> {
        let addr = self.syscall(
            "mmap",
            libc::SYS_mmap,
            &[
                0,
                len as u64,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        self.scratch = Some((addr, len));
        self.scratch_used = 0;
        Ok(addr)
    }

    /// Uses an existing area of the tracee as scratch space.
    pub fn use_scratch(&mut self, addr: u64, len: usize) {
        self.scratch = Some((addr, len));
        self.scratch_used = 0;
    }

    pub fn scratch(&self) -> Option<(u64, usize)> {
        self.scratch
    }

    /// Unmaps the scratch area made by [`Remote::map_scratch`].
    pub fn unmap_scratch(&mut self) -> Result<(), RemoteError> {
        if let Some((addr, len)) = self.scratch.take() {
            self.syscall("munmap", libc::SYS_munmap, &[addr, len as u64])?;
        }
        Ok(())
    }

    /// Forgets everything placed in scratch so far.
    pub fn reset_scratch(&mut self) {
        self.scratch_used = 0;
    }

    /// Copies `data` into the scratch area and returns its address there.
    pub fn put(&mut self, data: &[u8]) -> Result<u64, RemoteError> {
        let (base, len) = self.scratch.ok_or(RemoteError::Scratch {
            tid: self.tid,
            need: data.len(),
        })?;
        let off = (self.scratch_used + 15) & !15;
        if off + data.len() > len {
            return Err(RemoteError::Scratch {
                tid: self.tid,
                need: data.len(),
            });
        }
        self.write(base + off as u64, data)?;
        self.scratch_used = off + data.len();
        Ok(base + off as u64)
    }

    /// Copies a NUL-terminated string into scratch.
    pub fn put_cstr(&mut self, s: &str) -> Result<u64, RemoteError> {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.put(&v)
    }

    /// Reserves `len` zeroed bytes in scratch (for syscall out-parameters).
    pub fn reserve(&mut self, len: usize) -> Result<u64, RemoteError> {
        self.put(&vec![0u8; len])
    }

    /// Writes tracee memory through /proc/PID/mem (works on read-only pages).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), RemoteError> {
        self.mem
            .write_all_at(data, addr)
            .map_err(|source| RemoteError::Mem {
                tid: self.tid,
                addr,
                source,
            })
    }

    /// Reads tracee memory through /proc/PID/mem.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        self.mem
            .read_exact_at(buf, addr)
            .map_err(|source| RemoteError::Mem {
                tid: self.tid,
                addr,
                source,
            })
    }

    /// Puts the saved registers back; the thread stays stopped.
    pub fn finish(self) -> Result<(), RemoteError> {
        ptrace::set_regs(self.tid, &self.saved).map_err(|source| RemoteError::Ptrace {
            tid: self.tid,
            op: "SETREGS",
            source,
        })
    }
}

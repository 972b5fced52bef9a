//! The stub: a clone of ferry with the wanted pid, stopped under ptrace,
//! stripped to an empty address space that holds only a private gadget
//! page (a `syscall` instruction) and a scratch area for arguments.

use super::RestoreError;
use crate::image::{ProcessImage, VmaKind};
use crate::proc;
use crate::remote::{find_vdso_gadget, Remote};
use crate::sys::{self, ptrace, WaitStatus, PAGE_SIZE, TASK_SIZE};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// Gadget page + scratch pages.
pub const AREA_LEN: u64 = 17 * PAGE_SIZE as u64;

pub struct Stub {
    pub pid: i32,
    pub r: Remote,
    pub area: u64,
    pub pidfd: OwnedFd,
    /// Files created for deleted-file contents, unlinked when done.
    pub temp_files: Vec<PathBuf>,
    /// Signal mask the main thread gets when it is let go.
    pub final_sigmask: u64,
    /// The other threads, stopped with their final registers, and masks.
    pub threads: Vec<(Remote, u64)>,
    released: bool,
}

impl Stub {
    /// Clones the stub with `pid` and empties its address space.
    pub fn create(pid: i32, p: &ProcessImage) -> Result<Stub, RestoreError> {
        let child = sys::clone3_stub(&[pid], true).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) => RestoreError::PidInUse { pid },
            _ => RestoreError::Clone { pid, source: e },
        })?;
        let pt = |op| move |source| RestoreError::Ptrace { pid, op, source };
        let pidfd = match sys::pidfd_open(child) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = sys::kill(child, libc::SIGKILL);
                let _ = sys::waitpid(child, 0);
                return Err(pt("pidfd_open")(e));
            }
        };
        let attach = || -> Result<Remote, RestoreError> {
            ptrace::seize(child, ptrace::O_EXITKILL | ptrace::O_TRACECLONE).map_err(pt("SEIZE"))?;
            ptrace::interrupt(child).map_err(pt("INTERRUPT"))?;
            loop {
                match sys::waitpid(child, libc::__WALL).map_err(pt("waitpid"))? {
                    Some((_, WaitStatus::Stopped { .. })) => break,
                    Some((_, status)) => {
                        return Err(RestoreError::Step {
                            pid,
                            what: "the stub".into(),
                            why: format!("it ended early: {status:?}"),
                        })
                    }
                    None => {}
                }
            }
            ptrace::set_sigmask(child, sys::ALL_SIGNALS).map_err(pt("SETSIGMASK"))?;
            Ok(Remote::new(child, find_vdso_gadget(child)?)?)
        };
        let r = match attach() {
            Ok(r) => r,
            Err(e) => {
                let _ = sys::kill(child, libc::SIGKILL);
                let _ = sys::waitpid(child, libc::__WALL);
                return Err(e);
            }
        };
        let mut st = Stub {
            pid: child,
            r,
            area: 0,
            pidfd,
            temp_files: Vec::new(),
            final_sigmask: 0,
            threads: Vec::new(),
            released: false,
        };
        st.empty(p)?;
        Ok(st)
    }

    /// A remote syscall in the stub's main thread.
    pub fn call(&mut self, name: &'static str, nr: i64, args: &[u64]) -> Result<u64, RestoreError> {
        Ok(self.r.syscall(name, nr, args)?)
    }

    fn empty(&mut self, p: &ProcessImage) -> Result<(), RestoreError> {
        // The stub inherited ferry's rseq registration; the kernel would
        // write to it (and kill the stub) once ferry's TLS is unmapped.
        let rseq = ptrace::get_rseq_config(self.pid).map_err(|source| RestoreError::Ptrace {
            pid: self.pid,
            op: "GET_RSEQ_CONFIGURATION",
            source,
        })?;
        if rseq.rseq_abi_pointer != 0 {
            self.call(
                "rseq(unregister)",
                libc::SYS_rseq,
                &[
                    rseq.rseq_abi_pointer,
                    rseq.rseq_abi_size as u64,
                    sys::RSEQ_FLAG_UNREGISTER,
                    rseq.signature as u64,
                ],
            )?;
        }
        self.area = self.pick_area(p)?;
        self.call(
            "mmap(gadget)",
            libc::SYS_mmap,
            &[
                self.area,
                AREA_LEN,
                (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64 | sys::MAP_FIXED_NOREPLACE,
                u64::MAX,
                0,
            ],
        )?;
        // syscall; int3 — the int3 is never reached with single-stepping
        // but stops a stray run dead.
        self.r.write(self.area, &[0x0f, 0x05, 0xcc])?;
        self.r.set_gadget(self.area);
        self.r
            .use_scratch(self.area + PAGE_SIZE as u64, AREA_LEN as usize - PAGE_SIZE);
        self.call(
            "close_range",
            libc::SYS_close_range,
            &[0, u32::MAX as u64, 0],
        )?;
        let end = self.area + AREA_LEN;
        self.call("munmap(low)", libc::SYS_munmap, &[0, self.area])?;
        self.call("munmap(high)", libc::SYS_munmap, &[end, TASK_SIZE - end])?;
        if let Some(vvar) = p.vmas.iter().find(|v| v.kind == VmaKind::Vvar) {
            self.call(
                "arch_prctl(ARCH_MAP_VDSO_64)",
                libc::SYS_arch_prctl,
                &[sys::ARCH_MAP_VDSO_64, vvar.start],
            )?;
        }
        Ok(())
    }

    /// An address for the gadget area that neither the image nor the stub uses.
    fn pick_area(&self, p: &ProcessImage) -> Result<u64, RestoreError> {
        let mine = proc::read_maps(self.pid).map_err(|e| RestoreError::Step {
            pid: self.pid,
            what: "the stub".into(),
            why: e.to_string(),
        })?;
        let busy = |a: u64| {
            let e = a + AREA_LEN + PAGE_SIZE as u64;
            p.vmas
                .iter()
                .any(|v| v.start < e && a < v.end + PAGE_SIZE as u64)
                || mine
                    .iter()
                    .any(|m| m.start < e && a < m.end + PAGE_SIZE as u64)
        };
        let mut a: u64 = 0x1_0000_0000;
        while a < TASK_SIZE - AREA_LEN {
            if !busy(a) {
                return Ok(a);
            }
            a += 0x4000_0000;
        }
        Err(RestoreError::Step {
            pid: self.pid,
            what: "the address space".into(),
            why: "no free room for ferry's temporary gadget page".into(),
        })
    }

    /// Final steps: drop the gadget area (from the gadget itself), put the
    /// final registers in place and let the process run.
    pub fn release(mut self) -> Result<(), RestoreError> {
        self.call(
            "prctl(PR_SET_PDEATHSIG)",
            libc::SYS_prctl,
            &[libc::PR_SET_PDEATHSIG as u64, 0],
        )?;
        self.call("munmap(gadget)", libc::SYS_munmap, &[self.area, AREA_LEN])?;
        let pid = self.pid;
        let pt = |op| move |source| RestoreError::Ptrace { pid, op, source };
        ptrace::set_regs(pid, &self.r.saved).map_err(pt("SETREGS"))?;
        ptrace::set_sigmask(pid, self.final_sigmask).map_err(pt("SETSIGMASK"))?;
        for (r, mask) in &self.threads {
            let tid = r.tid;
            let pt = |op| {
                move |source| RestoreError::Ptrace {
                    pid: tid,
                    op,
                    source,
                }
            };
            ptrace::set_regs(tid, &r.saved).map_err(pt("SETREGS"))?;
            ptrace::set_sigmask(tid, *mask).map_err(pt("SETSIGMASK"))?;
        }
        self.remove_temp_files();
        // Every thread is complete before any of them runs.
        for (r, _) in &self.threads {
            let tid = r.tid;
            ptrace::detach(tid, 0).map_err(|source| RestoreError::Ptrace {
                pid: tid,
                op: "DETACH",
                source,
            })?;
        }
        ptrace::detach(pid, 0).map_err(pt("DETACH"))?;
        self.released = true;
        Ok(())
    }

    fn remove_temp_files(&mut self) {
        for f in self.temp_files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.remove_temp_files();
        let _ = sys::kill(self.pid, libc::SIGKILL);
        for (r, _) in &self.threads {
            let _ = sys::waitpid(r.tid, libc::__WALL);
        }
        let _ = sys::waitpid(self.pid, libc::__WALL);
    }
}

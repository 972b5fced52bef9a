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
/// Stubs die with ferry (EXITKILL) until released; threads and children
/// they are made to create are traced from birth.
const STUB_PTRACE_OPTIONS: u64 = ptrace::O_EXITKILL | ptrace::O_TRACECLONE | ptrace::O_TRACEFORK;

pub struct Stub {
    /// pid as ferry sees it: for ptrace, /proc and process_vm_*.
    pub pid: i32,
    /// pid as the process itself sees it (differs inside a new namespace):
    /// for syscalls the process makes on itself.
    pub vpid: i32,
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
    /// `avoid` lists every address range any process of the image uses, so
    /// the gadget area (inherited by forked children) collides with none.
    pub fn create(pid: i32, p: &ProcessImage, avoid: &[(u64, u64)]) -> Result<Stub, RestoreError> {
        let child = sys::clone3_stub(&[pid], true).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) => RestoreError::PidInUse { pid },
            _ => RestoreError::Clone { pid, source: e },
        })?;
        let pt = |op| move |source| RestoreError::Ptrace { pid, op, source };
        let attach = || -> Result<(), RestoreError> {
            ptrace::seize(child, STUB_PTRACE_OPTIONS).map_err(pt("SEIZE"))?;
            ptrace::interrupt(child).map_err(pt("INTERRUPT"))?;
            wait_stopped(child, pid)
        };
        if let Err(e) = attach() {
            let _ = sys::kill(child, libc::SIGKILL);
            let _ = sys::waitpid(child, libc::__WALL);
            return Err(e);
        }
        Stub::take(child, pid, p, avoid)
    }

    /// Turns a traced, stopped process into an empty stub.
    fn take(
        child: i32,
        vpid: i32,
        p: &ProcessImage,
        avoid: &[(u64, u64)],
    ) -> Result<Stub, RestoreError> {
        let guard = KillOnDrop(child);
        let pt = |op| {
            move |source| RestoreError::Ptrace {
                pid: child,
                op,
                source,
            }
        };
        ptrace::set_sigmask(child, sys::ALL_SIGNALS).map_err(pt("SETSIGMASK"))?;
        let r = Remote::new(child, find_vdso_gadget(child)?)?;
        let pidfd = sys::pidfd_open(child).map_err(pt("pidfd_open"))?;
        std::mem::forget(guard);
        let mut st = Stub {
            pid: child,
            vpid,
            r,
            area: 0,
            pidfd,
            temp_files: Vec::new(),
            final_sigmask: 0,
            threads: Vec::new(),
            released: false,
        };
        st.empty(p, avoid)?;
        Ok(st)
    }

    /// Forks a child stub with `vpid` (the pid in the stub's namespace)
    /// by a remote clone3 in this one. The child starts traced and stopped,
    /// with this stub's emptied address space (gadget area and vDSO).
    pub fn fork_child(&mut self, vpid: i32) -> Result<Stub, RestoreError> {
        let child = remote_fork(&mut self.r, vpid)?;
        let guard = KillOnDrop(child);
        let pidfd = sys::pidfd_open(child).map_err(|source| RestoreError::Ptrace {
            pid: child,
            op: "pidfd_open",
            source,
        })?;
        let mut r = Remote::new(child, self.r.gadget())?;
        let (scratch, len) = self.r.scratch().unwrap_or((0, 0));
        r.use_scratch(scratch, len);
        std::mem::forget(guard);
        Ok(Stub {
            pid: child,
            vpid,
            r,
            area: self.area,
            pidfd,
            temp_files: Vec::new(),
            final_sigmask: 0,
            threads: Vec::new(),
            released: false,
        })
    }

    /// Makes a stub with `vpid` as a child of `init` (pid 1 of a new pid
    /// namespace, ferry's own `__init`), by a remote clone3 in init, which
    /// is then let go untouched.
    pub fn create_in_namespace(
        init: i32,
        vpid: i32,
        p: &ProcessImage,
        avoid: &[(u64, u64)],
    ) -> Result<Stub, RestoreError> {
        let pt = |op| {
            move |source| RestoreError::Ptrace {
                pid: init,
                op,
                source,
            }
        };
        ptrace::seize(init, ptrace::O_TRACEFORK).map_err(pt("SEIZE"))?;
        let result = (|| {
            ptrace::interrupt(init).map_err(pt("INTERRUPT"))?;
            wait_stopped(init, vpid)?;
            let mut r = Remote::new(init, find_vdso_gadget(init)?)?;
            r.map_scratch(4096)?;
            let child = remote_fork(&mut r, vpid);
            r.unmap_scratch()?;
            r.finish()?;
            child
        })();
        let _ = ptrace::detach(init, 0);
        let child = result?;
        // The child was auto-attached with init's options; add ours.
        ptrace::set_options(child, STUB_PTRACE_OPTIONS).map_err(pt("SETOPTIONS"))?;
        Stub::take(child, vpid, p, avoid)
    }

    /// Moves the vDSO block to where the image had it (a forked stub has
    /// its parent's; a process that exec'd had its own).
    pub fn place_vdso(&mut self, p: &ProcessImage) -> Result<(), RestoreError> {
        let Some(want) = p
            .vmas
            .iter()
            .find(|v| v.kind == VmaKind::Vvar)
            .map(|v| v.start)
        else {
            return Ok(());
        };
        let maps = proc::read_maps(self.pid).map_err(|e| RestoreError::Step {
            pid: self.pid,
            what: "the stub".into(),
            why: e.to_string(),
        })?;
        let special: Vec<(u64, u64, bool)> = maps
            .iter()
            .filter_map(|m| match m.path.as_deref() {
                Some("[vvar]") => Some((m.start, m.end, true)),
                Some("[vvar_vclock]" | "[vdso]") => Some((m.start, m.end, false)),
                _ => None,
            })
            .collect();
        if special.iter().any(|&(s, _, vvar)| vvar && s == want) {
            return Ok(());
        }
        for &(s, e, _) in &special {
            self.call("munmap(vdso)", libc::SYS_munmap, &[s, e - s])?;
        }
        self.call(
            "arch_prctl(ARCH_MAP_VDSO_64)",
            libc::SYS_arch_prctl,
            &[sys::ARCH_MAP_VDSO_64, want],
        )?;
        Ok(())
    }

    /// Hands descriptors from ferry to the stub over a unix socket the stub
    /// creates; returns their numbers in the stub (lowest free ones).
    pub fn receive_fds(&mut self, fds: &[std::os::fd::RawFd]) -> Result<Vec<u64>, RestoreError> {
        let mut out = Vec::with_capacity(fds.len());
        if fds.is_empty() {
            return Ok(out);
        }
        self.r.reset_scratch();
        let pair = self.r.reserve(8)?;
        self.call(
            "socketpair",
            libc::SYS_socketpair,
            &[libc::AF_UNIX as u64, libc::SOCK_DGRAM as u64, 0, pair],
        )?;
        let mut b = [0u8; 8];
        self.r.read(pair, &mut b)?;
        let a = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let bfd = i32::from_ne_bytes([b[4], b[5], b[6], b[7]]) as u64;
        let pid = self.pid;
        let mine = sys::pidfd_getfd(&self.pidfd, a).map_err(|e| RestoreError::Step {
            pid,
            what: "descriptor transfer".into(),
            why: format!("pidfd_getfd: {e}"),
        })?;
        self.call("close", libc::SYS_close, &[a as u64])?;
        for batch in fds.chunks(sys::SCM_MAX_FD) {
            use std::os::fd::AsRawFd;
            sys::send_fds(mine.as_raw_fd(), batch).map_err(|e| RestoreError::Step {
                pid,
                what: "descriptor transfer".into(),
                why: format!("sendmsg: {e}"),
            })?;
            // struct msghdr, one iovec of one byte, and the control buffer.
            self.r.reset_scratch();
            let data = self.r.reserve(8)?;
            let iov = self
                .r
                .put(&[data.to_ne_bytes(), 1u64.to_ne_bytes()].concat())?;
            let ctl_len = 16 + (batch.len() * 4).div_ceil(8) * 8;
            let ctl = self.r.reserve(ctl_len)?;
            let mut msg = [0u64; 7];
            msg[2] = iov;
            msg[3] = 1;
            msg[4] = ctl;
            msg[5] = ctl_len as u64;
            let bytes: Vec<u8> = msg.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let m = self.r.put(&bytes)?;
            self.call("recvmsg", libc::SYS_recvmsg, &[bfd, m, 0])?;
            let mut c = vec![0u8; ctl_len];
            self.r.read(ctl, &mut c)?;
            for k in 0..batch.len() {
                let o = 16 + 4 * k;
                out.push(i32::from_ne_bytes([c[o], c[o + 1], c[o + 2], c[o + 3]]) as u64);
            }
        }
        self.call("close", libc::SYS_close, &[bfd])?;
        Ok(out)
    }

    /// A remote syscall in the stub's main thread.
    pub fn call(&mut self, name: &'static str, nr: i64, args: &[u64]) -> Result<u64, RestoreError> {
        Ok(self.r.syscall(name, nr, args)?)
    }

    fn empty(&mut self, p: &ProcessImage, avoid: &[(u64, u64)]) -> Result<(), RestoreError> {
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
        self.area = self.pick_area(avoid)?;
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
    fn pick_area(&self, avoid: &[(u64, u64)]) -> Result<u64, RestoreError> {
        let mine = proc::read_maps(self.pid).map_err(|e| RestoreError::Step {
            pid: self.pid,
            what: "the stub".into(),
            why: e.to_string(),
        })?;
        let busy = |a: u64| {
            let e = a + AREA_LEN + PAGE_SIZE as u64;
            avoid
                .iter()
                .any(|&(s, end)| s < e && a < end + PAGE_SIZE as u64)
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

    /// Lets the stub die with a zombie's wait status: exit_group(code), or
    /// the signal that killed it (with its default action, no core file).
    pub fn exit_as_zombie(mut self, status: i32) -> Result<(), RestoreError> {
        let pid = self.pid;
        let pt = |op| move |source| RestoreError::Ptrace { pid, op, source };
        let mut regs = self.r.saved;
        regs.rip = self.r.gadget();
        regs.orig_rax = u64::MAX;
        let sig = status & 0x7f;
        if sig == 0 {
            regs.rax = libc::SYS_exit_group as u64;
            regs.rdi = ((status >> 8) & 0xff) as u64;
            ptrace::set_sigmask(pid, sys::ALL_SIGNALS).map_err(pt("SETSIGMASK"))?;
        } else {
            let _ = sys::prlimit(pid, libc::RLIMIT_CORE, Some((0, 0)));
            self.r.reset_scratch();
            let dfl = self
                .r
                .put(sys::pod_bytes(&sys::KernelSigaction::default()))?;
            self.call(
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                &[sig as u64, dfl, 0, 8],
            )?;
            regs.rax = libc::SYS_kill as u64;
            regs.rdi = self.vpid as u64;
            regs.rsi = sig as u64;
            ptrace::set_sigmask(pid, sys::ALL_SIGNALS & !(1u64 << (sig - 1)))
                .map_err(pt("SETSIGMASK"))?;
        }
        ptrace::set_regs(pid, &regs).map_err(pt("SETREGS"))?;
        self.released = true;
        ptrace::detach(pid, 0).map_err(pt("DETACH"))?;
        Ok(())
    }

    /// Withdraws one pending instance of `sig` (rt_sigtimedwait, no wait).
    pub fn drain_signal(&mut self, sig: i32) -> Result<(), RestoreError> {
        self.r.reset_scratch();
        let set = self.r.put(&(1u64 << (sig - 1)).to_ne_bytes())?;
        let zero = self.r.reserve(16)?;
        // The signal is queued only once the detached zombie-to-be has run
        // exit_group; poll briefly for it.
        for _ in 0..1000 {
            let r = self.r.syscall_raw(
                "rt_sigtimedwait",
                libc::SYS_rt_sigtimedwait,
                &[set, 0, zero, 8],
            )?;
            if r.0 == sig as i64 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    fn remove_temp_files(&mut self) {
        for f in self.temp_files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Waits for the ptrace stop of a task ferry just attached or created.
fn wait_stopped(tid: i32, vpid: i32) -> Result<(), RestoreError> {
    loop {
        match sys::waitpid(tid, libc::__WALL).map_err(|source| RestoreError::Ptrace {
            pid: tid,
            op: "waitpid",
            source,
        })? {
            Some((_, WaitStatus::Stopped { .. })) => return Ok(()),
            Some((_, status)) => {
                return Err(RestoreError::Step {
                    pid: vpid,
                    what: "the process".into(),
                    why: format!("it ended at creation: {status:?}"),
                })
            }
            None => {}
        }
    }
}

/// A remote clone3 (fork-like, exact pid `vpid` in the caller's pid
/// namespace) in the process `r` drives; returns the child's pid as ferry
/// sees it, stopped and traced.
fn remote_fork(r: &mut Remote, vpid: i32) -> Result<i32, RestoreError> {
    r.reset_scratch();
    let set_tid = r.put(&vpid.to_ne_bytes())?;
    let args = sys::CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid,
        set_tid_size: 1,
        ..Default::default()
    };
    let a = r.put(sys::pod_bytes(&args))?;
    let (ret, ev) = r.syscall_raw(
        "clone3(process)",
        libc::SYS_clone3,
        &[a, std::mem::size_of::<sys::CloneArgs>() as u64],
    )?;
    if ret < 0 {
        return Err(match -ret as i32 {
            libc::EEXIST => RestoreError::PidInUse { pid: vpid },
            e => RestoreError::Clone {
                pid: vpid,
                source: std::io::Error::from_raw_os_error(e),
            },
        });
    }
    let child = ev
        .new_tasks
        .first()
        .copied()
        .ok_or_else(|| RestoreError::Step {
            pid: vpid,
            what: "the process".into(),
            why: "clone3 reported no fork event".into(),
        })?;
    let guard = KillOnDrop(child);
    wait_stopped(child, vpid)?;
    std::mem::forget(guard);
    Ok(child)
}

/// Kills a half-made stub if its setup fails.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = sys::kill(self.0, libc::SIGKILL);
        let _ = sys::waitpid(self.0, libc::__WALL);
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

//! Per-process and per-thread state, in the order KERNEL.md §2 gives:
//! signal dispositions, pending signals, timers, cwd/umask/personality/comm,
//! rlimits; then per thread sigaltstack, rseq, TID address, robust list,
//! xstate and registers. Signal masks are applied last, at release.

use super::stub::Stub;
use super::RestoreError;
use crate::image::{ProcessImage, ThreadImage};
use crate::remote::Remote;
use crate::sys::{self, ptrace, UserRegs, WaitStatus};

pub fn restore_process_state(st: &mut Stub, p: &ProcessImage) -> Result<(), RestoreError> {
    // Every disposition the stub does not already have is set, default
    // ones included: the stub inherited the handlers of the process it was
    // cloned from (ferry, or the job's init), whose code is gone.
    let (ign, cgt) = match crate::proc::status::read_status(st.pid) {
        Ok(s) => (s.sig_ign, s.sig_cgt),
        // Unknown: set every one.
        Err(_) => (u64::MAX, u64::MAX),
    };
    // All actions go to scratch in one write; one remote call per signal.
    st.r.reset_scratch();
    let size = std::mem::size_of::<sys::KernelSigaction>();
    let mut all = Vec::with_capacity(p.sigactions.len() * size);
    for act in &p.sigactions {
        all.extend_from_slice(sys::pod_bytes(act));
    }
    let base = st.r.put(&all)?;
    for (i, act) in p.sigactions.iter().enumerate() {
        let sig = i as u64 + 1;
        if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
            continue;
        }
        if stub_has_action(ign, cgt, sig, act) {
            continue;
        }
        let a = base + (i * size) as u64;
        let r =
            st.r.syscall_raw("rt_sigaction", libc::SYS_rt_sigaction, &[sig, a, 0, 8])?;
        // Signals 32 and 33 are reserved by glibc but settable by the
        // kernel; a failure elsewhere is an error.
        if r.0 < 0 {
            return Err(RestoreError::Step {
                pid: st.pid,
                what: format!("the action of signal {sig}"),
                why: std::io::Error::from_raw_os_error(-r.0 as i32).to_string(),
            });
        }
    }
    for (which, t) in p.itimers.iter().enumerate() {
        let mut t = *t;
        if t.value_sec == 0 && t.value_usec == 0 {
            // An expired periodic timer is re-armed by the kernel only when
            // its signal is dequeued (kernel/signal.c); that signal is in the
            // image as pending, so arm the next period now.
            if t.interval_sec == 0 && t.interval_usec == 0 {
                continue;
            }
            t.value_sec = t.interval_sec;
            t.value_usec = t.interval_usec;
        }
        st.r.reset_scratch();
        let a = st.r.put(sys::pod_bytes(&t))?;
        st.call("setitimer", libc::SYS_setitimer, &[which as u64, a, 0])?;
    }
    st.call("umask", libc::SYS_umask, &[p.umask as u64])?;
    st.r.reset_scratch();
    let cwd = st.r.put_cstr(&p.cwd)?;
    st.call("chdir", libc::SYS_chdir, &[cwd])?;
    st.call(
        "personality",
        libc::SYS_personality,
        &[p.personality as u64],
    )?;
    st.r.reset_scratch();
    let comm = st.r.put_cstr(&p.comm)?;
    st.call(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, comm],
    )?;
    for &(res, cur, max) in &p.rlimits {
        if let Err(e) = sys::prlimit(st.pid, res, Some((cur, max))) {
            // Raising a hard limit needs CAP_SYS_RESOURCE (KERNEL.md §2);
            // keep the soft limit at least.
            let (_, here_max) = sys::prlimit(st.pid, res, None).unwrap_or((0, 0));
            let _ = sys::prlimit(st.pid, res, Some((cur.min(here_max), here_max)));
            tracing::warn!(resource = res, "cannot restore rlimit {cur}/{max}: {e}");
        }
    }
    for info in &p.shared_pending {
        queue_signal(st, None, info)?;
    }
    Ok(())
}

/// Whether the stub already has the image's action for `sig`: a plain
/// default action (SIG_DFL, no flags, no mask, no restorer) where the stub's
/// own disposition is the default one (neither ignored nor caught in its
/// /proc status). The stub's default actions carry no flags or mask: exec
/// clears them, and neither ferry nor its init sets SIG_DFL with flags.
fn stub_has_action(ign: u64, cgt: u64, sig: u64, act: &sys::KernelSigaction) -> bool {
    let bit = 1u64 << (sig - 1);
    (ign | cgt) & bit == 0 && sys::pod_bytes(act).iter().all(|&b| b == 0)
}

/// Re-queues a pending signal from inside the process, so the kernel
/// accepts any si_code (KERNEL.md §2).
fn queue_signal(st: &mut Stub, tid: Option<i32>, info: &[u8]) -> Result<(), RestoreError> {
    let sig = i32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as u64;
    st.r.reset_scratch();
    let a = st.r.put(info)?;
    match tid {
        None => st.call(
            "rt_sigqueueinfo",
            libc::SYS_rt_sigqueueinfo,
            &[st.vpid as u64, sig, a],
        )?,
        Some(t) => st.call(
            "rt_tgsigqueueinfo",
            libc::SYS_rt_tgsigqueueinfo,
            &[st.vpid as u64, t as u64, sig, a],
        )?,
    };
    Ok(())
}

/// Registers as they must be when the thread resumes: a syscall that was
/// interrupted by the freeze is re-executed from its `syscall` instruction
/// (KERNEL.md §5, restartable syscalls).
pub fn resume_regs(t: &ThreadImage) -> UserRegs {
    let mut r = t.regs;
    if (r.orig_rax as i64) >= 0 {
        match r.rax as i64 {
            sys::ERESTARTSYS
            | sys::ERESTARTNOINTR
            | sys::ERESTARTNOHAND
            | sys::ERESTART_RESTARTBLOCK => {
                r.rax = r.orig_rax;
                r.rip -= 2;
            }
            _ => {}
        }
    }
    r.orig_rax = u64::MAX;
    r
}

pub fn restore_threads(st: &mut Stub, p: &ProcessImage) -> Result<(), RestoreError> {
    let pid = st.pid;
    let pt = |tid: i32, op: &'static str| {
        move |source| RestoreError::Ptrace {
            pid: tid,
            op,
            source,
        }
    };
    // Other threads first: they are cloned from the leader, whose own
    // registers must still be the stub's while it runs clone3.
    for t in &p.threads[1..] {
        let tid = create_thread(st, t.tid)?;
        let mut r = Remote::new(tid, st.r.gadget())?;
        let (scratch, len) = st.r.scratch().unwrap_or((0, 0));
        r.use_scratch(scratch, len);
        restore_thread_state(&mut r, t)?;
        ptrace::set_xstate(tid, &t.xstate).map_err(pt(tid, "SETREGSET(XSTATE)"))?;
        r.saved = resume_regs(t);
        st.threads.push((r, t.sigmask));
    }
    // Signals are queued from the leader: the kernel accepts any si_code
    // only when the caller is the target's thread-group leader.
    for t in &p.threads {
        for info in &t.pending {
            queue_signal(st, Some(t.tid), info)?;
        }
    }
    let leader = &p.threads[0];
    restore_thread_state(&mut st.r, leader)?;
    ptrace::set_xstate(pid, &leader.xstate).map_err(pt(pid, "SETREGSET(XSTATE)"))?;
    // Later remote calls (and release) use these registers as the base.
    st.r.saved = resume_regs(leader);
    st.final_sigmask = leader.sigmask;
    Ok(())
}

/// Creates a thread with an exact TID by a remote clone3 in the leader.
/// It starts stopped (PTRACE_O_TRACECLONE) and never runs stub code: its
/// registers are replaced before it is let go.
fn create_thread(st: &mut Stub, tid: i32) -> Result<i32, RestoreError> {
    st.r.reset_scratch();
    let set_tid = st.r.put(&tid.to_ne_bytes())?;
    let stack = st.r.reserve(1024)?;
    let flags = libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM;
    let args = sys::CloneArgs {
        flags: flags as u64,
        stack,
        stack_size: 1024,
        set_tid,
        set_tid_size: 1,
        ..Default::default()
    };
    let a = st.r.put(sys::pod_bytes(&args))?;
    let (r, ev) = st.r.syscall_raw(
        "clone3(thread)",
        libc::SYS_clone3,
        &[a, std::mem::size_of::<sys::CloneArgs>() as u64],
    )?;
    if r < 0 {
        return Err(match -r as i32 {
            libc::EEXIST => RestoreError::PidInUse { pid: tid },
            e => RestoreError::Step {
                pid: st.pid,
                what: format!("thread {tid}"),
                why: format!("clone3: {}", std::io::Error::from_raw_os_error(e)),
            },
        });
    }
    let new = ev.new_tasks.first().copied().unwrap_or(r as i32);
    loop {
        match sys::waitpid(new, libc::__WALL) {
            Ok(Some((_, WaitStatus::Stopped { .. }))) => break,
            Ok(Some((_, status))) => {
                return Err(RestoreError::Step {
                    pid: st.pid,
                    what: format!("thread {tid}"),
                    why: format!("it ended at creation: {status:?}"),
                })
            }
            Ok(None) => {}
            Err(e) => {
                return Err(RestoreError::Ptrace {
                    pid: new,
                    op: "waitpid",
                    source: e,
                })
            }
        }
    }
    Ok(new)
}

fn restore_thread_state(r: &mut Remote, t: &ThreadImage) -> Result<(), RestoreError> {
    r.reset_scratch();
    let ss = r.put(sys::pod_bytes(&t.sigaltstack))?;
    r.syscall("sigaltstack", libc::SYS_sigaltstack, &[ss, 0])?;
    if let Some(rs) = t.rseq {
        r.syscall(
            "rseq",
            libc::SYS_rseq,
            &[
                rs.rseq_abi_pointer,
                rs.rseq_abi_size as u64,
                0,
                rs.signature as u64,
            ],
        )?;
    }
    r.syscall(
        "set_tid_address",
        libc::SYS_set_tid_address,
        &[t.tid_address],
    )?;
    if t.robust_list.0 != 0 {
        r.syscall(
            "set_robust_list",
            libc::SYS_set_robust_list,
            &[t.robust_list.0, t.robust_list.1],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_default_actions_on_default_signals_are_skipped() {
        let dfl = sys::KernelSigaction::default();
        let usr1 = libc::SIGUSR1 as u64;
        let bit = 1u64 << (usr1 - 1);
        assert!(stub_has_action(0, 0, usr1, &dfl));
        // The stub ignores or catches it: set it.
        assert!(!stub_has_action(bit, 0, usr1, &dfl));
        assert!(!stub_has_action(0, bit, usr1, &dfl));
        // Another signal's bit does not matter.
        assert!(stub_has_action(bit << 1, bit >> 1, usr1, &dfl));
        // SIG_DFL with flags, a mask or a restorer, or a handler: set it.
        for act in [
            sys::KernelSigaction {
                flags: 0x0400_0000,
                ..dfl
            },
            sys::KernelSigaction { mask: 1, ..dfl },
            sys::KernelSigaction {
                restorer: 0x1000,
                ..dfl
            },
            sys::KernelSigaction { handler: 1, ..dfl },
        ] {
            assert!(!stub_has_action(0, 0, usr1, &act));
        }
        // Signal 64 uses the top bit.
        assert!(!stub_has_action(0, 1 << 63, 64, &dfl));
    }
}

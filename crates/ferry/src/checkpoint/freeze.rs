//! Freezing a process: PTRACE_SEIZE + PTRACE_INTERRUPT on every thread,
//! re-scanning until no new thread appears, and blocking every signal while
//! ferry drives the threads so none is consumed by a remote syscall.

use super::CheckpointError;
use crate::proc;
use crate::sys::{self, ptrace, WaitStatus};
use std::collections::BTreeMap;
use std::time::Instant;

/// A frozen process: every thread in a ptrace stop, with its original
/// signal mask remembered.
pub struct Frozen {
    pub pid: i32,
    /// tid → original signal mask, in /proc/PID/task order (leader first).
    pub threads: BTreeMap<i32, u64>,
    pub order: Vec<i32>,
    pub since: Instant,
    done: bool,
}

impl Frozen {
    /// Stops every thread of `pid`.
    pub fn freeze(pid: i32, ptrace_options: u64) -> Result<Self, CheckpointError> {
        let since = Instant::now();
        let mut f = Frozen {
            pid,
            threads: BTreeMap::new(),
            order: Vec::new(),
            since,
            done: false,
        };
        let mut seized: Vec<i32> = Vec::new();
        // A running thread can clone before it is interrupted, so scan until
        // a pass finds nothing new with everything already stopped.
        for _pass in 0..1000 {
            let tids = proc::list_tids(pid).map_err(|e| match e {
                proc::ProcError::Gone { .. } => CheckpointError::NoProcess { pid },
                e => CheckpointError::Proc(e),
            })?;
            let new: Vec<i32> = tids.into_iter().filter(|t| !seized.contains(t)).collect();
            if new.is_empty() {
                break;
            }
            for &t in &new {
                match ptrace::seize(t, ptrace_options) {
                    Ok(()) => {}
                    // The thread exited between listing and seizing.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                        f.release();
                        return Err(CheckpointError::Attach {
                            pid,
                            tid: t,
                            why: format!("{e} (already traced, or not permitted)"),
                        });
                    }
                    Err(e) => {
                        f.release();
                        return Err(CheckpointError::Attach {
                            pid,
                            tid: t,
                            why: e.to_string(),
                        });
                    }
                }
                seized.push(t);
                if let Err(e) = ptrace::interrupt(t) {
                    tracing::debug!(tid = t, "interrupt failed: {e}");
                }
                match wait_stop(t) {
                    Ok(true) => {
                        let mask = ptrace::get_sigmask(t).map_err(|e| CheckpointError::Ptrace {
                            tid: t,
                            op: "GETSIGMASK",
                            source: e,
                        })?;
                        let _ = ptrace::set_sigmask(t, sys::ALL_SIGNALS);
                        f.threads.insert(t, mask);
                        f.order.push(t);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        f.release();
                        return Err(e);
                    }
                }
            }
        }
        if !f.threads.contains_key(&pid) {
            f.release();
            return Err(CheckpointError::NoProcess { pid });
        }
        // Leader first, then the others in tid order.
        f.order.sort_by_key(|&t| (t != pid, t));
        Ok(f)
    }

    /// Puts masks back and lets every thread run on as before.
    pub fn thaw(mut self) -> Result<(), CheckpointError> {
        self.release();
        Ok(())
    }

    fn release(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        for (&t, &mask) in &self.threads {
            let _ = ptrace::set_sigmask(t, mask);
            if let Err(e) = ptrace::detach(t, 0) {
                tracing::warn!(tid = t, "detach failed: {e}");
            }
        }
    }

    /// Kills the frozen process and reaps the tracing side of every thread.
    pub fn kill(mut self) -> Result<(), CheckpointError> {
        self.done = true;
        sys::kill(self.pid, libc::SIGKILL).map_err(|e| CheckpointError::Ptrace {
            tid: self.pid,
            op: "kill",
            source: e,
        })?;
        // Consume the exit notification the tracer gets for each thread;
        // otherwise the real parent's waitpid on the leader can hang. The
        // leader's exit is only reported once every other thread is reaped,
        // so it goes last.
        let others = self.order.iter().filter(|&&t| t != self.pid);
        for &t in others.chain(std::iter::once(&self.pid)) {
            loop {
                match sys::waitpid(t, libc::__WALL) {
                    Ok(Some((_, WaitStatus::Exited(_) | WaitStatus::Signaled(_)))) | Err(_) => {
                        break
                    }
                    Ok(_) => {}
                }
            }
        }
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Any error path leaves the process running as it was.
        self.release();
    }
}

/// Waits for the interrupt stop of a freshly seized thread; false if it exited.
fn wait_stop(tid: i32) -> Result<bool, CheckpointError> {
    loop {
        match sys::waitpid(tid, libc::__WALL) {
            Ok(Some((_, WaitStatus::Stopped { event, sig }))) => {
                if event == ptrace::EVENT_STOP || sig == libc::SIGTRAP {
                    return Ok(true);
                }
                // A signal-delivery stop raced with the interrupt: let the
                // signal through and wait for the interrupt stop.
                let _ = ptrace::cont(tid, sig);
            }
            Ok(Some((_, WaitStatus::Exited(_) | WaitStatus::Signaled(_)))) => return Ok(false),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(false),
            Err(e) => {
                return Err(CheckpointError::Ptrace {
                    tid,
                    op: "waitpid",
                    source: e,
                })
            }
        }
    }
}

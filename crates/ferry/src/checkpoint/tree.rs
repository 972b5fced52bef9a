//! Freezing a whole process tree at once: the root and every descendant,
//! re-scanned until a pass finds no new process (a frozen process cannot
//! fork, so the tree stabilises). Zombies are recorded, not frozen.
//!
//! For a job started by `ferry run`, the tree is every process of its PID
//! namespace but the namespace's init, and pids are translated to the
//! namespace's own numbering.

use super::{CheckpointError, Frozen};
use crate::proc;
use std::collections::HashMap;

/// One process of the tree.
pub struct Task {
    /// pid as ferry sees it (for ptrace, /proc, process_vm_*).
    pub pid: i32,
    /// Raw wait status for a zombie.
    pub zombie: Option<i32>,
    pub frozen: Option<Frozen>,
}

pub struct FrozenTree {
    /// Parents before children; the root first.
    pub tasks: Vec<Task>,
    /// The namespace job's main process (its pid as ferry sees it).
    pub ns_main: Option<i32>,
    /// ferry's pid → the pid the image records (identity outside a namespace).
    pub vpid: HashMap<i32, i32>,
}

/// The `ferry run` namespace `pid` lives in: (init's pid as ferry sees it,
/// main's pid in the namespace), if pid is the main process of such a job.
fn ns_job(pid: i32) -> Result<Option<i32>, CheckpointError> {
    let st = proc::read_status(pid)?;
    if st.ns_pid.len() < 2 {
        return Ok(None);
    }
    let init = st.ppid;
    let init_st = proc::read_status(init)?;
    // init is pid 1 of the same namespace, one level deeper than us.
    if init_st.ns_pid.len() == st.ns_pid.len() && init_st.ns_pid.last() == Some(&1) {
        Ok(Some(init))
    } else {
        Ok(None)
    }
}

impl FrozenTree {
    pub fn freeze(root: i32) -> Result<Self, CheckpointError> {
        let init = ns_job(root)?;
        let mut tree = FrozenTree {
            tasks: Vec::new(),
            ns_main: init.map(|_| root),
            vpid: HashMap::new(),
        };
        for _pass in 0..1000 {
            // Walk from the top every pass: a process frozen mid-fork shows
            // its new child only once stopped.
            let mut order = vec![root];
            if let Some(init) = init {
                for c in proc::children(init)? {
                    if c != root {
                        order.push(c);
                    }
                }
            }
            let mut i = 0;
            while i < order.len() {
                let p = order[i];
                if let Ok(children) = proc::children(p) {
                    for c in children {
                        if !order.contains(&c) {
                            order.push(c);
                        }
                    }
                }
                i += 1;
            }
            let mut added = false;
            for p in order {
                if tree.tasks.iter().any(|t| t.pid == p) {
                    continue;
                }
                added = true;
                match freeze_one(p, p == root) {
                    Ok(t) => tree.tasks.push(t),
                    // A child that exited (and was reaped) since it was
                    // listed is simply not part of the job any more.
                    Err(CheckpointError::NoProcess { .. }) if p != root => {
                        // It exited while being frozen: a zombie now (its
                        // parent is frozen), or already reaped.
                        if let Ok(st) = proc::read_stat(p) {
                            if st.state == 'Z' {
                                tree.tasks.push(Task {
                                    pid: p,
                                    zombie: Some(st.exit_code),
                                    frozen: None,
                                });
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            if !added {
                break;
            }
        }
        tree.vpid = vpids(&tree, init)?;
        Ok(tree)
    }

    /// Whether `pid` is a live (frozen) process of the tree: not a zombie,
    /// not one that exited since an earlier freeze.
    pub fn runs(&self, pid: i32) -> bool {
        self.tasks
            .iter()
            .any(|t| t.pid == pid && t.frozen.is_some())
    }

    pub fn pids(&self) -> Vec<i32> {
        self.tasks.iter().map(|t| t.pid).collect()
    }

    /// The pid to record for ferry's `pid` (0 for processes outside the tree
    /// that have no number inside the job's namespace).
    pub fn vpid_of(&self, pid: i32) -> i32 {
        match self.vpid.get(&pid) {
            Some(&v) => v,
            None if self.ns_main.is_some() => 0,
            None => pid,
        }
    }

    pub fn thaw(self) -> Result<(), CheckpointError> {
        for t in self.tasks.into_iter().rev() {
            if let Some(f) = t.frozen {
                f.thaw()?;
            }
        }
        Ok(())
    }

    /// Kills every process of the tree.
    pub fn kill(self) -> Result<(), CheckpointError> {
        // SIGKILL everything first so no process can react to another's death.
        for t in &self.tasks {
            if t.frozen.is_some() {
                let _ = crate::sys::kill(t.pid, libc::SIGKILL);
            }
        }
        for t in self.tasks.into_iter().rev() {
            if let Some(f) = t.frozen {
                f.kill()?;
            }
        }
        Ok(())
    }
}

fn freeze_one(pid: i32, is_root: bool) -> Result<Task, CheckpointError> {
    let stat = proc::read_stat(pid).map_err(|e| match e {
        proc::ProcError::Gone { .. } => CheckpointError::NoProcess { pid },
        e => CheckpointError::Proc(e),
    })?;
    if stat.state == 'Z' {
        if is_root {
            return Err(CheckpointError::Unsupported {
                pid,
                what: "a zombie (it has exited; its parent has not reaped it yet)".into(),
            });
        }
        return Ok(Task {
            pid,
            zombie: Some(stat.exit_code),
            frozen: None,
        });
    }
    Ok(Task {
        pid,
        zombie: None,
        frozen: Some(Frozen::freeze(pid, 0)?),
    })
}

/// Namespace pids of every task and thread, from NSpid in /proc status.
fn vpids(tree: &FrozenTree, init: Option<i32>) -> Result<HashMap<i32, i32>, CheckpointError> {
    let mut map = HashMap::new();
    let Some(init) = init else {
        return Ok(map);
    };
    map.insert(init, 1);
    for t in &tree.tasks {
        let st = proc::read_status(t.pid)?;
        map.insert(t.pid, *st.ns_pid.last().unwrap_or(&t.pid));
        if let Some(f) = &t.frozen {
            for &tid in &f.order {
                let ts = proc::read_task_status(t.pid, tid)?;
                map.insert(tid, *ts.ns_pid.last().unwrap_or(&tid));
            }
        }
    }
    Ok(map)
}

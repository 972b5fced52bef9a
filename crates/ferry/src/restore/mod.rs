//! Restore: rebuild a process from an image. A *stub* is cloned with the
//! image's pid (clone3 set_tid), taken over with ptrace, emptied, and then
//! turned into the checkpointed process by remote syscalls: address space,
//! vDSO, contents, files, signals, timers, mm fields, threads, registers.
//! Nothing of ferry's code runs inside it.

mod files;
mod filetable;
mod memory;
pub mod postcopy;
mod stub;
mod task;

use crate::image::{ImageDir, ImageError, Inventory, ProcessImage};
use crate::remote::RemoteError;
use crate::sys;
use filetable::FileTable;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("pid {pid} is in use by another process; the image needs it (stop that process, or restore in a fresh pid namespace)")]
    PidInUse { pid: i32 },
    #[error("image was made on an incompatible machine: {what}")]
    Machine { what: String },
    #[error("{}: {why}", path.display())]
    Missing { path: PathBuf, why: String },
    #[error("cannot create the process with pid {pid}: {source}")]
    Clone { pid: i32, source: std::io::Error },
    #[error("pid {pid}: ptrace {op} failed: {source}")]
    Ptrace {
        pid: i32,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("pid {pid}: cannot restore {what}: {why}")]
    Step { pid: i32, what: String, why: String },
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The root's pid as the caller sees it.
    pub pid: i32,
    /// The caller's child to wait for: the root, or the init of the job's
    /// new pid namespace (which exits with the job's status).
    pub wait_pid: i32,
    pub processes: usize,
    pub threads: usize,
    pub pages_data: u64,
    pub pages_zero: u64,
    pub bytes_read: u64,
    /// From creating the stub to letting it run.
    pub total: Duration,
    /// Of which spent on non-memory state.
    pub state_time: Duration,
    /// Post-copy: each process's userfaultfd (empty otherwise).
    #[serde(skip)]
    pub spaces: Vec<postcopy::RegisteredSpace>,
    /// Post-copy: ferry's own descriptor of every shared-memory object, by
    /// image id, to fill their page caches (empty otherwise).
    #[serde(skip)]
    pub shmem: std::collections::HashMap<u64, std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// Restores the image in `dir`; on success the tree runs, its root a child
/// of the caller. On failure nothing is left behind.
pub fn restore(dir: &Path) -> Result<Report, RestoreError> {
    let img = ImageDir::new(dir, false)?;
    let inv = img.read_inventory()?;
    restore_from(
        &inv,
        &memory::DiskPages::new(&img),
        &img,
        &Options::default(),
    )
}

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Restore into a fresh pid namespace even if the image was not made
    /// from a `ferry run` job: its pids are then free whatever runs on this
    /// host (the root's parent becomes the namespace's init).
    pub fresh_pidns: bool,
    /// Post-copy: per image pid, the `[start, end)` runs of pages that are
    /// not in the page source but still on the source node. Their areas are
    /// registered with a userfaultfd made in the process (see
    /// [`postcopy`]); the report hands the descriptors over. Pages of
    /// shared objects must be planned in every mapping
    /// ([`postcopy::SharedLayout::expand`]).
    pub postcopy: Option<std::sync::Arc<PlannedPages>>,
    /// An init started ahead (see [`crate::jobinit::PreInit`]), used for an
    /// image with a pid namespace instead of starting one now.
    pub init: Option<std::sync::Arc<std::sync::Mutex<Option<crate::jobinit::PreInit>>>>,
}

/// Per image pid, `[start, end)` runs of pages still on the source.
pub type PlannedPages = std::collections::HashMap<i32, Vec<(u64, u64)>>;

pub use memory::{DiskPages, PageSink, PageSource};

/// Restores an already validated inventory whose pages come from `pages`
/// and whose blobs (contents of deleted files) are in `blobs`.
pub fn restore_from(
    inv: &Inventory,
    pages: &dyn PageSource,
    blobs: &ImageDir,
    opts: &Options,
) -> Result<Report, RestoreError> {
    check_machine(inv)?;
    let fresh_ns = inv.pidns.is_some() || opts.fresh_pidns;
    preflight(inv, fresh_ns)?;
    let t0 = Instant::now();
    let img = blobs;
    let mut table = FileTable::open(img, inv)?;
    let avoid: Vec<(u64, u64)> = inv
        .processes
        .iter()
        .flat_map(|p| p.vmas.iter().map(|v| (v.start, v.end)))
        .collect();
    // A `ferry run` job gets a fresh namespace and init; its processes are
    // recreated inside with their namespace pids.
    let pre = opts
        .init
        .as_ref()
        .and_then(|m| m.lock().unwrap_or_else(|e| e.into_inner()).take());
    let init = match &inv.pidns {
        Some(ns) => Some(InitGuard(
            match pre {
                Some(pre) => pre.adopt(ns.main),
                None => crate::jobinit::spawn_init(
                    &["--adopt".into(), ns.main.to_string().into()],
                    crate::jobinit::InitIo::Null,
                ),
            }
            .map_err(|e| RestoreError::Step {
                pid: ns.main,
                what: "the job's pid namespace".into(),
                why: e.to_string(),
            })?,
        )),
        None => None,
    };
    let mut stubs = create_tree(inv, &avoid, init.as_ref().map(|i| i.0.id() as i32))?;
    tracing::debug!(elapsed = ?t0.elapsed(), processes = stubs.len(), "stubs ready");
    let mut stats = memory::Stats::default();
    let mut state_time = Duration::ZERO;
    let mut spaces = Vec::new();
    let shared = match &opts.postcopy {
        Some(_) => postcopy::SharedLayout::new(inv),
        None => postcopy::SharedLayout::default(),
    };
    for (st, p) in stubs.iter_mut().zip(&inv.processes) {
        if p.zombie.is_some() {
            continue;
        }
        st.place_vdso(p)?;
        let s = memory::restore(st, pages, &table, p)?;
        stats.pages_data += s.pages_data;
        stats.pages_zero += s.pages_zero;
        stats.bytes += s.bytes;
        let t = Instant::now();
        files::restore(st, &table, p)?;
        task::restore_process_state(st, p)?;
        task::restore_threads(st, p)?;
        // Last: the kernel writes into the process's memory on its behalf
        // while it is rebuilt (thread ids at clone...), and nobody serves
        // faults yet. After the files, so the reference takes a free number.
        if let Some(plan) = opts.postcopy.as_ref().and_then(|m| m.get(&p.pid)) {
            let ranges = postcopy::areas_to_register(p, plan, &shared);
            if !ranges.is_empty() {
                spaces.push(postcopy::register(st, p, ranges)?);
            }
        }
        state_time += t.elapsed();
    }
    tracing::debug!(elapsed = ?t0.elapsed(), pages = stats.pages_data, "processes rebuilt");
    table.unlink_temp();
    let shmem = match &opts.postcopy {
        Some(_) => table.dup_shmem()?,
        None => Default::default(),
    };
    let root_pid = stubs[0].pid;
    finish_zombies(&mut stubs, inv)?;
    // Children first: a parent that runs finds its children complete.
    for st in stubs.into_iter().rev() {
        st.release()?;
    }
    let wait_pid = match init {
        Some(g) => g.release(),
        None => root_pid,
    };
    Ok(Report {
        pid: root_pid,
        wait_pid,
        processes: inv.processes.len(),
        threads: inv.processes.iter().map(|p| p.threads.len()).sum(),
        pages_data: stats.pages_data,
        pages_zero: stats.pages_zero,
        bytes_read: stats.bytes,
        total: t0.elapsed(),
        state_time,
        spaces,
        shmem,
    })
}

/// Creates one stub per process, parents before children, each child
/// forked from its parent's stub so parent links, sessions and groups are
/// the image's. The stubs are still empty.
fn create_tree(
    inv: &Inventory,
    avoid: &[(u64, u64)],
    init: Option<i32>,
) -> Result<Vec<stub::Stub>, RestoreError> {
    let mut stubs: Vec<stub::Stub> = Vec::with_capacity(inv.processes.len());
    for p in &inv.processes {
        let parent = inv.processes.iter().position(|q| q.pid == p.ppid);
        let st = match (parent, init) {
            (Some(i), _) if i < stubs.len() => stubs[i].fork_child(p.pid)?,
            (None, Some(init)) => stub::Stub::create_in_namespace(init, p.pid, p, avoid)?,
            (None, None) if stubs.is_empty() => stub::Stub::create(p.pid, p, avoid)?,
            _ => {
                return Err(RestoreError::Step {
                    pid: p.pid,
                    what: "the process tree".into(),
                    why: format!("parent {} is not in the image", p.ppid),
                })
            }
        };
        stubs.push(st);
        let last = stubs.len() - 1;
        set_session(&mut stubs[last], p)?;
    }
    // Groups led by a process created after their members' fork.
    let in_tree = |pid: i32| inv.processes.iter().any(|q| q.pid == pid);
    for (st, p) in stubs.iter_mut().zip(&inv.processes) {
        if p.pgid != p.pid && p.sid != p.pid && in_tree(p.pgid) {
            let r =
                st.r.syscall_raw("setpgid", libc::SYS_setpgid, &[0, p.pgid as u64])?;
            if r.0 < 0 {
                tracing::warn!(
                    pid = p.pid,
                    pgid = p.pgid,
                    "cannot rejoin process group: errno {}",
                    -r.0
                );
            }
        }
    }
    Ok(stubs)
}

/// Kills the new namespace (through its init) unless the restore completes.
struct InitGuard(std::process::Child);

impl InitGuard {
    fn release(self) -> i32 {
        let pid = self.0.id() as i32;
        std::mem::forget(self);
        pid
    }
}

impl Drop for InitGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A session or group leader becomes one again before it forks children,
/// so they inherit its session as they did.
fn set_session(st: &mut stub::Stub, p: &ProcessImage) -> Result<(), RestoreError> {
    if p.sid == p.pid {
        st.call("setsid", libc::SYS_setsid, &[])?;
    } else if p.pgid == p.pid {
        st.call("setpgid", libc::SYS_setpgid, &[0, 0])?;
    }
    Ok(())
}

/// Zombies exit again with their status while their parents are stopped;
/// the SIGCHLD that causes is withdrawn where the image had none pending.
fn finish_zombies(stubs: &mut Vec<stub::Stub>, inv: &Inventory) -> Result<(), RestoreError> {
    let mut parents = Vec::new();
    for i in (0..stubs.len()).rev() {
        let p = &inv.processes[i];
        if let Some(status) = p.zombie {
            let st = stubs.remove(i);
            st.exit_as_zombie(status)?;
            if let Some(j) = inv.processes.iter().position(|q| q.pid == p.ppid) {
                parents.push(j);
            }
        }
    }
    parents.sort_unstable();
    parents.dedup();
    for j in parents {
        let p = &inv.processes[j];
        let had = p
            .shared_pending
            .iter()
            .any(|s| i32::from_ne_bytes([s[0], s[1], s[2], s[3]]) == libc::SIGCHLD);
        // Indices shift as zombies are removed; find the stub by pid.
        let vpid = p.pid;
        if had {
            continue;
        }
        if let Some(st) = stubs.iter_mut().find(|s| s.vpid == vpid) {
            st.drain_signal(libc::SIGCHLD)?;
        }
    }
    Ok(())
}

fn check_machine(inv: &Inventory) -> Result<(), RestoreError> {
    let here = crate::checkpoint::machine_info();
    let m = &inv.machine;
    if m.xstate_size != here.xstate_size || m.xcr0 != here.xcr0 {
        return Err(RestoreError::Machine {
            what: format!(
                "CPU state: image has xstate {} bytes / XCR0 {:#x}, this machine {} / {:#x}",
                m.xstate_size, m.xcr0, here.xstate_size, here.xcr0
            ),
        });
    }
    if m.vdso_layout != here.vdso_layout {
        return Err(RestoreError::Machine {
            what: format!(
                "vDSO layout differs (image {:?}, here {:?}): restore on the same kernel",
                m.vdso_layout, here.vdso_layout
            ),
        });
    }
    if m.kernel_release != here.kernel_release {
        tracing::warn!(
            "image from kernel {}, restoring on {}",
            m.kernel_release,
            here.kernel_release
        );
    }
    Ok(())
}

/// Everything that can be checked before touching anything.
fn preflight(inv: &Inventory, fresh_ns: bool) -> Result<(), RestoreError> {
    let exists = |path: &str, why: &str| {
        if Path::new(path).exists() {
            Ok(())
        } else {
            Err(RestoreError::Missing {
                path: PathBuf::from(path),
                why: why.to_string(),
            })
        }
    };
    for p in inv.processes.iter().filter(|p| p.zombie.is_none()) {
        // In a new pid namespace every number is free.
        if !fresh_ns {
            for t in &p.threads {
                if sys::pid_exists(t.tid) {
                    return Err(RestoreError::PidInUse { pid: t.tid });
                }
            }
        }
        exists(&p.exe, "the executable is missing")?;
        exists(&p.cwd, "the working directory is missing")?;
        for v in &p.vmas {
            if let crate::image::VmaKind::File {
                path, blob: None, ..
            } = &v.kind
            {
                exists(path, &format!("mapped at {:#x} but missing", v.start))?;
            }
        }
        for f in &p.fds {
            if let Some(crate::image::FileImage {
                kind:
                    crate::image::FileKind::Path {
                        path, blob: None, ..
                    },
                ..
            }) = inv.files.get(f.file as usize)
            {
                exists(path, &format!("open as fd {} but missing", f.fd))?;
            }
        }
    }
    if !fresh_ns {
        for p in inv.processes.iter().filter(|p| p.zombie.is_some()) {
            if sys::pid_exists(p.pid) {
                return Err(RestoreError::PidInUse { pid: p.pid });
            }
        }
    }
    Ok(())
}

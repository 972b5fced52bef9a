//! Checkpoint: freeze a process, capture all of its state into an image
//! model plus page stores, then kill it or let it run on.

mod files;
pub mod freeze;
pub mod memory;
mod task;
pub mod tree;

use crate::image::{ImageDir, ImageError, Inventory, MachineInfo, ProcessImage};
use crate::proc::{self, ProcError};
use crate::remote::{self, Remote, RemoteError};
use crate::sys;
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

pub use freeze::Frozen;
pub use tree::FrozenTree;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("no process with pid {pid}")]
    NoProcess { pid: i32 },
    #[error("cannot attach to thread {tid} of process {pid}: {why}")]
    Attach { pid: i32, tid: i32, why: String },
    #[error("thread {tid}: ptrace {op} failed: {source}")]
    Ptrace {
        tid: i32,
        op: &'static str,
        source: std::io::Error,
    },
    /// Something ferry cannot capture yet; the process was left running.
    #[error("process {pid}: cannot checkpoint {what}")]
    Unsupported { pid: i32, what: String },
    #[error("process {pid}: cannot read memory at {addr:#x}: {source}")]
    Memory {
        pid: i32,
        addr: u64,
        source: std::io::Error,
    },
    #[error("process {pid}: {what}: {source}")]
    Io {
        pid: i32,
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// How to checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Let the process continue after the image is written.
    pub leave_running: bool,
}

/// What a checkpoint did, for the user and for benchmarks.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pid: i32,
    pub processes: usize,
    pub threads: usize,
    /// From the first PTRACE_INTERRUPT to kill/thaw.
    pub frozen: Duration,
    /// Time spent on non-memory state while frozen.
    pub state_time: Duration,
    pub total: Duration,
    pub pages_data: u64,
    pub pages_zero: u64,
    pub bytes_written: u64,
    pub leave_running: bool,
}

/// Facts about this machine that a restore must match.
pub fn machine_info() -> MachineInfo {
    let uts = |f: &str| {
        std::fs::read_to_string(format!("/proc/sys/kernel/{f}"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let xstate_size = sys::xstate_size() as u32;
    MachineInfo {
        kernel_release: uts("osrelease"),
        hostname: uts("hostname"),
        page_size: sys::PAGE_SIZE as u32,
        xstate_size,
        xcr0: sys::xcr0(),
        vdso_layout: vdso_layout(sys::getpid()),
    }
}

/// Lengths of the vDSO-related areas of a process, in maps order.
pub fn vdso_layout(pid: i32) -> Vec<(String, u64)> {
    let Ok(maps) = proc::read_maps(pid) else {
        return Vec::new();
    };
    maps.iter()
        .filter_map(|m| {
            let p = m.path.as_deref()?;
            matches!(p, "[vvar]" | "[vvar_vclock]" | "[vdso]")
                .then(|| (p.to_string(), m.end - m.start))
        })
        .collect()
}

/// Checkpoints process `pid` and all its descendants into `dir`.
pub fn checkpoint(pid: i32, dir: &Path, opts: &Options) -> Result<Report, CheckpointError> {
    let t0 = Instant::now();
    if pid == sys::getpid() {
        return Err(CheckpointError::Unsupported {
            pid,
            what: "ferry itself".into(),
        });
    }
    if !proc::exists(pid) {
        return Err(CheckpointError::NoProcess { pid });
    }
    let img = ImageDir::new(dir, true)?;
    let tree = FrozenTree::freeze(pid)?;
    let since = tree
        .tasks
        .iter()
        .filter_map(|t| t.frozen.as_ref().map(|f| f.since))
        .min()
        .unwrap_or_else(Instant::now);
    let (inv, stats, state_time) = match capture(&tree, &img) {
        Ok(c) => c,
        Err(e) => {
            tree.thaw()?;
            return Err(e);
        }
    };
    let threads = inv.processes.iter().map(|p| p.threads.len()).sum();
    let processes = inv.processes.len();
    // Write the inventory before killing: without it the image is void and
    // the job must survive.
    let inv_bytes = match img.write_inventory(&inv) {
        Ok(n) => n,
        Err(e) => {
            tree.thaw()?;
            return Err(e.into());
        }
    };
    let frozen_for = since.elapsed();
    if opts.leave_running {
        tree.thaw()?;
    } else {
        tree.kill()?;
    }
    Ok(Report {
        pid,
        processes,
        threads,
        frozen: frozen_for,
        state_time,
        total: t0.elapsed(),
        pages_data: stats.pages_data,
        pages_zero: stats.pages_zero,
        bytes_written: stats.bytes + inv_bytes,
        leave_running: opts.leave_running,
    })
}

/// Captures every process of the frozen tree.
fn capture(
    tree: &FrozenTree,
    img: &ImageDir,
) -> Result<(Inventory, memory::Stats, Duration), CheckpointError> {
    let t = Instant::now();
    let (mut inv, maps_of) = capture_state(tree, img)?;
    let state_time = t.elapsed();
    tracing::debug!(elapsed = ?state_time, "process state captured");
    let mut stats = memory::Stats::default();
    for (task, (p, maps)) in tree.tasks.iter().zip(inv.processes.iter_mut().zip(maps_of)) {
        let Some(maps) = maps else { continue };
        let (vmas, s) = memory::dump(task.pid, &maps, img, &p.pages_file)?;
        p.vmas = vmas;
        stats.pages_data += s.pages_data;
        stats.pages_zero += s.pages_zero;
        stats.bytes += s.bytes;
    }
    tracing::debug!(elapsed = ?t.elapsed(), pages = stats.pages_data, "memory dumped");
    Ok((inv, stats, state_time))
}

/// The areas of one process as /proc listed them.
pub type Maps = Vec<proc::MapEntry>;

/// Captures everything but page contents: the inventory of the frozen tree
/// with each process's areas left empty, and the maps each was built from
/// (None for zombies). Contents of deleted files go to blobs in `img`.
/// Live migration sends the pages itself.
pub fn capture_state(
    tree: &FrozenTree,
    img: &ImageDir,
) -> Result<(Inventory, Vec<Option<Maps>>), CheckpointError> {
    capture_state_reusing(tree, img, &|_| None)
}

/// [`capture_state`], taking each area's flags from `earlier(pid)` (smaps
/// read shortly before the freeze) where the area is still exactly the
/// same: smaps walks every page table entry to count them (~15 ms per
/// GiB here), /proc/PID/maps does not. A process with any new or changed
/// area gets a full smaps read.
pub fn capture_state_reusing<'a>(
    tree: &FrozenTree,
    img: &ImageDir,
    earlier: &dyn Fn(i32) -> Option<&'a [proc::MapEntry]>,
) -> Result<(Inventory, Vec<Option<Maps>>), CheckpointError> {
    let t = Instant::now();
    let pids = tree.pids();
    let mut inv = Inventory {
        machine: machine_info(),
        root_pid: tree.vpid_of(tree.tasks[0].pid),
        processes: Vec::new(),
        files: Vec::new(),
        pipes: Vec::new(),
        blobs: Vec::new(),
        created_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
        pidns: tree.ns_main.map(|m| crate::image::PidNsImage {
            main: tree.vpid_of(m),
        }),
    };
    let mut files = files::Collector::default();
    let mut maps_of = Vec::new();
    for task in &tree.tasks {
        let pid = task.pid;
        let Some(frozen) = task.frozen.as_ref() else {
            let st = proc::read_stat(pid)?;
            inv.processes
                .push(zombie_image(tree, pid, &st, task.zombie.unwrap_or(0)));
            maps_of.push(None);
            continue;
        };
        let maps = match earlier(pid) {
            Some(e) => {
                with_flags_of(proc::read_maps(pid)?, e).map_or_else(|| proc::read_smaps(pid), Ok)?
            }
            None => proc::read_smaps(pid)?,
        };
        memory::check_supported(pid, &maps, &pids)?;
        tracing::debug!(pid, elapsed = ?t.elapsed(), areas = maps.len(), "maps read and checked");
        let fds = files.capture(pid, &pids, &maps, img, &mut inv)?;
        let gadget = remote::find_vdso_gadget(pid)?;
        let mut p = task::capture_process(pid, frozen, gadget, &inv.machine)?;
        p.fds = fds;
        translate_ids(tree, &mut p);
        inv.processes.push(p);
        maps_of.push(Some(maps));
    }
    Ok((inv, maps_of))
}

/// `maps` with each area's flags copied from the identical area of
/// `earlier` (sorted by address, read from smaps); `None` if an area has no
/// identical earlier one.
pub fn with_flags_of(mut maps: Maps, earlier: &[proc::MapEntry]) -> Option<Maps> {
    for m in maps.iter_mut() {
        let i = earlier.partition_point(|e| e.start < m.start);
        let e = earlier.get(i)?;
        let same = e.end == m.end
            && e.perms == m.perms
            && e.offset == m.offset
            && (e.dev_major, e.dev_minor, e.inode) == (m.dev_major, m.dev_minor, m.inode)
            && e.path == m.path
            && e.deleted == m.deleted;
        if !same {
            return None;
        }
        m.vm_flags = Some(e.vm_flags.clone()?);
    }
    Some(maps)
}

/// Records pids as the image's namespace numbers them.
fn translate_ids(tree: &FrozenTree, p: &mut ProcessImage) {
    p.pid = tree.vpid_of(p.pid);
    p.ppid = tree.vpid_of(p.ppid);
    p.pgid = tree.vpid_of(p.pgid);
    p.sid = tree.vpid_of(p.sid);
    for t in &mut p.threads {
        t.tid = tree.vpid_of(t.tid);
    }
    p.pages_file = format!("pages-{}.img", p.pid);
}

fn zombie_image(tree: &FrozenTree, pid: i32, st: &proc::StatInfo, status: i32) -> ProcessImage {
    ProcessImage {
        pid: tree.vpid_of(pid),
        zombie: Some(status),
        ppid: tree.vpid_of(st.ppid),
        pgid: tree.vpid_of(st.pgrp),
        sid: tree.vpid_of(st.session),
        comm: st.comm.clone(),
        exe: String::new(),
        cwd: String::new(),
        umask: 0,
        personality: 0,
        rlimits: Vec::new(),
        mm: Default::default(),
        auxv: Vec::new(),
        vmas: Vec::new(),
        threads: Vec::new(),
        sigactions: Vec::new(),
        shared_pending: Vec::new(),
        itimers: Default::default(),
        fds: Vec::new(),
        pages_file: String::new(),
    }
}

/// Makes a Remote for a frozen thread (used by task capture).
pub(crate) fn remote_for(tid: i32, gadget: u64) -> Result<Remote, CheckpointError> {
    Ok(Remote::new(tid, gadget)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
00400000-00401000 r-xp 00000000 fd:00 1234                               /bin/job
Rss:                   4 kB
VmFlags: rd ex mr mw me 
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
Rss:                1024 kB
VmFlags: rd wr mr mw me ac wf 
";
    const MAPS: &str = "\
00400000-00401000 r-xp 00000000 fd:00 1234                               /bin/job
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
";

    #[test]
    fn flags_are_reused_for_identical_areas_only() {
        let earlier = proc::parse_smaps(SMAPS).unwrap();
        let maps = proc::parse_maps(MAPS).unwrap();
        let got = with_flags_of(maps, &earlier).expect("same areas");
        assert_eq!(got, earlier);
        assert!(got[1].vm_flags.as_ref().unwrap().wipeonfork());
        // The anonymous area grew, or a new one appeared: no reuse.
        let grown = MAPS.replace("7f0000100000", "7f0000200000");
        assert!(with_flags_of(proc::parse_maps(&grown).unwrap(), &earlier).is_none());
        let more = format!("{MAPS}7f0000300000-7f0000301000 rw-p 00000000 00:00 0 \n");
        assert!(with_flags_of(proc::parse_maps(&more).unwrap(), &earlier).is_none());
        // Protection changed (mprotect): no reuse.
        let prot = MAPS.replace("rw-p", "r--p");
        assert!(with_flags_of(proc::parse_maps(&prot).unwrap(), &earlier).is_none());
    }
}

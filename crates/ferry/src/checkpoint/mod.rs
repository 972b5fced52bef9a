//! Checkpoint: freeze a process, capture all of its state into an image
//! model plus page stores, then kill it or let it run on.

mod files;
pub mod freeze;
mod memory;
mod task;

use crate::image::{ImageDir, ImageError, Inventory, MachineInfo};
use crate::proc::{self, ProcError};
use crate::remote::{self, Remote, RemoteError};
use crate::sys;
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

pub use freeze::Frozen;

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

/// Checkpoints process `pid` into `dir`.
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
    let frozen = Frozen::freeze(pid, ptrace_options())?;
    let captured = capture(pid, &frozen, &img);
    let (inv, stats, state_time) = match captured {
        Ok(c) => c,
        Err(e) => {
            frozen.thaw()?;
            return Err(e);
        }
    };
    let threads = frozen.order.len();
    let frozen_for;
    if opts.leave_running {
        frozen_for = frozen.since.elapsed();
        frozen.thaw()?;
    } else {
        // Write the inventory before killing: without it the image is void
        // and the process must survive.
        if let Err(e) = img.write_inventory(&inv) {
            frozen.thaw()?;
            return Err(e.into());
        }
        frozen_for = frozen.since.elapsed();
        frozen.kill()?;
    }
    let inv_bytes = if opts.leave_running {
        img.write_inventory(&inv)?
    } else {
        std::fs::metadata(img.path(crate::image::INVENTORY))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    Ok(Report {
        pid,
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

fn ptrace_options() -> u64 {
    // If ferry dies mid-checkpoint the job must not be left stopped forever;
    // EXITKILL would kill it instead, so ferry relies on detach-on-exit.
    0
}

/// Captures everything while the process is frozen.
fn capture(
    pid: i32,
    frozen: &Frozen,
    img: &ImageDir,
) -> Result<(Inventory, memory::Stats, Duration), CheckpointError> {
    let t = Instant::now();
    let maps = proc::read_smaps(pid)?;
    memory::check_supported(pid, &maps)?;
    tracing::debug!(elapsed = ?t.elapsed(), areas = maps.len(), "maps read and checked");
    let mut inv = Inventory {
        machine: machine_info(),
        root_pid: pid,
        processes: Vec::new(),
        files: Vec::new(),
        pipes: Vec::new(),
        blobs: Vec::new(),
        created_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };
    let fds = files::capture(pid, &[pid], img, &mut inv)?;
    tracing::debug!(elapsed = ?t.elapsed(), fds = fds.len(), "descriptors captured");
    let gadget = remote::find_vdso_gadget(pid)?;
    let mut proc_img = task::capture_process(pid, frozen, gadget, &inv.machine)?;
    proc_img.fds = fds;
    let state_time = t.elapsed();
    tracing::debug!(elapsed = ?state_time, "process state captured");
    let (vmas, stats) = memory::dump(pid, &maps, img, &proc_img.pages_file)?;
    tracing::debug!(elapsed = ?t.elapsed(), pages = stats.pages_data, "memory dumped");
    proc_img.vmas = vmas;
    inv.processes.push(proc_img);
    Ok((inv, stats, state_time))
}

/// Makes a Remote for a frozen thread (used by task capture).
pub(crate) fn remote_for(tid: i32, gadget: u64) -> Result<Remote, CheckpointError> {
    Ok(Remote::new(tid, gadget)?)
}

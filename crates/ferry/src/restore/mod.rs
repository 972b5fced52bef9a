//! Restore: rebuild a process from an image. A *stub* is cloned with the
//! image's pid (clone3 set_tid), taken over with ptrace, emptied, and then
//! turned into the checkpointed process by remote syscalls: address space,
//! vDSO, contents, files, signals, timers, mm fields, threads, registers.
//! Nothing of ferry's code runs inside it.

mod files;
mod memory;
mod stub;
mod task;

use crate::image::{ImageDir, ImageError, Inventory, ProcessImage};
use crate::remote::RemoteError;
use crate::sys;
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
    pub pid: i32,
    pub threads: usize,
    pub pages_data: u64,
    pub pages_zero: u64,
    pub bytes_read: u64,
    /// From creating the stub to letting it run.
    pub total: Duration,
    /// Of which spent on non-memory state.
    pub state_time: Duration,
}

/// Restores the image in `dir`; on success the process runs, as a child of
/// the caller. On failure nothing is left behind.
pub fn restore(dir: &Path) -> Result<Report, RestoreError> {
    let img = ImageDir::new(dir, false)?;
    let inv = img.read_inventory()?;
    check_machine(&inv)?;
    let p = inv
        .process(inv.root_pid)
        .ok_or_else(|| RestoreError::Step {
            pid: inv.root_pid,
            what: "the image".into(),
            why: "root process missing".into(),
        })?
        .clone();
    preflight(&inv, &p)?;
    restore_process(&img, &inv, &p)
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
fn preflight(inv: &Inventory, p: &ProcessImage) -> Result<(), RestoreError> {
    for t in &p.threads {
        if sys::pid_exists(t.tid) {
            return Err(RestoreError::PidInUse { pid: t.tid });
        }
    }
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
            kind: crate::image::FileKind::Path {
                path, blob: None, ..
            },
            ..
        }) = inv.files.get(f.file as usize)
        {
            exists(path, &format!("open as fd {} but missing", f.fd))?;
        }
    }
    Ok(())
}

fn restore_process(
    img: &ImageDir,
    inv: &Inventory,
    p: &ProcessImage,
) -> Result<Report, RestoreError> {
    let t0 = Instant::now();
    let mut st = stub::Stub::create(p.pid, p)?;
    // Any error from here on kills the stub (Drop) and leaves nothing.
    tracing::debug!(elapsed = ?t0.elapsed(), "stub ready");
    let stats = memory::restore(&mut st, img, p)?;
    tracing::debug!(elapsed = ?t0.elapsed(), pages = stats.pages_data, "memory restored");
    let t_state = Instant::now();
    files::restore(&mut st, img, inv, p)?;
    task::restore_process_state(&mut st, p)?;
    task::restore_threads(&mut st, p)?;
    let state_time = t_state.elapsed();
    st.release()?;
    Ok(Report {
        pid: p.pid,
        threads: p.threads.len(),
        pages_data: stats.pages_data,
        pages_zero: stats.pages_zero,
        bytes_read: stats.bytes,
        total: t0.elapsed(),
        state_time,
    })
}
